// Element-wise, normalisation, rotary, routing, sampling and GEMV kernels (MoE: moe.cu).
// Every kernel has a CPU twin in kernels/cpu; the tests compare them.

extern "C" __global__ void embed_rows(float* out, const void* table, int table_bf16, const int* ids, int T, int H,
                                      int V, int* err) {
    pdl_start();
    int t = blockIdx.x;
    int id = ids[t];
    float* o = out + (long)t * H;
    if (id < 0 || id >= V) {
        if (id >= V && threadIdx.x == 0) atomicOr(err, ERR_BAD_ID);
        for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = 0.f;
        return;
    }
    if (table_bf16) {
        const bf16_t* r = (const bf16_t*)table + (long)id * H;
        for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = bf2f(r[i]);
    } else {
        const float* r = (const float*)table + (long)id * H;
        for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = r[i];
    }
}

// rmsnorm: out = w * x / sqrt(mean(x²)+eps) per row; with add != 0 first
// resid += add and x = resid (the fused residual add).
extern "C" __global__ void rmsnorm(float* out, float* x, const float* add, const float* w, int H, float eps) {
    pdl_start();
    __shared__ float sh[32];
    long row = blockIdx.x;
    float* xr = x + row * H;
    float ss = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float v = xr[i];
        if (add) {
            v += add[row * H + i];
            xr[i] = v;
        }
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    float inv = 1.0f / sqrtf(ss / (float)H + eps);
    float* o = out + row * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = w[i] * (xr[i] * inv);
}

extern "C" __global__ void silu_mul(float* out, const float* g, const float* u, long n) {
    pdl_start();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = g[i];
        out[i] = v / (1.f + expf(-v)) * u[i];
    }
}

extern "C" __global__ void add_f32(float* out, const float* a, const float* b, long n) {
    pdl_start();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

extern "C" __global__ void concat_rows(float* out, const float* a, const float* b, int rows, int na, int nb) {
    pdl_start();
    int r = blockIdx.x;
    for (int i = threadIdx.x; i < na + nb; i += blockDim.x)
        out[(long)r * (na + nb) + i] = i < na ? a[(long)r * na + i] : b[(long)r * nb + i - na];
}

// f32_to_bf16: four floats per thread where both pointers allow (16- and
// 8-byte aligned), the rest one by one.
extern "C" __global__ void f32_to_bf16(bf16_t* out, const float* in, long n) {
    pdl_start();
    long stride = (long)gridDim.x * blockDim.x, i0 = blockIdx.x * (long)blockDim.x + threadIdx.x;
    long n4 = (((size_t)in | (size_t)out) & 7) == 0 && ((size_t)in & 15) == 0 ? n / 4 : 0;
    for (long i = i0; i < n4; i += stride) {
        float4 v = ((const float4*)in)[i];
        uint2 o = {(unsigned)f2bf(v.x) | (unsigned)f2bf(v.y) << 16, (unsigned)f2bf(v.z) | (unsigned)f2bf(v.w) << 16};
        ((uint2*)out)[i] = o;
    }
    for (long i = 4 * n4 + i0; i < n; i += stride) out[i] = f2bf(in[i]);
}

// dequant_fp8: bf16 copy of a scaled e4m3 weight [N,K] (for cuBLAS on wide
// batches). Grid (N, ⌈K/(16·threads)⌉): each thread expands 16 weights of
// one row, with 16-byte loads and 32-byte stores when vec (K % 16 == 0,
// aligned rows, block scales at most once per 16 columns). (A flat loop with
// a 64-bit division per weight ran at ~0.7 TB/s: 23.6 µs per 4096×1408
// expert matrix, H200 ncu, 9 ms of a 40 ms Air fp8 prefill.)
// Per-channel scales are applied to the GEMM's output columns instead
// (finish_gemm), so the bf16 copy holds the e4m3 values exactly (fold != 0
// multiplies them in here too). With lo, the copy is the remainder
// v − bf16(v) instead: scaled weights as two bf16 halves.
__device__ __forceinline__ bf16_t dequant1(unsigned q, float s, int lo) {
    float v = fp82f(q) * s;
    bf16_t h = f2bf(v);
    return lo ? f2bf(v - bf2f(h)) : h;
}

extern "C" __global__ void dequant_fp8(bf16_t* out, const fp8_t* w, const float* scale, int mode, int sb0, int sb1,
                                       int N, int K, int fold, int lo, int vec) {
    pdl_start();
    int r = blockIdx.x, k0 = (blockIdx.y * blockDim.x + threadIdx.x) * 16;
    if (r >= N || k0 >= K) return;
    const fp8_t* wr = w + (long)r * K;
    bf16_t* orow = out + (long)r * K;
    float rs = mode == SCALE_CHANNEL && fold ? scale[r] : 1.f;
    const float* srow = mode == SCALE_BLOCK ? scale + (long)(r / sb0) * ((K + sb1 - 1) / sb1) : nullptr;
    if (vec) {
        uint4 q = *(const uint4*)(wr + k0);
        float s = srow ? srow[k0 / sb1] : rs;
        unsigned in[4] = {q.x, q.y, q.z, q.w}, o[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            unsigned word = in[j / 2] >> (16 * (j & 1));
            o[j] = (unsigned)dequant1(word & 0xffu, s, lo) | (unsigned)dequant1((word >> 8) & 0xffu, s, lo) << 16;
        }
        ((uint4*)(orow + k0))[0] = make_uint4(o[0], o[1], o[2], o[3]);
        ((uint4*)(orow + k0))[1] = make_uint4(o[4], o[5], o[6], o[7]);
        return;
    }
    for (int k = k0; k < min(K, k0 + 16); k++) orow[k] = dequant1(wr[k], srow ? srow[k / sb1] : rs, lo);
}

// qk_norm_rope_kv: grid (tokens, head groups), one warp per head (q heads
// first, then kv heads): optional per-head RMSNorm, NeoX rotary on the
// first rot dims; the warp of kv head j then writes K and V head j into the
// cache. (One block per token doing every head took ~21 µs per layer at
// batch 1 on H200: 104 heads on one SM.) An e4m3 cache (KV = fp8_t) holds
// e4m3(x / scale), ks and vs being its K and V scales (unused otherwise).
template <typename KV>
__device__ void qk_norm_rope_kv_impl(float* q, float* k, const float* v, const float* qn, const float* kn, float eps,
                                     int heads, int kvheads, int D, int rot, double theta, const int* positions,
                                     const int* slots, long nslots, KV* kc, KV* vc, int* err, float ks = 1.f,
                                     float vs = 1.f) {
    int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float pos = (float)positions[t];
    int half = rot / 2;
    // cos/sin once per block (shared by its heads), in double like the CPU twin.
    __shared__ float rc[128], rs[128];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float f = (float)(1.0 / pow(theta, (double)((float)(2 * i) / (float)rot)));
        double a = (double)(pos * f);
        rc[i] = (float)cos(a);
        rs[i] = (float)sin(a);
    }
    __syncthreads();
    int h = blockIdx.y * nw + warp;
    if (h >= heads + kvheads) return;
    float* x = h < heads ? q + ((long)t * heads + h) * D : k + ((long)t * kvheads + (h - heads)) * D;
    const float* nw_ = h < heads ? qn : kn;
    if (nw_) {
        float ss = 0.f;
        for (int i = lane; i < D; i += 32) ss += x[i] * x[i];
        ss = warp_sum(ss);
        float inv = 1.0f / sqrtf(ss / (float)D + eps);
        __syncwarp();
        for (int i = lane; i < D; i += 32) x[i] = nw_[i] * (x[i] * inv);
        __syncwarp();
    }
    for (int i = lane; i < half; i += 32) {
        float c = rc[i], s = rs[i];
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
    __syncwarp();
    if (h < heads) return;
    long slot = slots[t];
    if (slot < 0 || slot >= nslots) {
        if (lane == 0) atomicOr(err, ERR_BAD_SLOT);
        return;
    }
    int j = h - heads, n = kvheads * D;
    const float* vr = v + (long)t * n + (long)j * D;
    long o = slot * n + (long)j * D;
    for (int i = lane; i < D; i += 32) {
        if (sizeof(KV) == 1) {
            ((fp8_t*)kc)[o + i] = f2fp8(__fdiv_rn(x[i], ks));
            ((fp8_t*)vc)[o + i] = f2fp8(__fdiv_rn(vr[i], vs));
        } else if (sizeof(KV) == 2) {
            ((bf16_t*)kc)[o + i] = f2bf(x[i]);
            ((bf16_t*)vc)[o + i] = f2bf(vr[i]);
        } else {
            ((float*)kc)[o + i] = x[i];
            ((float*)vc)[o + i] = vr[i];
        }
    }
}

extern "C" __global__ void qk_norm_rope_kv_f32(float* q, float* k, const float* v, const float* qn, const float* kn,
                                               float eps, int heads, int kvheads, int D, int rot, double theta,
                                               const int* positions, const int* slots, long nslots, float* kc,
                                               float* vc, int* err) {
    pdl_start();
    qk_norm_rope_kv_impl<float>(q, k, v, qn, kn, eps, heads, kvheads, D, rot, theta, positions, slots, nslots, kc, vc,
                                err);
}

extern "C" __global__ void qk_norm_rope_kv_bf16(float* q, float* k, const float* v, const float* qn, const float* kn,
                                                float eps, int heads, int kvheads, int D, int rot, double theta,
                                                const int* positions, const int* slots, long nslots, bf16_t* kc,
                                                bf16_t* vc, int* err) {
    pdl_start();
    qk_norm_rope_kv_impl<bf16_t>(q, k, v, qn, kn, eps, heads, kvheads, D, rot, theta, positions, slots, nslots, kc,
                                 vc, err);
}

extern "C" __global__ void qk_norm_rope_kv_fp8(float* q, float* k, const float* v, const float* qn, const float* kn,
                                               float eps, int heads, int kvheads, int D, int rot, double theta,
                                               const int* positions, const int* slots, long nslots, fp8_t* kc,
                                               fp8_t* vc, int* err, float ks, float vs) {
    pdl_start();
    qk_norm_rope_kv_impl<fp8_t>(q, k, v, qn, kn, eps, heads, kvheads, D, rot, theta, positions, slots, nslots, kc, vc,
                                err, ks, vs);
}

// route: GLM-4.5's sigmoid router, one warp per token (E ≤ 512, G ≤ 64).
// Choice = sigmoid + bias; group-limited (top-2 sum per group); top-k with
// ties to the lower index; weights are the unbiased sigmoid scores.
#define ROUTE_WARPS 4
extern "C" __global__ void route(int* ids, float* wts, const float* logits, const float* bias, int T, int E, int K,
                                 int G, int KG, int norm, float scale) {
    pdl_start();
    __shared__ float sc[ROUTE_WARPS][512];
    __shared__ unsigned char taken[ROUTE_WARPS][512];
    __shared__ float gs[ROUTE_WARPS][64];
    __shared__ unsigned char gkeep[ROUTE_WARPS][64];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= T) return;
    float* choice = sc[warp];
    const float* lg = logits + (long)t * E;
    for (int i = lane; i < E; i += 32) {
        choice[i] = (float)(1.0 / (1.0 + exp(-(double)lg[i]))) + bias[i];
        taken[warp][i] = 0;
    }
    __syncwarp();
    if (G > 1 && KG < G) {
        int per = E / G;
        for (int g = lane; g < G; g += 32) {
            float t1 = -INFINITY, t2 = -INFINITY;
            for (int i = g * per; i < (g + 1) * per; i++) {
                float s = choice[i];
                if (s > t1) { t2 = t1; t1 = s; } else if (s > t2) t2 = s;
            }
            gs[warp][g] = t1 + t2;
            gkeep[warp][g] = 0;
        }
        __syncwarp();
        if (lane == 0) {
            for (int j = 0; j < KG; j++) {
                int best = -1;
                for (int g = 0; g < G; g++)
                    if (!gkeep[warp][g] && (best < 0 || gs[warp][g] > gs[warp][best])) best = g;
                gkeep[warp][best] = 1;
            }
        }
        __syncwarp();
        for (int i = lane; i < E; i += 32)
            if (!gkeep[warp][i / per]) choice[i] = -INFINITY;
        __syncwarp();
    }
    float sum = 0.f, myw = 0.f;
    int myid = 0;
    for (int j = 0; j < K; j++) {
        float bv = 0.f;
        int bi = 0x7fffffff;
        for (int i = lane; i < E; i += 32)
            if (!taken[warp][i] && (bi == 0x7fffffff || choice[i] > bv)) { bv = choice[i]; bi = i; }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            bool better = oi != 0x7fffffff && (bi == 0x7fffffff || ov > bv || (ov == bv && oi < bi));
            if (better) { bv = ov; bi = oi; }
        }
        if (lane == 0) taken[warp][bi] = 1;
        __syncwarp();
        float w = (float)(1.0 / (1.0 + exp(-(double)lg[bi])));
        sum += w;
        if (lane == j) { myw = w; myid = bi; }
    }
    if (lane < K) {
        if (norm) myw /= sum + 1e-20f;
        ids[(long)t * K + lane] = myid;
        wts[(long)t * K + lane] = myw * scale;
    }
}

// argmax_rows: ties go to the lower index, as the CPU sampler does.
extern "C" __global__ void argmax_rows(int* out, const float* logits, int V) {
    pdl_start();
    __shared__ float sv[32];
    __shared__ int si[32];
    const float* r = logits + (long)blockIdx.x * V;
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float x = r[i];
        if (x > best || (x == best && i < bi)) { best = x; bi = i; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) { sv[w] = best; si[w] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 1; i < (int)(blockDim.x >> 5); i++)
            if (sv[i] > best || (sv[i] == best && si[i] < bi)) { best = sv[i]; bi = si[i]; }
        out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
    }
}

// argmax_split: grid (chunks, rows), each block the largest logit of a
// chunk of its row; the last block of a row to finish (a counter per row,
// reset by it) reduces the chunks' results. The rule (larger, then lower
// index) does not depend on the order, so neither does the result. One
// block per row took 60 µs for GLM-4.5's 151552 logits (H200, ncu).
__device__ __forceinline__ void argmax_take(float& best, int& bi, float v, int i) {
    if (v > best || (v == best && i < bi)) { best = v; bi = i; }
}

__device__ __forceinline__ void argmax_block(float& best, int& bi) {
    __shared__ float sv[32];
    __shared__ int si[32];
    for (int o = 16; o > 0; o >>= 1) argmax_take(best, bi, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, bi, o));
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) { sv[w] = best; si[w] = bi; }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int i = 1; i < (int)(blockDim.x >> 5); i++) argmax_take(best, bi, sv[i], si[i]);
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(256) argmax_split(int* out, const float* logits, int V, int chunk,
                                                               float* part_v, int* part_i, int* counters) {
    pdl_start();
    __shared__ bool last;
    int r = blockIdx.y, c = blockIdx.x, nc = gridDim.x;
    const float* row = logits + (long)r * V;
    int c0 = c * chunk, c1 = min(V, c0 + chunk);
    float best = -INFINITY;
    int bi = 0x7fffffff;
#pragma unroll 4
    for (int i = c0 + threadIdx.x; i < c1; i += blockDim.x) argmax_take(best, bi, row[i], i);
    argmax_block(best, bi);
    if (threadIdx.x == 0) {
        part_v[(long)r * nc + c] = best;
        part_i[(long)r * nc + c] = bi;
        __threadfence();
        last = atomicAdd(&counters[r], 1) == nc - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    best = -INFINITY;
    bi = 0x7fffffff;
    for (int i = threadIdx.x; i < nc; i += blockDim.x) argmax_take(best, bi, __ldcg(&part_v[(long)r * nc + i]), __ldcg(&part_i[(long)r * nc + i]));
    argmax_block(best, bi);
    if (threadIdx.x == 0) {
        out[r] = bi == 0x7fffffff ? 0 : bi;
        counters[r] = 0;
    }
}

// ---- Linear (weight-only GEMV for narrow batches) ----
// Each warp computes R consecutive output rows for all T tokens, TB at a time.
template <int WT, int R, int TB>
__device__ void linear_impl(float* out, const float* x, WeightRef wref, const float* bias, int T, int N, int K,
                            int vec) {
    int warp = threadIdx.x >> 5, nw = blockDim.x >> 5, lane = threadIdx.x & 31;
    int n0 = (blockIdx.x * nw + warp) * R;
    if (n0 >= N) return;
    WeightRef wr[R];
    int rows[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        wr[r] = wref;
        rows[r] = n0 + r < N ? n0 + r : -1;
    }
    for (int t0 = 0; t0 < T; t0 += TB) {
        int nt = min(TB, T - t0);
        const float* xs[TB];
#pragma unroll
        for (int j = 0; j < TB; j++) xs[j] = x + (long)(t0 + (j < nt ? j : 0)) * K;
        float acc[R][TB];
        gemv_rows<WT, R, TB>(wr, rows, xs, nt, K, vec != 0, acc);
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int j = 0; j < TB; j++)
                    if (j < nt && rows[r] >= 0)
                        out[(long)(t0 + j) * N + rows[r]] = acc[r][j] + (bias ? bias[rows[r]] : 0.f);
        }
    }
}

// Kernels per weight type × rows per warp (R) × tokens per pass (TB): the
// host picks TB from the batch so that accumulators stay few and occupancy high.
#define LINEAR_KERNEL(name, WT, R, TB)                                                                               \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                             \
        name(float* out, const float* x, const void* w, const float* scale, int mode, int sb0, int sb1,             \
             const float* bias, int T, int N, int K, int vec) { pdl_start();                                                     \
        WeightRef wr = {w, scale, mode, sb0, sb1, sb1 > 0 ? (K + sb1 - 1) / sb1 : 0};                               \
        linear_impl<WT, R, TB>(out, x, wr, bias, T, N, K, vec);                                                     \
    }
#define LINEAR_TBS(wt, WT, R)                                                                                        \
    LINEAR_KERNEL(linear_##wt##_r##R##_t1, WT, R, 1)                                                                 \
    LINEAR_KERNEL(linear_##wt##_r##R##_t2, WT, R, 2)                                                                 \
    LINEAR_KERNEL(linear_##wt##_r##R##_t4, WT, R, 4)                                                                 \
    LINEAR_KERNEL(linear_##wt##_r##R##_t8, WT, R, 8)
LINEAR_TBS(f32, WT_F32, 1)
LINEAR_TBS(f32, WT_F32, 4)
LINEAR_TBS(bf16, WT_BF16, 1)
LINEAR_TBS(bf16, WT_BF16, 4)
LINEAR_TBS(fp8, WT_FP8, 1)
LINEAR_TBS(fp8, WT_FP8, 4)

// ---- Synthetic ("dummy") weights and bandwidth probes ----
__device__ __forceinline__ unsigned hash32(unsigned long long x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return (unsigned)x;
}

// fill_random: uniform in [-scale, scale) as f32 (dt 0), bf16 (dt 1); raw e4m3 bytes (dt 2) never NaN.
extern "C" __global__ void fill_random(void* p, long n, int dt, unsigned long long seed, float scale) {
    pdl_start();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        unsigned h = hash32(seed * 0x9e3779b97f4a7c15ULL + (unsigned long long)i);
        float u = ((float)(h >> 8) * (1.0f / 16777216.0f) * 2.f - 1.f) * scale;
        if (dt == 0) ((float*)p)[i] = u;
        else if (dt == 1) ((bf16_t*)p)[i] = f2bf(u);
        else {
            unsigned q = h & 0xffu;
            if ((q & 0x7fu) >= 0x70u) q &= 0xe7u; // keep |v| modest and never NaN
            ((fp8_t*)p)[i] = (fp8_t)q;
        }
    }
}

extern "C" __global__ void fill_f32(float* p, long n, float v) {
    pdl_start();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) p[i] = v;
}

// read_probe: reads n 16-byte words once (HBM read bandwidth); sums so the loads stay.
extern "C" __global__ void read_probe(const uint4* p, long n, unsigned* sink) {
    pdl_start();
    unsigned acc = 0;
    long stride = (long)gridDim.x * blockDim.x;
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = __ldcs(p + i), b = __ldcs(p + i + stride), c = __ldcs(p + i + 2 * stride), d = __ldcs(p + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n; i += stride) {
        uint4 a = __ldcs(p + i);
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == 0x12345678u) sink[0] = acc;
}

// f32_to_bf16_split: x = hi + lo with hi, lo bf16: hi into rows [0,T), lo into
// rows [T,2T), so one GEMM over 2T rows carries ~16 mantissa bits of x.
extern "C" __global__ void f32_to_bf16_split(bf16_t* out, const float* in, long n) {
    pdl_start();
    long stride = (long)gridDim.x * blockDim.x, i0 = blockIdx.x * (long)blockDim.x + threadIdx.x;
    long n4 = (((size_t)in | (size_t)out) & 7) == 0 && ((size_t)in & 15) == 0 && (n & 3) == 0 ? n / 4 : 0;
    for (long i = i0; i < n4; i += stride) {
        float4 v = ((const float4*)in)[i];
        bf16_t h[4] = {f2bf(v.x), f2bf(v.y), f2bf(v.z), f2bf(v.w)};
        ((uint2*)out)[i] = make_uint2((unsigned)h[0] | (unsigned)h[1] << 16, (unsigned)h[2] | (unsigned)h[3] << 16);
        ((uint2*)(out + n))[i] = make_uint2((unsigned)f2bf(v.x - bf2f(h[0])) | (unsigned)f2bf(v.y - bf2f(h[1])) << 16,
                                            (unsigned)f2bf(v.z - bf2f(h[2])) | (unsigned)f2bf(v.w - bf2f(h[3])) << 16);
    }
    for (long i = 4 * n4 + i0; i < n; i += stride) {
        float x = in[i];
        bf16_t hi = f2bf(x);
        out[i] = hi;
        out[n + i] = f2bf(x - bf2f(hi));
    }
}

// finish_gemm: out[t,n] = (c[t,n] (+ c[T+t,n] when halves)) · colscale[n] +
// bias[n]. Grid (⌈N/(4·threads)⌉, rows ≤ 65535, looping over the rest):
// four columns per thread, with float4 accesses when N % 4 == 0 (the
// buffers come from the allocator, 256-byte aligned).
extern "C" __global__ void finish_gemm(float* out, const float* c, int halves, const float* colscale,
                                       const float* bias, int T, int N) {
    pdl_start();
    int n0 = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (n0 >= N) return;
    long off = (long)T * N;
    float cs[4], bs[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        cs[j] = colscale && n0 + j < N ? colscale[n0 + j] : 1.f;
        bs[j] = bias && n0 + j < N ? bias[n0 + j] : 0.f;
    }
    for (int t = blockIdx.y; t < T; t += gridDim.y) {
        long i = (long)t * N + n0;
        if ((N & 3) == 0) {
            float4 v = *(const float4*)(c + i);
            if (halves) {
                float4 l = *(const float4*)(c + off + i);
                v.x += l.x; v.y += l.y; v.z += l.z; v.w += l.w;
            }
            *(float4*)(out + i) = make_float4(__fadd_rn(__fmul_rn(v.x, cs[0]), bs[0]), __fadd_rn(__fmul_rn(v.y, cs[1]), bs[1]),
                                              __fadd_rn(__fmul_rn(v.z, cs[2]), bs[2]), __fadd_rn(__fmul_rn(v.w, cs[3]), bs[3]));
            continue;
        }
        for (int j = 0; j < 4 && n0 + j < N; j++) {
            float v = c[i + j];
            if (halves) v += c[off + i + j];
            out[i + j] = __fadd_rn(__fmul_rn(v, cs[j]), bs[j]);
        }
    }
}
