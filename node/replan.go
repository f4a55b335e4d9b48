package node

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"
)

// When a host of the active plan is lost (dead or left) the coordinator
// waits Options.ReplanAfter for it before planning over the survivors
// alone: a daemon restart or a network blip then rejoins the plan it had,
// and the cluster reloads once, not twice (every new epoch reloads every
// stage). After the grace it plans over the live hosts whatever --expect
// says; if the planner finds no plan for them (its memory check: the
// survivors cannot hold the model) the cluster stays degraded, and the
// coordinator asks again only when the live set changes. A lost host that
// returns, before or after the survivors' plan, is planned in again once
// the membership has settled: --expect says how many hosts the cluster is
// meant to have, and the survivors' plan is a stopgap.
//
// decide is that policy as a function of the coordinator's view and the
// time, so that it is tested with events instead of sleeps.

// coordView is what the coordinator decides from.
type coordView struct {
	now      time.Time
	live     []string // sorted ids of the live members
	active   []string // sorted ids of the active plan's hosts; nil: no plan yet
	broken   bool     // a host of the active plan failed (even if back)
	lost     []lostHost
	changed  time.Time // last change of the live set
	retryAt  time.Time // after a proposal failed
	expect   int
	startNow bool
	settle   time.Duration
	replan   time.Duration // grace for lost hosts; negative: never plan without them
	mismatch string        // the live hosts serve different models
	liveKey  string        // the live members' ids and process instances
	noPlan   string        // the liveKey the planner last refused
	noWhy    string
}

// lostHost is a host of the active plan that is not live.
type lostHost struct {
	name string
	at   time.Time // when it was lost
}

type coordAction int

const (
	coordWait    coordAction = iota // nothing to do yet; reason says why
	coordSteady                     // the active plan holds
	coordPropose                    // plan over the live members
)

// decide is the coordinator's next action and, while waiting, why. An
// empty reason while waiting keeps the previous one (a retry backoff).
func decide(v coordView) (coordAction, string) {
	if v.active != nil && !v.broken && slices.Equal(v.active, v.live) {
		return coordSteady, ""
	}
	if v.active == nil && !v.startNow && len(v.live) < v.expect {
		return coordWait, fmt.Sprintf("waiting for %d hosts (%d live)", v.expect, len(v.live))
	}
	if len(v.lost) > 0 {
		names, last := lostNames(v.lost)
		switch {
		case v.replan < 0:
			return coordWait, fmt.Sprintf("waiting for %s to return (--replan-after 0: no plan without %s)", names, pronoun(len(v.lost)))
		case v.now.Sub(last) < v.replan:
			return coordWait, fmt.Sprintf("waiting %s for %s to return before planning over the %d live hosts (--replan-after %s)",
				(v.replan - v.now.Sub(last)).Round(100*time.Millisecond), names, len(v.live), v.replan)
		}
	}
	switch {
	case v.now.Sub(v.changed) < v.settle:
		return coordWait, "membership changed; waiting for it to settle"
	case v.now.Before(v.retryAt):
		return coordWait, ""
	case v.mismatch != "":
		return coordWait, v.mismatch
	case v.noPlan != "" && v.noPlan == v.liveKey:
		return coordWait, v.noWhy
	}
	return coordPropose, ""
}

// lostNames lists the lost hosts' names and the latest loss.
func lostNames(lost []lostHost) (string, time.Time) {
	var names []string
	var last time.Time
	for _, l := range lost {
		names = append(names, l.name)
		if l.at.After(last) {
			last = l.at
		}
	}
	sort.Strings(names)
	return strings.Join(names, ", "), last
}

func pronoun(n int) string {
	if n == 1 {
		return "it"
	}
	return "them"
}

// coordViewLocked gathers the coordinator's view.
func (d *Daemon) coordViewLocked(now time.Time) coordView {
	v := coordView{now: now, live: d.liveLocked(), broken: len(d.broken) > 0, changed: d.changedAt, retryAt: d.retryAt,
		expect: d.opts.Expect, startNow: d.opts.StartNow, settle: d.opts.SettleAfter, replan: d.opts.ReplanAfter,
		mismatch: modelMismatch(d.liveMembersLocked()), noPlan: d.noPlan, noWhy: d.noPlanWhy}
	var key []string
	for _, h := range d.liveMembersLocked() {
		key = append(key, h.ID+"/"+h.Instance) // a restarted member may bring more memory
	}
	sort.Strings(key)
	v.liveKey = strings.Join(key, ",")
	if d.active == nil {
		return v
	}
	v.active = d.active.MemberIDs()
	for _, s := range d.active.Stages {
		m := d.members[mustDecode(s.HostID)]
		switch {
		case m == nil: // planned before this daemon knew it: lost since the plan is
			v.lost = append(v.lost, lostHost{name: s.Name, at: d.activeAt})
		case m.health == HealthDead:
			v.lost = append(v.lost, lostHost{name: s.Name, at: m.lostAt})
		}
	}
	return v
}
