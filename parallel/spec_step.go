package parallel

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/glmtopo/glmtopo/kernels"
)

// The scheduler's speculative step (SchedulerOptions.Speculative).
//
// A running sequence past its prompt holds N drafts (fewer near its
// max_tokens). Its step appends its last token and the drafts: N+1 rows at
// positions L..L+N, each laid out as a one-token view of the sequence (same
// block table, length L+j), so a verify step is a decode step of
// sequences × (N+1) rows and replays the engine's decode graphs; attention
// of row j reads the cache up to position L+j, which rows 0..j-1 wrote in
// the same layer. The head decides acceptance (greedy: drafts equal to the
// argmax; sampling: spec_sample.go) and commits k accepted drafts plus one
// token of its own: the main cache keeps positions up to L+k (Len = L+k+1);
// rows past it are rolled back by that length and overwritten later.
//
// Then the MTP layer runs over the new positions L..L+k (the normed hidden
// state of position t with the token at t+1), and its last row drafts the
// next step's first token; drafts 2..N feed the layer its own output and
// the previous draft one position further (vLLM's recursive MTP). Those
// positions are rolled back too: at every step's start MTPLen == Len.
// Prompt chunks run alongside (chunked prefill): their rows also go through
// the MTP layer, and the chunk that completes a prompt samples its first
// token as the plain step does and drafts from it. Every decision a
// sequence's tokens depend on is its own, so batching never changes them.
//
// Shaped for the pipeline (docs: ../shared/design/distributed.md): only the
// head, which holds the sampler and the MTP layer, knows what was accepted;
// the other stages never infer it. Each row a stage runs is (sequence,
// position, token), and a sequence's rows of a step start at its committed
// length L: appending at L is the rollback (positions past it are simply
// rewritten), so a step header carrying per sequence "start L, n tokens"
// tells every stage exactly what to append and what to forget. The head
// sends the verify rows' hidden states back through the ring as for decode.

// speculator is the scheduler's speculation: the draft count, the rule for
// sampled drafts and the counters behind the spec_decode metrics.
type speculator struct {
	n      int
	accept acceptRule
	// override, set by tests, replaces a sequence's drafts after the MTP
	// layer made them (to verify long accepted runs on random-weight models).
	override func(r *request, drafts []int32)
	// flight holds the parts of the micro-batches in the ring, oldest
	// first, beside headPipe.flight (spec_pipe.go).
	flight [][]*specPart
	// submitted, set by tests, sees each micro-batch's sequences once its
	// rows are sent (cancelling one there cancels it in flight).
	submitted   func(reqs []*request)
	drafts      atomic.Int64
	draftTokens atomic.Int64
	accepted    atomic.Int64
	perPos      []atomic.Int64
}

func newSpeculator(c SpecConfig) *speculator {
	if !c.Enabled() {
		return nil
	}
	return &speculator{n: c.NumSpeculativeTokens, accept: exactAccept, perPos: make([]atomic.Int64, c.NumSpeculativeTokens)}
}

// SpecDecodeStats are the cumulative counters of vLLM's spec_decode metrics:
// verify steps that carried drafts, drafts, accepted drafts, and accepted
// drafts by position (AcceptedPerPos[j] counts drafts j+1 accepted).
type SpecDecodeStats struct {
	NumDrafts         int64
	NumDraftTokens    int64
	NumAcceptedTokens int64
	AcceptedPerPos    []int64
}

// SpecDecodeStats reports the counters; ok is false without speculation.
func (s *Scheduler) SpecDecodeStats() (st SpecDecodeStats, ok bool) {
	sp := s.spec
	if sp == nil {
		return st, false
	}
	st = SpecDecodeStats{NumDrafts: sp.drafts.Load(), NumDraftTokens: sp.draftTokens.Load(), NumAcceptedTokens: sp.accepted.Load()}
	for i := range sp.perPos {
		st.AcceptedPerPos = append(st.AcceptedPerPos, sp.perPos[i].Load())
	}
	return st, true
}

// specSeq is one request's speculation state (owned by the loop goroutine
// until the request ends).
type specSeq struct {
	drafts   []int32 // verified at the sequence's next step
	drafted  int     // totals for Result
	accepted int
}

// specPart is one running sequence's share of a speculative step.
type specPart struct {
	r      *request
	chunk  int     // prompt tokens this step (0: a verify part)
	row    int     // its first row in the step's batch
	rows   int     // rows in the batch
	lrow   int     // its first logits row (-1: none)
	drafts []int32 // the drafts it verifies
	out    []int32 // tokens the step gives it, in order
	k      int     // drafts accepted
	base   int     // main-cache length when out[0] is the last token
	ended  bool
}

// specStep is step() with speculation. A head whose ring keeps several
// micro-batches in flight runs them (spec_pipe.go).
func (s *Scheduler) specStep() error {
	if r, ok := s.eng.remote.(*Ring); ok && r.pipe != nil {
		return s.specPipeStep(r)
	}
	rel := &releaser{be: s.eng.BE}
	defer rel.release()
	parts, inputs, prefill, err := s.specPlan(s.running)
	if err != nil || len(parts) == 0 {
		return err
	}
	logitRows := specLogitRows(parts)
	var normed, logits *kernels.Tensor
	if prefill {
		normed, logits, err = s.eng.specForward(rel, inputs, logitRows)
	} else { // every input is one token: a decode step (graphs on the GPU)
		var res *StepResult
		if res, err = s.eng.Step(inputs, false); err == nil {
			rel.add(res.Release)
			normed, logits = res.Normed, res.Logits
		}
	}
	if err != nil {
		return err
	}
	if err := s.specVerify(rel, parts, logits); err != nil {
		return err
	}
	s.specCommit(parts)
	return s.specDraft(rel, parts, normed)
}

// specLogitRows numbers the parts' logits rows (p.lrow) and returns the
// step rows they come from: every row of a verify part, the last row of a
// chunk that completes its prompt.
func specLogitRows(parts []*specPart) []int {
	var logitRows []int
	for _, p := range parts {
		if p.lrow < 0 {
			continue
		}
		p.lrow = len(logitRows)
		first := p.row
		if p.chunk > 0 {
			first = p.row + p.rows - 1
		}
		for i := first; i < p.row+p.rows; i++ {
			logitRows = append(logitRows, i)
		}
	}
	return logitRows
}

// specPlan lays out a step of reqs (the running sequences, or one
// micro-batch's): prompt chunks within the prefill budget, and for every
// sequence past its prompt its last token and drafts as one-token views.
// prefill says whether any prompt chunk runs.
func (s *Scheduler) specPlan(reqs []*request) ([]*specPart, []StepInput, bool, error) {
	var parts []*specPart
	var inputs []StepInput
	// The step's tokens (--max-num-batched-tokens) go to every decoding
	// sequence's last token first, then to drafts, then to prompt chunks.
	budget := s.opt.PrefillTokens
	for _, r := range reqs {
		if r.prefilled >= len(r.req.PromptIDs) {
			budget--
		}
	}
	for _, r := range reqs {
		if r.prefilled >= len(r.req.PromptIDs) {
			r.spec.drafts = r.spec.drafts[:min(len(r.spec.drafts), max(0, budget))]
			budget -= len(r.spec.drafts)
		}
	}
	prefill := false
	rows := 0
	for _, r := range reqs {
		r.chunk = 0
		if r.cancelled.Load() {
			continue // aborted since reap: no more work; the next reap frees it
		}
		if n := len(r.req.PromptIDs); r.prefilled < n {
			if budget <= 0 {
				continue // its prompt continues next step
			}
			r.chunk = min(budget, n-r.prefilled)
			budget -= r.chunk
			p := &specPart{r: r, chunk: r.chunk, row: rows, rows: r.chunk, lrow: -1}
			rows += r.chunk
			if r.prefilled+r.chunk == n {
				p.lrow = 0 // the prompt's last row samples the first token
			}
			parts = append(parts, p)
			inputs = append(inputs, StepInput{Seq: &r.seq, Tokens: toI32(r.req.PromptIDs[r.prefilled : r.prefilled+r.chunk])})
			prefill = true
			continue
		}
		L := r.seq.Len
		drafts := r.spec.drafts
		if err := s.eng.KV.Reserve(&r.seq, L+len(drafts)+1); err != nil {
			return nil, nil, false, err
		}
		p := &specPart{r: r, row: rows, rows: 1 + len(drafts), lrow: 0, drafts: drafts, base: L + 1}
		rows += p.rows
		toks := append([]int32{r.last}, drafts...)
		views := make([]Seq, len(toks))
		for j := range toks {
			views[j] = Seq{Blocks: r.seq.Blocks, Len: L + j}
			inputs = append(inputs, StepInput{Seq: &views[j], Tokens: toks[j : j+1]})
		}
		parts = append(parts, p)
	}
	return parts, inputs, prefill, nil
}

// banned is what a sequence may not sample as its (generated+1)-th token.
func (s *Scheduler) banned(r *request, generated int) []int32 {
	if generated < r.req.MinNewTokens && !r.req.IgnoreEOS {
		return append(append([]int32(nil), s.eos...), toI32(r.req.StopTokenIDs)...)
	}
	return nil
}

// specVerify samples every logits row and decides each part's tokens.
func (s *Scheduler) specVerify(rel *releaser, parts []*specPart, logits *kernels.Tensor) error {
	if logits == nil {
		return nil
	}
	params := make([]kernels.SampleParams, logits.Rows())
	var hostRows []int // rows of sampled verify parts, verified on the host
	for _, p := range parts {
		if p.lrow < 0 {
			continue
		}
		r := p.r
		if p.chunk > 0 { // the plain sampler's draw, as without speculation
			sp := r.req.Sampling
			params[p.lrow] = kernels.SampleParams{Temperature: sp.Temperature, TopP: sp.TopP, TopK: sp.TopK,
				U: r.rng.Float32(), Ban: s.banned(r, r.generated)}
			continue
		}
		for j := 0; j < p.rows; j++ { // argmax targets (greedy parts use them)
			params[p.lrow+j].Ban = s.banned(r, r.generated+j)
		}
		if r.req.Sampling.Temperature > 0 {
			for j := 0; j < p.rows; j++ {
				hostRows = append(hostRows, p.lrow+j)
			}
		}
	}
	toks, err := s.eng.BE.Sample(logits, params)
	if err != nil {
		return err
	}
	var host []float32
	if len(hostRows) > 0 {
		sel, err := s.eng.gatherRows(rel, logits, hostRows)
		if err == nil {
			host, err = s.eng.BE.Download(sel)
		}
		if err != nil {
			return fmt.Errorf("speculative sampling: %w", err)
		}
	}
	s.verifyAllSampled(parts, host, logits.Cols())
	for _, p := range parts {
		switch {
		case p.lrow < 0, p.out != nil: // no logits, or verified by sampling
		case p.chunk > 0:
			p.out = []int32{toks[p.lrow]}
		default:
			for p.k < len(p.drafts) && p.drafts[p.k] == toks[p.lrow+p.k] {
				p.k++
			}
			p.out = append(append([]int32(nil), p.drafts[:p.k]...), toks[p.lrow+p.k])
		}
		if p.chunk == 0 && len(p.drafts) > 0 {
			s.spec.drafts.Add(1)
			s.spec.draftTokens.Add(int64(len(p.drafts)))
			s.spec.accepted.Add(int64(p.k))
			for j := range p.k {
				s.spec.perPos[j].Add(1)
			}
			p.r.spec.drafted += len(p.drafts)
			p.r.spec.accepted += p.k
		}
	}
	return nil
}

// verifyAllSampled runs speculative sampling for the sampled verify parts,
// whose rows lie in host in part order, the parts in parallel (each draws
// from its own request's generator, so the order of parts changes nothing).
func (s *Scheduler) verifyAllSampled(parts []*specPart, host []float32, V int) {
	var sampled []*specPart
	var offsets []int
	next := 0
	for _, p := range parts {
		if p.lrow >= 0 && p.chunk == 0 && p.r.req.Sampling.Temperature > 0 {
			sampled = append(sampled, p)
			offsets = append(offsets, next)
			next += p.rows
		}
	}
	workers := min(len(sampled), runtime.GOMAXPROCS(0))
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < len(sampled); i += workers {
				p, off := sampled[i], offsets[i]
				p.out, p.k = s.verifySampled(p, host[off*V:(off+p.rows)*V], V)
			}
		}()
	}
	wg.Wait()
}

// verifySampled runs speculative sampling over a part's rows (V logits each).
func (s *Scheduler) verifySampled(p *specPart, rows []float32, V int) ([]int32, int) {
	r := p.r
	sp := r.req.Sampling
	var out []int32
	for j := 0; j < p.rows; j++ {
		d := newTargetDist(rows[j*V:(j+1)*V], kernels.SampleParams{Temperature: sp.Temperature, TopP: sp.TopP, TopK: sp.TopK,
			Ban: s.banned(r, r.generated+j)})
		if j == len(p.drafts) { // every draft accepted: the next token from p
			return append(out, d.sample(r.rng.Float32(), -1)), j
		}
		u1, u2 := r.rng.Float32(), r.rng.Float32()
		tok, ok := s.spec.accept(d, p.drafts[j], u1, u2)
		out = append(out, tok)
		if !ok {
			return out, j
		}
	}
	return out, len(p.drafts) // unreachable: the last row returns above
}

// specCommit hands each part's tokens to its request in order, stopping at
// the first that ends it (EOS, stop token, max_tokens, context length),
// exactly as if they had arrived one step each.
func (s *Scheduler) specCommit(parts []*specPart) {
	for _, p := range parts {
		r := p.r
		if p.chunk > 0 {
			r.prefilled += p.chunk
			if r.prefilled < len(r.req.PromptIDs) {
				continue
			}
			p.base = r.seq.Len
		}
		for j, tok := range p.out {
			r.seq.Len = p.base + j
			if s.accept(r, tok) {
				p.ended = true
				break
			}
		}
	}
	kept := s.running[:0]
	ended := map[*request]bool{}
	for _, p := range parts {
		if p.ended {
			ended[p.r] = true
		}
	}
	for _, r := range s.running {
		if !ended[r] {
			kept = append(kept, r)
		}
	}
	s.running = kept
	s.Running.Store(int64(len(kept)))
}

// draftCount is how many drafts r verifies next: N, fewer when fewer tokens
// remain (the last token needs none).
func (s *Scheduler) draftCount(r *request) int {
	left := min(r.req.MaxNewTokens-r.generated, s.opt.MaxModelLen-r.seq.Len-1)
	return max(0, min(s.spec.n, left-1))
}

// specDraft runs the MTP layer over the step's new positions and drafts the
// next step's tokens; it leaves every sequence's MTPLen at its Len.
func (s *Scheduler) specDraft(rel *releaser, parts []*specPart, normed *kernels.Tensor) error {
	var inputs []StepInput
	var hRows, outRows []int
	var drafters []*specPart
	for _, p := range parts {
		r := p.r
		r.spec.drafts = r.spec.drafts[:0]
		if p.ended {
			continue
		}
		var toks []int32
		var first int
		final := true
		if p.chunk > 0 {
			first = r.prefilled - p.chunk
			toks = toI32(r.req.PromptIDs[first+1 : r.prefilled])
			if final = r.prefilled == len(r.req.PromptIDs); final {
				toks = append(toks, p.out[0])
			} else {
				toks = append(toks, int32(r.req.PromptIDs[r.prefilled]))
			}
		} else {
			first = p.base - 1
			toks = p.out[:p.k+1]
		}
		if r.seq.MTPLen != first {
			return fmt.Errorf("speculative step: sequence's MTP cache holds %d positions, its step starts at %d", r.seq.MTPLen, first)
		}
		inputs = append(inputs, StepInput{Seq: &r.seq, Tokens: toks})
		for i := range toks {
			hRows = append(hRows, p.row+i)
		}
		if final && s.draftCount(r) > 0 {
			outRows = append(outRows, len(hRows)-1)
			drafters = append(drafters, p)
		}
	}
	if len(inputs) == 0 {
		return nil
	}
	defer func() {
		for _, p := range parts {
			if !p.ended {
				p.r.seq.MTPLen = p.r.seq.Len
			}
		}
	}()
	hPrev, err := s.eng.gatherRows(rel, normed, hRows)
	if err != nil {
		return err
	}
	x, logits, err := s.eng.mtpForward(rel, inputs, hPrev, outRows)
	for depth := 0; err == nil && len(drafters) > 0; depth++ {
		var d []int32
		if d, err = s.eng.argmaxRows(logits); err != nil {
			break
		}
		var deeper []*specPart
		var rows []int
		inputs = inputs[:0]
		for i, p := range drafters {
			r := p.r
			r.spec.drafts = append(r.spec.drafts, d[i])
			if len(r.spec.drafts) < s.draftCount(r) {
				deeper = append(deeper, p)
				rows = append(rows, i)
				inputs = append(inputs, StepInput{Seq: &r.seq, Tokens: []int32{d[i]}})
			}
		}
		if drafters = deeper; len(drafters) == 0 {
			break
		}
		if hPrev, err = s.eng.gatherRows(rel, x, rows); err != nil {
			break
		}
		all := make([]int, len(rows))
		for i := range all {
			all[i] = i
		}
		x, logits, err = s.eng.mtpForward(rel, inputs, hPrev, all)
	}
	if err != nil {
		return fmt.Errorf("mtp draft: %w", err)
	}
	if s.spec.override != nil {
		for _, p := range parts {
			if !p.ended {
				s.spec.override(p.r, p.r.spec.drafts)
			}
		}
	}
	return nil
}
