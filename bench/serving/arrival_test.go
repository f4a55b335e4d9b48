package serving

import (
	"math"
	"testing"
	"time"
)

// TestInterArrivalMoments checks the gamma inter-arrival sampler: mean 1/rate for every
// burstiness k, variance 1/(rate²·k) (k = 1 is the exponential gaps of a Poisson process).
func TestInterArrivalMoments(t *testing.T) {
	const draws = 200000
	for _, tc := range []struct{ rate, k float64 }{
		{10, 1}, {2.5, 1}, {10, 0.25}, {10, 0.5}, {10, 4}, {100, 1},
	} {
		rng := newRNG(42, 9)
		var sum, sumSq float64
		for range draws {
			x := interArrival(rng, tc.rate, tc.k)
			if x < 0 {
				t.Fatalf("negative gap %g", x)
			}
			sum += x
			sumSq += x * x
		}
		mean := sum / draws
		variance := sumSq/draws - mean*mean
		wantMean, wantVar := 1/tc.rate, 1/(tc.rate*tc.rate*tc.k)
		// 5 standard errors of the mean; the sample variance of a gamma is noisier.
		if se := math.Sqrt(wantVar / draws); math.Abs(mean-wantMean) > 5*se {
			t.Errorf("rate %g k %g: mean %g, want %g ± %g", tc.rate, tc.k, mean, wantMean, 5*se)
		}
		if math.Abs(variance-wantVar) > 0.05*wantVar {
			t.Errorf("rate %g k %g: variance %g, want %g (±5%%)", tc.rate, tc.k, variance, wantVar)
		}
	}
}

// TestPoissonCounts checks the defining property of a Poisson process: arrivals per unit
// window have equal mean and variance (rate × window).
func TestPoissonCounts(t *testing.T) {
	rng := newRNG(3, 3)
	const rate, windows = 20.0, 20000
	counts := make([]float64, windows)
	tm := 0.0
	for {
		tm += interArrival(rng, rate, 1)
		if tm >= windows {
			break
		}
		counts[int(tm)]++
	}
	var sum, sumSq float64
	for _, c := range counts {
		sum += c
		sumSq += c * c
	}
	mean := sum / windows
	v := sumSq/windows - mean*mean
	if math.Abs(mean-rate) > 0.2 || math.Abs(v-rate) > 1 {
		t.Errorf("counts per second: mean %g variance %g, want both %g", mean, v, rate)
	}
}

func TestArrivalOffsets(t *testing.T) {
	if offs := ArrivalOffsets(5, math.Inf(1), 1, 0); len(offs) != 5 || offs[4] != 0 {
		t.Errorf("infinite rate: %v, want all zero", offs)
	}
	for _, k := range []float64{1, 0.5, 3, math.Inf(1)} {
		offs := ArrivalOffsets(100, 10, k, 1)
		for i := 1; i < len(offs); i++ {
			if offs[i] < offs[i-1] {
				t.Fatalf("k %g: offsets not increasing at %d", k, i)
			}
		}
		// vLLM rescales the schedule so the last request goes out at n/rate.
		if d := offs[99] - 10*time.Second; d < -time.Microsecond || d > time.Microsecond {
			t.Errorf("k %g: last offset %v, want 10s", k, offs[99])
		}
	}
	a, b := ArrivalOffsets(50, 10, 1, 7), ArrivalOffsets(50, 10, 1, 7)
	c := ArrivalOffsets(50, 10, 1, 8)
	if a[10] != b[10] || a[10] == c[10] {
		t.Error("offsets must depend on the seed only")
	}
}
