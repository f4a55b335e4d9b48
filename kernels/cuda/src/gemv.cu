// Streamed weight-only GEMV for decode ("sg_" kernels): the weights of
// narrow batches (≤ 16 tokens per Linear, a few tokens per routed expert)
// are read once, so these kernels are about keeping HBM busy.
//
// A unit is 16 weight rows × a range of K (chunks of 32 bf16 or 64 e4m3
// weights per row) for the unit's token rows, 8·NTT at a time, and belongs
// to one block. The block's 8 warps take interleaved chunks, so at any
// moment they read 8 consecutive chunks of the same rows (long DRAM
// bursts), each through its own SG_STAGES-deep cp.async ring in shared
// memory (every lane copies the 16-byte pieces it later reads itself, so
// the ring needs no barrier), and multiply on the tensor cores
// (mma.m16n8k16, f32 accumulate); their sums meet in shared memory. When
// units are too few to fill the GPU (a batch-1 step touches 8 experts), K
// is split into P ranges; the last block of a row group to finish (a
// counter per group) adds the P partial sums in a fixed order, so results
// do not depend on timing. (Stream-K shares, measured on H200 2026-11-27,
// were slower: most units then end up cut between two blocks.)
//
// Activations come as planes with x ≈ (hi + lo) · inv: two bf16 planes for
// bf16 weights (inv = 1, ~16 bits of x), and for e4m3 weights, which the
// hardware widens exactly to f16 (cvt.rn.f16x2.e4m3x2: half an instruction
// per weight, against ~8 integer operations to reach bf16), f16 planes
// scaled per row by a power of two: hi alone by default (11 bits of x, more
// than the bf16 activations of FP8 serving kernels, against 4 of the
// weights), hi + lo (~22 bits) with Options.ExactFP8Activations.
#ifndef SG_STAGES
#define SG_STAGES 3
#endif
#ifndef SG_MINB
// Blocks per SM the register budget must allow: 3 (≤ 85 registers, a few
// bytes of spills in the gate/up kernels) beat 2 on every decode row of
// the step benchmarks (H200, 2026-11-27: e.g. GLM-4.5 fp8 batch 64 41% → 45%
// of the floor), the extra warps hiding the loads' latency.
#define SG_MINB 3
#endif
#ifndef SG_WPB
#define SG_WPB 8 // warps per block: they read interleaved chunks of the same rows
#endif

__device__ __forceinline__ unsigned sg_smem(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void sg_cp16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sg_smem(dst)), "l"(src) : "memory");
}

__device__ __forceinline__ void sg_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void sg_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void sg_mma_f16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                           unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// (bf16 products use mma_bf16 from mma.cu, earlier in the ops module.)

// Two e4m3 values (low byte first) → f16x2 (low half first), exactly.
__device__ __forceinline__ unsigned sg_e4m3x2(unsigned v) {
    unsigned r;
    unsigned short h = (unsigned short)v;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(h));
    return r;
}

__device__ __forceinline__ unsigned short sg_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float sg_f16f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// sg_sweep accumulates acc[a][j] (mma C fragments: rows g/g+8, tokens
// 8j+2c, 8j+2c+1) over chunks [kc0, kc1) of NA weight matrices' 16 rows
// (rows[a][0..1]: this lane's rows g and g+8) and ntiles ≤ NTT tiles of 8
// token rows (xr[j]: this lane's token row g of tile j in the hi plane; the
// lo plane is plane elements further; plane 0: no lo plane). srow[a], when not null, is the
// block-scale row of the 16 rows; a scale covers cpb chunks.
template <int WT, int NA, int NTT>
__device__ __forceinline__ void sg_sweep(float (&acc)[NA][NTT][4], const char* (&rows)[NA][2],
                                         const unsigned short* (&xr)[NTT], long plane, int ntiles, int kc0, int kc1,
                                         int step, uint4* ring, const float* (&srow)[NA], int cpb) {
    const int CK = WT == WT_FP8 ? 64 : 32; // weights per row per chunk (16 B per lane)
    const int XW = WT == WT_FP8 ? 2 : 1;   // uint4 of activations per lane per chunk and plane
    const int ESZ = WT == WT_FP8 ? 1 : 2;
    int lane = threadIdx.x & 31, c = lane & 3;
#pragma unroll
    for (int a = 0; a < NA; a++)
#pragma unroll
        for (int j = 0; j < NTT; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[a][j][i] = 0.f;
    int n = kc1 > kc0 ? (kc1 - kc0 + step - 1) / step : 0;
    long lb = (long)c * 16;
#pragma unroll
    for (int s = 0; s < SG_STAGES - 1; s++) {
        if (s < n) {
            long off = (long)(kc0 + s * step) * CK * ESZ + lb;
#pragma unroll
            for (int a = 0; a < NA; a++)
#pragma unroll
                for (int r = 0; r < 2; r++) sg_cp16(&ring[((s * NA + a) * 2 + r) * 32 + lane], rows[a][r] + off);
        }
        sg_commit();
    }
    for (int i = 0; i < n; i++) {
        int kc = kc0 + i * step;
        // Activations first (L1/L2 hits mostly): their latency overlaps the wait.
        uint4 xh[NTT][XW], xl[NTT][XW];
        long xo = (long)kc * CK + c * (CK / 4);
#pragma unroll
        for (int j = 0; j < NTT; j++)
#pragma unroll
            for (int q = 0; q < XW; q++) {
                if (j < ntiles) {
                    xh[j][q] = *(const uint4*)(xr[j] + xo + 8 * q);
                    xl[j][q] = plane ? *(const uint4*)(xr[j] + plane + xo + 8 * q) : make_uint4(0, 0, 0, 0);
                } else {
                    xh[j][q] = make_uint4(0, 0, 0, 0);
                    xl[j][q] = xh[j][q];
                }
            }
        sg_wait<SG_STAGES - 2>();
        int slot = i % SG_STAGES;
        uint4 w[NA][2];
#pragma unroll
        for (int a = 0; a < NA; a++)
#pragma unroll
            for (int r = 0; r < 2; r++) w[a][r] = ring[((slot * NA + a) * 2 + r) * 32 + lane];
        // Refill the slot read in the previous iteration (its values are in registers by now).
        int nx = i + SG_STAGES - 1;
        if (nx < n) {
            int ns = nx % SG_STAGES;
            long off = (long)(kc0 + nx * step) * CK * ESZ + lb;
#pragma unroll
            for (int a = 0; a < NA; a++)
#pragma unroll
                for (int r = 0; r < 2; r++) sg_cp16(&ring[((ns * NA + a) * 2 + r) * 32 + lane], rows[a][r] + off);
        }
        sg_commit();
#pragma unroll
        for (int a = 0; a < NA; a++) {
            float bs = srow[a] ? srow[a][kc / cpb] : 1.f;
            unsigned wa[2][4];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                wa[r][0] = w[a][r].x;
                wa[r][1] = w[a][r].y;
                wa[r][2] = w[a][r].z;
                wa[r][3] = w[a][r].w;
            }
#pragma unroll
            for (int j = 0; j < NTT; j++) {
                if (j >= ntiles) continue;
                float t[4] = {0.f, 0.f, 0.f, 0.f};
                if (WT == WT_BF16) {
                    // lane's 8 weights: k pairs (0,1),(2,3) then (4,5),(6,7)
                    mma_bf16(t, wa[0][0], wa[1][0], wa[0][1], wa[1][1], xh[j][0].x, xh[j][0].y);
                    mma_bf16(t, wa[0][0], wa[1][0], wa[0][1], wa[1][1], xl[j][0].x, xl[j][0].y);
                    mma_bf16(t, wa[0][2], wa[1][2], wa[0][3], wa[1][3], xh[j][0].z, xh[j][0].w);
                    mma_bf16(t, wa[0][2], wa[1][2], wa[0][3], wa[1][3], xl[j][0].z, xl[j][0].w);
                } else {
                    // lane's 16 weights: word m holds weights 4m..4m+3 (mma m)
                    unsigned xhw[8] = {xh[j][0].x, xh[j][0].y, xh[j][0].z, xh[j][0].w,
                                       xh[j][1].x, xh[j][1].y, xh[j][1].z, xh[j][1].w};
                    unsigned xlw[8] = {xl[j][0].x, xl[j][0].y, xl[j][0].z, xl[j][0].w,
                                       xl[j][1].x, xl[j][1].y, xl[j][1].z, xl[j][1].w};
#pragma unroll
                    for (int m = 0; m < 4; m++) {
                        unsigned a0 = sg_e4m3x2(wa[0][m]), a2 = sg_e4m3x2(wa[0][m] >> 16);
                        unsigned a1 = sg_e4m3x2(wa[1][m]), a3 = sg_e4m3x2(wa[1][m] >> 16);
                        sg_mma_f16(t, a0, a1, a2, a3, xhw[2 * m], xhw[2 * m + 1]);
                        if (plane) sg_mma_f16(t, a0, a1, a2, a3, xlw[2 * m], xlw[2 * m + 1]);
                    }
                }
#pragma unroll
                for (int q = 0; q < 4; q++) acc[a][j][q] += bs * t[q];
            }
        }
    }
    sg_wait<0>();
}

// sg_rows sets this lane's weight row pointers for rows row0+g and row0+g+8
// of a [N,K] matrix (clamped: rows past N compute garbage that is not stored).
template <int WT>
__device__ __forceinline__ void sg_rows(const char* (&rows)[2], const void* w, int row0, int N, int K) {
    const int ESZ = WT == WT_FP8 ? 1 : 2;
    int g = (threadIdx.x & 31) >> 2;
    rows[0] = (const char*)w + (long)min(row0 + g, N - 1) * K * ESZ;
    rows[1] = (const char*)w + (long)min(row0 + g + 8, N - 1) * K * ESZ;
}

// sg_split: the K range of split p of P over nch chunks.
__device__ __forceinline__ void sg_split(int p, int P, int nch, int* kc0, int* kc1) {
    *kc0 = (int)((long)p * nch / P);
    *kc1 = (int)((long)(p + 1) * nch / P);
}

// sg_last says whether this warp is the last of P to finish its group's
// partials (then it resets the counter for the next kernel). Partials must
// be written before the call.
__device__ __forceinline__ bool sg_last(int* counter, int P) {
    __threadfence();
    __syncwarp();
    int old = 0;
    if ((threadIdx.x & 31) == 0) old = atomicAdd(counter, 1);
    old = __shfl_sync(0xffffffffu, old, 0);
    if (old != P - 1) return false;
    __threadfence();
    if ((threadIdx.x & 31) == 0) *counter = 0;
    return true;
}

template <int WT>
__device__ __forceinline__ float sg_chscale(const float* scale, int mode, int row) {
    return (WT == WT_FP8 && mode == SCALE_CHANNEL) ? scale[row] : 1.f;
}

template <int WT>
__device__ __forceinline__ const float* sg_srow(const float* scale, int mode, int sb0, int sb1, int row0, int K) {
    if (WT != WT_FP8 || mode != SCALE_BLOCK) return 0;
    return scale + (long)(row0 / sb0) * ((K + sb1 - 1) / sb1);
}

// sg_reduce adds the accumulators of a unit's wpu warps (warps
// [lead, lead+wpu) of the block) into the lead warp's, through the warps'
// own rings (each drained its ring at the end of sg_sweep). Units of one
// block run independently (different token counts), so they meet at named
// barriers, one per unit slot (id 0 stays __syncthreads').
__device__ __forceinline__ void sg_bar(int slot, int wpu) {
    asm volatile("bar.sync %0, %1;" ::"r"(slot + 1), "r"(wpu * 32) : "memory");
}

template <int NA, int NTT>
__device__ __forceinline__ void sg_reduce(float (&acc)[NA][NTT][4], uint4* rings, int stride, int wpu) {
    if (wpu == 1) return;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, slot = warp / wpu, w = warp % wpu;
    const int V = NA * NTT * 4;
    if (w > 0) {
        float* mine = (float*)(rings + warp * stride);
#pragma unroll
        for (int a = 0; a < NA; a++)
#pragma unroll
            for (int j = 0; j < NTT; j++)
#pragma unroll
                for (int q = 0; q < 4; q++) mine[((a * NTT + j) * 4 + q) * 32 + lane] = acc[a][j][q];
    }
    sg_bar(slot, wpu);
    if (w == 0) {
        for (int o = 1; o < wpu; o++) {
            const float* theirs = (const float*)(rings + (warp + o) * stride);
#pragma unroll
            for (int a = 0; a < NA; a++)
#pragma unroll
                for (int j = 0; j < NTT; j++)
#pragma unroll
                    for (int q = 0; q < 4; q++) acc[a][j][q] += theirs[((a * NTT + j) * 4 + q) * 32 + lane];
        }
    }
    sg_bar(slot, wpu);
    (void)V;
}

// SgSegs are up to three Linear layers of one input (q, k and v): one
// launch, one activation split; their row groups are numbered in order.
struct SgSegs {
    float* out[3];
    const void* w[3];
    const float* scale[3];
    const float* bias[3];
    int N[3];
    int nseg;
};

// sg_linear: out[T,N] = x·wᵀ (+bias) for each segment; units = Σ
// ceil(N/16)·P, one per block, whose warps take interleaved chunks of the
// unit's K range; tokens in passes of 8·NTT (a unit's later passes re-read
// its rows from L2). Partial sums of split units sit at the segment's row
// offset in a [P, T, ΣN] buffer.
template <int WT, int NTT>
__device__ void sg_linear_impl(const SgSegs& sg, const unsigned short* x, long plane, const float* xinv, int mode,
                               int sb0, int sb1, int T, int K, int P, float* part, int* counters, uint4* rings,
                               int wpu) {
    const int CK = WT == WT_FP8 ? 64 : 32;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    // A unit takes wpu warps (interleaved chunks); a block runs SG_WPB/wpu units at once.
    int units_per_block = SG_WPB / wpu, wl = warp % wpu;
    const int stride = SG_STAGES * 2 * 32;
    uint4* ring = rings + warp * stride;
    int groups = 0, Ntot = 0, nch = K / CK;
    for (int i = 0; i < sg.nseg; i++) groups += (sg.N[i] + 15) / 16, Ntot += sg.N[i];
    for (int unit = blockIdx.x * units_per_block + warp / wpu; unit < groups * P; unit += gridDim.x * units_per_block) {
        int grp = unit / P, p = unit % P;
        // The unit's segment: its weights, output and row offset.
        int si = 0, lg = grp, nbase = 0;
        while (si + 1 < sg.nseg && lg >= (sg.N[si] + 15) / 16) lg -= (sg.N[si] + 15) / 16, nbase += sg.N[si], si++;
        int N = sg.N[si], row0 = lg * 16;
        const void* w = sg.w[si];
        const float* scale = sg.scale[si];
        const float* bias = sg.bias[si];
        float* out = sg.out[si];
        int kc0, kc1;
        sg_split(p, P, nch, &kc0, &kc1);
        const char* rows[1][2];
        sg_rows<WT>(rows[0], w, row0, N, K);
        const float* srow[1] = {sg_srow<WT>(scale, mode, sb0, sb1, row0, K)};
        for (int t0 = 0; t0 < T; t0 += 8 * NTT) {
            const unsigned short* xr[NTT];
#pragma unroll
            for (int j = 0; j < NTT; j++) xr[j] = x + (long)min(t0 + 8 * j + g, T - 1) * K;
            float acc[1][NTT][4];
            sg_sweep<WT, 1, NTT>(acc, rows, xr, plane, min(NTT, (T - t0 + 7) / 8), kc0 + wl, kc1, wpu, ring, srow,
                                 sb1 / CK);
            sg_reduce<1, NTT>(acc, rings, stride, wpu);
            if (wl != 0) continue;
#pragma unroll
            for (int j = 0; j < NTT; j++)
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    int t = t0 + 8 * j + 2 * c + (q & 1), n = row0 + g + 8 * (q >> 1);
                    if (t >= T || n >= N) continue;
                    if (P == 1) {
                        float v = acc[0][j][q] * sg_chscale<WT>(scale, mode, n) * (xinv ? xinv[t] : 1.f);
                        out[(long)t * N + n] = v + (bias ? bias[n] : 0.f);
                    } else {
                        part[((long)p * T + t) * Ntot + nbase + n] = acc[0][j][q];
                    }
                }
        }
        if (wl != 0 || P == 1 || !sg_last(&counters[grp], P)) continue;
        for (int e = lane; e < 16 * T; e += 32) {
            int t = e / 16, n = row0 + e % 16;
            if (n >= N) continue;
            float v = 0.f;
            for (int q = 0; q < P; q++) v += __ldcg(&part[((long)q * T + t) * Ntot + nbase + n]);
            v *= sg_chscale<WT>(scale, mode, n) * (xinv ? xinv[t] : 1.f);
            out[(long)t * N + n] = v + (bias ? bias[n] : 0.f);
        }
    }
}

// sg_linear_*: one Linear; sg_linear3_*: up to three of one input.
#define SG_LINEAR(wt, WT, NTT)                                                                                       \
    extern "C" __global__ void __launch_bounds__(32 * SG_WPB, SG_MINB) sg_linear_##wt##_n##NTT(                      \
        float* out, const unsigned short* x, long plane, const float* xinv, const void* w, const float* scale,       \
        int mode, int sb0, int sb1, const float* bias, int T, int N, int K, int P, float* part, int* counters,        \
        int wpu) { pdl_start();                                                                                                   \
        __shared__ uint4 ring[SG_WPB][SG_STAGES * 2 * 32];                                                           \
        SgSegs sg = {{out, 0, 0}, {w, 0, 0}, {scale, 0, 0}, {bias, 0, 0}, {N, 0, 0}, 1};                              \
        sg_linear_impl<WT, NTT>(sg, x, plane, xinv, mode, sb0, sb1, T, K, P, part, counters, &ring[0][0], wpu);      \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * SG_WPB, SG_MINB) sg_linear3_##wt##_n##NTT(                     \
        const unsigned short* x, long plane, const float* xinv, int mode, int sb0, int sb1, int T, int K, int P,     \
        float* part, int* counters, int wpu, int nseg, float* out0, const void* w0, const float* s0,                 \
        const float* b0, int n0, float* out1, const void* w1, const float* s1, const float* b1, int n1,              \
        float* out2, const void* w2, const float* s2, const float* b2, int n2) { pdl_start();                                     \
        __shared__ uint4 ring[SG_WPB][SG_STAGES * 2 * 32];                                                           \
        __shared__ SgSegs sg; /* in shared memory: indexed per unit without a local copy */                        \
        if (threadIdx.x == 0) sg = {{out0, out1, out2}, {w0, w1, w2}, {s0, s1, s2}, {b0, b1, b2}, {n0, n1, n2}, nseg}; \
        __syncthreads();                                                                                             \
        sg_linear_impl<WT, NTT>(sg, x, plane, xinv, mode, sb0, sb1, T, K, P, part, counters, &ring[0][0], wpu);      \
    }
SG_LINEAR(bf16, WT_BF16, 1)
SG_LINEAR(bf16, WT_BF16, 2)
SG_LINEAR(fp8, WT_FP8, 1)
SG_LINEAR(fp8, WT_FP8, 2)

// sg_gate_up: h[s, i] = silu(gate_e·x) · (up_e·x) for every routed slot s of
// active expert e (slots sorted by expert: offsets, perm as from moe_plan);
// units = active experts × ceil(I/16) × P, tokens in passes of 8·NTT.
template <int WT, int NTT>
__device__ void sg_gate_up_impl(float* h, const unsigned short* x, long xplane, const float* xinv,
                                const ExpertPtrs* ex, int E, const int* offsets, const int* active, const int* perm,
                                int K_top, int I, int H, int mode, int sb0, int sb1, int P, float* part,
                                int* counters, uint4* rings, int wpu) {
    const int CK = WT == WT_FP8 ? 64 : 32;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    // A unit takes wpu warps (interleaved chunks); a block runs SG_WPB/wpu units at once.
    int units_per_block = SG_WPB / wpu, wl = warp % wpu;
    const int stride = SG_STAGES * 4 * 32;
    uint4* ring = rings + warp * stride;
    int groups = (I + 15) / 16, nch = H / CK, A = offsets[E];
    int work = offsets[E + 1] * groups * P;
    for (int unit = blockIdx.x * units_per_block + warp / wpu; unit < work; unit += gridDim.x * units_per_block) {
        int item = unit / P, p = unit % P;
        int e = active[item / groups], row0 = (item % groups) * 16;
        int s0 = offsets[e], s1 = offsets[e + 1];
        int kc0, kc1;
        sg_split(p, P, nch, &kc0, &kc1);
        const char* rows[2][2];
        sg_rows<WT>(rows[0], ex[e].w[0], row0, I, H);
        sg_rows<WT>(rows[1], ex[e].w[1], row0, I, H);
        const float* srow[2] = {sg_srow<WT>(ex[e].s[0], mode, sb0, sb1, row0, H),
                                sg_srow<WT>(ex[e].s[1], mode, sb0, sb1, row0, H)};
        for (int t0 = s0; t0 < s1; t0 += 8 * NTT) {
            const unsigned short* xr[NTT];
#pragma unroll
            for (int j = 0; j < NTT; j++) xr[j] = x + (long)(perm[min(t0 + 8 * j + g, s1 - 1)] / K_top) * H;
            float acc[2][NTT][4];
            sg_sweep<WT, 2, NTT>(acc, rows, xr, xplane, min(NTT, (s1 - t0 + 7) / 8), kc0 + wl, kc1, wpu,
                                 ring, srow, sb1 / CK);
            sg_reduce<2, NTT>(acc, rings, stride, wpu);
            if (wl != 0) continue;
#pragma unroll
            for (int j = 0; j < NTT; j++)
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    int s = t0 + 8 * j + 2 * c + (q & 1), i = row0 + g + 8 * (q >> 1);
                    if (s >= s1 || i >= I) continue;
                    if (P == 1) {
                        float xs = xinv ? xinv[perm[s] / K_top] : 1.f;
                        float a = acc[0][j][q] * sg_chscale<WT>(ex[e].s[0], mode, i) * xs;
                        float b = acc[1][j][q] * sg_chscale<WT>(ex[e].s[1], mode, i) * xs;
                        h[(long)s * I + i] = a / (1.f + expf(-a)) * b;
                    } else {
                        part[((long)p * A + s) * 2 * I + i] = acc[0][j][q];
                        part[((long)p * A + s) * 2 * I + I + i] = acc[1][j][q];
                    }
                }
        }
        if (wl != 0 || P == 1 || !sg_last(&counters[item], P)) continue;
        for (int el = lane; el < 16 * (s1 - s0); el += 32) {
            int s = s0 + el / 16, i = row0 + el % 16;
            if (i >= I) continue;
            float a = 0.f, b = 0.f;
            for (int q = 0; q < P; q++) {
                a += __ldcg(&part[((long)q * A + s) * 2 * I + i]);
                b += __ldcg(&part[((long)q * A + s) * 2 * I + I + i]);
            }
            float xs = xinv ? xinv[perm[s] / K_top] : 1.f;
            a *= sg_chscale<WT>(ex[e].s[0], mode, i) * xs;
            b *= sg_chscale<WT>(ex[e].s[1], mode, i) * xs;
            h[(long)s * I + i] = a / (1.f + expf(-a)) * b;
        }
    }
}

// sg_down: y[s, n] = down_e·h[s] for every routed slot s of active expert e.
template <int WT, int NTT>
__device__ void sg_down_impl(float* y, const unsigned short* hp, long hplane, const float* hinv, const ExpertPtrs* ex,
                             int E, const int* offsets, const int* active, int I, int H, int mode, int sb0, int sb1,
                             int P, float* part, int* counters, uint4* rings, int wpu) {
    const int CK = WT == WT_FP8 ? 64 : 32;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    // A unit takes wpu warps (interleaved chunks); a block runs SG_WPB/wpu units at once.
    int units_per_block = SG_WPB / wpu, wl = warp % wpu;
    const int stride = SG_STAGES * 2 * 32;
    uint4* ring = rings + warp * stride;
    int groups = (H + 15) / 16, nch = I / CK, A = offsets[E];
    int work = offsets[E + 1] * groups * P;
    for (int unit = blockIdx.x * units_per_block + warp / wpu; unit < work; unit += gridDim.x * units_per_block) {
        int item = unit / P, p = unit % P;
        int e = active[item / groups], row0 = (item % groups) * 16;
        int s0 = offsets[e], s1 = offsets[e + 1];
        int kc0, kc1;
        sg_split(p, P, nch, &kc0, &kc1);
        const char* rows[1][2];
        sg_rows<WT>(rows[0], ex[e].w[2], row0, H, I);
        const float* srow[1] = {sg_srow<WT>(ex[e].s[2], mode, sb0, sb1, row0, I)};
        for (int t0 = s0; t0 < s1; t0 += 8 * NTT) {
            const unsigned short* xr[NTT];
#pragma unroll
            for (int j = 0; j < NTT; j++) xr[j] = hp + (long)min(t0 + 8 * j + g, s1 - 1) * I;
            float acc[1][NTT][4];
            sg_sweep<WT, 1, NTT>(acc, rows, xr, hplane, min(NTT, (s1 - t0 + 7) / 8), kc0 + wl, kc1, wpu,
                                 ring, srow, sb1 / CK);
            sg_reduce<1, NTT>(acc, rings, stride, wpu);
            if (wl != 0) continue;
#pragma unroll
            for (int j = 0; j < NTT; j++)
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    int s = t0 + 8 * j + 2 * c + (q & 1), n = row0 + g + 8 * (q >> 1);
                    if (s >= s1 || n >= H) continue;
                    if (P == 1)
                        y[(long)s * H + n] =
                            acc[0][j][q] * sg_chscale<WT>(ex[e].s[2], mode, n) * (hinv ? hinv[s] : 1.f);
                    else
                        part[((long)p * A + s) * H + n] = acc[0][j][q];
                }
        }
        if (wl != 0 || P == 1 || !sg_last(&counters[item], P)) continue;
        for (int el = lane; el < 16 * (s1 - s0); el += 32) {
            int s = s0 + el / 16, n = row0 + el % 16;
            if (n >= H) continue;
            float v = 0.f;
            for (int q = 0; q < P; q++) v += __ldcg(&part[((long)q * A + s) * H + n]);
            y[(long)s * H + n] = v * sg_chscale<WT>(ex[e].s[2], mode, n) * (hinv ? hinv[s] : 1.f);
        }
    }
}

#define SG_MOE(wt, WT, NTT)                                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * SG_WPB, SG_MINB) sg_gate_up_##wt##_n##NTT(                             \
        float* h, const unsigned short* x, long xplane, const float* xinv, const ExpertPtrs* ex, int E,              \
        const int* offsets, const int* active, const int* perm, int K_top, int I, int H, int mode, int sb0, int sb1,  \
        int P, float* part, int* counters, int wpu) { pdl_start();                                                                 \
        __shared__ uint4 ring[SG_WPB][SG_STAGES * 4 * 32];                                                           \
        sg_gate_up_impl<WT, NTT>(h, x, xplane, xinv, ex, E, offsets, active, perm, K_top, I, H, mode, sb0, sb1, P,   \
                                 part, counters, &ring[0][0], wpu);                                                 \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * SG_WPB, SG_MINB) sg_down_##wt##_n##NTT(                                \
        float* y, const unsigned short* hp, long hplane, const float* hinv, const ExpertPtrs* ex, int E,             \
        const int* offsets, const int* active, int I, int H, int mode, int sb0, int sb1, int P, float* part,         \
        int* counters, int wpu) { pdl_start();                                                                                     \
        __shared__ uint4 ring[SG_WPB][SG_STAGES * 2 * 32];                                                           \
        sg_down_impl<WT, NTT>(y, hp, hplane, hinv, ex, E, offsets, active, I, H, mode, sb0, sb1, P, part, counters,  \
                              &ring[0][0], wpu);                                                                     \
    }
SG_MOE(bf16, WT_BF16, 1)
SG_MOE(bf16, WT_BF16, 2)
SG_MOE(fp8, WT_FP8, 1)
SG_MOE(fp8, WT_FP8, 2)

// sg_split_f16: each row of x [rows, K] (K a multiple of 4) as f16 planes
// (hi at [0, rows·K), lo after it when two) with x ≈ (hi + lo)·inv[row]: the
// row is scaled by a power of two that puts its largest magnitude in
// [2^14, 2^15), so neither plane overflows and lo keeps the next 11 bits.
// One block of 1024 threads per row; the row stays in registers between
// the max and the writes (one pass over memory for rows up to 16384).
#define SG_SPLIT_V 4
__device__ __forceinline__ uint2 sg_f16x4(float4 v, float s, uint2* lo) {
    float a[4] = {v.x * s, v.y * s, v.z * s, v.w * s};
    unsigned short h[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        h[i] = sg_f16(a[i]);
        l[i] = sg_f16(a[i] - sg_f16f(h[i]));
    }
    *lo = make_uint2(l[0] | ((unsigned)l[1] << 16), l[2] | ((unsigned)l[3] << 16));
    return make_uint2(h[0] | ((unsigned)h[1] << 16), h[2] | ((unsigned)h[3] << 16));
}

extern "C" __global__ void __launch_bounds__(1024) sg_split_f16(unsigned short* planes, float* inv, const float* x,
                                                                int rows, int K, int two) {
    pdl_start();
    __shared__ float sh[32];
    int r = blockIdx.x, k4 = K / 4;
    const float4* xr = (const float4*)(x + (long)r * K);
    uint2* hi = (uint2*)(planes + (long)r * K);
    uint2* lo = (uint2*)(planes + (long)rows * K + (long)r * K);
    float4 v[SG_SPLIT_V];
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < SG_SPLIT_V; i++) {
        int idx = threadIdx.x + i * blockDim.x;
        v[i] = idx < k4 ? xr[idx] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int i = 0; i < SG_SPLIT_V; i++) m = fmaxf(m, fmaxf(fmaxf(fabsf(v[i].x), fabsf(v[i].y)), fmaxf(fabsf(v[i].z), fabsf(v[i].w))));
    for (int idx = threadIdx.x + SG_SPLIT_V * blockDim.x; idx < k4; idx += blockDim.x) {
        float4 t = xr[idx];
        m = fmaxf(m, fmaxf(fmaxf(fabsf(t.x), fabsf(t.y)), fmaxf(fabsf(t.z), fabsf(t.w))));
    }
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = m;
    __syncthreads();
    m = 0.f;
    for (int i = 0; i < (int)(blockDim.x + 31) / 32; i++) m = fmaxf(m, sh[i]);
    int e = (int)((__float_as_uint(m) >> 23) & 0xffu); // biased exponent of the max
    float s = 1.f;
    if (m > 0.f && e < 255) s = __uint_as_float((unsigned)min(max(127 + 14 - (e - 127), 1), 254) << 23);
    if (threadIdx.x == 0) inv[r] = 1.f / s;
#pragma unroll
    for (int i = 0; i < SG_SPLIT_V; i++) {
        int idx = threadIdx.x + i * blockDim.x;
        if (idx < k4) {
            uint2 l;
            hi[idx] = sg_f16x4(v[i], s, &l);
            if (two) lo[idx] = l;
        }
    }
    for (int idx = threadIdx.x + SG_SPLIT_V * blockDim.x; idx < k4; idx += blockDim.x) {
        uint2 l;
        hi[idx] = sg_f16x4(xr[idx], s, &l);
        if (two) lo[idx] = l;
    }
}
