// Package pipeline is the head's schedule of micro-batches around a ring of
// pipeline stages, as a deterministic state machine without I/O (etcd/raft's
// Step/Ready shape): the head feeds it events (a micro-batch dispatched, a
// stage done, a stage failed, blocks freed, a sequence cancelled, a new ring
// after a failure) and acts on what Ready returns (micro-batches to send,
// micro-batches back at the head to sample, blocks that may now be reused,
// sequences to retry or fail).
//
// Its invariants: a sequence is in at most one micro-batch in flight (its
// next token depends on the last); at most MaxInFlight micro-batches are in
// flight (S stages need S to stay busy, S+1 with a draft step); micro-batches
// come back in the order they were sent; and blocks of a sequence whose
// micro-batch is still in the pipeline are never freed, so never reused,
// until that micro-batch is back or aborted.
package pipeline

import (
	"errors"
	"fmt"
	"slices"
)

// SeqID names a sequence; Step names a micro-batch's trip round the ring.
type (
	SeqID uint64
	Step  uint64
)

var (
	// ErrBusy: MaxInFlight micro-batches are in the pipeline.
	ErrBusy = errors.New("pipeline full")
	// ErrSeqInFlight: a sequence of the micro-batch is already in flight.
	ErrSeqInFlight = errors.New("sequence already in flight")
	// ErrBroken: a stage failed; nothing is dispatched until Reset.
	ErrBroken = errors.New("pipeline broken")
	// ErrUnknownStep: an event names a step never dispatched, or a stage
	// outside the ring.
	ErrUnknownStep = errors.New("unknown step or stage")
)

// Config shapes a schedule.
type Config struct {
	Stages int // stages in the ring, the head included (≥ 1)
	// MaxInFlight bounds the micro-batches in the pipeline (default Stages,
	// or Stages+1 with Draft).
	MaxInFlight int
	Draft       bool
	// Retries is how many times a sequence whose micro-batch a stage
	// failure aborted is offered for recompute before it fails (0: never).
	Retries int
}

// EventType says what happened.
type EventType uint8

const (
	// Dispatch: the head forms a micro-batch of Seqs (it is at stage 0).
	Dispatch EventType = iota + 1
	// StageDone: stage Stage finished step Step (for the last stage: the
	// final hidden rows are back at the head). Links are FIFO and stages run
	// steps in order, so it implies every earlier stage of Step and Stage of
	// every earlier step; events may arrive late, duplicated or reordered.
	StageDone
	// StageFailed: stage Stage failed (at step Step, or between steps): every
	// micro-batch in flight is aborted and the ring is broken until Reset.
	StageFailed
	// Free: the head releases Seq's Blocks (finished, preempted, cancelled).
	Free
	// Cancel: Seq's client went away; a micro-batch holding it still returns,
	// but its rows for Seq are to be dropped.
	Cancel
	// Reset: a new ring (a new plan epoch) replaces the broken one.
	Reset
)

// Event is one input of the state machine.
type Event struct {
	Type   EventType
	Step   Step
	Stage  int
	Seqs   []SeqID // Dispatch
	Seq    SeqID   // Free, Cancel
	Blocks []int32 // Free
	Err    error   // StageFailed
}

// MicroBatch is a step in flight and where it is.
type MicroBatch struct {
	Step Step
	Seqs []SeqID
	// Done is the number of stages that ran it: Stage Done is next, and
	// Done == Stages means it is back at the head.
	Done int
}

// Completed is a micro-batch back at the head: sample Seqs' rows, and
// drop those of Dropped (cancelled while it was in flight).
type Completed struct {
	Step    Step
	Seqs    []SeqID
	Dropped []SeqID
}

// Freed blocks may be reused by the head's allocator, and are announced to
// the stages in the next step's header.
type Freed struct {
	Seq    SeqID
	Blocks []int32
}

// Aborted is a micro-batch that a stage failure ended.
type Aborted struct {
	Step Step
	Seqs []SeqID
}

// Ready is what the head must act on, in this order: Dispatch sends,
// Complete samples, Freed reuses; Retry recomputes (free and requeue) and
// Failed ends with Err.
type Ready struct {
	Dispatch []MicroBatch
	Complete []Completed
	Aborted  []Aborted
	Freed    []Freed
	Retry    []SeqID
	Failed   []SeqID
	Err      error
}

// Empty reports whether there is nothing to act on.
func (r *Ready) Empty() bool {
	return len(r.Dispatch)+len(r.Complete)+len(r.Aborted)+len(r.Freed)+len(r.Retry)+len(r.Failed) == 0
}

// Schedule is the state machine. Not safe for concurrent use.
type Schedule struct {
	cfg      Config
	next     Step
	inFlight []*MicroBatch // in step order
	where    map[SeqID]*MicroBatch
	pending  map[SeqID][]int32 // frees waiting for the sequence's micro-batch
	cancel   map[SeqID]bool    // cancelled while in flight
	retries  map[SeqID]int
	broken   error
	ready    Ready
}

// New returns an empty schedule.
func New(cfg Config) (*Schedule, error) {
	if cfg.Stages < 1 {
		return nil, fmt.Errorf("pipeline: %d stages", cfg.Stages)
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = cfg.Stages
		if cfg.Draft {
			cfg.MaxInFlight++
		}
	}
	return &Schedule{cfg: cfg, next: 1, where: map[SeqID]*MicroBatch{}, pending: map[SeqID][]int32{},
		cancel: map[SeqID]bool{}, retries: map[SeqID]int{}}, nil
}

// Step feeds one event. An error leaves the state unchanged.
func (s *Schedule) Step(ev Event) error {
	switch ev.Type {
	case Dispatch:
		return s.dispatch(ev.Seqs)
	case StageDone:
		return s.stageDone(ev.Step, ev.Stage)
	case StageFailed:
		return s.fail(ev)
	case Free:
		s.free(ev.Seq, ev.Blocks)
		return nil
	case Cancel:
		if _, ok := s.where[ev.Seq]; ok {
			s.cancel[ev.Seq] = true
		}
		return nil
	case Reset:
		if len(s.inFlight) > 0 {
			return fmt.Errorf("pipeline: reset with %d micro-batches in flight", len(s.inFlight))
		}
		s.broken = nil
		return nil
	}
	return fmt.Errorf("pipeline: unknown event %d", ev.Type)
}

func (s *Schedule) dispatch(seqs []SeqID) error {
	switch {
	case s.broken != nil:
		return fmt.Errorf("%w: %v", ErrBroken, s.broken)
	case len(s.inFlight) >= s.cfg.MaxInFlight:
		return fmt.Errorf("%w: %d micro-batches in flight", ErrBusy, len(s.inFlight))
	case len(seqs) == 0:
		return errors.New("pipeline: empty micro-batch")
	}
	seen := map[SeqID]bool{}
	for _, q := range seqs {
		if mb, ok := s.where[q]; ok {
			return fmt.Errorf("%w: sequence %d is in step %d", ErrSeqInFlight, q, mb.Step)
		}
		if seen[q] {
			return fmt.Errorf("%w: sequence %d twice in one micro-batch", ErrSeqInFlight, q)
		}
		seen[q] = true
	}
	mb := &MicroBatch{Step: s.next, Seqs: slices.Clone(seqs)}
	s.next++
	s.inFlight = append(s.inFlight, mb)
	for _, q := range seqs {
		s.where[q] = mb
	}
	s.ready.Dispatch = append(s.ready.Dispatch, *mb)
	return nil
}

func (s *Schedule) stageDone(step Step, stage int) error {
	if stage < 0 || stage >= s.cfg.Stages || step == 0 || step >= s.next {
		return fmt.Errorf("%w: step %d at stage %d (steps 1…%d, %d stages)", ErrUnknownStep, step, stage, s.next-1, s.cfg.Stages)
	}
	// Steps up to this one have run every stage up to this one (FIFO links,
	// stages in step order); earlier events that arrive later change nothing.
	for _, mb := range s.inFlight {
		if mb.Step > step {
			break
		}
		mb.Done = max(mb.Done, stage+1)
	}
	// Micro-batches come back in step order.
	for len(s.inFlight) > 0 && s.inFlight[0].Done == s.cfg.Stages {
		mb := s.inFlight[0]
		s.inFlight = s.inFlight[1:]
		c := Completed{Step: mb.Step}
		for _, q := range mb.Seqs {
			if s.cancel[q] {
				c.Dropped = append(c.Dropped, q)
			} else {
				c.Seqs = append(c.Seqs, q)
			}
			s.land(q)
		}
		s.ready.Complete = append(s.ready.Complete, c)
	}
	return nil
}

// land takes q out of flight and releases its deferred free.
func (s *Schedule) land(q SeqID) {
	delete(s.where, q)
	delete(s.cancel, q)
	if b, ok := s.pending[q]; ok {
		delete(s.pending, q)
		s.ready.Freed = append(s.ready.Freed, Freed{Seq: q, Blocks: b})
	}
}

func (s *Schedule) free(q SeqID, blocks []int32) {
	if len(blocks) == 0 {
		return
	}
	if _, ok := s.where[q]; ok {
		s.pending[q] = append(s.pending[q], blocks...) // its micro-batch still writes them
		return
	}
	s.ready.Freed = append(s.ready.Freed, Freed{Seq: q, Blocks: slices.Clone(blocks)})
}

func (s *Schedule) fail(ev Event) error {
	if ev.Stage < 0 || ev.Stage >= s.cfg.Stages {
		return fmt.Errorf("%w: stage %d failed (%d stages)", ErrUnknownStep, ev.Stage, s.cfg.Stages)
	}
	err := ev.Err
	if err == nil {
		err = errors.New("stage failed")
	}
	err = fmt.Errorf("stage %d at step %d: %w", ev.Stage, ev.Step, err)
	if s.broken == nil {
		s.broken = err
		s.ready.Err = err
	}
	for _, mb := range s.inFlight {
		s.ready.Aborted = append(s.ready.Aborted, Aborted{Step: mb.Step, Seqs: mb.Seqs})
		for _, q := range mb.Seqs {
			cancelled := s.cancel[q]
			s.land(q)
			switch {
			case cancelled:
			case s.retries[q] < s.cfg.Retries:
				s.retries[q]++
				s.ready.Retry = append(s.ready.Retry, q)
			default:
				s.ready.Failed = append(s.ready.Failed, q)
			}
		}
	}
	s.inFlight = nil
	return nil
}

// Ready returns what accumulated since the last Advance.
func (s *Schedule) Ready() Ready { return s.ready }

// Advance acknowledges the last Ready: the head acted on all of it.
func (s *Schedule) Advance() { s.ready = Ready{} }

// InFlight returns the micro-batches in the pipeline, oldest first.
func (s *Schedule) InFlight() []MicroBatch {
	out := make([]MicroBatch, len(s.inFlight))
	for i, mb := range s.inFlight {
		out[i] = *mb
	}
	return out
}

// Where returns the step q is in flight in, if any.
func (s *Schedule) Where(q SeqID) (Step, bool) {
	if mb, ok := s.where[q]; ok {
		return mb.Step, true
	}
	return 0, false
}

// CanDispatch reports whether a micro-batch may be sent now.
func (s *Schedule) CanDispatch() bool { return s.broken == nil && len(s.inFlight) < s.cfg.MaxInFlight }

// Broken is the failure that broke the ring, or nil.
func (s *Schedule) Broken() error { return s.broken }
