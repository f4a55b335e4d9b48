package parallel

import (
	"fmt"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/parallel/pipeline"
)

// With RingOptions.MicroBatches = M > 1 the head's scheduler keeps up to M
// micro-batches in the ring: it splits the running sequences into groups,
// and while one group's rows are downstream it runs another's embedding
// and first layers, or the lm_head and sampling of one that came back. A
// sequence is in one micro-batch at a time (its next token depends on the
// last), which pipeline.Schedule enforces and tracks; each stage runs the
// steps in the order they were sent, so a block released at the head is
// rewritten only after every step already sent has used it. Each
// sequence's steps and random draws are those of the synchronous loop, so
// its tokens are too.

// headPipe is the scheduler's side of the micro-batches in flight.
type headPipe struct {
	depth  int
	sched  *pipeline.Schedule
	flight []*pipeBatch // oldest first
	ids    map[*request]pipeline.SeqID
	nextID pipeline.SeqID
	peak   int // most micro-batches in flight at once
}

// pipeBatch is one micro-batch in the ring.
type pipeBatch struct {
	step   pipeline.Step
	order  []*request
	inputs []StepInput
	T      int
	front  time.Duration // the head's compute sending it (frontStep)
}

func newHeadPipe(depth int) (*headPipe, error) {
	s, err := pipeline.New(pipeline.Config{Stages: depth, MaxInFlight: depth})
	if err != nil {
		return nil, err
	}
	return &headPipe{depth: depth, sched: s, ids: map[*request]pipeline.SeqID{}}, nil
}

func (p *headPipe) id(r *request) pipeline.SeqID {
	id, ok := p.ids[r]
	if !ok {
		p.nextID++
		id = p.nextID
		p.ids[r] = id
	}
	return id
}

// pipeStep advances the pipeline by one action: send a new micro-batch
// while there is room and work, else finish the oldest one in flight.
func (s *Scheduler) pipeStep(r *Ring) error {
	p := r.pipe
	err := s.pipeAdvance(r, p)
	if err != nil {
		p.flight = nil // the ring is broken: nothing comes back
		p.ids = map[*request]pipeline.SeqID{}
		p.sched, _ = pipeline.New(pipeline.Config{Stages: p.depth, MaxInFlight: p.depth})
	}
	return err
}

func (s *Scheduler) pipeAdvance(r *Ring, p *headPipe) error {
	if p.sched.CanDispatch() {
		if mb := s.formMicroBatch(p); mb != nil {
			return s.submitMicroBatch(r, p, mb)
		}
	}
	if len(p.flight) > 0 {
		return s.completeMicroBatch(r, p)
	}
	return nil
}

// formMicroBatch takes up to 1/depth of the running sequences that are
// not in flight: decode tokens first, then prompt chunks within the
// prefill budget (as Scheduler.step does for the whole batch).
func (s *Scheduler) formMicroBatch(p *headPipe) *pipeBatch {
	limit := (len(s.running) + p.depth - 1) / p.depth
	var pick []*request
	for _, r := range s.running {
		if _, busy := p.sched.Where(p.id(r)); busy || r.cancelled.Load() {
			continue
		}
		if len(pick) == limit {
			break
		}
		pick = append(pick, r)
	}
	budget := s.opt.PrefillTokens
	for _, r := range pick {
		if r.prefilled >= len(r.req.PromptIDs) {
			budget--
		}
	}
	mb := &pipeBatch{}
	for _, r := range pick {
		r.chunk = 0
		toks := []int32{r.last}
		if n := len(r.req.PromptIDs); r.prefilled < n {
			if budget <= 0 {
				continue
			}
			r.chunk = min(budget, n-r.prefilled)
			budget -= r.chunk
			toks = toI32(r.req.PromptIDs[r.prefilled : r.prefilled+r.chunk])
		}
		mb.inputs = append(mb.inputs, StepInput{Seq: &r.seq, Tokens: toks})
		mb.order = append(mb.order, r)
		mb.T += len(toks)
	}
	if len(mb.order) == 0 {
		return nil
	}
	return mb
}

func (s *Scheduler) submitMicroBatch(r *Ring, p *headPipe, mb *pipeBatch) error {
	ids := make([]pipeline.SeqID, len(mb.order))
	for i, q := range mb.order {
		ids[i] = p.id(q)
	}
	if err := p.sched.Step(pipeline.Event{Type: pipeline.Dispatch, Seqs: ids}); err != nil {
		return err
	}
	ready := p.sched.Ready()
	p.sched.Advance()
	mb.step = ready.Dispatch[0].Step
	// The header names the micro-batch: a slot that no other micro-batch in
	// flight holds (at most depth are, and steps are dispatched in order).
	r.microBatch = uint32(uint64(mb.step) % uint64(p.depth))
	start := time.Now()
	if err := s.eng.frontStep(r, mb.inputs); err != nil {
		return err
	}
	mb.front = time.Since(start)
	p.flight = append(p.flight, mb)
	p.peak = max(p.peak, len(p.flight))
	return nil
}

// retire tells the schedule that mb's rows are back (the last stage is
// done with it) and checks that it was the oldest in flight.
func (p *headPipe) retire(mb *pipeBatch) error {
	if err := p.sched.Step(pipeline.Event{Type: pipeline.StageDone, Step: mb.step, Stage: p.depth - 1}); err != nil {
		return err
	}
	ready := p.sched.Ready()
	p.sched.Advance()
	if len(ready.Complete) != 1 || ready.Complete[0].Step != mb.step {
		return fmt.Errorf("pipeline: step %d came back out of order (%+v)", mb.step, ready.Complete)
	}
	return nil
}

// completeMicroBatch receives the oldest micro-batch's rows, runs the
// head, samples and updates its sequences as Scheduler.step does.
func (s *Scheduler) completeMicroBatch(r *Ring, p *headPipe) (err error) {
	mb := p.flight[0]
	p.flight = p.flight[1:]
	start := time.Now()
	res, err := s.eng.backStep(r, mb.inputs, mb.T)
	if err != nil {
		return err
	}
	defer res.Release()
	// The head's compute of the micro-batch: its front half, and this
	// half less the wait for the rows (Ring.StepStats).
	defer func() {
		if err == nil {
			r.head.step(mb.T, mb.front+time.Since(start)-r.lastWait)
		}
	}()
	if err := p.retire(mb); err != nil {
		return err
	}
	params := make([]kernels.SampleParams, len(mb.order))
	for i, q := range mb.order {
		sp := q.req.Sampling
		params[i] = kernels.SampleParams{Temperature: sp.Temperature, TopP: sp.TopP, TopK: sp.TopK}
		if q.chunk > 0 && q.prefilled+q.chunk < len(q.req.PromptIDs) {
			continue // mid-prompt: not sampled, no random draw (as Scheduler.step)
		}
		params[i].U = q.rng.Float32()
		if q.generated < q.req.MinNewTokens && !q.req.IgnoreEOS {
			params[i].Ban = append(append([]int32(nil), s.eos...), toI32(q.req.StopTokenIDs)...)
		}
	}
	toks, err := s.eng.BE.Sample(res.Logits, params)
	if err != nil {
		return err
	}
	ended := map[*request]bool{}
	for i, q := range mb.order {
		if q.cancelled.Load() {
			delete(p.ids, q) // reap frees it and ends it
			continue
		}
		if q.chunk > 0 {
			q.prefilled += q.chunk
			if q.prefilled < len(q.req.PromptIDs) {
				continue
			}
		}
		if s.accept(q, toks[i]) {
			ended[q] = true
			delete(p.ids, q)
		}
	}
	if len(ended) > 0 {
		kept := s.running[:0]
		for _, q := range s.running {
			if !ended[q] {
				kept = append(kept, q)
			}
		}
		s.running = kept
		s.Running.Store(int64(len(kept)))
	}
	return nil
}

// frontStep runs a micro-batch's embedding and the head's layers and sends
// the rows round the ring (the head half of Step before the other stages).
// Like Step it runs in the step workspace, which is free again once the
// rows are sent (they wait on the host while the micro-batch is away).
func (e *Engine) frontStep(r *Ring, inputs []StepInput) error {
	if err := e.checkStepTokens(inputs); err != nil {
		return err
	}
	b, ids, err := e.batch(inputs, false)
	if err != nil {
		return err
	}
	meta, err := e.BE.UploadBatch(b)
	if err != nil {
		return err
	}
	be, ws := e.stepBackend(len(inputs))
	f := e.newForward(be, meta, len(ids))
	defer f.Release()
	h, err := f.Embed(e.W.Embed, ids)
	if err != nil {
		return err
	}
	if err := e.runLayers(f, ws, h); err != nil {
		return err
	}
	if err := r.sendChecked(inputs, h); err != nil {
		return err
	}
	for _, in := range inputs {
		in.Seq.Len += len(in.Tokens)
	}
	return nil
}

// backStep receives the oldest micro-batch's final rows and applies the
// final norm and lm_head to each input's last row (Step's head half).
func (e *Engine) backStep(r *Ring, inputs []StepInput, T int) (*StepResult, error) {
	rows := e.outputRows(inputs, false)
	be, ws := e.stepBackend(len(rows))
	f := e.newForward(be, nil, T)
	h, err := be.NewTensor(kernels.F32, T, e.Cfg.HiddenSize)
	if err != nil {
		return nil, err
	}
	release := func() { f.Release(); be.Free(h) }
	if ws != nil {
		ws.setMark()
	}
	if err := r.recvChecked(h); err != nil {
		release()
		return nil, err
	}
	sel := h
	if len(rows) != T {
		if sel, err = f.Gather(h, rows); err != nil {
			release()
			return nil, err
		}
	}
	normed, logits, err := f.Head(sel, e.W.FinalNorm, e.W.LMHead)
	if err != nil {
		release()
		return nil, err
	}
	return &StepResult{Logits: logits, Normed: normed, Rows: rows, release: release}, nil
}

// checkStepTokens refuses a step larger than the step workspace, as Step.
func (e *Engine) checkStepTokens(inputs []StepInput) error {
	tokens := 0
	for _, in := range inputs {
		tokens += len(in.Tokens)
	}
	if e.ws != nil && tokens > e.ws.maxTokens {
		return fmt.Errorf("%w: a step of %d tokens is larger than --max-num-batched-tokens %d (the step workspace)",
			ErrInvalidRequest, tokens, e.ws.maxTokens)
	}
	return nil
}

// runLayers runs the embedded h through this engine's layers over its KV
// cache. With a workspace, it marks the space after h and resets to that
// mark at each layer boundary, so every layer's temporaries reuse it.
func (e *Engine) runLayers(f *model.Forward, ws *workspace, h *kernels.Tensor) error {
	if ws != nil {
		ws.setMark()
	}
	for i, lw := range e.W.Layers {
		if ws != nil {
			ws.reset()
		}
		if err := f.Layer(lw, h, e.KV.Layers[i]); err != nil {
			return err
		}
	}
	return e.runRanks(h) // the rank group's layers, if any (ranks.go)
}

// stepBackend is the backend a step half allocates from: the step
// workspace (begun) when there is one and it holds rows output rows, else
// the backend itself.
func (e *Engine) stepBackend(rows int) (kernels.Backend, *workspace) {
	ws := e.ws
	if ws == nil || rows > ws.maxRows {
		return e.BE, nil
	}
	ws.begin()
	return arenaBackend{e.BE, ws}, ws
}
