package parallel

import (
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/kernels/cuda/cudatest"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/topology"
)

// TestMemoryPlanOnGPU: two full-size GLM-4.5-Air-FP8 layers (dummy
// weights) on one GPU, eager steps. The engine profiles a 2048-token step
// over 16 sequences and sizes a 2 GiB KV cache by --kv-cache-memory-bytes;
// then steps of every shape up to the workspace (a full prefill, mixed
// prefill and decode, pure decode) allocate nothing from the driver, the
// allocator never passes its limit, and the device's used memory stays
// within the plan. The measured activation peak is logged beside the memory
// model's estimate (topology.ActivationBytes).
func TestMemoryPlanOnGPU(t *testing.T) {
	be := cudatest.Open(t, cuda.Options{FastWideGemm: true})
	cfg, err := model.Resolve("glm-4.5-air-fp8")
	if err != nil {
		t.Fatal(err)
	}
	if cfg, err = cfg.WithOverrides(`{"num_hidden_layers": 2}`); err != nil {
		t.Fatal(err)
	}
	w, free, err := model.DummyWeights(cfg, model.WholeModel(cfg), be, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(free)
	const batched, seqs = 2048, 16
	e, err := NewEngine(be, w, EngineOptions{KVDType: kernels.BF16, EnforceEager: true, MaxNumBatchedTokens: batched, MaxNumSeqs: seqs,
		MaxModelLen: 9216, KVCacheMemoryBytes: 2 << 30})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	p := e.MemoryPlan()
	est := topology.ActivationBytes(cfg, topology.StepShape{Tokens: batched, Seqs: seqs, Head: true, FP8: true})
	t.Logf("plan %+v", p)
	t.Logf("activations: measured %.1f MiB (workspace %.1f MiB, scratch %.1f MiB); memory model %.1f MiB",
		mib(p.Activations), mib(p.Workspace), mib(p.Activations-p.Workspace), mib(est))
	if p.Source != "--kv-cache-memory-bytes" || p.Total == 0 || p.Activations <= p.Workspace {
		t.Fatalf("plan %+v: want a profiled plan with the cache set by --kv-cache-memory-bytes and backend scratch measured", p)
	}
	// Packed weights: the device holds their bytes, not a 2 MiB page each
	// (which was 9 GiB of "runtime" for the whole model).
	if want := weightBytes(cfg); float64(p.Weights) > 1.01*float64(want) {
		t.Errorf("weights take %.2f GiB of device memory for %.2f GiB of tensors", gib(p.Weights), gib(want))
	}
	if p.Runtime > 3<<30 {
		t.Errorf("runtime %.2f GiB: more than a CUDA context, modules and cuBLAS hold", gib(p.Runtime))
	}
	// Every kernel path's step, narrow ones included (an FP8 Linear of 65+
	// tokens expands its weight; MoE of 128 tokens spreads over experts).
	steps := [][]int{{batched}, {1000, 1000, 1, 1, 1}, make([]int, seqs), {7}, {batched - seqs + 1}, {65}, {128}, {255}, {256}, {300}}
	for i := range steps[2] {
		steps[2][i] = 1
	}
	for _, lens := range steps {
		if err := e.runLens(e.KV, lens); err != nil {
			t.Fatalf("step %v: %v", lens, err)
		}
	}
	if n := e.DriverAllocsAfterWarmUp(); n != 0 {
		t.Errorf("%d device allocations on the step path after warm-up, want 0", n)
	}
	st := be.MemoryStats()
	if st.Limit == 0 || st.Live+st.Cached > st.Limit {
		t.Errorf("allocator %+v: holds more than its limit", st)
	}
	freeB, total, err := be.DeviceMemory()
	if err != nil {
		t.Fatal(err)
	}
	if used := total - freeB; used > p.Budget() {
		t.Errorf("device memory used %.2f GiB, over the plan's budget %.2f GiB", gib(used), gib(p.Budget()))
	}
	t.Logf("device used %.2f GiB, planned %.2f GiB, budget %.2f GiB", gib(total-freeB), gib(p.Used()), gib(p.Budget()))
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }
func gib(b int64) float64 { return float64(b) / (1 << 30) }
