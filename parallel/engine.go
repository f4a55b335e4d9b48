package parallel

import (
	"fmt"
	"log/slog"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
)

// Engine runs a whole GLM-4.5 model (one stage holding every layer, the
// embeddings, lm_head and the MTP layer) on one backend. It is not safe for
// concurrent use: the Scheduler owns it.
type Engine struct {
	Cfg *model.Config
	BE  kernels.Backend
	W   *model.Weights
	KV  *KVPool
	// OnLayer, when set, sees the residual stream after the embedding (layer -1)
	// and after each main layer (tests compare it with goldens).
	OnLayer func(layer int, h *kernels.Tensor)

	graphs *decodeGraphs // nil when every step runs eagerly
}

// EngineOptions size the KV cache and choose how decode steps run.
type EngineOptions struct {
	BlockSize int // tokens per KV block (default 16)
	NumBlocks int // blocks in the pool (default: enough for MaxTokens)
	MaxTokens int // used when NumBlocks is 0 (default 8192)
	// KVDType is the cache's element type (default F32, what the CPU backend
	// supports; GPU backends take BF16).
	KVDType kernels.DType
	// EnforceEager runs every step kernel by kernel, like vLLM's
	// --enforce-eager. Otherwise pure decode steps (one token per sequence)
	// replay captured graphs when the backend can capture them (it
	// implements kernels.GraphCapturer, BatchUpdater and GraphBatcher); see
	// graphs.go.
	EnforceEager bool
	// GraphMaxSeqs is the widest decode batch replayed from a graph (default
	// 64); wider ones run eagerly.
	GraphMaxSeqs int
	// GraphMinContext is the smallest context bucket of the graphs (default
	// 256 tokens); the buckets double up to the KV pool's capacity.
	GraphMinContext int
	Logger          *slog.Logger // nil: slog.Default()
}

// NewEngine wraps loaded weights; w must hold the whole model.
func NewEngine(be kernels.Backend, w *model.Weights, opt EngineOptions) (*Engine, error) {
	c := w.Config
	s := w.Selection
	if s.FirstLayer != 0 || s.EndLayer != c.NumHiddenLayers || !s.Embedding || !s.LMHead {
		return nil, fmt.Errorf("engine: weights hold layers [%d,%d) of %d (embedding %v, lm_head %v); the single-process engine needs the whole model",
			s.FirstLayer, s.EndLayer, c.NumHiddenLayers, s.Embedding, s.LMHead)
	}
	if opt.BlockSize <= 0 {
		opt.BlockSize = 16
	}
	if opt.MaxTokens <= 0 {
		opt.MaxTokens = 8192
	}
	if opt.NumBlocks <= 0 {
		opt.NumBlocks = (opt.MaxTokens + opt.BlockSize - 1) / opt.BlockSize
	}
	if opt.GraphMaxSeqs <= 0 {
		opt.GraphMaxSeqs = 64
	}
	if opt.GraphMinContext <= 0 {
		opt.GraphMinContext = 256
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	layers := c.NumHiddenLayers
	if w.MTP != nil {
		layers++
	}
	gb, graphs := be.(graphBackend)
	graphs = graphs && !opt.EnforceEager
	blocks := opt.NumBlocks
	if graphs {
		blocks++ // the padding rows' scratch block
	}
	kv, err := NewKVPool(be, opt.KVDType, layers, blocks, opt.BlockSize, c.NumKeyValueHeads, c.HeadDim)
	if err != nil {
		return nil, err
	}
	e := &Engine{Cfg: c, BE: be, W: w, KV: kv}
	if graphs {
		scratch := kv.takeScratch()
		if e.graphs, err = newDecodeGraphs(gb, opt.Logger, opt.GraphMaxSeqs, opt.GraphMinContext, kv.NumBlocks*kv.BlockSize, kv.BlockSize, scratch); err != nil {
			kv.Close()
			return nil, fmt.Errorf("engine: %w", err)
		}
		opt.Logger.Info("decode steps replay graphs", "backend", be.Name(), "seq_buckets", e.graphs.seqBuckets,
			"ctx_buckets", e.graphs.ctxBuckets)
	}
	return e, nil
}

// Close frees the decode graphs and the KV cache (the weights belong to the
// caller). Results of graph steps are invalid after it.
func (e *Engine) Close() {
	if e.graphs != nil {
		e.graphs.close()
		e.graphs = nil
	}
	e.KV.Close()
}

// StepInput appends Tokens to Seq (a prefill chunk, or one decode token).
type StepInput struct {
	Seq    *Seq
	Tokens []int32
}

// StepResult holds a step's outputs on the backend until Release, or until
// the next Step, whichever comes first: a step replayed from a graph returns
// the graph's outputs, which its next replay overwrites (Sample or Download
// them before the next Step).
type StepResult struct {
	Logits *kernels.Tensor // [rows, vocab]
	Normed *kernels.Tensor // [rows, hidden]: final-normed hidden states (the MTP layer's input)
	// Rows[i] is the batch token index of output row i.
	Rows    []int
	release func() // nil when the tensors belong to a graph
}

// Release frees the step's tensors (a no-op for a graph's outputs).
func (r *StepResult) Release() {
	if r.release != nil {
		r.release()
		r.release = nil
	}
}

// batch builds the step's token layout and grows the sequences' caches.
func (e *Engine) batch(inputs []StepInput, mtp bool) (*kernels.Batch, []int32, error) {
	b := &kernels.Batch{}
	var ids []int32
	for i, in := range inputs {
		if len(in.Tokens) == 0 {
			return nil, nil, fmt.Errorf("%w: empty step input", ErrInvalidRequest)
		}
		s := in.Seq
		start := s.Len
		if mtp {
			start = s.MTPLen
		}
		if err := e.KV.Reserve(s, start+len(in.Tokens)); err != nil {
			return nil, nil, err
		}
		for j, tok := range in.Tokens {
			if tok >= int32(e.Cfg.VocabSize) || (tok < 0 && !mtp) {
				return nil, nil, fmt.Errorf("%w: token id %d outside vocabulary %d", ErrInvalidRequest, tok, e.Cfg.VocabSize)
			}
			pos := start + j
			b.Positions = append(b.Positions, int32(pos))
			b.SeqIndex = append(b.SeqIndex, int32(i))
			b.Slots = append(b.Slots, e.KV.slot(s, pos))
			ids = append(ids, tok)
		}
		b.BlockTables = append(b.BlockTables, s.Blocks)
		b.ContextLens = append(b.ContextLens, int32(start+len(in.Tokens)))
	}
	if err := b.Validate(e.KV.BlockSize); err != nil {
		return nil, nil, err
	}
	return b, ids, nil
}

// Step runs the model on the inputs and returns logits and normed hidden
// states of each input's last token, or of every token when allRows.
func (e *Engine) Step(inputs []StepInput, allRows bool) (*StepResult, error) {
	if e.graphs != nil && e.graphs.failed {
		e.graphs.close() // the last step's result came from the warm-up; it is past its life now
		e.graphs = nil
	}
	if e.graphs != nil && !allRows && e.OnLayer == nil {
		if res, ok, err := e.graphs.step(e, inputs); ok {
			return res, err
		}
	}
	b, ids, err := e.batch(inputs, false)
	if err != nil {
		return nil, err
	}
	meta, err := e.BE.UploadBatch(b)
	if err != nil {
		return nil, err
	}
	f := &model.Forward{Cfg: e.Cfg, BE: e.BE, Meta: meta, T: len(ids)}
	res := &StepResult{release: f.Release}
	fail := func(err error) (*StepResult, error) {
		f.Release()
		return nil, err
	}
	h, err := f.Embed(e.W.Embed, ids)
	if err != nil {
		return fail(err)
	}
	if e.OnLayer != nil {
		e.OnLayer(-1, h)
	}
	for i, lw := range e.W.Layers {
		if err := f.Layer(lw, h, e.KV.Layers[i]); err != nil {
			return fail(err)
		}
		if e.OnLayer != nil {
			e.OnLayer(lw.Index, h)
		}
	}
	rows := e.outputRows(inputs, allRows)
	res.Rows = rows
	sel := h
	if len(rows) != len(ids) {
		if sel, err = f.Gather(h, rows); err != nil {
			return fail(err)
		}
	}
	if res.Normed, res.Logits, err = f.Head(sel, e.W.FinalNorm, e.W.LMHead); err != nil {
		return fail(err)
	}
	for _, in := range inputs {
		in.Seq.Len += len(in.Tokens)
	}
	return res, nil
}

func (e *Engine) outputRows(inputs []StepInput, all bool) []int {
	var rows []int
	t := 0
	for _, in := range inputs {
		if all {
			for j := range in.Tokens {
				rows = append(rows, t+j)
			}
		} else {
			rows = append(rows, t+len(in.Tokens)-1)
		}
		t += len(in.Tokens)
	}
	return rows
}

// MTPStep runs the MTP layer: inputs carry, per sequence, the tokens that
// follow the positions whose normed hidden states are the rows of hPrev
// (one row per token, in order). The token at position 0 is masked (its
// embedding is zero), as vLLM and SGLang do. It returns logits for every row.
func (e *Engine) MTPStep(inputs []StepInput, hPrev *kernels.Tensor) (*StepResult, error) {
	if e.W.MTP == nil {
		return nil, fmt.Errorf("engine: the model was loaded without its MTP layer")
	}
	b, ids, err := e.batch(inputs, true)
	if err != nil {
		return nil, err
	}
	if hPrev.Rows() != len(ids) {
		return nil, fmt.Errorf("engine: mtp step has %d tokens and %d hidden rows", len(ids), hPrev.Rows())
	}
	for i, p := range b.Positions {
		if p == 0 {
			ids[i] = -1
		}
	}
	meta, err := e.BE.UploadBatch(b)
	if err != nil {
		return nil, err
	}
	f := &model.Forward{Cfg: e.Cfg, BE: e.BE, Meta: meta, T: len(ids)}
	logits, err := f.MTP(e.W.MTP, hPrev, ids, e.KV.Layers[len(e.KV.Layers)-1])
	if err != nil {
		f.Release()
		return nil, err
	}
	for _, in := range inputs {
		in.Seq.MTPLen += len(in.Tokens)
	}
	rows := make([]int, len(ids))
	for i := range rows {
		rows[i] = i
	}
	return &StepResult{Logits: logits, Rows: rows, release: f.Release}, nil
}
