package parallel

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
)

// Speculative sampling leaves the output distribution the target model's:
// at temperature 1 a chi-square test cannot tell the first sampled tokens
// of many seeded requests with MTP on from those with MTP off, and it can
// when the rejection rule is broken.
//
// The tiny model's distributions are nearly flat (its largest probability
// is about 2%), so that a draft would almost never be accepted and a broken
// rule would hardly show; the requests therefore sample at temperature 1
// from the top 4 tokens, and the drafts are the target's own argmax (set
// through the test hook after the MTP layer drafted), accepted about a
// third of the time. Two drafts per step: the cells are the first three
// tokens (the first from the plain sampler, the next two verified in one
// step, which also samples the fourth when both drafts are accepted).
func TestSpecSamplingDistribution(t *testing.T) {
	const seeds = 500
	root := filepath.Join("..", "testdata", "glm4moe", "tiny")
	prompt := []int{11, 500, 7, 93}
	ref := newArgmaxOracle(t, loadFixtureEngine(t, filepath.Join(root, "model")), prompt)
	req := func(seed int) Request {
		return Request{PromptIDs: prompt, MaxNewTokens: 4, IgnoreEOS: true,
			Sampling: SamplingParams{Temperature: 1, TopK: 4, Seed: int64(seed), HasSeed: true}}
	}
	run := func(spec SpecConfig, rule acceptRule, first, seeds int) map[string]int {
		e := loadFixtureEngine(t, filepath.Join(root, "model"))
		s := NewScheduler(e, SchedulerOptions{MaxNumSeqs: 64, MaxWaiting: seeds, Speculative: spec})
		defer s.Close()
		if s.spec != nil {
			s.spec.accept = rule
			s.spec.override = ref.draft
		}
		cells := map[string]int{}
		var mu sync.Mutex
		var wg sync.WaitGroup
		for seed := first; seed < first+seeds; seed++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				toks, _, err := collect(ctx, s, req(seed))
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					t.Error(err)
				}
				cells[fmt.Sprint(toks[:min(3, len(toks))])]++
			}()
		}
		wg.Wait()
		if s.spec != nil {
			st, _ := s.SpecDecodeStats()
			t.Logf("%d drafts, %d accepted; by position %v", st.NumDraftTokens, st.NumAcceptedTokens, st.AcceptedPerPos)
		}
		return cells
	}
	off := run(SpecConfig{}, nil, 0, seeds)
	spec := SpecConfig{"mtp", 2}
	// The same seeds reproduce the same tokens with MTP on.
	if a, b := run(spec, exactAccept, seeds, 100), run(spec, exactAccept, seeds, 100); fmt.Sprint(a) != fmt.Sprint(b) {
		t.Fatal("seeded requests gave different tokens in two runs")
	}
	if p := chiSquareTwoSample(off, run(spec, exactAccept, seeds, seeds)); p <= 0.01 {
		t.Errorf("MTP on vs off: p = %.4g ≤ 0.01: speculative sampling changed the distribution", p)
	} else {
		t.Logf("MTP on vs off: p = %.3f", p)
	}
	for name, broken := range map[string]acceptRule{
		"always accept": func(d targetDist, x int32, u1, u2 float32) (int32, bool) { return x, true },
		"resample from p, not the residual": func(d targetDist, x int32, u1, u2 float32) (int32, bool) {
			if float64(u1) < d.prob(x) {
				return x, true
			}
			return d.sample(u2, -1), false
		},
	} {
		if p := chiSquareTwoSample(off, run(spec, broken, seeds, seeds)); p > 0.01 {
			t.Errorf("rule %q: p = %.3f: the test cannot tell a broken rule", name, p)
		} else {
			t.Logf("rule %q: p = %.2g", name, p)
		}
	}
}

// argmaxOracle drafts the target's argmax after each context (the plain
// model's greedy continuation), from its own engine.
type argmaxOracle struct {
	t      *testing.T
	e      *Engine
	prompt []int
	mu     sync.Mutex
	memo   map[string]int32
}

func newArgmaxOracle(t *testing.T, e *Engine, prompt []int) *argmaxOracle {
	return &argmaxOracle{t: t, e: e, prompt: prompt, memo: map[string]int32{}}
}

func (o *argmaxOracle) next(ctx []int32) int32 {
	key := fmt.Sprint(ctx)
	if tok, ok := o.memo[key]; ok {
		return tok
	}
	seq := &Seq{}
	defer o.e.KV.Release(seq)
	res, err := o.e.Step([]StepInput{{Seq: seq, Tokens: ctx}}, false)
	if err != nil {
		o.t.Error(err)
		return 0
	}
	defer res.Release()
	tok, err := o.e.BE.Sample(res.Logits, []kernels.SampleParams{{}})
	if err != nil {
		o.t.Error(err)
		return 0
	}
	o.memo[key] = tok[0]
	return tok[0]
}

// draft is the scheduler's override hook.
func (o *argmaxOracle) draft(r *request, drafts []int32) {
	r.mu.Lock()
	ctx := append(toI32(o.prompt), toI32(r.tokens)...)
	r.mu.Unlock()
	o.mu.Lock()
	defer o.mu.Unlock()
	for j := range drafts {
		drafts[j] = o.next(ctx)
		ctx = append(ctx, drafts[j])
	}
}

// chiSquareTwoSample is the p-value of Pearson's test that two samples of
// equal size come from one distribution over the cells; cells seen fewer
// than 10 times in both together are pooled.
func chiSquareTwoSample(a, b map[string]int) float64 {
	keys := map[string]bool{}
	for k := range a {
		keys[k] = true
	}
	for k := range b {
		keys[k] = true
	}
	sorted := make([]string, 0, len(keys))
	for k := range keys {
		sorted = append(sorted, k)
	}
	sort.Strings(sorted)
	var stat float64
	cells, rareA, rareB := 0, 0, 0
	for _, k := range sorted {
		x, y := a[k], b[k]
		if x+y < 10 {
			rareA, rareB = rareA+x, rareB+y
			continue
		}
		stat += float64((x-y)*(x-y)) / float64(x+y)
		cells++
	}
	if rareA+rareB > 0 {
		stat += float64((rareA-rareB)*(rareA-rareB)) / float64(rareA+rareB)
		cells++
	}
	if cells < 2 {
		return 1
	}
	return gammaQ(float64(cells-1)/2, stat/2)
}

// gammaQ is the regularised upper incomplete gamma function Q(s, x), the
// chi-square survival function at 2x with 2s degrees of freedom.
func gammaQ(s, x float64) float64 {
	if x <= 0 {
		return 1
	}
	lg, _ := math.Lgamma(s)
	if x < s+1 { // series for P
		sum, term := 1/s, 1/s
		for n := 1; n < 1000; n++ {
			term *= x / (s + float64(n))
			sum += term
			if term < sum*1e-15 {
				break
			}
		}
		return 1 - sum*math.Exp(-x+s*math.Log(x)-lg)
	}
	// Continued fraction for Q (Lentz).
	const tiny = 1e-300
	b := x + 1 - s
	c, d := 1/tiny, 1/b
	h := d
	for i := 1; i < 1000; i++ {
		an := -float64(i) * (float64(i) - s)
		b += 2
		d = an*d + b
		if math.Abs(d) < tiny {
			d = tiny
		}
		c = b + an/c
		if math.Abs(c) < tiny {
			c = tiny
		}
		d = 1 / d
		del := d * c
		h *= del
		if math.Abs(del-1) < 1e-15 {
			break
		}
	}
	return math.Exp(-x+s*math.Log(x)-lg) * h
}

func TestGammaQ(t *testing.T) {
	for _, tc := range []struct{ df, x, want float64 }{
		{9, 21.666, 0.01}, {1, 3.841, 0.05}, {20, 31.410, 0.05}, {63, 92.010, 0.01}, {4, 1.064, 0.90},
	} {
		if got := gammaQ(tc.df/2, tc.x/2); math.Abs(got-tc.want) > 1e-3 {
			t.Errorf("chi-square survival df %g at %g: %.5f, want %.3f", tc.df, tc.x, got, tc.want)
		}
	}
}
