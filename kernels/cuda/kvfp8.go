package cuda

import (
	"fmt"
	"math"

	"github.com/glmtopo/glmtopo/kernels"
)

// KV caches hold F32, BF16 or F8E4M3 (vLLM's --kv-cache-dtype fp8: e4m3
// with per-tensor K and V scales, kernels.KVCache.KScale/VScale). The
// write kernel stores e4m3(x / scale); the attention kernels fold the K
// scale into the softmax scale and multiply their output by the V scale.

// kvWriteKernel is the qk_norm_rope_kv kernel (ops.cu) for cache's dtype.
func kvWriteKernel(cache *kernels.KVCache) (string, error) {
	switch cache.K.DType {
	case kernels.F32:
		return "qk_norm_rope_kv_f32", nil
	case kernels.BF16:
		return "qk_norm_rope_kv_bf16", nil
	case kernels.F8E4M3:
		if err := checkKVScales(cache); err != nil {
			return "", err
		}
		return "qk_norm_rope_kv_fp8", nil
	}
	return "", fmt.Errorf("cuda: KV cache dtype %v (want f32, bf16 or f8e4m3)", cache.K.DType)
}

// kvKind is the attention modules' KV_BF16/KV_FP8 defines' value for the
// cache's dtype: 0 f32, 1 bf16, 2 e4m3.
func kvKind(cache *kernels.KVCache) (int, error) {
	if cache.K.DType != cache.V.DType {
		return 0, fmt.Errorf("cuda: K cache %v, V cache %v: want one dtype", cache.K.DType, cache.V.DType)
	}
	switch cache.K.DType {
	case kernels.F32:
		return 0, nil
	case kernels.BF16:
		return 1, nil
	case kernels.F8E4M3:
		return 2, checkKVScales(cache)
	}
	return 0, fmt.Errorf("cuda: KV cache dtype %v (want f32, bf16 or f8e4m3)", cache.K.DType)
}

func checkKVScales(cache *kernels.KVCache) error {
	ks, vs := cache.Scales()
	for _, s := range []float32{ks, vs} {
		if !(s > 0) || math.IsInf(float64(s), 0) {
			return fmt.Errorf("cuda: fp8 KV cache scales %v/%v: want finite positive numbers", ks, vs)
		}
	}
	return nil
}

// kvDefines are the attention modules' cache-type defines for kind.
func kvDefines(kind int) []string {
	if kind == 2 {
		return []string{"KV_BF16=0", "KV_FP8=1"}
	}
	return []string{fmt.Sprintf("KV_BF16=%d", kind)}
}
