package nccl

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/transport"
	"github.com/glmtopo/glmtopo/transport/tcp"
)

// openGPU opens device 0 and NCCL, or skips.
func openGPU(t testing.TB) *cuda.Device {
	t.Helper()
	dev, err := cuda.OpenDevice(0)
	if errors.Is(err, cuda.ErrNoCUDA) {
		t.Skipf("no CUDA: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	if _, err := Version(); errors.Is(err, ErrNoNCCL) {
		t.Skipf("no NCCL: %v", err)
	} else if err != nil {
		t.Fatal(err)
	}
	return dev
}

func devBuf(t testing.TB, dev *cuda.Device, n int64) uintptr {
	p, err := dev.Alloc(n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Free(p) })
	return p
}

func randBytes(n int64) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// TestSelfSendRecv: a one-rank communicator sends to itself in one group;
// the bytes arrive intact at every size.
func TestSelfSendRecv(t *testing.T) {
	dev := openGPU(t)
	v, _ := Version()
	t.Logf("NCCL %d", v)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	comm := oneRankComm(t, ctx, dev, InitOptions{})
	stream, err := dev.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	defer dev.DestroyStream(stream)
	for _, n := range []int64{10_000, 1 << 20, 64 << 20} {
		src, dst := devBuf(t, dev, n), devBuf(t, dev, n)
		want := randBytes(n)
		if err := dev.CopyToDevice(src, want); err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		if err := comm.Enqueue(ctx, stream, Op{Send: true, Buf: src, Bytes: n, Peer: 0}, Op{Buf: dst, Bytes: n, Peer: 0}); err != nil {
			t.Fatal(err)
		}
		if err := comm.Wait(ctx, stream); err != nil {
			t.Fatal(err)
		}
		el := time.Since(t0)
		got := make([]byte, n)
		if err := dev.CopyToHost(got, dst); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%d bytes: self send/recv altered the data", n)
		}
		t.Logf("self send/recv %d bytes: %v (%.2f GB/s)", n, el, float64(n)/el.Seconds()/1e9)
	}
	warmSelfSendRecv(t, ctx, dev, comm, stream, "non-blocking")
}

// oneRankComm makes a one-rank communicator on dev, closed with the test.
func oneRankComm(t *testing.T, ctx context.Context, dev *cuda.Device, opt InitOptions) *Comm {
	t.Helper()
	id, err := NewUniqueID()
	if err != nil {
		t.Fatal(err)
	}
	comm, err := InitRankWith(ctx, dev, id, 1, 0, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { comm.Close() })
	return comm
}

// TestSelfSendRecvBlocking: the same on a blocking communicator (what a
// host's rank group uses): the group is enqueued on the calling thread, so
// its launch costs microseconds, not an NCCL thread.
func TestSelfSendRecvBlocking(t *testing.T) {
	dev := openGPU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	comm := oneRankComm(t, ctx, dev, InitOptions{Blocking: true})
	stream, err := dev.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	defer dev.DestroyStream(stream)
	warmSelfSendRecv(t, ctx, dev, comm, stream, "blocking")
}

// warmSelfSendRecv times 50 warm 10 KB self send/recv groups: what a small
// group costs to launch (a non-blocking communicator launches each group on
// a new NCCL thread) and to finish, and checks the bytes of the last.
func warmSelfSendRecv(t *testing.T, ctx context.Context, dev *cuda.Device, comm *Comm, stream uintptr, what string) {
	t.Helper()
	src, dst := devBuf(t, dev, 10_000), devBuf(t, dev, 10_000)
	want := randBytes(10_000)
	if err := dev.CopyToDevice(src, want); err != nil {
		t.Fatal(err)
	}
	var enq, total []time.Duration
	for range 50 {
		t0 := time.Now()
		if err := comm.Enqueue(ctx, stream, Op{Send: true, Buf: src, Bytes: 10_000, Peer: 0}, Op{Buf: dst, Bytes: 10_000, Peer: 0}); err != nil {
			t.Fatal(err)
		}
		t1 := time.Now()
		if err := comm.Wait(ctx, stream); err != nil {
			t.Fatal(err)
		}
		enq, total = append(enq, t1.Sub(t0)), append(total, time.Since(t0))
	}
	slices.Sort(enq)
	slices.Sort(total)
	got := make([]byte, 10_000)
	if err := dev.CopyToHost(got, dst); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: self send/recv altered the data", what)
	}
	t.Logf("%s: warm self send/recv 10000 bytes: median %v to enqueue (group launched), %v in all; best %v, %v",
		what, enq[len(enq)/2], total[len(total)/2], enq[0], total[0])
}

// TestInitTimesOut: a two-rank communicator whose second rank never comes
// is aborted at the deadline instead of blocking.
func TestInitTimesOut(t *testing.T) {
	dev := openGPU(t)
	id, err := NewUniqueID()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	t0 := time.Now()
	_, err = InitRank(ctx, dev, id, 2, 0)
	if err == nil {
		t.Fatal("a communicator formed without its second rank")
	}
	if el := time.Since(t0); el > 10*time.Second {
		t.Fatalf("init gave up after %v", el)
	}
	t.Logf("missing rank: %v after %v", err, time.Since(t0).Round(time.Millisecond))
}

const childEnv = "GLMTOPO_NCCL_TEST_CHILD"

// TestTwoRankLink: this process (rank 0) and a child (rank 1, its own
// NCCL_HOSTID so NCCL accepts two ranks on one GPU) form a communicator
// whose unique id crosses an authenticated TCP link, exchange 10 KB … 64
// MiB through nccl.Link, then the child sends a header announcing more
// bytes than our buffer holds: both sides fail within the deadline (a peer
// killed mid-message is TestPeerKilledMidMessage).
// scripts/gpu-transport.sh runs it with NCCL_HOSTID set (and MPS started).
func TestTwoRankLink(t *testing.T) {
	r := startRankPair(t, "exchange", false)
	ctx, dev, l, buf := r.ctx, r.dev, r.link, r.buf
	for _, n := range exchangeSizes {
		m := transport.Message{Payloads: []transport.Buffer{{Dev: buf, Bytes: 64 << 20}}}
		t0 := time.Now()
		if err := l.Recv(ctx, &m); err != nil {
			t.Fatalf("%d bytes: %v", n, err)
		}
		el := time.Since(t0)
		got := make([]byte, n)
		dev.CopyToHost(got, buf)
		if !bytes.Equal(got, childPattern(n)) || m.Header.Step != uint64(n) {
			t.Fatalf("%d bytes arrived altered (step %d)", n, m.Header.Step)
		}
		t.Logf("rank 1 → 0: %d bytes in %v", n, el)
		// Echo it back.
		if err := l.Send(ctx, &transport.Message{Header: m.Header, Payloads: []transport.Buffer{{Dev: buf, Bytes: n}}}); err != nil {
			t.Fatal(err)
		}
	}
	// The child now announces 1 MiB + 1 byte; we only have 1 MiB.
	small := transport.Message{Payloads: []transport.Buffer{{Dev: buf, Bytes: 1 << 20}}}
	short, c2 := context.WithTimeout(ctx, 20*time.Second)
	defer c2()
	if err := l.Recv(short, &small); err == nil || !strings.Contains(err.Error(), "device buffer holds") {
		t.Fatalf("oversized message: %v", err)
	} else {
		t.Logf("oversized message refused: %v", err)
	}
}

// TestPeerKilledMidMessage: rank 1 announces a 64 MiB message and is
// killed before sending it; our Recv, posted and waiting in NCCL, returns an
// error within its deadline (the communicator aborted), not a hang.
func TestPeerKilledMidMessage(t *testing.T) {
	r := startRankPair(t, "die", true)
	ctx, l, buf, cmd, out := r.ctx, r.link, r.buf, r.child, r.stdout
	line := make(chan string, 1)
	go func() {
		b := make([]byte, 10)
		io.ReadFull(out, b)
		line <- string(b)
	}()
	recvErr := make(chan error, 1)
	go func() {
		rctx, c := context.WithTimeout(context.Background(), 15*time.Second)
		defer c()
		m := transport.Message{Payloads: []transport.Buffer{{Dev: buf, Bytes: 64 << 20}}}
		recvErr <- l.Recv(rctx, &m)
	}()
	select {
	case <-line:
	case <-ctx.Done():
		t.Fatal("the child never announced its message")
	}
	cmd.Process.Kill()
	t0 := time.Now()
	select {
	case err := <-recvErr:
		if err == nil {
			t.Fatal("Recv from a killed peer succeeded")
		}
		t.Logf("after the kill: %v (%v)", err, time.Since(t0).Round(time.Millisecond))
	case <-time.After(30 * time.Second):
		t.Fatal("Recv still blocked 30 s after the peer was killed")
	}
}

// rankPair is this process as rank 0 of a two-rank communicator whose rank
// 1 is a child process running twoRankChild; everything it holds is released
// when the test ends.
type rankPair struct {
	ctx    context.Context // 120 s from the start
	dev    *cuda.Device
	link   *Link
	buf    uintptr   // 64 MiB on dev
	child  *exec.Cmd // killed at the end if still running
	stdout io.Reader // the child's stdout, when asked for; else it goes to our stderr
}

// startRankPair starts the child in mode ("exchange" or "die"; its own
// NCCL_HOSTID so NCCL accepts two ranks on one GPU), hands it the unique id
// over an authenticated TCP link and forms the communicator and link. It
// skips without NCCL_HOSTID, a GPU or NCCL. (TestMain runs the child's side
// and exits before any test when childEnv is set.)
func startRankPair(t *testing.T, mode string, pipeStdout bool) *rankPair {
	t.Helper()
	if os.Getenv("NCCL_HOSTID") == "" {
		t.Skip("set NCCL_HOSTID (scripts/gpu-transport.sh does) so that two ranks may share one GPU")
	}
	r := &rankPair{dev: openGPU(t)}
	r.buf = devBuf(t, r.dev, 64<<20)
	key := randBytes(32)
	acc, err := tcp.Listen("127.0.0.1:0", tcp.Config{Name: "rank0", Key: key})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { acc.Close() })
	r.child = exec.Command(os.Args[0], "-test.run=^$")
	r.child.Env = append(os.Environ(), fmt.Sprintf("%s=%s,%s,%x", childEnv, mode, acc.Addr(), key), "NCCL_HOSTID="+os.Getenv("NCCL_HOSTID")+"-child")
	r.child.Stdout, r.child.Stderr = os.Stderr, os.Stderr
	if pipeStdout {
		r.child.Stdout = nil
		if r.stdout, err = r.child.StdoutPipe(); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.child.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.child.Wait() })
	t.Cleanup(func() { r.child.Process.Kill() })
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	t.Cleanup(cancel)
	r.ctx = ctx
	ctl, err := acc.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ctl.Close() })
	id, err := ExchangeID(ctx, ctl, true)
	if err != nil {
		t.Fatal(err)
	}
	comm, err := InitRank(ctx, r.dev, id, 2, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { comm.Close() })
	if r.link, err = NewLink(ctl, comm, r.dev, 1, transport.DefaultLimits()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.link.Close() })
	return r
}

var exchangeSizes = []int64{10_000, 164_000, 655_000, 2_600_000, 16 << 20, 64 << 20}

func childPattern(n int64) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + int(n))
	}
	return b
}

// twoRankChild is rank 1 of TestTwoRankLink ("exchange") and of
// TestPeerKilledMidMessage ("die").
func twoRankChild(spec string) error {
	mode, spec, _ := strings.Cut(spec, ",")
	i := strings.LastIndexByte(spec, ',')
	addr := spec[:i]
	key := make([]byte, 32)
	fmt.Sscanf(spec[i+1:], "%x", &key)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Second)
	defer cancel()
	dev, err := cuda.OpenDevice(0)
	if err != nil {
		return err
	}
	ctl, err := tcp.Dial(ctx, addr, tcp.Config{Name: "rank1", Key: key})
	if err != nil {
		return err
	}
	defer ctl.Close()
	id, err := ExchangeID(ctx, ctl, false)
	if err != nil {
		return err
	}
	comm, err := InitRank(ctx, dev, id, 2, 1)
	if err != nil {
		return err
	}
	defer comm.Close()
	l, err := NewLink(ctl, comm, dev, 0, transport.DefaultLimits())
	if err != nil {
		return err
	}
	buf, err := dev.Alloc(64<<20 + 1)
	if err != nil {
		return err
	}
	if mode == "die" {
		// Announce 64 MiB on the control link, never post the send, and
		// wait to be killed.
		n := int64(64 << 20)
		enc, _ := transport.NewCodec(transport.DefaultLimits()).EncodeHeader(&transport.Header{Step: 5, Kind: transport.KindActivations,
			Tensors: []transport.TensorMeta{{DType: transport.DTypeBytes, Shape: []int64{n}, Bytes: n}}})
		env := &transport.Message{
			Header:   transport.Header{Step: 5, Kind: transport.KindControl, Tensors: []transport.TensorMeta{{DType: transport.DTypeBytes, Shape: []int64{int64(len(enc))}, Bytes: int64(len(enc))}}},
			Payloads: []transport.Buffer{transport.HostBuffer(enc)},
		}
		if err := ctl.Send(ctx, env); err != nil {
			return err
		}
		os.Stdout.WriteString("announced\n")
		time.Sleep(time.Minute)
		return nil
	}
	for _, n := range exchangeSizes {
		if err := dev.CopyToDevice(buf, childPattern(n)); err != nil {
			return err
		}
		m := &transport.Message{
			Header:   transport.Header{Step: uint64(n), Kind: transport.KindActivations, Tensors: []transport.TensorMeta{{DType: transport.DTypeBytes, Shape: []int64{n}, Bytes: n}}},
			Payloads: []transport.Buffer{{Dev: buf, Bytes: n}},
		}
		if err := l.Send(ctx, m); err != nil {
			return err
		}
		back := transport.Message{Payloads: []transport.Buffer{{Dev: buf, Bytes: 64 << 20}}}
		if err := l.Recv(ctx, &back); err != nil {
			return err
		}
	}
	n := int64(1<<20 + 1)
	m := &transport.Message{
		Header:   transport.Header{Step: 99, Kind: transport.KindActivations, Tensors: []transport.TensorMeta{{DType: transport.DTypeBytes, Shape: []int64{n}, Bytes: n}}},
		Payloads: []transport.Buffer{{Dev: buf, Bytes: n}},
	}
	short, c2 := context.WithTimeout(ctx, 15*time.Second)
	defer c2()
	err = l.Send(short, m)
	fmt.Fprintf(os.Stderr, "child: oversized send ended with: %v\n", err)
	if err == nil {
		return errors.New("the oversized send succeeded")
	}
	return nil
}

func TestMain(m *testing.M) {
	if id := os.Getenv(collChildEnv); id != "" {
		if err := collChild(id); err != nil {
			fmt.Fprintln(os.Stderr, "rank 1:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if spec := os.Getenv(childEnv); spec != "" {
		if err := twoRankChild(spec); err != nil {
			fmt.Fprintln(os.Stderr, "rank 1:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}
