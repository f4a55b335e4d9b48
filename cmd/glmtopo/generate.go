package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/glmtopo/glmtopo/parallel"
)

func runGenerate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("generate", stderr)
	model := addSourceFlags(fs, "checkpoint directory, or with --load-format dummy a preset name (required)")
	dir := model.path
	ids := fs.String("prompt-ids", "", "comma-separated prompt token ids (required)")
	maxNew := fs.Int("max-new-tokens", 16, "tokens to generate (at least 1)")
	temp := fs.Float64("temperature", 0, "sampling temperature (0 = greedy)")
	topP := fs.Float64("top-p", 1, "nucleus sampling mass")
	topK := fs.Int("top-k", 0, "sample from the K most likely tokens (0 = all)")
	seed := fs.Int64("seed", -1, "sampling seed (-1 = random)")
	ignoreEOS := fs.Bool("ignore-eos", false, "do not stop at end-of-sequence tokens")
	asJSON := fs.Bool("json", false, `print {"ids":[...]}`)
	backend := addBackendFlags(fs)
	mem := addMemoryFlags(fs, 2048)
	eager := fs.Bool("enforce-eager", false, "run every step kernel by kernel: no CUDA graphs for decode steps (as vLLM's --enforce-eager)")
	spec := parallel.AddSpecFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if *dir == "" || *ids == "" {
		fmt.Fprintln(stderr, "usage: glmtopo generate --model DIR|PRESET --prompt-ids 1,2,3 [--load-format dummy] [--hf-overrides JSON] [--max-new-tokens N] [--temperature T] [--json]")
		return errUsage
	}
	if err := checkSampling(*maxNew, *temp, *topP, *topK); err != nil {
		return err
	}
	specCfg, err := spec.Config()
	if err != nil {
		return err
	}
	var prompt []int
	for _, f := range strings.Split(*ids, ",") {
		v, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return fmt.Errorf("--prompt-ids: %q is not an integer", f)
		}
		prompt = append(prompt, v)
	}
	ranks, err := backend.ranks()
	if err != nil {
		return err
	}
	be, kv, err := backend.open()
	if err != nil {
		return err
	}
	defer be.Close()
	src := model.source()
	if err := checkHostMemory(be, src); err != nil {
		return err
	}
	opt := parallel.EngineOptions{EnforceEager: *eager, Ranks: ranks}
	if err := mem.apply(&opt, kv, 1, 0); err != nil {
		return err
	}
	if opt.MaxTokens == 0 && opt.KVCacheMemoryBytes == 0 && opt.NumGPUBlocksOverride == 0 {
		opt.MaxTokens = len(prompt) + *maxNew + 16 // one request: no need to profile the GPU's memory
	}
	eng, closeEngine, err := parallel.Open(ctx, src, be, opt, nil)
	if err != nil {
		return err
	}
	defer closeEngine()
	if err := specCfg.CheckEngine(eng); err != nil {
		return err
	}
	sched := parallel.NewScheduler(eng, parallel.SchedulerOptions{MaxNumSeqs: 1, PrefillTokens: *mem.batched, Speculative: specCfg})
	defer sched.Close()
	req := parallel.Request{PromptIDs: prompt, MaxNewTokens: *maxNew, IgnoreEOS: *ignoreEOS,
		Sampling: parallel.SamplingParams{Temperature: float32(*temp), TopP: float32(*topP), TopK: *topK, Seed: *seed, HasSeed: *seed >= 0}}
	out := []int{}
	res, err := sched.Generate(ctx, req, func(tok int) error {
		out = append(out, tok)
		if !*asJSON {
			fmt.Fprintf(stdout, "%d ", tok)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(map[string]any{"ids": out})
	}
	fmt.Fprintf(stdout, "\n(%d prompt tokens, %d generated, finish: %s)\n", res.PromptTokens, res.CompletionTokens, res.Finish)
	if specCfg.Enabled() {
		fmt.Fprintf(stdout, "(MTP: %d of %d draft tokens accepted)\n", res.AcceptedTokens, res.DraftTokens)
	}
	return nil
}

// checkSampling refuses generation settings the engine would silently
// reinterpret (a count of 0 meaning "all the room left") or refuse later.
func checkSampling(maxNew int, temp, topP float64, topK int) error {
	switch {
	case maxNew < 1:
		return fmt.Errorf("--max-new-tokens %d: want at least 1", maxNew)
	case !(temp >= 0): // NaN too
		return fmt.Errorf("--temperature %g: want 0 (greedy) or more", temp)
	case !(topP > 0 && topP <= 1):
		return fmt.Errorf("--top-p %g: want a value in (0, 1]", topP)
	case topK < 0:
		return fmt.Errorf("--top-k %d: want 0 (all tokens) or more", topK)
	}
	return nil
}
