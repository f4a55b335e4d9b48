package node

import (
	"fmt"
	"testing"
	"time"
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
			got := stageStatuses(plan, c.members, c.local.report(), nil, time.Now())
			var states []string
			for _, s := range got {
				states = append(states, s.State)
			}
			if fmt.Sprint(states) != c.want {
				t.Errorf("states %v, want %s", states, c.want)
			}
		})
	}
	// A daemon other than the head's learns every stage's state and counters
	// from the heartbeats' reports of this epoch (an older one is ignored).
	now := time.Now()
	remote := map[string]memberStage{
		"h0": {rep: &stageReport{Epoch: 3, State: StageReady, Metrics: &StageMetrics{Steps: 7}}, at: now.Add(-time.Second)},
		"h2": {rep: &stageReport{Epoch: 2, State: StageFailed, Reason: "old"}, at: now},
	}
	got := stageStatuses(plan, members("h1", true, 3), report(3, StageLoading).report(), remote, now)
	if s := fmt.Sprint(got[0].State, got[1].State, got[2].State); s != "readyloadingready" {
		t.Errorf("states from reports: %s", s)
	}
	if got[0].StageMetrics == nil || got[0].Steps != 7 || got[0].MetricsAgeMS < 1000 || got[2].StageMetrics != nil {
		t.Errorf("counters from reports: %+v, %+v", got[0], got[2])
	}
	remote["h2"] = memberStage{rep: &stageReport{Epoch: 3, State: StageFailed, Reason: "load: out of memory"}, at: now}
	if got := stageStatuses(plan, members("h1", true, 3), nil, remote, now); got[2].State != StageFailed || got[2].Reason != "load: out of memory" {
		t.Errorf("a stage's failure under a ready head: %+v", got[2])
	}

	got = stageStatuses(plan, members("h0", true, 3), nil, nil, time.Now())
	if h := fmt.Sprint(got[0].Holds, got[1].Holds); h != "[embedding layers[0,2) final_norm lm_head mtp] [layers[2,5) experts:all]" {
		t.Errorf("holds %s", h)
	}
	if got[1].Layers != [2]int{2, 5} || got[1].Host != "b" {
		t.Errorf("stage 1: %+v", got[1])
	}
	if stageStatuses(nil, nil, nil, nil, time.Now()) != nil {
		t.Error("stages without a plan")
	}
	var s StageStates
	s.Set(4, StageReady, "")
	s.Set(3, StageFailed, "old")
	if st, _ := s.get(4); st != StageReady {
		t.Errorf("an older epoch's report replaced the newer: %s", st)
	}
}
