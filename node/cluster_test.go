package node

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestClusterLifecycle runs three daemons and a stranger as separate
// processes on loopback, found through static peers. It checks that they
// agree on members and plan epoch, the stranger (other cluster key) never
// appears, a second daemon on a used state dir is refused, a SIGKILLed daemon
// is declared dead everywhere within the timeout and degrades the cluster,
// and its return leads to a new plan epoch.
func TestClusterLifecycle(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	key := writeClusterKey(t, dir, "cluster.key")
	otherKey := writeClusterKey(t, dir, "other.key")
	names := []string{"alpha", "bravo", "charlie", "stranger"}
	ports := freePorts(t, len(names))
	listen := map[string]string{}
	for i, n := range names {
		writeInventory(t, dir, n)
		listen[n] = fmt.Sprintf("127.0.0.1:%d", ports[i])
	}
	// The same peer list on every host, own address included, in both forms.
	peers := fmt.Sprintf("%s,%s,/ip4/127.0.0.1/tcp/%d", listen["alpha"], listen["bravo"], ports[2])
	start := func(name, keyFile string, extra ...string) *daemonProc {
		sd := filepath.Join(dir, name)
		return startDaemon(t, name, sd, nil, nodeArgs(dir, name, sd, listen[name], keyFile, extra...)...)
	}
	procs := map[string]*daemonProc{}
	for _, n := range names[:3] {
		procs[n] = start(n, key, "--peers", peers, "--expect", "3", "--mdns=false")
	}
	stranger := start("stranger", otherKey, "--peers", peers, "--start-now", "--mdns=false")
	trio := []*daemonProc{procs["alpha"], procs["bravo"], procs["charlie"]}

	var epoch1 uint64
	eventually(t, 15*time.Second, "three daemons agree on an active plan", func() string {
		e, why := clusterAgrees(trio, StateActive, names[:3])
		epoch1 = e
		return why
	})
	st, err := queryStatus(procs["bravo"].stateDir)
	if err != nil {
		t.Fatal(err)
	}
	if st.Plan == nil || len(st.Plan.Stages) != 3 || st.Coordinator == "" {
		t.Fatalf("plan %+v coordinator %q", st.Plan, st.Coordinator)
	}
	if got := st.Members[0].Inventory.GPUs; len(got) != 2 || got[0].NVLinks != 18 {
		t.Fatalf("inventory not carried to members: %+v", got)
	}
	// The stranger, with another key, sees nobody and nobody sees it.
	sst, err := queryStatus(stranger.stateDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(sst.Members) != 1 || !sst.Members[0].Self {
		t.Fatalf("stranger sees %d members: %+v", len(sst.Members), sst.Members)
	}
	for _, p := range trio {
		st, _ := queryStatus(p.stateDir)
		for _, m := range st.Members {
			if m.Name == "stranger" || m.ID == sst.ID {
				t.Fatalf("%s lists the stranger as a member", p.name)
			}
		}
	}

	// A second daemon on alpha's state dir is refused.
	sd := procs["alpha"].stateDir
	again := startDaemon(t, "alpha-again", sd, nil, nodeArgs(dir, "alpha", sd, "127.0.0.1:0", key, "--expect", "3", "--mdns=false")...)
	if err := again.waitExit(t, 10*time.Second); err == nil {
		t.Fatalf("second daemon on %s exited 0", sd)
	}
	want := fmt.Sprintf("state dir %s is in use by pid %d", sd, procs["alpha"].cmd.Process.Pid)
	if !strings.Contains(again.out.String(), want) {
		t.Fatalf("second daemon's output lacks %q:\n%s", want, again.out.String())
	}

	// SIGKILL charlie: dead everywhere within dead-after plus slack.
	procs["charlie"].kill()
	killed := time.Now()
	rest := trio[:2]
	eventually(t, 5*time.Second, "charlie dead on alpha and bravo", func() string {
		for _, p := range rest {
			st, err := queryStatus(p.stateDir)
			if err != nil {
				return err.Error()
			}
			for _, m := range st.Members {
				if m.Name == "charlie" && m.Alive {
					return p.name + " still has charlie alive (" + m.Health + ")"
				}
			}
		}
		return ""
	})
	t.Logf("charlie declared dead everywhere %s after SIGKILL (dead-after 1.2s)", time.Since(killed).Round(time.Millisecond))
	for _, p := range rest {
		st, err := queryStatus(p.stateDir)
		if err != nil {
			t.Fatal(err)
		}
		if st.State != StateDegraded || !strings.Contains(st.Reason, "charlie") || !strings.Contains(st.Reason, "dead") {
			t.Fatalf("%s: state %s reason %q, want degraded naming charlie dead", p.name, st.State, st.Reason)
		}
		if st.PlanEpoch != epoch1 {
			t.Fatalf("%s: epoch %d changed while degraded (was %d)", p.name, st.PlanEpoch, epoch1)
		}
	}

	// charlie comes back with the same identity: a new epoch everywhere.
	procs["charlie"] = start("charlie", key, "--peers", peers, "--expect", "3", "--mdns=false")
	trio[2] = procs["charlie"]
	var epoch2 uint64
	eventually(t, 15*time.Second, "replanned after charlie's return", func() string {
		e, why := clusterAgrees(trio, StateActive, names[:3])
		if why == "" && e <= epoch1 {
			return fmt.Sprintf("epoch %d, want > %d", e, epoch1)
		}
		epoch2 = e
		return why
	})

	// A crash and immediate restart (before dead-after) is a new incarnation,
	// not a duplicate identity: admitted, and the cluster replans.
	procs["bravo"].kill()
	procs["bravo"] = start("bravo", key, "--peers", peers, "--expect", "3", "--mdns=false")
	trio[1] = procs["bravo"]
	eventually(t, 15*time.Second, "replanned after bravo's quick restart", func() string {
		if procs["bravo"].exited() {
			return "restarted bravo exited: " + lastLine(procs["bravo"].out.String())
		}
		e, why := clusterAgrees(trio, StateActive, names[:3])
		if why == "" && e <= epoch2 {
			return fmt.Sprintf("epoch %d, want > %d", e, epoch2)
		}
		return why
	})
	// The stranger never got in, anywhere.
	for _, p := range trio {
		st, err := queryStatus(p.stateDir)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range st.Members {
			if m.ID == sst.ID {
				t.Fatalf("%s lists the stranger", p.name)
			}
		}
	}
	if sst, err = queryStatus(stranger.stateDir); err != nil || len(sst.Members) != 1 {
		t.Fatalf("stranger: %v, %d members", err, len(sst.Members))
	}
}

// TestDuplicateIdentity starts a daemon with a copy of another host's node
// key: the cluster refuses it with a clear log line, it exits with an error,
// and the original keeps its place.
func TestDuplicateIdentity(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	key := writeClusterKey(t, dir, "cluster.key")
	ports := freePorts(t, 3)
	for _, n := range []string{"one", "two", "copy"} {
		writeInventory(t, dir, n)
	}
	addr := func(i int) string { return fmt.Sprintf("127.0.0.1:%d", ports[i]) }
	start := func(name, sd string, port int, peers string) *daemonProc {
		return startDaemon(t, name, sd, nil, nodeArgs(dir, name, sd, addr(port), key, "--peers", peers, "--expect", "2", "--mdns=false")...)
	}
	one := start("one", filepath.Join(dir, "one"), 0, addr(0))
	// The others name one by its full multiaddr, peer id included.
	var full string
	eventually(t, 10*time.Second, "one's status", func() string {
		st, err := queryStatus(one.stateDir)
		if err != nil {
			return err.Error()
		}
		full = st.Addrs[0]
		return ""
	})
	if !strings.Contains(full, "/p2p/") {
		t.Fatalf("advertised address %q lacks /p2p/", full)
	}
	two := start("two", filepath.Join(dir, "two"), 1, full)
	var epoch uint64
	eventually(t, 15*time.Second, "two daemons active", func() string {
		e, why := clusterAgrees([]*daemonProc{one, two}, StateActive, []string{"one", "two"})
		epoch = e
		return why
	})
	// Copy two's key into a fresh state dir.
	b, err := os.ReadFile(filepath.Join(two.stateDir, keyFileName))
	if err != nil {
		t.Fatal(err)
	}
	copyDir := filepath.Join(dir, "copy")
	os.MkdirAll(copyDir, 0o700)
	if err := os.WriteFile(filepath.Join(copyDir, keyFileName), b, 0o600); err != nil {
		t.Fatal(err)
	}
	dup := start("copy", copyDir, 2, full)
	err = dup.waitExit(t, 10*time.Second)
	if err == nil {
		t.Fatal("daemon with a copied key exited 0")
	}
	out := dup.out.String()
	if !strings.Contains(out, "duplicate node identity") {
		t.Fatalf("duplicate's output does not say why:\n%s", out)
	}
	t.Logf("the duplicate says: %s", lastLine(out))
	if out := one.out.String(); !strings.Contains(out, "refusing duplicate node identity") {
		t.Fatalf("member's log has no refusal line:\n%s", out)
	}
	// The original stays, the plan is undisturbed.
	time.Sleep(500 * time.Millisecond)
	if e, why := clusterAgrees([]*daemonProc{one, two}, StateActive, []string{"one", "two"}); why != "" || e != epoch {
		t.Fatalf("after the duplicate: epoch %d (was %d): %s", e, epoch, why)
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
