package parallel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"

	"github.com/glmtopo/glmtopo/kernels"
)

// SchedulerOptions bound the scheduler's work.
type SchedulerOptions struct {
	MaxNumSeqs  int // sequences decoded together (default 64)
	MaxWaiting  int // queued requests before ErrSaturated (default 1024)
	MaxModelLen int // prompt + completion limit (default: the model's max positions, capped by the KV pool)
	// PrefillTokens is vLLM's --max-num-batched-tokens: the tokens of one
	// step over all sequences, each running sequence's decode token first
	// and prompt chunks (chunked prefill) in the rest (default 2048; capped
	// by the engine's step workspace, Engine.MaxStepTokens).
	PrefillTokens int
	Logger        *slog.Logger
	// Speculative turns on MTP speculative decoding (spec_step.go); the
	// engine must hold the MTP layer (SpecConfig.CheckEngine).
	Speculative SpecConfig
}

// Scheduler serves concurrent requests on one Engine with continuous
// batching: every step decodes one token for each running sequence and
// prefills prompt chunks within a token budget. It implements Generator.
type Scheduler struct {
	eng  *Engine
	opt  SchedulerOptions
	log  *slog.Logger
	eos  []int32
	wake chan struct{}

	mu      sync.Mutex
	waiting []*request
	closed  bool

	running []*request // owned by the loop goroutine
	done    chan struct{}
	cancel  context.CancelFunc

	// Counters for metrics.
	Running atomic.Int64
	Waiting atomic.Int64
	kvUsed  atomic.Int64 // KV blocks held by sequences, updated by the loop

	spec *speculator // nil without speculative decoding (spec_step.go)
}

// KVCacheUsage is the fraction of the paged KV cache held by sequences
// (reserved for their whole length at admission), for metrics.
func (s *Scheduler) KVCacheUsage() float64 {
	return float64(s.kvUsed.Load()) / float64(s.eng.KV.NumBlocks)
}

var _ Generator = (*Scheduler)(nil)

// request is one sequence in flight; the loop produces tokens, Generate consumes them.
type request struct {
	req       Request
	seq       Seq
	rng       *rand.Rand
	generated int
	last      int32
	prefilled int  // prompt tokens already in the cache
	chunk     int  // prompt tokens in the current step
	sampled   bool // next holds a token sampled this step
	next      int32
	cancelled atomic.Bool
	spec      specSeq // drafts and acceptance (spec_step.go)

	mu     sync.Mutex
	tokens []int
	finish FinishReason
	err    error
	ended  bool
	signal chan struct{} // capacity 1: "tokens or end available"
}

func (r *request) push(tok int) {
	r.mu.Lock()
	r.tokens = append(r.tokens, tok)
	r.mu.Unlock()
	r.notify()
}

func (r *request) end(f FinishReason, err error) {
	r.mu.Lock()
	r.finish, r.err, r.ended = f, err, true
	r.mu.Unlock()
	r.notify()
}

func (r *request) notify() {
	select {
	case r.signal <- struct{}{}:
	default:
	}
}

// NewScheduler starts the scheduling loop; Close stops it.
func NewScheduler(e *Engine, opt SchedulerOptions) *Scheduler {
	if opt.MaxNumSeqs <= 0 {
		opt.MaxNumSeqs = 64
	}
	if opt.MaxWaiting <= 0 {
		opt.MaxWaiting = 1024
	}
	poolTokens := e.KV.NumBlocks * e.KV.BlockSize
	if opt.MaxModelLen <= 0 {
		opt.MaxModelLen = e.Cfg.MaxPositionEmbeddings
	}
	opt.MaxModelLen = min(opt.MaxModelLen, poolTokens)
	if opt.PrefillTokens <= 0 {
		opt.PrefillTokens = 2048
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	opt = e.boundScheduler(opt) // memplan.go: never more than the step workspace holds
	s := &Scheduler{eng: e, opt: opt, log: opt.Logger, wake: make(chan struct{}, 1), done: make(chan struct{})}
	s.spec = newSpeculator(opt.Speculative)
	if r, ok := e.remote.(*Ring); ok && s.spec != nil {
		if err := r.draftSlot(); err != nil {
			s.log.Warn("pipeline: no extra micro-batch for the drafts", "err", err)
		}
	}
	for _, id := range e.Cfg.EOSTokenIDs {
		s.eos = append(s.eos, int32(id))
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	go s.loop(ctx)
	return s
}

// Close stops the loop; requests in flight end with an error.
func (s *Scheduler) Close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	<-s.done
}

func (s *Scheduler) MaxModelLen() int { return s.opt.MaxModelLen }

func (s *Scheduler) EOSTokenIDs() []int { return append([]int(nil), s.eng.Cfg.EOSTokenIDs...) }

// Generate implements Generator.
func (s *Scheduler) Generate(ctx context.Context, req Request, emit func(int) error) (Result, error) {
	res := Result{PromptTokens: len(req.PromptIDs)}
	if err := s.validate(&req); err != nil {
		return res, err
	}
	seed := uint64(rand.Int64())
	if req.Sampling.HasSeed {
		seed = uint64(req.Sampling.Seed)
	}
	r := &request{req: req, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), signal: make(chan struct{}, 1)}
	s.mu.Lock()
	switch {
	case s.closed:
		s.mu.Unlock()
		return res, errors.New("scheduler closed")
	case len(s.waiting) >= s.opt.MaxWaiting:
		s.mu.Unlock()
		return res, ErrSaturated
	}
	s.waiting = append(s.waiting, r)
	s.Waiting.Store(int64(len(s.waiting)))
	s.mu.Unlock()
	s.poke()

	next := 0
	for {
		select {
		case <-ctx.Done():
			r.cancelled.Store(true)
			s.poke()
			res.CompletionTokens = next
			res.Finish = FinishAbort
			return res, ctx.Err()
		case <-r.signal:
		}
		r.mu.Lock()
		toks := r.tokens[next:]
		ended, finish, err := r.ended, r.finish, r.err
		r.mu.Unlock()
		for _, tok := range toks {
			next++
			if e := emit(tok); e != nil {
				r.cancelled.Store(true)
				s.poke()
				res.CompletionTokens = next
				if errors.Is(e, ErrStopGeneration) {
					res.Finish = FinishStop
					return res, nil
				}
				res.Finish = FinishAbort
				return res, e
			}
		}
		if ended {
			res.CompletionTokens = r.generated
			res.DraftTokens, res.AcceptedTokens = r.spec.drafted, r.spec.accepted
			res.Finish = finish
			return res, err
		}
	}
}

func (s *Scheduler) validate(req *Request) error {
	n := len(req.PromptIDs)
	if n == 0 {
		return fmt.Errorf("%w: empty prompt", ErrInvalidRequest)
	}
	v := s.eng.Cfg.VocabSize
	for _, id := range req.PromptIDs {
		if id < 0 || id >= v {
			return fmt.Errorf("%w: token id %d outside vocabulary of %d", ErrInvalidRequest, id, v)
		}
	}
	if n+1 > s.opt.MaxModelLen {
		return fmt.Errorf("%w: prompt has %d tokens, the maximum context length is %d", ErrPromptTooLong, n, s.opt.MaxModelLen)
	}
	room := s.opt.MaxModelLen - n
	if req.MaxNewTokens <= 0 || req.MaxNewTokens > room {
		req.MaxNewTokens = room
	}
	sp := req.Sampling
	if sp.Temperature < 0 || sp.TopP < 0 || sp.TopP > 1 || sp.TopK < 0 || req.MinNewTokens < 0 {
		return fmt.Errorf("%w: sampling parameters %+v, min tokens %d", ErrInvalidRequest, sp, req.MinNewTokens)
	}
	return nil
}

func (s *Scheduler) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *Scheduler) loop(ctx context.Context) {
	defer close(s.done)
	defer func() {
		for _, r := range s.running {
			s.eng.KV.Release(&r.seq)
			r.end(FinishAbort, errors.New("scheduler closed"))
		}
		s.mu.Lock()
		for _, r := range s.waiting {
			r.end(FinishAbort, errors.New("scheduler closed"))
		}
		s.waiting = nil
		s.mu.Unlock()
	}()
	for {
		s.reap()
		s.admit()
		s.kvUsed.Store(int64(s.eng.KV.NumBlocks - s.eng.KV.FreeBlocks()))
		if len(s.running) == 0 {
			select {
			case <-ctx.Done():
				return
			case <-s.wake:
				continue
			}
		}
		if ctx.Err() != nil {
			return
		}
		if err := s.step(); err != nil {
			s.log.Error("engine step failed; failing its sequences", "err", err)
			for _, r := range s.running {
				s.eng.KV.Release(&r.seq)
				r.end(FinishAbort, fmt.Errorf("engine step: %w", err))
			}
			s.running = nil
			s.Running.Store(0)
		}
	}
}

// reap frees cancelled sequences at once, except those in a micro-batch
// still in the ring (spec_pipe.go), freed once it is back.
func (s *Scheduler) reap() {
	kept := s.running[:0]
	for _, r := range s.running {
		if r.cancelled.Load() && s.pipeReleasable(r) {
			s.eng.KV.Release(&r.seq)
			r.end(FinishAbort, context.Canceled)
			continue
		}
		kept = append(kept, r)
	}
	s.running = kept
	s.mu.Lock()
	w := s.waiting[:0]
	for _, r := range s.waiting {
		if !r.cancelled.Load() {
			w = append(w, r)
		}
	}
	s.waiting = w
	s.Waiting.Store(int64(len(w)))
	s.mu.Unlock()
	s.Running.Store(int64(len(s.running)))
}

// admit moves waiting requests to running, FIFO, while there are sequence
// slots and KV blocks for the whole request (so nothing is ever preempted).
func (s *Scheduler) admit() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.waiting) > 0 && len(s.running) < s.opt.MaxNumSeqs {
		r := s.waiting[0]
		n := len(r.req.PromptIDs)
		if err := s.eng.KV.Reserve(&r.seq, n+r.req.MaxNewTokens); err != nil {
			s.eng.KV.Release(&r.seq)
			if len(s.running) > 0 {
				break // wait for running sequences to free blocks
			}
			// Nothing else holds blocks: this request can never fit.
			s.waiting = s.waiting[1:]
			r.end(FinishAbort, fmt.Errorf("%w: %d tokens exceed the KV cache (%d)", ErrPromptTooLong,
				n+r.req.MaxNewTokens, s.eng.KV.NumBlocks*s.eng.KV.BlockSize))
			continue
		}
		s.waiting = s.waiting[1:]
		s.running = append(s.running, r)
	}
	s.Waiting.Store(int64(len(s.waiting)))
	s.Running.Store(int64(len(s.running)))
}

// step runs one engine step: a decode token for every sequence past its
// prompt, and prompt chunks (chunked prefill) within the PrefillTokens budget,
// so a long prompt never stalls the running batch for more than one budget.
func (s *Scheduler) step() error {
	if s.spec != nil {
		return s.specStep() // spec_step.go
	}
	if r, ok := s.eng.remote.(*Ring); ok && r.pipe != nil {
		return s.pipeStep(r) // stage_sched.go: several micro-batches in the pipeline
	}
	inputs := make([]StepInput, 0, len(s.running))
	order := make([]*request, 0, len(s.running))
	budget := s.opt.PrefillTokens
	for _, r := range s.running {
		if r.prefilled >= len(r.req.PromptIDs) {
			budget-- // decode tokens count against the step's tokens first
		}
	}
	for _, r := range s.running {
		r.chunk = 0
		if r.cancelled.Load() {
			continue // aborted since reap: no more prefill or decode work; the next reap frees it
		}
		toks := []int32{r.last}
		if n := len(r.req.PromptIDs); r.prefilled < n {
			if budget <= 0 {
				continue // its prompt continues next step
			}
			r.chunk = min(budget, n-r.prefilled)
			budget -= r.chunk
			toks = toI32(r.req.PromptIDs[r.prefilled : r.prefilled+r.chunk])
		}
		inputs = append(inputs, StepInput{Seq: &r.seq, Tokens: toks})
		order = append(order, r)
	}
	if len(inputs) == 0 {
		return nil
	}
	res, err := s.eng.Step(inputs, false)
	if err != nil {
		return err
	}
	defer res.Release()
	params := make([]kernels.SampleParams, len(order))
	for i, r := range order {
		sp := r.req.Sampling
		params[i] = kernels.SampleParams{Temperature: sp.Temperature, TopP: sp.TopP, TopK: sp.TopK}
		if r.chunk > 0 && r.prefilled+r.chunk < len(r.req.PromptIDs) {
			continue // mid-prompt: its row is not sampled (and draws no random number)
		}
		params[i].U = r.rng.Float32()
		if r.generated < r.req.MinNewTokens && !r.req.IgnoreEOS {
			params[i].Ban = append(append([]int32(nil), s.eos...), toI32(r.req.StopTokenIDs)...)
		}
	}
	// Sampled before the next Step: a graph step's logits are the graph's
	// outputs, which its next replay overwrites.
	toks, err := s.eng.BE.Sample(res.Logits, params)
	if err != nil {
		return err
	}
	for i, r := range order {
		r.sampled = false
		if r.chunk > 0 {
			r.prefilled += r.chunk
			if r.prefilled < len(r.req.PromptIDs) {
				continue
			}
		}
		r.sampled, r.next = true, toks[i]
	}
	kept := s.running[:0]
	for _, r := range s.running {
		if !r.sampled {
			kept = append(kept, r) // still prefilling, or no prefill budget this step
			continue
		}
		r.sampled = false
		if s.accept(r, r.next) {
			continue
		}
		kept = append(kept, r)
	}
	s.running = kept
	s.Running.Store(int64(len(kept)))
	return nil
}

// accept records tok as r's next generated token and streams it unless it
// is a stop; when r is finished it releases r's KV blocks, ends r and
// reports true.
func (s *Scheduler) accept(r *request, tok int32) bool {
	r.generated++
	r.last = tok
	finish, stop := s.finished(r, tok)
	if !stop {
		r.push(int(tok))
	}
	if finish == "" {
		return false
	}
	s.eng.KV.Release(&r.seq)
	r.end(finish, nil)
	return true
}

// finished says whether r ends with tok, and whether tok is a stop token (not emitted).
func (s *Scheduler) finished(r *request, tok int32) (FinishReason, bool) {
	stop := false
	if r.generated > r.req.MinNewTokens { // the banned logits made earlier stops impossible
		if !r.req.IgnoreEOS {
			for _, e := range s.eos {
				stop = stop || e == tok
			}
		}
		for _, e := range r.req.StopTokenIDs {
			stop = stop || int32(e) == tok
		}
	}
	switch {
	case stop:
		return FinishStop, true
	case r.generated >= r.req.MaxNewTokens || r.seq.Len+1 >= s.opt.MaxModelLen:
		return FinishLength, false
	}
	return "", false
}

func toI32(v []int) []int32 {
	out := make([]int32, len(v))
	for i, x := range v {
		out[i] = int32(x)
	}
	return out
}
