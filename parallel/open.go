package parallel

import (
	"context"
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

// OpenEngine loads the whole checkpoint in dir onto be and returns an engine;
// close releases the KV cache and the checkpoint mapping.
func OpenEngine(ctx context.Context, dir string, be kernels.Backend, opt EngineOptions, progress model.Progress) (e *Engine, close func(), err error) {
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		return nil, nil, err
	}
	w, err := model.LoadWeights(ctx, dir, cfg, model.WholeModel(cfg), be, progress)
	if err != nil {
		return nil, nil, err
	}
	e, err = NewEngine(be, w, opt)
	if err != nil {
		w.Close()
		return nil, nil, fmt.Errorf("engine: %w", err)
	}
	return e, func() { e.Close(); w.Close() }, nil
}
