package serving

import (
	"math"
	"sort"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// Stat summarises one latency metric in milliseconds.
type Stat struct {
	Mean, Median, Std float64
	Percentiles       []PercentileValue
	Count             int
}

// PercentileValue is one requested percentile.
type PercentileValue struct {
	P     float64
	Value float64 // milliseconds
}

// Metrics is the benchmark summary, vLLM's BenchmarkMetrics.
type Metrics struct {
	Completed, Failed       int
	TotalInput, TotalOutput int
	RequestThroughput       float64
	RequestGoodput          float64
	OutputThroughput        float64
	TotalTokenThroughput    float64
	TTFT, TPOT, ITL, E2EL   Stat
	MaxOutputTokensPerS     float64
	MaxConcurrentRequests   int
	OutputLens              []int // per request; 0 for failed ones
	TokensPerSecond         []float64
	ConcurrentPerSecond     []float64
	Good                    int
}

// ComputeMetrics turns outcomes into vLLM's summary: TPOT = (E2EL − TTFT)/(output − 1) for
// requests with more than one output token; goodput counts completed requests meeting every
// SLO (a one-token request's TPOT counts as 0); percentiles come from HDR histograms.
func ComputeMetrics(outs []Outcome, dur time.Duration, percentiles []float64, goodput map[string]float64) Metrics {
	m := Metrics{OutputLens: make([]int, len(outs))}
	ttft, tpot, itl, e2el := newLatencyHist(), newLatencyHist(), newLatencyHist(), newLatencyHist()
	for i := range outs {
		o := &outs[i]
		if !o.Success {
			m.Failed++
			continue
		}
		m.Completed++
		m.OutputLens[i] = o.OutputTokens
		m.TotalInput += o.PromptLen
		m.TotalOutput += o.OutputTokens
		ttft.add(o.TTFT)
		e2el.add(o.Latency)
		var reqTPOT time.Duration
		if o.OutputTokens > 1 {
			reqTPOT = (o.Latency - o.TTFT) / time.Duration(o.OutputTokens-1)
			tpot.add(reqTPOT)
		}
		for _, g := range o.ITL {
			itl.add(g)
		}
		if len(goodput) > 0 && meetsSLO(goodput, o.TTFT, reqTPOT, o.Latency) {
			m.Good++
		}
	}
	sec := dur.Seconds()
	if sec > 0 {
		m.RequestThroughput = float64(m.Completed) / sec
		m.RequestGoodput = float64(m.Good) / sec
		m.OutputThroughput = float64(m.TotalOutput) / sec
		m.TotalTokenThroughput = float64(m.TotalInput+m.TotalOutput) / sec
	}
	m.TTFT, m.TPOT, m.ITL, m.E2EL = ttft.stat(percentiles), tpot.stat(percentiles), itl.stat(percentiles), e2el.stat(percentiles)
	m.TokensPerSecond, m.ConcurrentPerSecond, m.MaxConcurrentRequests = timeline(outs)
	for _, v := range m.TokensPerSecond {
		m.MaxOutputTokensPerS = max(m.MaxOutputTokensPerS, v)
	}
	return m
}

func meetsSLO(slo map[string]float64, ttft, tpot, e2el time.Duration) bool {
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	if v, ok := slo["ttft"]; ok && ms(ttft) > v {
		return false
	}
	if v, ok := slo["tpot"]; ok && ms(tpot) > v {
		return false
	}
	if v, ok := slo["e2el"]; ok && ms(e2el) > v {
		return false
	}
	return true
}

// latencyHist keeps exact sums for mean and standard deviation (as numpy computes them) and an
// HDR histogram (nanoseconds, 3 significant digits) for the median and percentiles.
type latencyHist struct {
	h        *hdrhistogram.Histogram
	n        int
	mean, m2 float64 // Welford's running mean and squared deviations, milliseconds
}

func newLatencyHist() *latencyHist {
	return &latencyHist{h: hdrhistogram.New(1, int64(24*time.Hour), 3)}
}

func (l *latencyHist) add(d time.Duration) {
	if d < 0 {
		d = 0
	}
	// RecordValue fails only above 24 h; such a value is clamped rather than lost.
	if l.h.RecordValue(int64(d)) != nil {
		_ = l.h.RecordValue(l.h.HighestTrackableValue())
	}
	ms := float64(d) / float64(time.Millisecond)
	l.n++
	delta := ms - l.mean
	l.mean += delta / float64(l.n)
	l.m2 += delta * (ms - l.mean)
}

func (l *latencyHist) stat(percentiles []float64) Stat {
	s := Stat{Count: l.n, Percentiles: make([]PercentileValue, len(percentiles))}
	for i, p := range percentiles {
		s.Percentiles[i].P = p
	}
	if l.n == 0 {
		return s // numpy on an empty list is treated as 0 by vLLM
	}
	s.Mean = l.mean
	s.Std = math.Sqrt(l.m2 / float64(l.n)) // population std, numpy's default
	qs := append([]float64{50}, percentiles...)
	vals := interpolatedPercentiles(l.h, qs)
	s.Median = vals[0]
	for i := range percentiles {
		s.Percentiles[i].Value = vals[i+1]
	}
	return s
}

// interpolatedPercentiles reads percentiles from the histogram with numpy's default (linear)
// interpolation between order statistics, each order statistic being the midpoint of its HDR
// bucket. Plain HDR nearest-rank percentiles differ from vLLM's numpy ones by a whole sample on
// small runs (the median of 16 requests, p99 of 16), which would break like-for-like
// comparison. Results are milliseconds.
func interpolatedPercentiles(h *hdrhistogram.Histogram, qs []float64) []float64 {
	n := h.TotalCount()
	type want struct {
		rank int64
		idx  int
		frac float64
		lo   bool
	}
	var wants []want
	for i, q := range qs {
		r := q / 100 * float64(n-1)
		lo := int64(math.Floor(r))
		wants = append(wants, want{rank: lo, idx: i, frac: r - float64(lo), lo: true})
		wants = append(wants, want{rank: min(lo+1, n-1), idx: i, frac: r - float64(lo)})
	}
	sort.Slice(wants, func(a, b int) bool { return wants[a].rank < wants[b].rank })
	loV := make([]float64, len(qs))
	hiV := make([]float64, len(qs))
	fracs := make([]float64, len(qs))
	var cum int64
	w := 0
	for _, bar := range h.Distribution() {
		if bar.Count == 0 {
			continue
		}
		cum += bar.Count
		mid := float64(bar.From+bar.To) / 2
		for w < len(wants) && wants[w].rank < cum {
			if wants[w].lo {
				loV[wants[w].idx] = mid
			} else {
				hiV[wants[w].idx] = mid
			}
			fracs[wants[w].idx] = wants[w].frac
			w++
		}
		if w == len(wants) {
			break
		}
	}
	out := make([]float64, len(qs))
	for i := range qs {
		out[i] = (loV[i] + (hiV[i]-loV[i])*fracs[i]) / float64(time.Millisecond)
	}
	return out
}

// timeline buckets token chunk arrivals and in-flight requests into one-second bins from the
// first request's start, and finds the exact peak concurrency, as vLLM does.
func timeline(outs []Outcome) (tokens, concurrent []float64, peak int) {
	var t0, tEnd time.Time
	for i := range outs {
		o := &outs[i]
		if !o.Success {
			continue
		}
		if t0.IsZero() || o.Start.Before(t0) {
			t0 = o.Start
		}
		if end := o.Start.Add(o.Latency); end.After(tEnd) {
			tEnd = end
		}
	}
	if t0.IsZero() {
		return nil, nil, 0
	}
	n := int(math.Ceil(tEnd.Sub(t0).Seconds())) + 1
	tokens, concurrent = make([]float64, n), make([]float64, n)
	type event struct {
		t     time.Duration
		delta int
	}
	var events []event
	for i := range outs {
		o := &outs[i]
		if !o.Success {
			continue
		}
		t := o.Start.Sub(t0) + o.TTFT
		addTok := func(t time.Duration) {
			if b := int(t / time.Second); b >= 0 && b < n {
				tokens[b]++
			}
		}
		addTok(t)
		for _, g := range o.ITL {
			t += g
			addTok(t)
		}
		s := o.Start.Sub(t0)
		e := s + o.Latency
		for b := int(s / time.Second); b < min(n, int(math.Ceil(e.Seconds()))); b++ {
			concurrent[b]++
		}
		events = append(events, event{s, 1}, event{e, -1})
	}
	sort.Slice(events, func(a, b int) bool {
		if events[a].t != events[b].t {
			return events[a].t < events[b].t
		}
		return events[a].delta < events[b].delta
	})
	cur := 0
	for _, e := range events {
		cur += e.delta
		peak = max(peak, cur)
	}
	return tokens, concurrent, peak
}
