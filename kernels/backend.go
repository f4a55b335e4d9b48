// Package kernels defines the operations GLM-4.5 needs on backend-owned
// tensors. kernels/cpu is the pure-Go reference; kernels/cuda runs on NVIDIA
// GPUs. The model code is written once against Backend.
package kernels

import (
	"errors"
	"fmt"
)

// DType is an element type of a backend tensor.
type DType int

const (
	F32    DType = iota
	BF16         // bfloat16 weights (activations are F32 on the CPU)
	F8E4M3       // e4m3: weights with a scale tensor, KV caches with per-tensor scales (kernels.KVCache)
	I32
)

func (d DType) String() string {
	switch d {
	case F32:
		return "f32"
	case BF16:
		return "bf16"
	case F8E4M3:
		return "f8e4m3"
	case I32:
		return "i32"
	}
	return fmt.Sprintf("dtype(%d)", int(d))
}

// Size is bytes per element.
func (d DType) Size() int {
	switch d {
	case F32, I32:
		return 4
	case BF16:
		return 2
	case F8E4M3:
		return 1
	}
	return 0
}

// ScaleLayout says how an F8E4M3 weight [N,K] is scaled back to real values.
type ScaleLayout int

const (
	ScaleNone       ScaleLayout = iota
	ScalePerChannel             // Scale is [N] (checkpoint shape [N,1]): w = q * s[n]
	ScaleBlock                  // Scale is [ceil(N/B0), ceil(K/B1)]: w = q * s[n/B0][k/B1]
)

// Tensor is a backend-owned array. Shape is row-major; for weights [N,K] as
// torch stores a Linear's weight. Impl is the backend's storage.
type Tensor struct {
	DType DType
	Shape []int
	// For F8E4M3 weights: the F32 scale tensor and its layout.
	Scale       *Tensor
	ScaleLayout ScaleLayout
	ScaleBlock  [2]int
	Impl        any
}

// Elements is the product of the shape.
func (t *Tensor) Elements() int {
	n := 1
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// Rows and Cols view the tensor as a matrix [rows, last dim].
func (t *Tensor) Cols() int { return t.Shape[len(t.Shape)-1] }
func (t *Tensor) Rows() int { return t.Elements() / t.Cols() }

// Batch describes the tokens of one forward step: any mix of prefill chunks
// and decode tokens of several sequences sharing a paged KV cache.
type Batch struct {
	Positions []int32 // per token: its position in its sequence
	SeqIndex  []int32 // per token: which sequence of this batch it belongs to
	Slots     []int32 // per token: KV cache slot to write (block*BlockSize + offset)
	// Per sequence: its block table and its length after this step's tokens.
	BlockTables [][]int32
	ContextLens []int32
}

// Tokens is the number of tokens in the batch.
func (b *Batch) Tokens() int { return len(b.Positions) }

// Validate checks the batch is self-consistent (cheap; catches engine bugs before kernels run).
func (b *Batch) Validate(blockSize int) error {
	n := len(b.Positions)
	if len(b.SeqIndex) != n || len(b.Slots) != n {
		return errors.New("batch: positions, seq index and slots differ in length")
	}
	if len(b.BlockTables) != len(b.ContextLens) {
		return errors.New("batch: block tables and context lengths differ in length")
	}
	for t := 0; t < n; t++ {
		s := int(b.SeqIndex[t])
		if s < 0 || s >= len(b.ContextLens) {
			return fmt.Errorf("batch: token %d names sequence %d of %d", t, s, len(b.ContextLens))
		}
		if b.Positions[t] < 0 || b.Positions[t] >= b.ContextLens[s] {
			return fmt.Errorf("batch: token %d position %d outside context %d", t, b.Positions[t], b.ContextLens[s])
		}
		if need := int(b.ContextLens[s]+int32(blockSize)-1) / blockSize; len(b.BlockTables[s]) < need {
			return fmt.Errorf("batch: sequence %d has %d blocks, needs %d", s, len(b.BlockTables[s]), need)
		}
	}
	return nil
}

// BatchMeta is a batch uploaded to the backend (device copies of the index arrays).
type BatchMeta interface{ Tokens() int }

// KVCache is one layer's paged K and V cache: [numBlocks, BlockSize, kvHeads, headDim].
// K and V are F32 or BF16, or F8E4M3 (vLLM's --kv-cache-dtype fp8): the
// write stores e4m3(x / scale) and attention reads e4m3 · scale, in f32.
type KVCache struct {
	K, V      *Tensor
	BlockSize int
	KVHeads   int
	HeadDim   int
	// KScale and VScale are an F8E4M3 cache's per-tensor scales (vLLM's
	// k_scale, v_scale; a checkpoint may give them); 0 means 1.
	KScale, VScale float32
}

// Scales are the cache's K and V scales, 1 where unset.
func (c *KVCache) Scales() (k, v float32) {
	k, v = c.KScale, c.VScale
	if k == 0 {
		k = 1
	}
	if v == 0 {
		v = 1
	}
	return k, v
}

// AttentionParams describe the attention of one layer.
type AttentionParams struct {
	Heads, KVHeads, HeadDim int
	Scale                   float32 // softmax scale (head_dim^-0.5)
}

// RopeParams describe GLM-4.5's partial NeoX rotary embedding.
type RopeParams struct {
	Heads, HeadDim, RotaryDim int
	Theta                     float64
}

// RouterParams describe GLM-4.5's sigmoid router with group-limited top-k.
type RouterParams struct {
	Experts, TopK, Groups, TopKGroups int
	NormTopK                          bool
	Scale                             float32 // routed_scaling_factor
}

// Expert is one routed expert's weights; a nil *Expert is not on this backend.
type Expert struct {
	Gate, Up, Down *Tensor // [I,H], [I,H], [H,I]
}

// SampleParams select one token from one row of logits. U is a uniform
// random number in [0,1) supplied by the caller, so that sampling is
// reproducible from a seed and identical on every backend.
type SampleParams struct {
	Temperature float32 // 0 = argmax
	TopP        float32 // 0 or ≥1 disables
	TopK        int     // 0 disables
	U           float32
	// Ban lists token ids that must not be chosen (EOS before min_tokens is reached).
	Ban []int32
}

// SharedExpertMoE is an optional Backend extension: MoE with the layer's
// shared expert (an MLP shaped like a routed expert) in the same grouped
// kernels, out = Σ routed + shared(x). Where it cannot fuse them it reports
// false having done nothing, and the caller runs MoE and the MLP itself.
type SharedExpertMoE interface {
	MoEWithShared(out, x, ids, weights *Tensor, experts []*Expert, shared *Expert) (bool, error)
}

// MultiLinear is an optional Backend extension: Linear layers of one input
// (q, k and v) in one pass, outs[i] = x·ws[i]ᵀ (+biases[i]; nil: none). Where
// it cannot fuse them it reports false having done nothing.
type MultiLinear interface {
	LinearMulti(outs []*Tensor, x *Tensor, ws, biases []*Tensor) (bool, error)
}

// PinnedRows is an optional Backend extension for hidden rows that cross a
// link between stage processes every step: page-locked host buffers and
// copies without an element-wise conversion. Without it the rows go through
// Download and an encode loop (the CPU backend, where both are memory copies).
type PinnedRows interface {
	// PinHost page-locks b (once per buffer, until the backend closes) so
	// that copies from and to it run at full bus speed. An Upload from a
	// pinned buffer may still be running when Upload returns: the buffer
	// must not change until the next synchronising call (DownloadRaw).
	PinHost(b []byte) error
	// UploadRaw copies src (F32 little-endian bytes) into t and waits for
	// the copy, so src may change as soon as it returns.
	UploadRaw(t *Tensor, src []byte) error
	// DownloadRaw copies F32 tensor t's bytes (little-endian) into dst, after
	// all work queued before it, and waits for the copy.
	DownloadRaw(dst []byte, t *Tensor) error
}

// Backend is a device that owns tensors and runs GLM-4.5's operations.
// Calls may be asynchronous; Download and Sample synchronise.
// Shapes: activations are F32 [T, width] with T tokens.
type Backend interface {
	Name() string
	Close() error

	// NewTensor allocates an uninitialised tensor.
	NewTensor(dt DType, shape ...int) (*Tensor, error)
	// Upload copies host bytes (in t's dtype, little-endian) into t.
	Upload(t *Tensor, data []byte) error
	// UploadWeight makes a weight tensor from host bytes. The CPU backend may
	// alias data (e.g. a memory-mapped checkpoint) without copying: the caller
	// keeps data alive and unchanged while the tensor is used.
	UploadWeight(dt DType, shape []int, data []byte) (*Tensor, error)
	// Download copies an F32 tensor to the host.
	Download(t *Tensor) ([]float32, error)
	Free(t *Tensor)
	// UploadBatch makes the per-step index arrays available to kernels.
	UploadBatch(b *Batch) (BatchMeta, error)

	// DownloadI32 copies an I32 tensor to the host.
	DownloadI32(t *Tensor) ([]int32, error)

	// Embed: out[t] = table[ids[t]]; ids is I32 [T]; an id < 0 gives a zero row.
	Embed(out, table, ids *Tensor) error
	// RMSNorm: out = w * x / sqrt(mean(x²) + eps), per row.
	RMSNorm(out, x, w *Tensor, eps float32) error
	// AddRMSNorm: resid += x; out = RMSNorm(resid, w). Fuses the residual add.
	AddRMSNorm(resid, x, out, w *Tensor, eps float32) error
	// Linear: out[T,N] = x[T,K] · w[N,K]ᵀ (+ bias[N]). w may be F32, BF16 or scaled F8E4M3.
	Linear(out, x, w, bias *Tensor) error
	// QKNormRopeKV: per-head RMSNorm of q and k (when qNorm/kNorm are non-nil),
	// rotary embedding at the batch positions, and the k/v write into the cache.
	QKNormRopeKV(q, k, v, qNorm, kNorm *Tensor, eps float32, rope RopeParams, kvHeads int, cache *KVCache, meta BatchMeta) error
	// Attention: causal attention of each token over its sequence's cache (positions ≤ its own).
	Attention(out, q *Tensor, cache *KVCache, p AttentionParams, meta BatchMeta) error
	// SiluMul: out = silu(gate) * up.
	SiluMul(out, gate, up *Tensor) error
	// Add: out = a + b.
	Add(out, a, b *Tensor) error
	// Concat: out[t] = a[t] ++ b[t].
	Concat(out, a, b *Tensor) error
	// Route: from router logits [T,E] (x·W_gateᵀ, F32) and the correction bias [E], choose
	// TopK experts per token: ids I32 [T,TopK] and weights F32 [T,TopK].
	Route(ids, weights, logits, bias *Tensor, p RouterParams) error
	// MoE: out[t] = Σ_j weights[t,j] · expert_{ids[t,j]}(x[t]) over experts present on this backend;
	// experts absent (nil) contribute nothing (another device adds them).
	MoE(out, x, ids, weights *Tensor, experts []*Expert) error
	// Sample picks one token per row of logits [T,V].
	Sample(logits *Tensor, params []SampleParams) ([]int32, error)
}
