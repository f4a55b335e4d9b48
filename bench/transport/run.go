package transportbench

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/glmtopo/glmtopo/transport"
	"github.com/glmtopo/glmtopo/transport/tcp"
)

// Serve is the --listen end: it follows one client's measurements.
func Serve(ctx context.Context, o Options) error {
	g, err := openGPU(o)
	if err != nil {
		return err
	}
	defer g.Close()
	acc, raw, err := listenBoth(o.Listen, o, g)
	if err != nil {
		return err
	}
	defer acc.Close()
	defer raw.Close()
	o.Logger.Info("bench transport: waiting for a peer", "link", acc.Addr().String(), "raw", raw.Addr().String())
	return serve(ctx, o, g, acc, raw)
}

// listenBoth opens the link acceptor on addr and the raw reference on the
// next port (for port 0, any two ports: the raw one is reported to a
// loopback client directly).
func listenBoth(addr string, o Options, g *gpuEnd) (*tcp.Acceptor, net.Listener, error) {
	// The stagers serve the tcp-pinned link; the plain one never stages.
	acc, err := tcp.Listen(addr, g.withStagers(linkConfig(o, "bench-server")))
	if err != nil {
		return nil, nil, err
	}
	host, _, _ := net.SplitHostPort(acc.Addr().String())
	port := acc.Addr().(*net.TCPAddr).Port
	raw, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port+1)))
	if err != nil {
		acc.Close()
		return nil, nil, fmt.Errorf("raw reference listener on port %d: %w", port+1, err)
	}
	return acc, raw, nil
}

func serve(ctx context.Context, o Options, g *gpuEnd, acc *tcp.Acceptor, raw net.Listener) error {
	rc, err := acceptCtx(ctx, raw)
	if err != nil {
		return err
	}
	defer rc.Close()
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	wg.Add(1)
	go func() {
		defer wg.Done()
		errc <- serveRaw(rc)
	}()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			l, err := acc.Accept(ctx)
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer l.Close()
				errc <- serveOne(ctx, o, g, l)
			}()
		}
	}()
	// The session ends when the raw connection and every link are done.
	first := <-errc
	wg.Wait()
	close(errc)
	for err := range errc {
		first = errors.Join(first, err)
	}
	return first
}

// serveOne serves a link whose first control message names its kind.
func serveOne(ctx context.Context, o Options, g *gpuEnd, l *tcp.Link) error {
	var m transport.Message
	if err := l.Recv(ctx, &m); err != nil {
		return err
	}
	kind := ""
	if len(m.Payloads) == 1 {
		kind = string(m.Payloads[0].Host)
	}
	if kind == "tcp" {
		return serveLink(ctx, l, func(int64) transport.Buffer { return transport.Buffer{} })
	}
	return serveGPU(ctx, o, g, l, kind)
}

func acceptCtx(ctx context.Context, ln net.Listener) (net.Conn, error) {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	c, err := ln.Accept()
	if err != nil {
		return nil, fmt.Errorf("raw reference: no peer connected: %w", errors.Join(ctx.Err(), err))
	}
	return c, nil
}

// dialRetry dials until the server is up or ctx ends.
func dialRetry(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	for wait := 20 * time.Millisecond; ; wait = min(2*wait, time.Second) {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("no server at %s: %w", addr, err)
		case <-time.After(wait):
		}
	}
}

func hello(kind string) *transport.Message {
	m := payloadMsg(int64(len(kind)), transport.KindControl, transport.HostBuffer([]byte(kind)))
	return m
}

// Client is the --peer end: it drives every measurement and reports.
func Client(ctx context.Context, o Options) (*Report, error) {
	ra, err := rawAddr(o.Peer)
	if err != nil {
		return nil, err
	}
	g, err := openGPU(o)
	if err != nil {
		return nil, err
	}
	defer g.Close()
	return client(ctx, o, g, true, o.Peer, ra)
}

func client(ctx context.Context, o Options, g *gpuEnd, withNCCL bool, linkAddr, rawAddr string) (*Report, error) {
	rc, err := dialRetry(ctx, rawAddr)
	if err != nil {
		return nil, fmt.Errorf("raw reference: %w", err)
	}
	defer rc.Close()
	l, err := tcp.Dial(ctx, linkAddr, linkConfig(o, "bench-client"))
	if err != nil {
		return nil, err
	}
	defer l.Close()
	if err := l.Send(ctx, hello("tcp")); err != nil {
		return nil, err
	}
	if err := dialGPU(ctx, o, g, linkAddr, withNCCL); err != nil {
		return nil, err
	}
	var gpuLinks []gpuLink
	if g != nil {
		gpuLinks = g.links
	}
	var rep Report
	maxSize := int64(0)
	for _, s := range o.Sizes {
		maxSize = max(maxSize, s)
	}
	host := make([]byte, maxSize)
	rand.Read(host)
	rawBuf := make([]byte, maxSize)
	hostIn := transport.Message{Payloads: []transport.Buffer{{Host: make([]byte, 0, maxSize)}}}
	for _, size := range o.Sizes {
		p := planFor(size, o.StreamBytes, o.MaxMessages)
		results := []Result{{SizeBytes: size, Link: "tcp"}}
		for _, g := range gpuLinks {
			results = append(results, Result{SizeBytes: size, Link: g.name})
		}
		// Rounds interleave raw and link runs; each keeps its best (the
		// machine may be shared: noise only ever slows a run down).
		for range max(1, o.Rounds) {
			var raw Result
			if err := measureRaw(rc, p, rawBuf[:size], &raw); err != nil {
				return nil, err
			}
			var r Result
			if err := measure(ctx, l, p, transport.HostBuffer(host[:size]), &hostIn, &r); err != nil {
				return nil, err
			}
			keepBest(&results[0], r, raw)
			for i, g := range gpuLinks {
				gin := transport.Message{Payloads: []transport.Buffer{g.recv(size)}}
				if err := measure(ctx, g.link, p, g.send(size), &gin, &r); err != nil {
					return nil, fmt.Errorf("%s: %w", g.name, err)
				}
				keepBest(&results[i+1], r, raw)
			}
		}
		rep.Results = append(rep.Results, results...)
	}
	rawCommand(rc, opDone, plan{})
	if err := l.Send(ctx, control(opDone, plan{})); err != nil {
		return nil, err
	}
	for _, g := range gpuLinks {
		if err := g.link.Send(ctx, control(opDone, plan{})); err != nil {
			return nil, err
		}
	}
	return &rep, nil
}

func measureRaw(rc net.Conn, p plan, buf []byte, r *Result) error {
	lat, err := rawPingPong(rc, p, buf)
	if err != nil {
		return fmt.Errorf("raw ping-pong of %d bytes: %w", p.size, err)
	}
	secs, err := rawStream(rc, p, buf)
	if err != nil {
		return fmt.Errorf("raw stream of %d bytes: %w", p.size, err)
	}
	r.P50us, r.P99us = quantile(lat, 0.5), quantile(lat, 0.99)
	r.GBps = float64(p.size) * float64(p.stream) / secs / 1e9
	return nil
}

// keepBest folds one round into best: highest bandwidths, lowest latencies.
func keepBest(best *Result, link, raw Result) {
	better := func(dst *float64, v float64, higher bool) {
		if *dst == 0 || (higher && v > *dst) || (!higher && v < *dst) {
			*dst = v
		}
	}
	better(&best.GBps, link.GBps, true)
	better(&best.RawGBps, raw.GBps, true)
	better(&best.P50us, link.P50us, false)
	better(&best.P99us, link.P99us, false)
	better(&best.RawP50us, raw.P50us, false)
}

// measure runs the ping-pong and the stream of one size on link l.
func measure(ctx context.Context, l transport.Link, p plan, send transport.Buffer, recv *transport.Message, r *Result) error {
	if err := l.Send(ctx, control(opPingPong, p)); err != nil {
		return err
	}
	lat, err := linkPingPong(ctx, l, p, send, recv)
	if err != nil {
		return fmt.Errorf("ping-pong of %d bytes: %w", p.size, err)
	}
	if err := l.Send(ctx, control(opStream, p)); err != nil {
		return err
	}
	secs, err := linkStream(ctx, l, p, send)
	if err != nil {
		return fmt.Errorf("stream of %d bytes: %w", p.size, err)
	}
	r.P50us, r.P99us = quantile(lat, 0.5), quantile(lat, 0.99)
	r.GBps = float64(p.size) * float64(p.stream) / secs / 1e9
	return nil
}

// Loopback runs both ends in this process on 127.0.0.1.
func Loopback(ctx context.Context, o Options) (*Report, error) {
	if o.Key == nil {
		o.Key = make([]byte, 32)
		rand.Read(o.Key)
	}
	// One GPU end serves both sides: the client's pinned link sends from
	// its send buffer and receives into its receive buffer, the server's
	// likewise, and the two never run at once (ping-pong alternates).
	srvGPU, err := openGPU(o)
	if err != nil {
		return nil, err
	}
	defer srvGPU.Close()
	var cliGPU *gpuEnd
	if srvGPU != nil {
		if cliGPU, err = openGPU(o); err != nil {
			return nil, err
		}
	}
	defer cliGPU.Close()
	acc, raw, err := listenBoth("127.0.0.1:0", o, srvGPU)
	if err != nil {
		return nil, err
	}
	defer acc.Close()
	defer raw.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	srvErr := make(chan error, 1)
	go func() { srvErr <- serve(ctx, o, srvGPU, acc, raw) }()
	rep, err := client(ctx, o, cliGPU, false, acc.Addr().String(), raw.Addr().String())
	if err != nil {
		cancel()
		return nil, errors.Join(err, <-srvErr)
	}
	if err := <-srvErr; err != nil {
		return nil, fmt.Errorf("server side: %w", err)
	}
	return rep, nil
}
