package parallel

import (
	"context"
	"fmt"
	"os"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

// ModelSource says where an engine's model comes from.
type ModelSource struct {
	// Path is a checkpoint directory; with LoadFormat "dummy" it may also be
	// a preset name (model.PresetNames).
	Path string
	// LoadFormat is vLLM's: "auto" or "safetensors" (the default) loads the
	// checkpoint; "dummy" generates weights of the config's shapes on the
	// backend (kernels.Filler) without reading any.
	LoadFormat string
	// HFOverrides, when set, is a JSON object merged into config.json
	// (vLLM's --hf-overrides), e.g. {"num_hidden_layers": 4}.
	HFOverrides string
	// Seed seeds dummy weights.
	Seed uint64
}

// Dummy reports whether the source generates its weights.
func (s ModelSource) Dummy() bool { return s.LoadFormat == "dummy" }

// Config resolves the source's config, overrides applied.
func (s ModelSource) Config() (*model.Config, error) {
	switch s.LoadFormat {
	case "", "auto", "safetensors", "dummy":
	default:
		return nil, fmt.Errorf("--load-format %q: want auto, safetensors or dummy", s.LoadFormat)
	}
	var cfg *model.Config
	var err error
	if st, serr := os.Stat(s.Path); serr == nil && st.IsDir() {
		cfg, err = model.LoadConfig(s.Path)
	} else if s.Dummy() {
		cfg, err = model.Resolve(s.Path)
	} else {
		return nil, fmt.Errorf("model %q: not a checkpoint directory (presets need --load-format dummy)", s.Path)
	}
	if err != nil {
		return nil, err
	}
	if s.HFOverrides != "" {
		return cfg.WithOverrides(s.HFOverrides)
	}
	return cfg, nil
}

// Open makes an engine of the whole model of src on be; close releases the
// KV cache, the weights' tensors (dummy) or checkpoint mapping.
func Open(ctx context.Context, src ModelSource, be kernels.Backend, opt EngineOptions, progress model.Progress) (e *Engine, close func(), err error) {
	cfg, err := src.Config()
	if err != nil {
		return nil, nil, err
	}
	if err := checkWeightsFit(cfg, be, opt); err != nil {
		return nil, nil, err
	}
	if opt.Ranks.Enabled() {
		return openRanked(ctx, src, cfg, be, cfg.NumHiddenLayers, opt, progress)
	}
	var w *model.Weights
	release := func() {}
	if src.Dummy() {
		var free func()
		if w, free, err = model.DummyWeights(cfg, model.WholeModel(cfg), be, src.Seed); err != nil {
			return nil, nil, err
		}
		release = free
	} else {
		if w, err = model.LoadWeights(ctx, src.Path, cfg, model.WholeModel(cfg), be, progress); err != nil {
			return nil, nil, err
		}
		release = func() { w.Close() }
	}
	e, err = NewEngine(be, w, opt)
	if err != nil {
		release()
		return nil, nil, err // NewEngine's errors say "engine: ..."
	}
	return e, func() { e.Close(); release() }, nil
}

// OpenEngine loads the whole checkpoint in dir onto be and returns an engine;
// close releases the KV cache and the checkpoint mapping.
func OpenEngine(ctx context.Context, dir string, be kernels.Backend, opt EngineOptions, progress model.Progress) (e *Engine, close func(), err error) {
	return Open(ctx, ModelSource{Path: dir}, be, opt, progress)
}
