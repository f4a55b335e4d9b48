package transport

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"
)

func bytesMsg(step uint64, payload []byte) *Message {
	return &Message{
		Header:   Header{Step: step, Kind: KindActivations, Tensors: []TensorMeta{{DType: DTypeBytes, Shape: []int64{int64(len(payload))}, Bytes: int64(len(payload))}}},
		Payloads: []Buffer{HostBuffer(payload)},
	}
}

func TestPipeOrderAndBackpressure(t *testing.T) {
	a, b := Pipe("a", "b", 1000, DefaultLimits())
	defer a.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for i := range 3 {
		if err := a.Send(ctx, bytesMsg(uint64(i), bytes.Repeat([]byte{byte(i)}, 300))); err != nil {
			t.Fatal(err)
		}
	}
	// A fourth 300-byte message would exceed 1000 bytes in flight: it blocks until its deadline.
	short, c2 := context.WithTimeout(ctx, 50*time.Millisecond)
	err := a.Send(short, bytesMsg(3, make([]byte, 300)))
	c2()
	var le *Error
	if !errors.Is(err, context.DeadlineExceeded) || !errors.As(err, &le) || le.Peer != "b" || le.Step != 3 {
		t.Fatalf("blocked send = %v, want a deadline error naming b and step 3", err)
	}
	if err := a.Send(ctx, bytesMsg(9, make([]byte, 2000))); err == nil {
		t.Fatal("a message larger than the in-flight bound was accepted")
	}
	var m Message
	for i := range 3 {
		if err := b.Recv(ctx, &m); err != nil {
			t.Fatal(err)
		}
		if m.Header.Step != uint64(i) || !bytes.Equal(m.Payloads[0].Host, bytes.Repeat([]byte{byte(i)}, 300)) {
			t.Fatalf("message %d: step %d, payload %v…", i, m.Header.Step, m.Payloads[0].Host[:4])
		}
	}
	a.Close()
	if err := b.Recv(ctx, &m); !errors.Is(err, ErrClosed) {
		t.Fatalf("recv after close = %v", err)
	}
}
