package node

import (
	"fmt"
	"sync"
	"time"
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

// StageStatus is one stage of the active plan in Status. The embedded
// metrics (absent until its runtime reports them) are the stage's own for
// this daemon's stage and, for the others, the latest their daemons sent
// with a heartbeat (MetricsAgeMS old).
type StageStatus struct {
	Stage  int      `json:"stage"`
	Host   string   `json:"host"`
	HostID string   `json:"host_id"`
	Layers [2]int   `json:"layers"`
	Holds  []string `json:"holds"`
	State  string   `json:"state"`
	Reason string   `json:"reason,omitempty"`
	*StageMetrics
	MetricsAgeMS int64 `json:"metrics_age_ms,omitempty"`
}

// StageStates is where this host's runtime reports the state of its stage
// of each plan epoch (Options.Stages), and how to read its counters; the
// daemon's status shows them and its heartbeats carry them to the other
// members, so that every daemon's status covers every stage. The head's
// "ready" means every stage answered the ring's configuration.
type StageStates struct {
	mu      sync.Mutex
	epoch   uint64
	state   string
	reason  string
	metrics func() StageMetrics  // this epoch's stage's counters; nil until set
	view    func() []StageStatus // the daemon's stages (Cluster)
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
	if epoch > s.epoch {
		s.metrics = nil // the previous epoch's stage is gone
	}
	s.epoch, s.state, s.reason = epoch, state, reason
}

// SetMetrics gives the reader of this host's stage's counters for plan
// epoch; status and heartbeats call it, from any goroutine, until a newer
// epoch is set.
func (s *StageStates) SetMetrics(epoch uint64, read func() StageMetrics) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if epoch < s.epoch {
		return
	}
	if epoch > s.epoch {
		s.epoch, s.state, s.reason = epoch, "", ""
	}
	s.metrics = read
}

// Cluster is the daemon's view of the active plan's stages (Status.Stages),
// for a runtime that exports them (/metrics); nil before the daemon starts.
func (s *StageStates) Cluster() []StageStatus {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	view := s.view
	s.mu.Unlock()
	if view == nil {
		return nil
	}
	return view()
}

func (s *StageStates) setView(view func() []StageStatus) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.view = view
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

// report is this host's stage as its heartbeats carry it: the state and
// the counters read now (outside the daemon's lock: the reader takes the
// runtime's). Nil before the runtime reported anything.
func (s *StageStates) report() *stageReport {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	rep := &stageReport{Epoch: s.epoch, State: s.state, Reason: s.reason}
	read := s.metrics
	s.mu.Unlock()
	if rep.Epoch == 0 {
		return nil
	}
	if read != nil {
		m := read()
		m.normalize()
		rep.Metrics = &m
	}
	return rep
}

// memberStage is the last stage report a member's heartbeat carried.
type memberStage struct {
	rep *stageReport
	at  time.Time
}

// stageStatuses lists the plan's stages with what this daemon knows of
// each: its own runtime's report, the others' heartbeat reports, the
// head's (whose ready covers all), else the host's health and activated
// epoch.
func stageStatuses(plan *ClusterPlan, members []MemberStatus, local *stageReport, remote map[string]memberStage, now time.Time) []StageStatus {
	if plan == nil {
		return nil
	}
	byID := map[string]MemberStatus{}
	reports := map[string]memberStage{}
	for _, m := range members {
		byID[m.ID] = m
		if r, ok := remote[m.ID]; ok && r.rep != nil && r.rep.Epoch == plan.Epoch {
			reports[m.ID] = r
		}
		if m.Self && local != nil && local.Epoch == plan.Epoch {
			reports[m.ID] = memberStage{rep: local, at: now}
		}
	}
	headReady := false
	for _, s := range plan.Stages {
		if r, ok := reports[s.HostID]; ok && s.Stage == 0 && r.rep.State == StageReady {
			headReady = true
		}
	}
	out := make([]StageStatus, 0, len(plan.Stages))
	for _, s := range plan.Stages {
		st := StageStatus{Stage: s.Stage, Host: s.Name, HostID: s.HostID, Layers: s.Layers, Holds: stageHolds(s), State: StagePending}
		m, known := byID[s.HostID]
		r, reported := reports[s.HostID]
		switch {
		case known && !m.Alive:
			st.State, st.Reason = StageDown, m.Reason
		case reported && (m.Self || r.rep.State == StageFailed) && r.rep.State != "":
			st.State, st.Reason = r.rep.State, r.rep.Reason
		case headReady:
			st.State = StageReady
		case reported && r.rep.State != "":
			st.State, st.Reason = r.rep.State, r.rep.Reason
		case known && m.ActiveEpoch == plan.Epoch:
			st.State = StageActive
		}
		if reported && r.rep.Metrics != nil {
			mm := *r.rep.Metrics
			st.StageMetrics = &mm
			if !m.Self {
				st.MetricsAgeMS = max(1, now.Sub(r.at).Milliseconds())
			}
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
