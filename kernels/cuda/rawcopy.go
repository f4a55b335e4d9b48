package cuda

import "fmt"

// CopyDevice queues a copy of n bytes from device address src to dst on
// Stream, after the work queued before it: a pipeline head copies the rows
// an NCCL link received into the step's tensor.
func (b *Backend) CopyDevice(dst, src uintptr, n int64) error {
	if n < 0 || n > 0 && (dst == 0 || src == 0) {
		return fmt.Errorf("cuda: copy %d bytes from %#x to %#x", n, src, dst)
	}
	if n == 0 {
		return nil
	}
	return b.op(func() error {
		return b.d.check(b.d.cuMemcpyDtoDAsync(dst, src, uintptr(n), b.stream), "cuMemcpyDtoDAsync")
	})
}

// Ordinal is the CUDA device the backend runs on (for a cuda.Device of the
// same primary context: NCCL links).
func (b *Backend) Ordinal() int { return b.opt.Device }
