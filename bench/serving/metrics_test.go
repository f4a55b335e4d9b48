package serving

import (
	"math"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

func msd(v float64) time.Duration { return time.Duration(v * float64(time.Millisecond)) }

// TestComputeMetricsMatchesNumpy checks means, medians, std and percentiles against numpy's
// definitions computed directly from the samples.
func TestComputeMetricsMatchesNumpy(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	t0 := time.Unix(1000, 0)
	for _, n := range []int{1, 2, 16, 301} {
		outs := make([]Outcome, n)
		var ttft, tpot, itl, e2el []float64
		for i := range outs {
			o := &outs[i]
			o.Success = true
			o.Start = t0.Add(msd(rng.Float64() * 500))
			o.TTFT = msd(50 + rng.Float64()*900)
			o.OutputTokens = 1 + rng.IntN(40)
			o.Chunks = o.OutputTokens
			o.PromptLen = 100
			var dec time.Duration
			for range o.OutputTokens - 1 {
				g := msd(5 + rng.ExpFloat64()*20)
				o.ITL = append(o.ITL, g)
				itl = append(itl, ms(g))
				dec += g
			}
			o.Latency = o.TTFT + dec
			ttft = append(ttft, ms(o.TTFT))
			e2el = append(e2el, ms(o.Latency))
			if o.OutputTokens > 1 {
				tpot = append(tpot, ms(dec/time.Duration(o.OutputTokens-1)))
			}
		}
		pcts := []float64{25, 50, 90, 99, 100}
		m := ComputeMetrics(outs, 2*time.Second, pcts, nil)
		check := func(name string, st Stat, vals []float64) {
			if len(vals) == 0 {
				if st.Mean != 0 || st.Median != 0 {
					t.Errorf("n=%d %s: empty metric should be 0, got %+v", n, name, st)
				}
				return
			}
			mean, std := meanStd(vals)
			// HDR keeps 3 significant digits; the interpolation is numpy's.
			relNear(t, name+" mean", st.Mean, mean, 1e-9)
			relNear(t, name+" std", st.Std, std, 1e-6)
			relNear(t, name+" median", st.Median, numpyPercentile(vals, 50), 1e-3)
			for _, p := range st.Percentiles {
				relNear(t, name+" p"+percentileWord(p.P), p.Value, numpyPercentile(vals, p.P), 1e-3)
			}
		}
		check("ttft", m.TTFT, ttft)
		check("tpot", m.TPOT, tpot)
		check("itl", m.ITL, itl)
		check("e2el", m.E2EL, e2el)
		if m.Completed != n || m.TotalInput != 100*n {
			t.Errorf("n=%d: completed %d input %d", n, m.Completed, m.TotalInput)
		}
	}
}

func meanStd(v []float64) (float64, float64) {
	var s float64
	for _, x := range v {
		s += x
	}
	mean := s / float64(len(v))
	var ss float64
	for _, x := range v {
		ss += (x - mean) * (x - mean)
	}
	return mean, math.Sqrt(ss / float64(len(v)))
}

func relNear(t *testing.T, what string, got, want, rel float64) {
	t.Helper()
	if math.Abs(got-want) > rel*math.Abs(want)+1e-9 {
		t.Errorf("%s = %g, want %g (rel %g)", what, got, want, rel)
	}
}

func TestGoodputAndTPOTRules(t *testing.T) {
	mk := func(ttft, lat float64, out int) Outcome {
		return Outcome{Success: true, Start: time.Unix(0, 0), TTFT: msd(ttft), Latency: msd(lat), OutputTokens: out, Chunks: out}
	}
	outs := []Outcome{
		mk(100, 1100, 11),  // tpot 100
		mk(100, 600, 11),   // tpot 50
		mk(400, 400, 1),    // one token: tpot counts as 0 for goodput, excluded from TPOT stats
		mk(100, 5000, 101), // tpot 49, e2el 5000
		{Err: "HTTP 500"},  // failed: never good
	}
	for _, tc := range []struct {
		slo  map[string]float64
		good int
	}{
		{map[string]float64{"tpot": 60}, 3},
		{map[string]float64{"tpot": 60, "ttft": 200}, 2},
		{map[string]float64{"e2el": 1100}, 3},
		{map[string]float64{"ttft": 100, "tpot": 100, "e2el": 5000}, 3},
		{map[string]float64{"ttft": 99}, 0},
	} {
		m := ComputeMetrics(outs, time.Second, []float64{99}, tc.slo)
		if m.Good != tc.good || m.RequestGoodput != float64(tc.good) {
			t.Errorf("slo %v: %d good (goodput %g), want %d", tc.slo, m.Good, m.RequestGoodput, tc.good)
		}
		if m.Failed != 1 || m.Completed != 4 || m.TPOT.Count != 3 {
			t.Errorf("failed %d completed %d tpot samples %d", m.Failed, m.Completed, m.TPOT.Count)
		}
		relNear(t, "mean tpot", m.TPOT.Mean, (100+50+49)/3.0, 1e-9)
	}
}

func TestTimelinePeaks(t *testing.T) {
	t0 := time.Unix(0, 0)
	outs := []Outcome{
		{Success: true, Start: t0, TTFT: msd(100), ITL: []time.Duration{msd(100), msd(100)}, Latency: msd(300), OutputTokens: 3},
		{Success: true, Start: t0.Add(msd(200)), TTFT: msd(100), ITL: []time.Duration{msd(900)}, Latency: msd(1000), OutputTokens: 2},
		{Success: true, Start: t0.Add(msd(300)), TTFT: msd(50), Latency: msd(50), OutputTokens: 1}, // starts as #1 ends
		{Start: t0, Err: "x"},
	}
	tok, conc, peak := timeline(outs)
	if peak != 2 {
		t.Errorf("peak concurrency %d, want 2 (half-open intervals)", peak)
	}
	if len(tok) != 3 || tok[0] != 5 || tok[1] != 1 {
		t.Errorf("tokens per second %v, want [5 1 0]", tok)
	}
	if conc[0] != 3 || conc[1] != 1 {
		t.Errorf("concurrent per second %v", conc)
	}
}

func TestErrorSummaryAndPrint(t *testing.T) {
	outs := []Outcome{{Err: "b"}, {Err: "a"}, {Err: "b"}, {Success: true}}
	got := ErrorSummary(outs)
	if len(got) != 2 || got[0] != (ErrorCount{"b", 2}) || got[1] != (ErrorCount{"a", 1}) {
		t.Errorf("summary %+v", got)
	}
	cfg := DefaultConfig()
	cfg.MaxConcurrency = 4
	cfg.RequestRate = 10
	r := &Result{Config: cfg, Outcomes: outs, Duration: time.Second}
	r.Metrics = ComputeMetrics(outs, time.Second, cfg.MetricPercentiles, nil)
	var b strings.Builder
	r.PrintSummary(&b)
	for _, want := range []string{
		"============ Serving Benchmark Result ============\n",
		"Successful requests:                     1         \n",
		"Maximum request concurrency:             4         \n",
		"Request rate configured (RPS):           10.00     \n",
		"---------------Time to First Token----------------\n",
		"P99 ITL (ms):",
		"3 requests failed:",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("summary lacks %q:\n%s", want, b.String())
		}
	}
}
