package tp

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

// Loader loads sel of the model onto be; release frees what it made.
type Loader func(ctx context.Context, sel model.Selection, be kernels.Backend) (w *model.Weights, release func(), err error)

// Options make a Group.
type Options struct {
	// NewBackend makes rank r's backend; the group closes it.
	NewBackend func(rank int) (kernels.Backend, error)
	// Load loads a rank's selection (its slices and experts).
	Load Loader
	// Timeout bounds every collective wait (default 30 s): a rank that
	// stops answering fails the step, naming the ranks that never came.
	// With Collectives, whose waits happen inside the backends' stream
	// synchronisation, it bounds the whole step instead: past it the
	// communicators are aborted.
	Timeout time.Duration
	// Collectives, when set, makes the ranks' communicators once (an NCCL
	// communicator per TP group and one over every rank: NCCL below);
	// nil sums through the host with in-process collectives made per step,
	// the CPU reference, which works on any backend.
	Collectives Collectives
	// Dispatch is the MoE layers' expert dispatch: DispatchAllReduce
	// (default, "") or DispatchAllToAll (dispatch.go).
	Dispatch string
	// Head, when set, is rank 0's backend instead of NewBackend(0): the
	// engine's own (the same device), so that the engine's residual
	// stream is rank 0's and never leaves the device (parallel's
	// deviceRanks). The group does not close it.
	Head kernels.Backend
}

// Group runs decoder layers [Grid.First, Grid.End) on Grid.Ranks ranks in
// this process, one goroutine (locked to its OS thread, as a GPU's would
// be) per rank, each with its backend, weights' slices and KV caches. It is
// not safe for concurrent use: its engine or stage runs one step at a time.
type Group struct {
	Grid    *Grid
	ranks   []*rank
	timeout time.Duration
	hidden  int
	comms   *Comms      // from Options.Collectives; nil: in-process per step
	a2a     bool        // DispatchAllToAll
	aborted atomic.Bool // comms were aborted: no more steps
}

type rank struct {
	id      int
	be      kernels.Backend
	shared  bool           // be is Options.Head: not the group's to close
	tables  *ReplicaTables // EPLB replica tables on be; nil: none (replica.go)
	w       *model.Weights
	release func()
	kv      []*kernels.KVCache
	jobs    chan func()
}

// New loads every rank's part of the layers and starts the ranks.
func New(ctx context.Context, g *Grid, opt Options) (*Group, error) {
	if opt.NewBackend == nil || opt.Load == nil {
		return nil, errors.New("rank group: Options need NewBackend and Load")
	}
	if opt.Timeout <= 0 {
		opt.Timeout = 30 * time.Second
	}
	if err := checkDispatch(g, opt); err != nil {
		return nil, err
	}
	gr := &Group{Grid: g, timeout: opt.Timeout, hidden: g.Cfg.HiddenSize, a2a: opt.Dispatch == DispatchAllToAll}
	for r := 0; r < g.Ranks; r++ {
		rk, err := openRank(ctx, g, r, opt)
		if err != nil {
			gr.Close()
			return nil, err
		}
		gr.ranks = append(gr.ranks, rk)
		go rk.loop()
	}
	if opt.Collectives != nil {
		c, err := openComms(ctx, g, gr.ranks, opt.Collectives)
		if err != nil {
			gr.Close()
			return nil, err
		}
		gr.comms = c
		if gr.a2a {
			if err := checkExchangers(g, c); err != nil {
				gr.Close()
				return nil, err
			}
		}
	}
	return gr, nil
}

func openRank(ctx context.Context, g *Grid, r int, opt Options) (*rank, error) {
	rk := &rank{id: r, jobs: make(chan func())}
	if r == 0 && opt.Head != nil {
		rk.be, rk.shared = opt.Head, true
	} else {
		be, err := opt.NewBackend(r)
		if err != nil {
			return nil, fmt.Errorf("rank %d: backend: %w", r, err)
		}
		rk.be = be
	}
	w, release, err := opt.Load(ctx, g.Selection(r), rk.be)
	if err != nil {
		rk.closeBackend()
		return nil, fmt.Errorf("rank %d of %s: %w", r, g, err)
	}
	rk.w, rk.release = w, release
	// Uploaded before any graph capture, so no capture's scratch can later
	// be handed out over them.
	if rk.tables, err = g.ReplicaTables(r, rk.be); err != nil {
		release()
		rk.closeBackend()
		return nil, fmt.Errorf("rank %d: %w", r, err)
	}
	return rk, nil
}

func (rk *rank) closeBackend() {
	if !rk.shared {
		rk.be.Close()
	}
}

// loop runs the rank's jobs on one OS thread (a GPU's context is bound to it).
func (r *rank) loop() {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for job := range r.jobs {
		job()
	}
}

// Layers is the group's layer range.
func (gr *Group) Layers() (first, end int) { return gr.Grid.First, gr.Grid.End }

// Ranks is the number of ranks.
func (gr *Group) Ranks() int { return len(gr.ranks) }

// Backend is rank r's backend.
func (gr *Group) Backend(r int) kernels.Backend { return gr.ranks[r].be }

// DeviceComms reports whether the ranks' collectives are communicators made
// once (Options.Collectives: NCCL on GPUs), which run on the backends'
// streams and can be captured in graphs; the in-process ones go through
// the host.
func (gr *Group) DeviceComms() bool { return gr.comms != nil }

// Weights is rank r's weights (tests inspect its slices).
func (gr *Group) Weights(r int) *model.Weights { return gr.ranks[r].w }

// AllocKV gives every rank a paged KV cache of numBlocks blocks of
// blockSize tokens for each of its layers, holding its KV heads; the
// caller's block ids index every rank's cache alike. A second call
// replaces the caches.
func (gr *Group) AllocKV(dt kernels.DType, numBlocks, blockSize int) error {
	gr.FreeKV()
	c := gr.Grid.Cfg
	for _, rk := range gr.ranks {
		sh := gr.Grid.Shard(rk.id)
		_, _, kv0, kv1 := sh.Heads(c)
		for range rk.w.Layers {
			k, err := rk.be.NewTensor(dt, numBlocks*blockSize, kv1-kv0, c.HeadDim)
			if err != nil {
				gr.FreeKV()
				return fmt.Errorf("rank %d: kv cache: %w", rk.id, err)
			}
			v, err := rk.be.NewTensor(dt, numBlocks*blockSize, kv1-kv0, c.HeadDim)
			if err != nil {
				rk.be.Free(k)
				gr.FreeKV()
				return fmt.Errorf("rank %d: kv cache: %w", rk.id, err)
			}
			rk.kv = append(rk.kv, &kernels.KVCache{K: k, V: v, BlockSize: blockSize, KVHeads: kv1 - kv0, HeadDim: c.HeadDim})
		}
	}
	return nil
}

// FreeKV frees the ranks' caches.
func (gr *Group) FreeKV() {
	for _, rk := range gr.ranks {
		for _, l := range rk.kv {
			rk.be.Free(l.K)
			rk.be.Free(l.V)
		}
		rk.kv = nil
	}
}

// Close stops the ranks and frees their caches, communicators, weights and
// backends (the communicators before the backends whose streams they use).
func (gr *Group) Close() {
	gr.FreeKV()
	for _, rk := range gr.ranks {
		close(rk.jobs)
	}
	gr.comms.close()
	gr.comms = nil
	for _, rk := range gr.ranks {
		rk.tables.Free()
		if rk.release != nil {
			rk.release()
		}
		rk.closeBackend()
	}
	gr.ranks = nil
}
