package modeltest

import (
	"math"
	"testing"
)

func TestRelErr(t *testing.T) {
	nan := float32(math.NaN())
	for _, c := range []struct {
		got, want []float32
		rel       float64
	}{
		{[]float32{1, 2}, []float32{1, 2}, 0},
		{[]float32{1, 2.5}, []float32{1, -2}, 4.5 / 2},
		{[]float32{0.5, 0}, []float32{0, 0}, 0.5},
		{[]float32{1}, []float32{1, 2}, math.Inf(1)},
		{[]float32{nan, 1}, []float32{1, 1}, math.Inf(1)},
	} {
		if got := RelErr(c.got, c.want); got != c.rel {
			t.Errorf("RelErr(%v, %v) = %v, want %v", c.got, c.want, got, c.rel)
		}
	}
}

func TestArgmaxTopGap(t *testing.T) {
	row := []float32{-3, 4, 1, 4, -8}
	if got := Argmax(row); got != 1 {
		t.Errorf("Argmax = %d, want 1 (first of the ties)", got)
	}
	if got := TopGap(row); got != 0 {
		t.Errorf("TopGap of a tie = %v, want 0", got)
	}
	if got := TopGap([]float32{2, -10, 1}); got != 0.1 {
		t.Errorf("TopGap = %v, want 0.1", got)
	}
}
