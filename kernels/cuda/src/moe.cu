// MoE kernels: plan (sort assignments by expert), the grouped per-expert
// GEMVs of the block kernels, combine, and the wide (prefill) path's
// gathers around cuBLAS. Compiled after ops.cu in the "ops" module; the
// streamed expert kernels are in gemv.cu. Every kernel has a CPU twin.

// ---- MoE: plan (counting sort of assignments by expert), grouped GEMVs, combine ----
// ExpertPtrs per expert: gate, up, down weights and their scales (0 = absent expert).
struct ExpertPtrs {
    const void* w[3];
    const float* s[3];
};

// moe_plan (one block): offsets[E+1]; slot_of[a] (-1 when the expert is absent); perm[slot] = a.
// active[0..nactive) lists the experts with work, nactive in offsets[E+1].
// Assignments are A = T·Kv: token a/Kv's column a%Kv is routed id
// ids[(a/Kv)·K + a%Kv] for columns below K; a column K (Kv = K+1) is the
// layer's shared expert, stored as the table's last entry E-1, so the
// shared expert runs in the same grouped kernels as the routed ones.
__device__ __forceinline__ int moe_id(const int* ids, int a, int K, int Kv, int E) {
    int j = a % Kv;
    return j < K ? ids[(a / Kv) * K + j] : E - 1;
}

extern "C" __global__ void moe_plan(const int* ids, int A, const ExpertPtrs* ex, int E, int* offsets, int* active,
                                    int* slot_of, int* perm, int* expert_of, int* err, int K, int Kv) {
    pdl_start();
    extern __shared__ int cnt[]; // E+1
    for (int e = threadIdx.x; e <= E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    int routed = E - (Kv - K); // ids the router may give
    for (int a = threadIdx.x; a < A; a += blockDim.x) {
        int e = moe_id(ids, a, K, Kv, E);
        if (e < 0 || e >= E || (a % Kv < K && e >= routed)) {
            atomicOr(err, ERR_BAD_EXPERT);
            slot_of[a] = -1;
        } else if (ex[e].w[0] == 0) {
            slot_of[a] = -1;
        } else {
            slot_of[a] = atomicAdd(&cnt[e], 1);
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0, na = 0;
        // The shared expert (every token: the longest units) is listed
        // first, so that its units start in the first wave, not the tail.
        if (Kv > K && cnt[E - 1] > 0) active[na++] = E - 1;
        for (int e = 0; e < E; e++) {
            int c = cnt[e];
            cnt[e] = s;
            offsets[e] = s;
            if (c > 0 && !(Kv > K && e == E - 1)) active[na++] = e;
            s += c;
        }
        offsets[E] = s;
        offsets[E + 1] = na;
    }
    __syncthreads();
    for (int a = threadIdx.x; a < A; a += blockDim.x) {
        int r = slot_of[a];
        if (r >= 0) {
            int e = moe_id(ids, a, K, Kv, E);
            int s = cnt[e] + r;
            slot_of[a] = s;
            perm[s] = a;
            if (expert_of) expert_of[s] = e;
        }
    }
}

// moe_gate_up: h[s][i] = silu(gate_e[i]·x[tok(s)]) · (up_e[i]·x[tok(s)]) for the slots s of expert e = blockIdx.y.
template <int WT, int TB>
__device__ void moe_gate_up_impl(float* h, const float* x, const ExpertPtrs* ex, int E, const int* offsets,
                                 const int* active, const int* perm, int K_top, int I, int H, int mode, int sb0,
                                 int sb1, int vec) {
    const int R = 4; // rows i and i+1 of gate and up: x is read once for four weight rows
    if ((int)blockIdx.y >= offsets[E + 1]) return;
    int e = active[blockIdx.y];
    int s0 = offsets[e], s1 = offsets[e + 1];
    int warp = threadIdx.x >> 5, nw = blockDim.x >> 5, lane = threadIdx.x & 31;
    int i = (blockIdx.x * nw + warp) * 2;
    if (i >= I) return;
    int scols = sb1 > 0 ? (H + sb1 - 1) / sb1 : 0;
    WeightRef g = {ex[e].w[0], ex[e].s[0], mode, sb0, sb1, scols}, u = {ex[e].w[1], ex[e].s[1], mode, sb0, sb1, scols};
    WeightRef wr[R] = {g, u, g, u};
    int i1 = i + 1 < I ? i + 1 : -1;
    int rows[R] = {i, i, i1, i1};
    for (int t0 = s0; t0 < s1; t0 += TB) {
        int nt = min(TB, s1 - t0);
        const float* xs[TB];
#pragma unroll
        for (int j = 0; j < TB; j++) xs[j] = x + (long)(perm[t0 + (j < nt ? j : 0)] / K_top) * H;
        float acc[R][TB];
        gemv_rows<WT, R, TB>(wr, rows, xs, nt, H, vec != 0, acc);
        if (lane == 0) {
#pragma unroll
            for (int j = 0; j < TB; j++)
                if (j < nt) {
                    float a = acc[0][j];
                    h[(long)(t0 + j) * I + i] = a / (1.f + expf(-a)) * acc[1][j];
                    if (i1 >= 0) {
                        float c = acc[2][j];
                        h[(long)(t0 + j) * I + i1] = c / (1.f + expf(-c)) * acc[3][j];
                    }
                }
        }
    }
}

// moe_down: y[s][n] = down_e[n]·h[s].
template <int WT, int TB>
__device__ void moe_down_impl(float* y, const float* h, const ExpertPtrs* ex, int E, const int* offsets,
                              const int* active, int I, int H,
                              int mode, int sb0, int sb1, int vec) {
    const int R = 4;
    if ((int)blockIdx.y >= offsets[E + 1]) return;
    int e = active[blockIdx.y];
    int s0 = offsets[e], s1 = offsets[e + 1];
    int warp = threadIdx.x >> 5, nw = blockDim.x >> 5, lane = threadIdx.x & 31;
    int n0 = (blockIdx.x * nw + warp) * R;
    if (n0 >= H) return;
    int scols = sb1 > 0 ? (I + sb1 - 1) / sb1 : 0;
    WeightRef d = {ex[e].w[2], ex[e].s[2], mode, sb0, sb1, scols};
    WeightRef wr[R] = {d, d, d, d};
    int rows[R];
#pragma unroll
    for (int r = 0; r < R; r++) rows[r] = n0 + r < H ? n0 + r : -1;
    for (int t0 = s0; t0 < s1; t0 += TB) {
        int nt = min(TB, s1 - t0);
        const float* xs[TB];
#pragma unroll
        for (int j = 0; j < TB; j++) xs[j] = h + (long)(t0 + (j < nt ? j : 0)) * I;
        float acc[R][TB];
        gemv_rows<WT, R, TB>(wr, rows, xs, nt, I, vec != 0, acc);
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int j = 0; j < TB; j++)
                    if (j < nt && rows[r] >= 0) y[(long)(t0 + j) * H + rows[r]] = acc[r][j];
        }
    }
}

#define MOE_KERNELS(suffix, WT, TB)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                             \
        moe_gate_up_##suffix##_t##TB(float* h, const float* x, const ExpertPtrs* ex, int E, const int* offsets,       \
                                     const int* active, const int* perm, int K_top, int I, int H, int mode, int sb0, \
                                     int sb1, int vec) { pdl_start();                                                             \
        moe_gate_up_impl<WT, TB>(h, x, ex, E, offsets, active, perm, K_top, I, H, mode, sb0, sb1, vec);              \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                             \
        moe_down_##suffix##_t##TB(float* y, const float* h, const ExpertPtrs* ex, int E, const int* offsets,          \
                                  const int* active, int I, int H, int mode, int sb0, int sb1, int vec) { pdl_start();            \
        moe_down_impl<WT, TB>(y, h, ex, E, offsets, active, I, H, mode, sb0, sb1, vec);                              \
    }
#define MOE_TBS(suffix, WT) MOE_KERNELS(suffix, WT, 1) MOE_KERNELS(suffix, WT, 2) MOE_KERNELS(suffix, WT, 4) MOE_KERNELS(suffix, WT, 8)
MOE_TBS(f32, WT_F32)
MOE_TBS(bf16, WT_BF16)
MOE_TBS(fp8, WT_FP8)

// moe_combine: out[t] = Σ_{j<K} w[t,j] · y[slot_of[t,j]] in j order, then
// + y of the shared expert's column (Kv = K+1), as the CPU adds the shared
// MLP to the routed sum (deterministic). Grid (T, ceil(H/blockDim)).
extern "C" __global__ void moe_combine(float* out, const float* y, const float* wts, const int* slot_of, int K_top,
                                       int Kv, int H) {
    pdl_start();
    int t = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= H) return;
    float acc = 0.f;
    for (int j = 0; j < K_top; j++) {
        int s = slot_of[t * Kv + j];
        if (s >= 0) acc += wts[t * K_top + j] * y[(long)s * H + c];
    }
    if (Kv > K_top) {
        int s = slot_of[t * Kv + K_top];
        if (s >= 0) acc += y[(long)s * H + c];
    }
    out[(long)t * H + c] = acc;
}

// ---- MoE for wide batches (prefill): rows gathered per expert for cuBLAS ----
// Expert e's GEMM rows start at rowbase[e] (the host pads each expert's
// range to a multiple of 128 rows, disjoint from the next one's, so that
// the experts' GEMMs may run concurrently in one batched call). With split,
// its rows are [base, base+cnt) (bf16 hi) and [base+cnt, base+2·cnt) (bf16
// lo); without, [base, base+cnt).
__device__ __forceinline__ void wide_rows(int s, const int* expert_of, const int* offsets, const int* rowbase, int split,
                                          long* hi, long* lo) {
    int e = expert_of[s];
    int off = offsets[e], cnt = offsets[e + 1] - off;
    *hi = (long)rowbase[e] + (s - off);
    *lo = split ? *hi + cnt : -1;
}

// The wide-path kernels below move W consecutive columns per thread: W = 4
// (16-byte f32 loads, 8-byte bf16 stores) when the row length is a multiple
// of 4 and the pointers allow, else 1. (One column per thread, and the
// combine's slot lookups redone per column, ran at ~1/3 of HBM bandwidth:
// 0.56–0.64 ms per MoE layer each for gather and combine at 8192 tokens,
// H200 ncu.)
template <int W>
__device__ __forceinline__ void ldw(float (&v)[W], const float* p) {
    if constexpr (W == 4) {
        float4 q = *(const float4*)p;
        v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    } else {
        v[0] = *p;
    }
}

template <int W>
__device__ __forceinline__ void stw(float* p, const float (&v)[W]) {
    if constexpr (W == 4) *(float4*)p = make_float4(v[0], v[1], v[2], v[3]);
    else *p = v[0];
}

template <int W>
__device__ __forceinline__ void stw_bf(bf16_t* p, const bf16_t (&h)[W]) {
    if constexpr (W == 4) *(uint2*)p = make_uint2((unsigned)h[0] | (unsigned)h[1] << 16, (unsigned)h[2] | (unsigned)h[3] << 16);
    else *p = h[0];
}

// wide_vec says whether rows of n floats from these pointers take W = 4.
__device__ __forceinline__ bool wide_vec(int n, const void* a, const void* b, const void* c) {
    return (n & 3) == 0 && (((size_t)a | (size_t)b | (size_t)c) & 15) == 0;
}

template <int W>
__device__ __forceinline__ void gather_cols(bf16_t* xg, const float* src, long hi, long lo, int H) {
    for (int c = W * threadIdx.x; c < H; c += W * blockDim.x) {
        float v[W];
        bf16_t h[W], l[W];
        ldw<W>(v, src + c);
#pragma unroll
        for (int k = 0; k < W; k++) {
            h[k] = f2bf(v[k]);
            l[k] = f2bf(v[k] - bf2f(h[k]));
        }
        stw_bf<W>(xg + hi * H + c, h);
        if (lo >= 0) stw_bf<W>(xg + lo * H + c, l);
    }
}

extern "C" __global__ void moe_gather_x(bf16_t* xg, const float* x, const int* perm, const int* expert_of,
                                        const int* offsets, const int* rowbase, int K_top, int H, int split) {
    pdl_start();
    int s = blockIdx.x;
    long hi, lo;
    wide_rows(s, expert_of, offsets, rowbase, split, &hi, &lo);
    const float* src = x + (long)(perm[s] / K_top) * H;
    if (wide_vec(H, src, xg, xg)) gather_cols<4>(xg, src, hi, lo, H);
    else gather_cols<1>(xg, src, hi, lo, H);
}

// chscale: FP8 experts with per-channel scales, expanded without them (the
// bf16 copy holds the e4m3 values exactly); they are applied here to the
// gate/up outputs and in moe_combine_wide to the down outputs.
template <int W>
__device__ __forceinline__ void swiglu_cols(bf16_t* hg, const float* cg, const float* cu, const float* sg,
                                            const float* su, long hi, long lo, int I) {
    for (int c = W * threadIdx.x; c < I; c += W * blockDim.x) {
        float g[W], u[W], t[W];
        ldw<W>(g, cg + hi * I + c);
        ldw<W>(u, cu + hi * I + c);
        if (lo >= 0) {
            ldw<W>(t, cg + lo * I + c);
#pragma unroll
            for (int k = 0; k < W; k++) g[k] += t[k];
            ldw<W>(t, cu + lo * I + c);
#pragma unroll
            for (int k = 0; k < W; k++) u[k] += t[k];
        }
        if (sg) {
            ldw<W>(t, sg + c);
#pragma unroll
            for (int k = 0; k < W; k++) g[k] *= t[k];
            ldw<W>(t, su + c);
#pragma unroll
            for (int k = 0; k < W; k++) u[k] *= t[k];
        }
        bf16_t h[W], l[W];
#pragma unroll
        for (int k = 0; k < W; k++) {
            float v = g[k] / (1.f + expf(-g[k])) * u[k];
            h[k] = f2bf(v);
            l[k] = f2bf(v - bf2f(h[k]));
        }
        stw_bf<W>(hg + hi * I + c, h);
        if (lo >= 0) stw_bf<W>(hg + lo * I + c, l);
    }
}

extern "C" __global__ void moe_swiglu_wide(bf16_t* hg, const float* cg, const float* cu, const int* expert_of,
                                           const int* offsets, const int* rowbase, const ExpertPtrs* ex, int chscale,
                                           int I, int split) {
    pdl_start();
    int s = blockIdx.x;
    long hi, lo;
    wide_rows(s, expert_of, offsets, rowbase, split, &hi, &lo);
    const float *sg = nullptr, *su = nullptr;
    if (chscale) {
        sg = ex[expert_of[s]].s[0];
        su = ex[expert_of[s]].s[1];
    }
    if (wide_vec(I, cg, cu, hg) && wide_vec(I, sg, su, nullptr)) swiglu_cols<4>(hg, cg, cu, sg, su, hi, lo, I);
    else swiglu_cols<1>(hg, cg, cu, sg, su, hi, lo, I);
}

// moe_combine_wide: out[t] = Σ_j w[t,j]·y[slot j] (down outputs, per-channel
// scales applied), a block per token; its slots' rows are looked up once.
#define COMBINE_MAX_K 32
struct CombineSlots {
    long hi[COMBINE_MAX_K], lo[COMBINE_MAX_K];
    float w[COMBINE_MAX_K];
    const float* sc[COMBINE_MAX_K];
    int n;
    bool vec;
};

template <int W>
__device__ __forceinline__ void combine_cols(float* out, const float* cy, const CombineSlots& cs, int H) {
    for (int c = W * threadIdx.x; c < H; c += W * blockDim.x) {
        float acc[W], y[W], t[W];
#pragma unroll
        for (int k = 0; k < W; k++) acc[k] = 0.f;
        for (int j = 0; j < cs.n; j++) {
            ldw<W>(y, cy + cs.hi[j] * H + c);
            if (cs.lo[j] >= 0) {
                ldw<W>(t, cy + cs.lo[j] * H + c);
#pragma unroll
                for (int k = 0; k < W; k++) y[k] += t[k];
            }
            if (cs.sc[j]) {
                ldw<W>(t, cs.sc[j] + c);
#pragma unroll
                for (int k = 0; k < W; k++) y[k] *= t[k];
            }
#pragma unroll
            for (int k = 0; k < W; k++) acc[k] += cs.w[j] * y[k];
        }
        stw<W>(out + c, acc);
    }
}

extern "C" __global__ void moe_combine_wide(float* out, const float* cy, const float* wts, const int* slot_of,
                                            const int* expert_of, const int* offsets, const int* rowbase,
                                            const ExpertPtrs* ex, int chscale, int K_top, int H, int split) {
    pdl_start();
    __shared__ CombineSlots cs;
    int t = blockIdx.x;
    if (threadIdx.x == 0) {
        int n = 0;
        bool vec = wide_vec(H, cy, out, nullptr);
        for (int j = 0; j < K_top && n < COMBINE_MAX_K; j++) {
            int s = slot_of[t * K_top + j];
            if (s < 0) continue;
            wide_rows(s, expert_of, offsets, rowbase, split, &cs.hi[n], &cs.lo[n]);
            cs.w[n] = wts[t * K_top + j];
            cs.sc[n] = chscale ? ex[expert_of[s]].s[2] : nullptr;
            vec = vec && wide_vec(H, cs.sc[n], nullptr, nullptr);
            n++;
        }
        cs.n = n;
        cs.vec = vec;
    }
    __syncthreads();
    if (cs.vec) combine_cols<4>(out + (long)t * H, cy, cs, H);
    else combine_cols<1>(out + (long)t * H, cy, cs, H);
}
