package tcp

import (
	"bytes"
	"context"
	"math"
	"net"
	"os/exec"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/transport"
	"github.com/glmtopo/glmtopo/transport/netnstest"
	"github.com/glmtopo/glmtopo/transport/telemetry"
)

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
	rtt, err := netnstest.TCPRoundTrip("glmtopo-ns0", "10.77.0.1", "glmtopo-ns1", 21)
	if err != nil {
		t.Fatal(err)
	}
	if rtt < 2*time.Millisecond {
		t.Fatalf("median TCP ping-pong RTT between the namespaces %v, want ≥ 2 ms under 1 ms delay each way", rtt)
	}
	t.Logf("median TCP ping-pong RTT between the namespaces: %v", rtt)
	if err := telemetry.BPFAvailable(); err != nil {
		t.Logf("no eBPF here (%v): checking delivery only", err)
	}
	key := testKey(t)
	var ln net.Listener
	if err := netnstest.Do("glmtopo-ns0", func() (err error) {
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
		err = netnstest.Do("glmtopo-ns1", func() error {
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
