package nccl

import (
	"context"
	"fmt"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
)

// TensorBackend is what a TensorAllReducer needs of a CUDA backend
// (kernels/cuda.Backend): the device address of a live tensor, and the
// stream the backend's kernels run on, which a decode graph capture
// records.
type TensorBackend interface {
	DevicePointer(t *kernels.Tensor) (uintptr, error)
	Stream() uintptr
}

// collective is kernels.Collective, restated so that this package builds
// against the method set alone: the communicator the engine calls between
// a row-parallel projection and the residual add.
type collective interface {
	Size() int
	Rank() int
	AllReduceSum(t *kernels.Tensor) error
}

var (
	_ collective    = (*TensorAllReducer)(nil)
	_ TensorBackend = (*cuda.Backend)(nil)
)

// DefaultEnqueueTimeout bounds how long AllReduceSum waits for NCCL to take a
// call (a non-blocking communicator's launch), not the transfer itself.
const DefaultEnqueueTimeout = 30 * time.Second

// TensorAllReducer sums a backend tensor in place across the ranks of a
// communicator, on the backend's stream: the call is queued behind the
// kernels that produced the tensor and before those that read it, and
// returns without waiting, so it sits inside a captured decode graph like
// any kernel. Use it from the goroutine that drives the backend.
//
// It is also the rank group's kernels.Broadcaster (ncclBroadcast in place,
// queued like the all-reduce) and kernels.Exchanger (host slices staged
// through device memory, which needs a StagingBackend and waits for the
// transfer: eager steps only, never inside a capture).
type TensorAllReducer struct {
	comm    *Comm
	b       TensorBackend
	timeout time.Duration
}

// NewTensorAllReducer sums over comm's ranks. comm may be nil for a world
// of one rank (the tensor-parallel size 1 path needs no communicator).
func NewTensorAllReducer(comm *Comm, b TensorBackend) *TensorAllReducer {
	return &TensorAllReducer{comm: comm, b: b, timeout: DefaultEnqueueTimeout}
}

// SetEnqueueTimeout changes how long AllReduceSum waits for NCCL to take a call.
func (a *TensorAllReducer) SetEnqueueTimeout(d time.Duration) { a.timeout = d }

// Size is the number of ranks summed over.
func (a *TensorAllReducer) Size() int {
	if a.comm == nil {
		return 1
	}
	return a.comm.Size()
}

// Rank is this rank.
func (a *TensorAllReducer) Rank() int {
	if a.comm == nil {
		return 0
	}
	return a.comm.Rank()
}

// AllReduceSum sums t (f32 or bf16) in place across the ranks. Every rank
// gets the same bits (NCCL's all-reduce ends by handing every rank the one
// reduced result).
func (a *TensorAllReducer) AllReduceSum(t *kernels.Tensor) error {
	if a.Size() == 1 {
		_, _, err := tensorType(t) // the shortcut below, without a context per call
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
	defer cancel()
	return a.AllReduceSumContext(ctx, t)
}

// AllReduceSumContext is AllReduceSum with the enqueue bounded by ctx.
func (a *TensorAllReducer) AllReduceSumContext(ctx context.Context, t *kernels.Tensor) error {
	d, count, err := tensorType(t)
	if err != nil {
		return err
	}
	// The sum over one rank is the tensor itself: like vLLM's
	// tensor_model_parallel_all_reduce at world size 1, skip NCCL entirely
	// (no kernel, no group launch, nothing in a captured graph). Comm's
	// AllReduce itself is tested on one-rank communicators.
	if a.Size() == 1 {
		return nil
	}
	buf, err := a.buffer(t, count, d, "all-reduce")
	if err != nil {
		return err
	}
	return a.comm.AllReduce(ctx, a.b.Stream(), buf, buf, count, d)
}

// buffer is t's device memory as count elements of d, for NCCL.
func (a *TensorAllReducer) buffer(t *kernels.Tensor, count int64, d DType, what string) (Buffer, error) {
	p, err := a.b.DevicePointer(t)
	if err != nil {
		return Buffer{}, fmt.Errorf("nccl %s: %w", what, err)
	}
	return Buffer{Ptr: p, Bytes: count * d.Size()}, nil
}

// Wait waits for the backend's stream (every all-reduce queued so far, and
// the kernels around them) under ctx, aborting the communicator at ctx's
// end or on an NCCL error: a dead peer never leaves the caller blocked.
// Outside a capture it may be used instead of the backend's Sync.
func (a *TensorAllReducer) Wait(ctx context.Context) error {
	if a.Size() == 1 {
		return nil
	}
	return a.comm.Wait(ctx, a.b.Stream())
}

// Watch aborts the communicator when ctx ends, so that a stream blocked on
// a dead peer (in a launched graph, or under the backend's own
// synchronisation) is released; NCCL's kernels notice the abort and exit.
// Call stop when the watched work is done.
func (a *TensorAllReducer) Watch(ctx context.Context) (stop func() bool) {
	if a.comm == nil {
		return func() bool { return true }
	}
	return context.AfterFunc(ctx, func() { a.comm.abortBounded() })
}

// tensorType maps a backend tensor's dtype to NCCL's and counts it.
func tensorType(t *kernels.Tensor) (DType, int64, error) {
	if t == nil {
		return 0, 0, fmt.Errorf("nccl all-reduce: nil tensor")
	}
	for _, n := range t.Shape {
		if n < 0 {
			return 0, 0, fmt.Errorf("nccl all-reduce: negative dimension in shape %v", t.Shape)
		}
	}
	switch t.DType {
	case kernels.F32:
		return Float32, int64(t.Elements()), nil
	case kernels.BF16:
		return BFloat16, int64(t.Elements()), nil
	}
	return 0, 0, fmt.Errorf("nccl all-reduce: sums f32 or bf16 tensors, not %v", t.DType)
}
