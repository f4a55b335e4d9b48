package kernels

import "github.com/glmtopo/glmtopo/model/safetensors"

// E4M3 is OCP FP8 E4M3 "fn" (torch.float8_e4m3fn): sign, 4 exponent bits of
// bias 7, 3 mantissa bits, no infinities, S.1111.111 NaN, largest finite
// value 448, smallest subnormal 2^-9. F8E4M3 tensors hold it: weights with a
// scale tensor, and KV caches (vLLM's --kv-cache-dtype fp8) with a
// per-tensor scale (KVCache.KScale, VScale). The codec is the checkpoint
// format's (model/safetensors), so weights and caches round alike.
const E4M3Max = safetensors.E4M3Max

// E4M3ToF32 decodes one E4M3 byte (exact).
func E4M3ToF32(b uint8) float32 { return safetensors.E4M3ToF32(b) }

// F32ToE4M3 encodes f as E4M3, rounding to nearest even and saturating:
// finite values beyond ±448 and ±Inf become ±448 and NaN stays NaN, as the
// cvt.rn.satfinite.e4m3x2.f32 instruction (and so vLLM's fp8 cache write,
// __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)) does. The GPU's KV
// write (qk_norm_rope_kv_fp8 in kernels/cuda/src/ops.cu) matches it bit for
// bit; kernels/cuda tests compare the two.
func F32ToE4M3(f float32) uint8 { return safetensors.F32ToE4M3(f) }
