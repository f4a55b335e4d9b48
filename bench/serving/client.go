package serving

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Outcome is the measurement of one request.
type Outcome struct {
	Success bool
	Err     string

	PromptLen          int // server's usage.prompt_tokens when reported, else the local count
	LocalPromptLen     int
	ServerPromptTokens int // -1 when the server reported no usage
	OutputTokens       int // usage.completion_tokens, else the number of token chunks
	Chunks             int // token-bearing chunks received

	Start     time.Time     // when the request was sent
	QueueTime time.Duration // waiting for a --max-concurrency slot
	TTFT      time.Duration
	ITL       []time.Duration // gap before every token chunk after the first
	Latency   time.Duration   // send to last token chunk (vLLM's E2EL)
	Text      string          // generated text, kept only for --save-detailed
}

// client sends streaming requests to one OpenAI-compatible endpoint.
type client struct {
	http     *http.Client
	url      string
	model    string
	cfg      *Config
	keepText bool
	readers  sync.Pool
}

func newHTTPClient(maxConns int) *http.Client {
	t := &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		DialContext:         (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        0,
		MaxIdleConnsPerHost: max(maxConns, 16),
		IdleConnTimeout:     90 * time.Second,
		// A gzip layer would buffer the stream and smear token arrival times.
		DisableCompression: true,
	}
	// vLLM's client gives a request at most six hours; ctx cancels sooner.
	return &http.Client{Transport: t, Timeout: 6 * time.Hour}
}

func newClient(hc *http.Client, cfg *Config, model string, keepText bool) *client {
	cl := &client{http: hc, url: cfg.BaseURL + cfg.Endpoint, model: model, cfg: cfg, keepText: keepText}
	// Small per-stream buffers keep 1,000 streams' memory (and start-up GC) low; a longer SSE
	// line is still read whole, through stream's overflow path.
	cl.readers.New = func() any { return bufio.NewReaderSize(nil, 4<<10) }
	return cl
}

func (cl *client) body(r Request) ([]byte, error) {
	b := map[string]any{
		"model":          cl.model,
		"stream":         true,
		"stream_options": map[string]any{"include_usage": true},
	}
	if cl.cfg.chat() {
		b["messages"] = []map[string]string{{"role": "user", "content": r.Prompt}}
		b["max_completion_tokens"] = r.OutputLen
	} else {
		b["prompt"] = r.Prompt
		b["max_tokens"] = r.OutputLen
	}
	if cl.cfg.IgnoreEOS {
		b["ignore_eos"] = true
	}
	if cl.cfg.Temperature != nil {
		b["temperature"] = *cl.cfg.Temperature
	}
	for k, v := range cl.cfg.ExtraBody {
		b[k] = v
	}
	return json.Marshal(b)
}

// do sends r and measures it into out. Errors end up in out, never returned: a failed request
// is counted, not dropped.
func (cl *client) do(ctx context.Context, r Request, out *Outcome) {
	body, err := cl.body(r)
	if err != nil {
		out.LocalPromptLen, out.PromptLen, out.ServerPromptTokens = r.PromptLen, r.PromptLen, -1
		out.Err = fmt.Sprintf("encode request: %v", err)
		return
	}
	cl.send(ctx, r, body, out)
}

// send posts a body built by cl.body(r). Bodies are built before the run starts so the
// request path does no JSON encoding between the arrival time and the send.
func (cl *client) send(ctx context.Context, r Request, body []byte, out *Outcome) {
	out.LocalPromptLen, out.PromptLen, out.ServerPromptTokens = r.PromptLen, r.PromptLen, -1
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, cl.url, bytes.NewReader(body))
	if err != nil {
		out.Err = err.Error()
		return
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	if cl.cfg.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+cl.cfg.APIKey)
	}
	// Pre-size the per-token gap list so appends on the hot path do not allocate.
	out.ITL = make([]time.Duration, 0, r.OutputLen+8)
	out.Start = time.Now()
	resp, err := cl.http.Do(req)
	if err != nil {
		out.Err = err.Error()
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		out.Err = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(msg)))
		return
	}
	br := cl.readers.Get().(*bufio.Reader)
	br.Reset(resp.Body)
	defer func() { br.Reset(nil); cl.readers.Put(br) }()
	cl.stream(br, out, r.OutputLen)
}

// stream reads SSE lines until [DONE] or EOF. It allocates nothing per token: lines are read
// in place, chunks parsed in place, gaps appended to a pre-sized slice.
func (cl *client) stream(br *bufio.Reader, out *Outcome, expected int) {
	var (
		c       chunk
		long    []byte // a line longer than the reader's buffer
		other   []byte // the first line that was not SSE data, if any
		text    []byte
		last    = out.Start
		usage   bool
		usedOut int
		event   time.Time // the last data event
	)
	if cl.keepText {
		text = make([]byte, 0, expected*4)
	}
	for {
		line, err := br.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			long = append(long, line...)
			continue
		}
		if long != nil {
			long = append(long, line...)
			line, long = long, nil
		}
		if err != nil && err != io.EOF {
			out.Err = fmt.Sprintf("stream: %v", err)
			break
		}
		payload, ok := ssePayload(line)
		if !ok {
			if other == nil && len(bytes.TrimSpace(line)) > 0 && line[0] != ':' {
				other = append([]byte(nil), bytes.TrimSpace(line)...) // kept for the error message
			}
			if err == io.EOF {
				break
			}
			continue // blank separator lines and comments need no clock read
		}
		now := time.Now()
		if string(payload) == "[DONE]" {
			break
		}
		if len(payload) > 0 {
			event = now
			if perr := parseChunk(payload, &c); perr != nil {
				out.Err = fmt.Sprintf("stream: %v: %.200s", perr, payload)
				break
			}
			if c.errMsg != nil {
				out.Err = fmt.Sprintf("server error in stream: %.300s", c.errMsg)
				break
			}
			if c.token {
				if out.Chunks == 0 {
					out.TTFT = now.Sub(out.Start)
				} else {
					out.ITL = append(out.ITL, now.Sub(last))
				}
				last = now
				out.Chunks++
				if cl.keepText {
					text = append(text, c.text...)
				}
			}
			if c.hasUsage {
				usage = true
				out.ServerPromptTokens = c.promptTokens
				usedOut = c.completionTokens
			}
		}
		if err == io.EOF {
			break
		}
	}
	if cl.keepText {
		if s, err := unescapeJSONString(text); err == nil {
			out.Text = s
		}
	}
	if out.Err != "" {
		return
	}
	if out.Chunks == 0 && usage && usedOut > 0 {
		// Tokens were generated but decode to no text (a lone special or partial
		// character): the usage chunk counts them, and the stream's last event
		// is when they arrived.
		out.Success = true
		out.TTFT = event.Sub(out.Start)
		out.Latency = out.TTFT
		out.OutputTokens = usedOut
		if out.ServerPromptTokens > 0 {
			out.PromptLen = out.ServerPromptTokens
		}
		return
	}
	if out.Chunks == 0 {
		out.Err = "stream ended without a token chunk"
		if other != nil {
			out.Err += fmt.Sprintf(" (server sent %.200q)", other)
		}
		return
	}
	out.Success = true
	out.Latency = last.Sub(out.Start)
	out.OutputTokens = out.Chunks
	if usage {
		if out.ServerPromptTokens > 0 {
			out.PromptLen = out.ServerPromptTokens
		}
		if usedOut > 0 {
			out.OutputTokens = usedOut
		}
	}
}

// ssePayload returns the data of a "data:" line; comments, event names and blank lines
// give ok == false.
func ssePayload(line []byte) ([]byte, bool) {
	line = bytes.TrimRight(line, "\r\n")
	if !bytes.HasPrefix(line, []byte("data:")) {
		return nil, false
	}
	line = line[len("data:"):]
	if len(line) > 0 && line[0] == ' ' {
		line = line[1:]
	}
	return line, true
}

// firstModel asks GET /v1/models for the first model id.
func firstModel(ctx context.Context, hc *http.Client, cfg *Config) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, cfg.BaseURL+"/v1/models", nil)
	if err != nil {
		return "", err
	}
	if cfg.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+cfg.APIKey)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return "", fmt.Errorf("list models at %s: %w", cfg.BaseURL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("list models at %s: HTTP %d", cfg.BaseURL, resp.StatusCode)
	}
	var list struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&list); err != nil {
		return "", fmt.Errorf("list models at %s: %w", cfg.BaseURL, err)
	}
	if len(list.Data) == 0 || list.Data[0].ID == "" {
		return "", fmt.Errorf("server at %s lists no models; pass --model", cfg.BaseURL)
	}
	return list.Data[0].ID, nil
}
