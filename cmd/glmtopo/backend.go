package main

import (
	"flag"
	"fmt"
	"runtime"
	"strconv"
	"strings"

	"github.com/shirou/gopsutil/v4/mem"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cpu"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/model"
	"github.com/glmtopo/glmtopo/parallel"
	"github.com/glmtopo/glmtopo/parallel/tp"
)

// backendFlags are the flags of the commands that run the model.
type backendFlags struct {
	device   *string
	fastGemm *bool
	tp       *int
	ep       *bool
	dispatch *string
}

func addBackendFlags(fs *flag.FlagSet) backendFlags {
	return backendFlags{
		device: fs.String("device", "cpu", "backend: cpu, cuda or cuda:N"),
		fastGemm: fs.Bool("fast-gemm", true, "cuda: round activations to bf16 once in prefill GEMMs, as vLLM and SGLang run; "+
			"false: two bf16 halves (~f32, as the CPU reference; twice the GEMM FLOPs)"),
		tp: fs.Int("tensor-parallel-size", 1, "run the decoder layers on N ranks (as vLLM's): attention, dense MLP and shared expert split N ways, "+
			"routed experts too unless --enable-expert-parallel; cpu: N ranks in this process; cuda: rank r on GPU r, NCCL all-reduces"),
		ep: fs.Bool("enable-expert-parallel", false, "with --tensor-parallel-size N: whole routed experts in contiguous blocks on the N ranks instead of each split N ways (as vLLM's)"),
		dispatch: fs.String("expert-dispatch", tp.DispatchAllReduce, "with --enable-expert-parallel: how tokens reach the experts' ranks: "+
			"allreduce (every rank runs its experts on all tokens, one all-reduce sums) or alltoall (each rank routes its slice of the tokens, "+
			"all-to-all-v to the experts' ranks and back, then an all-gather; on GPUs in eager steps, decode's graphs keep allreduce)"),
	}
}

// ranks is the rank layout --tensor-parallel-size and --enable-expert-parallel ask for.
func (f backendFlags) ranks() (parallel.RankOptions, error) {
	n := *f.tp
	if err := f.checkDispatch(); err != nil {
		return parallel.RankOptions{}, err
	}
	switch {
	case n < 1:
		return parallel.RankOptions{}, fmt.Errorf("--tensor-parallel-size %d: want at least 1", n)
	case n == 1:
		return parallel.RankOptions{}, nil
	case *f.device == "cuda" || *f.device == "cuda:0":
		o, err := parallel.TensorParallelCUDA(n, *f.ep, cuda.Options{FastWideGemm: *f.fastGemm}, nil)
		o.Dispatch = *f.dispatch
		return o, err
	case *f.device != "cpu":
		return parallel.RankOptions{}, fmt.Errorf("--tensor-parallel-size %d on --device %s: the ranks take GPUs 0..%d (pick them with CUDA_VISIBLE_DEVICES and --device cuda); --device cpu runs %d ranks in this process", n, *f.device, n-1, n)
	}
	workers := max(1, runtime.GOMAXPROCS(0)/n) // the ranks run at once: share the cores
	o := parallel.TensorParallel(n, *f.ep, func(int) (kernels.Backend, error) { return cpu.New(workers), nil })
	o.Dispatch = *f.dispatch
	return o, nil
}

// checkDispatch refuses --expert-dispatch values, and alltoall where it
// cannot run: without expert parallelism. (On GPU ranks it serves the
// eager steps; the decode graphs keep the all-reduce.)
func (f backendFlags) checkDispatch() error {
	switch d := *f.dispatch; {
	case d == tp.DispatchAllReduce:
		return nil
	case d != tp.DispatchAllToAll:
		return fmt.Errorf("--expert-dispatch %q: want %s or %s", d, tp.DispatchAllReduce, tp.DispatchAllToAll)
	case !*f.ep || *f.tp < 2:
		return fmt.Errorf("--expert-dispatch %s needs --enable-expert-parallel with --tensor-parallel-size of 2 or more", d)
	}
	return nil
}

// open opens "cpu" or "cuda[:N]" and says which KV cache dtype it takes.
func (f backendFlags) open() (kernels.Backend, kernels.DType, error) {
	device := *f.device
	switch {
	case device == "cpu":
		return cpu.New(0), kernels.F32, nil
	case device == "cuda" || strings.HasPrefix(device, "cuda:"):
		n := 0
		if _, idx, ok := strings.Cut(device, ":"); ok {
			v, err := strconv.Atoi(idx)
			if err != nil || v < 0 {
				return nil, 0, fmt.Errorf("--device %q: want cuda:N", device)
			}
			n = v
		}
		be, err := cuda.New(cuda.Options{Device: n, FastWideGemm: *f.fastGemm})
		if err != nil {
			return nil, 0, err
		}
		return be, kernels.BF16, nil
	}
	return nil, 0, fmt.Errorf("--device %q: want cpu, cuda or cuda:N", device)
}

// checkHostMemory refuses, before anything is allocated, a model whose
// weights cannot fit this host's memory on a backend without a memory check
// of its own (the CPU; GPU backends check their device's memory).
func checkHostMemory(be kernels.Backend, src parallel.ModelSource) error {
	if _, ok := be.(kernels.MemoryManager); ok {
		return nil
	}
	cfg, err := src.Config()
	if err != nil {
		return err
	}
	vm, err := mem.VirtualMemory()
	if err != nil {
		return nil // unknown: the load itself will tell
	}
	return model.CheckHostMemory(cfg, int64(vm.Available))
}
