package node

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The node tests run daemons as separate processes: the test binary re-executes
// itself with daemonEnv set and runs RunNode with its arguments.
const daemonEnv = "GLMTOPO_NODE_TEST_DAEMON"

func TestMain(m *testing.M) {
	if os.Getenv(daemonEnv) == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
		err := RunNode(ctx, os.Args[1:], os.Stdout, os.Stderr)
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, "glmtopo node:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// Fast failure detection for tests: dead within 1.2 s of the last heartbeat.
var fastTiming = []string{"--heartbeat-interval=150ms", "--suspect-after=600ms", "--dead-after=1200ms", "--settle-after=450ms"}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type daemonProc struct {
	name     string
	stateDir string
	cmd      *exec.Cmd
	out      *syncBuffer
	done     chan struct{}
	err      error
}

// startDaemon runs `glmtopo node` args in a child process; prefix (e.g.
// `ip netns exec NS`) wraps the command.
func startDaemon(t *testing.T, name, stateDir string, prefix []string, args ...string) *daemonProc {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	argv := append(append(append([]string{}, prefix...), self), args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), daemonEnv+"=1")
	p := &daemonProc{name: name, stateDir: stateDir, cmd: cmd, out: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("--- log of %s ---\n%s", name, p.out.String())
		}
	})
	return p
}

func (p *daemonProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *daemonProc) kill() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

func (p *daemonProc) stop() {
	if p.exited() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.kill()
	}
}

// waitExit waits for the process to end on its own.
func (p *daemonProc) waitExit(t *testing.T, timeout time.Duration) error {
	t.Helper()
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		t.Fatalf("%s still running after %s; log:\n%s", p.name, timeout, p.out.String())
		return nil
	}
}

// queryStatus goes through RunStatus --json, as a user would.
func queryStatus(stateDir string) (Status, error) {
	var out, errb bytes.Buffer
	if err := RunStatus(context.Background(), []string{"--state-dir", stateDir, "--json", "--timeout=2s"}, &out, &errb); err != nil {
		return Status{}, err
	}
	var st Status
	if err := json.Unmarshal(out.Bytes(), &st); err != nil {
		return Status{}, fmt.Errorf("status json: %w\n%s", err, out.String())
	}
	return st, nil
}

// eventually polls cond until it returns "" (done) or the timeout passes, and
// fails the test with cond's last complaint.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() string) time.Duration {
	t.Helper()
	start := time.Now()
	var last string
	for time.Since(start) < timeout {
		if last = cond(); last == "" {
			return time.Since(start)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: not reached within %s: %s", what, timeout, last)
	return 0
}

// clusterAgrees checks that every daemon is in state want, shows exactly the
// names in alive as alive members, and has the same nonzero plan epoch; it
// returns that epoch.
func clusterAgrees(procs []*daemonProc, want string, alive []string) (uint64, string) {
	var epoch uint64
	for i, p := range procs {
		st, err := queryStatus(p.stateDir)
		if err != nil {
			return 0, fmt.Sprintf("%s: %v", p.name, err)
		}
		if st.State != want {
			return 0, fmt.Sprintf("%s: state %s (%s), want %s", p.name, st.State, st.Reason, want)
		}
		var names []string
		for _, m := range st.Members {
			if m.Alive {
				names = append(names, m.Name)
			}
		}
		if strings.Join(sorted(names), ",") != strings.Join(sorted(alive), ",") {
			return 0, fmt.Sprintf("%s: alive members %v, want %v", p.name, names, alive)
		}
		if st.PlanEpoch == 0 || (i > 0 && st.PlanEpoch != epoch) {
			return 0, fmt.Sprintf("%s: plan epoch %d, others %d", p.name, st.PlanEpoch, epoch)
		}
		epoch = st.PlanEpoch
	}
	return epoch, ""
}

func sorted(s []string) []string {
	out := append([]string(nil), s...)
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j] < out[i] {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}

func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ls []net.Listener
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

func writeClusterKey(t *testing.T, dir, name string) string {
	t.Helper()
	key, err := NewClusterKey()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, key, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// writeInventory writes a synthetic 4-GPU host for --inventory-override.
func writeInventory(t *testing.T, dir, host string) string {
	t.Helper()
	inv := fmt.Sprintf(`hostname: %s
cpu_model: Test CPU
cpu_cores: 64
cpu_threads: 128
memory_bytes: 1099511627776
gpus:
  - {index: 0, name: NVIDIA H100 80GB HBM3, memory_bytes: 85899345920, uuid: GPU-%[1]s-0, pci_bus_id: "00000000:18:00.0", nvlink_active_links: 18}
  - {index: 1, name: NVIDIA H100 80GB HBM3, memory_bytes: 85899345920, uuid: GPU-%[1]s-1, pci_bus_id: "00000000:2A:00.0", nvlink_active_links: 18}
`, host)
	path := filepath.Join(dir, host+".yaml")
	if err := os.WriteFile(path, []byte(inv), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// nodeArgs are the flags every test daemon gets.
func nodeArgs(dir, name, stateDir, listen, keyFile string, extra ...string) []string {
	args := []string{"--state-dir", stateDir, "--name", name, "--listen", listen, "--cluster-key-file", keyFile,
		"--model", "glm-4.5-tiny-test", "--inventory-override", filepath.Join(dir, name+".yaml")}
	args = append(args, fastTiming...)
	return append(args, extra...)
}
