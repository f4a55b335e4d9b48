package tp

import (
	"context"
	"errors"
	"math/rand/v2"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/topology"
)

// fakeComms counts what the group did with a fake factory's communicators.
type fakeComms struct {
	made, calls, aborts, closes atomic.Int64
	once                        sync.Once
	aborted                     chan struct{} // closed by the first Abort
}

func newFakeComms() *fakeComms { return &fakeComms{aborted: make(chan struct{})} }

// counted is a collective that counts its all-reduces.
type counted struct {
	kernels.Collective
	n *atomic.Int64
}

func (c counted) AllReduceSum(t *kernels.Tensor) error {
	c.n.Add(1)
	return c.Collective.AllReduceSum(t)
}

// factory makes communicators once, as NCCL's are: in-process hubs that
// live as long as the group (their fate ends only by Abort).
func (fc *fakeComms) factory() Collectives {
	return func(ctx context.Context, g *Grid, bes []kernels.Backend) (*Comms, error) {
		fc.made.Add(1)
		f := newFate(context.Background())
		all := make([]int, g.Ranks)
		for r := range all {
			all[r] = r
		}
		world := newHub(all, time.Minute, f)
		var tps []*hub
		for rep := 0; rep < g.Ranks/g.TP; rep++ {
			tps = append(tps, newHub(all[rep*g.TP:(rep+1)*g.TP], time.Minute, f))
		}
		c := &Comms{
			Ranks: make([]RankComms, g.Ranks),
			Abort: func() {
				fc.aborts.Add(1)
				fc.once.Do(func() { close(fc.aborted) })
				f.fail(errors.New("communicators aborted"))
			},
			Close: func() { fc.closes.Add(1) },
		}
		for r := range c.Ranks {
			c.Ranks[r] = RankComms{
				TP:  counted{&comm{hub: tps[g.Replica(r)], member: g.TPRank(r), be: bes[r]}, &fc.calls},
				MoE: counted{&comm{hub: world, member: r, be: bes[r]}, &fc.calls},
			}
		}
		return c, nil
	}
}

// runSteps runs the steps' inputs on a group made with opt.
func runSteps(t *testing.T, g *Grid, opt Options, ins [][]float32) [][]float32 {
	t.Helper()
	gr, err := New(context.Background(), g, opt)
	if err != nil {
		t.Fatal(err)
	}
	defer gr.Close()
	if err := gr.AllocKV(kernels.F32, 1, 16); err != nil {
		t.Fatal(err)
	}
	var outs [][]float32
	for i, b := range steps() {
		h := append([]float32(nil), ins[i]...)
		if err := gr.Run(context.Background(), b, h); err != nil {
			t.Fatal(err)
		}
		outs = append(outs, h)
	}
	return outs
}

// TestGroupInjectedCollectives: a group whose communicators come from a
// factory (made once, used by every step, closed with the group) gives the
// in-process group's rows bit for bit on every layout, EPLB included.
func TestGroupInjectedCollectives(t *testing.T) {
	dir, cfg := synthModel(t, groupLimited, "bf16")
	rng := rand.New(rand.NewPCG(3, 4))
	var ins [][]float32
	for _, b := range steps() {
		ins = append(ins, input(rng, b.Tokens(), cfg.HiddenSize))
	}
	hot := [][]int{{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, {6, 7, 8, 9, 10, 11, 12, 13, 14, 15}}
	for _, c := range []struct {
		name          string
		ranks, tp, ep int
		lists         [][]int
	}{
		{"one", 1, 1, 1, nil}, {"tp2", 2, 2, 1, nil}, {"ep2", 2, 1, 2, nil}, {"tp2xep2", 4, 2, 2, nil}, {"eplb-tp2+ep2", 2, 2, 2, hot},
	} {
		t.Run(c.name, func(t *testing.T) {
			var place []topology.LayerExperts
			for l := cfg.FirstKDenseReplace; l < cfg.NumHiddenLayers && c.lists != nil; l++ {
				place = append(place, topology.LayerExperts{Layer: l, GPUs: c.lists})
			}
			g, err := NewGrid(cfg, 0, cfg.NumHiddenLayers, c.ranks, c.tp, c.ep, place)
			if err != nil {
				t.Fatal(err)
			}
			want := runSteps(t, g, Options{NewBackend: cpuBackend, Load: loader(dir)}, ins)
			fc := newFakeComms()
			got := runSteps(t, g, Options{NewBackend: cpuBackend, Load: loader(dir), Collectives: fc.factory()}, ins)
			if d := maxDiff(got, want); d != 0 {
				t.Errorf("max |diff| %.3g from the in-process group's rows; want bit for bit", d)
			}
			wantCalls := int64(0)
			if c.ranks > 1 {
				wantCalls = 1 // at least: every MoE layer's all-reduce on every rank
			}
			if fc.made.Load() != 1 || fc.closes.Load() != 1 || fc.aborts.Load() != 0 || fc.calls.Load() < wantCalls {
				t.Errorf("factory made %d, closed %d, aborted %d, %d all-reduces; want 1, 1, 0, ≥ %d",
					fc.made.Load(), fc.closes.Load(), fc.aborts.Load(), fc.calls.Load(), wantCalls)
			}
			t.Logf("%s: %d all-reduces through the injected communicators", g, fc.calls.Load())
		})
	}
}

// closeCounting counts its backend's Close.
type closeCounting struct {
	kernels.Backend
	n *atomic.Int64
}

func (b closeCounting) Close() error { b.n.Add(1); return b.Backend.Close() }

// waitGoroutines waits (at most 5 s) for the goroutine count to fall to n.
func waitGoroutines(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > n {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines, %d before New:\n%s", runtime.NumGoroutine(), n, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestGroupCollectivesRefused: a factory that fails, or makes communicators
// that do not fit the grid, fails New with an error saying why; the
// backends are closed, the wrong communicators freed, no goroutine is left.
func TestGroupCollectivesRefused(t *testing.T) {
	dir, cfg := synthModel(t, groupLimited, "bf16")
	g, err := NewGrid(cfg, 0, cfg.NumHiddenLayers, 4, 2, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	fc := newFakeComms()
	swap := func(c *Comms, err error) (*Comms, error) {
		c.Ranks[1], c.Ranks[2] = c.Ranks[2], c.Ranks[1]
		return c, err
	}
	for _, tc := range []struct {
		name    string
		f       Collectives
		want    string
		closes0 int64
	}{
		{"factory error", func(context.Context, *Grid, []kernels.Backend) (*Comms, error) {
			return nil, errors.New("no libnccl here")
		}, "no libnccl here", 0},
		{"too few ranks", func(ctx context.Context, g *Grid, bes []kernels.Backend) (*Comms, error) {
			c, err := fc.factory()(ctx, g, bes)
			c.Ranks = c.Ranks[:3]
			return c, err
		}, "made for 3 ranks, the grid has 4", 1},
		{"ranks swapped", func(ctx context.Context, g *Grid, bes []kernels.Backend) (*Comms, error) {
			return swap(fc.factory()(ctx, g, bes))
		}, "rank 1: TP communicator is rank 0 of 2, want rank 1 of 2", 1},
		{"no MoE communicator", func(ctx context.Context, g *Grid, bes []kernels.Backend) (*Comms, error) {
			c, err := fc.factory()(ctx, g, bes)
			c.Ranks[3].MoE = nil
			return c, err
		}, "rank 3: no MoE communicator", 1},
		{"NCCL on CPU backends", NCCL(NCCLOptions{}), "not a CUDA backend", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := runtime.NumGoroutine()
			closes0 := fc.closes.Load()
			var beCloses atomic.Int64
			newBE := func(int) (kernels.Backend, error) { return closeCounting{cpu.New(1), &beCloses}, nil }
			gr, err := New(context.Background(), g, Options{NewBackend: newBE, Load: loader(dir), Collectives: tc.f})
			if err == nil {
				gr.Close()
				t.Fatal("New succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want it to say %q", err, tc.want)
			}
			if beCloses.Load() != int64(g.Ranks) {
				t.Errorf("%d of %d backends closed", beCloses.Load(), g.Ranks)
			}
			if d := fc.closes.Load() - closes0; d != tc.closes0 {
				t.Errorf("communicators closed %d times, want %d", d, tc.closes0)
			}
			waitGoroutines(t, before)
		})
	}
}

// TestGroupInjectedFailureAborts: a rank that fails mid-step aborts the
// injected communicators, so its peers blocked in an all-reduce return at
// once with the failing rank's error; the group then refuses further steps
// (an aborted NCCL communicator cannot be rejoined) instead of hanging.
func TestGroupInjectedFailureAborts(t *testing.T) {
	dir, cfg := synthModel(t, groupLimited, "bf16")
	g, err := NewGrid(cfg, 0, cfg.NumHiddenLayers, 4, 2, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	fail := true
	newBE := func(r int) (kernels.Backend, error) {
		if r == 2 {
			return failingBackend{cpu.New(1), &fail}, nil
		}
		return cpu.New(1), nil
	}
	fc := newFakeComms()
	gr, err := New(context.Background(), g, Options{NewBackend: newBE, Load: loader(dir), Timeout: time.Minute, Collectives: fc.factory()})
	if err != nil {
		t.Fatal(err)
	}
	defer gr.Close()
	if err := gr.AllocKV(kernels.F32, 1, 16); err != nil {
		t.Fatal(err)
	}
	b := steps()[0]
	h := make([]float32, b.Tokens()*cfg.HiddenSize)
	start := time.Now()
	err = gr.Run(context.Background(), b, h)
	if err == nil || !strings.Contains(err.Error(), "rank 2") || !strings.Contains(err.Error(), "injected failure") {
		t.Fatalf("err %v, want rank 2's injected failure", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("the failure took %v to reach the other ranks", d)
	}
	if fc.aborts.Load() == 0 {
		t.Error("the communicators were not aborted")
	}
	fail = false
	if err := gr.Run(context.Background(), b, h); !errors.Is(err, errAborted) {
		t.Fatalf("the step after an abort: err %v, want %v", err, errAborted)
	}
}

// TestGroupInjectedStepTimeout: with injected communicators a step that
// overruns Options.Timeout (a rank stuck where no wait of this package can
// see it) aborts them and fails with an error naming the timeout.
func TestGroupInjectedStepTimeout(t *testing.T) {
	dir, cfg := synthModel(t, groupLimited, "bf16")
	g, err := NewGrid(cfg, 0, cfg.NumHiddenLayers, 2, 2, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	fc := newFakeComms()
	newBE := func(r int) (kernels.Backend, error) {
		if r == 1 {
			return stuckBackend{cpu.New(1), fc.aborted}, nil
		}
		return cpu.New(1), nil
	}
	gr, err := New(context.Background(), g, Options{NewBackend: newBE, Load: loader(dir), Timeout: 200 * time.Millisecond, Collectives: fc.factory()})
	if err != nil {
		t.Fatal(err)
	}
	defer gr.Close()
	if err := gr.AllocKV(kernels.F32, 1, 16); err != nil {
		t.Fatal(err)
	}
	b := steps()[0]
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- gr.Run(context.Background(), b, make([]float32, b.Tokens()*cfg.HiddenSize)) }()
	select {
	case err = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("the step did not end 20 s after its 200 ms timeout")
	}
	if err == nil || !strings.Contains(err.Error(), "after 200ms") {
		t.Fatalf("err %v, want the step's timeout", err)
	}
	if d := time.Since(start); d < 200*time.Millisecond {
		t.Errorf("the step failed after %v, before its timeout", d)
	}
	if fc.aborts.Load() == 0 {
		t.Error("the communicators were not aborted")
	}
}

// stuckBackend's Linear blocks until released, as a GPU kernel waiting on
// a peer that never sends spins until its communicator is aborted.
type stuckBackend struct {
	*cpu.Backend
	release <-chan struct{}
}

func (b stuckBackend) Linear(out, x, w, bias *kernels.Tensor) error {
	<-b.release
	return errors.New("kernel ended by the abort")
}

// TestNCCLCommGroups: the NCCL factory makes one communicator per TP group
// and one over every rank, sharing it when a TP group is every rank, and a
// one-rank communicator for one rank.
func TestNCCLCommGroups(t *testing.T) {
	cfg := tinyConfig(t)
	for _, c := range []struct {
		ranks, tp, ep int
		want          [][]int
	}{
		{1, 1, 1, [][]int{{0}}},
		{2, 2, 1, [][]int{{0, 1}}},
		{2, 2, 2, [][]int{{0, 1}}},
		{4, 4, 4, [][]int{{0, 1, 2, 3}}},
		{2, 1, 2, [][]int{{0, 1}}},
		{4, 2, 2, [][]int{{0, 1}, {2, 3}, {0, 1, 2, 3}}},
	} {
		g, err := NewGrid(cfg, 0, cfg.NumHiddenLayers, c.ranks, c.tp, c.ep, nil)
		if err != nil {
			t.Fatal(err)
		}
		if got := commGroups(g); !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s: communicators %v, want %v", g, got, c.want)
		}
	}
}
