package parallel

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model/modeltest"
)

// countingComm is a one-rank collective that records the tensors it sums
// (a sum over one rank leaves them as they are).
type countingComm struct {
	size, rank int
	shapes     [][]int
	bad        []string
}

func (c *countingComm) Size() int { return c.size }
func (c *countingComm) Rank() int { return c.rank }
func (c *countingComm) AllReduceSum(t *kernels.Tensor) error {
	if t.DType != kernels.F32 {
		c.bad = append(c.bad, fmt.Sprintf("%v tensor", t.DType))
	}
	c.shapes = append(c.shapes, slices.Clone(t.Shape))
	return nil
}

type fakeGroup struct{}

func (fakeGroup) Layers() (int, int)                                   { return 0, 1 }
func (fakeGroup) AllocKV(kernels.DType, int, int) error                { return nil }
func (fakeGroup) Run(context.Context, *kernels.Batch, []float32) error { return nil }

func TestOneRankCommRefusesOtherWorlds(t *testing.T) {
	for _, tc := range []struct {
		name  string
		c     kernels.Collective
		ranks RankGroup
		want  string // "" : accepted
	}{
		{"none", nil, nil, ""},
		{"one rank", &countingComm{size: 1}, nil, ""},
		{"two ranks", &countingComm{size: 2}, nil, "rank 0 of 2"},
		{"rank 1 of 1", &countingComm{size: 1, rank: 1}, nil, "rank 1 of 1"},
		{"with a rank group", &countingComm{size: 1}, fakeGroup{}, "rank group"},
	} {
		rc, err := oneRankComm(tc.c, tc.ranks)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want == "" && (rc == nil) != (tc.c == nil):
			t.Errorf("%s: RankComm %v for collective %v", tc.name, rc, tc.c)
		case tc.want == "" && rc != nil && (rc.TP != tc.c || rc.MoE != tc.c || !rc.SharedExpert || rc.Replicas != nil):
			t.Errorf("%s: RankComm %+v: want TP and MoE the collective, the shared expert added, no replica mask", tc.name, rc)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: error %v, want %q", tc.name, err, tc.want)
		}
	}
	be := cpu.New(0)
	w := modeltest.LoadWeights(t, be, filepath.Join("..", "testdata", "glm4moe", "tiny", "model"))
	if _, err := NewEngine(be, w, EngineOptions{Collective: &countingComm{size: 4}}); err == nil ||
		!strings.Contains(err.Error(), "engine: EngineOptions.Collective") {
		t.Errorf("NewEngine with a 4-rank collective: %v", err)
	}
}

// greedyBatch prefills each prompt, then decodes all of them together for
// steps steps, feeding back the argmax; it returns each sequence's tokens
// and every step's downloaded logits.
func greedyBatch(t *testing.T, e *Engine, prompts [][]int32, steps int) (tokens [][]int32, logits [][]float32) {
	t.Helper()
	V := e.Cfg.VocabSize
	seqs := make([]*Seq, len(prompts))
	tokens = make([][]int32, len(prompts))
	last := make([]int32, len(prompts))
	step := func(in []StepInput) []float32 {
		res, err := e.Step(in, false)
		if err != nil {
			t.Fatal(err)
		}
		l, err := e.BE.Download(res.Logits)
		res.Release()
		if err != nil {
			t.Fatal(err)
		}
		logits = append(logits, l)
		return l
	}
	for i, p := range prompts {
		seqs[i] = &Seq{}
		l := step([]StepInput{{Seq: seqs[i], Tokens: p}})
		last[i] = modeltest.Argmax(l[:V])
		tokens[i] = append(tokens[i], last[i])
	}
	for range steps {
		in := make([]StepInput, len(seqs))
		for i, s := range seqs {
			in[i] = StepInput{Seq: s, Tokens: []int32{last[i]}}
		}
		l := step(in)
		for i := range seqs {
			last[i] = modeltest.Argmax(l[i*V : (i+1)*V])
			tokens[i] = append(tokens[i], last[i])
		}
	}
	return tokens, logits
}

func fixturePrompts(t *testing.T, root string) [][]int32 {
	g := modeltest.OpenGolden(t, root)
	var out [][]int32
	for i := range 3 {
		out = append(out, g.IDs(fmt.Sprintf("prompt_%d", i)))
	}
	return out
}

// sameRuns fails unless two greedy runs agree token for token, and their
// logits bit for bit (tol 0: a sum over one rank changes nothing) or
// within tol of the largest |logit| (kernels whose reductions may order
// differently from run to run); it returns the largest relative difference.
func sameRuns(t *testing.T, what string, tokA, tokB [][]int32, logA, logB [][]float32, tol float64) float64 {
	t.Helper()
	for i := range tokA {
		if !slices.Equal(tokA[i], tokB[i]) {
			t.Errorf("%s: sequence %d: tokens %v with the communicator, %v without", what, i, tokA[i], tokB[i])
		}
	}
	if len(logA) != len(logB) {
		t.Fatalf("%s: %d steps' logits, want %d", what, len(logA), len(logB))
	}
	worst := 0.0
	for s := range logA {
		if len(logA[s]) != len(logB[s]) {
			t.Fatalf("%s: step %d: %d logits, want %d", what, s, len(logA[s]), len(logB[s]))
		}
		var diff, ref float64
		for i, a := range logA[s] {
			diff = max(diff, math.Abs(float64(a)-float64(logB[s][i])))
			ref = max(ref, math.Abs(float64(logB[s][i])))
		}
		rel := diff / max(ref, 1e-30)
		worst = max(worst, rel)
		if (tol == 0 && !slices.Equal(logA[s], logB[s])) || rel > tol {
			t.Errorf("%s: step %d: logits differ with the one-rank communicator (max |Δ| %.3g, relative %.3g, tolerance %g)", what, s, diff, rel, tol)
		}
	}
	return worst
}

// TestOneRankCommEagerSteps runs the fixture's layers through a one-rank
// communicator on the CPU: every layer sums o_proj's and the MLP's (or MoE's)
// outputs once each per step, and nothing changes.
func TestOneRankCommEagerSteps(t *testing.T) {
	for _, name := range []string{"tiny", "tiny_qknorm"} {
		t.Run(name, func(t *testing.T) {
			root := filepath.Join("..", "testdata", "glm4moe", name)
			prompts := fixturePrompts(t, root)
			plain := loadFixtureEngine(t, filepath.Join(root, "model"))
			be := cpu.New(0)
			c := &countingComm{size: 1}
			e, err := NewEngine(be, modeltest.LoadWeights(t, be, filepath.Join(root, "model")), EngineOptions{BlockSize: 16, MaxTokens: 1024, Collective: c})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(e.Close)
			c.shapes = nil // warm-up steps, if any
			const steps = 6
			tokA, logA := greedyBatch(t, e, prompts, steps)
			tokB, logB := greedyBatch(t, plain, prompts, steps)
			sameRuns(t, name, tokA, tokB, logA, logB, 0)
			layers := len(e.W.Layers)
			var want [][]int
			for _, p := range prompts { // the prefills
				for range 2 * layers {
					want = append(want, []int{len(p), e.Cfg.HiddenSize})
				}
			}
			for range steps * 2 * layers {
				want = append(want, []int{len(prompts), e.Cfg.HiddenSize})
			}
			if len(c.bad) > 0 || !slices.EqualFunc(c.shapes, want, slices.Equal) {
				t.Errorf("all-reduces: %d of shapes %v (bad %v), want %d: 2 per layer per step, [tokens, hidden] f32",
					len(c.shapes), c.shapes, c.bad, len(want))
			}
		})
	}
}

// TestOneRankCommGraphs captures decode graphs (the CPU graph double) with
// the communicator in every layer: the capture calls it, the replays give
// the plain graph engine's bits.
func TestOneRankCommGraphs(t *testing.T) {
	root := filepath.Join("..", "testdata", "glm4moe", "tiny")
	prompts := fixturePrompts(t, root)
	c := &countingComm{size: 1}
	e, be := graphEngine(t, "tiny", EngineOptions{Collective: c, GraphMinContext: 16})
	plain, _ := graphEngine(t, "tiny", EngineOptions{GraphMinContext: 16})
	c.shapes = nil
	const steps = 8
	tokA, logA := greedyBatch(t, e, prompts, steps)
	tokB, logB := greedyBatch(t, plain, prompts, steps)
	sameRuns(t, "graphs", tokA, tokB, logA, logB, 0)
	st := e.GraphStats()
	if st.Replays == 0 {
		t.Fatalf("no decode step replayed a graph: %+v", st)
	}
	captured := 0
	for _, s := range c.shapes {
		if s[0] == 4 { // three sequences pad to the bucket of 4 rows
			captured++
		}
	}
	if captured == 0 {
		t.Errorf("no all-reduce of a padded bucket's [4, hidden] rows: the captured layers skip the communicator (shapes %v)", c.shapes)
	}
	checkReleased(t, e, be)
}
