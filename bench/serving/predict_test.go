package serving

import (
	"strings"
	"testing"
)

func TestResultShape(t *testing.T) {
	for _, tc := range []struct {
		name        string
		concurrency int
		m           Metrics
		want        Shape
	}{
		{"limited", 4, Metrics{Completed: 10, TotalInput: 1281, TotalOutput: 320}, Shape{4, 10, 128, 32}},
		{"unlimited: every prompt at once", 0, Metrics{Completed: 8, TotalInput: 800, TotalOutput: 80}, Shape{8, 8, 100, 10}},
		{"limit above the prompts", 64, Metrics{Completed: 8, TotalInput: 8, TotalOutput: 8}, Shape{8, 8, 1, 1}},
		{"nothing completed", 4, Metrics{}, Shape{0, 0, 0, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &Result{Config: Config{MaxConcurrency: tc.concurrency}, Metrics: tc.m}
			if got := r.Shape(); got != tc.want {
				t.Fatalf("Shape() = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestPrintPrediction(t *testing.T) {
	r := &Result{Config: Config{MaxConcurrency: 16}, Metrics: Metrics{Completed: 64, TotalInput: 64 * 128, TotalOutput: 64 * 32,
		OutputThroughput: 500, TotalTokenThroughput: 2500, TTFT: Stat{Mean: 400}, TPOT: Stat{Mean: 20}}}
	p := &Prediction{Source: "plan.json (2 CPU stage(s))", OutputTokensPerS: 550, TotalTokensPerS: 2250, MeanTTFTMs: 300,
		MeanTPOTMs: 20, Bottleneck: "stage 1"}
	var b strings.Builder
	r.PrintPrediction(&b, p)
	out := b.String()
	for _, want := range []string{
		"Measured vs Predicted",
		"Prediction:                       plan.json (2 CPU stage(s))",
		"Shape:                            concurrency 16, 64 prompts, 128 in / 32 out tokens",
		"Output token throughput (tok/s):      500.00     550.00   +10.0%",
		"Total token throughput (tok/s):      2500.00    2250.00   -10.0%",
		"Mean TTFT (ms):                       400.00     300.00   -25.0%",
		"Mean TPOT (ms):                        20.00      20.00    +0.0%",
		"Busiest (predicted):              stage 1",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in\n%s", want, out)
		}
	}
}

func TestRelErr(t *testing.T) {
	for _, tc := range []struct {
		measured, predicted float64
		want                string
	}{
		{100, 125, "+25.0%"},
		{200, 150, "-25.0%"},
		{0, 5, "n/a"},
	} {
		if got := relErr(tc.measured, tc.predicted); got != tc.want {
			t.Errorf("relErr(%g, %g) = %q, want %q", tc.measured, tc.predicted, got, tc.want)
		}
	}
}
