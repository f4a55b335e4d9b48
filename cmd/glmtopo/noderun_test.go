package main

import (
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
