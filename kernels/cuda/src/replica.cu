// EPLB replica mask (kernels.ReplicaMasker; CPU twin: kernels/cpu/replica.go).
// An expert held by several EP groups serves token t on replica t mod n, in
// placement order; every other holder zeroes that route's weight so that
// the MoE sum over the ranks counts it once. table is the rank's [E, 2]
// (n, m): replica count and this rank's replica index (m < 0: not held).
// Ids outside [0, E) keep their weight (the MoE flags or skips them).

extern "C" __global__ void mask_replicas(float* w, const int* ids, const int* table, long n, int k, int E) {
    pdl_start();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        int e = ids[i];
        if (e < 0 || e >= E) continue;
        int reps = table[2 * e], mine = table[2 * e + 1];
        if (reps > 1 && mine >= 0 && (int)((i / k) % reps) != mine) w[i] = 0.f;
    }
}
