package node

import (
	"fmt"
	"sync"
)

// Stage states in Status.Stages.
const (
	StagePending = "pending" // its host has not activated the plan yet
	StageActive  = "active"  // its host activated the plan; this daemon does not know more
	StageLoading = "loading" // loading its weights or connecting its links
	StageReady   = "ready"   // running: for the head, the ring configuration went round every stage
	StageFailed  = "failed"  // its runtime stopped with an error
	StageDown    = "down"    // its host is dead
)

// StageStatus is one stage of the active plan in Status.
type StageStatus struct {
	Stage  int      `json:"stage"`
	Host   string   `json:"host"`
	HostID string   `json:"host_id"`
	Layers [2]int   `json:"layers"`
	Holds  []string `json:"holds"`
	State  string   `json:"state"`
	Reason string   `json:"reason,omitempty"`
}

// StageStates is where this host's runtime reports the state of its stage
// of each plan epoch (Options.Stages); the daemon's status shows it. The
// head's "ready" means every stage answered the ring's configuration.
type StageStates struct {
	mu     sync.Mutex
	epoch  uint64
	state  string
	reason string
}

// Set records the state of this host's stage of plan epoch (an older
// epoch's report is ignored).
func (s *StageStates) Set(epoch uint64, state, reason string) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if epoch < s.epoch {
		return
	}
	s.epoch, s.state, s.reason = epoch, state, reason
}

func (s *StageStates) get(epoch uint64) (string, string) {
	if s == nil {
		return "", ""
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.epoch != epoch {
		return "", ""
	}
	return s.state, s.reason
}

// stageStatuses lists the plan's stages with what this daemon knows of
// each: its own runtime's report, the head's (whose ready covers all),
// else the host's health and activated epoch.
func stageStatuses(plan *ClusterPlan, members []MemberStatus, local *StageStates) []StageStatus {
	if plan == nil {
		return nil
	}
	state, reason := local.get(plan.Epoch)
	byID := map[string]MemberStatus{}
	var self string
	for _, m := range members {
		byID[m.ID] = m
		if m.Self {
			self = m.ID
		}
	}
	headReady := false
	for _, s := range plan.Stages {
		if s.Stage == 0 && s.HostID == self && state == StageReady {
			headReady = true
		}
	}
	out := make([]StageStatus, 0, len(plan.Stages))
	for _, s := range plan.Stages {
		st := StageStatus{Stage: s.Stage, Host: s.Name, HostID: s.HostID, Layers: s.Layers, Holds: stageHolds(s), State: StagePending}
		m, known := byID[s.HostID]
		switch {
		case known && !m.Alive:
			st.State, st.Reason = StageDown, m.Reason
		case s.HostID == self && state != "":
			st.State, st.Reason = state, reason
		case headReady:
			st.State = StageReady
		case known && m.ActiveEpoch == plan.Epoch:
			st.State = StageActive
		}
		out = append(out, st)
	}
	return out
}

// stageHolds names what a stage loads: the head (stage 0) also holds the
// embedding, the final norm, lm_head and the MTP layer.
func stageHolds(s StageAssignment) []string {
	var h []string
	if s.Stage == 0 {
		h = append(h, "embedding")
	}
	h = append(h, fmt.Sprintf("layers[%d,%d)", s.Layers[0], s.Layers[1]))
	if s.ExpertSummary != "" {
		h = append(h, "experts:"+s.ExpertSummary)
	} else if len(s.Experts) > 0 {
		h = append(h, fmt.Sprintf("experts:%d", len(s.Experts)))
	}
	if s.Stage == 0 {
		h = append(h, "final_norm", "lm_head", "mtp")
	}
	return h
}
