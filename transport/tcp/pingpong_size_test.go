package tcp

import (
	"context"
	"io"
	"net"
	"testing"

	"github.com/glmtopo/glmtopo/transport"
)

// BenchmarkPingPong1M and its raw references: the 1 MiB echo that was
// 2–6× raw in the session's loopback runs (docs/performance.md).
func BenchmarkPingPong1M(b *testing.B) { benchPingPong(b, 1<<20) }

func BenchmarkRawPingPong1M(b *testing.B)         { benchRawPingPong(b, 1<<20, false) }
func BenchmarkRawPingPong1MTwoConns(b *testing.B) { benchRawPingPong(b, 1<<20, true) }

func benchPingPong(b *testing.B, n int) {
	key := testKey(b)
	d, a := pair(b, cfg("s0", key), cfg("s1", key))
	ctx := context.Background()
	go func() {
		var in transport.Message
		for {
			if a.Recv(ctx, &in) != nil || a.Send(ctx, &in) != nil {
				return
			}
		}
	}()
	out := msg(1, make([]byte, n))
	var in transport.Message
	b.SetBytes(int64(n))
	for b.Loop() {
		d.Send(ctx, out)
		d.Recv(ctx, &in)
	}
}

func benchRawPingPong(b *testing.B, n int, twoConns bool) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		in, err := ln.Accept()
		if err != nil {
			return
		}
		defer in.Close()
		out := in
		if twoConns {
			if out, err = ln.Accept(); err != nil {
				return
			}
			defer out.Close()
		}
		buf := make([]byte, n)
		for {
			if _, err := io.ReadFull(in, buf); err != nil {
				return
			}
			if _, err := out.Write(buf); err != nil {
				return
			}
		}
	}()
	out, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer out.Close()
	in := out
	if twoConns {
		if in, err = net.Dial("tcp", ln.Addr().String()); err != nil {
			b.Fatal(err)
		}
		defer in.Close()
	}
	buf := make([]byte, n)
	b.SetBytes(int64(n))
	for b.Loop() {
		out.Write(buf)
		io.ReadFull(in, buf)
	}
}
