// CPU emulation of kernels/paged_attention.cu (run by scripts/emulate-paged-attention.sh): the
// kernel source is compiled as host C++, every CUDA thread of a block runs as a coroutine,
// __syncthreads and shuffles are scheduler rounds. It checks the kernels' indexing, partitioning
// and math against a naive f64 reference without a GPU; it cannot see code generation, timing
// or the device memory model (scripts/gpu-check.sh does that).
#include <ucontext.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>
#include <algorithm>

struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct __nv_bfloat16 { uint16_t b; };
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.b << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    unsigned u; memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
// cuda_fp8.h / cuda_fp16.h as far as the kernels use them. Halves are opaque to the kernels, so
// here they carry their (exact) float value. E4M3 decoding is the format's definition; encoding
// is the nearest value by search (ties to the even code, saturating at 448), independent of any
// bit arithmetic.
typedef unsigned char __nv_fp8_storage_t;
typedef unsigned short __nv_fp8x2_storage_t;
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
struct __half_raw { float v; };
struct __half2_raw { float x, y; };
struct __half { float v; __half(__half_raw r) : v(r.v) {} };
struct __half2 { float x, y; __half2(__half2_raw r) : x(r.x), y(r.y) {} };
inline float __half2float(__half h) { return h.v; }
inline float2 __half22float2(__half2 h) { return {h.x, h.y}; }
inline float e4m3_value(unsigned b) {
    const int e = (b >> 3) & 15, m = b & 7;
    const float v = e ? std::ldexp(1.0f + m / 8.0f, e - 7) : std::ldexp(m / 8.0f, -6);
    return (b & 0x80) ? -v : v;
}
inline __half_raw __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t b, __nv_fp8_interpretation_t) {
    return {e4m3_value(b)};
}
inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t w, __nv_fp8_interpretation_t) {
    return {e4m3_value(w & 0xffu), e4m3_value(w >> 8)};
}
inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t, __nv_fp8_interpretation_t) {
    const double a = std::fabs((double)x);
    unsigned best = 0;
    for (unsigned c = 1; c <= 0x7E; ++c) {  // 0x7F is NaN
        const double d = std::fabs(e4m3_value(c) - a), db = std::fabs(e4m3_value(best) - a);
        if (d < db || (d == db && (c & 1) == 0)) best = c;
    }
    return (__nv_fp8_storage_t)(best | (std::signbit(x) ? 0x80u : 0u));
}
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
// Threads of a block are coroutines on one OS thread; a barrier yields to the scheduler, which
// runs every thread up to its next barrier per round. Shuffle exchanges use block-wide rounds
// (valid here: every shuffle in these kernels is reached by all threads of the block).
Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;
int t_lane, t_warp;
float4 *g_dyn_smem;
static ucontext_t g_sched;
static std::vector<ucontext_t> g_ctx;
static int g_cur;
inline void yield_barrier() { swapcontext(&g_ctx[g_cur], &g_sched); }
inline void __syncthreads() { yield_barrier(); }
float g_xch[1024];
inline float __shfl_xor_sync(unsigned, float v, int off) {
    g_xch[threadIdx.x] = v;
    yield_barrier();
    float r = g_xch[(threadIdx.x & ~31u) | ((threadIdx.x & 31u) ^ off)];
    yield_barrier();
    return r;
}
using std::min;
using std::max;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define CUDART_INF_F INFINITY

#include "pa_emu.inc"  // kernels/paged_attention.cu with its CUDA includes and extern shared removed

static const std::function<void()> *g_fn;
static std::vector<char> g_done;
static void trampoline(int i) {
    (*g_fn)();
    g_done[i] = 1;
    swapcontext(&g_ctx[i], &g_sched);
}
static void launch(Dim3 grid, int threads, size_t smem_bytes, const std::function<void()> &f) {
    std::vector<float4> smem(smem_bytes / 16 + 1);
    g_dyn_smem = smem.data();
    gridDim = grid;
    blockDim = {(unsigned)threads, 1, 1};
    g_fn = &f;
    static std::vector<std::vector<char>> stacks(1024, std::vector<char>(256 * 1024));
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                for (auto &v : smem) v = {NAN, NAN, NAN, NAN};
                blockIdx = {x, y, z};
                g_ctx.assign(threads, ucontext_t{});
                g_done.assign(threads, 0);
                for (int i = 0; i < threads; ++i) {
                    getcontext(&g_ctx[i]);
                    g_ctx[i].uc_stack.ss_sp = stacks[i].data();
                    g_ctx[i].uc_stack.ss_size = stacks[i].size();
                    g_ctx[i].uc_link = nullptr;
                    makecontext(&g_ctx[i], (void (*)())trampoline, 1, i);
                }
                int alive = threads;
                while (alive > 0) {
                    int ran = 0;
                    for (int i = 0; i < threads; ++i) {
                        if (g_done[i]) continue;
                        g_cur = i;
                        threadIdx = {(unsigned)i, 0, 0};
                        t_lane = i & 31;
                        t_warp = i >> 5;
                        swapcontext(&g_sched, &g_ctx[i]);
                        ++ran;
                    }
                    alive = 0;
                    int finished = 0;
                    for (int i = 0; i < threads; ++i) alive += !g_done[i], finished += g_done[i];
                    // A barrier must be reached by all threads or none (block-uniform returns).
                    if (alive > 0 && finished > 0) {
                        fprintf(stderr, "divergent barrier: %d done, %d waiting\n", finished, alive);
                        exit(3);
                    }
                }
            }
}

struct Seq { int q_start, q_len, ctx; std::vector<unsigned> table; };

template <typename KV> float tof(KV x);
template <> float tof<float>(float x) { return x; }
template <> float tof<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename KV> KV fromf(float x);
template <> float fromf<float>(float x) { return x; }
template <> __nv_bfloat16 fromf<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> float tof<__nv_fp8_storage_t>(__nv_fp8_storage_t x) { return e4m3_value(x); }
template <> __nv_fp8_storage_t fromf<__nv_fp8_storage_t>(float x) {
    return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}

using AttnFn = void (*)(const float *, const void *, const void *, const unsigned *, const unsigned *,
                        const unsigned *, float *, float *, float *, float *, int, int, int, int,
                        int, int, int, float);

int failures = 0, passes = 0;

template <typename KV>
void run_case(const char *name, int heads, int kvh, int hd, int bs, std::vector<int> ctxs, int part,
              bool misalign, std::mt19937 &rng) {
    std::normal_distribution<float> nd(0.f, 1.f);
    // sequences: chunk (7 rows at ctx 40), pad row, decode rows
    std::vector<Seq> seqs;
    seqs.push_back({0, 7, 40, {}});
    int row = 8;
    for (int c : ctxs) { seqs.push_back({row, 1, c, {}}); ++row; }
    int rows = row;
    int need = 0;
    for (auto &s : seqs) need += (s.ctx + bs - 1) / bs;
    int nb = need + need / 8 + 3;
    std::vector<unsigned> ids(nb);
    for (int i = 0; i < nb; ++i) ids[i] = i;
    std::shuffle(ids.begin(), ids.end(), rng);
    int next = 0, max_blocks = 1, max_ctx = 0;
    for (auto &s : seqs) {
        int n = (s.ctx + bs - 1) / bs;
        s.table.assign(ids.begin() + next, ids.begin() + next + n);
        next += n;
        max_blocks = std::max(max_blocks, n);
        max_ctx = std::max(max_ctx, s.ctx);
    }
    int te = kvh * hd;
    size_t layer = (size_t)nb * bs * te;
    // KV write through the emulated kernel: all tokens of all seqs, plus 2 skipped slots.
    std::vector<unsigned> slots;
    for (auto &s : seqs)
        for (int p = 0; p < s.ctx; ++p) slots.push_back(s.table[p / bs] * bs + p % bs);
    int n_new = slots.size();
    slots.push_back(0xffffffffu);
    slots.push_back(nb * bs);
    std::vector<float> k((size_t)(n_new + 2) * te), v(k.size());
    for (auto &x : k) x = nd(rng);
    for (auto &x : v) x = nd(rng);
    // With `misalign` the caches start one element past an aligned address (scalar paths).
    std::vector<KV> kbuf(layer + 1), vbuf(layer + 1);
    KV *kc = kbuf.data() + misalign, *vc = vbuf.data() + misalign;
    for (size_t i = 0; i < layer; ++i) kc[i] = vc[i] = fromf<KV>(nd(rng));
    std::vector<KV> kref(kc, kc + layer), vref(vc, vc + layer);
    for (int t = 0; t < n_new; ++t)
        for (int i = 0; i < te; ++i) {
            kref[(size_t)slots[t] * te + i] = fromf<KV>(k[(size_t)t * te + i]);
            vref[(size_t)slots[t] * te + i] = fromf<KV>(v[(size_t)t * te + i]);
        }
    auto write = [&](const float *src, KV *dst) {
        launch({(unsigned)(n_new + 2), 1, 1}, 128, 0, [&] {
            if constexpr (sizeof(KV) == 4)
                paged_cache_write_f32_f32(src, slots.data(), (float *)dst, te, nb * bs);
            else if constexpr (sizeof(KV) == 2)
                paged_cache_write_f32_bf16(src, slots.data(), (__nv_bfloat16 *)dst, te, nb * bs);
            else
                paged_cache_write_f32_fp8(src, slots.data(), (__nv_fp8_storage_t *)dst, te, nb * bs);
        });
    };
    write(k.data(), kc);
    write(v.data(), vc);
    bool wok = memcmp(kc, kref.data(), layer * sizeof(KV)) == 0 &&
               memcmp(vc, vref.data(), layer * sizeof(KV)) == 0;
    // metadata
    std::vector<unsigned> row_seq(rows, 0xffffffffu), row_pos(rows, 0),
        tables((size_t)seqs.size() * max_blocks, 0);
    for (size_t si = 0; si < seqs.size(); ++si) {
        auto &s = seqs[si];
        std::copy(s.table.begin(), s.table.end(), tables.begin() + si * max_blocks);
        for (int i = 0; i < s.q_len; ++i) {
            row_seq[s.q_start + i] = si;
            row_pos[s.q_start + i] = s.ctx - s.q_len + i;
        }
    }
    std::vector<float> q((size_t)rows * heads * hd);
    for (auto &x : q) x = nd(rng);
    float scale = 1.0f / std::sqrt((float)hd);
    // reference (double)
    std::vector<double> ref(q.size(), 0.0);
    int group = heads / kvh;
    for (int r = 0; r < rows; ++r) {
        if (row_seq[r] == 0xffffffffu) continue;
        auto &s = seqs[row_seq[r]];
        int pos = row_pos[r];
        for (int h = 0; h < heads; ++h) {
            int kh = h / group;
            std::vector<double> lg(pos + 1);
            double mx = -1e300;
            for (int p = 0; p <= pos; ++p) {
                size_t base = ((size_t)s.table[p / bs] * bs + p % bs) * te + (size_t)kh * hd;
                double d = 0;
                for (int j = 0; j < hd; ++j) d += (double)q[((size_t)r * heads + h) * hd + j] * tof(kc[base + j]);
                lg[p] = d * scale;
                mx = std::max(mx, lg[p]);
            }
            double z = 0;
            for (int p = 0; p <= pos; ++p) z += std::exp(lg[p] - mx);
            for (int j = 0; j < hd; ++j) {
                double a = 0;
                for (int p = 0; p <= pos; ++p) {
                    size_t base = ((size_t)s.table[p / bs] * bs + p % bs) * te + (size_t)kh * hd;
                    a += std::exp(lg[p] - mx) / z * tof(vc[base + j]);
                }
                ref[((size_t)r * heads + h) * hd + j] = a;
            }
        }
    }
    // emulated kernels
    int parts = std::max(1, (max_ctx + part - 1) / part);
    size_t stats = (size_t)rows * heads * parts;
    std::vector<float> acc(stats * hd + 1, NAN), mxv(stats + 1, NAN), smv(stats + 1, NAN),
        out(q.size(), NAN);
    int chunks = (group + 7) / 8;
    size_t floats = 8 * hd + std::max(part * 8, 4 * 8 * hd);
    int cls = hd <= 32 ? 0 : hd <= 64 ? 1 : hd <= 128 ? 2 : 3;
    AttnFn fns_f32[4] = {(AttnFn)paged_attn_f32_hd32, (AttnFn)paged_attn_f32_hd64,
                         (AttnFn)paged_attn_f32_hd128, (AttnFn)paged_attn_f32_hd256};
    AttnFn fns_bf16[4] = {(AttnFn)paged_attn_bf16_hd32, (AttnFn)paged_attn_bf16_hd64,
                          (AttnFn)paged_attn_bf16_hd128, (AttnFn)paged_attn_bf16_hd256};
    AttnFn fns_fp8[4] = {(AttnFn)paged_attn_fp8_hd32, (AttnFn)paged_attn_fp8_hd64,
                         (AttnFn)paged_attn_fp8_hd128, (AttnFn)paged_attn_fp8_hd256};
    AttnFn fn = sizeof(KV) == 4 ? fns_f32[cls] : sizeof(KV) == 2 ? fns_bf16[cls] : fns_fp8[cls];
    launch({(unsigned)parts, (unsigned)(kvh * chunks), (unsigned)rows}, 128, floats * 4, [&] {
        fn(q.data(), kc, vc, row_seq.data(), row_pos.data(), tables.data(),
           acc.data(), mxv.data(), smv.data(), out.data(), heads, kvh, hd, bs, max_blocks, part,
           parts, scale);
    });
    if (parts > 1)
        launch({(unsigned)heads, (unsigned)rows, 1}, 128, 0, [&] {
            paged_attn_reduce(acc.data(), mxv.data(), smv.data(), row_seq.data(), row_pos.data(),
                              out.data(), heads, hd, part, parts);
        });
    double num = 0, den = 0;
    int nan = 0;
    for (size_t i = 0; i < out.size(); ++i) {
        if (!std::isfinite(out[i])) { ++nan; continue; }
        double d = out[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    double rel = std::sqrt(num / std::max(den, 1e-300));
    bool pad_zero = true;
    for (int i = 0; i < heads * hd; ++i) pad_zero &= out[(size_t)7 * heads * hd + i] == 0.0f;
    bool ok = wok && nan == 0 && rel < 1e-5 && pad_zero;
    (ok ? passes : failures)++;
    printf("%s %-40s %s%s part %3d parts %3d: write %s, rel %.2e, nan %d, pad zero %d\n",
           ok ? "ok  " : "FAIL", name, sizeof(KV) == 4 ? "f32 " : sizeof(KV) == 2 ? "bf16" : "fp8 ",
           misalign ? " misaligned" : "", part, parts,
           wok ? "exact" : "DIFFERS", rel, nan, pad_zero);
}

int main() {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    std::mt19937 rng(5);
    std::vector<int> ctxs = {1, 15, 16, 17, 100, 300};
    struct C { const char *n; int h, kvh, hd, bs; } cases[] = {
        {"GQA 8:1 hd128 bs16", 16, 2, 128, 16},
        {"GQA 8:1 hd64 bs32", 16, 2, 64, 32},
        {"1:1 hd128 bs32", 4, 4, 128, 32},
        {"GQA 16:1 hd128 bs16", 32, 2, 128, 16},
        {"GQA 2:1 hd12 bs5", 4, 2, 12, 5},
        {"GQA 4:1 hd8 bs4 (e192 fixture)", 4, 1, 8, 4},
        {"GQA 2:1 hd256 bs16", 4, 2, 256, 16},
        {"GQA 3:1 hd100 bs7", 6, 2, 100, 7},
        {"GQA 2:1 hd32 bs16", 4, 2, 32, 16},
    };
    for (auto &c : cases)
        for (int part : {32, 64, 512}) {
            run_case<float>(c.n, c.h, c.kvh, c.hd, c.bs, ctxs, part, false, rng);
            run_case<__nv_bfloat16>(c.n, c.h, c.kvh, c.hd, c.bs, ctxs, part, false, rng);
            run_case<__nv_fp8_storage_t>(c.n, c.h, c.kvh, c.hd, c.bs, ctxs, part, false, rng);
        }
    run_case<float>("GQA 8:1 hd128 bs16", 16, 2, 128, 16, ctxs, 64, true, rng);
    run_case<__nv_bfloat16>("GQA 8:1 hd128 bs16", 16, 2, 128, 16, ctxs, 64, true, rng);
    run_case<__nv_fp8_storage_t>("GQA 8:1 hd128 bs16", 16, 2, 128, 16, ctxs, 64, true, rng);
    printf("%d passed, %d failed\n", passes, failures);
    return failures != 0;
}
