package cuda

import (
	"fmt"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"
)

// driver holds the CUDA driver API entry points (libcuda.so.1). Calls that
// run once per operation (launch, context switch) go through SyscallN; the
// rest through purego's typed wrappers, which keep Go pointers alive.
type driver struct {
	lib uintptr

	launchKernel, ctxSetCurrent, graphLaunch, eventRecord uintptr
	launchKernelEx                                        uintptr // 0 where the driver lacks it (before CUDA 12)

	cuInit                                      func(flags uint32) int32
	cuDriverGetVersion                          func(v *int32) int32
	cuDeviceGetCount                            func(n *int32) int32
	cuDeviceGet                                 func(dev *int32, ordinal int32) int32
	cuDeviceGetName                             func(name *byte, n int32, dev int32) int32
	cuDeviceGetAttribute                        func(v *int32, attr int32, dev int32) int32
	cuDevicePrimaryCtxRetain                    func(ctx *uintptr, dev int32) int32
	cuDevicePrimaryCtxRelease                   func(dev int32) int32
	cuCtxSynchronize                            func() int32
	cuStreamCreate                              func(s *uintptr, flags uint32) int32
	cuStreamDestroy                             func(s uintptr) int32
	cuStreamSynchronize                         func(s uintptr) int32
	cuMemAlloc                                  func(p *uintptr, n uintptr) int32
	cuMemFree                                   func(p uintptr) int32
	cuMemGetInfo                                func(free, total *uintptr) int32
	cuMemcpyHtoDAsync                           func(dst uintptr, src unsafe.Pointer, n uintptr, s uintptr) int32
	cuMemcpyDtoHAsync                           func(dst unsafe.Pointer, src uintptr, n uintptr, s uintptr) int32
	cuMemcpyDtoDAsync                           func(dst, src uintptr, n uintptr, s uintptr) int32
	cuMemsetD32Async                            func(dst uintptr, v uint32, n uintptr, s uintptr) int32
	cuMemHostRegister                           func(p unsafe.Pointer, n uintptr, flags uint32) int32
	cuMemHostUnregister                         func(p unsafe.Pointer) int32
	cuModuleLoadData                            func(m *uintptr, image unsafe.Pointer) int32
	cuModuleGetFunction                         func(f *uintptr, m uintptr, name string) int32
	cuFuncSetAttribute                          func(f uintptr, attr int32, v int32) int32
	cuOccupancyMaxActiveBlocksPerMultiprocessor func(n *int32, f uintptr, block int32, smem uintptr) int32
	cuEventCreate                               func(e *uintptr, flags uint32) int32
	cuEventDestroy                              func(e uintptr) int32
	cuEventSynchronize                          func(e uintptr) int32
	cuEventElapsedTime                          func(ms *float32, start, end uintptr) int32
	cuGetErrorName                              func(res int32, s **byte) int32
	cuGetErrorString                            func(res int32, s **byte) int32
	cuStreamBeginCapture                        func(s uintptr, mode int32) int32
	cuStreamEndCapture                          func(s uintptr, g *uintptr) int32
	cuGraphInstantiate                          func(exec *uintptr, g uintptr, flags uint64) int32
	cuGraphExecDestroy                          func(exec uintptr) int32
	cuGraphDestroy                              func(g uintptr) int32
}

var (
	driverOnce sync.Once
	driverVal  *driver
	driverErr  error
)

// loadDriver opens libcuda once per process and runs cuInit.
func loadDriver() (*driver, error) {
	driverOnce.Do(func() { driverVal, driverErr = openDriver() })
	return driverVal, driverErr
}

func openDriver() (*driver, error) {
	lib, name, err := openLib("the CUDA driver (libcuda.so.1; is the NVIDIA driver installed?)", "libcuda.so.1", "libcuda.so")
	if err != nil {
		return nil, err
	}
	d := &driver{lib: lib}
	if err := symbols(lib, name, map[string]*uintptr{
		"cuLaunchKernel": &d.launchKernel, "cuCtxSetCurrent": &d.ctxSetCurrent,
		"cuGraphLaunch": &d.graphLaunch, "cuEventRecord": &d.eventRecord,
	}); err != nil {
		return nil, err
	}
	if p, err := sym(lib, name, "cuLaunchKernelEx"); err == nil {
		d.launchKernelEx = p
	}
	fns := []struct {
		fptr any
		name string
	}{
		{&d.cuInit, "cuInit"}, {&d.cuDriverGetVersion, "cuDriverGetVersion"},
		{&d.cuDeviceGetCount, "cuDeviceGetCount"}, {&d.cuDeviceGet, "cuDeviceGet"},
		{&d.cuDeviceGetName, "cuDeviceGetName"}, {&d.cuDeviceGetAttribute, "cuDeviceGetAttribute"},
		{&d.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain"},
		{&d.cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2"},
		{&d.cuCtxSynchronize, "cuCtxSynchronize"},
		{&d.cuStreamCreate, "cuStreamCreate"}, {&d.cuStreamDestroy, "cuStreamDestroy_v2"},
		{&d.cuStreamSynchronize, "cuStreamSynchronize"},
		{&d.cuMemAlloc, "cuMemAlloc_v2"}, {&d.cuMemFree, "cuMemFree_v2"}, {&d.cuMemGetInfo, "cuMemGetInfo_v2"},
		{&d.cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2"}, {&d.cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2"},
		{&d.cuMemcpyDtoDAsync, "cuMemcpyDtoDAsync_v2"}, {&d.cuMemsetD32Async, "cuMemsetD32Async"},
		{&d.cuMemHostRegister, "cuMemHostRegister_v2"}, {&d.cuMemHostUnregister, "cuMemHostUnregister"},
		{&d.cuModuleLoadData, "cuModuleLoadData"}, {&d.cuModuleGetFunction, "cuModuleGetFunction"},
		{&d.cuFuncSetAttribute, "cuFuncSetAttribute"},
		{&d.cuOccupancyMaxActiveBlocksPerMultiprocessor, "cuOccupancyMaxActiveBlocksPerMultiprocessor"},
		{&d.cuEventCreate, "cuEventCreate"}, {&d.cuEventDestroy, "cuEventDestroy_v2"},
		{&d.cuEventSynchronize, "cuEventSynchronize"}, {&d.cuEventElapsedTime, "cuEventElapsedTime"},
		{&d.cuGetErrorName, "cuGetErrorName"}, {&d.cuGetErrorString, "cuGetErrorString"},
		{&d.cuStreamBeginCapture, "cuStreamBeginCapture_v2"}, {&d.cuStreamEndCapture, "cuStreamEndCapture"},
		{&d.cuGraphInstantiate, "cuGraphInstantiateWithFlags"}, {&d.cuGraphExecDestroy, "cuGraphExecDestroy"},
		{&d.cuGraphDestroy, "cuGraphDestroy"},
	}
	for _, f := range fns {
		p, err := sym(lib, name, f.name)
		if err != nil {
			return nil, err
		}
		purego.RegisterFunc(f.fptr, p)
	}
	if err := d.check(d.cuInit(0), "cuInit"); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoCUDA, err)
	}
	return d, nil
}

// cString reads a NUL-terminated C string.
func cString(p *byte) string {
	if p == nil {
		return ""
	}
	var n int
	for *(*byte)(unsafe.Add(unsafe.Pointer(p), n)) != 0 {
		n++
	}
	return string(unsafe.Slice(p, n))
}

// check turns a CUresult into an error naming the call.
func (d *driver) check(res int32, what string) error {
	if res == 0 {
		return nil
	}
	var name, desc *byte
	d.cuGetErrorName(res, &name)
	d.cuGetErrorString(res, &desc)
	return fmt.Errorf("cuda: %s: %s (%d): %s", what, cString(name), res, cString(desc))
}

// setCurrent makes ctx current on the calling OS thread (locked by the caller).
func (d *driver) setCurrent(ctx uintptr) error {
	r, _, _ := purego.SyscallN(d.ctxSetCurrent, ctx)
	return d.check(int32(r), "cuCtxSetCurrent")
}

// launch runs cuLaunchKernel; params points at an array of argument pointers
// in memory the caller keeps alive and unmoved (a heap buffer).
func (d *driver) launch(f uintptr, grid, block [3]uint32, smem uint32, stream uintptr, params unsafe.Pointer) int32 {
	r, _, _ := purego.SyscallN(d.launchKernel, f,
		uintptr(grid[0]), uintptr(grid[1]), uintptr(grid[2]),
		uintptr(block[0]), uintptr(block[1]), uintptr(block[2]),
		uintptr(smem), stream, uintptr(params), 0)
	return int32(r)
}

// launchConfig mirrors CUlaunchConfig (cuda.h): grid, block, shared
// memory, stream and an attribute array.
type launchConfig struct {
	grid, block [3]uint32
	smem        uint32
	_           uint32
	stream      uintptr
	attrs       *launchAttribute
	numAttrs    uint32
	_           uint32
}

// launchAttribute mirrors CUlaunchAttribute: an id and a 64-byte value.
type launchAttribute struct {
	id  uint32
	_   uint32
	val [64]byte
}

// launchAttrProgrammaticStreamSerialization is
// CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: the kernel may
// launch before its predecessor in the stream completes (programmatic
// dependent launch); it must run griddepcontrol.wait before using that
// kernel's results, as every kernel here does first (pdl_start in common.cuh).
const launchAttrProgrammaticStreamSerialization = 6

// launchPDL runs cuLaunchKernelEx with cfg (which holds the PDL attribute);
// cfg and params live in memory the caller keeps alive and unmoved.
func (d *driver) launchPDL(f uintptr, cfg *launchConfig, params unsafe.Pointer) int32 {
	r, _, _ := purego.SyscallN(d.launchKernelEx, uintptr(unsafe.Pointer(cfg)), f, uintptr(params), 0)
	return int32(r)
}

// errInvalidValue is CUDA_ERROR_INVALID_VALUE.
const errInvalidValue = 1

// Device attributes used here (CUdevice_attribute).
const (
	attrMaxSharedPerBlockOptin = 97
	attrMultiprocessorCount    = 16
	attrComputeCapMajor        = 75
	attrComputeCapMinor        = 76
	attrL2CacheSize            = 38
	funcAttrMaxDynamicShared   = 8
)

func syscallN(fn uintptr, args ...uintptr) (uintptr, uintptr, uintptr) {
	return purego.SyscallN(fn, args...)
}
