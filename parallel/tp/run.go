package tp

import (
	"context"
	"errors"
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

// comms are one step's collectives: an all-reduce over each attention
// replica's TP ranks, and one over every rank for the MoE layers.
type comms struct {
	fate  *fate
	tp    []*hub // by replica
	world *hub
}

func (gr *Group) newComms(f *fate) *comms {
	g := gr.Grid
	c := &comms{fate: f}
	all := make([]int, g.Ranks)
	for r := range all {
		all[r] = r
	}
	c.world = newHub(all, gr.timeout, f)
	for rep := 0; rep < g.Ranks/g.TP; rep++ {
		c.tp = append(c.tp, newHub(all[rep*g.TP:(rep+1)*g.TP], gr.timeout, f))
	}
	return c
}

// rankComm is rank r's view of the step's collectives.
func (c *comms) rankComm(g *Grid, r int, be kernels.Backend) *model.RankComm {
	return g.comm(r, &comm{hub: c.tp[g.Replica(r)], member: g.TPRank(r), be: be}, &comm{hub: c.world, member: r, be: be})
}

// Run runs the group's layers over the residual stream h [T, hidden] (f32)
// of batch b, in place: every rank starts from h and, the partial sums
// all-reduced, ends with the same rows; rank 0's come back. The first
// rank's error (or ctx ending) fails every rank's waits and is returned.
func (gr *Group) Run(ctx context.Context, b *kernels.Batch, h []float32) error {
	T := b.Tokens()
	if len(h) != T*gr.hidden {
		return fmt.Errorf("rank group: %d values for %d tokens × hidden %d", len(h), T, gr.hidden)
	}
	if T == 0 {
		return nil
	}
	if len(gr.ranks) == 0 || len(gr.ranks[0].kv) != len(gr.ranks[0].w.Layers) {
		return fmt.Errorf("rank group: step before the KV caches are allocated (AllocKV)")
	}
	in := f32Bytes(h) // read by every rank; rank 0 writes out, copied to h once all are done
	var out []float32
	err := gr.Do(ctx, func(rs RankState) error {
		res, err := gr.ranks[rs.ID].step(b, in, rs.Comm)
		if rs.ID == 0 {
			out = res
		}
		return err
	})
	if err != nil {
		return err
	}
	copy(h, out)
	return nil
}

// RankState is one rank as a step function given to Do sees it, on the
// rank's own OS thread: its backend, weights' slices, KV caches (one per
// layer, from AllocKV) and the step's collectives.
type RankState struct {
	ID   int
	BE   kernels.Backend
	W    *model.Weights
	KV   []*kernels.KVCache
	Comm *model.RankComm
}

// Do runs fn on every rank at once, each on its rank's thread, under the
// step's failure rules: the first rank's error (a panic becomes one), ctx
// ending or, with the group's communicators, the step outrunning the
// timeout fails every rank's waits (the communicators are aborted) and is
// returned. fn must not return before the work it queued on the rank's
// backend is done (a GPU rank synchronises its stream), so that a peer
// stuck in a collective is still under the step's watch.
func (gr *Group) Do(ctx context.Context, fn func(RankState) error) error {
	if gr.aborted.Load() {
		return errAborted
	}
	if err := ctx.Err(); err != nil {
		return err // before any rank starts: nothing to abort
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st := gr.newStep(ctx)
	defer st.end() // before cancel: a finished step must not trip the watch
	errs := make(chan error, len(gr.ranks))
	var inline func()
	for _, rk := range gr.ranks {
		rs := RankState{ID: rk.id, BE: rk.be, W: rk.w, KV: rk.kv, Comm: st.rankComm(rk)}
		job := func() {
			err := safeDo(fn, rs)
			if err != nil {
				err = fmt.Errorf("rank %d: %w", rk.id, err)
				st.fail(err)
			}
			errs <- err
		}
		if rk.shared {
			// The engine's own backend: its part runs on the caller's
			// goroutine, which drives that backend anyway (no hand-off),
			// once the others have theirs.
			inline = job
			continue
		}
		select {
		case rk.jobs <- job:
		case <-ctx.Done():
			st.fail(ctx.Err())
			errs <- ctx.Err()
		}
	}
	if inline != nil {
		inline()
	}
	var first error
	for range gr.ranks {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		if err := st.fate.Err(); err != nil {
			return err // the root cause, not a peer's report of it
		}
		return first
	}
	return nil
}

// safeDo is fn with a panic turned into the rank's error: a rank that
// dies must still answer, or Do (and its peers) would wait for it.
func safeDo(fn func(RankState) error, rs RankState) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	return fn(rs)
}

// step is one Run's shared outcome and collectives: in-process ones made
// for the step, or the group's communicators under a watch.
type step struct {
	gr     *Group
	fate   *fate
	inproc *comms // nil with the group's communicators
	stop   func() bool
	cancel context.CancelFunc
}

func (gr *Group) newStep(ctx context.Context) *step {
	st := &step{gr: gr, fate: newFate(ctx)}
	if gr.comms == nil {
		st.inproc = gr.newComms(st.fate)
		return st
	}
	// The communicators' waits happen inside the backends' stream
	// synchronisation (NCCL kernels spin on the GPU until every peer's
	// data arrives), out of this package's reach: abort them when the step
	// fails, its context ends, or it runs past the timeout, which makes the
	// spinning kernels exit and the blocked ranks return.
	wctx, cancel := context.WithTimeout(ctx, gr.timeout)
	st.cancel = cancel
	st.stop = context.AfterFunc(wctx, func() {
		err := wctx.Err()
		if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("rank group: step still running after %v: communicators aborted", gr.timeout)
		}
		st.fail(err)
	})
	return st
}

// rankComm is rank rk's view of the step's collectives.
func (st *step) rankComm(rk *rank) *model.RankComm {
	var rc *model.RankComm
	if st.inproc == nil {
		rc = st.gr.comms.rankComm(st.gr.Grid, rk.id)
	} else {
		rc = st.inproc.rankComm(st.gr.Grid, rk.id, rk.be)
	}
	if st.gr.a2a {
		rc.AllToAll = servers{st.gr.Grid, rk.id}
	}
	rk.tables.Attach(rc)
	return rc
}

// fail records the step's first error and releases every rank's waits:
// the in-process hubs watch the fate; the group's communicators are
// aborted (and the group takes no more steps).
func (st *step) fail(err error) {
	st.fate.fail(err)
	if st.inproc == nil {
		st.gr.aborted.Store(true)
		st.gr.comms.abort()
	}
}

// end stops the step's watch.
func (st *step) end() {
	if st.stop != nil {
		st.stop()
		st.cancel()
	}
}

// step runs the rank's layers on its copy of the rows.
func (rk *rank) step(b *kernels.Batch, in []byte, rc *model.RankComm) ([]float32, error) {
	meta, err := rk.be.UploadBatch(b)
	if err != nil {
		return nil, err
	}
	c := rk.w.Config
	f := &model.Forward{Cfg: c, BE: rk.be, Meta: meta, T: b.Tokens(), Ranks: rc}
	defer f.Release()
	x, err := rk.be.NewTensor(kernels.F32, b.Tokens(), c.HiddenSize)
	if err != nil {
		return nil, err
	}
	defer rk.be.Free(x)
	if err := rk.be.Upload(x, in); err != nil {
		return nil, err
	}
	for i, lw := range rk.w.Layers {
		if err := f.Layer(lw, x, rk.kv[i]); err != nil {
			return nil, err
		}
	}
	if rk.id != 0 {
		return nil, nil
	}
	return rk.be.Download(x)
}
