package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
)

// daemonProcs are a test's `glmtopo node` processes, daemon i logging to
// dir/h<i>.log (appended across restarts).
type daemonProcs struct {
	t     *testing.T
	dir   string
	mu    sync.Mutex
	procs []*exec.Cmd
}

func newDaemonProcs(t *testing.T, dir string, n int) daemonProcs {
	return daemonProcs{t: t, dir: dir, procs: make([]*exec.Cmd, n)}
}

// startDaemon starts cmd (this test binary running main) as daemon i. It
// dies with the test process, even when a timeout kills the test before its
// cleanups run.
func (d *daemonProcs) startDaemon(i int, cmd *exec.Cmd) {
	d.t.Helper()
	logf, err := os.OpenFile(filepath.Join(d.dir, fmt.Sprintf("h%d.log", i)), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		d.t.Fatal(err)
	}
	defer logf.Close()
	cmd.Env = append(os.Environ(), execMainEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		d.t.Fatalf("start h%d: %v", i, err)
	}
	d.mu.Lock()
	d.procs[i] = cmd
	d.mu.Unlock()
}

// signal sends sig to daemon i and reaps it; false if it was not running.
func (d *daemonProcs) signal(i int, sig syscall.Signal) bool {
	d.mu.Lock()
	cmd := d.procs[i]
	d.procs[i] = nil
	d.mu.Unlock()
	if cmd == nil {
		return false
	}
	cmd.Process.Signal(sig)
	cmd.Wait()
	return true
}

// kill SIGKILLs daemon i and reaps it.
func (d *daemonProcs) kill(i int) { d.signal(i, syscall.SIGKILL) }
