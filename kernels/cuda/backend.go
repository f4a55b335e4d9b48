// Package cuda runs GLM-4.5's kernels on NVIDIA GPUs. It needs no cgo: the
// CUDA driver, NVRTC and cuBLAS are loaded at run time through purego, and
// the kernels are embedded .cu sources compiled by NVRTC for the device's
// architecture at start-up (cached on disk). On a machine without CUDA, New
// returns an error wrapping ErrNoCUDA.
package cuda

import (
	"embed"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"runtime"
	"strings"
	"unsafe"

	"github.com/glmtopo/glmtopo/kernels"
)

//go:embed src/common.cuh src/ops.cu src/moe.cu src/mma.cu src/gemv.cu src/wgemv.cu src/sample.cu src/replica.cu src/attention.cu src/flash.cu
var srcFS embed.FS

func source(names ...string) string {
	var sb strings.Builder
	for _, n := range names {
		b, err := srcFS.ReadFile("src/" + n)
		if err != nil {
			panic(err) // embedded at build time
		}
		sb.Write(b)
		sb.WriteByte('\n')
	}
	return sb.String()
}

// definesEnv names the environment variable with extra NVRTC -D options.
const definesEnv = "GLMTOPO_CUDA_DEFINES"

// Options configure a Backend.
type Options struct {
	Device int          // CUDA device ordinal
	Logger *slog.Logger // nil: slog.Default()
	// GemvMaxTokens is the widest batch the weight-only GEMV kernels take;
	// wider ones go to cuBLAS (when loaded). 0 means 16.
	GemvMaxTokens int
	// NoCublas disables cuBLAS (every Linear runs on the GEMV kernels).
	NoCublas bool
	// FastWideGemm rounds activations to bf16 once for cuBLAS GEMMs (wide
	// batches: prefill) instead of splitting them in two bf16 halves: half
	// the FLOPs, ~3 fewer digits, as vLLM and SGLang run. The commands turn
	// it on (--fast-gemm, default true); the zero Options keep the exact
	// halves that the CPU-reference comparisons need: on the golden fixtures
	// the rounding flips near-tied expert choices (logits off by up to 0.27 on
	// tiny_qknorm's 64-token prompt, H200 2026-11-27), past the 2e-2 bound.
	FastWideGemm bool
	// NoTensorCoreAttention keeps bf16 caches on the CUDA-core attention kernel.
	NoTensorCoreAttention bool
	// NoFlashAttention runs bf16-cache prefill on the per-q-head tensor-core
	// kernel (K/V re-read for each q head of a group) instead of the
	// flash-attention kernel that serves a whole GQA group per K/V tile.
	NoFlashAttention bool
	// NoTensorCoreGemv keeps narrow-batch bf16/FP8 GEMVs on the CUDA cores.
	NoTensorCoreGemv bool
	// BlockGemv runs narrow-batch GEMVs on the earlier tensor-core kernels
	// (8 warps of a block split K and reduce through shared memory, e4m3
	// widened to bf16 on the CUDA cores) instead of the streamed per-warp
	// kernels (src/gemv.cu); kept for A/B measurements.
	BlockGemv bool
	// ExactFP8Activations gives the e4m3 GEMVs a second f16 plane of
	// activation residues (~22 bits of each activation instead of 11):
	// twice their tensor-core work and activation reads, for comparisons
	// with the f32 CPU reference.
	ExactFP8Activations bool
	// NoPDL launches eager kernels without programmatic dependent launch
	// (on Hopper and later each kernel is otherwise allowed to start while
	// its predecessor drains, waiting for its results in its first
	// instruction; captured graphs never use it); kept for A/B measurements.
	NoPDL bool
	// NoWideGemv keeps e4m3 Linear layers of up to 64 tokens on the streamed
	// kernel (16 tokens per pass) instead of wg_linear_fp8; for A/B runs.
	NoWideGemv bool
	// PageableUploads copies weights from pageable host memory instead of
	// page-locking each one for the copy (cuMemHostRegister); for A/B runs.
	PageableUploads bool
	// WideGemvMinTokens is the narrowest batch of an e4m3 Linear layer that
	// takes wg_linear_fp8 (default 17: at 16 tokens the streamed kernel's
	// one pass was faster, Air fp8 batch 16 57.9% vs 55.5% of the floor, H200).
	WideGemvMinTokens int
	// HostSampling sends rows with a temperature or banned ids to the CPU
	// sampler (logits downloaded) instead of sample_rows; for A/B runs.
	HostSampling bool
}

// opsSource is the ops module: every kernel but attention's (compiled per
// head geometry).
func opsSource() string {
	return source("common.cuh", "ops.cu", "moe.cu", "mma.cu", "gemv.cu", "wgemv.cu", "sample.cu", "replica.cu")
}

// Backend is one GPU: its primary context, one stream, a caching allocator
// and the compiled kernels. Methods lock the calling goroutine to its OS
// thread and make the context current for their duration, so a Backend may
// be driven from any goroutine, one at a time (it is not safe for concurrent use).
type Backend struct {
	d    *driver
	nv   *nvrtc
	blas *cublas
	log  *slog.Logger
	opt  Options

	dev           int32
	ctx, stream   uintptr
	name, arch    string
	sms           int
	driverVersion int32
	totalMem      uintptr

	pool     *pool
	mods     map[string]uintptr
	fns      map[string]uintptr
	resident map[string]int
	errFlag  *buf
	blasWS   *buf
	// sgCounters are the streamed GEMVs' split-K arrival counters, then
	// argmax_split's per row (zero between kernels: the last arrival resets).
	sgCounters *buf
	smemOptin  int32 // shared memory a block may opt in to (0: not read yet)

	argVals [40]uint64
	argPtrs [40]uintptr
	// pdl: kernels launch with programmatic stream serialization (sm_90+,
	// driver with cuLaunchKernelEx, not Options.NoPDL); launchCfg and
	// launchAttr are the launch's argument memory.
	pdl        bool
	launchCfg  launchConfig
	launchAttr launchAttribute

	metas    [4]*buf
	metaNext int
	pinned   map[unsafe.Pointer]int // PinHost's page-locked host buffers: address → bytes
	experts  map[expertKey]*expertTable

	// RouteObserver, when set, receives every Route's expert ids (it
	// synchronises the stream: for accounting runs, not timed ones).
	RouteObserver func(ids []int32, experts int)

	capturing bool
	// fp8Chunk is how many FP8 experts the wide MoE path expands at a time
	// (fp8ExpertsPerBatch; tests lower it to cover several chunks).
	fp8Chunk int
}

var (
	_ kernels.Backend = (*Backend)(nil)
	_ kernels.Filler  = (*Backend)(nil)
)

// New opens device opt.Device. It fails with an error wrapping ErrNoCUDA
// when the driver, NVRTC or a device is missing.
func New(opt Options) (*Backend, error) {
	d, err := loadDriver()
	if err != nil {
		return nil, err
	}
	nv, err := loadNVRTC()
	if err != nil {
		return nil, err
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	if opt.WideGemvMinTokens <= 0 {
		opt.WideGemvMinTokens = mmaMaxTokens + 1
	}
	if opt.GemvMaxTokens <= 0 {
		opt.GemvMaxTokens = 16
	}
	var n int32
	if err := d.check(d.cuDeviceGetCount(&n), "cuDeviceGetCount"); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoCUDA, err)
	}
	if opt.Device < 0 || int32(opt.Device) >= n {
		return nil, fmt.Errorf("%w: device %d requested, %d present", ErrNoCUDA, opt.Device, n)
	}
	b := &Backend{d: d, nv: nv, log: opt.Logger, opt: opt, mods: map[string]uintptr{}, fns: map[string]uintptr{}, resident: map[string]int{},
		experts: map[expertKey]*expertTable{}, fp8Chunk: fp8ExpertsPerBatch}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := b.open(); err != nil {
		b.closeLocked()
		return nil, err
	}
	return b, nil
}

func (b *Backend) open() error {
	d := b.d
	if err := d.check(d.cuDeviceGet(&b.dev, int32(b.opt.Device)), "cuDeviceGet"); err != nil {
		return err
	}
	nameBuf := make([]byte, 256)
	d.cuDeviceGetName(&nameBuf[0], int32(len(nameBuf)), b.dev)
	b.name = cString(&nameBuf[0])
	attr := func(a int32) int {
		var v int32
		d.cuDeviceGetAttribute(&v, a, b.dev)
		return int(v)
	}
	major, minor := attr(attrComputeCapMajor), attr(attrComputeCapMinor)
	if major < 8 {
		return fmt.Errorf("cuda: %s has compute capability %d.%d; glmtopo needs 8.0 or newer (bf16)", b.name, major, minor)
	}
	b.arch = fmt.Sprintf("sm_%d%d", major, minor)
	b.pdl = major >= 9 && d.launchKernelEx != 0 && !b.opt.NoPDL && os.Getenv("GLMTOPO_PDL") != "0"
	b.sms = attr(attrMultiprocessorCount)
	d.cuDriverGetVersion(&b.driverVersion)
	if err := d.check(d.cuDevicePrimaryCtxRetain(&b.ctx, b.dev), "cuDevicePrimaryCtxRetain"); err != nil {
		return err
	}
	if err := d.setCurrent(b.ctx); err != nil {
		return err
	}
	var free uintptr
	d.cuMemGetInfo(&free, &b.totalMem)
	if err := d.check(d.cuStreamCreate(&b.stream, 1 /* non-blocking */), "cuStreamCreate"); err != nil {
		return err
	}
	b.pool = newPool(d)
	var err error
	if b.errFlag, err = b.pool.alloc(4); err != nil {
		return err
	}
	if err := d.check(d.cuMemsetD32Async(b.errFlag.ptr, 0, 1, b.stream), "clear error flag"); err != nil {
		return err
	}
	if b.sgCounters, err = b.pool.alloc(4 * (sgMaxCounters + argmaxMaxRows)); err != nil {
		return err
	}
	if err := d.check(d.cuMemsetD32Async(b.sgCounters.ptr, 0, sgMaxCounters+argmaxMaxRows, b.stream), "clear gemv counters"); err != nil {
		return err
	}
	// GLMTOPO_CUDA_DEFINES (space-separated NAME=VALUE) overrides the kernels'
	// tuning macros, for sweeps on a new GPU without rebuilding.
	if err := b.loadModule("ops", opsSource(), strings.Fields(os.Getenv(definesEnv))); err != nil {
		return err
	}
	if !b.opt.NoCublas {
		const wsBytes = 32 << 20
		if b.blasWS, err = b.pool.alloc(wsBytes); err != nil {
			return err
		}
		if b.blas, err = openCublas(b.stream, b.blasWS.ptr, wsBytes); err != nil {
			b.log.Warn("cuda: cuBLAS unavailable; wide GEMMs run on the GEMV kernels", "err", err)
			b.blas = nil
		}
	}
	b.log.Info("cuda: device ready", "device", b.name, "arch", b.arch, "sms", b.sms,
		"memory_gib", float64(b.totalMem)/(1<<30), "driver", b.driverVersion, "nvrtc", b.nv.version, "cublas", b.blas != nil)
	return nil
}

// loadModule compiles (or takes from the disk cache) src and records its kernels.
func (b *Backend) loadModule(key, src string, defines []string) error {
	if _, ok := b.mods[key]; ok {
		return nil
	}
	opts := []string{"--gpu-architecture=" + b.arch, "--std=c++17", "-default-device"}
	for _, def := range defines {
		opts = append(opts, "-D"+def)
	}
	cubin, cached, err := cachedCubin(b.nv, b.driverVersion, key, src, opts)
	if err != nil {
		return err
	}
	var mod uintptr
	if err := b.d.check(b.d.cuModuleLoadData(&mod, unsafe.Pointer(&cubin[0])), "cuModuleLoadData "+key); err != nil {
		return err
	}
	b.mods[key] = mod
	b.log.Debug("cuda: module loaded", "module", key, "cached", cached, "bytes", len(cubin))
	return nil
}

// fn returns kernel name of module key.
func (b *Backend) fn(key, name string) (uintptr, error) {
	full := key + "/" + name
	if f, ok := b.fns[full]; ok {
		return f, nil
	}
	mod, ok := b.mods[key]
	if !ok {
		return 0, fmt.Errorf("cuda: module %s not loaded", key)
	}
	var f uintptr
	if err := b.d.check(b.d.cuModuleGetFunction(&f, mod, name), "cuModuleGetFunction "+name); err != nil {
		return 0, err
	}
	b.fns[full] = f
	return f, nil
}

// residentBlocks is how many blocks of kernel name (256 threads) fit on the
// whole GPU at once: the grid of a persistent kernel.
func (b *Backend) residentBlocks(key, name string) (int, error) {
	return b.residentBlocksOf(key, name, 256)
}

// residentBlocksOf is residentBlocks for blocks of threads threads.
func (b *Backend) residentBlocksOf(key, name string, threads int) (int, error) {
	full := fmt.Sprintf("%s/%s/%d", key, name, threads)
	if n, ok := b.resident[full]; ok {
		return n, nil
	}
	f, err := b.fn(key, name)
	if err != nil {
		return 0, err
	}
	var per int32
	if err := b.d.check(b.d.cuOccupancyMaxActiveBlocksPerMultiprocessor(&per, f, int32(threads), 0), "occupancy "+name); err != nil {
		return 0, err
	}
	n := max(1, int(per)) * b.sms
	b.resident[full] = n
	return n, nil
}

// enter locks the goroutine to its thread and makes the context current; leave undoes the lock.
func (b *Backend) enter() error {
	runtime.LockOSThread()
	if err := b.d.setCurrent(b.ctx); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	return nil
}

func (b *Backend) leave() { runtime.UnlockOSThread() }

// launch runs kernel name of module key. Arguments must have the kernel's
// C types: uintptr (pointers), int32 (int), int64 (long), float32, float64.
func (b *Backend) launch(key, name string, grid, block [3]uint32, smem uint32, args ...any) error {
	f, err := b.fn(key, name)
	if err != nil {
		return err
	}
	if len(args) > len(b.argVals) {
		return fmt.Errorf("cuda: %s: %d arguments", name, len(args))
	}
	for i, a := range args {
		var v uint64
		switch x := a.(type) {
		case uintptr:
			v = uint64(x)
		case int32:
			v = uint64(uint32(x))
		case int64:
			v = uint64(x)
		case uint64:
			v = x
		case float32:
			v = uint64(math.Float32bits(x))
		case float64:
			v = math.Float64bits(x)
		default:
			return fmt.Errorf("cuda: %s: argument %d has Go type %T", name, i, a)
		}
		b.argVals[i] = v
		b.argPtrs[i] = uintptr(unsafe.Pointer(&b.argVals[i]))
	}
	for i := range grid {
		if grid[i] == 0 {
			return nil // nothing to do
		}
	}
	var r int32
	// Eager steps only: inside captured decode graphs it measured slower
	// (H200, same binary: Air fp8 5.52 → 5.80 ms at batch 16, GLM-4.5 fp8
	// 9.38 → 9.73 ms at batch 64), eager steps faster (Air fp8 batch 1
	// 1.94 → 1.82 ms).
	if b.pdl && !b.capturing {
		b.launchAttr.id = launchAttrProgrammaticStreamSerialization
		b.launchAttr.val[0] = 1
		b.launchCfg = launchConfig{grid: grid, block: block, smem: smem, stream: b.stream, attrs: &b.launchAttr, numAttrs: 1}
		r = b.d.launchPDL(f, &b.launchCfg, unsafe.Pointer(&b.argPtrs[0]))
		if r == errInvalidValue {
			// A driver that refuses the attribute (the plain launch of the
			// same kernel works): launch plainly from now on.
			if r = b.d.launch(f, grid, block, smem, b.stream, unsafe.Pointer(&b.argPtrs[0])); r == 0 {
				slog.Warn("cuda: programmatic dependent launch refused; launching without it", "kernel", name)
				b.pdl = false
			}
		}
	} else {
		r = b.d.launch(f, grid, block, smem, b.stream, unsafe.Pointer(&b.argPtrs[0]))
	}
	runtime.KeepAlive(b)
	if r != 0 {
		return b.d.check(r, "launch "+name)
	}
	return nil
}

// grid1 sizes a grid-stride launch over n elements.
func grid1(n int64, threads int64) [3]uint32 {
	g := (n + threads - 1) / threads
	g = max(1, min(g, 1<<16))
	return [3]uint32{uint32(g), 1, 1}
}

func (b *Backend) Name() string { return fmt.Sprintf("cuda(%s, %s)", b.name, b.arch) }

// DeviceName is the GPU's marketing name ("NVIDIA H100 80GB HBM3").
func (b *Backend) DeviceName() string { return b.name }

// SMs is the number of streaming multiprocessors.
func (b *Backend) SMs() int { return b.sms }

// MemoryBytes is the device's total memory.
func (b *Backend) MemoryBytes() int64 { return int64(b.totalMem) }

func (b *Backend) Close() error {
	if err := b.enter(); err != nil {
		return err
	}
	defer b.leave()
	return b.closeLocked()
}

func (b *Backend) closeLocked() error {
	var errs []error
	if b.stream != 0 {
		errs = append(errs, b.d.check(b.d.cuStreamSynchronize(b.stream), "close: synchronize"))
	}
	b.unpinAll()
	if b.blas != nil {
		b.blas.cublasDestroy(b.blas.handle)
		b.blas = nil
	}
	for _, t := range b.experts {
		b.pool.put(t.dev)
	}
	b.experts = nil
	if b.pool != nil {
		for _, m := range b.metas {
			b.pool.put(m)
		}
		b.pool.put(b.errFlag)
		b.pool.put(b.sgCounters)
		b.pool.put(b.blasWS)
		errs = append(errs, b.pool.close())
	}
	if b.stream != 0 {
		b.d.cuStreamDestroy(b.stream)
		b.stream = 0
	}
	if b.ctx != 0 {
		b.d.cuDevicePrimaryCtxRelease(b.dev)
		b.ctx = 0
	}
	return errors.Join(errs...)
}
