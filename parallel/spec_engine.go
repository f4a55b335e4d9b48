package parallel

import (
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
)

// The engine's forwards for speculative steps. A verify step whose every
// input is one token (each draft row a view of its sequence, see
// spec_step.go) runs through Engine.Step and so replays decode graphs on the
// GPU; steps with prompt chunks run specForward, which keeps the normed
// hidden state of every row (the MTP layer needs the prompt's) but runs
// lm_head only on the rows that are sampled.

// releaser collects what a speculative step allocates outside a Forward.
type releaser struct {
	be    kernels.Backend
	fns   []func()
	temps []*kernels.Tensor
}

func (r *releaser) add(f func()) {
	if f != nil {
		r.fns = append(r.fns, f)
	}
}

func (r *releaser) tensor(dt kernels.DType, shape ...int) (*kernels.Tensor, error) {
	t, err := r.be.NewTensor(dt, shape...)
	if err != nil {
		return nil, err
	}
	r.temps = append(r.temps, t)
	return t, nil
}

func (r *releaser) release() {
	for i := len(r.fns) - 1; i >= 0; i-- {
		r.fns[i]()
	}
	for _, t := range r.temps {
		r.be.Free(t)
	}
	r.fns, r.temps = nil, nil
}

// gatherRows copies rows of src [R, W] into a new [len(rows), W] tensor
// (src itself when rows is 0..R-1).
func (e *Engine) gatherRows(rel *releaser, src *kernels.Tensor, rows []int) (*kernels.Tensor, error) {
	identity := len(rows) == src.Rows()
	for i, r := range rows {
		identity = identity && r == i
	}
	if identity {
		return src, nil
	}
	ids := make([]int32, len(rows))
	for i, r := range rows {
		ids[i] = int32(r)
	}
	idx, err := rel.tensor(kernels.I32, len(ids))
	if err != nil {
		return nil, err
	}
	out, err := rel.tensor(kernels.F32, len(rows), src.Cols())
	if err != nil {
		return nil, err
	}
	if err := e.BE.Upload(idx, i32Bytes(ids)); err != nil {
		return nil, fmt.Errorf("gather rows: %w", err)
	}
	if err := e.BE.Embed(out, src, idx); err != nil { // a row gather is an embedding lookup
		return nil, fmt.Errorf("gather rows: %w", err)
	}
	return out, nil
}

// specForward runs the main model over inputs and returns the normed hidden
// state of every row and the logits of logitRows. Sequences' Len advance as
// in Step.
func (e *Engine) specForward(rel *releaser, inputs []StepInput, logitRows []int) (normed, logits *kernels.Tensor, err error) {
	tokens := 0
	for _, in := range inputs {
		tokens += len(in.Tokens)
	}
	if n := e.MaxStepTokens(); n > 0 && tokens > n {
		return nil, nil, fmt.Errorf("%w: a step of %d tokens is larger than --max-num-batched-tokens %d (the step workspace)",
			ErrInvalidRequest, tokens, n)
	}
	b, ids, err := e.batch(inputs, false)
	if err != nil {
		return nil, nil, err
	}
	meta, err := e.BE.UploadBatch(b)
	if err != nil {
		return nil, nil, err
	}
	// The layers run in the step workspace as Step's do (every layer's
	// temporaries reuse one layer's space); the normed rows and logits are
	// allocated, since they live on through the MTP layer's passes.
	var be kernels.Backend = e.BE
	ws := e.ws
	if ws != nil {
		ws.begin()
		be = arenaBackend{e.BE, ws}
	}
	f := e.newForward(be, meta, len(ids))
	rel.add(f.Release)
	h, err := f.Embed(e.W.Embed, ids)
	if err != nil {
		return nil, nil, err
	}
	if err := e.runLayers(f, ws, h); err != nil {
		return nil, nil, err
	}
	if err := e.runRemote(inputs, h); err != nil { // the pipeline's other stages, if any (stage_head.go)
		return nil, nil, err
	}
	if normed, logits, err = e.specHead(rel, h, logitRows); err != nil {
		return nil, nil, err
	}
	for _, in := range inputs {
		in.Seq.Len += len(in.Tokens)
	}
	return normed, logits, nil
}

// specHead applies the final norm to every row of the last layer's output h
// and lm_head to logitRows (nil logits for none).
func (e *Engine) specHead(rel *releaser, h *kernels.Tensor, logitRows []int) (normed, logits *kernels.Tensor, err error) {
	if normed, err = rel.tensor(kernels.F32, h.Rows(), e.Cfg.HiddenSize); err != nil {
		return nil, nil, err
	}
	if err := e.BE.RMSNorm(normed, h, e.W.FinalNorm, float32(e.Cfg.RMSNormEps)); err != nil {
		return nil, nil, fmt.Errorf("final norm: %w", err)
	}
	if len(logitRows) == 0 {
		return normed, nil, nil
	}
	sel, err := e.gatherRows(rel, normed, logitRows)
	if err != nil {
		return nil, nil, err
	}
	if logits, err = rel.tensor(kernels.F32, len(logitRows), e.W.LMHead.Shape[0]); err != nil {
		return nil, nil, err
	}
	if err := e.BE.Linear(logits, sel, e.W.LMHead, nil); err != nil {
		return nil, nil, fmt.Errorf("lm_head: %w", err)
	}
	return normed, logits, nil
}

// mtpForward runs the MTP layer over inputs (tokens following the positions
// whose normed hidden states are hPrev's rows; MTPLen advances) and returns,
// for outRows, the layer's output rows (the next recursive draft's hPrev)
// and their logits. The token at position 0 is masked, as in MTPStep.
func (e *Engine) mtpForward(rel *releaser, inputs []StepInput, hPrev *kernels.Tensor, outRows []int) (x, logits *kernels.Tensor, err error) {
	if e.W.MTP == nil {
		return nil, nil, errNoMTP
	}
	f, ids, err := e.mtpInput(inputs, hPrev)
	if err != nil {
		return nil, nil, err
	}
	rel.add(f.Release)
	all, err := f.MTPHidden(e.W.MTP, hPrev, ids, e.KV.Layers[len(e.KV.Layers)-1])
	if err != nil {
		return nil, nil, err
	}
	for _, in := range inputs {
		in.Seq.MTPLen += len(in.Tokens)
	}
	if len(outRows) == 0 {
		return nil, nil, nil
	}
	if x, err = e.gatherRows(rel, all, outRows); err != nil {
		return nil, nil, err
	}
	_, logits, err = f.Head(x, e.W.MTP.HeadNorm, e.W.MTP.Head)
	return x, logits, err
}

// argmaxRows is the argmax of every row of logits (the drafts).
func (e *Engine) argmaxRows(logits *kernels.Tensor) ([]int32, error) {
	return e.BE.Sample(logits, make([]kernels.SampleParams, logits.Rows()))
}
