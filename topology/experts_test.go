package topology

import (
	"math"
	"strings"
	"testing"
)

func TestEPLB(t *testing.T) {
	cases := []struct {
		name        string
		load        []float64
		gpus, slots int
		replicas    []int
	}{
		{"uniform no spare", []float64{1, 1, 1, 1, 1, 1, 1, 1}, 4, 8, []int{1, 1, 1, 1, 1, 1, 1, 1}},
		{"one hot", []float64{100, 1, 1, 1, 1, 1, 1, 1}, 4, 12, []int{5, 1, 1, 1, 1, 1, 1, 1}},
		{"two hot", []float64{60, 1, 35, 1, 1, 1, 1, 1}, 2, 10, []int{2, 1, 2, 1, 1, 1, 1, 1}},
		{"uneven slots", []float64{1, 2, 3, 4, 5}, 2, 5, []int{1, 1, 1, 1, 1}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pl := eplb(c.load, c.gpus, c.slots)
			for e, r := range c.replicas {
				if pl.replicas[e] != r {
					t.Errorf("expert %d: %d replicas, want %d (all %v)", e, pl.replicas[e], r, pl.replicas)
				}
			}
			count := 0
			for g, experts := range pl.gpus {
				count += len(experts)
				if want := c.slots / c.gpus; len(experts) < want || len(experts) > want+1 {
					t.Errorf("GPU %d holds %d experts, want %d..%d", g, len(experts), want, want+1)
				}
				seen := map[int]bool{}
				for _, e := range experts {
					if seen[e] && pl.replicas[e] <= c.gpus {
						t.Errorf("GPU %d holds expert %d twice", g, e)
					}
					seen[e] = true
				}
			}
			if count != c.slots {
				t.Errorf("%d physical experts, want %d", count, c.slots)
			}
			var sum float64
			for _, s := range pl.share {
				sum += s
			}
			if math.Abs(sum-1) > 1e-9 {
				t.Errorf("shares sum to %g", sum)
			}
		})
	}
	// Balance: with spare slots the busiest GPU's share approaches 1/gpus.
	load := make([]float64, 64)
	for e := range load {
		load[e] = 1
	}
	load[0], load[1] = 40, 20
	before := eplb(load, 4, 64)
	after := eplb(load, 4, 72)
	if maxOf(after.share) >= maxOf(before.share) || maxOf(after.share) > 0.3 {
		t.Errorf("busiest GPU share %.3f without spares, %.3f with 8", maxOf(before.share), maxOf(after.share))
	}
}

func maxOf(xs []float64) float64 {
	m := xs[0]
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}

func TestTouched(t *testing.T) {
	p := []float64{0.5, 0.5, 0.05}
	all := []int{0, 1, 2}
	if got := touched(p, nil, all, 1); math.Abs(got-1.05) > 1e-12 {
		t.Errorf("T=1: %g, want Σp = 1.05", got)
	}
	want := 2*(1-math.Pow(0.5, 4)) + (1 - math.Pow(0.95, 4))
	if got := touched(p, nil, all, 4); math.Abs(got-want) > 1e-12 {
		t.Errorf("T=4: %g, want %g", got, want)
	}
	if got := touched(p, []int{2, 1, 1}, []int{0}, 4); math.Abs(got-(1-math.Pow(0.75, 4))) > 1e-12 {
		t.Errorf("replica share: %g", got)
	}
}

func TestParseExpertLoad(t *testing.T) {
	l, err := ParseExpertLoad([]byte(`{"layers": {"3": [1, 2, 3]}}`))
	if err != nil || len(l.Layers[3]) != 3 {
		t.Fatalf("json: %v %+v", err, l)
	}
	l, err = ParseExpertLoad([]byte("layers:\n  5: [4, 0, 1]\n"))
	if err != nil || l.Layers[5][0] != 4 {
		t.Fatalf("yaml: %v %+v", err, l)
	}
	for doc, want := range map[string]string{
		"":                      "empty",
		"layers: {}\n":          "no layers",
		"layer: {3: [1]}\n":     "want layers",
		"layers: {x: [1]}\n":    "want layers",
		"layers: {3: [a, b]}\n": "want layers",
	} {
		if _, err := ParseExpertLoad([]byte(doc)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseExpertLoad(%q) err = %v, want %q", doc, err, want)
		}
	}
}
