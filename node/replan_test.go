package node

import (
	"strings"
	"testing"
	"time"
)

// TestDecide drives the coordinator's policy (replan.go) through its cases
// with explicit times: no sleeps.
func TestDecide(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	abc, ab := []string{"a", "b", "c"}, []string{"a", "b"}
	lostC := []lostHost{{name: "c", at: at(10)}}
	base := func(mod func(v *coordView)) coordView {
		v := coordView{now: at(100), live: ab, active: abc, broken: true, lost: lostC, changed: at(10),
			expect: 3, settle: 2 * time.Second, replan: 30 * time.Second}
		mod(&v)
		v.liveKey = strings.Join(v.live, ",")
		return v
	}
	for _, c := range []struct {
		name   string
		view   coordView
		want   coordAction
		reason string // a substring of the reason; "" asserts an empty one
	}{
		{"steady", base(func(v *coordView) { v.live, v.broken, v.lost = abc, false, nil }), coordSteady, ""},
		{"forming: too few hosts", base(func(v *coordView) { v.active, v.lost, v.broken = nil, nil, false }), coordWait, "waiting for 3 hosts (2 live)"},
		{"forming: start-now plans whoever is live", base(func(v *coordView) { v.active, v.lost, v.broken, v.startNow = nil, nil, false, true }), coordPropose, ""},
		{"forming: unsettled", base(func(v *coordView) { v.active, v.lost, v.live, v.changed = nil, nil, abc, at(99) }), coordWait, "settle"},
		{"lost: within the grace", base(func(v *coordView) { v.now = at(25) }), coordWait, "waiting 15s for c to return before planning over the 2 live hosts"},
		{"lost: grace over, survivors planned despite --expect", base(func(v *coordView) { v.now = at(40) }), coordPropose, ""},
		{"lost: never without it", base(func(v *coordView) { v.replan = -1 }), coordWait, "waiting for c to return (--replan-after 0"},
		{"lost: the planner refused these survivors", base(func(v *coordView) { v.noPlan, v.noWhy = "a,b", "no plan for the 2 live hosts: x" }), coordWait, "no plan for the 2 live hosts"},
		{"lost: a refusal of another live set does not count", base(func(v *coordView) { v.noPlan = "a,b,c" }), coordPropose, ""},
		{"lost: the grace counts from the last loss", base(func(v *coordView) {
			v.live, v.lost, v.now = []string{"a"}, []lostHost{{name: "c", at: at(10)}, {name: "b", at: at(80)}}, at(100)
		}), coordWait, "waiting 10s for b, c to return before planning over the 1 live hosts"},
		{"lost and a newcomer: still waits for the lost host", base(func(v *coordView) { v.live, v.now = []string{"a", "b", "d"}, at(20) }), coordWait, "for c to return"},
		{"returned: replan with it once settled", base(func(v *coordView) { v.live, v.lost, v.changed = abc, nil, at(99.5) }), coordWait, "settle"},
		{"returned and settled", base(func(v *coordView) { v.live, v.lost = abc, nil }), coordPropose, ""},
		{"newcomer: no grace", base(func(v *coordView) { v.live, v.active, v.lost, v.broken = abc, ab, nil, false }), coordPropose, ""},
		{"retry backoff keeps the reason", base(func(v *coordView) { v.retryAt = at(101) }), coordWait, ""},
		{"model mismatch", base(func(v *coordView) { v.mismatch = "model mismatch: c has config x" }), coordWait, "model mismatch"},
	} {
		t.Run(c.name, func(t *testing.T) {
			act, reason := decide(c.view)
			if act != c.want || (c.reason == "" && reason != "") || !strings.Contains(reason, c.reason) {
				t.Errorf("decide = %d %q, want %d with %q", act, reason, c.want, c.reason)
			}
		})
	}
}

// TestDecideTimeline steps one cluster's history through decide, event by
// event: c is lost, the survivors wait out the grace and plan alone, the
// planner's refusal of a smaller set holds, and c's return plans it in.
func TestDecideTimeline(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	v := coordView{live: []string{"a", "b", "c"}, active: []string{"a", "b", "c"}, expect: 3,
		settle: 2 * time.Second, replan: 10 * time.Second, changed: at(0)}
	step := func(now float64, want coordAction, what string) {
		t.Helper()
		v.now, v.liveKey = at(now), strings.Join(v.live, ",")
		if act, reason := decide(v); act != want {
			t.Fatalf("t=%gs (%s): action %d (%q), want %d", now, what, act, reason, want)
		}
	}
	step(1, coordSteady, "the plan holds")
	v.live, v.broken, v.lost, v.changed = []string{"a", "b"}, true, []lostHost{{name: "c", at: at(5)}}, at(5) // c dead
	step(5, coordWait, "c just lost")
	step(14.9, coordWait, "still within the grace")
	step(15, coordPropose, "grace over: the survivors plan")
	v.active, v.broken, v.lost = []string{"a", "b"}, false, nil // their plan is active
	step(16, coordSteady, "the survivors' plan holds")
	v.live, v.changed = []string{"a", "b", "c"}, at(20) // c returns
	step(21, coordWait, "c back, membership settling")
	step(22, coordPropose, "c planned in again")
	v.active = []string{"a", "b", "c"}
	step(23, coordSteady, "three again")
	v.live, v.broken, v.lost, v.changed = []string{"a"}, true, []lostHost{{name: "b", at: at(30)}, {name: "c", at: at(30)}}, at(30)
	step(40, coordPropose, "two lost: a alone is tried")
	v.noPlan, v.noWhy = "a", "no plan for the 1 live hosts: does not fit" // the planner refused
	step(41, coordWait, "refused: no retry while the live set is the same")
	step(500, coordWait, "still refused")
	v.live, v.lost, v.changed = []string{"a", "b"}, []lostHost{{name: "c", at: at(30)}}, at(600) // b back
	step(601, coordWait, "b back: settling")
	step(602, coordPropose, "a and b are tried")
}
