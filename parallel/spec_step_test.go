package parallel

import (
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model/modeltest"
)

// specRequest is one request of the identity tests; stopAfter, when set,
// is a token sequence whose emission ends the request through the emit
// callback, as the API layer ends a request at a stop string.
type specRequest struct {
	name      string
	req       Request
	stopAfter []int
}

// specRequests are, per golden prompt, plain runs, short max_tokens, a stop
// token, a stop "string", and min_tokens banning a stop token the greedy
// output would otherwise end at.
func specRequests(g *modeltest.Golden) []specRequest {
	var out []specRequest
	for i := range 4 {
		prompt := ints(g.IDs(fmt.Sprintf("prompt_%d", i)))
		greedy := ints(g.IDs(fmt.Sprintf("greedy_%d", i)))
		out = append(out,
			specRequest{name: fmt.Sprintf("p%d/16", i), req: Request{PromptIDs: prompt, MaxNewTokens: 16, IgnoreEOS: true}},
			specRequest{name: fmt.Sprintf("p%d/max5", i), req: Request{PromptIDs: prompt, MaxNewTokens: 5, IgnoreEOS: true}},
			specRequest{name: fmt.Sprintf("p%d/max2", i), req: Request{PromptIDs: prompt, MaxNewTokens: 2, IgnoreEOS: true}},
			specRequest{name: fmt.Sprintf("p%d/stoptoken", i), req: Request{PromptIDs: prompt, MaxNewTokens: 16, IgnoreEOS: true, StopTokenIDs: []int{greedy[5]}}},
			specRequest{name: fmt.Sprintf("p%d/stopstring", i), req: Request{PromptIDs: prompt, MaxNewTokens: 16, IgnoreEOS: true}, stopAfter: greedy[3:5]},
			specRequest{name: fmt.Sprintf("p%d/mintokens", i), req: Request{PromptIDs: prompt, MaxNewTokens: 12, MinNewTokens: 6, StopTokenIDs: []int{greedy[2]}}},
		)
	}
	return out
}

// runSpecRequests runs every request at once on s and returns the outcomes.
func runSpecRequests(s *Scheduler, reqs []specRequest) []workResult {
	rs := make([]Request, len(reqs))
	for i, r := range reqs {
		rs[i] = r.req
	}
	return generateAll(s, rs, func(i int, toks []int) bool {
		n := len(reqs[i].stopAfter)
		return n > 0 && len(toks) >= n && slices.Equal(toks[len(toks)-n:], reqs[i].stopAfter)
	})
}

func specScheduler(t *testing.T, fixture string, spec SpecConfig) *Scheduler {
	t.Helper()
	e := loadFixtureEngine(t, filepath.Join("..", "testdata", "glm4moe", fixture, "model"))
	if err := spec.CheckEngine(e); err != nil {
		t.Fatal(err)
	}
	// A small prefill budget: long prompts are chunked alongside verify steps.
	s := NewScheduler(e, SchedulerOptions{MaxNumSeqs: 8, PrefillTokens: 24, Speculative: spec})
	t.Cleanup(s.Close)
	return s
}

// Greedy output with MTP on is the output with MTP off, token for token,
// with stop tokens, stop strings, max_tokens and min_tokens, under
// concurrency and chunked prefill, on both fixtures at N = 1, 2, 3.
func TestSpecGreedyIdentity(t *testing.T) {
	for _, fixture := range []string{"tiny", "tiny_qknorm"} {
		t.Run(fixture, func(t *testing.T) {
			g := modeltest.OpenGolden(t, filepath.Join("..", "testdata", "glm4moe", fixture))
			reqs := specRequests(g)
			want := runSpecRequests(specScheduler(t, fixture, SpecConfig{}), reqs)
			for i, o := range want {
				if o.err != nil {
					t.Fatalf("%s without speculation: %v", reqs[i].name, o.err)
				}
				if reqs[i].name[3:] == "16" && fmt.Sprint(o.tokens) != fmt.Sprint(ints(g.IDs(fmt.Sprintf("greedy_%d", i/6)))) {
					t.Fatalf("%s without speculation is not the golden greedy output", reqs[i].name)
				}
			}
			oracle := specOracle(reqs, want)
			for n := 1; n <= 3; n++ {
				for _, drafts := range []string{"mtp", "oracle"} {
					s := specScheduler(t, fixture, SpecConfig{"mtp", n})
					if drafts == "oracle" {
						s.spec.override = oracle
					}
					got := runSpecRequests(s, reqs)
					var drafted, accepted int
					for i, o := range got {
						w := want[i]
						if o.err != nil || fmt.Sprint(o.tokens) != fmt.Sprint(w.tokens) || o.res.Finish != w.res.Finish ||
							o.res.CompletionTokens != w.res.CompletionTokens {
							t.Errorf("N=%d %s drafts, %s: %v %v (%s, %d tokens), want %v (%s, %d tokens)", n, drafts, reqs[i].name, o.tokens, o.err,
								o.res.Finish, o.res.CompletionTokens, w.tokens, w.res.Finish, w.res.CompletionTokens)
						}
						if o.res.AcceptedTokens > o.res.DraftTokens {
							t.Errorf("N=%d %s: accepted %d of %d drafts", n, reqs[i].name, o.res.AcceptedTokens, o.res.DraftTokens)
						}
						drafted += o.res.DraftTokens
						accepted += o.res.AcceptedTokens
					}
					s.Close() // frees the sequences the stop strings cancelled
					st := checkSpecCounters(t, s, n)
					// Requests cut by a stop string report no statistics.
					if int64(drafted) > st.NumDraftTokens || int64(accepted) > st.NumAcceptedTokens {
						t.Errorf("N=%d: requests drafted %d and accepted %d, counters %d and %d", n, drafted, accepted,
							st.NumDraftTokens, st.NumAcceptedTokens)
					}
					if free := s.eng.KV.FreeBlocks(); free != s.eng.KV.NumBlocks {
						t.Errorf("N=%d: %d of %d blocks free after every request ended", n, free, s.eng.KV.NumBlocks)
					}
					t.Logf("N=%d %s drafts: %d verify steps with drafts, %d drafts, %d accepted (%.0f%%), by position %v", n, drafts,
						st.NumDrafts, st.NumDraftTokens, st.NumAcceptedTokens,
						100*float64(st.NumAcceptedTokens)/float64(max(1, st.NumDraftTokens)), st.AcceptedPerPos)
					if drafts == "oracle" && st.AcceptedPerPos[n-1] == 0 {
						t.Errorf("N=%d: the oracle's drafts were never all accepted", n)
					}
				}
			}
		})
	}
}

// checkSpecCounters checks the counters add up: accepted ≤ drafted ≤ N per
// verify step, and acceptance by position falls with the position and sums
// to the accepted drafts.
func checkSpecCounters(t *testing.T, s *Scheduler, n int) SpecDecodeStats {
	t.Helper()
	st, ok := s.SpecDecodeStats()
	if !ok {
		t.Fatal("no speculation counters")
	}
	if st.NumDrafts == 0 || st.NumAcceptedTokens > st.NumDraftTokens || st.NumDraftTokens > int64(n)*st.NumDrafts || len(st.AcceptedPerPos) != n {
		t.Errorf("counters %+v", st)
	}
	var sum int64
	for j, a := range st.AcceptedPerPos {
		sum += a
		if j > 0 && a > st.AcceptedPerPos[j-1] {
			t.Errorf("accepted at position %d (%d) exceeds position %d (%d)", j, a, j-1, st.AcceptedPerPos[j-1])
		}
	}
	if sum != st.NumAcceptedTokens || st.AcceptedPerPos[0] > st.NumDrafts {
		t.Errorf("accepted by position %v sum to %d of %d accepted, over %d drafts", st.AcceptedPerPos, sum, st.NumAcceptedTokens, st.NumDrafts)
	}
	return st
}

// specOracle drafts from the output without speculation (the request's own
// continuation, the stop token after it), wrong at about three positions in
// ten, so that verify steps accept runs of every length, reject mid-run, and
// accept the token that ends a request.
func specOracle(reqs []specRequest, want []workResult) func(r *request, drafts []int32) {
	ref := map[string][]int{}
	for i, sr := range reqs {
		if sr.stopAfter != nil {
			continue // the same Request as the uncut one, whose continuation it shares
		}
		toks := want[i].tokens
		if want[i].res.Finish == FinishStop && len(sr.req.StopTokenIDs) > 0 && sr.stopAfter == nil {
			toks = append(slices.Clone(toks), sr.req.StopTokenIDs[0])
		}
		ref[fmt.Sprint(sr.req)] = toks
	}
	return func(r *request, drafts []int32) {
		toks := ref[fmt.Sprint(r.req)]
		for j := range drafts {
			idx := r.generated + j
			if idx < len(toks) && (idx*7+len(r.req.PromptIDs))%10 >= 3 {
				drafts[j] = int32(toks[idx])
			}
		}
	}
}

// A step budget (--max-num-batched-tokens) smaller than the sequences'
// rows with all their drafts: drafts are cut to fit (the engine refuses
// larger steps), and the output stays the plain one.
func TestSpecStepBudget(t *testing.T) {
	g := modeltest.OpenGolden(t, filepath.Join("..", "testdata", "glm4moe", "tiny"))
	reqs := specRequests(g)[:12]
	var outs [2][]workResult
	for i, spec := range []SpecConfig{{}, {"mtp", 4}} {
		be := cpu.New(0)
		w := modeltest.LoadWeights(t, be, filepath.Join("..", "testdata", "glm4moe", "tiny", "model"))
		e, err := NewEngine(be, w, EngineOptions{BlockSize: 16, MaxTokens: 1024, MaxNumSeqs: 4, MaxNumBatchedTokens: 7})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(e.Close)
		s := NewScheduler(e, SchedulerOptions{MaxNumSeqs: 4, PrefillTokens: 7, Speculative: spec})
		if i == 1 {
			s.spec.override = specOracle(reqs, outs[0])
		}
		outs[i] = runSpecRequests(s, reqs)
		s.Close()
		if i == 1 {
			st := checkSpecCounters(t, s, 4)
			t.Logf("%d drafts, %d accepted, by position %v", st.NumDraftTokens, st.NumAcceptedTokens, st.AcceptedPerPos)
		}
	}
	for i := range reqs {
		a, b := outs[0][i], outs[1][i]
		if a.err != nil || b.err != nil || fmt.Sprint(a.tokens) != fmt.Sprint(b.tokens) || a.res.Finish != b.res.Finish {
			t.Errorf("%s: %v %v with MTP, %v %v without", reqs[i].name, b.tokens, b.err, a.tokens, a.err)
		}
	}
}
