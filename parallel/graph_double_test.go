package parallel

import (
	"errors"
	"fmt"
	"slices"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
)

// graphCPU is the CPU backend with the CUDA backend's graph interfaces, for
// testing decode graphs without a GPU. Device operations issued between
// BeginCapture and EndCapture are recorded, not run (as stream capture does),
// and run in order on every Launch. NewBatchMeta keeps its own copy of the
// batch, which UpdateBatch rewrites in place. It is as strict as CUDA: no
// host traffic while capturing, captured attention reads only NewBatchMeta
// metadata, updates stay within the sizes at upload, and a replay that
// touches a freed tensor fails. It counts live tensors, so tests see leaks.
type graphCPU struct {
	*cpu.Backend
	capturing bool
	recorded  []func() error
	failEnd   bool // EndCapture fails, as for a step the backend cannot capture

	metas  map[kernels.BatchMeta]*ownedBatch
	live   map[*kernels.Tensor]bool
	graphs int // captured and not closed
	misuse []error

	captures, launches int
}

// ownedBatch is a NewBatchMeta copy and the limits UpdateBatch keeps it in.
type ownedBatch struct {
	b             *kernels.Batch
	width, maxCtx int
}

var _ graphBackend = (*graphCPU)(nil)

func newGraphCPU() *graphCPU {
	return &graphCPU{Backend: cpu.New(0), metas: map[kernels.BatchMeta]*ownedBatch{}, live: map[*kernels.Tensor]bool{}}
}

func (g *graphCPU) hostOp(what string) error {
	if g.capturing {
		return fmt.Errorf("graph double: %s during capture", what)
	}
	return nil
}

// device runs op now, or records it while capturing.
func (g *graphCPU) device(op func() error) error {
	if g.capturing {
		g.recorded = append(g.recorded, op)
		return nil
	}
	return op()
}

func (g *graphCPU) NewTensor(dt kernels.DType, shape ...int) (*kernels.Tensor, error) {
	t, err := g.Backend.NewTensor(dt, shape...)
	if err == nil {
		g.live[t] = true
	}
	return t, err
}

func (g *graphCPU) Free(t *kernels.Tensor) {
	if !g.live[t] {
		g.misuse = append(g.misuse, fmt.Errorf("free of a tensor %v that is not live", t.Shape))
	}
	delete(g.live, t)
	g.Backend.Free(t)
}

func (g *graphCPU) Upload(t *kernels.Tensor, data []byte) error {
	if err := g.hostOp("upload"); err != nil {
		return err
	}
	return g.Backend.Upload(t, data)
}

func (g *graphCPU) UploadWeight(dt kernels.DType, shape []int, data []byte) (*kernels.Tensor, error) {
	if err := g.hostOp("weight upload"); err != nil {
		return nil, err
	}
	return g.Backend.UploadWeight(dt, shape, data)
}

func (g *graphCPU) Download(t *kernels.Tensor) ([]float32, error) {
	if err := g.hostOp("download"); err != nil {
		return nil, err
	}
	return g.Backend.Download(t)
}

func (g *graphCPU) DownloadI32(t *kernels.Tensor) ([]int32, error) {
	if err := g.hostOp("download"); err != nil {
		return nil, err
	}
	return g.Backend.DownloadI32(t)
}

func (g *graphCPU) UploadBatch(b *kernels.Batch) (kernels.BatchMeta, error) {
	if err := g.hostOp("batch upload"); err != nil {
		return nil, err
	}
	return g.Backend.UploadBatch(b)
}

func (g *graphCPU) Sample(logits *kernels.Tensor, params []kernels.SampleParams) ([]int32, error) {
	if err := g.hostOp("sample"); err != nil {
		return nil, err
	}
	return g.Backend.Sample(logits, params)
}

func (g *graphCPU) Embed(out, table, ids *kernels.Tensor) error {
	return g.device(func() error { return g.Backend.Embed(out, table, ids) })
}

func (g *graphCPU) RMSNorm(out, x, w *kernels.Tensor, eps float32) error {
	return g.device(func() error { return g.Backend.RMSNorm(out, x, w, eps) })
}

func (g *graphCPU) AddRMSNorm(resid, x, out, w *kernels.Tensor, eps float32) error {
	return g.device(func() error { return g.Backend.AddRMSNorm(resid, x, out, w, eps) })
}

func (g *graphCPU) Linear(out, x, w, bias *kernels.Tensor) error {
	return g.device(func() error { return g.Backend.Linear(out, x, w, bias) })
}

func (g *graphCPU) QKNormRopeKV(q, k, v, qNorm, kNorm *kernels.Tensor, eps float32, rope kernels.RopeParams, kvHeads int, cache *kernels.KVCache, meta kernels.BatchMeta) error {
	if err := g.capturedMeta(meta); err != nil {
		return err
	}
	return g.device(func() error {
		return g.Backend.QKNormRopeKV(q, k, v, qNorm, kNorm, eps, rope, kvHeads, cache, meta)
	})
}

func (g *graphCPU) Attention(out, q *kernels.Tensor, cache *kernels.KVCache, p kernels.AttentionParams, meta kernels.BatchMeta) error {
	if err := g.capturedMeta(meta); err != nil {
		return err
	}
	return g.device(func() error { return g.Backend.Attention(out, q, cache, p, meta) })
}

// capturedMeta refuses UploadBatch's metadata in a capture: the CUDA
// backend recycles its buffer at the next upload.
func (g *graphCPU) capturedMeta(meta kernels.BatchMeta) error {
	if g.capturing && g.metas[meta] == nil {
		return errors.New("graph double: captured op reads metadata not made by NewBatchMeta")
	}
	return nil
}

func (g *graphCPU) SiluMul(out, gate, up *kernels.Tensor) error {
	return g.device(func() error { return g.Backend.SiluMul(out, gate, up) })
}

func (g *graphCPU) Add(out, a, b *kernels.Tensor) error {
	return g.device(func() error { return g.Backend.Add(out, a, b) })
}

func (g *graphCPU) Concat(out, a, b *kernels.Tensor) error {
	return g.device(func() error { return g.Backend.Concat(out, a, b) })
}

func (g *graphCPU) Route(ids, weights, logits, bias *kernels.Tensor, p kernels.RouterParams) error {
	return g.device(func() error { return g.Backend.Route(ids, weights, logits, bias, p) })
}

// MaskReplicas is a device op (the EPLB replica mask, kernels.ReplicaMasker).
func (g *graphCPU) MaskReplicas(w, ids, table *kernels.Tensor) error {
	return g.device(func() error { return g.Backend.MaskReplicas(w, ids, table) })
}

func (g *graphCPU) MoE(out, x, ids, weights *kernels.Tensor, experts []*kernels.Expert) error {
	return g.device(func() error { return g.Backend.MoE(out, x, ids, weights, experts) })
}

func (g *graphCPU) BeginCapture() error {
	if g.capturing {
		return errors.New("graph double: capture already in progress")
	}
	g.capturing, g.recorded = true, nil
	return nil
}

func (g *graphCPU) EndCapture() (kernels.Graph, error) {
	if !g.capturing {
		return nil, errors.New("graph double: no capture in progress")
	}
	ops := g.recorded
	g.capturing, g.recorded = false, nil
	if g.failEnd {
		return nil, errors.New("graph double: capture refused")
	}
	g.captures++
	g.graphs++
	return &recordedGraph{g: g, ops: ops}, nil
}

type recordedGraph struct {
	g      *graphCPU
	ops    []func() error
	closed bool
}

func (r *recordedGraph) Launch() error {
	if r.closed {
		return errors.New("graph double: launch of a closed graph")
	}
	if err := r.g.hostOp("graph launch"); err != nil {
		return err
	}
	r.g.launches++
	for i, op := range r.ops {
		if err := op(); err != nil {
			return fmt.Errorf("graph double: replayed op %d of %d: %w", i, len(r.ops), err)
		}
	}
	return nil
}

func (r *recordedGraph) Close() error {
	if r.closed {
		return errors.New("graph double: graph closed twice")
	}
	r.closed = true
	r.g.graphs--
	return nil
}

func (g *graphCPU) NewBatchMeta(b *kernels.Batch) (kernels.BatchMeta, error) {
	if err := g.hostOp("batch upload"); err != nil {
		return nil, err
	}
	own := &ownedBatch{b: &kernels.Batch{Positions: slices.Clone(b.Positions), SeqIndex: slices.Clone(b.SeqIndex),
		Slots: slices.Clone(b.Slots), ContextLens: slices.Clone(b.ContextLens)}}
	for i, t := range b.BlockTables {
		own.b.BlockTables = append(own.b.BlockTables, slices.Clone(t))
		own.width = max(own.width, len(t))
		own.maxCtx = max(own.maxCtx, int(b.ContextLens[i]))
	}
	meta, err := g.Backend.UploadBatch(own.b)
	if err != nil {
		return nil, err
	}
	g.metas[meta] = own
	return meta, nil
}

func (g *graphCPU) FreeBatchMeta(meta kernels.BatchMeta) {
	if g.metas[meta] == nil {
		g.misuse = append(g.misuse, errors.New("free of batch metadata not made by NewBatchMeta (or freed twice)"))
	}
	delete(g.metas, meta)
}

// UpdateBatch rewrites the copy in place, within the limits the CUDA
// backend has: the same token and sequence counts, no wider block tables,
// no longer contexts than at upload.
func (g *graphCPU) UpdateBatch(meta kernels.BatchMeta, b *kernels.Batch) error {
	if err := g.hostOp("batch update"); err != nil {
		return err
	}
	own := g.metas[meta]
	if own == nil {
		return errors.New("graph double: update of metadata not made by NewBatchMeta")
	}
	o := own.b
	if b.Tokens() != o.Tokens() || len(b.SeqIndex) != len(o.SeqIndex) || len(b.Slots) != len(o.Slots) ||
		len(b.BlockTables) != len(o.BlockTables) || len(b.ContextLens) != len(o.ContextLens) {
		return fmt.Errorf("graph double: update with %d tokens in %d sequences, metadata holds %d in %d",
			b.Tokens(), len(b.BlockTables), o.Tokens(), len(o.BlockTables))
	}
	for i, t := range b.BlockTables {
		if len(t) > own.width || int(b.ContextLens[i]) > own.maxCtx {
			return fmt.Errorf("graph double: sequence %d has %d blocks and %d tokens, metadata allows %d and %d",
				i, len(t), b.ContextLens[i], own.width, own.maxCtx)
		}
	}
	copy(o.Positions, b.Positions)
	copy(o.SeqIndex, b.SeqIndex)
	copy(o.Slots, b.Slots)
	copy(o.ContextLens, b.ContextLens)
	for i, t := range b.BlockTables {
		o.BlockTables[i] = append(o.BlockTables[i][:0], t...)
	}
	return nil
}
