// CPU emulation of the decode GEMV kernels of kernels/moe_experts.cu (run by
// scripts/emulate-moe-gemv.sh): section (a) of the file is compiled as host C++, every CUDA
// thread of a block runs as a coroutine, and __syncthreads / shuffles / ballots are rendezvous
// points (block-wide for barriers, warp-wide for shuffles and ballots, so warps may take
// different numbers of loop trips, as in the persistent moe_gemv_gate_up_rows* kernels).
// It checks, against a naive f64 reference and against each other, for T = 1..8:
//  - moe_gemv_gate_up (the default) and moe_gemv_gate_up_rows{1,2,4,8} at several grid sizes
//    (1 block up to more warps than items): act within rel 1e-5 of the reference, the rows
//    kernels' bit-identical to moe_gemv_gate_up's, every valid slot written, slots with an
//    out-of-range expert left alone;
//  - the rest of the GEMV path on the rows kernel's act: moe_gemv_down, and
//    moe_gemv_down_atomic + the bf16 conversion: y within rel 5e-3 (bf16) of the reference.
// It cannot see code generation, timing or the device memory model (scripts/gpu-check.sh does).
#include <ucontext.h>
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
struct __nv_bfloat16 { uint16_t b; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.b << 16); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
    return {__bfloat162float(h.x), __bfloat162float(h.y)};
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even (finite inputs)
    unsigned u; memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
template <typename T> inline T __ldg(const T *p) { return *p; }
template <typename T> inline T __ldcs(const T *p) { return *p; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }
inline int atomicAdd(int *p, int v) { int o = *p; *p += v; return o; }
inline float atomicAdd(float *p, float v) { float o = *p; *p += v; return o; }
inline unsigned atomicOr(unsigned *p, unsigned v) { unsigned o = *p; *p |= v; return o; }
using std::max;
using std::min;

struct Dim3 { unsigned x = 0, y = 0, z = 0; };
Dim3 threadIdx, blockIdx, blockDim, gridDim;

// --- scheduler: threads of one block are coroutines on one OS thread --------------------------
// A coroutine switch. On x86-64 a few instructions that save the callee-saved registers and
// swap stacks (swapcontext makes a signal-mask system call per switch, which made this check
// take minutes); elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void emu_switch(void **save_sp, void *load_sp);
asm(".text\n.globl emu_switch\n.type emu_switch,@function\nemu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
    ".size emu_switch, .-emu_switch\n");
struct Ctx { void *sp; };
static Ctx g_sched;
inline void ctx_switch(Ctx *from, Ctx *to) { emu_switch(&from->sp, to->sp); }
// A fresh coroutine that starts in entry() on [stack, stack + size): six zero registers for
// emu_switch to pop, then entry's address for its ret, then a dummy return address so that
// entry starts with the stack aligned as after a call.
inline void ctx_make(Ctx *c, char *stack, size_t size, void (*entry)()) {
    void **p = (void **)(((uintptr_t)(stack + size)) & ~(uintptr_t)15);
    *--p = nullptr;
    *--p = (void *)entry;
    for (int r = 0; r < 6; ++r) *--p = nullptr;
    c->sp = p;
}
#else
struct Ctx { ucontext_t uc; };
static Ctx g_sched;
inline void ctx_switch(Ctx *from, Ctx *to) { swapcontext(&from->uc, &to->uc); }
inline void ctx_make(Ctx *c, char *stack, size_t size, void (*entry)()) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = stack;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = nullptr;
    makecontext(&c->uc, entry, 0);
}
#endif
static std::vector<Ctx> g_ctx;
static std::vector<char> g_done;
static int g_cur;
static long g_events;  // arrivals at rendezvous points and exits; none in a round = deadlock
static int g_live;
static int g_bar_count;
static unsigned g_bar_gen;
struct WarpSync { int count; unsigned gen; };
static WarpSync g_wsync[32];
static float g_xch[1024];
static unsigned g_bxch[1024];
// What each waiting thread waits for: *g_wait_ptr[i] to move off g_wait_val[i] (the scheduler
// does not resume it before, so a round costs one switch per thread that can move).
static std::vector<const unsigned *> g_wait_ptr;
static std::vector<unsigned> g_wait_val;

inline void wait_while_equal(const unsigned *gen_ptr, unsigned gen) {
    while (*gen_ptr == gen) {
        g_wait_ptr[g_cur] = gen_ptr;
        g_wait_val[g_cur] = gen;
        ctx_switch(&g_ctx[g_cur], &g_sched);
    }
    g_wait_ptr[g_cur] = nullptr;
}
inline void __syncthreads() {
    const unsigned gen = g_bar_gen;
    ++g_events;
    if (++g_bar_count == g_live) {
        g_bar_count = 0;
        ++g_bar_gen;
    } else {
        wait_while_equal(&g_bar_gen, gen);
    }
}
// The 32 lanes of the calling thread's warp meet here (all lanes of a warp are converged at
// every shuffle and ballot of these kernels: full masks only).
inline void warp_rendezvous() {
    WarpSync &w = g_wsync[threadIdx.x >> 5];
    const unsigned gen = w.gen;
    ++g_events;
    if (++w.count == 32) {
        w.count = 0;
        ++w.gen;
    } else {
        wait_while_equal(&w.gen, gen);
    }
}
inline void need_full(unsigned mask) {
    if (mask != 0xffffffffu) { fprintf(stderr, "partial shuffle mask %08x\n", mask); exit(3); }
}
inline float __shfl_xor_sync(unsigned mask, float v, int off) {
    need_full(mask);
    g_xch[threadIdx.x] = v;
    warp_rendezvous();
    const float r = g_xch[(threadIdx.x & ~31u) | ((threadIdx.x & 31u) ^ (unsigned)off)];
    warp_rendezvous();
    return r;
}
inline unsigned __ballot_sync(unsigned mask, bool p) {
    need_full(mask);
    g_bxch[threadIdx.x] = p;
    warp_rendezvous();
    unsigned r = 0;
    for (unsigned l = 0; l < 32; ++l) r |= (g_bxch[(threadIdx.x & ~31u) | l] ? 1u : 0u) << l;
    warp_rendezvous();
    return r;
}

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

#include "experts_gemv_emu.inc"  // kernels/moe_experts.cu section (a), CUDA includes removed

static const std::function<void()> *g_fn;
static void trampoline() {
    const int i = g_cur;
    (*g_fn)();
    g_done[i] = 1;
    --g_live;
    ++g_events;
    if (g_bar_count > 0) {
        fprintf(stderr, "thread %d exited while %d wait at __syncthreads\n", i, g_bar_count);
        exit(3);
    }
    ctx_switch(&g_ctx[i], &g_sched);  // never resumed
    abort();
}
static void launch(Dim3 grid, int threads, const std::function<void()> &f) {
    gridDim = grid;
    blockDim = {(unsigned)threads, 1, 1};
    g_fn = &f;
    static std::vector<std::vector<char>> stacks(1024, std::vector<char>(64 * 1024));
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                g_ctx.assign(threads, Ctx{});
                g_done.assign(threads, 0);
                g_wait_ptr.assign(threads, nullptr);
                g_wait_val.assign(threads, 0);
                g_live = threads;
                g_bar_count = 0;
                for (auto &w : g_wsync) w = {0, 0};
                for (int i = 0; i < threads; ++i)
                    ctx_make(&g_ctx[i], stacks[i].data(), stacks[i].size(), trampoline);
                while (g_live > 0) {
                    const long ev = g_events;
                    for (int i = 0; i < threads; ++i) {
                        if (g_done[i]) continue;
                        if (g_wait_ptr[i] && *g_wait_ptr[i] == g_wait_val[i]) continue;
                        g_cur = i;
                        threadIdx = {(unsigned)i, 0, 0};
                        ctx_switch(&g_sched, &g_ctx[i]);
                    }
                    if (g_live > 0 && g_events == ev) {
                        fprintf(stderr, "deadlock in block (%u,%u,%u): %d threads waiting\n", x, y,
                                z, g_live);
                        exit(3);
                    }
                }
            }
}

// --- test cases ---------------------------------------------------------------------------------
static int g_pass, g_fail;
static void verdict(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void verdict(bool ok, const char *fmt, ...) {
    (ok ? g_pass : g_fail)++;
    printf("%s ", ok ? "ok  " : "FAIL");
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
}

static double rel(const std::vector<float> &got, const std::vector<double> &ref,
                  const std::vector<char> &use) {
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        if (!use[i]) continue;
        const double d = got[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

struct Case { const char *name; int E, k, H, I; bool bad_id; };

static void run_case(const Case &cs, int T, std::mt19937 &rng) {
    const int E = cs.E, k = cs.k, H = cs.H, I = cs.I, N = T * k;
    std::normal_distribution<float> nd(0.f, 1.f);
    auto bf = [&](float s) { return __float2bfloat16(nd(rng) * s); };
    std::vector<__nv_bfloat16> x((size_t)T * H), gu((size_t)E * 2 * I * H), dn((size_t)E * H * I);
    for (auto &v : x) v = bf(1.f);
    for (auto &v : gu) v = bf(1.f / std::sqrt((float)H));
    for (auto &v : dn) v = bf(1.f / std::sqrt((float)I));
    // Routing: k - 1 distinct experts per token out of the first half of experts 0..E-2 (so
    // tokens share experts), the last column always expert E-1 (a shared expert); with bad_id
    // the last token's first slot names expert E (out of range: skipped by every kernel).
    std::vector<unsigned> ids(N);
    std::vector<float> w(N);
    std::uniform_real_distribution<float> ud(0.05f, 1.f);
    const int pool = std::min(E - 1, std::max(k - 1, (E - 1) / 2));
    for (int t = 0; t < T; ++t) {
        std::vector<unsigned> p(pool);
        for (int i = 0; i < pool; ++i) p[i] = i;
        std::shuffle(p.begin(), p.end(), rng);
        for (int j = 0; j < k; ++j) {
            ids[t * k + j] = j == k - 1 ? E - 1 : p[j];
            w[t * k + j] = j == k - 1 ? 1.f : ud(rng);
        }
    }
    if (cs.bad_id) ids[(T - 1) * k] = E;
    // f64 reference.
    auto f = [](__nv_bfloat16 b) { return (double)__bfloat162float(b); };
    std::vector<double> act_ref((size_t)N * I, 0.0), y_ref((size_t)T * H, 0.0);
    std::vector<char> slot_ok(N);
    for (int s = 0; s < N; ++s) {
        slot_ok[s] = ids[s] < (unsigned)E;
        if (!slot_ok[s]) continue;
        const size_t e = ids[s], t = s / k;
        for (int o = 0; o < I; ++o) {
            double g = 0, u = 0;
            for (int h = 0; h < H; ++h) {
                g += f(gu[(e * 2 * I + o) * H + h]) * f(x[t * H + h]);
                u += f(gu[(e * 2 * I + I + o) * H + h]) * f(x[t * H + h]);
            }
            act_ref[(size_t)s * I + o] = g / (1.0 + std::exp(-g)) * u;
        }
        for (int h = 0; h < H; ++h) {
            double a = 0;
            for (int o = 0; o < I; ++o) a += f(dn[(e * H + h) * I + o]) * act_ref[(size_t)s * I + o];
            y_ref[t * H + h] += w[s] * a;
        }
    }
    std::vector<char> act_use((size_t)N * I), y_use((size_t)T * H, 1);
    for (int s = 0; s < N; ++s)
        for (int o = 0; o < I; ++o) act_use[(size_t)s * I + o] = slot_ok[s];

    const int threads = GEMV_THREADS, per_block = GEMV_OUT_PER_BLOCK;
    auto poison = [](std::vector<float> &v) { std::fill(v.begin(), v.end(), NAN); };
    // The default kernel.
    std::vector<float> act_blocks((size_t)N * I);
    poison(act_blocks);
    launch({(unsigned)((I + per_block - 1) / per_block), (unsigned)N, 1}, threads,
           [&] { moe_gemv_gate_up(x.data(), gu.data(), ids.data(), act_blocks.data(), T, k, E, H, I); });
    // Checks an act buffer: written exactly where it should be, close to the reference.
    auto check_act = [&](const std::vector<float> &act, int &bad_written, int &unwritten) {
        bad_written = unwritten = 0;
        for (size_t i = 0; i < act.size(); ++i) {
            if (act_use[i] && !std::isfinite(act[i])) ++unwritten;
            if (!act_use[i] && !std::isnan(act[i])) ++bad_written;
        }
    };
    int bw, uw;
    check_act(act_blocks, bw, uw);
    const double r_blocks = rel(act_blocks, act_ref, act_use);
    verdict(bw == 0 && uw == 0 && r_blocks < 1e-5,
            "%-34s T=%d moe_gemv_gate_up            act rel %.2e unwritten %d stray %d", cs.name,
            T, r_blocks, uw, bw);

    const int maxt = T <= 1 ? 1 : T <= 2 ? 2 : T <= 4 ? 4 : 8;
    auto rows_kernel = [&](const __nv_bfloat16 *xp, const __nv_bfloat16 *g, const unsigned *ip,
                           float *ap) {
        switch (maxt) {
            case 1: moe_gemv_gate_up_rows1(xp, g, ip, ap, T, k, E, H, I); break;
            case 2: moe_gemv_gate_up_rows2(xp, g, ip, ap, T, k, E, H, I); break;
            case 4: moe_gemv_gate_up_rows4(xp, g, ip, ap, T, k, E, H, I); break;
            default: moe_gemv_gate_up_rows8(xp, g, ip, ap, T, k, E, H, I); break;
        }
    };
    // The host's cap: no more blocks than N * I items fill at 8 warps a block.
    const int cap = (N * I + GEMV_WARPS - 1) / GEMV_WARPS;
    std::vector<float> act_rows((size_t)N * I);
    for (int grid : {1, 2, 5, 13, cap, cap + 3}) {
        poison(act_rows);
        launch({(unsigned)grid, 1, 1}, threads,
               [&] { rows_kernel(x.data(), gu.data(), ids.data(), act_rows.data()); });
        check_act(act_rows, bw, uw);
        const double r = rel(act_rows, act_ref, act_use);
        bool same = true;
        for (size_t i = 0; i < act_rows.size(); ++i)
            if (act_use[i] && memcmp(&act_rows[i], &act_blocks[i], 4) != 0) same = false;
        verdict(bw == 0 && uw == 0 && r < 1e-5 && same,
                "%-34s T=%d moe_gemv_gate_up_rows%d grid %4d act rel %.2e unwritten %d stray %d "
                "bit-identical to moe_gemv_gate_up: %s",
                cs.name, T, maxt, grid, r, uw, bw, same ? "yes" : "NO");
    }

    // Whole GEMV path with the rows kernel's act (grid = cap): both down kernels.
    std::vector<float> yf(T * H);
    std::vector<__nv_bfloat16> y(T * H);
    auto y_rel = [&](bool &finite) {
        for (int i = 0; i < T * H; ++i) yf[i] = __bfloat162float(y[i]);
        finite = std::all_of(yf.begin(), yf.end(), [](float v) { return std::isfinite(v); });
        return rel(yf, y_ref, y_use);
    };
    std::fill(y.begin(), y.end(), __nv_bfloat16{0xffff});
    launch({(unsigned)((H + per_block - 1) / per_block), 1, 1}, threads,
           [&] { moe_gemv_down(act_rows.data(), dn.data(), ids.data(), w.data(), y.data(), T, k, E, H, I); });
    bool fin;
    double r = y_rel(fin);
    verdict(fin && r < 5e-3, "%-34s T=%d rows + moe_gemv_down        y rel %.2e finite %d",
            cs.name, T, r, fin);
    std::vector<float> acc(T * H, 0.f);
    launch({(unsigned)((H + per_block - 1) / per_block), (unsigned)N, 1}, threads, [&] {
        moe_gemv_down_atomic(act_rows.data(), dn.data(), ids.data(), w.data(), acc.data(), T, k, E, H, I);
    });
    std::fill(y.begin(), y.end(), __nv_bfloat16{0xffff});
    for (int i = 0; i < T * H; ++i) y[i] = __float2bfloat16(acc[i]);  // moe_f32_to_bf16
    r = y_rel(fin);
    verdict(fin && r < 5e-3, "%-34s T=%d rows + moe_gemv_down_atomic y rel %.2e finite %d",
            cs.name, T, r, fin);
}

int main() {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    std::mt19937 rng(11);
    const Case cases[] = {
        {"E17 k5 H256 I96", 17, 5, 256, 96, false},
        {"E64 k9 H416 I160 (partial chunks)", 64, 9, 416, 160, false},
        {"E12 k3 H4096 I32 (4 passes a row)", 12, 3, 4096, 32, false},
        {"E9 k9 H128 I64 (k = E, bad id)", 9, 9, 128, 64, true},
        {"E40 k16 H64 I32 (T*k = 128)", 40, 16, 64, 32, false},
    };
    for (const Case &c : cases)
        for (int T = 1; T <= 8; ++T) {
            if (c.k * T > GEMV_MAX_SLOTS) continue;
            run_case(c, T, rng);
        }
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail != 0;
}
