package serving

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// BenchmarkStreamPerToken is the client's own cost per streamed token: reading the SSE line,
// parsing the chunk, taking the timestamp and recording the gap. No network.
func BenchmarkStreamPerToken(b *testing.B) {
	const tokens = 1000
	stream := sseStream(tokens)
	cl := &client{cfg: &Config{}}
	br := bufio.NewReaderSize(nil, 16<<10)
	out := Outcome{ITL: make([]time.Duration, 0, tokens+8)}
	rd := strings.NewReader(stream)
	b.ReportAllocs()
	b.SetBytes(int64(len(stream)))
	b.ResetTimer()
	for range b.N {
		rd.Reset(stream)
		br.Reset(rd)
		out.ITL, out.Chunks, out.Err = out.ITL[:0], 0, ""
		cl.stream(br, &out, tokens)
	}
	b.StopTimer()
	if out.Chunks != tokens {
		b.Fatalf("%d chunks", out.Chunks)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*tokens), "ns/token")
}

// leanServer streams tokens at a fixed gap to any number of clients, recording (wall clock,
// Unix ns) when it flushed each token; it does as little per token as it can.
type leanServer struct {
	gap    time.Duration
	tokens int
	mu     sync.Mutex
	sent   map[string][]int64
}

var leanChunk = []byte(`data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"glm","choices":[{"index":0,"text":" tok","logprobs":null,"finish_reason":null}],"usage":null}` + "\n\n")

func (s *leanServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/sent" {
		s.mu.Lock()
		defer s.mu.Unlock()
		json.NewEncoder(w).Encode(s.sent)
		return
	}
	var body struct {
		Prompt    string `json:"prompt"`
		MaxTokens int    `json:"max_tokens"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(w, err.Error(), 400)
		return
	}
	n := s.tokens
	if body.MaxTokens == 1 {
		n = 1
	}
	times := make([]int64, 0, n)
	w.Header().Set("Content-Type", "text/event-stream")
	fl := w.(http.Flusher)
	next := time.Now()
	for k := range n {
		if k > 0 {
			next = next.Add(s.gap)
			time.Sleep(time.Until(next))
		}
		w.Write(leanChunk)
		fl.Flush()
		times = append(times, time.Now().UnixNano())
	}
	io.WriteString(w, `data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":`+itoa(n)+`}}`+"\n\ndata: [DONE]\n\n")
	fl.Flush()
	if body.MaxTokens != 1 {
		s.mu.Lock()
		s.sent[body.Prompt] = times
		s.mu.Unlock()
	}
}

const leanServerEnv = "BENCH_SERVE_LEAN_SERVER"

// TestMain lets the test binary double as the 1,000-stream benchmark's server process.
func TestMain(m *testing.M) {
	if os.Getenv(leanServerEnv) != "" {
		serveLeanProcess()
		return
	}
	os.Exit(m.Run())
}

// serveLeanProcess runs a leanServer (200 tokens, 20 ms apart) on a free port, prints the port,
// and exits when its stdin closes.
func serveLeanProcess() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println("ERR", err)
		return
	}
	fmt.Println("ADDR", ln.Addr().String())
	go http.Serve(ln, &leanServer{gap: 20 * time.Millisecond, tokens: 200, sent: map[string][]int64{}})
	io.Copy(io.Discard, os.Stdin)
}

// startLeanProcess starts the server in a child process: in the same process its goroutines,
// all woken by timers, would crowd out the client's network wake-ups in Go's scheduler and the
// benchmark would measure that rather than the client.
func startLeanProcess(b *testing.B) string {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), leanServerEnv+"=1", "GOMAXPROCS=2")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { stdin.Close(); cmd.Wait() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "ADDR ")
	if err != nil || !ok {
		b.Fatalf("lean server: %q %v", line, err)
	}
	return "http://" + addr
}

// BenchmarkThousandStreams runs 1,000 concurrent streams of 200 tokens at 50 tokens/s each
// (≈4 s per iteration) from a server in another process, and compares every client-measured
// ITL with the gap between the server's flushes of the same two tokens. It reports that error's
// mean, p99 and max, how long after the server's flush the client saw each token (lag), the
// output token rate and the peak concurrency.
func BenchmarkThousandStreams(b *testing.B) {
	const tokens = 200
	streams := benchStreams()
	url := startLeanProcess(b)
	for range b.N {
		cfg := DefaultConfig()
		cfg.BaseURL, cfg.Model = url, "glm"
		cfg.NumPrompts, cfg.RandomInputLen, cfg.RandomOutputLen = streams, 16, tokens
		cfg.DisableTQDM = true
		res, err := Run(context.Background(), cfg, io.Discard, io.Discard)
		if err != nil {
			b.Fatal(err)
		}
		if res.Metrics.Completed != streams {
			b.Fatalf("%d of %d streams completed: %v", res.Metrics.Completed, streams, ErrorSummary(res.Outcomes))
		}
		resp, err := http.Get(url + "/sent")
		if err != nil {
			b.Fatal(err)
		}
		var sentAll map[string][]int64
		err = json.NewDecoder(resp.Body).Decode(&sentAll)
		resp.Body.Close()
		if err != nil {
			b.Fatal(err)
		}
		// Steady state starts a second after the first token: the first second also holds
		// 1,000 connection setups and the client's start-up garbage collections.
		var first int64 = math.MaxInt64
		for _, sent := range sentAll {
			if len(sent) > 0 {
				first = min(first, sent[0])
			}
		}
		steady := first + int64(time.Second)
		var errs, lags, steadyErrs, steadyLags []float64
		for i, o := range res.Outcomes {
			sent := sentAll[res.Requested[i].Prompt]
			if len(sent) != tokens || len(o.ITL) != tokens-1 {
				b.Fatalf("request %d: server sent %d, client saw %d gaps", i, len(sent), len(o.ITL))
			}
			// The client saw token k at start + TTFT + the gaps so far; lag is how long after
			// the server's flush that was (both wall clocks of one machine).
			at := o.Start.Add(o.TTFT).UnixNano()
			lags = append(lags, float64(at-sent[0])/1e6)
			for k, g := range o.ITL {
				e := math.Abs(ms(g) - float64(sent[k+1]-sent[k])/1e6)
				at += int64(g)
				lag := float64(at-sent[k+1]) / 1e6
				errs, lags = append(errs, e), append(lags, lag)
				if sent[k] >= steady {
					steadyErrs, steadyLags = append(steadyErrs, e), append(steadyLags, lag)
				}
			}
		}
		slices.Sort(errs)
		slices.Sort(lags)
		var sum float64
		for _, e := range errs {
			sum += e
		}
		b.ReportMetric(sum/float64(len(errs)), "itl-err-mean-ms")
		b.ReportMetric(errs[len(errs)/2], "itl-err-p50-ms")
		b.ReportMetric(errs[len(errs)*99/100], "itl-err-p99-ms")
		b.ReportMetric(errs[len(errs)-1], "itl-err-max-ms")
		b.ReportMetric(lags[len(lags)/2], "lag-p50-ms")
		b.ReportMetric(lags[len(lags)*99/100], "lag-p99-ms")
		slices.Sort(steadyErrs)
		slices.Sort(steadyLags)
		if len(steadyErrs) > 0 {
			b.ReportMetric(steadyErrs[len(steadyErrs)*99/100], "steady-itl-err-p99-ms")
			b.ReportMetric(steadyErrs[len(steadyErrs)*999/1000], "steady-itl-err-p99.9-ms")
			b.ReportMetric(steadyLags[len(steadyLags)*99/100], "steady-lag-p99-ms")
		}
		b.ReportMetric(res.Metrics.ITL.Mean, "itl-mean-ms")
		b.ReportMetric(res.Metrics.OutputThroughput, "out-tok/s")
		b.ReportMetric(float64(res.Metrics.MaxConcurrentRequests), "peak-streams")
	}
}

// benchStreams is 1000 unless BENCH_SERVE_STREAMS overrides it (for a quick look).
func benchStreams() int {
	if n, err := strconv.Atoi(os.Getenv("BENCH_SERVE_STREAMS")); err == nil && n > 0 {
		return n
	}
	return 1000
}
