package tp

import (
	"context"
	"errors"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
)

// reduceAll runs one all-reduce of parts over a fresh hub, each member on
// its own goroutine after delay[m], and returns each member's result.
func reduceAll(t *testing.T, parts [][]float32, delay []time.Duration, timeout time.Duration) ([][]float32, []error) {
	t.Helper()
	members := make([]int, len(parts))
	for m := range members {
		members[m] = m
	}
	h := newHub(members, timeout, newFate(context.Background()))
	out := make([][]float32, len(parts))
	errs := make([]error, len(parts))
	var wg sync.WaitGroup
	for m := range parts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(delay[m])
			out[m], errs[m] = h.allReduce(m, append([]float32(nil), parts[m]...))
		}()
	}
	wg.Wait()
	return out, errs
}

// TestAllReduceAddsInRankOrder: whatever order the ranks arrive in, each
// gets the bits of ((p0 + p1) + p2) + p3, where another order differs.
func TestAllReduceAddsInRankOrder(t *testing.T) {
	parts := [][]float32{{1e8, 1}, {1, 1e8}, {-1e8, -1e8}, {1, 1}}
	want := make([]float32, 2)
	for i := range want {
		want[i] = ((parts[0][i] + parts[1][i]) + parts[2][i]) + parts[3][i]
	}
	if reversed := ((parts[3][0] + parts[2][0]) + parts[1][0]) + parts[0][0]; reversed == want[0] {
		t.Fatalf("test values add the same in both orders (%g)", reversed)
	}
	for _, delay := range [][]time.Duration{{0, 0, 0, 0}, {3 * time.Millisecond, 2 * time.Millisecond, time.Millisecond, 0}} {
		out, errs := reduceAll(t, parts, delay, 5*time.Second)
		for m := range parts {
			if errs[m] != nil {
				t.Fatal(errs[m])
			}
			for i := range want {
				if math.Float32bits(out[m][i]) != math.Float32bits(want[i]) {
					t.Errorf("arrivals %v: rank %d got %v, want %v (rank order)", delay, m, out[m], want)
				}
			}
		}
	}
}

// TestAllReduceFailures: a missing rank is named after the timeout, a
// size mismatch is an error for every rank, and a failed peer or an ended
// context release the waiting ranks at once.
func TestAllReduceFailures(t *testing.T) {
	t.Run("missing rank times out", func(t *testing.T) {
		h := newHub([]int{0, 1, 2}, 50*time.Millisecond, newFate(context.Background()))
		start := time.Now()
		_, err := h.allReduce(0, []float32{1})
		if err == nil || !strings.Contains(err.Error(), "ranks [1 2]") || time.Since(start) > 2*time.Second {
			t.Fatalf("err %v after %v, want the missing ranks [1 2] named after 50ms", err, time.Since(start))
		}
		if _, err := h.allReduce(1, []float32{1}); err == nil {
			t.Fatal("a rank arriving after the step failed: no error")
		}
	})
	t.Run("size mismatch", func(t *testing.T) {
		_, errs := reduceAll(t, [][]float32{{1, 2}, {1}}, []time.Duration{0, 0}, 5*time.Second)
		for m, err := range errs {
			if err == nil || !strings.Contains(err.Error(), "gave") {
				t.Errorf("rank %d: err %v, want a size mismatch", m, err)
			}
		}
	})
	t.Run("peer failure", func(t *testing.T) {
		f := newFate(context.Background())
		h := newHub([]int{0, 1}, time.Minute, f)
		boom := errors.New("rank 1: boom")
		go func() { time.Sleep(10 * time.Millisecond); f.fail(boom) }()
		start := time.Now()
		if _, err := h.allReduce(0, []float32{1}); !errors.Is(err, boom) || time.Since(start) > 5*time.Second {
			t.Fatalf("err %v after %v, want the peer's error at once", err, time.Since(start))
		}
	})
	t.Run("context", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		defer cancel()
		h := newHub([]int{0, 1}, time.Minute, newFate(ctx))
		if _, err := h.allReduce(0, []float32{1}); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err %v, want the context's", err)
		}
	})
}

// failingBackend fails every Linear of its rank while fail is set.
type failingBackend struct {
	*cpu.Backend
	fail *bool
}

func (b failingBackend) Linear(out, x, w, bias *kernels.Tensor) error {
	if *b.fail {
		return errors.New("injected failure")
	}
	return b.Backend.Linear(out, x, w, bias)
}

// TestGroupRankFailureReachesEveryRank: a rank that fails mid-step fails
// the step for all (no rank waits out its timeout), the error names it, and
// the next step runs normally.
func TestGroupRankFailureReachesEveryRank(t *testing.T) {
	dir, cfg := synthModel(t, groupLimited, "bf16")
	g, err := NewGrid(cfg, 0, cfg.NumHiddenLayers, 4, 2, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	fail := false
	newBE := func(r int) (kernels.Backend, error) {
		if r == 2 {
			return failingBackend{cpu.New(1), &fail}, nil
		}
		return cpu.New(1), nil
	}
	gr, err := New(context.Background(), g, Options{NewBackend: newBE, Load: loader(dir), Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer gr.Close()
	if err := gr.AllocKV(kernels.F32, 1, 16); err != nil {
		t.Fatal(err)
	}
	b := steps()[0]
	h := make([]float32, b.Tokens()*cfg.HiddenSize)
	fail = true
	start := time.Now()
	err = gr.Run(context.Background(), b, h)
	if err == nil || !strings.Contains(err.Error(), "rank 2") || !strings.Contains(err.Error(), "injected failure") {
		t.Fatalf("err %v, want rank 2's injected failure", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("the failure took %v to reach the other ranks", d)
	}
	fail = false
	if err := gr.Run(context.Background(), b, h); err != nil {
		t.Fatalf("the step after a failed one: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := gr.Run(ctx, b, h); !errors.Is(err, context.Canceled) {
		t.Fatalf("a cancelled step: err %v", err)
	}
	if err := gr.Run(context.Background(), &kernels.Batch{}, make([]float32, 3)); err == nil {
		t.Fatal("3 values for 0 tokens: no error")
	}
}
