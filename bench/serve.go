// Package bench holds glmtopo's benchmarks. `glmtopo bench serve` (RunServe) is the serving
// benchmark of vLLM's `vllm bench serve`, implemented in bench/serving.
package bench

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/glmtopo/glmtopo/bench/serving"
	"github.com/glmtopo/glmtopo/serve/tokenizer"
)

// Tokenizer is what the serving benchmark needs from a tokenizer.
type Tokenizer = serving.Tokenizer

// TokenizerLoader loads --tokenizer DIR (a directory holding tokenizer.json, or the file).
type TokenizerLoader func(path string) (Tokenizer, error)

// RunServe implements `glmtopo bench serve`: the serving benchmark GLM-4.5 users run with
// `vllm bench serve`, with the same flags, summary table and result file, against any
// OpenAI-compatible server.
func RunServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return runServe(ctx, args, stdout, stderr, loadProjectTokenizer, os.Getenv)
}

// PlanLoader turns --predict-from-plan FILE into a predictor (predict.go).
type PlanLoader func(path string) (serving.Predictor, error)

func loadProjectTokenizer(path string) (Tokenizer, error) {
	t, err := tokenizer.Load(path)
	if err != nil {
		return nil, err
	}
	return t, nil
}

func runServe(ctx context.Context, args []string, stdout, stderr io.Writer, load TokenizerLoader, getenv func(string) string) error {
	return runServeWith(ctx, args, stdout, stderr, load, loadPlanPredictor, getenv)
}

func runServeWith(ctx context.Context, args []string, stdout, stderr io.Writer, load TokenizerLoader, plans PlanLoader,
	getenv func(string) string) error {
	opts, err := serving.ParseFlags(args, stderr, getenv)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("bench serve: %w", err)
	}
	if opts.TokenizerDir != "" {
		tok, err := load(opts.TokenizerDir)
		if err != nil {
			return fmt.Errorf("bench serve: --tokenizer: %w", err)
		}
		opts.Tokenizer = tok
	}
	var predict serving.Predictor
	if opts.PredictFromPlan != "" { // read before the run: a bad plan fails at once
		if predict, err = plans(opts.PredictFromPlan); err != nil {
			return fmt.Errorf("bench serve: --predict-from-plan: %w", err)
		}
	}
	res, err := serving.Run(ctx, opts.Config, stdout, stderr)
	if err != nil {
		return fmt.Errorf("bench serve: %w", err)
	}
	if predict != nil && res.Metrics.Completed > 0 {
		p, err := predict(res.Shape())
		if err != nil {
			return fmt.Errorf("bench serve: --predict-from-plan: %w", err)
		}
		res.PrintPrediction(stdout, p)
	}
	return nil
}
