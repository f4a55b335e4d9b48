package serve

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/parallel"
	"github.com/glmtopo/glmtopo/serve/tokenizer"
)

const fixtureTokenizer = "../testdata/text/tokenizer/tokenizer.json"

var (
	fixtureOnce sync.Once
	fixtureTok  *tokenizer.Tokenizer
	fixtureErr  error
)

func testTokenizer(t testing.TB) *tokenizer.Tokenizer {
	t.Helper()
	fixtureOnce.Do(func() { fixtureTok, fixtureErr = tokenizer.Load(fixtureTokenizer) })
	if fixtureErr != nil {
		t.Fatalf("load fixture tokenizer: %v", fixtureErr)
	}
	return fixtureTok
}

// fakeGen is a scripted parallel.Generator: it emits the ids its script
// function returns for the request, one by one, like an engine would.
type fakeGen struct {
	script    func(req parallel.Request) []int
	maxLen    int
	eos       []int
	err       error         // returned at once (ErrSaturated, ...)
	delay     time.Duration // between tokens
	hangAfter int           // > 0: after this many tokens, block until ctx ends
	failAfter int           // > 0: after this many tokens, fail like a lost device

	mu        sync.Mutex
	requests  []parallel.Request
	cancelled chan struct{} // closed when a Generate returns because ctx ended
	hung      chan struct{} // closed when a Generate blocks at hangAfter
	closeOnce sync.Once
	hungOnce  sync.Once
}

func newFakeGen(script func(parallel.Request) []int) *fakeGen {
	return &fakeGen{script: script, maxLen: 1024, eos: []int{1003, 1010, 1012}, cancelled: make(chan struct{}), hung: make(chan struct{})}
}

func (g *fakeGen) MaxModelLen() int   { return g.maxLen }
func (g *fakeGen) EOSTokenIDs() []int { return g.eos }
func (g *fakeGen) lastRequest() parallel.Request {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.requests[len(g.requests)-1]
}

func (g *fakeGen) Generate(ctx context.Context, req parallel.Request, emit func(int) error) (parallel.Result, error) {
	g.mu.Lock()
	g.requests = append(g.requests, req)
	g.mu.Unlock()
	res := parallel.Result{PromptTokens: len(req.PromptIDs)}
	if g.err != nil {
		return res, g.err
	}
	if len(req.PromptIDs)+req.MaxNewTokens > g.maxLen || req.MaxNewTokens < 1 {
		return res, fmt.Errorf("%w: %d + %d > %d", parallel.ErrPromptTooLong, len(req.PromptIDs), req.MaxNewTokens, g.maxLen)
	}
	aborted := func() (parallel.Result, error) {
		g.closeOnce.Do(func() { close(g.cancelled) })
		res.Finish = parallel.FinishAbort
		return res, ctx.Err()
	}
	for i, id := range g.script(req) {
		if g.hangAfter > 0 && i == g.hangAfter {
			g.hungOnce.Do(func() { close(g.hung) })
			<-ctx.Done()
			return aborted()
		}
		if ctx.Err() != nil {
			return aborted()
		}
		if g.failAfter > 0 && i == g.failAfter {
			return res, errors.New("device lost")
		}
		if res.CompletionTokens == req.MaxNewTokens {
			res.Finish = parallel.FinishLength
			return res, nil
		}
		if g.delay > 0 {
			select {
			case <-time.After(g.delay):
			case <-ctx.Done():
				return aborted()
			}
		}
		res.CompletionTokens++
		if err := emit(id); err != nil {
			if err == parallel.ErrStopGeneration {
				res.Finish = parallel.FinishStop
				return res, nil
			}
			return res, err
		}
	}
	res.Finish = parallel.FinishStop // the script ends as if on EOS
	return res, nil
}

// scriptText makes a script that spells text under the fixture tokenizer.
func scriptText(t testing.TB, text string) func(parallel.Request) []int {
	ids := testTokenizer(t).Encode(text)
	return func(parallel.Request) []int { return ids }
}

func testConfig() Config {
	cfg := DefaultConfig()
	cfg.ServedModelNames = []string{"glm-test"}
	cfg.ToolCallParser = "glm45"
	cfg.ReasoningParser = "glm45"
	cfg.EnableAutoToolChoice = true
	return cfg
}

func newTestServer(t testing.TB, cfg Config, gen parallel.Generator) (*Server, *httptest.Server) {
	t.Helper()
	s, err := NewServer(cfg, gen, testTokenizer(t), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatalf("NewServer: %v", err)
	}
	ts := httptest.NewServer(s.Handler())
	t.Cleanup(ts.Close)
	return s, ts
}

// post sends a JSON body and returns the status and body.
func post(t testing.TB, ts *httptest.Server, path, body string, header ...string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, ts.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := ts.Client().Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return resp.StatusCode, b
}

// sseEvents splits an SSE body into its data payloads.
func sseEvents(t testing.TB, body []byte) []string {
	t.Helper()
	var events []string
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			t.Fatalf("SSE line without data: %q", line)
		}
		events = append(events, data)
	}
	return events
}

// streamedChat joins a streamed chat completion.
type streamedChat struct {
	Content, Reasoning string
	ToolCalls          []toolCallOut
	FinishReason       string
	Usage              *Usage
	Chunks             int
}

func joinChatStream(t testing.TB, body []byte) streamedChat {
	t.Helper()
	events := sseEvents(t, body)
	if len(events) == 0 || events[len(events)-1] != "[DONE]" {
		t.Fatalf("stream does not end with [DONE]: %q", body)
	}
	var out streamedChat
	for _, ev := range events[:len(events)-1] {
		var c chatChunk
		if err := json.Unmarshal([]byte(ev), &c); err != nil {
			t.Fatalf("bad chunk %q: %v", ev, err)
		}
		if c.Object != "chat.completion.chunk" {
			t.Fatalf("chunk object %q", c.Object)
		}
		out.Chunks++
		if c.Usage != nil {
			out.Usage = c.Usage
		}
		for _, ch := range c.Choices {
			if out.FinishReason != "" {
				t.Fatalf("chunk after finish_reason: %q", ev)
			}
			if ch.Delta.Content != nil {
				out.Content += *ch.Delta.Content
			}
			if ch.Delta.ReasoningContent != nil {
				out.Reasoning += *ch.Delta.ReasoningContent
			}
			for _, tc := range ch.Delta.ToolCalls {
				for len(out.ToolCalls) <= tc.Index {
					out.ToolCalls = append(out.ToolCalls, toolCallOut{})
				}
				c := &out.ToolCalls[tc.Index]
				if tc.ID != "" {
					c.ID, c.Type = tc.ID, tc.Type
				}
				c.Function.Name += tc.Function.Name
				c.Function.Arguments += tc.Function.Arguments
			}
			if ch.FinishReason != nil {
				out.FinishReason = *ch.FinishReason
			}
		}
	}
	return out
}

// runConcurrentStreams fires n concurrent streaming chat requests at a
// server over gen and checks every one: it either streams to a finish_reason
// and [DONE], or gets a clean OpenAI error (503 when saturated). It returns
// how many completed. The lead runs it against the real engine too.
func runConcurrentStreams(t *testing.T, gen parallel.Generator, n int) (completed int) {
	t.Helper()
	cfg := testConfig()
	_, ts := newTestServer(t, cfg, gen)
	type outcome struct {
		status int
		body   []byte
		err    error
	}
	results := make([]outcome, n)
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: n, MaxConnsPerHost: 0}}
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := fmt.Sprintf(`{"model":"glm-test","stream":true,"max_tokens":16,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"request %d"}]}`, i)
			resp, err := client.Post(ts.URL+"/v1/chat/completions", "application/json", strings.NewReader(body))
			if err != nil {
				results[i] = outcome{err: err}
				return
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			results[i] = outcome{status: resp.StatusCode, body: b, err: err}
		}()
	}
	wg.Wait()
	for i, r := range results {
		if r.err != nil {
			t.Errorf("request %d: %v", i, r.err)
			continue
		}
		if r.status == http.StatusOK && streamRefused(r.body) {
			continue // the stream opened at admission, then the engine refused it: a clean error event
		}
		switch r.status {
		case http.StatusOK:
			got := joinChatStream(t, r.body)
			if got.FinishReason != "stop" && got.FinishReason != "length" {
				t.Errorf("request %d: finish_reason %q", i, got.FinishReason)
			}
			if got.Usage == nil || got.Usage.CompletionTokens < 1 || got.Usage.TotalTokens != got.Usage.PromptTokens+got.Usage.CompletionTokens {
				t.Errorf("request %d: usage %+v", i, got.Usage)
			}
			completed++
		case http.StatusServiceUnavailable, http.StatusTooManyRequests:
			var e errorBody
			if err := json.Unmarshal(r.body, &e); err != nil || e.Error.Message == "" {
				t.Errorf("request %d: status %d without an error body: %q", i, r.status, r.body)
			}
		default:
			t.Errorf("request %d: status %d: %s", i, r.status, r.body)
		}
	}
	return completed
}

// streamRefused reports whether a stream is one OpenAI error event with
// code 503, then [DONE]: the engine refused a request whose stream was open.
func streamRefused(body []byte) bool {
	events := strings.Split(strings.TrimSpace(string(body)), "\n\n")
	if len(events) != 2 || events[1] != "data: [DONE]" {
		return false
	}
	var e errorBody
	err := json.Unmarshal([]byte(strings.TrimPrefix(events[0], "data: ")), &e)
	return err == nil && e.Error.Code == http.StatusServiceUnavailable && e.Error.Message != ""
}
