package main

import (
	"flag"
	"fmt"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/parallel"
)

// memoryFlags are vLLM's memory flags of the commands that run the engine
// (parallel.EngineOptions says how they size the KV cache).
type memoryFlags struct {
	util      *float64
	kvBytes   *int64
	blocks    *int
	kvTokens  *int
	kvDType   *string
	batched   *int
	blockSize *int
}

func addMemoryFlags(fs *flag.FlagSet, batchedDefault int) memoryFlags {
	return memoryFlags{
		util: fs.Float64("gpu-memory-utilization", 0.9, "fraction of the GPU's memory the engine may use: the KV cache gets what weights, "+
			"a profiled worst-case step and the decode graphs leave of it"),
		kvBytes:  fs.Int64("kv-cache-memory-bytes", 0, "KV cache size in bytes (instead of --gpu-memory-utilization's sizing)"),
		blocks:   fs.Int("num-gpu-blocks-override", 0, "KV cache size in blocks of 16 tokens (instead of the profiled sizing)"),
		kvTokens: fs.Int("kv-cache-tokens", 0, "KV cache size in tokens (instead of the profiled sizing; 0: profiled on a GPU, 8192 on the CPU)"),
		kvDType:  fs.String("kv-cache-dtype", "auto", "KV cache dtype: auto (bf16 on a GPU, f32 on the CPU), bf16, fp8 or fp8_e4m3 (e4m3: half the bytes)"),
		batched: fs.Int("max-num-batched-tokens", batchedDefault, "tokens per engine step over all sequences (decode tokens first, "+
			"then prompt chunks: the chunked-prefill budget); the step workspace is sized for it at start"),
		blockSize: fs.Int("block-size", 16, "tokens per KV cache block"),
	}
}

// apply sets opt's memory fields; def is the backend's own KV cache dtype.
func (m memoryFlags) apply(opt *parallel.EngineOptions, def kernels.DType, maxNumSeqs, maxModelLen int) error {
	dt, err := kernels.ParseKVCacheDType(*m.kvDType, def)
	if err != nil {
		return err
	}
	switch {
	case def == kernels.F32 && dt == kernels.BF16:
		return fmt.Errorf("--kv-cache-dtype %s: the CPU backend keeps its KV cache in f32 (auto) or fp8", *m.kvDType)
	case *m.util <= 0 || *m.util > 1:
		return fmt.Errorf("--gpu-memory-utilization %g: want a fraction in (0, 1]", *m.util)
	case *m.kvBytes < 0 || *m.blocks < 0 || *m.kvTokens < 0:
		return fmt.Errorf("--kv-cache-memory-bytes, --num-gpu-blocks-override and --kv-cache-tokens must not be negative")
	case *m.batched < 1:
		return fmt.Errorf("--max-num-batched-tokens %d: want at least 1", *m.batched)
	case *m.blockSize < 1 || *m.blockSize > 1024:
		return fmt.Errorf("--block-size %d: want 1..1024", *m.blockSize)
	case maxNumSeqs > *m.batched:
		return fmt.Errorf("--max-num-batched-tokens %d is smaller than --max-num-seqs %d: a step holds one token of every running sequence; raise it or lower --max-num-seqs",
			*m.batched, maxNumSeqs)
	}
	opt.KVDType = dt
	opt.GPUMemoryUtilization = *m.util
	opt.KVCacheMemoryBytes = *m.kvBytes
	opt.NumGPUBlocksOverride = *m.blocks
	opt.MaxTokens = *m.kvTokens
	opt.BlockSize = *m.blockSize
	opt.MaxNumBatchedTokens = *m.batched
	opt.MaxNumSeqs = maxNumSeqs
	opt.MaxModelLen = maxModelLen
	return nil
}
