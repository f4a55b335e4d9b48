package parallel

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
)

// The host's target distribution draws what the plain sampler draws, so a
// verify row with no draft samples exactly as a step without speculation.
func TestTargetDistMatchesSampleRow(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, p := range []kernels.SampleParams{
		{Temperature: 1}, {Temperature: 0.7, TopK: 5}, {Temperature: 1.3, TopP: 0.8}, {Temperature: 1, TopK: 40, TopP: 0.5},
		{Temperature: 1, Ban: []int32{3, 7}},
	} {
		for trial := 0; trial < 50; trial++ {
			row := make([]float32, 300)
			for i := range row {
				row[i] = float32(rng.NormFloat64() * 3)
			}
			row[rng.IntN(len(row))] = row[rng.IntN(len(row))] // a tie
			d := newTargetDist(row, p)
			if p.TopK == 0 && (p.TopP == 0 || p.TopP >= 1) {
				// Nothing is cut: the weights are softmax(row/T) over the tokens not banned.
				checkSoftmax(t, d, row, p)
				continue
			}
			for range 20 {
				p.U = rng.Float32()
				want := cpu.SampleRows(row, len(row), []kernels.SampleParams{p})[0]
				if got := d.sample(p.U, -1); got != want {
					t.Fatalf("params %+v: dist samples %d, SampleRow %d", p, got, want)
				}
			}
		}
	}
}

// Accepting a one-hot draft x with probability p(x) and otherwise drawing
// from p without x emits every token with probability p, whatever x is:
// checked exactly over a grid of the two uniforms.
func TestExactAcceptPreservesTarget(t *testing.T) {
	row := []float32{2, 1.5, 0.3, -1, 0.9, 2}
	d := newTargetDist(row, kernels.SampleParams{Temperature: 1})
	const grid = 400
	for draft := range int32(len(row)) {
		got := make([]float64, len(row))
		accepted := 0.0
		for i := range grid {
			for j := range grid {
				u1, u2 := (float32(i)+0.5)/grid, (float32(j)+0.5)/grid
				tok, ok := exactAccept(d, draft, u1, u2)
				got[tok] += 1.0 / (grid * grid)
				if ok {
					accepted += 1.0 / (grid * grid)
				}
			}
		}
		for id := range int32(len(row)) {
			if math.Abs(got[id]-d.prob(id)) > 2.0/grid {
				t.Errorf("draft %d: token %d emitted with %.4f, target %.4f", draft, id, got[id], d.prob(id))
			}
		}
		if math.Abs(accepted-d.prob(draft)) > 2.0/grid {
			t.Errorf("draft %d accepted with %.4f, want p = %.4f", draft, accepted, d.prob(draft))
		}
	}
}

func checkSoftmax(t *testing.T, d targetDist, row []float32, p kernels.SampleParams) {
	t.Helper()
	var sum float64
	w := make([]float64, len(row))
	for i, x := range row {
		if !slices.Contains(p.Ban, int32(i)) {
			w[i] = math.Exp(float64(x) / float64(p.Temperature))
			sum += w[i]
		}
	}
	for i := range row {
		if got, want := d.prob(int32(i)), w[i]/sum; math.Abs(got-want) > 1e-9 {
			t.Fatalf("params %+v: p(%d) = %g, softmax %g", p, i, got, want)
		}
	}
}

// BenchmarkTargetDist: the host's work to verify one sampled draft on a
// GLM-4.5-sized row (151,552 logits), without and with top-p.
func BenchmarkTargetDist(b *testing.B) {
	rng := rand.New(rand.NewPCG(5, 6))
	row := make([]float32, 151552)
	for i := range row {
		row[i] = float32(rng.NormFloat64() * 2)
	}
	for _, p := range []kernels.SampleParams{{Temperature: 1}, {Temperature: 0.6, TopP: 0.95}} {
		b.Run(fmt.Sprintf("T=%g/top-p=%g", p.Temperature, p.TopP), func(b *testing.B) {
			for range b.N {
				d := newTargetDist(row, p)
				exactAccept(d, 17, 0.5, 0.5)
			}
		})
	}
}
