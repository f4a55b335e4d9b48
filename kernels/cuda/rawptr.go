package cuda

import "github.com/glmtopo/glmtopo/kernels"

// DevicePointer is t's device address, for libraries that take raw
// pointers and queue work on Stream (NCCL collectives: transport/nccl's
// TensorAllReducer).
func (b *Backend) DevicePointer(t *kernels.Tensor) (uintptr, error) {
	bf, err := devBuf(t, "tensor")
	if err != nil {
		return 0, err
	}
	return bf.ptr, nil
}

// Stream is the stream all of b's work runs on, and that a capture records.
func (b *Backend) Stream() uintptr { return b.stream }
