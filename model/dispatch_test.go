package model

import (
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
)

// loopback is a one-rank Exchanger whose tamper, when set, changes what
// the n-th all-to-all-v (0: dispatch, 1: combine) delivers.
type loopback struct {
	calls  int
	tamper func(call int, recv [][]float32) [][]float32
}

func (l *loopback) Size() int                                 { return 1 }
func (l *loopback) Rank() int                                 { return 0 }
func (l *loopback) AllReduceSum(*kernels.Tensor) error        { return nil }
func (l *loopback) AllGatherV(p []float32) ([]float32, error) { return p, nil }
func (l *loopback) AllToAllV(send [][]float32) ([][]float32, error) {
	recv := send
	if l.tamper != nil {
		recv = l.tamper(l.calls, append([][]float32(nil), send...))
	}
	l.calls++
	return recv, nil
}

type oneRankServers struct{}

func (oneRankServers) Routed(_, _, _ int) (int, int) { return 0, 1 }
func (oneRankServers) Shared() (int, int)            { return 0, 1 }

// TestMoEAllToAllOneRank: on one rank, through a loopback exchange, the
// all-to-all dispatch gives the MoE's output; rows or results whose sizes
// disagree, and a communicator without all-to-all-v, are refused with an
// error (no panic).
func TestMoEAllToAllOneRank(t *testing.T) {
	c, err := Resolve("tiny")
	if err != nil {
		t.Fatal(err)
	}
	be := cpu.New(1)
	w, free, err := DummyWeights(c, Selection{FirstLayer: 1, EndLayer: 2}, be, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	lw := w.Layers[0]
	const T = 7
	rng := rand.New(rand.NewPCG(1, 2))
	xs := make([]float32, T*c.HiddenSize)
	for i := range xs {
		xs[i] = float32(rng.NormFloat64())
	}
	run := func(rc *RankComm) ([]float32, error) {
		f := &Forward{Cfg: c, BE: be, T: T, Ranks: rc}
		defer f.Release()
		x := f.tmp(c.HiddenSize)
		if err := be.Upload(x, f32Bytes(xs)); err != nil {
			t.Fatal(err)
		}
		var m *kernels.Tensor
		if rc == nil {
			m = f.moe(lw, x)
		} else {
			m = f.moeAllToAll(lw, x)
		}
		if f.err != nil {
			return nil, f.err
		}
		return be.Download(m)
	}
	want, err := run(nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := run(&RankComm{MoE: &loopback{}, AllToAll: oneRankServers{}})
	if err != nil {
		t.Fatal(err)
	}
	var d float64
	for i := range want {
		d = max(d, math.Abs(float64(got[i]-want[i])))
	}
	if d > 1e-5 {
		t.Errorf("all-to-all on one rank: max |diff| %.3g from moe", d)
	}
	for _, tc := range []struct {
		name string
		rc   *RankComm
		want string
	}{
		{"short result", &RankComm{AllToAll: oneRankServers{}, MoE: &loopback{tamper: func(call int, r [][]float32) [][]float32 {
			if call == 1 {
				r[0] = r[0][:len(r[0])-c.HiddenSize]
			}
			return r
		}}}, "returned"},
		{"cut row", &RankComm{AllToAll: oneRankServers{}, MoE: &loopback{tamper: func(call int, r [][]float32) [][]float32 {
			if call == 0 {
				r[0] = r[0][:len(r[0])-1]
			}
			return r
		}}}, "are not rows of"},
		{"no exchanger", &RankComm{AllToAll: oneRankServers{}, MoE: collectiveOnly{}}, "has no all-to-all-v"},
	} {
		if _, err := run(tc.rc); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want it to say %q", tc.name, err, tc.want)
		}
	}
}

// collectiveOnly is a Collective without the Exchanger extension.
type collectiveOnly struct{}

func (collectiveOnly) Size() int                          { return 1 }
func (collectiveOnly) Rank() int                          { return 0 }
func (collectiveOnly) AllReduceSum(*kernels.Tensor) error { return nil }
