package nccl

import (
	"context"
	"reflect"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

func TestCheckBroadcast(t *testing.T) {
	const base = uintptr(1 << 20)
	buf := Buffer{Ptr: base, Bytes: 40}
	for _, tc := range []struct {
		name    string
		err     error
		wantErr string
	}{
		{"f32", checkBroadcast(buf, 10, Float32, 2, 3), ""},
		{"int64", checkBroadcast(buf, 5, Int64, 0, 3), ""},
		{"uint8 bytes", checkBroadcast(buf, 40, Uint8, 1, 3), ""},
		{"zero count, no buffer", checkBroadcast(Buffer{}, 0, BFloat16, 0, 1), ""},
		{"root past the ranks", checkBroadcast(buf, 10, Float32, 3, 3), "root 3 outside the 3 ranks"},
		{"negative root", checkBroadcast(buf, 10, Float32, -1, 3), "root -1 outside"},
		{"negative count", checkBroadcast(buf, -1, Float32, 0, 3), "negative count -1"},
		{"buffer too small", checkBroadcast(buf, 11, Float32, 0, 3), "buffer: 44 bytes at offset 0 do not fit a 40-byte buffer"},
		{"null pointer", checkBroadcast(Buffer{Bytes: 40}, 10, Float32, 0, 3), "null device pointer"},
		{"unknown type", checkBroadcast(buf, 10, DType(42), 0, 3), "unsupported data type"},
		{"count overflow", checkBroadcast(buf, 1<<62, Float32, 0, 3), "overflow"},
	} {
		t.Run(tc.name, func(t *testing.T) { checkErr(t, tc.err, tc.wantErr) })
	}
}

// TestBroadcastReachesNCCL: Comm.Broadcast is one ncclBroadcast in place
// (send == recv) with the root and the stream; bad arguments never reach
// NCCL; a failing call aborts the communicator and is named.
func TestBroadcastReachesNCCL(t *testing.T) {
	f, c := fakeComm(t, 3, 1)
	ctx := context.Background()
	const stream = 0x5151
	f.set(modeJoins)
	if err := c.Broadcast(ctx, stream, Buffer{Ptr: 0x1000, Bytes: 40}, 10, Float32, 2); err != nil {
		t.Fatal(err)
	}
	want := []fakeCall{{fn: fGroupStart}, {fn: fBroadcast, args: [7]int64{0x1000, 0x1000, 10, 7, 2, int64(c.c), stream}}, {fn: fGroupEnd}}
	if got := f.calls(); !reflect.DeepEqual(got, want) {
		t.Fatalf("NCCL saw\n%v\nwant\n%v", got, want)
	}
	for _, bad := range []func() error{
		func() error { return c.Broadcast(ctx, stream, Buffer{Ptr: 0x1000, Bytes: 40}, 10, Float32, 3) },
		func() error { return c.Broadcast(ctx, stream, Buffer{Ptr: 0x1000, Bytes: 39}, 10, Float32, 0) },
		func() error { return c.Broadcast(ctx, stream, Buffer{Ptr: 0x1000, Bytes: 40}, -1, Float32, 0) },
	} {
		f.set(modeJoins)
		if err := bad(); err == nil || f.nrec() != 0 {
			t.Fatalf("bad broadcast: %v, %d NCCL calls", err, f.nrec())
		}
	}
	f.set(modeJoins)
	if err := c.Broadcast(ctx, stream, Buffer{}, 0, Float32, 0); err != nil || f.nrec() != 0 {
		t.Fatalf("zero-count broadcast: %v, %d calls", err, f.nrec())
	}
	f.fail(fBroadcast)
	err := c.Broadcast(ctx, stream, Buffer{Ptr: 0x1000, Bytes: 40}, 10, Float32, 0)
	if err == nil || !strings.Contains(err.Error(), "ncclBroadcast") || f.aborts() != 1 {
		t.Fatalf("failing broadcast: %v, %d aborts", err, f.aborts())
	}
}

// TestTensorBroadcast: one rank checks and queues nothing; on several
// ranks each dtype reaches ncclBroadcast in place with NCCL's type (bytes
// for a dtype NCCL has no name for here) on the backend's stream.
func TestTensorBroadcast(t *testing.T) {
	f, c := fakeComm(t, 2, 0)
	be := fakeTensors{stream: 0x77}
	tensor := func(dt kernels.DType, shape ...int) *kernels.Tensor {
		return &kernels.Tensor{DType: dt, Shape: shape, Impl: uintptr(0x9000)}
	}
	one := NewTensorAllReducer(nil, be)
	f.set(modeJoins)
	if err := one.Broadcast(tensor(kernels.F32, 3, 4), 0); err != nil || f.nrec() != 0 {
		t.Fatalf("one rank: %v, %d NCCL calls", err, f.nrec())
	}
	if err := one.Broadcast(tensor(kernels.F32, 3, 4), 1); err == nil || !strings.Contains(err.Error(), "root 1 outside the 1 ranks") {
		t.Fatalf("one rank, root 1: %v", err)
	}
	two := NewTensorAllReducer(c, be)
	for _, tc := range []struct {
		t     *kernels.Tensor
		count int64
		dt    DType
	}{
		{tensor(kernels.F32, 3, 5120), 3 * 5120, Float32},
		{tensor(kernels.BF16, 2, 8), 16, BFloat16},
		{tensor(kernels.I32, 7), 7, Int32},
		{tensor(kernels.F8E4M3, 4, 6), 24, Uint8},
	} {
		f.set(modeJoins)
		if err := two.Broadcast(tc.t, 1); err != nil {
			t.Fatalf("%v: %v", tc.t.DType, err)
		}
		want := []fakeCall{{fn: fGroupStart}, {fn: fBroadcast, args: [7]int64{0x9000, 0x9000, tc.count, int64(tc.dt), 1, int64(c.c), 0x77}}, {fn: fGroupEnd}}
		if got := f.calls(); !reflect.DeepEqual(got, want) {
			t.Fatalf("%v: NCCL saw %v, want %v", tc.t.DType, got, want)
		}
	}
	for _, bad := range []struct {
		t       *kernels.Tensor
		root    int
		wantErr string
	}{
		{nil, 0, "nil tensor"},
		{tensor(kernels.F32, 2), 2, "root 2 outside the 2 ranks"},
		{tensor(kernels.DType(99), 2), 0, "unknown dtype"},
		{tensor(kernels.F32, -1, 2), 0, "negative dimension"},
	} {
		f.set(modeJoins)
		if err := two.Broadcast(bad.t, bad.root); err == nil || !strings.Contains(err.Error(), bad.wantErr) || f.nrec() != 0 {
			t.Fatalf("root %d: %v (want %q), %d NCCL calls", bad.root, err, bad.wantErr, f.nrec())
		}
	}
}
