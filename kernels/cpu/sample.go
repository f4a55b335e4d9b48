package cpu

import (
	"fmt"
	"math"
	"runtime"
	"sync"

	"github.com/glmtopo/glmtopo/kernels"
)

// Sample picks one token per row: argmax at temperature 0, else softmax(logits/T)
// restricted to the top-k, then to the smallest top-p nucleus, drawn by inverse CDF with U.
func (b *Backend) Sample(logits *kernels.Tensor, params []kernels.SampleParams) ([]int32, error) {
	lg, err := f32(logits, "logits")
	if err != nil {
		return nil, err
	}
	if logits.Rows() != len(params) {
		return nil, fmt.Errorf("cpu: sample: %d rows of logits, %d params", logits.Rows(), len(params))
	}
	return SampleRows(lg, logits.Cols(), params), nil
}

// SampleRows samples row r of logits (rows of v) with params[r], its Ban
// ids masked, rows in parallel: the host half of every backend's Sample.
func SampleRows(logits []float32, v int, params []kernels.SampleParams) []int32 {
	out := make([]int32, len(params))
	workers := min(len(params), runtime.GOMAXPROCS(0))
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var masked []float32
			for r := w; r < len(params); r += workers {
				p := params[r]
				row := logits[r*v : (r+1)*v]
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
		}()
	}
	wg.Wait()
	return out
}

// negligible bounds the scaled logits that take part in sampling: a token
// more than this many nats below the maximum has exp < 2e-22. Every sum
// below starts at the maximum's exp(0) = 1 (and every running share at
// ≥ 1/len(row) ≥ 2^-18 for rows up to 2^18), so adding such a term rounds
// to nothing in float64: leaving them out gives bit-identical results to
// summing over the whole sorted vocabulary.
const negligible = 50

// SampleRow is the reference sampler every backend must agree with: the
// tokens sorted by logit (descending, ties by id), the first TopK kept,
// probabilities exp((x − max)/T) summed in that order, the smallest prefix
// whose share reaches TopP kept, and the token where the running sum passes
// U × the kept sum. It sorts only the tokens within negligible nats of the
// maximum (a radix sort), and gives the same token as sorting them all.
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
	if len(row) == 0 {
		return 0
	}
	inv := 1 / float64(p.Temperature)
	m := float64(row[0])
	for _, x := range row {
		m = max(m, float64(x))
	}
	cand := make([]int32, 0, len(row))
	for i, x := range row {
		if (float64(x)-m)*inv >= -negligible || len(row) > 1<<18 {
			cand = append(cand, int32(i))
		}
	}
	cand = sortByLogit(cand, row)
	k := len(row)
	if p.TopK > 0 && p.TopK < k {
		k = p.TopK
	}
	n := min(k, len(cand))
	probs := make([]float64, n)
	var sum float64
	for i, id := range cand[:n] {
		probs[i] = math.Exp((float64(row[id]) - m) * inv)
		sum += probs[i]
	}
	keep := k // may reach past the candidates: their terms are 0 to float64
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
	for _, pr := range probs[:min(keep, n)] {
		kept += pr
	}
	target := float64(p.U) * kept
	var acc float64
	for i, pr := range probs[:min(keep, n)] {
		acc += pr
		if target < acc {
			return int(cand[i])
		}
	}
	// U at the very top (rounding): the last kept token of the full order.
	if keep <= len(cand) {
		return int(cand[keep-1])
	}
	all := make([]int32, len(row))
	for i := range all {
		all[i] = int32(i)
	}
	return int(sortByLogit(all, row)[keep-1])
}

// SortByLogit is sortByLogit for other hosts of the sampler's order (the
// speculative verifier in parallel): ids (ascending) by row[id] descending,
// ties by id, in place or in a buffer it returns.
func SortByLogit(ids []int32, row []float32) []int32 { return sortByLogit(ids, row) }

// sortByLogit sorts ids (ascending) by row[id] descending, stably (ties keep
// id order, as sort.SliceStable on the ids would), with an LSD radix sort
// on the logits' bits mapped to descending unsigned keys.
func sortByLogit(ids []int32, row []float32) []int32 {
	if len(ids) < 64 {
		// Insertion sort: stable, and cheaper than four radix passes.
		for i := 1; i < len(ids); i++ {
			for j := i; j > 0 && row[ids[j]] > row[ids[j-1]]; j-- {
				ids[j], ids[j-1] = ids[j-1], ids[j]
			}
		}
		return ids
	}
	keys := make([]uint32, len(ids))
	for i, id := range ids {
		keys[i] = descKey(row[id])
	}
	tmpIDs := make([]int32, len(ids))
	tmpKeys := make([]uint32, len(ids))
	for shift := uint(0); shift < 32; shift += 8 {
		var count [257]int
		for _, k := range keys {
			count[(k>>shift)&0xff+1]++
		}
		if count[(keys[0]>>shift)&0xff+1] == len(keys) {
			continue // every key has this digit: the pass would change nothing
		}
		for i := 1; i < 257; i++ {
			count[i] += count[i-1]
		}
		for i, k := range keys {
			d := (k >> shift) & 0xff
			tmpKeys[count[d]], tmpIDs[count[d]] = k, ids[i]
			count[d]++
		}
		keys, tmpKeys = tmpKeys, keys
		ids, tmpIDs = tmpIDs, ids
	}
	return ids
}

// descKey maps x to a key that orders descending as an unsigned integer
// (larger x → smaller key); +0 and -0 share a key, as they compare equal.
func descKey(x float32) uint32 {
	if x == 0 {
		x = 0
	}
	u := math.Float32bits(x)
	if u&0x80000000 != 0 {
		u = ^u
	} else {
		u |= 0x80000000
	}
	return ^u
}
