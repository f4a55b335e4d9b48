package tcp

import (
	"context"
	"io"
	"net"
	"testing"

	"github.com/glmtopo/glmtopo/transport"
)

func BenchmarkSendRecv4K(b *testing.B) {
	key := testKey(b)
	d, a := pair(b, cfg("s0", key), cfg("s1", key))
	ctx := context.Background()
	out := msg(1, make([]byte, 4096))
	var in transport.Message
	b.ReportAllocs()
	for b.Loop() {
		d.Send(ctx, out)
		a.Recv(ctx, &in)
	}
}

// BenchmarkPingPong4K: one-way latency of a 4 KiB echo over the link.
func BenchmarkPingPong4K(b *testing.B) { benchPingPong(b, 4096) }

// BenchmarkRawPingPong4K is the reference: the same echo on a plain
// connection (no framing, no header).
func BenchmarkRawPingPong4K(b *testing.B) { benchRawPingPong(b, 4096, false) }

// BenchmarkDial is the cost of forming an authenticated link (two
// connections, two handshakes).
func BenchmarkDial(b *testing.B) {
	key := testKey(b)
	a, err := Listen("127.0.0.1:0", cfg("s1", key))
	if err != nil {
		b.Fatal(err)
	}
	defer a.Close()
	ctx := context.Background()
	for b.Loop() {
		d, err := Dial(ctx, a.Addr().String(), cfg("s0", key))
		if err != nil {
			b.Fatal(err)
		}
		l, err := a.Accept(ctx)
		if err != nil {
			b.Fatal(err)
		}
		d.Close()
		l.Close()
	}
}

// BenchmarkStream16M: streaming bandwidth of 16 MiB messages over the link
// (SetBytes: MB/s is payload).
func BenchmarkStream16M(b *testing.B) {
	key := testKey(b)
	d, a := pair(b, cfg("s0", key), cfg("s1", key))
	ctx := context.Background()
	const size = 16 << 20
	done := make(chan struct{})
	go func() {
		defer close(done)
		var in transport.Message
		for a.Recv(ctx, &in) == nil {
		}
	}()
	out := msg(1, make([]byte, size))
	b.SetBytes(size)
	for b.Loop() {
		d.Send(ctx, out)
	}
	d.Close()
	<-done
}

// BenchmarkRawStream16M is the reference on a plain connection.
func BenchmarkRawStream16M(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	const size = 16 << 20
	done := make(chan struct{})
	go func() {
		defer close(done)
		s, err := ln.Accept()
		if err != nil {
			return
		}
		buf := make([]byte, size)
		for {
			if _, err := io.ReadFull(s, buf); err != nil {
				return
			}
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, size)
	b.SetBytes(size)
	for b.Loop() {
		c.Write(buf)
	}
	c.Close()
	<-done
}

// BenchmarkRawPingPong4KTwoConns: the raw echo over one connection per
// direction, as the link is built.
func BenchmarkRawPingPong4KTwoConns(b *testing.B) { benchRawPingPong(b, 4096, true) }
