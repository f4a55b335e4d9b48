package safetensors

import (
	"encoding/binary"
	"fmt"
	"math"
)

// Tensor is a tensor's description and its raw little-endian bytes. Data
// read from a File or Checkpoint aliases the read-only mapping: never write
// to it, and do not use it after the File or Checkpoint is closed.
type Tensor struct {
	TensorInfo
	Data []byte
}

// check confirms Data holds exactly the bytes the dtype and shape call for.
func (t Tensor) check() error {
	want := t.ByteSize()
	if want < 0 || int64(len(t.Data)) != want {
		return fmt.Errorf("tensor %q (%s): %s%v needs %d bytes, data has %d", t.Name, t.File, t.DType, t.Shape, want, len(t.Data))
	}
	return nil
}

// Float32 decodes any floating-point dtype (F64, F32, F16, BF16, F8_E4M3,
// F8_E5M2) into a new slice. F8 values are returned unscaled.
func (t Tensor) Float32() ([]float32, error) {
	if err := t.check(); err != nil {
		return nil, err
	}
	dst := make([]float32, t.NumElements())
	if err := t.Float32Into(dst); err != nil {
		return nil, err
	}
	return dst, nil
}

// Float32Into decodes the tensor into dst, which must have exactly
// NumElements elements; it lets loaders reuse buffers.
func (t Tensor) Float32Into(dst []float32) error {
	if err := t.check(); err != nil {
		return err
	}
	if int64(len(dst)) != t.NumElements() {
		return fmt.Errorf("tensor %q (%s): destination has %d elements, tensor %d", t.Name, t.File, len(dst), t.NumElements())
	}
	src := t.Data
	switch t.DType {
	case F32:
		F32BytesToF32(dst, src)
	case BF16:
		BF16BytesToF32(dst, src)
	case F16:
		F16BytesToF32(dst, src)
	case F8E4M3:
		E4M3BytesToF32(dst, src)
	case F8E5M2:
		for i, b := range src {
			dst[i] = E5M2ToF32(b)
		}
	case F64:
		for i := range dst {
			dst[i] = float32(math.Float64frombits(binary.LittleEndian.Uint64(src[8*i:])))
		}
	default:
		return fmt.Errorf("tensor %q (%s): dtype %s is not a float type", t.Name, t.File, t.DType)
	}
	return nil
}

// Int64 decodes any integer or BOOL dtype into a new []int64. A U64 value
// beyond the int64 range is an error.
func (t Tensor) Int64() ([]int64, error) {
	if err := t.check(); err != nil {
		return nil, err
	}
	src := t.Data
	dst := make([]int64, t.NumElements())
	le := binary.LittleEndian
	switch t.DType {
	case I64:
		for i := range dst {
			dst[i] = int64(le.Uint64(src[8*i:]))
		}
	case U64:
		for i := range dst {
			v := le.Uint64(src[8*i:])
			if v > math.MaxInt64 {
				return nil, fmt.Errorf("tensor %q (%s): element %d = %d overflows int64", t.Name, t.File, i, v)
			}
			dst[i] = int64(v)
		}
	case I32:
		for i := range dst {
			dst[i] = int64(int32(le.Uint32(src[4*i:])))
		}
	case U32:
		for i := range dst {
			dst[i] = int64(le.Uint32(src[4*i:]))
		}
	case I16:
		for i := range dst {
			dst[i] = int64(int16(le.Uint16(src[2*i:])))
		}
	case U16:
		for i := range dst {
			dst[i] = int64(le.Uint16(src[2*i:]))
		}
	case I8:
		for i, b := range src {
			dst[i] = int64(int8(b))
		}
	case U8, Bool:
		for i, b := range src {
			dst[i] = int64(b)
		}
	default:
		return nil, fmt.Errorf("tensor %q (%s): dtype %s is not an integer type", t.Name, t.File, t.DType)
	}
	return dst, nil
}
