package tp

import (
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/topology"
)

func sh(tp, tpRank, etp, etpRank int) model.Shard {
	return model.Shard{TP: tp, TPRank: tpRank, ExpertTP: etp, ExpertTPRank: etpRank}
}

func tinyConfig(t *testing.T) *model.Config {
	t.Helper()
	c, err := model.Resolve("tiny") // 4 heads, 2 KV heads, 16 experts, 4 layers (1 dense)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestGridLayout: each rank's attention slice, replica, EP group and
// expert slice, and the shards' heads (KV heads replicated past TP 2).
func TestGridLayout(t *testing.T) {
	c := tinyConfig(t)
	for _, tc := range []struct {
		ranks, tp, ep int
		want          []model.Shard // per rank
		groups        []int
		heads         [][4]int // q0, q1, kv0, kv1
	}{
		{2, 2, 1, []model.Shard{sh(2, 0, 2, 0), sh(2, 1, 2, 1)}, []int{0, 0}, [][4]int{{0, 2, 0, 1}, {2, 4, 1, 2}}},
		{4, 4, 1, []model.Shard{sh(4, 0, 4, 0), sh(4, 1, 4, 1), sh(4, 2, 4, 2), sh(4, 3, 4, 3)}, []int{0, 0, 0, 0},
			[][4]int{{0, 1, 0, 1}, {1, 2, 0, 1}, {2, 3, 1, 2}, {3, 4, 1, 2}}},
		{4, 4, 4, []model.Shard{sh(4, 0, 1, 0), sh(4, 1, 1, 0), sh(4, 2, 1, 0), sh(4, 3, 1, 0)}, []int{0, 1, 2, 3},
			[][4]int{{0, 1, 0, 1}, {1, 2, 0, 1}, {2, 3, 1, 2}, {3, 4, 1, 2}}},
		{4, 2, 2, []model.Shard{sh(2, 0, 2, 0), sh(2, 1, 2, 1), sh(2, 0, 2, 0), sh(2, 1, 2, 1)}, []int{0, 0, 1, 1},
			[][4]int{{0, 2, 0, 1}, {2, 4, 1, 2}, {0, 2, 0, 1}, {2, 4, 1, 2}}},
		{2, 1, 2, []model.Shard{sh(1, 0, 1, 0), sh(1, 0, 1, 0)}, []int{0, 1}, [][4]int{{0, 4, 0, 2}, {0, 4, 0, 2}}},
	} {
		g, err := NewGrid(c, 0, c.NumHiddenLayers, tc.ranks, tc.tp, tc.ep, nil)
		if err != nil {
			t.Fatal(err)
		}
		for r := 0; r < tc.ranks; r++ {
			sh := g.Shard(r)
			q0, q1, kv0, kv1 := sh.Heads(c)
			if sh != tc.want[r] || g.Group(r) != tc.groups[r] || [4]int{q0, q1, kv0, kv1} != tc.heads[r] {
				t.Errorf("%s rank %d: shard %+v group %d heads %v; want %+v %d %v", g, r, sh, g.Group(r),
					[4]int{q0, q1, kv0, kv1}, tc.want[r], tc.groups[r], tc.heads[r])
			}
		}
		// Contiguous placement: each expert on exactly one EP group.
		for e := 0; e < c.NRoutedExperts; e++ {
			n := 0
			for r := 0; r < tc.ranks; r += g.ExpertTP() {
				if g.Holds(r, 1, e) {
					n++
				}
			}
			if n != 1 || !g.Holds(g.ExpertTP()*(e*tc.ep/c.NRoutedExperts), 1, e) {
				t.Errorf("%s: expert %d on %d groups, not its block's", g, e, n)
			}
		}
	}
}

func TestGridRefusesBadLayouts(t *testing.T) {
	c := tinyConfig(t)
	layer := func(gpus [][]int, replicas []int) []topology.LayerExperts {
		return []topology.LayerExperts{{Layer: 1, GPUs: gpus, Replicas: replicas}}
	}
	half := [][]int{{0, 1, 2, 3, 4, 5, 6, 7}, {8, 9, 10, 11, 12, 13, 14, 15}}
	for _, tc := range []struct {
		name                 string
		first, end, r, tp, e int
		place                []topology.LayerExperts
		want                 string
	}{
		{"tp not dividing ranks", 0, 4, 4, 3, 1, nil, "must divide"},
		{"ep not dividing ranks", 0, 4, 4, 4, 3, nil, "must divide"},
		{"tp past the heads", 0, 4, 8, 8, 1, nil, "does not divide the 4 attention heads"},
		{"zero ranks", 0, 4, 0, 1, 1, nil, "at least 1"},
		{"empty range", 2, 2, 2, 2, 1, nil, "layers [2,2)"},
		{"ep past the experts", 0, 4, 32, 1, 32, nil, "exceeds the 16 routed experts"},
		{"placement for 3 groups", 0, 4, 2, 2, 2, layer([][]int{{0}, {1}, {2}}, nil), "3 GPUs"},
		{"expert on no group", 0, 4, 2, 2, 2, layer([][]int{{0, 1, 2, 3, 4, 5, 6, 7}, {8, 9, 10, 11, 12, 13, 14}}, nil), "expert 15 is on no GPU"},
		{"expert out of range", 0, 4, 2, 2, 2, layer([][]int{{0, 16}, {1}}, nil), "expert 16"},
		{"replicas disagree", 0, 4, 2, 2, 2, layer(half, make([]int, 16)), "replicas"},
		{"dense layer placement", 0, 4, 2, 2, 2, []topology.LayerExperts{{Layer: 0, GPUs: half}}, "dense layer 0"},
	} {
		_, err := NewGrid(c, tc.first, tc.end, tc.r, tc.tp, tc.e, tc.place)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want it to say %q", tc.name, err, tc.want)
		}
	}
}

// TestReplicaMaskServesEachRouteOnce: with EPLB replicas, every (token,
// expert) route is served by exactly one EP group among its holders, and
// a hot expert's tokens spread over all its replicas.
func TestReplicaMaskServesEachRouteOnce(t *testing.T) {
	c := tinyConfig(t)
	lists := [][]int{{0, 1, 2, 3, 4, 5}, {0, 6, 7, 8, 9, 10}, {0, 11, 12, 13, 1}, {14, 15, 1, 2}}
	var place []topology.LayerExperts
	for l := 1; l < c.NumHiddenLayers; l++ {
		place = append(place, topology.LayerExperts{Layer: l, GPUs: lists, Replicas: nil})
	}
	g, err := NewGrid(c, 0, c.NumHiddenLayers, 4, 4, 4, place)
	if err != nil {
		t.Fatal(err)
	}
	masks := make([]replicaMask, 4)
	for r := range masks {
		masks[r] = replicaMask{g, g.Group(r)}
	}
	if masks[3].Replicated(0) || !masks[0].Replicated(1) {
		t.Errorf("replicated: dense layer %v, layer 1 rank 0 %v", masks[3].Replicated(0), masks[0].Replicated(1))
	}
	served := map[int]int{} // expert 0's tokens per group
	for tok := 0; tok < 60; tok++ {
		for e := 0; e < c.NRoutedExperts; e++ {
			n := 0
			for r, m := range masks {
				if g.Holds(r, 1, e) && m.Serves(1, tok, e) {
					n++
					if e == 0 {
						served[r]++
					}
				}
			}
			if n != 1 {
				t.Fatalf("token %d expert %d served by %d ranks", tok, e, n)
			}
		}
	}
	if served[0] != 20 || served[1] != 20 || served[2] != 20 {
		t.Errorf("expert 0's 60 tokens over its 3 replicas: %v, want 20 each", served)
	}
}
