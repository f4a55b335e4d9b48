// Tuning knobs (overridable at compile time: GLMTOPO_CUDA_DEFINES).
#ifndef MMA_U1
#define MMA_U1 4 // strips per round with one weight matrix and ≤ 8 tokens
#endif
#ifndef MMA_U2
#define MMA_U2 2 // strips per round with gate+up or 16 tokens
#endif
#ifndef MMA_FP8_UMUL
#define MMA_FP8_UMUL 1
#endif
#ifndef MMA_MINB_BF16
#define MMA_MINB_BF16 3 // __launch_bounds__ min blocks per SM
#endif
#ifndef MMA_MINB_FP8
#define MMA_MINB_FP8 3
#endif

// Weight-only GEMV/GEMM for narrow batches on the tensor cores: 16 weight
// rows × 8 tokens per mma.m16n8k16 (bf16 in, f32 accumulate). Weights are
// bf16, or e4m3 widened to bf16 exactly in registers; activations enter as
// two bf16 halves (hi + lo), which keeps ~16 bits of each. A block of 8 warps
// owns 16 rows and splits K between its warps (32-element strips), then
// reduces through shared memory, so even narrow matrices fill the GPU.
// Within a strip the k order is permuted (the same way for weights and
// activations) so that each lane loads 8 consecutive weights at once.

__device__ __forceinline__ unsigned mma_pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ void mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// e4m3 byte → bf16 bits (exact: every e4m3 value is a bf16 value).
__device__ __forceinline__ unsigned fp8_bf16(unsigned q) { return __float_as_uint(fp82f(q)) >> 16; }

// W8 is 8 consecutive weights of one row as 4 bf16x2 registers (e4m3 widened
// in registers; measured faster here than converting through f16 with the
// hardware e4m3x2 instruction plus f16 activation planes, H200 2026-11-27).
template <int WT>
__device__ __forceinline__ uint4 load_w8(const void* row, long k) {
    if (WT == WT_BF16) return __ldg((const uint4*)((const bf16_t*)row + k));
    uint2 u = __ldg((const uint2*)((const fp8_t*)row + k));
    uint4 r;
    r.x = fp8_bf16(u.x & 0xffu) | (fp8_bf16((u.x >> 8) & 0xffu) << 16);
    r.y = fp8_bf16((u.x >> 16) & 0xffu) | (fp8_bf16(u.x >> 24) << 16);
    r.z = fp8_bf16(u.y & 0xffu) | (fp8_bf16((u.y >> 8) & 0xffu) << 16);
    r.w = fp8_bf16((u.y >> 16) & 0xffu) | (fp8_bf16(u.y >> 24) << 16);
    return r;
}

template <int WT>
__device__ __forceinline__ void mma_w(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                      unsigned b1) {
    mma_bf16(c, a0, a1, a2, a3, b0, b1);
}

// MmaRows: NA weight matrices (gate and up for SwiGLU, else one) over the
// same 16 rows, and up to 8·NTT token rows of x.
template <int WT, int NA, int NTT>
struct MmaRows {
    const char* rows[NA][2]; // lane's rows g and g+8 (clamped to valid rows)
    const bf16_t* xr[NTT];   // lane's token rows g + 8j (clamped), bf16 hi plane
    long plane;              // elements from the hi plane to the lo plane
    float c[NA][NTT][4];
};

// mma_strips: this warp's share of K (strips warp, warp+nw, ...). With
// block scales (sb1 a multiple of 32) each strip's product is scaled per row.
template <int WT, int NA, int NTT>
__device__ __forceinline__ void mma_strips(MmaRows<WT, NA, NTT>& m, int K, const WeightRef* wr, int r0, int r1) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5, c = lane & 3;
    const int esz = WT == WT_BF16 ? 2 : 1;
#pragma unroll
    for (int a = 0; a < NA; a++)
#pragma unroll
        for (int j = 0; j < NTT; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) m.c[a][j][i] = 0.f;
    int strips = K / 32;
    bool blk = WT == WT_FP8 && wr[0].mode == SCALE_BLOCK;
    // U strips per round: all their weight loads are issued before the first mma.
    // MMA_FP8_UMUL > 1 gives e4m3 (8-byte lane loads) more strips per round; 1 measured best.
    const int U = (NA == 2 || NTT == 2 ? MMA_U2 : MMA_U1) * (WT == WT_FP8 ? MMA_FP8_UMUL : 1);
    for (int s0 = warp; s0 < strips; s0 += U * nw) {
        // Issue every load of the round (weights and activations) before the first use.
        uint4 w[U][NA][2];
        uint4 xh[U][NTT], xl[U][NTT];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int s = s0 + u * nw;
            long k = (long)min(s, strips - 1) * 32 + 8 * c;
#pragma unroll
            for (int a = 0; a < NA; a++) {
                w[u][a][0] = load_w8<WT>(m.rows[a][0], k);
                w[u][a][1] = load_w8<WT>(m.rows[a][1], k);
            }
#pragma unroll
            for (int j = 0; j < NTT; j++) {
                xh[u][j] = *(const uint4*)(m.xr[j] + k);
                xl[u][j] = *(const uint4*)(m.xr[j] + m.plane + k);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int s = s0 + u * nw;
            if (s >= strips) break;
            unsigned bh[NTT][4], bl[NTT][4];
#pragma unroll
            for (int j = 0; j < NTT; j++) {
                bh[j][0] = xh[u][j].x; bh[j][1] = xh[u][j].y; bh[j][2] = xh[u][j].z; bh[j][3] = xh[u][j].w;
                bl[j][0] = xl[u][j].x; bl[j][1] = xl[u][j].y; bl[j][2] = xl[u][j].z; bl[j][3] = xl[u][j].w;
            }
#pragma unroll
            for (int a = 0; a < NA; a++) {
                const uint4 w0 = w[u][a][0], w1 = w[u][a][1];
                float s0f = 1.f, s1f = 1.f;
                if (blk) {
                    int kb = (int)((long)s * 32 / wr[a].sb1);
                    s0f = wr[a].scale[(r0 / wr[a].sb0) * wr[a].scols + kb];
                    s1f = wr[a].scale[(r1 / wr[a].sb0) * wr[a].scols + kb];
                }
#pragma unroll
                for (int j = 0; j < NTT; j++) {
                    float t[4] = {0.f, 0.f, 0.f, 0.f};
                    // chunk 0: k pairs (0,1),(2,3) of each lane's 8; chunk 1: (4,5),(6,7)
                    mma_w<WT>(t, w0.x, w1.x, w0.y, w1.y, bh[j][0], bh[j][1]);
                    mma_w<WT>(t, w0.x, w1.x, w0.y, w1.y, bl[j][0], bl[j][1]);
                    mma_w<WT>(t, w0.z, w1.z, w0.w, w1.w, bh[j][2], bh[j][3]);
                    mma_w<WT>(t, w0.z, w1.z, w0.w, w1.w, bl[j][2], bl[j][3]);
                    m.c[a][j][0] += s0f * t[0];
                    m.c[a][j][1] += s0f * t[1];
                    m.c[a][j][2] += s1f * t[2];
                    m.c[a][j][3] += s1f * t[3];
                }
            }
        }
    }
    (void)esz;
}

// mma_reduce sums the warps' fragments into warp 0 (red: 8 warps × NA×NTT×4 × 32 floats).
template <int WT, int NA, int NTT>
__device__ __forceinline__ void mma_reduce(MmaRows<WT, NA, NTT>& m, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int V = NA * NTT * 4;
    __syncthreads();
    if (warp > 0) {
#pragma unroll
        for (int a = 0; a < NA; a++)
#pragma unroll
            for (int j = 0; j < NTT; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) red[((warp * V) + (a * NTT + j) * 4 + i) * 32 + lane] = m.c[a][j][i];
    }
    __syncthreads();
    if (warp == 0) {
        for (int w = 1; w < nw; w++)
#pragma unroll
            for (int a = 0; a < NA; a++)
#pragma unroll
                for (int j = 0; j < NTT; j++)
#pragma unroll
                    for (int i = 0; i < 4; i++) m.c[a][j][i] += red[((w * V) + (a * NTT + j) * 4 + i) * 32 + lane];
    }
}

// Row scale of a per-channel e4m3 weight (1 otherwise), times xs, the
// activation planes' scale (1 for the bf16 planes used now).
template <int WT>
__device__ __forceinline__ float row_scale(const WeightRef& w, int row, float xs = 1.f) {
    return ((WT == WT_FP8 && w.mode == SCALE_CHANNEL) ? w.scale[row] : 1.f) * xs;
}

// linear_mma: out[T,N] = x[T,K]·wᵀ (+bias); grid ceil(N/16), 256 threads.
template <int WT, int NTT>
__device__ void linear_mma_impl(float* out, const bf16_t* x, const float* xsc, WeightRef wr, const float* bias, int T,
                                int N, int K, float* red) {
    float xs = (WT == WT_FP8 && xsc) ? xsc[1] : 1.f;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const int esz = WT == WT_BF16 ? 2 : 1;
    // A persistent grid: each block walks row groups, so no wave runs part-empty.
    for (int grp = blockIdx.x; grp < (N + 15) / 16; grp += gridDim.x)
    for (int t0 = 0; t0 < T; t0 += 8 * NTT) {
        int row0 = grp * 16;
        int r0 = min(row0 + g, N - 1), r1 = min(row0 + g + 8, N - 1);
        MmaRows<WT, 1, NTT> m;
        m.rows[0][0] = (const char*)wr.w + (long)r0 * K * esz;
        m.rows[0][1] = (const char*)wr.w + (long)r1 * K * esz;
#pragma unroll
        for (int j = 0; j < NTT; j++) m.xr[j] = x + (long)min(t0 + g + 8 * j, T - 1) * K;
        m.plane = (long)T * K;
        mma_strips<WT, 1, NTT>(m, K, &wr, r0, r1);
        mma_reduce<WT, 1, NTT>(m, red);
        if (warp == 0) {
            float sc0 = row_scale<WT>(wr, r0, xs), sc1 = row_scale<WT>(wr, r1, xs);
            float b0 = bias ? bias[r0] : 0.f, b1 = bias ? bias[r1] : 0.f;
#pragma unroll
            for (int j = 0; j < NTT; j++)
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    int t = t0 + 8 * j + 2 * c + i;
                    if (t >= T) continue;
                    if (row0 + g < N) out[(long)t * N + row0 + g] = m.c[0][j][i] * sc0 + b0;
                    if (row0 + g + 8 < N) out[(long)t * N + row0 + g + 8] = m.c[0][j][i + 2] * sc1 + b1;
                }
        }
        __syncthreads();
    }
}

#define LINEAR_MMA(wt, WT, NTT, MINB)                                                                                \
    extern "C" __global__ void __launch_bounds__(256, MINB) linear_mma_##wt##_n##NTT(                                      \
        float* out, const bf16_t* x, const float* xsc, const void* w, const float* scale, int mode, int sb0, int sb1, \
        const float* bias, int T, int N, int K) { pdl_start();                                                                    \
        __shared__ float red[8 * 1 * NTT * 4 * 32];                                                                  \
        WeightRef wr = {w, scale, mode, sb0, sb1, sb1 > 0 ? (K + sb1 - 1) / sb1 : 0};                               \
        linear_mma_impl<WT, NTT>(out, x, xsc, wr, bias, T, N, K, red);                                              \
    }
LINEAR_MMA(bf16, WT_BF16, 1, MMA_MINB_BF16)
LINEAR_MMA(bf16, WT_BF16, 2, MMA_MINB_BF16)
LINEAR_MMA(fp8, WT_FP8, 1, MMA_MINB_FP8)
LINEAR_MMA(fp8, WT_FP8, 2, MMA_MINB_FP8)

// moe_gate_up_mma: for active expert blockIdx.y, rows i0..i0+15 of gate and
// up over its tokens, 8·NTT at a time; h = silu(gate·x) · (up·x).
template <int WT, int NTT>
__device__ void moe_gate_up_mma_impl(float* h, const bf16_t* x, long xplane, const float* xsc, const ExpertPtrs* ex,
                                     int E, const int* offsets, const int* active, const int* perm, int K_top, int I,
                                     int H, int mode, int sb0, int sb1, float* red) {
    float xs = (WT == WT_FP8 && xsc) ? xsc[1] : 1.f;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const int esz = WT == WT_BF16 ? 2 : 1;
    int scols = sb1 > 0 ? (H + sb1 - 1) / sb1 : 0;
    int groups = (I + 15) / 16, work = offsets[E + 1] * groups;
    // A persistent grid over (active expert, row group) pairs.
    for (int item = blockIdx.x; item < work; item += gridDim.x) {
    int e = active[item / groups];
    int s0 = offsets[e], s1 = offsets[e + 1];
    int row0 = (item % groups) * 16;
    int r0 = min(row0 + g, I - 1), r1 = min(row0 + g + 8, I - 1);
    WeightRef wr[2] = {{ex[e].w[0], ex[e].s[0], mode, sb0, sb1, scols}, {ex[e].w[1], ex[e].s[1], mode, sb0, sb1, scols}};
    for (int t0 = s0; t0 < s1; t0 += 8 * NTT) {
        MmaRows<WT, 2, NTT> m;
#pragma unroll
        for (int a = 0; a < 2; a++) {
            m.rows[a][0] = (const char*)wr[a].w + (long)r0 * H * esz;
            m.rows[a][1] = (const char*)wr[a].w + (long)r1 * H * esz;
        }
#pragma unroll
        for (int j = 0; j < NTT; j++) m.xr[j] = x + (long)(perm[min(t0 + g + 8 * j, s1 - 1)] / K_top) * H;
        m.plane = xplane;
        mma_strips<WT, 2, NTT>(m, H, wr, r0, r1);
        mma_reduce<WT, 2, NTT>(m, red);
        if (warp == 0) {
            float g0 = row_scale<WT>(wr[0], r0, xs), g1 = row_scale<WT>(wr[0], r1, xs);
            float u0 = row_scale<WT>(wr[1], r0, xs), u1 = row_scale<WT>(wr[1], r1, xs);
#pragma unroll
            for (int j = 0; j < NTT; j++)
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    int s = t0 + 8 * j + 2 * c + i;
                    if (s >= s1) continue;
                    float a = m.c[0][j][i] * g0, b = m.c[1][j][i] * u0;
                    if (row0 + g < I) h[(long)s * I + row0 + g] = a / (1.f + expf(-a)) * b;
                    a = m.c[0][j][i + 2] * g1;
                    b = m.c[1][j][i + 2] * u1;
                    if (row0 + g + 8 < I) h[(long)s * I + row0 + g + 8] = a / (1.f + expf(-a)) * b;
                }
        }
        __syncthreads();
    }
    }
}

// moe_down_mma: y[s] = down_e · h[s] for rows n0..n0+15 of active expert blockIdx.y.
template <int WT, int NTT>
__device__ void moe_down_mma_impl(float* y, const bf16_t* h, long hplane, const float* hsc, const ExpertPtrs* ex,
                                  int E, const int* offsets, const int* active, int I, int H, int mode, int sb0, int sb1,
                                  float* red) {
    float xs = (WT == WT_FP8 && hsc) ? hsc[1] : 1.f;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const int esz = WT == WT_BF16 ? 2 : 1;
    int scols = sb1 > 0 ? (I + sb1 - 1) / sb1 : 0;
    int groups = (H + 15) / 16, work = offsets[E + 1] * groups;
    for (int item = blockIdx.x; item < work; item += gridDim.x) {
    int e = active[item / groups];
    int s0 = offsets[e], s1 = offsets[e + 1];
    int row0 = (item % groups) * 16;
    int r0 = min(row0 + g, H - 1), r1 = min(row0 + g + 8, H - 1);
    WeightRef wr = {ex[e].w[2], ex[e].s[2], mode, sb0, sb1, scols};
    for (int t0 = s0; t0 < s1; t0 += 8 * NTT) {
        MmaRows<WT, 1, NTT> m;
        m.rows[0][0] = (const char*)wr.w + (long)r0 * I * esz;
        m.rows[0][1] = (const char*)wr.w + (long)r1 * I * esz;
#pragma unroll
        for (int j = 0; j < NTT; j++) m.xr[j] = h + (long)min(t0 + g + 8 * j, s1 - 1) * I;
        m.plane = hplane;
        mma_strips<WT, 1, NTT>(m, I, &wr, r0, r1);
        mma_reduce<WT, 1, NTT>(m, red);
        if (warp == 0) {
            float sc0 = row_scale<WT>(wr, r0, xs), sc1 = row_scale<WT>(wr, r1, xs);
#pragma unroll
            for (int j = 0; j < NTT; j++)
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    int s = t0 + 8 * j + 2 * c + i;
                    if (s >= s1) continue;
                    if (row0 + g < H) y[(long)s * H + row0 + g] = m.c[0][j][i] * sc0;
                    if (row0 + g + 8 < H) y[(long)s * H + row0 + g + 8] = m.c[0][j][i + 2] * sc1;
                }
        }
        __syncthreads();
    }
    }
}

#define MOE_MMA(wt, WT, NTT, MINB)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256, MINB) moe_gate_up_mma_##wt##_n##NTT(                                 \
        float* h, const bf16_t* x, long xplane, const float* xsc, const ExpertPtrs* ex, int E, const int* offsets,     \
        const int* active, const int* perm, int K_top, int I, int H, int mode, int sb0, int sb1) { pdl_start();                   \
        __shared__ float red[8 * 2 * NTT * 4 * 32];                                                                  \
        moe_gate_up_mma_impl<WT, NTT>(h, x, xplane, xsc, ex, E, offsets, active, perm, K_top, I, H, mode, sb0, sb1,  \
                                      red);                                                                          \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(256, MINB) moe_down_mma_##wt##_n##NTT(                                    \
        float* y, const bf16_t* h, long hplane, const float* hsc, const ExpertPtrs* ex, int E, const int* offsets,    \
        const int* active, int I, int H, int mode, int sb0, int sb1) { pdl_start();                                               \
        __shared__ float red[8 * 1 * NTT * 4 * 32];                                                                  \
        moe_down_mma_impl<WT, NTT>(y, h, hplane, hsc, ex, E, offsets, active, I, H, mode, sb0, sb1, red);            \
    }
MOE_MMA(bf16, WT_BF16, 1, MMA_MINB_BF16)
MOE_MMA(bf16, WT_BF16, 2, MMA_MINB_BF16)
MOE_MMA(fp8, WT_FP8, 1, MMA_MINB_FP8)
MOE_MMA(fp8, WT_FP8, 2, MMA_MINB_FP8)

// split_planes: x = hi + lo as two bf16 planes (hi at [0,n), lo at [n,2n)) for the tensor-core GEMVs.
extern "C" __global__ void split_planes(bf16_t* out, const float* in, long n) {
    pdl_start();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float x = in[i];
        bf16_t h = f2bf(x);
        out[i] = h;
        out[n + i] = f2bf(x - bf2f(h));
    }
}
