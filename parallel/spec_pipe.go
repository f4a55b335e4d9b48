package parallel

import (
	"fmt"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/parallel/pipeline"
)

// Speculative decoding with micro-batches in flight.
//
// With RingOptions.MicroBatches = M > 1 and speculation on, the head keeps
// up to M speculative micro-batches in the ring, as stage_sched.go does for
// plain decoding. A micro-batch's step carries, per sequence, a prompt
// chunk or its verify rows: the last token and the drafts, one-token views
// at positions L..L+N from the committed length L, so the header's start
// position is the rollback and the stages infer nothing. When the rows come
// back the head applies the final norm and lm_head, decides acceptance,
// commits the tokens and runs the MTP layer over the accepted positions to
// draft those sequences' next tokens, while the other micro-batches are
// downstream.
//
// A sequence is in at most one micro-batch (pipeline.Schedule), and
// everything its tokens depend on (its drafts, its random draws, its
// caches) is its own, so it gets the tokens of the synchronous speculative
// loop, draw for draw, whenever neither cuts drafts to fit the step budget
// (the cut depends on the batch; a micro-batch, smaller, cuts less).
// A cancelled sequence keeps its blocks until its micro-batch is back
// (Scheduler.reap asks pipeReleasable): the stages still write them.

// specPipeStep is pipeStep with speculation: send a micro-batch while there
// is room and work, else finish the oldest one in flight.
func (s *Scheduler) specPipeStep(r *Ring) error {
	p := r.pipe
	err := s.specPipeAdvance(r, p)
	if err != nil { // the ring is broken: nothing in flight comes back
		p.flight = nil
		p.ids = map[*request]pipeline.SeqID{}
		p.sched, _ = pipeline.New(pipeline.Config{Stages: p.depth, MaxInFlight: p.depth})
		s.spec.flight = nil
	}
	return err
}

func (s *Scheduler) specPipeAdvance(r *Ring, p *headPipe) error {
	if p.sched.CanDispatch() {
		mb, parts, err := s.specFormMicroBatch(p)
		if err != nil {
			return err
		}
		if mb != nil {
			if err := s.submitMicroBatch(r, p, mb); err != nil {
				return err
			}
			s.spec.flight = append(s.spec.flight, parts)
			if s.spec.submitted != nil {
				s.spec.submitted(mb.order)
			}
			return nil
		}
	}
	if len(p.flight) > 0 {
		return s.specCompleteMicroBatch(r, p)
	}
	return nil
}

// specFormMicroBatch takes up to 1/depth of the running sequences that are
// not in flight and lays out their step as specStep does for the whole
// batch (prompt chunks and drafts within the step budget).
func (s *Scheduler) specFormMicroBatch(p *headPipe) (*pipeBatch, []*specPart, error) {
	limit := (len(s.running) + p.depth - 1) / p.depth
	var pick []*request
	for _, r := range s.running {
		if len(pick) == limit {
			break
		}
		if r.cancelled.Load() || p.busy(r) {
			continue
		}
		pick = append(pick, r)
	}
	if len(pick) == 0 {
		return nil, nil, nil
	}
	parts, inputs, _, err := s.specPlan(pick)
	if err != nil || len(parts) == 0 {
		return nil, nil, err
	}
	mb := &pipeBatch{inputs: inputs}
	for _, q := range parts {
		mb.order = append(mb.order, q.r)
		mb.T += q.rows
	}
	return mb, parts, nil
}

// specCompleteMicroBatch receives the oldest micro-batch's rows and runs
// the head's half of a speculative step over its sequences: lm_head,
// acceptance, commit and the next drafts (specStep after the forward).
// Sequences cancelled while it was away are dropped.
func (s *Scheduler) specCompleteMicroBatch(r *Ring, p *headPipe) (err error) {
	if len(s.spec.flight) != len(p.flight) {
		return fmt.Errorf("speculative pipeline: %d micro-batches in flight, the parts of %d", len(p.flight), len(s.spec.flight))
	}
	mb, parts := p.flight[0], s.spec.flight[0]
	p.flight, s.spec.flight = p.flight[1:], s.spec.flight[1:]
	rel := &releaser{be: s.eng.BE}
	defer rel.release()
	start := time.Now()
	normed, logits, err := s.eng.specBack(rel, r, mb.T, specLogitRows(parts))
	if err != nil {
		return err
	}
	// The head's compute of the micro-batch, as completeMicroBatch counts it.
	defer func() {
		if err == nil {
			r.head.step(mb.T, mb.front+time.Since(start)-r.lastWait)
		}
	}()
	if err := p.retire(mb); err != nil {
		return err
	}
	var live []*specPart
	for _, q := range parts {
		if q.r.cancelled.Load() {
			delete(p.ids, q.r) // back: the next reap frees and ends it
			continue
		}
		live = append(live, q)
	}
	if err := s.specVerify(rel, live, logits); err != nil {
		return err
	}
	s.specCommit(live)
	for _, q := range live {
		if q.ended {
			delete(p.ids, q.r)
		}
	}
	return s.specDraft(rel, live, normed)
}

// specBack receives a micro-batch's T final hidden rows and applies the
// final norm to every row (the MTP layer reads them all) and lm_head to
// logitRows, as specForward does after the layers.
func (e *Engine) specBack(rel *releaser, r *Ring, T int, logitRows []int) (normed, logits *kernels.Tensor, err error) {
	h, err := rel.tensor(kernels.F32, T, e.Cfg.HiddenSize)
	if err != nil {
		return nil, nil, err
	}
	if err := r.recvChecked(h); err != nil {
		return nil, nil, err
	}
	return e.specHead(rel, h, logitRows)
}

// busy reports whether r is in a micro-batch in flight (without giving it
// an id when it has none).
func (p *headPipe) busy(r *request) bool {
	id, ok := p.ids[r]
	if !ok {
		return false
	}
	_, in := p.sched.Where(id)
	return in
}

// pipeReleasable reports whether r's blocks may be released now: not while
// a micro-batch in flight holds r, whose rows the stages still write (the
// completion drops r and a later reap frees it). Otherwise it forgets r's
// micro-batch id.
func (s *Scheduler) pipeReleasable(r *request) bool {
	ring, ok := s.eng.remote.(*Ring)
	if !ok || ring.pipe == nil {
		return true
	}
	if ring.pipe.busy(r) {
		return false
	}
	delete(ring.pipe.ids, r)
	return true
}
