package kernels

// Collective is a communicator over the ranks that hold the slices of a
// layer split by tensor or expert parallelism (parallel/tp): an in-process
// one joins CPU ranks of one process; on GPUs an NCCL communicator over the
// host's devices implements it (ncclAllReduce in place on the rank's
// stream). Every rank calls the same operations in the same order, each with
// a tensor of the same shape; a rank that fails makes the others' pending
// and later calls fail instead of waiting (NCCL: ncclCommAbort).
type Collective interface {
	// Size is the number of ranks; Rank is this one's index in [0, Size).
	Size() int
	Rank() int
	// AllReduceSum replaces the F32 tensor t on every rank with the
	// element-wise sum of t over the ranks. Every rank gets the same bits
	// (the in-process one adds in rank order 0..Size-1), so the ranks'
	// residual streams stay identical and their routers agree.
	AllReduceSum(t *Tensor) error
}
