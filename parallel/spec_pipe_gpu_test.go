package parallel

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/kernels/cuda/cudatest"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/model/modeltest"
	"github.com/glmtopo/glmtopo/transport"
)

// TestSpecPipeOnGPU: a CUDA head (embedding, its layers, lm_head, sampler
// and MTP layer) in front of CPU stages, MTP speculation with micro-batches
// in flight: the graph workload's greedy tokens equal the CPU reference up
// to its first near tie, and more than one micro-batch was in flight.
func TestSpecPipeOnGPU(t *testing.T) {
	be := cudatest.Open(t, cuda.Options{})
	root := filepath.Join("..", "testdata", "glm4moe", "tiny")
	dir := filepath.Join(root, "model")
	g := modeltest.OpenGolden(t, root)
	ref := cpuReference(t, root, g)
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ stages, micro, n int }{{2, 2, 1}, {2, 3, 3}, {3, 3, 1}, {3, 4, 3}} {
		t.Run(fmt.Sprintf("%dstages/%dmb/N%d", c.stages, c.micro, c.n), func(t *testing.T) {
			bounds := splitLayers(cfg.NumHiddenLayers, c.stages)
			w, err := model.LoadWeights(context.Background(), dir, cfg, headSelection(bounds[1])(cfg), be, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { w.Close() })
			head, err := NewEngine(be, w, EngineOptions{BlockSize: 16, MaxTokens: 1024})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(head.Close)
			ring := cpuStagesBehind(t, head, dir, bounds, RingOptions{MicroBatches: c.micro})
			spec := SpecConfig{"mtp", c.n}
			s := NewScheduler(head, SchedulerOptions{MaxNumSeqs: 6, PrefillTokens: 32, Speculative: spec})
			tokens := runGraphWorkload(t, s, g)
			s.Close()
			for i := range graphWorkload {
				if n := ref[i].reliable; !slices.Equal(tokens[i][:n], ref[i].tokens[:n]) {
					t.Errorf("request %d (first %d tokens): %v, cpu %v", i, n, tokens[i], ref[i].tokens)
				}
			}
			st := checkSpecCounters(t, s, c.n)
			if ring.pipe.peak < 2 {
				t.Errorf("at most %d micro-batch in flight", ring.pipe.peak)
			}
			if free := head.KV.FreeBlocks(); free != head.KV.NumBlocks {
				t.Errorf("%d of %d blocks free after the requests", free, head.KV.NumBlocks)
			}
			t.Logf("peak %d micro-batches in flight; %d of %d drafts accepted; head %+v", ring.pipe.peak,
				st.NumAcceptedTokens, st.NumDraftTokens, ring.StepStats())
		})
	}
}

// cpuStagesBehind serves the layer ranges after head's (bounds[1:]) as CPU
// stages on goroutines over in-process links and connects head to them.
func cpuStagesBehind(t *testing.T, head *Engine, dir string, bounds []int, ropt RingOptions) *Ring {
	t.Helper()
	S := len(bounds) - 1
	type end struct{ a, b transport.Link }
	links := make([]end, S) // links[i] joins stage i to stage i+1 (mod S)
	for i := range links {
		a, b := transport.Pipe(fmt.Sprintf("stage%d", i), fmt.Sprintf("stage%d", (i+1)%S), 64<<20, transport.DefaultLimits())
		links[i] = end{a, b}
	}
	var wg sync.WaitGroup
	for i := 1; i < S; i++ {
		sbe, sw := loadFixtureSelection(t, dir, stageSelection(bounds[i], bounds[i+1]))
		st, err := NewStage(sbe, sw)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(st.Close)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := ServeStage(context.Background(), st, links[i-1].b, links[i].a); err != nil {
				t.Logf("stage %d: %v", i, err)
			}
		}()
	}
	// After the stages' Close in registration, so it runs before them.
	t.Cleanup(func() {
		for _, l := range links {
			l.a.Close()
		}
		wg.Wait()
	})
	ring, err := ConnectRing(context.Background(), head, links[0].a, links[S-1].b, ropt)
	if err != nil {
		t.Fatal(err)
	}
	return ring
}
