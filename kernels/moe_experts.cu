// MoE expert compute in bf16 with f32 accumulation. Checked against experts_forward in
// crates/kernels/src/moe.rs (the CPU reference): y[t] = sum_j w[t,j] * E_{ids[t,j]}(x[t]),
// E(x) = down . (silu(gate . x) * (up . x)), gate_up = [E, 2I, H] (gate rows 0..I, up rows I..2I),
// down = [E, H, I]; all row-major bf16.
//
// Two paths:
//  (a) decode GEMV (T <= 8), no dispatch needed:
//      moe_gemv_gate_up: one block per (slot, chunk of I); only the first slot that names an
//        expert does work, and it serves every token that chose that expert, so each selected
//        expert's gate_up rows are read once. act[slot, i] = silu(g.x) * (u.x) in f32.
//      moe_gemv_gate_up_rows{1,2,4,8}: the same act from a persistent grid in which each warp
//        takes one output row of one distinct expert at a time (a shorter last wave; opt-in as
//        ExpertPath::GemvRows until a GPU run has measured it).
//      moe_gemv_down: one block per chunk of H rows; it walks the distinct experts of the batch,
//        reads each expert's down rows once, and sums w * (down . act) over the k slots of
//        every token in registers, writing y in bf16 -- the top-k reduction is fused, no atomics.
//  (b) tiled grouped GEMMs over the dispatch permutation (any T), tensor cores through wmma
//      (bf16 16x16x16, f32 accumulate), 64x128x64 block tiles, 4-stage cp.async pipeline:
//      moe_gemm_gate_up: act_bf16[p, :] = silu(x[token_of[p]] . gate^T) * (... up^T) per row p.
//      moe_gemm_down:    acc_f32[token_of[p], :] += w[slot_of[p]] * act_bf16[p] . down^T
//                        (f32 atomics; acc zeroed before), then moe_f32_to_bf16.
// Limits checked by the host: H % 32 == 0, I % 32 == 0, T <= 8 and T*k <= 128 for the GEMV path.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>

using namespace nvcuda;

#define FULL_MASK 0xffffffffu
#define GEMV_MAX_TOKENS 8
#define GEMV_MAX_SLOTS 128
#define GEMV_THREADS 256
#define GEMV_WARPS (GEMV_THREADS / 32)
#define GEMV_OUT_PER_WARP 2
#define GEMV_OUT_PER_BLOCK (GEMV_WARPS * GEMV_OUT_PER_WARP)
#define DOWN_CHUNKS 3

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

// 8 bf16 packed in a uint4 times 8 bf16: f32 dot of the pair.
__device__ __forceinline__ float dot8(const uint4 &a, const uint4 &b) {
    const __nv_bfloat162 *pa = reinterpret_cast<const __nv_bfloat162 *>(&a);
    const __nv_bfloat162 *pb = reinterpret_cast<const __nv_bfloat162 *>(&b);
    float s = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const float2 fa = __bfloat1622float2(pa[q]);
        const float2 fb = __bfloat1622float2(pb[q]);
        s = fmaf(fa.x, fb.x, s);
        s = fmaf(fa.y, fb.y, s);
    }
    return s;
}

// 8 bf16 times 8 f32 (two float4).
__device__ __forceinline__ float dot8f(const uint4 &a, const float4 &b0, const float4 &b1) {
    const __nv_bfloat162 *pa = reinterpret_cast<const __nv_bfloat162 *>(&a);
    const float2 f0 = __bfloat1622float2(pa[0]);
    const float2 f1 = __bfloat1622float2(pa[1]);
    const float2 f2 = __bfloat1622float2(pa[2]);
    const float2 f3 = __bfloat1622float2(pa[3]);
    float s = f0.x * b0.x;
    s = fmaf(f0.y, b0.y, s);
    s = fmaf(f1.x, b0.z, s);
    s = fmaf(f1.y, b0.w, s);
    s = fmaf(f2.x, b1.x, s);
    s = fmaf(f2.y, b1.y, s);
    s = fmaf(f3.x, b1.z, s);
    s = fmaf(f3.y, b1.w, s);
    return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

// Streaming 16-byte load of weights (read once; keep them out of L1).
__device__ __forceinline__ uint4 ld_stream(const uint4 *p) { return __ldcs(p); }

// ---------------------------------------------------------------------------------------------
// (a) decode GEMV path
// ---------------------------------------------------------------------------------------------

// grid = (ceil(I / GEMV_OUT_PER_BLOCK), T*k), block = GEMV_THREADS.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) moe_gemv_gate_up(
    const __nv_bfloat16 *__restrict__ x,        // [T, H]
    const __nv_bfloat16 *__restrict__ gate_up,  // [E, 2I, H]
    const unsigned *__restrict__ ids,           // [T, k]
    float *__restrict__ act,                    // [T*k, I]
    int T, int k, int E, int H, int I) {
    __shared__ int s_first;
    __shared__ int s_n;
    __shared__ int s_slot[GEMV_MAX_TOKENS];
    const int slot = blockIdx.y;
    const int N = T * k;
    const unsigned e = ids[slot];
    const int tid = threadIdx.x;
    if (tid == 0) {
        s_first = 1;
        s_n = 0;
    }
    __syncthreads();
    // Work only if `slot` is the first slot naming this expert.
    for (int j = tid; j < slot; j += GEMV_THREADS)
        if (ids[j] == e) s_first = 0;
    __syncthreads();
    if (!s_first || e >= (unsigned)E) return;
    for (int j = slot + tid; j < N; j += GEMV_THREADS) {
        if (ids[j] == e) {
            const int q = atomicAdd(&s_n, 1);
            if (q < GEMV_MAX_TOKENS) s_slot[q] = j;
        }
    }
    __syncthreads();
    const int ntok = min(s_n, GEMV_MAX_TOKENS);
    int tok[GEMV_MAX_TOKENS];
#pragma unroll
    for (int t = 0; t < GEMV_MAX_TOKENS; ++t) tok[t] = (t < ntok) ? s_slot[t] / k : 0;

    const int warp = tid >> 5, lane = tid & 31;
    const int o0 = blockIdx.x * GEMV_OUT_PER_BLOCK + warp * GEMV_OUT_PER_WARP;
    if (o0 >= I) return;
    const int nout = min(GEMV_OUT_PER_WARP, I - o0);
    const int hv = H >> 3;  // 16-byte vectors per row
    const uint4 *wbase = reinterpret_cast<const uint4 *>(gate_up + (size_t)e * 2 * I * H);
    const uint4 *rows[2 * GEMV_OUT_PER_WARP];
#pragma unroll
    for (int r = 0; r < GEMV_OUT_PER_WARP; ++r) {
        const int o = o0 + min(r, nout - 1);
        rows[2 * r] = wbase + (size_t)o * hv;            // gate row
        rows[2 * r + 1] = wbase + (size_t)(I + o) * hv;  // up row
    }
    float acc[2 * GEMV_OUT_PER_WARP][GEMV_MAX_TOKENS];
#pragma unroll
    for (int r = 0; r < 2 * GEMV_OUT_PER_WARP; ++r)
#pragma unroll
        for (int t = 0; t < GEMV_MAX_TOKENS; ++t) acc[r][t] = 0.0f;

    const uint4 *xv = reinterpret_cast<const uint4 *>(x);
#pragma unroll 2
    for (int c = lane; c < hv; c += 32) {
        uint4 w[2 * GEMV_OUT_PER_WARP];
#pragma unroll
        for (int r = 0; r < 2 * GEMV_OUT_PER_WARP; ++r) w[r] = ld_stream(rows[r] + c);
#pragma unroll
        for (int t = 0; t < GEMV_MAX_TOKENS; ++t) {
            if (t < ntok) {
                const uint4 xx = __ldg(xv + (size_t)tok[t] * hv + c);
#pragma unroll
                for (int r = 0; r < 2 * GEMV_OUT_PER_WARP; ++r) acc[r][t] += dot8(w[r], xx);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_MAX_TOKENS; ++t) {
        if (t < ntok) {
#pragma unroll
            for (int r = 0; r < GEMV_OUT_PER_WARP; ++r) {
                const float g = warp_sum(acc[2 * r][t]);
                const float u = warp_sum(acc[2 * r + 1][t]);
                if (lane == 0 && r < nout) act[(size_t)s_slot[t] * I + o0 + r] = silu_f(g) * u;
            }
        }
    }
}

// Variant of moe_gemv_gate_up with a short tail (`ExpertPath::GemvRows`; the default stays the
// kernel above until a GPU run has measured both). Same result bit for bit: each lane sums the
// same 16-byte chunks in the same order and the same warp_sum reduces them.
//
// Why: the kernel above gives each 256-thread block 16 outputs of one slot. At Hy3 decode
// (T = 1, k = 8 + 1 shared, I = 1536) that is 96 x 9 = 864 blocks; at 126 registers an SM
// holds 2, so an H200's 132 SMs run 864 / 264 = 3.27 waves, and in the last one 72 blocks on
// 72 SMs load while 60 SMs idle: a memory-bound kernel spends about a quarter of its time with
// about a quarter of its loads in flight (run 2: 68-71% of HBM for this kernel alone).
//
// Here the unit of work is one output row of one distinct expert, taken by one warp: its gate
// row and up row (2 x H bf16 = 16 KiB at H = 4096). The grid is persistent, SMs x (blocks
// resident per SM) as the host's occupancy query says, and the items are dealt out warp-major:
// warp w of block b starts at item w * gridDim.x + b and strides by all the grid's warps, so
// consecutive items go to different blocks and the last round's items are spread over every
// block (every SM) instead of filling a few. Every block first lists the batch's distinct
// experts (as moe_gemv_down does), so duplicate slots cost no block at all. The accumulators
// are sized for the batch (MAXT = 1, 2, 4 or 8 tokens per expert, one instantiation each, the
// host picks the smallest >= T) rather than always 8, which cuts registers so that more blocks
// fit per SM.
//
// Wave arithmetic at T = 1 (9 x 1536 = 13,824 items). The register counts (ptxas, sm_90:
// 77 for MAXT = 1, 94-118 for 2-8, no spills) give 3 blocks of 8 warps per SM at MAXT = 1:
// 396 blocks, 3,168 warps, 4.36 items each. Every warp does 4 or 5; the 5th round is items
// 12,672..13,823, i.e. warps 0-1 of every block and warp 2 of most, ~9 warps on each of the
// 132 SMs (~36 KiB of loads in flight per SM at 4 KiB a warp, about what 4.8 TB/s x ~1 us of
// loaded latency needs per SM) where the kernel above has 60 SMs idle in its last wave.
// Rounds 1-4 keep 24 warps x 4 KiB = 96 KiB in flight per SM against the kernel above's
// 16 x 4 KiB. (Warps are not in lock step, so "rounds" blur; the point is that the work is
// dealt in 16 KiB pieces spread over all SMs rather than 256 KiB blocks.) T = 2, 4, 8 (~18,
// 35, 54 distinct experts, 2 blocks per SM = 2,112 warps): 12.8, 25, 39 items per warp, tails
// of a few percent. `ncu --section LaunchStats` reports the grid and blocks per SM;
// gpu_check prints the grid it launches.
#define ROWS_CHUNKS 4  // 16-byte chunks per lane per row per pass: 8 loads (4 KiB a warp) in flight

template <int MAXT>
__device__ __forceinline__ void gemv_gate_up_rows(const __nv_bfloat16 *__restrict__ x,
                                                  const __nv_bfloat16 *__restrict__ gate_up,
                                                  const unsigned *__restrict__ ids,
                                                  float *__restrict__ act, int T, int k, int E,
                                                  int H, int I) {
    __shared__ unsigned s_ids[GEMV_MAX_SLOTS];
    __shared__ unsigned s_expert[GEMV_MAX_SLOTS];  // distinct experts, in first-seen order
    __shared__ int s_rank[GEMV_MAX_SLOTS];         // of each first slot: its expert's index d
    __shared__ int s_ntok[GEMV_MAX_SLOTS];         // slots naming expert d (at most MAXT)
    __shared__ int s_slot[GEMV_MAX_SLOTS][MAXT];   // those slots, ascending
    __shared__ int s_wcount[GEMV_WARPS];
    const int N = T * k;
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    for (int j = tid; j < N; j += GEMV_THREADS) s_ids[j] = ids[j];
    __syncthreads();
    // One slot per thread (N <= GEMV_MAX_SLOTS < GEMV_THREADS): how many earlier and later
    // slots name the same expert; a slot with none earlier is its expert's first.
    const int s = tid;
    const unsigned e_s = s < N ? s_ids[s] : 0xffffffffu;
    const bool valid = s < N && e_s < (unsigned)E;
    int first_j = s, before = 0, after = 0;
    if (valid)
        for (int j = 0; j < N; ++j)
            if (j != s && s_ids[j] == e_s) {
                if (j > s) {
                    ++after;
                } else if (before++ == 0) {
                    first_j = j;
                }
            }
    const bool first = valid && before == 0;
    const unsigned bal = __ballot_sync(FULL_MASK, first);
    if (lane == 0) s_wcount[warp] = __popc(bal);
    __syncthreads();
    if (first) {
        int rank = __popc(bal & ((1u << lane) - 1u));
        for (int w = 0; w < warp; ++w) rank += s_wcount[w];
        s_rank[s] = rank;
        s_expert[rank] = e_s;
        s_ntok[rank] = min(1 + after, MAXT);
    }
    __syncthreads();
    // Ids are distinct within a token, so an expert has at most T <= MAXT slots (more, from
    // repeated ids, are dropped as the kernel above drops more than 8).
    if (valid && before < MAXT) s_slot[s_rank[first_j]][before] = s;
    int nd = 0;
#pragma unroll
    for (int w = 0; w < GEMV_WARPS; ++w) nd += s_wcount[w];
    __syncthreads();

    const int hv = H >> 3;  // 16-byte vectors per row
    const int items = nd * I;
    const int nwarps = gridDim.x * GEMV_WARPS;
    const uint4 *xv = reinterpret_cast<const uint4 *>(x);
    for (int it = warp * gridDim.x + blockIdx.x; it < items; it += nwarps) {
        const int d = it / I;
        const int o = it - d * I;
        const int ntok = s_ntok[d];
        const uint4 *grow =
            reinterpret_cast<const uint4 *>(gate_up + ((size_t)s_expert[d] * 2 * I + o) * H);
        const uint4 *urow = grow + (size_t)I * hv;
        int tok[MAXT];
        float ag[MAXT], au[MAXT];
#pragma unroll
        for (int t = 0; t < MAXT; ++t) {
            tok[t] = t < ntok ? s_slot[d][t] / k : 0;
            ag[t] = 0.0f;
            au[t] = 0.0f;
        }
        for (int c0 = 0; c0 < hv; c0 += 32 * ROWS_CHUNKS) {
            uint4 wg[ROWS_CHUNKS], wu[ROWS_CHUNKS];
#pragma unroll
            for (int q = 0; q < ROWS_CHUNKS; ++q) {
                const int c = c0 + lane + 32 * q;
                wg[q] = c < hv ? ld_stream(grow + c) : make_uint4(0, 0, 0, 0);
                wu[q] = c < hv ? ld_stream(urow + c) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int t = 0; t < MAXT; ++t) {
                if (t < ntok) {
#pragma unroll
                    for (int q = 0; q < ROWS_CHUNKS; ++q) {
                        const int c = c0 + lane + 32 * q;
                        if (c < hv) {
                            const uint4 xx = __ldg(xv + (size_t)tok[t] * hv + c);
                            ag[t] += dot8(wg[q], xx);
                            au[t] += dot8(wu[q], xx);
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int t = 0; t < MAXT; ++t) {
            if (t < ntok) {
                const float g = warp_sum(ag[t]);
                const float u = warp_sum(au[t]);
                if (lane == 0) act[(size_t)s_slot[d][t] * I + o] = silu_f(g) * u;
            }
        }
    }
}

// grid = SMs x resident blocks per SM (any size is correct), block = GEMV_THREADS; the host
// takes the smallest MAXT >= T. The second launch bound is the blocks per SM aimed for.
#define GEMV_ROWS_ARGS                                                                         \
    const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ gate_up,            \
        const unsigned *__restrict__ ids, float *__restrict__ act, int T, int k, int E, int H, \
        int I
extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 3)
    moe_gemv_gate_up_rows1(GEMV_ROWS_ARGS) {
    gemv_gate_up_rows<1>(x, gate_up, ids, act, T, k, E, H, I);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 2)
    moe_gemv_gate_up_rows2(GEMV_ROWS_ARGS) {
    gemv_gate_up_rows<2>(x, gate_up, ids, act, T, k, E, H, I);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 2)
    moe_gemv_gate_up_rows4(GEMV_ROWS_ARGS) {
    gemv_gate_up_rows<4>(x, gate_up, ids, act, T, k, E, H, I);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 2)
    moe_gemv_gate_up_rows8(GEMV_ROWS_ARGS) {
    gemv_gate_up_rows<8>(x, gate_up, ids, act, T, k, E, H, I);
}

// grid = ceil(H / GEMV_OUT_PER_BLOCK), block = GEMV_THREADS.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 2) moe_gemv_down(
    const float *__restrict__ act,           // [T*k, I]
    const __nv_bfloat16 *__restrict__ down,  // [E, H, I]
    const unsigned *__restrict__ ids,        // [T, k]
    const float *__restrict__ weights,       // [T, k]
    __nv_bfloat16 *__restrict__ y,           // [T, H]
    int T, int k, int E, int H, int I) {
    __shared__ unsigned s_ids[GEMV_MAX_SLOTS];
    __shared__ unsigned s_expert[GEMV_MAX_SLOTS];  // distinct experts, in first-seen order
    __shared__ unsigned s_mask[GEMV_MAX_SLOTS][GEMV_MAX_SLOTS / 32];  // their slots, as bits
    __shared__ int s_rank[GEMV_MAX_SLOTS];
    __shared__ int s_wcount[GEMV_MAX_SLOTS / 32];
    const int N = T * k;
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    for (int s = tid; s < N; s += GEMV_THREADS) s_ids[s] = ids[s];
    for (int q = tid; q < GEMV_MAX_SLOTS * (GEMV_MAX_SLOTS / 32); q += GEMV_THREADS)
        (&s_mask[0][0])[q] = 0u;
    __syncthreads();
    // Distinct experts: slot s is "first" if no earlier slot names its expert; its rank among
    // first slots (ballot + popcount over the 4 warps that cover slots 0..127) is the expert's
    // index d.
    const int s = tid;
    const unsigned e_s = s < N ? s_ids[s] : 0xffffffffu;
    const bool valid = s < N && e_s < (unsigned)E;
    int first_j = s;
    if (valid)
        for (int j = 0; j < s; ++j)
            if (s_ids[j] == e_s) {
                first_j = j;
                break;
            }
    const bool first = valid && first_j == s;
    const unsigned bal = __ballot_sync(FULL_MASK, first);
    if (lane == 0 && warp < GEMV_MAX_SLOTS / 32) s_wcount[warp] = __popc(bal);
    __syncthreads();
    if (first) {
        int rank = __popc(bal & ((1u << lane) - 1u));
        for (int w = 0; w < warp; ++w) rank += s_wcount[w];
        s_rank[s] = rank;
        s_expert[rank] = e_s;
    }
    __syncthreads();
    if (valid) {
        const int d = s_rank[first_j];
        atomicOr(&s_mask[d][s >> 5], 1u << (s & 31));
    }
    int nd = 0;
#pragma unroll
    for (int w = 0; w < GEMV_MAX_SLOTS / 32; ++w) nd += s_wcount[w];
    __syncthreads();

    const int h0 = blockIdx.x * GEMV_OUT_PER_BLOCK + warp * GEMV_OUT_PER_WARP;
    if (h0 >= H) return;
    const int nout = min(GEMV_OUT_PER_WARP, H - h0);
    const int iv = I >> 3;
    const int nwords = (N + 31) >> 5;
    float acc[GEMV_OUT_PER_WARP][GEMV_MAX_TOKENS];
#pragma unroll
    for (int r = 0; r < GEMV_OUT_PER_WARP; ++r)
#pragma unroll
        for (int t = 0; t < GEMV_MAX_TOKENS; ++t) acc[r][t] = 0.0f;

    for (int d = 0; d < nd; ++d) {
        const unsigned e = s_expert[d];
        const uint4 *wbase = reinterpret_cast<const uint4 *>(down + (size_t)e * H * I);
        const uint4 *rows[GEMV_OUT_PER_WARP];
#pragma unroll
        for (int r = 0; r < GEMV_OUT_PER_WARP; ++r)
            rows[r] = wbase + (size_t)(h0 + min(r, nout - 1)) * iv;
        // Issue every weight load of this pass before the first use: DOWN_CHUNKS x 16 B per row
        // per lane in flight (I = 1536 takes two passes of 768).
        for (int c0 = 0; c0 < iv; c0 += 32 * DOWN_CHUNKS) {
            uint4 w[GEMV_OUT_PER_WARP][DOWN_CHUNKS];
#pragma unroll
            for (int q = 0; q < DOWN_CHUNKS; ++q) {
                const int c = c0 + lane + 32 * q;
#pragma unroll
                for (int r = 0; r < GEMV_OUT_PER_WARP; ++r)
                    w[r][q] = c < iv ? ld_stream(rows[r] + c) : make_uint4(0, 0, 0, 0);
            }
            for (int wq = 0; wq < nwords; ++wq) {
                unsigned bits = s_mask[d][wq];
                while (bits) {
                    const int slot = wq * 32 + __ffs(bits) - 1;
                    bits &= bits - 1u;
                    const int t = slot / k;
                    const float ws = weights[slot];
                    const float4 *ap = reinterpret_cast<const float4 *>(act + (size_t)slot * I);
                    float part[GEMV_OUT_PER_WARP];
#pragma unroll
                    for (int r = 0; r < GEMV_OUT_PER_WARP; ++r) part[r] = 0.0f;
#pragma unroll
                    for (int q = 0; q < DOWN_CHUNKS; ++q) {
                        const int c = c0 + lane + 32 * q;
                        if (c < iv) {
                            const float4 a0 = __ldg(ap + 2 * c), a1 = __ldg(ap + 2 * c + 1);
#pragma unroll
                            for (int r = 0; r < GEMV_OUT_PER_WARP; ++r)
                                part[r] += dot8f(w[r][q], a0, a1);
                        }
                    }
#pragma unroll
                    for (int r = 0; r < GEMV_OUT_PER_WARP; ++r) {
#pragma unroll
                        for (int tt = 0; tt < GEMV_MAX_TOKENS; ++tt)
                            if (tt == t) acc[r][tt] += ws * part[r];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_MAX_TOKENS; ++t) {
        if (t < T) {
#pragma unroll
            for (int r = 0; r < GEMV_OUT_PER_WARP; ++r) {
                const float v = warp_sum(acc[r][t]);
                if (lane == 0 && r < nout) y[(size_t)t * H + h0 + r] = __float2bfloat16(v);
            }
        }
    }
}

// Variant of moe_gemv_down that spreads the experts over blocks: grid = (ceil(H /
// GEMV_OUT_PER_BLOCK), T*k), one block per (first slot of an expert, chunk of H rows). Every
// weight load of a block is independent of the others, so many more bytes are in flight than
// when one block walks the experts in turn; the top-k sum goes through f32 atomics into `acc`
// ([T, H], zeroed before the launch), converted to bf16 by moe_f32_to_bf16 after. The
// summation order (and so the last bits) can change between runs.
#define DOWNA_CHUNKS 6  // 16-byte chunks per lane per row in one pass: I <= 1536 in one pass
extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 2) moe_gemv_down_atomic(
    const float *__restrict__ act,           // [T*k, I]
    const __nv_bfloat16 *__restrict__ down,  // [E, H, I]
    const unsigned *__restrict__ ids,        // [T, k]
    const float *__restrict__ weights,       // [T, k]
    float *__restrict__ acc,                 // [T, H], zeroed
    int T, int k, int E, int H, int I) {
    __shared__ int s_first;
    __shared__ int s_n;
    __shared__ int s_slot[GEMV_MAX_TOKENS];
    const int slot = blockIdx.y;
    const int N = T * k;
    const unsigned e = ids[slot];
    const int tid = threadIdx.x;
    if (tid == 0) {
        s_first = 1;
        s_n = 0;
    }
    __syncthreads();
    for (int j = tid; j < slot; j += GEMV_THREADS)
        if (ids[j] == e) s_first = 0;
    __syncthreads();
    if (!s_first || e >= (unsigned)E) return;
    for (int j = slot + tid; j < N; j += GEMV_THREADS) {
        if (ids[j] == e) {
            const int q = atomicAdd(&s_n, 1);
            if (q < GEMV_MAX_TOKENS) s_slot[q] = j;
        }
    }
    __syncthreads();
    const int ntok = min(s_n, GEMV_MAX_TOKENS);

    const int warp = tid >> 5, lane = tid & 31;
    const int h0 = blockIdx.x * GEMV_OUT_PER_BLOCK + warp * GEMV_OUT_PER_WARP;
    if (h0 >= H) return;
    const int nout = min(GEMV_OUT_PER_WARP, H - h0);
    const int iv = I >> 3;
    const uint4 *wbase = reinterpret_cast<const uint4 *>(down + (size_t)e * H * I);
    const uint4 *rows[GEMV_OUT_PER_WARP];
#pragma unroll
    for (int r = 0; r < GEMV_OUT_PER_WARP; ++r)
        rows[r] = wbase + (size_t)(h0 + min(r, nout - 1)) * iv;
    for (int c0 = 0; c0 < iv; c0 += 32 * DOWNA_CHUNKS) {
        uint4 w[GEMV_OUT_PER_WARP][DOWNA_CHUNKS];
#pragma unroll
        for (int q = 0; q < DOWNA_CHUNKS; ++q) {
            const int c = c0 + lane + 32 * q;
#pragma unroll
            for (int r = 0; r < GEMV_OUT_PER_WARP; ++r)
                w[r][q] = c < iv ? ld_stream(rows[r] + c) : make_uint4(0, 0, 0, 0);
        }
        for (int t = 0; t < ntok; ++t) {
            const int s = s_slot[t];
            const float4 *ap = reinterpret_cast<const float4 *>(act + (size_t)s * I);
            float part[GEMV_OUT_PER_WARP];
#pragma unroll
            for (int r = 0; r < GEMV_OUT_PER_WARP; ++r) part[r] = 0.0f;
#pragma unroll
            for (int q = 0; q < DOWNA_CHUNKS; ++q) {
                const int c = c0 + lane + 32 * q;
                if (c < iv) {
                    const float4 a0 = __ldg(ap + 2 * c), a1 = __ldg(ap + 2 * c + 1);
#pragma unroll
                    for (int r = 0; r < GEMV_OUT_PER_WARP; ++r) part[r] += dot8f(w[r][q], a0, a1);
                }
            }
            const float ws = weights[s];
#pragma unroll
            for (int r = 0; r < GEMV_OUT_PER_WARP; ++r) {
                const float v = warp_sum(part[r]);
                if (lane == 0 && r < nout) atomicAdd(&acc[(size_t)(s / k) * H + h0 + r], ws * v);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) tiled grouped GEMMs (wmma)
// ---------------------------------------------------------------------------------------------

#define TBM 64
#define TBN 128
#define TBK 64       // 128 B of each weight row per stage: whole cache lines from HBM
#define TSTAGES 4    // 3 stages in flight while one is consumed
#define TLDS (TBK + 8)  // smem row stride (bf16): 144 B keeps 16 B chunks aligned, no bank conflicts
#define TLDC (TBN + 4)  // epilogue row stride (f32)
#define TTHREADS 256
#define TCHUNKS (TBK / 8)                      // 16-byte chunks per tile row
#define TROWS_PER_PASS (TTHREADS / TCHUNKS)    // tile rows one pass of the block loads
#define TA_PER_THREAD (TBM / TROWS_PER_PASS)   // A rows each thread loads
#define TB_PER_THREAD (TBN / TROWS_PER_PASS)   // B rows each thread loads

struct TilePipe {
    __nv_bfloat16 a[TSTAGES][TBM][TLDS];
    __nv_bfloat16 b[TSTAGES][TBN][TLDS];
};
union TileSmem {
    TilePipe p;
    float c[TBM][TLDC];
};
// Dynamic shared memory per block; the host raises the kernels' limit to this
// (TILE_SMEM_BYTES in crates/kernels/src/cuda/experts.rs).
static_assert(sizeof(TileSmem) == 110592, "keep TILE_SMEM_BYTES in step");

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    const int n = valid ? 16 : 0;  // 0: zero-fill, nothing read
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Shared main loop: C[64 x 128] = A[64 x K] . B[128 x K]^T. Each thread loads 16-byte chunk
// (tid % 8) of tile rows tid / 8 + 32 u; the caller resolves those rows' pointers (null = zero
// row). Columns at or past K are zero-filled, so K only needs to be a multiple of 8.
__device__ __forceinline__ void tile_mainloop(
    TileSmem &sm, const __nv_bfloat16 *const (&arow)[TA_PER_THREAD],
    const __nv_bfloat16 *const (&brow)[TB_PER_THREAD], const __nv_bfloat16 *safe, int K,
    int rows, wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&acc)[2][2]) {
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;
    // A 16-row fragment wholly past the tile's last real row is all zeros: skip its MMAs (decode
    // and small batches give experts a few rows each). Uniform per warp, as wmma needs.
    const bool live0 = wm * 32 < rows, live1 = wm * 32 + 16 < rows;
    const int r0 = tid / TCHUNKS, kc = (tid % TCHUNKS) * 8;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    const int ktiles = (K + TBK - 1) / TBK;
    auto load = [&](int stage, int kt) {
        const int k = kt * TBK + kc;
        const bool kin = k < K;
        // A missing row or column is zero-filled (src-size 0); `safe` is a valid address that is
        // not read.
#pragma unroll
        for (int u = 0; u < TA_PER_THREAD; ++u) {
            const bool v = kin && arow[u] != nullptr;
            cp_async16(&sm.p.a[stage][r0 + u * TROWS_PER_PASS][kc], v ? arow[u] + k : safe, v);
        }
#pragma unroll
        for (int u = 0; u < TB_PER_THREAD; ++u) {
            const bool v = kin && brow[u] != nullptr;
            cp_async16(&sm.p.b[stage][r0 + u * TROWS_PER_PASS][kc], v ? brow[u] + k : safe, v);
        }
    };
#pragma unroll
    for (int s = 0; s < TSTAGES - 1; ++s) {
        if (s < ktiles) load(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<TSTAGES - 2>();
        __syncthreads();
        const int nk = kt + TSTAGES - 1;
        if (nk < ktiles) load(nk % TSTAGES, nk);
        cp_async_commit();
        const int st = kt % TSTAGES;
        if (!live0) continue;
#pragma unroll
        for (int kk = 0; kk < TBK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb[2];
#pragma unroll
            for (int j = 0; j < 2; ++j)
                wmma::load_matrix_sync(fb[j], &sm.p.b[st][wn * 32 + j * 16][kk], TLDS);
            wmma::load_matrix_sync(fa[0], &sm.p.a[st][wm * 32][kk], TLDS);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[0][j], fa[0], fb[j], acc[0][j]);
            if (live1) {
                wmma::load_matrix_sync(fa[1], &sm.p.a[st][wm * 32 + 16][kk], TLDS);
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[1][j], fa[1], fb[j], acc[1][j]);
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // pipeline buffers are reused as the epilogue tile
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&sm.c[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], TLDC,
                                    wmma::mem_row_major);
    __syncthreads();
}

// grid = (max_tiles, ceil(I / 64)), block = 256, dynamic smem = sizeof(TileSmem). Columns
// 0..63 of the block tile are gate rows n0..n0+63, columns 64..127 the matching up rows, so
// SiLU(g) * u fuses into the epilogue.
extern "C" __global__ void __launch_bounds__(TTHREADS) moe_gemm_gate_up(
    const __nv_bfloat16 *__restrict__ x,        // [T, H]
    const __nv_bfloat16 *__restrict__ gate_up,  // [E, 2I, H]
    const unsigned *__restrict__ offsets,       // [E + 1]
    const unsigned *__restrict__ token_of,      // [N]
    const unsigned *__restrict__ tile_expert, const unsigned *__restrict__ tile_start,
    const unsigned *__restrict__ num_tiles,
    __nv_bfloat16 *__restrict__ act,  // [N, I], permutation order
    int H, int I) {
    extern __shared__ __align__(128) unsigned char smem_dyn[];
    TileSmem &sm = *reinterpret_cast<TileSmem *>(smem_dyn);
    const int m = blockIdx.x;
    if (m >= (int)*num_tiles) return;
    const unsigned e = tile_expert[m];
    const int row0 = (int)tile_start[m];
    const int rows = min(TBM, (int)offsets[e + 1] - row0);
    const int n0 = blockIdx.y * (TBN / 2);
    const int tid = threadIdx.x;
    const int r0 = tid / TCHUNKS;

    const __nv_bfloat16 *wb = gate_up + (size_t)e * 2 * I * H;
    const __nv_bfloat16 *arow[TA_PER_THREAD];
#pragma unroll
    for (int u = 0; u < TA_PER_THREAD; ++u) {
        const int r = r0 + u * TROWS_PER_PASS;
        arow[u] = r < rows ? x + (size_t)token_of[row0 + r] * H : nullptr;
    }
    const __nv_bfloat16 *brow[TB_PER_THREAD];
#pragma unroll
    for (int u = 0; u < TB_PER_THREAD; ++u) {
        const int r = r0 + u * TROWS_PER_PASS;
        const int c = n0 + (r & (TBN / 2 - 1));
        brow[u] = c < I ? wb + (size_t)(r < TBN / 2 ? c : I + c) * H : nullptr;
    }

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    tile_mainloop(sm, arow, brow, wb, H, rows, acc);

    for (int idx = tid; idx < TBM * (TBN / 2); idx += TTHREADS) {
        const int r = idx / (TBN / 2), c = idx % (TBN / 2);
        if (r < rows && n0 + c < I) {
            const float g = sm.c[r][c], u = sm.c[r][c + TBN / 2];
            act[(size_t)(row0 + r) * I + n0 + c] = __float2bfloat16(silu_f(g) * u);
        }
    }
}

// grid = (max_tiles, ceil(H / 128)), block = 256, dynamic smem = sizeof(TileSmem).
extern "C" __global__ void __launch_bounds__(TTHREADS) moe_gemm_down(
    const __nv_bfloat16 *__restrict__ act,   // [N, I], permutation order
    const __nv_bfloat16 *__restrict__ down,  // [E, H, I]
    const unsigned *__restrict__ offsets, const unsigned *__restrict__ token_of,
    const unsigned *__restrict__ slot_of, const float *__restrict__ weights,  // [T*k]
    const unsigned *__restrict__ tile_expert, const unsigned *__restrict__ tile_start,
    const unsigned *__restrict__ num_tiles,
    float *__restrict__ acc_out,  // [T, H], zeroed by the host before the launch
    int H, int I) {
    extern __shared__ __align__(128) unsigned char smem_dyn[];
    __shared__ unsigned s_tok[TBM];
    __shared__ float s_w[TBM];
    TileSmem &sm = *reinterpret_cast<TileSmem *>(smem_dyn);
    const int m = blockIdx.x;
    if (m >= (int)*num_tiles) return;
    const unsigned e = tile_expert[m];
    const int row0 = (int)tile_start[m];
    const int rows = min(TBM, (int)offsets[e + 1] - row0);
    const int n0 = blockIdx.y * TBN;
    const int tid = threadIdx.x;
    const int r0 = tid / TCHUNKS;
    if (tid < rows) {
        s_tok[tid] = token_of[row0 + tid];
        s_w[tid] = weights[slot_of[row0 + tid]];
    }
    const __nv_bfloat16 *wb = down + (size_t)e * H * I;
    const __nv_bfloat16 *arow[TA_PER_THREAD];
#pragma unroll
    for (int u = 0; u < TA_PER_THREAD; ++u) {
        const int r = r0 + u * TROWS_PER_PASS;
        arow[u] = r < rows ? act + (size_t)(row0 + r) * I : nullptr;
    }
    const __nv_bfloat16 *brow[TB_PER_THREAD];
#pragma unroll
    for (int u = 0; u < TB_PER_THREAD; ++u) {
        const int r = r0 + u * TROWS_PER_PASS;
        brow[u] = n0 + r < H ? wb + (size_t)(n0 + r) * I : nullptr;
    }

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    tile_mainloop(sm, arow, brow, wb, I, rows, acc);  // ends with __syncthreads(): s_tok/s_w visible

    for (int idx = tid; idx < TBM * TBN; idx += TTHREADS) {
        const int r = idx / TBN, c = idx % TBN;
        if (r < rows && n0 + c < H)
            atomicAdd(&acc_out[(size_t)s_tok[r] * H + n0 + c], s_w[r] * sm.c[r][c]);
    }
}

extern "C" __global__ void moe_f32_to_bf16(const float *__restrict__ src,
                                           __nv_bfloat16 *__restrict__ dst, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2bfloat16(src[i]);
}
