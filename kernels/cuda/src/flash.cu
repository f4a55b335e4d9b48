// Flash-attention prefill. Compiled as its own module after attention.cu
// (for pack_bf16 and mma16816), per (ATT_G, ATT_D), bf16 caches only.
#if KV_BF16 && ATT_D <= 128 && ATT_G <= 16
// attention_flash: causal prefill on the tensor cores, one block per 16-token
// q tile × the ATT_G q heads of one kv head (warp w takes q head g·G+w), so
// each K/V tile is read from memory once for all of them. K/V come in tiles
// of FL_KT positions through a two-stage cp.async ring in shared memory; each
// warp keeps its 16 rows' online softmax and output in registers over the
// whole context (no split, no merge). Same Q/K dim permutation and P·V
// fragments as attention_mma.
#define FL_KT 32
#define FL_KROW (ATT_D + ((2 * ATT_D) % 128 == 0 ? 32 : 0)) // rows 64 B off a 128 B period: conflict-free uint4 reads
#define FL_VROW (ATT_D + 8)                                // 16 B pad: conflict-free ldmatrix

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

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

extern "C" __global__ void __launch_bounds__(32 * ATT_G) attention_flash(
    float* out, const float* q, const bf16_t* kc, const bf16_t* vc, const int* seq_index, const int* positions,
    const int* tables, int table_stride, int block_size, int heads, int kvheads, float scale, const int* tiles) {
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
#pragma unroll
        for (int kk = 0; kk < KK; kk++) {
            float x0[8], x1[8];
#pragma unroll
            for (int i = 0; i < 8; i++) {
                x0[i] = r0 ? q0[32 * kk + 8 * c + i] * scale : 0.f;
                x1[i] = r1 ? q1[32 * kk + 8 * c + i] * scale : 0.f;
            }
            qa[kk][0][0] = pack_bf16(x0[0], x0[1]);
            qa[kk][0][1] = pack_bf16(x1[0], x1[1]);
            qa[kk][0][2] = pack_bf16(x0[2], x0[3]);
            qa[kk][0][3] = pack_bf16(x1[2], x1[3]);
            qa[kk][1][0] = pack_bf16(x0[4], x0[5]);
            qa[kk][1][1] = pack_bf16(x1[4], x1[5]);
            qa[kk][1][2] = pack_bf16(x0[6], x0[7]);
            qa[kk][1][3] = pack_bf16(x1[6], x1[7]);
        }
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
