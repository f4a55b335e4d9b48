package cuda

import (
	"math"
	"testing"

	"github.com/glmtopo/glmtopo/kernels"
)

// The KV cache dtype picks the write kernel and the attention modules'
// defines; bad caches are errors before anything is launched (no GPU needed).
func TestKVCacheKinds(t *testing.T) {
	cache := func(k, v kernels.DType, ks, vs float32) *kernels.KVCache {
		return &kernels.KVCache{K: &kernels.Tensor{DType: k}, V: &kernels.Tensor{DType: v}, KScale: ks, VScale: vs}
	}
	for _, c := range []struct {
		name   string
		c      *kernels.KVCache
		kind   int
		kernel string
		ok     bool
	}{
		{"f32", cache(kernels.F32, kernels.F32, 0, 0), 0, "qk_norm_rope_kv_f32", true},
		{"bf16", cache(kernels.BF16, kernels.BF16, 0, 0), 1, "qk_norm_rope_kv_bf16", true},
		{"fp8 unset scales", cache(kernels.F8E4M3, kernels.F8E4M3, 0, 0), 2, "qk_norm_rope_kv_fp8", true},
		{"fp8 scales", cache(kernels.F8E4M3, kernels.F8E4M3, 0.1, 3), 2, "qk_norm_rope_kv_fp8", true},
		{"fp8 negative scale", cache(kernels.F8E4M3, kernels.F8E4M3, -1, 1), 0, "", false},
		{"fp8 inf scale", cache(kernels.F8E4M3, kernels.F8E4M3, 1, float32(math.Inf(1))), 0, "", false},
		{"mixed", cache(kernels.BF16, kernels.F8E4M3, 0, 0), 0, "", false},
		{"i32", cache(kernels.I32, kernels.I32, 0, 0), 0, "", false},
	} {
		kind, err := kvKind(c.c)
		if (err == nil) != c.ok || (c.ok && kind != c.kind) {
			t.Errorf("%s: kvKind = %d, %v", c.name, kind, err)
		}
		if c.name == "mixed" {
			continue // the write checks K against V itself (QKNormRopeKV)
		}
		kernel, err := kvWriteKernel(c.c)
		if (err == nil) != c.ok || kernel != c.kernel {
			t.Errorf("%s: kvWriteKernel = %q, %v", c.name, kernel, err)
		}
	}
	if d := kvDefines(2); len(d) != 2 || d[1] != "KV_FP8=1" {
		t.Errorf("kvDefines(2) = %v", d)
	}
}
