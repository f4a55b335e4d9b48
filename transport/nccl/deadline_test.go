package nccl

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ebitengine/purego"
)

// fakeNCCL is a stand-in libnccl.so.2 for the CPU tests of the init and
// abort paths: a peer that never joins, a blocking init that only returns
// when the test releases it, an abort that hangs.
const fakeNCCL = `
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
typedef struct { char internal[128]; } ncclUniqueId;
typedef struct { unsigned long size; unsigned magic, version; int blocking; } cfg_t;
struct comm { volatile int aborted; };
enum { JOINS = 0, PEER_MISSING = 1, FORCED_BLOCKING = 2, HANGING_ABORT = 3 };
static volatile int mode, released, aborts, polls;
static volatile int nrec, failfn;
void fake_set(int m) { mode = m; released = 0; aborts = 0; polls = 0; nrec = 0; failfn = 0; }
void fake_release(void) { __atomic_store_n(&released, 1, __ATOMIC_SEQ_CST); }
int fake_aborts(void) { return __atomic_load_n(&aborts, __ATOMIC_SEQ_CST); }
static void wait_release(void) { while (!__atomic_load_n(&released, __ATOMIC_SEQ_CST)) usleep(1000); }
/* Like NCCL's getHostHash: the host's name is read once per loaded
   library, by the first init, on the thread that runs it. */
static char host[65];
static pthread_once_t hostOnce = PTHREAD_ONCE_INIT;
static void readHost(void) { gethostname(host, sizeof host - 1); }
const char *fake_host(void) { return host; }
static struct comm *newcomm(void) { pthread_once(&hostOnce, readHost); return calloc(1, sizeof(struct comm)); }
#ifndef OLD
int ncclCommInitRankConfig(struct comm **c, int nranks, ncclUniqueId id, int rank, cfg_t *cfg) {
	if (cfg->magic != 0xcafebeef || cfg->version != 21400 || cfg->blocking != 0) return 4;
	*c = newcomm();
	if (mode == FORCED_BLOCKING) { wait_release(); return 0; }
	return 7;
}
const char *ncclGetLastError(struct comm *c) { return "fake last error"; }
#endif
int ncclCommInitRank(struct comm **c, int nranks, ncclUniqueId id, int rank) {
	*c = newcomm();
	wait_release();
	return 0;
}
int ncclCommGetAsyncError(struct comm *c, int *r) {
	if (c->aborted) *r = 3;
	else if (mode == JOINS) *r = __atomic_add_fetch(&polls, 1, __ATOMIC_SEQ_CST) > 3 ? 0 : 7;
	else *r = 7;
	return 0;
}
int ncclCommAbort(struct comm *c) {
	c->aborted = 1;
	if (mode == HANGING_ABORT) wait_release();
	__atomic_add_fetch(&aborts, 1, __ATOMIC_SEQ_CST);
	return 0;
}
const char *ncclGetErrorString(int r) { return "fake error"; }
int ncclGetVersion(int *v) { *v = 21400; return 0; }
int ncclGetUniqueId(ncclUniqueId *id) { return 0; }
/* Every data call is recorded (coll_test.go reads the log back): which
   function, its seven arguments as integers; fake_fail makes one of them
   answer ncclInvalidArgument. */
enum { F_SEND = 1, F_RECV, F_ALLREDUCE, F_ALLGATHER, F_REDUCESCATTER, F_GROUPSTART, F_GROUPEND, F_BROADCAST };
typedef struct { int fn; unsigned long a[7]; } rec_t;
static rec_t recs[256];
static int rec(int fn, unsigned long a0, unsigned long a1, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5, unsigned long a6) {
	if (nrec < 256) { rec_t *r = &recs[nrec++]; r->fn = fn; r->a[0] = a0; r->a[1] = a1; r->a[2] = a2; r->a[3] = a3; r->a[4] = a4; r->a[5] = a5; r->a[6] = a6; }
	return failfn == fn ? 4 : 0;
}
int fake_nrec(void) { return nrec; }
long fake_rec(int i, int j) { return j < 0 ? recs[i].fn : (long)recs[i].a[j]; }
void fake_fail(int fn) { failfn = fn; }
int ncclSend(const void *b, unsigned long n, int dt, int peer, struct comm *c, void *s) { return rec(F_SEND, (unsigned long)b, n, dt, peer, (unsigned long)c, (unsigned long)s, 0); }
int ncclRecv(void *b, unsigned long n, int dt, int peer, struct comm *c, void *s) { return rec(F_RECV, (unsigned long)b, n, dt, peer, (unsigned long)c, (unsigned long)s, 0); }
int ncclAllReduce(const void *sb, void *rb, unsigned long n, int dt, int op, struct comm *c, void *s) { return rec(F_ALLREDUCE, (unsigned long)sb, (unsigned long)rb, n, dt, op, (unsigned long)c, (unsigned long)s); }
int ncclAllGather(const void *sb, void *rb, unsigned long n, int dt, struct comm *c, void *s) { return rec(F_ALLGATHER, (unsigned long)sb, (unsigned long)rb, n, dt, (unsigned long)c, (unsigned long)s, 0); }
int ncclReduceScatter(const void *sb, void *rb, unsigned long n, int dt, int op, struct comm *c, void *s) { return rec(F_REDUCESCATTER, (unsigned long)sb, (unsigned long)rb, n, dt, op, (unsigned long)c, (unsigned long)s); }
int ncclBroadcast(const void *sb, void *rb, unsigned long n, int dt, int root, struct comm *c, void *s) { return rec(F_BROADCAST, (unsigned long)sb, (unsigned long)rb, n, dt, root, (unsigned long)c, (unsigned long)s); }
int ncclGroupStart(void) { return rec(F_GROUPSTART, 0, 0, 0, 0, 0, 0, 0); }
/* With a peer missing, a group's launch never leaves ncclInProgress. */
int ncclGroupEnd(void) { int r = rec(F_GROUPEND, 0, 0, 0, 0, 0, 0, 0); return r ? r : mode == PEER_MISSING ? 7 : 0; }
int ncclCommDestroy(struct comm *c) { return 0; }
`

const (
	modeJoins = iota
	modePeerMissing
	modeForcedBlocking
	modeHangingAbort
)

// fakeLib is one build of fakeNCCL, loaded.
type fakeLib struct {
	l       *lib
	set     func(int32)
	release func()
	aborts  func() int32
	nrec    func() int32
	rec     func(i, j int32) int64
	fail    func(fn int32)
	host    func() string // the name the library's first init read
}

var fakeLibs sync.Map // path → *fakeLib: a library loads once per process

func buildFake(t *testing.T, old bool) *fakeLib {
	t.Helper()
	if runtime.GOARCH != "amd64" {
		t.Skip("initRankArgs lays out x86-64's ABI")
	}
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		t.Skip("no gcc to build the fake libnccl")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "fake.c")
	if err := os.WriteFile(src, []byte(fakeNCCL), 0o600); err != nil {
		t.Fatal(err)
	}
	so := filepath.Join(dir, "libfakenccl.so")
	args := []string{"-O1", "-shared", "-fPIC", "-pthread", "-o", so, src}
	if old {
		args = append([]string{"-DOLD"}, args...)
	}
	if out, err := exec.Command(gcc, args...).CombinedOutput(); err != nil {
		t.Skipf("gcc: %v %s", err, out)
	}
	l, err := openLibAt([]string{so}, purego.RTLD_NOW|purego.RTLD_LOCAL)
	if err != nil {
		t.Fatal(err)
	}
	if old != (l.commInitRankConfig == 0) {
		t.Fatalf("old=%v but ncclCommInitRankConfig resolved=%v", old, l.commInitRankConfig != 0)
	}
	return newFakeLib(t, l)
}

// newFakeLib binds the test hooks of a loaded fake library (the build's,
// or a private copy of it).
func newFakeLib(t *testing.T, l *lib) *fakeLib {
	t.Helper()
	f := &fakeLib{l: l}
	purego.RegisterLibFunc(&f.set, l.h, "fake_set")
	purego.RegisterLibFunc(&f.release, l.h, "fake_release")
	purego.RegisterLibFunc(&f.aborts, l.h, "fake_aborts")
	purego.RegisterLibFunc(&f.nrec, l.h, "fake_nrec")
	purego.RegisterLibFunc(&f.rec, l.h, "fake_rec")
	purego.RegisterLibFunc(&f.fail, l.h, "fake_fail")
	purego.RegisterLibFunc(&f.host, l.h, "fake_host")
	t.Cleanup(f.release) // never leave a C thread parked
	return f
}

// hostDevice runs calls on the calling thread; no stream ever finishes.
type hostDevice struct{}

func (hostDevice) Do(fn func() error) error         { return fn() }
func (hostDevice) StreamDone(uintptr) (bool, error) { return false, nil }

// waitFor polls cond until it holds or d passes.
func waitFor(d time.Duration, cond func() bool) bool {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}

// TestInitDeadline: whatever NCCL does with a rank that never joins —
// answer ncclInProgress forever (2.14+ non-blocking), block in the call
// (NCCL_COMM_BLOCKING=1, or NCCL < 2.14 without ncclCommInitRankConfig), or
// hang in ncclCommAbort — InitRank returns an error at its deadline, and
// the communicator is aborted (at once, or once the blocked call returns).
func TestInitDeadline(t *testing.T) {
	const deadline = 200 * time.Millisecond
	for _, tc := range []struct {
		name       string
		old        bool
		mode       int32
		wantErr    string
		abortsNow  int32 // aborts done when InitRank returns
		abortAfter bool  // one more once the call is released
	}{
		{"joins", false, modeJoins, "", 0, false},
		{"peer missing, non-blocking", false, modePeerMissing, "aborted the communicator", 1, false},
		{"NCCL_COMM_BLOCKING=1", false, modeForcedBlocking, "still blocked at the deadline", 0, true},
		{"NCCL before 2.14", true, modePeerMissing, "ncclCommInitRank still blocked", 0, true},
		{"abort hangs", false, modeHangingAbort, "ncclCommAbort still running", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := buildFake(t, tc.old)
			f.set(tc.mode)
			ctx, cancel := context.WithTimeout(context.Background(), deadline)
			defer cancel()
			t0 := time.Now()
			c, err := initRank(ctx, f.l, hostDevice{}, UniqueID{}, 2, 0, 300*time.Millisecond, InitOptions{})
			el := time.Since(t0)
			if el > deadline+time.Second {
				t.Fatalf("InitRank returned after %v (deadline %v)", el, deadline)
			}
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if err := c.Close(); err != nil || f.aborts() != 1 {
					t.Fatalf("close: %v, %d aborts", err, f.aborts())
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "deadline exceeded") {
				t.Fatalf("err = %v, want %q and the context's error", err, tc.wantErr)
			}
			if got := f.aborts(); got != tc.abortsNow {
				t.Fatalf("%d aborts when InitRank returned, want %d", got, tc.abortsNow)
			}
			f.release()
			want := tc.abortsNow
			if tc.abortAfter || tc.mode == modeHangingAbort {
				want++
			}
			if !waitFor(5*time.Second, func() bool { return f.aborts() == want }) {
				t.Fatalf("%d aborts after the release, want %d", f.aborts(), want)
			}
			t.Logf("%v after %v", err, el.Round(time.Millisecond))
		})
	}
}

// TestWaitAbortsAtDeadline: a transfer whose stream never finishes (a dead
// peer) ends at the context's deadline with the communicator aborted.
func TestWaitAbortsAtDeadline(t *testing.T) {
	f, c := fakeComm(t, 2, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	err := c.Wait(ctx, 1)
	if err == nil || !strings.Contains(err.Error(), "aborted") || f.aborts() != 1 {
		t.Fatalf("Wait: %v, %d aborts", err, f.aborts())
	}
	if el := time.Since(t0); el > time.Second {
		t.Fatalf("Wait returned after %v", el)
	}
	if err := c.Enqueue(context.Background(), 1, Op{Send: true, Buf: 0x10, Bytes: 1}); err == nil || !strings.Contains(err.Error(), "aborted") {
		t.Fatalf("Enqueue on an aborted communicator: %v", err)
	}
}
