package cpu

import (
	"fmt"
	"math"

	"github.com/glmtopo/glmtopo/kernels"
)

// weightView gives float32 rows of a weight [N,K] stored as F32, BF16 or scaled F8E4M3.
type weightView struct {
	n, k   int
	f32    []float32
	bf16   []uint16
	fp8    []byte
	layout kernels.ScaleLayout
	scale  []float32
	block  [2]int
	sCols  int
}

func viewWeight(w *kernels.Tensor) (weightView, error) {
	if w == nil || len(w.Shape) != 2 {
		return weightView{}, fmt.Errorf("cpu: weight must be 2-D")
	}
	v := weightView{n: w.Shape[0], k: w.Shape[1]}
	switch d := w.Impl.(type) {
	case []float32:
		v.f32 = d
	case []uint16:
		v.bf16 = d
	case []byte:
		v.fp8 = d
		if w.Scale == nil {
			return v, fmt.Errorf("cpu: f8e4m3 weight %v without a scale", w.Shape)
		}
		s, ok := w.Scale.Impl.([]float32)
		if !ok {
			return v, fmt.Errorf("cpu: f8e4m3 scale must be f32")
		}
		v.scale, v.layout, v.block = s, w.ScaleLayout, w.ScaleBlock
		switch v.layout {
		case kernels.ScalePerChannel:
			if len(s) != v.n {
				return v, fmt.Errorf("cpu: per-channel scale has %d entries for %d rows", len(s), v.n)
			}
		case kernels.ScaleBlock:
			if v.block[0] <= 0 || v.block[1] <= 0 {
				return v, fmt.Errorf("cpu: bad scale block %v", v.block)
			}
			v.sCols = (v.k + v.block[1] - 1) / v.block[1]
			if want := ((v.n + v.block[0] - 1) / v.block[0]) * v.sCols; len(s) != want {
				return v, fmt.Errorf("cpu: block scale has %d entries, want %d", len(s), want)
			}
		default:
			return v, fmt.Errorf("cpu: f8e4m3 weight without a scale layout")
		}
	default:
		return v, fmt.Errorf("cpu: unsupported weight storage %T", w.Impl)
	}
	if v.elements() != v.n*v.k {
		return v, fmt.Errorf("cpu: weight storage has %d elements for shape %v", v.elements(), w.Shape)
	}
	return v, nil
}

func (v *weightView) elements() int {
	switch {
	case v.f32 != nil:
		return len(v.f32)
	case v.bf16 != nil:
		return len(v.bf16)
	}
	return len(v.fp8)
}

// rows converts rows [r0, r1) to float32 into dst (len ≥ (r1-r0)*k), or aliases F32 storage.
func (v *weightView) rows(r0, r1 int, dst []float32) []float32 {
	k := v.k
	switch {
	case v.f32 != nil:
		return v.f32[r0*k : r1*k]
	case v.bf16 != nil:
		src := v.bf16[r0*k : r1*k]
		dst = dst[:len(src)]
		for i, h := range src {
			dst[i] = math.Float32frombits(uint32(h) << 16)
		}
		return dst
	}
	src := v.fp8[r0*k : r1*k]
	dst = dst[:len(src)]
	for r := r0; r < r1; r++ {
		row := src[(r-r0)*k : (r-r0+1)*k]
		out := dst[(r-r0)*k : (r-r0+1)*k]
		if v.layout == kernels.ScalePerChannel {
			s := v.scale[r]
			for i, q := range row {
				out[i] = e4m3[q] * s
			}
			continue
		}
		srow := v.scale[(r/v.block[0])*v.sCols:]
		for c0 := 0; c0 < k; c0 += v.block[1] {
			s := srow[c0/v.block[1]]
			c1 := min(c0+v.block[1], k)
			for i := c0; i < c1; i++ {
				out[i] = e4m3[row[i]] * s
			}
		}
	}
	return dst
}

// e4m3 decodes every float8_e4m3fn byte (bias 7, no infinities, 0x7f/0xff NaN).
var e4m3 = func() (t [256]float32) {
	for i := range 256 {
		sign, exp, man := i>>7, (i>>3)&15, i&7
		var v float64
		switch {
		case exp == 15 && man == 7:
			v = math.NaN()
		case exp == 0:
			v = float64(man) / 8 * math.Pow(2, -6)
		default:
			v = (1 + float64(man)/8) * math.Pow(2, float64(exp-7))
		}
		if sign == 1 {
			v = -v
		}
		t[i] = float32(v)
	}
	return t
}()

// Tile sizes: rowsPerChunk weight rows are converted once and reused for
// tokBlock tokens at a time, so both stay in cache.
const (
	rowsPerChunk = 16
	tokBlock     = 64
)

func (b *Backend) Linear(out, x, w, bias *kernels.Tensor) error {
	xs, err := f32(x, "linear input")
	if err != nil {
		return err
	}
	os, err := f32(out, "linear output")
	if err != nil {
		return err
	}
	wv, err := viewWeight(w)
	if err != nil {
		return err
	}
	k := x.Cols()
	t := x.Rows()
	if k != wv.k || out.Cols() != wv.n || out.Rows() != t {
		return fmt.Errorf("cpu: linear shapes: x %v, w [%d,%d], out %v", x.Shape, wv.n, wv.k, out.Shape)
	}
	var bs []float32
	if bias != nil {
		if bs, err = f32(bias, "linear bias"); err != nil {
			return err
		}
		if len(bs) != wv.n {
			return fmt.Errorf("cpu: linear bias has %d entries for %d outputs", len(bs), wv.n)
		}
	}
	b.linear(os, xs, t, &wv, bs)
	return nil
}

// linear computes out[T,N] = x[T,K]·wᵀ + bias on raw slices.
func (b *Backend) linear(out, x []float32, T int, w *weightView, bias []float32) {
	n, k := w.n, w.k
	grain := rowsPerChunk
	if n/grain < 4*b.workers && n >= 4*b.workers { // small N: finer chunks keep every core busy
		grain = max(4, n/(4*b.workers))
	}
	if w.bf16 != nil && T <= 2 {
		// Decode: read bf16 weights once, converting in registers.
		b.parallelFor(n, grain, func(r0, r1 int) {
			gemvBF16(out, x, w.bf16, T, r0, r1, n, k)
			if bias != nil {
				for t := 0; t < T; t++ {
					o := out[t*n+r0 : t*n+r1]
					for i := range o {
						o[i] += bias[r0+i]
					}
				}
			}
		})
		return
	}
	b.parallelFor(n, grain, func(r0, r1 int) {
		var buf []float32
		if w.f32 == nil {
			buf = make([]float32, (r1-r0)*k)
		}
		wr := w.rows(r0, r1, buf)
		for t0 := 0; t0 < T; t0 += tokBlock {
			t1 := min(t0+tokBlock, T)
			gemmBlock(out, x, wr, t0, t1, r0, r1, n, k)
		}
		if bias != nil {
			for t := 0; t < T; t++ {
				o := out[t*n+r0 : t*n+r1]
				for i := range o {
					o[i] += bias[r0+i]
				}
			}
		}
	})
}

// gemmBlock: out[t, r] = x[t]·wr[r-r0] for t in [t0,t1), r in [r0,r1), in 2×4 register tiles.
func gemmBlock(out, x, wr []float32, t0, t1, r0, r1, n, k int) {
	t := t0
	for ; t+2 <= t1; t += 2 {
		x0 := x[t*k : t*k+k]
		x1 := x[(t+1)*k : (t+1)*k+k]
		r := r0
		for ; r+4 <= r1; r += 4 {
			w0 := wr[(r-r0)*k : (r-r0)*k+k]
			w1 := wr[(r-r0+1)*k : (r-r0+1)*k+k]
			w2 := wr[(r-r0+2)*k : (r-r0+2)*k+k]
			w3 := wr[(r-r0+3)*k : (r-r0+3)*k+k]
			var a00, a01, a02, a03, a10, a11, a12, a13 float32
			for i := range x0 {
				u, v := x0[i], x1[i]
				c0, c1, c2, c3 := w0[i], w1[i], w2[i], w3[i]
				a00 += u * c0
				a01 += u * c1
				a02 += u * c2
				a03 += u * c3
				a10 += v * c0
				a11 += v * c1
				a12 += v * c2
				a13 += v * c3
			}
			o0 := out[t*n+r : t*n+r+4]
			o0[0], o0[1], o0[2], o0[3] = a00, a01, a02, a03
			o1 := out[(t+1)*n+r : (t+1)*n+r+4]
			o1[0], o1[1], o1[2], o1[3] = a10, a11, a12, a13
		}
		for ; r < r1; r++ {
			wrow := wr[(r-r0)*k : (r-r0)*k+k]
			out[t*n+r] = dotSeq(x0, wrow)
			out[(t+1)*n+r] = dotSeq(x1, wrow)
		}
	}
	for ; t < t1; t++ {
		x0 := x[t*k : t*k+k]
		r := r0
		for ; r+4 <= r1; r += 4 {
			w0 := wr[(r-r0)*k : (r-r0)*k+k]
			w1 := wr[(r-r0+1)*k : (r-r0+1)*k+k]
			w2 := wr[(r-r0+2)*k : (r-r0+2)*k+k]
			w3 := wr[(r-r0+3)*k : (r-r0+3)*k+k]
			var a0, a1, a2, a3 float32
			for i, u := range x0 {
				a0 += u * w0[i]
				a1 += u * w1[i]
				a2 += u * w2[i]
				a3 += u * w3[i]
			}
			o := out[t*n+r : t*n+r+4]
			o[0], o[1], o[2], o[3] = a0, a1, a2, a3
		}
		for ; r < r1; r++ {
			out[t*n+r] = dotSeq(x0, wr[(r-r0)*k:(r-r0)*k+k])
		}
	}
}

// dotSeq sums in index order with one accumulator, exactly as the register
// tiles do, so a token's result never depends on the batch it was computed in.
func dotSeq(a, b []float32) float32 {
	b = b[:len(a)]
	var s float32
	for i, x := range a {
		s += x * b[i]
	}
	return s
}

func dot(a, b []float32) float32 {
	b = b[:len(a)]
	var s0, s1, s2, s3 float32
	i := 0
	for ; i+4 <= len(a); i += 4 {
		s0 += a[i] * b[i]
		s1 += a[i+1] * b[i+1]
		s2 += a[i+2] * b[i+2]
		s3 += a[i+3] * b[i+3]
	}
	for ; i < len(a); i++ {
		s0 += a[i] * b[i]
	}
	return (s0 + s1) + (s2 + s3)
}

// gemvBF16 computes out[t, r] for T ≤ 2 tokens straight from bf16 rows, with
// the same single-accumulator order as gemmBlock (results are batch-invariant).
func gemvBF16(out, x []float32, w []uint16, T, r0, r1, n, k int) {
	for t := 0; t < T; t++ {
		x0 := x[t*k : t*k+k]
		r := r0
		for ; r+4 <= r1; r += 4 {
			w0 := w[r*k : r*k+k]
			w1 := w[(r+1)*k : (r+1)*k+k]
			w2 := w[(r+2)*k : (r+2)*k+k]
			w3 := w[(r+3)*k : (r+3)*k+k]
			var a0, a1, a2, a3 float32
			for i, u := range x0 {
				a0 += u * math.Float32frombits(uint32(w0[i])<<16)
				a1 += u * math.Float32frombits(uint32(w1[i])<<16)
				a2 += u * math.Float32frombits(uint32(w2[i])<<16)
				a3 += u * math.Float32frombits(uint32(w3[i])<<16)
			}
			o := out[t*n+r : t*n+r+4]
			o[0], o[1], o[2], o[3] = a0, a1, a2, a3
		}
		for ; r < r1; r++ {
			wr := w[r*k : r*k+k]
			var a float32
			for i, u := range x0 {
				a += u * math.Float32frombits(uint32(wr[i])<<16)
			}
			out[t*n+r] = a
		}
	}
}
