// Package netnstest helps tests that run emulated hosts in network
// namespaces (scripts/netns.sh, the emulated-host cluster test): run code
// inside a namespace, and measure the TCP round trip between two of them
// (the emulated delay's check). Linux only; the callers need root.
package netnstest

import (
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// Do runs fn on a fresh OS thread moved into network namespace ns
// (/run/netns/ns, as ip netns names it), so that the sockets fn opens live
// there. The thread is never handed back to the scheduler: the goroutine
// ends locked and the runtime retires it.
func Do(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // no Unlock: the thread ends with the goroutine
		f, err := os.Open("/run/netns/" + ns)
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

// TCPRoundTrip is the median of n one-byte TCP round trips from namespace
// client to an echo server listening on host (an address of namespace
// server). A lost segment's retransmission moves the tail, not the median.
// Every wait is bounded (10 s to connect, 30 s in all).
func TCPRoundTrip(server, host, client string, n int) (time.Duration, error) {
	var ln net.Listener
	if err := Do(server, func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(host, "0"))
		return err
	}); err != nil {
		return 0, err
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
	if err := Do(client, func() (err error) {
		c, err = net.DialTimeout("tcp", ln.Addr().String(), 10*time.Second)
		return err
	}); err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	rtts := make([]time.Duration, max(n, 1))
	b := []byte{0}
	for i := range rtts {
		start := time.Now()
		if _, err := c.Write(b); err != nil {
			return 0, fmt.Errorf("ping-pong %d: %w", i, err)
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return 0, fmt.Errorf("ping-pong %d: %w", i, err)
		}
		rtts[i] = time.Since(start)
	}
	slices.Sort(rtts)
	return rtts[len(rtts)/2], nil
}
