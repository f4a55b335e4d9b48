package node

import (
	"context"
	"fmt"
	"strings"
	"testing"
)

func members(ids ...string) []MemberInventory {
	var ms []MemberInventory
	for _, id := range ids {
		ms = append(ms, MemberInventory{ID: id, Name: "host-" + id, Addrs: []string{"/ip4/10.0.0.1/tcp/7946/p2p/" + id}})
	}
	return ms
}

func TestEvenSplitPlanner(t *testing.T) {
	tests := []struct {
		name      string
		layers    int
		ids       []string
		wantOrder []string
		wantSpans [][2]int
		wantErr   string
	}{
		{"even", 92, []string{"b", "a", "d", "c"}, []string{"a", "b", "c", "d"}, [][2]int{{0, 23}, {23, 46}, {46, 69}, {69, 92}}, ""},
		{"remainder to first stages", 46, []string{"z", "y", "x"}, []string{"x", "y", "z"}, [][2]int{{0, 16}, {16, 31}, {31, 46}}, ""},
		{"single host", 5, []string{"a"}, []string{"a"}, [][2]int{{0, 5}}, ""},
		{"more hosts than layers", 2, []string{"a", "b", "c"}, nil, nil, "cannot be split"},
		{"no members", 92, nil, nil, nil, "no members"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			model := ModelRef{Ref: "m", ConfigHash: "h"}
			plan, err := EvenSplitPlanner{NumLayers: tc.layers, NumExperts: 160}.Plan(context.Background(), model, members(tc.ids...))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(plan.Stages) != len(tc.wantOrder) {
				t.Fatalf("%d stages, want %d", len(plan.Stages), len(tc.wantOrder))
			}
			for i, st := range plan.Stages {
				if st.HostID != tc.wantOrder[i] || st.Stage != i || st.Layers != tc.wantSpans[i] {
					t.Errorf("stage %d = %s %v, want %s %v", i, st.HostID, st.Layers, tc.wantOrder[i], tc.wantSpans[i])
				}
				if st.ExpertSummary != "all 160 experts" {
					t.Errorf("stage %d experts %q", i, st.ExpertSummary)
				}
			}
			if plan.Model != model {
				t.Errorf("model %+v", plan.Model)
			}
			if err := validatePlan(plan, sorted(tc.ids)); err != nil {
				t.Errorf("validatePlan: %v", err)
			}
		})
	}
}

func TestFillNeighbors(t *testing.T) {
	ms := members("a", "b", "c")
	plan, err := EvenSplitPlanner{NumLayers: 9}.Plan(context.Background(), ModelRef{}, ms)
	if err != nil {
		t.Fatal(err)
	}
	// A planner-provided neighbour is kept.
	plan.Stages[2].Prev = &Neighbor{HostID: "custom"}
	fillNeighbors(plan, ms)
	check := func(got *Neighbor, want string) string {
		switch {
		case got == nil && want == "":
			return ""
		case got == nil || got.HostID != want:
			return fmt.Sprintf("got %+v want %q", got, want)
		}
		return ""
	}
	cases := []struct {
		stage      int
		prev, next string
	}{{0, "", "b"}, {1, "a", "c"}, {2, "custom", ""}}
	for _, c := range cases {
		st := plan.Stages[c.stage]
		if msg := check(st.Prev, c.prev); msg != "" {
			t.Errorf("stage %d prev: %s", c.stage, msg)
		}
		if msg := check(st.Next, c.next); msg != "" {
			t.Errorf("stage %d next: %s", c.stage, msg)
		}
	}
	if len(plan.Stages[0].Next.Addrs) != 1 || plan.Stages[0].Next.Name != "host-b" {
		t.Errorf("neighbour lacks name/addrs: %+v", plan.Stages[0].Next)
	}
}

func TestValidatePlan(t *testing.T) {
	plan := &ClusterPlan{Stages: []StageAssignment{{HostID: "a"}, {HostID: "c"}}}
	tests := []struct {
		members []string
		wantErr string
	}{
		{[]string{"a", "c"}, ""},
		{[]string{"a", "b"}, "not a member"},
		{[]string{"a", "b", "c"}, "2 stages for 3 members"},
	}
	for _, tc := range tests {
		err := validatePlan(plan, tc.members)
		if (err == nil) != (tc.wantErr == "") || (err != nil && !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("members %v: err %v, want %q", tc.members, err, tc.wantErr)
		}
	}
	if err := validatePlan(nil, nil); err == nil {
		t.Error("nil plan accepted")
	}
}

func TestPickCoordinator(t *testing.T) {
	tests := []struct {
		name string
		live []helloMsg
		want string
	}{
		{"lowest id", []helloMsg{{ID: "c"}, {ID: "a"}, {ID: "b"}}, "a"},
		{"head wins", []helloMsg{{ID: "a"}, {ID: "c", Head: true}, {ID: "b"}}, "c"},
		{"lowest of several heads", []helloMsg{{ID: "d", Head: true}, {ID: "a"}, {ID: "c", Head: true}}, "c"},
		{"head listed first", []helloMsg{{ID: "b", Head: true}, {ID: "a"}}, "b"},
		{"empty", nil, ""},
	}
	for _, tc := range tests {
		if got := pickCoordinator(tc.live); got != tc.want {
			t.Errorf("%s: got %q want %q", tc.name, got, tc.want)
		}
	}
}

func TestModelMismatch(t *testing.T) {
	same := []helloMsg{{Name: "a", Model: ModelRef{ConfigHash: "h1"}}, {Name: "b", Model: ModelRef{ConfigHash: "h1"}}}
	if r := modelMismatch(same); r != "" {
		t.Errorf("same model: %q", r)
	}
	diff := append(same, helloMsg{Name: "c", Model: ModelRef{ConfigHash: "h2"}})
	r := modelMismatch(diff)
	if !strings.HasPrefix(r, "model mismatch") || !strings.Contains(r, "a,b has config h1") || !strings.Contains(r, "c has config h2") {
		t.Errorf("mismatch reason %q", r)
	}
}

func TestClusterState(t *testing.T) {
	plan := &ClusterPlan{Epoch: 3, Stages: []StageAssignment{{HostID: "id-a", Name: "a"}, {HostID: "id-b", Name: "b"}}}
	alive := func(id, name string) MemberStatus { return MemberStatus{ID: id, Name: name, Alive: true} }
	dead := MemberStatus{ID: "id-b", Name: "b", Reason: "no heartbeat for 2s"}
	tests := []struct {
		name       string
		plan       *ClusterPlan
		broken     []string
		members    []MemberStatus
		want       string
		wantReason []string
	}{
		{"no plan", nil, nil, []MemberStatus{alive("id-a", "a")}, StateForming, []string{"waiting"}},
		{"all there", plan, nil, []MemberStatus{alive("id-a", "a"), alive("id-b", "b")}, StateActive, nil},
		{"one dead", plan, nil, []MemberStatus{alive("id-a", "a"), dead}, StateDegraded, []string{"host b", "dead: no heartbeat for 2s"}},
		{"newcomer", plan, nil, []MemberStatus{alive("id-a", "a"), alive("id-b", "b"), alive("id-c", "c")}, StateDegraded, []string{"host c", "joined after plan epoch 3"}},
		{"back but plan broken", plan, []string{"host b restarted"}, []MemberStatus{alive("id-a", "a"), alive("id-b", "b")}, StateDegraded, []string{"host b restarted", "waiting"}},
		{"plan host unknown", plan, nil, []MemberStatus{alive("id-a", "a")}, StateDegraded, []string{"host b", "unknown"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, reason := clusterState(tc.plan, tc.broken, tc.members, "waiting for the coordinator's plan")
			if got != tc.want {
				t.Fatalf("state %s (%s), want %s", got, reason, tc.want)
			}
			for _, w := range tc.wantReason {
				if !strings.Contains(reason, w) {
					t.Errorf("reason %q lacks %q", reason, w)
				}
			}
			if tc.want == StateActive && reason != "" {
				t.Errorf("active with reason %q", reason)
			}
		})
	}
}

func TestHashModelRef(t *testing.T) {
	a, err := HashModelRef("glm-4.5-air")
	if err != nil || len(a) != 64 {
		t.Fatalf("%q %v", a, err)
	}
	b, _ := HashModelRef("glm-4.5")
	if a == b {
		t.Error("different refs hash the same")
	}
	if _, err := HashModelRef(""); err == nil {
		t.Error("empty ref accepted")
	}
}
