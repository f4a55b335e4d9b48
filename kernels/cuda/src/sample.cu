// Token sampling on the device: temperature, top-k, top-p (nucleus) and
// banned ids, drawing the same token as kernels/cpu.SampleRow from the same
// uniform U. The reference sorts the row by logit (descending, ties by id),
// keeps the first top_k, then the shortest prefix whose probability reaches
// top_p, and returns the token where the running probability passes U × the
// kept total. Sorting 151552 logits per row is not needed for that: every
// step is "the first element, in that order, where a running sum reaches a
// target", which a radix descent finds with histograms, one 8-bit digit of
// the 64-bit key (logit order << 32 | id) per pass over the row.
//
// Probabilities are fixed-point integers, round(exp((x − max)/T) · 2^45):
// sums are then exact and independent of the order the threads add them in
// (the reference sums float64 in sorted order; the two differ by < 1e-8 of
// the total, so they choose differently only when U lands that close to a
// boundary between two tokens). With V ≤ 2^18 logits a row's sum fits 64 bits.

#define SAMPLE_MASS_ONE 35184372088832.0 // 2^45
#define SAMPLE_MAX_BANS 256

struct SampleArgs {
    float temperature; // ≤ 0: argmax
    float top_p;       // ≤ 0 or ≥ 1: off
    int top_k;         // ≤ 0 or ≥ V: off
    float u;           // uniform in [0,1)
    int ban0, ban1;    // this row's banned ids: bans[ban0:ban1], sorted
};

// sample_key orders logits descending as an unsigned integer (larger logit,
// smaller key), +0 and −0 alike, NaN after −inf; as kernels/cpu.descKey.
__device__ __forceinline__ unsigned sample_key(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffffffu;
    if ((u & 0x7fffffffu) == 0) u = 0;
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ~u;
}

struct SampleRow {
    const float* x;
    int V;
    const int* bans; // shared memory, sorted
    int nban;
    double m, inv;   // the row's largest logit, 1/T
};

__device__ __forceinline__ float sample_logit(const SampleRow& r, int i) {
    float x = r.x[i];
    if (r.nban > 0) {
        int lo = 0, hi = r.nban;
        while (lo < hi) {
            int mid = (lo + hi) >> 1;
            if (r.bans[mid] < i) lo = mid + 1; else hi = mid;
        }
        if (lo < r.nban && r.bans[lo] == i) x = -INFINITY;
    }
    return x;
}

// sample_mass: round(exp((x − m)/T) · 2^45); below e^-32 it rounds to 0.
__device__ __forceinline__ unsigned long long sample_mass(const SampleRow& r, float x) {
    double z = ((double)x - r.m) * r.inv;
    if (!(z >= -32.0)) return 0ull;
    return (unsigned long long)llrint(exp(z) * SAMPLE_MASS_ONE);
}

__device__ __forceinline__ unsigned long long sample_full_key(float x, int i) {
    return ((unsigned long long)sample_key(x) << 32) | (unsigned)i;
}

// The first level of every search is a histogram over z = (max − x)/T in
// bins of 1/64 nat (z > 32, whose mass rounds to 0, and −inf in the last):
// computed once per row and shared by the three searches. It spreads real
// and random rows over many bins, where the leading bits of the keys would
// put most logits in a handful (64-bit shared atomics on a few addresses
// cost milliseconds). Within the chosen z bin the search goes on by 8-bit
// digits of the key, over the few logits of that bin.
#define SAMPLE_ZBINS 2048
#define SAMPLE_ZSCALE 64.0
// A z bin of at most SAMPLE_LIST logits is gathered into shared memory
// once, and the digit passes run over that list instead of the row.
#define SAMPLE_LIST 2048

__device__ __forceinline__ int sample_zbin(const SampleRow& r, float x) {
    double nz = (r.m - (double)x) * r.inv;
    if (!(nz <= 32.0)) return SAMPLE_ZBINS - 1;
    return min((int)(nz * SAMPLE_ZSCALE), SAMPLE_ZBINS - 2);
}

struct SampleShared {
    unsigned zcnt[SAMPLE_ZBINS];
    unsigned long long zmass[SAMPLE_ZBINS];
    int zid[SAMPLE_ZBINS];
    unsigned cnt[256];
    unsigned long long mass[256];
    int id[256];
    int list[SAMPLE_LIST];
    int nlist;
    unsigned long long red[32], redc[32];
    unsigned long long before_cnt, before_mass, bin_mass;
    unsigned bin_cnt;
    int bin;
};

__device__ unsigned long long sample_block_sum(unsigned long long v, SampleShared& sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh.red[threadIdx.x >> 5] = v;
    __syncthreads();
    unsigned long long s = 0;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) s += sh.red[i];
    __syncthreads();
    return s;
}

__device__ unsigned long long sample_block_min(unsigned long long v, SampleShared& sh) {
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w < v ? w : v;
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh.red[threadIdx.x >> 5] = v;
    __syncthreads();
    unsigned long long s = ~0ull;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) s = sh.red[i] < s ? sh.red[i] : s;
    __syncthreads();
    return s;
}

struct SampleTarget {
    int by_mass, strict;
    unsigned long long v;
    __device__ __forceinline__ bool reached(unsigned long long c, unsigned long long m) const {
        if (!by_mass) return c >= v;
        return strict ? m > v : m >= v;
    }
};

// sample_crossing finds the first of nbins bins (counts cnt, masses mass,
// after before_cnt/before_mass of earlier elements) where the running sum
// reaches the target: a block-wide scan, each thread over a few
// consecutive bins. It sets sh.bin, sh.before_* (the sums before that bin)
// and sh.bin_cnt/bin_mass; with the target out of reach (rounding) the
// last non-empty bin.
__device__ void sample_crossing(int nbins, const unsigned* cnt, const unsigned long long* mass,
                                unsigned long long before_cnt, unsigned long long before_mass, SampleTarget tg,
                                SampleShared& sh) {
    int per = (nbins + blockDim.x - 1) / blockDim.x, b0 = threadIdx.x * per, b1 = min(nbins, b0 + per);
    unsigned long long c = 0, m = 0;
    for (int b = b0; b < b1; b++) {
        c += cnt[b];
        m += mass[b];
    }
    // Inclusive scan over the block: within warps, then over warp totals.
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        unsigned long long oc = __shfl_up_sync(0xffffffffu, c, o), om = __shfl_up_sync(0xffffffffu, m, o);
        if (lane >= o) {
            c += oc;
            m += om;
        }
    }
    if (threadIdx.x == 0) sh.bin = -1;
    __syncthreads();
    if (lane == 31) {
        sh.redc[w] = c;
        sh.red[w] = m;
    }
    __syncthreads();
    unsigned long long pc = before_cnt, pm = before_mass;
    for (int i = 0; i < w; i++) {
        pc += sh.redc[i];
        pm += sh.red[i];
    }
    unsigned long long tc = 0, tm = 0;
    for (int b = b0; b < b1; b++) { // c, m are inclusive of this thread's bins
        tc += cnt[b];
        tm += mass[b];
    }
    pc += c - tc;
    pm += m - tm;
    for (int b = b0; b < b1; b++) {
        unsigned long long rc = pc + cnt[b], rm = pm + mass[b];
        if (cnt[b] && tg.reached(rc, rm) && !tg.reached(pc, pm)) {
            sh.bin = b;
            sh.before_cnt = pc;
            sh.before_mass = pm;
            sh.bin_cnt = cnt[b];
            sh.bin_mass = mass[b];
        }
        pc = rc;
        pm = rm;
    }
    __syncthreads();
    if (threadIdx.x == 0 && sh.bin < 0) {
        unsigned long long ac = before_cnt, am = before_mass;
        int last = 0;
        for (int b = 0; b < nbins; b++) {
            if (cnt[b]) last = b;
            ac += cnt[b];
            am += mass[b];
        }
        sh.bin = last;
        sh.before_cnt = ac - cnt[last];
        sh.before_mass = am - mass[last];
        sh.bin_cnt = cnt[last];
        sh.bin_mass = mass[last];
    }
    __syncthreads();
}

// SampleRun adds a thread's consecutive elements of one bin in registers
// and flushes them to the shared histogram (counts, masses, an id) when the
// bin changes, so that rows whose logits fall in a few bins do not send
// every element to the same shared-memory counters.
struct SampleRun {
    int cur = -1, id = 0;
    unsigned cnt = 0;
    unsigned long long mass = 0;
    __device__ void flush(unsigned* hc, unsigned long long* hm, int* hid) {
        if (cur < 0) return;
        atomicAdd(&hc[cur], cnt);
        if (mass) atomicAdd(&hm[cur], mass);
        hid[cur] = id;
    }
    __device__ void add(int d, int i, unsigned long long m, unsigned* hc, unsigned long long* hm, int* hid) {
        if (d != cur) {
            flush(hc, hm, hid);
            cur = d;
            cnt = 0;
            mass = 0;
        }
        cnt++;
        mass += m;
        id = i;
    }
};

// sample_zhist fills the z-bin histogram of the row (counts, masses, an
// id per bin: the bin's element when it has one).
__device__ void sample_zhist(const SampleRow& r, SampleShared& sh) {
    for (int j = threadIdx.x; j < SAMPLE_ZBINS; j += blockDim.x) {
        sh.zcnt[j] = 0;
        sh.zmass[j] = 0;
    }
    __syncthreads();
    SampleRun run;
    for (int i = threadIdx.x; i < r.V; i += blockDim.x) {
        float x = sample_logit(r, i);
        run.add(sample_zbin(r, x), i, sample_mass(r, x), sh.zcnt, sh.zmass, sh.zid);
    }
    run.flush(sh.zcnt, sh.zmass, sh.zid);
    __syncthreads();
}

// sample_select returns the first element, in key order, at which the
// running count or mass reaches the target, and in *through the mass up to
// and including it: the z bin from the row's histogram, then 8-bit digits
// of the keys in that bin (logit bits, then id bits for ties) until one
// element is left.
__device__ int sample_select(const SampleRow& r, SampleTarget tg, unsigned long long* through, SampleShared& sh) {
    sample_crossing(SAMPLE_ZBINS, sh.zcnt, sh.zmass, 0, 0, tg, sh);
    int zb = sh.bin;
    if (sh.bin_cnt == 1) {
        int id = sh.zid[zb];
        *through = sh.before_mass + sh.bin_mass;
        __syncthreads();
        return id;
    }
    unsigned long long prefix = 0, pmask = 0, bc = sh.before_cnt, bm = sh.before_mass;
    int idbits = r.V > 1 ? 32 - __clz(r.V - 1) : 1;
    int id_top = ((idbits + 7) / 8 - 1) * 8;
    bool listed = sh.bin_cnt <= SAMPLE_LIST;
    __syncthreads();
    if (listed) {
        if (threadIdx.x == 0) sh.nlist = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < r.V; i += blockDim.x)
            if (sample_zbin(r, sample_logit(r, i)) == zb) sh.list[atomicAdd(&sh.nlist, 1)] = i;
        __syncthreads();
    }
    int n = listed ? sh.nlist : r.V;
    for (int pass = 0;; pass++) {
        int shift = pass < 4 ? 56 - 8 * pass : id_top - 8 * (pass - 4);
        __syncthreads();
        for (int j = threadIdx.x; j < 256; j += blockDim.x) {
            sh.cnt[j] = 0;
            sh.mass[j] = 0;
        }
        __syncthreads();
        SampleRun run;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            int i = listed ? sh.list[j] : j;
            float x = sample_logit(r, i);
            unsigned long long key = sample_full_key(x, i);
            if ((key & pmask) != prefix || (!listed && sample_zbin(r, x) != zb)) continue;
            run.add((int)(key >> shift) & 255, i, sample_mass(r, x), sh.cnt, sh.mass, sh.id);
        }
        run.flush(sh.cnt, sh.mass, sh.id);
        __syncthreads();
        sample_crossing(256, sh.cnt, sh.mass, bc, bm, tg, sh);
        int d = sh.bin;
        bc = sh.before_cnt;
        bm = sh.before_mass;
        if (sh.bin_cnt == 1 || shift == 0) {
            int id = sh.id[d];
            *through = bm + sh.bin_mass;
            __syncthreads();
            return id;
        }
        prefix |= (unsigned long long)d << shift;
        pmask |= 255ull << shift;
    }
}

// sample_rows: one block of 1024 threads per row of logits [R,V]; out[r]
// is the token.
extern "C" __global__ void __launch_bounds__(1024) sample_rows(int* out, const float* logits, int V,
                                                               const SampleArgs* args, const int* bans) {
    pdl_start();
    __shared__ SampleShared sh;
    __shared__ int sban[SAMPLE_MAX_BANS];
    SampleArgs a = args[blockIdx.x];
    SampleRow r;
    r.x = logits + (long)blockIdx.x * V;
    r.V = V;
    r.nban = min(a.ban1 - a.ban0, SAMPLE_MAX_BANS);
    for (int i = threadIdx.x; i < r.nban; i += blockDim.x) sban[i] = bans[a.ban0 + i];
    r.bans = sban;
    r.m = 0;
    r.inv = 1;
    __syncthreads();

    // The first key is the largest logit (lowest id among equals): the
    // greedy token, and the maximum the probabilities are relative to.
    unsigned long long best = ~0ull;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        unsigned long long k = sample_full_key(sample_logit(r, i), i);
        best = k < best ? k : best;
    }
    best = sample_block_min(best, sh);
    int top = (int)(unsigned)best;
    float m = sample_logit(r, top);
    if (!(a.temperature > 0.f) || !(m > -INFINITY) || m != m) {
        if (threadIdx.x == 0) out[blockIdx.x] = top;
        return;
    }
    r.m = (double)m;
    r.inv = 1.0 / (double)a.temperature;
    sample_zhist(r, sh);

    unsigned long long kept;
    if (a.top_k > 0 && a.top_k < V) {
        sample_select(r, SampleTarget{0, 0, (unsigned long long)a.top_k}, &kept, sh);
    } else {
        unsigned long long s = 0;
        for (int j = threadIdx.x; j < SAMPLE_ZBINS; j += blockDim.x) s += sh.zmass[j];
        kept = sample_block_sum(s, sh);
    }
    if (a.top_p > 0.f && a.top_p < 1.f) {
        unsigned long long tp = (unsigned long long)ceil((double)a.top_p * (double)kept);
        if (tp < 1) tp = 1;
        if (tp < kept) sample_select(r, SampleTarget{1, 0, tp}, &kept, sh);
    }
    unsigned long long target = (unsigned long long)((double)a.u * (double)kept);
    if (target >= kept) target = kept - 1;
    unsigned long long through;
    int id = sample_select(r, SampleTarget{1, 1, target}, &through, sh);
    if (threadIdx.x == 0) out[blockIdx.x] = id;
}
