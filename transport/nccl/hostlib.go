package nccl

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/ebitengine/purego"
)

// HostLibrary is a private instance of libnccl for the ranks of one
// emulated host (InitOptions.Host; tests and development only).
//
// Why a private instance: NCCL computes its host identity (a hash of
// gethostname() and the boot id) once per loaded library (getHostHash,
// pthread_once / std::call_once since about 2.19) and keeps it in a static.
// Every rank inited through the process's one libnccl therefore shares the
// first rank's host, whatever UTS namespace its init thread is in, and
// NCCL refuses two ranks of one host on one GPU ("Duplicate GPU
// detected"). A HostLibrary is a copy of the libnccl file the process
// loaded, dlopened under a name of its own: its statics are its own, and
// its first host-hash computation happens on the init thread that
// InitOptions.Host renamed (or on an NCCL thread that thread started,
// which inherits its namespace), so each HostLibrary's ranks are a host of
// their own to NCCL.
//
// Open one per emulated host and pass it, with the same Host, to every
// communicator of the ranks of that host (a rank's tensor-parallel group
// and its world communicator share it). The copy is opened RTLD_LOCAL (its
// symbols never come before another library's) and RTLD_DEEPBIND (its own
// references to its exported functions bind to itself, not to the
// process's libnccl, which is loaded RTLD_GLOBAL and would otherwise come
// first).
//
// A HostLibrary has no Close: it stays loaded for the life of the process,
// because NCCL is not made to be unloaded (it leaves detached threads, the
// NET/IB event thread among them, that would run on unmapped code). Its
// file, a copy in os.TempDir() (TMPDIR) named after the host, is removed
// as soon as the copy is mapped, so nothing is left behind, unless the
// process dies between the copy and the dlopen (a glmtopo-nccl-HOST-*.so
// file in TMPDIR, safe to delete). The mapping costs the library's size
// (about 300 MB for NCCL 2.28) of page cache, or of memory where TMPDIR is
// a tmpfs, per HostLibrary, and TMPDIR must allow executable mappings (not
// mounted noexec). Only Linux with glibc (RTLD_DEEPBIND) is supported.
type HostLibrary struct {
	host string
	l    *lib
}

// rtldDeepBind is glibc's RTLD_DEEPBIND, which purego does not name.
const rtldDeepBind = 0x00008

// hostNameMax is the longest name sethostname takes (HOST_NAME_MAX).
const hostNameMax = 64

// OpenHostLibrary makes a private copy of the process's libnccl for the
// emulated host named host. It fails when NCCL cannot be loaded, when host
// is empty or longer than a hostname may be, and when NCCL_HOSTID is set
// (NCCL would use it in place of every host's name).
func OpenHostLibrary(host string) (*HostLibrary, error) {
	g, err := loadLib()
	if err != nil {
		return nil, err
	}
	return openHostLibrary(g, host)
}

func openHostLibrary(g *lib, host string) (*HostLibrary, error) {
	if err := checkHost(host); err != nil {
		return nil, err
	}
	src, err := mappedFile(g.getVersion)
	if err != nil {
		return nil, fmt.Errorf("nccl host library %q: find the loaded libnccl: %w", host, err)
	}
	h, err := dlopenPrivate(src, host)
	if err != nil {
		return nil, fmt.Errorf("nccl host library %q: %w", host, err)
	}
	l, err := resolveLib(h)
	if err != nil {
		return nil, fmt.Errorf("nccl host library %q: %w", host, err)
	}
	if l.getVersion == g.getVersion {
		// The loader handed back the process's instance: its host hash
		// would be shared, which is what a HostLibrary is for avoiding.
		return nil, fmt.Errorf("nccl host library %q: the copy of %s resolved to the already loaded instance", host, src)
	}
	return &HostLibrary{host: host, l: l}, nil
}

// Host is the emulated host's name the library was opened for.
func (h *HostLibrary) Host() string { return h.host }

// checkHost refuses what would fail later, less clearly: an empty or
// over-long name (sethostname), or NCCL_HOSTID in the environment, which
// NCCL puts in place of the hostname (NCCL can also read it from
// NCCL_CONF_FILE or /etc/nccl.conf, which is not checked here).
func checkHost(host string) error {
	if host == "" || len(host) > hostNameMax {
		return fmt.Errorf("nccl emulated host %q: a hostname has 1 to %d bytes", host, hostNameMax)
	}
	if v := os.Getenv("NCCL_HOSTID"); v != "" {
		return fmt.Errorf("nccl emulated host %q: NCCL_HOSTID=%q is set and would name every host alike; unset it", host, v)
	}
	return nil
}

// dlopenPrivate copies the shared object src to a temporary file named
// after tag, opens it RTLD_NOW|RTLD_LOCAL|RTLD_DEEPBIND (a new inode and
// path: the loader cannot take it for an object it already has) and
// removes the file, which the mapping keeps alive.
func dlopenPrivate(src, tag string) (uintptr, error) {
	in, err := os.Open(src)
	if err != nil {
		return 0, fmt.Errorf("copy library: %w", err)
	}
	defer in.Close()
	out, err := os.CreateTemp("", "glmtopo-nccl-"+fileSafe(tag)+"-*.so")
	if err != nil {
		return 0, fmt.Errorf("copy library %s: %w", src, err)
	}
	path := out.Name()
	defer os.Remove(path) // once mapped, the copy lives as long as the mapping
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, fmt.Errorf("copy library %s to %s: %w", src, path, err)
	}
	h, err := purego.Dlopen(path, purego.RTLD_NOW|purego.RTLD_LOCAL|rtldDeepBind)
	if err != nil {
		hint := "is TMPDIR mounted noexec?"
		if strings.Contains(err.Error(), "static TLS") {
			// Each copy takes its initial-exec thread-locals from glibc's
			// small static TLS surplus, which a process sizes at its start.
			hint = "start the process with GLIBC_TUNABLES=glibc.rtld.optional_static_tls=65536"
		}
		return 0, fmt.Errorf("open the copy of %s (%s): %w", src, hint, err)
	}
	return h, nil
}

// fileSafe keeps a name's letters, digits, '.', '-' and '_' for a file
// name and replaces the rest (a hostname may hold a '/').
func fileSafe(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '-', r == '_':
			return r
		}
		return '_'
	}, s)
}

// mappedFile is the file whose mapping holds addr (from /proc/self/maps):
// the libnccl the loader found, whichever way (by soname or by path).
func mappedFile(addr uintptr) (string, error) {
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		// start-end perms offset dev inode [path]
		fields := strings.SplitN(sc.Text(), " ", 6)
		if len(fields) < 6 {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if !ok || err1 != nil || err2 != nil || uint64(addr) < start || uint64(addr) >= end {
			continue
		}
		path := strings.TrimSpace(fields[5])
		if !strings.HasPrefix(path, "/") || strings.HasSuffix(path, " (deleted)") {
			return "", fmt.Errorf("address %#x is in %q, not a file that can be copied", addr, path)
		}
		return path, nil
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read /proc/self/maps: %w", err)
	}
	return "", errors.New("no mapping holds the library's code")
}
