package parallel

import (
	"fmt"
	"log/slog"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/kernels/cuda"
	"github.com/glmtopo/glmtopo/parallel/tp"
)

// TensorParallelCUDA is TensorParallel on this host's GPUs: rank r on GPU r
// (a CUDA backend of opt, Device set to r), the ranks' all-reduces over
// NCCL communicators (tp.NCCL) on the backends' streams. It refuses, before
// anything is loaded, when fewer than n GPUs are visible.
//
// EPLB replicas work on CUDA as on the CPU: a rank holding replicated
// experts masks its routes with one kernel per MoE layer (kernels'
// ReplicaMasker) over tables uploaded when the rank opens, so the decode
// graphs hold it; ranks without replicas skip it.
func TensorParallelCUDA(n int, expertParallel bool, opt cuda.Options, log *slog.Logger) (RankOptions, error) {
	if n < 1 {
		return RankOptions{}, fmt.Errorf("tensor-parallel size %d: want at least 1", n)
	}
	if err := checkGPUs(n); err != nil {
		return RankOptions{}, err
	}
	newBackend := func(r int) (kernels.Backend, error) {
		o := opt
		o.Device = r
		be, err := cuda.New(o)
		if err != nil {
			return nil, fmt.Errorf("GPU %d: %w", r, err)
		}
		return be, nil
	}
	o := TensorParallel(n, expertParallel, newBackend)
	o.ShareHead = true // rank 0 on the engine's GPU 0 backend: rows stay on the device
	o.Collectives = tp.NCCL(tp.NCCLOptions{Logger: log})
	return o, nil
}

// checkGPUs fails unless GPUs 0..n-1 are visible; the error says how many are.
func checkGPUs(n int) error {
	d, err := cuda.OpenDevice(n - 1)
	if err != nil {
		return fmt.Errorf("tensor-parallel size %d needs %d GPUs (rank r on GPU r): %w", n, n, err)
	}
	return d.Close()
}
