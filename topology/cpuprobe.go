package topology

import (
	"fmt"
	"math"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model"
)

// probeLayers fits two figures to real decoder layers: every layer of the
// tiny preset (model.Forward on dummy weights: the engine's op sequence,
// activations allocated per call, workers woken from idle, each layer's
// weights evicted by the others') decoding 1 to 128 sequences at context
// 128. A kernel timed alone in a tight loop keeps its workers spinning and
// its data in cache, so it costs less than inside a step; the fit is the
// per-kernel fixed cost (µs) and the factor on the modelled work that make
// the stack's times, least squares in relative error.
func probeLayers(spec CPUSpec, be *cpu.Backend) (opUS, factor float64, err error) {
	cfg, err := model.Preset("tiny")
	if err != nil {
		return 0, 0, err
	}
	L := cfg.NumHiddenLayers
	w, free, err := model.DummyWeights(cfg, model.Selection{FirstLayer: 0, EndLayer: L}, be, 1)
	if err != nil {
		return 0, 0, fmt.Errorf("probe layers: %w", err)
	}
	defer free()
	var a11, a12, a22, b1, b2 float64
	for _, seqs := range []int{1, 2, 4, 16, 64, 256} {
		const ctx = 128
		t, err := timeLayers(cfg, w.Layers, be, seqs, ctx)
		if err != nil {
			return 0, 0, err
		}
		b := cpuBatch{T: float64(seqs), seqs: float64(seqs), pairs: float64(seqs * ctx), rows: float64(seqs)}
		var work, ops float64
		for l := 0; l < L; l++ {
			s0 := spec
			s0.OpOverheadUS, s0.LayerWorkFactor = 0, 1
			base := cpuLayer(s0, cfg, l, b).alone
			s0.OpOverheadUS = 1
			work += base
			ops += cpuLayer(s0, cfg, l, b).alone - base // seconds per µs of overhead
		}
		// Relative error: divide each row of t = factor·work + op·ops by t.
		x1, x2 := work/t, ops/t
		a11, a12, a22 = a11+x1*x1, a12+x1*x2, a22+x2*x2
		b1, b2 = b1+x1, b2+x2
	}
	det := a11*a22 - a12*a12
	if det <= 0 {
		return 0, 0, fmt.Errorf("probe layers: degenerate fit")
	}
	factor = (b1*a22 - b2*a12) / det
	opUS = (a11*b2 - a12*b1) / det
	switch { // one figure alone explains it: refit the other
	case factor <= 0:
		factor, opUS = 0.01, b2/a22
	case opUS < 0:
		factor, opUS = b1/a11, 0
	}
	return opUS, math.Max(factor, 0.01), nil
}

// timeLayers times the layers decoding seqs sequences at context ctx.
func timeLayers(cfg *model.Config, layers []*model.LayerWeights, be *cpu.Backend, seqs, ctx int) (float64, error) {
	const bs = 16
	blocks := (ctx + bs - 1) / bs
	k, err := filled(be, kernels.F32, seqs*blocks*bs, cfg.NumKeyValueHeads, cfg.HeadDim)
	if err != nil {
		return 0, err
	}
	v, err := filled(be, kernels.F32, seqs*blocks*bs, cfg.NumKeyValueHeads, cfg.HeadDim)
	if err != nil {
		return 0, err
	}
	var b kernels.Batch
	for s := 0; s < seqs; s++ {
		table := make([]int32, blocks)
		for i := range table {
			table[i] = int32(s*blocks + i)
		}
		b.Positions = append(b.Positions, int32(ctx-1))
		b.SeqIndex = append(b.SeqIndex, int32(s))
		b.Slots = append(b.Slots, int32(s*blocks*bs+ctx-1))
		b.BlockTables = append(b.BlockTables, table)
		b.ContextLens = append(b.ContextLens, int32(ctx))
	}
	meta, err := be.UploadBatch(&b)
	if err != nil {
		return 0, err
	}
	h, err := filled(be, kernels.F32, seqs, cfg.HiddenSize)
	if err != nil {
		return 0, err
	}
	cache := &kernels.KVCache{K: k, V: v, BlockSize: bs, KVHeads: cfg.NumKeyValueHeads, HeadDim: cfg.HeadDim}
	hv := h.Impl.([]float32)
	h0 := append([]float32(nil), hv...)
	return timeOp(func() error {
		copy(hv, h0) // the layer adds to h in place: start every run from the same rows
		f := &model.Forward{Cfg: cfg, BE: be, Meta: meta, T: seqs}
		defer f.Release()
		for _, lw := range layers {
			if err := f.Layer(lw, h, cache); err != nil {
				return err
			}
		}
		return nil
	})
}
