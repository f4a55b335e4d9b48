package serve

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/glmtopo/glmtopo/parallel"
)

// generation is one request's run through the engine: tokens are
// detokenized incrementally, stop strings are cut from the text, and the
// remaining text goes to onText in order.
type generation struct {
	req     parallel.Request
	stop    []string
	skipID  func(id int) bool // ids whose text is never shown (EOS, skipped specials)
	arrival time.Time
	// onFirstToken runs once, before any text, when the engine emits its
	// first token (the streaming handler sends its headers there).
	onFirstToken func() error
	onText       func(text string) error
}

// run drives the engine. The returned Result has Finish=stop when a stop
// string ended the sequence.
func (s *Server) run(ctx context.Context, g *generation) (parallel.Result, error) {
	dec := s.tok.NewStreamDecoder()
	stop := stopMatcher{stops: g.stop}
	stoppedByString := false
	var last time.Time
	first := true
	s.metrics.waiting.Inc()
	defer func() {
		if first {
			s.metrics.waiting.Dec()
		} else {
			s.metrics.running.Dec()
		}
	}()

	emit := func(id int) error {
		now := time.Now()
		if first {
			first = false
			s.metrics.waiting.Dec()
			s.metrics.running.Inc()
			s.metrics.ttft.Observe(now.Sub(g.arrival).Seconds())
			if g.onFirstToken != nil {
				if err := g.onFirstToken(); err != nil {
					return err
				}
			}
		} else {
			s.metrics.interToken.Observe(now.Sub(last).Seconds())
		}
		last = now
		if g.skipID != nil && g.skipID(id) {
			return nil
		}
		text, hit := stop.add(dec.Add(id))
		if text != "" {
			if err := g.onText(text); err != nil {
				return err
			}
		}
		if hit {
			stoppedByString = true
			return parallel.ErrStopGeneration
		}
		return nil
	}
	res, err := s.gen.Generate(ctx, g.req, emit)
	if res.PromptTokens == 0 {
		res.PromptTokens = len(g.req.PromptIDs) // engines that do not count it
	}
	if err != nil {
		return res, err
	}
	if !stoppedByString {
		// Flush text held back by the decoder and the stop matcher.
		text, hit := stop.add(dec.Flush())
		if !hit {
			text += stop.flush()
		} else {
			stoppedByString = true
		}
		if text != "" {
			if err := g.onText(text); err != nil {
				return res, err
			}
		}
	}
	if stoppedByString {
		res.Finish = parallel.FinishStop
	}
	return res, nil
}

// stopMatcher cuts the text at the first stop string, holding back a suffix
// that may be the start of one.
type stopMatcher struct {
	stops   []string
	pending string
	done    bool
}

// add returns the text that is certainly before any stop string and whether
// a stop string was found (then nothing after it is ever returned).
func (m *stopMatcher) add(text string) (string, bool) {
	if m.done {
		return "", true
	}
	if len(m.stops) == 0 {
		return text, false
	}
	m.pending += text
	cut := -1
	for _, s := range m.stops {
		if i := strings.Index(m.pending, s); i >= 0 && (cut < 0 || i < cut) {
			cut = i
		}
	}
	if cut >= 0 {
		out := m.pending[:cut]
		m.pending = ""
		m.done = true
		return out, true
	}
	keep := 0
	for _, s := range m.stops {
		for n := min(len(s)-1, len(m.pending)); n > keep; n-- {
			if strings.HasSuffix(m.pending, s[:n]) {
				keep = n
				break
			}
		}
	}
	out := m.pending[:len(m.pending)-keep]
	m.pending = m.pending[len(m.pending)-keep:]
	return out, false
}

// flush returns the held text at the end of the output.
func (m *stopMatcher) flush() string {
	out := m.pending
	m.pending = ""
	return out
}

// engineError maps a Generate error to an API error; nil when the client went away.
func engineError(ctx context.Context, err error) *APIError {
	switch {
	case errors.Is(err, errClientGone):
		return nil
	case ctx.Err() != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ctx.Err())):
		return nil
	case errors.Is(err, parallel.ErrSaturated):
		return &APIError{Status: http.StatusServiceUnavailable, Type: "ServiceUnavailableError", Message: "the server is saturated: too many requests waiting; retry later"}
	case errors.Is(err, parallel.ErrPipelineDown):
		return &APIError{Status: http.StatusServiceUnavailable, Type: "ServiceUnavailableError", Message: "a pipeline stage is unavailable; retry later: " + err.Error()}
	case errors.Is(err, parallel.ErrPromptTooLong):
		return &APIError{Status: http.StatusBadRequest, Type: "BadRequestError", Param: "messages", Message: err.Error()}
	case errors.Is(err, parallel.ErrInvalidRequest):
		return &APIError{Status: http.StatusBadRequest, Type: "BadRequestError", Message: err.Error()}
	default:
		return &APIError{Status: http.StatusInternalServerError, Type: "InternalServerError", Message: "generation failed: " + err.Error()}
	}
}
