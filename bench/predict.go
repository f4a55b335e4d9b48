package bench

import (
	"fmt"

	"github.com/glmtopo/glmtopo/bench/serving"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/topology"
)

// loadPlanPredictor reads a CPU plan file and its model's config (the
// plan's model reference, a preset or checkpoint directory, must match the
// plan's config hash) and predicts a run's shape by simulating it.
func loadPlanPredictor(path string) (serving.Predictor, error) {
	plan, err := topology.LoadPlan(path)
	if err != nil {
		return nil, err
	}
	if plan.CPU == nil {
		return nil, fmt.Errorf("%s is not a CPU plan: only 'glmtopo plan --cpu-stages N' plans predict serving runs", path)
	}
	cfg, err := model.Resolve(plan.Model)
	if err != nil {
		return nil, fmt.Errorf("%s: model %q: %w", path, plan.Model, err)
	}
	if cfg.Hash() != plan.ModelHash {
		return nil, fmt.Errorf("%s: model %q has config hash %s, the plan was made for %s", path, plan.Model, cfg.Hash(), plan.ModelHash)
	}
	spec := plan.CPU.Spec
	source := fmt.Sprintf("%s (%d CPU stage(s), %d micro-batch(es); calibrated at load %.2f: %.1f of %d cores)",
		path, len(plan.Stages), plan.CPU.MicroBatches, spec.Load, spec.ParallelCores, spec.Cores)
	return func(s serving.Shape) (*serving.Prediction, error) {
		sp, err := topology.PredictServe(plan, cfg, topology.ServeShape{Concurrency: s.Concurrency, NumPrompts: s.NumPrompts,
			InputLen: s.InputLen, OutputLen: s.OutputLen})
		if err != nil {
			return nil, err
		}
		return &serving.Prediction{Source: source, OutputTokensPerS: sp.OutputTokensPerS, TotalTokensPerS: sp.TotalTokensPerS,
			MeanTTFTMs: sp.MeanTTFTMs, MeanTPOTMs: sp.MeanTPOTMs,
			Bottleneck: fmt.Sprintf("%s, %.0f%% busy", sp.Bottleneck, 100*sp.BottleneckFraction)}, nil
	}, nil
}
