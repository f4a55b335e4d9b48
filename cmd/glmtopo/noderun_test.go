package main

import (
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/node"
)

// A stage sends to its next neighbour's data address; the last stage to
// the head's, which stage 1 knows as its previous neighbour.
func TestNextDataAddr(t *testing.T) {
	head := &node.Neighbor{Name: "h0", DataAddr: "10.0.0.1:7000"}
	s1 := &node.Neighbor{Name: "h1", DataAddr: "10.0.0.2:7000"}
	s2 := &node.Neighbor{Name: "h2", DataAddr: "10.0.0.3:7000"}
	plan := node.ClusterPlan{Stages: []node.StageAssignment{
		{Stage: 0, Next: s1},
		{Stage: 1, Prev: head, Next: s2},
		{Stage: 2, Prev: s1},
	}}
	for _, tc := range []struct {
		stage int
		want  string
	}{{1, "10.0.0.3:7000"}, {2, "10.0.0.1:7000"}} {
		got, err := nextDataAddr(plan, plan.Stages[tc.stage])
		if err != nil || got != tc.want {
			t.Errorf("stage %d: %q, %v; want %q", tc.stage, got, err, tc.want)
		}
	}
	noAddr := node.ClusterPlan{Stages: []node.StageAssignment{{Stage: 0, Next: &node.Neighbor{Name: "h1"}},
		{Stage: 1, Prev: &node.Neighbor{Name: "h0"}}}}
	if _, err := nextDataAddr(noAddr, noAddr.Stages[1]); err == nil {
		t.Error("a last stage found a head without --data-listen")
	}
	if _, err := nextDataAddr(noAddr, noAddr.Stages[0]); err == nil {
		t.Error("a stage found a next host without --data-listen")
	}
}

// TestPlanLayout: a stage's layout from the plan becomes the daemon's
// ranks: none for CPU plans, the plan's TP and EP over GPUs 0..n-1, and a
// clear error for layouts a daemon cannot drive.
func TestPlanLayout(t *testing.T) {
	for _, c := range []struct {
		name      string
		mine      node.StageAssignment
		n, tp, ep int
		err       string
	}{
		{"cpu plan", node.StageAssignment{Stage: 1}, 0, 0, 0, ""},
		{"one gpu", node.StageAssignment{GPUs: []int{0}, TP: 1, EP: 1}, 1, 1, 1, ""},
		{"tp4", node.StageAssignment{GPUs: []int{0, 1, 2, 3}, TP: 4, EP: 1}, 4, 4, 1, ""},
		{"tp4 ep4", node.StageAssignment{GPUs: []int{0, 1, 2, 3}, TP: 4, EP: 4}, 4, 4, 4, ""},
		{"tp unset", node.StageAssignment{GPUs: []int{0, 1}}, 2, 1, 1, ""},
		{"gpus not from 0", node.StageAssignment{Stage: 2, GPUs: []int{2, 3}, TP: 2}, 0, 0, 0, "GPUs 0..n-1"},
		{"tp not dividing", node.StageAssignment{Stage: 1, GPUs: []int{0, 1, 2}, TP: 2}, 0, 0, 0, "must divide its 3 GPUs"},
	} {
		n, tp, ep, err := planLayout(c.mine)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%s: err %v, want %q", c.name, err, c.err)
			}
			continue
		}
		if err != nil || n != c.n || tp != c.tp || ep != c.ep {
			t.Errorf("%s: %d ranks, TP %d, EP %d, %v; want %d, %d, %d", c.name, n, tp, ep, err, c.n, c.tp, c.ep)
		}
	}
}
