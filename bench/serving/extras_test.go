package serving

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseSpecCounters(t *testing.T) {
	text := `# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="glm"} 100.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="glm"} 50.0
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="glm"} 300.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="glm"} 240.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="glm",position="0"} 140.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="glm",position="1"} 100.0
vllm:spec_decode_num_drafts_created 7
vllm:num_requests_running{engine="0"} 3
`
	c := parseSpecCounters(strings.NewReader(text))
	if c == nil || c.drafts != 150 || c.draftTokens != 300 || c.accepted != 240 || c.perPos[0] != 140 || c.perPos[1] != 100 {
		t.Fatalf("counters %+v", c)
	}
	if parseSpecCounters(strings.NewReader("vllm:num_requests_running 3\n")) != nil {
		t.Error("no spec-decode counters must give nil")
	}
	g := parseSpecCounters(strings.NewReader("glmtopo:spec_decode_num_draft_tokens_total 10\n"))
	if g == nil || g.draftTokens != 10 {
		t.Errorf("glmtopo prefix: %+v", g)
	}
}

// TestSpecDecodeAcceptanceFromMetrics scrapes /metrics before and after the run and reports the
// acceptance over exactly the benchmark window.
func TestSpecDecodeAcceptanceFromMetrics(t *testing.T) {
	srv := newFakeServer(t, func(map[string]any, int) script { return evenly(2*time.Millisecond, time.Millisecond, 3) })
	srv.metrics = []string{
		"vllm:spec_decode_num_drafts_total 1000\nvllm:spec_decode_num_draft_tokens_total 3000\nvllm:spec_decode_num_accepted_tokens_total 1500\n" +
			"vllm:spec_decode_num_accepted_tokens_per_pos_total{position=\"0\"} 800\nvllm:spec_decode_num_accepted_tokens_per_pos_total{position=\"1\"} 500\nvllm:spec_decode_num_accepted_tokens_per_pos_total{position=\"2\"} 200\n",
		"vllm:spec_decode_num_drafts_total 1100\nvllm:spec_decode_num_draft_tokens_total 3300\nvllm:spec_decode_num_accepted_tokens_total 1710\n" +
			"vllm:spec_decode_num_accepted_tokens_per_pos_total{position=\"0\"} 890\nvllm:spec_decode_num_accepted_tokens_per_pos_total{position=\"1\"} 580\nvllm:spec_decode_num_accepted_tokens_per_pos_total{position=\"2\"} 240\n",
	}
	cfg := testConfig(srv.url(), 3, 3)
	res, out := run(t, cfg)
	s := res.Spec
	if s == nil {
		t.Fatal("no speculative decoding stats")
	}
	if s.NumDrafts != 100 || s.DraftTokens != 300 || s.AcceptedTokens != 210 {
		t.Errorf("stats %+v", s)
	}
	relNear(t, "acceptance rate", s.AcceptanceRate, 70, 1e-12)
	relNear(t, "acceptance length", s.AcceptanceLength, 3.1, 1e-12)
	if len(s.PerPositionRates) != 3 || s.PerPositionRates[0] != 0.9 || s.PerPositionRates[2] != 0.4 {
		t.Errorf("per position %v", s.PerPositionRates)
	}
	obj := decode(t, res.JSON())
	if obj["spec_decode_acceptance_rate"] != 70.0 || obj["spec_decode_num_drafts"] != 100.0 {
		t.Errorf("result keys: %v %v", obj["spec_decode_acceptance_rate"], obj["spec_decode_num_drafts"])
	}
	if !strings.Contains(out, "Acceptance rate (%):") {
		t.Errorf("summary lacks acceptance:\n%s", out)
	}
	// Without the metrics endpoint nothing is reported and nothing fails.
	srv2 := newFakeServer(t, func(map[string]any, int) script { return evenly(time.Millisecond, time.Millisecond, 2) })
	if res2, _ := run(t, testConfig(srv2.url(), 2, 2)); res2.Spec != nil {
		t.Errorf("spec stats without /metrics: %+v", res2.Spec)
	}
}

func TestPlotFiles(t *testing.T) {
	srv := newFakeServer(t, func(_ map[string]any, n int) script {
		return evenly(time.Duration(5+n)*time.Millisecond, 2*time.Millisecond, 5)
	})
	dir := t.TempDir()
	for _, name := range []string{"run.png", "run.svg"} {
		cfg := testConfig(srv.url(), 6, 5)
		cfg.RequestRate = 200
		cfg.PlotPath = filepath.Join(dir, name)
		run(t, cfg)
		b, err := os.ReadFile(cfg.PlotPath)
		if err != nil {
			t.Fatal(err)
		}
		if name == "run.png" && !bytes.HasPrefix(b, []byte("\x89PNG")) {
			t.Errorf("%s is not a PNG", name)
		}
		if name == "run.svg" && (!bytes.Contains(b, []byte("<svg")) || !bytes.Contains(b, []byte("ITL"))) {
			t.Errorf("%s is not an SVG with the ITL CDF", name)
		}
	}
}

// TestWriteExamplePlot writes the README's example image when BENCH_SERVE_EXAMPLE_PLOT names a
// file: 64 requests at 16 req/s against a fake server with 150–400 ms TTFT and ~20 ms ITL.
func TestWriteExamplePlot(t *testing.T) {
	path := os.Getenv("BENCH_SERVE_EXAMPLE_PLOT")
	if path == "" {
		t.Skip("set BENCH_SERVE_EXAMPLE_PLOT=FILE.png to write the example plot")
	}
	srv := newFakeServer(t, func(_ map[string]any, n int) script {
		s := evenly(time.Duration(150+(n*37)%250)*time.Millisecond, 0, 100)
		for i := range s.ITL {
			s.ITL[i] = time.Duration(18+(i*7+n)%6) * time.Millisecond
		}
		return s
	})
	cfg := testConfig(srv.url(), 64, 100)
	cfg.RequestRate = 16
	cfg.PlotPath = path
	_, out := run(t, cfg)
	t.Log(out)
}

// TestCalibratesTextPromptsWithoutTokenizer: the server counts two tokens per word plus a
// 7-token template; without --tokenizer the probes fit that and the prompts come out at the
// requested length, with no drift warning.
func TestCalibratesTextPromptsWithoutTokenizer(t *testing.T) {
	srv := newFakeServer(t, func(map[string]any, int) script { return evenly(time.Millisecond, time.Millisecond, 2) })
	srv.prompt = func(p string) int { return 7 + 2*len(strings.Fields(p)) }
	cfg := testConfig(srv.url(), 5, 2)
	cfg.RandomInputLen = 400
	res, out := run(t, cfg)
	for _, o := range res.Outcomes {
		if o.ServerPromptTokens < 405 || o.ServerPromptTokens > 409 {
			t.Errorf("server counted %d prompt tokens, want 407 ± 2", o.ServerPromptTokens)
		}
	}
	if !strings.Contains(out, "rescaling prompts") || strings.Contains(out, "WARNING") {
		t.Errorf("output:\n%s", out)
	}
}

func TestWarnsWhenServerTokenizerDiffers(t *testing.T) {
	tok := wordTokenizer{vocab: 1000, special: 990}
	for _, tc := range []struct {
		name  string
		count func(string) int
		warn  bool
	}{
		{"same tokenizer", func(p string) int { return len(tok.Encode(p)) }, false},
		{"constant template overhead", func(p string) int { return 12 + len(tok.Encode(p)) }, false},
		{"different tokenizer", func(p string) int { return len(p) / 3 }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newFakeServer(t, func(map[string]any, int) script { return evenly(time.Millisecond, time.Millisecond, 2) })
			srv.prompt = tc.count
			cfg := testConfig(srv.url(), 4, 2)
			cfg.RandomInputLen, cfg.RandomRangeRatio = 300, 0.5
			cfg.Tokenizer = tok
			res, out := run(t, cfg)
			if got := strings.Contains(out, "server-reported prompt lengths differ"); got != tc.warn {
				t.Errorf("warning %v, want %v:\n%s", got, tc.warn, out)
			}
			for _, o := range res.Outcomes {
				if o.PromptLen != tc.count(res.Requested[0].Prompt) && o.PromptLen != o.ServerPromptTokens {
					t.Errorf("input_lens must be the server's count: %d vs %d", o.PromptLen, o.ServerPromptTokens)
				}
			}
		})
	}
}

func TestCancelCountsUnsentAndInFlight(t *testing.T) {
	srv := newFakeServer(t, func(map[string]any, int) script { return evenly(time.Millisecond, 50*time.Millisecond, 20) })
	cfg := testConfig(srv.url(), 10, 20)
	cfg.MaxConcurrency = 2
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	var stdout, stderr bytes.Buffer
	start := time.Now()
	res, err := Run(ctx, cfg, &stdout, &stderr)
	if err == nil || res == nil {
		t.Fatalf("want a partial result and the context error, got %v", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Errorf("cancel took %v", time.Since(start))
	}
	if res.Metrics.Failed != 10 || len(ErrorSummary(res.Outcomes)) == 0 {
		t.Errorf("failed %d of 10 after cancel", res.Metrics.Failed)
	}
}

func TestInitialProbeFailureStopsTheRun(t *testing.T) {
	srv := newFakeServer(t, nil)
	cfg := testConfig(srv.url(), 2, 2)
	cfg.Endpoint = "/v1/nothing/completions"
	_, err := Run(context.Background(), cfg, &bytes.Buffer{}, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "initial test request") || !strings.Contains(err.Error(), "404") {
		t.Errorf("err %v", err)
	}
	cfg = testConfig("http://127.0.0.1:1", 2, 2)
	cfg.Model = ""
	if _, err := Run(context.Background(), cfg, &bytes.Buffer{}, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), "list models") {
		t.Errorf("unreachable server: %v", err)
	}
	cfg = testConfig(srv.url(), 2, 2)
	cfg.Model = ""
	srv.plan = func(map[string]any, int) script { return evenly(time.Millisecond, time.Millisecond, 2) }
	res, err := Run(context.Background(), cfg, &bytes.Buffer{}, &bytes.Buffer{})
	if err != nil || res.Model != "fake/glm-4.5-air" {
		t.Errorf("model discovery: %v %v", res, err)
	}
}
