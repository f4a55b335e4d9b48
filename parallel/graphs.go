package parallel

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sort"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/topology"
)

// Decode steps replayed from captured graphs.
//
// A decode step issues hundreds of kernel launches, each a purego call of
// about 0.5 µs on the CUDA backend; replaying a captured CUDA graph costs one.
// A pure decode step (one token per sequence) is padded to a bucket of
// sequences (seqBuckets) and its longest context to a context bucket
// (ctxBuckets); per (sequences, context) bucket the engine keeps a graph
// captured over persistent token ids and batch metadata. A step then costs
// an ids upload, a metadata update (kernels.BatchUpdater) and one launch.
//
// Padding rows take id -1 (a zero embedding), position 0 and the first slot
// of a scratch KV block taken out of the pool at engine start, so they write
// and read nothing of a real sequence. Every row's block table is padded with
// the scratch block to the bucket's width and its context length set to the
// bucket: kernels size their launches (attention splits) from the longest
// context at capture, and attention reads each token's positions up to its
// own, never the padding.
//
// Memory. The graphs of one sequence bucket share one arena of activations:
// the step's intermediates (one layer's worth, reused by every layer, since a
// layer's temporaries are dead once its output is added to the residual
// stream and the captured kernels run in stream order), the residual stream
// and the normed hidden states and logits. For a padded batch of T rows that
// is T × (5 H + 2 Q + 2 KV + 2 I + 2 I_shared + E + 2 top-k + V) × 4 bytes:
// ≈ 0.93 MB per row for GLM-4.5 (H 5120, Q 12288, KV 1024, I 12288,
// I_shared 1536, E 160, V 151552; 65% of it the logits), so ≈ 185 MB for all
// buckets up to 64 sequences (1+2+4+...+64 = 199 rows); ≈ 0.89 MB per row
// (178 MB) for GLM-4.5-Air. It does not grow with depth, and the eager step
// of 64 sequences alone allocates more (every layer's temporaries at once).
// Each graph adds its batch metadata (T × (3 + ctx/BlockSize) int32s) and the
// backend's instantiated graph. GraphStats reports the arenas' bytes.

// GraphStats counts the engine's decode graphs.
type GraphStats struct {
	Graphs     int   // graphs alive
	Captures   int   // graphs captured so far
	Replays    int   // steps served by replaying a graph
	ArenaBytes int64 // backend memory the graphs' activations hold
}

// GraphStats reports the decode graphs (all zero when steps run eagerly).
func (e *Engine) GraphStats() GraphStats {
	if e.graphs == nil {
		return GraphStats{}
	}
	s := e.graphs.stats
	if dr, ok := e.ranks.(*deviceRanks); ok {
		s.ArenaBytes += dr.arenaBytes() // the peers' (ranks_device.go)
	}
	for _, g := range e.graphs.graphs {
		if g.graph != nil {
			s.Graphs++
		}
	}
	for _, a := range e.graphs.arenas {
		s.ArenaBytes += a.bytes
	}
	return s
}

// graphBackend is what decode graphs need of a backend.
type graphBackend interface {
	kernels.Backend
	kernels.GraphCapturer
	kernels.BatchUpdater
	kernels.GraphBatcher
}

type graphKey struct{ seqs, ctx int }

// decodeGraph is one bucket's captured step over its own batch metadata.
type decodeGraph struct {
	meta  kernels.BatchMeta
	graph kernels.Graph // nil until captured
}

// decodeGraphs holds the engine's graphs, their arenas and the buckets.
type decodeGraphs struct {
	be         graphBackend
	log        *slog.Logger
	seqBuckets []int
	ctxBuckets []int
	scratch    int32 // KV block the padding rows write to
	blockSize  int
	arenas     map[int]*graphArena // by sequence bucket
	graphs     map[graphKey]*decodeGraph
	rowIDs     map[int]*kernels.Tensor // I32 [n] holding 0..n-1, to gather n real rows of a wider bucket
	failed     bool                    // a capture failed: the engine goes eager at its next step
	stats      GraphStats              // Captures and Replays
}

func newDecodeGraphs(be graphBackend, log *slog.Logger, maxSeqs, minCtx, poolTokens, blockSize int, scratch int32) (*decodeGraphs, error) {
	g := &decodeGraphs{be: be, log: log, seqBuckets: seqBuckets(maxSeqs), ctxBuckets: ctxBuckets(minCtx, poolTokens),
		scratch: scratch, blockSize: blockSize, arenas: map[int]*graphArena{}, graphs: map[graphKey]*decodeGraph{},
		rowIDs: map[int]*kernels.Tensor{}}
	// The row indices are written once, so they are made before any capture:
	// the CUDA backend returns a capture's internal scratch (attention
	// partials, MoE plans) to its pool while the graph keeps using it, and a
	// tensor allocated later may share that memory.
	for n := 1; n < maxSeqs; n++ {
		if bucket(g.seqBuckets, n) == n {
			continue // an exact bucket needs no gather
		}
		t, err := be.NewTensor(kernels.I32, n)
		if err != nil {
			g.close()
			return nil, fmt.Errorf("decode graphs: row index: %w", err)
		}
		g.rowIDs[n] = t
		v := make([]int32, n)
		for i := range v {
			v[i] = int32(i)
		}
		if err := be.Upload(t, i32Bytes(v)); err != nil {
			g.close()
			return nil, fmt.Errorf("decode graphs: row index: %w", err)
		}
	}
	return g, nil
}

// seqBuckets and ctxBuckets are the memory model's (topology.GraphBytes
// counts the graphs' memory from them).
var (
	seqBuckets = topology.SeqBuckets
	ctxBuckets = topology.CtxBuckets
)

// bucket is the smallest of buckets (ascending) ≥ n, or 0 when n is wider than all.
func bucket(buckets []int, n int) int {
	i := sort.SearchInts(buckets, n)
	if i == len(buckets) {
		return 0
	}
	return buckets[i]
}

// step runs inputs from a graph when it is a pure decode step that fits a
// bucket; ok is false when the caller should run it eagerly instead.
func (g *decodeGraphs) step(e *Engine, inputs []StepInput) (res *StepResult, ok bool, err error) {
	n := len(inputs)
	seqs := bucket(g.seqBuckets, n)
	if n == 0 || seqs == 0 {
		return nil, false, nil
	}
	for _, in := range inputs {
		if len(in.Tokens) != 1 {
			return nil, false, nil
		}
	}
	b, ids, err := e.batch(inputs, false)
	if err != nil {
		return nil, true, err
	}
	longest := 0
	for _, c := range b.ContextLens {
		longest = max(longest, int(c))
	}
	key := graphKey{seqs: seqs, ctx: bucket(g.ctxBuckets, longest)}
	if key.ctx == 0 {
		return nil, false, nil // cannot happen: Reserve bounds a context by the pool
	}
	pb, pids := g.pad(b, ids, key)
	a, err := g.arena(e, key.seqs)
	if err != nil {
		return nil, true, err
	}
	if err := e.BE.Upload(a.ids, i32Bytes(pids)); err != nil {
		return nil, true, fmt.Errorf("decode graph: upload ids: %w", err)
	}
	if dg := g.graphs[key]; dg != nil {
		if err := g.be.UpdateBatch(dg.meta, pb); err != nil {
			return nil, true, fmt.Errorf("decode graph %d×%d: %w", key.seqs, key.ctx, err)
		}
		if err := g.launch(e, dg, key, pb); err != nil {
			return nil, true, err
		}
		g.stats.Replays++
	} else if err := g.warmUpAndCapture(e, a, key, pb); err != nil {
		return nil, true, err
	}
	for _, in := range inputs {
		in.Seq.Len++
	}
	res, err = g.result(e, a, n)
	return res, true, err
}

// launch replays dg, and the rank group's peers' graphs of key with it
// (ranks_device.go).
func (g *decodeGraphs) launch(e *Engine, dg *decodeGraph, key graphKey, pb *kernels.Batch) error {
	launch := func() error {
		if err := dg.graph.Launch(); err != nil {
			return fmt.Errorf("decode graph %d×%d: launch: %w", key.seqs, key.ctx, err)
		}
		return nil
	}
	if dr, ok := e.ranks.(*deviceRanks); ok {
		return dr.replay(context.Background(), key, pb, launch)
	}
	return launch()
}

// warmUpAndCapture runs a bucket's first step eagerly over its new
// persistent metadata (compiling kernels, uploading expert tables: work that
// cannot be captured), then captures the same step for the next ones. The
// warm-up's outputs, in the arena, are this step's result. A failed capture
// is logged and turns graphs off from the next step on.
func (g *decodeGraphs) warmUpAndCapture(e *Engine, a *graphArena, key graphKey, pb *kernels.Batch) error {
	meta, err := g.be.NewBatchMeta(pb)
	if err != nil {
		return fmt.Errorf("decode graph %d×%d: batch metadata: %w", key.seqs, key.ctx, err)
	}
	dg := &decodeGraph{meta: meta}
	g.graphs[key] = dg // Close frees its metadata from here on
	// The rank group's layers, if any: rank 0 through this arena, the
	// peers alongside (warm-up), then into their own graphs (capture).
	var warm, capture func() error
	if dr, ok := e.ranks.(*deviceRanks); ok {
		ctx := context.Background()
		warm = func() error { return dr.graphWarmUp(ctx, a, meta, key, pb) }
		capture = func() error { return dr.graphCapture(ctx, a, meta, key) }
	}
	if err := e.graphForward(a, meta, warm); err != nil {
		return fmt.Errorf("decode step (graph warm-up %d×%d): %w", key.seqs, key.ctx, err)
	}
	if err := g.be.BeginCapture(); err != nil {
		g.captureFailed(key, err)
		return nil
	}
	ferr := e.graphForward(a, meta, capture)
	gr, cerr := g.be.EndCapture()
	if ferr != nil || cerr != nil {
		if gr != nil {
			gr.Close()
		}
		g.captureFailed(key, errors.Join(ferr, cerr))
		return nil
	}
	dg.graph = gr
	g.stats.Captures++
	g.log.Debug("captured decode graph", "seqs", key.seqs, "ctx", key.ctx, "arena_bytes", a.bytes)
	return nil
}

func (g *decodeGraphs) captureFailed(key graphKey, err error) {
	g.log.Warn("decode graph capture failed; running every step eagerly from now on", "seqs", key.seqs, "ctx", key.ctx, "err", err)
	g.failed = true
}

// pad lays a decode batch of n sequences out as key's graph reads it (see
// the comment at the top of this file).
func (g *decodeGraphs) pad(b *kernels.Batch, ids []int32, key graphKey) (*kernels.Batch, []int32) {
	T, n := key.seqs, len(ids)
	width := (key.ctx + g.blockSize - 1) / g.blockSize
	p := &kernels.Batch{Positions: make([]int32, T), SeqIndex: make([]int32, T), Slots: make([]int32, T),
		BlockTables: make([][]int32, T), ContextLens: make([]int32, T)}
	pids := make([]int32, T)
	tables := make([]int32, T*width)
	for i := range T {
		p.SeqIndex[i] = int32(i)
		p.ContextLens[i] = int32(key.ctx)
		t := tables[i*width : (i+1)*width : (i+1)*width]
		real := 0
		if i < n {
			p.Positions[i], p.Slots[i], pids[i] = b.Positions[i], b.Slots[i], ids[i]
			real = copy(t, b.BlockTables[i]) // a sequence holds blocks for its whole request: keep the first width
		} else {
			p.Slots[i], pids[i] = g.scratch*int32(g.blockSize), -1
		}
		for j := real; j < width; j++ {
			t[j] = g.scratch
		}
		p.BlockTables[i] = t
	}
	return p, pids
}

// result is the step's output: the arena's logits and normed states when
// every row is real, else copies of the real rows (gathered on the device).
func (g *decodeGraphs) result(e *Engine, a *graphArena, n int) (*StepResult, error) {
	rows := make([]int, n)
	for i := range rows {
		rows[i] = i
	}
	if n == a.seqs {
		return &StepResult{Logits: a.logits, Normed: a.normed, Rows: rows}, nil
	}
	idx := g.rowIDs[n]
	var out []*kernels.Tensor
	release := func() {
		for _, t := range out {
			e.BE.Free(t)
		}
	}
	if e.ws != nil {
		e.ws.begin() // the copies live in the step workspace, as an eager step's outputs
		release = func() {}
	}
	for _, src := range []*kernels.Tensor{a.logits, a.normed} {
		var t *kernels.Tensor
		var err error
		if e.ws != nil {
			t, err = e.ws.take(kernels.F32, []int{n, src.Cols()})
		} else {
			t, err = e.BE.NewTensor(kernels.F32, n, src.Cols())
		}
		if err != nil {
			release()
			return nil, fmt.Errorf("decode graph: gather rows: %w", err)
		}
		out = append(out, t)
		if err := e.BE.Embed(t, src, idx); err != nil { // a row gather is an embedding lookup
			release()
			return nil, fmt.Errorf("decode graph: gather rows: %w", err)
		}
	}
	return &StepResult{Logits: out[0], Normed: out[1], Rows: rows, release: release}, nil
}

func (g *decodeGraphs) arena(e *Engine, seqs int) (*graphArena, error) {
	if a := g.arenas[seqs]; a != nil {
		return a, nil
	}
	a, err := newGraphArena(e.BE, seqs, e.Cfg.HiddenSize)
	if err != nil {
		return nil, fmt.Errorf("decode graph arena: %w", err)
	}
	g.arenas[seqs] = a
	return a, nil
}

// close frees every graph, its metadata and the arenas. The graphs' results
// must no longer be in use.
func (g *decodeGraphs) close() {
	for key, dg := range g.graphs {
		if dg.graph != nil {
			if err := dg.graph.Close(); err != nil {
				g.log.Warn("closing decode graph", "seqs", key.seqs, "ctx", key.ctx, "err", err)
			}
		}
		g.be.FreeBatchMeta(dg.meta)
	}
	g.graphs = map[graphKey]*decodeGraph{}
	for _, a := range g.arenas {
		a.free()
	}
	g.arenas = map[int]*graphArena{}
	for n, t := range g.rowIDs {
		g.be.Free(t)
		delete(g.rowIDs, n)
	}
}

// graphForward issues the decode step of arena a's bucket over meta with no
// host transfer, so that it can be captured: the embedding of the persistent
// ids, every layer (ranks issues a rank group's, if any), the final norm
// and lm_head, all into the arena.
func (e *Engine) graphForward(a *graphArena, meta kernels.BatchMeta, ranks func() error) error {
	f := &model.Forward{Cfg: e.Cfg, BE: arenaBackend{e.BE, a}, Meta: meta, T: a.seqs, Ranks: e.comm} // comm.go
	if err := e.BE.Embed(a.h, e.W.Embed, a.ids); err != nil {
		return fmt.Errorf("embed: %w", err)
	}
	for i, lw := range e.W.Layers {
		a.reset()
		if err := f.Layer(lw, a.h, e.KV.Layers[i]); err != nil {
			return err
		}
	}
	if ranks != nil {
		if err := ranks(); err != nil {
			return err
		}
	}
	a.reset()
	normed, logits, err := f.Head(a.h, e.W.FinalNorm, e.W.LMHead)
	if err != nil {
		return err
	}
	if a.logits != nil && (a.logits != logits || a.normed != normed) {
		return errors.New("decode graph: the arena handed the head different outputs than at warm-up")
	}
	a.normed, a.logits = normed, logits
	return nil
}

func i32Bytes(v []int32) []byte {
	b := make([]byte, 0, 4*len(v))
	for _, x := range v {
		b = binary.LittleEndian.AppendUint32(b, uint32(x))
	}
	return b
}
