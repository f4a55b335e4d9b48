// Package serving is the serving benchmark client behind `glmtopo bench serve`: the same
// measurement as `vllm bench serve` (random/ShareGPT/custom prompts, Poisson or gamma
// arrivals, streaming TTFT/TPOT/ITL/E2EL, goodput, vLLM's result-file keys) against any
// OpenAI-compatible server: glmtopo, vLLM or SGLang.
package serving

import (
	"fmt"
	"math"
	"net/url"
	"strconv"
	"strings"
)

// Tokenizer is what the benchmark needs from the server's tokenizer to build token-exact
// random prompts. serve/tokenizer satisfies it; tests use small fakes.
type Tokenizer interface {
	Encode(text string) []int
	Decode(ids []int) string
	VocabSize() int
}

// specialChecker is optionally implemented by a Tokenizer: random prompts never draw
// special tokens.
type specialChecker interface {
	IsSpecial(id int) bool
}

// Config is one benchmark run. Zero values are not defaults: use DefaultConfig.
type Config struct {
	BaseURL  string // scheme://host:port, no trailing slash
	Endpoint string // /v1/completions or /v1/chat/completions
	Model    string // sent as "model"; empty: first model of GET /v1/models
	APIKey   string
	Label    string // result label; defaults to "openai" like vLLM's backend name

	DatasetName       string // random, sharegpt, custom
	DatasetPath       string
	RandomInputLen    int
	RandomOutputLen   int
	RandomRangeRatio  float64
	RandomPrefixLen   int
	SharegptOutputLen int // 0: the dataset's own completion length
	CustomOutputLen   int
	NumPrompts        int

	RequestRate    float64 // requests/s; +Inf sends all at once
	Burstiness     float64 // gamma shape of inter-arrival times; 1 is Poisson
	MaxConcurrency int     // 0: unlimited
	IgnoreEOS      bool
	Seed           int64
	Temperature    *float64
	ExtraBody      map[string]any

	Goodput           map[string]float64 // SLO name (ttft, tpot, e2el) -> milliseconds
	PercentileMetrics []string
	MetricPercentiles []float64

	SaveResult     bool
	SaveDetailed   bool
	ResultDir      string
	ResultFilename string
	PlotPath       string
	DisableTQDM    bool // vLLM's flag name for "no progress bar"

	// TokenizerPath is reported in the result; Tokenizer is the loaded tokenizer or nil.
	TokenizerPath string
	Tokenizer     Tokenizer
}

// DefaultConfig returns vLLM's defaults.
func DefaultConfig() Config {
	return Config{
		BaseURL:           "http://127.0.0.1:8000",
		Endpoint:          "/v1/completions",
		DatasetName:       "random",
		RandomInputLen:    1024,
		RandomOutputLen:   128,
		CustomOutputLen:   256,
		NumPrompts:        1000,
		RequestRate:       math.Inf(1),
		Burstiness:        1,
		PercentileMetrics: []string{"ttft", "tpot", "itl"},
		MetricPercentiles: []float64{99},
	}
}

func (c *Config) chat() bool { return strings.HasSuffix(c.Endpoint, "chat/completions") }

// Validate reports the first bad setting.
func (c *Config) Validate() error {
	u, err := url.Parse(c.BaseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("base url %q: want http(s)://host[:port]", c.BaseURL)
	}
	if !strings.HasSuffix(c.Endpoint, "/completions") {
		return fmt.Errorf("endpoint %q: only /v1/completions and /v1/chat/completions are supported", c.Endpoint)
	}
	switch c.DatasetName {
	case "random":
		if c.DatasetPath != "" {
			return fmt.Errorf("dataset random takes no --dataset-path (got %q)", c.DatasetPath)
		}
		if c.RandomRangeRatio < 0 || c.RandomRangeRatio >= 1 {
			return fmt.Errorf("--random-range-ratio %g: must be in [0, 1)", c.RandomRangeRatio)
		}
		if c.RandomInputLen < 0 || c.RandomOutputLen < 1 || c.RandomPrefixLen < 0 {
			return fmt.Errorf("random lengths: input %d, output %d, prefix %d: want input >= 0, output >= 1, prefix >= 0",
				c.RandomInputLen, c.RandomOutputLen, c.RandomPrefixLen)
		}
		if c.RandomPrefixLen+int(math.Floor(float64(c.RandomInputLen)*(1-c.RandomRangeRatio))) < 1 {
			return fmt.Errorf("--random-input-len %d with --random-range-ratio %g and --random-prefix-len %d can give empty prompts",
				c.RandomInputLen, c.RandomRangeRatio, c.RandomPrefixLen)
		}
	case "sharegpt", "custom":
		if c.DatasetPath == "" {
			return fmt.Errorf("dataset %s needs --dataset-path", c.DatasetName)
		}
	default:
		return fmt.Errorf("--dataset-name %q: want random, sharegpt or custom", c.DatasetName)
	}
	if c.NumPrompts < 1 {
		return fmt.Errorf("--num-prompts %d: must be at least 1", c.NumPrompts)
	}
	if !(c.RequestRate > 0) {
		return fmt.Errorf("--request-rate %g: must be positive (inf sends all at once)", c.RequestRate)
	}
	if !(c.Burstiness > 0) {
		return fmt.Errorf("--burstiness %g: must be positive", c.Burstiness)
	}
	if c.MaxConcurrency < 0 {
		return fmt.Errorf("--max-concurrency %d: must be positive", c.MaxConcurrency)
	}
	for name, v := range c.Goodput {
		switch name {
		case "ttft", "tpot", "e2el":
		default:
			return fmt.Errorf("--goodput %s: SLO name must be ttft, tpot or e2el", name)
		}
		if v < 0 || math.IsNaN(v) {
			return fmt.Errorf("--goodput %s:%g: SLO must be non-negative milliseconds", name, v)
		}
	}
	for _, m := range c.PercentileMetrics {
		switch m {
		case "ttft", "tpot", "itl", "e2el":
		default:
			return fmt.Errorf("--percentile-metrics %q: want ttft, tpot, itl or e2el", m)
		}
	}
	for _, p := range c.MetricPercentiles {
		if !(p >= 0 && p <= 100) {
			return fmt.Errorf("--metric-percentiles %g: must be in [0, 100]", p)
		}
	}
	if c.PlotPath != "" && !strings.HasSuffix(c.PlotPath, ".png") && !strings.HasSuffix(c.PlotPath, ".svg") {
		return fmt.Errorf("--plot %q: file must end in .png or .svg", c.PlotPath)
	}
	return nil
}

// ParseGoodput parses vLLM's "ttft:500 tpot:50" SLO list (values in milliseconds).
func ParseGoodput(pairs []string) (map[string]float64, error) {
	out := make(map[string]float64, len(pairs))
	for _, pair := range pairs {
		name, val, ok := strings.Cut(pair, ":")
		if !ok {
			return nil, fmt.Errorf("goodput %q: want KEY:VALUE with the value in milliseconds", pair)
		}
		v, err := strconv.ParseFloat(val, 64)
		if err != nil {
			return nil, fmt.Errorf("goodput %q: %w", pair, err)
		}
		out[name] = v
	}
	return out, nil
}

// parseFloatList parses "25,50,99".
func parseFloatList(s string) ([]float64, error) {
	var out []float64
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		v, err := strconv.ParseFloat(f, 64)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", f, err)
		}
		out = append(out, v)
	}
	return out, nil
}
