package cpu

import (
	"fmt"
	"unsafe"

	"github.com/glmtopo/glmtopo/kernels"
)

var _ kernels.Viewer = (*Backend)(nil)

// View implements kernels.Viewer: the view's slice aliases base's memory
// (any element type over any other: offsets are 256-byte aligned, and every
// element type is at most 4 bytes).
func (b *Backend) View(base *kernels.Tensor, offset int64, dt kernels.DType, shape ...int) (*kernels.Tensor, error) {
	raw, err := bytesOf(base)
	if err != nil {
		return nil, err
	}
	n := 1
	for _, d := range shape {
		if d < 0 {
			return nil, fmt.Errorf("cpu: view: negative dimension in shape %v", shape)
		}
		n *= d
	}
	size := int64(n * dt.Size())
	if dt.Size() == 0 || offset < 0 || offset%256 != 0 || offset+size > int64(len(raw)) {
		return nil, fmt.Errorf("cpu: view %v %v at byte %d of a %d-byte tensor", dt, shape, offset, len(raw))
	}
	t := &kernels.Tensor{DType: dt, Shape: append([]int(nil), shape...)}
	if n == 0 {
		return t, b.emptyImpl(t)
	}
	p := unsafe.Pointer(&raw[offset])
	switch dt {
	case kernels.F32:
		t.Impl = unsafe.Slice((*float32)(p), n)
	case kernels.I32:
		t.Impl = unsafe.Slice((*int32)(p), n)
	case kernels.BF16:
		t.Impl = unsafe.Slice((*uint16)(p), n)
	case kernels.F8E4M3:
		t.Impl = unsafe.Slice((*byte)(p), n)
	default:
		return nil, fmt.Errorf("cpu: view: unsupported dtype %v", dt)
	}
	return t, nil
}

func (b *Backend) emptyImpl(t *kernels.Tensor) error {
	e, err := b.NewTensor(t.DType, 0)
	if err == nil {
		t.Impl = e.Impl
	}
	return err
}

// bytesOf is t's storage as bytes.
func bytesOf(t *kernels.Tensor) ([]byte, error) {
	if t == nil {
		return nil, fmt.Errorf("cpu: view of a nil tensor")
	}
	var p unsafe.Pointer
	var n int
	switch v := t.Impl.(type) {
	case []float32:
		p, n = unsafe.Pointer(unsafe.SliceData(v)), 4*len(v)
	case []int32:
		p, n = unsafe.Pointer(unsafe.SliceData(v)), 4*len(v)
	case []uint16:
		p, n = unsafe.Pointer(unsafe.SliceData(v)), 2*len(v)
	case []byte:
		p, n = unsafe.Pointer(unsafe.SliceData(v)), len(v)
	default:
		return nil, fmt.Errorf("cpu: view of a tensor held as %T", t.Impl)
	}
	if n == 0 {
		return nil, nil
	}
	return unsafe.Slice((*byte)(p), n), nil
}
