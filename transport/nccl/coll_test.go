package nccl

import (
	"context"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
)

// TestCheckCollectives: every argument NCCL would take on trust (counts,
// buffer sizes, types, overlaps) is checked first, with an error that
// names the call and the problem.
func TestCheckCollectives(t *testing.T) {
	const base = uintptr(1 << 20)
	buf := func(off uintptr, n int64) Buffer { return Buffer{Ptr: base + off, Bytes: n} }
	for _, tc := range []struct {
		name    string
		err     error
		wantErr string // "" when valid
	}{
		{"all-reduce f32 in place", checkAllReduce(buf(0, 40), buf(0, 40), 10, Float32), ""},
		{"all-reduce bf16 out of place", checkAllReduce(buf(0, 20), buf(20, 20), 10, BFloat16), ""},
		{"all-reduce zero count, no buffers", checkAllReduce(Buffer{}, Buffer{}, 0, Float32), ""},
		{"all-reduce int32", checkAllReduce(buf(0, 40), buf(0, 40), 10, Int32), "sums f32 or bf16, not int32"},
		{"all-reduce unknown type", checkAllReduce(buf(0, 40), buf(0, 40), 10, DType(42)), "unsupported data type"},
		{"all-reduce negative count", checkAllReduce(buf(0, 40), buf(0, 40), -1, Float32), "negative count -1"},
		{"all-reduce send too small", checkAllReduce(buf(0, 39), buf(64, 40), 10, Float32), "send buffer: 40 bytes at offset 0 do not fit a 39-byte buffer"},
		{"all-reduce recv too small", checkAllReduce(buf(0, 40), buf(64, 8), 10, Float32), "receive buffer: 40 bytes"},
		{"all-reduce null pointer", checkAllReduce(Buffer{Bytes: 40}, buf(0, 40), 10, Float32), "null device pointer"},
		{"all-reduce partial overlap", checkAllReduce(buf(0, 40), buf(4, 40), 10, Float32), "overlap"},
		{"all-reduce count overflow", checkAllReduce(buf(0, 40), buf(0, 40), 1<<62, Float32), "overflow"},
		{"all-gather", checkGather(buf(0, 8), buf(64, 32), 4, BFloat16, 1, 4, true), ""},
		{"all-gather in place at rank's slot", checkGather(buf(16, 8), buf(0, 32), 4, BFloat16, 2, 4, true), ""},
		{"all-gather in place at the wrong slot", checkGather(buf(8, 8), buf(0, 32), 4, BFloat16, 2, 4, true), "other than at rank 2's slot"},
		{"all-gather recv too small", checkGather(buf(0, 8), buf(64, 31), 4, BFloat16, 0, 4, true), "receive buffer: 32 bytes"},
		{"all-gather int32 (no sum needed)", checkGather(buf(0, 16), buf(64, 64), 4, Int32, 0, 4, true), ""},
		{"reduce-scatter", checkGather(buf(0, 16), buf(64, 64), 4, Float32, 3, 4, false), ""},
		{"reduce-scatter in place", checkGather(buf(48, 16), buf(0, 64), 4, Float32, 3, 4, false), ""},
		{"reduce-scatter send too small", checkGather(buf(0, 16), buf(64, 60), 4, Float32, 0, 4, false), "send buffer: 64 bytes"},
		{"reduce-scatter uint8", checkGather(buf(0, 4), buf(64, 16), 4, Uint8, 0, 4, false), "sums f32 or bf16, not uint8"},
	} {
		t.Run(tc.name, func(t *testing.T) { checkErr(t, tc.err, tc.wantErr) })
	}
}

func TestCheckAllToAllV(t *testing.T) {
	const base = uintptr(1 << 20)
	valid := func() *AllToAllV {
		return &AllToAllV{
			Send: Buffer{Ptr: base, Bytes: 24}, Recv: Buffer{Ptr: base + 64, Bytes: 24}, DType: BFloat16,
			SendCounts: []int64{3, 0, 9}, RecvCounts: []int64{4, 8, 0},
		}
	}
	for _, tc := range []struct {
		name    string
		edit    func(a *AllToAllV)
		wantErr string
	}{
		{"packed", func(*AllToAllV) {}, ""},
		{"explicit displacements", func(a *AllToAllV) { a.SendDispls = []int64{9, 0, 0} }, ""},
		{"wrong number of counts", func(a *AllToAllV) { a.RecvCounts = a.RecvCounts[:2] }, "receive: 2 counts for 3 ranks"},
		{"wrong number of displacements", func(a *AllToAllV) { a.SendDispls = []int64{0} }, "send: 1 displacements for 3 ranks"},
		{"negative count", func(a *AllToAllV) { a.SendCounts[1] = -2 }, "negative count -2 for rank 1"},
		{"negative displacement", func(a *AllToAllV) { a.RecvDispls = []int64{0, -1, 0} }, "negative displacement -1 for rank 1"},
		{"send past the buffer", func(a *AllToAllV) { a.SendCounts[2] = 10 }, "send, rank 2: 20 bytes at offset 6 do not fit a 24-byte buffer"},
		{"displacement past the buffer", func(a *AllToAllV) { a.RecvDispls = []int64{0, 5, 0} }, "receive, rank 1: 16 bytes at offset 10"},
		{"null receive buffer", func(a *AllToAllV) { a.Recv.Ptr = 0 }, "null device pointer"},
		{"in place", func(a *AllToAllV) { a.Recv.Ptr = base + 8 }, "overlap"},
		{"f32", func(a *AllToAllV) { a.DType = Float32; a.Send.Bytes, a.Recv.Bytes = 48, 48; a.Recv.Ptr = base + 48 }, ""},
		{"unknown type", func(a *AllToAllV) { a.DType = 3 }, "unsupported data type"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := valid()
			tc.edit(a)
			_, _, err := a.check(3)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("rejected: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
		})
	}
	d, total := Packed([]int64{3, 0, 9})
	if !reflect.DeepEqual(d, []int64{0, 3, 3}) || total != 12 {
		t.Fatalf("Packed = %v, %d", d, total)
	}
}

// call is one recorded call of the fake library.
type fakeCall struct {
	fn   int64
	args [7]int64
}

// The fake's function numbers (fakeNCCL's enum).
const (
	fSend = iota + 1
	fRecv
	fAllReduce
	fAllGather
	fReduceScatter
	fGroupStart
	fGroupEnd
	fBroadcast
)

func (f *fakeLib) calls() []fakeCall {
	out := make([]fakeCall, f.nrec())
	for i := range out {
		out[i].fn = f.rec(int32(i), -1)
		for j := range 7 {
			out[i].args[j] = f.rec(int32(i), int32(j))
		}
	}
	return out
}

// TestCollectivesReachNCCL: each collective reaches the (fake) library as
// one group with the arguments NCCL's signatures expect, the stream (the
// seventh argument, on the stack) included; a failing call aborts the
// communicator and is reported by name.
func TestCollectivesReachNCCL(t *testing.T) {
	f, c := fakeComm(t, 3, 1)
	comm := int64(c.c)
	ctx := context.Background()
	const stream = 0x5151
	b := func(p uintptr, n int64) Buffer { return Buffer{Ptr: p, Bytes: n} }
	steps := []struct {
		name string
		run  func() error
		want []fakeCall
	}{
		{"all-reduce", func() error { return c.AllReduce(ctx, stream, b(0x1000, 40), b(0x1000, 40), 10, Float32) },
			[]fakeCall{{fn: fAllReduce, args: [7]int64{0x1000, 0x1000, 10, 7, 0, comm, stream}}}},
		{"all-gather", func() error { return c.AllGather(ctx, stream, b(0x2000, 8), b(0x3000, 24), 4, BFloat16) },
			[]fakeCall{{fn: fAllGather, args: [7]int64{0x2000, 0x3000, 4, 9, comm, stream}}}},
		{"reduce-scatter", func() error { return c.ReduceScatter(ctx, stream, b(0x3000, 48), b(0x2000, 16), 4, Float32) },
			[]fakeCall{{fn: fReduceScatter, args: [7]int64{0x3000, 0x2000, 4, 7, 0, comm, stream}}}},
		{"all-to-all-v", func() error {
			return c.AllToAllV(ctx, stream, &AllToAllV{Send: b(0x4000, 100), Recv: b(0x8000, 100), DType: BFloat16,
				SendCounts: []int64{2, 0, 5}, RecvCounts: []int64{1, 3, 0}})
		}, []fakeCall{
			{fn: fSend, args: [7]int64{0x4000, 2, 9, 0, comm, stream}},
			{fn: fRecv, args: [7]int64{0x8000, 1, 9, 0, comm, stream}},
			{fn: fRecv, args: [7]int64{0x8000 + 2, 3, 9, 1, comm, stream}},
			{fn: fSend, args: [7]int64{0x4000 + 4, 5, 9, 2, comm, stream}},
		}},
		{"byte send/recv", func() error {
			return c.Enqueue(ctx, stream, Op{Send: true, Buf: 0x100, Bytes: 7, Peer: 2}, Op{Buf: 0x200, Bytes: 7, Peer: 0})
		}, []fakeCall{
			{fn: fSend, args: [7]int64{0x100, 7, 1, 2, comm, stream}},
			{fn: fRecv, args: [7]int64{0x200, 7, 1, 0, comm, stream}},
		}},
	}
	for _, s := range steps {
		f.set(modeJoins)
		if err := s.run(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		want := append(append([]fakeCall{{fn: fGroupStart}}, s.want...), fakeCall{fn: fGroupEnd})
		if got := f.calls(); !reflect.DeepEqual(got, want) {
			t.Fatalf("%s: NCCL saw\n%v\nwant\n%v", s.name, got, want)
		}
	}
	// Nothing to move: no NCCL call at all.
	f.set(modeJoins)
	if err := c.AllReduce(ctx, stream, Buffer{}, Buffer{}, 0, Float32); err != nil || f.nrec() != 0 {
		t.Fatalf("zero-count all-reduce: %v, %d calls", err, f.nrec())
	}
	// A bad argument never reaches NCCL.
	if err := c.AllGather(ctx, stream, b(0x2000, 8), b(0x3000, 8), 4, BFloat16); err == nil || f.nrec() != 0 {
		t.Fatalf("short all-gather buffer: %v, %d calls", err, f.nrec())
	}
	for _, op := range []Op{{Send: true, Buf: 0x100, Bytes: 1, Peer: 3}, {Buf: 0x100, Bytes: 1, Peer: -1}, {Buf: 0x100, Bytes: -1}, {Bytes: 4}} {
		if err := c.Enqueue(ctx, stream, op); err == nil || !strings.Contains(err.Error(), "nccl send/recv: op 0") || f.nrec() != 0 {
			t.Fatalf("%+v: %v, %d calls", op, err, f.nrec())
		}
	}
	f.fail(fAllReduce)
	err := c.AllReduce(ctx, stream, b(0x1000, 40), b(0x1000, 40), 10, Float32)
	if err == nil || !strings.Contains(err.Error(), "ncclAllReduce") || f.aborts() != 1 {
		t.Fatalf("failing all-reduce: %v, %d aborts", err, f.aborts())
	}
	if err := c.AllGather(ctx, stream, b(0x2000, 8), b(0x3000, 24), 4, BFloat16); err == nil || !strings.Contains(err.Error(), "aborted") {
		t.Fatalf("all-gather on an aborted communicator: %v", err)
	}
}

// The engine takes a TensorAllReducer as its kernels.Collective.
var _ kernels.Collective = (*TensorAllReducer)(nil)

// fakeTensors is a TensorBackend whose tensors' Impl is their address.
type fakeTensors struct{ stream uintptr }

func (fakeTensors) DevicePointer(t *kernels.Tensor) (uintptr, error) {
	p, _ := t.Impl.(uintptr)
	return p, nil
}
func (f fakeTensors) Stream() uintptr { return f.stream }

// TestTensorAllReducer: one rank is an identity without NCCL; on several
// ranks the tensor's dtype and size reach ncclAllReduce in place on the
// backend's stream; other dtypes are refused on both paths.
func TestTensorAllReducer(t *testing.T) {
	f, c := fakeComm(t, 2, 0)
	be := fakeTensors{stream: 0x77}
	x := &kernels.Tensor{DType: kernels.BF16, Shape: []int{3, 5120}, Impl: uintptr(0x9000)}
	ids := &kernels.Tensor{DType: kernels.I32, Shape: []int{3}, Impl: uintptr(0xa000)}
	one := NewTensorAllReducer(nil, be)
	f.set(modeJoins)
	if err := one.AllReduceSum(x); err != nil || f.nrec() != 0 || one.Size() != 1 {
		t.Fatalf("one rank: %v, %d NCCL calls, size %d", err, f.nrec(), one.Size())
	}
	two := NewTensorAllReducer(c, be)
	f.set(modeJoins)
	if err := two.AllReduceSum(x); err != nil {
		t.Fatal(err)
	}
	want := []fakeCall{{fn: fGroupStart}, {fn: fAllReduce, args: [7]int64{0x9000, 0x9000, 3 * 5120, 9, 0, int64(c.c), 0x77}}, {fn: fGroupEnd}}
	if got := f.calls(); !reflect.DeepEqual(got, want) {
		t.Fatalf("NCCL saw %v, want %v", got, want)
	}
	for _, a := range []*TensorAllReducer{one, two} {
		if err := a.AllReduceSum(ids); err == nil || !strings.Contains(err.Error(), "not i32") {
			t.Fatalf("size %d: i32 tensor: %v", a.Size(), err)
		}
		if err := a.AllReduceSum(nil); err == nil {
			t.Fatalf("size %d: nil tensor accepted", a.Size())
		}
	}
	// Watch aborts the communicator when its context ends.
	ctx, cancel := context.WithCancel(context.Background())
	stop := two.Watch(ctx)
	defer stop()
	cancel()
	if !waitFor(5*time.Second, func() bool { return f.aborts() == 1 }) {
		t.Fatalf("%d aborts after the watched context ended", f.aborts())
	}
}

// TestCollectiveLaunchDeadline: a group whose launch never completes (NCCL
// answers ncclInProgress and the communicator stays busy: a peer gone)
// returns at the context's deadline with the communicator aborted.
func TestCollectiveLaunchDeadline(t *testing.T) {
	f, c := fakeComm(t, 2, 0)
	f.set(modePeerMissing)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	a := &AllToAllV{Send: Buffer{Ptr: 0x1000, Bytes: 8}, Recv: Buffer{Ptr: 0x2000, Bytes: 8}, DType: Float32,
		SendCounts: []int64{1, 1}, RecvCounts: []int64{1, 1}}
	err := c.AllToAllV(ctx, 1, a)
	if el := time.Since(t0); el > 2*time.Second {
		t.Fatalf("returned after %v", el)
	}
	if err == nil || !strings.Contains(err.Error(), "aborted") || !strings.Contains(err.Error(), "deadline exceeded") || f.aborts() != 1 {
		t.Fatalf("err = %v, %d aborts", err, f.aborts())
	}
}

// checkErr fails unless err is nil where want is "", and contains want
// otherwise (the argument checks' tables).
func checkErr(t *testing.T, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Fatalf("rejected: %v", err)
	case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
		t.Fatalf("err = %v, want %q", err, want)
	}
}

// fakeComm is rank of an nranks communicator over the fake library.
func fakeComm(t *testing.T, nranks, rank int) (*fakeLib, *Comm) {
	t.Helper()
	f := buildFake(t, false)
	f.set(modeJoins)
	c, err := initRank(context.Background(), f.l, hostDevice{}, UniqueID{}, nranks, rank, time.Second, InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return f, c
}
