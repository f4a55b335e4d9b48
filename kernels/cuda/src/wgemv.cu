// Wide e4m3 GEMV ("wg_" kernel): Linear layers of 17–64 tokens with e4m3
// weights. The streamed kernel (gemv.cu) takes 16 tokens per pass and each
// warp reads its own activations from L2, so at 64 tokens a 16-row unit
// moved 8× its weight bytes in activations, four times over: GLM-4.5's
// attention projections ran at ~0.5 TB/s (H200, ncu). Here a block owns 64
// rows and stages 256-wide slices of K of all T tokens' activations in
// shared memory once for its 8 warps: warp w takes rows 16·(w%4).. and one
// half (128 weights) of each slice, converts its weights once
// (cvt.rn.f16x2.e4m3x2) and runs them against up to 8 tiles of 8 tokens;
// the two halves meet in shared memory at the end. Each row is read 256
// bytes at a time (a first version read 64 per stage: short DRAM bursts,
// 0.6 TB/s). Weights and activations arrive through a WG_STAGES-deep
// cp.async ring, one barrier per slice. K may be split (few row blocks): the
// last block of a row block adds the partial sums in a fixed order, as in
// gemv.cu. Lane (g, c) handles k in [16c, 16c+16) of each 64-wide chunk, the
// streamed kernel's permutation of the mma's k slots (see sg_sweep).
#ifndef WG_STAGES
#define WG_STAGES 3
#endif
#ifndef WG_ILP
#define WG_ILP 4 // token tiles whose mma chains are interleaved (4 or 8)
#endif
#define WG_T 64          // tokens per launch at most
#define WG_R 64          // rows per block
#define WG_LD (256 + 8)  // halves per staged token row (16 B pad: conflict-free 16-byte reads)

// Dynamic shared memory: activations [WG_STAGES][WG_T][WG_LD] f16, then per
// warp [WG_STAGES][2 chunks][2 rows][32 lanes] uint4 of weights.
#define WG_ACT_BYTES (WG_STAGES * WG_T * WG_LD * 2)
#define WG_SMEM_BYTES (WG_ACT_BYTES + SG_WPB * WG_STAGES * 4 * 32 * 16)

// wg_mma is sg_mma_f16 without volatile: the compiler may interleave
// independent mma chains.
__device__ __forceinline__ void wg_mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                       unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

extern "C" __global__ void __launch_bounds__(32 * SG_WPB, 1)
    wg_linear_fp8(float* out, const unsigned short* x, const float* xinv, const unsigned char* w, const float* scale,
                  int mode, int sb0, int sb1, const float* bias, int T, int N, int K, int P, float* part,
                  int* counters) {
    pdl_start();
    extern __shared__ __align__(16) unsigned char wg_smem[];
    unsigned short* act = (unsigned short*)wg_smem;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    int rg = warp & 3, kh = warp >> 2; // row group, half of each 256-wide slice
    uint4* ring = (uint4*)(wg_smem + WG_ACT_BYTES) + warp * WG_STAGES * 4 * 32;
    int rb = blockIdx.x / P, p = blockIdx.x % P; // row block and K split
    int row0 = rb * WG_R + rg * 16, nch = K / 64;
    int kc0, kc1;
    sg_split(p, P, nch, &kc0, &kc1);
    int nst = (kc1 - kc0 + 3) / 4, ntiles = (T + 7) / 8;
    const char* rows[2];
    sg_rows<WT_FP8>(rows, w, min(row0, N - 1), N, K);
    const float* srow = sg_srow<WT_FP8>(scale, mode, sb0, sb1, min(row0, N - 1), K);
    int cpb = sb1 / 64;
    unsigned act_s = sg_smem(act);
    // issue copies slice i (chunks kc0+4i .. +3, those below kc1) into slot
    // s: the warp's two chunks of its two rows per lane, and the block's
    // share of the T×256 activation tile.
    auto issue = [&](int i, int s) {
        int ck0 = kc0 + 4 * i;
#pragma unroll
        for (int u = 0; u < 2; u++) {
            int ck = ck0 + kh * 2 + u;
            if (ck >= kc1) continue;
            long off = (long)ck * 64 + c * 16;
#pragma unroll
            for (int r = 0; r < 2; r++) sg_cp16(&ring[((s * 2 + u) * 2 + r) * 32 + lane], rows[r] + off);
        }
        int pieces = min(4, kc1 - ck0) * 8; // 16-byte pieces per token row
        for (int e = threadIdx.x; e < ntiles * 8 * 32; e += blockDim.x) {
            int t = e >> 5, q = e & 31;
            if (q >= pieces) continue;
            const unsigned short* src = x + (long)min(t, T - 1) * K + (long)ck0 * 64 + q * 8;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(act_s + ((s * WG_T + t) * WG_LD + q * 8) * 2),
                         "l"(src) : "memory");
        }
        sg_commit();
    };
    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
    for (int s = 0; s < WG_STAGES - 1; s++) {
        if (s < nst) issue(s, s);
        else sg_commit();
    }
    for (int i = 0; i < nst; i++) {
        sg_wait<WG_STAGES - 2>();
        __syncthreads(); // slice i is in; every warp is done with the slot refilled next
        int nx = i + WG_STAGES - 1;
        if (nx < nst) issue(nx, nx % WG_STAGES);
        else sg_commit();
        int slot = i % WG_STAGES;
#pragma unroll
        for (int u = 0; u < 2; u++) {
            int ck = kc0 + 4 * i + kh * 2 + u;
            if (ck >= kc1) break;
            uint4 w0 = ring[((slot * 2 + u) * 2) * 32 + lane], w1 = ring[((slot * 2 + u) * 2 + 1) * 32 + lane];
            unsigned wa[2][4] = {{w0.x, w0.y, w0.z, w0.w}, {w1.x, w1.y, w1.z, w1.w}};
            unsigned a[4][4];
#pragma unroll
            for (int m = 0; m < 4; m++) {
                a[m][0] = sg_e4m3x2(wa[0][m]);
                a[m][1] = sg_e4m3x2(wa[1][m]);
                a[m][2] = sg_e4m3x2(wa[0][m] >> 16);
                a[m][3] = sg_e4m3x2(wa[1][m] >> 16);
            }
            float bs = srow ? srow[ck / cpb] : 1.f;
            const unsigned short* xs = act + (slot * WG_T + g) * WG_LD + (kh * 2 + u) * 64 + c * 16;
            // WG_ILP token tiles at a time, their mma chains interleaved: one
            // tile's four dependent mma in a row left the warp waiting on
            // each (2 warps per scheduler here), ~60 TFLOP/s in all.
#pragma unroll
            for (int jj = 0; jj < 8; jj += WG_ILP) {
                if (jj >= ntiles) break;
                unsigned xw[WG_ILP][8];
#pragma unroll
                for (int j = 0; j < WG_ILP; j++) {
                    uint4 x0 = *(const uint4*)(xs + (jj + j) * 8 * WG_LD), x1 = *(const uint4*)(xs + (jj + j) * 8 * WG_LD + 8);
                    xw[j][0] = x0.x, xw[j][1] = x0.y, xw[j][2] = x0.z, xw[j][3] = x0.w;
                    xw[j][4] = x1.x, xw[j][5] = x1.y, xw[j][6] = x1.z, xw[j][7] = x1.w;
                }
                float t4[WG_ILP][4] = {};
#pragma unroll
                for (int m = 0; m < 4; m++)
#pragma unroll
                    for (int j = 0; j < WG_ILP; j++)
                        wg_mma(t4[j], a[m][0], a[m][1], a[m][2], a[m][3], xw[j][2 * m], xw[j][2 * m + 1]);
#pragma unroll
                for (int j = 0; j < WG_ILP; j++)
#pragma unroll
                    for (int q = 0; q < 4; q++) acc[jj + j][q] += bs * t4[j][q];
            }
        }
    }
    sg_wait<0>();
    __syncthreads(); // the activation ring becomes the halves' meeting area
    float* meet = (float*)wg_smem; // [4 row groups][8][4][32]
    if (kh == 1) {
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) meet[((rg * 8 + j) * 4 + q) * 32 + lane] = acc[j][q];
    }
    __syncthreads();
    if (kh == 0) {
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) {
                float v = acc[j][q] + meet[((rg * 8 + j) * 4 + q) * 32 + lane];
                int t = 8 * j + 2 * c + (q & 1), nn = row0 + g + 8 * (q >> 1);
                if (t >= T || nn >= N) continue;
                if (P == 1)
                    out[(long)t * N + nn] = v * sg_chscale<WT_FP8>(scale, mode, nn) * xinv[t] + (bias ? bias[nn] : 0.f);
                else
                    part[((long)p * T + t) * N + nn] = v;
            }
    }
    if (P == 1) return;
    // The last of the row block's P blocks adds the partials (in order).
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(&counters[rb], 1) == P - 1;
        if (last) counters[rb] = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    int r0 = rb * WG_R;
    for (int e = threadIdx.x; e < WG_R * T; e += blockDim.x) {
        int t = e / WG_R, nn = r0 + e % WG_R;
        if (nn >= N) continue;
        float v = 0.f;
        for (int q = 0; q < P; q++) v += __ldcg(&part[((long)q * T + t) * N + nn]);
        out[(long)t * N + nn] = v * sg_chscale<WT_FP8>(scale, mode, nn) * xinv[t] + (bias ? bias[nn] : 0.f);
    }
}
