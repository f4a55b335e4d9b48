package serving

import (
	"context"
	"fmt"
	"io"
	"math"
	"strings"
	"sync/atomic"
	"time"
)

// Run executes one benchmark: sample prompts, check the server with a one-token probe (which
// also calibrates prompt lengths), send requests on the arrival schedule, and summarise. It
// prints vLLM's summary table to stdout and progress and warnings to stderr; it saves the
// result file and plot when configured. A cancelled ctx ends the run early with the requests
// still in flight counted as failed; the partial result comes back with ctx's error.
func Run(ctx context.Context, cfg Config, stdout, stderr io.Writer) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	hc := newHTTPClient(cfg.NumPrompts)
	defer hc.CloseIdleConnections()
	model := cfg.Model
	if model == "" {
		m, err := firstModel(ctx, hc, &cfg)
		if err != nil {
			return nil, err
		}
		model = m
		fmt.Fprintf(stdout, "Model not specified, using the server's first model: %s\n", model)
	}
	cl := newClient(hc, &cfg, model, cfg.SaveDetailed)

	ds, overhead, err := prepareDataset(ctx, &cfg, cl, stderr)
	if err != nil {
		return nil, err
	}
	reqs := ds.Requests

	dist := "Poisson process"
	if cfg.Burstiness != 1 {
		dist = "Gamma distribution"
	}
	conc := "None"
	if cfg.MaxConcurrency > 0 {
		conc = fmt.Sprint(cfg.MaxConcurrency)
	}
	fmt.Fprintf(stdout, "Traffic request rate: %s\nBurstiness factor: %s (%s)\nMaximum request concurrency: %s\n",
		pyFloat(cfg.RequestRate), pyFloat(cfg.Burstiness), dist, conc)

	specBefore := fetchSpecCounters(ctx, hc, cfg.BaseURL)
	outs, dur := dispatch(ctx, &cfg, cl, reqs, stderr)
	specAfter := fetchSpecCounters(context.WithoutCancel(ctx), hc, cfg.BaseURL)

	res := &Result{
		Config:    cfg,
		Model:     model,
		Date:      time.Now(),
		Duration:  dur,
		Outcomes:  outs,
		Spec:      specDelta(specBefore, specAfter),
		Requested: reqs,
	}
	res.Metrics = ComputeMetrics(outs, dur, cfg.MetricPercentiles, cfg.Goodput)
	if res.Metrics.Completed == 0 {
		fmt.Fprintln(stderr, "WARNING: all requests failed; check the benchmark arguments and the server")
	}
	// Lengths estimated from bytes (ShareGPT or custom prompts without --tokenizer) are only
	// a guess; the result uses the server's counts, and there is nothing to warn about.
	if ds.Exact || cfg.DatasetName == "random" {
		warnDrift(stderr, outs, overhead, ds.Exact)
	}
	res.PrintSummary(stdout)
	if cfg.SaveResult {
		path, err := res.Save()
		if err != nil {
			return res, err
		}
		fmt.Fprintf(stdout, "Result saved to %s\n", path)
	}
	if cfg.PlotPath != "" && res.Metrics.Completed == 0 {
		fmt.Fprintf(stderr, "WARNING: no plot written to %s: no request succeeded\n", cfg.PlotPath)
	}
	if cfg.PlotPath != "" && res.Metrics.Completed > 0 {
		if err := WritePlot(res, cfg.PlotPath); err != nil {
			return res, err
		}
		fmt.Fprintf(stdout, "Plot saved to %s\n", cfg.PlotPath)
	}
	return res, ctx.Err()
}

// prepareDataset samples prompts and sends one probe request with max_tokens 1, like vLLM's
// initial test run: a server that cannot answer it stops the benchmark before it starts. For
// random prompts without a tokenizer it sends a second, shorter probe and fits the server's
// prompt_tokens as overhead + tokensPerWord × words, then resamples so the prompts have the
// requested number of server tokens. overhead (chat template, BOS) is returned so the run can
// check every request's reported prompt length against what was intended.
func prepareDataset(ctx context.Context, cfg *Config, cl *client, stderr io.Writer) (Dataset, int, error) {
	var ds Dataset
	var err error
	switch cfg.DatasetName {
	case "random":
		if cfg.Tokenizer != nil {
			ds, err = SampleRandomTokens(cfg, cfg.Tokenizer)
			if err == nil && ds.TokenMismatch != 0 {
				fmt.Fprintf(stderr, "WARNING: random prompts have %d tokens more than requested in total after re-encoding\n", ds.TokenMismatch)
			}
		} else {
			ds = SampleRandomText(cfg, 1)
		}
	case "sharegpt":
		ds, err = SampleShareGPT(cfg, cfg.Tokenizer)
	case "custom":
		ds, err = SampleCustom(cfg, cfg.Tokenizer)
	}
	if err != nil {
		return ds, 0, err
	}
	first := ds.Requests[0]
	full, err := probe(ctx, cl, first.Prompt)
	if err != nil {
		return ds, 0, err
	}
	if full < 0 {
		fmt.Fprintln(stderr, "WARNING: the server reports no usage.prompt_tokens; input token counts are local estimates")
		return ds, 0, nil
	}
	if cfg.DatasetName != "random" || ds.Exact {
		return ds, full - first.PromptLen, nil
	}
	// Fit tokens = overhead + slope × words from two prompts.
	words := len(strings.Fields(first.Prompt))
	shortWords := words / 4
	short := strings.Join(strings.Fields(first.Prompt)[:shortWords], " ")
	slope, overhead := 1.0, 0.0
	if shortWords >= 8 {
		s, err := probe(ctx, cl, " "+short)
		if err != nil {
			return ds, 0, err
		}
		slope = float64(full-s) / float64(words-shortWords)
		overhead = float64(full) - slope*float64(words)
	} else if words > 0 {
		slope = float64(full) / float64(words)
	}
	if slope < 0.25 || slope > 8 || math.IsNaN(slope) {
		fmt.Fprintf(stderr, "WARNING: server counts %.2f tokens per prompt word; leaving prompts uncalibrated\n", slope)
		return ds, full - first.PromptLen, nil
	}
	if math.Abs(slope-1) > 0.005 {
		fmt.Fprintf(stderr, "Server tokenizer counts %.3f tokens per word; rescaling prompts (no --tokenizer given)\n", slope)
		ds = SampleRandomText(cfg, slope)
	}
	return ds, int(math.Round(overhead)), nil
}

// probe sends prompt with max_tokens 1 and returns the server's prompt_tokens (-1 if unreported).
func probe(ctx context.Context, cl *client, prompt string) (int, error) {
	var o Outcome
	cl.do(ctx, Request{Prompt: prompt, OutputLen: 1}, &o)
	if !o.Success {
		return 0, fmt.Errorf("initial test request to %s failed: %s", cl.url, o.Err)
	}
	return o.ServerPromptTokens, nil
}

// warnDrift compares the server's usage.prompt_tokens with the intended prompt lengths.
func warnDrift(w io.Writer, outs []Outcome, overhead int, exact bool) {
	var n, off, total int
	for _, o := range outs {
		if !o.Success || o.ServerPromptTokens < 0 {
			continue
		}
		n++
		want := o.LocalPromptLen + overhead
		d := o.ServerPromptTokens - want
		total += d
		if abs(d) > max(1, want/100) {
			off++
		}
	}
	if off == 0 {
		return
	}
	how := "estimated"
	if exact {
		how = "tokenized"
	}
	fmt.Fprintf(w, "WARNING: %d of %d requests' server-reported prompt lengths differ from the %s length by more than 1%% (mean %+.1f tokens); is --tokenizer the server's?\n",
		off, n, how, float64(total)/float64(n))
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}

// dispatch sends reqs on the arrival schedule with at most cfg.MaxConcurrency in flight, one
// goroutine per in-flight request, and waits for all of them.
func dispatch(ctx context.Context, cfg *Config, cl *client, reqs []Request, stderr io.Writer) ([]Outcome, time.Duration) {
	n := len(reqs)
	outs := make([]Outcome, n)
	offsets := ArrivalOffsets(n, cfg.RequestRate, cfg.Burstiness, cfg.Seed)
	var slots chan struct{}
	if cfg.MaxConcurrency > 0 {
		slots = make(chan struct{}, cfg.MaxConcurrency)
	}
	bodies := make([][]byte, n)
	for i, r := range reqs {
		b, err := cl.body(r)
		if err != nil {
			outs[i].Err = fmt.Sprintf("encode request: %v", err)
		}
		bodies[i] = b
	}
	done := make(chan int, n)
	var inflight atomic.Int64
	start := time.Now()
	go func() {
		timer := time.NewTimer(0)
		defer timer.Stop()
		<-timer.C
		for i := range reqs {
			arrival := start.Add(offsets[i])
			if d := time.Until(arrival); d > 0 {
				timer.Reset(d)
				select {
				case <-timer.C:
				case <-ctx.Done():
				}
			}
			if slots != nil {
				select {
				case slots <- struct{}{}:
				case <-ctx.Done():
				}
			}
			if ctx.Err() != nil {
				for j := i; j < n; j++ {
					outs[j].Err = "not sent: " + ctx.Err().Error()
					outs[j].ServerPromptTokens = -1
					done <- j
				}
				return
			}
			inflight.Add(1)
			go func(i int, arrival time.Time) {
				o := &outs[i]
				if bodies[i] != nil {
					cl.send(ctx, reqs[i], bodies[i], o)
				}
				if !o.Start.IsZero() {
					o.QueueTime = max(o.Start.Sub(arrival), 0)
				}
				inflight.Add(-1)
				if slots != nil {
					<-slots
				}
				done <- i
			}(i, arrival)
		}
	}()

	var bar *progress
	if !cfg.DisableTQDM {
		bar = newProgress(stderr, n, start)
	}
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	var finished, failed, outTokens int
	for finished < n {
		select {
		case i := <-done:
			finished++
			if outs[i].Success {
				outTokens += outs[i].OutputTokens
			} else {
				failed++
			}
			if bar != nil && !bar.tty {
				bar.update(finished, failed, int(inflight.Load()), outTokens, time.Now())
			}
		case now := <-tick.C:
			if bar != nil && bar.tty {
				bar.update(finished, failed, int(inflight.Load()), outTokens, now)
			}
		}
	}
	dur := time.Since(start)
	if bar != nil {
		if bar.tty {
			bar.update(finished, failed, 0, outTokens, time.Now())
		}
		bar.finish()
	}
	return outs, dur
}
