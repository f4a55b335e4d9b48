// Package cpu is the pure-Go float32 reference backend. It is what the CUDA
// kernels are checked against and the engine behind CPU-only demos, so its
// matmul is blocked and uses every core.
package cpu

import (
	"encoding/binary"
	"fmt"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/glmtopo/glmtopo/kernels"
)

// Backend runs kernels on the host with Workers goroutines.
type Backend struct {
	workers int
}

// New returns a CPU backend using workers goroutines (0 = GOMAXPROCS).
func New(workers int) *Backend {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	return &Backend{workers: workers}
}

var _ kernels.Backend = (*Backend)(nil)

func (b *Backend) Name() string { return fmt.Sprintf("cpu(%d workers)", b.workers) }
func (b *Backend) Close() error { return nil }

func (b *Backend) NewTensor(dt kernels.DType, shape ...int) (*kernels.Tensor, error) {
	n := 1
	for _, d := range shape {
		if d < 0 {
			return nil, fmt.Errorf("cpu: negative dimension in shape %v", shape)
		}
		n *= d
	}
	t := &kernels.Tensor{DType: dt, Shape: append([]int(nil), shape...)}
	switch dt {
	case kernels.F32:
		t.Impl = make([]float32, n)
	case kernels.I32:
		t.Impl = make([]int32, n)
	case kernels.BF16:
		t.Impl = make([]uint16, n)
	case kernels.F8E4M3:
		t.Impl = make([]byte, n)
	default:
		return nil, fmt.Errorf("cpu: unsupported dtype %v", dt)
	}
	return t, nil
}

func (b *Backend) Upload(t *kernels.Tensor, data []byte) error {
	n := t.Elements()
	if len(data) != n*t.DType.Size() {
		return fmt.Errorf("cpu: upload %d bytes into %v tensor %v (%d bytes)", len(data), t.DType, t.Shape, n*t.DType.Size())
	}
	switch v := t.Impl.(type) {
	case []float32:
		for i := range v {
			v[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
		}
	case []int32:
		for i := range v {
			v[i] = int32(binary.LittleEndian.Uint32(data[4*i:]))
		}
	case []uint16:
		for i := range v {
			v[i] = binary.LittleEndian.Uint16(data[2*i:])
		}
	case []byte:
		copy(v, data)
	default:
		return fmt.Errorf("cpu: upload into foreign tensor")
	}
	return nil
}

// UploadWeight aliases data for 2-D BF16/F8 weights (zero copy from a mapped
// checkpoint when aligned) and converts 1-D vectors (norms, biases) to F32.
func (b *Backend) UploadWeight(dt kernels.DType, shape []int, data []byte) (*kernels.Tensor, error) {
	n := 1
	for _, d := range shape {
		n *= d
	}
	if len(data) != n*dt.Size() {
		return nil, fmt.Errorf("cpu: weight %v %v needs %d bytes, got %d", dt, shape, n*dt.Size(), len(data))
	}
	t := &kernels.Tensor{DType: dt, Shape: append([]int(nil), shape...)}
	switch dt {
	case kernels.F32:
		t.Impl = aliasF32(data)
	case kernels.BF16:
		if len(shape) == 1 {
			f := make([]float32, n)
			for i := range f {
				f[i] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(data[2*i:])) << 16)
			}
			t.DType, t.Impl = kernels.F32, f
		} else {
			t.Impl = aliasU16(data)
		}
	case kernels.F8E4M3:
		t.Impl = data
	default:
		return nil, fmt.Errorf("cpu: unsupported weight dtype %v", dt)
	}
	return t, nil
}

// aliasF32 reinterprets little-endian bytes as []float32 without copying when aligned.
func aliasF32(data []byte) []float32 {
	if len(data) == 0 {
		return nil
	}
	if uintptr(unsafe.Pointer(&data[0]))%4 == 0 {
		return unsafe.Slice((*float32)(unsafe.Pointer(&data[0])), len(data)/4)
	}
	f := make([]float32, len(data)/4)
	for i := range f {
		f[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
	}
	return f
}

func aliasU16(data []byte) []uint16 {
	if len(data) == 0 {
		return nil
	}
	if uintptr(unsafe.Pointer(&data[0]))%2 == 0 {
		return unsafe.Slice((*uint16)(unsafe.Pointer(&data[0])), len(data)/2)
	}
	u := make([]uint16, len(data)/2)
	for i := range u {
		u[i] = binary.LittleEndian.Uint16(data[2*i:])
	}
	return u
}

func (b *Backend) Download(t *kernels.Tensor) ([]float32, error) {
	v, ok := t.Impl.([]float32)
	if !ok {
		return nil, fmt.Errorf("cpu: download of %v tensor: want f32", t.DType)
	}
	return append([]float32(nil), v...), nil
}

func (b *Backend) DownloadI32(t *kernels.Tensor) ([]int32, error) {
	v, ok := t.Impl.([]int32)
	if !ok {
		return nil, fmt.Errorf("cpu: download of %v tensor: want i32", t.DType)
	}
	return append([]int32(nil), v...), nil
}

func (b *Backend) Free(t *kernels.Tensor) { t.Impl = nil }

type batchMeta struct{ b *kernels.Batch }

func (m batchMeta) Tokens() int { return m.b.Tokens() }

func (b *Backend) UploadBatch(batch *kernels.Batch) (kernels.BatchMeta, error) {
	return batchMeta{batch}, nil
}

// f32 returns the float32 storage of an activation tensor.
func f32(t *kernels.Tensor, what string) ([]float32, error) {
	if t == nil {
		return nil, fmt.Errorf("cpu: %s is nil", what)
	}
	v, ok := t.Impl.([]float32)
	if !ok {
		return nil, fmt.Errorf("cpu: %s is %v, want f32", what, t.DType)
	}
	return v, nil
}

func i32(t *kernels.Tensor, what string) ([]int32, error) {
	if t == nil {
		return nil, fmt.Errorf("cpu: %s is nil", what)
	}
	v, ok := t.Impl.([]int32)
	if !ok {
		return nil, fmt.Errorf("cpu: %s is %v, want i32", what, t.DType)
	}
	return v, nil
}

// parallelFor runs fn over [0,n) in chunks of grain, dynamically scheduled on the workers.
func (b *Backend) parallelFor(n, grain int, fn func(lo, hi int)) {
	if grain < 1 {
		grain = 1
	}
	chunks := (n + grain - 1) / grain
	w := min(b.workers, chunks)
	if w <= 1 {
		if n > 0 {
			fn(0, n)
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	wg.Add(w)
	for range w {
		go func() {
			defer wg.Done()
			for {
				c := int(next.Add(1) - 1)
				if c >= chunks {
					return
				}
				lo := c * grain
				fn(lo, min(lo+grain, n))
			}
		}()
	}
	wg.Wait()
}
