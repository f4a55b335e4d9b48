package serving

import (
	"math"
	"math/rand/v2"
	"time"
)

// gammaSample draws from Gamma(shape k, scale θ) by Marsaglia and Tsang's method (with the
// k < 1 boost), so burstiness k gives inter-arrival times with mean kθ and variance kθ².
func gammaSample(rng *rand.Rand, k, theta float64) float64 {
	if k == 1 {
		return rng.ExpFloat64() * theta
	}
	if k < 1 {
		u := rng.Float64()
		return gammaSample(rng, k+1, theta) * math.Pow(u, 1/k)
	}
	d := k - 1.0/3
	c := 1 / math.Sqrt(9*d)
	for {
		x := rng.NormFloat64()
		v := 1 + c*x
		if v <= 0 {
			continue
		}
		v = v * v * v
		u := rng.Float64()
		if u < 1-0.0331*x*x*x*x || math.Log(u) < 0.5*x*x+d*(1-v+math.Log(v)) {
			return d * v * theta
		}
	}
}

// interArrival draws one gap between requests for rate r (req/s) and burstiness k: gamma with
// shape k and scale 1/(r·k), so the mean gap is 1/r whatever k is; k = 1 is a Poisson process.
func interArrival(rng *rand.Rand, rate, burstiness float64) float64 {
	if math.IsInf(burstiness, 1) {
		return 1 / rate
	}
	return gammaSample(rng, burstiness, 1/(rate*burstiness))
}

// ArrivalOffsets returns when each of n requests is sent, relative to the start. With an
// infinite rate all are sent at once. Like vLLM, the cumulative schedule is rescaled so the
// last request goes out at n/rate: throughput then does not drift a few percent with the seed.
func ArrivalOffsets(n int, rate, burstiness float64, seed int64) []time.Duration {
	out := make([]time.Duration, n)
	if math.IsInf(rate, 1) || n == 0 {
		return out
	}
	rng := newRNG(seed, 4)
	cum := make([]float64, n)
	t := 0.0
	for i := range n {
		t += interArrival(rng, rate, burstiness)
		cum[i] = t
	}
	scale := 1.0
	if t > 0 {
		scale = float64(n) / rate / t
	}
	for i, s := range cum {
		out[i] = time.Duration(s * scale * float64(time.Second))
	}
	return out
}
