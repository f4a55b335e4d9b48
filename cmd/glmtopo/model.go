package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	"github.com/glmtopo/glmtopo/model"
)

func runModelInspect(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("model inspect", stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	fs.Usage = func() { fmt.Fprintln(stderr, "usage: glmtopo model inspect DIR|PRESET [--json]"); fs.PrintDefaults() }
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return errUsage
	}
	cfg, err := model.Resolve(fs.Arg(0))
	if err != nil {
		return err
	}
	s := model.Summarize(cfg)
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(s)
	}
	return s.WriteTable(stdout)
}

func runModelSynth(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("model synth", stderr)
	preset := fs.String("preset", "tiny", "architecture preset: glm-4.5, glm-4.5-air, glm-4.6, tiny")
	layers := fs.Int("layers", 0, "main decoder layers (0 = the preset's)")
	dtype := fs.String("dtype", "bf16", "weights: bf16, fp8 (per-channel scales) or fp8-block (128×128)")
	seed := fs.Uint64("seed", 0, "random seed (same seed, same bytes)")
	out := fs.String("out", "", "output directory (required)")
	shard := fs.Int64("shard-size", 4<<30, "target shard size in bytes")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *out == "" || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: glmtopo model synth --preset NAME [--layers N] [--dtype bf16|fp8|fp8-block] [--seed S] --out DIR")
		return errUsage
	}
	if *layers < 0 {
		return fmt.Errorf("--layers %d: want a positive count, or 0 for the preset's", *layers)
	}
	cfg, err := model.Preset(*preset)
	if err != nil {
		return err
	}
	if *layers > 0 {
		if cfg, err = cfg.WithLayers(*layers); err != nil {
			return err
		}
	}
	opt := model.SynthOptions{Seed: *seed, DType: *dtype, ShardBytes: *shard, Progress: progress(stderr, "synth")}
	if cfg.VocabSize == 1024 {
		opt.Tokenizer = model.TinyTokenizerJSON()
	}
	got, err := model.Synthesize(ctx, cfg, *out, opt)
	if err != nil {
		return err
	}
	s := model.Summarize(got)
	fmt.Fprintf(stdout, "wrote %s: %d layers, %s parameters, %s (%s)\n", *out, s.Layers,
		model.HumanCount(s.Params.Total), model.HumanBytes(s.TotalBytes), s.Quantization)
	return nil
}
