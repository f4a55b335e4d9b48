package cuda

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"
)

// nvrtc compiles the embedded .cu sources for the device at start-up.
type nvrtc struct {
	version string

	nvrtcVersion           func(major, minor *int32) int32
	nvrtcCreateProgram     func(p *uintptr, src string, name string, nh int32, headers, names uintptr) int32
	nvrtcCompileProgram    func(p uintptr, n int32, opts unsafe.Pointer) int32
	nvrtcGetCUBINSize      func(p uintptr, n *uintptr) int32
	nvrtcGetCUBIN          func(p uintptr, out unsafe.Pointer) int32
	nvrtcGetProgramLogSize func(p uintptr, n *uintptr) int32
	nvrtcGetProgramLog     func(p uintptr, out unsafe.Pointer) int32
	nvrtcDestroyProgram    func(p *uintptr) int32
	nvrtcGetErrorString    func(res int32) string
}

var (
	nvrtcOnce sync.Once
	nvrtcVal  *nvrtc
	nvrtcErr  error
)

func loadNVRTC() (*nvrtc, error) {
	nvrtcOnce.Do(func() { nvrtcVal, nvrtcErr = openNVRTC() })
	return nvrtcVal, nvrtcErr
}

func openNVRTC() (*nvrtc, error) {
	lib, name, err := openLib("NVRTC (libnvrtc.so, the CUDA run-time compiler)", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so")
	if err != nil {
		return nil, err
	}
	n := &nvrtc{}
	fns := []struct {
		fptr any
		name string
	}{
		{&n.nvrtcVersion, "nvrtcVersion"}, {&n.nvrtcCreateProgram, "nvrtcCreateProgram"},
		{&n.nvrtcCompileProgram, "nvrtcCompileProgram"}, {&n.nvrtcGetCUBINSize, "nvrtcGetCUBINSize"},
		{&n.nvrtcGetCUBIN, "nvrtcGetCUBIN"}, {&n.nvrtcGetProgramLogSize, "nvrtcGetProgramLogSize"},
		{&n.nvrtcGetProgramLog, "nvrtcGetProgramLog"}, {&n.nvrtcDestroyProgram, "nvrtcDestroyProgram"},
		{&n.nvrtcGetErrorString, "nvrtcGetErrorString"},
	}
	for _, f := range fns {
		p, err := sym(lib, name, f.name)
		if err != nil {
			return nil, err
		}
		purego.RegisterFunc(f.fptr, p)
	}
	var maj, min int32
	n.nvrtcVersion(&maj, &min)
	n.version = fmt.Sprintf("%d.%d", maj, min)
	return n, nil
}

// compile builds src for sm_<arch> into a cubin.
func (n *nvrtc) compile(name, src string, opts []string) ([]byte, error) {
	cubin, _, err := n.compileLog(name, src, opts)
	return cubin, err
}

// compileLog is compile that also returns the compiler's log (ptxas'
// resource usage with --ptxas-options=-v).
func (n *nvrtc) compileLog(name, src string, opts []string) ([]byte, string, error) {
	var prog uintptr
	if r := n.nvrtcCreateProgram(&prog, src, name, 0, 0, 0); r != 0 {
		return nil, "", fmt.Errorf("nvrtc: create %s: %s", name, n.nvrtcGetErrorString(r))
	}
	defer n.nvrtcDestroyProgram(&prog)
	cstrs := make([][]byte, len(opts))
	ptrs := make([]*byte, len(opts))
	for i, o := range opts {
		cstrs[i] = append([]byte(o), 0)
		ptrs[i] = &cstrs[i][0]
	}
	r := n.nvrtcCompileProgram(prog, int32(len(ptrs)), unsafe.Pointer(&ptrs[0]))
	var lsz uintptr
	n.nvrtcGetProgramLogSize(prog, &lsz)
	logb := make([]byte, lsz+1)
	n.nvrtcGetProgramLog(prog, unsafe.Pointer(&logb[0]))
	log := strings.TrimRight(string(logb), "\x00\n")
	if r != 0 {
		return nil, "", fmt.Errorf("nvrtc: compile %s (%s): %s\n%s", name, strings.Join(opts, " "),
			n.nvrtcGetErrorString(r), log)
	}
	var sz uintptr
	if r := n.nvrtcGetCUBINSize(prog, &sz); r != 0 || sz == 0 {
		return nil, "", fmt.Errorf("nvrtc: %s: no cubin (%s)", name, n.nvrtcGetErrorString(r))
	}
	out := make([]byte, sz)
	if r := n.nvrtcGetCUBIN(prog, unsafe.Pointer(&out[0])); r != 0 {
		return nil, "", fmt.Errorf("nvrtc: %s: get cubin: %s", name, n.nvrtcGetErrorString(r))
	}
	return out, log, nil
}

// cacheDirEnv overrides where compiled kernels are kept.
const cacheDirEnv = "GLMTOPO_CUDA_CACHE"

func kernelCacheDir() string {
	if d := os.Getenv(cacheDirEnv); d != "" {
		return d
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "glmtopo", "cuda")
	}
	return filepath.Join(os.TempDir(), "glmtopo-cuda")
}

// cachedCubin compiles src, or returns the cubin compiled earlier for the
// same source, options, architecture, NVRTC and driver. A corrupt or
// unwritable cache only costs a compile.
func cachedCubin(n *nvrtc, driverVersion int32, name, src string, opts []string) ([]byte, bool, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00nvrtc %s\x00driver %d\x00", name, strings.Join(opts, "\x01"), n.version, driverVersion)
	h.Write([]byte(src))
	key := hex.EncodeToString(h.Sum(nil))[:32]
	dir := kernelCacheDir()
	path := filepath.Join(dir, name+"-"+key+".cubin")
	if b, err := os.ReadFile(path); err == nil && len(b) > 0 {
		return b, true, nil
	}
	cubin, err := n.compile(name, src, opts)
	if err != nil {
		return nil, false, err
	}
	if os.MkdirAll(dir, 0o755) == nil {
		tmp := path + fmt.Sprintf(".tmp%d", os.Getpid())
		if os.WriteFile(tmp, cubin, 0o644) == nil {
			os.Rename(tmp, path)
		}
	}
	return cubin, false, nil
}
