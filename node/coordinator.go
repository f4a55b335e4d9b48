package node

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
)

// liveLocked returns the sorted ids of members that are not dead.
func (d *Daemon) liveLocked() []string {
	var ids []string
	for id, m := range d.members {
		if m.health != HealthDead {
			ids = append(ids, id.String())
		}
	}
	sort.Strings(ids)
	return ids
}

// coordinatorLocked is the deterministic coordinator of the current view:
// the lowest id among live members started with --head, else the lowest id
// among all live members.
func (d *Daemon) coordinatorLocked() string {
	return pickCoordinator(d.liveMembersLocked())
}

func (d *Daemon) liveMembersLocked() []helloMsg {
	var hs []helloMsg
	for _, m := range d.members {
		if m.health != HealthDead {
			hs = append(hs, m.hello)
		}
	}
	return hs
}

func pickCoordinator(live []helloMsg) string {
	best, bestHead := "", false
	for _, h := range live {
		switch {
		case best == "", h.Head && !bestHead, h.Head == bestHead && h.ID < best:
			best, bestHead = h.ID, h.Head
		}
	}
	return best
}

// coordinate runs on every heartbeat tick; only the coordinator acts. It
// plans when decide (replan.go) says so: the live membership differs from
// the active plan's, there are enough hosts or the grace for lost ones is
// over, the membership has been stable for SettleAfter and every host
// serves the same model.
func (d *Daemon) coordinate() {
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.coordinatorLocked() != d.self.ID || d.proposing {
		return
	}
	v := d.coordViewLocked(now)
	act, reason := decide(v)
	switch act {
	case coordSteady:
		d.coordReason = ""
		d.resendCommitsLocked(now)
		return
	case coordWait:
		if reason != "" {
			d.coordReason = reason
		}
		return
	}
	var members []MemberInventory
	for _, id := range v.live {
		m := d.members[mustDecode(id)]
		members = append(members, MemberInventory{ID: id, Name: m.hello.Name, Addrs: m.hello.Addrs, Inventory: m.hello.Inventory,
			DataAddr: m.hello.DataAddr})
	}
	d.proposing = true
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		epoch, err := d.propose(members)
		d.mu.Lock()
		defer d.mu.Unlock()
		d.proposing = false
		var np *noPlanError
		switch {
		case errors.As(err, &np):
			d.noPlan, d.noPlanWhy = v.liveKey, np.Error()
			d.coordReason = d.noPlanWhy
			d.log.Warn("no plan for the live hosts; waiting for the membership to change", "hosts", len(members), "err", np.err)
		case err != nil && epoch == 0:
			d.coordReason = fmt.Sprintf("plan failed: %v", err)
			d.retryAt = time.Now().Add(d.opts.SettleAfter)
			d.log.Warn("plan failed", "err", err)
		case err != nil:
			d.coordReason = fmt.Sprintf("plan epoch %d failed: %v", epoch, err)
			d.retryAt = time.Now().Add(d.opts.SettleAfter)
			d.log.Warn("plan failed", "epoch", epoch, "err", err)
		}
	}()
}

// noPlanError is a planner's refusal of the live members.
type noPlanError struct {
	hosts int
	err   error
}

func (e *noPlanError) Error() string {
	return fmt.Sprintf("no plan for the %d live hosts: %v", e.hosts, e.err)
}

func (e *noPlanError) Unwrap() error { return e.err }

func mustDecode(s string) peer.ID {
	id, _ := peer.Decode(s)
	return id
}

// modelMismatch describes the hosts whose model config hash differs.
func modelMismatch(live []helloMsg) string {
	byHash := map[string][]string{}
	for _, h := range live {
		byHash[h.Model.ConfigHash] = append(byHash[h.Model.ConfigHash], h.Name)
	}
	if len(byHash) <= 1 {
		return ""
	}
	var parts []string
	for hash, names := range byHash {
		sort.Strings(names)
		parts = append(parts, fmt.Sprintf("%s has config %s", strings.Join(names, ","), short(hash)))
	}
	sort.Strings(parts)
	return "model mismatch: " + strings.Join(parts, "; ")
}

// propose plans, sends the assignment to every member and, once every
// member acknowledged it, commits it. It returns the epoch it proposed (0
// when the planner refused: a refusal uses up no epoch).
func (d *Daemon) propose(members []MemberInventory) (uint64, error) {
	ctx, cancel := context.WithTimeout(d.ctx, 30*time.Second)
	defer cancel()
	plan, err := d.opts.Planner.Plan(ctx, d.model, members)
	if err != nil {
		return 0, &noPlanError{hosts: len(members), err: fmt.Errorf("planner: %w", err)}
	}
	ids := make([]string, len(members))
	for i, m := range members {
		ids[i] = m.ID
	}
	if err := validatePlan(plan, ids); err != nil {
		return 0, err
	}
	d.mu.Lock()
	epoch := d.maxEpoch + 1
	d.maxEpoch = epoch
	d.mu.Unlock()
	plan.Epoch, plan.Coordinator, plan.Model = epoch, d.self.ID, d.model
	fillNeighbors(plan, members)
	d.log.Info("proposing plan", "epoch", epoch, "members", len(members), "summary", plan.Summary)

	var mu sync.Mutex
	var failed []string
	var wg sync.WaitGroup
	for _, m := range members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			if m.ID == d.self.ID {
				err = d.acceptAssign(d.self.ID, plan)
			} else {
				err = d.request(mustDecode(m.ID), &planMsg{Version: wireVersion, Kind: planAssign, From: d.self.ID, Plan: *plan})
			}
			if err != nil {
				mu.Lock()
				failed = append(failed, fmt.Sprintf("%s: %v", m.Name, err))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(failed) > 0 {
		sort.Strings(failed)
		return epoch, fmt.Errorf("not acknowledged by %s", strings.Join(failed, "; "))
	}
	d.mu.Lock()
	d.activateLocked(plan)
	d.mu.Unlock()
	for _, m := range members {
		if m.ID != d.self.ID {
			go d.request(mustDecode(m.ID), &planMsg{Version: wireVersion, Kind: planCommit, From: d.self.ID, Plan: *plan})
		}
	}
	return epoch, nil
}

// resendCommitsLocked re-sends the active plan to members that report an
// older active epoch (they missed the commit).
func (d *Daemon) resendCommitsLocked(now time.Time) {
	for id, m := range d.members {
		if id == d.host.ID() || m.health != HealthAlive || m.activeEpoch >= d.active.Epoch ||
			now.Sub(d.commitSentAt[id]) < d.opts.SettleAfter || now.Sub(m.joinedAt) < d.opts.HeartbeatInterval {
			continue
		}
		d.commitSentAt[id] = now
		msg := &planMsg{Version: wireVersion, Kind: planCommit, From: d.self.ID, Plan: *d.active}
		go d.request(id, msg)
	}
}

// request sends a plan message and waits for the reply.
func (d *Daemon) request(id peer.ID, msg *planMsg) error {
	ctx, cancel := context.WithTimeout(network.WithNoDial(d.ctx, "plan"), d.ioTimeout())
	defer cancel()
	s, err := d.host.NewStream(ctx, id, protoPlan)
	if err != nil {
		return err
	}
	defer s.Close()
	if err := writeMsg(s, msg, d.ioTimeout()); err != nil {
		return err
	}
	var rep planReply
	if err := readMsg(s, &rep, d.ioTimeout()); err != nil {
		return err
	}
	if !rep.OK {
		return fmt.Errorf("refused: %s", rep.Error)
	}
	return nil
}

func (d *Daemon) handlePlan(s network.Stream) {
	defer s.Close()
	var msg planMsg
	if err := readMsg(s, &msg, d.ioTimeout()); err != nil {
		s.Reset()
		return
	}
	var err error
	switch {
	case msg.From != s.Conn().RemotePeer().String():
		err = fmt.Errorf("plan from %s relayed by %s", msg.From, s.Conn().RemotePeer())
	case msg.Kind == planAssign:
		err = d.acceptAssign(msg.From, &msg.Plan)
	case msg.Kind == planCommit:
		err = d.acceptCommit(&msg.Plan)
	default:
		err = fmt.Errorf("unknown plan message kind %q", msg.Kind)
	}
	rep := planReply{Version: wireVersion, OK: err == nil}
	if err != nil {
		rep.Error = err.Error()
		d.log.Warn("plan message refused", "kind", msg.Kind, "epoch", msg.Plan.Epoch, "from", msg.From, "err", err)
	}
	writeMsg(s, &rep, d.ioTimeout())
}

// acceptAssign validates a proposal against this host's own view and keeps
// it pending until the commit.
func (d *Daemon) acceptAssign(from string, plan *ClusterPlan) error {
	d.mu.Lock()
	if d.active != nil && plan.Epoch <= d.active.Epoch {
		d.mu.Unlock()
		return fmt.Errorf("stale epoch %d (active %d)", plan.Epoch, d.active.Epoch)
	}
	if coord := d.coordinatorLocked(); coord != from {
		d.mu.Unlock()
		return fmt.Errorf("sender %s is not the coordinator in this host's view (%s)", shortID(from), shortID(coord))
	}
	if plan.Model.ConfigHash != d.model.ConfigHash {
		d.mu.Unlock()
		return fmt.Errorf("plan is for model %s (config %s), this host serves %s (config %s)",
			plan.Model.Ref, short(plan.Model.ConfigHash), d.model.Ref, short(d.model.ConfigHash))
	}
	mine, ok := plan.Assignment(d.self.ID)
	if !ok {
		d.mu.Unlock()
		return fmt.Errorf("plan epoch %d has no stage for this host", plan.Epoch)
	}
	d.mu.Unlock()
	if d.opts.OnAssign != nil {
		if err := d.opts.OnAssign(d.ctx, *plan, mine); err != nil {
			return fmt.Errorf("assignment refused: %w", err)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.pending = plan
	d.maxEpoch = max(d.maxEpoch, plan.Epoch)
	return nil
}

func (d *Daemon) acceptCommit(plan *ClusterPlan) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.active != nil && plan.Epoch <= d.active.Epoch {
		if plan.Epoch == d.active.Epoch {
			return nil // a resend
		}
		return fmt.Errorf("stale epoch %d (active %d)", plan.Epoch, d.active.Epoch)
	}
	if _, ok := plan.Assignment(d.self.ID); !ok {
		return fmt.Errorf("plan epoch %d has no stage for this host", plan.Epoch)
	}
	d.activateLocked(plan)
	return nil
}

func (d *Daemon) activateLocked(plan *ClusterPlan) {
	if d.active != nil && d.active.Epoch >= plan.Epoch {
		return
	}
	d.active, d.activeAt = plan, time.Now()
	d.broken = nil
	d.noPlan, d.noPlanWhy = "", "" // a plan holds again: a later refusal is news
	if d.pending != nil && d.pending.Epoch <= plan.Epoch {
		d.pending = nil
	}
	d.maxEpoch = max(d.maxEpoch, plan.Epoch)
	mine, _ := plan.Assignment(d.self.ID)
	d.log.Info("plan active", "epoch", plan.Epoch, "stage", mine.Stage, "layers", fmt.Sprintf("[%d,%d)", mine.Layers[0], mine.Layers[1]),
		"coordinator", plan.Coordinator)
	d.addEvent("plan", peer.ID(""), "", fmt.Sprintf("epoch %d active (%d stages)", plan.Epoch, len(plan.Stages)))
	if d.opts.OnActive != nil {
		select {
		case d.activeNotify <- struct{}{}:
		default: // a notification is already queued; it will deliver the newest plan
		}
	}
}

// deliverActive calls OnActive, in epoch order and never concurrently,
// outside the daemon's lock. Plans superseded before delivery are skipped:
// only the newest matters to the runtime.
func (d *Daemon) deliverActive() {
	defer d.wg.Done()
	var delivered uint64
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-d.activeNotify:
		}
		d.mu.Lock()
		plan := d.active
		d.mu.Unlock()
		if plan == nil || plan.Epoch <= delivered {
			continue
		}
		delivered = plan.Epoch
		mine, _ := plan.Assignment(d.self.ID)
		d.opts.OnActive(*plan, mine)
	}
}
