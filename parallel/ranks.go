package parallel

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/parallel/tp"
	"github.com/glmtopo/glmtopo/topology"
)

// RankGroup runs a stage's decoder layers on several ranks (parallel/tp's
// Group): the engine or executor stage keeps the block allocator, the
// embedding, lm_head, sampling and MTP layer, and hands each step's batch
// and residual stream to the group.
type RankGroup interface {
	// Layers is the range of decoder layers the group runs.
	Layers() (first, end int)
	// AllocKV gives every rank numBlocks KV blocks of blockSize tokens per
	// layer (its own KV heads), indexed by the caller's block ids.
	AllocKV(dt kernels.DType, numBlocks, blockSize int) error
	// Run runs the layers over h [T, hidden] (f32) of batch b, in place.
	Run(ctx context.Context, b *kernels.Batch, h []float32) error
}

// RankOptions run a stage's layers on several ranks of this process: TP
// ways split attention, the dense MLP and the shared expert; the routed
// experts are placed on EP groups of ranks (Experts: the plan's placement
// with EPLB replicas; nil: contiguous blocks) and split Ranks/EP ways inside
// a group. Zero Ranks (or 1) runs the layers on the engine's backend.
type RankOptions struct {
	Ranks, TP, EP int
	Experts       []topology.LayerExperts
	// NewBackend makes rank r's backend (required with Ranks > 1).
	NewBackend func(rank int) (kernels.Backend, error)
	// Timeout bounds each collective wait (default 30 s; with
	// Collectives, each step).
	Timeout time.Duration
	// Collectives makes the ranks' communicators (tp.NCCL on GPUs: see
	// TensorParallelCUDA); nil: in-process collectives through the host.
	Collectives tp.Collectives
	// Dispatch is the MoE layers' expert dispatch: "allreduce" (default,
	// "") or "alltoall" (EP ≥ 2; tp.DispatchAllToAll: on GPU ranks in
	// eager steps, decode graphs keep the all-reduce).
	Dispatch string
	// ShareHead runs rank 0 on the engine's backend (NewBackend(0) is not
	// called): the residual stream stays on the device, broadcast to the
	// other ranks, and decode steps replay per-rank graphs
	// (ranks_device.go). The engine's backend must be what NewBackend(0)
	// would make (the same device).
	ShareHead bool
}

// TensorParallel is vLLM's --tensor-parallel-size n: n ranks, every routed
// expert split n ways, or with --enable-expert-parallel whole experts
// spread over the n ranks.
func TensorParallel(n int, expertParallel bool, newBackend func(rank int) (kernels.Backend, error)) RankOptions {
	ep := 1
	if expertParallel {
		ep = n
	}
	return RankOptions{Ranks: n, TP: n, EP: ep, NewBackend: newBackend}
}

// Enabled reports whether the options ask for more than one rank.
func (o RankOptions) Enabled() bool { return o.Ranks > 1 }

// openGroup loads layers [first, end) of src onto o's ranks; head, when
// set, is rank 0's backend.
func openGroup(ctx context.Context, src ModelSource, cfg *model.Config, first, end int, o RankOptions, head kernels.Backend, progress model.Progress) (*tp.Group, error) {
	if o.NewBackend == nil {
		return nil, errors.New("rank group: RankOptions.NewBackend is required")
	}
	g, err := tp.NewGrid(cfg, first, end, o.Ranks, max(o.TP, 1), max(o.EP, 1), o.Experts)
	if err != nil {
		return nil, err
	}
	load := func(ctx context.Context, sel model.Selection, be kernels.Backend) (*model.Weights, func(), error) {
		return loadSelection(ctx, src, cfg, sel, be, progress)
	}
	return tp.New(ctx, g, tp.Options{NewBackend: o.NewBackend, Load: load, Timeout: o.Timeout, Collectives: o.Collectives, Dispatch: o.Dispatch, Head: head})
}

// openRanked makes the engine of a pipeline's head (or the whole model,
// end = the model's layers) whose layers [0, end) run on o's ranks; be
// holds the embedding, final norm, lm_head and MTP layer.
func openRanked(ctx context.Context, src ModelSource, cfg *model.Config, be kernels.Backend, end int, opt EngineOptions, progress model.Progress) (*Engine, func(), error) {
	var head kernels.Backend
	if opt.Ranks.ShareHead {
		head = be
	}
	g, err := openGroup(ctx, src, cfg, 0, end, opt.Ranks, head, progress)
	if err != nil {
		return nil, nil, err
	}
	sel := model.Selection{Embedding: true, LMHead: true, MTP: cfg.HasMTP()}
	w, release, err := loadSelection(ctx, src, cfg, sel, be, progress)
	if err != nil {
		g.Close()
		return nil, nil, err
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	opt.Logger.Info("decoder layers run on ranks", "layers", fmt.Sprintf("[0,%d)", end), "grid", g.Grid.String(), "rank0_is_head", head != nil)
	var rg RankGroup = g
	dr := (*deviceRanks)(nil)
	if head != nil {
		dr = newDeviceRanks(g, cfg, opt)
		rg = dr
	}
	e, err := NewEngineOn(be, w, rg, opt)
	if err != nil {
		dr.close()
		release()
		g.Close()
		return nil, nil, err
	}
	return e, func() { e.Close(); dr.close(); release(); g.Close() }, nil
}

// NewEngineOn is NewEngine for an engine whose decoder layers run on g:
// w holds the embedding, final norm, lm_head and MTP layer (no decoder
// layers); the caller keeps g, and closes it after the engine.
func NewEngineOn(be kernels.Backend, w *model.Weights, g RankGroup, opt EngineOptions) (*Engine, error) {
	first, end := g.Layers()
	if first != 0 || len(w.Layers) != 0 {
		return nil, fmt.Errorf("engine: a rank group runs layers [%d,%d) and the weights hold %d more; the engine's group runs layers [0, K) and its weights none", first, end, len(w.Layers))
	}
	return newEngine(be, w, g, opt)
}

// runRanks runs the rank group's layers over h for the step's batch.
func (e *Engine) runRanks(h *kernels.Tensor) error {
	if e.ranks == nil {
		return nil
	}
	if !e.ranksKV {
		// The memory profile runs before the ranks' KV caches are sized from
		// it: it measures this backend's own scratch (embedding, lm_head,
		// sampling); the ranks' layers run on their own backends.
		return nil
	}
	if e.stepBatch == nil || e.stepBatch.Tokens() != h.Rows() {
		return fmt.Errorf("engine: rank group step without its batch (engine bug)")
	}
	if dr, ok := e.ranks.(*deviceRanks); ok {
		return dr.runDevice(context.Background(), e.stepBatch, h)
	}
	rows, err := e.BE.Download(h)
	if err != nil {
		return err
	}
	if err := e.ranks.Run(context.Background(), e.stepBatch, rows); err != nil {
		return err
	}
	return e.BE.Upload(h, f32Bytes(rows))
}

// ownLayers is the end of the layers this engine runs itself or on its ranks.
func (e *Engine) ownLayers() int {
	if e.ranks != nil {
		_, end := e.ranks.Layers()
		return end
	}
	return len(e.W.Layers)
}

// OpenStageRanks is OpenStage with the stage's layers on o's ranks (be
// holds no weights; it stays the stage's BE for what asks for one, and is
// rank 0's with o.ShareHead).
func OpenStageRanks(ctx context.Context, src ModelSource, be kernels.Backend, first, end int, o RankOptions, progress model.Progress) (*Stage, func(), error) {
	cfg, err := src.Config()
	if err != nil {
		return nil, nil, err
	}
	if first <= 0 || end <= first || end > cfg.NumHiddenLayers {
		return nil, nil, fmt.Errorf("stage: layers [%d,%d) of %d: an executor stage holds a non-empty range after the head's", first, end, cfg.NumHiddenLayers)
	}
	var head kernels.Backend
	if o.ShareHead {
		head = be
	}
	g, err := openGroup(ctx, src, cfg, first, end, o, head, progress)
	if err != nil {
		return nil, nil, fmt.Errorf("stage [%d,%d): %w", first, end, err)
	}
	slog.Info("decoder layers run on ranks", "layers", fmt.Sprintf("[%d,%d)", first, end), "grid", g.Grid.String(), "rank0_is_stage_backend", head != nil)
	var rg RankGroup = g
	if head != nil {
		// The stage's rows (its link's, on be) are rank 0's residual; its
		// steps run eagerly (a stage captures no graphs).
		rg = newDeviceRanks(g, cfg, EngineOptions{EnforceEager: true})
	}
	st, err := NewStageOn(be, cfg, rg)
	if err != nil {
		g.Close()
		return nil, nil, err
	}
	return st, func() { st.Close(); g.Close() }, nil
}

// NewStageOn makes an executor stage whose layers run on g (kept by the
// caller, closed after the stage); its weights hold no tensors.
func NewStageOn(be kernels.Backend, cfg *model.Config, g RankGroup) (*Stage, error) {
	first, end := g.Layers()
	w := &model.Weights{Config: cfg, Selection: model.Selection{FirstLayer: first, EndLayer: end}}
	st, err := NewStage(be, w)
	if err != nil {
		return nil, err
	}
	st.ranks = g
	return st, nil
}

// forwardRanks runs a ranked stage's step: rows in, rows out, in place.
func (s *Stage) forwardRanks(b *kernels.Batch, rows []byte) error {
	h := make([]float32, len(rows)/4)
	for i := range h {
		h[i] = f32At(rows, i)
	}
	if err := s.ranks.Run(context.Background(), b, h); err != nil {
		return err
	}
	putF32s(rows, h)
	return nil
}

func f32Bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	putF32s(b, v)
	return b
}

func f32At(b []byte, i int) float32 { return math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:])) }
