package parallel

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/model/modeltest"
	"github.com/glmtopo/glmtopo/parallel/tp"
)

// dispatchEngine is rankedEngine with the MoE layers' dispatch set.
func dispatchEngine(t *testing.T, dir string, c rankCase, dispatch string) *Engine {
	t.Helper()
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	opt := testEngineOpt
	opt.Ranks = RankOptions{Ranks: c.ranks, TP: c.tp, EP: c.ep, NewBackend: cpuRanks, Dispatch: dispatch}
	if c.lists != nil {
		opt.Ranks.Experts = placement(cfg, c.lists)
	}
	e, closeEngine, err := Open(context.Background(), ModelSource{Path: dir}, cpu.New(0), opt, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(closeEngine)
	return e
}

// TestRanksDispatchAllToAll runs both fixtures' golden prompts (prefill,
// MTP, 11 decode steps) with the all-to-all expert dispatch on every
// expert-parallel layout (EP 2 and 4, TP2×EP2, EPLB replicas) and compares
// greedy tokens and every logit with one rank's.
func TestRanksDispatchAllToAll(t *testing.T) {
	for _, fx := range fixtures {
		root := filepath.Join("..", "testdata", "glm4moe", fx)
		dir := filepath.Join(root, "model")
		g := modeltest.OpenGolden(t, root)
		ref := loadFixtureEngine(t, dir)
		var wantToks [][]int32
		var wantLogits [][]float32
		for i := 0; i < 4; i++ {
			toks, l := greedyRun(t, ref, g.IDs(fmt.Sprintf("prompt_%d", i)), 12)
			wantToks, wantLogits = append(wantToks, toks), append(wantLogits, l)
		}
		for _, c := range rankCases {
			if c.ep < 2 {
				continue
			}
			t.Run(fx+"/"+c.name, func(t *testing.T) {
				e := dispatchEngine(t, dir, c, tp.DispatchAllToAll)
				worst := 0.0
				for i := range wantToks {
					toks, l := greedyRun(t, e, g.IDs(fmt.Sprintf("prompt_%d", i)), 12)
					if fmt.Sprint(toks) != fmt.Sprint(wantToks[i]) {
						t.Errorf("prompt %d: tokens %v, one rank %v", i, toks, wantToks[i])
					}
					worst = max(worst, maxAbsDiff(l, wantLogits[i]))
				}
				if worst > rankTol {
					t.Errorf("max |logit diff| %.3g > %g", worst, rankTol)
				}
				t.Logf("all-to-all dispatch: max |logit diff| vs one rank: %.3g", worst)
			})
		}
	}
}

// TestRankOptionsDispatchRefused: the all-to-all dispatch without expert
// parallelism, and an unknown dispatch, are refused before any step.
func TestRankOptionsDispatchRefused(t *testing.T) {
	dir := fixtureDir("tiny")
	for _, tc := range []struct {
		name string
		ro   RankOptions
		want string
	}{
		{"alltoall without EP", RankOptions{Ranks: 2, TP: 2, EP: 1, NewBackend: cpuRanks, Dispatch: "alltoall"}, "needs expert parallelism"},
		{"unknown", RankOptions{Ranks: 2, TP: 1, EP: 2, NewBackend: cpuRanks, Dispatch: "gather"}, `dispatch "gather"`},
	} {
		opt := testEngineOpt
		opt.Ranks = tc.ro
		_, _, err := Open(context.Background(), ModelSource{Path: dir}, cpu.New(0), opt, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want it to say %q", tc.name, err, tc.want)
		}
	}
}
