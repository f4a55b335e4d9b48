package nccl

import (
	"context"
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

// checkBroadcast: buf holds count elements of d and root is a rank.
func checkBroadcast(buf Buffer, count int64, d DType, root, nranks int) error {
	const what = "nccl broadcast"
	if root < 0 || root >= nranks {
		return fmt.Errorf("%s: root %d outside the %d ranks", what, root, nranks)
	}
	if err := checkType(d, false, what); err != nil {
		return err
	}
	n, err := elems(count, d, what)
	if err != nil {
		return err
	}
	return fits(buf, 0, n, what+" buffer")
}

// Broadcast queues a broadcast of count elements of d from root's buf to
// every rank's buf (in place: ncclBroadcast with sendbuff == recvbuff) on
// stream and returns without waiting (Wait waits; a CUDA graph capture
// records it). Every rank must call it with the same count, type and root.
// count 0 is a no-op on every rank.
func (c *Comm) Broadcast(ctx context.Context, stream uintptr, buf Buffer, count int64, d DType, root int) error {
	if err := checkBroadcast(buf, count, d, root, c.nranks); err != nil {
		return err
	}
	if count == 0 {
		return nil
	}
	return c.group(ctx, func() (int32, string) {
		return call(c.l.broadcast, buf.Ptr, buf.Ptr, uintptr(count), uintptr(d), uintptr(root), c.c, stream), "ncclBroadcast"
	})
}

var _ kernels.Broadcaster = (*TensorAllReducer)(nil)

// Broadcast replaces t on every rank with root's t, in place on the
// backend's stream, and returns without waiting, like AllReduceSum (so it
// sits in a captured decode graph). The bytes move as they are: any dtype
// of known size is broadcast (f32, bf16 and i32 as NCCL's own types, the
// rest as bytes). One rank is a no-op.
func (a *TensorAllReducer) Broadcast(t *kernels.Tensor, root int) error {
	if a.Size() == 1 {
		_, _, err := broadcastType(t, root, 1) // the shortcut below, without a context per call
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
	defer cancel()
	return a.BroadcastContext(ctx, t, root)
}

// BroadcastContext is Broadcast with the enqueue bounded by ctx.
func (a *TensorAllReducer) BroadcastContext(ctx context.Context, t *kernels.Tensor, root int) error {
	d, count, err := broadcastType(t, root, a.Size())
	if err != nil {
		return err
	}
	// One rank is its own root: nothing moves, nothing is queued.
	if a.Size() == 1 {
		return nil
	}
	buf, err := a.buffer(t, count, d, "broadcast")
	if err != nil {
		return err
	}
	return a.comm.Broadcast(ctx, a.b.Stream(), buf, count, d, root)
}

// broadcastType maps a tensor to the NCCL type and count it moves as, and
// checks root against nranks.
func broadcastType(t *kernels.Tensor, root, nranks int) (DType, int64, error) {
	if root < 0 || root >= nranks {
		return 0, 0, fmt.Errorf("nccl broadcast: root %d outside the %d ranks", root, nranks)
	}
	if t == nil {
		return 0, 0, fmt.Errorf("nccl broadcast: nil tensor")
	}
	for _, n := range t.Shape {
		if n < 0 {
			return 0, 0, fmt.Errorf("nccl broadcast: negative dimension in shape %v", t.Shape)
		}
	}
	n := int64(t.Elements())
	switch t.DType {
	case kernels.F32:
		return Float32, n, nil
	case kernels.BF16:
		return BFloat16, n, nil
	case kernels.I32:
		return Int32, n, nil
	}
	if s := t.DType.Size(); s > 0 {
		return Uint8, n * int64(s), nil // a broadcast moves bytes: no arithmetic on the type
	}
	return 0, 0, fmt.Errorf("nccl broadcast: tensor of unknown dtype %v", t.DType)
}
