package serve

import (
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/parallel"
)

// A pipeline stage is down (the head's ring broke): 503 with Retry-After,
// and a stream's error event.
func TestPipelineDownIs503(t *testing.T) {
	gen := newFakeGen(scriptText(t, "ok"))
	gen.err = fmt.Errorf("engine step: %w: ring step 9: peer closed the connection", parallel.ErrPipelineDown)
	_, ts := newTestServer(t, testConfig(), gen)
	req, err := http.NewRequest("POST", ts.URL+"/v1/chat/completions", strings.NewReader(chatBody("")))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("status %d, Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	status, b := post(t, ts, "/v1/chat/completions", chatBody(`"stream":true`))
	if status != http.StatusOK || !streamRefused(b) || !strings.Contains(string(b), "pipeline stage") {
		t.Fatalf("stream: status %d: %s", status, b)
	}
}
