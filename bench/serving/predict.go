package serving

import (
	"fmt"
	"io"
	"math"
	"strings"
)

// Shape is what a benchmark run measured, in the terms a planner predicts:
// requests in flight at most, requests completed, and mean prompt and output
// tokens per request.
type Shape struct {
	Concurrency, NumPrompts, InputLen, OutputLen int
}

// Prediction is a planner's answer for a Shape (`--predict-from-plan`).
type Prediction struct {
	Source           string // what predicted it, e.g. the plan file and its layout
	OutputTokensPerS float64
	TotalTokensPerS  float64
	MeanTTFTMs       float64
	MeanTPOTMs       float64
	Bottleneck       string // the busiest resource the planner predicts, if it says
}

// Predictor answers for the shape a run measured.
type Predictor func(Shape) (*Prediction, error)

// Shape is the run's shape: --max-concurrency (all prompts when unlimited)
// and the completed requests' mean lengths.
func (r *Result) Shape() Shape {
	m := &r.Metrics
	s := Shape{Concurrency: r.Config.MaxConcurrency, NumPrompts: m.Completed}
	if s.Concurrency <= 0 || s.Concurrency > s.NumPrompts {
		s.Concurrency = s.NumPrompts
	}
	if m.Completed > 0 {
		s.InputLen = int(math.Round(float64(m.TotalInput) / float64(m.Completed)))
		s.OutputLen = int(math.Round(float64(m.TotalOutput) / float64(m.Completed)))
	}
	return s
}

// PrintPrediction writes the measured summary figures beside p's, with the
// prediction's error relative to the measurement.
func (r *Result) PrintPrediction(w io.Writer, p *Prediction) {
	const width = 50
	title := " Measured vs Predicted "
	pad := width - len(title)
	fmt.Fprintf(w, "%s%s%s\n", strings.Repeat("=", pad/2), title, strings.Repeat("=", pad-pad/2))
	if p.Source != "" {
		fmt.Fprintf(w, "%-33s %s\n", "Prediction:", p.Source)
	}
	s := r.Shape()
	fmt.Fprintf(w, "%-33s concurrency %d, %d prompts, %d in / %d out tokens\n", "Shape:", s.Concurrency, s.NumPrompts, s.InputLen, s.OutputLen)
	fmt.Fprintf(w, "%-33s %10s %10s %8s\n", "", "measured", "predicted", "error")
	m := &r.Metrics
	for _, row := range []struct {
		name      string
		got, want float64
	}{
		{"Output token throughput (tok/s):", m.OutputThroughput, p.OutputTokensPerS},
		{"Total token throughput (tok/s):", m.TotalTokenThroughput, p.TotalTokensPerS},
		{"Mean TTFT (ms):", r.stat("ttft").Mean, p.MeanTTFTMs},
		{"Mean TPOT (ms):", r.stat("tpot").Mean, p.MeanTPOTMs},
	} {
		fmt.Fprintf(w, "%-33s %10.2f %10.2f %8s\n", row.name, row.got, row.want, relErr(row.got, row.want))
	}
	if p.Bottleneck != "" {
		fmt.Fprintf(w, "%-33s %s\n", "Busiest (predicted):", p.Bottleneck)
	}
	fmt.Fprintln(w, strings.Repeat("=", width))
}

// relErr is (predicted − measured) / measured as a signed percentage.
func relErr(measured, predicted float64) string {
	if measured == 0 || math.IsNaN(measured) || math.IsNaN(predicted) {
		return "n/a"
	}
	return fmt.Sprintf("%+.1f%%", 100*(predicted-measured)/measured)
}
