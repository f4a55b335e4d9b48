package nccl

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// nodename is the calling thread's hostname (uname reads the thread's UTS
// namespace, as /proc/sys/kernel/hostname does).
func nodename() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "uname: " + err.Error()
	}
	return unix.ByteSliceToString(u.Nodename[:])
}

// TestEmulateHost: on a locked thread, emulateHost renames that thread's
// host and no other's; where the process may not make namespaces (no
// CAP_SYS_ADMIN) it says so, wrapping the system's error.
func TestEmulateHost(t *testing.T) {
	before, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	const host = "glmtopo-emulated-rank"
	type result struct {
		err          error
		name, osName string
	}
	done := make(chan result, 1)
	release := make(chan struct{})
	go func() {
		runtime.LockOSThread() // never unlocked: Go retires the thread
		var r result
		if r.err = emulateHost(host); r.err == nil {
			r.name = nodename()
			r.osName, _ = os.Hostname()
		}
		done <- r
		<-release // keep the renamed thread alive while the test looks from another
	}()
	defer close(release)
	var r result
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("emulateHost did not return")
	}
	if r.err != nil {
		if !errors.Is(r.err, unix.EPERM) || !strings.Contains(r.err.Error(), `emulated host "glmtopo-emulated-rank": unshare UTS namespace`) {
			t.Fatalf("err = %v, want EPERM wrapped with the host's name", r.err)
		}
		t.Skipf("no CAP_SYS_ADMIN here; the error path held: %v", r.err)
	}
	if r.name != host || r.osName != host {
		t.Fatalf("the emulating thread sees uname %q, os.Hostname %q; want %q", r.name, r.osName, host)
	}
	if after, _ := os.Hostname(); after != before || nodename() != before {
		t.Fatalf("the process's hostname changed: %q (uname %q), was %q", after, nodename(), before)
	}
}

// TestInitRankEmulatedHost: with InitOptions.Host and the host's private
// library, the init runs (on copies of the fake library) from the renamed
// thread: each copy's first init reads its own host's name, as NCCL's
// once-per-library host hash does, and a second communicator of the same
// host (sharing its library) keeps it; the process's library reads the
// real name. Options that do not match are refused before any NCCL call.
func TestInitRankEmulatedHost(t *testing.T) {
	t.Setenv("TMPDIR", t.TempDir())
	f := buildFake(t, false)
	hosts := []string{"glmtopo-rank0", "glmtopo-rank1"}
	libs := make([]*HostLibrary, len(hosts))
	fakes := make([]*fakeLib, len(hosts))
	for i, h := range hosts {
		hl, err := openHostLibrary(f.l, h)
		if err != nil {
			t.Fatal(err)
		}
		libs[i], fakes[i] = hl, newFakeLib(t, hl.l)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name    string
		opt     InitOptions
		wantErr string
	}{
		{"host without library", InitOptions{Host: hosts[0]}, "InitOptions.Library is nil"},
		{"library of another host", InitOptions{Host: hosts[0], Library: libs[1]}, `opened for host "glmtopo-rank1"`},
		{"library without host", InitOptions{Library: libs[0]}, `opened for host "glmtopo-rank0"`},
	} {
		_, err := initRank(ctx, f.l, hostDevice{}, UniqueID{}, 2, 0, time.Second, tc.opt)
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "rank 0 of 2") {
			t.Fatalf("%s: err = %v, want %q", tc.name, err, tc.wantErr)
		}
	}
	if got := f.nrec() + fakes[0].nrec() + fakes[1].nrec(); got != 0 || fakes[0].host() != "" {
		t.Fatalf("refused options reached a library: %d calls, host %q", got, fakes[0].host())
	}
	for round := range 2 { // the second: another communicator of each host
		for i, h := range hosts {
			c, err := initRank(ctx, f.l, hostDevice{}, UniqueID{}, 2, i, time.Second, InitOptions{Host: h, Library: libs[i]})
			if errors.Is(err, unix.EPERM) {
				if !strings.Contains(err.Error(), fmt.Sprintf("rank %d of 2", i)) || !strings.Contains(err.Error(), `emulated host "`+h+`"`) {
					t.Fatalf("err = %v", err)
				}
				t.Skipf("no CAP_SYS_ADMIN here; the error path held: %v", err)
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := c.Close(); err != nil || fakes[i].aborts() != int32(round+1) || f.aborts() != 0 {
				t.Fatalf("close: %v, %d aborts in %s's library, %d in the process's", err, fakes[i].aborts(), h, f.aborts())
			}
			if got := fakes[i].host(); got != h {
				t.Fatalf("round %d: %s's library read host %q", round, h, got)
			}
		}
	}
	c, err := initRank(ctx, f.l, hostDevice{}, UniqueID{}, 2, 0, time.Second, InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if real, _ := os.Hostname(); f.host() != real {
		t.Fatalf("the process's library read host %q, want %q", f.host(), real)
	}
}
