package safetensors

import (
	"math"
	"math/rand/v2"
	"testing"
)

// Error bound for e4m3 quantize → dequantize, per element, with s the
// element's scale: w/s is at most 448 in magnitude, so it never saturates
// (beyond float32 rounding of the division). In the normal range (|w/s| ≥
// 2^-6) the code spacing in a binade [2^e, 2^e+1) is 2^(e-3), so rounding to
// nearest errs by at most 2^(e-4) ≤ 2^-4·|w/s|; in the subnormal range the
// spacing is 2^-9, so the error is at most 2^-10. Scaling back by s gives
// |deq - w| ≤ 2^-4·|w| + 2^-10·s, plus float32 rounding of the division and
// the product (a few 2^-24·|w|), covered by the 2^-20 slack.
func quantBound(w, s float32) float64 {
	return math.Abs(float64(w))*(1.0/16+1.0/(1<<20)) + float64(s)/1024
}

// testMatrix makes a [rows, cols] matrix whose rows span very different
// magnitudes, with zeroRow all zeros.
func testMatrix(rows, cols, zeroRow int) []float32 {
	rng := rand.New(rand.NewPCG(7, 11))
	w := make([]float32, rows*cols)
	for r := range rows {
		mag := math.Exp2(float64(r%17) - 10)
		for c := range cols {
			if r != zeroRow {
				w[r*cols+c] = float32(rng.NormFloat64() * mag)
			}
		}
	}
	return w
}

func TestQuantizePerChannelE4M3(t *testing.T) {
	const rows, cols, zeroRow = 37, 300, 5
	w := testMatrix(rows, cols, zeroRow)
	q, scale, err := QuantizePerChannelE4M3(w, rows, cols)
	if err != nil {
		t.Fatal(err)
	}
	if len(q) != rows*cols || len(scale) != rows {
		t.Fatalf("%d codes and %d scales", len(q), len(scale))
	}
	for r := range rows {
		if want := absMax(w[r*cols:(r+1)*cols]) / 448; r != zeroRow && scale[r] != want {
			t.Errorf("scale[%d] = %v, want max|w|/448 = %v", r, scale[r], want)
		}
	}
	if scale[zeroRow] <= 0 || math.IsInf(float64(scale[zeroRow]), 0) {
		t.Errorf("zero row scale %v, want positive finite", scale[zeroRow])
	}
	deq := make([]float32, rows*cols)
	if err := DequantizePerChannelE4M3(deq, q, scale, rows, cols); err != nil {
		t.Fatal(err)
	}
	checkQuantError(t, w, deq, func(i int) float32 { return scale[i/cols] })
	for c := range cols {
		if v := deq[zeroRow*cols+c]; v != 0 {
			t.Fatalf("zero row dequantized to %v", v)
		}
	}
	if err := DequantizePerChannelE4M3(deq, q, scale[:rows-1], rows, cols); err == nil {
		t.Error("Dequantize accepted too few scales")
	}
	if _, _, err := QuantizePerChannelE4M3(w, rows, cols+1); err == nil {
		t.Error("Quantize accepted a wrong shape")
	}
}

func TestQuantizeBlockE4M3(t *testing.T) {
	const rows, cols, block = 200, 300, 128 // neither a multiple of 128
	w := testMatrix(rows, cols, 3)
	for r := 128; r < 200; r++ { // block (1, 2) all zeros
		for c := 256; c < 300; c++ {
			w[r*cols+c] = 0
		}
	}
	q, scaleInv, err := QuantizeBlockE4M3(w, rows, cols, block)
	if err != nil {
		t.Fatal(err)
	}
	if br, bc := BlockScaleShape(rows, cols, block); br != 2 || bc != 3 || len(scaleInv) != 6 {
		t.Fatalf("scale shape [%d, %d] with %d values, want [2, 3]", br, bc, len(scaleInv))
	}
	// Each block's scale is its own max / 448, edge blocks included.
	for i := range 2 {
		for j := range 3 {
			var m float32
			for r := i * block; r < min((i+1)*block, rows); r++ {
				m = max(m, absMax(w[r*cols+j*block:r*cols+min((j+1)*block, cols)]))
			}
			want := m / 448
			if m == 0 {
				want = 1
			}
			if scaleInv[i*3+j] != want {
				t.Errorf("scale_inv[%d][%d] = %v, want %v", i, j, scaleInv[i*3+j], want)
			}
		}
	}
	deq := make([]float32, rows*cols)
	if err := DequantizeBlockE4M3(deq, q, scaleInv, rows, cols, block); err != nil {
		t.Fatal(err)
	}
	checkQuantError(t, w, deq, func(i int) float32 { return scaleInv[(i/cols/block)*3+(i%cols)/block] })
	if err := DequantizeBlockE4M3(deq, q, scaleInv[:5], rows, cols, block); err == nil {
		t.Error("Dequantize accepted too few scales")
	}
	if _, _, err := QuantizeBlockE4M3(w, rows, cols, 0); err == nil {
		t.Error("Quantize accepted block 0")
	}
}

// checkQuantError asserts every element is within quantBound and that the
// bound is nearly reached somewhere (so truncation or a sloppy bound would show).
func checkQuantError(t *testing.T, w, deq []float32, scaleOf func(int) float32) {
	t.Helper()
	worst := 0.0
	for i := range w {
		s := scaleOf(i)
		err := math.Abs(float64(deq[i]) - float64(w[i]))
		if math.IsNaN(float64(deq[i])) || err > quantBound(w[i], s) {
			t.Fatalf("element %d: %v dequantized to %v, error %g over bound %g", i, w[i], deq[i], err, quantBound(w[i], s))
		}
		worst = max(worst, err/quantBound(w[i], s))
	}
	if worst < 0.8 {
		t.Errorf("worst error only %.2f of the bound: the bound is loose or the test data too easy", worst)
	}
}

func TestQuantizeExactValues(t *testing.T) {
	// Values that are e4m3 codes times a power-of-two scale survive exactly.
	w := []float32{448, -1, 0.5, 2.0 / 512, 0, 96, -448, 3}
	q, scale, err := QuantizePerChannelE4M3(w, 2, 4)
	if err != nil {
		t.Fatal(err)
	}
	if scale[0] != 1 || scale[1] != 1 {
		t.Fatalf("scales %v, want [1 1]", scale)
	}
	deq := make([]float32, len(w))
	DequantizePerChannelE4M3(deq, q, scale, 2, 4)
	for i := range w {
		if deq[i] != w[i] {
			t.Errorf("[%d] %v -> %v", i, w[i], deq[i])
		}
	}
}

func TestDequantizeE4M3Tensor(t *testing.T) {
	const rows, cols = 130, 260
	w := testMatrix(rows, cols, -1)
	qc, sc, _ := QuantizePerChannelE4M3(w, rows, cols)
	qb, sb, _ := QuantizeBlockE4M3(w, rows, cols, 128)
	f32 := func(name string, v []float32, shape ...int64) Tensor {
		b := make([]byte, 4*len(v))
		F32ToBytes(b, v)
		return Tensor{TensorInfo{Name: name, DType: F32, Shape: shape}, b}
	}
	bf16 := func(name string, v []float32, shape ...int64) Tensor {
		b := make([]byte, 2*len(v))
		F32ToBF16Bytes(b, v)
		return Tensor{TensorInfo{Name: name, DType: BF16, Shape: shape}, b}
	}
	fp8 := func(q []byte) Tensor {
		return Tensor{TensorInfo{Name: "w", DType: F8E4M3, Shape: []int64{rows, cols}}, q}
	}
	perTensor := make([]byte, rows*cols)
	F32ToE4M3Bytes(perTensor, w)
	tests := []struct {
		name   string
		weight Tensor
		scale  Tensor
		want   func(r, c int) float32
	}{
		{"per-channel", fp8(qc), f32("s", sc, rows, 1), func(r, c int) float32 { return E4M3ToF32(qc[r*cols+c]) * sc[r] }},
		{"block", fp8(qb), f32("s", sb, 2, 3), func(r, c int) float32 { return E4M3ToF32(qb[r*cols+c]) * sb[(r/128)*3+c/128] }},
		{"per-tensor scalar bf16", fp8(perTensor), bf16("s", []float32{0.5}), func(r, c int) float32 { return E4M3ToF32(perTensor[r*cols+c]) * 0.5 }},
		{"per-tensor [1]", fp8(perTensor), f32("s", []float32{2}, 1), func(r, c int) float32 { return E4M3ToF32(perTensor[r*cols+c]) * 2 }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := DequantizeE4M3Tensor(tc.weight, tc.scale, 128)
			if err != nil {
				t.Fatal(err)
			}
			for r := range rows {
				for c := range cols {
					if want := tc.want(r, c); got[r*cols+c] != want {
						t.Fatalf("[%d, %d] = %v, want %v", r, c, got[r*cols+c], want)
					}
				}
			}
		})
	}
	bad := []struct {
		name          string
		weight, scale Tensor
	}{
		{"scale shape fits nothing", fp8(qb), f32("s", sb, 3, 2)},
		{"weight not fp8", f32("w", w, rows, cols), f32("s", sc, rows, 1)},
		{"scale not float", fp8(qc), Tensor{TensorInfo{Name: "s", DType: I32, Shape: []int64{rows, 1}}, make([]byte, 4*rows)}},
		{"weight data short", Tensor{TensorInfo{Name: "w", DType: F8E4M3, Shape: []int64{rows, cols}}, qc[:10]}, f32("s", sc, rows, 1)},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := DequantizeE4M3Tensor(tc.weight, tc.scale, 128); err == nil {
				t.Error("accepted")
			}
		})
	}
}
