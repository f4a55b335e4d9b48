package parallel

import (
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/kernels/cuda/cudatest"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/model/modeltest"
)

// MTP speculation on one GPU: the graph workload's greedy tokens with N = 1
// and 2 drafts (the model's own, and drafts from the CPU reference so that
// long runs are accepted) equal the CPU reference up to its first near tie,
// and verify steps replay decode graphs.
func TestSpecDecodeOnGPU(t *testing.T) {
	be := cudatest.Open(t, cuda.Options{})
	root := filepath.Join("..", "testdata", "glm4moe", "tiny")
	g := modeltest.OpenGolden(t, root)
	w := modeltest.LoadWeights(t, be, filepath.Join(root, "model"))
	ref := cpuReference(t, root, g)
	for n := 1; n <= 2; n++ {
		for _, drafts := range []string{"mtp", "reference"} {
			t.Run(fmt.Sprintf("N=%d/%s", n, drafts), func(t *testing.T) {
				spec := SpecConfig{"mtp", n}
				e, err := NewEngine(be, w, EngineOptions{BlockSize: 16, MaxTokens: 1024, KVDType: kernels.BF16, GraphMinContext: 16,
					GraphMaxSeqs: spec.VerifyRows(5)})
				if err != nil {
					t.Fatal(err)
				}
				defer e.Close()
				s := NewScheduler(e, SchedulerOptions{MaxNumSeqs: 5, Speculative: spec})
				defer s.Close()
				if drafts == "reference" {
					s.spec.override = func(r *request, d []int32) {
						for i, wl := range graphWorkload {
							if len(r.req.PromptIDs) == len(g.IDs(fmt.Sprintf("prompt_%d", wl.prompt))) && r.req.MaxNewTokens == wl.maxNew {
								for j := range d {
									if k := r.generated + j; k < len(ref[i].tokens) {
										d[j] = int32(ref[i].tokens[k])
									}
								}
							}
						}
					}
				}
				t0 := time.Now()
				tokens := runGraphWorkload(t, s, g)
				for i := range graphWorkload {
					if n := ref[i].reliable; !slices.Equal(tokens[i][:n], ref[i].tokens[:n]) {
						t.Errorf("request %d (first %d tokens): %v, cpu %v", i, n, tokens[i], ref[i].tokens)
					}
				}
				st := checkSpecCounters(t, s, n)
				gs := e.GraphStats()
				t.Logf("workload in %v; %d of %d drafts accepted; %+v", time.Since(t0).Round(time.Millisecond), st.NumAcceptedTokens,
					st.NumDraftTokens, gs)
				if gs.Replays == 0 {
					t.Error("no verify step replayed a decode graph")
				}
			})
		}
	}
}

// On a GLM-4.5-Air-FP8 model of random weights cut to a few layers (what
// `--load-format dummy --hf-overrides '{"num_hidden_layers":4}'` serves),
// greedy output with MTP on (N = 1, 3) is the output with it off up to the
// first near tie of the plain run.
func TestSpecAirFP8DummyOnGPU(t *testing.T) {
	be := cudatest.Open(t, cuda.Options{FastWideGemm: true})
	cfg, err := model.Preset("glm-4.5-air-fp8")
	if err != nil {
		t.Fatal(err)
	}
	if cfg, err = cfg.WithLayers(4); err != nil {
		t.Fatal(err)
	}
	w, free, err := model.DummyWeights(cfg, model.WholeModel(cfg), be, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	rng := rand.New(rand.NewPCG(3, 4))
	var prompts [][]int
	for _, n := range []int{1, 9, 40, 130} {
		p := make([]int, n)
		for i := range p {
			p[i] = rng.IntN(cfg.VocabSize)
		}
		prompts = append(prompts, p)
	}
	const maxNew = 32
	run := func(spec SpecConfig) ([][]int, []int) {
		e, err := NewEngine(be, w, EngineOptions{BlockSize: 16, MaxTokens: 4096, KVDType: kernels.BF16, GraphMaxSeqs: spec.VerifyRows(4)})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		var reliable []int
		if !spec.Enabled() { // the plain run's first near tie, step by step
			for _, p := range prompts {
				reliable = append(reliable, firstNearTie(t, e, p, maxNew))
			}
		}
		s := NewScheduler(e, SchedulerOptions{MaxNumSeqs: 4, Speculative: spec})
		defer s.Close()
		out := make([][]int, len(prompts))
		var wg sync.WaitGroup
		for i, p := range prompts {
			wg.Add(1)
			go func() {
				defer wg.Done()
				toks, _, err := collect(t.Context(), s, Request{PromptIDs: p, MaxNewTokens: maxNew, IgnoreEOS: true})
				if err != nil {
					t.Error(err)
				}
				out[i] = toks
			}()
		}
		wg.Wait()
		if st, ok := s.SpecDecodeStats(); ok {
			t.Logf("%v: %d of %d drafts accepted; %+v", spec, st.NumAcceptedTokens, st.NumDraftTokens, e.GraphStats())
		}
		return out, reliable
	}
	plain, reliable := run(SpecConfig{})
	for _, n := range []int{1, 3} {
		got, _ := run(SpecConfig{"mtp", n})
		for i := range prompts {
			if k := reliable[i]; !slices.Equal(got[i][:k], plain[i][:k]) {
				t.Errorf("N=%d prompt of %d tokens (first %d tokens): %v, without MTP %v", n, len(prompts[i]), k, got[i], plain[i])
			} else {
				t.Logf("N=%d prompt of %d tokens: identical over the %d tokens before the first near tie", n, len(prompts[i]), k)
			}
		}
	}
}

// firstNearTie decodes p greedily one step at a time and returns how many
// tokens come before the first step whose top-2 logits are within 1% of the
// largest |logit| (where rounding may flip the choice).
func firstNearTie(t *testing.T, e *Engine, p []int, maxNew int) int {
	t.Helper()
	seq := &Seq{}
	defer e.KV.Release(seq)
	toks := toI32(p)
	for n := 0; n < maxNew; n++ {
		res, err := e.Step([]StepInput{{Seq: seq, Tokens: toks}}, false)
		if err != nil {
			t.Fatal(err)
		}
		logits, err := e.BE.Download(res.Logits)
		res.Release()
		if err != nil {
			t.Fatal(err)
		}
		if modeltest.TopGap(logits) < 0.01 {
			return n
		}
		toks = []int32{modeltest.Argmax(logits)}
	}
	return maxNew
}
