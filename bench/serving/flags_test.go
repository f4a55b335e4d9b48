package serving

import (
	"io"
	"math"
	"slices"
	"strings"
	"testing"
)

// TestParseSeedCommand parses the GLM-4.5 recipe's `vllm bench serve` arguments unchanged.
func TestParseSeedCommand(t *testing.T) {
	args := strings.Fields(`--base-url http://10.0.0.5:30000/ --model zai-org/GLM-4.5 --dataset-name random
		--random-input-len 8000 --random-output-len 1000 --request-rate 10000 --num-prompts 16 --ignore-eos
		--goodput ttft:2000 tpot:50 --max-concurrency 16 --percentile-metrics ttft,tpot,itl,e2el
		--metric-percentiles 50,90,99.9 --save-result --result-dir out --plot run.png --seed 3`)
	o, err := ParseFlags(args, io.Discard, func(string) string { return "sk-env" })
	if err != nil {
		t.Fatal(err)
	}
	c := o.Config
	if c.BaseURL != "http://10.0.0.5:30000" || c.Endpoint != "/v1/completions" || c.Model != "zai-org/GLM-4.5" {
		t.Errorf("target %s %s %s", c.BaseURL, c.Endpoint, c.Model)
	}
	if c.RandomInputLen != 8000 || c.RandomOutputLen != 1000 || c.RequestRate != 10000 || c.NumPrompts != 16 || !c.IgnoreEOS {
		t.Errorf("workload %+v", c)
	}
	if c.Goodput["ttft"] != 2000 || c.Goodput["tpot"] != 50 || len(c.Goodput) != 2 {
		t.Errorf("goodput %v", c.Goodput)
	}
	if !slices.Equal(c.PercentileMetrics, []string{"ttft", "tpot", "itl", "e2el"}) || !slices.Equal(c.MetricPercentiles, []float64{50, 90, 99.9}) {
		t.Errorf("percentiles %v %v", c.PercentileMetrics, c.MetricPercentiles)
	}
	if c.APIKey != "sk-env" || c.MaxConcurrency != 16 || !c.SaveResult || c.ResultDir != "out" || c.PlotPath != "run.png" || c.Seed != 3 {
		t.Errorf("misc %+v", c)
	}
}

func TestParseDefaultsAndHostPort(t *testing.T) {
	o, err := ParseFlags([]string{"--host", "::1", "--port", "9000", "--request-rate", "inf", "--api-key", "k",
		"--endpoint", "v1/chat/completions"}, io.Discard, func(string) string { return "env" })
	if err != nil {
		t.Fatal(err)
	}
	c := o.Config
	if c.BaseURL != "http://[::1]:9000" || !math.IsInf(c.RequestRate, 1) || c.APIKey != "k" || c.Endpoint != "/v1/chat/completions" {
		t.Errorf("%+v", c)
	}
	if c.NumPrompts != 1000 || c.RandomInputLen != 1024 || c.RandomOutputLen != 128 || c.Burstiness != 1 ||
		!slices.Equal(c.PercentileMetrics, []string{"ttft", "tpot", "itl"}) || !slices.Equal(c.MetricPercentiles, []float64{99}) {
		t.Errorf("vLLM defaults not kept: %+v", c)
	}
	if !c.IgnoreEOS {
		t.Error("random dataset forces ignore_eos, as in vLLM")
	}
}

func TestParseFlagErrors(t *testing.T) {
	for _, tc := range []struct{ args, want string }{
		{"--dataset-name sonnet", "dataset-name"},
		{"--dataset-name sharegpt", "dataset-path"},
		{"--dataset-path x.json", "takes no --dataset-path"},
		{"--random-range-ratio 1", "range-ratio"},
		{"--random-input-len 0", "empty prompts"},
		{"--num-prompts 0", "num-prompts"},
		{"--request-rate 0", "request-rate"},
		{"--request-rate fast", "request-rate"},
		{"--burstiness -1", "burstiness"},
		{"--max-concurrency -2", "max-concurrency"},
		{"--goodput ttft=5", "KEY:VALUE"},
		{"--goodput itl:5", "ttft, tpot or e2el"},
		{"--goodput ttft:-1", "non-negative"},
		{"--percentile-metrics ttft,foo", "percentile-metrics"},
		{"--metric-percentiles 101", "metric-percentiles"},
		{"--metric-percentiles x", "metric-percentiles"},
		{"--plot out.pdf", ".png or .svg"},
		{"--base-url ftp://x", "base url"},
		{"--endpoint /v1/embeddings", "endpoint"},
		{"--extra-body {", "extra-body"},
		{"--no-such-flag", "not defined"},
		{"stray", "unexpected"},
	} {
		var errOut strings.Builder
		_, err := ParseFlags(strings.Fields(tc.args), &errOut, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want it to mention %q", tc.args, err, tc.want)
		}
	}
}
