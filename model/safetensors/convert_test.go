package safetensors

import (
	"math"
	"math/rand/v2"
	"sort"
	"testing"
)

func TestBF16RoundTripAllPatterns(t *testing.T) {
	for h := range 1 << 16 {
		f := BF16ToF32(uint16(h))
		if got := F32ToBF16(f); got != uint16(h) {
			t.Fatalf("bf16 %#04x -> %v -> %#04x", h, f, got)
		}
	}
}

func TestF16RoundTripAllPatterns(t *testing.T) {
	for h := range 1 << 16 {
		f := F16ToF32(uint16(h))
		got := F32ToF16(f)
		if got != uint16(h) {
			t.Fatalf("f16 %#04x -> %v -> %#04x", h, f, got)
		}
	}
}

func TestF32ToBF16(t *testing.T) {
	tests := []struct {
		name string
		in   float32
		want uint16
	}{
		{"one", 1, 0x3f80},
		{"minus two", -2, 0xc000},
		{"zero", 0, 0x0000},
		{"negative zero", float32(math.Copysign(0, -1)), 0x8000},
		{"tie to even down", math.Float32frombits(0x3f808000), 0x3f80},
		{"tie to even up", math.Float32frombits(0x3f818000), 0x3f82},
		{"above tie rounds up", math.Float32frombits(0x3f808001), 0x3f81},
		{"below tie rounds down", math.Float32frombits(0x3f807fff), 0x3f80},
		{"inf", float32(math.Inf(1)), 0x7f80},
		{"minus inf", float32(math.Inf(-1)), 0xff80},
		{"max float32 overflows to inf", math.MaxFloat32, 0x7f80},
		{"largest bf16 stays", math.Float32frombits(0x7f7f0000), 0x7f7f},
		{"denormal", math.Float32frombits(0x00010000), 0x0001},
		{"denormal rounds", math.Float32frombits(0x00018000), 0x0002},
		{"smallest f32 denormal to zero", math.Float32frombits(1), 0x0000},
		{"quiet nan", float32(math.NaN()), 0x7fc0},
		{"nan with low payload only stays nan", math.Float32frombits(0x7f800001), 0x7fc0},
		{"negative nan keeps sign", math.Float32frombits(0xffc00000), 0xffc0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := F32ToBF16(tc.in); got != tc.want {
				t.Errorf("F32ToBF16(%v [%#08x]) = %#04x, want %#04x", tc.in, math.Float32bits(tc.in), got, tc.want)
			}
		})
	}
}

func TestF16Conversions(t *testing.T) {
	tests := []struct {
		name string
		f    float32
		h    uint16
	}{
		{"one", 1, 0x3c00},
		{"minus two", -2, 0xc000},
		{"max", 65504, 0x7bff},
		{"smallest normal", 1.0 / 16384, 0x0400},
		{"smallest subnormal", 1.0 / (1 << 24), 0x0001},
		{"largest subnormal", 1023.0 / (1 << 24), 0x03ff},
		{"third", 0.333251953125, 0x3555},
		{"inf", float32(math.Inf(1)), 0x7c00},
		{"minus inf", float32(math.Inf(-1)), 0xfc00},
		{"negative zero", float32(math.Copysign(0, -1)), 0x8000},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := F16ToF32(tc.h); got != tc.f {
				t.Errorf("F16ToF32(%#04x) = %v, want %v", tc.h, got, tc.f)
			}
			if got := F32ToF16(tc.f); got != tc.h {
				t.Errorf("F32ToF16(%v) = %#04x, want %#04x", tc.f, got, tc.h)
			}
		})
	}
	rounding := []struct {
		name string
		in   float32
		want uint16
	}{
		{"just below overflow midpoint", 65519, 0x7bff},
		{"overflow midpoint ties to inf", 65520, 0x7c00},
		{"far above max", 1e6, 0x7c00},
		{"half smallest subnormal ties to zero", 1.0 / (1 << 25), 0x0000},
		{"just above half smallest subnormal", math.Nextafter32(1.0/(1<<25), 1), 0x0001},
		{"1.5 subnormals ties to 2", 3.0 / (1 << 25), 0x0002},
		{"tiny negative to negative zero", -1e-10, 0x8000},
		{"subnormal rounds up to smallest normal", 2047.0 / (1 << 25), 0x0400},
		{"f32 denormal", math.Float32frombits(5), 0x0000},
		{"nan", float32(math.NaN()), 0x7e00},
	}
	for _, tc := range rounding {
		t.Run(tc.name, func(t *testing.T) {
			if got := F32ToF16(tc.in); got != tc.want {
				t.Errorf("F32ToF16(%v) = %#04x, want %#04x", tc.in, got, tc.want)
			}
		})
	}
}

// checkMidpoints walks every pair of consecutive positive finite codes of a
// format and checks that the exact midpoint rounds to the even code and
// points just either side of it round to the nearer one.
func checkMidpoints(t *testing.T, format string, codes []uint16, decode func(uint16) float32, encode func(float32) uint16) {
	t.Helper()
	for i := 0; i+1 < len(codes); i++ {
		lo, hi := codes[i], codes[i+1]
		a, b := float64(decode(lo)), float64(decode(hi))
		mid := float32((a + b) / 2)
		if float64(mid) != (a+b)/2 {
			t.Fatalf("%s: midpoint of %#x and %#x not exact in float32", format, lo, hi)
		}
		even := lo
		if lo&1 == 1 {
			even = hi
		}
		if got := encode(mid); got != even {
			t.Fatalf("%s: midpoint %v of %#x and %#x -> %#x, want even %#x", format, mid, lo, hi, got, even)
		}
		if got := encode(math.Nextafter32(mid, 0)); got != lo {
			t.Fatalf("%s: just below %v -> %#x, want %#x", format, mid, got, lo)
		}
		if got := encode(math.Nextafter32(mid, float32(math.Inf(1)))); got != hi {
			t.Fatalf("%s: just above %v -> %#x, want %#x", format, mid, got, hi)
		}
	}
}

func TestRoundToNearestEvenAtMidpoints(t *testing.T) {
	var bf, hf, e8 []uint16
	for h := uint16(0); h < 0x7f80; h++ {
		bf = append(bf, h)
	}
	for h := uint16(0); h < 0x7c00; h++ {
		hf = append(hf, h)
	}
	for b := uint16(0); b < 0x7f; b++ {
		e8 = append(e8, b)
	}
	checkMidpoints(t, "bf16", bf, BF16ToF32, F32ToBF16)
	checkMidpoints(t, "f16", hf, F16ToF32, F32ToF16)
	checkMidpoints(t, "e4m3", e8,
		func(b uint16) float32 { return E4M3ToF32(uint8(b)) },
		func(f float32) uint16 { return uint16(F32ToE4M3(f)) })
}

func TestE4M3Decode(t *testing.T) {
	// Spot values from the OCP 8-bit floating point specification (E4M3).
	tests := []struct {
		b    uint8
		want float64
	}{
		{0x00, 0},
		{0x01, 1.0 / 512}, // smallest subnormal 2^-9
		{0x07, 7.0 / 512}, // largest subnormal 0.875·2^-6
		{0x08, 1.0 / 64},  // smallest normal 2^-6
		{0x38, 1},
		{0x39, 1.125},
		{0x40, 2},
		{0x70, 128},
		{0x77, 240},
		{0x78, 256},
		{0x7e, 448}, // max normal S.1111.110
		{0xb8, -1},
		{0xfe, -448},
		{0x81, -1.0 / 512},
	}
	for _, tc := range tests {
		if got := E4M3ToF32(tc.b); float64(got) != tc.want {
			t.Errorf("E4M3ToF32(%#02x) = %v, want %v", tc.b, got, tc.want)
		}
	}
	if v := E4M3ToF32(0x80); v != 0 || !math.Signbit(float64(v)) {
		t.Errorf("E4M3ToF32(0x80) = %v, want -0", v)
	}
	nans := 0
	var pos []float64
	for b := range 256 {
		v := float64(E4M3ToF32(uint8(b)))
		switch {
		case math.IsNaN(v):
			nans++
			if b&0x7f != 0x7f {
				t.Errorf("E4M3ToF32(%#02x) is NaN; only S.1111.111 is", b)
			}
			continue
		case math.IsInf(v, 0):
			t.Errorf("E4M3ToF32(%#02x) is Inf; e4m3fn has none", b)
		}
		if b < 0x80 {
			pos = append(pos, v)
			if neg := float64(E4M3ToF32(uint8(b) | 0x80)); neg != -v {
				t.Errorf("E4M3ToF32(%#02x) = %v, not the negation of %v", b|0x80, neg, v)
			}
			// The encoding is monotonic and every finite code encodes back to itself.
			if got := F32ToE4M3(float32(v)); got != uint8(b) {
				t.Errorf("F32ToE4M3(%v) = %#02x, want %#02x", v, got, b)
			}
		}
	}
	if nans != 2 {
		t.Errorf("%d NaN patterns, want 2", nans)
	}
	if !sort.Float64sAreSorted(pos) || len(pos) != 127 {
		t.Errorf("positive codes not monotonic or not 127: %d", len(pos))
	}
	for i := 1; i < 8; i++ { // subnormals are evenly spaced by 2^-9
		if pos[i]-pos[i-1] != 1.0/512 {
			t.Errorf("subnormal spacing at %d: %v", i, pos[i]-pos[i-1])
		}
	}
}

func TestF32ToE4M3(t *testing.T) {
	tests := []struct {
		name string
		in   float32
		want uint8
	}{
		{"one", 1, 0x38},
		{"max", 448, 0x7e},
		{"above max saturates", 449, 0x7e},
		{"far above max saturates", 1e9, 0x7e},
		{"inf saturates", float32(math.Inf(1)), 0x7e},
		{"minus inf saturates", float32(math.Inf(-1)), 0xfe},
		{"464 saturates", 464, 0x7e},
		{"nan", float32(math.NaN()), 0x7f},
		{"negative nan", float32(math.Copysign(math.NaN(), -1)), 0xff},
		{"tie 1.0625 to even 1", 1.0625, 0x38},
		{"tie 1.1875 to even 1.25", 1.1875, 0x3a},
		{"tie 15.5 carries to 16", 15.5, 0x58},
		{"half smallest subnormal ties to zero", 1.0 / 1024, 0x00},
		{"1.5 subnormals ties to 2", 3.0 / 1024, 0x02},
		{"largest subnormal tie goes to normal", 15.0 / 1024, 0x08},
		{"negative tiny to negative zero", -1e-6, 0x80},
		{"minus 3", -3, 0xc4},
		{"432 ties to even 448", 432, 0x7e},
		{"400 ties to even 384", 400, 0x7c},
		{"401 rounds to 416", 401, 0x7d},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := F32ToE4M3(tc.in); got != tc.want {
				t.Errorf("F32ToE4M3(%v) = %#02x (%v), want %#02x (%v)", tc.in, got, E4M3ToF32(got), tc.want, E4M3ToF32(tc.want))
			}
		})
	}
}

// TestF32ToE4M3MatchesNearest compares against a brute-force search for the
// nearest finite code (ties to the even code, saturating at 448).
func TestF32ToE4M3MatchesNearest(t *testing.T) {
	nearest := func(x float32) uint8 {
		ax := math.Abs(float64(x))
		best, bestD := uint8(0), math.Inf(1)
		for b := uint8(0); b < 0x7f; b++ {
			d := math.Abs(float64(E4M3ToF32(b)) - ax)
			if d < bestD || (d == bestD && b&1 == 0) {
				best, bestD = b, d
			}
		}
		if math.Signbit(float64(x)) {
			best |= 0x80
		}
		return best
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 20000 {
		// Log-uniform magnitudes from 2^-14 to 2^10 cover zero-rounding,
		// subnormals, normals and saturation.
		x := float32(math.Exp2(rng.Float64()*24 - 14))
		if i%2 == 1 {
			x = -x
		}
		if got, want := F32ToE4M3(x), nearest(x); got != want {
			t.Fatalf("F32ToE4M3(%v) = %#02x, nearest is %#02x", x, got, want)
		}
	}
}

func TestBulkConversions(t *testing.T) {
	src := []float32{1, -2.5, 0.1, 300, float32(math.Inf(-1)), 1e-3}
	b16 := make([]byte, 2*len(src))
	if n := F32ToBF16Bytes(b16, src); n != len(src) {
		t.Fatalf("F32ToBF16Bytes converted %d", n)
	}
	back := make([]float32, len(src))
	BF16BytesToF32(back, b16)
	for i, f := range src {
		if want := BF16ToF32(F32ToBF16(f)); back[i] != want {
			t.Errorf("bf16 bulk[%d] = %v, want %v", i, back[i], want)
		}
	}
	F32ToF16Bytes(b16, src)
	F16BytesToF32(back, b16)
	for i, f := range src {
		if want := F16ToF32(F32ToF16(f)); back[i] != want {
			t.Errorf("f16 bulk[%d] = %v, want %v", i, back[i], want)
		}
	}
	b8 := make([]byte, len(src))
	F32ToE4M3Bytes(b8, src)
	E4M3BytesToF32(back, b8)
	for i, f := range src {
		if want := E4M3ToF32(F32ToE4M3(f)); back[i] != want {
			t.Errorf("e4m3 bulk[%d] = %v, want %v", i, back[i], want)
		}
	}
	b32 := make([]byte, 4*len(src))
	F32ToBytes(b32, src)
	F32BytesToF32(back, b32)
	for i := range src {
		if back[i] != src[i] {
			t.Errorf("f32 bulk[%d] = %v, want %v", i, back[i], src[i])
		}
	}
	// Like copy: the shorter side bounds the count.
	if n := BF16BytesToF32(make([]float32, 2), b16); n != 2 {
		t.Errorf("short dst converted %d, want 2", n)
	}
	if n := BF16BytesToF32(make([]float32, 10), b16[:5]); n != 2 {
		t.Errorf("odd src converted %d, want 2", n)
	}
}

func BenchmarkBF16ToF32(b *testing.B) {
	src := make([]byte, 8<<20)
	for i := range src {
		src[i] = byte(i * 7)
	}
	dst := make([]float32, len(src)/2)
	b.SetBytes(int64(len(src)))
	for b.Loop() {
		BF16BytesToF32(dst, src)
	}
}

func BenchmarkE4M3ToF32(b *testing.B) {
	src := make([]byte, 4<<20)
	for i := range src {
		src[i] = byte(i * 7)
	}
	dst := make([]float32, len(src))
	b.SetBytes(int64(len(src)))
	for b.Loop() {
		E4M3BytesToF32(dst, src)
	}
}

func BenchmarkF32ToBF16(b *testing.B) {
	src := make([]float32, 4<<20)
	for i := range src {
		src[i] = float32(i) * 0.001
	}
	dst := make([]byte, 2*len(src))
	b.SetBytes(int64(len(dst)))
	for b.Loop() {
		F32ToBF16Bytes(dst, src)
	}
}
