package cpu

import (
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

var _ kernels.ReplicaMasker = (*Backend)(nil)

// MaskReplicas is kernels.ReplicaMasker's reference: the twin of the CUDA
// kernel mask_replicas (src/replica.cu).
func (b *Backend) MaskReplicas(weights, ids, table *kernels.Tensor) error {
	wv, err := f32(weights, "replica mask weights")
	if err != nil {
		return err
	}
	iv, err := i32(ids, "replica mask expert ids")
	if err != nil {
		return err
	}
	tv, err := i32(table, "replica table")
	if err != nil {
		return err
	}
	k, E, err := kernels.ReplicaShapes(weights, ids, table)
	if err != nil {
		return fmt.Errorf("cpu: %w", err)
	}
	if len(wv) != len(iv) || len(tv) != 2*E {
		return fmt.Errorf("cpu: mask replicas: %d weights, %d ids, table of %d for %d experts", len(wv), len(iv), len(tv), E)
	}
	for i, e := range iv {
		if e < 0 || int(e) >= E {
			continue // not an expert of the table: the MoE deals with it
		}
		if !kernels.ReplicaServes(i/k, tv[2*e], tv[2*e+1]) {
			wv[i] = 0
		}
	}
	return nil
}
