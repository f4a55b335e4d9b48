package tcp

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/transport"
)

func testKey(t testing.TB) []byte {
	k := make([]byte, 32)
	if _, err := crand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

func cfg(name string, key []byte) Config {
	return Config{Name: name, Key: key, HandshakeTimeout: 5 * time.Second}
}

// pair returns a dialed link and the acceptor's end of it.
func pair(t testing.TB, dial, accept Config) (*Link, *Link) {
	t.Helper()
	a, err := Listen("127.0.0.1:0", accept)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return connect(t, ctx, a, dial)
}

// connect dials acc with the dial config and returns the dialed link and
// the acceptor's end of it, both closed when the test ends.
func connect(t testing.TB, ctx context.Context, acc *Acceptor, dial Config) (*Link, *Link) {
	t.Helper()
	d, err := Dial(ctx, acc.Addr().String(), dial)
	if err != nil {
		t.Fatal(err)
	}
	l, err := acc.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close(); l.Close() })
	return d, l
}

// pattern fills n bytes that depend on seed and position.
func pattern(seed uint64, n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, uint64(n)))
	for i := 0; i+8 <= n; i += 8 {
		x := r.Uint64()
		for j := range 8 {
			b[i+j] = byte(x >> (8 * j))
		}
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(i)
	}
	return b
}

func msg(step uint64, payloads ...[]byte) *transport.Message {
	m := &transport.Message{Header: transport.Header{Step: step, Kind: transport.KindActivations,
		Seqs: []transport.SeqMeta{{ID: step, Position: int64(step), Tokens: 1, NewBlocks: []int32{int32(step)}}}}}
	for _, p := range payloads {
		m.Header.Tensors = append(m.Header.Tensors, transport.TensorMeta{DType: transport.DTypeBytes, Shape: []int64{int64(len(p))}, Bytes: int64(len(p))})
		m.Payloads = append(m.Payloads, transport.HostBuffer(p))
	}
	return m
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// TestRandomSizes: payloads of 0 … 64 MiB (random, plus the edges) arrive
// intact in both directions, with and without frame MACs.
func TestRandomSizes(t *testing.T) {
	for _, mac := range []bool{false, true} {
		t.Run(fmt.Sprintf("frame-mac=%v", mac), func(t *testing.T) {
			key := testKey(t)
			dc, ac := cfg("stage0", key), cfg("stage1", key)
			dc.FrameMAC = mac
			d, a := pair(t, dc, ac)
			r := rand.New(rand.NewPCG(1, 2))
			sizes := []int{0, 1, 4096, 64 << 20}
			for range 6 {
				sizes = append(sizes, r.IntN(4<<20))
			}
			if !mac {
				sizes = append(sizes, r.IntN(64<<20))
			}
			ctx := ctxT(t, 60*time.Second)
			var got transport.Message
			for i, n := range sizes {
				from, to := d, a
				if i%2 == 1 {
					from, to = a, d
				}
				want := pattern(uint64(i), n)
				errc := make(chan error, 1)
				go func() { errc <- from.Send(ctx, msg(uint64(i), want, []byte("tail"))) }()
				if err := to.Recv(ctx, &got); err != nil {
					t.Fatalf("size %d: %v", n, err)
				}
				if err := <-errc; err != nil {
					t.Fatalf("size %d: %v", n, err)
				}
				if got.Header.Step != uint64(i) || len(got.Payloads) != 2 || !bytes.Equal(got.Payloads[0].Host, want) || string(got.Payloads[1].Host) != "tail" {
					t.Fatalf("size %d: message %d arrived altered (step %d, %d payloads)", n, i, got.Header.Step, len(got.Payloads))
				}
				if got.Header.Seqs[0].NewBlocks[0] != int32(i) {
					t.Fatalf("size %d: sequence metadata lost: %+v", n, got.Header.Seqs)
				}
			}
		})
	}
}

// TestConcurrentSenders: frames from 8 goroutines never interleave, and each
// sender's messages arrive in its order.
func TestConcurrentSenders(t *testing.T) {
	key := testKey(t)
	d, a := pair(t, cfg("s0", key), cfg("s1", key))
	ctx := ctxT(t, 30*time.Second)
	const senders, each = 8, 40
	var wg sync.WaitGroup
	errs := make(chan error, senders)
	for s := range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				step := uint64(s)<<32 | uint64(i)
				if err := d.Send(ctx, msg(step, pattern(step, 1000+97*i*s))); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	next := make([]int, senders)
	var m transport.Message
	for range senders * each {
		if err := a.Recv(ctx, &m); err != nil {
			t.Fatal(err)
		}
		s, i := int(m.Header.Step>>32), int(m.Header.Step&0xffffffff)
		if i != next[s] {
			t.Fatalf("sender %d: message %d arrived, expected %d", s, i, next[s])
		}
		next[s]++
		if !bytes.Equal(m.Payloads[0].Host, pattern(m.Header.Step, 1000+97*i*s)) {
			t.Fatalf("sender %d message %d: payload corrupted", s, i)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if st := a.Stats().Snapshot(); st.MsgsRecv != senders*each {
		t.Fatalf("stats count %d messages received", st.MsgsRecv)
	}
}

func TestWrongKeyRefused(t *testing.T) {
	a, err := Listen("127.0.0.1:0", cfg("stage1", testKey(t)))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	ctx := ctxT(t, 5*time.Second)
	if _, err := Dial(ctx, a.Addr().String(), cfg("intruder", testKey(t))); !errors.Is(err, ErrAuth) {
		t.Fatalf("dial with the wrong key: %v, want ErrAuth", err)
	}
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if l, err := a.Accept(short); err == nil {
		t.Fatalf("the acceptor formed a link with %s", l.Peer())
	}
}

// TestKeylessPeerLearnsNothing: a client that speaks the protocol without
// the key gets the listener's nonce and proof (not its name), then the
// connection closes: no further byte reaches it, and no link forms.
func TestKeylessPeerLearnsNothing(t *testing.T) {
	a, err := Listen("127.0.0.1:0", cfg("stage1", testKey(t)))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	c, err := net.Dial("tcp", a.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	hello := append([]byte(helloMagic), protoVersion, 0)
	hello = append(hello, make([]byte, sessionIDBytes)...)
	hello = appendName(hello, "mallory")
	hello = append(hello, make([]byte, nonceBytes)...)
	c.Write(hello)
	challenge := make([]byte, 1+nonceBytes+macBytes)
	if _, err := io.ReadFull(c, challenge); err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(challenge, []byte("stage1")) {
		t.Fatal("the listener told a keyless peer its name")
	}
	c.Write(make([]byte, macBytes)) // a guessed proof
	rest, err := io.ReadAll(c)
	if len(rest) != 0 {
		t.Fatalf("a keyless peer received %d bytes after its bad proof", len(rest))
	}
	if err != nil && !errors.Is(err, io.EOF) && !isReset(err) {
		t.Fatalf("expected the listener to close: %v", err)
	}
	short, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := a.Accept(short); err == nil {
		t.Fatal("a link formed without the key")
	}
}

func isReset(err error) bool {
	var op *net.OpError
	return errors.As(err, &op)
}

// TestCancelledRecvKeepsLink: a Recv that times out before any byte of a
// frame arrived leaves the link usable.
func TestCancelledRecvKeepsLink(t *testing.T) {
	key := testKey(t)
	d, a := pair(t, cfg("s0", key), cfg("s1", key))
	var m transport.Message
	short, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	err := a.Recv(short, &m)
	cancel()
	var le *transport.Error
	if !errors.Is(err, context.DeadlineExceeded) || !errors.As(err, &le) || le.Op != "recv" {
		t.Fatalf("Recv = %v, want a deadline error", err)
	}
	ctx := ctxT(t, 5*time.Second)
	go d.Send(ctx, msg(5, []byte("after")))
	if err := a.Recv(ctx, &m); err != nil || string(m.Payloads[0].Host) != "after" {
		t.Fatalf("after a timed-out Recv: %v", err)
	}
}

// waitGoroutines waits (bounded) until at most n goroutines run.
func waitGoroutines(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > n {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines left (had %d):\n%s", runtime.NumGoroutine(), n, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

const childEnv = "GLMTOPO_TRANSPORT_TEST_CHILD"

// TestPeerKilledMidMessage: a peer process starts a 64 MiB message, sends a
// part, and is killed (SIGKILL). The receiver's Recv fails within its
// deadline with an error naming the peer and the step, and no goroutine of
// the link is left behind.
func TestPeerKilledMidMessage(t *testing.T) {
	if os.Getenv(childEnv) != "" {
		return // the child runs TestMain's helper
	}
	base := runtime.NumGoroutine()
	key := testKey(t)
	a, err := Listen("127.0.0.1:0", cfg("stage1", key))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s,%x", childEnv, a.Addr(), key))
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	ctx := ctxT(t, 20*time.Second)
	l, err := a.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	line := make(chan string, 1)
	go func() {
		b := make([]byte, 5)
		io.ReadFull(out, b)
		line <- string(b)
	}()
	select {
	case s := <-line:
		if s != "sent\n" {
			t.Fatalf("child said %q", s)
		}
	case <-ctx.Done():
		t.Fatal("the child never sent its partial message")
	}
	recvErr := make(chan error, 1)
	go func() {
		var m transport.Message
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		recvErr <- l.Recv(rctx, &m)
	}()
	cmd.Process.Kill()
	start := time.Now()
	err = <-recvErr
	var le *transport.Error
	if err == nil || !errors.As(err, &le) || le.Step != 77 || !le.StepSet || !bytes.Contains([]byte(le.Peer), []byte("killed-peer")) {
		t.Fatalf("Recv = %v, want an error naming killed-peer and step 77", err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("the error took %v", el)
	}
	t.Logf("after the kill: %v (%v)", err, time.Since(start).Round(time.Millisecond))
	l.Close()
	a.Close()
	waitGoroutines(t, base)
}

// childMain is the killed peer: it dials, writes the first 64 KiB of a
// 64 MiB frame for step 77, says so and waits to be killed.
func childMain(spec string) {
	var addr string
	var keyHex string
	for i := len(spec) - 1; i >= 0; i-- {
		if spec[i] == ',' {
			addr, keyHex = spec[:i], spec[i+1:]
			break
		}
	}
	key := make([]byte, len(keyHex)/2)
	fmt.Sscanf(keyHex, "%x", &key)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	l, err := Dial(ctx, addr, cfg("killed-peer", key))
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(1)
	}
	full := 64 << 20
	m := msg(77, make([]byte, full))
	hdr, _ := l.tx.codec.EncodeHeader(&m.Header)
	var p [transport.PrefixBytes]byte
	transport.PutPrefix(&p, len(hdr), int64(full))
	l.tx.conn.Write(p[:])
	l.tx.conn.Write(hdr)
	l.tx.conn.Write(make([]byte, 64<<10))
	os.Stdout.WriteString("sent\n")
	time.Sleep(time.Minute)
	os.Exit(0)
}

func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		childMain(spec)
	}
	os.Exit(m.Run())
}

// TestSendToDeadPeer: a receiver that closes mid-stream makes the sender's
// Send fail within its deadline (never a hang), naming peer and step.
func TestSendToDeadPeer(t *testing.T) {
	key := testKey(t)
	d, a := pair(t, cfg("s0", key), cfg("s1", key))
	a.Close()
	ctx := ctxT(t, 10*time.Second)
	var err error
	for i := range 20 { // the first writes may still fit the socket buffers
		if err = d.Send(ctx, msg(uint64(100+i), make([]byte, 8<<20))); err != nil {
			break
		}
	}
	var le *transport.Error
	if !errors.As(err, &le) || le.Op != "send" || !le.StepSet {
		t.Fatalf("Send to a closed peer = %v", err)
	}
}

// TestReconnectAfterRestart: when the dialing peer restarts (its link
// closes, a new process dials), the old link's Recv fails and the acceptor
// hands out a working new link.
func TestReconnectAfterRestart(t *testing.T) {
	key := testKey(t)
	a, err := Listen("127.0.0.1:0", cfg("stage1", key))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	ctx := ctxT(t, 20*time.Second)
	for round := range 3 {
		d, err := Dial(ctx, a.Addr().String(), cfg("stage0", key))
		if err != nil {
			t.Fatal(err)
		}
		l, err := a.Accept(ctx)
		if err != nil {
			t.Fatal(err)
		}
		go d.Send(ctx, msg(uint64(round), []byte("hello")))
		var m transport.Message
		if err := l.Recv(ctx, &m); err != nil || m.Header.Step != uint64(round) {
			t.Fatalf("round %d: %v", round, err)
		}
		d.Close() // the peer goes away
		if err := l.Recv(ctx, &m); err == nil {
			t.Fatalf("round %d: Recv from a closed peer succeeded", round)
		}
		l.Close()
	}
}

// TestDeviceWithoutStager: a device payload on a link without a stager is an
// error, not a crash.
func TestDeviceWithoutStager(t *testing.T) {
	key := testKey(t)
	d, _ := pair(t, cfg("s0", key), cfg("s1", key))
	m := msg(1, make([]byte, 16))
	m.Payloads[0] = transport.Buffer{Dev: 0x1000, Bytes: 16}
	if err := d.Send(ctxT(t, 5*time.Second), m); err == nil {
		t.Fatal("device payload without a stager was sent")
	}
}

// TestStagedDevicePayload runs the staged path with a host-memory fake
// device (addresses are offsets into one slice) and small slots, so the
// chunking and slot alternation are exercised without a GPU.
func TestStagedDevicePayload(t *testing.T) {
	key := testKey(t)
	src, dst := newFakeDevice(3<<20+123), newFakeDevice(3<<20+123)
	copy(src.mem, pattern(9, len(src.mem)))
	dc, ac := cfg("s0", key), cfg("s1", key)
	dc.Stager, ac.RecvStager = src, dst
	d, a := pair(t, dc, ac)
	ctx := ctxT(t, 10*time.Second)
	m := msg(3, []byte("head"), nil)
	n := int64(len(src.mem))
	m.Header.Tensors[1] = transport.TensorMeta{DType: transport.DTypeBytes, Shape: []int64{n}, Bytes: n}
	m.Payloads[1] = transport.Buffer{Dev: fakeBase, Bytes: n}
	go d.Send(ctx, m)
	got := transport.Message{Payloads: []transport.Buffer{{}, {Dev: fakeBase, Bytes: n}}}
	if err := a.Recv(ctx, &got); err != nil {
		t.Fatal(err)
	}
	if string(got.Payloads[0].Host) != "head" || !bytes.Equal(dst.mem, src.mem) {
		t.Fatal("staged device payload arrived altered")
	}
	if src.copies < 10 || dst.copies < 10 {
		t.Fatalf("expected chunked copies, got %d and %d", src.copies, dst.copies)
	}
}

const fakeBase = 0x10000

type fakeDevice struct {
	mem    []byte
	slots  [][]byte
	copies int
}

func newFakeDevice(n int) *fakeDevice {
	return &fakeDevice{mem: make([]byte, n), slots: [][]byte{make([]byte, 256<<10), make([]byte, 256<<10)}}
}

func (f *fakeDevice) Slots() [][]byte { return f.slots }
func (f *fakeDevice) ToHost(slot int, src uintptr, n int) error {
	f.copies++
	copy(f.slots[slot][:n], f.mem[src-fakeBase:])
	return nil
}
func (f *fakeDevice) ToDevice(slot int, dst uintptr, n int) error {
	f.copies++
	copy(f.mem[dst-fakeBase:], f.slots[slot][:n])
	return nil
}
func (f *fakeDevice) Wait(int) error { return nil }

// FuzzRecvFrame feeds arbitrary bytes to a link's frame reader: an error or
// a message, never a panic, and never a payload larger than the limit.
func FuzzRecvFrame(f *testing.F) {
	c := transport.NewCodec(transport.DefaultLimits())
	m := msg(1, []byte("abc"))
	hdr, _ := c.EncodeHeader(&m.Header)
	var p [transport.PrefixBytes]byte
	transport.PutPrefix(&p, len(hdr), 3)
	f.Add(append(append(p[:], hdr...), "abc"...))
	f.Fuzz(func(t *testing.T, data []byte) {
		lim := transport.DefaultLimits()
		lim.MaxMessageBytes = 1 << 20
		r := receiver{codec: transport.NewCodec(lim)}
		r.br = bufioReader(data)
		if _, err := io.ReadFull(r.br, r.prefix[:]); err != nil {
			return
		}
		var m transport.Message
		if _, _, err := r.frame(&m); err != nil {
			return
		}
		var total int
		for _, b := range m.Payloads {
			total += len(b.Host)
		}
		if total > len(data) {
			t.Fatalf("%d payload bytes from %d input bytes", total, len(data))
		}
	})
}

// TestSteadyStateAllocs: sending and receiving a 4 KiB message allocates
// (almost) nothing once the buffers exist.
func TestSteadyStateAllocs(t *testing.T) {
	key := testKey(t)
	d, a := pair(t, cfg("s0", key), cfg("s1", key))
	ctx := context.Background()
	out := msg(1, make([]byte, 4096))
	var in transport.Message
	roundTrip := func() {
		if err := d.Send(ctx, out); err != nil {
			t.Fatal(err)
		}
		if err := a.Recv(ctx, &in); err != nil {
			t.Fatal(err)
		}
	}
	roundTrip()
	allocs := testing.AllocsPerRun(200, roundTrip)
	t.Logf("%.1f allocations per send+recv", allocs)
	if allocs > 0 {
		t.Fatalf("%.1f allocations per 4 KiB send+recv, want 0", allocs)
	}
}
