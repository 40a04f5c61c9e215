// MoE dispatch: groups the gate's (token, slot) pairs by expert, on the device, in one launch of
// one block (count -> exclusive prefix sum -> place), the scheme of the CPU reference
// (crates/kernels/src/moe.rs `dispatch`). Order within an expert is not stable here (shared
// atomics decide it); the set of entries per expert is the reference's.
//
// It also writes the row tiles the grouped GEMMs walk (tile_rows rows of one expert each), so
// they can be launched over an upper bound of tiles without a host round trip:
//   tiles are numbered expert by expert; tile m covers rows tile_start[m] .. min(+tile_rows,
//   offsets[tile_expert[m] + 1]) of the permutation; *num_tiles says how many are real.
//
// Ids >= E are dropped (the gate never writes them); then offsets[E] < T*k.
// Limits checked by the host: E <= DISPATCH_MAX_EXPERTS, blockDim.x == 1024.

#include <cuda_runtime.h>

#define DISPATCH_MAX_EXPERTS 4096
#define DISPATCH_THREADS 1024

// In-place exclusive prefix sum of a[0..n) in shared memory by the whole block; returns the total
// to every thread. Each thread owns a contiguous run of ceil(n / blockDim) entries.
__device__ unsigned block_exclusive_scan(unsigned *a, int n, unsigned *warp_tot) {
    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int per = (n + DISPATCH_THREADS - 1) / DISPATCH_THREADS;
    const int lo = min(n, tid * per), hi = min(n, lo + per);
    unsigned local = 0;
    for (int i = lo; i < hi; ++i) local += a[i];
    // inclusive warp scan of the per-thread totals
    unsigned incl = local;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const unsigned o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        unsigned w = warp_tot[lane];  // 32 warps of 32 threads
        unsigned wi = w;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const unsigned o = __shfl_up_sync(0xffffffffu, wi, off);
            if (lane >= off) wi += o;
        }
        warp_tot[lane] = wi - w;  // exclusive prefix of warp totals
        if (lane == 31) warp_tot[32] = wi;
    }
    __syncthreads();
    unsigned run = warp_tot[warp] + incl - local;
    for (int i = lo; i < hi; ++i) {
        const unsigned v = a[i];
        a[i] = run;
        run += v;
    }
    const unsigned total = warp_tot[32];
    __syncthreads();  // warp_tot may be reused by the next scan
    return total;
}

extern "C" __global__ void __launch_bounds__(DISPATCH_THREADS, 1) moe_dispatch(
    const unsigned *__restrict__ ids,  // [N = T * k]
    int N, int k, int E, int tile_rows,
    unsigned *__restrict__ offsets,      // [E + 1]
    unsigned *__restrict__ token_of,     // [N]
    unsigned *__restrict__ slot_of,      // [N]
    unsigned *__restrict__ tile_expert,  // [max_tiles]
    unsigned *__restrict__ tile_start,   // [max_tiles]
    unsigned *__restrict__ num_tiles,    // [1]
    int max_tiles) {
    __shared__ unsigned cnt[DISPATCH_MAX_EXPERTS];
    __shared__ unsigned cur[DISPATCH_MAX_EXPERTS];
    __shared__ unsigned warp_tot[33];
    const int tid = threadIdx.x;

    for (int e = tid; e < E; e += DISPATCH_THREADS) cnt[e] = 0;
    __syncthreads();
    for (int i = tid; i < N; i += DISPATCH_THREADS) {
        const unsigned e = ids[i];
        if (e < (unsigned)E) atomicAdd(&cnt[e], 1u);
    }
    __syncthreads();
    for (int e = tid; e < E; e += DISPATCH_THREADS) cur[e] = cnt[e];
    __syncthreads();
    const unsigned total = block_exclusive_scan(cur, E, warp_tot);
    for (int e = tid; e < E; e += DISPATCH_THREADS) {
        offsets[e] = cur[e];
        cnt[e] = (cnt[e] + tile_rows - 1) / tile_rows;  // tiles of expert e
    }
    if (tid == 0) offsets[E] = total;
    __syncthreads();
    const unsigned tiles = block_exclusive_scan(cnt, E, warp_tot);
    for (int e = tid; e < E; e += DISPATCH_THREADS) {
        const unsigned row0 = cur[e];
        const unsigned rows = (e + 1 < E ? cur[e + 1] : total) - row0;
        const unsigned first = cnt[e];
        for (unsigned t = 0; t * tile_rows < rows; ++t) {
            const unsigned m = first + t;
            if (m < (unsigned)max_tiles) {
                tile_expert[m] = (unsigned)e;
                tile_start[m] = row0 + t * tile_rows;
            }
        }
    }
    if (tid == 0) *num_tiles = min(tiles, (unsigned)max_tiles);
    __syncthreads();
    for (int i = tid; i < N; i += DISPATCH_THREADS) {
        const unsigned e = ids[i];
        if (e < (unsigned)E) {
            const unsigned p = atomicAdd(&cur[e], 1u);
            token_of[p] = (unsigned)(i / k);
            slot_of[p] = (unsigned)i;
        }
    }
}
