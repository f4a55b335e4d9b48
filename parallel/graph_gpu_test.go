package parallel

import (
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/kernels/cuda/cudatest"
	"github.com/glmtopo/glmtopo/model/modeltest"
)

// The CUDA backend must keep implementing what decode graphs need.
var _ graphBackend = (*cuda.Backend)(nil)

// gpuGraphTol bounds graph against eager logits on the GPU, by KV cache
// dtype: the graphs split attention for their context bucket, the eager
// steps for the batch's longest context, so sums round differently.
var gpuGraphTol = map[kernels.DType]float64{kernels.F32: 1e-3, kernels.BF16: 2e-2}

// TestDecodeGraphsOnGPU runs the tiny fixture on one GPU with decode graphs
// and eagerly: graphPhases step by step (logits within gpuGraphTol, the same
// captures and replays as on the CPU), then graphWorkload through the
// scheduler both ways (greedy tokens equal to each other and to the CPU
// reference up to its first near tie), and logs decode step times.
func TestDecodeGraphsOnGPU(t *testing.T) {
	be := cudatest.Open(t, cuda.Options{})
	root := filepath.Join("..", "testdata", "glm4moe", "tiny")
	dir := filepath.Join(root, "model")
	g := modeltest.OpenGolden(t, root)
	w := modeltest.LoadWeights(t, be, dir)
	newEngine := func(t *testing.T, opt EngineOptions) *Engine {
		if opt.BlockSize == 0 {
			opt.BlockSize, opt.MaxTokens = 16, 1024
		}
		e, err := NewEngine(be, w, opt)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(e.Close)
		return e
	}
	ref := cpuReference(t, root, g)
	for _, kv := range []kernels.DType{kernels.F32, kernels.BF16} {
		t.Run(fmt.Sprintf("kv-%v/steps", kv), func(t *testing.T) {
			opt := phaseOptions
			opt.KVDType = kv
			tw := newTwinEngines(t, newEngine(t, opt), newEngine(t, EngineOptions{KVDType: kv, EnforceEager: true}), gpuGraphTol[kv])
			graphPhases(t, tw, g)
			t.Logf("graph against eager logits: worst rel err %.2e; %+v", tw.worst, tw.graph.GraphStats())
		})
		t.Run(fmt.Sprintf("kv-%v/scheduler", kv), func(t *testing.T) {
			var tokens [2][][]int // eager first: a backend broken without graphs shows before any capture
			for i, eager := range []bool{true, false} {
				e := newEngine(t, EngineOptions{KVDType: kv, EnforceEager: eager, GraphMinContext: 16})
				s := NewScheduler(e, SchedulerOptions{MaxNumSeqs: 5})
				t0 := time.Now()
				tokens[i] = runGraphWorkload(t, s, g)
				t.Logf("enforce eager %v: workload in %v; %+v", eager, time.Since(t0).Round(time.Microsecond), e.GraphStats())
				s.Close()
			}
			for i := range graphWorkload {
				n := ref[i].reliable
				if !slices.Equal(tokens[1][i][:n], tokens[0][i][:n]) || !slices.Equal(tokens[0][i][:n], ref[i].tokens[:n]) {
					t.Errorf("request %d (first %d tokens): graphs %v, eager %v, cpu %v", i, n, tokens[1][i], tokens[0][i], ref[i].tokens)
				}
			}
		})
	}
	t.Run("step-time", func(t *testing.T) {
		const ctx, steps = 256, 50
		for _, batch := range []int{1, 4, 16, 64} {
			var ms [2]float64
			for i, eager := range []bool{true, false} {
				e := newEngine(t, EngineOptions{BlockSize: 16, MaxTokens: 64*ctx + 16, KVDType: kernels.BF16, EnforceEager: eager})
				ms[i] = decodeStepTime(t, e, batch, ctx, steps).Seconds() * 1e3
				e.Close()
			}
			t.Logf("tiny, batch %2d, context %d, bf16 cache: eager %.3f ms/step, graphs %.3f ms/step (%.1f×)", batch, ctx, ms[0], ms[1], ms[0]/ms[1])
		}
	})
}

// greedyRef is the CPU engine's greedy continuation of a workload request
// and how many of its tokens come before the first near tie (top-2 logits
// within 1% of the largest |logit|), where rounding may flip a choice.
type greedyRef struct {
	tokens   []int
	reliable int
}

func cpuReference(t *testing.T, root string, g *modeltest.Golden) []greedyRef {
	t.Helper()
	e := loadFixtureEngine(t, filepath.Join(root, "model"))
	V := e.Cfg.VocabSize
	out := make([]greedyRef, len(graphWorkload))
	for i, w := range graphWorkload {
		seq := &Seq{}
		toks := g.IDs(fmt.Sprintf("prompt_%d", w.prompt))
		r := &out[i]
		r.reliable = -1
		for len(r.tokens) < w.maxNew {
			res, err := e.Step([]StepInput{{Seq: seq, Tokens: toks}}, false)
			if err != nil {
				t.Fatal(err)
			}
			logits, _ := e.BE.Download(res.Logits)
			res.Release()
			if modeltest.TopGap(logits[:V]) < 0.01 && r.reliable < 0 {
				r.reliable = len(r.tokens)
			}
			tok := modeltest.Argmax(logits[:V])
			r.tokens = append(r.tokens, int(tok))
			toks = []int32{tok}
		}
		if r.reliable < 0 {
			r.reliable = len(r.tokens)
		}
		e.KV.Release(seq)
	}
	return out
}

// decodeStepTime is the median wall time of a greedy decode step (Step and
// Sample, which waits for the device) of batch sequences at context ctx.
func decodeStepTime(t *testing.T, e *Engine, batch, ctx, steps int) time.Duration {
	t.Helper()
	prompt := make([]int32, ctx-1)
	for i := range prompt {
		prompt[i] = int32(i % e.Cfg.VocabSize)
	}
	seqs := make([]*Seq, batch)
	inputs := make([]StepInput, batch)
	params := make([]kernels.SampleParams, batch)
	for i := range seqs {
		seqs[i] = &Seq{}
		r, err := e.Step([]StepInput{{Seq: seqs[i], Tokens: prompt}}, false)
		if err != nil {
			t.Fatal(err)
		}
		r.Release()
	}
	var times []time.Duration
	for n := range steps + 3 { // the first steps warm up and capture
		for i, s := range seqs {
			s.Len = ctx - 1 // decode the same position again: constant context
			inputs[i] = StepInput{Seq: s, Tokens: []int32{int32(n % e.Cfg.VocabSize)}}
		}
		t0 := time.Now()
		r, err := e.Step(inputs, false)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.BE.Sample(r.Logits, params); err != nil {
			t.Fatal(err)
		}
		r.Release()
		if n >= 3 {
			times = append(times, time.Since(t0))
		}
	}
	for _, s := range seqs {
		e.KV.Release(s)
	}
	slices.Sort(times)
	return times[len(times)/2]
}
