package tcp

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/glmtopo/glmtopo/transport"
	"github.com/glmtopo/glmtopo/transport/telemetry"
)

// inNetns runs fn on a fresh OS thread moved into network namespace ns:
// sockets fn creates belong to ns. The thread is never handed back to the
// scheduler (the goroutine exits locked, so the runtime retires it).
func inNetns(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // no Unlock: this thread ends with the goroutine
		f, err := os.Open("/var/run/netns/" + ns)
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// netnsRTT is the median of n one-byte TCP round trips from glmtopo-ns1 to
// an echo server in glmtopo-ns0 (a lost segment's retransmission only moves
// the tail, not the median).
func netnsRTT(t *testing.T, n int) time.Duration {
	t.Helper()
	var ln net.Listener
	if err := inNetns("glmtopo-ns0", func() (err error) {
		ln, err = net.Listen("tcp", "10.77.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()
	var c net.Conn
	if err := inNetns("glmtopo-ns1", func() (err error) {
		c, err = net.DialTimeout("tcp", ln.Addr().String(), 10*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	rtts := make([]time.Duration, n)
	b := []byte{0}
	for i := range rtts {
		start := time.Now()
		if _, err := c.Write(b); err != nil {
			t.Fatalf("ping-pong %d: %v", i, err)
		}
		if _, err := io.ReadFull(c, b); err != nil {
			t.Fatalf("ping-pong %d: %v", i, err)
		}
		rtts[i] = time.Since(start)
	}
	slices.Sort(rtts)
	return rtts[n/2]
}

// TestNetnsLoss: two emulated hosts (scripts/netns.sh: namespaces on a
// bridge, 1 ms delay and 1% of packets dropped each way; the delay's RTT is
// checked first). 64 MiB of 1 MiB messages arrive
// intact; the eBPF socket filter's count of TCP payload bytes arriving at
// the receiver agrees with the bytes sent within 1%; retransmissions
// happened and the eBPF probe saw them. Skips without root / ip netns.
func TestNetnsLoss(t *testing.T) {
	if testing.Short() {
		t.Skip("netns test skipped in -short")
	}
	script := "../../scripts/netns.sh"
	if out, err := exec.Command(script, "check").CombinedOutput(); err != nil {
		t.Skipf("no network namespaces here: %s", bytes.TrimSpace(out))
	}
	if out, err := exec.Command(script, "up", "2", "--loss", "1%", "--delay", "1ms").CombinedOutput(); err != nil {
		t.Fatalf("netns up: %v\n%s", err, out)
	} else {
		t.Logf("%s", bytes.TrimSpace(out))
	}
	t.Cleanup(func() { exec.Command(script, "down").Run() })
	// The delay is really there (netem, or the NFQUEUE delay line where the
	// kernel has no netem): each way crosses one delayed veth.
	if rtt := netnsRTT(t, 21); rtt < 2*time.Millisecond {
		t.Fatalf("median TCP ping-pong RTT between the namespaces %v, want ≥ 2 ms under 1 ms delay each way", rtt)
	} else {
		t.Logf("median TCP ping-pong RTT between the namespaces: %v", rtt)
	}
	if err := telemetry.BPFAvailable(); err != nil {
		t.Logf("no eBPF here (%v): checking delivery only", err)
	}
	key := testKey(t)
	var ln net.Listener
	if err := inNetns("glmtopo-ns0", func() (err error) {
		ln, err = net.Listen("tcp", "10.77.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	acfg := cfg("host0", key)
	acfg.WireCounters = true
	acc, err := NewAcceptor(ln, acfg)
	if err != nil {
		t.Fatal(err)
	}
	defer acc.Close()
	dcfg := cfg("host1", key)
	dcfg.WireCounters = true
	dcfg.Dial = func(ctx context.Context, network, addr string) (c net.Conn, err error) {
		err = inNetns("glmtopo-ns1", func() error {
			var d net.Dialer
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
	ctx := ctxT(t, 120*time.Second)
	d, a := connect(t, ctx, acc, dcfg)
	const n, size = 64, 1 << 20
	errc := make(chan error, 1)
	go func() {
		for i := range n {
			if err := d.Send(ctx, msg(uint64(i), pattern(uint64(i), size))); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	var m transport.Message
	for i := range n {
		if err := a.Recv(ctx, &m); err != nil {
			t.Fatal(err)
		}
		if m.Header.Step != uint64(i) || !bytes.Equal(m.Payloads[0].Host, pattern(uint64(i), size)) {
			t.Fatalf("message %d arrived altered under loss", i)
		}
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	sent := d.Stats().Snapshot().BytesSent
	tx, rx := d.Wire(), a.Wire()
	t.Logf("sender: %d payload bytes; TCP_INFO bytes_sent %d, %d segments retransmitted; eBPF probe: %d retransmitted skbs", sent, tx.BytesSent, tx.TCPInfoRetrans, tx.Retransmits)
	t.Logf("receiver: source %s, eBPF rx payload bytes %d in %d segments", rx.Source, rx.FilterBytesRx, rx.SegmentsRecv)
	if rx.Source != "ebpf+tcp_info" {
		return
	}
	if dev := math.Abs(float64(rx.FilterBytesRx)-float64(sent)) / float64(sent); dev > 0.01 {
		t.Fatalf("eBPF counted %d bytes arriving, %d were sent: off by %.2f%%", rx.FilterBytesRx, sent, 100*dev)
	}
	if tx.Retransmits == 0 {
		t.Fatalf("1%% loss but the eBPF probe counted no retransmission")
	}
}
