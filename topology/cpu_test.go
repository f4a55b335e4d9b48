package topology

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/model"
)

// unitSpec has round figures so that costs can be worked out by hand: 1
// GFLOP/s and 1 GB/s everywhere on all cores, half that on one, 10 µs per
// kernel call, 1 ns per element.
func unitSpec() CPUSpec {
	return CPUSpec{Cores: 2, GEMMGFLOPS: 1, GEMMCoreGFLOPS: 0.5, ConvGElems: 1, ConvCoreGElems: 0.5,
		GEMVGBps: 1, GEMVCoreGBps: 0.5, AttnGFLOPS: 1, AttnCoreGFLOPS: 0.5, OpOverheadUS: 10, LayerWorkFactor: 1,
		ElemNS: 1, SampleNS: 1, StepOverheadUS: 0, HopLatencyUS: 100, HopGBps: 1, WakeUS: 0}
}

func near(a, b float64) bool { return math.Abs(a-b) <= 1e-9*math.Max(1, math.Abs(b)) }

func TestCPULinearCost(t *testing.T) {
	s := unitSpec()
	for _, tc := range []struct {
		name        string
		T, K, N     float64
		alone, core float64
	}{
		{"no rows", 0, 64, 64, 0, 0},
		// GEMV: 2·K·N bf16 bytes at 1 GB/s (0.5 on one core) + 10 µs.
		{"one row streams the weights", 1, 1000, 1000, 10e-6 + 2e-3, 10e-6 + 4e-3},
		{"two rows read them once", 2, 1000, 1000, 10e-6 + 2e-3, 10e-6 + 4e-3},
		// GEMM: K·N conversions at 1 G/s + 2·T·K·N FLOPs at 1 GFLOP/s.
		{"three rows convert then multiply", 3, 1000, 1000, 10e-6 + 1e-3 + 6e-3, 10e-6 + 2e-3 + 12e-3},
		{"prefill rows", 100, 100, 10, 10e-6 + 1e-6 + 200e-6, 10e-6 + 2e-6 + 400e-6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := s.linear(tc.T, tc.K, tc.N)
			if !near(w.alone, tc.alone) || !near(w.core, tc.core) {
				t.Fatalf("linear(%g,%g,%g) = %+v, want alone %g core %g", tc.T, tc.K, tc.N, w, tc.alone, tc.core)
			}
		})
	}
	s.LayerWorkFactor = 2 // doubles the work, not the per-call overhead
	if w := s.linear(1, 1000, 1000); !near(w.alone, 10e-6+4e-3) {
		t.Fatalf("work factor 2: %+v", w)
	}
}

func TestCPUSmallCosts(t *testing.T) {
	s := unitSpec()
	s.WakeUS = 5
	for _, tc := range []struct {
		name        string
		got         cpuWork
		alone, core float64
	}{
		{"serial elements", s.serial(1000), 1e-6, 1e-6},
		// 4·pairs·heads·dim FLOPs: 4·100·2·8 = 6400.
		{"attention", s.attention(100, 2, 8), 10e-6 + 6.4e-6, 10e-6 + 12.8e-6},
		{"sampling rows in parallel", s.sample(4, 1000), 2e-6, 4e-6},
		{"sampling one row", s.sample(1, 1000), 1e-6, 1e-6},
		{"no rows to sample", s.sample(0, 1000), 0, 0},
		// 100 µs + 3 wakes of 5 µs + 1000 bytes at 1 GB/s; the core pays the wakes.
		{"hop", s.hop(1000), 100e-6 + 15e-6 + 1e-6, 15e-6},
	} {
		if !near(tc.got.alone, tc.alone) || !near(tc.got.core, tc.core) {
			t.Errorf("%s: %+v, want alone %g core %g", tc.name, tc.got, tc.alone, tc.core)
		}
	}
}

func TestCPUTouched(t *testing.T) {
	for _, tc := range []struct {
		E, k int
		T    float64
		want float64
	}{
		{16, 4, 0, 0},
		{16, 4, 1, 4},
		{16, 4, 2, 16 * (1 - 0.75*0.75)},
		{16, 16, 3, 16},
		{0, 4, 3, 0},
	} {
		if got := cpuTouched(tc.E, tc.k, tc.T); !near(got, tc.want) {
			t.Errorf("cpuTouched(%d, %d, %g) = %g, want %g", tc.E, tc.k, tc.T, got, tc.want)
		}
	}
	if got := cpuTouched(16, 4, 1000); got < 15.999 || got > 16 {
		t.Errorf("1000 tokens touch %g of 16 experts", got)
	}
}

func TestEvenSplits(t *testing.T) {
	for _, tc := range []struct {
		layers, stages int
		want           []int
	}{
		{4, 1, []int{0, 4}},
		{4, 2, []int{0, 2, 4}},
		{5, 2, []int{0, 3, 5}},
		{92, 3, []int{0, 31, 62, 92}},
	} {
		got := evenSplits(tc.layers, tc.stages)
		if len(got) != len(tc.want) {
			t.Fatalf("evenSplits(%d, %d) = %v, want %v", tc.layers, tc.stages, got, tc.want)
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Fatalf("evenSplits(%d, %d) = %v, want %v", tc.layers, tc.stages, got, tc.want)
			}
		}
	}
}

func tinyConfig(t *testing.T) *model.Config {
	t.Helper()
	cfg, err := model.Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestCPURoundBounds checks which bound sets a round's time: one
// micro-batch goes round the ring alone; stages of one machine share its
// cores; stages on machines of their own are bounded by the slowest.
func TestCPURoundBounds(t *testing.T) {
	cfg := tinyConfig(t)
	s := unitSpec()
	g := cpuBatch{T: 8, seqs: 8, pairs: 8 * 100, rows: 8}
	stage := func(first, end int, head bool) cpuWork { return cpuStage(s, cfg, first, end, head, g) }
	hop := s.hop(8 * float64(cfg.HiddenSize) * 4)
	s0, s1 := stage(0, 2, true), stage(2, 4, false)
	s0.add(hop)
	s1.add(hop)
	for _, tc := range []struct {
		name     string
		splits   []int
		machines []int
		groups   int
		want     float64
		bound    string
	}{
		{"one process", []int{0, 4}, []int{0}, 1, stage(0, 4, true).alone, boundTrip},
		{"one micro-batch round two stages", []int{0, 2, 4}, []int{0, 0}, 1, s0.alone + s1.alone, boundTrip},
		{"two micro-batches share two cores", []int{0, 2, 4}, []int{0, 0}, 2,
			math.Max(s0.alone+s1.alone, 2*(s0.core+s1.core)/2), ""},
		{"two machines: the slower stage", []int{0, 2, 4}, []int{0, 1}, 2,
			math.Max(s0.alone+s1.alone, 2*math.Max(s0.alone, s1.alone)), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &cpuPipeline{spec: s, cfg: cfg, splits: tc.splits, machines: tc.machines, micro: tc.groups, budget: 2048, maxSeqs: 256}
			gs := make([]cpuBatch, tc.groups)
			for i := range gs {
				gs[i] = g
			}
			got, why := p.round(gs)
			if !near(got, tc.want) {
				t.Fatalf("round = %g (%s), want %g", got, why, tc.want)
			}
			if tc.bound != "" && why != tc.bound {
				t.Fatalf("bound %q, want %q", why, tc.bound)
			}
		})
	}
}

// TestCPUSimulateOneAtATime: with one request in flight the benchmark is a
// sequence of prefill and decode rounds, so its figures follow from round.
func TestCPUSimulateOneAtATime(t *testing.T) {
	cfg := tinyConfig(t)
	for _, tc := range []struct {
		name             string
		splits, machines []int
		in, out, budget  int
	}{
		{"one process", []int{0, 4}, []int{0}, 16, 4, 2048},
		{"two stages", []int{0, 2, 4}, []int{0, 0}, 16, 4, 2048},
		{"chunked prompt", []int{0, 4}, []int{0}, 10, 3, 4},
		{"one output token", []int{0, 4}, []int{0}, 8, 1, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &cpuPipeline{spec: unitSpec(), cfg: cfg, splits: tc.splits, machines: tc.machines, micro: 2, budget: tc.budget, maxSeqs: 256}
			const n = 3
			got, err := p.simulate(ServeShape{Concurrency: 1, NumPrompts: n, InputLen: tc.in, OutputLen: tc.out})
			if err != nil {
				t.Fatal(err)
			}
			ttft := p.prefill(tc.in)
			var decode float64
			for i := 1; i < tc.out; i++ {
				d, _ := p.round([]cpuBatch{{T: 1, seqs: 1, pairs: float64(tc.in + i), rows: 1}})
				decode += d
			}
			dur := n * (ttft + decode)
			if !near(got.DurationS, dur) || !near(got.MeanTTFTMs, ttft*1e3) {
				t.Fatalf("duration %g s, TTFT %g ms; want %g s, %g ms", got.DurationS, got.MeanTTFTMs, dur, ttft*1e3)
			}
			if tc.out > 1 && !near(got.MeanTPOTMs, decode/float64(tc.out-1)*1e3) {
				t.Fatalf("TPOT %g ms, want %g", got.MeanTPOTMs, decode/float64(tc.out-1)*1e3)
			}
			if !near(got.OutputTokensPerS, n*float64(tc.out)/dur) || !near(got.TotalTokensPerS, n*float64(tc.in+tc.out)/dur) {
				t.Fatalf("throughput %g / %g tok/s over %g s", got.OutputTokensPerS, got.TotalTokensPerS, dur)
			}
		})
	}
}

// TestCPUSimulateMicroBatches: two stages on machines of their own work
// on two micro-batches at once, so keeping two in the ring beats one; on a
// single machine they share its cores, which gains less.
func TestCPUSimulateMicroBatches(t *testing.T) {
	sh := ServeShape{Concurrency: 8, NumPrompts: 16, InputLen: 32, OutputLen: 8}
	run := func(machines []int, micro int) float64 {
		p := &cpuPipeline{spec: unitSpec(), cfg: tinyConfig(t), splits: []int{0, 2, 4}, machines: machines, micro: micro, budget: 2048, maxSeqs: 256}
		got, err := p.simulate(sh)
		if err != nil {
			t.Fatal(err)
		}
		return got.OutputTokensPerS
	}
	one, two := run([]int{0, 1}, 1), run([]int{0, 1}, 2)
	shared := run([]int{0, 0}, 2)
	if !(two > 1.2*one) || !(shared < two) {
		t.Fatalf("two machines: %g tok/s with one micro-batch, %g with two; one machine with two: %g", one, two, shared)
	}
}

func TestCPUSimulateRejects(t *testing.T) {
	cfg := tinyConfig(t)
	good := cpuPipeline{spec: unitSpec(), cfg: cfg, splits: []int{0, 4}, machines: []int{0}, micro: 1, budget: 8, maxSeqs: 4}
	shape := ServeShape{Concurrency: 1, NumPrompts: 2, InputLen: 4, OutputLen: 2}
	for _, tc := range []struct {
		name  string
		edit  func(p *cpuPipeline, s *ServeShape)
		error string
	}{
		{"no prompts", func(_ *cpuPipeline, s *ServeShape) { s.NumPrompts = 0 }, "must be positive"},
		{"layers not covered", func(p *cpuPipeline, _ *ServeShape) { p.splits = []int{0, 3} }, "do not cover"},
		{"empty stage", func(p *cpuPipeline, _ *ServeShape) { p.splits, p.machines = []int{0, 0, 4}, []int{0, 0} }, "no layers"},
		{"machines per stage", func(p *cpuPipeline, _ *ServeShape) { p.machines = []int{0, 1} }, "boundaries"},
		{"no cores", func(p *cpuPipeline, _ *ServeShape) { p.spec.Cores = 0 }, "cores"},
		{"no budget", func(p *cpuPipeline, _ *ServeShape) { p.budget = 0 }, "positive"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, s := good, shape
			tc.edit(&p, &s)
			if _, err := p.simulate(s); err == nil || !strings.Contains(err.Error(), tc.error) {
				t.Fatalf("err = %v, want %q", err, tc.error)
			}
		})
	}
}

func TestCPUSpecFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cpu.yaml")
	want := unitSpec()
	want.Load = 1.5
	if err := want.WriteFile(path); err != nil {
		t.Fatal(err)
	}
	got, err := LoadCPUSpec(path)
	if err != nil || got != want {
		t.Fatalf("round trip: %+v, %v; want %+v", got, err, want)
	}
	for _, tc := range []struct{ name, doc, error string }{
		{"empty", "", "empty"},
		{"unknown field", "cores: 2\nturbo: true\n", "turbo"},
		{"zero rate", strings.Replace(mustYAML(t, want), "gemm_gflops: 1", "gemm_gflops: 0", 1), "gemm_gflops"},
		{"negative cost", strings.Replace(mustYAML(t, want), "op_overhead_us: 10", "op_overhead_us: -1", 1), "op_overhead_us"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ParseCPUSpec([]byte(tc.doc)); err == nil || !strings.Contains(err.Error(), tc.error) {
				t.Fatalf("err = %v, want %q", err, tc.error)
			}
		})
	}
}

func mustYAML(t *testing.T, s CPUSpec) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s.yaml")
	if err := s.WriteFile(path); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// TestPlanCPUFile: a CPU plan goes through the plan file and predicts a
// benchmark shape from it; a model with another config hash is refused.
func TestPlanCPUFile(t *testing.T) {
	cfg := tinyConfig(t)
	res, err := PlanCPU(CPUPlanRequest{Model: cfg, ModelName: "tiny", Spec: unitSpec(), Stages: 2})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Stages) != 2 || res.Stages[0].Layers != [2]int{0, 2} || res.Stages[1].Layers != [2]int{2, 4} ||
		!res.Stages[0].LMHead || res.Stages[1].LMHead || res.CPU.MicroBatches != 2 {
		t.Fatalf("stages %+v, cpu %+v", res.Stages, res.CPU)
	}
	if p := res.Predicted; !(p.DecodeTokensPerS > 0) || !near(p.TPOTMs, p.StepMs) || p.Batch != 256 {
		t.Fatalf("prediction %+v", p)
	}
	data, err := json.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	back, err := ParsePlan(data)
	if err != nil {
		t.Fatal(err)
	}
	sh := ServeShape{Concurrency: 4, NumPrompts: 8, InputLen: 128, OutputLen: 32}
	got, err := PredictServe(back, cfg, sh)
	if err != nil {
		t.Fatal(err)
	}
	p, err := planPipeline(res, cfg)
	if err != nil {
		t.Fatal(err)
	}
	want, err := p.simulate(sh)
	if err != nil || got != want {
		t.Fatalf("from the file: %+v; direct: %+v, %v", got, want, err)
	}
	other := *cfg
	other.NumHiddenLayers = 5
	if _, err := PredictServe(back, &other, sh); err == nil || !strings.Contains(err.Error(), "hash") {
		t.Fatalf("another model: %v", err)
	}
	if _, err := PredictServe(&PlanResult{}, cfg, sh); err == nil || !strings.Contains(err.Error(), "no CPU section") {
		t.Fatalf("a GPU plan: %v", err)
	}
	var b strings.Builder
	if err := res.WriteTable(&b); err != nil || !strings.Contains(b.String(), "CPU engine") || !strings.Contains(b.String(), "CONCURRENCY") {
		t.Fatalf("table: %v\n%s", err, b.String())
	}
}

func TestPlanCPURejects(t *testing.T) {
	cfg := tinyConfig(t)
	for _, tc := range []struct {
		name  string
		req   CPUPlanRequest
		error string
	}{
		{"no model", CPUPlanRequest{Spec: unitSpec()}, "no model"},
		{"more stages than layers", CPUPlanRequest{Model: cfg, Spec: unitSpec(), Stages: 5}, "5 stages"},
		{"more machines than stages", CPUPlanRequest{Model: cfg, Spec: unitSpec(), Stages: 2, Machines: 3}, "machines"},
		{"no calibration", CPUPlanRequest{Model: cfg, Stages: 2}, "cores"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := PlanCPU(tc.req); err == nil || !strings.Contains(err.Error(), tc.error) {
				t.Fatalf("err = %v, want %q", err, tc.error)
			}
		})
	}
}

func TestMedianSpec(t *testing.T) {
	a, b, c := unitSpec(), unitSpec(), unitSpec()
	a.GEMMGFLOPS, b.GEMMGFLOPS, c.GEMMGFLOPS = 9, 1, 4
	a.WakeUS, b.WakeUS, c.WakeUS = 30, 10, 20
	b.ParallelCores = 2
	got := medianSpec([]CPUSpec{a, b, c})
	if got.GEMMGFLOPS != 4 || got.WakeUS != 20 || got.ParallelCores != 0 || got.Cores != 2 || got.OpOverheadUS != 10 {
		t.Fatalf("median %+v", got)
	}
}

// TestSimRingFIFO: a stage takes micro-batches in the order sent, so a
// decode step queued behind a prompt's prefill waits for it at every
// stage, and the head completes them in order.
func TestSimRingFIFO(t *testing.T) {
	cfg := tinyConfig(t)
	s := unitSpec()
	p := &cpuPipeline{spec: s, cfg: cfg, splits: []int{0, 2, 4}, machines: []int{0, 1}, micro: 2, budget: 2048, maxSeqs: 8}
	r := newSimRing(p)
	prefill := cpuBatch{T: 512, seqs: 4, pairs: 512 * 64, rows: 4}
	decode := cpuBatch{T: 1, seqs: 1, pairs: 100, rows: 1}
	r.dispatch(prefill, nil)
	stage1Done := r.free[1]
	r.dispatch(decode, nil)
	w1 := cpuFront(s, cfg, 2, 4, false, decode).alone
	if want := stage1Done + w1; !near(r.free[1], want) {
		t.Fatalf("the decode step left stage 1 at %g, want %g (behind the prefill)", r.free[1], want)
	}
	first, second := r.complete(), r.complete()
	if first.ret >= second.ret || r.now < second.ret {
		t.Fatalf("completions out of order: %g then %g, head at %g", first.ret, second.ret, r.now)
	}
}
