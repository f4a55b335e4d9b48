package cuda

import (
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

var (
	_ kernels.Viewer          = (*Backend)(nil)
	_ kernels.MemoryManager   = (*Backend)(nil)
	_ kernels.MemoryTrimmer   = (*Backend)(nil)
	_ kernels.WeightPacker    = (*Backend)(nil)
	_ kernels.StepPaths       = (*Backend)(nil)
	_ kernels.ScratchReserver = (*Backend)(nil)
)

// View implements kernels.Viewer: the view's buffer points into base's and
// is never returned to the pool.
func (b *Backend) View(base *kernels.Tensor, offset int64, dt kernels.DType, shape ...int) (*kernels.Tensor, error) {
	bf, err := devBuf(base, "view base")
	if err != nil {
		return nil, err
	}
	n := 1
	for _, d := range shape {
		if d < 0 {
			return nil, fmt.Errorf("cuda: view: negative dimension in shape %v", shape)
		}
		n *= d
	}
	size := int64(n * dt.Size())
	have := int64(base.Elements() * base.DType.Size())
	if dt.Size() == 0 || offset < 0 || offset%256 != 0 || offset+size > have {
		return nil, fmt.Errorf("cuda: view %v %v at byte %d of a %d-byte tensor", dt, shape, offset, have)
	}
	v := &buf{ptr: bf.ptr + uintptr(offset), size: uintptr(size), view: true}
	return &kernels.Tensor{DType: dt, Shape: append([]int(nil), shape...), Impl: v}, nil
}

// DeviceMemory implements kernels.MemoryManager (cuMemGetInfo).
func (b *Backend) DeviceMemory() (free, total int64, err error) {
	if err := b.enter(); err != nil {
		return 0, 0, err
	}
	defer b.leave()
	var f, t uintptr
	if err := b.d.check(b.d.cuMemGetInfo(&f, &t), "cuMemGetInfo"); err != nil {
		return 0, 0, err
	}
	return int64(f), int64(t), nil
}

// MemoryStats implements kernels.MemoryManager: the caching pool's account.
// Graph scratch counts as cached.
func (b *Backend) MemoryStats() kernels.MemoryStats {
	p := b.pool
	return kernels.MemoryStats{Live: p.live, Cached: p.cached + p.graphHeld, Peak: p.peak,
		DriverAllocs: p.driverAllocs, Limit: p.limit}
}

// ResetPeakMemory implements kernels.MemoryManager.
func (b *Backend) ResetPeakMemory() { b.pool.peak = b.pool.live }

// SetMemoryLimit implements kernels.MemoryManager.
func (b *Backend) SetMemoryLimit(limit int64) { b.pool.limit = max(limit, 0) }

// TrimMemory implements kernels.MemoryTrimmer: the cached blocks go back to
// the driver (cuMemFree waits for the stream). The decode graphs' scratch
// stays with them.
func (b *Backend) TrimMemory() error {
	if err := b.enter(); err != nil {
		return err
	}
	defer b.leave()
	return b.pool.trim()
}

// PackWeights implements kernels.WeightPacker (slab.go).
func (b *Backend) PackWeights(on bool) {
	if b.enter() != nil {
		return
	}
	defer b.leave()
	b.pool.packing = on
}

// StepPathTokens implements kernels.StepPaths: the widest batch of the
// streamed and tensor-core GEMVs (and the fused shared expert), of the
// weight-only GEMVs, of the narrow e4m3 kernels before the wide GEMV, of
// the streamed e4m3 Linear and the wide GEMV, of the split argmax, and of
// the MoE kernels before the grouped cuBLAS path (experts averaging 16
// tokens).
func (b *Backend) StepPathTokens(experts, topK int) []int {
	out := []int{mmaMaxTokens, b.opt.GemvMaxTokens, b.opt.WideGemvMinTokens - 1, sgFP8MaxTokens, wgMaxTokens, argmaxMaxRows}
	if experts > 0 && topK > 0 {
		out = append(out, (16*experts+topK-1)/topK-1)
	}
	return out
}

// ReserveScratch implements kernels.ScratchReserver (arena.go).
func (b *Backend) ReserveScratch(n int64) error {
	if err := b.enter(); err != nil {
		return err
	}
	defer b.leave()
	return b.pool.reserveScratch(uintptr(max(n, 0)))
}
