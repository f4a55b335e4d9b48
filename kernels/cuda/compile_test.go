package cuda

import (
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestKernelsCompile compiles every embedded module for Hopper (sm_90) with
// NVRTC alone: no driver or GPU is needed, so machines with only the
// compiler library (libnvrtc) catch source errors before device time is
// spent. With GLMTOPO_PTXAS_VERBOSE=1 it logs ptxas' register and spill
// counts per kernel; GLMTOPO_CUDA_DEFINES (as the backend reads it) adds
// tuning macros to the ops module, to check a sweep's variants. With
// GLMTOPO_CUBIN_DIR it writes each module's cubin there, so that a refactor
// can be checked for an unchanged binary (cmp, nvdisasm) without a GPU.
func TestKernelsCompile(t *testing.T) {
	n, err := loadNVRTC()
	if errors.Is(err, ErrNoCUDA) {
		t.Skipf("no NVRTC: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	modules := []struct {
		name    string
		src     string
		defines []string
	}{
		{"ops", opsSource(), strings.Fields(os.Getenv(definesEnv))},
		{"attn_g12_d128", source("common.cuh", "attention.cu"), []string{"ATT_G=12", "ATT_D=128", "KV_BF16=1"}},
		{"attn_g3_d64_f32", source("common.cuh", "attention.cu"), []string{"ATT_G=3", "ATT_D=64", "KV_BF16=0"}},
		{"flash_g12_d128", source("common.cuh", "attention.cu", "flash.cu"), []string{"ATT_G=12", "ATT_D=128", "KV_BF16=1"}},
		// e4m3 caches (--kv-cache-dtype fp8): GLM-4.5's geometry, and head dims of an odd count of 32s.
		{"attn_g12_d128_fp8", source("common.cuh", "attention.cu"), []string{"ATT_G=12", "ATT_D=128", "KV_BF16=0", "KV_FP8=1"}},
		{"attn_g4_d96_fp8", source("common.cuh", "attention.cu"), []string{"ATT_G=4", "ATT_D=96", "KV_BF16=0", "KV_FP8=1"}},
		{"attn_g20_d32_fp8", source("common.cuh", "attention.cu"), []string{"ATT_G=20", "ATT_D=32", "KV_BF16=0", "KV_FP8=1"}},
		{"flash_g12_d128_fp8", source("common.cuh", "attention.cu", "flash.cu"), []string{"ATT_G=12", "ATT_D=128", "KV_BF16=0", "KV_FP8=1"}},
		{"flash_g4_d96_fp8", source("common.cuh", "attention.cu", "flash.cu"), []string{"ATT_G=4", "ATT_D=96", "KV_BF16=0", "KV_FP8=1"}},
	}
	verbose := os.Getenv("GLMTOPO_PTXAS_VERBOSE") == "1"
	spill := regexp.MustCompile(`(\d+) bytes spill stores`)
	for _, m := range modules {
		opts := []string{"--gpu-architecture=sm_90", "--std=c++17", "-default-device"}
		if verbose {
			opts = append(opts, "--ptxas-options=-v")
		}
		for _, d := range m.defines {
			opts = append(opts, "-D"+d)
		}
		cubin, log, err := n.compileLog(m.name, m.src, opts)
		if err != nil {
			t.Fatalf("%s (NVRTC %s): %v", m.name, n.version, err)
		}
		if len(cubin) == 0 {
			t.Fatalf("%s: empty cubin", m.name)
		}
		if dir := os.Getenv("GLMTOPO_CUBIN_DIR"); dir != "" {
			if err := os.WriteFile(filepath.Join(dir, m.name+".cubin"), cubin, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if verbose {
			t.Logf("%s:\n%s", m.name, log)
			for _, s := range spill.FindAllStringSubmatch(log, -1) {
				if s[1] != "0" {
					t.Logf("%s: spills: %s", m.name, s[0])
				}
			}
		}
	}
}
