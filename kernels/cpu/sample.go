package cpu

import (
	"fmt"
	"math"
	"sort"

	"github.com/glmtopo/glmtopo/kernels"
)

// Sample picks one token per row: argmax at temperature 0, else softmax(logits/T)
// restricted to the top-k, then to the smallest top-p nucleus, drawn by inverse CDF with U.
func (b *Backend) Sample(logits *kernels.Tensor, params []kernels.SampleParams) ([]int32, error) {
	lg, err := f32(logits, "logits")
	if err != nil {
		return nil, err
	}
	v := logits.Cols()
	if logits.Rows() != len(params) {
		return nil, fmt.Errorf("cpu: sample: %d rows of logits, %d params", logits.Rows(), len(params))
	}
	out := make([]int32, len(params))
	var masked []float32
	for r, p := range params {
		row := lg[r*v : (r+1)*v]
		if len(p.Ban) > 0 {
			masked = append(masked[:0], row...)
			for _, id := range p.Ban {
				if id >= 0 && int(id) < v {
					masked[id] = float32(math.Inf(-1))
				}
			}
			row = masked
		}
		out[r] = int32(SampleRow(row, p))
	}
	return out, nil
}

// SampleRow is the reference sampler every backend must agree with.
func SampleRow(row []float32, p kernels.SampleParams) int {
	if p.Temperature <= 0 {
		best := 0
		for i, x := range row {
			if x > row[best] {
				best = i
			}
		}
		return best
	}
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
