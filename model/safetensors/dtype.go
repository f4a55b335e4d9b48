package safetensors

import (
	"fmt"
	"math"
)

// DType is a safetensors element type, spelled as in the file header.
type DType string

// The element types this package reads and writes.
const (
	F64     DType = "F64"
	F32     DType = "F32"
	F16     DType = "F16"
	BF16    DType = "BF16"
	F8E4M3  DType = "F8_E4M3" // OCP FP8 E4M3 "fn": no infinities, max 448
	F8E5M2  DType = "F8_E5M2"
	I64     DType = "I64"
	I32     DType = "I32"
	I16     DType = "I16"
	I8      DType = "I8"
	U64     DType = "U64"
	U32     DType = "U32"
	U16     DType = "U16"
	U8      DType = "U8"
	Bool    DType = "BOOL"
	invalid DType = ""
)

var dtypeSizes = map[DType]int{
	F64: 8, F32: 4, F16: 2, BF16: 2, F8E4M3: 1, F8E5M2: 1,
	I64: 8, I32: 4, I16: 2, I8: 1, U64: 8, U32: 4, U16: 2, U8: 1, Bool: 1,
}

// Size is the number of bytes of one element, or 0 for an unknown dtype.
func (d DType) Size() int { return dtypeSizes[d] }

// Valid reports whether d is a dtype this package knows.
func (d DType) Valid() bool { return d.Size() > 0 }

// IsFloat reports whether Tensor.Float32 can decode d.
func (d DType) IsFloat() bool {
	switch d {
	case F64, F32, F16, BF16, F8E4M3, F8E5M2:
		return true
	}
	return false
}

// TensorInfo describes one tensor: its name, element type, shape and the
// file (base name for shards of a Checkpoint, path for a File) holding it.
type TensorInfo struct {
	Name  string
	DType DType
	Shape []int64
	File  string
}

// NumElements is the product of the shape (1 for a scalar), or -1 when a
// dimension is negative or the product overflows int64.
func (ti TensorInfo) NumElements() int64 { return numElements(ti.Shape) }

// ByteSize is NumElements times the dtype size, or -1 when that is not
// representable or the dtype is unknown.
func (ti TensorInfo) ByteSize() int64 {
	n := ti.NumElements()
	sz := int64(ti.DType.Size())
	if n < 0 || sz == 0 || n > math.MaxInt64/sz {
		return -1
	}
	return n * sz
}

// String formats the tensor as name dtype[d0,d1,...].
func (ti TensorInfo) String() string {
	return fmt.Sprintf("%s %s%v", ti.Name, ti.DType, ti.Shape)
}

func numElements(shape []int64) int64 {
	n := int64(1)
	for _, d := range shape {
		if d < 0 {
			return -1
		}
		if d != 0 && n > math.MaxInt64/d {
			return -1
		}
		n *= d
	}
	return n
}
