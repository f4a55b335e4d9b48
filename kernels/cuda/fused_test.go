package cuda

import (
	"fmt"
	"math"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

// TestLinearMultiTwin: q/k/v-like Linear layers of one input in one
// streamed launch (row counts that cut 16-row groups, K split or not, a
// bias on some) equal separate Linear layers on the CPU; what the streamed
// kernel does not take is refused untouched.
func TestLinearMultiTwin(t *testing.T) {
	p := newPair(t)
	for _, wc := range []struct {
		name   string
		dt     kernels.DType
		layout kernels.ScaleLayout
		block  [2]int
	}{
		{"bf16", kernels.BF16, 0, [2]int{}},
		{"fp8-channel", kernels.F8E4M3, kernels.ScalePerChannel, [2]int{}},
		{"fp8-block128", kernels.F8E4M3, kernels.ScaleBlock, [2]int{128, 128}},
	} {
		for _, sh := range [][4]int{{1, 200, 24, 512}, {3, 1030, 40, 4096}, {12, 96, 16, 1024}, {2, 4096, 512, 4096}, {40, 130, 17, 256}} {
			T, NQ, NKV, K := sh[0], sh[1], sh[2], sh[3]
			t.Run(fmt.Sprintf("%s/T%d_N%d+%d+%d_K%d", wc.name, T, NQ, NKV, NKV, K), func(t *testing.T) {
				p := p.sub(t)
				ns := []int{NQ, NKV, NKV}
				x := p.f32(1, T, K)
				var outs, ws, bs []twin
				for i, n := range ns {
					ws = append(ws, p.weight(wc.dt, wc.layout, wc.block, n, K))
					outs = append(outs, p.poisoned(T, n))
					if i != 1 {
						bs = append(bs, p.f32(0.5, n))
					} else {
						bs = append(bs, twin{})
					}
				}
				gs := func(v []twin) []*kernels.Tensor {
					r := make([]*kernels.Tensor, len(v))
					for i := range v {
						r[i] = v[i].g
					}
					return r
				}
				done, err := p.gpu.LinearMulti(gs(outs), x.g, gs(ws), gs(bs))
				if err != nil {
					t.Fatal(err)
				}
				want := T <= mmaMaxTokens
				for _, w := range ws {
					wi := weightInfoOf(t, w.g)
					want = want && p.gpu.sgLinearTakes(wi, T) && !p.gpu.wgTakes(wi, T)
				}
				if done != want {
					t.Fatalf("LinearMulti handled=%v, want %v", done, want)
				}
				if !done {
					return
				}
				for i := range ns {
					must(t, "linear", p.cpu.Linear(outs[i].c, x.c, ws[i].c, bs[i].c))
					p.check(fmt.Sprintf("segment %d", i), outs[i], fp8Tol(p, wc.dt, 5e-5))
				}
			})
		}
	}
}

// TestArgmaxTwin: rows of GLM-4.5's vocabulary and awkward widths, with the
// maximum tied across chunks (the lower index wins), -inf rows and NaNs.
func TestArgmaxTwin(t *testing.T) {
	p := newPair(t)
	for _, V := range []int{1, 1031, 4096, 4097, 151552} {
		R := 5
		v := p.randF32(R*V, 5)
		if V > 4096 {
			v[0*V+V-1], v[0*V+4100] = 9, 9 // tie in two chunks: 4100 wins
			v[1*V+3], v[1*V+V-2] = 9, 9
		}
		for i := 0; i < V; i++ { // row 2: all -inf (index 0)
			v[2*V+i] = float32(math.Inf(-1))
		}
		v[3*V+V/2] = float32(math.NaN()) // NaNs are never picked
		lg := p.upload(kernels.F32, f32Bytes(v), R, V)
		greedy := make([]kernels.SampleParams, R)
		want, err := p.cpu.Sample(lg.c, greedy)
		must(t, "cpu sample", err)
		got, err := p.gpu.Sample(lg.g, greedy)
		must(t, "gpu sample", err)
		if fmt.Sprint(want) != fmt.Sprint(got) {
			t.Fatalf("V %d: gpu %v cpu %v", V, got, want)
		}
	}
}

func weightInfoOf(t *testing.T, w *kernels.Tensor) weightInfo {
	t.Helper()
	wi, err := weightOf(w, "weight")
	if err != nil {
		t.Fatal(err)
	}
	return wi
}
