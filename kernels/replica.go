package kernels

import "fmt"

// ReplicaMasker is an optional Backend extension for expert-parallel ranks
// holding EPLB replicas (an expert held by several EP groups): it zeroes, on
// the device, the routing weights of the routes this rank holds an expert
// for but does not serve, so that the MoE sum over the ranks counts each
// route once. Without it the model downloads the routing ids and weights,
// masks them on the host and uploads the weights back: a stream
// synchronisation and three copies per MoE layer and step, which a CUDA
// graph cannot capture. Here the rank's replica table is uploaded once and
// the mask is one kernel on the stream: no host round trip, capturable.
type ReplicaMasker interface {
	// MaskReplicas masks weights (F32 [T, k], in place) by the experts in
	// ids (I32 [T, k]) and table (I32 [E, 2]: per expert its replica count
	// n and this rank's replica index m, in placement order). Token t's
	// route to expert e is served by replica t mod n, so
	//
	//	weights[t,j] = 0  when n(e) > 1, m(e) ≥ 0 and t mod n(e) ≠ m(e).
	//
	// n ≤ 1 (held by one group) or m < 0 (not held here: the MoE skips
	// the expert anyway) leaves the weight. So does an expert id outside
	// [0, E): the table is never read out of bounds, and the MoE reports or
	// skips such ids itself.
	MaskReplicas(weights, ids, table *Tensor) error
}

// ReplicaServes is the rule of ReplicaMasker for one route: whether token's
// route to an expert of replica count n, of which this rank holds replica m
// (m < 0: none), keeps its weight. The backends' twins and the tables'
// builders share it.
func ReplicaServes(token int, n, m int32) bool {
	return n <= 1 || m < 0 || int32(token%int(n)) == m
}

// ReplicaShapes checks MaskReplicas' shapes (weights and ids [T, k], table
// [E, 2]) and returns the routes per token k and the table's experts E.
func ReplicaShapes(weights, ids, table *Tensor) (k, experts int, err error) {
	switch {
	case weights == nil || ids == nil || table == nil:
		return 0, 0, fmt.Errorf("mask replicas: nil tensor (weights %v, ids %v, table %v)", weights != nil, ids != nil, table != nil)
	case weights.DType != F32 || ids.DType != I32 || table.DType != I32:
		return 0, 0, fmt.Errorf("mask replicas: weights %v, ids %v, table %v: want f32, i32, i32", weights.DType, ids.DType, table.DType)
	case len(ids.Shape) != 2 || len(weights.Shape) != 2 || ids.Shape[0] != weights.Shape[0] || ids.Shape[1] != weights.Shape[1]:
		return 0, 0, fmt.Errorf("mask replicas: weights %v, ids %v: want both [T, k]", weights.Shape, ids.Shape)
	case len(table.Shape) != 2 || table.Shape[1] != 2:
		return 0, 0, fmt.Errorf("mask replicas: table %v: want [experts, 2]", table.Shape)
	}
	return ids.Shape[1], table.Shape[0], nil
}
