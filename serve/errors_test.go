package serve

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/parallel"
)

func TestErrors(t *testing.T) {
	cfg := testConfig()
	cfg.APIKey = "sekret"
	gen := newFakeGen(scriptText(t, "ok"))
	gen.maxLen = 64
	_, ts := newTestServer(t, cfg, gen)
	auth := []string{"Authorization", "Bearer sekret"}
	long := strings.Repeat("word ", 200)
	cases := []struct {
		name, path, body string
		header           []string
		status           int
		contains         string
	}{
		{"missing key", "/v1/chat/completions", chatBody(""), nil, 401, "API key"},
		{"wrong key", "/v1/chat/completions", chatBody(""), []string{"Authorization", "Bearer nope"}, 401, "API key"},
		{"malformed json", "/v1/chat/completions", `{"messages":[`, auth, 400, "invalid JSON"},
		{"trailing garbage", "/v1/chat/completions", chatBody("") + "x", auth, 400, "trailing"},
		{"unknown model", "/v1/chat/completions", `{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}`, auth, 404, "gpt-9"},
		{"no messages", "/v1/chat/completions", `{"model":"glm-test","messages":[]}`, auth, 400, "messages"},
		{"bad role", "/v1/chat/completions", `{"messages":[{"role":"robot","content":"x"}]}`, auth, 400, "robot"},
		{"prompt too long", "/v1/chat/completions", `{"messages":[{"role":"user","content":"` + long + `"}]}`, auth, 400, "maximum context length is 64 tokens"},
		{"max_tokens too big", "/v1/chat/completions", chatBody(`"max_tokens":1000`), auth, 400, "maximum context length is 64"},
		{"max_tokens zero", "/v1/chat/completions", chatBody(`"max_tokens":0`), auth, 400, "max_tokens"},
		{"temperature", "/v1/chat/completions", chatBody(`"temperature":5`), auth, 400, "temperature"},
		{"top_p", "/v1/chat/completions", chatBody(`"top_p":0`), auth, 400, "top_p"},
		{"n", "/v1/chat/completions", chatBody(`"n":2`), auth, 400, "n=1"},
		{"min over max", "/v1/chat/completions", chatBody(`"min_tokens":5,"max_tokens":2`), auth, 400, "min_tokens"},
		{"presence penalty", "/v1/chat/completions", chatBody(`"presence_penalty":0.5`), auth, 400, "presence_penalty"},
		{"response format", "/v1/chat/completions", chatBody(`"response_format":{"type":"json_object"}`), auth, 400, "response_format"},
		{"stop type", "/v1/chat/completions", chatBody(`"stop":5`), auth, 400, "stop"},
		{"empty stop", "/v1/chat/completions", chatBody(`"stop":[""]`), auth, 400, "stop"},
		{"stream_options without stream", "/v1/chat/completions", chatBody(`"stream_options":{"include_usage":true}`), auth, 400, "stream_options"},
		{"stop token out of vocab", "/v1/chat/completions", chatBody(`"stop_token_ids":[99999]`), auth, 400, "99999"},
		{"completion no prompt", "/v1/completions", `{"model":"glm-test"}`, auth, 400, "prompt"},
		{"completion bad ids", "/v1/completions", `{"prompt":[1,-2]}`, auth, 400, "-2"},
		{"completion two prompts", "/v1/completions", `{"prompt":["a","b"]}`, auth, 400, "one prompt"},
		{"completion too long", "/v1/completions", `{"prompt":"` + long + `"}`, auth, 400, "maximum context length"},
		{"tokenize neither", "/tokenize", `{}`, auth, 400, "prompt or messages"},
		{"detokenize bad id", "/detokenize", `{"tokens":[100000]}`, auth, 400, "100000"},
		{"unknown route", "/v1/embeddings", `{}`, auth, 404, "no route"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, body := post(t, ts, tc.path, tc.body, tc.header...)
			if status != tc.status {
				t.Fatalf("status %d want %d: %s", status, tc.status, body)
			}
			var e errorBody
			if err := json.Unmarshal(body, &e); err != nil || e.Error.Code != tc.status || e.Error.Type == "" {
				t.Fatalf("not an OpenAI error: %s", body)
			}
			if !strings.Contains(e.Error.Message, tc.contains) {
				t.Fatalf("message %q does not mention %q", e.Error.Message, tc.contains)
			}
		})
	}
	// /health and /metrics need no key; /v1/models does.
	for path, want := range map[string]int{"/health": 200, "/metrics": 200, "/v1/models": 401} {
		resp, err := ts.Client().Get(ts.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("GET %s = %d want %d", path, resp.StatusCode, want)
		}
	}
}

func TestSaturation(t *testing.T) {
	// The engine's queue is full: 503 at once, with Retry-After.
	gen := newFakeGen(scriptText(t, "ok"))
	gen.err = fmt.Errorf("queue: %w", parallel.ErrSaturated)
	_, ts := newTestServer(t, testConfig(), gen)
	status, b := post(t, ts, "/v1/chat/completions", chatBody(""))
	if status != http.StatusServiceUnavailable || !strings.Contains(string(b), "saturated") {
		t.Fatalf("status %d: %s", status, b)
	}
	// A stream's headers went out at admission: the refusal is its error event.
	status, b = post(t, ts, "/v1/chat/completions", chatBody(`"stream":true`))
	if status != http.StatusOK || !streamRefused(b) || !strings.Contains(string(b), "saturated") {
		t.Fatalf("stream: status %d: %s", status, b)
	}

	// The server's own admission limit: requests beyond it are refused, not queued.
	cfg := testConfig()
	cfg.MaxNumSeqs, cfg.MaxWaiting = 1, 0
	slow := newFakeGen(scriptText(t, "one two three"))
	slow.hangAfter = 1
	_, ts = newTestServer(t, cfg, slow)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, ts.URL+"/v1/chat/completions", strings.NewReader(chatBody(`"stream":true`)))
	resp, err := ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	status, b = post(t, ts, "/v1/chat/completions", chatBody(""))
	if status != http.StatusServiceUnavailable {
		t.Fatalf("second request: %d %s", status, b)
	}
}

func TestClientDisconnectCancelsGeneration(t *testing.T) {
	gen := newFakeGen(scriptText(t, "one two three four five six"))
	gen.hangAfter = 2
	s, ts := newTestServer(t, testConfig(), gen)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, ts.URL+"/v1/chat/completions", strings.NewReader(chatBody(`"stream":true`)))
	resp, err := ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	// Read the first event; once the generator has emitted its tokens and
	// blocks (no write to the client is in flight), hang up: the request's
	// context ending is then the only way out.
	buf := make([]byte, 64)
	if _, err := resp.Body.Read(buf); err != nil {
		t.Fatal(err)
	}
	select {
	case <-gen.hung:
	case <-time.After(5 * time.Second):
		t.Fatal("the generator never reached its hang point")
	}
	start := time.Now()
	cancel()
	resp.Body.Close()
	select {
	case <-gen.cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("the generator's context was not cancelled after the client left")
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("cancellation took %v", d)
	}
	// The abort is counted.
	deadline := time.Now().Add(2 * time.Second)
	for !strings.Contains(scrapeMetrics(t, s), `glmtopo:request_success_total{finished_reason="abort",model_name="glm-test"} 1`) {
		if time.Now().After(deadline) {
			t.Fatalf("abort not in metrics:\n%s", scrapeMetrics(t, s))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func scrapeMetrics(t *testing.T, s *Server) string {
	t.Helper()
	rec := &recorder{header: http.Header{}}
	s.metrics.handler().ServeHTTP(rec, (&http.Request{Method: "GET", Header: http.Header{}}).WithContext(context.Background()))
	return rec.body.String()
}

type recorder struct {
	header http.Header
	body   strings.Builder
	status int
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) Write(b []byte) (int, error) { return r.body.Write(b) }
func (r *recorder) WriteHeader(s int)           { r.status = s }

func TestEngineFailure(t *testing.T) {
	gen := newFakeGen(scriptText(t, "one two three four"))
	gen.failAfter = 2
	_, ts := newTestServer(t, testConfig(), gen)
	status, body := post(t, ts, "/v1/chat/completions", chatBody(""))
	if status != http.StatusInternalServerError || !strings.Contains(string(body), "device lost") {
		t.Fatalf("non-streaming: %d %s", status, body)
	}
	// Streaming already sent 200: the error arrives as an event, then [DONE].
	status, body = post(t, ts, "/v1/chat/completions", chatBody(`"stream":true`))
	events := sseEvents(t, body)
	if status != 200 || len(events) < 2 || events[len(events)-1] != "[DONE]" || !strings.Contains(events[len(events)-2], `"error"`) {
		t.Fatalf("streaming: %d %q", status, events)
	}
}

func TestNoTokensGenerated(t *testing.T) {
	gen := newFakeGen(func(parallel.Request) []int { return nil }) // EOS at once
	_, ts := newTestServer(t, testConfig(), gen)
	_, body := post(t, ts, "/v1/chat/completions", chatBody(`"stream":true,"stream_options":{"include_usage":true}`))
	s := joinChatStream(t, body)
	if s.FinishReason != "stop" || s.Content != "" || s.Usage == nil || s.Usage.CompletionTokens != 0 {
		t.Fatalf("stream %+v", s)
	}
	_, body = post(t, ts, "/v1/chat/completions", chatBody(""))
	if r := decodeChat(t, body); r.Choices[0].Message.Content == nil || *r.Choices[0].Message.Content != "" {
		t.Fatalf("response %s", body)
	}
}
