// Paged attention, split over the context (flash-decoding). Compiled per
// (ATT_G q heads per kv head, ATT_D head dim, cache type: KV_BF16, KV_FP8 or
// neither for f32). An e4m3 cache (KV_FP8) holds k / k_scale and v / v_scale:
// the host folds k_scale into the softmax scale, and the kernels multiply
// their (unnormalised) output by vscale, an extra last argument.
// Grid (kvheads, tokens, splits), 128 threads: each warp takes 32 positions at
// a time (one per lane for the scores, then all lanes over the head dims for
// V), keeps an online softmax per q head, and the 4 warps merge at the end.
// With one split the block writes the normalised output; otherwise partial
// (max, sum, acc) go to attention_combine. Scores are in log2 units: the
// host folds log2(e) into the scale and the kernels use exp2.
#ifndef ATT_G
#define ATT_G 1
#endif
#ifndef ATT_D
#define ATT_D 64
#endif
#ifndef KV_FP8
#define KV_FP8 0
#endif
#if KV_FP8
typedef fp8_t kv_t;
#define KV_VSCALE_ARG , float vscale
#elif KV_BF16
typedef bf16_t kv_t;
#else
typedef float kv_t;
#endif
#ifndef KV_VSCALE_ARG
#define KV_VSCALE_ARG
#endif
#define AW 4
#define DPL (ATT_D / 32)

__device__ __forceinline__ void load_row8(const kv_t* p, float* out) {
#if KV_FP8
    uint2 u = *(const uint2*)p;
    unsigned x[2] = {u.x, u.y};
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) out[4 * i + j] = fp82f((x[i] >> (8 * j)) & 0xffu);
#elif KV_BF16
    uint4 u = *(const uint4*)p;
    unsigned x[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(x[i] << 16);
        out[2 * i + 1] = __uint_as_float(x[i] & 0xffff0000u);
    }
#else
    float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w; out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
#endif
}

__device__ __forceinline__ float kv_at(const kv_t* p, int i) {
#if KV_FP8
    return fp82f(p[i]);
#elif KV_BF16
    return bf2f(p[i]);
#else
    return p[i];
#endif
}

extern "C" __global__ void __launch_bounds__(128) attention_split(
    float* out, float* part_acc, float* part_ml, const float* q, const kv_t* kc, const kv_t* vc, const int* seq_index,
    const int* positions, const int* tables, int table_stride, int block_size, int heads, int kvheads, float scale,
    int split_len, int nsplit KV_VSCALE_ARG) {
    pdl_start();
    extern __shared__ float smem[];
    float* sq = smem;                            // [G][D]
    float* sp = sq + ATT_G * ATT_D;              // [AW][G][32]
    float* sacc = sp + AW * ATT_G * 32;          // [AW][G][D]
    float* sml = sacc + AW * ATT_G * ATT_D;      // [AW][G][2]
    int g = blockIdx.x, t = blockIdx.y, split = blockIdx.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int n = positions[t] + 1;
    int start = split * split_len, end = min(n, start + split_len);
    const int* table = tables + (long)seq_index[t] * table_stride;
    long kvstride = (long)kvheads * ATT_D;
    for (int i = threadIdx.x; i < ATT_G * ATT_D; i += blockDim.x)
        sq[i] = q[((long)t * heads + g * ATT_G) * ATT_D + i] * scale;
    __syncthreads();

    float m[ATT_G], l[ATT_G], acc[ATT_G][DPL];
#pragma unroll
    for (int h = 0; h < ATT_G; h++) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[h][i] = 0.f;
    }
    float* mysp = sp + warp * ATT_G * 32;
    for (int base = start + warp * 32; base < end; base += AW * 32) {
        int p = base + lane;
        float s[ATT_G];
        if (p < end) {
            long slot = (long)table[p / block_size] * block_size + p % block_size;
            const kv_t* kr = kc + slot * kvstride + (long)g * ATT_D;
#pragma unroll
            for (int h = 0; h < ATT_G; h++) s[h] = 0.f;
            if ((ATT_D & 7) == 0) {
#pragma unroll 4
                for (int d = 0; d < ATT_D; d += 8) {
                    float kv[8];
                    load_row8(kr + d, kv);
#pragma unroll
                    for (int h = 0; h < ATT_G; h++) {
                        const float* qh = sq + h * ATT_D + d;
#pragma unroll
                        for (int i = 0; i < 8; i++) s[h] = fmaf(qh[i], kv[i], s[h]);
                    }
                }
            } else {
                for (int d = 0; d < ATT_D; d++) {
                    float kv = kv_at(kr, d);
#pragma unroll
                    for (int h = 0; h < ATT_G; h++) s[h] = fmaf(sq[h * ATT_D + d], kv, s[h]);
                }
            }
        } else {
#pragma unroll
            for (int h = 0; h < ATT_G; h++) s[h] = -INFINITY;
        }
#pragma unroll
        for (int h = 0; h < ATT_G; h++) {
            float mt = warp_max(s[h]);
            float mn = fmaxf(m[h], mt);
            float corr = exp2f(m[h] - mn);
            float e = exp2f(s[h] - mn);
            l[h] = l[h] * corr + warp_sum(e);
            m[h] = mn;
#pragma unroll
            for (int i = 0; i < DPL; i++) acc[h][i] *= corr;
            mysp[h * 32 + lane] = e;
        }
        __syncwarp();
        int cnt = min(32, end - base);
        for (int j = 0; j < cnt; j++) {
            int pj = base + j;
            long slot = (long)table[pj / block_size] * block_size + pj % block_size;
            const kv_t* vr = vc + slot * kvstride + (long)g * ATT_D + lane * DPL;
            float v[DPL];
#pragma unroll
            for (int i = 0; i < DPL; i++) v[i] = kv_at(vr, i);
#pragma unroll
            for (int h = 0; h < ATT_G; h++) {
                float e = mysp[h * 32 + j];
#pragma unroll
                for (int i = 0; i < DPL; i++) acc[h][i] = fmaf(e, v[i], acc[h][i]);
            }
        }
        __syncwarp();
    }
    // Merge the warps.
#pragma unroll
    for (int h = 0; h < ATT_G; h++) {
#pragma unroll
        for (int i = 0; i < DPL; i++) sacc[(warp * ATT_G + h) * ATT_D + lane * DPL + i] = acc[h][i];
        if (lane == 0) {
            sml[(warp * ATT_G + h) * 2] = m[h];
            sml[(warp * ATT_G + h) * 2 + 1] = l[h];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < ATT_G * ATT_D; idx += blockDim.x) {
        int h = idx / ATT_D, d = idx % ATT_D;
        float M = -INFINITY;
        for (int w = 0; w < AW; w++) M = fmaxf(M, sml[(w * ATT_G + h) * 2]);
        float L = 0.f, A = 0.f;
        if (M != -INFINITY) {
            for (int w = 0; w < AW; w++) {
                float mw = sml[(w * ATT_G + h) * 2];
                if (mw == -INFINITY) continue;
                float c = exp2f(mw - M);
                L += sml[(w * ATT_G + h) * 2 + 1] * c;
                A += sacc[(w * ATT_G + h) * ATT_D + d] * c;
            }
        }
#if KV_FP8
        A *= vscale;
#endif
        long qh = (long)t * heads + g * ATT_G + h;
        if (nsplit == 1) {
            out[qh * ATT_D + d] = L > 0.f ? A / L : 0.f;
        } else {
            part_acc[(qh * nsplit + split) * ATT_D + d] = A;
            if (d == 0) {
                part_ml[(qh * nsplit + split) * 2] = M;
                part_ml[(qh * nsplit + split) * 2 + 1] = L;
            }
        }
    }
}

// attention_combine: grid (heads, tokens), up to 128 threads, nsplit
// floats of dynamic shared memory. The splits' weights 2^(m_s - M) are
// computed once per block (each thread used to walk every split's (m, l)
// itself: 11 µs per layer at batch 1 with 32 splits, H200).
extern "C" __global__ void attention_combine(float* out, const float* part_acc, const float* part_ml, int heads,
                                             int nsplit) {
    pdl_start();
    extern __shared__ float cw[]; // [nsplit]
    __shared__ float red[32];
    long qh = (long)blockIdx.y * heads + blockIdx.x;
    const float* ml = part_ml + qh * nsplit * 2;
    float m = -INFINITY;
    for (int s = threadIdx.x; s < nsplit; s += blockDim.x) m = fmaxf(m, ml[2 * s]);
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    float M = -INFINITY;
    for (int i = 0; i < (int)(blockDim.x + 31) / 32; i++) M = fmaxf(M, red[i]);
    __syncthreads();
    float l = 0.f;
    for (int s = threadIdx.x; s < nsplit; s += blockDim.x) {
        float ms = ml[2 * s];
        float c = ms == -INFINITY ? 0.f : exp2f(ms - M);
        cw[s] = c;
        l += ml[2 * s + 1] * c;
    }
    float L = block_sum(l, red); // synchronises: cw is complete
    const float* acc = part_acc + qh * nsplit * ATT_D;
    for (int d = threadIdx.x; d < ATT_D; d += blockDim.x) {
        float A = 0.f;
#pragma unroll 4
        for (int s = 0; s < nsplit; s++) {
            float c = cw[s];
            if (c != 0.f) A += acc[(long)s * ATT_D + d] * c; // empty splits leave acc unwritten
        }
        out[qh * ATT_D + d] = L > 0.f ? A / L : 0.f;
    }
}

#if (KV_BF16 || KV_FP8) && ATT_D <= 128
// attention_mma: the same split attention on the tensor cores, for bf16 and
// e4m3 caches and up to 16 q heads per kv head. One warp takes 16 positions at a
// time: S = Q·Kᵀ as 16 (heads, zero-padded) × 16 positions with
// mma.m16n8k16 (bf16 in, f32 accumulate), an online softmax per head, then
// O += P·V with P straight from the S registers and V through shared memory
// (ldmatrix.trans). The head dims are permuted consistently in Q and K so
// that every lane loads K with 16-byte loads.
#define MMA_ROWSTRIDE (ATT_D + 8) // bf16 elements per staged V row (16 B pad: no bank conflicts)
// An e4m3 cache is staged as rows of bytes, K rows 32 B and V rows 16 B
// longer than a head so that the lanes' reads (8 B of K, 4 B of V) are
// free of bank conflicts, and converted to bf16 in registers.
#define MMA_KROW8 (ATT_D + 32)
#define MMA_VROW8 (ATT_D + 16)
// Dynamic shared memory of attention_mma: the larger of the stages (4 warps
// × 2 × (K 16×D + V 16×MMA_ROWSTRIDE) bf16, or 16 rows of MMA_KROW8 +
// MMA_VROW8 bytes) and the merge area.
#if KV_FP8
#define MMA_STAGES_BYTES (AW * 2 * 16 * (MMA_KROW8 + MMA_VROW8))
#else
#define MMA_STAGES_BYTES (AW * 2 * (16 * ATT_D + 16 * MMA_ROWSTRIDE) * 2)
#endif
#define MMA_MERGE_BYTES (AW * 16 * ATT_D * 4 + AW * 16 * 2 * 4)

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// mma_q_frags loads this lane's A fragments (m16n8k16, bf16) of two q rows
// scaled by scale: q0 is the lane's row gr, q1 row gr+8; a row that does not
// exist (r0/r1 false) is zeros. Lane column group c = lane & 3. The mma's k
// index 2c+{0,1,8,9} (+16 for the second fragment) takes head dim
// 32kk+8c+{0,1,2,3} (+4), or with EO (even/odd, for e4m3 K: fp8x4_bf16)
// 32kk+8c+{0,2,1,3} (+4); K is loaded to match.
template <bool EO = false>
__device__ __forceinline__ void mma_q_frags(unsigned (&qa)[ATT_D / 32][2][4], const float* q0, const float* q1, bool r0,
                                            bool r1, float scale, int c) {
    const int KK = ATT_D / 32, i1 = EO ? 2 : 1, i2 = EO ? 1 : 2;
#pragma unroll
    for (int kk = 0; kk < KK; kk++) {
        float x0[8], x1[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            x0[i] = r0 ? q0[32 * kk + 8 * c + i] * scale : 0.f;
            x1[i] = r1 ? q1[32 * kk + 8 * c + i] * scale : 0.f;
        }
        qa[kk][0][0] = pack_bf16(x0[0], x0[i1]);
        qa[kk][0][1] = pack_bf16(x1[0], x1[i1]);
        qa[kk][0][2] = pack_bf16(x0[i2], x0[3]);
        qa[kk][0][3] = pack_bf16(x1[i2], x1[3]);
        qa[kk][1][0] = pack_bf16(x0[4], x0[4 + i1]);
        qa[kk][1][1] = pack_bf16(x1[4], x1[4 + i1]);
        qa[kk][1][2] = pack_bf16(x0[4 + i2], x0[7]);
        qa[kk][1][3] = pack_bf16(x1[4 + i2], x1[7]);
    }
}

// fp8x4_bf16 converts four e4m3 bytes to bf16x2 pairs, exactly: even holds
// bytes 0 (low half) and 2, odd bytes 1 and 3. Sign and the 7 exponent and
// mantissa bits placed in a bf16 give the value times 2^-120 (exponent bias
// 7 against 127; e4m3 subnormals land on bf16 subnormals), which one bf16x2
// multiply by 2^120 undoes. 0x7f/0xff (NaN) decode to ±480, as fp82f.
__device__ __forceinline__ void fp8x4_bf16(unsigned x, unsigned& even, unsigned& odd) {
    unsigned e = ((x << 8) & 0x80008000u) | ((x << 4) & 0x07f007f0u);
    unsigned o = (x & 0x80008000u) | ((x >> 4) & 0x07f007f0u);
    const unsigned k = 0x7b807b80u, nz = 0x80008000u; // 2^120 and -0 in each half
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(even) : "r"(e), "r"(k), "r"(nz));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(odd) : "r"(o), "r"(k), "r"(nz));
}

__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

extern "C" __global__ void __launch_bounds__(128) attention_mma(
    float* out, float* part_acc, float* part_ml, const float* q, const kv_t* kc, const kv_t* vc,
    const int* seq_index, const int* positions, const int* tables, int table_stride, int block_size, int heads,
    int kvheads, int G, float scale, int split_len, int nsplit, const int* tiles KV_VSCALE_ARG) {
    pdl_start();
    // Two row layouts of the 16-row mma tile. Decode (tiles == 0): the rows
    // are the G q heads of kv head blockIdx.x for token blockIdx.y. Prefill:
    // the rows are up to 16 consecutive tokens of one sequence (tile
    // blockIdx.y) for q head blockIdx.x, with a causal mask per row, so each
    // K/V tile is read once for 16 queries.
    const int KK = ATT_D / 32, NT = ATT_D / 8;
    // Dynamic shared memory (attention_mma_smem bytes): per warp two stages
    // of a 16-position tile, K in the lanes' fragment order and V as rows
    // for ldmatrix.trans, filled by cp.async one tile ahead; later the
    // merge area. (Loads straight into registers left one tile per warp in
    // flight: 2.55 TB/s at batch 16, H200.)
    extern __shared__ __align__(16) unsigned char mma_smem[];
    int split = blockIdx.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gr = lane >> 2, c = lane & 3;
    bool pf = tiles != 0;
    int g, t, first = 0, rows, head = 0;
    if (pf) {
        head = blockIdx.x;
        g = head / G;
        first = tiles[2 * blockIdx.y];
        rows = tiles[2 * blockIdx.y + 1];
        t = first + rows - 1; // the tile's last token: the longest causal prefix
    } else {
        g = blockIdx.x;
        t = blockIdx.y;
        rows = G;
    }
    int n = positions[t] + 1;
    int start = split * split_len, end = min(n, start + split_len);
    const int* table = tables + (long)seq_index[t] * table_stride;
    long kvstride = (long)kvheads * ATT_D;
    // Each lane's two rows (gr, gr+8): their last visible key position.
    int rp0 = pf ? positions[first + min(gr, rows - 1)] : n - 1;
    int rp1 = pf ? positions[first + min(gr + 8, rows - 1)] : n - 1;

    // Q as A fragments (rows ≥ rows are zero).
    unsigned qa[KK][2][4];
    {
        bool r0 = gr < rows, r1 = gr + 8 < rows;
        const float* q0 = pf ? q + ((long)(first + min(gr, rows - 1)) * heads + head) * ATT_D
                             : q + ((long)t * heads + g * G + gr) * ATT_D;
        const float* q1 = pf ? q + ((long)(first + min(gr + 8, rows - 1)) * heads + head) * ATT_D : q0 + 8L * ATT_D;
        mma_q_frags<KV_FP8 != 0>(qa, q0, q1, r0, r1, scale, c);
    }
    float o[NT][4];
#pragma unroll
    for (int i = 0; i < NT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
#if KV_FP8
    const int KST = MMA_KROW8, VST = MMA_VROW8; // uint4 per stage: 16 rows of bytes each
#else
    const int KST = 2 * KK * 32;                  // uint4 of K per stage (lane order)
    const int VST = 16 * MMA_ROWSTRIDE * 2 / 16;  // uint4 of V rows per stage
#endif
    uint4* wst = (uint4*)mma_smem + warp * 2 * (KST + VST);
    unsigned wst_addr;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(wst_addr) : "l"(wst));
    // issue starts the copies of the tile at base into stage st (one commit group).
    auto issue = [&](int base, int st) {
        unsigned ka = wst_addr + st * (KST + VST) * 16, va = ka + KST * 16;
#if KV_FP8
        // K and V as rows of bytes, 16 B per copy.
#pragma unroll
        for (int i = lane; i < ATT_D; i += 32) { // 16 rows × ATT_D/16 chunks
            int row = i / (ATT_D / 16), col = i % (ATT_D / 16);
            int p = min(base + row, end - 1);
            long src = ((long)table[p / block_size] * block_size + p % block_size) * kvstride + (long)g * ATT_D + col * 16;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(ka + row * MMA_KROW8 + col * 16), "l"(kc + src)
                         : "memory");
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(va + row * MMA_VROW8 + col * 16), "l"(vc + src)
                         : "memory");
        }
#else
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int p = min(base + h * 8 + gr, end - 1);
            long slot = (long)table[p / block_size] * block_size + p % block_size;
            const bf16_t* kr = kc + slot * kvstride + (long)g * ATT_D + 8 * c;
#pragma unroll
            for (int kk = 0; kk < KK; kk++)
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(ka + ((h * KK + kk) * 32 + lane) * 16),
                             "l"(kr + 32 * kk) : "memory");
        }
#pragma unroll
        for (int i = lane; i < 16 * (ATT_D / 8); i += 32) {
            int row = i / (ATT_D / 8), col = i % (ATT_D / 8);
            int p = min(base + row, end - 1);
            long slot = (long)table[p / block_size] * block_size + p % block_size;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(va + (row * MMA_ROWSTRIDE + col * 8) * 2),
                         "l"(vc + slot * kvstride + (long)g * ATT_D + col * 8) : "memory");
        }
#endif
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    int base0 = start + warp * 16;
    if (base0 < end) issue(base0, 0);
    for (int base = base0, it = 0; base < end; base += AW * 16, it++) {
        int st = it & 1;
        if (base + AW * 16 < end) issue(base + AW * 16, st ^ 1);
        else asm volatile("cp.async.commit_group;" ::: "memory");
        asm volatile("cp.async.wait_group 1;" ::: "memory");
        __syncwarp(); // V rows copied by other lanes are visible
        const uint4* ks = wst + st * (KST + VST);
        unsigned sv_addr = wst_addr + (st * (KST + VST) + KST) * 16;
        float s[2][4];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            s[h][0] = s[h][1] = s[h][2] = s[h][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KK; kk++) {
#if KV_FP8
                // This lane's 8 bytes of position h·8+gr: head dims 32kk+8c..+7 (mma_q_frags<true>).
                uint2 u = *(const uint2*)((const unsigned char*)ks + (h * 8 + gr) * MMA_KROW8 + 32 * kk + 8 * c);
                unsigned e0, o0, e1, o1;
                fp8x4_bf16(u.x, e0, o0);
                fp8x4_bf16(u.y, e1, o1);
                mma16816(s[h], qa[kk][0], e0, o0);
                mma16816(s[h], qa[kk][1], e1, o1);
#else
                uint4 kv = ks[(h * KK + kk) * 32 + lane];
                mma16816(s[h], qa[kk][0], kv.x, kv.y);
                mma16816(s[h], qa[kk][1], kv.z, kv.w);
#endif
            }
        }
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int h = 0; h < 2; h++)
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
        // A row may have seen no visible key yet (causal prefill rows in a
        // later warp's tile): keep its state at zero instead of NaN.
        float z0 = mn0 == -INFINITY ? 0.f : mn0, z1 = mn1 == -INFINITY ? 0.f : mn1;
        float c0 = exp2f(m0 - z0), c1 = exp2f(m1 - z1);
        m0 = mn0;
        m1 = mn1;
        float e[2][4];
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                e[h][j] = exp2f(s[h][j] - z0);
                e[h][j + 2] = exp2f(s[h][j + 2] - z1);
                sum0 += e[h][j];
                sum1 += e[h][j + 2];
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
        unsigned pa[4] = {pack_bf16(e[0][0], e[0][1]), pack_bf16(e[0][2], e[0][3]), pack_bf16(e[1][0], e[1][1]),
                          pack_bf16(e[1][2], e[1][3])};
        __syncwarp();
#if KV_FP8
        // V fragments from byte rows: n-tile 4a+j, column gr is head dim
        // 32a+4gr+j (the output is written back in that order), so each
        // lane reads one word of rows 2c, 2c+1, 2c+8, 2c+9 per 4 n-tiles.
        {
            const unsigned char* vr = (const unsigned char*)(ks + KST) + 4 * gr;
#pragma unroll
            for (int a = 0; a < ATT_D / 32; a++) {
                unsigned w0 = *(const unsigned*)(vr + (2 * c) * MMA_VROW8 + 32 * a);
                unsigned w1 = *(const unsigned*)(vr + (2 * c + 1) * MMA_VROW8 + 32 * a);
                unsigned w8 = *(const unsigned*)(vr + (2 * c + 8) * MMA_VROW8 + 32 * a);
                unsigned w9 = *(const unsigned*)(vr + (2 * c + 9) * MMA_VROW8 + 32 * a);
#pragma unroll
                for (int jp = 0; jp < 2; jp++) { // n-tiles 4a+2jp and 4a+2jp+1
                    unsigned sel = jp ? 0x7632u : 0x5410u;
                    unsigned lo0, lo1, hi0, hi1;
                    fp8x4_bf16(__byte_perm(w0, w1, sel), lo0, lo1);
                    fp8x4_bf16(__byte_perm(w8, w9, sel), hi0, hi1);
                    mma16816(o[4 * a + 2 * jp], pa, lo0, hi0);
                    mma16816(o[4 * a + 2 * jp + 1], pa, lo1, hi1);
                }
            }
        }
#else
        int mi = lane >> 3, r = lane & 7;
        unsigned row_addr = sv_addr + (unsigned)(((r + (mi & 1) * 8) * MMA_ROWSTRIDE + (mi >> 1) * 8) * 2);
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
            unsigned b0, b1, b2, b3;
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                         : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                         : "r"(row_addr + np * 32));
            mma16816(o[2 * np], pa, b0, b1);
            mma16816(o[2 * np + 1], pa, b2, b3);
        }
#endif
        __syncwarp(); // every lane is done with stage st before it is refilled
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    __syncthreads(); // the staging area becomes the merge area
    float* sacc = (float*)mma_smem;                 // [AW][16][D]
    float* sml = sacc + AW * 16 * ATT_D;        // [AW][16][2]
#pragma unroll
    for (int i = 0; i < NT; i++) {
#if KV_FP8
        int d = 32 * (i >> 2) + 8 * c + (i & 3), d1 = d + 4; // columns 2c, 2c+1 of n-tile i (see the V fragments)
#else
        int d = i * 8 + 2 * c, d1 = d + 1;
#endif
        sacc[(warp * 16 + gr) * ATT_D + d] = o[i][0];
        sacc[(warp * 16 + gr) * ATT_D + d1] = o[i][1];
        sacc[(warp * 16 + gr + 8) * ATT_D + d] = o[i][2];
        sacc[(warp * 16 + gr + 8) * ATT_D + d1] = o[i][3];
    }
    if (c == 0) {
        sml[(warp * 16 + gr) * 2] = m0;
        sml[(warp * 16 + gr) * 2 + 1] = l0;
        sml[(warp * 16 + gr + 8) * 2] = m1;
        sml[(warp * 16 + gr + 8) * 2 + 1] = l1;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < rows * ATT_D; idx += blockDim.x) {
        int h = idx / ATT_D, d = idx % ATT_D;
        float M = -INFINITY;
        for (int w = 0; w < AW; w++) M = fmaxf(M, sml[(w * 16 + h) * 2]);
        float L = 0.f, A = 0.f;
        if (M != -INFINITY) {
            for (int w = 0; w < AW; w++) {
                float mw = sml[(w * 16 + h) * 2];
                if (mw == -INFINITY) continue;
                float cw = exp2f(mw - M);
                L += sml[(w * 16 + h) * 2 + 1] * cw;
                A += sacc[(w * 16 + h) * ATT_D + d] * cw;
            }
        }
#if KV_FP8
        A *= vscale;
#endif
        long qh = pf ? (long)(first + h) * heads + head : (long)t * heads + g * G + h;
        if (nsplit == 1) {
            out[qh * ATT_D + d] = L > 0.f ? A / L : 0.f;
        } else {
            part_acc[(qh * nsplit + split) * ATT_D + d] = A;
            if (d == 0) {
                part_ml[(qh * nsplit + split) * 2] = M;
                part_ml[(qh * nsplit + split) * 2 + 1] = L;
            }
        }
    }
}
#endif
