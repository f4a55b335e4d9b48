package safetensors

import (
	"fmt"
	"math"
	"slices"
)

// FP8 E4M3 quantization in the two layouts GLM-family checkpoints use.
//
// Per-channel (compressed-tensors, the official GLM-4.5 FP8 checkpoints):
// weight [rows, cols] in F8_E4M3 and weight_scale [rows, 1] in F32 with
// w[r][c] ≈ e4m3(q[r][c]) · scale[r].
//
// Block (DeepSeek-style): weight in F8_E4M3 and weight_scale_inv
// [ceil(rows/B), ceil(cols/B)] in F32 (B = 128) with
// w[r][c] ≈ e4m3(q[r][c]) · scale_inv[r/B][c/B]; partial edge blocks are
// scaled by their own maximum.
//
// A scale is max|w| / 448 over its group, so the largest element maps to
// ±448. An all-zero group gets scale 1 (its codes are all 0, so it
// dequantizes to exact zeros and a reciprocal never divides by zero).
// NaN or Inf weights have no meaningful FP8 encoding; their groups come out
// as NaN or saturated.

// QuantizePerChannelE4M3 quantizes row-major w [rows, cols] with one scale
// per row.
func QuantizePerChannelE4M3(w []float32, rows, cols int) (q []byte, scale []float32, err error) {
	if err := checkDims(len(w), rows, cols); err != nil {
		return nil, nil, fmt.Errorf("quantize per-channel: %w", err)
	}
	q = make([]byte, len(w))
	scale = make([]float32, rows)
	for r := range rows {
		row := w[r*cols : (r+1)*cols]
		s := groupScale(absMax(row))
		scale[r] = s
		out := q[r*cols : (r+1)*cols]
		for c, v := range row {
			out[c] = F32ToE4M3(v / s)
		}
	}
	return q, scale, nil
}

// DequantizePerChannelE4M3 writes e4m3(q[r][c]) · scale[r] into dst.
func DequantizePerChannelE4M3(dst []float32, q []byte, scale []float32, rows, cols int) error {
	if err := checkDims(len(q), rows, cols); err != nil {
		return fmt.Errorf("dequantize per-channel: weight: %w", err)
	}
	if len(dst) != len(q) || len(scale) != rows {
		return fmt.Errorf("dequantize per-channel: [%d, %d] needs %d outputs and %d scales, got %d and %d", rows, cols, len(q), rows, len(dst), len(scale))
	}
	for r := range rows {
		s := scale[r]
		out := dst[r*cols : (r+1)*cols]
		for c, b := range q[r*cols : (r+1)*cols] {
			out[c] = e4m3Table[b] * s
		}
	}
	return nil
}

// BlockScaleShape is the shape of the scale_inv tensor for a [rows, cols]
// weight quantized in block×block tiles.
func BlockScaleShape(rows, cols, block int) (int, int) {
	return (rows + block - 1) / block, (cols + block - 1) / block
}

// QuantizeBlockE4M3 quantizes row-major w [rows, cols] in block×block tiles
// (128 in DeepSeek-style checkpoints); scaleInv is row-major
// [ceil(rows/block), ceil(cols/block)].
func QuantizeBlockE4M3(w []float32, rows, cols, block int) (q []byte, scaleInv []float32, err error) {
	if err := checkDims(len(w), rows, cols); err != nil {
		return nil, nil, fmt.Errorf("quantize block: %w", err)
	}
	if block <= 0 {
		return nil, nil, fmt.Errorf("quantize block: block size %d", block)
	}
	br, bc := BlockScaleShape(rows, cols, block)
	q = make([]byte, len(w))
	scaleInv = make([]float32, br*bc)
	for i := range br {
		r0, r1 := i*block, min((i+1)*block, rows)
		for j := range bc {
			c0, c1 := j*block, min((j+1)*block, cols)
			var m float32
			for r := r0; r < r1; r++ {
				m = max(m, absMax(w[r*cols+c0:r*cols+c1]))
			}
			s := groupScale(m)
			scaleInv[i*bc+j] = s
			for r := r0; r < r1; r++ {
				for c := c0; c < c1; c++ {
					q[r*cols+c] = F32ToE4M3(w[r*cols+c] / s)
				}
			}
		}
	}
	return q, scaleInv, nil
}

// DequantizeBlockE4M3 writes e4m3(q[r][c]) · scaleInv[r/block][c/block] into dst.
func DequantizeBlockE4M3(dst []float32, q []byte, scaleInv []float32, rows, cols, block int) error {
	if err := checkDims(len(q), rows, cols); err != nil {
		return fmt.Errorf("dequantize block: weight: %w", err)
	}
	if block <= 0 {
		return fmt.Errorf("dequantize block: block size %d", block)
	}
	br, bc := BlockScaleShape(rows, cols, block)
	if len(dst) != len(q) || len(scaleInv) != br*bc {
		return fmt.Errorf("dequantize block: [%d, %d] in %d-blocks needs %d outputs and [%d, %d] scales, got %d and %d", rows, cols, block, len(q), br, bc, len(dst), len(scaleInv))
	}
	for r := range rows {
		srow := scaleInv[(r/block)*bc : (r/block+1)*bc]
		out := dst[r*cols : (r+1)*cols]
		for c, b := range q[r*cols : (r+1)*cols] {
			out[c] = e4m3Table[b] * srow[c/block]
		}
	}
	return nil
}

func checkDims(n, rows, cols int) error {
	if rows < 0 || cols < 0 || (cols != 0 && rows > math.MaxInt/cols) || n != rows*cols {
		return fmt.Errorf("%d elements do not make a [%d, %d] matrix", n, rows, cols)
	}
	return nil
}

func absMax(v []float32) float32 {
	var m float32
	for _, x := range v {
		m = max(m, float32(math.Abs(float64(x))))
	}
	return m
}

// groupScale is the scale mapping a group's largest magnitude m to 448.
func groupScale(m float32) float32 {
	if m == 0 {
		return 1
	}
	return m / E4M3Max
}

// DequantizeE4M3Tensor decodes a 2-D F8_E4M3 weight [rows, cols] with its
// scale tensor, whose shape says the layout: [] or [1] per-tensor, [rows, 1]
// per-channel (compressed-tensors weight_scale), or [ceil(rows/block),
// ceil(cols/block)] block-wise (weight_scale_inv). The scale may be any
// float dtype. block matters only for the block layout (128 for
// DeepSeek-style checkpoints; read it from quantization_config).
func DequantizeE4M3Tensor(weight, scale Tensor, block int) ([]float32, error) {
	if weight.DType != F8E4M3 || len(weight.Shape) != 2 {
		return nil, fmt.Errorf("dequantize %q (%s): want a 2-D F8_E4M3 weight, have %s%v", weight.Name, weight.File, weight.DType, weight.Shape)
	}
	if err := weight.check(); err != nil {
		return nil, err
	}
	s, err := scale.Float32()
	if err != nil {
		return nil, fmt.Errorf("dequantize %q: scale: %w", weight.Name, err)
	}
	rows, cols := int(weight.Shape[0]), int(weight.Shape[1])
	dst := make([]float32, rows*cols)
	ss := scale.Shape
	switch {
	case len(s) == 1 && len(ss) <= 1:
		E4M3BytesToF32(dst, weight.Data)
		for i := range dst {
			dst[i] *= s[0]
		}
	case len(ss) == 2 && ss[0] == int64(rows) && ss[1] == 1:
		err = DequantizePerChannelE4M3(dst, weight.Data, s, rows, cols)
	case len(ss) == 2 && block > 0 && slices.Equal(ss, blockShape64(rows, cols, block)):
		err = DequantizeBlockE4M3(dst, weight.Data, s, rows, cols, block)
	default:
		return nil, fmt.Errorf("dequantize %q (%s): scale %q %v fits neither per-tensor, per-channel [%d 1] nor %d-block %v layout", weight.Name, weight.File, scale.Name, ss, rows, block, blockShape64(rows, cols, max(block, 1)))
	}
	if err != nil {
		return nil, fmt.Errorf("dequantize %q: %w", weight.Name, err)
	}
	return dst, nil
}

func blockShape64(rows, cols, block int) []int64 {
	br, bc := BlockScaleShape(rows, cols, block)
	return []int64{int64(br), int64(bc)}
}
