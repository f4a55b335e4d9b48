package parallel

import (
	"cmp"
	"math"
	"slices"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
)

// Verification of drafts under sampling.
//
// The MTP proposer drafts by argmax, as vLLM's does, so the draft
// distribution q of a draft x is one-hot: speculative sampling's rule
// "accept x with probability min(1, p(x)/q(x)), else sample from the
// normalised residual max(0, p − q)" becomes "accept x with probability
// p(x), else sample from p with x left out". Either way every emitted token
// is distributed as the target p, the distribution the plain sampler draws
// from (kernels/cpu.SampleRow: temperature, top-k, top-p, bans), whatever
// the drafts were. Each decision takes the request's next uniform number, so
// a seeded request reproduces its tokens.

// targetDist is p for one row: the tokens SampleRow can pick (in its order,
// logit descending and ties by id, where top-k or top-p cut the list), with
// their unnormalised weights.
type targetDist struct {
	ids   []int32
	w     []float64
	total float64
}

// negligibleNats matches cpu.SampleRow: tokens further below the maximum
// (in units of the temperature) have weights under 2e-22 and add nothing.
const negligibleNats = 50

// newTargetDist processes row like cpu.SampleRow does for p (which must have
// Temperature > 0): bans masked, top-k, then the smallest top-p prefix.
func newTargetDist(row []float32, p kernels.SampleParams) targetDist {
	if len(p.Ban) > 0 { // masked as cpu.SampleRows masks them
		row = slices.Clone(row)
		for _, id := range p.Ban {
			if id >= 0 && int(id) < len(row) {
				row[id] = float32(math.Inf(-1))
			}
		}
	}
	inv := 1 / float64(p.Temperature)
	m := math.Inf(-1)
	for _, x := range row {
		m = max(m, float64(x))
	}
	// Within negligibleNats of the maximum: (x - m)·inv ≥ -negligibleNats.
	floor := float32(m - negligibleNats/inv)
	cand := make([]int32, 0, len(row))
	for i, x := range row {
		if x >= floor && !math.IsInf(float64(x), -1) || len(row) > 1<<18 {
			cand = append(cand, int32(i))
		}
	}
	// Descending by logit, ties by id: the stable order of the ascending ids.
	// Without top-k or top-p nothing is cut, and any order gives the same
	// distribution: the ids stay ascending (a sort of 151,552 ids per row
	// would cost more than the step).
	desc := func(a, b int32) int { return cmp.Compare(row[b], row[a]) }
	switch {
	case p.TopK > 0 && p.TopK <= 64 && p.TopK < len(cand):
		cand = topK(cand, p.TopK, desc)
	case p.TopK > 0 || (p.TopP > 0 && p.TopP < 1):
		cand = cpu.SortByLogit(cand, row) // the sampler's radix sort: same order, ~25× a comparison sort
	}
	n := len(cand)
	if p.TopK > 0 && p.TopK < n {
		n = p.TopK
	}
	d := targetDist{ids: cand[:n], w: make([]float64, n)}
	var sum float64
	for i, id := range d.ids {
		d.w[i] = math.Exp((float64(row[id]) - m) * inv)
		sum += d.w[i]
	}
	keep := n
	if p.TopP > 0 && p.TopP < 1 {
		var acc float64
		for i, w := range d.w {
			acc += w / sum
			if acc >= float64(p.TopP) {
				keep = i + 1
				break
			}
		}
	}
	d.ids, d.w = d.ids[:keep], d.w[:keep]
	for _, w := range d.w {
		d.total += w
	}
	return d
}

// topK is the first k of ids (ascending) in the stable order of less, by
// insertion into a sorted buffer: O(len(ids)·k) instead of a sort.
func topK(ids []int32, k int, less func(a, b int32) int) []int32 {
	buf := make([]int32, 0, k+1)
	for _, id := range ids {
		if len(buf) == k && less(id, buf[k-1]) >= 0 {
			continue // not before the k-th (ties keep the earlier id)
		}
		i := len(buf)
		for i > 0 && less(id, buf[i-1]) < 0 {
			i--
		}
		buf = slices.Insert(buf, i, id)
		if len(buf) > k {
			buf = buf[:k]
		}
	}
	return buf
}

// prob is p(id).
func (d targetDist) prob(id int32) float64 {
	for i, x := range d.ids {
		if x == id {
			return d.w[i] / d.total
		}
	}
	return 0
}

// sample draws by inverse CDF with u, leaving out the token skip (-1: none),
// i.e. from the normalised residual of p against a one-hot draft at skip.
// With skip -1 and top-k or top-p set it picks what cpu.SampleRow picks for
// the same U (without them, the same distribution in another order).
func (d targetDist) sample(u float32, skip int32) int32 {
	total := d.total
	for i, id := range d.ids {
		if id == skip {
			total -= d.w[i]
		}
	}
	target := float64(u) * total
	var acc float64
	last := int32(-1)
	for i, id := range d.ids {
		if id == skip {
			continue
		}
		acc += d.w[i]
		if d.w[i] > 0 {
			last = id
		}
		if target < acc {
			return id
		}
	}
	if last < 0 { // p was one-hot at skip: the draft is always accepted, so this is unreachable
		return skip
	}
	return last // u at the very top (rounding)
}

// acceptRule decides one draft under sampling; tests replace it with broken
// rules to show the statistical test can tell.
type acceptRule func(d targetDist, draft int32, u1, u2 float32) (tok int32, accepted bool)

// exactAccept is speculative sampling with a one-hot draft distribution.
func exactAccept(d targetDist, draft int32, u1, u2 float32) (int32, bool) {
	if float64(u1) < d.prob(draft) {
		return draft, true
	}
	return d.sample(u2, draft), false
}
