package parallel

import (
	"context"
	"crypto/rand"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/transport/tcp"
)

// smallBuffers sets SO_SNDBUF and SO_RCVBUF to 4 KiB on a socket, so that a
// message of a few tens of KiB fills what the kernel holds of a connection.
func smallBuffers(network, address string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		for _, opt := range []int{syscall.SO_SNDBUF, syscall.SO_RCVBUF} {
			if e := syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, opt, 4096); e != nil {
				serr = e
			}
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// listenSmall is ListenStage on a socket whose accepted connections
// inherit 4 KiB buffers.
func listenSmall(t *testing.T, cfg tcp.Config) *StageListener {
	t.Helper()
	lc := net.ListenConfig{Control: smallBuffers}
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	acc, err := tcp.NewAcceptor(ln, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { acc.Close() })
	return &StageListener{acc: acc, cfg: cfg}
}

// TestPipelineLargeMessagesMicroBatches: with two micro-batches in flight
// and messages far larger than the sockets' buffers (prompt chunks of a
// few hundred rows over links whose buffers hold 4 KiB), the head writes
// micro-batch 2 while the stage writes micro-batch 1's rows back. The
// head must read while it writes (and the stage read while it writes):
// a head that reads only after its send completes waits on a stage that
// waits on it, and the step times out. Tokens must match one process.
func TestPipelineLargeMessagesMicroBatches(t *testing.T) {
	dir := fixtureDir("tiny")
	opt := EngineOptions{BlockSize: 16, MaxTokens: 2048}
	sopt := SchedulerOptions{MaxNumSeqs: 4, PrefillTokens: 512}
	var items []workItem
	for i, n := range []int{300, 260, 280, 240} {
		p := make([]int, n)
		for j := range p {
			p[j] = (i*131 + j*17 + 3) % 1000
		}
		items = append(items, workItem{req: Request{PromptIDs: p, MaxNewTokens: 5, IgnoreEOS: true}})
	}
	ref := NewScheduler(wholeEngine(t, dir, opt), sopt)
	want := runWorkload(t, ref, items)
	ref.Close()

	key := make([]byte, 32)
	rand.Read(key)
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		d := net.Dialer{Control: smallBuffers}
		return d.DialContext(ctx, network, addr)
	}
	headCfg := tcp.Config{Name: "head", Key: key, Dial: dial}
	stageCfg := tcp.Config{Name: "stage1", Key: key, Dial: dial}
	hl := listenSmall(t, headCfg)
	sl := listenSmall(t, stageCfg)

	bounds := splitLayers(numLayers(t, dir), 2)
	sbe, sw := loadFixtureSelection(t, dir, stageSelection(bounds[1], bounds[2]))
	st, err := NewStage(sbe, sw)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- sl.Serve(ctx, st, hl.Addr().String()) }()

	head := loadHeadEngine(t, dir, bounds[1], opt)
	ring, err := ConnectRingTCP(ctx, head, hl, sl.Addr().String(), RingOptions{StepTimeout: 3 * time.Second, MicroBatches: 2})
	if err != nil {
		t.Fatal(err)
	}
	s := NewScheduler(head, sopt)
	got := runWorkload(t, s, items)
	s.Close()
	compareWork(t, got, want)
	if ring.pipe.peak != 2 {
		t.Errorf("at most %d micro-batches were in flight, want 2", ring.pipe.peak)
	}
	rs := ring.Stats()
	if hop := hopLatency(t, ring, 20); hop <= 0 || hop > time.Second {
		t.Errorf("header-only hop latency %v", hop)
	}
	ring.Close()
	if err := <-served; err != nil {
		t.Errorf("stage: %v", err)
	}
	ss := st.Stats()
	if rs.Steps == 0 || rs.RoundTrip <= 0 || ss.Steps != rs.Steps || ss.Busy <= 0 {
		t.Errorf("ring stats %+v, stage stats %+v: want every step counted", rs, ss)
	}
	t.Logf("ring %+v; stage %+v", rs, ss)
}
