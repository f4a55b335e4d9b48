package tp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/transport/nccl"
)

// NCCLOptions configure the NCCL communicators of a group on one host's GPUs.
type NCCLOptions struct {
	// InitTimeout bounds making all the communicators (default 2 min): a
	// rank whose init fails or never comes aborts the others' and New fails.
	InitTimeout time.Duration
	// EnqueueTimeout bounds how long an all-reduce waits for NCCL to take
	// the call (default nccl.DefaultEnqueueTimeout).
	EnqueueTimeout time.Duration
	Logger         *slog.Logger // nil: slog.Default()
}

// ncclBackend is what a rank's backend must be for NCCL: a CUDA backend
// (kernels/cuda.Backend), whose device ordinal the communicator joins on
// and whose stream the all-reduces are queued on.
type ncclBackend interface {
	nccl.TensorBackend
	Ordinal() int
}

var _ ncclBackend = (*cuda.Backend)(nil)

// NCCL is the Collectives factory of ranks on CUDA backends of one host:
// one communicator per TP group (attention replica) and one over every
// rank for the MoE layers, shared when they have the same ranks (TP =
// ranks, as with vLLM's --tensor-parallel-size alone or with
// --enable-expert-parallel), and each rank's all-reduces queued in place on
// its backend's stream (nccl.TensorAllReducer). One rank still gets a
// one-rank communicator (its all-reduce is skipped), so the one-GPU path
// runs the same set-up as several.
//
// NCCL reads its own environment: NCCL_NVLS_ENABLE=0 (NVLink multicast
// off, as the GPU scripts set it) and the rest are the user's; nothing
// here sets them.
func NCCL(opt NCCLOptions) Collectives {
	if opt.InitTimeout <= 0 {
		opt.InitTimeout = 2 * time.Minute
	}
	if opt.EnqueueTimeout <= 0 {
		opt.EnqueueTimeout = nccl.DefaultEnqueueTimeout
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	return func(ctx context.Context, g *Grid, bes []kernels.Backend) (*Comms, error) {
		return openNCCL(ctx, g, bes, opt)
	}
}

// ncclSet is the communicators and devices a group's NCCL factory made.
type ncclSet struct {
	devs  []*cuda.Device // by rank
	comms [][]*nccl.Comm // by communicator, by member
}

func openNCCL(ctx context.Context, g *Grid, bes []kernels.Backend, opt NCCLOptions) (*Comms, error) {
	cbs := make([]ncclBackend, len(bes))
	onGPU := map[int]int{} // ordinal → rank
	for r, be := range bes {
		cb, ok := be.(ncclBackend)
		if !ok {
			return nil, fmt.Errorf("nccl: rank %d's backend %s is not a CUDA backend", r, be.Name())
		}
		if o, dup := onGPU[cb.Ordinal()]; dup {
			// NCCL refuses two ranks of a communicator on one GPU
			// ("duplicate GPU"); say so before it does, less clearly.
			return nil, fmt.Errorf("nccl: ranks %d and %d both on GPU %d: NCCL needs one GPU per rank", o, r, cb.Ordinal())
		}
		onGPU[cb.Ordinal()] = r
		cbs[r] = cb
	}
	ctx, cancel := context.WithTimeout(ctx, opt.InitTimeout)
	defer cancel()
	s := &ncclSet{}
	for _, cb := range cbs {
		d, err := cuda.OpenDevice(cb.Ordinal())
		if err != nil {
			s.close()
			return nil, fmt.Errorf("nccl: %w", err)
		}
		s.devs = append(s.devs, d)
	}
	start := time.Now()
	groups := commGroups(g)
	for _, members := range groups {
		comms, err := s.initComm(ctx, members)
		if err != nil {
			s.close()
			return nil, fmt.Errorf("nccl: communicator over ranks %v: %w", members, err)
		}
		s.comms = append(s.comms, comms)
	}
	opt.Logger.Info("nccl communicators ready", "grid", g.String(), "communicators", len(groups),
		"elapsed", time.Since(start).Round(time.Millisecond), "NCCL_NVLS_ENABLE", os.Getenv("NCCL_NVLS_ENABLE"))
	return s.rankComms(g, cbs, groups, opt.EnqueueTimeout), nil
}

// commGroups lists the communicators g needs, each as its members' ranks in
// member order: the TP groups (when TP > 1), then every rank (for the MoE
// layers, or the one-rank communicator) unless a TP group already is.
func commGroups(g *Grid) [][]int {
	all := make([]int, g.Ranks)
	for r := range all {
		all[r] = r
	}
	var out [][]int
	if g.TP > 1 {
		for rep := 0; rep < g.Ranks/g.TP; rep++ {
			out = append(out, all[rep*g.TP:(rep+1)*g.TP])
		}
	}
	if g.TP < g.Ranks || g.TP == 1 {
		out = append(out, all)
	}
	return out
}

// initComm makes one communicator: every member's init runs at once (NCCL
// joins them in a bootstrap that waits for all), each on its own goroutine
// and device; the first failure cancels the others' inits, which abort
// their half-made communicators, and aborts the members already made.
func (s *ncclSet) initComm(ctx context.Context, members []int) ([]*nccl.Comm, error) {
	id, err := nccl.NewUniqueID()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	comms := make([]*nccl.Comm, len(members))
	errs := make([]error, len(members))
	var wg sync.WaitGroup
	for m, r := range members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Blocking communicators: every rank is this process's, and a
			// step's two all-reduces per layer must not each start an NCCL
			// thread (a non-blocking group launch: 57 µs on the H200). A
			// rank whose init fails leaves the others' inits waiting in
			// NCCL past the deadline (InitRank returns to us at it).
			c, err := nccl.InitRankWith(ctx, s.devs[r], id, len(members), m, nccl.InitOptions{Blocking: true})
			if err != nil {
				errs[m] = fmt.Errorf("rank %d (GPU %d): %w", r, s.devs[r].Ordinal(), err)
				cancel()
				return
			}
			comms[m] = c
		}()
	}
	wg.Wait() // every init returns by ctx's deadline (InitRank aborts at it)
	if err := errors.Join(errs...); err != nil {
		abortAll(comms)
		return nil, err
	}
	return comms, nil
}

// rankComms wraps each rank's communicators in all-reducers on its stream.
func (s *ncclSet) rankComms(g *Grid, cbs []ncclBackend, groups [][]int, enqueue time.Duration) *Comms {
	out := &Comms{Ranks: make([]RankComms, g.Ranks), Abort: s.abort, Close: s.close}
	reducer := func(c *nccl.Comm, r int) kernels.Collective {
		a := nccl.NewTensorAllReducer(c, cbs[r])
		a.SetEnqueueTimeout(enqueue)
		return a
	}
	for i, members := range groups {
		for m, r := range members {
			c := reducer(s.comms[i][m], r)
			if len(members) == g.Ranks {
				out.Ranks[r].MoE = c
			}
			if len(members) == g.TP && g.TP > 1 {
				out.Ranks[r].TP = c
			}
		}
	}
	return out
}

// abort aborts every communicator at once (each abort may wait on NCCL).
func (s *ncclSet) abort() {
	for _, comms := range s.comms {
		abortAll(comms)
	}
}

// abortAll aborts comms concurrently, waiting at most abortWait: an abort
// stuck in NCCL is left to finish on its goroutine rather than hold up the
// step that is failing.
func abortAll(comms []*nccl.Comm) {
	var wg sync.WaitGroup
	for _, c := range comms {
		if c == nil {
			continue
		}
		wg.Add(1)
		go func() { defer wg.Done(); c.Abort() }()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	t := time.NewTimer(abortWait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
}

// abortWait bounds how long a failing step waits for ncclCommAbort.
const abortWait = 10 * time.Second

// close frees the communicators, then releases the devices.
func (s *ncclSet) close() {
	for _, comms := range s.comms {
		for _, c := range comms {
			c.Close()
		}
	}
	s.comms = nil
	for _, d := range s.devs {
		d.Close()
	}
	s.devs = nil
}
