package serve

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/parallel"
)

// serveOn runs s.Serve on a loopback port until the test ends.
func serveOn(t *testing.T, s *Server) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after cancel")
		}
	})
	return "http://" + ln.Addr().String()
}

// openSlowBody opens a connection that sends a completion's headers and
// one byte of its body, then stalls.
func openSlowBody(addr string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", strings.TrimPrefix(addr, "http://"), 2*time.Second)
	if err != nil {
		return nil, err
	}
	_, err = io.WriteString(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
	return c, err
}

// A body that does not arrive within the body timeout closes the connection.
func TestSlowBodyIsCut(t *testing.T) {
	s, err := NewServer(testConfig(), newFakeGen(scriptText(t, "ok")), testTokenizer(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	s.bodyTimeout = 200 * time.Millisecond
	c, err := openSlowBody(serveOn(t, s))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	_, err = io.ReadAll(c) // returns when the server closes the connection
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("the stalled body held its connection for %v", time.Since(start))
	}
}

// At the connection cap, a new connection evicts the longest-stalled one;
// when every connection is busy, the new one gets a 503 at once.
func TestConnLimiterEvictsThenRefuses(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var mu sync.Mutex
	events := map[string]int{}
	lim := newConnLimiter(ln, 2, func(k string) { mu.Lock(); events[k]++; mu.Unlock() })
	accepted := make(chan net.Conn, 8)
	go func() {
		for {
			c, err := lim.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	dial := func() net.Conn {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	dial()
	first := <-accepted
	dial()
	second := <-accepted
	dial() // evicts first
	third := <-accepted
	if _, err := first.Write([]byte("x")); err == nil {
		t.Error("the oldest stalled connection was not closed")
	}
	lim.markBusy(second)
	lim.markBusy(third)
	refused := dial()
	refused.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(refused), nil)
	if err != nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("a connection over a busy cap: %v %v", resp, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if events["evicted"] != 1 || events["refused"] != 1 || lim.count() != 2 {
		t.Errorf("events %v, %d connections held", events, lim.count())
	}
}

// The acceptance check of the slow-body flood: with the server's file limit
// at 2048 and 3000 slow-body connections open, /health and a 4-token
// completion each answer within 2 s. The server runs in a child process
// (this test binary) so that its file limit is its own.
func TestSlowBodyFloodKeepsServing(t *testing.T) {
	if testing.Short() {
		t.Skip("opens 3000 connections")
	}
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur < 3500 || rl.Max < 2048 {
		t.Skipf("this process may open %d files; the flood needs 3500", rl.Cur)
	}
	child := exec.Command(os.Args[0], "-test.run=^TestFloodServerChild$")
	child.Env = append(os.Environ(), "GLMTOPO_FLOOD_CHILD=1")
	stdin, _ := child.StdinPipe()
	stdout, _ := child.StdoutPipe()
	var stderr bytes.Buffer
	child.Stderr = &stderr
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		stdin.Close() // the child serves until its stdin closes
		done := make(chan error, 1)
		go func() { done <- child.Wait() }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			child.Process.Kill()
			t.Error("the server child did not exit")
		}
	}()
	addrc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "ADDR "); ok {
				addrc <- a
			}
		}
		close(addrc)
	}()
	var addr string
	select {
	case addr = <-addrc:
	case <-time.After(30 * time.Second):
		t.Fatalf("the server child did not start: %s", stderr.String())
	}
	if addr == "" {
		t.Fatalf("the server child exited: %s", stderr.String())
	}
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range 3000 {
		if c, err := openSlowBody(addr); err == nil {
			conns = append(conns, c)
		} else if c != nil {
			c.Close()
		}
	}
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	start := time.Now()
	resp, err := client.Get(addr + "/health")
	if err != nil {
		t.Fatalf("/health during the flood: %v (%s)", err, stderr.String())
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/health during the flood: %d", resp.StatusCode)
	}
	health := time.Since(start)
	start = time.Now()
	resp, err = client.Post(addr+"/v1/completions", "application/json",
		strings.NewReader(`{"model":"glm-test","prompt":"hello","max_tokens":4,"ignore_eos":true}`))
	if err != nil {
		t.Fatalf("a completion during the flood: %v", err)
	}
	defer resp.Body.Close()
	var out struct{ Usage Usage }
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != http.StatusOK || out.Usage.CompletionTokens != 4 {
		t.Fatalf("a completion during the flood: status %d, usage %+v, %v", resp.StatusCode, out.Usage, err)
	}
	t.Logf("%d slow-body connections open; /health in %v, a 4-token completion in %v", len(conns), health, time.Since(start))
}

// TestFloodServerChild is the server of TestSlowBodyFloodKeepsServing.
func TestFloodServerChild(t *testing.T) {
	if os.Getenv("GLMTOPO_FLOOD_CHILD") != "1" {
		t.Skip("the server process of TestSlowBodyFloodKeepsServing")
	}
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	rl.Cur = 2048
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	gen := newFakeGen(func(parallel.Request) []int { return []int{100, 101, 102, 103, 104, 105} })
	s, err := NewServer(testConfig(), gen, testTokenizer(t), slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { io.Copy(io.Discard, os.Stdin); cancel() }()
	fmt.Printf("ADDR http://%s\n", ln.Addr())
	if err := s.Serve(ctx, ln); err != nil {
		t.Fatal(err)
	}
}
