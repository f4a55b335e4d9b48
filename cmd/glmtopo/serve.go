package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/parallel"
	"github.com/glmtopo/glmtopo/serve"
	"github.com/glmtopo/glmtopo/serve/tokenizer"
)

// runServe serves the OpenAI API from the single-process CPU engine.
func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("serve", stderr)
	cfg := serve.DefaultConfig()
	cfg.RegisterFlags(fs)
	dir := fs.String("model", "", "checkpoint directory with config.json, shards and tokenizer.json, or with --load-format dummy a preset name (required)")
	tokDir := fs.String("tokenizer", "", "directory or tokenizer.json (default: the model directory; the tiny presets carry theirs)")
	loadFormat := fs.String("load-format", "auto", "auto (the checkpoint) or dummy (generated weights of the config's shapes, as vLLM's)")
	overrides := fs.String("hf-overrides", "", `JSON object merged into config.json, e.g. '{"num_hidden_layers": 4}' (as vLLM's)`)
	kvTokens := fs.Int("kv-cache-tokens", 0, "tokens the paged KV cache holds (default: max-model-len × 8)")
	backend := addBackendFlags(fs)
	batched := fs.Int("max-num-batched-tokens", 2048, "prompt tokens prefilled per engine step (chunked prefill budget)")
	eager := fs.Bool("enforce-eager", false, "run every step kernel by kernel: no CUDA graphs for decode steps (as vLLM's --enforce-eager)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *dir == "" || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: glmtopo serve --model DIR [--load-format dummy] [--port 8000] [--max-model-len N] [--tool-call-parser glm45] ...")
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
	src := parallel.ModelSource{Path: *dir, LoadFormat: *loadFormat, HFOverrides: *overrides}
	tok, err := loadTokenizer(*tokDir, src)
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
	be, kv, err := backend.open()
	if err != nil {
		return err
	}
	defer be.Close()
	eng, closeEngine, err := parallel.Open(ctx, src, be, parallel.EngineOptions{MaxTokens: *kvTokens, KVDType: kv, EnforceEager: *eager}, progress(stderr, "load"))
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

// loadTokenizer reads path, else the model directory's tokenizer.json; a
// dummy model named by a tiny preset uses the tokenizer the preset carries.
func loadTokenizer(path string, src parallel.ModelSource) (*tokenizer.Tokenizer, error) {
	if path != "" {
		return tokenizer.Load(path)
	}
	if st, err := os.Stat(src.Path); err == nil && st.IsDir() {
		return tokenizer.Load(src.Path)
	}
	if base, _ := strings.CutSuffix(strings.ToLower(src.Path), "-fp8"); base == "tiny" {
		return tokenizer.FromJSON(model.TinyTokenizerJSON())
	}
	return nil, fmt.Errorf("model %q has no tokenizer.json: give --tokenizer (GLM-4.5's tokenizer.json or its directory)", src.Path)
}
