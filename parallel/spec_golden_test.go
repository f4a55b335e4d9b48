package parallel

import (
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/glmtopo/glmtopo/model/modeltest"
)

// With one draft per step, the draft for position q is the MTP layer's
// argmax at position q-2 fed the token at q-1, all tokens of the final
// (greedy) output: so the acceptance a greedy run must measure follows from
// teacher-forced MTP logits over the golden sequence. Its first draft per
// prompt comes straight from the goldens' mtp_logits (the prompt's last
// position, fed the first greedy token); later ones from the engine's MTP
// layer run over prompt + greedy output, checked against the goldens where
// they overlap (the prompt's positions).
func TestSpecAcceptanceMatchesGoldens(t *testing.T) {
	const maxNew = 16
	for _, fixture := range []string{"tiny", "tiny_qknorm"} {
		t.Run(fixture, func(t *testing.T) {
			root := filepath.Join("..", "testdata", "glm4moe", fixture)
			g := modeltest.OpenGolden(t, root)
			ref := loadFixtureEngine(t, filepath.Join(root, "model"))
			V := ref.Cfg.VocabSize
			var wantDrafts, wantAccepted int
			var reqs []specRequest
			wantDraft := map[[2]int]int32{} // (prompt length, tokens generated) → the draft the MTP logits give
			for i := range 4 {
				prompt := g.IDs(fmt.Sprintf("prompt_%d", i))
				greedy := g.IDs(fmt.Sprintf("greedy_%d", i))
				T := len(prompt)
				full := append(slices.Clone(prompt), greedy...)
				agree := teacherForcedAgreement(t, ref, full[:T+maxNew-1])
				golden := g.F32(fmt.Sprintf("mtp_logits_%d", i))
				for tpos := 0; tpos < T; tpos++ {
					if got, want := agree.argmax[tpos], modeltest.Argmax(golden[tpos*V:(tpos+1)*V]); got != want {
						t.Fatalf("prompt %d: MTP argmax at position %d is %d, golden %d", i, tpos, got, want)
					}
				}
				if first := modeltest.Argmax(golden[(T-1)*V:T*V]) == greedy[1]; first != agree.at(T+1, full) {
					t.Fatalf("prompt %d: first-draft agreement differs from the goldens'", i)
				}
				// One draft per step: accepted → the bonus token too.
				for gen := 1; gen < maxNew; {
					if maxNew-gen-1 < 1 {
						gen++ // the last token needs no draft
						continue
					}
					wantDrafts++
					wantDraft[[2]int{T, gen}] = agree.argmax[T+gen-2]
					if agree.at(T+gen, full) {
						wantAccepted++
						gen += 2
					} else {
						gen++
					}
				}
				reqs = append(reqs, specRequest{name: fmt.Sprint(i), req: Request{PromptIDs: ints(prompt), MaxNewTokens: maxNew, IgnoreEOS: true}})
			}
			s := specScheduler(t, fixture, SpecConfig{"mtp", 1})
			// Every draft the scheduler makes, not just the count, is the MTP logits' argmax.
			var mu sync.Mutex
			seen := 0
			s.spec.override = func(r *request, drafts []int32) {
				mu.Lock()
				defer mu.Unlock()
				if len(drafts) == 0 {
					return
				}
				seen++
				key := [2]int{len(r.req.PromptIDs), r.generated}
				if want, ok := wantDraft[key]; !ok || drafts[0] != want {
					t.Errorf("prompt of %d tokens after %d generated: draft %d, MTP logits give %d (expected a draft: %v)", key[0], key[1], drafts[0], want, ok)
				}
			}
			for i, o := range runSpecRequests(s, reqs) {
				if want := ints(g.IDs(fmt.Sprintf("greedy_%d", i))); o.err != nil || fmt.Sprint(o.tokens) != fmt.Sprint(want) {
					t.Fatalf("prompt %d: %v %v, golden %v", i, o.tokens, o.err, want)
				}
			}
			st := checkSpecCounters(t, s, 1)
			if seen != wantDrafts {
				t.Errorf("the scheduler drafted %d times, the MTP logits imply %d", seen, wantDrafts)
			}
			if st.NumDraftTokens != int64(wantDrafts) || st.NumAcceptedTokens != int64(wantAccepted) {
				t.Errorf("measured %d of %d drafts accepted; the MTP logits imply %d of %d", st.NumAcceptedTokens, st.NumDraftTokens,
					wantAccepted, wantDrafts)
			}
			t.Logf("%d of %d drafts accepted, as the MTP logits imply", st.NumAcceptedTokens, st.NumDraftTokens)
		})
	}
}

// mtpAgreement holds the MTP layer's argmax at every position of a
// teacher-forced sequence (position t fed the token at t+1: a guess for t+2).
type mtpAgreement struct{ argmax []int32 }

// at says whether the draft for position q (made at q-2) is the token there.
func (a mtpAgreement) at(q int, full []int32) bool { return a.argmax[q-2] == full[q] }

func teacherForcedAgreement(t *testing.T, e *Engine, seqToks []int32) mtpAgreement {
	t.Helper()
	seq := &Seq{}
	defer e.KV.Release(seq)
	n := len(seqToks) - 1 // the MTP layer needs the next token of every position
	res, err := e.Step([]StepInput{{Seq: seq, Tokens: seqToks[:n]}}, true)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Release()
	m, err := e.MTPStep([]StepInput{{Seq: seq, Tokens: seqToks[1:]}}, res.Normed)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Release()
	lg, err := e.BE.Download(m.Logits)
	if err != nil {
		t.Fatal(err)
	}
	V := e.Cfg.VocabSize
	a := mtpAgreement{}
	for tpos := range n {
		a.argmax = append(a.argmax, modeltest.Argmax(lg[tpos*V:(tpos+1)*V]))
	}
	return a
}

// Drafts past the first feed the MTP layer its own output (before
// shared_head) and the previous draft one position further, as vLLM's MTP
// proposer does: the scheduler's drafts after a prompt equal that recursion
// computed here step by step with the model's forward.
func TestSpecRecursiveDrafts(t *testing.T) {
	const n = 3
	root := filepath.Join("..", "testdata", "glm4moe", "tiny_qknorm")
	g := modeltest.OpenGolden(t, root)
	ref := loadFixtureEngine(t, filepath.Join(root, "model"))
	for i := range 4 {
		prompt := g.IDs(fmt.Sprintf("prompt_%d", i))
		want := recursiveDrafts(t, ref, prompt, g.IDs(fmt.Sprintf("greedy_%d", i))[0], n)
		s := specScheduler(t, "tiny_qknorm", SpecConfig{"mtp", n})
		var got []int32
		s.spec.override = func(r *request, d []int32) {
			if r.generated == 1 {
				got = slices.Clone(d)
			}
		}
		runSpecRequests(s, []specRequest{{req: Request{PromptIDs: ints(prompt), MaxNewTokens: 8, IgnoreEOS: true}}})
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("prompt %d: drafts after the prompt %v, recursion gives %v", i, got, want)
		}
	}
}

// recursiveDrafts runs the main model over prompt, then the MTP layer over
// the prompt's positions fed the next tokens (first the greedy token), and
// n-1 more times over its own last output row and last draft.
func recursiveDrafts(t *testing.T, e *Engine, prompt []int32, first int32, n int) []int32 {
	t.Helper()
	seq := &Seq{}
	defer e.KV.Release(seq)
	res, err := e.Step([]StepInput{{Seq: seq, Tokens: prompt}}, true)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Release()
	rel := &releaser{be: e.BE}
	defer rel.release()
	next := append(slices.Clone(prompt[1:]), first)
	hPrev, err := e.gatherRows(rel, res.Normed, seqRows(len(prompt)))
	if err != nil {
		t.Fatal(err)
	}
	var drafts []int32
	for d := 0; d < n; d++ {
		x, logits, err := e.mtpForward(rel, []StepInput{{Seq: seq, Tokens: next}}, hPrev, []int{len(next) - 1})
		if err != nil {
			t.Fatal(err)
		}
		lg, err := e.BE.Download(logits)
		if err != nil {
			t.Fatal(err)
		}
		drafts = append(drafts, modeltest.Argmax(lg))
		next, hPrev = drafts[len(drafts)-1:], x
	}
	return drafts
}

func seqRows(n int) []int {
	rows := make([]int, n)
	for i := range rows {
		rows[i] = i
	}
	return rows
}
