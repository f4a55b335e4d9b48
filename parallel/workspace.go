package parallel

import (
	"errors"
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

// workspace holds the activations of eager steps: one backend tensor,
// allocated at engine start for the largest step allowed
// (max-num-batched-tokens tokens over max-num-seqs sequences), carved into
// views (kernels.Viewer) by a bump pointer. As in the decode graphs' arena
// (graph_arena.go), a layer's temporaries are dead once its output is added
// to the residual stream and the kernels run in stream order, so the
// pointer goes back to the mark after the embedding at every layer
// boundary: the workspace holds the residual stream and one layer's
// temporaries, not the whole step's. Nothing is allocated on the step path,
// and a step larger than the workspace fails before any kernel runs.
//
// Measuring (base nil) takes the same offsets without memory: NewEngine
// runs the worst-case step's forward through a measuring workspace over a
// backend whose operations do nothing (dryBackend) to learn the size.
type workspace struct {
	view kernels.Viewer
	base *kernels.Tensor // nil while measuring
	size int64           // bytes of base
	// The largest step the workspace was sized for.
	maxTokens, maxRows int
	off, mark, high    int64
}

const wsAlign = 256

// newWorkspace allocates size bytes on be.
func newWorkspace(be kernels.Backend, size int64, maxTokens, maxRows int) (*workspace, error) {
	v, ok := be.(kernels.Viewer)
	if !ok {
		return nil, fmt.Errorf("step workspace: backend %s cannot view tensors", be.Name())
	}
	size = max(alignUp(size), wsAlign)
	base, err := be.NewTensor(kernels.F32, int(size/4))
	if err != nil {
		return nil, fmt.Errorf("step workspace of %d bytes: %w", size, err)
	}
	return &workspace{view: v, base: base, size: size, maxTokens: maxTokens, maxRows: maxRows}, nil
}

func alignUp(n int64) int64 { return (n + wsAlign - 1) &^ (wsAlign - 1) }

// take is NewTensor for the forward running through the workspace.
func (w *workspace) take(dt kernels.DType, shape []int) (*kernels.Tensor, error) {
	n := int64(dt.Size())
	for _, d := range shape {
		if d < 0 {
			return nil, fmt.Errorf("step workspace: negative dimension in shape %v", shape)
		}
		n *= int64(d)
	}
	off := w.off
	end := off + alignUp(n)
	if w.base == nil {
		w.off, w.high = end, max(w.high, end)
		return &kernels.Tensor{DType: dt, Shape: append([]int(nil), shape...)}, nil
	}
	if end > w.size {
		return nil, fmt.Errorf("step workspace: %v %v needs bytes [%d, %d) of %d: the step is larger than the %d tokens × %d rows the workspace was sized for",
			dt, shape, off, end, w.size, w.maxTokens, w.maxRows)
	}
	t, err := w.view.View(w.base, off, dt, shape...)
	if err != nil {
		return nil, err
	}
	w.off, w.high = end, max(w.high, end)
	return t, nil
}

// begin starts a step: every tensor of the last one is dead.
func (w *workspace) begin() { w.off, w.mark = 0, 0 }

// setMark keeps what was taken so far (the step's inputs and residual
// stream) through every reset.
func (w *workspace) setMark() { w.mark = w.off }

// reset drops the temporaries taken since the mark.
func (w *workspace) reset() { w.off = w.mark }

func (w *workspace) free(be kernels.Backend) {
	if w != nil && w.base != nil {
		be.Free(w.base)
		w.base = nil
	}
}

// arenaAllocator is where a forward through arenaBackend takes its tensors:
// a decode graph's arena or the step workspace.
type arenaAllocator interface {
	take(dt kernels.DType, shape []int) (*kernels.Tensor, error)
}

// dryBackend runs nothing: the measuring workspace's forward goes through
// it to learn the worst-case step's layout without memory or kernels. It
// does not fuse (no MultiLinear or SharedExpertMoE), so it takes every
// temporary the unfused forward takes: an upper bound of the fused one.
type dryBackend struct{ kernels.Backend }

func (dryBackend) Upload(*kernels.Tensor, []byte) error { return nil }
func (dryBackend) Embed(_, _, _ *kernels.Tensor) error  { return nil }
func (dryBackend) RMSNorm(_, _, _ *kernels.Tensor, _ float32) error {
	return nil
}
func (dryBackend) AddRMSNorm(_, _, _, _ *kernels.Tensor, _ float32) error { return nil }
func (dryBackend) Linear(_, _, _, _ *kernels.Tensor) error                { return nil }
func (dryBackend) QKNormRopeKV(_, _, _, _, _ *kernels.Tensor, _ float32, _ kernels.RopeParams, _ int, _ *kernels.KVCache, _ kernels.BatchMeta) error {
	return nil
}
func (dryBackend) Attention(_, _ *kernels.Tensor, _ *kernels.KVCache, _ kernels.AttentionParams, _ kernels.BatchMeta) error {
	return nil
}
func (dryBackend) SiluMul(_, _, _ *kernels.Tensor) error                          { return nil }
func (dryBackend) Add(_, _, _ *kernels.Tensor) error                              { return nil }
func (dryBackend) Concat(_, _, _ *kernels.Tensor) error                           { return nil }
func (dryBackend) Route(_, _, _, _ *kernels.Tensor, _ kernels.RouterParams) error { return nil }
func (dryBackend) MoE(_, _, _, _ *kernels.Tensor, _ []*kernels.Expert) error      { return nil }
func (dryBackend) NewTensor(kernels.DType, ...int) (*kernels.Tensor, error) {
	return nil, errDry // the measuring workspace hands out the forward's tensors
}
func (dryBackend) Sample(*kernels.Tensor, []kernels.SampleParams) ([]int32, error) { return nil, nil }
func (dryBackend) UploadBatch(*kernels.Batch) (kernels.BatchMeta, error)           { return nil, nil }
func (dryBackend) Download(*kernels.Tensor) ([]float32, error)                     { return nil, nil }
func (dryBackend) DownloadI32(*kernels.Tensor) ([]int32, error)                    { return nil, nil }
func (dryBackend) UploadWeight(kernels.DType, []int, []byte) (*kernels.Tensor, error) {
	return nil, errDry
}

var errDry = errors.New("step workspace: the dry forward allocated outside its workspace")

func (dryBackend) Free(*kernels.Tensor) {}
