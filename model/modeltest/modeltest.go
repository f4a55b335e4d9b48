// Package modeltest holds the measures tests use to compare a model's
// outputs with goldens or with another backend: the relative error of the
// acceptance criteria (max|Δ| / max|ref|), the greedy token, and the top-2
// logit gap below which a flipped choice is rounding, not a bug.
package modeltest

import "math"

// RelErr is max|got−want| / max|want|: +Inf when the lengths differ or any
// difference is NaN, max|got−want| when want is all zeros.
func RelErr(got, want []float32) float64 {
	if len(got) != len(want) {
		return math.Inf(1)
	}
	var md, mr float64
	for i := range want {
		d := math.Abs(float64(got[i]) - float64(want[i]))
		if math.IsNaN(d) {
			return math.Inf(1)
		}
		md = math.Max(md, d)
		mr = math.Max(mr, math.Abs(float64(want[i])))
	}
	if mr == 0 {
		return md
	}
	return md / mr
}

// Argmax is the index of the largest value, the first on ties (as the
// samplers choose greedily); NaNs are never chosen unless at index 0.
func Argmax(row []float32) int32 {
	best := 0
	for i, v := range row {
		if v > row[best] {
			best = i
		}
	}
	return int32(best)
}

// TopGap is the gap between the two largest values relative to the largest
// magnitude in row.
func TopGap(row []float32) float64 {
	t1, t2 := math.Inf(-1), math.Inf(-1)
	var mx float64
	for _, v := range row {
		x := float64(v)
		mx = math.Max(mx, math.Abs(x))
		if x > t1 {
			t1, t2 = x, t1
		} else if x > t2 {
			t2 = x
		}
	}
	return (t1 - t2) / mx
}
