package kernels

import (
	"math"
	"testing"
)

// Every finite E4M3 value encodes back to itself, and the values between
// two neighbours round to the nearer one, ties to the even mantissa.
func TestE4M3RoundTripAndTies(t *testing.T) {
	for b := range 256 {
		v := E4M3ToF32(uint8(b))
		if math.IsNaN(float64(v)) {
			if b&0x7f != 0x7f {
				t.Fatalf("byte %#x decodes to NaN", b)
			}
			if got := F32ToE4M3(v); got&0x7f != 0x7f {
				t.Fatalf("NaN encodes as %#x", got)
			}
			continue
		}
		if got := F32ToE4M3(v); got != uint8(b) && !(v == 0 && got&0x7f == 0) {
			t.Fatalf("%g (byte %#x) encodes as %#x", v, b, got)
		}
	}
	// Neighbours among the positive values 0x00..0x7e.
	for b := 0; b < 0x7e; b++ {
		lo, hi := E4M3ToF32(uint8(b)), E4M3ToF32(uint8(b+1))
		mid := (lo + hi) / 2 // exact: both have at most 4 significant bits
		even := uint8(b)
		if b&1 == 1 {
			even = uint8(b + 1)
		}
		cases := []struct {
			x    float32
			want uint8
		}{
			{mid, even},
			{math.Nextafter32(mid, 0), uint8(b)},
			{math.Nextafter32(mid, 1000), uint8(b + 1)},
			{-mid, 0x80 | even},
		}
		for _, c := range cases {
			if got := F32ToE4M3(c.x); got != c.want {
				t.Fatalf("F32ToE4M3(%g) between %g and %g = %#x, want %#x", c.x, lo, hi, got, c.want)
			}
		}
	}
}

// Values past ±448 saturate to ±448 (not NaN, unlike a plain torch cast).
func TestE4M3Saturates(t *testing.T) {
	for _, c := range []struct {
		x    float32
		want uint8
	}{
		{448, 0x7e}, {449, 0x7e}, {464, 0x7e}, {1e30, 0x7e}, {float32(math.Inf(1)), 0x7e},
		{-448, 0xfe}, {-500, 0xfe}, {float32(math.Inf(-1)), 0xfe},
		{1e-30, 0}, {-1e-30, 0x80}, {0x1p-10, 0}, {0x1.8p-10, 1}, {0x1p-9, 1},
	} {
		if got := F32ToE4M3(c.x); got != c.want {
			t.Errorf("F32ToE4M3(%g) = %#x, want %#x", c.x, got, c.want)
		}
	}
}
