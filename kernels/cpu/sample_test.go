package cpu

import (
	"math"
	"math/rand/v2"
	"sort"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

// sampleRowSorted is SampleRow as first written: a stable sort of the whole
// row. SampleRow must pick the same token in every case.
func sampleRowSorted(row []float32, p kernels.SampleParams) int {
	idx := make([]int, len(row))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(i, j int) bool { return row[idx[i]] > row[idx[j]] })
	if p.TopK > 0 && p.TopK < len(idx) {
		idx = idx[:p.TopK]
	}
	inv := 1 / float64(p.Temperature)
	m := float64(row[idx[0]])
	probs := make([]float64, len(idx))
	var sum float64
	for i, id := range idx {
		probs[i] = math.Exp((float64(row[id]) - m) * inv)
		sum += probs[i]
	}
	keep := len(idx)
	if p.TopP > 0 && p.TopP < 1 {
		var acc float64
		for i, pr := range probs {
			acc += pr / sum
			if acc >= float64(p.TopP) {
				keep = i + 1
				break
			}
		}
	}
	var kept float64
	for _, pr := range probs[:keep] {
		kept += pr
	}
	target := float64(p.U) * kept
	var acc float64
	for i, pr := range probs[:keep] {
		acc += pr
		if target < acc {
			return idx[i]
		}
	}
	return idx[keep-1]
}

func TestSampleRowMatchesFullSort(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	topU := math.Nextafter32(1, 0) // the largest U below 1
	cases := 0
	for _, v := range []int{1, 7, 63, 64, 300, 5000, 151552} {
		trials := 12
		if v > 10000 {
			trials = 2 // the full sort takes ~90 ms a row
		}
		for trial := 0; trial < trials; trial++ {
			row := make([]float32, v)
			spread := []float32{0.5, 5, 40, 400}[trial%4]
			for i := range row {
				row[i] = float32(r.NormFloat64()) * spread
				if trial%3 == 0 { // ties and signed zeros
					row[i] = float32(math.Round(float64(row[i])))
					if row[i] == 0 && i%2 == 1 {
						row[i] = float32(math.Copysign(0, -1))
					}
				}
			}
			if v > 10 && trial%5 == 0 {
				row[v/2] = float32(math.Inf(-1)) // a banned token
			}
			for _, p := range []kernels.SampleParams{
				{Temperature: 1, U: r.Float32()},
				{Temperature: 0.6, TopP: 0.95, U: r.Float32()},
				{Temperature: 0.05, TopK: 20, U: r.Float32()},
				{Temperature: 1.7, TopK: 3, TopP: 0.5, U: r.Float32()},
				{Temperature: 0.3, TopK: v + 5, TopP: 0.999, U: topU},
				{Temperature: 0.01, U: topU},
				{Temperature: 0.01, TopK: v - 1, U: topU},
				{Temperature: 2, TopP: 0.9999999, U: 0},
			} {
				if p.TopK >= v-1 && v < 3 {
					continue
				}
				cases++
				if got, want := SampleRow(row, p), sampleRowSorted(row, p); got != want {
					t.Fatalf("v=%d trial %d %+v: SampleRow %d, full sort %d", v, trial, p, got, want)
				}
			}
		}
	}
	t.Logf("%d cases agree", cases)
}

func TestSortByLogitIsStableDescending(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for _, n := range []int{0, 1, 10, 63, 64, 1000} {
		row := make([]float32, n)
		ids := make([]int32, n)
		for i := range row {
			row[i] = float32(r.IntN(7) - 3) // many ties, negatives, zeros
			ids[i] = int32(i)
		}
		got := sortByLogit(ids, row)
		for i := 1; i < len(got); i++ {
			a, b := got[i-1], got[i]
			if row[a] < row[b] || (row[a] == row[b] && a > b) {
				t.Fatalf("n=%d: position %d: id %d (%v) before id %d (%v)", n, i, a, row[a], b, row[b])
			}
		}
	}
}

func TestSampleRowsBansAndParallelRows(t *testing.T) {
	v := 50
	logits := make([]float32, 3*v)
	for r := range 3 {
		logits[r*v+7] = 10 // the argmax of every row
	}
	params := []kernels.SampleParams{{}, {Ban: []int32{7}}, {Temperature: 0.01, U: 0.5, Ban: []int32{7, -1, 999}}}
	got := SampleRows(logits, v, params)
	if got[0] != 7 || got[1] == 7 || got[2] == 7 {
		t.Fatalf("bans ignored: %v", got)
	}
}

// BenchmarkSampleRow: one row of GLM-4.5's vocabulary with typical
// sampling settings (logits of spread ~3: every token within 50 nats).
func BenchmarkSampleRow(b *testing.B) {
	r := rand.New(rand.NewPCG(1, 2))
	row := make([]float32, 151552)
	for i := range row {
		row[i] = float32(r.NormFloat64()) * 3
	}
	for _, c := range []struct {
		name string
		f    func([]float32, kernels.SampleParams) int
	}{{"radix", SampleRow}, {"full-sort", sampleRowSorted}} {
		b.Run(c.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				c.f(row, kernels.SampleParams{Temperature: 0.6, TopP: 0.95, U: 0.3})
			}
		})
	}
}
