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

extern "C" __global__ void moe_gather_x(bf16_t* xg, const float* x, const int* perm, const int* expert_of,
                                        const int* offsets, const int* rowbase, int K_top, int H, int split) {
    pdl_start();
    int s = blockIdx.x;
    long hi, lo;
    wide_rows(s, expert_of, offsets, rowbase, split, &hi, &lo);
    const float* src = x + (long)(perm[s] / K_top) * H;
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
        float v = src[c];
        bf16_t h = f2bf(v);
        xg[hi * H + c] = h;
        if (lo >= 0) xg[lo * H + c] = f2bf(v - bf2f(h));
    }
}

// chscale: FP8 experts with per-channel scales, expanded without them (the
// bf16 copy holds the e4m3 values exactly); they are applied here to the
// gate/up outputs and in moe_combine_wide to the down outputs.
extern "C" __global__ void moe_swiglu_wide(bf16_t* hg, const float* cg, const float* cu, const int* expert_of,
                                           const int* offsets, const int* rowbase, const ExpertPtrs* ex, int chscale,
                                           int I, int split) {
    pdl_start();
    int s = blockIdx.x;
    long hi, lo;
    wide_rows(s, expert_of, offsets, rowbase, split, &hi, &lo);
    for (int c = threadIdx.x; c < I; c += blockDim.x) {
        float g = cg[hi * I + c], u = cu[hi * I + c];
        if (lo >= 0) {
            g += cg[lo * I + c];
            u += cu[lo * I + c];
        }
        if (chscale) {
            int e = expert_of[s];
            g *= ex[e].s[0][c];
            u *= ex[e].s[1][c];
        }
        float v = g / (1.f + expf(-g)) * u;
        bf16_t h = f2bf(v);
        hg[hi * I + c] = h;
        if (lo >= 0) hg[lo * I + c] = f2bf(v - bf2f(h));
    }
}

extern "C" __global__ void moe_combine_wide(float* out, const float* cy, const float* wts, const int* slot_of,
                                            const int* expert_of, const int* offsets, const int* rowbase,
                                            const ExpertPtrs* ex, int chscale, int K_top, int H, int split) {
    pdl_start();
    int t = blockIdx.x;
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < K_top; j++) {
            int s = slot_of[t * K_top + j];
            if (s < 0) continue;
            long hi, lo;
            wide_rows(s, expert_of, offsets, rowbase, split, &hi, &lo);
            float y = cy[hi * H + c];
            if (lo >= 0) y += cy[lo * H + c];
            if (chscale) y *= ex[expert_of[s]].s[2][c];
            acc += wts[t * K_top + j] * y;
        }
        out[(long)t * H + c] = acc;
    }
}
