package serve

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/parallel"
)

// gatedGen emits nothing until open is closed: a request queued behind
// others in the engine.
type gatedGen struct {
	*fakeGen
	open chan struct{}
}

func (g *gatedGen) Generate(ctx context.Context, req parallel.Request, emit func(int) error) (parallel.Result, error) {
	select {
	case <-g.open:
	case <-ctx.Done():
		return parallel.Result{Finish: parallel.FinishAbort}, ctx.Err()
	}
	return g.fakeGen.Generate(ctx, req, emit)
}

// A stream's headers go out when the request is admitted, not when the
// engine schedules it: a client's header timeout does not fire while queued.
func TestStreamHeadersAtAdmission(t *testing.T) {
	gen := &gatedGen{fakeGen: newFakeGen(scriptText(t, "queued answer")), open: make(chan struct{})}
	_, ts := newTestServer(t, testConfig(), gen)
	client := &http.Client{Transport: &http.Transport{ResponseHeaderTimeout: 2 * time.Second}}
	for _, tc := range []struct{ path, body string }{
		{"/v1/chat/completions", chatBody(`"stream":true`)},
		{"/v1/completions", `{"model":"glm-test","prompt":"hi","stream":true}`},
	} {
		resp, err := client.Post(ts.URL+tc.path, "application/json", strings.NewReader(tc.body))
		if err != nil {
			t.Fatalf("%s: no headers while the request waits for the engine: %v", tc.path, err)
		}
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
			t.Errorf("%s: %d %q", tc.path, resp.StatusCode, resp.Header.Get("Content-Type"))
		}
		resp.Body.Close()
	}
	close(gen.open)
	// Once scheduled, the stream is complete and well formed.
	status, b := post(t, ts, "/v1/chat/completions", chatBody(`"stream":true`))
	if got := joinChatStream(t, b); status != http.StatusOK || got.FinishReason == "" || !strings.HasPrefix(got.Content, "queued") {
		t.Errorf("status %d, stream %+v", status, got)
	}
}

// lineCounter is a slog handler target that counts lines with a substring.
type lineCounter struct {
	mu    sync.Mutex
	lines []string
}

func (c *lineCounter) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.lines = append(c.lines, string(p))
	return len(p), nil
}

func (c *lineCounter) count(sub string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, l := range c.lines {
		if strings.Contains(l, sub) {
			n++
		}
	}
	return n
}

// A burst of 503s is one log line, not one ERROR line each.
func TestSaturationBurstLogsOnce(t *testing.T) {
	var logs lineCounter
	gen := newFakeGen(scriptText(t, "ok"))
	gen.err = fmt.Errorf("queue: %w", parallel.ErrSaturated)
	s, err := NewServer(testConfig(), gen, testTokenizer(t), slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	addr := serveOn(t, s)
	for i := range 60 {
		body := chatBody("")
		if i%2 == 1 {
			body = chatBody(`"stream":true`)
		}
		resp, err := http.Post(addr+"/v1/chat/completions", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	if n := logs.count("saturated"); n != 1 {
		t.Errorf("%d log lines about saturation for a burst of 60 refusals, want 1:\n%s", n, strings.Join(logs.lines, ""))
	}
	if n := logs.count("level=ERROR"); n != 0 {
		t.Errorf("%d ERROR lines for refusals", n)
	}
}

// eventLog reports the first event at once and the rest, counted, with the
// first event after its interval.
func TestEventLogAggregates(t *testing.T) {
	var logs lineCounter
	now := time.Unix(0, 0)
	e := newEventLog(slog.New(slog.NewTextHandler(&logs, nil)), slog.LevelWarn, "refusing", 10*time.Second)
	e.now = func() time.Time { return now }
	for range 855 {
		e.add("refused")
		now = now.Add(time.Millisecond)
	}
	if n := logs.count("refusing"); n != 1 || logs.count("refused=1 ") != 1 {
		t.Fatalf("after a burst: %q", logs.lines)
	}
	now = now.Add(10 * time.Second)
	e.add("refused")
	if logs.count("refusing") != 2 || logs.count("refused=855 ") != 1 {
		t.Fatalf("after the interval: %q", logs.lines)
	}
}
