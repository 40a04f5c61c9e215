// Paged attention over vLLM-style block tables, and the KV write into the block pool. Checked
// against crates/kernels/src/paged.rs (the CPU reference), whose layout and contract these follow:
//
//   cache (K and V alike): [num_blocks, block_size, kv_heads, head_dim], f32, bf16 or FP8 E4M3
//   (one byte, unit scale; writes round to nearest even and saturate at +-448); token p of
//   a sequence lives in block block_table[p / block_size], row p % block_size.
//   q, out: [rows, heads, head_dim] f32. Query row r belongs to sequence row_seq[r] (PA_NO_SEQ:
//   to none; its output is zero) at position row_pos[r], and attends causally to positions
//   0..=row_pos[r] of that sequence. Query head h reads KV head h / (heads / kv_heads).
//   out = softmax(scale * q . K^T) . V per (row, head), in f32.
//
// Decode is a bandwidth problem: every step streams each sequence's whole K and V once. The
// attention kernel therefore
//   - reads each KV head's rows once for its whole query-head group (GQA): a block serves up to
//     PA_GROUP query heads of one KV head, so at Hy3's 8:1 ratio K/V are read once, not 8 times;
//   - splits the context into partitions (flash-decoding / vLLM's paged attention v2) so that a
//     single long sequence still spreads over every SM. Each block does one partition with an
//     exact softmax over it and writes (max, sum, unnormalised acc); paged_attn_reduce merges
//     the partitions of a row. A row whose context fits one partition is finished by the first
//     kernel directly.
//   K phase: one thread per token, the dot products of all the group's heads at once (q in
//   shared memory, read as broadcasts), no shuffles. V phase: one warp per token, lanes own
//   head_dim columns, each warp accumulates its tokens, then the warps are summed.
//
// paged_cache_write_*: reshape_and_cache, one buffer (K or V) per launch: src [T, kv_heads *
// head_dim] -> cache slot slots[t] (slot = block * block_size + row). Slots >= total_slots are
// skipped (u32::MAX marks a row with nothing to write); the host validates slots it builds.
//
// Limits checked by the host: head_dim <= 256 (PA_MAX_HEAD_DIM), partition size a multiple of 32
// and <= PA_MAX_PART, partitions per row <= PA_MAX_PARTS, heads % kv_heads == 0.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <math_constants.h>
#include <stdint.h>

#define FULL_MASK 0xffffffffu
#define PA_THREADS 128
#define PA_WARPS (PA_THREADS / 32)
#define PA_GROUP 8
#define PA_MAX_HEAD_DIM 256
#define PA_MAX_PART 512
#define PA_MAX_PARTS 1024
#define PA_NO_SEQ 0xffffffffu

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
// FP8 E4M3 cache elements are raw bytes (__nv_fp8_storage_t), converted with cuda_fp8.h's
// intrinsics (one cvt instruction each way on sm_89 and later).
__device__ __forceinline__ float to_f32(__nv_fp8_storage_t x) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(x, __NV_E4M3)));
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);  // round to nearest even, as half::bf16::from_f32
}
template <> __device__ __forceinline__ __nv_fp8_storage_t from_f32<__nv_fp8_storage_t>(float x) {
    return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);  // as float8::F8E4M3::from_f32
}

// Two E4M3 bytes packed in 16 bits (lower address in the low byte) as f32.
__device__ __forceinline__ float2 fp8x2_to_f32(unsigned short w) {
    return __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(w, __NV_E4M3)));
}

// Two bf16 packed in a 32-bit word (lower address in the low half) as f32.
__device__ __forceinline__ float bf_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

// VEC consecutive cache elements as f32 from an address aligned to VEC elements (16 bytes at
// most): one vector load.
template <int VEC> __device__ __forceinline__ void load_vec(const float *p, float *o) {
    if constexpr (VEC == 8) {
        const float4 a = reinterpret_cast<const float4 *>(p)[0];
        const float4 b = reinterpret_cast<const float4 *>(p)[1];
        o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
        o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
    } else if constexpr (VEC == 4) {
        const float4 a = *reinterpret_cast<const float4 *>(p);
        o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
    } else if constexpr (VEC == 2) {
        const float2 a = *reinterpret_cast<const float2 *>(p);
        o[0] = a.x; o[1] = a.y;
    } else {
        o[0] = *p;
    }
}

template <int VEC> __device__ __forceinline__ void load_vec(const __nv_bfloat16 *p, float *o) {
    if constexpr (VEC == 8) {
        const uint4 u = *reinterpret_cast<const uint4 *>(p);
        o[0] = bf_lo(u.x); o[1] = bf_hi(u.x); o[2] = bf_lo(u.y); o[3] = bf_hi(u.y);
        o[4] = bf_lo(u.z); o[5] = bf_hi(u.z); o[6] = bf_lo(u.w); o[7] = bf_hi(u.w);
    } else if constexpr (VEC == 4) {
        const uint2 u = *reinterpret_cast<const uint2 *>(p);
        o[0] = bf_lo(u.x); o[1] = bf_hi(u.x); o[2] = bf_lo(u.y); o[3] = bf_hi(u.y);
    } else if constexpr (VEC == 2) {
        const unsigned u = *reinterpret_cast<const unsigned *>(p);
        o[0] = bf_lo(u); o[1] = bf_hi(u);
    } else {
        o[0] = __bfloat162float(*p);
    }
}

template <int VEC>
__device__ __forceinline__ void load_vec(const __nv_fp8_storage_t *p, float *o) {
    if constexpr (VEC >= 4) {
        unsigned u[VEC / 4];
        if constexpr (VEC == 8) {
            const uint2 w = *reinterpret_cast<const uint2 *>(p);
            u[0] = w.x;
            u[1] = w.y;
        } else {
            u[0] = *reinterpret_cast<const unsigned *>(p);
        }
#pragma unroll
        for (int i = 0; i < VEC / 4; ++i) {
            const float2 a = fp8x2_to_f32((unsigned short)(u[i] & 0xffffu));
            const float2 b = fp8x2_to_f32((unsigned short)(u[i] >> 16));
            o[4 * i] = a.x; o[4 * i + 1] = a.y; o[4 * i + 2] = b.x; o[4 * i + 3] = b.y;
        }
    } else if constexpr (VEC == 2) {
        const float2 a = fp8x2_to_f32(*reinterpret_cast<const unsigned short *>(p));
        o[0] = a.x; o[1] = a.y;
    } else {
        o[0] = to_f32(*p);
    }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

// Element offset of token t's row for KV head kh.
__device__ __forceinline__ size_t kv_row(const unsigned *table, int t, int bs, size_t tok_stride,
                                         int kh, int hd) {
    return ((size_t)table[t / bs] * bs + (size_t)(t % bs)) * tok_stride + (size_t)kh * hd;
}

// grid = (partitions, kv_heads * ceil(group / PA_GROUP), rows), block = PA_THREADS,
// dynamic shared memory = (PA_GROUP * hd + max(part * PA_GROUP, PA_WARPS * PA_GROUP * hd)) floats.
// VEC = columns per lane in the V phase (hd <= 32 * VEC).
template <typename KV, int VEC>
__device__ __forceinline__ void paged_attn_partial(
    const float *__restrict__ q, const KV *__restrict__ k_cache, const KV *__restrict__ v_cache,
    const unsigned *__restrict__ row_seq, const unsigned *__restrict__ row_pos,
    const unsigned *__restrict__ block_tables, float *__restrict__ part_acc,
    float *__restrict__ part_max, float *__restrict__ part_sum, float *__restrict__ out, int heads,
    int kv_heads, int hd, int bs, int max_blocks, int part, int max_parts, float scale) {
    extern __shared__ float4 smem4[];
    float *smem = reinterpret_cast<float *>(smem4);
    __shared__ float m_s[PA_GROUP], l_s[PA_GROUP], wred[PA_WARPS][PA_GROUP];

    const int r = blockIdx.z, p = blockIdx.x;
    const int group = heads / kv_heads;
    const int chunks = (group + PA_GROUP - 1) / PA_GROUP;
    const int kh = blockIdx.y / chunks, c = blockIdx.y % chunks;
    const int h0 = kh * group + c * PA_GROUP;
    const int ng = min(PA_GROUP, group - c * PA_GROUP);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const size_t row_head0 = (size_t)r * heads + h0;

    const unsigned seq = row_seq[r];
    if (seq == PA_NO_SEQ) {
        if (p == 0)
            for (int i = tid; i < ng * hd; i += PA_THREADS) out[row_head0 * hd + i] = 0.0f;
        return;
    }
    const int ctx = (int)row_pos[r] + 1;
    const int nparts = (ctx + part - 1) / part;
    if (p >= nparts) return;  // the whole block leaves together
    const int t0 = p * part;
    const int n = min(ctx, t0 + part) - t0;
    const unsigned *table = block_tables + (size_t)seq * max_blocks;
    const size_t tok_stride = (size_t)kv_heads * hd;

    float *q_s = smem;                  // [PA_GROUP][hd], pre-scaled
    float *sc = smem + PA_GROUP * hd;   // [part][PA_GROUP]: scores, then probabilities
    float *red = sc;                    // [PA_WARPS][PA_GROUP][hd] after the V phase
    for (int i = tid; i < PA_GROUP * hd; i += PA_THREADS)
        q_s[i] = (i < ng * hd) ? q[row_head0 * hd + i] * scale : 0.0f;
    __syncthreads();

    // Vector loads need 16-byte aligned caches (whole allocations are) and rows that keep it.
    const bool aligned =
        ((reinterpret_cast<uintptr_t>(k_cache) | reinterpret_cast<uintptr_t>(v_cache)) & 15) == 0;
    const bool vec8 = aligned && (hd & 7) == 0;

    // K phase: thread i scores tokens t0 + i, t0 + i + PA_THREADS, ...
    float mloc[PA_GROUP];
#pragma unroll
    for (int g = 0; g < PA_GROUP; ++g) mloc[g] = -CUDART_INF_F;
    for (int i = tid; i < n; i += PA_THREADS) {
        const KV *kr = k_cache + kv_row(table, t0 + i, bs, tok_stride, kh, hd);
        float s[PA_GROUP];
#pragma unroll
        for (int g = 0; g < PA_GROUP; ++g) s[g] = 0.0f;
        if (vec8) {
            for (int d = 0; d < hd; d += 8) {
                float kf[8];
                load_vec<8>(kr + d, kf);
#pragma unroll
                for (int g = 0; g < PA_GROUP; ++g) {
                    if (g < ng) {
                        const float4 qa = *reinterpret_cast<const float4 *>(q_s + g * hd + d);
                        const float4 qb = *reinterpret_cast<const float4 *>(q_s + g * hd + d + 4);
                        float a = s[g];
                        a = fmaf(qa.x, kf[0], a);
                        a = fmaf(qa.y, kf[1], a);
                        a = fmaf(qa.z, kf[2], a);
                        a = fmaf(qa.w, kf[3], a);
                        a = fmaf(qb.x, kf[4], a);
                        a = fmaf(qb.y, kf[5], a);
                        a = fmaf(qb.z, kf[6], a);
                        a = fmaf(qb.w, kf[7], a);
                        s[g] = a;
                    }
                }
            }
        } else {
            for (int d = 0; d < hd; ++d) {
                const float kf = to_f32(kr[d]);
#pragma unroll
                for (int g = 0; g < PA_GROUP; ++g)
                    if (g < ng) s[g] = fmaf(q_s[g * hd + d], kf, s[g]);
            }
        }
        float4 *dst = reinterpret_cast<float4 *>(sc + i * PA_GROUP);
        dst[0] = make_float4(s[0], s[1], s[2], s[3]);
        dst[1] = make_float4(s[4], s[5], s[6], s[7]);
#pragma unroll
        for (int g = 0; g < PA_GROUP; ++g) mloc[g] = fmaxf(mloc[g], s[g]);
    }

    // Softmax over the partition: block max, then exp and block sum.
#pragma unroll
    for (int g = 0; g < PA_GROUP; ++g) {
        const float v = warp_max(mloc[g]);
        if (lane == 0) wred[warp][g] = v;
    }
    __syncthreads();
    if (tid < PA_GROUP) {
        float v = wred[0][tid];
#pragma unroll
        for (int w = 1; w < PA_WARPS; ++w) v = fmaxf(v, wred[w][tid]);
        m_s[tid] = v;
    }
    __syncthreads();
    float lloc[PA_GROUP];
#pragma unroll
    for (int g = 0; g < PA_GROUP; ++g) lloc[g] = 0.0f;
    for (int i = tid; i < n; i += PA_THREADS) {
#pragma unroll
        for (int g = 0; g < PA_GROUP; ++g) {
            // Heads past the group's end get probability 0 (their scores are 0, their max -inf).
            const float e = (g < ng) ? expf(sc[i * PA_GROUP + g] - m_s[g]) : 0.0f;
            sc[i * PA_GROUP + g] = e;
            lloc[g] += e;
        }
    }
#pragma unroll
    for (int g = 0; g < PA_GROUP; ++g) {
        const float v = warp_sum(lloc[g]);
        if (lane == 0) wred[warp][g] = v;
    }
    __syncthreads();
    if (tid < PA_GROUP) {
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < PA_WARPS; ++w) v += wred[w][tid];
        l_s[tid] = v;
    }

    // V phase: warp w accumulates tokens w, w + PA_WARPS, ...; lane owns columns lane*VEC + j.
    const bool vexact = aligned && hd == 32 * VEC;
    float acc[PA_GROUP][VEC];
#pragma unroll
    for (int g = 0; g < PA_GROUP; ++g)
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[g][j] = 0.0f;
    for (int i = warp; i < n; i += PA_WARPS) {
        const KV *vr = v_cache + kv_row(table, t0 + i, bs, tok_stride, kh, hd);
        float vf[VEC];
        if (vexact) {
            load_vec<VEC>(vr + lane * VEC, vf);
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const int d = lane * VEC + j;
                vf[j] = (d < hd) ? to_f32(vr[d]) : 0.0f;
            }
        }
        const float4 pa = reinterpret_cast<const float4 *>(sc + i * PA_GROUP)[0];
        const float4 pb = reinterpret_cast<const float4 *>(sc + i * PA_GROUP)[1];
        const float pg[PA_GROUP] = {pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w};
#pragma unroll
        for (int g = 0; g < PA_GROUP; ++g)
            if (g < ng)
#pragma unroll
                for (int j = 0; j < VEC; ++j) acc[g][j] = fmaf(pg[g], vf[j], acc[g][j]);
    }
    __syncthreads();  // every warp is done with sc before red (the same memory) is written
#pragma unroll
    for (int g = 0; g < PA_GROUP; ++g)
        if (g < ng)
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const int d = lane * VEC + j;
                if (d < hd) red[(warp * PA_GROUP + g) * hd + d] = acc[g][j];
            }
    __syncthreads();

    const bool single = nparts == 1;
    for (int idx = tid; idx < ng * hd; idx += PA_THREADS) {
        const int g = idx / hd, d = idx - g * hd;
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < PA_WARPS; ++w) a += red[(w * PA_GROUP + g) * hd + d];
        if (single)
            out[(row_head0 + g) * hd + d] = a / l_s[g];
        else
            part_acc[((row_head0 + g) * max_parts + p) * hd + d] = a;
    }
    if (!single && tid < ng) {
        part_max[(row_head0 + tid) * max_parts + p] = m_s[tid];
        part_sum[(row_head0 + tid) * max_parts + p] = l_s[tid];
    }
}

#define PA_ENTRY(NAME, KV, VEC)                                                                   \
    extern "C" __global__ void __launch_bounds__(PA_THREADS) NAME(                               \
        const float *__restrict__ q, const KV *__restrict__ k_cache,                            \
        const KV *__restrict__ v_cache, const unsigned *__restrict__ row_seq,                   \
        const unsigned *__restrict__ row_pos, const unsigned *__restrict__ block_tables,        \
        float *__restrict__ part_acc, float *__restrict__ part_max, float *__restrict__ part_sum, \
        float *__restrict__ out, int heads, int kv_heads, int hd, int bs, int max_blocks,       \
        int part, int max_parts, float scale) {                                                 \
        paged_attn_partial<KV, VEC>(q, k_cache, v_cache, row_seq, row_pos, block_tables,         \
                                    part_acc, part_max, part_sum, out, heads, kv_heads, hd, bs,  \
                                    max_blocks, part, max_parts, scale);                         \
    }

// One entry per cache dtype and head_dim class (hd <= 32, 64, 128, 256), so each keeps only the
// accumulators it needs in registers.
PA_ENTRY(paged_attn_f32_hd32, float, 1)
PA_ENTRY(paged_attn_f32_hd64, float, 2)
PA_ENTRY(paged_attn_f32_hd128, float, 4)
PA_ENTRY(paged_attn_f32_hd256, float, 8)
PA_ENTRY(paged_attn_bf16_hd32, __nv_bfloat16, 1)
PA_ENTRY(paged_attn_bf16_hd64, __nv_bfloat16, 2)
PA_ENTRY(paged_attn_bf16_hd128, __nv_bfloat16, 4)
PA_ENTRY(paged_attn_bf16_hd256, __nv_bfloat16, 8)
PA_ENTRY(paged_attn_fp8_hd32, __nv_fp8_storage_t, 1)
PA_ENTRY(paged_attn_fp8_hd64, __nv_fp8_storage_t, 2)
PA_ENTRY(paged_attn_fp8_hd128, __nv_fp8_storage_t, 4)
PA_ENTRY(paged_attn_fp8_hd256, __nv_fp8_storage_t, 8)

// Merges the partitions of rows whose context spans more than one:
// out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p.
// grid = (heads, rows), block = PA_THREADS.
extern "C" __global__ void __launch_bounds__(PA_THREADS) paged_attn_reduce(
    const float *__restrict__ part_acc, const float *__restrict__ part_max,
    const float *__restrict__ part_sum, const unsigned *__restrict__ row_seq,
    const unsigned *__restrict__ row_pos, float *__restrict__ out, int heads, int hd, int part,
    int max_parts) {
    __shared__ float w_s[PA_MAX_PARTS];
    __shared__ float wred[PA_WARPS];
    __shared__ float total_s;
    const int h = blockIdx.x, r = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (row_seq[r] == PA_NO_SEQ) return;
    const int ctx = (int)row_pos[r] + 1;
    const int nparts = (ctx + part - 1) / part;
    if (nparts <= 1) return;  // finished by the partition kernel
    const size_t base = ((size_t)r * heads + h) * max_parts;

    float m = -CUDART_INF_F;
    for (int i = tid; i < nparts; i += PA_THREADS) m = fmaxf(m, part_max[base + i]);
    m = warp_max(m);
    if (lane == 0) wred[warp] = m;
    __syncthreads();
    m = wred[0];
#pragma unroll
    for (int w = 1; w < PA_WARPS; ++w) m = fmaxf(m, wred[w]);
    __syncthreads();  // wred is reused below

    float l = 0.0f;
    for (int i = tid; i < nparts; i += PA_THREADS) {
        const float w = expf(part_max[base + i] - m);
        w_s[i] = w;
        l += w * part_sum[base + i];
    }
    l = warp_sum(l);
    if (lane == 0) wred[warp] = l;
    __syncthreads();
    if (tid == 0) {
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < PA_WARPS; ++w) s += wred[w];
        total_s = s;
    }
    __syncthreads();
    const float inv = 1.0f / total_s;
    for (int d = tid; d < hd; d += PA_THREADS) {
        float a = 0.0f;
        for (int i = 0; i < nparts; ++i) a = fmaf(w_s[i], part_acc[(base + i) * hd + d], a);
        out[((size_t)r * heads + h) * hd + d] = a * inv;
    }
}

// reshape_and_cache for one of K or V: cache[slots[t] * te + i] = src[t * te + i].
// grid = (T), block = PA_THREADS.
template <typename IN, typename KV>
__device__ __forceinline__ void cache_write(const IN *__restrict__ src,
                                            const unsigned *__restrict__ slots,
                                            KV *__restrict__ cache, int te,
                                            unsigned total_slots) {
    const int t = blockIdx.x;
    const unsigned slot = slots[t];
    if (slot >= total_slots) return;
    const IN *s = src + (size_t)t * te;
    KV *d = cache + (size_t)slot * te;
    for (int i = threadIdx.x; i < te; i += blockDim.x) d[i] = from_f32<KV>(to_f32(s[i]));
}

#define CW_ENTRY(NAME, IN, KV)                                                                  \
    extern "C" __global__ void __launch_bounds__(PA_THREADS)                                   \
        NAME(const IN *__restrict__ src, const unsigned *__restrict__ slots,                   \
             KV *__restrict__ cache, int te, unsigned total_slots) {                            \
        cache_write<IN, KV>(src, slots, cache, te, total_slots);                                \
    }

CW_ENTRY(paged_cache_write_f32_f32, float, float)
CW_ENTRY(paged_cache_write_f32_bf16, float, __nv_bfloat16)
CW_ENTRY(paged_cache_write_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
CW_ENTRY(paged_cache_write_f32_fp8, float, __nv_fp8_storage_t)
CW_ENTRY(paged_cache_write_bf16_fp8, __nv_bfloat16, __nv_fp8_storage_t)
