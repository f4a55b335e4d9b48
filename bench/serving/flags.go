package serving

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"strconv"
	"strings"

	"github.com/glmtopo/glmtopo/internal/cliflag"
)

// Options are the command-line settings that are not part of Config itself.
type Options struct {
	Config
	// TokenizerDir is --tokenizer: a directory holding tokenizer.json (or the file itself).
	TokenizerDir string
	// PredictFromPlan is --predict-from-plan: a plan file (`glmtopo plan
	// --output json`) whose prediction for this run is printed beside it.
	PredictFromPlan string
}

// ParseFlags parses `glmtopo bench serve` arguments, named as `vllm bench serve` names them.
// getenv supplies OPENAI_API_KEY when --api-key is absent.
func ParseFlags(args []string, stderr io.Writer, getenv func(string) string) (Options, error) {
	def := DefaultConfig()
	o := Options{Config: def}
	c := &o.Config
	fs := flag.NewFlagSet("glmtopo bench serve", flag.ContinueOnError)
	fs.SetOutput(stderr)

	var baseURL, host, endpoint, percentileMetrics, metricPercentiles, requestRate, goodput, extraBody string
	var port int
	var temperature float64 = math.NaN()
	fs.StringVar(&baseURL, "base-url", "", "server base URL (overrides --host/--port), e.g. http://10.0.0.1:8000")
	fs.StringVar(&host, "host", "127.0.0.1", "server host")
	fs.IntVar(&port, "port", 8000, "server port")
	fs.StringVar(&endpoint, "endpoint", def.Endpoint, "API endpoint: /v1/completions or /v1/chat/completions")
	fs.StringVar(&c.Model, "model", "", "model name sent to the server (default: first model of /v1/models)")
	fs.StringVar(&c.Label, "label", "", "label (prefix) of the result file (default \"openai\")")
	fs.StringVar(&c.APIKey, "api-key", "", "bearer token (default $OPENAI_API_KEY)")
	fs.StringVar(&o.TokenizerDir, "tokenizer", "", "directory with the server's tokenizer.json: makes random prompts token-exact")
	fs.StringVar(&o.PredictFromPlan, "predict-from-plan", "", "plan file ('glmtopo plan --cpu-stages N --output json'): print its prediction for this run's shape beside the measured numbers")
	fs.StringVar(&c.DatasetName, "dataset-name", def.DatasetName, "random, sharegpt or custom")
	fs.StringVar(&c.DatasetPath, "dataset-path", "", "ShareGPT JSON or custom JSONL file")
	fs.IntVar(&c.RandomInputLen, "random-input-len", def.RandomInputLen, "random dataset: prompt tokens")
	fs.IntVar(&c.RandomOutputLen, "random-output-len", def.RandomOutputLen, "random dataset: output tokens")
	fs.Float64Var(&c.RandomRangeRatio, "random-range-ratio", 0, "random dataset: lengths uniform in [L(1-r), L(1+r)]")
	fs.IntVar(&c.RandomPrefixLen, "random-prefix-len", 0, "random dataset: shared prefix tokens before each prompt")
	fs.IntVar(&c.SharegptOutputLen, "sharegpt-output-len", 0, "sharegpt: output tokens (default: the dataset's completion length)")
	fs.IntVar(&c.CustomOutputLen, "custom-output-len", def.CustomOutputLen, "custom dataset: output tokens")
	fs.IntVar(&c.NumPrompts, "num-prompts", def.NumPrompts, "number of requests")
	fs.StringVar(&requestRate, "request-rate", "inf", "requests per second (Poisson/gamma arrivals); inf sends all at once")
	fs.Float64Var(&c.Burstiness, "burstiness", 1, "gamma shape of inter-arrival times: 1 Poisson, <1 burstier, >1 more uniform")
	fs.IntVar(&c.MaxConcurrency, "max-concurrency", 0, "most requests in flight (0: unlimited)")
	fs.BoolVar(&c.IgnoreEOS, "ignore-eos", false, "send ignore_eos (always on for the random dataset, as in vLLM)")
	fs.Int64Var(&c.Seed, "seed", 0, "random seed for prompts and arrivals")
	fs.Float64Var(&temperature, "temperature", math.NaN(), "sampling temperature (default: server's)")
	fs.StringVar(&extraBody, "extra-body", "", "JSON object merged into every request body")
	fs.StringVar(&goodput, "goodput", "", "SLOs as KEY:MS pairs (ttft, tpot, e2el), e.g. --goodput ttft:500 tpot:50")
	fs.StringVar(&percentileMetrics, "percentile-metrics", "ttft,tpot,itl", "metrics to report percentiles for (ttft,tpot,itl,e2el)")
	fs.StringVar(&metricPercentiles, "metric-percentiles", "99", "percentiles to report, e.g. 50,90,99")
	fs.BoolVar(&c.SaveResult, "save-result", false, "write the result JSON file")
	fs.BoolVar(&c.SaveDetailed, "save-detailed", false, "include per-request arrays (ttfts, itls, ...) in the result file")
	fs.StringVar(&c.ResultDir, "result-dir", "", "directory for the result file")
	fs.StringVar(&c.ResultFilename, "result-filename", "", "result file name (default {label}-{rate}qps[-concurrencyN]-{model}-{date}.json)")
	fs.StringVar(&c.PlotPath, "plot", "", "write latency CDFs and tokens/s over time to FILE.png or FILE.svg")
	fs.BoolVar(&c.DisableTQDM, "disable-tqdm", false, "no progress bar")

	if err := cliflag.Parse(fs, joinMultiValue(args, "goodput")); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if baseURL != "" {
		c.BaseURL = strings.TrimRight(baseURL, "/")
	} else {
		c.BaseURL = "http://" + net.JoinHostPort(host, strconv.Itoa(port))
	}
	c.Endpoint = endpoint
	if !strings.HasPrefix(c.Endpoint, "/") {
		c.Endpoint = "/" + c.Endpoint
	}
	if c.APIKey == "" && getenv != nil {
		c.APIKey = getenv("OPENAI_API_KEY")
	}
	rate, err := strconv.ParseFloat(requestRate, 64)
	if err != nil {
		return o, fmt.Errorf("--request-rate %q: %w", requestRate, err)
	}
	c.RequestRate = rate
	if !math.IsNaN(temperature) {
		c.Temperature = &temperature
	}
	if extraBody != "" {
		if err := json.Unmarshal([]byte(extraBody), &c.ExtraBody); err != nil {
			return o, fmt.Errorf("--extra-body: %w", err)
		}
	}
	if goodput != "" {
		if c.Goodput, err = ParseGoodput(strings.Fields(goodput)); err != nil {
			return o, err
		}
	}
	c.PercentileMetrics = nil
	for _, m := range strings.Split(percentileMetrics, ",") {
		if m = strings.TrimSpace(m); m != "" {
			c.PercentileMetrics = append(c.PercentileMetrics, m)
		}
	}
	if c.MetricPercentiles, err = parseFloatList(metricPercentiles); err != nil {
		return o, fmt.Errorf("--metric-percentiles: %w", err)
	}
	c.TokenizerPath = o.TokenizerDir
	// vLLM forces ignore_eos for random prompts so generation runs to the requested length.
	if c.DatasetName == "random" {
		c.IgnoreEOS = true
	}
	return o, c.Validate()
}

// joinMultiValue lets argparse-style "--goodput a b c" reach Go's flag package as one value:
// the words after the flag up to the next flag are joined with spaces.
func joinMultiValue(args []string, name string) []string {
	out := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a != "--"+name && a != "-"+name {
			out = append(out, a)
			continue
		}
		var vals []string
		for i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			i++
			vals = append(vals, args[i])
		}
		out = append(out, "--"+name+"="+strings.Join(vals, " "))
	}
	return out
}
