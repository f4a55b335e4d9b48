package parallel

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/transport"
)

// stageCounts are the pipelines the exactness tests run.
var stageCounts = []int{2, 3}

// splitLayers gives S stages' layer bounds over n layers, the head's range
// no longer than the others'.
func splitLayers(n, S int) []int {
	b := []int{0}
	for i := 1; i < S; i++ {
		b = append(b, i*n/S)
	}
	return append(b, n)
}

func numLayers(t testing.TB, dir string) int {
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	return cfg.NumHiddenLayers
}

var fixtures = []string{"tiny", "tiny_qknorm"}

func fixtureDir(name string) string { return filepath.Join("..", "testdata", "glm4moe", name, "model") }

// loadFixtureSelection loads sel of the checkpoint in dir on a fresh CPU backend.
func loadFixtureSelection(t testing.TB, dir string, sel func(*model.Config) model.Selection) (kernels.Backend, *model.Weights) {
	t.Helper()
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	be := cpu.New(0)
	w, err := model.LoadWeights(context.Background(), dir, cfg, sel(cfg), be, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return be, w
}

func headSelection(end int) func(*model.Config) model.Selection {
	return func(c *model.Config) model.Selection {
		return model.Selection{FirstLayer: 0, EndLayer: end, Embedding: true, LMHead: true, MTP: c.HasMTP()}
	}
}

func stageSelection(first, end int) func(*model.Config) model.Selection {
	return func(*model.Config) model.Selection { return model.Selection{FirstLayer: first, EndLayer: end} }
}

var testEngineOpt = EngineOptions{BlockSize: 16, MaxTokens: 1024}

// loadHeadEngine loads the head's engine of a pipeline over the model in
// dir (the embedding, layers [0, layers), the LM head and any MTP layer),
// closed when the test ends.
func loadHeadEngine(t testing.TB, dir string, layers int, opt EngineOptions) *Engine {
	t.Helper()
	return selectionEngine(t, dir, headSelection(layers), opt)
}

// selectionEngine loads sel of the model in dir on the CPU as an engine,
// closed when the test ends.
func selectionEngine(t testing.TB, dir string, sel func(*model.Config) model.Selection, opt EngineOptions) *Engine {
	t.Helper()
	be, w := loadFixtureSelection(t, dir, sel)
	e, err := NewEngine(be, w, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

// inProcessPipeline makes a head engine of layers [0, bounds[1]) and
// executor stages of the other ranges, served on goroutines over in-process
// links; the stages stop when the test ends.
func inProcessPipeline(t testing.TB, dir string, bounds []int, opt EngineOptions) (*Engine, *Ring) {
	t.Helper()
	return inProcessPipelineOpt(t, dir, bounds, opt, RingOptions{})
}

func inProcessPipelineOpt(t testing.TB, dir string, bounds []int, opt EngineOptions, ropt RingOptions) (*Engine, *Ring) {
	t.Helper()
	head, ring, _ := inProcessPipelineStages(t, dir, bounds, opt, ropt)
	return head, ring
}

// inProcessPipelineStages is inProcessPipelineOpt that also returns the
// executor stages, in ring order.
func inProcessPipelineStages(t testing.TB, dir string, bounds []int, opt EngineOptions, ropt RingOptions) (*Engine, *Ring, []*Stage) {
	t.Helper()
	head := loadHeadEngine(t, dir, bounds[1], opt)
	var stages []*Stage
	S := len(bounds) - 1
	// links[i] joins stage i to stage i+1 (mod S): the last one closes the ring.
	type end struct{ a, b transport.Link }
	links := make([]end, S)
	for i := range links {
		a, b := transport.Pipe(fmt.Sprintf("stage%d", i), fmt.Sprintf("stage%d", (i+1)%S), 64<<20, transport.DefaultLimits())
		links[i] = end{a, b}
	}
	var wg sync.WaitGroup
	errs := make(chan error, S)
	for i := 1; i < S; i++ {
		sbe, sw := loadFixtureSelection(t, dir, stageSelection(bounds[i], bounds[i+1]))
		st, err := NewStage(sbe, sw)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(st.Close)
		stages = append(stages, st)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := ServeStage(context.Background(), st, links[i-1].b, links[i].a); err != nil {
				errs <- err
			}
		}()
	}
	ring, err := ConnectRing(context.Background(), head, links[0].a, links[S-1].b, ropt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, l := range links {
			l.a.Close()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Errorf("stage: %v", err)
		}
	})
	return head, ring, stages
}

func wholeEngine(t testing.TB, dir string, opt EngineOptions) *Engine {
	t.Helper()
	return selectionEngine(t, dir, model.WholeModel, opt)
}

// stepScript drives an engine through chunked prefills of sequences of
// different lengths, decodes, a sequence's end (its blocks reused by a new
// one) and a preemption by recompute (release, then prefill again), and
// returns every step's logits.
func stepScript(t *testing.T, e *Engine) [][]float32 {
	t.Helper()
	prompts := [][]int32{}
	for i, n := range []int{37, 5, 18, 1, 64, 9, 23, 2} {
		p := make([]int32, n)
		for j := range p {
			p[j] = int32((i*131 + j*17 + 3) % e.Cfg.VocabSize)
		}
		prompts = append(prompts, p)
	}
	seqs := make([]Seq, len(prompts)+1)
	done := make([]int, len(prompts)) // prompt tokens in the cache
	var out [][]float32
	step := func(inputs []StepInput) { out = append(out, stepInputsLogits(t, e, inputs, false)) }
	next := func(i int) int32 { return int32((i*7 + len(out)) % e.Cfg.VocabSize) }
	// Chunked prefill: 16 tokens of each prompt a step, decodes of the finished ones.
	for round := 0; round < 5; round++ {
		var inputs []StepInput
		for i, p := range prompts {
			if done[i] < len(p) {
				n := min(16, len(p)-done[i])
				inputs = append(inputs, StepInput{Seq: &seqs[i], Tokens: p[done[i] : done[i]+n]})
				done[i] += n
			} else {
				inputs = append(inputs, StepInput{Seq: &seqs[i], Tokens: []int32{next(i)}})
			}
		}
		step(inputs)
	}
	// Sequence 1 ends; sequence 8 takes its blocks. Sequence 2 is preempted
	// and recomputed: released, then its prompt and decodes run again.
	e.KV.Release(&seqs[1])
	e.KV.Release(&seqs[2])
	again := append(append([]int32(nil), prompts[2]...), 5, 6, 7, 8, 9)
	extra := []int32{11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21}
	step([]StepInput{{Seq: &seqs[8], Tokens: extra}, {Seq: &seqs[2], Tokens: again}, {Seq: &seqs[0], Tokens: []int32{next(0)}}})
	for range 3 {
		step([]StepInput{{Seq: &seqs[8], Tokens: []int32{next(8)}}, {Seq: &seqs[2], Tokens: []int32{next(2)}}, {Seq: &seqs[4], Tokens: []int32{next(4)}}})
	}
	for i := range seqs {
		e.KV.Release(&seqs[i])
	}
	// A step after every release (the stages hear of the frees) and reuse.
	step([]StepInput{{Seq: &seqs[3], Tokens: prompts[4]}})
	e.KV.Release(&seqs[3])
	return out
}

// TestPipelineLogitsBitIdentical: 2 and 3 in-process stages give the very
// logits (bit for bit) of the single-process engine, on both fixtures.
func TestPipelineLogitsBitIdentical(t *testing.T) {
	for _, fx := range fixtures {
		want := stepScript(t, wholeEngine(t, fixtureDir(fx), testEngineOpt))
		for _, S := range stageCounts {
			bounds := splitLayers(numLayers(t, fixtureDir(fx)), S)
			t.Run(fmt.Sprintf("%s/%dstages", fx, S), func(t *testing.T) {
				head, ring := inProcessPipeline(t, fixtureDir(fx), bounds, testEngineOpt)
				got := stepScript(t, head)
				compareLogits(t, got, want)
				if st := ring.Stats(); st.Steps != int64(len(want)) {
					t.Errorf("ring ran %d steps, want %d", st.Steps, len(want))
				}
			})
		}
	}
}

func compareLogits(t *testing.T, got, want [][]float32) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d steps, want %d", len(got), len(want))
	}
	for s := range want {
		if !slices.Equal(got[s], want[s]) {
			i := 0
			for i < len(want[s]) && got[s][i] == want[s][i] {
				i++
			}
			t.Fatalf("step %d: logits differ first at %d: %v vs %v", s, i, got[s][min(i, len(got[s])-1)], want[s][i])
		}
	}
}

// workload is ≥ 8 concurrent requests of different lengths: greedy and
// seeded sampling, one that stops on a "stop string" (emit returns
// ErrStopGeneration at a given token, as serve does), one cancelled.
type workItem struct {
	req      Request
	stopAt   int // stop after this many emitted tokens (0: never)
	cancelAt int // cancel the context after this many tokens (0: never)
}

func workload(vocab int) []workItem {
	var items []workItem
	for i, n := range []int{3, 40, 17, 1, 70, 9, 25, 52, 6, 33} {
		p := make([]int, n)
		for j := range p {
			p[j] = (i*97 + j*31 + 5) % vocab
		}
		it := workItem{req: Request{PromptIDs: p, MaxNewTokens: 6 + i%5*3, IgnoreEOS: true}}
		if i%3 == 1 {
			it.req.Sampling = SamplingParams{Temperature: 0.8, TopP: 0.9, TopK: 40, Seed: int64(i), HasSeed: true}
		}
		switch i {
		case 2:
			it.stopAt = 4
		case 7:
			it.stopAt = 2
		}
		items = append(items, it)
	}
	return items
}

type workResult struct {
	tokens []int
	res    Result
	err    error
}

// referenceWork runs the workload on a single-process scheduler over the
// whole model in dir, with opt, and returns the items and what each produced.
func referenceWork(t *testing.T, dir string, opt SchedulerOptions) ([]workItem, []workResult) {
	t.Helper()
	ref := NewScheduler(wholeEngine(t, dir, smallKV), opt)
	defer ref.Close()
	items := workload(ref.eng.Cfg.VocabSize)
	return items, runWorkload(t, ref, items)
}

// runWorkload starts every item at once and returns what each produced.
func runWorkload(t *testing.T, g Generator, items []workItem) []workResult {
	t.Helper()
	reqs := make([]Request, len(items))
	for i, it := range items {
		reqs[i] = it.req
	}
	return generateAll(g, reqs, func(i int, tokens []int) bool {
		return items[i].stopAt > 0 && len(tokens) == items[i].stopAt
	})
}

// generateAll starts every request at once on g, each with a minute's
// deadline, and returns what each produced; stop(i, tokens) true after a
// token ends request i through its emit callback, as the API layer ends a
// request at a stop string.
func generateAll(g Generator, reqs []Request, stop func(i int, tokens []int) bool) []workResult {
	out := make([]workResult, len(reqs))
	var wg sync.WaitGroup
	for i, req := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			r := &out[i]
			r.res, r.err = g.Generate(ctx, req, func(tok int) error {
				r.tokens = append(r.tokens, tok)
				if stop(i, r.tokens) {
					return ErrStopGeneration
				}
				return nil
			})
		}()
	}
	wg.Wait()
	return out
}

func compareWork(t *testing.T, got, want []workResult) {
	t.Helper()
	for i := range want {
		g, w := got[i], want[i]
		if w.err != nil || g.err != nil {
			t.Errorf("request %d: errors %v / %v", i, g.err, w.err)
			continue
		}
		if fmt.Sprint(g.tokens) != fmt.Sprint(w.tokens) || g.res != w.res {
			t.Errorf("request %d: tokens %v %+v, single process %v %+v", i, g.tokens, g.res, w.tokens, w.res)
		}
	}
}

// schedOpt: small prefill budget (chunked prefill) and few sequences, so
// requests wait for blocks and slots and reuse freed blocks.
var schedOpt = SchedulerOptions{MaxNumSeqs: 4, PrefillTokens: 24}

// smallKV holds few requests at once, so admission waits on freed blocks.
var smallKV = EngineOptions{BlockSize: 16, MaxTokens: 256}

// TestPipelineSchedulerTokensIdentical: the head's scheduler over 2 and 3
// in-process stages generates the tokens of the single-process scheduler.
func TestPipelineSchedulerTokensIdentical(t *testing.T) {
	for _, fx := range fixtures {
		dir := fixtureDir(fx)
		items, want := referenceWork(t, dir, schedOpt)
		for _, S := range stageCounts {
			bounds := splitLayers(numLayers(t, fixtureDir(fx)), S)
			t.Run(fmt.Sprintf("%s/%dstages", fx, S), func(t *testing.T) {
				head, _ := inProcessPipeline(t, dir, bounds, smallKV)
				s := NewScheduler(head, schedOpt)
				defer s.Close()
				compareWork(t, runWorkload(t, s, items), want)
				if free := head.KV.FreeBlocks(); free != head.KV.NumBlocks {
					t.Errorf("%d of %d blocks free after the requests", free, head.KV.NumBlocks)
				}
			})
		}
	}
}

// TestPipelineSpeculativeTokensIdentical: MTP speculation at the head (the
// drafts and acceptance never leave it; rolled-back positions travel in
// the headers) gives the single-process speculative tokens.
func TestPipelineSpeculativeTokensIdentical(t *testing.T) {
	dir := fixtureDir("tiny")
	opt := schedOpt
	opt.Speculative = SpecConfig{Method: "mtp", NumSpeculativeTokens: 2}
	items, want := referenceWork(t, dir, opt)
	head, _ := inProcessPipeline(t, dir, splitLayers(numLayers(t, dir), 3), smallKV)
	s := NewScheduler(head, opt)
	defer s.Close()
	compareWork(t, runWorkload(t, s, items), want)
}

func TestHeadWithoutStagesRefusesSteps(t *testing.T) {
	e := loadHeadEngine(t, fixtureDir("tiny"), 2, testEngineOpt)
	var s Seq
	if _, err := e.Step([]StepInput{{Seq: &s, Tokens: []int32{1, 2}}}, false); err == nil {
		t.Fatal("a head engine of layers [0,2) of 4 stepped without stages")
	}
}

// tinyHeadAndStage loads the tiny fixture as a head engine of layers [0,2)
// and a stage of [2,4) with an in-memory pipe between them (a the head's
// end, b the stage's), all closed when the test ends.
func tinyHeadAndStage(t *testing.T) (head *Engine, st *Stage, a, b transport.Link) {
	t.Helper()
	dir := fixtureDir("tiny")
	head = loadHeadEngine(t, dir, 2, testEngineOpt)
	a, b = transport.Pipe("head", "stage1", 64<<20, transport.DefaultLimits())
	t.Cleanup(func() { a.Close() })
	sbe, sw := loadFixtureSelection(t, dir, stageSelection(2, 4))
	st, err := NewStage(sbe, sw)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return head, st, a, b
}

// TestRingFailsFastWhenAStageDies: a stage that stops answering fails the
// step within the step timeout, and every later step at once.
func TestRingFailsFastWhenAStageDies(t *testing.T) {
	head, st, a, b := tinyHeadAndStage(t)
	done := make(chan error, 1)
	go func() { done <- ServeStage(context.Background(), st, b, b) }()
	ring, err := ConnectRing(context.Background(), head, a, a, RingOptions{StepTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	var s Seq
	res, err := head.Step([]StepInput{{Seq: &s, Tokens: []int32{1, 2, 3}}}, false)
	if err != nil {
		t.Fatal(err)
	}
	res.Release()
	b.Close() // the stage's end goes away
	start := time.Now()
	if _, err := head.Step([]StepInput{{Seq: &s, Tokens: []int32{4}}}, false); err == nil {
		t.Fatal("step succeeded without its stage")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("the failed step took %v", d)
	}
	if _, err := head.Step([]StepInput{{Seq: &s, Tokens: []int32{5}}}, false); err == nil || ring.Err() == nil {
		t.Fatalf("a later step: %v (ring error %v)", err, ring.Err())
	}
	if err := <-done; err != nil && !errors.Is(err, transport.ErrClosed) {
		t.Logf("stage ended with %v", err)
	}
	head.KV.Release(&s)
}

// TestPipelineDummyWeightsBitIdentical: stages opened from a dummy source
// (--load-format dummy: each loads only its selection) give the logits of
// the whole dummy model in one process.
func TestPipelineDummyWeightsBitIdentical(t *testing.T) {
	src := ModelSource{Path: "tiny", LoadFormat: "dummy", Seed: 11}
	ctx := context.Background()
	whole, closeWhole, err := Open(ctx, src, cpu.New(0), testEngineOpt, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := stepScript(t, whole)
	closeWhole()
	cfg, err := src.Config()
	if err != nil {
		t.Fatal(err)
	}
	bounds := splitLayers(cfg.NumHiddenLayers, 2)
	head, closeHead, err := OpenHead(ctx, src, cpu.New(0), bounds[1], testEngineOpt, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer closeHead()
	st, closeStage, err := OpenStage(ctx, src, cpu.New(0), bounds[1], bounds[2], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer closeStage()
	a, b := transport.Pipe("head", "stage1", 64<<20, transport.DefaultLimits())
	done := make(chan error, 1)
	go func() { done <- ServeStage(ctx, st, b, b) }()
	ring, err := ConnectRing(ctx, head, a, a, RingOptions{})
	if err != nil {
		t.Fatal(err)
	}
	compareLogits(t, stepScript(t, head), want)
	if err := ring.Flush(); err != nil {
		t.Fatal(err)
	}
	ring.Close()
	if err := <-done; err != nil {
		t.Errorf("stage: %v", err)
	}
	if st.Sequences() != 0 || st.BlocksHeld() != 0 {
		t.Errorf("the stage still holds %d sequences, %d blocks after every release", st.Sequences(), st.BlocksHeld())
	}
}

func TestOpenStageRefusesBadRanges(t *testing.T) {
	src := ModelSource{Path: "tiny", LoadFormat: "dummy"}
	for _, r := range [][2]int{{0, 2}, {2, 2}, {1, 99}} {
		if _, _, err := OpenStage(context.Background(), src, cpu.New(0), r[0], r[1], nil); err == nil {
			t.Errorf("stage [%d,%d) opened", r[0], r[1])
		}
	}
	if _, _, err := OpenHead(context.Background(), src, cpu.New(0), 99, testEngineOpt, nil); err == nil {
		t.Error("a head of every layer opened")
	}
}

// TestRingFailsWhenAStageHangs: a stage that takes the step and never
// answers fails it at the step timeout, with ErrPipelineDown.
func TestRingFailsWhenAStageHangs(t *testing.T) {
	head, st, a, b := tinyHeadAndStage(t)
	// The stage answers the configuration, then swallows steps.
	go func() {
		var m transport.Message
		for {
			if err := b.Recv(context.Background(), &m); err != nil {
				return
			}
			if m.Header.Kind == transport.KindControl {
				if st.configureFrom(&m) != nil || b.Send(context.Background(), &m) != nil {
					return
				}
			}
		}
	}()
	if _, err := ConnectRing(context.Background(), head, a, a, RingOptions{StepTimeout: 200 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	var s Seq
	start := time.Now()
	_, err := head.Step([]StepInput{{Seq: &s, Tokens: []int32{1, 2, 3}}}, false)
	if !errors.Is(err, ErrPipelineDown) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("step with a hung stage: %v", err)
	}
	if d := time.Since(start); d < 200*time.Millisecond || d > 2*time.Second {
		t.Errorf("the step failed after %v, want the 200ms timeout", d)
	}
	head.KV.Release(&s)
}

// TestPipelineMicroBatchesTokensIdentical: with S micro-batches in flight
// round S stages (the head's scheduler splitting its sequences), every
// request gets the single-process scheduler's tokens, on both fixtures.
func TestPipelineMicroBatchesTokensIdentical(t *testing.T) {
	for _, fx := range fixtures {
		dir := fixtureDir(fx)
		items, want := referenceWork(t, dir, schedOpt)
		for _, S := range stageCounts {
			bounds := splitLayers(numLayers(t, dir), S)
			t.Run(fmt.Sprintf("%s/%dstages", fx, S), func(t *testing.T) {
				head, ring := inProcessPipelineOpt(t, dir, bounds, smallKV, RingOptions{MicroBatches: S})
				s := NewScheduler(head, schedOpt)
				compareWork(t, runWorkload(t, s, items), want)
				s.Close()
				if free := head.KV.FreeBlocks(); free != head.KV.NumBlocks {
					t.Errorf("%d of %d blocks free after the requests", free, head.KV.NumBlocks)
				}
				if n := len(ring.pipe.sched.InFlight()); n != 0 {
					t.Errorf("%d micro-batches still in flight", n)
				}
				if ring.pipe.peak != S {
					t.Errorf("at most %d micro-batches were in flight, want %d", ring.pipe.peak, S)
				}
			})
		}
	}
}
