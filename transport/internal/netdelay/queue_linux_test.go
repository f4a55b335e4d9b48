//go:build linux

package netdelay

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/transport/netnstest"
)

// TestRunDelaysLoopback: in a fresh network namespace an iptables-legacy
// rule queues UDP leaving lo; with Run delaying it by 1 ms, a UDP ping-pong
// on 127.0.0.1 (request and reply each leave lo once) takes ≥ 2 ms, and
// Run lets go of everything and returns soon after its context ends.
// Needs root, ip netns and iptables-legacy; skips otherwise.
func TestRunDelaysLoopback(t *testing.T) {
	if testing.Short() {
		t.Skip("needs root and a network namespace; skipped in -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (NFQUEUE, network namespaces)")
	}
	if _, err := exec.LookPath("iptables-legacy"); err != nil {
		t.Skip("needs iptables-legacy (scripts/netns.sh installs it)")
	}
	ns := fmt.Sprintf("netdelay-test-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Skipf("ip netns add: %v: %s", err, strings.TrimSpace(string(out)))
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	sh := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	sh("ip", "link", "set", "lo", "up")
	const delay = time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	ready := make(chan struct{})
	type result struct {
		st  Stats
		err error
	}
	done := make(chan result, 1)
	go func() {
		var r result
		err := netnstest.Do(ns, func() error {
			r.st, r.err = Run(runCtx, Config{Queue: 5, Delay: delay, MaxLen: 64, Ready: func() { close(ready) }})
			return nil
		})
		if err != nil {
			r.err = err
		}
		done <- r
	}()
	select {
	case <-ready:
	case r := <-done:
		t.Fatalf("Run ended before binding: %v", r.err)
	case <-ctx.Done():
		t.Fatal("queue not bound within the deadline")
	}
	sh("iptables-legacy", "-A", "OUTPUT", "-o", "lo", "-p", "udp", "-j", "NFQUEUE", "--queue-num", "5", "--queue-bypass")

	rtts := udpPingPong(t, ns, 50)
	p50 := rtts[len(rtts)/2]
	t.Logf("UDP ping-pong on lo through the delay line: min %v p50 %v max %v", rtts[0], p50, rtts[len(rtts)-1])
	if p50 < 2*delay || p50 > 20*delay {
		t.Errorf("p50 RTT %v, want ≥ %v (two 1 ms hops) and well under %v", p50, 2*delay, 20*delay)
	}

	sh("iptables-legacy", "-D", "OUTPUT", "-o", "lo", "-p", "udp", "-j", "NFQUEUE", "--queue-num", "5", "--queue-bypass")
	stop()
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatalf("Run: %v", r.err)
		}
		if r.st.Packets < 100 || r.st.Accepted != r.st.Packets || r.st.KernelDropped != 0 {
			t.Errorf("stats %+v: want ≥ 100 packets, all accepted, none dropped", r.st)
		}
		t.Logf("stats: %+v", r.st)
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return within 5 s of its context ending")
	}
}

// udpPingPong echoes n datagrams over 127.0.0.1 inside ns and returns the
// sorted round-trip times.
func udpPingPong(t *testing.T, ns string, n int) []time.Duration {
	t.Helper()
	var srv, cli *net.UDPConn
	if err := netnstest.Do(ns, func() (err error) {
		if srv, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			return err
		}
		cli, err = net.DialUDP("udp4", nil, srv.LocalAddr().(*net.UDPAddr))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	defer cli.Close()
	go func() {
		buf := make([]byte, 64)
		for {
			k, from, err := srv.ReadFromUDP(buf)
			if err != nil {
				return
			}
			srv.WriteToUDP(buf[:k], from)
		}
	}()
	var rtts []time.Duration
	buf := make([]byte, 64)
	for i := range n {
		start := time.Now()
		if _, err := cli.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		cli.SetReadDeadline(time.Now().Add(2 * time.Second))
		if k, err := cli.Read(buf); err != nil || k != 1 || buf[0] != byte(i) {
			t.Fatalf("ping %d: %d bytes, err %v", i, k, err)
		}
		rtts = append(rtts, time.Since(start))
	}
	slices.Sort(rtts)
	return rtts
}
