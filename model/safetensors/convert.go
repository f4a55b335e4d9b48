package safetensors

import (
	"encoding/binary"
	"math"
)

// Scalar conversions between float32 and the 16- and 8-bit float encodings.
// Every float32 → narrow conversion rounds to nearest, ties to even, like
// torch's .to(dtype) and the CUDA intrinsics. NaN stays NaN and keeps its
// sign.

// BF16ToF32 widens a bfloat16 bit pattern; exact for every pattern.
func BF16ToF32(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// F32ToBF16 narrows f to bfloat16, rounding to nearest even. Values past the
// largest bfloat16 round to ±Inf as IEEE rounding requires. A NaN keeps its
// upper payload bits (so bf16 → f32 → bf16 is the identity for all 65536
// patterns), with the quiet bit set when truncation would leave none.
func F32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 { // NaN
		h := uint16(b >> 16)
		if h&0x7f == 0 {
			h |= 0x40
		}
		return h
	}
	return uint16((b + 0x7fff + (b>>16)&1) >> 16)
}

// F16ToF32 widens an IEEE binary16 bit pattern; exact for every pattern.
func F16ToF32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch exp {
	case 0x1f: // Inf or NaN
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	case 0: // zero or subnormal: mant · 2^-24
		v := float32(mant) * (1.0 / (1 << 24))
		if sign != 0 {
			v = -v
		}
		return v
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
}

// F32ToF16 narrows f to IEEE binary16, rounding to nearest even, overflowing
// to ±Inf and underflowing through the subnormals to ±0.
func F32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	if exp == 0xff {
		if mant == 0 {
			return sign | 0x7c00
		}
		m := uint16(mant >> 13)
		if m == 0 {
			m = 0x200
		}
		return sign | 0x7c00 | m
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		if exp == 0 { // float32 subnormal: far below half the smallest f16 subnormal
			return sign
		}
		// value = (mant|1<<23) · 2^(exp-150); in units of 2^-24 that is a
		// right shift by 14-e.
		return sign | uint16(roundShiftEven(mant|0x800000, uint32(14-e)))
	}
	q := uint32(e)<<10 | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && q&1 == 1) {
		q++ // a carry into the exponent is the right answer, up to Inf
	}
	return sign | uint16(q)
}

// roundShiftEven returns m / 2^s rounded to nearest even.
func roundShiftEven(m, s uint32) uint32 {
	if s >= 32 {
		return 0
	}
	if s == 0 {
		return m
	}
	q := m >> s
	rem := m & (1<<s - 1)
	half := uint32(1) << (s - 1)
	if rem > half || (rem == half && q&1 == 1) {
		q++
	}
	return q
}

// E4M3 is the OCP FP8 E4M3 "fn" encoding (torch.float8_e4m3fn): sign, 4
// exponent bits with bias 7, 3 mantissa bits; no infinities; S.1111.111 is
// NaN; the largest finite value is 448 and the smallest subnormal 2^-9.
const (
	E4M3Max         = 448.0
	f32Bits448      = 0x43e00000 // math.Float32bits(448)
	f32BitsMinNorm8 = 0x3c800000 // math.Float32bits(2^-6)
)

// e4m3Table holds the float32 value of every E4M3 byte. It is computed once
// from the encoding's definition and never written after.
var e4m3Table = func() (t [256]float32) {
	for i := range t {
		b := uint8(i)
		exp := int(b>>3) & 0xf
		mant := float64(b & 7)
		var v float64
		switch {
		case exp == 0xf && b&7 == 7:
			v = math.NaN()
		case exp == 0:
			v = math.Ldexp(mant/8, -6)
		default:
			v = math.Ldexp(1+mant/8, exp-7)
		}
		if b&0x80 != 0 {
			v = -v
		}
		t[i] = float32(v)
	}
	return t
}()

// E4M3ToF32 decodes one E4M3 byte; exact for every pattern.
func E4M3ToF32(b uint8) float32 { return e4m3Table[b] }

// F32ToE4M3 encodes f as E4M3, rounding to nearest even and saturating:
// finite values beyond ±448 and ±Inf become ±448, NaN becomes NaN. Note
// that torch's .to(torch.float8_e4m3fn) turns out-of-range values into NaN
// instead; FP8 quantizers clamp to ±448 before casting, which is what this
// function folds in.
func F32ToE4M3(f float32) uint8 {
	b := math.Float32bits(f)
	sign := uint8(b>>24) & 0x80
	abs := b & 0x7fffffff
	switch {
	case abs > 0x7f800000:
		return sign | 0x7f
	case abs >= f32Bits448:
		return sign | 0x7e
	case abs < f32BitsMinNorm8:
		// Subnormal range: the value in units of 2^-9, rounded. Scaling by a
		// power of two is exact, and 8 encodes the smallest normal.
		q := math.RoundToEven(float64(math.Float32frombits(abs)) * 512)
		return sign | uint8(q)
	}
	// Normal: round the 23-bit mantissa to 3 bits; a carry bumps the
	// exponent, and since abs < 448 the result is at most 448 (0x7e).
	r := abs + 0x7ffff + (abs>>20)&1
	exp := int(r>>23) - 127 + 7
	return sign | uint8(exp)<<3 | uint8(r>>20)&7
}

// E5M2ToF32 decodes one OCP FP8 E5M2 byte (the upper half of a binary16).
func E5M2ToF32(b uint8) float32 { return F16ToF32(uint16(b) << 8) }

// Bulk conversions. Like copy, each converts min(len(dst), elements in src)
// elements and returns that count; byte slices are little-endian.

// BF16BytesToF32 decodes little-endian bfloat16 bytes into dst.
func BF16BytesToF32(dst []float32, src []byte) int {
	n := min(len(dst), len(src)/2)
	src, dst = src[:2*n], dst[:n]
	i := 0
	for ; i+4 <= n; i += 4 { // four at a time from one 8-byte load
		v := binary.LittleEndian.Uint64(src[2*i:])
		d := dst[i : i+4 : i+4]
		d[0] = math.Float32frombits(uint32(v) << 16)
		d[1] = math.Float32frombits(uint32(v>>16) << 16)
		d[2] = math.Float32frombits(uint32(v>>32) << 16)
		d[3] = math.Float32frombits(uint32(v>>48) << 16)
	}
	for ; i < n; i++ {
		dst[i] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(src[2*i:])) << 16)
	}
	return n
}

// F16BytesToF32 decodes little-endian binary16 bytes into dst.
func F16BytesToF32(dst []float32, src []byte) int {
	n := min(len(dst), len(src)/2)
	src, dst = src[:2*n], dst[:n]
	for i := range dst {
		dst[i] = F16ToF32(binary.LittleEndian.Uint16(src[2*i:]))
	}
	return n
}

// E4M3BytesToF32 decodes E4M3 bytes into dst.
func E4M3BytesToF32(dst []float32, src []byte) int {
	n := min(len(dst), len(src))
	src, dst = src[:n], dst[:n]
	t := &e4m3Table
	i := 0
	for ; i+8 <= n; i += 8 { // one 8-byte load, eight table lookups
		v := binary.LittleEndian.Uint64(src[i:])
		d := dst[i : i+8 : i+8]
		d[0], d[1], d[2], d[3] = t[uint8(v)], t[uint8(v>>8)], t[uint8(v>>16)], t[uint8(v>>24)]
		d[4], d[5], d[6], d[7] = t[uint8(v>>32)], t[uint8(v>>40)], t[uint8(v>>48)], t[uint8(v>>56)]
	}
	for ; i < n; i++ {
		dst[i] = t[src[i]]
	}
	return n
}

// F32ToBF16Bytes encodes src as little-endian bfloat16 into dst.
func F32ToBF16Bytes(dst []byte, src []float32) int {
	n := min(len(dst)/2, len(src))
	dst, src = dst[:2*n], src[:n]
	for i, f := range src {
		binary.LittleEndian.PutUint16(dst[2*i:], F32ToBF16(f))
	}
	return n
}

// F32ToF16Bytes encodes src as little-endian binary16 into dst.
func F32ToF16Bytes(dst []byte, src []float32) int {
	n := min(len(dst)/2, len(src))
	dst, src = dst[:2*n], src[:n]
	for i, f := range src {
		binary.LittleEndian.PutUint16(dst[2*i:], F32ToF16(f))
	}
	return n
}

// F32ToE4M3Bytes encodes src as saturating E4M3 (see F32ToE4M3) into dst.
func F32ToE4M3Bytes(dst []byte, src []float32) int {
	n := min(len(dst), len(src))
	dst, src = dst[:n], src[:n]
	for i, f := range src {
		dst[i] = F32ToE4M3(f)
	}
	return n
}

// F32BytesToF32 decodes little-endian float32 bytes into dst.
func F32BytesToF32(dst []float32, src []byte) int {
	n := min(len(dst), len(src)/4)
	src, dst = src[:4*n], dst[:n]
	for i := range dst {
		dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:]))
	}
	return n
}

// F32ToBytes encodes src as little-endian float32 into dst.
func F32ToBytes(dst []byte, src []float32) int {
	n := min(len(dst)/4, len(src))
	dst, src = dst[:4*n], src[:n]
	for i, f := range src {
		binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(f))
	}
	return n
}
