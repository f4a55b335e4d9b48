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

// runServe serves the OpenAI API from a single-process engine (CPU or CUDA).
func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("serve", stderr)
	cfg := serve.DefaultConfig()
	cfg.RegisterFlags(fs)
	model := addSourceFlags(fs, "checkpoint directory with config.json, shards and tokenizer.json, or with --load-format dummy a preset name (required)")
	dir := model.path
	tokDir := fs.String("tokenizer", "", "directory or tokenizer.json (default: the model directory; the tiny presets carry theirs)")
	backend := addBackendFlags(fs)
	mem := addMemoryFlags(fs, 2048)
	eager := fs.Bool("enforce-eager", false, "run every step kernel by kernel: no CUDA graphs for decode steps (as vLLM's --enforce-eager)")
	spec := parallel.AddSpecFlags(fs)
	pipe := addPipelineFlags(fs) // stage.go
	maxConns := fs.Int("max-connections", 0, "client connections held at once; past it stalled ones are closed and new ones refused (default: the file limit less 256)")
	allowLong := fs.Bool("allow-long-max-model-len", false, "allow --max-model-len above the model's max_position_embeddings (warns; as vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN)")
	names := fs.Lookup("served-model-name")
	names.DefValue, names.Usage = "", names.Usage+" (default: the --model folder's name)"
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
	specCfg, err := spec.Config()
	if err != nil {
		return err
	}
	src := model.source()
	modelCfg, err := src.Config()
	if err != nil {
		return err
	}
	warn, err := serve.CheckMaxModelLen(cfg.MaxModelLen, modelCfg.MaxPositionEmbeddings, *allowLong)
	if err != nil {
		return err
	}
	if warn != "" {
		slog.Warn(warn)
	}
	tok, err := loadTokenizer(*tokDir, src)
	if err != nil {
		return err
	}
	slog.Info("loading model", "dir", *dir)
	ranks, err := backend.ranks()
	if err != nil {
		return err
	}
	be, kv, err := backend.open()
	if err != nil {
		return err
	}
	defer be.Close()
	if err := checkHostMemory(be, src); err != nil {
		return err
	}
	opt := parallel.EngineOptions{EnforceEager: *eager, GraphMaxSeqs: specCfg.VerifyRows(64), Ranks: ranks}
	if err := mem.apply(&opt, kv, cfg.MaxNumSeqs, cfg.MaxModelLen); err != nil {
		return err
	}
	eng, closeEngine, err := pipe.open(ctx, src, be, opt, progress(stderr, "load"))
	if err != nil {
		return err
	}
	defer closeEngine()
	if err := specCfg.CheckEngine(eng); err != nil {
		return err
	}
	sched := parallel.NewScheduler(eng, parallel.SchedulerOptions{MaxNumSeqs: cfg.MaxNumSeqs, MaxWaiting: cfg.MaxWaiting,
		MaxModelLen: cfg.MaxModelLen, PrefillTokens: *mem.batched, Speculative: specCfg})
	defer sched.Close()
	srv, err := serve.NewServer(cfg, sched, tok, slog.Default())
	if err != nil {
		return err
	}
	srv.SetMaxConnections(*maxConns)
	slog.Info("serving", "addr", cfg.Addr(), "model", cfg.ServedModelNames, "max_model_len", srv.MaxModelLen(), "engine", eng.BE.Name(),
		"speculative_config", specCfg)
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
