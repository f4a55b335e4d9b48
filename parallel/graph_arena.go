package parallel

import (
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

// graphArena holds the activations of one sequence bucket's decode graphs.
// It hands model.Forward its temporaries: the k-th tensor of a dtype and
// shape asked for since the last reset is the same tensor every time, so
// that every layer of a step, and every graph of the bucket, reuses one set
// (the warm-up allocates it, the capture finds it). Nothing is freed before
// the arena: the graphs read and write these tensors on every replay.
type graphArena struct {
	be   kernels.Backend
	seqs int
	// Persistent inputs: token ids I32 [seqs], the residual stream [seqs, hidden].
	ids, h *kernels.Tensor
	// The head's outputs of the last forward through the arena.
	normed, logits *kernels.Tensor

	pools map[arenaKey][]*kernels.Tensor
	used  map[arenaKey]int
	all   []*kernels.Tensor
	bytes int64
}

type arenaKey struct {
	dt    kernels.DType
	rank  int
	shape [4]int
}

func newGraphArena(be kernels.Backend, seqs, hidden int) (*graphArena, error) {
	a := &graphArena{be: be, seqs: seqs, pools: map[arenaKey][]*kernels.Tensor{}, used: map[arenaKey]int{}}
	var err error
	if a.ids, err = a.alloc(kernels.I32, seqs); err != nil {
		return nil, err
	}
	if a.h, err = a.alloc(kernels.F32, seqs, hidden); err != nil {
		a.free()
		return nil, err
	}
	return a, nil
}

func (a *graphArena) alloc(dt kernels.DType, shape ...int) (*kernels.Tensor, error) {
	t, err := a.be.NewTensor(dt, shape...)
	if err != nil {
		return nil, err
	}
	a.all = append(a.all, t)
	a.bytes += int64(t.Elements() * dt.Size())
	return t, nil
}

// take is NewTensor for the forward running through the arena.
func (a *graphArena) take(dt kernels.DType, shape []int) (*kernels.Tensor, error) {
	if len(shape) > len(arenaKey{}.shape) {
		return nil, fmt.Errorf("decode graph arena: %d-dimensional activation %v", len(shape), shape)
	}
	k := arenaKey{dt: dt, rank: len(shape)}
	copy(k.shape[:], shape)
	i := a.used[k]
	a.used[k] = i + 1
	if i < len(a.pools[k]) {
		return a.pools[k][i], nil
	}
	t, err := a.alloc(dt, shape...)
	if err != nil {
		return nil, err
	}
	a.pools[k] = append(a.pools[k], t)
	return t, nil
}

// reset makes the arena's tensors available again (at a layer boundary:
// the previous layer's temporaries are dead).
func (a *graphArena) reset() { clear(a.used) }

func (a *graphArena) free() {
	for _, t := range a.all {
		a.be.Free(t)
	}
	a.all, a.pools, a.ids, a.h, a.normed, a.logits, a.bytes = nil, nil, nil, nil, nil, nil, 0
}

// arenaBackend is the backend as a forward through an arena sees it (a
// decode graph's, or the step workspace): allocations come from the arena
// and frees are no-ops (the arena owns).
type arenaBackend struct {
	kernels.Backend
	a arenaAllocator
}

func (b arenaBackend) NewTensor(dt kernels.DType, shape ...int) (*kernels.Tensor, error) {
	return b.a.take(dt, shape)
}

func (arenaBackend) Free(*kernels.Tensor) {}

// MoEWithShared passes the optional fused MoE through (the embedded
// interface would hide it, and captured steps must run what eager ones run).
func (b arenaBackend) MoEWithShared(out, x, ids, w *kernels.Tensor, ex []*kernels.Expert, sh *kernels.Expert) (bool, error) {
	if sm, ok := b.Backend.(kernels.SharedExpertMoE); ok {
		return sm.MoEWithShared(out, x, ids, w, ex, sh)
	}
	return false, nil
}

// LinearMulti passes the optional fused Linear through, as MoEWithShared.
func (b arenaBackend) LinearMulti(outs []*kernels.Tensor, x *kernels.Tensor, ws, biases []*kernels.Tensor) (bool, error) {
	if ml, ok := b.Backend.(kernels.MultiLinear); ok {
		return ml.LinearMulti(outs, x, ws, biases)
	}
	return false, nil
}

// MaskReplicas passes the EPLB replica mask through (kernels.ReplicaMasker),
// as MoEWithShared: hidden, a graph step would mask on the host and fail
// its capture.
func (b arenaBackend) MaskReplicas(w, ids, table *kernels.Tensor) error {
	if rm, ok := b.Backend.(kernels.ReplicaMasker); ok {
		return rm.MaskReplicas(w, ids, table)
	}
	return fmt.Errorf("replica mask: backend %s has no device mask", b.Name())
}
