package node

import (
	"fmt"
	"testing"
)

func TestStageStatuses(t *testing.T) {
	plan := &ClusterPlan{Epoch: 3, Stages: []StageAssignment{
		{HostID: "h0", Name: "a", Stage: 0, Layers: [2]int{0, 2}},
		{HostID: "h1", Name: "b", Stage: 1, Layers: [2]int{2, 5}, ExpertSummary: "all"},
		{HostID: "h2", Name: "c", Stage: 2, Layers: [2]int{5, 8}},
	}}
	members := func(self string, alive2 bool, active1 uint64) []MemberStatus {
		return []MemberStatus{
			{ID: "h0", Alive: true, Self: self == "h0", ActiveEpoch: 3},
			{ID: "h1", Alive: true, Self: self == "h1", ActiveEpoch: active1},
			{ID: "h2", Alive: alive2, Self: self == "h2", ActiveEpoch: 3, Reason: "no heartbeat"},
		}
	}
	report := func(epoch uint64, state string) *StageStates {
		s := &StageStates{}
		s.Set(epoch, state, "")
		return s
	}
	for _, c := range []struct {
		name    string
		members []MemberStatus
		local   *StageStates
		want    string
	}{
		{"head ready: every live stage ready", members("h0", true, 3), report(3, StageReady), "[ready ready ready]"},
		{"head ready, a stage's host dead", members("h0", false, 3), report(3, StageReady), "[ready ready down]"},
		{"head loading", members("h0", true, 2), report(3, StageLoading), "[loading pending active]"},
		{"an older epoch's report is not this plan's", members("h0", true, 3), report(2, StageReady), "[active active active]"},
		{"a stage reports itself", members("h1", true, 3), report(3, StageFailed), "[active failed active]"},
		{"no runtime", members("h2", true, 3), nil, "[active active active]"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := stageStatuses(plan, c.members, c.local)
			var states []string
			for _, s := range got {
				states = append(states, s.State)
			}
			if fmt.Sprint(states) != c.want {
				t.Errorf("states %v, want %s", states, c.want)
			}
		})
	}
	got := stageStatuses(plan, members("h0", true, 3), nil)
	if h := fmt.Sprint(got[0].Holds, got[1].Holds); h != "[embedding layers[0,2) final_norm lm_head mtp] [layers[2,5) experts:all]" {
		t.Errorf("holds %s", h)
	}
	if got[1].Layers != [2]int{2, 5} || got[1].Host != "b" {
		t.Errorf("stage 1: %+v", got[1])
	}
	if stageStatuses(nil, nil, nil) != nil {
		t.Error("stages without a plan")
	}
	var s StageStates
	s.Set(4, StageReady, "")
	s.Set(3, StageFailed, "old")
	if st, _ := s.get(4); st != StageReady {
		t.Errorf("an older epoch's report replaced the newer: %s", st)
	}
}
