package cuda

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/ebitengine/purego"
)

// ErrNoCUDA means the CUDA driver or a CUDA library could not be loaded on
// this machine. Callers (and tests) use errors.Is(err, ErrNoCUDA) to fall
// back to the CPU backend or to skip.
var ErrNoCUDA = errors.New("cuda: not available")

// libDirsEnv names extra directories (colon-separated) searched first for
// CUDA libraries, for installs outside the loader's path.
const libDirsEnv = "GLMTOPO_CUDA_LIB_DIRS"

// searchDirs are the places CUDA toolkits and the pip wheels usually put
// their libraries; the dynamic loader's own path is tried first.
func searchDirs() []string {
	var dirs []string
	if v := os.Getenv(libDirsEnv); v != "" {
		dirs = append(dirs, filepath.SplitList(v)...)
	}
	if v := os.Getenv("CUDA_HOME"); v != "" {
		dirs = append(dirs, filepath.Join(v, "lib64"), filepath.Join(v, "lib"))
	}
	globs := []string{
		"/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib",
		"/usr/local/cuda-*/lib64", "/usr/local/cuda-*/targets/x86_64-linux/lib",
		"/usr/lib/x86_64-linux-gnu", "/usr/local/nvidia/lib64", "/usr/lib64",
		"/opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib",
		"/opt/*/.venv/lib/python3*/site-packages/nvidia/cu*/lib",
		"/usr/local/lib/python3*/dist-packages/nvidia/*/lib",
		"/usr/local/lib/python3*/dist-packages/nvidia/cu*/lib",
	}
	for _, g := range globs {
		m, _ := filepath.Glob(g)
		sort.Sort(sort.Reverse(sort.StringSlice(m))) // newest versions first
		dirs = append(dirs, m...)
	}
	return dirs
}

// openLib loads the first of names that dlopen accepts, by bare name (the
// loader's path) and then in searchDirs, also matching versioned sonames
// (libnvrtc.so.13.0.88). The error names every library and place tried.
func openLib(what string, names ...string) (uintptr, string, error) {
	var tried []string
	for _, n := range names {
		h, err := purego.Dlopen(n, purego.RTLD_NOW|purego.RTLD_GLOBAL)
		if err == nil {
			return h, n, nil
		}
		tried = append(tried, n)
	}
	for _, d := range searchDirs() {
		for _, n := range names {
			cands, _ := filepath.Glob(filepath.Join(d, n+"*"))
			sort.Strings(cands)
			for _, p := range cands {
				h, err := purego.Dlopen(p, purego.RTLD_NOW|purego.RTLD_GLOBAL)
				if err == nil {
					return h, p, nil
				}
				tried = append(tried, p+": "+err.Error())
			}
		}
	}
	return 0, "", fmt.Errorf("%w: cannot load %s (tried %s; set %s to its directory)",
		ErrNoCUDA, what, strings.Join(tried, ", "), libDirsEnv)
}

// sym resolves a symbol or returns an error naming the library.
func sym(lib uintptr, libName, name string) (uintptr, error) {
	p, err := purego.Dlsym(lib, name)
	if err != nil {
		return 0, fmt.Errorf("%w: %s has no symbol %s (library too old?)", ErrNoCUDA, libName, name)
	}
	return p, nil
}

// symbols resolves a table of name → *uintptr.
func symbols(lib uintptr, libName string, table map[string]*uintptr) error {
	for name, dst := range table {
		p, err := sym(lib, libName, name)
		if err != nil {
			return err
		}
		*dst = p
	}
	return nil
}
