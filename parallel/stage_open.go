package parallel

import (
	"context"
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

// loadSelection loads sel of src on be: the checkpoint's selected tensors,
// or dummy ones (each a function of the seed and its name, so a stage's
// equal the whole model's).
func loadSelection(ctx context.Context, src ModelSource, cfg *model.Config, sel model.Selection, be kernels.Backend, progress model.Progress) (*model.Weights, func(), error) {
	if src.Dummy() {
		return model.DummyWeights(cfg, sel, be, src.Seed)
	}
	w, err := model.LoadWeights(ctx, src.Path, cfg, sel, be, progress)
	if err != nil {
		return nil, nil, err
	}
	return w, func() { w.Close() }, nil
}

// OpenHead makes the head stage of a pipeline: the embedding, decoder
// layers [0, end), the final norm, lm_head and the MTP layer of src on be.
// It steps once ConnectRing has attached the other stages.
func OpenHead(ctx context.Context, src ModelSource, be kernels.Backend, end int, opt EngineOptions, progress model.Progress) (*Engine, func(), error) {
	cfg, err := src.Config()
	if err != nil {
		return nil, nil, err
	}
	if end <= 0 || end >= cfg.NumHiddenLayers {
		return nil, nil, fmt.Errorf("head stage: layers [0,%d) of %d: a pipeline head holds some layers, not all", end, cfg.NumHiddenLayers)
	}
	if opt.Ranks.Enabled() {
		return openRanked(ctx, src, cfg, be, end, opt, progress)
	}
	sel := model.Selection{FirstLayer: 0, EndLayer: end, Embedding: true, LMHead: true, MTP: cfg.HasMTP()}
	w, release, err := loadSelection(ctx, src, cfg, sel, be, progress)
	if err != nil {
		return nil, nil, fmt.Errorf("head stage: %w", err)
	}
	e, err := NewEngine(be, w, opt)
	if err != nil {
		release()
		return nil, nil, fmt.Errorf("head stage: %w", err)
	}
	return e, func() { e.Close(); release() }, nil
}

// OpenStage makes an executor stage of decoder layers [first, end) of src
// on be; its KV cache is sized by the head's ring configuration.
func OpenStage(ctx context.Context, src ModelSource, be kernels.Backend, first, end int, progress model.Progress) (*Stage, func(), error) {
	cfg, err := src.Config()
	if err != nil {
		return nil, nil, err
	}
	if first <= 0 || end <= first || end > cfg.NumHiddenLayers {
		return nil, nil, fmt.Errorf("stage: layers [%d,%d) of %d: an executor stage holds a non-empty range after the head's", first, end, cfg.NumHiddenLayers)
	}
	w, release, err := loadSelection(ctx, src, cfg, model.Selection{FirstLayer: first, EndLayer: end}, be, progress)
	if err != nil {
		return nil, nil, fmt.Errorf("stage [%d,%d): %w", first, end, err)
	}
	st, err := NewStage(be, w)
	if err != nil {
		release()
		return nil, nil, err
	}
	return st, func() { st.Close(); release() }, nil
}
