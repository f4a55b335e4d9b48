package parallel

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/kernels/cuda/cudatest"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/model/modeltest"
	"github.com/glmtopo/glmtopo/parallel/tp"
	"github.com/glmtopo/glmtopo/transport/nccl"
)

// gpuRankTol bounds a split run's logits against the plain CUDA engine's,
// relative to the largest |logit|: the ranks' partial sums add in another
// order than one GPU's dot products (bf16 weights, f32 sums). A dropped or
// doubled partial sum moves logits by far more; the greedy tokens must be
// identical.
const gpuRankTol = 1e-2

// TestRanksNCCLOnGPU runs the tiny fixture's prompts greedily on rank
// groups of CUDA backends and compares them with the plain CUDA engine:
//   - one rank on GPU 0 with a one-rank NCCL communicator from tp.NCCL
//     (the set-up of several GPUs, on the one here);
//   - TP 2 and EP 2 (with and without EPLB replicas) as two CUDA backends
//     on GPU 0 with the in-process collectives: the split kernels on CUDA,
//     without NCCL (which refuses two ranks on one GPU);
//   - with two GPUs or more, --tensor-parallel-size 2 with and without
//     --enable-expert-parallel, and EPLB, as the command opens them
//     (TensorParallelCUDA: rank r on GPU r, NCCL); skipped otherwise.
func TestRanksNCCLOnGPU(t *testing.T) {
	be := cudatest.Open(t, cuda.Options{})
	if _, err := nccl.Version(); errors.Is(err, nccl.ErrNoNCCL) {
		t.Skipf("no NCCL: %v", err)
	}
	root := filepath.Join("..", "testdata", "glm4moe", "tiny")
	dir := filepath.Join(root, "model")
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	prompts := fixturePrompts(t, root)
	const steps = 8
	engineOpt := func() EngineOptions {
		return EngineOptions{BlockSize: 16, KVDType: kernels.BF16, MaxTokens: 1024, EnforceEager: true}
	}
	w := modeltest.LoadWeights(t, be, dir)
	plain, err := NewEngine(be, w, engineOpt())
	if err != nil {
		t.Fatal(err)
	}
	wantTok, wantLog := greedyBatch(t, plain, prompts, steps)
	plain.Close()

	onGPU0 := func(int) (kernels.Backend, error) { return cuda.New(cuda.Options{}) }
	hot := [][]int{{0, 1, 2, 3, 4, 5}, {2, 3, 4, 5, 6, 7}} // experts 2..5 on both GPUs
	type gpuCase struct {
		name   string
		ranks  RankOptions
		lists  [][]int
		gpus   int  // needed beyond the first
		graphs bool // decode steps replay graphs: rank 0 on the engine's backend (ShareHead)
	}
	cases := []gpuCase{
		{name: "one-rank-nccl", ranks: RankOptions{Ranks: 1, TP: 1, EP: 1, NewBackend: onGPU0, Collectives: tp.NCCL(tp.NCCLOptions{})}},
		{name: "tp2-one-gpu-inprocess", ranks: TensorParallel(2, false, onGPU0)},
		{name: "ep2-one-gpu-inprocess", ranks: TensorParallel(2, true, onGPU0)},
		{name: "eplb-ep2-one-gpu-inprocess", ranks: TensorParallel(2, true, onGPU0), lists: hot},
		// The set-up of several GPUs on this one: rank 0 is the engine's
		// backend, the residual is broadcast over NCCL (a one-rank
		// communicator here) and decode steps replay graphs.
		{name: "one-rank-nccl-shared-head-graphs", graphs: true,
			ranks: RankOptions{Ranks: 1, TP: 1, EP: 1, NewBackend: onGPU0, Collectives: tp.NCCL(tp.NCCLOptions{}), ShareHead: true}},
	}
	multi := checkGPUs(2)
	for _, c := range []struct {
		name string
		ep   bool
		hot  [][]int
	}{{"tp2-nccl", false, nil}, {"tp2-ep-nccl", true, nil}, {"eplb-tp2-ep-nccl", true, hot}} {
		o, err := TensorParallelCUDA(2, c.ep, cuda.Options{}, nil)
		if err != nil {
			o = RankOptions{} // skipped below with multi's message
		}
		cases = append(cases, gpuCase{name: c.name, ranks: o, lists: c.hot, gpus: 2})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.gpus > 1 && multi != nil {
				t.Skipf("needs %d GPUs (runs on the multi-GPU machines): %v", c.gpus, multi)
			}
			opt := engineOpt()
			opt.EnforceEager = !c.graphs
			opt.Ranks = c.ranks
			if c.lists != nil {
				opt.Ranks.Experts = placement(cfg, c.lists)
			}
			src := ModelSource{Path: dir}
			var e *Engine
			var closeEngine func()
			if c.ranks.Ranks == 1 {
				// One rank is not "Enabled" (Open would run the plain
				// engine): open the ranked head directly.
				e, closeEngine, err = openRanked(context.Background(), src, cfg, be, cfg.NumHiddenLayers, opt, nil)
			} else {
				e, closeEngine, err = Open(context.Background(), src, be, opt, nil)
			}
			if err != nil {
				t.Fatal(err)
			}
			defer closeEngine()
			tok, logits := greedyBatch(t, e, prompts, steps)
			worst := sameRuns(t, c.name, tok, wantTok, logits, wantLog, gpuRankTol)
			if st := e.GraphStats(); c.graphs {
				t.Logf("%s: rank graphs %+v", c.name, st)
				if st.Replays == 0 {
					t.Errorf("%s: no decode step replayed the ranks' graphs (%+v)", c.name, st)
				}
			}
			t.Logf("%s: %d sequences × %d steps: greedy tokens identical to the plain CUDA engine; logits' largest relative difference %.3g",
				c.name, len(prompts), steps, worst)
		})
	}
}
