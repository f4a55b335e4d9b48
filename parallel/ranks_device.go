package parallel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/parallel/tp"
)

// deviceRanks runs a rank group whose rank 0 is the engine's own backend
// (RankOptions.ShareHead): the engine's residual stream is rank 0's, the
// other ranks (its peers) get it by a broadcast (ncclBroadcast on GPUs),
// and rank 0 ends the step holding the result, so the rows never pass
// through the host (the plain group's Run downloads them, uploads them to
// every rank and back each step).
//
// Decode steps replay graphs as the single-GPU engine's do (graphs.go):
// the engine's graph holds the embedding, rank 0's layers (the broadcast
// and the all-reduces captured with them) and lm_head, over the engine's
// arena and metadata; each peer captures its own layers at the same
// bucket, over an arena and metadata of its own, padded alike (the padding
// rows write the engine's scratch block, whose id every rank's cache has).
// A step then costs the engine its update and launch, and each peer (at
// the same time, on its own thread) a metadata update, a launch and a
// stream synchronisation, which keeps a peer stuck on a dead rank under the
// group's step watch; with one rank there are no peers and the step is the
// plain engine's. Graphs need every rank's backend to capture and the
// group's own communicators (NCCL); the in-process ones go through the
// host. An executor stage (OpenStageRanks) runs its steps through
// runDevice alone: its rows are on its backend, rank 0's.
type deviceRanks struct {
	g       *tp.Group
	cfg     *model.Config
	log     *slog.Logger
	capture bool          // graphs possible (every backend captures; device communicators)
	ranks   []*rankGraphs // by rank; rank 0's is unused (the engine's graphs)
	failed  bool          // a peer's capture failed: the engine runs eagerly
}

// rankGraphs are one peer's decode graphs and their arenas.
type rankGraphs struct {
	be     graphBackend
	arenas map[int]*graphArena // by sequence bucket
	graphs map[graphKey]*decodeGraph
}

var _ RankGroup = (*deviceRanks)(nil)

func newDeviceRanks(g *tp.Group, cfg *model.Config, opt EngineOptions) *deviceRanks {
	d := &deviceRanks{g: g, cfg: cfg, log: opt.Logger, capture: g.DeviceComms() && !opt.EnforceEager}
	if d.log == nil {
		d.log = slog.Default()
	}
	for r := 0; r < g.Ranks() && d.capture; r++ {
		gb, ok := g.Backend(r).(graphBackend)
		d.capture = ok
		d.ranks = append(d.ranks, &rankGraphs{be: gb, arenas: map[int]*graphArena{}, graphs: map[graphKey]*decodeGraph{}})
	}
	if !d.capture {
		d.ranks = nil
	}
	return d
}

// ranksCapture reports whether an engine over ranks (nil: none) may
// capture decode graphs: only over a deviceRanks that can.
func ranksCapture(ranks RankGroup) bool {
	if ranks == nil {
		return true
	}
	d, ok := ranks.(*deviceRanks)
	return ok && d.capture
}

func (d *deviceRanks) Layers() (first, end int) { return d.g.Layers() }

// AllocKV gives every rank numBlocks blocks (the engine's scratch block
// among them when it captures).
func (d *deviceRanks) AllocKV(dt kernels.DType, numBlocks, blockSize int) error {
	d.closeGraphs() // their metadata names the old caches' blocks
	return d.g.AllocKV(dt, numBlocks, blockSize)
}

// Run is the host path (a pipeline stage's rows arrive on the host).
func (d *deviceRanks) Run(ctx context.Context, b *kernels.Batch, h []float32) error {
	return d.g.Run(ctx, b, h)
}

// runDevice runs the group's layers over h, rank 0's tensor [T, hidden],
// in place (an eager step).
func (d *deviceRanks) runDevice(ctx context.Context, b *kernels.Batch, h *kernels.Tensor) error {
	if h.Rows() != b.Tokens() || h.Cols() != d.cfg.HiddenSize {
		return fmt.Errorf("rank group: residual %v for %d tokens × hidden %d", h.Shape, b.Tokens(), d.cfg.HiddenSize)
	}
	return d.eager(ctx, b, h)
}

// eager runs one step without graphs.
func (d *deviceRanks) eager(ctx context.Context, b *kernels.Batch, h *kernels.Tensor) error {
	T := b.Tokens()
	return d.g.Do(ctx, func(rs tp.RankState) error {
		x := h
		if rs.ID != 0 {
			t, err := rs.BE.NewTensor(kernels.F32, T, d.cfg.HiddenSize)
			if err != nil {
				return err
			}
			defer rs.BE.Free(t) // after the synchronisation below
			x = t
		}
		if err := broadcastResidual(rs.Comm, x); err != nil {
			return err
		}
		meta, err := rs.BE.UploadBatch(b)
		if err != nil {
			return err
		}
		f := &model.Forward{Cfg: d.cfg, BE: rs.BE, Meta: meta, T: T, Ranks: rs.Comm}
		defer f.Release()
		for i, lw := range rs.W.Layers {
			if err := f.Layer(lw, x, rs.KV[i]); err != nil {
				return err
			}
		}
		if rs.ID == 0 {
			// The engine goes on in stream order; once the peers' last
			// all-reduce is done (their synchronisation), rank 0 waits on
			// no one.
			return nil
		}
		return syncBackend(rs.BE)
	})
}

// broadcastResidual gives every rank rank 0's rows (nothing on one rank).
func broadcastResidual(rc *model.RankComm, x *kernels.Tensor) error {
	if rc == nil || rc.MoE == nil {
		return nil
	}
	b, ok := rc.MoE.(kernels.Broadcaster)
	if !ok {
		return fmt.Errorf("rank group: the communicator %T cannot broadcast the residual stream", rc.MoE)
	}
	if err := b.Broadcast(x, 0); err != nil {
		return fmt.Errorf("broadcast residual: %w", err)
	}
	return nil
}

// syncBackend waits for the backend's queued work (GPU backends; the CPU
// one is synchronous).
func syncBackend(be kernels.Backend) error {
	if s, ok := be.(interface{ Sync() error }); ok {
		return s.Sync()
	}
	return nil
}

// graphWarmUp runs a decode bucket's first step through the ranks, from
// the engine's warm-up (graphs.go): rank 0 over the engine's arena a and
// metadata meta, each peer over an arena and metadata of its own (made
// here from the padded batch pb), every collective running.
func (d *deviceRanks) graphWarmUp(ctx context.Context, a *graphArena, meta kernels.BatchMeta, key graphKey, pb *kernels.Batch) error {
	return d.g.Do(ctx, func(rs tp.RankState) error {
		if rs.ID == 0 {
			return d.graphLayers(rs, a, meta)
		}
		rg := d.ranks[rs.ID]
		pa, err := rg.arena(d.cfg.HiddenSize, key.seqs)
		if err != nil {
			return err
		}
		pm, err := rg.be.NewBatchMeta(pb)
		if err != nil {
			return fmt.Errorf("rank graph %d×%d: batch metadata: %w", key.seqs, key.ctx, err)
		}
		rg.graphs[key] = &decodeGraph{meta: pm} // closeGraphs frees it from here on
		if err := d.graphLayers(rs, pa, pm); err != nil {
			return err
		}
		return syncBackend(rs.BE)
	})
}

// graphCapture records the bucket's step: rank 0's layers into the
// engine's capture (begun on its stream), each peer's into a graph of its
// own. A peer whose capture fails fails the engine's capture too (the
// engine then runs eagerly, as after any failed capture), not the step.
func (d *deviceRanks) graphCapture(ctx context.Context, a *graphArena, meta kernels.BatchMeta, key graphKey) error {
	failed := make([]error, len(d.ranks))
	err := d.g.Do(ctx, func(rs tp.RankState) error {
		if rs.ID == 0 {
			return d.graphLayers(rs, a, meta)
		}
		failed[rs.ID] = d.ranks[rs.ID].capture(d, rs, key)
		return nil
	})
	if err != nil {
		return err
	}
	if err := errors.Join(failed...); err != nil {
		d.failed = true
		return err
	}
	return nil
}

func (rg *rankGraphs) capture(d *deviceRanks, rs tp.RankState, key graphKey) error {
	dg, a := rg.graphs[key], rg.arenas[key.seqs]
	if dg == nil || a == nil {
		return fmt.Errorf("rank %d: capture of bucket %d×%d before its warm-up (engine bug)", rs.ID, key.seqs, key.ctx)
	}
	if err := rg.be.BeginCapture(); err != nil {
		return fmt.Errorf("rank %d: %w", rs.ID, err)
	}
	ferr := d.graphLayers(rs, a, dg.meta)
	gr, cerr := rg.be.EndCapture()
	if ferr != nil || cerr != nil {
		if gr != nil {
			gr.Close()
		}
		return fmt.Errorf("rank %d capture: %w", rs.ID, errors.Join(ferr, cerr))
	}
	dg.graph = gr
	return nil
}

// replay launches the engine's graph (launch, as rank 0's part) and the
// peers' graphs of key over pb at once, and waits for the peers' streams
// under the group's step watch. With one rank it is launch alone.
func (d *deviceRanks) replay(ctx context.Context, key graphKey, pb *kernels.Batch, launch func() error) error {
	if len(d.ranks) < 2 {
		return launch()
	}
	return d.g.Do(ctx, func(rs tp.RankState) error {
		if rs.ID == 0 {
			return launch()
		}
		rg := d.ranks[rs.ID]
		dg := rg.graphs[key]
		if dg == nil || dg.graph == nil {
			return fmt.Errorf("rank graph %d×%d: not captured (engine bug)", key.seqs, key.ctx)
		}
		if err := rg.be.UpdateBatch(dg.meta, pb); err != nil {
			return fmt.Errorf("rank graph %d×%d: %w", key.seqs, key.ctx, err)
		}
		if err := dg.graph.Launch(); err != nil {
			return fmt.Errorf("rank graph %d×%d: launch: %w", key.seqs, key.ctx, err)
		}
		return syncBackend(rs.BE)
	})
}

// graphLayers issues a rank's decode step through arena a with no host
// transfer: the residual broadcast, then every layer, all-reduces included.
// The decode graphs keep the all-reduce dispatch (the all-to-all's counts
// need the host).
func (d *deviceRanks) graphLayers(rs tp.RankState, a *graphArena, meta kernels.BatchMeta) error {
	rc := *rs.Comm
	rc.AllToAll = nil
	f := &model.Forward{Cfg: d.cfg, BE: arenaBackend{rs.BE, a}, Meta: meta, T: a.seqs, Ranks: &rc}
	if err := broadcastResidual(&rc, a.h); err != nil {
		return err
	}
	for i, lw := range rs.W.Layers {
		a.reset()
		if err := f.Layer(lw, a.h, rs.KV[i]); err != nil {
			return err
		}
	}
	return nil
}

func (rg *rankGraphs) arena(hidden, seqs int) (*graphArena, error) {
	if a := rg.arenas[seqs]; a != nil {
		return a, nil
	}
	a, err := newGraphArena(rg.be, seqs, hidden)
	if err != nil {
		return nil, fmt.Errorf("rank graph arena: %w", err)
	}
	rg.arenas[seqs] = a
	return a, nil
}

// closeGraphs frees every rank's graphs, metadata and arenas. Call it
// between steps (the ranks are idle).
func (d *deviceRanks) closeGraphs() {
	for r, rg := range d.ranks {
		for key, dg := range rg.graphs {
			if dg.graph != nil {
				if err := dg.graph.Close(); err != nil {
					d.log.Warn("closing rank decode graph", "rank", r, "seqs", key.seqs, "ctx", key.ctx, "err", err)
				}
			}
			rg.be.FreeBatchMeta(dg.meta)
		}
		rg.graphs = map[graphKey]*decodeGraph{}
		for _, a := range rg.arenas {
			a.free()
		}
		rg.arenas = map[int]*graphArena{}
	}
}

// arenaBytes is what the peers' graph arenas hold.
func (d *deviceRanks) arenaBytes() int64 {
	var n int64
	for _, rg := range d.ranks {
		for _, a := range rg.arenas {
			n += a.bytes
		}
	}
	return n
}

// close frees the graphs; the group is the caller's. nil is a no-op.
func (d *deviceRanks) close() {
	if d != nil {
		d.closeGraphs()
	}
}
