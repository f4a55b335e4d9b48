package nccl

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"unsafe"

	"github.com/ebitengine/purego"
)

// TestInitRankABI calls C functions with ncclCommInitRank's and
// ncclCommInitRankConfig's signatures (compiled here with gcc; skipped
// without it) through initRankArgs and checks that they see the pointer,
// both ints, all 128 id bytes and the config.
func TestInitRankABI(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("the layout is x86-64's")
	}
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		t.Skip("no gcc to build the C side")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "abi.c")
	os.WriteFile(src, []byte(`
typedef struct { char internal[128]; } id_t;
int check(void **comm, int nranks, id_t id, int rank) {
	int sum = 0;
	for (int i = 0; i < 128; i++) sum += (unsigned char)id.internal[i] * (i + 1);
	*comm = (void*)(long)(sum + 1000000 * nranks + 100000000 * rank);
	return id.internal[127] == 127 ? 0 : 1;
}
typedef struct { unsigned long size; unsigned magic, version; int blocking, cga, minCTAs, maxCTAs; const char *netName; } cfg_t;
int checkcfg(void **comm, int nranks, id_t id, int rank, cfg_t *cfg) {
	if (cfg->size != sizeof(cfg_t) || cfg->magic != 0xcafebeef || cfg->version != 21400 || cfg->blocking != 0) return 2;
	if (cfg->cga != -2147483648 || cfg->minCTAs != -2147483648 || cfg->maxCTAs != -2147483648 || cfg->netName != 0) return 3;
	return check(comm, nranks, id, rank);
}
`), 0o600)
	lib := filepath.Join(dir, "libabi.so")
	if out, err := exec.Command(gcc, "-O2", "-shared", "-fPIC", "-o", lib, src).CombinedOutput(); err != nil {
		t.Skipf("gcc: %v %s", err, out)
	}
	h, err := purego.Dlopen(lib, purego.RTLD_NOW)
	if err != nil {
		t.Fatal(err)
	}
	var id UniqueID
	want := 0
	for i := range id {
		id[i] = byte(i)
		want += i * (i + 1)
	}
	cfg := newConfig()
	for _, tc := range []struct {
		fn  string
		cfg uintptr
	}{{"check", 0}, {"checkcfg", uintptr(unsafe.Pointer(cfg))}} {
		fn, err := purego.Dlsym(h, tc.fn)
		if err != nil {
			t.Fatal(err)
		}
		comm := new(uintptr) // on the heap, as Comm.c is: its address must not move
		r := call(fn, initRankArgs(comm, 3, 2, id, tc.cfg)...)
		runtime.KeepAlive(comm)
		if r != 0 || *comm != uintptr(want+3_000_000+200_000_000) {
			t.Fatalf("%s: C side saw result %d, comm %d; want 0, %d", tc.fn, r, *comm, want+3_000_000+200_000_000)
		}
	}
	runtime.KeepAlive(cfg)
}
