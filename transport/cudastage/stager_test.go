package cudastage

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/transport"
	"github.com/glmtopo/glmtopo/transport/tcp"
)

// TestPinnedTCPLink moves device tensors (an odd size spanning many 1 MiB
// slots, and a small one) device to device over a TCP link with pinned
// staging on both ends, and checks every byte. Skips without a GPU.
func TestPinnedTCPLink(t *testing.T) {
	dev, err := cuda.OpenDevice(0)
	if errors.Is(err, cuda.ErrNoCUDA) {
		t.Skipf("no CUDA: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	stagers := make([]*Stager, 2)
	for i := range stagers {
		if stagers[i], err = New(dev, 1<<20); err != nil {
			t.Fatal(err)
		}
		defer stagers[i].Close()
	}
	key := make([]byte, 32)
	rand.Read(key)
	acc, err := tcp.Listen("127.0.0.1:0", tcp.Config{Name: "b", Key: key, RecvStager: stagers[1]})
	if err != nil {
		t.Fatal(err)
	}
	defer acc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	d, err := tcp.Dial(ctx, acc.Addr().String(), tcp.Config{Name: "a", Key: key, Stager: stagers[0]})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	a, err := acc.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	for _, n := range []int64{10_000, 64<<20 + 12345} {
		src, _ := dev.Alloc(n)
		dst, _ := dev.Alloc(n)
		want := make([]byte, n)
		rand.Read(want)
		if err := dev.CopyToDevice(src, want); err != nil {
			t.Fatal(err)
		}
		m := &transport.Message{
			Header:   transport.Header{Step: uint64(n), Tensors: []transport.TensorMeta{{DType: transport.DTypeBytes, Shape: []int64{n}, Bytes: n}}},
			Payloads: []transport.Buffer{{Dev: src, Bytes: n}},
		}
		errc := make(chan error, 1)
		t0 := time.Now()
		go func() { errc <- d.Send(ctx, m) }()
		got := transport.Message{Payloads: []transport.Buffer{{Dev: dst, Bytes: n}}}
		if err := a.Recv(ctx, &got); err != nil {
			t.Fatal(err)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		el := time.Since(t0)
		back := make([]byte, n)
		dev.CopyToHost(back, dst)
		if !bytes.Equal(back, want) {
			t.Fatalf("%d bytes: the device tensor arrived altered", n)
		}
		t.Logf("%d bytes device→TCP→device in %v (%.2f GB/s)", n, el, float64(n)/el.Seconds()/1e9)
		dev.Free(src)
		dev.Free(dst)
	}
}
