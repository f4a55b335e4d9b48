package cuda

import (
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

var _ kernels.ReplicaMasker = (*Backend)(nil)

// MaskReplicas is kernels.ReplicaMasker: one kernel (mask_replicas,
// src/replica.cu) on the stream, reading the rank's replica table where it
// lives, so that a decode graph captures it like any other op.
func (b *Backend) MaskReplicas(weights, ids, table *kernels.Tensor) error {
	k, E, err := kernels.ReplicaShapes(weights, ids, table)
	if err != nil {
		return fmt.Errorf("cuda: %w", err)
	}
	var ta tensorArgs
	wp := ta.ptr(weights, kernels.F32, "replica mask weights")
	ip := ta.ptr(ids, kernels.I32, "replica mask expert ids")
	tp := ta.ptr(table, kernels.I32, "replica table")
	if ta.err != nil {
		return ta.err
	}
	n := int64(ids.Elements())
	if n == 0 || k == 0 {
		return nil
	}
	return b.op(func() error {
		return b.launch("ops", "mask_replicas", grid1(n, 256), b256, 0, wp, ip, tp, n, int32(k), int32(E))
	})
}
