package cuda

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"
)

// Device is one GPU's primary context for code that moves bytes rather than
// running kernels (transport: NCCL buffers, page-locked staging): raw
// allocations, streams, events, async copies and page-locked host memory.
// It needs only the driver (no NVRTC). Every method runs with the context
// current on a locked OS thread, so it may be called from any goroutine.
type Device struct {
	d       *driver
	x       *deviceExtras
	ctx     uintptr
	dev     int32
	ordinal int
}

// deviceExtras are driver calls only Device uses.
type deviceExtras struct {
	cuStreamQuery  func(s uintptr) int32
	cuEventQuery   func(e uintptr) int32
	cuMemHostAlloc func(p *unsafe.Pointer, n uintptr, flags uint32) int32
	cuMemFreeHost  func(p unsafe.Pointer) int32
	cuMemcpyHtoD   func(dst uintptr, src unsafe.Pointer, n uintptr) int32
	cuMemcpyDtoH   func(dst unsafe.Pointer, src uintptr, n uintptr) int32
}

var (
	extrasOnce sync.Once
	extrasVal  *deviceExtras
	extrasErr  error
)

func loadExtras(d *driver) (*deviceExtras, error) {
	extrasOnce.Do(func() {
		x := &deviceExtras{}
		for _, f := range []struct {
			fptr any
			name string
		}{
			{&x.cuStreamQuery, "cuStreamQuery"}, {&x.cuEventQuery, "cuEventQuery"},
			{&x.cuMemHostAlloc, "cuMemHostAlloc"}, {&x.cuMemFreeHost, "cuMemFreeHost"},
			{&x.cuMemcpyHtoD, "cuMemcpyHtoD_v2"}, {&x.cuMemcpyDtoH, "cuMemcpyDtoH_v2"},
		} {
			p, err := sym(d.lib, "libcuda", f.name)
			if err != nil {
				extrasErr = err
				return
			}
			purego.RegisterFunc(f.fptr, p)
		}
		extrasVal = x
	})
	return extrasVal, extrasErr
}

// errNotReady is CUDA_ERROR_NOT_READY (a stream or event still running).
const errNotReady = 600

// OpenDevice retains device ordinal's primary context (the one the CUDA
// runtime, and so NCCL, uses).
func OpenDevice(ordinal int) (*Device, error) {
	d, err := loadDriver()
	if err != nil {
		return nil, err
	}
	x, err := loadExtras(d)
	if err != nil {
		return nil, err
	}
	var n int32
	if err := d.check(d.cuDeviceGetCount(&n), "cuDeviceGetCount"); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoCUDA, err)
	}
	if ordinal < 0 || int32(ordinal) >= n {
		return nil, fmt.Errorf("%w: device %d requested, %d present", ErrNoCUDA, ordinal, n)
	}
	g := &Device{d: d, x: x, ordinal: ordinal}
	if err := d.check(d.cuDeviceGet(&g.dev, int32(ordinal)), "cuDeviceGet"); err != nil {
		return nil, err
	}
	if err := d.check(d.cuDevicePrimaryCtxRetain(&g.ctx, g.dev), "cuDevicePrimaryCtxRetain"); err != nil {
		return nil, err
	}
	return g, nil
}

// Ordinal is the device's index.
func (g *Device) Ordinal() int { return g.ordinal }

// Do runs fn on a locked OS thread with the device's context current: for
// foreign libraries (NCCL) that use the calling thread's context.
func (g *Device) Do(fn func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := g.d.setCurrent(g.ctx); err != nil {
		return err
	}
	return fn()
}

func (g *Device) call(what string, fn func() int32) error {
	return g.Do(func() error { return g.d.check(fn(), what) })
}

// Alloc allocates n bytes of device memory.
func (g *Device) Alloc(n int64) (uintptr, error) {
	var p uintptr
	err := g.call("cuMemAlloc", func() int32 { return g.d.cuMemAlloc(&p, uintptr(max(n, 1))) })
	return p, err
}

// Free frees an Alloc'd pointer.
func (g *Device) Free(p uintptr) error {
	return g.call("cuMemFree", func() int32 { return g.d.cuMemFree(p) })
}

// NewStream creates a non-blocking stream.
func (g *Device) NewStream() (uintptr, error) {
	var s uintptr
	err := g.call("cuStreamCreate", func() int32 { return g.d.cuStreamCreate(&s, 1) })
	return s, err
}

// DestroyStream destroys a stream.
func (g *Device) DestroyStream(s uintptr) error {
	return g.call("cuStreamDestroy", func() int32 { return g.d.cuStreamDestroy(s) })
}

// StreamDone reports whether all work queued on s has finished.
func (g *Device) StreamDone(s uintptr) (bool, error) {
	var r int32
	g.Do(func() error { r = g.x.cuStreamQuery(s); return nil })
	if r == errNotReady {
		return false, nil
	}
	return r == 0, g.d.check(r, "cuStreamQuery")
}

// SyncStream waits for s.
func (g *Device) SyncStream(s uintptr) error {
	return g.call("cuStreamSynchronize", func() int32 { return g.d.cuStreamSynchronize(s) })
}

// HostAlloc returns n bytes of page-locked host memory (outside the Go heap),
// which async copies need to overlap.
func (g *Device) HostAlloc(n int) ([]byte, error) {
	var p unsafe.Pointer
	const portable = 1 // CU_MEMHOSTALLOC_PORTABLE
	if err := g.call("cuMemHostAlloc", func() int32 { return g.x.cuMemHostAlloc(&p, uintptr(max(n, 1)), portable) }); err != nil {
		return nil, err
	}
	return unsafe.Slice((*byte)(p), n), nil
}

// HostFree frees HostAlloc'd memory.
func (g *Device) HostFree(b []byte) error {
	if cap(b) == 0 {
		return nil
	}
	return g.call("cuMemFreeHost", func() int32 { return g.x.cuMemFreeHost(unsafe.Pointer(unsafe.SliceData(b))) })
}

// CopyToDeviceAsync queues a copy of src (page-locked for overlap) to dst on s.
func (g *Device) CopyToDeviceAsync(dst uintptr, src []byte, s uintptr) error {
	if len(src) == 0 {
		return nil
	}
	return g.call("cuMemcpyHtoDAsync", func() int32 {
		return g.d.cuMemcpyHtoDAsync(dst, unsafe.Pointer(unsafe.SliceData(src)), uintptr(len(src)), s)
	})
}

// CopyToHostAsync queues a copy of len(dst) bytes from src to dst on s.
func (g *Device) CopyToHostAsync(dst []byte, src uintptr, s uintptr) error {
	if len(dst) == 0 {
		return nil
	}
	return g.call("cuMemcpyDtoHAsync", func() int32 {
		return g.d.cuMemcpyDtoHAsync(unsafe.Pointer(unsafe.SliceData(dst)), src, uintptr(len(dst)), s)
	})
}

// CopyToDevice copies src to dst (any host memory) and returns once dst
// holds it. Not cuMemcpyHtoD: from pageable memory that returns once src is
// staged, before the DMA lands, and a kernel on a non-blocking stream (an
// NCCL collective in the two-rank test) then read the buffer's old bytes.
func (g *Device) CopyToDevice(dst uintptr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	return g.call("cuMemcpyHtoD", func() int32 {
		if r := g.d.cuMemcpyHtoDAsync(dst, unsafe.Pointer(unsafe.SliceData(src)), uintptr(len(src)), 0); r != 0 {
			return r
		}
		return g.d.cuStreamSynchronize(0)
	})
}

// CopyToHost copies len(dst) bytes from src synchronously.
func (g *Device) CopyToHost(dst []byte, src uintptr) error {
	if len(dst) == 0 {
		return nil
	}
	return g.call("cuMemcpyDtoH", func() int32 {
		return g.x.cuMemcpyDtoH(unsafe.Pointer(unsafe.SliceData(dst)), src, uintptr(len(dst)))
	})
}

// NewEvent creates an event without timing (cheapest to record and wait on).
func (g *Device) NewEvent() (uintptr, error) {
	var e uintptr
	const disableTiming = 2
	err := g.call("cuEventCreate", func() int32 { return g.d.cuEventCreate(&e, disableTiming) })
	return e, err
}

// RecordEvent records e on s.
func (g *Device) RecordEvent(e, s uintptr) error {
	return g.call("cuEventRecord", func() int32 {
		r, _, _ := purego.SyscallN(g.d.eventRecord, e, s)
		return int32(r)
	})
}

// SyncEvent waits for e.
func (g *Device) SyncEvent(e uintptr) error {
	return g.call("cuEventSynchronize", func() int32 { return g.d.cuEventSynchronize(e) })
}

// DestroyEvent destroys e.
func (g *Device) DestroyEvent(e uintptr) error {
	return g.call("cuEventDestroy", func() int32 { return g.d.cuEventDestroy(e) })
}

// Close releases the primary context.
func (g *Device) Close() error {
	return g.d.check(g.d.cuDevicePrimaryCtxRelease(g.dev), "cuDevicePrimaryCtxRelease")
}
