package serving

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Result is one finished benchmark.
type Result struct {
	Config    Config
	Model     string
	Date      time.Time
	Duration  time.Duration
	Outcomes  []Outcome
	Metrics   Metrics
	Spec      *SpecDecodeStats
	Requested []Request
}

// kv is one member of an ordered JSON object: the result file keeps vLLM's key order.
type kv struct {
	K string
	V any
}

type orderedObject []kv

func (o orderedObject) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, e := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(e.K)
		b.Write(k)
		b.WriteByte(':')
		v, err := json.Marshal(e.V)
		if err != nil {
			return nil, fmt.Errorf("result key %s: %w", e.K, err)
		}
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func seconds(d time.Duration) float64 { return d.Seconds() }

// pyFloat formats like Python's str(float): 10.0, 0.5, inf.
func pyFloat(v float64) string {
	if math.IsInf(v, 1) {
		return "inf"
	}
	s := strconv.FormatFloat(v, 'f', -1, 64)
	if !strings.ContainsAny(s, ".e") {
		s += ".0"
	}
	return s
}

// jsonFloat keeps NaN and Inf out of JSON, which cannot carry them.
func jsonFloat(v float64) any {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return nil
	}
	return v
}

// percentileWord is vLLM's key spelling: 99 -> "99", 99.9 -> "99.9".
func percentileWord(p float64) string { return strconv.FormatFloat(p, 'f', -1, 64) }

func (r *Result) label() string {
	if r.Config.Label != "" {
		return r.Config.Label
	}
	return "openai"
}

func (r *Result) stat(name string) Stat {
	switch name {
	case "ttft":
		return r.Metrics.TTFT
	case "tpot":
		return r.Metrics.TPOT
	case "itl":
		return r.Metrics.ITL
	}
	return r.Metrics.E2EL
}

// JSON builds the result file with vLLM's keys and order. Per-request arrays other than
// latencies and queue_times are kept only with --save-detailed, as in vLLM.
func (r *Result) JSON() orderedObject {
	c, m := &r.Config, &r.Metrics
	var rate any = c.RequestRate
	if math.IsInf(c.RequestRate, 1) {
		rate = "inf"
	}
	var maxConc any
	if c.MaxConcurrency > 0 {
		maxConc = c.MaxConcurrency
	}
	tokID := r.Model // vLLM's tokenizer_id defaults to the model
	if c.TokenizerPath != "" {
		tokID = c.TokenizerPath
	}
	var goodput any
	if len(c.Goodput) > 0 {
		goodput = m.RequestGoodput
	}
	n := len(r.Outcomes)
	inputLens, ttfts, latencies, starts, queues := make([]int, n), make([]float64, n), make([]float64, n), make([]float64, n), make([]float64, n)
	itls, texts, errs := make([][]float64, n), make([]string, n), make([]string, n)
	var t0 time.Time
	for i := range r.Outcomes {
		if s := r.Outcomes[i].Start; !s.IsZero() && (t0.IsZero() || s.Before(t0)) {
			t0 = s
		}
	}
	for i, o := range r.Outcomes {
		inputLens[i], ttfts[i], latencies[i], queues[i] = o.PromptLen, seconds(o.TTFT), seconds(o.Latency), seconds(o.QueueTime)
		if !o.Start.IsZero() {
			starts[i] = seconds(o.Start.Sub(t0))
		}
		itls[i] = make([]float64, len(o.ITL))
		for j, g := range o.ITL {
			itls[i][j] = seconds(g)
		}
		texts[i], errs[i] = o.Text, o.Err
	}
	out := orderedObject{
		{"date", r.Date.Format("20060102-150405")},
		{"endpoint_type", "openai"},
		{"backend", "openai"},
		{"label", nilIfEmpty(c.Label)},
		{"model_id", r.Model},
		{"tokenizer_id", tokID},
		{"num_prompts", c.NumPrompts},
		{"request_rate", rate},
		{"burstiness", c.Burstiness},
		{"max_concurrency", maxConc},
		{"duration", seconds(r.Duration)},
		{"completed", m.Completed},
		{"failed", m.Failed},
		{"total_input_tokens", m.TotalInput},
		{"total_output_tokens", m.TotalOutput},
		{"request_throughput", m.RequestThroughput},
		{"request_goodput", goodput},
		{"output_throughput", m.OutputThroughput},
		{"total_token_throughput", m.TotalTokenThroughput},
	}
	if c.SaveDetailed {
		out = append(out, kv{"input_lens", inputLens}, kv{"output_lens", m.OutputLens}, kv{"ttfts", ttfts}, kv{"itls", itls})
	}
	out = append(out, kv{"latencies", latencies})
	if c.SaveDetailed {
		out = append(out, kv{"start_times", starts})
	}
	out = append(out, kv{"queue_times", queues})
	if c.SaveDetailed {
		out = append(out, kv{"generated_texts", texts}, kv{"errors", errs})
	}
	out = append(out,
		kv{"max_output_tokens_per_s", m.MaxOutputTokensPerS},
		kv{"max_concurrent_requests", m.MaxConcurrentRequests},
		kv{"rtfx", 0.0})
	if s := r.Spec; s != nil {
		out = append(out,
			kv{"spec_decode_acceptance_rate", s.AcceptanceRate},
			kv{"spec_decode_acceptance_length", s.AcceptanceLength},
			kv{"spec_decode_num_drafts", s.NumDrafts},
			kv{"spec_decode_draft_tokens", s.DraftTokens},
			kv{"spec_decode_accepted_tokens", s.AcceptedTokens},
			kv{"spec_decode_per_position_acceptance_rates", nonNil(s.PerPositionRates)})
	}
	for _, name := range c.PercentileMetrics {
		st := r.stat(name)
		out = append(out,
			kv{"mean_" + name + "_ms", jsonFloat(st.Mean)},
			kv{"median_" + name + "_ms", jsonFloat(st.Median)},
			kv{"std_" + name + "_ms", jsonFloat(st.Std)})
		for _, p := range st.Percentiles {
			out = append(out, kv{"p" + percentileWord(p.P) + "_" + name + "_ms", jsonFloat(p.Value)})
		}
	}
	return out
}

func nilIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}

func nonNil(v []float64) []float64 {
	if v == nil {
		return []float64{}
	}
	return v
}

// Filename is vLLM's default result file name unless --result-filename is set, inside
// --result-dir when given.
func (r *Result) Filename() string {
	c := &r.Config
	name := c.ResultFilename
	if name == "" {
		conc := ""
		if c.MaxConcurrency > 0 {
			conc = fmt.Sprintf("-concurrency%d", c.MaxConcurrency)
		}
		base := r.Model[strings.LastIndexByte(r.Model, '/')+1:]
		name = fmt.Sprintf("%s-%sqps%s-%s-%s.json", r.label(), pyFloat(c.RequestRate), conc, base, r.Date.Format("20060102-150405"))
	}
	if c.ResultDir != "" {
		name = filepath.Join(c.ResultDir, name)
	}
	return name
}

// Save writes the result file and returns its path.
func (r *Result) Save() (string, error) {
	path := r.Filename()
	if dir := filepath.Dir(path); dir != "." {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", fmt.Errorf("result dir: %w", err)
		}
	}
	b, err := json.Marshal(r.JSON())
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return "", fmt.Errorf("write result: %w", err)
	}
	return path, nil
}

// PrintSummary writes vLLM's summary table, then the failures grouped by error.
func (r *Result) PrintSummary(w io.Writer) {
	c, m := &r.Config, &r.Metrics
	head := func(title string, fill byte) {
		pad := 50 - len(title)
		fmt.Fprintf(w, "%s%s%s\n", strings.Repeat(string(fill), pad/2), title, strings.Repeat(string(fill), pad-pad/2))
	}
	row := func(name string, v any) {
		switch x := v.(type) {
		case float64:
			fmt.Fprintf(w, "%-40s %-10.2f\n", name, x)
		default:
			fmt.Fprintf(w, "%-40s %-10v\n", name, x)
		}
	}
	head(" Serving Benchmark Result ", '=')
	row("Successful requests:", m.Completed)
	row("Failed requests:", m.Failed)
	if c.MaxConcurrency > 0 {
		row("Maximum request concurrency:", c.MaxConcurrency)
	}
	if !math.IsInf(c.RequestRate, 1) {
		row("Request rate configured (RPS):", c.RequestRate)
	}
	row("Benchmark duration (s):", r.Duration.Seconds())
	row("Total input tokens:", m.TotalInput)
	row("Total generated tokens:", m.TotalOutput)
	row("Request throughput (req/s):", m.RequestThroughput)
	if len(c.Goodput) > 0 {
		row("Request goodput (req/s):", m.RequestGoodput)
	}
	row("Output token throughput (tok/s):", m.OutputThroughput)
	row("Peak output token throughput (tok/s):", m.MaxOutputTokensPerS)
	row("Peak concurrent requests:", float64(m.MaxConcurrentRequests))
	row("Total token throughput (tok/s):", m.TotalTokenThroughput)
	titles := map[string][2]string{
		"ttft": {"TTFT", "Time to First Token"},
		"tpot": {"TPOT", "Time per Output Token (excl. 1st token)"},
		"itl":  {"ITL", "Inter-token Latency"},
		"e2el": {"E2EL", "End-to-end Latency"},
	}
	for _, name := range []string{"ttft", "tpot", "itl", "e2el"} {
		if !contains(c.PercentileMetrics, name) {
			continue
		}
		t, st := titles[name], r.stat(name)
		head(t[1], '-')
		row("Mean "+t[0]+" (ms):", st.Mean)
		row("Median "+t[0]+" (ms):", st.Median)
		for _, p := range st.Percentiles {
			row("P"+percentileWord(p.P)+" "+t[0]+" (ms):", p.Value)
		}
	}
	if s := r.Spec; s != nil {
		head("Speculative Decoding", '-')
		row("Acceptance rate (%):", s.AcceptanceRate)
		row("Acceptance length:", s.AcceptanceLength)
		row("Drafts:", s.NumDrafts)
		row("Draft tokens:", s.DraftTokens)
		row("Accepted tokens:", s.AcceptedTokens)
		if len(s.PerPositionRates) > 0 {
			fmt.Fprintln(w, "Per-position acceptance (%):")
			for i, rate := range s.PerPositionRates {
				row(fmt.Sprintf("  Position %d:", i), rate*100)
			}
		}
	}
	fmt.Fprintln(w, strings.Repeat("=", 50))
	if m.Failed > 0 {
		fmt.Fprintf(w, "%d requests failed:\n", m.Failed)
		for _, e := range ErrorSummary(r.Outcomes) {
			fmt.Fprintf(w, "  %6d × %s\n", e.Count, e.Err)
		}
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// ErrorCount is one distinct failure and how often it happened.
type ErrorCount struct {
	Err   string
	Count int
}

// ErrorSummary groups failed requests by error message, most frequent first.
func ErrorSummary(outs []Outcome) []ErrorCount {
	counts := map[string]int{}
	for _, o := range outs {
		if !o.Success {
			msg := o.Err
			if len(msg) > 200 {
				msg = msg[:200] + "…"
			}
			counts[msg]++
		}
	}
	out := make([]ErrorCount, 0, len(counts))
	for e, n := range counts {
		out = append(out, ErrorCount{e, n})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Count != out[j].Count {
			return out[i].Count > out[j].Count
		}
		return out[i].Err < out[j].Err
	})
	return out
}
