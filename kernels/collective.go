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

// Broadcaster is an optional extension of a Collective: it copies a tensor
// from one rank to every other, in place. A rank group whose first rank
// shares the engine's backend broadcasts the residual stream with it at
// the start of a step, so the rows never pass through the host; on NCCL it
// is ncclBroadcast on the rank's stream (it sits in a captured decode graph
// like the all-reduces).
type Broadcaster interface {
	// Broadcast replaces t (of the same shape and dtype on every rank) with
	// root's t.
	Broadcast(t *Tensor, root int) error
}
