package topology

import (
	"math"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/model"
)

func airRequest(t testing.TB, hosts string) PlanRequest {
	t.Helper()
	cfg, err := model.Preset("glm-4.5-air-fp8")
	if err != nil {
		t.Fatal(err)
	}
	inv, err := ParseHosts(hosts)
	if err != nil {
		t.Fatal(err)
	}
	return PlanRequest{Model: cfg, ModelName: "glm-4.5-air-fp8", Inventory: inv, MaxModelLen: 8192, MaxNumSeqs: 4}
}

func layersByHost(res *PlanResult) map[string]int {
	m := map[string]int{}
	for _, s := range res.Stages {
		m[s.Host] += s.Layers[1] - s.Layers[0]
	}
	return m
}

// The faster (H200: 4.8 vs 3.35 TB/s) and larger host gets more layers.
func TestMixedInventoryFavoursFasterHost(t *testing.T) {
	for _, order := range []string{"1x4xH200,1x4xH100-80G", "1x4xH100-80G,1x4xH200"} {
		res := planFor(t, "glm-4.5-fp8", order, 8192, 32)
		if !res.Feasible {
			t.Fatalf("%s: %s", order, res.Reason)
		}
		names := map[string]string{}
		for i, h := range res.Hosts {
			names[res.gpuName(i)] = h.Name
		}
		l := layersByHost(res)
		t.Logf("%s: %s; layers %v; %.0f tok/s", order, res.Alternatives[0].Summary, l, res.Predicted.DecodeTokensPerS)
		if l[names["H200"]] <= l[names["H100-SXM-80G"]] {
			t.Errorf("%s: H200 host has %d layers, H100 host %d; want more on the H200", order, l[names["H200"]], l[names["H100-SXM-80G"]])
		}
		if l[names["H200"]]+l[names["H100-SXM-80G"]] != 92 {
			t.Errorf("layers %v do not add up to 92", l)
		}
		// Balanced by time: the stages' decode times are closer than a layer-count split would make them.
		var lo, hi float64 = 1e9, 0
		for _, s := range res.Stages {
			lo, hi = min(lo, s.DecodeMs), max(hi, s.DecodeMs)
		}
		if hi > 1.25*lo {
			t.Errorf("stage times %.2f..%.2f ms are not balanced", lo, hi)
		}
	}
}

func maxEP(res *PlanResult) int {
	ep := 1
	for _, s := range res.Stages {
		ep = max(ep, s.EP)
	}
	return ep
}

// Air-FP8's 1408-wide experts cannot be split by TP under FP8 (1408/n is no
// multiple of 128), so multi-GPU stages need EP and its all-to-alls. Over
// NVLink one 8-way EP stage is best; over PCIe, where an all-to-all crosses
// the root complex, the planner prefers smaller EP groups in more stages.
func TestPCIeHostPrefersFewerAllToAlls(t *testing.T) {
	plan := func(ic string) *PlanResult {
		req := airRequest(t, "1x8xH100-80G")
		req.Inventory.Hosts[0].Interconnect = ic
		req.MaxNumSeqs = 64
		res, err := Plan(req)
		if err != nil {
			t.Fatal(err)
		}
		if !res.Feasible {
			t.Fatalf("%s: %s", ic, res.Reason)
		}
		return res
	}
	nv, pc := plan("nvlink"), plan("pcie")
	t.Logf("nvlink: %d stages, EP%d, %.0f tok/s; pcie: %d stages, EP%d, %.0f tok/s",
		len(nv.Stages), maxEP(nv), nv.Predicted.DecodeTokensPerS, len(pc.Stages), maxEP(pc), pc.Predicted.DecodeTokensPerS)
	if maxEP(nv) != 8 {
		t.Errorf("NVLink host: EP%d, want one EP8 stage", maxEP(nv))
	}
	if maxEP(pc) >= maxEP(nv) {
		t.Errorf("PCIe host: EP%d, want smaller all-to-all groups than NVLink's EP%d", maxEP(pc), maxEP(nv))
	}
	if pc.Predicted.DecodeTokensPerS >= nv.Predicted.DecodeTokensPerS {
		t.Errorf("PCIe predicted faster (%.0f) than NVLink (%.0f)", pc.Predicted.DecodeTokensPerS, nv.Predicted.DecodeTokensPerS)
	}
}

// A skewed --expert-load replicates the hot experts (EPLB); a uniform one does not.
func TestSkewedExpertLoadReplicatesHotExperts(t *testing.T) {
	req := airRequest(t, "1x4xH100-80G")
	cfg := req.Model
	hot := map[int]bool{5: true, 17: true, 100: true}
	load := &ExpertLoad{Layers: map[int][]float64{}}
	for l := cfg.FirstKDenseReplace; l < cfg.NumHiddenLayers; l++ {
		counts := make([]float64, cfg.NRoutedExperts)
		for e := range counts {
			counts[e] = 10
			if hot[e] {
				counts[e] = 400
			}
		}
		load.Layers[l] = counts
	}
	req.ExpertLoad = load
	req.RedundantExperts = 4
	req.MaxNumSeqs = 64
	res, err := Plan(req)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Feasible || len(res.Experts) == 0 {
		t.Fatalf("feasible=%v experts=%d: %s", res.Feasible, len(res.Experts), res.Reason)
	}
	for _, le := range res.Experts {
		if le.Layer >= cfg.NumHiddenLayers {
			continue // the MTP layer has no histogram: uniform
		}
		extra := 0
		for e, r := range le.Replicas {
			if r > 1 && !hot[e] {
				t.Errorf("layer %d: cold expert %d has %d replicas", le.Layer, e, r)
			}
			extra += r - 1
		}
		for e := range hot {
			if le.Replicas[e] < 2 {
				t.Errorf("layer %d: hot expert %d has %d replica(s)", le.Layer, e, le.Replicas[e])
			}
		}
		if extra != 4 {
			t.Errorf("layer %d: %d redundant experts, want 4", le.Layer, extra)
		}
		// Replicas of one expert sit on different GPUs.
		for e := range hot {
			on := 0
			for _, gpu := range le.GPUs {
				for _, x := range gpu {
					if x == e {
						on++
					}
				}
			}
			if on != le.Replicas[e] {
				t.Errorf("layer %d expert %d: %d placements for %d replicas", le.Layer, e, on, le.Replicas[e])
			}
		}
	}
	t.Logf("layer %d replicas of hot experts: %d %d %d", res.Experts[0].Layer,
		res.Experts[0].Replicas[5], res.Experts[0].Replicas[17], res.Experts[0].Replicas[100])

	uniform := airRequest(t, "1x4xH100-80G")
	uniform.MaxNumSeqs = 64
	ures, err := Plan(uniform)
	if err != nil {
		t.Fatal(err)
	}
	if len(ures.Experts) == 0 {
		t.Fatalf("uniform load: no EP placement (%s)", ures.Reason)
	}
	for _, le := range ures.Experts {
		for e, r := range le.Replicas {
			if r != 1 {
				t.Fatalf("uniform load: layer %d expert %d has %d replicas", le.Layer, e, r)
			}
		}
	}
}

// Invalid combinations are rejected with the reason.
func TestInvalidCombinations(t *testing.T) {
	// FP8 experts split by TP below the 128-column block.
	req := airRequest(t, "1x2xH100-80G")
	req.ExpertParallel = "off"
	req.MaxModelLen, req.MaxNumSeqs = 8192, 4
	res, err := Plan(req)
	if err != nil {
		t.Fatal(err)
	}
	// With EP off only single-GPU stages remain; 2 stages of 1 GPU hold 52 GiB each.
	for _, s := range res.Stages {
		if s.TP > 1 {
			t.Errorf("stage %d uses TP%d for FP8 experts of width 1408", s.Index, s.TP)
		}
	}
	p, err := newPlanner(mustDefaults(t, req), newModelWeights(req.Model))
	if err != nil {
		t.Fatal(err)
	}
	if r := p.shapeInvalid(stageShape{host: 0, n: 2}); !strings.Contains(r, "128-column") {
		t.Errorf("TP2 FP8 experts: reason %q", r)
	}
	if r := p.shapeInvalid(stageShape{host: 0, n: 2, ep: true}); r != "" {
		t.Errorf("EP2 should be valid, got %q", r)
	}

	// FP8 weights on GPUs without FP8.
	a100 := planFor(t, "glm-4.5-air-fp8", "2x4xA100-80G", 8192, 4)
	if a100.Feasible || !strings.Contains(a100.Reason, "FP8") {
		t.Errorf("FP8 on A100: feasible=%v reason %q", a100.Feasible, a100.Reason)
	}
	// bf16 on A100 is fine.
	if res := planFor(t, "glm-4.5-air", "1x4xA100-80G", 8192, 4); !res.Feasible {
		t.Errorf("Air bf16 on 4×A100-80G: %s", res.Reason)
	}
}

func mustDefaults(t *testing.T, r PlanRequest) PlanRequest {
	t.Helper()
	r, err := r.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestPlanRequestErrors(t *testing.T) {
	cfg, _ := model.Preset("tiny")
	inv, _ := ParseHosts("1x1xH100")
	for name, mut := range map[string]func(*PlanRequest){
		"no model":    func(r *PlanRequest) { r.Model = nil },
		"util":        func(r *PlanRequest) { r.GPUMemoryUtil = 1.5 },
		"kv dtype":    func(r *PlanRequest) { r.KVCacheDType = "int4" },
		"ep mode":     func(r *PlanRequest) { r.ExpertParallel = "maybe" },
		"acceptance":  func(r *PlanRequest) { r.MTPAcceptance = 2 },
		"seqs":        func(r *PlanRequest) { r.MaxNumSeqs = -1 },
		"no hosts":    func(r *PlanRequest) { r.Inventory = Inventory{} },
		"load layer":  func(r *PlanRequest) { r.ExpertLoad = &ExpertLoad{Layers: map[int][]float64{0: make([]float64, 16)}} },
		"load length": func(r *PlanRequest) { r.ExpertLoad = &ExpertLoad{Layers: map[int][]float64{1: {1, 2}}} },
	} {
		r := PlanRequest{Model: cfg, Inventory: inv}
		mut(&r)
		if _, err := Plan(r); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

// MTP pays at the default acceptance and costs at a low one.
func TestMTPWeighsVerifyCost(t *testing.T) {
	for _, c := range []struct {
		acceptance float64
		gain       bool
	}{{0.9, true}, {0.05, false}} {
		req := airRequest(t, "1x4xH100-80G")
		req.MTPAcceptance = c.acceptance
		res, err := Plan(req)
		if err != nil || !res.Feasible {
			t.Fatalf("%v %v", err, res)
		}
		p := res.Predicted
		t.Logf("acceptance %.2f: %.2f tokens/step, %.0f tok/s with MTP, %.0f without", c.acceptance, p.TokensPerStep,
			p.DecodeTokensPerS, p.NoMTPDecodeTokensPerS)
		if want := 1 + c.acceptance; math.Abs(p.TokensPerStep-want) > 1e-9 {
			t.Errorf("tokens/step %g, want %g", p.TokensPerStep, want)
		}
		if (p.DecodeTokensPerS > p.NoMTPDecodeTokensPerS) != c.gain {
			t.Errorf("acceptance %.2f: MTP %.0f vs none %.0f tok/s", c.acceptance, p.DecodeTokensPerS, p.NoMTPDecodeTokensPerS)
		}
	}
}
