// Package serve is glmtopo's OpenAI-compatible HTTP API: /v1/models,
// /v1/chat/completions and /v1/completions (streaming and not), vLLM's
// /tokenize and /detokenize, /health and Prometheus /metrics. It renders
// chats with the GLM-4.5 template, runs a parallel.Generator, and parses the
// output with the glm45 reasoning and tool-call parsers. Serve bounds what
// a client can hold: header, body and idle timeouts and a connection cap
// below the file limit (conns.go), so slow clients cannot starve others.
package serve

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/glmtopo/glmtopo/parallel"
	"github.com/glmtopo/glmtopo/serve/glm45"
	"github.com/glmtopo/glmtopo/serve/tokenizer"
)

// maxBodyBytes bounds a request body (a long chat with tools fits easily).
const maxBodyBytes = 64 << 20

// Server serves one model.
type Server struct {
	cfg         Config
	gen         parallel.Generator
	tok         *tokenizer.Tokenizer
	log         *slog.Logger
	metrics     *metrics
	maxModelLen int
	eos         map[int]bool
	markupIDs   map[int]bool // special tokens the glm45 parsers need as text
	admit       chan struct{}
	created     int64
	maxConns    int
	bodyTimeout time.Duration
	overload    *eventLog // 503s, one line per interval
	connEvents  *eventLog // connections evicted or refused at the cap
}

// logInterval is how often a repeated overload event is logged.
const logInterval = 10 * time.Second

// NewServer checks cfg against the engine and tokenizer and builds a server.
func NewServer(cfg Config, gen parallel.Generator, tok *tokenizer.Tokenizer, logger *slog.Logger) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("serve config: %w", err)
	}
	if gen == nil || tok == nil {
		return nil, errors.New("serve: a generator and a tokenizer are required")
	}
	if logger == nil {
		logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	maxLen := gen.MaxModelLen()
	if maxLen < 2 {
		return nil, fmt.Errorf("serve: engine max model length %d is too small", maxLen)
	}
	if cfg.MaxModelLen > 0 {
		if cfg.MaxModelLen > maxLen {
			return nil, fmt.Errorf("serve: --max-model-len %d exceeds the engine's %d", cfg.MaxModelLen, maxLen)
		}
		maxLen = cfg.MaxModelLen
	}
	s := &Server{
		cfg:         cfg,
		gen:         gen,
		tok:         tok,
		log:         logger,
		metrics:     newMetrics(cfg.ServedModelNames[0]),
		maxModelLen: maxLen,
		eos:         map[int]bool{},
		markupIDs:   map[int]bool{},
		admit:       make(chan struct{}, cfg.MaxNumSeqs+cfg.MaxWaiting),
		created:     time.Now().Unix(),
		maxConns:    defaultMaxConnections(),
		bodyTimeout: bodyTimeout,
		overload:    newEventLog(logger, slog.LevelWarn, "requests refused with 503: the server is saturated", logInterval),
		connEvents: newEventLog(logger, slog.LevelWarn, "connection limit reached: stalled connections evicted, new ones refused",
			logInterval),
	}
	if mp, ok := gen.(memoryPlanner); ok {
		s.metrics.exportMemoryPlan(cfg.ServedModelNames[0], mp)
	}
	if u, ok := gen.(kvCacheUser); ok {
		s.metrics.watchKVCache(cfg.ServedModelNames[0], u.KVCacheUsage)
	}
	if sd, ok := gen.(specDecoder); ok { // specmetrics.go
		s.metrics.watchSpecDecode(cfg.ServedModelNames[0], sd)
	}
	for _, id := range gen.EOSTokenIDs() {
		s.eos[id] = true
	}
	for _, tag := range []string{glm45.ThinkStart, glm45.ThinkEnd, glm45.ToolCallStart, glm45.ToolCallEnd,
		glm45.ArgKeyStart, glm45.ArgKeyEnd, glm45.ArgValueStart, glm45.ArgValueEnd} {
		if id, ok := tok.TokenID(tag); ok {
			s.markupIDs[id] = true
		}
	}
	return s, nil
}

// SetMaxConnections caps the connections Serve holds (default: the soft
// file limit less a reserve); n < 1 keeps the default.
func (s *Server) SetMaxConnections(n int) {
	if n >= 1 {
		s.maxConns = n
	}
}

// MaxModelLen is the context length the server enforces.
func (s *Server) MaxModelLen() int { return s.maxModelLen }

// Handler returns the HTTP handler with every endpoint.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
	mux.Handle("GET /metrics", s.metrics.handler())
	mux.HandleFunc("GET /v1/models", s.auth(s.handleModels))
	mux.HandleFunc("POST /v1/chat/completions", s.auth(s.handleChat))
	mux.HandleFunc("POST /v1/completions", s.auth(s.handleCompletions))
	mux.HandleFunc("POST /tokenize", s.auth(s.handleTokenize))
	mux.HandleFunc("POST /detokenize", s.auth(s.handleDetokenize))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.writeError(w, &APIError{Status: http.StatusNotFound, Type: "NotFoundError", Message: fmt.Sprintf("no route %s %s", r.Method, r.URL.Path)})
	})
	return s.recoverPanics(mux)
}

// ListenAndServe serves on cfg's address until ctx is cancelled, then shuts
// down gracefully (open streams get ShutdownTimeout to finish).
func (s *Server) ListenAndServe(ctx context.Context) error {
	ln, err := net.Listen("tcp", s.cfg.Addr())
	if err != nil {
		return fmt.Errorf("serve: listen %s: %w", s.cfg.Addr(), err)
	}
	return s.Serve(ctx, ln)
}

// Serve is ListenAndServe on an existing listener. It holds at most
// SetMaxConnections connections (see connLimiter) and bounds how long a
// request's headers, its body and an idle connection may take.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	lim := newConnLimiter(ln, s.maxConns, s.connEvents.add)
	ln = lim
	srv := &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: headerTimeout,
		IdleTimeout:       idleTimeout,
		BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, connHandle{conn: c, lim: lim, bodyTimeout: s.bodyTimeout})
		},
		ConnState: lim.connState,
		ErrorLog:  slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	s.log.Info("serving", "addr", ln.Addr().String(), "model", s.cfg.ServedModelNames[0], "max_model_len", s.maxModelLen,
		"max_connections", s.maxConns)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	timeout := s.cfg.ShutdownTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	sctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close() // cut streams still open; their contexts end their sequences
		return fmt.Errorf("serve: shutdown: %w", err)
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}

func (s *Server) auth(next http.HandlerFunc) http.HandlerFunc {
	if s.cfg.APIKey == "" {
		return next
	}
	want := []byte("Bearer " + s.cfg.APIKey)
	return func(w http.ResponseWriter, r *http.Request) {
		got := []byte(r.Header.Get("Authorization"))
		if subtle.ConstantTimeCompare(got, want) != 1 {
			w.Header().Set("WWW-Authenticate", "Bearer")
			s.writeError(w, &APIError{Status: http.StatusUnauthorized, Type: "AuthenticationError", Message: "missing or invalid API key"})
			return
		}
		next(w, r)
	}
}

func (s *Server) recoverPanics(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				s.log.Error("handler panic", "path", r.URL.Path, "panic", v)
				s.writeError(w, &APIError{Status: http.StatusInternalServerError, Type: "InternalServerError", Message: "internal error"})
			}
		}()
		next.ServeHTTP(w, r)
	})
}

// writeError writes e as OpenAI's error JSON.
func (s *Server) writeError(w http.ResponseWriter, e *APIError) {
	s.metrics.requestErrors.WithLabelValues(strconv.Itoa(e.Status)).Inc()
	if e.Status == http.StatusServiceUnavailable || e.Status == http.StatusTooManyRequests {
		w.Header().Set("Retry-After", "1")
		s.overload.add("refused")
	}
	writeJSON(w, e.Status, e.body())
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status, b = http.StatusInternalServerError, []byte(`{"error":{"message":"encode response","type":"InternalServerError","param":null,"code":500}}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// readBody reads a bounded request body. Under Serve the whole body must
// arrive within the body timeout, or the connection is closed (a body
// trickled a byte at a time would hold it forever); once the body is in,
// the connection is busy (not evictable) until the response is done.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, *APIError) {
	if h, ok := r.Context().Value(connKey{}).(connHandle); ok {
		// A timer, not a read deadline: the server's own reads of this
		// connection (it watches for the client leaving) keep their deadlines.
		t := time.AfterFunc(h.bodyTimeout, func() { h.conn.Close() })
		defer t.Stop()
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, &APIError{Status: http.StatusRequestEntityTooLarge, Type: "BadRequestError", Message: fmt.Sprintf("request body exceeds %d bytes", maxBodyBytes)}
		}
		if errors.Is(err, net.ErrClosed) {
			// Closed under us: the body timed out, or the connection was
			// evicted at the cap. No one is left to answer; end quietly.
			panic(http.ErrAbortHandler)
		}
		return nil, badRequest("", "read request body: %v", err)
	}
	markRequestRead(r.Context())
	return body, nil
}

// checkModel answers 404 for a model this server does not serve, like vLLM.
// responseModel is the model name a response carries: the one the client
// asked for (checkModel accepted it), else the first served name.
func (s *Server) responseModel(requested string) string {
	if requested != "" {
		return requested
	}
	return s.cfg.ServedModelNames[0]
}

func (s *Server) checkModel(model string) *APIError {
	if modelMatches(model, s.cfg.ServedModelNames) {
		return nil
	}
	return &APIError{Status: http.StatusNotFound, Type: "NotFoundError", Param: "model", Message: fmt.Sprintf("The model `%s` does not exist.", model)}
}

// acquire admits a request or answers 503 at once: overload never queues
// without bound in the HTTP layer.
func (s *Server) acquire() (release func(), e *APIError) {
	select {
	case s.admit <- struct{}{}:
		return func() { <-s.admit }, nil
	default:
		return nil, &APIError{Status: http.StatusServiceUnavailable, Type: "ServiceUnavailableError",
			Message: fmt.Sprintf("the server is saturated: %d requests in flight; retry later", cap(s.admit))}
	}
}

type modelCard struct {
	ID          string `json:"id"`
	Object      string `json:"object"`
	Created     int64  `json:"created"`
	OwnedBy     string `json:"owned_by"`
	Root        string `json:"root"`
	MaxModelLen int    `json:"max_model_len"`
}

func (s *Server) handleModels(w http.ResponseWriter, r *http.Request) {
	var data []modelCard
	for _, name := range s.cfg.ServedModelNames {
		data = append(data, modelCard{ID: name, Object: "model", Created: s.created, OwnedBy: "glmtopo", Root: s.cfg.ServedModelNames[0], MaxModelLen: s.maxModelLen})
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data})
}

// promptTooLong is the 400 for a prompt that leaves no room, with the numbers.
func (s *Server) checkLength(promptLen, maxTokens int) (int, *APIError) {
	if promptLen == 0 {
		return 0, badRequest("prompt", "the prompt is empty")
	}
	if promptLen >= s.maxModelLen {
		return 0, badRequest("messages", "This model's maximum context length is %d tokens. However, your prompt has %d tokens, leaving no room for a completion.", s.maxModelLen, promptLen)
	}
	if maxTokens == 0 {
		return s.maxModelLen - promptLen, nil
	}
	if promptLen+maxTokens > s.maxModelLen {
		return 0, badRequest("max_tokens", "This model's maximum context length is %d tokens. However, you requested %d tokens (%d in the prompt, %d for the completion). Please reduce the prompt or max_tokens.",
			s.maxModelLen, promptLen+maxTokens, promptLen, maxTokens)
	}
	return maxTokens, nil
}

// sampling converts the request's sampling fields.
func samplingParams(f *SamplingFields) parallel.SamplingParams {
	p := parallel.SamplingParams{Temperature: 1, TopP: 1}
	if f.Temperature != nil {
		p.Temperature = float32(*f.Temperature)
	}
	if f.TopP != nil {
		p.TopP = float32(*f.TopP)
	}
	if f.TopK != nil && *f.TopK > 0 {
		p.TopK = *f.TopK
	}
	if f.Seed != nil {
		p.Seed, p.HasSeed = *f.Seed, true
	}
	return p
}

// newID returns prefix + 24 random hex digits.
func newID(prefix string) string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return prefix + fmt.Sprintf("%x", b[:])
}

// finishReason maps the engine's finish to OpenAI's.
func finishReason(f parallel.FinishReason, calledTools bool) string {
	switch {
	case f == parallel.FinishLength:
		return "length"
	case calledTools:
		return "tool_calls"
	case f == parallel.FinishAbort:
		return "abort"
	default:
		return "stop"
	}
}

// recordFinish updates the per-request metrics.
func (s *Server) recordFinish(arrival time.Time, res parallel.Result, reason string) {
	elapsed := time.Since(arrival)
	s.log.Info("request finished", "finish_reason", reason, "prompt_tokens", res.PromptTokens,
		"completion_tokens", res.CompletionTokens, "seconds", elapsed.Seconds())
	s.metrics.requestSuccess.WithLabelValues(reason).Inc()
	s.metrics.e2e.Observe(elapsed.Seconds())
	s.metrics.promptTokens.Add(float64(res.PromptTokens))
	s.metrics.generationTokens.Add(float64(res.CompletionTokens))
	s.metrics.promptHist.Observe(float64(res.PromptTokens))
	s.metrics.generationHist.Observe(float64(res.CompletionTokens))
}

// checkIDs validates prompt token ids against the vocabulary.
func (s *Server) checkIDs(ids []int) *APIError {
	for _, id := range ids {
		if id < 0 || id >= s.tok.VocabSize() {
			return badRequest("prompt", "token id %d is out of the vocabulary [0, %d)", id, s.tok.VocabSize())
		}
	}
	return nil
}
