package cpu

import (
	"fmt"
	"math"
	"math/rand/v2"

	"github.com/glmtopo/glmtopo/kernels"
)

var _ kernels.Filler = (*Backend)(nil)

// Fill sets t to values that depend on seed alone (see kernels.Filler).
// The values are not the CUDA backend's: only their distribution matches.
func (b *Backend) Fill(t *kernels.Tensor, seed uint64, scale float32) error {
	rng := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	uniform := func() float32 { return (2*rng.Float32() - 1) * scale }
	switch v := t.Impl.(type) {
	case []float32:
		for i := range v {
			v[i] = uniform()
		}
	case []uint16: // bf16, rounded to nearest even
		for i := range v {
			u := math.Float32bits(uniform())
			v[i] = uint16((u + 0x7fff + (u>>16)&1) >> 16)
		}
	case []byte:
		if t.DType != kernels.F8E4M3 {
			return fmt.Errorf("cpu: fill of %v tensor", t.DType)
		}
		for i := range v {
			q := byte(rng.Uint32())
			if q&0x7f >= 0x70 { // keep |v| ≤ 120 (as the CUDA backend does), never NaN
				q &= 0xe7
			}
			v[i] = q
		}
	default:
		return fmt.Errorf("cpu: fill of %v tensor (%T)", t.DType, t.Impl)
	}
	return nil
}

// FillConst sets every element of an F32 tensor to v.
func (b *Backend) FillConst(t *kernels.Tensor, v float32) error {
	d, ok := t.Impl.([]float32)
	if !ok {
		return fmt.Errorf("cpu: fill const of %v tensor", t.DType)
	}
	for i := range d {
		d[i] = v
	}
	return nil
}
