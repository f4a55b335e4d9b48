package serving

import (
	"bufio"
	"strings"
	"testing"
	"time"
)

// A one-token stream whose token decodes to no text still counts: the
// usage chunk says a token was generated (the start-up probe failed on it
// in 6 of 300 single-token chat streams).
func TestStreamCountsTokensNotText(t *testing.T) {
	body := strings.Join([]string{
		`data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}`,
		`data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}`,
		`data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1,"total_tokens":8}}`,
		`data: [DONE]`, ``}, "\n\n")
	cl := &client{cfg: &Config{}}
	out := Outcome{Start: time.Now()}
	cl.stream(bufio.NewReader(strings.NewReader(body)), &out, 1)
	if !out.Success || out.OutputTokens != 1 || out.PromptLen != 7 || out.TTFT <= 0 {
		t.Fatalf("outcome %+v", out)
	}
	// Without usage there is nothing to count: still an error.
	noUsage := strings.Replace(body, `data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1,"total_tokens":8}}`+"\n\n", "", 1)
	out = Outcome{Start: time.Now()}
	cl.stream(bufio.NewReader(strings.NewReader(noUsage)), &out, 1)
	if out.Success || !strings.Contains(out.Err, "without a token chunk") {
		t.Fatalf("without usage: %+v", out)
	}
}
