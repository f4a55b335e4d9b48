package kernels

import "fmt"

// Viewer is implemented by backends whose tensors can alias part of another
// tensor's memory. The engine carves each step's activations out of one
// workspace allocated at start (parallel/workspace.go), so that nothing is
// allocated on the step path.
type Viewer interface {
	// View returns a tensor of dt and shape over base's bytes from offset on
	// (offset a multiple of 256; the view must lie inside base). Freeing a
	// view frees nothing; the view is invalid once base is freed.
	View(base *Tensor, offset int64, dt DType, shape ...int) (*Tensor, error)
}

// MemoryStats is a backend allocator's account, in bytes.
type MemoryStats struct {
	Live   int64 // handed out to tensors and scratch
	Cached int64 // freed, kept for reuse
	Peak   int64 // most Live since the last ResetPeakMemory
	// DriverAllocs counts allocations that went to the device driver (not
	// served from the cache) since the backend opened.
	DriverAllocs int64
	// Limit is the most the allocator may hold (Live + Cached); 0: none.
	Limit int64
}

// MemoryManager is implemented by backends with device memory: the engine
// profiles a worst-case step with it and sizes its KV cache from what is
// left (vLLM's --gpu-memory-utilization).
type MemoryManager interface {
	// DeviceMemory is the driver's free and total memory of the device.
	DeviceMemory() (free, total int64, err error)
	MemoryStats() MemoryStats
	// ResetPeakMemory restarts MemoryStats.Peak from the live bytes.
	ResetPeakMemory()
	// SetMemoryLimit caps Live + Cached at limit bytes (0: no cap): past
	// it the allocator gives its cached blocks back, and then fails with an
	// error that says so rather than asking the driver for more.
	SetMemoryLimit(limit int64)
}

// MemoryTrimmer is implemented by caching allocators: TrimMemory gives
// every cached (freed) block back to the driver, so that the device's used
// memory is the allocator's live bytes plus what the runtime holds. The
// engine trims before it measures the runtime.
type MemoryTrimmer interface {
	TrimMemory() error
}

// WeightPacker is implemented by backends whose driver allocates in pages
// larger than a weight's alignment: between PackWeights(true) and
// PackWeights(false) (the model's weights loading) long-lived tensors are
// packed into shared allocations instead of each rounding up to a page.
type WeightPacker interface {
	PackWeights(on bool)
}

// ScratchReserver is implemented by backends whose kernels take scratch
// memory while they run: ReserveScratch(n) sets n bytes aside, allocated
// now, that every op's scratch is carved from afterwards (0 gives them
// back). The engine reserves its profiled scratch peak, so that no step
// asks the driver for memory.
type ScratchReserver interface {
	ReserveScratch(bytes int64) error
}

// StepPaths is implemented by backends whose kernels, and so their
// scratch, change with a step's token count: StepPathTokens lists the
// token counts t where a path ends (it runs for T ≤ t, another from
// t+1), for a model whose MoE layers have experts routed experts (0:
// dense) and topK of them per token. The engine profiles steps of t and
// t+1 tokens for each, since a narrower step's scratch can exceed a wider
// one's.
type StepPaths interface {
	StepPathTokens(experts, topK int) []int
}

// ParseKVCacheDType reads vLLM's --kv-cache-dtype: "auto" (or "") is the
// backend's own cache type def, "bf16", "f32", and "fp8" or "fp8_e4m3"
// (e4m3 with a per-tensor scale: half of bf16's bytes).
func ParseKVCacheDType(name string, def DType) (DType, error) {
	switch name {
	case "", "auto":
		return def, nil
	case "bf16", "bfloat16":
		return BF16, nil
	case "f32", "float32":
		return F32, nil
	case "fp8", "fp8_e4m3":
		return F8E4M3, nil
	}
	return 0, fmt.Errorf("--kv-cache-dtype %q: want auto, bf16, fp8 or fp8_e4m3", name)
}
