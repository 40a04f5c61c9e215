// MoE gate top-k: router logits [T, E] (f32) -> expert ids [T, k] (u32) and combine weights
// [T, k] (f32). One warp per token; no host synchronisation.
//
// Contract (mirrors crates/kernels/src/gate.rs, the CPU reference):
//   s  = sigmoid(logit)            (score_fn 0)  or softmax over the row (score_fn 1)
//   c  = s + bias                  (bias only steers the choice; may be null)
//   optional group-limited choice  (n_group > 1: keep the topk_group groups whose two best c
//                                   sum highest; experts elsewhere cannot be chosen)
//   ids = the k largest c, ties to the lower expert id, in descending order
//   w   = s[ids] * scaling / (sum(s[ids]) + eps)   when renormalize, else s[ids] * scaling
// The sum is taken in selection order and the arithmetic is the CPU reference's, so the weights
// agree bit for bit whenever the scores do.
//
// Limits checked by the host: E <= 512 (16 values per lane), k <= 16, n_group <= 32.

#include <cuda_runtime.h>
#include <math_constants.h>

#define GATE_PER_LANE 16
#define FULL_MASK 0xffffffffu

// (value, id) ordering: larger value first, lower id on ties.
__device__ __forceinline__ bool gate_better(float v, unsigned i, float bv, unsigned bi) {
    return v > bv || (v == bv && i < bi);
}

__device__ __forceinline__ void warp_argmax(float &bv, unsigned &bi) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        float ov = __shfl_xor_sync(FULL_MASK, bv, off);
        unsigned oi = __shfl_xor_sync(FULL_MASK, bi, off);
        if (gate_better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
}

extern "C" __global__ void moe_gate_topk_f32(
    const float *__restrict__ logits,  // [T, E]
    const float *__restrict__ bias,    // [E] or null
    unsigned *__restrict__ ids,        // [T, k]
    float *__restrict__ weights,       // [T, k]
    int T, int E, int k, int score_fn, int n_group, int topk_group, int renormalize,
    float scaling, float eps) {
    const int token = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    if (token >= T) return;  // whole warps leave together
    const float *row = logits + (size_t)token * E;

    float s[GATE_PER_LANE];  // scores
    float c[GATE_PER_LANE];  // choice values (score + bias, masked)
#pragma unroll
    for (int j = 0; j < GATE_PER_LANE; ++j) {
        const int e = lane + 32 * j;
        s[j] = (e < E) ? row[e] : -CUDART_INF_F;
    }

    if (score_fn == 0) {
#pragma unroll
        for (int j = 0; j < GATE_PER_LANE; ++j) {
            const int e = lane + 32 * j;
            if (e < E) s[j] = 1.0f / (1.0f + expf(-s[j]));
        }
    } else {
        float m = -CUDART_INF_F;
#pragma unroll
        for (int j = 0; j < GATE_PER_LANE; ++j) m = fmaxf(m, s[j]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, off));
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < GATE_PER_LANE; ++j) {
            const int e = lane + 32 * j;
            if (e < E) {
                s[j] = expf(s[j] - m);
                sum += s[j];
            }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(FULL_MASK, sum, off);
#pragma unroll
        for (int j = 0; j < GATE_PER_LANE; ++j) {
            const int e = lane + 32 * j;
            if (e < E) s[j] = s[j] / sum;
        }
    }

#pragma unroll
    for (int j = 0; j < GATE_PER_LANE; ++j) {
        const int e = lane + 32 * j;
        c[j] = (e < E) ? (bias != nullptr ? s[j] + bias[e] : s[j]) : -CUDART_INF_F;
    }

    if (n_group > 1) {
        // Group score = sum of the group's two best choice values (DeepSeek-V3). Lane g keeps
        // group g's score.
        const int gsize = E / n_group;
        float my_gscore = -CUDART_INF_F;
        for (int g = 0; g < n_group; ++g) {
            float a = -CUDART_INF_F, b = -CUDART_INF_F;
#pragma unroll
            for (int j = 0; j < GATE_PER_LANE; ++j) {
                const int e = lane + 32 * j;
                if (e < E && e / gsize == g) {
                    const float v = c[j];
                    if (v > a) {
                        b = a;
                        a = v;
                    } else if (v > b) {
                        b = v;
                    }
                }
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                const float oa = __shfl_xor_sync(FULL_MASK, a, off);
                const float ob = __shfl_xor_sync(FULL_MASK, b, off);
                const float na = fmaxf(a, oa);
                const float nb = fmaxf(fminf(a, oa), fmaxf(b, ob));
                a = na;
                b = nb;
            }
            if (lane == g) my_gscore = (gsize >= 2) ? a + b : a;
        }
        unsigned keep = 0;
        for (int r = 0; r < topk_group; ++r) {
            const bool cand = lane < n_group && !((keep >> lane) & 1u);
            float bv = cand ? my_gscore : -CUDART_INF_F;
            unsigned bi = cand ? (unsigned)lane : 0xffffffffu;
            warp_argmax(bv, bi);
            if (bi < 32) keep |= 1u << bi;
        }
#pragma unroll
        for (int j = 0; j < GATE_PER_LANE; ++j) {
            const int e = lane + 32 * j;
            if (e < E && !((keep >> (e / gsize)) & 1u)) c[j] = -CUDART_INF_F;
        }
    }

    unsigned taken = 0;  // bit j: this lane's value j was chosen
    float sum = 0.0f;
    unsigned my_id = 0;
    float my_score = 0.0f;
    for (int sel = 0; sel < k; ++sel) {
        float bv = -CUDART_INF_F;
        unsigned bi = 0xffffffffu;
#pragma unroll
        for (int j = 0; j < GATE_PER_LANE; ++j) {
            const unsigned e = (unsigned)(lane + 32 * j);
            if (e < (unsigned)E && !((taken >> j) & 1u) && gate_better(c[j], e, bv, bi)) {
                bv = c[j];
                bi = e;
            }
        }
        warp_argmax(bv, bi);
        const int owner = (int)(bi & 31u);
        const int slot = (int)(bi >> 5);
        float sv = 0.0f;
#pragma unroll
        for (int j = 0; j < GATE_PER_LANE; ++j) {
            if (j == slot) sv = s[j];
        }
        sv = __shfl_sync(FULL_MASK, sv, owner);
        if (lane == owner) taken |= 1u << slot;
        sum += sv;
        if (lane == sel) {
            my_id = bi;
            my_score = sv;
        }
    }
    const float scale = renormalize ? scaling / (sum + eps) : scaling;
    if (lane < k) {
        ids[(size_t)token * k + lane] = my_id;
        weights[(size_t)token * k + lane] = my_score * scale;
    }
}
