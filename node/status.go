package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
)

// Cluster states.
const (
	StateForming  = "forming"  // no plan has been active yet
	StateActive   = "active"   // the active plan's hosts are exactly the live members
	StateDegraded = "degraded" // a plan was active but membership changed since
)

// Status is what `glmtopo status` shows and what the control socket serves.
type Status struct {
	State           string         `json:"state"`
	Reason          string         `json:"reason,omitempty"`
	ID              string         `json:"id"`
	Name            string         `json:"name"`
	Addrs           []string       `json:"addrs"`
	Model           ModelRef       `json:"model"`
	Coordinator     string         `json:"coordinator"`
	CoordinatorName string         `json:"coordinator_name"`
	PlanEpoch       uint64         `json:"plan_epoch"`
	PendingEpoch    uint64         `json:"pending_epoch,omitempty"`
	Plan            *ClusterPlan   `json:"plan,omitempty"`
	Stages          []StageStatus  `json:"stages,omitempty"`
	Members         []MemberStatus `json:"members"`
	Events          []Event        `json:"events,omitempty"`
	Links           []LinkStatus   `json:"links,omitempty"`
	UptimeSeconds   float64        `json:"uptime_s"`
	Goroutines      int            `json:"goroutines"` // this daemon's, so tests can tell a leak
}

// MemberStatus is one member in this daemon's view.
type MemberStatus struct {
	ID          string        `json:"id"`
	Name        string        `json:"name"`
	Alive       bool          `json:"alive"`
	Health      string        `json:"health"`
	Reason      string        `json:"reason,omitempty"`
	Self        bool          `json:"self,omitempty"`
	Coordinator bool          `json:"coordinator,omitempty"`
	Head        bool          `json:"head,omitempty"`
	LastSeenMS  int64         `json:"last_seen_ms"`
	ActiveEpoch uint64        `json:"active_epoch"`
	Model       ModelRef      `json:"model"`
	Addrs       []string      `json:"addrs,omitempty"`
	Inventory   HostInventory `json:"inventory"`
}

// Status is a snapshot of this daemon's view of the cluster.
func (d *Daemon) Status() Status {
	var links []LinkStatus
	if d.opts.Links != nil {
		links = d.opts.Links() // outside d.mu: it reads the transport's counters
	}
	local := d.opts.Stages.report() // outside d.mu: it reads the runtime's counters
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	st := Status{ID: d.self.ID, Name: d.self.Name, Addrs: d.advertisedAddrs(), Model: d.model,
		Coordinator: d.coordinatorLocked(), UptimeSeconds: now.Sub(d.start).Seconds(),
		Goroutines: runtime.NumGoroutine()}
	for id, m := range d.members {
		ms := MemberStatus{ID: id.String(), Name: m.hello.Name, Alive: m.health != HealthDead, Health: m.health,
			Reason: m.deadReason, Self: id == d.host.ID(), Coordinator: id.String() == st.Coordinator, Head: m.hello.Head,
			LastSeenMS: now.Sub(m.lastSeen).Milliseconds(), ActiveEpoch: m.activeEpoch, Model: m.hello.Model,
			Addrs: m.hello.Addrs, Inventory: m.hello.Inventory}
		if ms.Self {
			ms.LastSeenMS = 0
			if d.active != nil {
				ms.ActiveEpoch = d.active.Epoch
			}
		}
		if ms.Coordinator {
			st.CoordinatorName = m.hello.Name
		}
		st.Members = append(st.Members, ms)
	}
	sort.Slice(st.Members, func(i, j int) bool {
		a, b := st.Members[i], st.Members[j]
		if a.Name != b.Name {
			return a.Name < b.Name
		}
		return a.ID < b.ID
	})
	if d.active != nil {
		st.PlanEpoch, st.Plan = d.active.Epoch, d.active
	}
	if d.pending != nil {
		st.PendingEpoch = d.pending.Epoch
	}
	st.State, st.Reason = clusterState(d.active, d.broken, st.Members, d.coordReasonForStatusLocked())
	remote := map[string]memberStage{}
	for id, m := range d.members {
		remote[id.String()] = m.stage
	}
	st.Stages = stageStatuses(d.active, st.Members, local, remote, now)
	st.Events = append([]Event(nil), d.events...)
	st.Links = links
	return st
}

func (d *Daemon) coordReasonForStatusLocked() string {
	if d.coordinatorLocked() == d.self.ID {
		return d.coordReason
	}
	// The coordinator's policy on this daemon's view (it does not know
	// the coordinator's planner refusals or retries).
	if _, r := decide(d.coordViewLocked(time.Now())); r != "" {
		return r
	}
	return "waiting for the coordinator's plan"
}

// clusterState derives the cluster state from the active plan and the
// members: any plan host not alive, or live host not in the plan, degrades.
func clusterState(active *ClusterPlan, broken []string, members []MemberStatus, coordReason string) (string, string) {
	if active == nil {
		return StateForming, coordReason
	}
	inPlan := map[string]bool{}
	for _, id := range active.MemberIDs() {
		inPlan[id] = true
	}
	reasons := append([]string(nil), broken...)
	seen := map[string]bool{}
	for _, m := range members {
		seen[m.ID] = true
		switch {
		case inPlan[m.ID] && !m.Alive && !slices.ContainsFunc(broken, func(r string) bool { return strings.Contains(r, shortID(m.ID)) }):
			reasons = append(reasons, fmt.Sprintf("host %s (%s) is dead: %s", m.Name, shortID(m.ID), m.Reason))
		case !inPlan[m.ID] && m.Alive:
			reasons = append(reasons, fmt.Sprintf("host %s (%s) joined after plan epoch %d", m.Name, shortID(m.ID), active.Epoch))
		}
	}
	for _, s := range active.Stages {
		if !seen[s.HostID] {
			reasons = append(reasons, fmt.Sprintf("host %s (%s) of plan epoch %d is unknown", s.Name, shortID(s.HostID), active.Epoch))
		}
	}
	if len(reasons) == 0 {
		return StateActive, ""
	}
	if coordReason != "" {
		reasons = append(reasons, coordReason)
	}
	return StateDegraded, strings.Join(reasons, "; ")
}

// QueryStatus asks the daemon that owns stateDir for its status.
func QueryStatus(ctx context.Context, stateDir string) (Status, error) {
	sock := filepath.Join(stateDir, controlSockName)
	if _, err := os.Stat(sock); err != nil {
		return Status{}, fmt.Errorf("no daemon for state dir %s (no %s): start one with `glmtopo node --state-dir %s`", stateDir, controlSockName, stateDir)
	}
	client := &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true, // a one-shot client: an idle connection would hold a daemon goroutine
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://glmtopo/status", nil)
	if err != nil {
		return Status{}, err
	}
	resp, err := client.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return Status{}, fmt.Errorf("daemon for state dir %s is not running (stale control socket)", stateDir)
		}
		return Status{}, fmt.Errorf("status from %s: %w", sock, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return Status{}, fmt.Errorf("status from %s: %s: %s", sock, resp.Status, strings.TrimSpace(string(b)))
	}
	var st Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return Status{}, fmt.Errorf("status from %s: %w", sock, err)
	}
	return st, nil
}

// WriteStatusText prints a status for people.
func WriteStatusText(w io.Writer, st Status) error {
	fmt.Fprintf(w, "cluster: %s", st.State)
	if st.Reason != "" {
		fmt.Fprintf(w, " (%s)", st.Reason)
	}
	fmt.Fprintf(w, "\nthis host: %s %s\nmodel: %s (config %s)\ncoordinator: %s %s\nplan epoch: %d",
		st.Name, st.ID, st.Model.Ref, short(st.Model.ConfigHash), st.CoordinatorName, st.Coordinator, st.PlanEpoch)
	if st.PendingEpoch > st.PlanEpoch {
		fmt.Fprintf(w, " (epoch %d proposed)", st.PendingEpoch)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tID\tHEALTH\tLAST SEEN\tGPUS\tMEMORY\tSTAGE\tLAYERS\tNOTE")
	for _, m := range st.Members {
		stage, layers := "-", "-"
		if st.Plan != nil {
			if a, ok := st.Plan.Assignment(m.ID); ok {
				stage, layers = fmt.Sprint(a.Stage), fmt.Sprintf("[%d,%d)", a.Layers[0], a.Layers[1])
			}
		}
		var note []string
		if m.Self {
			note = append(note, "self")
		}
		if m.Coordinator {
			note = append(note, "coordinator")
		}
		if m.Reason != "" {
			note = append(note, m.Reason)
		}
		gpus := "cpu-only"
		if n := len(m.Inventory.GPUs); n > 0 {
			gpus = fmt.Sprintf("%dx %s", n, m.Inventory.GPUs[0].Name)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.Name, shortID(m.ID), m.Health,
			(time.Duration(m.LastSeenMS) * time.Millisecond).String(), gpus, humanBytes(m.Inventory.MemoryBytes),
			stage, layers, strings.Join(note, ", "))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if st.Plan != nil && st.Plan.Summary != "" {
		fmt.Fprintf(w, "\nplan: %s\n", st.Plan.Summary)
	}
	if err := writeStages(w, st.Stages); err != nil {
		return err
	}
	return writeLinks(w, st.Links)
}
