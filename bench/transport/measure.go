package transportbench

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sort"
	"time"

	"github.com/glmtopo/glmtopo/transport"
)

// Ops the client asks the server to follow (a control message's Step on
// the link; the first 8 bytes of a command on the raw connection).
const (
	opPingPong = 1
	opStream   = 2
	opDone     = 3
)

// plan is how many messages of one size each measurement moves.
type plan struct {
	size     int64
	pingIter int // ping-pong round trips (after warmup)
	stream   int // messages streamed
}

func planFor(size, streamBytes int64, maxMsgs int) plan {
	return plan{
		size:     size,
		pingIter: int(max(20, min(1000, (256<<20)/max(size, 1)))),
		stream:   int(max(8, min(int64(maxMsgs), streamBytes/max(size, 1)))),
	}
}

func payloadMsg(size int64, kind transport.Kind, buf transport.Buffer) *transport.Message {
	return &transport.Message{
		Header:   transport.Header{Kind: kind, Tensors: []transport.TensorMeta{{DType: transport.DTypeBytes, Shape: []int64{size}, Bytes: size}}},
		Payloads: []transport.Buffer{buf},
	}
}

// control is a header-only message (so that every link kind, NCCL's
// included, carries it): the op in Step, the plan in one SeqMeta.
func control(op uint64, p plan) *transport.Message {
	return &transport.Message{Header: transport.Header{Step: op, Kind: transport.KindControl,
		Seqs: []transport.SeqMeta{{ID: uint64(p.size), Position: int64(p.pingIter), Tokens: int32(p.stream)}}}}
}

func parseControl(m *transport.Message) (uint64, plan, error) {
	if m.Header.Kind != transport.KindControl || len(m.Header.Seqs) != 1 || len(m.Header.Tensors) != 0 {
		return 0, plan{}, fmt.Errorf("bench: expected a control message, got kind %d with %d tensors", m.Header.Kind, len(m.Header.Tensors))
	}
	s := m.Header.Seqs[0]
	return m.Header.Step, plan{size: int64(s.ID), pingIter: int(s.Position), stream: int(s.Tokens)}, nil
}

// linkPingPong returns the one-way latencies (half round trips) of p.pingIter
// exchanges of p.size bytes; the server echoes each message.
//
// in is reused across calls (its host buffer grows once, then stays): a
// buffer allocated per call would make garbage of every size measured, and
// the collector's work would be charged to the link and not to raw TCP.
func linkPingPong(ctx context.Context, l transport.Link, p plan, buf transport.Buffer, in *transport.Message) ([]time.Duration, error) {
	out := payloadMsg(p.size, transport.KindActivations, buf)
	const warmup = 5
	lat := make([]time.Duration, 0, p.pingIter)
	for i := range warmup + p.pingIter {
		t0 := time.Now()
		out.Header.Step = uint64(i)
		if err := l.Send(ctx, out); err != nil {
			return nil, err
		}
		if err := l.Recv(ctx, in); err != nil {
			return nil, err
		}
		if i >= warmup {
			lat = append(lat, time.Since(t0)/2)
		}
	}
	return lat, nil
}

// linkStream returns the seconds to stream p.stream messages and get the
// server's acknowledgement of the last.
func linkStream(ctx context.Context, l transport.Link, p plan, buf transport.Buffer) (float64, error) {
	out := payloadMsg(p.size, transport.KindActivations, buf)
	var ack transport.Message
	t0 := time.Now()
	for i := range p.stream {
		out.Header.Step = uint64(i)
		if err := l.Send(ctx, out); err != nil {
			return 0, err
		}
	}
	if err := l.Recv(ctx, &ack); err != nil {
		return 0, err
	}
	return time.Since(t0).Seconds(), nil
}

// serveLink follows the client's control messages until opDone.
func serveLink(ctx context.Context, l transport.Link, recvBuf func(size int64) transport.Buffer) error {
	var m transport.Message
	in := transport.Message{Payloads: make([]transport.Buffer, 1)} // reused: see linkPingPong
	for {
		if err := l.Recv(ctx, &m); err != nil {
			return err
		}
		op, p, err := parseControl(&m)
		if err != nil {
			return err
		}
		if op == opDone {
			return nil
		}
		if b := recvBuf(p.size); b.Dev != 0 {
			in.Payloads = append(in.Payloads[:0], b)
		}
		switch op {
		case opPingPong:
			for range 5 + p.pingIter {
				if err := l.Recv(ctx, &in); err != nil {
					return err
				}
				if err := l.Send(ctx, &in); err != nil {
					return err
				}
			}
		case opStream:
			for range p.stream {
				if err := l.Recv(ctx, &in); err != nil {
					return err
				}
			}
			if err := l.Send(ctx, control(opStream, p)); err != nil {
				return err
			}
		default:
			return fmt.Errorf("bench: unknown op %d", op)
		}
	}
}

// Raw TCP reference: the same exchanges as plain reads and writes of the
// payload bytes on one connection (no header, no framing, no auth).

func rawCommand(c net.Conn, op uint64, p plan) error {
	var b [32]byte
	binary.LittleEndian.PutUint64(b[0:], op)
	binary.LittleEndian.PutUint64(b[8:], uint64(p.size))
	binary.LittleEndian.PutUint64(b[16:], uint64(p.pingIter))
	binary.LittleEndian.PutUint64(b[24:], uint64(p.stream))
	_, err := c.Write(b[:])
	return err
}

func rawPingPong(c net.Conn, p plan, buf []byte) ([]time.Duration, error) {
	if err := rawCommand(c, opPingPong, p); err != nil {
		return nil, err
	}
	lat := make([]time.Duration, 0, p.pingIter)
	for i := range 5 + p.pingIter {
		t0 := time.Now()
		if _, err := c.Write(buf); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return nil, err
		}
		if i >= 5 {
			lat = append(lat, time.Since(t0)/2)
		}
	}
	return lat, nil
}

func rawStream(c net.Conn, p plan, buf []byte) (float64, error) {
	if err := rawCommand(c, opStream, p); err != nil {
		return 0, err
	}
	t0 := time.Now()
	for range p.stream {
		if _, err := c.Write(buf); err != nil {
			return 0, err
		}
	}
	var ack [1]byte
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		return 0, err
	}
	return time.Since(t0).Seconds(), nil
}

func serveRaw(c net.Conn) error {
	var cmd [32]byte
	var buf []byte
	for {
		if _, err := io.ReadFull(c, cmd[:]); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		op := binary.LittleEndian.Uint64(cmd[0:])
		size := int64(binary.LittleEndian.Uint64(cmd[8:]))
		if size < 0 || size > 1<<30 {
			return fmt.Errorf("bench raw: size %d", size)
		}
		p := plan{size: size, pingIter: int(binary.LittleEndian.Uint64(cmd[16:])), stream: int(binary.LittleEndian.Uint64(cmd[24:]))}
		if int64(cap(buf)) < size {
			buf = make([]byte, size)
		}
		buf = buf[:size]
		switch op {
		case opPingPong:
			for range 5 + p.pingIter {
				if _, err := io.ReadFull(c, buf); err != nil {
					return err
				}
				if _, err := c.Write(buf); err != nil {
					return err
				}
			}
		case opStream:
			for range p.stream {
				if _, err := io.ReadFull(c, buf); err != nil {
					return err
				}
			}
			if _, err := c.Write([]byte{1}); err != nil {
				return err
			}
		case opDone:
			return nil
		default:
			return fmt.Errorf("bench raw: unknown op %d", op)
		}
	}
}

func quantile(d []time.Duration, q float64) float64 {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return float64(s[min(len(s)-1, int(q*float64(len(s))))].Nanoseconds()) / 1e3
}
