package nccl

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ebitengine/purego"
)

// TestHostLibraryPrivateState: two host libraries copied from the fake
// are instances of their own (their own code, their own statics: calls
// recorded in one are not in the other nor in the process's library),
// their files are gone from TMPDIR once open, and bad names or
// NCCL_HOSTID are refused with the reason.
func TestHostLibraryPrivateState(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	f := buildFake(t, false)
	a, err := openHostLibrary(f.l, "glmtopo-a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := openHostLibrary(f.l, "rack/1 b") // not a file name: sanitised
	if err != nil {
		t.Fatal(err)
	}
	if a.Host() != "glmtopo-a" || b.Host() != "rack/1 b" {
		t.Fatalf("hosts %q, %q", a.Host(), b.Host())
	}
	if a.l.getVersion == f.l.getVersion || b.l.getVersion == f.l.getVersion || a.l.getVersion == b.l.getVersion {
		t.Fatalf("the copies share code: ncclGetVersion at %#x, %#x, process's %#x", a.l.getVersion, b.l.getVersion, f.l.getVersion)
	}
	fa, fb := newFakeLib(t, a.l), newFakeLib(t, b.l)
	f.set(modeJoins)
	for range 3 {
		call(a.l.groupStart)
	}
	call(b.l.groupEnd)
	if fa.nrec() != 3 || fb.nrec() != 1 || f.nrec() != 0 {
		t.Fatalf("calls recorded: %d in a (want 3), %d in b (want 1), %d in the process's (want 0)", fa.nrec(), fb.nrec(), f.nrec())
	}
	if left, _ := filepath.Glob(filepath.Join(tmp, "*")); len(left) != 0 {
		t.Fatalf("copies left in TMPDIR: %v", left)
	}
	for _, tc := range []struct {
		name, host, hostID, wantErr string
	}{
		{"empty", "", "", "a hostname has 1 to 64 bytes"},
		{"65 bytes", strings.Repeat("h", 65), "", "a hostname has 1 to 64 bytes"},
		{"NCCL_HOSTID set", "glmtopo-c", "node7", `NCCL_HOSTID="node7" is set`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("NCCL_HOSTID", tc.hostID)
			_, err := openHostLibrary(f.l, tc.host)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
			// The same check guards the init, for a library opened before.
			_, err = InitOptions{Host: a.Host(), Library: a}.library(f.l)
			if tc.hostID != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("init options: err = %v, want %q", err, tc.wantErr)
			}
		})
	}
	if _, err := mappedFile(0); err == nil {
		t.Fatal("address 0 found in a mapping")
	}
}

// probeLib is a library with a counter and a function that reaches it
// through its exported (interposable) entry point, as libnccl's calls to
// its own API go through the PLT.
const probeLib = `
static int n;
int glmtopo_probe_bump(void) { return ++n; }
int glmtopo_probe_self(void) { return glmtopo_probe_bump(); }
`

// TestDlopenPrivateDeepBind: a private copy's calls to its own exported
// functions bind to itself even while the original is loaded RTLD_GLOBAL
// (as the process's libnccl is); a copy opened RTLD_LOCAL alone, the
// control, binds them to the original's, which is why dlopenPrivate adds
// RTLD_DEEPBIND. The probe's symbols are its own, so its global load
// interposes on nothing else in the test process.
func TestDlopenPrivateDeepBind(t *testing.T) {
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		t.Skip("no gcc to build the probe library")
	}
	tmp := t.TempDir()
	src, so := filepath.Join(tmp, "probe.c"), filepath.Join(tmp, "libglmtopoprobe.so")
	if err := os.WriteFile(src, []byte(probeLib), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(gcc, "-O1", "-shared", "-fPIC", "-o", so, src).CombinedOutput(); err != nil {
		t.Skipf("gcc: %v %s", err, out)
	}
	orig, err := purego.Dlopen(so, purego.RTLD_NOW|purego.RTLD_GLOBAL)
	if err != nil {
		t.Fatal(err)
	}
	var bump func() int32
	purego.RegisterLibFunc(&bump, orig, "glmtopo_probe_bump")
	for range 3 {
		bump()
	}
	self := func(h uintptr) int32 {
		var f func() int32
		purego.RegisterLibFunc(&f, h, "glmtopo_probe_self")
		return f()
	}
	t.Setenv("TMPDIR", tmp)
	priv, err := dlopenPrivate(so, "probe")
	if err != nil {
		t.Fatal(err)
	}
	if got := self(priv); got != 1 {
		t.Fatalf("the private copy's own call reached a counter at %d, want its own at 1", got)
	}
	// Control: the same copy without RTLD_DEEPBIND.
	ctl := filepath.Join(tmp, "control.so")
	b, err := os.ReadFile(so)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ctl, b, 0o600); err != nil {
		t.Fatal(err)
	}
	local, err := purego.Dlopen(ctl, purego.RTLD_NOW|purego.RTLD_LOCAL)
	if err != nil {
		t.Fatal(err)
	}
	if got := self(local); got != 4 {
		t.Fatalf("control: an RTLD_LOCAL copy's own call reached a counter at %d, want the global original's at 4", got)
	}
}

func TestFileSafe(t *testing.T) {
	for in, want := range map[string]string{
		"glmtopo-rank0": "glmtopo-rank0", "rack/1 b": "rack_1_b", "a.b_c": "a.b_c", "hôte": "h_te",
	} {
		if got := fileSafe(in); got != want {
			t.Errorf("fileSafe(%q) = %q, want %q", in, got, want)
		}
	}
}
