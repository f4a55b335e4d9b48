package kernels

// Exchanger is an optional extension of a Collective for expert-parallel
// dispatch by all-to-all (model's "alltoall" MoE dispatch): each rank sends
// the token rows routed to another rank's experts to that rank, and gets
// their weighted results back. The in-process collective (parallel/tp)
// implements it through the host; an NCCL one would map AllToAllV onto
// grouped ncclSend/ncclRecv (transport/nccl's Comm.AllToAllV) after an
// exchange of the counts, which must reach the host to size the receives:
// that synchronisation keeps it out of CUDA graphs (decode keeps the
// all-reduce).
//
// As with Collective, every rank calls the same operations in the same
// order, and a rank that fails makes the others' calls fail. The slices
// returned are shared read-only with the other ranks; the caller must not
// write them, nor the slices it sent.
type Exchanger interface {
	// AllToAllV sends send[p] (len(send) == Size) to rank p and returns
	// recv, recv[p] being what rank p sent to this one. The counts go first
	// (every rank learns how many values each peer will send it), then the
	// values: a payload that disagrees with its announced count fails the
	// exchange on every rank.
	AllToAllV(send [][]float32) ([][]float32, error)
	// AllGatherV returns every rank's part concatenated in rank order; the
	// parts may differ in length (the ranks' token slices).
	AllGatherV(part []float32) ([]float32, error)
}
