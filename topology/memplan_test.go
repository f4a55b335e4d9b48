package topology

import (
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/model"
)

// The sizing arithmetic the engine and the planner share.
func TestMemoryPlanSize(t *testing.T) {
	const gib = 1 << 30
	base := MemoryPlan{Total: 100 * gib, Utilization: 0.9, Weights: 60 * gib, Activations: 3 * gib, Graphs: gib / 2,
		Runtime: gib, Reserve: gib / 2, BlockSize: 16, KVBlockBytes: 16 * 100 << 10, MaxModelLen: 8192}
	block := base.KVBlockBytes
	left := int64(90*gib) - (60*gib + 3*gib + gib/2 + gib + gib/2)
	cases := []struct {
		name       string
		edit       func(*MemoryPlan)
		kvBytes    int64
		blocks     int
		wantBlocks int
		wantSource string
		wantErr    string
	}{
		{name: "budget left in whole blocks", wantBlocks: int(left / block), wantSource: "estimated"},
		{name: "profiled keeps its source", edit: func(m *MemoryPlan) { m.Source = "profiled" }, wantBlocks: int(left / block), wantSource: "profiled"},
		{name: "utilization 1", edit: func(m *MemoryPlan) { m.Utilization = 1 }, wantBlocks: int((left + 10*gib) / block), wantSource: "estimated"},
		{name: "kv-cache-memory-bytes", kvBytes: 1000*block + block/2, wantBlocks: 1000, wantSource: "--kv-cache-memory-bytes"},
		{name: "num-gpu-blocks-override", blocks: 700, wantBlocks: 700, wantSource: "--num-gpu-blocks-override"},
		{name: "caller's override name", edit: func(m *MemoryPlan) { m.Source = "--kv-cache-tokens" }, blocks: 600, wantBlocks: 600, wantSource: "--kv-cache-tokens"},
		{name: "weights leave nothing", edit: func(m *MemoryPlan) { m.Weights = 89 * gib }, wantErr: "no room for the KV cache"},
		{name: "less than one request", edit: func(m *MemoryPlan) { m.Weights = 84*gib + 900<<20 }, wantErr: "one --max-model-len 8192 request needs"},
		{name: "override past the GPU", blocks: int(50 * gib / block), wantErr: "lower --num-gpu-blocks-override"},
		{name: "bytes override below a request", kvBytes: block, wantErr: "fewer than one --max-model-len 8192 request"},
		{name: "bad utilization", edit: func(m *MemoryPlan) { m.Utilization = 1.5 }, wantErr: "--gpu-memory-utilization 1.5"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := base
			if c.edit != nil {
				c.edit(&m)
			}
			err := m.Size(c.kvBytes, c.blocks)
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("err = %v, want %q", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if m.KVBlocks != c.wantBlocks || m.Source != c.wantSource || m.KVBytes != int64(c.wantBlocks)*block {
				t.Errorf("%d blocks (%d bytes) by %q, want %d by %q", m.KVBlocks, m.KVBytes, m.Source, c.wantBlocks, c.wantSource)
			}
			if m.Used() > m.Total {
				t.Errorf("planned %d bytes on a %d-byte GPU", m.Used(), m.Total)
			}
			if c.kvBytes == 0 && c.blocks == 0 && m.Budget()-m.Used() >= block {
				t.Errorf("a whole block (%d) of the budget is left over: %d", block, m.Budget()-m.Used())
			}
		})
	}
}

// The planner's per-GPU memory of a one-GPU plan is MemoryPlan's split
// of the same inputs: the KV pool is what the engine's sizing leaves.
func TestPlannerUsesMemoryPlan(t *testing.T) {
	for _, c := range []struct {
		model          string
		seqs, len, bat int
	}{{"glm-4.5-air-fp8", 16, 9216, 2048}, {"glm-4.5-air-fp8", 8, 4096, 8192}, {"glm-4.5-fp8", 4, 8192, 1024}} {
		cfg, err := model.Resolve(c.model)
		if err != nil {
			t.Fatal(err)
		}
		if c.model == "glm-4.5-fp8" {
			if cfg, err = cfg.WithOverrides(`{"num_hidden_layers": 30}`); err != nil {
				t.Fatal(err)
			}
		}
		inv, err := ParseHosts("1x1xH200")
		if err != nil {
			t.Fatal(err)
		}
		res, err := Plan(PlanRequest{Model: cfg, Inventory: inv, MaxModelLen: c.len, MaxNumSeqs: c.seqs, MaxNumBatchedTokens: c.bat,
			KVCacheDType: "fp8", GPUMemoryUtil: 0.9})
		if err != nil {
			t.Fatal(err)
		}
		g := res.Memory[0]
		want := MemoryPlan{Total: g.Total, Utilization: 0.9, Weights: g.WeightsTotal,
			Activations: ActivationBytes(cfg, StepShape{Tokens: c.bat, Seqs: c.seqs * 2, Head: true, FP8: true}),
			Graphs:      GraphBytes(cfg, c.seqs, c.len, 16, true), Runtime: 2 << 30}
		if g.Activations != want.Activations || g.Graphs != want.Graphs || g.KVCache != want.Budget()-want.NonKV() {
			t.Errorf("%+v: planner memory %+v, memory model %+v", c, g, want)
		}
	}
}

// GraphBytes counts one arena per sequence bucket and one graph per
// (sequence, context) bucket.
func TestGraphBytesBuckets(t *testing.T) {
	cfg, err := model.Resolve("glm-4.5-air")
	if err != nil {
		t.Fatal(err)
	}
	if got := SeqBuckets(16); len(got) != 5 || got[4] != 16 {
		t.Fatalf("SeqBuckets(16) = %v", got)
	}
	if got := CtxBuckets(256, 9216); len(got) != 7 || got[6] != 9216 {
		t.Fatalf("CtxBuckets(256, 9216) = %v", got)
	}
	one := GraphBytes(cfg, 1, 256, 16, true)
	perRow := WorkspaceBytes(cfg, StepShape{Tokens: 1, Seqs: 1, Head: true})
	if want := perRow + 2<<20 + (3+16)*4; one != want {
		t.Errorf("one sequence, one context bucket: %d bytes, want %d", one, want)
	}
	if a, b := GraphBytes(cfg, 16, 9216, 16, true), GraphBytes(cfg, 32, 9216, 16, true); !(a < b && a > 31*perRow) {
		t.Errorf("GraphBytes 16 seqs %d, 32 seqs %d (per row %d)", a, b, perRow)
	}
}

// --kv-cache-dtype fp8_e4m3 is vLLM's other name of fp8: half the bf16 bytes.
func TestPlanKVCacheDTypeNames(t *testing.T) {
	cfg, err := model.Resolve("glm-4.5-air-fp8")
	if err != nil {
		t.Fatal(err)
	}
	inv, err := ParseHosts("1x1xH200")
	if err != nil {
		t.Fatal(err)
	}
	need := map[string]int64{}
	for _, dt := range []string{"auto", "fp8", "fp8_e4m3"} {
		res, err := Plan(PlanRequest{Model: cfg, Inventory: inv, MaxModelLen: 4096, MaxNumSeqs: 4, KVCacheDType: dt})
		if err != nil {
			t.Fatal(err)
		}
		need[dt] = res.Memory[0].KVRequired
	}
	if need["fp8"] != need["fp8_e4m3"] || 2*need["fp8"] != need["auto"] {
		t.Errorf("KV needed by dtype %v: want fp8 = fp8_e4m3 = auto/2", need)
	}
}
