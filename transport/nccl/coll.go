package nccl

import (
	"context"
	"fmt"
	"math"
)

// DType is an ncclDataType_t this package moves.
type DType int32

// The values are NCCL's own (nccl.h): they are passed to NCCL as they are.
const (
	Uint8    DType = 1
	Int32    DType = 2
	Int64    DType = 4
	Float32  DType = 7
	BFloat16 DType = 9
)

// Size is bytes per element (0 for a type this package does not know).
func (d DType) Size() int64 {
	switch d {
	case Uint8:
		return 1
	case BFloat16:
		return 2
	case Int32, Float32:
		return 4
	case Int64:
		return 8
	}
	return 0
}

func (d DType) String() string {
	switch d {
	case Uint8:
		return "uint8"
	case Int32:
		return "int32"
	case Int64:
		return "int64"
	case Float32:
		return "f32"
	case BFloat16:
		return "bf16"
	}
	return fmt.Sprintf("ncclDataType(%d)", int32(d))
}

// reducible reports whether the all-reduce and reduce-scatter sum d: the
// activations' types (f32 on the CUDA backend, bf16 on the wire).
func (d DType) reducible() bool { return d == Float32 || d == BFloat16 }

// ncclSum is ncclRedOp_t's sum.
const ncclSum = 0

// Buffer is a region of device memory: NCCL takes raw pointers and checks
// no sizes, so every call is checked against Bytes here first.
type Buffer struct {
	Ptr   uintptr
	Bytes int64
}

// elems returns count*d's size in bytes, or an error when count is negative
// or the product overflows.
func elems(count int64, d DType, what string) (int64, error) {
	if count < 0 {
		return 0, fmt.Errorf("%s: negative count %d", what, count)
	}
	if count > math.MaxInt64/d.Size() {
		return 0, fmt.Errorf("%s: %d %v elements overflow a byte count", what, count, d)
	}
	return count * d.Size(), nil
}

// fits checks that need bytes lie in b at byte offset off.
func fits(b Buffer, off, need int64, what string) error {
	if need == 0 {
		return nil
	}
	if b.Ptr == 0 {
		return fmt.Errorf("%s: null device pointer for %d bytes", what, need)
	}
	if b.Bytes < 0 || off > b.Bytes || need > b.Bytes-off {
		return fmt.Errorf("%s: %d bytes at offset %d do not fit a %d-byte buffer", what, need, off, b.Bytes)
	}
	return nil
}

// overlap reports whether [a, a+an) and [b, b+bn) share a byte.
func overlap(a uintptr, an int64, b uintptr, bn int64) bool {
	if an == 0 || bn == 0 {
		return false
	}
	return a < b+uintptr(bn) && b < a+uintptr(an)
}

// checkType rejects a type NCCL would take but this package cannot size.
func checkType(d DType, reduce bool, what string) error {
	if d.Size() == 0 {
		return fmt.Errorf("%s: unsupported data type %v", what, d)
	}
	if reduce && !d.reducible() {
		return fmt.Errorf("%s: sums f32 or bf16, not %v", what, d)
	}
	return nil
}

// checkAllReduce: send and recv hold count elements each, and are the same
// buffer (in place) or disjoint.
func checkAllReduce(send, recv Buffer, count int64, d DType) error {
	const what = "nccl all-reduce"
	if err := checkType(d, true, what); err != nil {
		return err
	}
	n, err := elems(count, d, what)
	if err != nil {
		return err
	}
	if err := fits(send, 0, n, what+" send buffer"); err != nil {
		return err
	}
	if err := fits(recv, 0, n, what+" receive buffer"); err != nil {
		return err
	}
	if send.Ptr != recv.Ptr && overlap(send.Ptr, n, recv.Ptr, n) {
		return fmt.Errorf("%s: send and receive buffers overlap without being the same (in place)", what)
	}
	return nil
}

// checkGather checks an all-gather (gather: count elements in, nranks*count
// out) or a reduce-scatter (nranks*count in, count out): the small side
// either lies at rank's slot of the large one (NCCL's in-place layout) or
// does not touch it.
func checkGather(small, large Buffer, count int64, d DType, rank, nranks int, gather bool) error {
	what, smallName, largeName := "nccl reduce-scatter", "receive buffer", "send buffer"
	if gather {
		what, smallName, largeName = "nccl all-gather", "send buffer", "receive buffer"
	}
	if err := checkType(d, !gather, what); err != nil {
		return err
	}
	n, err := elems(count, d, what)
	if err != nil {
		return err
	}
	if nranks > 0 && n > math.MaxInt64/int64(nranks) {
		return fmt.Errorf("%s: %d ranks × %d bytes overflow a byte count", what, nranks, n)
	}
	total := n * int64(nranks)
	if err := fits(small, 0, n, what+" "+smallName); err != nil {
		return err
	}
	if err := fits(large, 0, total, what+" "+largeName); err != nil {
		return err
	}
	inPlace := small.Ptr == large.Ptr+uintptr(int64(rank)*n)
	if !inPlace && overlap(small.Ptr, n, large.Ptr, total) {
		return fmt.Errorf("%s: the %s overlaps the %s other than at rank %d's slot (in place)", what, smallName, largeName, rank)
	}
	return nil
}

// AllReduce queues an all-reduce (sum) of count elements of d from send
// into recv on stream (send == recv: in place) and returns without waiting
// (Wait waits; a CUDA graph capture records it). Every rank must call it
// with the same count and type. count 0 is a no-op on every rank.
func (c *Comm) AllReduce(ctx context.Context, stream uintptr, send, recv Buffer, count int64, d DType) error {
	if err := checkAllReduce(send, recv, count, d); err != nil {
		return err
	}
	if count == 0 {
		return nil
	}
	return c.group(ctx, func() (int32, string) {
		return call(c.l.allReduce, send.Ptr, recv.Ptr, uintptr(count), uintptr(d), ncclSum, c.c, stream), "ncclAllReduce"
	})
}

// AllGather queues an all-gather: each rank's count elements of send land
// at rank*count of every rank's recv (nranks*count elements). In place:
// send is rank's slot of recv.
func (c *Comm) AllGather(ctx context.Context, stream uintptr, send, recv Buffer, count int64, d DType) error {
	if err := checkGather(send, recv, count, d, c.rank, c.nranks, true); err != nil {
		return err
	}
	if count == 0 {
		return nil
	}
	return c.group(ctx, func() (int32, string) {
		return call(c.l.allGather, send.Ptr, recv.Ptr, uintptr(count), uintptr(d), c.c, stream), "ncclAllGather"
	})
}

// ReduceScatter queues a reduce-scatter (sum): send holds nranks*count
// elements; rank r receives the sum over ranks of their r-th count-element
// block. In place: recv is rank's slot of send.
func (c *Comm) ReduceScatter(ctx context.Context, stream uintptr, send, recv Buffer, count int64, d DType) error {
	if err := checkGather(recv, send, count, d, c.rank, c.nranks, false); err != nil {
		return err
	}
	if count == 0 {
		return nil
	}
	return c.group(ctx, func() (int32, string) {
		return call(c.l.reduceScatter, send.Ptr, recv.Ptr, uintptr(count), uintptr(d), ncclSum, c.c, stream), "ncclReduceScatter"
	})
}
