package parallel

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/model/modeltest"
)

func TestGraphBuckets(t *testing.T) {
	for _, tc := range []struct {
		name string
		got  []int
		want []int
	}{
		{"seqs 64", seqBuckets(64), []int{1, 2, 4, 8, 16, 24, 32, 48, 64}},
		{"seqs 40", seqBuckets(40), []int{1, 2, 4, 8, 16, 24, 32, 40}},
		{"seqs 256", seqBuckets(256), []int{1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256}},
		{"seqs 1", seqBuckets(1), []int{1}},
		{"ctx 256..8192", ctxBuckets(256, 8192), []int{256, 512, 1024, 2048, 4096, 8192}},
		{"ctx capped by the pool", ctxBuckets(256, 1000), []int{256, 512, 1000}},
		{"ctx pool under the minimum", ctxBuckets(2048, 1024), []int{1024}},
	} {
		if !slices.Equal(tc.got, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, tc.got, tc.want)
		}
	}
	for _, tc := range []struct{ n, want int }{{1, 1}, {3, 4}, {8, 8}, {9, 16}, {17, 24}, {49, 64}, {65, 0}} {
		if got := bucket(seqBuckets(64), tc.n); got != tc.want {
			t.Errorf("bucket(%d) = %d, want %d", tc.n, got, tc.want)
		}
	}
}

// graphEngine loads a fixture model onto a fresh graph double.
func graphEngine(t *testing.T, name string, opt EngineOptions) (*Engine, *graphCPU) {
	t.Helper()
	dir := filepath.Join("..", "testdata", "glm4moe", name, "model")
	be := newGraphCPU()
	w := modeltest.LoadWeights(t, be, dir)
	opt.BlockSize, opt.MaxTokens = 16, 1024
	e, err := NewEngine(be, w, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e, be
}

// checkReleased fails unless closing e left nothing of it on its double.
func checkReleased(t *testing.T, e *Engine, be *graphCPU) {
	t.Helper()
	e.Close()
	if len(be.live) != 0 || be.graphs != 0 || len(be.metas) != 0 || len(be.misuse) != 0 {
		t.Errorf("after Close: %d live tensors, %d graphs, %d batch metadata, misuse %v", len(be.live), be.graphs, len(be.metas), be.misuse)
	}
}

// twinEngines runs the same steps on an engine with decode graphs and on an
// eager one and compares their outputs: bit for bit when tol is 0 (the CPU
// kernels are batch-invariant, so padding rows must not change a real row at
// all), else within tol (max |Δ| / max |ref|, on the GPU where the graphs'
// attention splits for the bucket's context). The eager engine's greedy
// tokens feed both.
type twinEngines struct {
	t          *testing.T
	graph, ref *Engine
	tol        float64
	gs, rs     map[int]*Seq
	generated  map[int][]int32
	worst      float64 // largest relative difference seen
}

func newTwinEngines(t *testing.T, graph, ref *Engine, tol float64) *twinEngines {
	return &twinEngines{t: t, graph: graph, ref: ref, tol: tol, gs: map[int]*Seq{}, rs: map[int]*Seq{}, generated: map[int][]int32{}}
}

type seqInput struct {
	seq    int
	tokens []int32 // nil: the sequence's last generated token
}

func (tw *twinEngines) step(allRows bool, in ...seqInput) {
	t := tw.t
	t.Helper()
	var gin, rin []StepInput
	for _, x := range in {
		if tw.gs[x.seq] == nil {
			tw.gs[x.seq], tw.rs[x.seq] = &Seq{}, &Seq{}
		}
		toks := x.tokens
		if toks == nil {
			g := tw.generated[x.seq]
			toks = g[len(g)-1:]
		}
		gin = append(gin, StepInput{Seq: tw.gs[x.seq], Tokens: toks})
		rin = append(rin, StepInput{Seq: tw.rs[x.seq], Tokens: toks})
	}
	gr, err := tw.graph.Step(gin, allRows)
	if err != nil {
		t.Fatal(err)
	}
	defer gr.Release()
	rr, err := tw.ref.Step(rin, allRows)
	if err != nil {
		t.Fatal(err)
	}
	defer rr.Release()
	if !slices.Equal(gr.Rows, rr.Rows) {
		t.Fatalf("rows %v, eager %v", gr.Rows, rr.Rows)
	}
	var logits []float32
	for _, o := range []struct {
		name     string
		got, ref *kernels.Tensor
	}{{"logits", gr.Logits, rr.Logits}, {"normed", gr.Normed, rr.Normed}} {
		if !slices.Equal(o.got.Shape, o.ref.Shape) {
			t.Fatalf("%s shape %v, eager %v", o.name, o.got.Shape, o.ref.Shape)
		}
		got, err := tw.graph.BE.Download(o.got)
		if err != nil {
			t.Fatal(err)
		}
		want, err := tw.ref.BE.Download(o.ref)
		if err != nil {
			t.Fatal(err)
		}
		if o.name == "logits" {
			logits = want
		}
		if tw.tol > 0 {
			r := modeltest.RelErr(got, want)
			tw.worst = max(tw.worst, r)
			if !(r <= tw.tol) { // NaN fails too
				t.Fatalf("%s: rel err %.3g > %g (step %+v)", o.name, r, tw.tol, in)
			}
			continue
		}
		for i := range want {
			if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
				t.Fatalf("%s [%d] = %g, eager %g (step %+v)", o.name, i, got[i], want[i], in)
			}
		}
	}
	V := tw.ref.Cfg.VocabSize
	row := 0
	for i, x := range in {
		if allRows {
			row += len(gin[i].Tokens) - 1 // every row of this input; the last one is sampled
		}
		tw.generated[x.seq] = append(tw.generated[x.seq], modeltest.Argmax(logits[row*V:(row+1)*V]))
		row++
	}
}

func (tw *twinEngines) decode(n int, seqs ...int) {
	tw.t.Helper()
	in := make([]seqInput, len(seqs))
	for i, s := range seqs {
		in[i] = seqInput{seq: s}
	}
	for range n {
		tw.step(false, in...)
	}
}

func (tw *twinEngines) release(seq int) {
	tw.graph.KV.Release(tw.gs[seq])
	tw.ref.KV.Release(tw.rs[seq])
}

// phaseOptions are the graph engine options graphPhases expects.
var phaseOptions = EngineOptions{GraphMaxSeqs: 6, GraphMinContext: 16}

// graphPhases drives tw through batches padded to a bucket and exact ones,
// contexts crossing buckets, sequences ending and joining, prefill, mixed
// and all-rows steps (eager) and a batch wider than the graphs, checking
// which steps capture a graph and which replay one. Sequences 0-4 start
// from prompts 0, 1, 2, 3, 0 of g.
func graphPhases(t *testing.T, tw *twinEngines, g *modeltest.Golden) {
	prompt := func(i int) []int32 { return g.IDs(fmt.Sprintf("prompt_%d", i)) } // 1, 7, 33, 64 tokens
	type counts struct{ captures, replays int }
	phase := func(name string, want counts, run func()) {
		before := tw.graph.GraphStats()
		run()
		after := tw.graph.GraphStats()
		if got := (counts{after.Captures - before.Captures, after.Replays - before.Replays}); got != want {
			t.Errorf("%s: %d captures and %d replays, want %d and %d", name, got.captures, got.replays, want.captures, want.replays)
		}
	}
	phase("two sequences from 8 to 17 tokens: buckets (2, 16) then (2, 32)", counts{2, 8}, func() {
		tw.step(false, seqInput{0, prompt(0)}, seqInput{1, prompt(1)}) // prefill: eager
		tw.decode(10, 0, 1)
	})
	phase("three sequences padded to 4, context 64", counts{1, 4}, func() {
		tw.step(false, seqInput{2, prompt(2)})
		tw.decode(5, 0, 1, 2)
	})
	phase("sequence 0 ends, 3 joins in a mixed step, context 128", counts{1, 2}, func() {
		tw.release(0)
		tw.step(false, seqInput{seq: 1}, seqInput{seq: 2}, seqInput{3, prompt(3)})
		tw.decode(3, 1, 2, 3)
	})
	phase("all rows (eager), then one sequence", counts{1, 1}, func() {
		tw.step(true, seqInput{seq: 1})
		tw.decode(2, 1)
	})
	phase("a one-token prompt joins: exactly 4 rows, the (4, 128) graph again", counts{0, 3}, func() {
		tw.step(false, seqInput{seq: 1}, seqInput{seq: 2}, seqInput{seq: 3}, seqInput{4, prompt(0)})
		tw.decode(2, 1, 2, 3, 4)
	})
	phase("five sequences padded to 6", counts{1, 2}, func() {
		tw.step(false, seqInput{5, prompt(1)})
		tw.decode(3, 1, 2, 3, 4, 5)
	})
	phase("six sequences, then seven: wider than the graphs", counts{0, 2}, func() {
		tw.step(false, seqInput{6, prompt(2)})
		tw.decode(2, 1, 2, 3, 4, 5, 6)
		tw.step(false, seqInput{seq: 1}, seqInput{seq: 2}, seqInput{seq: 3}, seqInput{seq: 4}, seqInput{seq: 5}, seqInput{seq: 6}, seqInput{7, prompt(0)})
		tw.decode(2, 1, 2, 3, 4, 5, 6, 7)
	})
	if st := tw.graph.GraphStats(); st.Graphs != 6 || st.Captures != 6 || st.ArenaBytes <= 0 {
		t.Errorf("graph stats %+v, want 6 live graphs and the arenas' bytes", st)
	}
}

// TestDecodeGraphStepsMatchEager runs graphPhases on the CPU double: every
// output bit-identical to the eager engine's, greedy tokens as the goldens,
// graphs reused, and Close frees everything.
func TestDecodeGraphStepsMatchEager(t *testing.T) {
	ge, gbe := graphEngine(t, "tiny", phaseOptions)
	re, rbe := graphEngine(t, "tiny", EngineOptions{EnforceEager: true})
	if ge.KV.NumBlocks != re.KV.NumBlocks || ge.KV.FreeBlocks() != ge.KV.NumBlocks {
		t.Fatalf("graph engine pool %d blocks (%d free), eager %d: the scratch block must not count",
			ge.KV.NumBlocks, ge.KV.FreeBlocks(), re.KV.NumBlocks)
	}
	g := modeltest.OpenGolden(t, filepath.Join("..", "testdata", "glm4moe", "tiny"))
	tw := newTwinEngines(t, ge, re, 0)
	graphPhases(t, tw, g)
	for seq, p := range []int{0, 1, 2, 3, 0} {
		want := g.IDs(fmt.Sprintf("greedy_%d", p))
		got := tw.generated[seq]
		n := min(len(got), len(want))
		if n < 10 || !slices.Equal(got[:n], want[:n]) {
			t.Errorf("sequence %d (prompt %d): greedy %v, golden %v", seq, p, got, want)
		}
	}
	st := ge.GraphStats()
	if gbe.graphs != st.Graphs || gbe.launches != st.Replays || rbe.captures != 0 || re.GraphStats() != (GraphStats{}) {
		t.Errorf("%d graphs and %d launches on the backend for %+v; the eager engine captured %d", gbe.graphs, gbe.launches, st, rbe.captures)
	}
	checkReleased(t, ge, gbe)
	checkReleased(t, re, rbe)
}

// graphWorkload is ten greedy requests over the fixture's prompts, five at a
// time: batches of every size up to five, sequences finishing and others
// joining mid-run, contexts from 2 to 104 tokens.
var graphWorkload = []struct{ prompt, maxNew int }{
	{0, 20}, {1, 40}, {2, 9}, {3, 16}, {1, 3}, {0, 33}, {3, 40}, {2, 25}, {0, 16}, {1, 12},
}

// runGraphWorkload sends graphWorkload to s at once and returns each request's tokens.
func runGraphWorkload(t *testing.T, s *Scheduler, g *modeltest.Golden) [][]int {
	t.Helper()
	out := make([][]int, len(graphWorkload))
	errs := make([]error, len(graphWorkload))
	var wg sync.WaitGroup
	for i, w := range graphWorkload {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := Request{PromptIDs: ints(g.IDs(fmt.Sprintf("prompt_%d", w.prompt))), MaxNewTokens: w.maxNew, IgnoreEOS: true}
			out[i], _, errs[i] = collect(context.Background(), s, req)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	return out
}

// TestSchedulerDecodeGraphsMatchEager serves the same requests with decode
// graphs and eagerly: the tokens must be identical and match the goldens.
func TestSchedulerDecodeGraphsMatchEager(t *testing.T) {
	g := modeltest.OpenGolden(t, filepath.Join("..", "testdata", "glm4moe", "tiny"))
	var tokens [2][][]int
	for i, eager := range []bool{false, true} {
		e, be := graphEngine(t, "tiny", EngineOptions{EnforceEager: eager, GraphMinContext: 16})
		s := NewScheduler(e, SchedulerOptions{MaxNumSeqs: 5})
		tokens[i] = runGraphWorkload(t, s, g)
		s.Close()
		st := e.GraphStats()
		switch {
		case eager && (st != GraphStats{} || be.captures != 0):
			t.Errorf("eager engine: stats %+v, %d captures", st, be.captures)
		case !eager && (st.Captures == 0 || st.Replays <= 2*st.Captures):
			t.Errorf("graph engine: %d captures, %d replays: graphs are not reused", st.Captures, st.Replays)
		}
		t.Logf("enforce eager %v: %+v", eager, st)
		checkReleased(t, e, be)
	}
	for i, w := range graphWorkload {
		if !slices.Equal(tokens[0][i], tokens[1][i]) {
			t.Errorf("request %d: graphs %v, eager %v", i, tokens[0][i], tokens[1][i])
		}
		want := ints(g.IDs(fmt.Sprintf("greedy_%d", w.prompt)))
		n := min(w.maxNew, len(want))
		if len(tokens[0][i]) != w.maxNew || !slices.Equal(tokens[0][i][:n], want[:n]) {
			t.Errorf("request %d: %v, golden %v", i, tokens[0][i], want)
		}
	}
}

// TestDecodeGraphCaptureFailureFallsBack: a backend that cannot capture the
// step still gives correct results, and the engine drops its graph state
// and runs eagerly from the next step on.
func TestDecodeGraphCaptureFailureFallsBack(t *testing.T) {
	ge, gbe := graphEngine(t, "tiny", EngineOptions{})
	gbe.failEnd = true
	re, rbe := graphEngine(t, "tiny", EngineOptions{EnforceEager: true})
	g := modeltest.OpenGolden(t, filepath.Join("..", "testdata", "glm4moe", "tiny"))
	tw := newTwinEngines(t, ge, re, 0)
	tw.step(false, seqInput{0, g.IDs("prompt_1")})
	tw.decode(1, 0) // warm-up, failed capture
	if ge.graphs == nil || !ge.graphs.failed {
		t.Fatal("the failed capture was not noticed")
	}
	tw.decode(3, 0)
	if ge.graphs != nil || gbe.graphs != 0 || len(gbe.metas) != 0 || gbe.captures != 0 {
		t.Errorf("after a failed capture: graphs %v, %d on the backend, %d batch metadata", ge.graphs, gbe.graphs, len(gbe.metas))
	}
	if want := g.IDs("greedy_1")[:5]; !slices.Equal(tw.generated[0], want) {
		t.Errorf("greedy %v, golden %v", tw.generated[0], want)
	}
	checkReleased(t, ge, gbe)
	checkReleased(t, re, rbe)
}
