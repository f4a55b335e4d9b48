package node

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// startInProcess runs n daemons in this process, each with its own state
// dir, all listing the first as static peer.
func startInProcess(t *testing.T, n int, tweak func(i int, o *Options)) []*Daemon {
	t.Helper()
	dir := t.TempDir()
	key, err := LoadClusterKey(writeClusterKey(t, dir, "k"))
	if err != nil {
		t.Fatal(err)
	}
	ports := freePorts(t, n)
	var ds []*Daemon
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("h%d", i)
		inv := HostInventory{Hostname: name, Source: "test"}
		o := Options{
			StateDir: filepath.Join(dir, name), Name: name, PSK: key, Model: "same",
			Listen:            []string{fmt.Sprintf("127.0.0.1:%d", ports[i])},
			Peers:             []string{fmt.Sprintf("127.0.0.1:%d", ports[0])},
			Expect:            n,
			Inventory:         &inv,
			HeartbeatInterval: 100 * time.Millisecond, SuspectAfter: 400 * time.Millisecond,
			DeadAfter: 5 * time.Second, SettleAfter: 300 * time.Millisecond,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		}
		if tweak != nil {
			tweak(i, &o)
		}
		d, err := Start(context.Background(), o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		ds = append(ds, d)
	}
	return ds
}

func waitStatus(t *testing.T, ds []*Daemon, what string, cond func(i int, st Status) string) {
	t.Helper()
	eventually(t, 10*time.Second, what, func() string {
		for i, d := range ds {
			if why := cond(i, d.Status()); why != "" {
				return fmt.Sprintf("h%d: %s", i, why)
			}
		}
		return ""
	})
}

func TestModelMismatchBlocksPlan(t *testing.T) {
	t.Parallel()
	ds := startInProcess(t, 3, func(i int, o *Options) {
		if i == 2 {
			o.Model = "other"
		}
	})
	waitStatus(t, ds, "all see the mismatch", func(_ int, st Status) string {
		if len(st.Members) != 3 {
			return fmt.Sprintf("%d members", len(st.Members))
		}
		if st.State != StateForming || !strings.Contains(st.Reason, "model mismatch") || !strings.Contains(st.Reason, "h2 has config") {
			return st.State + ": " + st.Reason
		}
		return ""
	})
	time.Sleep(500 * time.Millisecond)
	for i, d := range ds {
		if st := d.Status(); st.PlanEpoch != 0 {
			t.Fatalf("h%d has plan epoch %d despite the model mismatch", i, st.PlanEpoch)
		}
	}
}

func TestHeadHooksAndLeave(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	activated := map[string]StageAssignment{}
	assigned := 0
	ds := startInProcess(t, 3, func(i int, o *Options) {
		o.OnAssign = func(_ context.Context, p ClusterPlan, mine StageAssignment) error {
			mu.Lock()
			defer mu.Unlock()
			assigned++
			return nil
		}
		o.OnActive = func(p ClusterPlan, mine StageAssignment) {
			mu.Lock()
			defer mu.Unlock()
			activated[o.Name] = mine
		}
	})
	// Make the daemon with the highest id the head by restarting it with --head.
	hi := 0
	for i, d := range ds {
		if d.ID() > ds[hi].ID() {
			hi = i
		}
	}
	waitStatus(t, ds, "first plan", func(_ int, st Status) string {
		if st.State != StateActive {
			return st.State + ": " + st.Reason
		}
		return ""
	})
	o := ds[hi].opts
	ds[hi].Close()
	o.Head = true
	o.Inventory = &HostInventory{Hostname: o.Name}
	d, err := Start(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	ds[hi] = d
	waitStatus(t, ds, "head coordinates", func(_ int, st Status) string {
		if st.Coordinator != d.ID().String() || st.State != StateActive || st.Plan.Coordinator != d.ID().String() {
			return fmt.Sprintf("coordinator %s, plan %+v, state %s %s", shortID(st.Coordinator), st.Plan, st.State, st.Reason)
		}
		return ""
	})
	mu.Lock()
	if len(activated) != 3 || assigned < 3 {
		t.Errorf("hooks: activated %v, assigned %d", activated, assigned)
	}
	mu.Unlock()

	// A clean shutdown is seen at once as a leave, long before dead-after (5 s).
	other := (hi + 1) % 3
	start := time.Now()
	ds[other].Close()
	rest := []*Daemon{ds[hi], ds[3-hi-other]}
	waitStatus(t, rest, "leave noticed", func(_ int, st Status) string {
		for _, m := range st.Members {
			if m.ID == ds[other].ID().String() && (m.Alive || !strings.Contains(m.Reason, "left")) {
				return "still " + m.Health
			}
		}
		if st.State != StateDegraded || !strings.Contains(st.Reason, "left") {
			return st.State + ": " + st.Reason
		}
		return ""
	})
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("leave took %s", el)
	}
	var buf bytes.Buffer
	if err := WriteStatusText(&buf, rest[0].Status()); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"cluster: degraded", "left (daemon shut down)", "coordinator", "HEALTH", "dead"} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("status text lacks %q:\n%s", want, buf.String())
		}
	}
}
