package main

import (
	"flag"
	"io"
	"strings"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
	"github.com/glmtopo/glmtopo/parallel"
)

// The memory flags reach parallel.EngineOptions, and bad combinations are
// refused with the flag to change.
func TestMemoryFlags(t *testing.T) {
	for _, c := range []struct {
		args    []string
		def     kernels.DType
		seqs    int
		check   func(parallel.EngineOptions) bool
		wantErr string
	}{
		{args: nil, def: kernels.BF16, seqs: 16, check: func(o parallel.EngineOptions) bool {
			return o.KVDType == kernels.BF16 && o.GPUMemoryUtilization == 0.9 && o.MaxNumBatchedTokens == 2048 && o.MaxNumSeqs == 16 &&
				o.MaxModelLen == 9216 && o.MaxTokens == 0 && o.KVCacheMemoryBytes == 0 && o.NumGPUBlocksOverride == 0
		}},
		{args: []string{"--kv-cache-dtype", "fp8"}, def: kernels.BF16, seqs: 16, check: func(o parallel.EngineOptions) bool { return o.KVDType == kernels.F8E4M3 }},
		{args: []string{"--kv-cache-dtype", "fp8_e4m3"}, def: kernels.F32, seqs: 1, check: func(o parallel.EngineOptions) bool { return o.KVDType == kernels.F8E4M3 }},
		{args: []string{"--gpu-memory-utilization", "0.95", "--kv-cache-memory-bytes", "1000", "--num-gpu-blocks-override", "7", "--max-num-batched-tokens", "512"},
			def: kernels.BF16, seqs: 16, check: func(o parallel.EngineOptions) bool {
				return o.GPUMemoryUtilization == 0.95 && o.KVCacheMemoryBytes == 1000 && o.NumGPUBlocksOverride == 7 && o.MaxNumBatchedTokens == 512
			}},
		{args: []string{"--kv-cache-dtype", "bf16"}, def: kernels.F32, seqs: 1, wantErr: "CPU backend keeps its KV cache in f32"},
		{args: []string{"--kv-cache-dtype", "int4"}, def: kernels.BF16, seqs: 1, wantErr: `--kv-cache-dtype "int4"`},
		{args: []string{"--gpu-memory-utilization", "1.5"}, def: kernels.BF16, seqs: 1, wantErr: "--gpu-memory-utilization 1.5"},
		{args: []string{"--max-num-batched-tokens", "8"}, def: kernels.BF16, seqs: 16, wantErr: "--max-num-batched-tokens 8 is smaller than --max-num-seqs 16"},
		{args: []string{"--num-gpu-blocks-override", "-1"}, def: kernels.BF16, seqs: 1, wantErr: "must not be negative"},
	} {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		m := addMemoryFlags(fs, 2048)
		if err := fs.Parse(c.args); err != nil {
			t.Fatalf("%v: %v", c.args, err)
		}
		var o parallel.EngineOptions
		err := m.apply(&o, c.def, c.seqs, 9216)
		switch {
		case c.wantErr != "":
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("%v: err = %v, want %q", c.args, err, c.wantErr)
			}
		case err != nil:
			t.Errorf("%v: %v", c.args, err)
		case !c.check(o):
			t.Errorf("%v: options %+v", c.args, o)
		}
	}
}
