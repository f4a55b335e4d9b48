package cpu

import (
	"fmt"
	"math"

	"github.com/glmtopo/glmtopo/kernels"
)

// kvView is one layer's K or V cache on the CPU: float32, or e4m3 bytes
// with a per-tensor scale (kernels.KVCache.KScale/VScale). The CUDA
// backend's KV write and attention kernels are checked against it.
type kvView struct {
	f32   []float32
	fp8   []byte
	scale float32
	n     int // elements
}

func cacheView(t *kernels.Tensor, scale float32, what string) (kvView, error) {
	if t == nil {
		return kvView{}, fmt.Errorf("cpu: %s is nil", what)
	}
	switch v := t.Impl.(type) {
	case []float32:
		return kvView{f32: v, n: len(v)}, nil
	case []byte:
		if t.DType != kernels.F8E4M3 {
			break
		}
		if !(scale > 0) || math.IsInf(float64(scale), 0) {
			return kvView{}, fmt.Errorf("cpu: %s scale %v: want a finite positive number", what, scale)
		}
		return kvView{fp8: v, scale: scale, n: len(v)}, nil
	}
	return kvView{}, fmt.Errorf("cpu: %s is %v, want f32 or f8e4m3", what, t.DType)
}

// kvViews are a cache's K and V views.
func kvViews(c *kernels.KVCache) (k, v kvView, err error) {
	if c == nil || c.K == nil || c.V == nil {
		return k, v, fmt.Errorf("cpu: no KV cache")
	}
	if c.K.DType != c.V.DType {
		return k, v, fmt.Errorf("cpu: K cache %v, V cache %v: want one dtype", c.K.DType, c.V.DType)
	}
	ks, vs := c.Scales()
	if k, err = cacheView(c.K, ks, "k cache"); err != nil {
		return k, v, err
	}
	v, err = cacheView(c.V, vs, "v cache")
	return k, v, err
}

// put stores src at element off: e4m3(x / scale) with round-to-nearest-even
// and saturation (kernels.F32ToE4M3) in an fp8 cache.
func (c kvView) put(off int, src []float32) {
	if c.f32 != nil {
		copy(c.f32[off:off+len(src)], src)
		return
	}
	dst := c.fp8[off : off+len(src)]
	for i, x := range src {
		dst[i] = kernels.F32ToE4M3(x / c.scale)
	}
}

// row returns the n elements at off as float32 (e4m3 · scale in an fp8
// cache, decoded into buf; an f32 cache returns its own memory).
func (c kvView) row(off, n int, buf []float32) []float32 {
	if c.f32 != nil {
		return c.f32[off : off+n]
	}
	buf = buf[:n]
	for i, q := range c.fp8[off : off+n] {
		buf[i] = kernels.E4M3ToF32(q) * c.scale
	}
	return buf
}
