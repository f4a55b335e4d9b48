package tp

import (
	"context"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/topology"
)

// synthModel writes a random checkpoint of the tiny preset with overrides
// (dtype bf16, fp8 or fp8-block) and returns its directory and config.
func synthModel(t testing.TB, overrides, dtype string) (string, *model.Config) {
	t.Helper()
	base, err := model.Resolve("tiny")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := base.WithOverrides(overrides)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if cfg, err = model.Synthesize(context.Background(), cfg, dir, model.SynthOptions{Seed: 7, DType: dtype}); err != nil {
		t.Fatal(err)
	}
	return dir, cfg
}

func loader(dir string) Loader {
	return func(ctx context.Context, sel model.Selection, be kernels.Backend) (*model.Weights, func(), error) {
		cfg, err := model.LoadConfig(dir)
		if err != nil {
			return nil, nil, err
		}
		w, err := model.LoadWeights(ctx, dir, cfg, sel, be, nil)
		if err != nil {
			return nil, nil, err
		}
		return w, func() { w.Close() }, nil
	}
}

func cpuBackend(int) (kernels.Backend, error) { return cpu.New(1), nil }

// steps are a prefill of 9 tokens then two decode tokens of one sequence.
func steps() []*kernels.Batch {
	var out []*kernels.Batch
	for _, r := range [][2]int{{0, 9}, {9, 10}, {10, 11}} {
		b := &kernels.Batch{BlockTables: [][]int32{{0}}, ContextLens: []int32{int32(r[1])}}
		for p := r[0]; p < r[1]; p++ {
			b.Positions = append(b.Positions, int32(p))
			b.SeqIndex = append(b.SeqIndex, 0)
			b.Slots = append(b.Slots, int32(p))
		}
		out = append(out, b)
	}
	return out
}

// input is a step's residual stream: random rows of unit scale.
func input(rng *rand.Rand, rows, hidden int) []float32 {
	h := make([]float32, rows*hidden)
	for i := range h {
		h[i] = float32(rng.NormFloat64())
	}
	return h
}

// oneRank runs layers [0, cfg layers) of dir on one CPU backend over the
// steps' inputs and returns each step's output rows.
func oneRank(t *testing.T, dir string, cfg *model.Config, ins [][]float32) [][]float32 {
	t.Helper()
	g, err := NewGrid(cfg, 0, cfg.NumHiddenLayers, 1, 1, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	return runGroup(t, dir, g, ins)
}

// runGroup runs the steps on a group of grid g with in-process collectives.
func runGroup(t *testing.T, dir string, g *Grid, ins [][]float32) [][]float32 {
	t.Helper()
	return runSteps(t, g, Options{NewBackend: cpuBackend, Load: loader(dir)}, ins)
}

func maxDiff(a, b [][]float32) float64 {
	var m float64
	for i := range a {
		for j := range a[i] {
			m = max(m, math.Abs(float64(a[i][j])-float64(b[i][j])))
		}
	}
	return m
}

// groupLimited is a synthetic config with group-limited routing: 16
// experts in 4 groups, each token's 4 experts from its 2 best groups.
const groupLimited = `{"num_hidden_layers": 3, "n_routed_experts": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4}`

// TestGroupMatchesOneRank: every layout of the synthetic group-limited
// model (bf16, and FP8 per-channel) gives one rank's rows within 1e-5
// through a prefill and two decode steps over the ranks' KV caches.
func TestGroupMatchesOneRank(t *testing.T) {
	for _, dtype := range []string{"bf16", "fp8"} {
		dir, cfg := synthModel(t, groupLimited, dtype)
		rng := rand.New(rand.NewPCG(1, 2))
		var ins [][]float32
		for _, b := range steps() {
			ins = append(ins, input(rng, b.Tokens(), cfg.HiddenSize))
		}
		want := oneRank(t, dir, cfg, ins)
		hot := [][]int{{0, 1, 2, 3, 4, 5}, {4, 5, 6, 7, 8, 9}, {8, 9, 10, 11, 12, 13}, {12, 13, 14, 15, 0, 1}}
		for _, c := range []struct {
			name          string
			ranks, tp, ep int
			lists         [][]int
		}{
			{"tp2", 2, 2, 1, nil}, {"tp4", 4, 4, 1, nil}, {"ep4", 4, 1, 4, nil}, {"tp2xep2", 4, 2, 2, nil},
			{"eplb-tp4+ep4", 4, 4, 4, hot}, {"eplb-ep4", 4, 1, 4, hot},
		} {
			t.Run(dtype+"/"+c.name, func(t *testing.T) {
				var place []topology.LayerExperts
				for l := cfg.FirstKDenseReplace; l < cfg.NumHiddenLayers && c.lists != nil; l++ {
					place = append(place, topology.LayerExperts{Layer: l, GPUs: c.lists})
				}
				g, err := NewGrid(cfg, 0, cfg.NumHiddenLayers, c.ranks, c.tp, c.ep, place)
				if err != nil {
					t.Fatal(err)
				}
				got := runGroup(t, dir, g, ins)
				d := maxDiff(got, want)
				if d > 1e-5 {
					t.Errorf("max |diff| %.3g from one rank", d)
				}
				t.Logf("%s: max |diff| from one rank %.3g", g, d)
			})
		}
	}
}

// TestGroupLimitedRouting checks the synthetic config exercises the group
// limit (some token's unlimited top-k reaches a third group) and that every
// route stays inside its token's topk_group groups — the routing every rank
// runs alike, whatever experts it holds.
func TestGroupLimitedRouting(t *testing.T) {
	dir, cfg := synthModel(t, groupLimited, "bf16")
	be := cpu.New(1)
	w, err := model.LoadWeights(context.Background(), dir, cfg, model.Selection{FirstLayer: 1, EndLayer: 2}, be, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	T, E, K := 64, cfg.NRoutedExperts, cfg.NumExpertsPerTok
	x, _ := be.NewTensor(kernels.F32, T, cfg.HiddenSize)
	if err := be.Upload(x, f32Bytes(input(rand.New(rand.NewPCG(3, 4)), T, cfg.HiddenSize))); err != nil {
		t.Fatal(err)
	}
	logits, _ := be.NewTensor(kernels.F32, T, E)
	if err := be.Linear(logits, x, w.Layers[0].Router, nil); err != nil {
		t.Fatal(err)
	}
	route := func(groups, topk int) []int32 {
		ids, _ := be.NewTensor(kernels.I32, T, K)
		wts, _ := be.NewTensor(kernels.F32, T, K)
		p := kernels.RouterParams{Experts: E, TopK: K, Groups: groups, TopKGroups: topk, NormTopK: true, Scale: 1}
		if err := be.Route(ids, wts, logits, w.Layers[0].RouterBias, p); err != nil {
			t.Fatal(err)
		}
		v, _ := be.DownloadI32(ids)
		return v
	}
	limited, free := route(cfg.NGroup, cfg.TopKGroup), route(1, 1)
	per := E / cfg.NGroup
	differ := 0
	for tok := 0; tok < T; tok++ {
		groups, freeGroups := map[int32]bool{}, map[int32]bool{}
		for j := 0; j < K; j++ {
			groups[limited[tok*K+j]/int32(per)] = true
			freeGroups[free[tok*K+j]/int32(per)] = true
		}
		if len(groups) > cfg.TopKGroup {
			t.Errorf("token %d routes to groups %v: more than topk_group %d", tok, groups, cfg.TopKGroup)
		}
		if len(freeGroups) > cfg.TopKGroup {
			differ++
		}
	}
	if differ == 0 {
		t.Fatalf("no token's top-%d spans more than %d groups: the config does not exercise the group limit", K, cfg.TopKGroup)
	}
	t.Logf("%d of %d tokens would leave their best %d groups without the limit", differ, T, cfg.TopKGroup)
}

// TestFP8BlockSplits: block-scaled FP8 (128×128) splits on block
// boundaries match one rank; a split inside a block is refused with a
// clear error (as vLLM refuses it) rather than dequantized.
func TestFP8BlockSplits(t *testing.T) {
	dims := `{"num_hidden_layers": 2, "hidden_size": 256, "head_dim": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
		"intermediate_size": 512, "moe_intermediate_size": 256, "n_routed_experts": 4, "num_experts_per_tok": 2}`
	dir, cfg := synthModel(t, dims, "fp8-block")
	rng := rand.New(rand.NewPCG(5, 6))
	var ins [][]float32
	for _, b := range steps() {
		ins = append(ins, input(rng, b.Tokens(), cfg.HiddenSize))
	}
	want := oneRank(t, dir, cfg, ins)
	g, err := NewGrid(cfg, 0, cfg.NumHiddenLayers, 2, 2, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := maxDiff(runGroup(t, dir, g, ins), want); d > 1e-5 {
		t.Errorf("TP2 of block FP8: max |diff| %.3g", d)
	} else {
		t.Logf("TP2 of block FP8: max |diff| %.3g", d)
	}
	// TP4 cuts k_proj (2 KV heads × 128 = 256 rows) into 64-row slices.
	_, err = NewGrid(cfg, 0, cfg.NumHiddenLayers, 4, 4, 1, nil)
	if err == nil || !strings.Contains(err.Error(), "FP8 block of 128") {
		t.Fatalf("TP4 of 128-blocks with 64-row slices: err %v, want a block-alignment error", err)
	}
}
