package parallel

import (
	"fmt"
	"log/slog"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/topology"
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
	// ws holds eager steps' activations (nil where the backend cannot view
	// tensors: steps then allocate theirs); plan is the memory plan the KV
	// cache was sized by (memplan.go).
	ws          *workspace
	plan        topology.MemoryPlan
	maxModelLen int
	maxNumSeqs  int   // sequences a step's workspace was sized for (0: unbounded)
	warmAllocs  int64 // the backend's driver allocations when warm-up ended
	limited     bool  // the engine capped the backend's allocator (warmUp)

	// remote runs the layers after this engine's own when it is a pipeline's
	// head stage (stage_head.go); remoteIn are the current step's inputs.
	remote   RemoteLayers
	remoteIn []StepInput
	warming  bool // NewEngine's profile and warm-up steps are running
	ranksKV  bool // the rank group's KV caches exist (ranks.go: runRanks)

	// ranks, when set, runs the decoder layers on several ranks (ranks.go);
	// stepBatch is the current step's batch it needs, kvDType the cache's.
	ranks     RankGroup
	stepBatch *kernels.Batch
	kvDType   kernels.DType
	// comm, when set, is the one-rank communicator every Forward of this
	// engine's own layers calls (comm.go).
	comm *model.RankComm
}

// EngineOptions size the KV cache and choose how decode steps run.
//
// The KV cache is sized, in order of precedence, by NumGPUBlocksOverride,
// NumBlocks, MaxTokens, KVCacheMemoryBytes, or else from what the GPU has
// left (vLLM's --gpu-memory-utilization semantics, memplan.go): after the
// weights, a worst-case step (MaxNumBatchedTokens tokens over MaxNumSeqs
// sequences) is run and its peak measured; the cache gets utilization ×
// total − weights − that peak − decode graphs − runtime − reserve. A
// backend without device memory (the CPU) gets 8192 tokens.
type EngineOptions struct {
	BlockSize int // tokens per KV block (default 16)
	NumBlocks int // blocks in the pool
	MaxTokens int // tokens in the pool, when NumBlocks is 0
	// MaxNumBatchedTokens and MaxNumSeqs bound a step: the step workspace
	// is sized for them at start (defaults 8192 and 64); Step refuses more
	// tokens. MaxModelLen (default: the model's max positions) bounds the
	// decode graphs' contexts and is the request length of the plan's
	// maximum concurrency.
	MaxNumBatchedTokens int
	MaxNumSeqs          int
	MaxModelLen         int
	// GPUMemoryUtilization is the fraction of the GPU's memory the engine
	// may use (default 0.9); KVCacheMemoryBytes and NumGPUBlocksOverride
	// set the cache's size instead (vLLM's flags of those names).
	GPUMemoryUtilization float64
	KVCacheMemoryBytes   int64
	NumGPUBlocksOverride int
	// MemoryReserve is headroom kept inside the budget beyond what was
	// measured (default topology.DefaultReserve; negative: none).
	MemoryReserve int64
	// KVDType is the cache's element type (default F32, what the CPU backend
	// supports; GPU backends take BF16, or F8E4M3 for --kv-cache-dtype fp8).
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
	// Ranks, with more than one rank, makes Open and OpenHead run the
	// decoder layers on that many ranks of this process (ranks.go).
	Ranks RankOptions
	// Collective, when set, is a one-rank communicator (an NCCL
	// TensorAllReducer of world size 1 on a GPU) that the engine's layers
	// call after o_proj, the dense MLP and each MoE layer, as a rank of a
	// tensor-parallel stage does: the single-GPU engine then runs the
	// multi-rank code path (comm.go).
	Collective kernels.Collective
}

// NewEngine wraps loaded weights; w must hold the whole model.
func NewEngine(be kernels.Backend, w *model.Weights, opt EngineOptions) (*Engine, error) {
	return newEngine(be, w, nil, opt)
}

func newEngine(be kernels.Backend, w *model.Weights, ranks RankGroup, opt EngineOptions) (*Engine, error) {
	c := w.Config
	s := w.Selection
	if ranks != nil {
		_, s.EndLayer = ranks.Layers() // the group holds the layers
	} else if opt.Ranks.Enabled() {
		return nil, fmt.Errorf("engine: EngineOptions.Ranks asks for %d ranks: Open or OpenHead load the ranks' slices (NewEngine runs the layers on its backend)", opt.Ranks.Ranks)
	}
	// A head stage holds layers [0, k) and runs the rest through AttachRemote.
	if s.FirstLayer != 0 || s.EndLayer > c.NumHiddenLayers || s.EndLayer <= 0 || !s.Embedding || !s.LMHead {
		return nil, fmt.Errorf("engine: weights hold layers [%d,%d) of %d (embedding %v, lm_head %v); the engine needs the embedding, lm_head and the first layers",
			s.FirstLayer, s.EndLayer, c.NumHiddenLayers, s.Embedding, s.LMHead)
	}
	comm, err := oneRankComm(opt.Collective, ranks)
	if err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	lenGiven := opt.MaxModelLen > 0
	if err := opt.withDefaults(c); err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	layers := len(w.Layers)
	if w.MTP != nil {
		layers++
	}
	gb, graphs := be.(graphBackend)
	graphs = graphs && !opt.EnforceEager && ranksCapture(ranks) // a graph holds the ranks' layers only with rank 0 on be (ranks_device.go)
	e := &Engine{Cfg: c, BE: be, W: w, maxModelLen: opt.MaxModelLen, ranks: ranks, kvDType: opt.KVDType, comm: comm}
	planLayers := layers
	if ranks != nil {
		planLayers += s.EndLayer // the KV cache per block counts every layer's, wherever it lives
	}
	plan, err := e.planMemory(opt, planLayers, graphs, lenGiven)
	if err != nil {
		e.ws.free(be)
		return nil, fmt.Errorf("engine: %w", err)
	}
	blocks := plan.KVBlocks
	if graphs {
		blocks++ // the padding rows' scratch block
	}
	kv, err := NewKVPool(be, opt.KVDType, layers, blocks, opt.BlockSize, c.NumKeyValueHeads, c.HeadDim)
	if err != nil {
		e.ws.free(be)
		return nil, fmt.Errorf("engine: %s of KV cache (%d blocks, sized by %s): %w; lower --gpu-memory-utilization, "+
			"or set --kv-cache-memory-bytes", gibString(plan.KVBytes), plan.KVBlocks, plan.Source, err)
	}
	e.KV = kv
	if ranks != nil {
		if err := ranks.AllocKV(opt.KVDType, blocks, opt.BlockSize); err != nil {
			e.Close()
			return nil, fmt.Errorf("engine: ranks' KV cache (%d blocks): %w", blocks, err)
		}
		e.ranksKV = true
	}
	e.maxModelLen = plan.MaxModelLen
	if e.ws != nil {
		e.maxNumSeqs = opt.MaxNumSeqs
	}
	opt.MaxModelLen = plan.MaxModelLen
	if graphs {
		scratch := kv.takeScratch()
		ctx := min(kv.NumBlocks*kv.BlockSize, opt.MaxModelLen)
		if e.graphs, err = newDecodeGraphs(gb, opt.Logger, opt.GraphMaxSeqs, opt.GraphMinContext, ctx, kv.BlockSize, scratch); err != nil {
			e.Close()
			return nil, fmt.Errorf("engine: %w", err)
		}
		opt.Logger.Info("decode steps replay graphs", "backend", be.Name(), "seq_buckets", e.graphs.seqBuckets,
			"ctx_buckets", e.graphs.ctxBuckets)
	}
	e.plan = plan
	e.warming = true // a pipeline head warms up over its own layers, before any stage is attached
	err = e.warmUp(opt)
	e.warming = false
	if err != nil {
		e.Close()
		return nil, fmt.Errorf("engine: warm-up step: %w", err)
	}
	e.logPlan(opt.Logger)
	return e, nil
}

func (opt *EngineOptions) withDefaults(c *model.Config) error {
	if opt.BlockSize <= 0 {
		opt.BlockSize = 16
	}
	if opt.MaxNumSeqs <= 0 {
		opt.MaxNumSeqs = 64
	}
	if opt.MaxNumBatchedTokens <= 0 {
		opt.MaxNumBatchedTokens = max(8192, opt.MaxNumSeqs)
	}
	if opt.MaxModelLen <= 0 {
		opt.MaxModelLen = c.MaxPositionEmbeddings
	}
	if opt.GPUMemoryUtilization == 0 {
		opt.GPUMemoryUtilization = 0.9
	}
	switch {
	case opt.MemoryReserve == 0:
		opt.MemoryReserve = topology.DefaultReserve
	case opt.MemoryReserve < 0:
		opt.MemoryReserve = 0
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
	switch {
	case opt.MaxNumBatchedTokens < opt.MaxNumSeqs:
		return fmt.Errorf("--max-num-batched-tokens %d is smaller than --max-num-seqs %d: a step must hold one token of every running sequence; raise it to at least %d",
			opt.MaxNumBatchedTokens, opt.MaxNumSeqs, opt.MaxNumSeqs)
	case opt.GPUMemoryUtilization < 0 || opt.GPUMemoryUtilization > 1:
		return fmt.Errorf("--gpu-memory-utilization %g is outside (0, 1]", opt.GPUMemoryUtilization)
	case opt.KVCacheMemoryBytes < 0 || opt.NumGPUBlocksOverride < 0:
		return fmt.Errorf("--kv-cache-memory-bytes %d and --num-gpu-blocks-override %d must not be negative", opt.KVCacheMemoryBytes, opt.NumGPUBlocksOverride)
	}
	return nil
}

// Close frees the decode graphs and the KV cache (the weights belong to the
// caller). Results of graph steps are invalid after it.
func (e *Engine) Close() {
	if e.graphs != nil {
		e.graphs.close()
		e.graphs = nil
	}
	if e.KV != nil {
		e.KV.Close()
	}
	e.ws.free(e.BE)
	e.ws = nil
	if mm, ok := e.BE.(kernels.MemoryManager); ok && e.limited {
		mm.SetMemoryLimit(0) // the limit was this engine's plan
		if sr, ok := e.BE.(kernels.ScratchReserver); ok {
			_ = sr.ReserveScratch(0) // the plan's scratch goes with it
		}
	}
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
	if !mtp {
		e.stepBatch = b // for the rank group, if any (runRanks)
	}
	return b, ids, nil
}

// Step runs the model on the inputs and returns logits and normed hidden
// states of each input's last token, or of every token when allRows.
func (e *Engine) Step(inputs []StepInput, allRows bool) (*StepResult, error) {
	if e.graphs != nil && e.graphs.failed {
		e.graphs.close() // the last step's result came from the warm-up; it is past its life now
		e.graphs = nil
		if dr, ok := e.ranks.(*deviceRanks); ok {
			dr.closeGraphs() // the peers' graphs go with the engine's
		}
	}
	if err := e.checkLayers(inputs); err != nil { // stage_head.go
		return nil, err
	}
	if e.graphs != nil && !allRows && e.OnLayer == nil && e.remote == nil {
		if res, ok, err := e.graphs.step(e, inputs); ok {
			return res, err
		}
	}
	tokens := 0
	for _, in := range inputs {
		tokens += len(in.Tokens)
	}
	ws := e.ws
	if ws != nil && tokens > ws.maxTokens {
		return nil, fmt.Errorf("%w: a step of %d tokens is larger than --max-num-batched-tokens %d (the step workspace)",
			ErrInvalidRequest, tokens, ws.maxTokens)
	}
	rows := e.outputRows(inputs, allRows)
	if ws != nil && len(rows) > ws.maxRows {
		ws = nil // more output rows than the workspace's head holds (an all-rows step): this one allocates
	}
	b, ids, err := e.batch(inputs, false)
	if err != nil {
		return nil, err
	}
	meta, err := e.BE.UploadBatch(b)
	if err != nil {
		return nil, err
	}
	be := e.BE
	if ws != nil {
		ws.begin()
		be = arenaBackend{e.BE, ws}
	}
	f := e.newForward(be, meta, len(ids))
	res := &StepResult{release: f.Release, Rows: rows}
	e.remoteIn = inputs
	if res.Normed, res.Logits, err = e.forward(f, ws, ids, rows, e.KV.Layers); err != nil {
		f.Release()
		return nil, err
	}
	for _, in := range inputs {
		in.Seq.Len += len(in.Tokens)
	}
	return res, nil
}

// forward runs the model over ids and returns the head's outputs of rows.
// With a workspace, every layer's temporaries reuse the space after the
// residual stream (ws.reset at each layer boundary).
func (e *Engine) forward(f *model.Forward, ws *workspace, ids []int32, rows []int, caches []*kernels.KVCache) (normed, logits *kernels.Tensor, err error) {
	h, err := f.Embed(e.W.Embed, ids)
	if err != nil {
		return nil, nil, err
	}
	if ws != nil {
		ws.setMark()
	}
	if e.OnLayer != nil {
		e.OnLayer(-1, h)
	}
	for i, lw := range e.W.Layers {
		if ws != nil {
			ws.reset()
		}
		var cache *kernels.KVCache
		if caches != nil {
			cache = caches[i]
		}
		if err := f.Layer(lw, h, cache); err != nil {
			return nil, nil, err
		}
		if e.OnLayer != nil {
			e.OnLayer(lw.Index, h)
		}
	}
	if caches != nil { // the rank group's layers, if any (ranks.go)
		if err := e.runRanks(h); err != nil {
			return nil, nil, err
		}
	}
	if caches != nil { // the pipeline's other stages, if any (stage_head.go)
		if err := e.runRemote(e.remoteIn, h); err != nil {
			return nil, nil, err
		}
	}
	if ws != nil {
		ws.reset()
	}
	sel := h
	if len(rows) != len(ids) {
		if sel, err = f.Gather(h, rows); err != nil {
			return nil, nil, err
		}
	}
	return f.Head(sel, e.W.FinalNorm, e.W.LMHead)
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

// mtpInput lays out inputs for the MTP layer over hPrev's rows (one per
// token): a forward over the batch on the device and the token ids, the one
// at position 0 masked (-1: a zero embedding), as vLLM and SGLang do.
func (e *Engine) mtpInput(inputs []StepInput, hPrev *kernels.Tensor) (*model.Forward, []int32, error) {
	b, ids, err := e.batch(inputs, true)
	if err != nil {
		return nil, nil, err
	}
	if hPrev.Rows() != len(ids) {
		return nil, nil, fmt.Errorf("engine: mtp step has %d tokens and %d hidden rows", len(ids), hPrev.Rows())
	}
	for i, p := range b.Positions {
		if p == 0 {
			ids[i] = -1
		}
	}
	meta, err := e.BE.UploadBatch(b)
	if err != nil {
		return nil, nil, err
	}
	return e.newForward(e.BE, meta, len(ids)), ids, nil
}

// MTPStep runs the MTP layer: inputs carry, per sequence, the tokens that
// follow the positions whose normed hidden states are the rows of hPrev
// (one row per token, in order). The token at position 0 is masked (its
// embedding is zero), as vLLM and SGLang do. It returns logits for every row.
func (e *Engine) MTPStep(inputs []StepInput, hPrev *kernels.Tensor) (*StepResult, error) {
	if e.W.MTP == nil {
		return nil, fmt.Errorf("engine: the model was loaded without its MTP layer")
	}
	f, ids, err := e.mtpInput(inputs, hPrev)
	if err != nil {
		return nil, err
	}
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
