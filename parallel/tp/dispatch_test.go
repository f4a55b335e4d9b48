package tp

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/topology"
)

// dispatchCases are the layouts the all-to-all dispatch runs: whole
// experts (EP = ranks), experts split inside EP groups (TP2×EP2 on 4
// ranks), and EPLB replicas.
var dispatchCases = []struct {
	name          string
	ranks, tp, ep int
	lists         [][]int
}{
	{"ep2", 2, 1, 2, nil}, {"ep4", 4, 1, 4, nil}, {"tp2+ep2", 2, 2, 2, nil}, {"tp2xep2", 4, 2, 2, nil},
	{"eplb-ep4", 4, 1, 4, [][]int{{0, 1, 2, 3, 4, 5}, {4, 5, 6, 7, 8, 9}, {8, 9, 10, 11, 12, 13}, {12, 13, 14, 15, 0, 1}}},
	{"eplb-tp2xep2", 4, 2, 2, [][]int{{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, {6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0}}},
}

// TestDispatchAllToAllMatchesOneRank: the all-to-all dispatch gives one
// rank's rows within 1e-5 on every layout (bf16 and FP8), through a
// prefill of 9 tokens (ranks with 2 or 3 of them) and two decode steps
// (one token: every rank but one owns none).
func TestDispatchAllToAllMatchesOneRank(t *testing.T) {
	for _, dtype := range []string{"bf16", "fp8"} {
		dir, cfg := synthModel(t, groupLimited, dtype)
		rng := rand.New(rand.NewPCG(1, 2))
		var ins [][]float32
		for _, b := range steps() {
			ins = append(ins, input(rng, b.Tokens(), cfg.HiddenSize))
		}
		want := oneRank(t, dir, cfg, ins)
		for _, c := range dispatchCases {
			t.Run(dtype+"/"+c.name, func(t *testing.T) {
				var place []topology.LayerExperts
				for l := cfg.FirstKDenseReplace; l < cfg.NumHiddenLayers && c.lists != nil; l++ {
					place = append(place, topology.LayerExperts{Layer: l, GPUs: c.lists})
				}
				g, err := NewGrid(cfg, 0, cfg.NumHiddenLayers, c.ranks, c.tp, c.ep, place)
				if err != nil {
					t.Fatal(err)
				}
				got := runSteps(t, g, Options{NewBackend: cpuBackend, Load: loader(dir), Dispatch: DispatchAllToAll}, ins)
				if d := maxDiff(got, want); d > 1e-5 {
					t.Errorf("max |diff| %.3g from one rank", d)
				} else {
					t.Logf("%s, all-to-all: max |diff| from one rank %.3g", g, d)
				}
			})
		}
	}
}

// moeFailingBackend fails every MoE of its rank: between the dispatch's
// two all-to-alls, with its peers already waiting in the second.
type moeFailingBackend struct{ *cpu.Backend }

func (moeFailingBackend) MoE(out, x, ids, w *kernels.Tensor, e []*kernels.Expert) error {
	return errors.New("injected expert failure")
}

// TestDispatchRankFailure: a rank failing mid-exchange fails the step on
// every rank at once (not after the collective timeout), naming it.
func TestDispatchRankFailure(t *testing.T) {
	dir, cfg := synthModel(t, groupLimited, "bf16")
	g, err := NewGrid(cfg, 0, cfg.NumHiddenLayers, 4, 1, 4, nil)
	if err != nil {
		t.Fatal(err)
	}
	newBE := func(r int) (kernels.Backend, error) {
		if r == 1 {
			return moeFailingBackend{cpu.New(1)}, nil
		}
		return cpu.New(1), nil
	}
	gr, err := New(context.Background(), g, Options{NewBackend: newBE, Load: loader(dir), Timeout: time.Minute, Dispatch: DispatchAllToAll})
	if err != nil {
		t.Fatal(err)
	}
	defer gr.Close()
	if err := gr.AllocKV(kernels.F32, 1, 16); err != nil {
		t.Fatal(err)
	}
	b := steps()[0]
	h := input(rand.New(rand.NewPCG(3, 4)), b.Tokens(), cfg.HiddenSize)
	start := time.Now()
	err = gr.Run(context.Background(), b, h)
	if err == nil || !strings.Contains(err.Error(), "rank 1") || !strings.Contains(err.Error(), "injected expert failure") {
		t.Fatalf("err %v, want rank 1's injected failure", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("the failure took %v to reach the other ranks", d)
	}
	t.Logf("failed in %v: %v", time.Since(start).Round(time.Millisecond), err)
}

// TestDispatchRefused: an unknown dispatch, all-to-all without expert
// parallelism, and all-to-all on factory-made communicators without
// all-to-all-v (its payload checks are the in-process one's).
func TestDispatchRefused(t *testing.T) {
	dir, cfg := synthModel(t, groupLimited, "bf16")
	for _, c := range []struct {
		name          string
		ranks, tp, ep int
		opt           Options
		want          string
	}{
		{"unknown", 2, 1, 2, Options{Dispatch: "broadcast"}, `want "allreduce" or "alltoall"`},
		{"tp only", 2, 2, 1, Options{Dispatch: DispatchAllToAll}, "needs expert parallelism"},
		{"no all-to-all-v", 2, 1, 2, Options{Dispatch: DispatchAllToAll, Collectives: newFakeComms().factory()}, "needs all-to-all-v"},
	} {
		g, err := NewGrid(cfg, 0, cfg.NumHiddenLayers, c.ranks, c.tp, c.ep, nil)
		if err != nil {
			t.Fatal(err)
		}
		c.opt.NewBackend, c.opt.Load = cpuBackend, loader(dir)
		gr, err := New(context.Background(), g, c.opt)
		if err == nil {
			gr.Close()
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err %v, want it to say %q", c.name, err, c.want)
		}
	}
}

// exchangeAll runs one all-to-all-v over a fresh hub, member m announcing
// counts[m] (nil: its payload's) and sending send[m].
func exchangeAll(counts [][]int, send [][][]float32, timeout time.Duration) ([][][]float32, []error) {
	n := len(send)
	members := make([]int, n)
	for m := range members {
		members[m] = m
	}
	h := newHub(members, timeout, newFate(context.Background()))
	out, errs := make([][][]float32, n), make([]error, n)
	var wg sync.WaitGroup
	for m := range send {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &comm{hub: h, member: m}
			if counts == nil || counts[m] == nil {
				out[m], errs[m] = c.AllToAllV(send[m])
			} else {
				out[m], errs[m] = c.allToAllV(counts[m], send[m])
			}
		}()
	}
	wg.Wait()
	return out, errs
}

// TestAllToAllV: every member gets what each peer sent it (empty parts
// included); a payload that disagrees with the count its sender announced,
// or a member sending to the wrong number of ranks, fails every member.
func TestAllToAllV(t *testing.T) {
	send := [][][]float32{
		{{}, {1, 2}, {3}},
		{{4, 5, 6}, {}, {}},
		{{7}, {8, 9}, {10, 11, 12, 13}},
	}
	out, errs := exchangeAll(nil, send, 5*time.Second)
	for m := range send {
		if errs[m] != nil {
			t.Fatal(errs[m])
		}
		for p := range send {
			if fmt.Sprint(out[m][p]) != fmt.Sprint(send[p][m]) {
				t.Errorf("rank %d from %d: %v, want %v", m, p, out[m][p], send[p][m])
			}
		}
	}
	_, errs = exchangeAll([][]int{nil, {3, 0, 1}, nil}, send, 5*time.Second) // rank 1 announces 1 value for rank 2, sends 0
	for m, err := range errs {
		if err == nil || !strings.Contains(err.Error(), "rank 1 sent 0 values to rank 2, which expected 1") {
			t.Errorf("lying count: rank %d: err %v, want the mismatch named", m, err)
		}
	}
	short := [][][]float32{{{1}, {2}}, {{3}, {4}, {5}}, {{6}, {7}, {8}}}
	start := time.Now()
	_, errs = exchangeAll(nil, short, time.Minute)
	for m, err := range errs {
		if err == nil || !strings.Contains(err.Error(), "rank 0 sends to 2 ranks") || time.Since(start) > 10*time.Second {
			t.Errorf("rank 0 sending to 2 of 3 ranks: rank %d: err %v after %v, want it at once", m, err, time.Since(start))
		}
	}
}

// TestExchangeFailures: a rank that never comes is named after the
// timeout; ranks calling different collectives fail the round.
func TestExchangeFailures(t *testing.T) {
	h := newHub([]int{0, 1}, 50*time.Millisecond, newFate(context.Background()))
	start := time.Now()
	_, err := (&comm{hub: h, member: 0}).AllToAllV([][]float32{{1}, {2}})
	if err == nil || !strings.Contains(err.Error(), "ranks [1]") || time.Since(start) > 2*time.Second {
		t.Fatalf("err %v after %v, want rank 1 named after 50ms", err, time.Since(start))
	}
	h = newHub([]int{0, 1}, 5*time.Second, newFate(context.Background()))
	errs := make([]error, 2)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _, errs[0] = (&comm{hub: h, member: 0}).AllGatherV([]float32{1}) }()
	go func() { defer wg.Done(); _, errs[1] = h.allReduce(1, []float32{1}) }()
	wg.Wait()
	for m, err := range errs {
		if err == nil || !strings.Contains(err.Error(), "called") {
			t.Errorf("rank %d: err %v, want the mixed collectives named", m, err)
		}
	}
}
