package parallel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"
)

// specPipeOpt: six sequences at once with N ≤ 3 drafts fit a step budget of
// 24 (6 × 4 rows), so the synchronous loop never cuts drafts, while long
// prompts are still chunked.
var (
	specPipeOpt = SchedulerOptions{MaxNumSeqs: 6, PrefillTokens: 24}
	specPipeKV  = EngineOptions{BlockSize: 16, MaxTokens: 1024}
)

// specPipeWork is the pipeline workload (10 concurrent requests of 1 to 70
// prompt tokens, greedy and seeded sampling), with or without its two stop
// strings (a stop string cancels its request at a time only the client's
// goroutine knows, so the counters of its last steps vary from run to run).
func specPipeWork(vocab int, stops bool) []workItem {
	items := workload(vocab)
	for i := range items {
		if !stops {
			items[i].stopAt = 0
		}
	}
	return items
}

// specPipeOracle drafts the plain output's continuation (wrong at about
// three positions in ten), so verify steps accept runs of every length.
func specPipeOracle(t *testing.T, dir string, items []workItem) func(r *request, drafts []int32) {
	t.Helper()
	plain := NewScheduler(wholeEngine(t, dir, specPipeKV), specPipeOpt)
	defer plain.Close()
	reqs := make([]specRequest, len(items))
	for i, it := range items {
		reqs[i] = specRequest{req: it.req}
	}
	return specOracle(reqs, runWorkload(t, plain, specPipeWork(plain.eng.Cfg.VocabSize, false)))
}

// specPipeCase is one row of the identity table.
type specPipeCase struct {
	fixture       string
	stages, micro int
	n             int  // num_speculative_tokens
	oracle        bool // oracle drafts (long accepted runs) instead of the MTP layer's
	stops         bool // stop strings; without them the counters must match too
}

func (c specPipeCase) String() string {
	d := "mtp"
	if c.oracle {
		d = "oracle"
	}
	return fmt.Sprintf("%s/%dstages/%dmb/N%d/%s/stops=%v", c.fixture, c.stages, c.micro, c.n, d, c.stops)
}

// TestSpecPipeTokensIdentical: speculation with several micro-batches in
// flight round 2 and 3 in-process stages gives every request the tokens,
// finish and acceptance of the synchronous single-process speculative loop,
// greedy and seeded sampling, with chunked prefill and stop strings; more
// than one micro-batch is in flight; no block of a micro-batch in flight is
// freed; and every block is free at the end.
func TestSpecPipeTokensIdentical(t *testing.T) {
	var cases []specPipeCase
	for _, fx := range fixtures {
		for _, sm := range [][2]int{{2, 2}, {2, 3}, {3, 2}, {3, 3}} {
			for _, n := range []int{1, 3} {
				cases = append(cases, specPipeCase{fx, sm[0], sm[1], n, n == 3, sm[0] == sm[1]})
			}
		}
	}
	cases = append(cases, specPipeCase{"tiny", 3, 3, 3, false, false}, specPipeCase{"tiny", 2, 2, 1, true, true},
		specPipeCase{"tiny", 2, -1, 1, true, false}) // "one per stage": S+1 under speculation
	oracles := map[string]func(*request, []int32){}
	for _, c := range cases {
		t.Run(c.String(), func(t *testing.T) {
			dir := fixtureDir(c.fixture)
			opt := specPipeOpt
			opt.Speculative = SpecConfig{Method: "mtp", NumSpeculativeTokens: c.n}
			ref := NewScheduler(wholeEngine(t, dir, specPipeKV), opt)
			items := specPipeWork(ref.eng.Cfg.VocabSize, c.stops)
			var override func(*request, []int32)
			if c.oracle {
				if oracles[c.fixture] == nil {
					oracles[c.fixture] = specPipeOracle(t, dir, items)
				}
				override = oracles[c.fixture]
			}
			ref.spec.override = override
			if c.oracle {
				ref.spec.accept = coinAccept
			}
			want := runWorkload(t, ref, items)
			ref.Close()

			head, ring := inProcessPipelineOpt(t, dir, splitLayers(numLayers(t, dir), c.stages), specPipeKV, RingOptions{MicroBatches: c.micro})
			violations := watchInFlightFrees(head, ring)
			s := NewScheduler(head, opt)
			if c.micro < 0 && ring.pipe.depth != c.stages+1 {
				t.Errorf("one micro-batch per stage under speculation: depth %d, want %d (S+1)", ring.pipe.depth, c.stages+1)
			}
			s.spec.override = override
			s.spec.accept = ref.spec.accept
			var headerErrs []string
			s.spec.submitted = func(reqs []*request) { headerErrs = append(headerErrs, checkSpecHeader(ring, reqs)...) }
			compareWork(t, runWorkload(t, s, items), want)
			s.Close()
			checkPipeDrained(t, head, ring, *violations)
			for _, e := range headerErrs[:min(len(headerErrs), 5)] {
				t.Error(e)
			}
			if c.oracle {
				checkAcceptedBoth(t, items, want)
			}
			if !c.stops {
				compareSpecCounters(t, s, ref)
			}
			st, _ := s.SpecDecodeStats()
			t.Logf("%d micro-batches in flight at most; %d verify steps with drafts, %d drafts, %d accepted, by position %v",
				ring.pipe.peak, st.NumDrafts, st.NumDraftTokens, st.NumAcceptedTokens, st.AcceptedPerPos)
		})
	}
}

// checkSpecHeader checks the header of the micro-batch the ring just sent:
// each verify sequence's rows are its last token and drafts, one token each
// at its committed length and on (the rollback is the start position), and
// each prompt chunk starts where the prompt's cache ends.
func checkSpecHeader(ring *Ring, reqs []*request) []string {
	var errs []string
	if mb := ring.msg.Header.MicroBatch; int(mb) >= ring.pipe.depth {
		errs = append(errs, fmt.Sprintf("step %d: header names micro-batch %d of %d", ring.msg.Header.Step, mb, ring.pipe.depth))
	}
	for _, f := range ring.pipe.flight[:len(ring.pipe.flight)-1] { // the slot is free among those in flight
		if uint32(uint64(f.step)%uint64(ring.pipe.depth)) == ring.msg.Header.MicroBatch {
			errs = append(errs, fmt.Sprintf("step %d: micro-batch slot %d is already in flight", ring.msg.Header.Step, ring.msg.Header.MicroBatch))
		}
	}
	for _, r := range reqs {
		id := ring.seqs[r.seq.Blocks[0]].id
		var pos []int64
		for _, m := range ring.msg.Header.Seqs {
			if m.ID == id && len(m.FreedBlocks) == 0 {
				pos = append(pos, m.Position, int64(m.Tokens))
			}
		}
		want := []int64{int64(r.seq.Len - r.chunk), int64(r.chunk)}
		if r.chunk == 0 {
			want = nil
			for j := range 1 + len(r.spec.drafts) {
				want = append(want, int64(r.seq.Len+j), 1)
			}
		}
		if !slices.Equal(pos, want) {
			errs = append(errs, fmt.Sprintf("step %d: sequence %d (length %d, chunk %d, %d drafts): header rows (position, tokens) %v, want %v",
				ring.msg.Header.Step, id, r.seq.Len, r.chunk, len(r.spec.drafts), pos, want))
		}
	}
	return errs
}

// coinAccept accepts a sampled draft on a coin of its first draw and else
// samples the residual with the second: on random-weight models exact
// acceptance (p of the oracle's draft) almost never accepts, and what the
// identity tests check is that the draws are the synchronous loop's.
func coinAccept(d targetDist, draft int32, u1, u2 float32) (int32, bool) {
	if u1 < 0.6 {
		return draft, true
	}
	return d.sample(u2, draft), false
}

// checkAcceptedBoth checks that greedy and sampled requests both accepted
// drafts (so both acceptance rules ran in flight).
func checkAcceptedBoth(t *testing.T, items []workItem, res []workResult) {
	t.Helper()
	var greedy, sampled int
	for i, it := range items {
		if it.req.Sampling.Temperature > 0 {
			sampled += res[i].res.AcceptedTokens
		} else {
			greedy += res[i].res.AcceptedTokens
		}
	}
	if greedy == 0 || sampled == 0 {
		t.Errorf("accepted drafts: %d greedy, %d sampled; want both", greedy, sampled)
	}
}

// watchInFlightFrees counts the blocks the head's pool gets back while a
// micro-batch in flight holds them (read once the scheduler is closed).
func watchInFlightFrees(head *Engine, ring *Ring) *int {
	n := new(int)
	prev := head.KV.released
	head.KV.released = func(b []int32) {
		for _, mb := range ring.pipe.flight {
			for _, q := range mb.order {
				for _, blk := range b {
					if slices.Contains(q.seq.Blocks, blk) {
						*n++
					}
				}
			}
		}
		prev(b)
	}
	return n
}

// checkPipeDrained checks the head after its scheduler closed: every block
// free, nothing in flight, more than one micro-batch in flight at a time
// during the run, and no block freed under a micro-batch in flight.
func checkPipeDrained(t *testing.T, head *Engine, ring *Ring, violations int) {
	t.Helper()
	if free := head.KV.FreeBlocks(); free != head.KV.NumBlocks {
		t.Errorf("%d of %d blocks free after the requests", free, head.KV.NumBlocks)
	}
	if n := len(ring.pipe.sched.InFlight()); n != 0 || len(ring.pipe.flight) != 0 {
		t.Errorf("%d micro-batches still in flight (%d at the head)", n, len(ring.pipe.flight))
	}
	if ring.pipe.peak < 2 {
		t.Errorf("at most %d micro-batch in flight at once: the ring ran one step at a time", ring.pipe.peak)
	}
	if violations > 0 {
		t.Errorf("%d blocks freed while a micro-batch in flight held them", violations)
	}
}

// compareSpecCounters checks the spec_decode counters of got against the
// synchronous run's.
func compareSpecCounters(t *testing.T, got, want *Scheduler) {
	t.Helper()
	g, _ := got.SpecDecodeStats()
	w, _ := want.SpecDecodeStats()
	if fmt.Sprint(g) != fmt.Sprint(w) {
		t.Errorf("spec_decode counters %+v, synchronous %+v", g, w)
	}
	if w.NumDrafts == 0 {
		t.Error("no verify step carried drafts")
	}
}

// TestSpecPipeCancelInFlight: a request cancelled while its verify step is
// downstream keeps its blocks until the step is back, is dropped there (no
// tokens past the cancellation), and the other requests' tokens stay those
// of the synchronous loop.
func TestSpecPipeCancelInFlight(t *testing.T) {
	for _, c := range []struct{ stages, micro, n int }{{2, 2, 1}, {3, 3, 3}} {
		t.Run(fmt.Sprintf("%dstages/%dmb/N%d", c.stages, c.micro, c.n), func(t *testing.T) {
			dir := fixtureDir("tiny")
			opt := specPipeOpt
			opt.Speculative = SpecConfig{Method: "mtp", NumSpeculativeTokens: c.n}
			ref := NewScheduler(wholeEngine(t, dir, specPipeKV), opt)
			items := specPipeWork(ref.eng.Cfg.VocabSize, false)
			want := runWorkload(t, ref, items)
			ref.Close()

			const victim = 4 // 70 prompt tokens, 18 new: several verify steps
			head, ring := inProcessPipelineOpt(t, dir, splitLayers(numLayers(t, dir), c.stages), specPipeKV, RingOptions{MicroBatches: c.micro})
			violations := watchInFlightFrees(head, ring)
			s := NewScheduler(head, opt)
			var cancelledAt, sentSince int
			s.spec.submitted = func(reqs []*request) {
				for _, r := range reqs {
					if len(r.req.PromptIDs) != len(items[victim].req.PromptIDs) || r.generated < 3 || r.cancelled.Load() {
						continue
					}
					// As Generate does when its context ends, from the loop
					// itself: the verify step just sent is in flight.
					r.cancelled.Store(true)
					cancelledAt = r.generated
					sentSince = len(ring.pipe.flight)
				}
			}
			got := runWorkload(t, s, items)
			s.Close()
			checkPipeDrained(t, head, ring, *violations)
			if cancelledAt == 0 || sentSince == 0 {
				t.Fatalf("the request was not cancelled in flight (at %d tokens, %d micro-batches in flight)", cancelledAt, sentSince)
			}
			v := got[victim]
			if !errors.Is(v.err, context.Canceled) || v.res.Finish != FinishAbort {
				t.Errorf("cancelled request: %v %+v, want context.Canceled and an abort", v.err, v.res)
			}
			if len(v.tokens) != cancelledAt || !slices.Equal(v.tokens, want[victim].tokens[:cancelledAt]) {
				t.Errorf("cancelled request streamed %v, want the %d tokens before the cancellation %v", v.tokens, cancelledAt, want[victim].tokens)
			}
			got[victim], want[victim] = workResult{}, workResult{}
			compareWork(t, got, want)
		})
	}
}

// TestSpecPipeRingFailureEndsRequests: when the ring breaks with
// speculative micro-batches in flight, every request still running ends
// with ErrPipelineDown within the step timeout (none hangs), those done
// before have the synchronous tokens, and every block is free.
func TestSpecPipeRingFailureEndsRequests(t *testing.T) {
	dir := fixtureDir("tiny")
	opt := specPipeOpt
	opt.Speculative = SpecConfig{Method: "mtp", NumSpeculativeTokens: 2}
	ref := NewScheduler(wholeEngine(t, dir, specPipeKV), opt)
	items := specPipeWork(ref.eng.Cfg.VocabSize, false)
	want := runWorkload(t, ref, items)
	ref.Close()

	opt.Logger = slog.New(slog.DiscardHandler) // the failed steps' errors are the point
	ropt := RingOptions{MicroBatches: 3, StepTimeout: 500 * time.Millisecond}
	head, ring := inProcessPipelineOpt(stageErrorsLogged{t}, dir, splitLayers(numLayers(t, dir), 3), specPipeKV, ropt)
	s := NewScheduler(head, opt)
	sent, broken := 0, false
	s.spec.submitted = func([]*request) {
		if sent++; sent >= 8 && len(ring.pipe.flight) > 1 && !broken {
			broken = true
			ring.out.Close() // the link to stage 1 goes away with micro-batches in flight
		}
	}
	start := time.Now()
	got := runWorkload(t, s, items)
	elapsed := time.Since(start)
	s.Close()
	failed := 0
	for i, g := range got {
		switch {
		case g.err == nil:
			if !slices.Equal(g.tokens, want[i].tokens) || g.res != want[i].res {
				t.Errorf("request %d: %v %+v, synchronous %v %+v", i, g.tokens, g.res, want[i].tokens, want[i].res)
			}
		case errors.Is(g.err, ErrPipelineDown):
			failed++
		default:
			t.Errorf("request %d: %v, want ErrPipelineDown", i, g.err)
		}
	}
	if failed == 0 || ring.Err() == nil {
		t.Fatalf("%d requests failed, ring error %v: the ring did not break in flight", failed, ring.Err())
	}
	if elapsed > 5*time.Second {
		t.Errorf("the requests took %v to end", elapsed)
	}
	if free := head.KV.FreeBlocks(); free != head.KV.NumBlocks {
		t.Errorf("%d of %d blocks free after the requests", free, head.KV.NumBlocks)
	}
	t.Logf("%d of %d requests failed; all ended in %v", failed, len(items), elapsed)
}

// stageErrorsLogged logs what inProcessPipelineStages reports as errors
// when the test ends: the stages' errors, expected once the ring is broken.
type stageErrorsLogged struct{ testing.TB }

func (t stageErrorsLogged) Errorf(format string, args ...any) { t.TB.Logf(format, args...) }
