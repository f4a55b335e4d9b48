package serve

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
)

// errClientGone marks a failed write to the client: the request ends
// quietly, like a cancelled context.
var errClientGone = errors.New("client connection gone")

// sseWriter writes server-sent events. The handlers open the stream (send
// its headers) when the request is admitted; an error before that gets a
// real HTTP status, one after it an error event.
type sseWriter struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	started bool
}

func newSSEWriter(w http.ResponseWriter) *sseWriter {
	return &sseWriter{w: w, rc: http.NewResponseController(w)}
}

func (s *sseWriter) start() {
	if s.started {
		return
	}
	s.started = true
	h := s.w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("Connection", "keep-alive")
	h.Set("X-Accel-Buffering", "no")
	s.w.WriteHeader(http.StatusOK)
}

// open sends the stream's headers now: a request that waits in the queue
// has its response started, so a client's header timeout measures the
// server's admission, not its scheduling.
func (s *sseWriter) open() error {
	s.start()
	if err := s.rc.Flush(); err != nil {
		return fmt.Errorf("%w: flush headers: %v", errClientGone, err)
	}
	return nil
}

// send writes one `data:` event and flushes it to the client.
func (s *sseWriter) send(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode event: %w", err)
	}
	return s.raw(b)
}

func (s *sseWriter) raw(b []byte) error {
	s.start()
	buf := make([]byte, 0, len(b)+8)
	buf = append(buf, "data: "...)
	buf = append(buf, b...)
	buf = append(buf, "\n\n"...)
	if _, err := s.w.Write(buf); err != nil {
		return fmt.Errorf("%w: write event: %v", errClientGone, err)
	}
	if err := s.rc.Flush(); err != nil {
		return fmt.Errorf("%w: flush event: %v", errClientGone, err)
	}
	return nil
}

func (s *sseWriter) done() error {
	return s.raw([]byte("[DONE]"))
}

// Usage is OpenAI's token usage.
type Usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

func usageOf(promptTokens, completionTokens int) *Usage {
	return &Usage{PromptTokens: promptTokens, CompletionTokens: completionTokens, TotalTokens: promptTokens + completionTokens}
}

// endStream sends the finish event, the usage event when the client asked
// for it (stream_options.include_usage), and [DONE]. A client already gone
// ends it quietly.
func endStream(sse *sseWriter, finish any, includeUsage bool, usage any) {
	if sse.send(finish) != nil {
		return
	}
	if includeUsage && sse.send(usage) != nil {
		return
	}
	_ = sse.done()
}
