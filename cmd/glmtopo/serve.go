package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"

	"github.com/glmtopo/glmtopo/parallel"
	"github.com/glmtopo/glmtopo/serve"
	"github.com/glmtopo/glmtopo/serve/tokenizer"
)

// runServe serves the OpenAI API from the single-process CPU engine.
func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("serve", stderr)
	cfg := serve.DefaultConfig()
	cfg.RegisterFlags(fs)
	dir := fs.String("model", "", "checkpoint directory with config.json, shards and tokenizer.json (required)")
	tokDir := fs.String("tokenizer", "", "directory or tokenizer.json (default: the model directory)")
	kvTokens := fs.Int("kv-cache-tokens", 0, "tokens the paged KV cache holds (default: max-model-len × 8)")
	device := fs.String("device", "cpu", "backend: cpu, cuda or cuda:N")
	batched := fs.Int("max-num-batched-tokens", 2048, "prompt tokens prefilled per engine step (chunked prefill budget)")
	eager := fs.Bool("enforce-eager", false, "run every step kernel by kernel: no CUDA graphs for decode steps (as vLLM's --enforce-eager)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *dir == "" || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: glmtopo serve --model DIR [--port 8000] [--max-model-len N] [--tool-call-parser glm45] ...")
		return errUsage
	}
	named := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "served-model-name" {
			named = true
		}
	})
	if !named { // like vLLM: clients address the model by the name it was served from
		cfg.ServedModelNames = []string{filepath.Base(filepath.Clean(*dir))}
	}
	if *tokDir == "" {
		*tokDir = *dir
	}
	tok, err := tokenizer.Load(*tokDir)
	if err != nil {
		return err
	}
	maxLen := cfg.MaxModelLen
	if maxLen == 0 {
		maxLen = 8192
	}
	if *kvTokens == 0 {
		*kvTokens = maxLen * 8
	}
	slog.Info("loading model", "dir", *dir)
	be, kv, err := openBackend(*device)
	if err != nil {
		return err
	}
	defer be.Close()
	eng, closeEngine, err := parallel.OpenEngine(ctx, *dir, be, parallel.EngineOptions{MaxTokens: *kvTokens, KVDType: kv, EnforceEager: *eager}, progress(stderr, "load"))
	if err != nil {
		return err
	}
	defer closeEngine()
	sched := parallel.NewScheduler(eng, parallel.SchedulerOptions{MaxNumSeqs: cfg.MaxNumSeqs, MaxWaiting: cfg.MaxWaiting,
		MaxModelLen: cfg.MaxModelLen, PrefillTokens: *batched})
	defer sched.Close()
	srv, err := serve.NewServer(cfg, sched, tok, slog.Default())
	if err != nil {
		return err
	}
	slog.Info("serving", "addr", cfg.Addr(), "model", cfg.ServedModelNames, "max_model_len", srv.MaxModelLen(), "engine", eng.BE.Name())
	return srv.ListenAndServe(ctx)
}
