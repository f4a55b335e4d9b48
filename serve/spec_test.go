package serve

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/parallel"
)

// With MTP speculation on, greedy completions (plain, streamed, cut by a
// stop string) are the text served without it, and /metrics carries the
// spec_decode counters under vLLM's names.
func TestSpeculativeServing(t *testing.T) {
	dir := filepath.Join("..", "testdata", "glm4moe", "tiny", "model")
	serveOnce := func(spec parallel.SpecConfig, bodies []string) ([]string, string) {
		eng, closeEngine, err := parallel.OpenEngine(context.Background(), dir, cpu.New(0), parallel.EngineOptions{MaxTokens: 4096}, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer closeEngine()
		if err := spec.CheckEngine(eng); err != nil {
			t.Fatal(err)
		}
		sched := parallel.NewScheduler(eng, parallel.SchedulerOptions{MaxNumSeqs: 8, Speculative: spec})
		defer sched.Close()
		_, ts := newTestServer(t, testConfig(), sched)
		var texts []string
		for _, body := range bodies {
			code, out := post(t, ts, "/v1/completions", body)
			if code != http.StatusOK {
				t.Fatalf("%s: %d %s", body, code, out)
			}
			if strings.Contains(body, `"stream":true`) {
				var text strings.Builder
				for _, ev := range sseEvents(t, out) {
					var chunk struct {
						Choices []struct{ Text string } `json:"choices"`
					}
					if ev != "[DONE]" && json.Unmarshal([]byte(ev), &chunk) == nil && len(chunk.Choices) > 0 {
						text.WriteString(chunk.Choices[0].Text)
					}
				}
				texts = append(texts, text.String())
				continue
			}
			var resp struct {
				Choices []struct {
					Text         string `json:"text"`
					FinishReason string `json:"finish_reason"`
				} `json:"choices"`
			}
			if err := json.Unmarshal(out, &resp); err != nil || len(resp.Choices) != 1 {
				t.Fatalf("%s: %v %s", body, err, out)
			}
			texts = append(texts, resp.Choices[0].Text+" | "+resp.Choices[0].FinishReason)
		}
		r, err := http.Get(ts.URL + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		m, _ := io.ReadAll(r.Body)
		r.Body.Close()
		return texts, string(m)
	}
	bodies := []string{
		`{"model":"glm-test","prompt":"hello there","max_tokens":24,"temperature":0,"ignore_eos":true}`,
		`{"model":"glm-test","prompt":"hello there","max_tokens":24,"temperature":0,"ignore_eos":true,"stream":true}`,
		`{"model":"glm-test","prompt":"the quick brown fox","max_tokens":9,"temperature":0,"ignore_eos":true}`,
	}
	plain, _ := serveOnce(parallel.SpecConfig{}, bodies)
	// A stop string from inside the plain output: the speculative run must cut at the same place.
	if len(plain[0]) < 8 {
		t.Fatalf("plain output %q too short to take a stop string from", plain[0])
	}
	stop, _ := json.Marshal(plain[0][4:6])
	bodies = append(bodies, `{"model":"glm-test","prompt":"hello there","max_tokens":24,"temperature":0,"ignore_eos":true,"stop":[`+string(stop)+`]}`)
	plain, metricsOff := serveOnce(parallel.SpecConfig{}, bodies)
	spec, metrics := serveOnce(parallel.SpecConfig{Method: "mtp", NumSpeculativeTokens: 2}, bodies)
	if !strings.HasSuffix(plain[3], " | stop") || len(plain[3]) >= len(plain[0]) {
		t.Errorf("the stop string did not cut the output: %q (uncut %q)", plain[3], plain[0])
	}
	for i := range bodies {
		if plain[i] != spec[i] {
			t.Errorf("%s: %q with MTP, %q without", bodies[i], spec[i], plain[i])
		}
	}
	for _, name := range []string{"glmtopo:spec_decode_num_drafts_total", "glmtopo:spec_decode_num_draft_tokens_total",
		"glmtopo:spec_decode_num_accepted_tokens_total", `glmtopo:spec_decode_num_accepted_tokens_per_pos_total{model_name="glm-test",position="1"}`} {
		if !strings.Contains(metrics, name) {
			t.Errorf("metrics lack %s", name)
		}
		if strings.Contains(metricsOff, name) {
			t.Errorf("metrics without speculation carry %s", name)
		}
	}
}
