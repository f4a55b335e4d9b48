package parallel

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/kernels/cuda/cudatest"
	"github.com/glmtopo/glmtopo/model/modeltest"
	"github.com/glmtopo/glmtopo/transport/nccl"
)

// gpuOneRankTol bounds the one-rank engine's logits against the plain
// one's: a one-rank sum is skipped, so they should be equal bit for bit;
// the tolerance only admits kernels that reduce in a different order from
// run to run, while a communicator that dropped or doubled a partial sum
// would move logits by far more.
const gpuOneRankTol = 1e-5

// TestOneRankNCCLOnGPU is the one-GPU half of the multi-GPU stage's
// acceptance: the engine whose layers call a one-rank NCCL TensorAllReducer
// after o_proj, the dense MLP and each MoE layer (as a tensor-parallel rank
// does) gives the plain engine's greedy tokens, and its logits (bit for
// bit but for gpuOneRankTol), eagerly and replaying decode graphs; step
// times of both are logged (bench step --tensor-parallel-size 1 times
// them on GLM-4.5 shapes).
func TestOneRankNCCLOnGPU(t *testing.T) {
	be := cudatest.Open(t, cuda.Options{})
	root := filepath.Join("..", "testdata", "glm4moe", "tiny")
	w := modeltest.LoadWeights(t, be, filepath.Join(root, "model"))
	prompts := fixturePrompts(t, root)
	ar := nccl.NewTensorAllReducer(nil, be) // world size 1: no libnccl needed
	newEngine := func(t *testing.T, opt EngineOptions) *Engine {
		opt.BlockSize, opt.KVDType, opt.GraphMinContext = 16, kernels.BF16, 16
		if opt.MaxTokens == 0 {
			opt.MaxTokens = 1024
		}
		e, err := NewEngine(be, w, opt)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(e.Close)
		return e
	}
	for _, eager := range []bool{true, false} {
		t.Run(fmt.Sprintf("eager-%v", eager), func(t *testing.T) {
			const steps = 12
			e := newEngine(t, EngineOptions{EnforceEager: eager, Collective: ar})
			tokA, logA := greedyBatch(t, e, prompts, steps)
			statsA := e.GraphStats()
			e.Close()
			plain := newEngine(t, EngineOptions{EnforceEager: eager})
			tokB, logB := greedyBatch(t, plain, prompts, steps)
			worst := sameRuns(t, fmt.Sprintf("eager %v", eager), tokA, tokB, logA, logB, gpuOneRankTol)
			t.Logf("%d sequences × %d steps: greedy tokens identical; logits' largest relative difference %.3g (0: bit for bit)", len(prompts), steps, worst)
			if !eager && statsA.Replays == 0 {
				t.Errorf("the communicator's engine replayed no decode graph: %+v", statsA)
			}
		})
	}
	t.Run("step-time", func(t *testing.T) {
		const ctx, steps = 256, 50
		for _, batch := range []int{1, 16, 64} {
			var ms [2]float64
			for i, c := range []kernels.Collective{nil, ar} {
				e := newEngine(t, EngineOptions{MaxTokens: 64*ctx + 16, Collective: c})
				ms[i] = decodeStepTime(t, e, batch, ctx, steps).Seconds() * 1e3
				e.Close()
			}
			t.Logf("tiny, batch %2d, graphs: plain %.3f ms/step, one-rank NCCL %.3f ms/step (%+.1f%%)", batch, ms[0], ms[1], 100*(ms[1]/ms[0]-1))
		}
	})
}
