package step

import (
	"math"
	"strings"
	"testing"

	collectivebench "github.com/glmtopo/glmtopo/bench/collective"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/topology"
)

// floorConfig is a two-layer model small enough to count by hand: a dense
// layer, then an MoE layer of 8 experts (top 2) and one shared expert, all
// bf16; hidden 8, 4 heads and 2 KV heads of 2, vocabulary 10.
func floorConfig() *model.Config {
	return &model.Config{HiddenSize: 8, NumAttentionHeads: 4, NumKeyValueHeads: 2, HeadDim: 2, IntermediateSize: 16,
		MoEIntermediateSize: 4, NRoutedExperts: 8, NumExpertsPerTok: 2, NSharedExperts: 1, FirstKDenseReplace: 1,
		NumHiddenLayers: 2, VocabSize: 10}
}

// linearAR is an all-reduce of 1 µs plus 1 ns per byte.
type linearAR struct{}

func (linearAR) Seconds(b int64) float64 { return 1e-6 + float64(b)*1e-9 }
func (linearAR) Source() string          { return "test" }

func TestRankFloor(t *testing.T) {
	const bf = 2 // bytes per bf16 element
	// Per layer: q and o are [8,8], k and v [4,8], the two norms [8].
	attn := func(div int, kvDiv int) int64 {
		return 2*8*bf + int64((8*8*bf+8*8*bf)/div+(4*8*bf+4*8*bf)/kvDiv)
	}
	expert := int64(3 * 4 * 8 * bf) // gate, up [4,8], down [8,4]
	for _, tc := range []struct {
		name     string
		spec     floorSpec
		want     map[string]int64
		experts  float64
		measured bool
		ars      int
	}{
		{"one GPU", floorSpec{gpus: 1, batch: 2, context: 9, routes: [][]int{{0, 3, 5}}},
			map[string]int64{"attention": 2 * attn(1, 1), "dense_mlp": 3 * 16 * 8 * bf, "router": 8*8*bf + 8*4,
				"shared_expert": expert, "routed_experts": 3 * expert, "kv_cache": 2 * 10 * 2 * 2 * (2 * 2) * bf,
				"embedding_rows": 2 * 8 * bf, "lm_head": 10*8*bf + 8*bf}, 3, true, 0},
		{"TP 2, experts split", floorSpec{gpus: 2, batch: 2, context: 9, routes: [][]int{{0, 3, 5}}},
			map[string]int64{"attention": 2 * attn(2, 2), "dense_mlp": 3 * 16 * 8 * bf / 2, "router": 8*8*bf + 8*4,
				"shared_expert": expert / 2, "routed_experts": 3 * expert / 2, "kv_cache": 2 * 10 * 2 * 2 * 2 * bf,
				"embedding_rows": 1 * 8 * bf, "lm_head": 10*8*bf/2 + 8*bf}, 3, true, 5},
		// Blocks {0..3} and {4..7}: GPU 0 reads experts 0 and 3, GPU 1 expert 5.
		{"TP 2, expert parallel", floorSpec{gpus: 2, ep: true, batch: 2, context: 9, routes: [][]int{{0, 3, 5}}},
			map[string]int64{"attention": 2 * attn(2, 2), "dense_mlp": 3 * 16 * 8 * bf / 2, "router": 8*8*bf + 8*4,
				"shared_expert": expert / 2, "routed_experts": 2 * expert, "kv_cache": 2 * 10 * 2 * 2 * 2 * bf,
				"embedding_rows": 1 * 8 * bf, "lm_head": 10*8*bf/2 + 8*bf}, 2, true, 5},
		// Uniform routing, one token: each of a GPU's 2 experts with p = 2/8.
		// TP 4 over 2 KV heads: every GPU keeps the one KV head its queries read.
		{"TP 4, expert parallel, uniform", floorSpec{gpus: 4, ep: true, batch: 1, context: 0},
			map[string]int64{"attention": 2 * attn(4, 2), "dense_mlp": 3 * 16 * 8 * bf / 4, "router": 8*8*bf + 8*4,
				"shared_expert": expert / 4, "routed_experts": expert / 2, "kv_cache": 1 * 1 * 2 * 2 * 2 * bf,
				"embedding_rows": 1 * 8 * bf, "lm_head": 10*8*bf/4 + 8*bf}, 0.5, false, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.spec.kvElem, tc.spec.readBW, tc.spec.ar = bf, 1e9, linearAR{}
			c := floorConfig()
			f, err := rankFloor(c, tc.spec)
			if err != nil {
				t.Fatal(err)
			}
			var sum int64
			for k, v := range tc.want {
				if f.Breakdown[k] != v {
					t.Errorf("%s: %d bytes, want %d", k, f.Breakdown[k], v)
				}
				sum += v
			}
			if len(f.Breakdown) != len(tc.want) || f.BytesPerGPU != sum {
				t.Errorf("parts %v, total %d; want %d parts, total %d", f.Breakdown, f.BytesPerGPU, len(tc.want), sum)
			}
			if f.ExpertsPerGPU != tc.experts || f.ExpertsMeasured != tc.measured {
				t.Errorf("experts per GPU %g (measured %v), want %g (%v)", f.ExpertsPerGPU, f.ExpertsMeasured, tc.experts, tc.measured)
			}
			// 2 layers × 2 all-reduces + the embedding's, of batch × hidden in bf16.
			wantColl := 0.0
			if tc.ars > 0 {
				wantColl = float64(tc.ars) * linearAR{}.Seconds(int64(tc.spec.batch*8*bf))
			}
			if f.AllReduces != tc.ars || math.Abs(f.CollectiveSeconds-wantColl) > 1e-15 {
				t.Errorf("%d all-reduces, %g s; want %d, %g s", f.AllReduces, f.CollectiveSeconds, tc.ars, wantColl)
			}
			if want := float64(sum)/1e9 + wantColl; math.Abs(f.FloorSeconds-want) > 1e-15 || f.HBMSeconds != float64(sum)/1e9 {
				t.Errorf("floor %g s (HBM %g), want %g", f.FloorSeconds, f.HBMSeconds, want)
			}
		})
	}
}

func TestRankFloorRefuses(t *testing.T) {
	for _, tc := range []struct {
		name string
		spec floorSpec
		want string
	}{
		{"3 ways of 4 heads", floorSpec{gpus: 3, batch: 1, readBW: 1, ar: linearAR{}}, "does not divide"},
		{"no GPUs", floorSpec{gpus: 0, batch: 1, readBW: 1}, "0 GPUs"},
		{"no batch", floorSpec{gpus: 1, batch: 0, readBW: 1}, "batch 0"},
		{"no bandwidth", floorSpec{gpus: 1, batch: 1}, "read bandwidth 0"},
		{"no all-reduce rate", floorSpec{gpus: 2, batch: 1, readBW: 1}, "no all-reduce rate"},
	} {
		if _, err := rankFloor(floorConfig(), tc.spec); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want %q", tc.name, err, tc.want)
		}
	}
}

func TestMeasuredAllReduce(t *testing.T) {
	rep := &collectivebench.Report{Ranks: 2, Results: []collectivebench.Result{
		{Op: collectivebench.OpAllReduce, SizeBytes: 1000, P50us: 10},
		{Op: collectivebench.OpAllGather, SizeBytes: 1000, P50us: 1}, // not an all-reduce
		{Op: collectivebench.OpAllReduce, SizeBytes: 3000, P50us: 30},
		{Op: collectivebench.OpAllReduce, SizeBytes: 2000, P50us: 14},
		{Op: collectivebench.OpAllReduce, SizeBytes: 2000, P50us: 16}, // a slower repeat: the faster counts
	}}
	m, err := newMeasuredAllReduce("ar.json", rep, 2)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		bytes int64
		want  float64 // µs
	}{
		{1000, 10}, {2000, 14}, {3000, 30},
		{1500, 12}, // halfway between 1000 and 2000
		{2500, 22}, // halfway between 2000 and 3000
		{10, 10},   // below: the smallest's latency
		{6000, 60}, // above: the largest's bandwidth
	} {
		if got := m.Seconds(tc.bytes) * 1e6; math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("%d bytes: %g µs, want %g", tc.bytes, got, tc.want)
		}
	}
	if _, err := newMeasuredAllReduce("ar.json", rep, 4); err == nil || !strings.Contains(err.Error(), "measured 2 ranks") {
		t.Errorf("2-rank report for 4 GPUs: %v", err)
	}
	none := &collectivebench.Report{Ranks: 2, Results: rep.Results[1:2]}
	if _, err := newMeasuredAllReduce("ag.json", none, 2); err == nil || !strings.Contains(err.Error(), "no all-reduce") {
		t.Errorf("report without all-reduces: %v", err)
	}
}

// TestCatalogAllReduce checks the planner's ring model on the catalog's
// H200 and L40S (no NVLink: PCIe).
func TestCatalogAllReduce(t *testing.T) {
	for _, tc := range []struct {
		gpu      string
		n        int
		bytes    int64
		bw, lat  float64
		wantLink string
	}{
		{"H200", 4, 1 << 20, 450e9 * 0.75, 3e-6, "NVLink"},
		{"H200", 8, 40960, 450e9 * 0.75, 3e-6, "NVLink"},
		{"L40S", 2, 1 << 20, 32e9 * 0.6, 10e-6, "PCIe"},
	} {
		spec, err := topology.LookupGPU(tc.gpu)
		if err != nil {
			t.Fatal(err)
		}
		c := newCatalogAllReduce(spec, tc.n)
		n := float64(tc.n)
		want := 2*(n-1)/n*float64(tc.bytes)/tc.bw + (1+math.Log2(n))*tc.lat
		if got := c.Seconds(tc.bytes); math.Abs(got-want) > 1e-12 || !strings.Contains(c.Source(), tc.wantLink) {
			t.Errorf("%s × %d, %d bytes: %g s (%s), want %g over %s", tc.gpu, tc.n, tc.bytes, got, c.Source(), want, tc.wantLink)
		}
	}
	spec, _ := topology.LookupGPU("H200")
	if got := newCatalogAllReduce(spec, 1).Seconds(1 << 20); got != 0 {
		t.Errorf("one GPU: %g s, want 0", got)
	}
}
