// Flash-attention prefill. Compiled as its own module after attention.cu
// (for pack_bf16, mma16816 and fp8x4_bf16), per (ATT_G, ATT_D), for bf16
// and (attention_flash only) e4m3 caches. Two kernels: attention_flash (the
// default, below the first) and attention_flash16, the earlier design kept
// for A/B runs (GLMTOPO_FLASH=old).
#if (KV_BF16 || KV_FP8) && ATT_D <= 128 && ATT_G <= 16
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
#endif

#if KV_BF16 && ATT_D <= 128 && ATT_G <= 16
// attention_flash16: causal prefill on the tensor cores, one block per 16-token
// q tile × the ATT_G q heads of one kv head (warp w takes q head g·G+w), so
// each K/V tile is read from memory once for all of them. K/V come in tiles
// of FL_KT positions through a two-stage cp.async ring in shared memory; each
// warp keeps its 16 rows' online softmax and output in registers over the
// whole context (no split, no merge). Same Q/K dim permutation and P·V
// fragments as attention_mma.
#define FL_KT 32
#define FL_KROW (ATT_D + ((2 * ATT_D) % 128 == 0 ? 32 : 0)) // rows 64 B off a 128 B period: conflict-free uint4 reads
#define FL_VROW (ATT_D + 8)                                // 16 B pad: conflict-free ldmatrix

__device__ __forceinline__ void flash_load(bf16_t* sk, bf16_t* sv, const bf16_t* kc, const bf16_t* vc, const int* table,
                                           int block_size, long kvstride, int g, int base, int end) {
    const int CH = ATT_D / 8, N = FL_KT * CH;
    for (int i = threadIdx.x; i < 2 * N; i += blockDim.x) {
        int which = i / N, j = i % N, row = j / CH, col = j % CH;
        int p = min(base + row, end - 1);
        long slot = (long)table[p / block_size] * block_size + p % block_size;
        const bf16_t* src = (which ? vc : kc) + slot * kvstride + (long)g * ATT_D + col * 8;
        bf16_t* dst = which ? sv + row * FL_VROW + col * 8 : sk + row * FL_KROW + col * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_u32(dst)), "l"(src) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
}

extern "C" __global__ void __launch_bounds__(32 * ATT_G) attention_flash16(
    float* out, const float* q, const bf16_t* kc, const bf16_t* vc, const int* seq_index, const int* positions,
    const int* tables, int table_stride, int block_size, int heads, int kvheads, float scale, const int* tiles) {
    pdl_start();
    __shared__ __align__(16) bf16_t sk[2][FL_KT * FL_KROW];
    __shared__ __align__(16) bf16_t svv[2][FL_KT * FL_VROW];
    const int KK = ATT_D / 32, NT = ATT_D / 8, KH = FL_KT / 8;
    int g = blockIdx.x;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gr = lane >> 2, c = lane & 3;
    int head = g * ATT_G + warp;
    // Tiles in reverse: the longest causal prefixes start first (shorter tail).
    int tile = gridDim.y - 1 - blockIdx.y;
    int first = tiles[2 * tile], rows = tiles[2 * tile + 1];
    int t = first + rows - 1;
    int end = positions[t] + 1;
    const int* table = tables + (long)seq_index[t] * table_stride;
    long kvstride = (long)kvheads * ATT_D;
    int rp0 = positions[first + min(gr, rows - 1)], rp1 = positions[first + min(gr + 8, rows - 1)];
    int nchunks = (end + FL_KT - 1) / FL_KT;
    flash_load(sk[0], svv[0], kc, vc, table, block_size, kvstride, g, 0, end);

    unsigned qa[KK][2][4];
    {
        bool r0 = gr < rows, r1 = gr + 8 < rows;
        const float* q0 = q + ((long)(first + min(gr, rows - 1)) * heads + head) * ATT_D;
        const float* q1 = q + ((long)(first + min(gr + 8, rows - 1)) * heads + head) * ATT_D;
        mma_q_frags(qa, q0, q1, r0, r1, scale, c);
    }
    float o[NT][4];
#pragma unroll
    for (int i = 0; i < NT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    int mi = lane >> 3, r = lane & 7;

    for (int ci = 0; ci < nchunks; ci++) {
        int st = ci & 1, base = ci * FL_KT;
        if (ci + 1 < nchunks) {
            flash_load(sk[st ^ 1], svv[st ^ 1], kc, vc, table, block_size, kvstride, g, base + FL_KT, end);
            asm volatile("cp.async.wait_group 1;" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;" ::: "memory");
        }
        __syncthreads();
        float s[KH][4];
#pragma unroll
        for (int h = 0; h < KH; h++) {
            s[h][0] = s[h][1] = s[h][2] = s[h][3] = 0.f;
            const bf16_t* kr = sk[st] + (h * 8 + gr) * FL_KROW + 8 * c;
#pragma unroll
            for (int kk = 0; kk < KK; kk++) {
                uint4 kv = *(const uint4*)(kr + 32 * kk);
                mma16816(s[h], qa[kk][0], kv.x, kv.y);
                mma16816(s[h], qa[kk][1], kv.z, kv.w);
            }
        }
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int h = 0; h < KH; h++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                int p = base + h * 8 + 2 * c + j;
                if (p >= end || p > rp0) s[h][j] = -INFINITY;
                if (p >= end || p > rp1) s[h][j + 2] = -INFINITY;
                mx0 = fmaxf(mx0, s[h][j]);
                mx1 = fmaxf(mx1, s[h][j + 2]);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        float z0 = mn0 == -INFINITY ? 0.f : mn0, z1 = mn1 == -INFINITY ? 0.f : mn1;
        float c0 = exp2f(m0 - z0), c1 = exp2f(m1 - z1);
        m0 = mn0;
        m1 = mn1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int h = 0; h < KH; h++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                s[h][j] = exp2f(s[h][j] - z0);
                s[h][j + 2] = exp2f(s[h][j + 2] - z1);
                sum0 += s[h][j];
                sum1 += s[h][j + 2];
            }
        l0 = l0 * c0 + sum0;
        l1 = l1 * c1 + sum1;
#pragma unroll
        for (int i = 0; i < NT; i++) {
            o[i][0] *= c0;
            o[i][1] *= c0;
            o[i][2] *= c1;
            o[i][3] *= c1;
        }
        unsigned sv_addr = smem_u32(svv[st]);
#pragma unroll
        for (int ks = 0; ks < FL_KT / 16; ks++) {
            unsigned pa[4] = {pack_bf16(s[2 * ks][0], s[2 * ks][1]), pack_bf16(s[2 * ks][2], s[2 * ks][3]),
                              pack_bf16(s[2 * ks + 1][0], s[2 * ks + 1][1]), pack_bf16(s[2 * ks + 1][2], s[2 * ks + 1][3])};
            unsigned row_addr = sv_addr + (unsigned)(((ks * 16 + r + (mi & 1) * 8) * FL_VROW + (mi >> 1) * 8) * 2);
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                unsigned b0, b1, b2, b3;
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                             : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                             : "r"(row_addr + np * 32));
                mma16816(o[2 * np], pa, b0, b1);
                mma16816(o[2 * np + 1], pa, b2, b3);
            }
        }
        __syncthreads(); // the next iteration's load refills this stage
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    float* o0 = out + ((long)(first + gr) * heads + head) * ATT_D;
    float* o1 = out + ((long)(first + gr + 8) * heads + head) * ATT_D;
#pragma unroll
    for (int i = 0; i < NT; i++) {
        int d = i * 8 + 2 * c;
        if (gr < rows) {
            o0[d] = o[i][0] * i0;
            o0[d + 1] = o[i][1] * i0;
        }
        if (gr + 8 < rows) {
            o1[d] = o[i][2] * i1;
            o1[d + 1] = o[i][3] * i1;
        }
    }
}

#endif

#if (KV_BF16 || KV_FP8) && ATT_D <= 128 && ATT_G <= 16
// attention_flash: the same causal prefill with 32 q rows per warp, FA2-style.
// A block has FL_W warps; warp w takes q head hg·FL_HPB + w % FL_HPB of kv
// head g and two 16-token tiles (m-tiles) of the block's FL_NSUB consecutive
// prefill tiles, so every K/V fragment read from shared memory feeds two mmas
// (half the shared-memory bytes per mma of a 16-row warp). Q waits in shared
// memory as bf16 (pre-scaled, log2 units) and is read with ldmatrix; K with
// ldmatrix, V with ldmatrix.trans, from rows padded by 16 B (conflict-free).
// K/V tiles of FL_BN positions go through a two-stage cp.async ring in
// dynamic shared memory with one __syncthreads per tile: the load of tile
// j+1 is issued right after the barrier that ends every warp's reads of
// tile j-1 and overlaps tile j's math. P stays in registers as the A operand
// of P·V. The causal mask is applied only on tiles that reach past the
// block's first query position. Tiles of one block may belong to several
// sequences (the pair at a sequence boundary): the block then makes one pass
// per sequence over its keys; m-tiles of other sequences compute unused rows.
// Registers: O 2×ATT_D/8×4 = ATT_D floats, S 2×FL_BN/8×4 floats; launch
// bounds (128, 2) give up to 255 per thread so that 2 blocks (8 warps) share
// an SM, 2 × (Q 34 KB + K/V 68 KB) of shared memory at ATT_D 128.
// The host passes FL_W, FL_STAGES and FL_BN. Measured on an H200 at GLM-4.5
// Air's shapes (8192-token prompt), 2026-11-27: 4 warps × 2 stages × 64
// positions 5.02 ms per layer; 64→48 positions 5.05, →32 5.29; 8 warps × 3
// stages (one block per SM) 5.33; attention_flash16 8.7.
#ifndef FL_W
#define FL_W 4 // warps per block
#endif
#ifndef FL_STAGES
#define FL_STAGES 2 // K/V stages in the cp.async ring
#endif
#define FL_HPB (ATT_G < 4 ? ATT_G : 4)            // q heads per block
#define FL_TG (FL_W / FL_HPB)                     // warps per q head (token groups)
#define FL_NSUB (2 * FL_TG)                       // 16-token prefill tiles per block
#define FL_HG ((ATT_G + FL_HPB - 1) / FL_HPB)     // head groups per kv head
#ifndef FL_BN
#define FL_BN 64 // K/V positions per stage (a multiple of 16)
#endif
#define FL_STR (ATT_D + 8)                        // bf16 per staged row: 16 B pad
// The host mirrors FL_HPB, FL_NSUB, FL_HG and the shared-memory size:
// 2 bytes × FL_STR × (FL_W·32 Q rows + FL_STAGES × 2 × FL_BN K/V rows).
//
// An e4m3 cache (KV_FP8): the cp.async ring holds the tiles' bytes
// (FL_STAGES × 2 × FL_BN rows of ATT_D bytes, after one bf16 K/V stage of
// 2 × FL_BN rows), and each thread converts the chunks it copied itself
// into the bf16 stage, so the ring needs no barrier of its own; a second
// barrier per tile then publishes the bf16 stage. The host folds the K
// scale into the softmax scale; the output is multiplied by vscale. Shared
// memory: 2 × FL_STR × (FL_W·32 + 2 × FL_BN) + FL_STAGES × 2 × FL_BN × ATT_D.
#if KV_FP8
// fl_chunks8 calls f(row, col) for this thread's 16-byte chunks of an
// FL_BN-row tile of e4m3 rows: the same chunks on every call.
template <typename F>
__device__ __forceinline__ void fl_chunks8(F f) {
    const int CH = ATT_D / 16, RPI = 32 * FL_W / CH;
    int col = threadIdx.x % CH, r0 = threadIdx.x / CH;
    if (r0 >= RPI) return;
#pragma unroll
    for (int it = 0; it < (FL_BN + RPI - 1) / RPI; it++) {
        int row = r0 + it * RPI;
        if (FL_BN % RPI != 0 && row >= FL_BN) break;
        f(row, col);
    }
}

// fl_load8 copies e4m3 K and V rows base..base+FL_BN-1 (clamped to end-1)
// of kv head g to shared addresses k8/v8 (rows of ATT_D bytes).
__device__ __forceinline__ void fl_load8(unsigned k8, unsigned v8, const fp8_t* kc, const fp8_t* vc, const int* table,
                                         int bshift, int kvstride, int g, int base, int end) {
    fl_chunks8([&](int row, int col) {
        int p = min(base + row, end - 1);
        int slot = (table[p >> bshift] << bshift) + (p & ((1 << bshift) - 1));
        long src = (long)slot * kvstride + (g * ATT_D + col * 16);
        unsigned dst = (unsigned)(row * ATT_D + col * 16);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(k8 + dst), "l"(kc + src) : "memory");
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(v8 + dst), "l"(vc + src) : "memory");
    });
}

// fl_widen8 converts 16 e4m3 bytes to 16 bf16 in order, exactly.
__device__ __forceinline__ void fl_widen8(uint4 x, uint4* out) {
    unsigned w[4] = {x.x, x.y, x.z, x.w}, r[8];
#pragma unroll
    for (int i = 0; i < 4; i++) // bytes 0,2,1,3: the even pair is bytes 0,1, the odd 2,3
        fp8x4_bf16(__byte_perm(w[i], 0, 0x3120), r[2 * i], r[2 * i + 1]);
    out[0] = make_uint4(r[0], r[1], r[2], r[3]);
    out[1] = make_uint4(r[4], r[5], r[6], r[7]);
}

// fl_convert8 widens this thread's chunks of the e4m3 tile at k8/v8 into
// the bf16 K/V stage at sk/sv (rows of FL_STR).
__device__ __forceinline__ void fl_convert8(const unsigned char* k8, const unsigned char* v8, bf16_t* sk, bf16_t* sv) {
    fl_chunks8([&](int row, int col) {
        int src = row * ATT_D + col * 16, dst = row * FL_STR + col * 16;
        fl_widen8(*(const uint4*)(k8 + src), (uint4*)(sk + dst));
        fl_widen8(*(const uint4*)(v8 + src), (uint4*)(sv + dst));
    });
}
#endif

__device__ __forceinline__ float fl_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void ldsm4(unsigned addr, unsigned* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm4t(unsigned addr, unsigned* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// fl_load stages K and V rows base..base+FL_BN-1 (clamped to end-1: the
// extra rows are masked) of kv head g at shared addresses sk/sv. Cache
// blocks hold 1 << bshift positions.
__device__ __forceinline__ void fl_load(unsigned sk, unsigned sv, const bf16_t* kc, const bf16_t* vc, const int* table,
                                        int bshift, int kvstride, int g, int base, int end) {
    // 16-byte chunks per row; rows per sweep of the block (a sweep leaves
    // some threads idle where CH does not divide it: head dim 96).
    const int CH = ATT_D / 8, RPI = 32 * FL_W / CH;
    int col = threadIdx.x % CH, r0 = threadIdx.x / CH;
    if (r0 >= RPI) return;
#pragma unroll
    for (int it = 0; it < (FL_BN + RPI - 1) / RPI; it++) {
        int row = r0 + it * RPI;
        if (FL_BN % RPI != 0 && row >= FL_BN) break;
        int p = min(base + row, end - 1);
        int slot = (table[p >> bshift] << bshift) + (p & ((1 << bshift) - 1));
        long src = (long)slot * kvstride + (g * ATT_D + col * 8);
        unsigned dst = (unsigned)((row * FL_STR + col * 8) * 2);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sk + dst), "l"(kc + src) : "memory");
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sv + dst), "l"(vc + src) : "memory");
    }
}

extern "C" __global__ void __launch_bounds__(32 * FL_W, 8 / FL_W) attention_flash(
    float* out, const float* q, const kv_t* kc, const kv_t* vc, const int* seq_index, const int* positions,
    const int* tables, int table_stride, int block_shift, int heads, int kvheads, float scale, const int* tiles,
    int ntiles KV_VSCALE_ARG) {
    pdl_start();
    extern __shared__ __align__(16) unsigned char fl_smem[];
    // The current pass (thread 0 plans it): sequence, end of its keys, its
    // first query position, its tiles (bit s: tile t0+s), tiles done so far.
    // Read back from shared memory where needed rather than held in registers.
    __shared__ int fl_pass[5];
    const int NK = ATT_D / 16, NS = FL_BN / 8, ND = ATT_D / 8;
    const unsigned ROW = FL_STR * 2, STAGE = FL_BN * ROW;
    bf16_t* sq = (bf16_t*)fl_smem; // [FL_W][32][FL_STR], then K [FL_STAGES][FL_BN][FL_STR], V likewise
#if KV_FP8
    // One bf16 stage, then the e4m3 ring: FL_STAGES × (K, V) × FL_BN rows of ATT_D bytes.
    unsigned sq_a = smem_u32(sq), sk_a = sq_a + FL_W * 32 * ROW, sv_a = sk_a + STAGE;
    unsigned r8_a = sv_a + STAGE;
    const unsigned STAGE8 = FL_BN * ATT_D;
    const unsigned char* ring8 = fl_smem + (r8_a - sq_a);
#else
    unsigned sq_a = smem_u32(sq), sk_a = sq_a + FL_W * 32 * ROW, sv_a = sk_a + FL_STAGES * STAGE;
#endif
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gr = lane >> 2, c = lane & 3;
    int g = blockIdx.x / FL_HG, hl = (blockIdx.x % FL_HG) * FL_HPB + warp % FL_HPB, tg = warp / FL_HPB;
    bool idle = tg >= FL_TG || hl >= ATT_G; // warps beyond the group: loads and barriers only
    int head = g * ATT_G + hl;
    // Blocks in reverse: the longest causal prefixes start first (shorter tail).
    int t0 = (gridDim.y - 1 - blockIdx.y) * FL_NSUB;
    int nsub = min(FL_NSUB, ntiles - t0);
    int kvstride = kvheads * ATT_D;

    // This warp's 32 Q rows (m-tile i = tile t0 + 2·tg + i; rows past a
    // tile's end repeat its last row, rows of missing tiles are zero).
    if (!idle) {
        bf16_t* wq = sq + warp * 32 * FL_STR;
        for (int i = lane; i < 32 * ATT_D / 4; i += 32) {
            int row = i / (ATT_D / 4), col = i % (ATT_D / 4) * 4, s = 2 * tg + row / 16;
            float4 x;
            x.x = x.y = x.z = x.w = 0.f;
            if (s < nsub) {
                int f = tiles[2 * (t0 + s)], n = tiles[2 * (t0 + s) + 1];
                x = *(const float4*)(q + ((long)(f + min(row % 16, n - 1)) * heads + head) * ATT_D + col);
            }
            uint2 u;
            u.x = pack_bf16(x.x * scale, x.y * scale);
            u.y = pack_bf16(x.z * scale, x.w * scale);
            *(uint2*)(wq + row * FL_STR + col) = u;
        }
    }
    if (threadIdx.x == 0) fl_pass[4] = 0;
    // Per-lane ldmatrix addresses: lane l serves row l%8 of 8×8 matrix l/8.
    int j8 = lane >> 3, r8 = lane & 7;
    unsigned q_ln = sq_a + ((warp * 32 + (j8 & 1) * 8 + r8) * FL_STR + (j8 >> 1) * 8) * 2; // a0..a3
    unsigned k_ln = sk_a + (((j8 >> 1) * 8 + r8) * FL_STR + (j8 & 1) * 8) * 2;             // b0,b1 of n-tiles 2np, 2np+1
    unsigned v_ln = sv_a + (((j8 & 1) * 8 + r8) * FL_STR + (j8 >> 1) * 8) * 2;             // likewise, transposed

    for (;;) {
        // One pass per sequence among the block's tiles (several only where
        // the block straddles a sequence boundary).
        if (threadIdx.x == 0) {
            unsigned done = fl_pass[4], act = 0;
            int lead = 0, seq = 0, end = 0, minpos = 0x7fffffff;
            while (lead < nsub && ((done >> lead) & 1u)) lead++;
            if (lead < nsub) seq = seq_index[tiles[2 * (t0 + lead)]];
            for (int s = lead; s < nsub; s++) {
                int f = tiles[2 * (t0 + s)], n = tiles[2 * (t0 + s) + 1];
                if (((done >> s) & 1u) || seq_index[f] != seq) continue;
                act |= 1u << s;
                end = max(end, positions[f + n - 1] + 1); // a tile's positions are consecutive
                minpos = min(minpos, positions[f]);
            }
            fl_pass[0] = seq;
            fl_pass[1] = end;
            fl_pass[2] = minpos;
            fl_pass[3] = act;
            fl_pass[4] = done | act;
        }
        __syncthreads();
        if (fl_pass[3] == 0) break;
        bool on = !idle && ((fl_pass[3] >> (2 * tg)) & 3);
        float o[2][ND][4], m[2][2], l[2][2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
#pragma unroll
            for (int n = 0; n < ND; n++) o[i][n][0] = o[i][n][1] = o[i][n][2] = o[i][n][3] = 0.f;
            m[i][0] = m[i][1] = -INFINITY;
            l[i][0] = l[i][1] = 0.f;
        }
        int nblk = (fl_pass[1] + FL_BN - 1) / FL_BN;
        // Tiles 0..FL_STAGES-2 ahead; one commit group per tile (empty past the end).
#pragma unroll
        for (int st = 0; st < FL_STAGES - 1; st++) {
            if (st < nblk)
#if KV_FP8
                fl_load8(r8_a + 2 * st * STAGE8, r8_a + (2 * st + 1) * STAGE8, kc, vc,
                         tables + (long)fl_pass[0] * table_stride, block_shift, kvstride, g, st * FL_BN, fl_pass[1]);
#else
                fl_load(sk_a + st * STAGE, sv_a + st * STAGE, kc, vc, tables + (long)fl_pass[0] * table_stride,
                        block_shift, kvstride, g, st * FL_BN, fl_pass[1]);
#endif
            asm volatile("cp.async.commit_group;" ::: "memory");
        }
        for (int j = 0; j < nblk; j++) {
            asm volatile("cp.async.wait_group %0;" ::"n"(FL_STAGES - 2) : "memory");
#if KV_FP8
            __syncthreads(); // every warp is done with tile j-1 in the bf16 stage
            int jn = j + FL_STAGES - 1; // refills tile j-1's e4m3 stage (this thread converted its chunks)
            if (jn < nblk)
                fl_load8(r8_a + 2 * (jn % FL_STAGES) * STAGE8, r8_a + (2 * (jn % FL_STAGES) + 1) * STAGE8, kc, vc,
                         tables + (long)fl_pass[0] * table_stride, block_shift, kvstride, g, jn * FL_BN, fl_pass[1]);
            asm volatile("cp.async.commit_group;" ::: "memory");
            fl_convert8(ring8 + 2 * (j % FL_STAGES) * STAGE8, ring8 + (2 * (j % FL_STAGES) + 1) * STAGE8,
                        (bf16_t*)(fl_smem + (sk_a - sq_a)), (bf16_t*)(fl_smem + (sv_a - sq_a)));
            __syncthreads(); // tile j is in the bf16 stage
            if (!on) continue;
            unsigned so = 0;
#else
            __syncthreads(); // tile j is visible; every warp is done with tile j-1's stage
            int jn = j + FL_STAGES - 1; // refills tile j-1's stage
            if (jn < nblk)
                fl_load(sk_a + jn % FL_STAGES * STAGE, sv_a + jn % FL_STAGES * STAGE, kc, vc,
                        tables + (long)fl_pass[0] * table_stride, block_shift, kvstride, g, jn * FL_BN, fl_pass[1]);
            asm volatile("cp.async.commit_group;" ::: "memory");
            if (!on) continue;
            unsigned so = j % FL_STAGES * STAGE;
#endif
            // S = Q·Kᵀ: 32 rows × FL_BN positions.
            float s[2][NS][4];
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int n = 0; n < NS; n++) s[i][n][0] = s[i][n][1] = s[i][n][2] = s[i][n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < NK; kk++) {
                unsigned qa[2][4];
                ldsm4(q_ln + kk * 32, qa[0]);
                ldsm4(q_ln + 16 * ROW + kk * 32, qa[1]);
#pragma unroll
                for (int np = 0; np < NS / 2; np++) {
                    unsigned b[4];
                    ldsm4(k_ln + so + np * 16 * ROW + kk * 32, b);
                    mma16816(s[0][2 * np], qa[0], b[0], b[1]);
                    mma16816(s[0][2 * np + 1], qa[0], b[2], b[3]);
                    mma16816(s[1][2 * np], qa[1], b[0], b[1]);
                    mma16816(s[1][2 * np + 1], qa[1], b[2], b[3]);
                }
            }
            int base = j * FL_BN;
            if (base + FL_BN - 1 > fl_pass[2]) { // the causal edge (and the clamped rows past end)
                unsigned act = fl_pass[3];
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    // This lane's rows gr, gr+8 of m-tile i: their last visible key
                    // (-1: a tile of another sequence, or none).
                    int st = 2 * tg + i, rp[2] = {-1, -1};
                    if ((act >> st) & 1u) {
                        int f = tiles[2 * (t0 + st)], n = tiles[2 * (t0 + st) + 1];
                        rp[0] = positions[f + min(gr, n - 1)];
                        rp[1] = positions[f + min(gr + 8, n - 1)];
                    }
#pragma unroll
                    for (int n = 0; n < NS; n++)
#pragma unroll
                        for (int e = 0; e < 4; e++)
                            if (base + n * 8 + 2 * c + (e & 1) > rp[e >> 1]) s[i][n][e] = -INFINITY;
                }
            }
            // Online softmax (log2 units: Q carries scale·log2 e).
            float corr[2][2], z[2][2];
            bool rescale = false;
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    float mx = -INFINITY;
#pragma unroll
                    for (int n = 0; n < NS; n++) mx = fmaxf(mx, fmaxf(s[i][n][2 * h], s[i][n][2 * h + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    float mn = fmaxf(m[i][h], mx);
                    // A row with no visible key yet keeps a zero state instead of NaN.
                    z[i][h] = mn == -INFINITY ? 0.f : mn;
                    corr[i][h] = fl_ex2(m[i][h] - z[i][h]);
                    rescale |= mn != m[i][h];
                    m[i][h] = mn;
                }
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    float sum = 0.f;
#pragma unroll
                    for (int n = 0; n < NS; n++) {
                        s[i][n][2 * h] = fl_ex2(s[i][n][2 * h] - z[i][h]);
                        s[i][n][2 * h + 1] = fl_ex2(s[i][n][2 * h + 1] - z[i][h]);
                        sum += s[i][n][2 * h] + s[i][n][2 * h + 1];
                    }
                    l[i][h] = l[i][h] * corr[i][h] + sum;
                }
            if (__any_sync(0xffffffffu, rescale)) { // once the maxima settle, most tiles skip this
#pragma unroll
                for (int i = 0; i < 2; i++)
#pragma unroll
                    for (int n = 0; n < ND; n++) {
                        o[i][n][0] *= corr[i][0];
                        o[i][n][1] *= corr[i][0];
                        o[i][n][2] *= corr[i][1];
                        o[i][n][3] *= corr[i][1];
                    }
            }
            // O += P·V with P (bf16) straight from the S registers.
#pragma unroll
            for (int ks = 0; ks < NS / 2; ks++) {
                unsigned pa[2][4];
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    pa[i][0] = pack_bf16(s[i][2 * ks][0], s[i][2 * ks][1]);
                    pa[i][1] = pack_bf16(s[i][2 * ks][2], s[i][2 * ks][3]);
                    pa[i][2] = pack_bf16(s[i][2 * ks + 1][0], s[i][2 * ks + 1][1]);
                    pa[i][3] = pack_bf16(s[i][2 * ks + 1][2], s[i][2 * ks + 1][3]);
                }
#pragma unroll
                for (int np = 0; np < ND / 2; np++) {
                    unsigned b[4];
                    ldsm4t(v_ln + so + ks * 16 * ROW + np * 32, b);
                    mma16816(o[0][2 * np], pa[0], b[0], b[1]);
                    mma16816(o[0][2 * np + 1], pa[0], b[2], b[3]);
                    mma16816(o[1][2 * np], pa[1], b[0], b[1]);
                    mma16816(o[1][2 * np + 1], pa[1], b[2], b[3]);
                }
            }
        }
        if (on) {
            unsigned act = fl_pass[3];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                int st = 2 * tg + i;
                if (!((act >> st) & 1u)) continue;
                int f = tiles[2 * (t0 + st)], n = tiles[2 * (t0 + st) + 1];
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    float lt = l[i][h];
                    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
                    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
                    float inv = lt > 0.f ? __frcp_rn(lt) : 0.f;
#if KV_FP8
                    inv *= vscale;
#endif
                    int row = gr + 8 * h;
                    if (row >= n) continue;
                    float* op = out + ((long)(f + row) * heads + head) * ATT_D + 2 * c;
#pragma unroll
                    for (int nd = 0; nd < ND; nd++) {
                        float2 v;
                        v.x = o[i][nd][2 * h] * inv;
                        v.y = o[i][nd][2 * h + 1] * inv;
                        *(float2*)(op + nd * 8) = v;
                    }
                }
            }
        }
        __syncthreads(); // the next pass refills stage 0 and rewrites fl_pass
    }
}
#endif
