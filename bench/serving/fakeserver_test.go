package serving

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// script is how the fake server answers one request.
type script struct {
	TTFT      time.Duration   // before the first token
	ITL       []time.Duration // before each later token; len(ITL)+1 tokens in all
	Status    int             // non-200: fail with this status
	DropAfter int             // > 0: close the connection after this many tokens
	ErrorAt   int             // > 0: send an error chunk after this many tokens
	NoUsage   bool
	Bundle    int // tokens per chunk (default 1); usage still counts them all
}

// sent is what the fake server did for one request, by its own clock.
type sent struct {
	Received time.Time
	Tokens   []time.Time // when each token chunk was flushed
	Body     map[string]any
}

// fakeServer is an in-process OpenAI-compatible streaming server with scripted timings.
type fakeServer struct {
	t      testing.TB
	srv    *httptest.Server
	plan   func(body map[string]any, n int) script // n: 0-based index among non-probe requests
	prompt func(prompt string) int                 // server's prompt token count
	chat   bool

	mu          sync.Mutex
	sent        map[string]*sent // by prompt
	metrics     []string         // successive /metrics bodies
	metricsHits int
	count       atomic.Int64
	inflight    atomic.Int64
	maxInflight atomic.Int64
}

func newFakeServer(t testing.TB, plan func(body map[string]any, n int) script) *fakeServer {
	f := &fakeServer{t: t, plan: plan, sent: map[string]*sent{},
		prompt: func(p string) int { return len(strings.Fields(p)) }}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/completions", f.complete)
	mux.HandleFunc("/v1/chat/completions", f.complete)
	mux.HandleFunc("/v1/models", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `{"object":"list","data":[{"id":"fake/glm-4.5-air","object":"model","root":"glm"}]}`)
	})
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		if len(f.metrics) == 0 {
			http.NotFound(w, r)
			return
		}
		fmt.Fprint(w, f.metrics[min(f.metricsHits, len(f.metrics)-1)])
		f.metricsHits++
	})
	f.srv = httptest.NewUnstartedServer(mux)
	// A fresh connection's first request starts, from the client's side, when it dials: the
	// server notes the accept time so the reference TTFT includes connection setup as the
	// client's does.
	f.srv.Config.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		return context.WithValue(ctx, acceptedKey{}, &accepted{at: time.Now()})
	}
	f.srv.Start()
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeServer) url() string { return f.srv.URL }

func (f *fakeServer) record(prompt string) *sent {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sent[prompt]
}

type acceptedKey struct{}

type accepted struct {
	at   time.Time
	used atomic.Bool
}

func (f *fakeServer) complete(w http.ResponseWriter, r *http.Request) {
	received := time.Now()
	if a, ok := r.Context().Value(acceptedKey{}).(*accepted); ok && a.used.CompareAndSwap(false, true) {
		received = a.at
	}
	var body map[string]any
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	chat := strings.HasSuffix(r.URL.Path, "chat/completions")
	var prompt string
	maxTokens := 0
	if chat {
		msgs, _ := body["messages"].([]any)
		if len(msgs) > 0 {
			prompt, _ = msgs[0].(map[string]any)["content"].(string)
		}
		mt, _ := body["max_completion_tokens"].(float64)
		maxTokens = int(mt)
	} else {
		prompt, _ = body["prompt"].(string)
		mt, _ := body["max_tokens"].(float64)
		maxTokens = int(mt)
	}
	var s script
	if maxTokens == 1 {
		s = script{} // probe: one token at once
	} else {
		s = f.plan(body, int(f.count.Add(1)-1))
	}
	rec := &sent{Received: received, Body: body}
	if maxTokens != 1 {
		f.mu.Lock()
		f.sent[prompt] = rec
		f.mu.Unlock()
	}
	stamp := func() {
		now := time.Now()
		f.mu.Lock()
		rec.Tokens = append(rec.Tokens, now)
		f.mu.Unlock()
	}
	cur := f.inflight.Add(1)
	// Leave before the last bytes go out: the client may start its next request as soon as it
	// reads them, and must not see this one still counted.
	var once sync.Once
	leave := func() { once.Do(func() { f.inflight.Add(-1) }) }
	defer leave()
	for {
		m := f.maxInflight.Load()
		if cur <= m || f.maxInflight.CompareAndSwap(m, cur) {
			break
		}
	}
	if s.Status != 0 && s.Status != http.StatusOK {
		leave()
		http.Error(w, `{"error":{"message":"scripted failure"}}`, s.Status)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	fl := w.(http.Flusher)
	if chat {
		fmt.Fprint(w, `data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}`+"\n\n")
		fl.Flush()
	}
	bundle := max(s.Bundle, 1)
	nChunks := len(s.ITL) + 1
	next := received.Add(s.TTFT)
	for k := range nChunks {
		if k > 0 {
			next = next.Add(s.ITL[k-1])
		}
		time.Sleep(time.Until(next))
		if s.DropAfter > 0 && k == s.DropAfter {
			panic(http.ErrAbortHandler) // drops the connection mid-stream
		}
		if s.ErrorAt > 0 && k == s.ErrorAt {
			leave()
			fmt.Fprint(w, `data: {"error":{"message":"scripted stream error","code":500}}`+"\n\n")
			fl.Flush()
			return
		}
		finish := "null"
		if k == nChunks-1 {
			finish = `"length"`
		}
		tok := strings.Repeat(fmt.Sprintf(" t%d", k), bundle)
		if chat {
			fmt.Fprintf(w, `data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":%q},"finish_reason":%s}]}`+"\n\n", tok, finish)
		} else {
			fmt.Fprintf(w, `data: {"id":"c","object":"text_completion","choices":[{"index":0,"text":%q,"logprobs":null,"finish_reason":%s}],"usage":null}`+"\n\n", tok, finish)
		}
		fl.Flush()
		stamp()
	}
	if !s.NoUsage {
		fmt.Fprintf(w, `data: {"id":"c","choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":0}}`+"\n\n",
			f.prompt(prompt), nChunks*bundle)
	}
	leave()
	fmt.Fprint(w, "data: [DONE]\n\n")
	fl.Flush()
}

// evenly is a script of n tokens: ttft, then gap between tokens.
func evenly(ttft, gap time.Duration, n int) script {
	s := script{TTFT: ttft, ITL: make([]time.Duration, n-1)}
	for i := range s.ITL {
		s.ITL[i] = gap
	}
	return s
}

// wordTokenizer is a test tokenizer: id i < pairBase is the text " w<i>"; with merge, the word
// pair " w<10k> w<10k+1>" is one token pairBase+k (as a BPE merge would make it), so decoding a
// run of ids and encoding it again can give fewer tokens. Ids at or above special are special.
type wordTokenizer struct {
	vocab, special int
	merge          bool
}

const pairBase = 900

func (w wordTokenizer) VocabSize() int        { return w.vocab }
func (w wordTokenizer) IsSpecial(id int) bool { return id >= w.special }
func (w wordTokenizer) Decode(ids []int) string {
	var b strings.Builder
	for _, id := range ids {
		if w.merge && id >= pairBase && id < w.special {
			k := id - pairBase
			fmt.Fprintf(&b, " w%d w%d", 10*k, 10*k+1)
			continue
		}
		fmt.Fprintf(&b, " w%d", id)
	}
	return b.String()
}
func (w wordTokenizer) Encode(s string) []int {
	var ids []int
	f := strings.Fields(s)
	for i := 0; i < len(f); i++ {
		id, err := strconv.Atoi(strings.TrimPrefix(f[i], "w"))
		if err != nil {
			id = 0
		}
		if w.merge && id%10 == 0 && id/10 < w.special-pairBase && i+1 < len(f) && f[i+1] == fmt.Sprintf("w%d", id+1) {
			ids = append(ids, pairBase+id/10)
			i++
			continue
		}
		ids = append(ids, id)
	}
	return ids
}
