// Shared helpers for glmtopo's kernels. Compiled by NVRTC (no host headers).
typedef unsigned short bf16_t; // raw bfloat16 bits
typedef unsigned char fp8_t;   // raw float8_e4m3fn bits
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define ERR_BAD_ID 1
#define ERR_BAD_SLOT 2
#define ERR_BAD_EXPERT 4

__device__ __forceinline__ float bf2f(bf16_t h) { return __uint_as_float(((unsigned)h) << 16); }

// Round to nearest even, as torch does; NaN stays NaN.
__device__ __forceinline__ bf16_t f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// e4m3fn → f32: place exponent and mantissa in an f32 and rescale by 2^120
// (subnormals come out right because the f32 is then subnormal too). 0x7f/0xff
// (NaN in e4m3fn) decode to ±480; checkpoints never hold them.
__device__ __forceinline__ float fp82f(unsigned q) {
    float v = __uint_as_float((q & 0x7fu) << 20) * 1.329227995784916e36f; // 2^120
    return (q & 0x80u) ? -v : v;
}

// f32 → e4m3fn rounded to nearest even, saturating finite overflow and ±Inf
// to ±448 (NaN stays NaN): kernels.F32ToE4M3 on the host, and vLLM's fp8 KV
// cache write (__nv_cvt_float_to_fp8 with __NV_SATFINITE).
__device__ __forceinline__ fp8_t f2fp8(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %1;" : "=h"(r) : "f"(f));
    return (fp8_t)(r & 0xffu);
#else
    unsigned b = __float_as_uint(f), sign = (b >> 24) & 0x80u, a = b & 0x7fffffffu;
    if (a > 0x7f800000u) return (fp8_t)(sign | 0x7fu);
    if (a >= 0x43e00000u) return (fp8_t)(sign | 0x7eu); // ≥ 448
    if (a < 0x3c800000u) // below 2^-6: subnormal, in units of 2^-9 (exact scaling)
        return (fp8_t)(sign | (unsigned)__float2int_rn(__uint_as_float(a) * 512.f));
    unsigned r = a + 0x7ffffu + ((a >> 20) & 1u);
    return (fp8_t)(sign | (((r >> 23) - 120u) << 3) | ((r >> 20) & 7u));
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// pdl_start opens every kernel. Launched with programmatic dependent launch
// (sm_90+; kernels/cuda/backend.go), a kernel may start while its
// predecessor in the stream drains: it lets its own successor launch at
// once, then waits until the predecessor has finished and its writes are
// visible, before touching memory. (Each kernel waiting for its predecessor
// makes the wait transitive.) Without the attribute both are no-ops.
__device__ __forceinline__ void pdl_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// block_sum reduces over a block of up to 1024 threads; every thread gets the sum.
__device__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float s = 0.f;
    for (int i = 0; i < nw; i++) s += sh[i];
    return s;
}

// Weight storage kinds for the GEMV core.
#define WT_F32 0
#define WT_BF16 1
#define WT_FP8 2
#define SCALE_NONE 0
#define SCALE_CHANNEL 1
#define SCALE_BLOCK 2

template <int WT>
__device__ __forceinline__ float load1(const void* row, long k) {
    if (WT == WT_F32) return ((const float*)row)[k];
    if (WT == WT_BF16) return bf2f(((const bf16_t*)row)[k]);
    return fp82f(((const fp8_t*)row)[k]);
}

// WeightRef is one weight matrix [N,K] with its scales.
struct WeightRef {
    const void* w;
    const float* scale;
    int mode;      // SCALE_*
    int sb0, sb1;  // block sizes (SCALE_BLOCK)
    int scols;     // ceil(K/sb1)
};

// Raw8 holds 8 weights as loaded (16 B of bf16, 8 B of e4m3, 32 B of f32)
// so that several loads can be in flight before any is converted.
template <int WT> struct Raw8;
template <> struct Raw8<WT_F32> {
    float4 a, b;
    __device__ __forceinline__ void load(const void* row, long k) {
        const float4* p = (const float4*)((const float*)row + k);
        a = __ldg(p);
        b = __ldg(p + 1);
    }
    __device__ __forceinline__ void get(float* w) const {
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    }
};
template <> struct Raw8<WT_BF16> {
    uint4 u;
    __device__ __forceinline__ void load(const void* row, long k) { u = __ldg((const uint4*)((const bf16_t*)row + k)); }
    __device__ __forceinline__ void get(float* w) const {
        unsigned x[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w[2 * i] = __uint_as_float(x[i] << 16);
            w[2 * i + 1] = __uint_as_float(x[i] & 0xffff0000u);
        }
    }
};
template <> struct Raw8<WT_FP8> {
    uint2 u;
    __device__ __forceinline__ void load(const void* row, long k) { u = __ldg((const uint2*)((const fp8_t*)row + k)); }
    __device__ __forceinline__ void get(float* w) const {
        unsigned x[2] = {u.x, u.y};
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) w[4 * i + j] = fp82f((x[i] >> (8 * j)) & 0xffu);
    }
};

template <int WT>
__device__ __forceinline__ const char* row_ptr(const WeightRef& wr, int row, int K) {
    return (const char*)wr.w + (long)row * K * (WT == WT_F32 ? 4 : WT == WT_BF16 ? 2 : 1);
}

// gemv_step: U consecutive 256-element strips of the R rows: loads first, then FMAs.
template <int WT, int R, int TB, int U>
__device__ __forceinline__ void gemv_step(const WeightRef* wr, const int* rows, const float* const* xs, int nt, int K,
                                          long k, float (&acc)[R][TB]) {
    Raw8<WT> raw[U][R];
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int r = 0; r < R; r++)
            if (rows[r] >= 0) raw[u][r].load(row_ptr<WT>(wr[r], rows[r], K), k + u * 256);
#pragma unroll
    for (int u = 0; u < U; u++) {
        float w[R][8];
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (rows[r] >= 0) {
                raw[u][r].get(w[r]);
                if (WT == WT_FP8 && wr[r].mode == SCALE_BLOCK) {
                    float s = wr[r].scale[(rows[r] / wr[r].sb0) * wr[r].scols + (int)((k + u * 256) / wr[r].sb1)];
#pragma unroll
                    for (int i = 0; i < 8; i++) w[r][i] *= s;
                }
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++) w[r][i] = 0.f;
            }
        }
#pragma unroll
        for (int j = 0; j < TB; j++) {
            if (j < nt) {
                const float4* xp = (const float4*)(xs[j] + k + u * 256);
                float4 a = xp[0], b = xp[1];
                float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[r][j] = fmaf(w[r][i], x[i], acc[r][j]);
            }
        }
    }
}

// gemv_rows: acc[r][j] = Σ_k W[rows[r], k] · X[j][k] for R weight rows and up
// to TB token rows (xs[j], nt of them), by one warp. Rows ≥ N are skipped (row < 0).
// Each lane takes 8 consecutive weights of every 256; 8/R strips are loaded
// before the first is used, so a warp keeps ~8 loads in flight.
template <int WT, int R, int TB>
__device__ __forceinline__ void gemv_rows(const WeightRef* wr, const int* rows, const float* const* xs, int nt, int K,
                                          bool vec, float (&acc)[R][TB]) {
    const int U = R >= 4 ? 2 : R >= 2 ? 4 : 8;
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int j = 0; j < TB; j++) acc[r][j] = 0.f;
    long kvec = vec ? (long)K : 0;
    long k = (long)lane * 8;
    for (; k + (U - 1) * 256 + 8 <= kvec; k += U * 256) gemv_step<WT, R, TB, U>(wr, rows, xs, nt, K, k, acc);
    for (; k + 8 <= kvec; k += 256) gemv_step<WT, R, TB, 1>(wr, rows, xs, nt, K, k, acc);
    for (long k = kvec + lane; k < K; k += 32) {
        float w[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            w[r] = 0.f;
            if (rows[r] >= 0) {
                w[r] = load1<WT>(row_ptr<WT>(wr[r], rows[r], K), k);
                if (WT == WT_FP8 && wr[r].mode == SCALE_BLOCK)
                    w[r] *= wr[r].scale[(rows[r] / wr[r].sb0) * wr[r].scols + (int)(k / wr[r].sb1)];
            }
        }
#pragma unroll
        for (int j = 0; j < TB; j++)
            if (j < nt) {
                float x = xs[j][k];
#pragma unroll
                for (int r = 0; r < R; r++) acc[r][j] = fmaf(w[r], x, acc[r][j]);
            }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int j = 0; j < TB; j++)
            if (j < nt) {
                float v = warp_sum(acc[r][j]);
                if (WT == WT_FP8 && wr[r].mode == SCALE_CHANNEL && rows[r] >= 0) v *= wr[r].scale[rows[r]];
                acc[r][j] = v;
            }
}
