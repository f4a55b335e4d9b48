// Package nccl binds libnccl.so.2 through purego (no cgo) and builds a
// transport.Link on it: each message's header travels on an authenticated
// TCP link, its payloads with ncclSend/ncclRecv grouped on a CUDA stream.
// NCCL checks no sizes, so the receiver verifies the header's byte counts
// against its buffers before posting a receive; every wait polls the stream
// and ncclCommGetAsyncError under a context, and a timeout or a dead peer
// ends in ncclCommAbort, never a blocked stage.
//
// Communicators are created with ncclCommInitRankConfig and blocking=0 (NCCL
// 2.14+), which runs the bootstrap on an NCCL thread, so that an init
// waiting for a missing peer is aborted at the context's deadline. (Plain
// ncclCommInitRank runs the init on the calling thread even with
// NCCL_COMM_BLOCKING=0, which is what hung the first GPU run.) Where the
// call blocks anyway (NCCL older than 2.14, or the user's
// NCCL_COMM_BLOCKING=1), InitRank still returns at the deadline and leaves
// the blocked call to a goroutine that aborts the communicator if it ever
// forms.
package nccl

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"
)

// ErrNoNCCL means libnccl.so.2 could not be loaded here.
var ErrNoNCCL = errors.New("nccl: not available")

// result codes (ncclResult_t).
const (
	ncclSuccess    = 0
	ncclInProgress = 7
)

type lib struct {
	// h is the dlopen handle (the tests resolve their own symbols in it).
	h uintptr

	getUniqueID, commInitRank, send, recv, groupStart, groupEnd uintptr
	commAbort, commDestroy, getAsyncError, getErrorString       uintptr
	getVersion                                                  uintptr
	allReduce, allGather, reduceScatter, broadcast              uintptr
	// 2.14+ (zero when older): ncclCommInitRankConfig, ncclGetLastError.
	commInitRankConfig, getLastError uintptr
}

var (
	libOnce sync.Once
	libVal  *lib
	libErr  error
)

// libDirs are where NCCL usually lives besides the loader's path (the pip
// wheel nvidia-nccl-cu1x included).
func libDirs() []string {
	var dirs []string
	if v := os.Getenv("GLMTOPO_NCCL_LIB_DIR"); v != "" {
		dirs = append(dirs, filepath.SplitList(v)...)
	}
	for _, g := range []string{"/usr/lib/x86_64-linux-gnu", "/usr/local/nccl/lib", "/usr/local/cuda*/lib64",
		"/opt/*/.venv/lib/python3*/site-packages/nvidia/nccl/lib", "/usr/local/lib/python3*/dist-packages/nvidia/nccl/lib",
		"/usr/lib/python3*/site-packages/nvidia/nccl/lib"} {
		m, _ := filepath.Glob(g)
		sort.Sort(sort.Reverse(sort.StringSlice(m)))
		dirs = append(dirs, m...)
	}
	return dirs
}

func loadLib() (*lib, error) {
	libOnce.Do(func() { libVal, libErr = openLib() })
	return libVal, libErr
}

func openLib() (*lib, error) {
	tried := []string{"libnccl.so.2"}
	for _, d := range libDirs() {
		p := filepath.Join(d, "libnccl.so.2")
		if _, err := os.Stat(p); err == nil {
			tried = append(tried, p)
		}
	}
	return openLibAt(tried, purego.RTLD_NOW|purego.RTLD_GLOBAL)
}

// openLibAt loads the first of paths that opens (with dlopen flags) and
// resolves NCCL's entry points. A stand-in library (the tests' fake NCCL)
// must be opened RTLD_LOCAL: with RTLD_GLOBAL its ncclGroupEnd,
// ncclCommGetAsyncError, ... would come first in the global scope and the
// real libnccl's calls to its own exported functions would bind to them
// (on the H200 every later real init failed with "internal error").
func openLibAt(paths []string, flags int) (*lib, error) {
	var h uintptr
	err := errors.New("no path")
	for _, p := range paths {
		if h, err = purego.Dlopen(p, flags); err == nil {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%w: cannot load libnccl.so.2 (tried %v; set GLMTOPO_NCCL_LIB_DIR): %v", ErrNoNCCL, paths, err)
	}
	return resolveLib(h)
}

// resolveLib resolves NCCL's entry points in the library loaded as h.
func resolveLib(h uintptr) (*lib, error) {
	l := &lib{h: h}
	for name, dst := range map[string]*uintptr{
		"ncclGetUniqueId": &l.getUniqueID, "ncclCommInitRank": &l.commInitRank,
		"ncclSend": &l.send, "ncclRecv": &l.recv, "ncclGroupStart": &l.groupStart, "ncclGroupEnd": &l.groupEnd,
		"ncclCommAbort": &l.commAbort, "ncclCommDestroy": &l.commDestroy,
		"ncclCommGetAsyncError": &l.getAsyncError, "ncclGetErrorString": &l.getErrorString,
		"ncclGetVersion": &l.getVersion,
		"ncclAllReduce":  &l.allReduce, "ncclAllGather": &l.allGather, "ncclReduceScatter": &l.reduceScatter,
		"ncclBroadcast": &l.broadcast,
	} {
		p, err := purego.Dlsym(h, name)
		if err != nil {
			return nil, fmt.Errorf("%w: libnccl.so.2 has no %s (older than 2.7?)", ErrNoNCCL, name)
		}
		*dst = p
	}
	// Optional: absent before 2.14 (the init then blocks; see InitRank).
	l.commInitRankConfig, _ = purego.Dlsym(h, "ncclCommInitRankConfig")
	l.getLastError, _ = purego.Dlsym(h, "ncclGetLastError")
	return l, nil
}

func call(fn uintptr, args ...uintptr) int32 {
	r, _, _ := purego.SyscallN(fn, args...)
	return int32(r)
}

func cString(p uintptr) string {
	if p == 0 {
		return ""
	}
	b := *(**byte)(unsafe.Pointer(&p)) // C memory, outside the Go heap
	var n int
	for *(*byte)(unsafe.Add(unsafe.Pointer(b), n)) != 0 {
		n++
	}
	return string(unsafe.Slice(b, n))
}

// check turns an ncclResult_t into an error with NCCL's last message.
func (l *lib) check(res int32, what string, comm uintptr) error {
	if res == ncclSuccess {
		return nil
	}
	r, _, _ := purego.SyscallN(l.getErrorString, uintptr(res))
	if l.getLastError == 0 {
		return fmt.Errorf("nccl: %s: %s (%d)", what, cString(r), res)
	}
	last, _, _ := purego.SyscallN(l.getLastError, comm)
	return fmt.Errorf("nccl: %s: %s (%d): %s", what, cString(r), res, cString(last))
}

// Version is NCCL's version code (e.g. 22809 for 2.28.9).
func Version() (int, error) {
	l, err := loadLib()
	if err != nil {
		return 0, err
	}
	var v int32
	if err := l.check(call(l.getVersion, uintptr(unsafe.Pointer(&v))), "ncclGetVersion", 0); err != nil {
		return 0, err
	}
	return int(v), nil
}

// UniqueID is ncclUniqueId: the rendezvous token rank 0 creates and every
// rank needs; the node control plane carries it as bytes.
type UniqueID [128]byte

// NewUniqueID asks NCCL for a fresh id (it opens rank 0's bootstrap socket).
func NewUniqueID() (UniqueID, error) {
	var id UniqueID
	l, err := loadLib()
	if err != nil {
		return id, err
	}
	err = l.check(call(l.getUniqueID, uintptr(unsafe.Pointer(&id))), "ncclGetUniqueId", 0)
	return id, err
}

// Bytes is the id as the control plane carries it.
func (id UniqueID) Bytes() []byte { return append([]byte(nil), id[:]...) }

// ParseUniqueID checks and converts carried bytes.
func ParseUniqueID(b []byte) (UniqueID, error) {
	var id UniqueID
	if len(b) != len(id) {
		return id, fmt.Errorf("nccl unique id: %d bytes, want %d", len(b), len(id))
	}
	copy(id[:], b)
	return id, nil
}
