package parallel

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/model/modeltest"
	"github.com/glmtopo/glmtopo/topology"
	"github.com/glmtopo/glmtopo/transport"
)

// rankTol bounds how far a split run's logits may drift from one rank's:
// the ranks' partial sums add in another order than one rank's dot products.
const rankTol = 1e-5

func cpuRanks(int) (kernels.Backend, error) { return cpu.New(1), nil }

// placement puts each MoE layer's experts on the EP groups as lists give.
func placement(cfg *model.Config, lists [][]int) []topology.LayerExperts {
	var out []topology.LayerExperts
	for l := cfg.FirstKDenseReplace; l < cfg.NumHiddenLayers; l++ {
		out = append(out, topology.LayerExperts{Layer: l, GPUs: lists})
	}
	return out
}

type rankCase struct {
	name          string
	ranks, tp, ep int
	lists         [][]int // EPLB placement over the EP groups; nil: contiguous
	shareHead     bool    // rank 0 on the engine's backend, rows broadcast (ranks_device.go)
}

var rankCases = []rankCase{
	{name: "tp2", ranks: 2, tp: 2, ep: 1},
	{name: "tp4", ranks: 4, tp: 4, ep: 1},
	{name: "ep2", ranks: 2, tp: 1, ep: 2},
	{name: "ep4", ranks: 4, tp: 1, ep: 4},
	{name: "tp2xep2", ranks: 4, tp: 2, ep: 2},
	{name: "tp4+ep4", ranks: 4, tp: 4, ep: 4}, // vLLM's --tensor-parallel-size 4 --enable-expert-parallel
	// EPLB: hot experts replicated (2..5 on both groups; 0 on three of four).
	{name: "eplb-tp2+ep2", ranks: 2, tp: 2, ep: 2, lists: [][]int{{0, 1, 2, 3, 4, 5}, {2, 3, 4, 5, 6, 7}}},
	{name: "eplb-ep4", ranks: 4, tp: 1, ep: 4, lists: [][]int{{0, 1, 2}, {0, 3, 4}, {0, 5, 6}, {7, 2, 4}}},
	{name: "eplb-tp2xep2", ranks: 4, tp: 2, ep: 2, lists: [][]int{{0, 1, 2, 3, 7}, {3, 4, 5, 6, 7, 0}}},
	// Rank 0 on the engine's backend, the residual broadcast (the GPU path).
	{name: "tp2/shared-head", ranks: 2, tp: 2, ep: 1, shareHead: true},
	{name: "tp4+ep4/shared-head", ranks: 4, tp: 4, ep: 4, shareHead: true},
	{name: "eplb-tp2xep2/shared-head", ranks: 4, tp: 2, ep: 2, lists: [][]int{{0, 1, 2, 3, 7}, {3, 4, 5, 6, 7, 0}}, shareHead: true},
}

// rankedEngine opens the fixture in dir with its layers on c's ranks.
func rankedEngine(t testing.TB, dir string, c rankCase, opt EngineOptions) *Engine {
	t.Helper()
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	opt.Ranks = RankOptions{Ranks: c.ranks, TP: c.tp, EP: c.ep, NewBackend: cpuRanks, ShareHead: c.shareHead}
	if c.lists != nil {
		opt.Ranks.Experts = placement(cfg, c.lists)
	}
	e, closeEngine, err := Open(context.Background(), ModelSource{Path: dir}, cpu.New(0), opt, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(closeEngine)
	return e
}

func maxAbsDiff(a, b []float32) float64 {
	if len(a) != len(b) {
		return math.Inf(1)
	}
	var m float64
	for i := range a {
		m = max(m, math.Abs(float64(a[i])-float64(b[i])))
	}
	return m
}

// greedyRun prefills prompt (logits of every row), decodes n tokens
// greedily and runs the MTP layer over the prompt; it returns the tokens
// and every logit row it saw, in order.
func greedyRun(t *testing.T, e *Engine, prompt []int32, n int) ([]int32, []float32) {
	t.Helper()
	seq := &Seq{}
	defer e.KV.Release(seq)
	res, err := e.Step([]StepInput{{Seq: seq, Tokens: prompt}}, true)
	if err != nil {
		t.Fatal(err)
	}
	logits, err := e.BE.Download(res.Logits)
	if err != nil {
		t.Fatal(err)
	}
	V := e.Cfg.VocabSize
	tok := modeltest.Argmax(logits[len(logits)-V:])
	next := append(append([]int32(nil), prompt[1:]...), tok)
	mres, err := e.MTPStep([]StepInput{{Seq: seq, Tokens: next}}, res.Normed)
	if err != nil {
		t.Fatal(err)
	}
	mtp, _ := e.BE.Download(mres.Logits)
	mres.Release()
	res.Release()
	all := append(logits, mtp...)
	toks := []int32{tok}
	for len(toks) < n {
		r, err := e.Step([]StepInput{{Seq: seq, Tokens: []int32{tok}}}, false)
		if err != nil {
			t.Fatal(err)
		}
		l, _ := e.BE.Download(r.Logits)
		r.Release()
		all = append(all, l...)
		tok = modeltest.Argmax(l)
		toks = append(toks, tok)
	}
	return toks, all
}

// TestRanksMatchOneRank runs both fixtures' golden prompts on every rank
// layout and compares greedy tokens and all logits (prefill rows, MTP,
// decode) with one rank's.
func TestRanksMatchOneRank(t *testing.T) {
	for _, fx := range fixtures {
		root := filepath.Join("..", "testdata", "glm4moe", fx)
		dir := filepath.Join(root, "model")
		g := modeltest.OpenGolden(t, root)
		ref := loadFixtureEngine(t, dir)
		type run struct {
			toks   []int32
			logits []float32
		}
		var want []run
		for i := 0; i < 4; i++ {
			toks, l := greedyRun(t, ref, g.IDs(fmt.Sprintf("prompt_%d", i)), 12)
			want = append(want, run{toks, l})
		}
		for _, c := range rankCases {
			t.Run(fx+"/"+c.name, func(t *testing.T) {
				e := rankedEngine(t, dir, c, testEngineOpt)
				worst := 0.0
				for i, w := range want {
					toks, l := greedyRun(t, e, g.IDs(fmt.Sprintf("prompt_%d", i)), 12)
					if fmt.Sprint(toks) != fmt.Sprint(w.toks) {
						t.Errorf("prompt %d: tokens %v, one rank %v", i, toks, w.toks)
					}
					worst = max(worst, maxAbsDiff(l, w.logits))
				}
				if worst > rankTol {
					t.Errorf("max |logit diff| %.3g > %g", worst, rankTol)
				}
				t.Logf("max |logit diff| vs one rank: %.3g", worst)
			})
		}
	}
}

// TestRanksSchedulerTokensIdentical serves a mixed workload (chunked
// prefill, batched decode, sampling, stops; with and without MTP
// speculation) through the scheduler on 4 ranks (TP2 × EP2) and compares
// it with one process.
func TestRanksSchedulerTokensIdentical(t *testing.T) {
	dir := fixtureDir("tiny")
	spec := schedOpt
	spec.Speculative = SpecConfig{Method: "mtp", NumSpeculativeTokens: 2}
	for _, c := range []struct {
		name  string
		opt   SchedulerOptions
		share bool
	}{{"plain", schedOpt, false}, {"mtp", spec, false}, {"plain/shared-head", schedOpt, true}, {"mtp/shared-head", spec, true}} {
		t.Run(c.name, func(t *testing.T) {
			items, want := referenceWork(t, dir, c.opt)
			e := rankedEngine(t, dir, rankCase{ranks: 4, tp: 2, ep: 2, shareHead: c.share}, smallKV)
			s := NewScheduler(e, c.opt)
			defer s.Close()
			compareWork(t, runWorkload(t, s, items), want)
		})
	}
}

// rankedPipeline makes a 2-stage in-process pipeline over the fixture in
// dir split at layer k: the head on headRanks ranks (1: one backend), the
// executor stage on stageRanks, each with TP over its ranks.
func rankedPipeline(t *testing.T, dir string, k, headRanks, stageRanks int, share bool, ropt RingOptions) *Engine {
	t.Helper()
	src := ModelSource{Path: dir}
	opt := smallKV
	if headRanks > 1 {
		opt.Ranks = RankOptions{Ranks: headRanks, TP: headRanks, EP: 1, NewBackend: cpuRanks, ShareHead: share}
	}
	head, closeHead, err := OpenHead(context.Background(), src, cpu.New(0), k, opt, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(closeHead)
	var st *Stage
	closeStage := func() {}
	if stageRanks > 1 {
		st, closeStage, err = OpenStageRanks(context.Background(), src, cpu.New(0), k, head.Cfg.NumHiddenLayers,
			RankOptions{Ranks: stageRanks, TP: 1, EP: stageRanks, NewBackend: cpuRanks, ShareHead: share}, nil)
	} else {
		st, closeStage, err = OpenStage(context.Background(), src, cpu.New(0), k, head.Cfg.NumHiddenLayers, nil)
	}
	if err != nil {
		t.Fatal(err)
	}
	a, b := transport.Pipe("head", "stage", 64<<20, transport.DefaultLimits())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := ServeStage(context.Background(), st, b, b); err != nil {
			t.Errorf("stage: %v", err)
		}
	}()
	ring, err := ConnectRing(context.Background(), head, a, a, ropt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ring.Close(); a.Close(); wg.Wait(); closeStage() })
	return head
}

// TestRankedStageInPipeline runs a 2-stage pipeline where one stage's
// layers run on 2 ranks (the head TP2, or the executor EP2) and compares
// the scheduler's tokens with one process.
func TestRankedStageInPipeline(t *testing.T) {
	dir := fixtureDir("tiny")
	items, want := referenceWork(t, dir, schedOpt)
	for _, c := range []struct {
		name              string
		headRanks, stRank int
		micro             int
		share             bool // rank 0 on the stage's backend, rows on it (ranks_device.go)
	}{{"head-tp2", 2, 1, 1, false}, {"stage-ep2", 1, 2, 1, false}, {"head-tp2/micro-batches", 2, 1, 2, false},
		{"stage-ep2/micro-batches", 1, 2, 2, false}, {"head-tp2/shared-head", 2, 1, 1, true},
		{"stage-ep2/shared-head", 1, 2, 1, true}, {"stage-ep2/shared-head/micro-batches", 1, 2, 2, true}} {
		t.Run(c.name, func(t *testing.T) {
			head := rankedPipeline(t, dir, 2, c.headRanks, c.stRank, c.share, RingOptions{MicroBatches: c.micro})
			s := NewScheduler(head, schedOpt)
			defer s.Close()
			compareWork(t, runWorkload(t, s, items), want)
		})
	}
}

// TestRanksDummyWeights: --load-format dummy on ranks. Expert parallelism
// alone cuts no tensor, so its model is the one-rank dummy model (same
// tokens); TP ranks fill their slices from per-slice seeds (as vLLM's dummy
// loader fills each shard), a model of its own that is the same every time.
func TestRanksDummyWeights(t *testing.T) {
	src := ModelSource{Path: "tiny", LoadFormat: "dummy", Seed: 5}
	open := func(ro RankOptions) *Engine {
		opt := testEngineOpt
		opt.Ranks = ro
		e, closeEngine, err := Open(context.Background(), src, cpu.New(0), opt, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(closeEngine)
		return e
	}
	prompt := []int32{5, 17, 300, 2, 9}
	wantToks, wantLogits := greedyRun(t, open(RankOptions{}), prompt, 8)
	toks, logits := greedyRun(t, open(RankOptions{Ranks: 2, TP: 1, EP: 2, NewBackend: cpuRanks}), prompt, 8)
	if fmt.Sprint(toks) != fmt.Sprint(wantToks) || maxAbsDiff(logits, wantLogits) > rankTol {
		t.Errorf("EP2 dummy: tokens %v (max diff %.3g), one rank %v", toks, maxAbsDiff(logits, wantLogits), wantToks)
	}
	tp := RankOptions{Ranks: 2, TP: 2, EP: 1, NewBackend: cpuRanks}
	a, _ := greedyRun(t, open(tp), prompt, 8)
	b, _ := greedyRun(t, open(tp), prompt, 8)
	if fmt.Sprint(a) != fmt.Sprint(b) {
		t.Errorf("TP2 dummy: tokens %v, then %v", a, b)
	}
}

func TestRankOptionsRefused(t *testing.T) {
	dir := fixtureDir("tiny")
	for _, tc := range []struct {
		name string
		ro   RankOptions
		want string
	}{
		{"no backends", RankOptions{Ranks: 2, TP: 2, EP: 1}, "NewBackend"},
		{"tp past the heads", RankOptions{Ranks: 8, TP: 8, EP: 1, NewBackend: cpuRanks}, "attention heads"},
		{"ep not dividing", RankOptions{Ranks: 4, TP: 4, EP: 3, NewBackend: cpuRanks}, "must divide"},
	} {
		opt := testEngineOpt
		opt.Ranks = tc.ro
		_, _, err := Open(context.Background(), ModelSource{Path: dir}, cpu.New(0), opt, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want it to say %q", tc.name, err, tc.want)
		}
	}
}
