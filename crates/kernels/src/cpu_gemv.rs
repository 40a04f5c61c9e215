//! Matrix products on the CPU with bf16 weights and f32 activations: `y[t] = W · x[t]`.
//!
//! Decode is bound by the bytes of weights read per token. Generic GEMM libraries convert bf16
//! weights block by block and tune for large M (candle's bf16 CPU matmul ran a 128-token
//! prefill of the `small` preset at 3.5 tok/s); here each weight row is widened to f32 in
//! registers (bf16 → f32 is a 16-bit shift) and multiplied into f32 accumulators for
//! [`TOKEN_BLOCK`] activation rows at a time. Work is split by blocks of output rows across
//! threads (rayon); a block's weights stay in cache while every token block passes over them.
//! AVX-512F and AVX2+FMA paths are chosen at run time; a portable loop is the reference.
//! Steps with many bf16-valued activation rows go to the AMX tiles (`cpu_amx`) where the CPU
//! has them, else to the AVX512-BF16 `vdpbf16ps` row kernel (`cpu_bf16dot`) where it has
//! that. The MoE router's f32 weights run through the same driver on f32 row kernels
//! ([`gemv_f32`]), which at decode sizes replace candle's GEMM and its per-call thread count.

use half::bf16;
use rayon::prelude::*;

use crate::{cpu_amx, cpu_bf16dot, KernelError};

/// Activation rows multiplied per pass over a weight row: 8 accumulators of 16 lanes fit the
/// 32 AVX-512 registers with room for the weights and activations.
pub const TOKEN_BLOCK: usize = 8;

/// bf16 weights (4 KiB, two 1024-wide rows) the AVX-512 kernel prefetches ahead of its loads.
/// Session 2 (T0 hint, 2 KiB) measured +13…+38% bytes/s over no prefetch; the hardware
/// prefetcher alone leaves the two cores at about a quarter of the measured bandwidth.
const PREFETCH_AHEAD: usize = 2048;

/// Prefetch into L2, not L1: L2 keeps more misses in flight than L1's fill buffers, and a
/// weight is read once. A 1024×1024 bf16 gemv streamed from 128 MiB and 1 GiB working sets on
/// the dev VM, two threads under load, medians of 5 in four runs: T1 at 4 KiB 15.3–21.3 GB/s,
/// T0 at 4 KiB 8.1–19.8, T0 at 2 KiB 9.6–13.8, no prefetch 7.4–14.2.
#[cfg(target_arch = "x86_64")]
pub(crate) const PREFETCH_HINT: i32 = std::arch::x86_64::_MM_HINT_T1;

/// Output rows per rayon task: 64 rows × 4096 inputs × 2 B = 512 KiB of weights, enough work to
/// amortise scheduling while leaving many tasks for load balance.
const ROWS_PER_TASK: usize = 64;

/// Runs `f` on a rayon worker thread (the caller blocks until it returns).
///
/// A parallel loop started outside the pool injects its job and parks the caller on a latch:
/// two thread hand-offs per loop, and a decode step runs about eight loops per layer. Inside
/// the pool a loop splits by work stealing: the worker that started it runs every part no
/// other worker has taken, so a busy or sleeping sibling never holds it up. Call this around a
/// whole forward pass.
///
/// While `f` runs, the pool's other workers can be kept awake (`with_siblings_awake`,
/// `SWITCHYARD_SPIN_WORKERS=1`).
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        with_siblings_awake(f)
    } else {
        rayon::scope(|_| with_siblings_awake(f))
    }
}

/// Whether a forward pass is keeping the pool's workers awake now; one at a time, so
/// concurrent forwards (tensor-parallel ranks) never wait on each other's spinners.
static SIBLINGS_AWAKE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs `f` (on a pool worker) while every other worker of the pool polls for rayon work
/// instead of going to sleep (llama.cpp's `--poll`), when that pays. A decode step starts a
/// few hundred short parallel loops; between two of them an idle rayon worker falls asleep on
/// a futex, and waking it for the next loop cost ~10% of decode time in futex calls alone on
/// the 2-core dev VM (demo model, q8), plus the wake-up latency before it takes its share.
/// The pollers take loop parts by work stealing, as a woken worker would, and return when `f`
/// does. Polling only pays on cores nothing else wants: on the dev VM (small preset, bf16,
/// decode at batch 1, 2026-11-29) it gave 92–97 tok/s against 83–88 with the machine
/// otherwise idle (the quickstart's q8 demo: 77–78 against 66–70), and 25–26 against 37–44
/// while two busy loops ran, because a poller then holds a core the kernel would give to the
/// other process, delaying the thread that has work. So by default ([`Spin::WhenIdle`]) a forward pass polls only while other processes
/// have left the machine idle ([`others_idle`]); `SWITCHYARD_SPIN_WORKERS=1` always polls,
/// `=0` never.
fn with_siblings_awake<R>(f: impl FnOnce() -> R) -> R {
    static MODE: std::sync::OnceLock<Spin> = std::sync::OnceLock::new();
    let mode = *MODE.get_or_init(
        || match std::env::var("SWITCHYARD_SPIN_WORKERS").as_deref() {
            Ok("1") => Spin::Always,
            Ok("0") => Spin::Never,
            _ => Spin::WhenIdle,
        },
    );
    let poll = match mode {
        Spin::Always => true,
        Spin::Never => false,
        Spin::WhenIdle => others_idle(),
    };
    if poll {
        keep_siblings_awake(f)
    } else {
        f()
    }
}

/// When the pool's other workers poll during a forward pass (`SWITCHYARD_SPIN_WORKERS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spin {
    /// `1`: every forward pass.
    Always,
    /// `0`: never.
    Never,
    /// Unset (or anything else): when [`others_idle`] says the rest of the machine is idle.
    WhenIdle,
}

/// How often [`others_idle`] looks again: long enough for the kernel's CPU-time counters
/// (10 ms ticks) to say something (20 ticks per core), short enough that polling stops
/// within a few decode steps of another process starting.
const IDLE_WINDOW: std::time::Duration = std::time::Duration::from_millis(200);

/// Other processes may use up to this many cores' worth of CPU time for the machine to count
/// as otherwise idle (daemons, the tick accounting's noise), but not a build or a second
/// server.
const IDLE_OTHERS_CORES: f64 = 0.25;

/// Whether the rest of the machine was idle over the last [`IDLE_WINDOW`]: the CPU time all
/// processes used (`/proc/stat`'s first line, steal included) minus this process's own
/// (`/proc/self/stat`), per second of wall time, is under [`IDLE_OTHERS_CORES`]. Both counters
/// are in the same clock ticks, so spinning workers, which count as this process's time, do
/// not read as others' load. False until two readings exist and where `/proc` cannot be
/// read. Shared by every forward pass; the lock is taken once per pass.
fn others_idle() -> bool {
    use std::sync::Mutex;
    use std::time::Instant;
    /// The last reading: when, all processes' busy ticks, this process's ticks, the verdict.
    static LAST: Mutex<Option<(Instant, u64, u64, bool)>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if let Some((at, _, _, verdict)) = *last {
        if now.duration_since(at) < IDLE_WINDOW {
            return verdict;
        }
    }
    let (Some(all), Some(mine)) = (busy_ticks(), own_ticks()) else {
        return false;
    };
    let verdict = last.is_some_and(|(at, all0, mine0, _)| {
        let others = all
            .saturating_sub(all0)
            .saturating_sub(mine.saturating_sub(mine0));
        let secs = now.duration_since(at).as_secs_f64();
        // Linux's USER_HZ, which /proc reports in, is 100 on every architecture.
        others as f64 / 100.0 < IDLE_OTHERS_CORES * secs
    });
    *last = Some((now, all, mine, verdict));
    verdict
}

/// Busy clock ticks of all CPUs since boot: `/proc/stat`'s `cpu` line without idle and iowait.
fn busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    Some(f.get(..8)?.iter().sum::<u64>() - f[3] - f[4])
}

/// This process's user + system clock ticks (`/proc/self/stat` fields 14 and 15, counted
/// after the parenthesised command name, which may hold spaces).
fn own_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so fields 14 and 15 are at 11 and 12.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// [`with_siblings_awake`] itself. Only one caller at a time keeps the workers polling; the
/// others just run.
fn keep_siblings_awake<R>(f: impl FnOnce() -> R) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Ends the polling when `f` returns or unwinds (a scope waits for its spawned jobs, so
    /// a poller still running would hold a panic forever) and lets the next caller poll.
    struct Done<'a>(&'a AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
            SIBLINGS_AWAKE.store(false, Ordering::Release);
        }
    }
    let others = rayon::current_num_threads().saturating_sub(1);
    if others == 0
        || SIBLINGS_AWAKE
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return f();
    }
    let owner = rayon::current_thread_index();
    let done = AtomicBool::new(false);
    rayon::in_place_scope(|s| {
        let _done = Done(&done);
        for _ in 0..others {
            s.spawn(|_| {
                // Run by the owner itself (it waits in a join and picks this up): return at
                // once, or it would spin on a flag only its own outer frame can set.
                if rayon::current_thread_index() == owner {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        f()
    })
}

/// `y[t, o] = Σ_i x[t, i] · w[o, i]` for `t < tokens`; `w` is `[out, inp]`
/// row-major bf16, `x` is `[tokens, inp]` f32, `y` is `[tokens, out]` f32.
pub fn gemv_bf16(
    x: &[f32],
    tokens: usize,
    w: &[bf16],
    out: usize,
    inp: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let shape = (w.len(), out, inp);
    gemv_checked("gemv_bf16", x, tokens, shape, y, || Bf16Rows::new(w, inp))
}

/// `y[t, o] = Σ_i x[t, i] · w[o, i]` with f32 weights (the MoE gate's router, which the
/// checkpoint's reference computes in f32): [`gemv_bf16`]'s layout and threading. A decode step
/// multiplies each layer's router this way; candle's GEMM spent as long finding its thread
/// count (it reads `/proc/cpuinfo` on every call) as multiplying.
pub fn gemv_f32(
    x: &[f32],
    tokens: usize,
    w: &[f32],
    out: usize,
    inp: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let shape = (w.len(), out, inp);
    gemv_checked("gemv_f32", x, tokens, shape, y, || F32Rows::new(w, inp))
}

/// A `gemv_*` entry point's body: [`check_gemv`] on weights of `(elements, out, inp)`, then
/// [`gemv_rows`] on the storage `rows` builds (only once the shapes are known to be right).
fn gemv_checked<W: WeightRows>(
    what: &str,
    x: &[f32],
    tokens: usize,
    (w, out, inp): (usize, usize, usize),
    y: &mut [f32],
    rows: impl FnOnce() -> W,
) -> Result<(), KernelError> {
    check_gemv(what, x.len(), tokens, (w, out * inp), out, inp, y.len())?;
    gemv_rows(x, tokens, &rows(), y);
    Ok(())
}

/// The shape checks every `gemv_*` entry point makes: at least one token, `x` `[tokens, inp]`,
/// the weights `(have, want)` elements and `y` `[tokens, out]`.
pub(crate) fn check_gemv(
    what: &str,
    x: usize,
    tokens: usize,
    (w, want_w): (usize, usize),
    out: usize,
    inp: usize,
    y: usize,
) -> Result<(), KernelError> {
    if tokens == 0 {
        return Err(KernelError::InvalidArgument(format!(
            "{what} needs at least one token"
        )));
    }
    if x != tokens * inp || w != want_w || y != tokens * out {
        return Err(KernelError::InvalidArgument(format!(
            "{what} shapes: x {x} (want {}), w {w} (want {want_w}), y {y} (want {})",
            tokens * inp,
            tokens * out
        )));
    }
    Ok(())
}

/// A `[rows, cols]` weight matrix the row kernels stream, whatever its storage (bf16 here,
/// int8 blocks in [`crate::cpu_q8`]). [`gemv_rows`] and `cpu_moe`'s two passes are written
/// once over this.
pub(crate) trait WeightRows: Sync {
    /// Output rows.
    fn rows(&self) -> usize;
    /// Inputs per row.
    fn cols(&self) -> usize;
    /// The activation layout [`Self::dot`] reads.
    fn packing() -> Packing;
    /// `d[t] = row r · x[t]` for `t < n` (≤ [`TOKEN_BLOCK`]); `x` holds `n` activation rows of
    /// [`Self::cols`] values in [`Self::packing`]'s layout.
    fn dot(&self, r: usize, x: &[f32], n: usize, d: &mut [f32]);
    /// Whether the AMX tile kernels ([`crate::cpu_amx`]) can multiply these weights on this
    /// machine, and on which activations.
    fn tiles(&self) -> Tiles {
        Tiles::No
    }
    /// `out[r][t] = row r0 + r · x[t]` on the tiles for the rows `r0..r0 + out.len() /
    /// x.padded()` (a multiple of 16) and every token of `x`. Only called when
    /// [`Self::tiles`] is not [`Tiles::No`].
    fn tile_block(&self, r0: usize, x: &cpu_amx::Packed, out: &mut [f32]) {
        let _ = (r0, x, out);
        unreachable!("tile_block on weights whose tiles() is No")
    }
    /// Whether the `vdpbf16ps` row kernel ([`crate::cpu_bf16dot`]) can multiply these weights
    /// on this machine, and on which activations (the tiles' contract: bf16 storage on
    /// bf16-exact inputs, quantized storage dequantized to bf16 on rounded inputs). Whether a
    /// step uses it is [`cpu_bf16dot::take`]'s call; the tiles go first where they apply.
    fn bf16_dot(&self) -> Tiles {
        Tiles::No
    }
    /// `out[k · T + t] = row r0 + k · x[t]` for every token `t < T` of `x` and the rows
    /// `r0..r0 + out.len() / T`, on bf16-rounded activations. Only called when
    /// [`Self::bf16_dot`] is not [`Tiles::No`].
    fn dot_pairs_rows(&self, r0: usize, x: &cpu_bf16dot::Pairs, out: &mut [f32]) {
        let _ = (r0, x, out);
        unreachable!("dot_pairs_rows on weights whose bf16_dot() is No")
    }
}

/// Whether a weight storage runs on the AMX tiles, which multiply bf16 values only: the
/// activations are rounded to bf16 on the way in. Gathered here so [`gemv_rows`] and
/// `cpu_moe`'s passes decide the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tiles {
    /// Row kernels only (shape or storage the tiles cannot take, or no AMX).
    No,
    /// Only when the activations already are bf16 values, so the tiles change nothing but
    /// the summation order: bf16 weights, whose f32-activation results must stay as the row
    /// kernels compute them.
    ExactInputs,
    /// With the activations rounded to bf16: storage whose own rounding is coarser, so the
    /// bf16 rounding adds little (Q8: weights to 1/254 of a block's largest, a relative RMS
    /// error of 5.5e-3 per product, against ~1e-3 for bf16 activations; `cpu_q8` module docs).
    RoundedInputs,
}

impl Tiles {
    /// Whether `tokens` activation rows go on the tiles; `exact` says whether they are bf16
    /// values already (asked only where it matters).
    pub(crate) fn take(self, tokens: usize, exact: impl FnOnce() -> bool) -> bool {
        tokens >= cpu_amx::min_tokens()
            && match self {
                Tiles::No => false,
                Tiles::ExactInputs => exact(),
                Tiles::RoundedInputs => true,
            }
    }
}

impl<T: WeightRows> WeightRows for &T {
    fn rows(&self) -> usize {
        (**self).rows()
    }
    fn cols(&self) -> usize {
        (**self).cols()
    }
    fn packing() -> Packing {
        T::packing()
    }
    #[inline]
    fn dot(&self, r: usize, x: &[f32], n: usize, d: &mut [f32]) {
        (**self).dot(r, x, n, d)
    }
    fn tiles(&self) -> Tiles {
        (**self).tiles()
    }
    fn tile_block(&self, r0: usize, x: &cpu_amx::Packed, out: &mut [f32]) {
        (**self).tile_block(r0, x, out)
    }
    fn bf16_dot(&self) -> Tiles {
        (**self).bf16_dot()
    }
    fn dot_pairs_rows(&self, r0: usize, x: &cpu_bf16dot::Pairs, out: &mut [f32]) {
        (**self).dot_pairs_rows(r0, x, out)
    }
}

/// A row-major bf16 `[rows, cols]` matrix under this CPU's [`RowKernel`].
pub(crate) struct Bf16Rows<'a> {
    w: &'a [bf16],
    cols: usize,
    kernel: RowKernel,
}

impl<'a> Bf16Rows<'a> {
    /// `w.len()` must be a multiple of `cols` (callers check shapes first).
    pub(crate) fn new(w: &'a [bf16], cols: usize) -> Self {
        debug_assert!(cols > 0 && w.len().is_multiple_of(cols));
        Self {
            w,
            cols,
            kernel: row_kernel(),
        }
    }
}

impl WeightRows for Bf16Rows<'_> {
    fn rows(&self) -> usize {
        self.w.len() / self.cols
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn packing() -> Packing {
        row_kernel().packing
    }
    #[inline]
    fn dot(&self, r: usize, x: &[f32], n: usize, d: &mut [f32]) {
        let c = self.cols;
        self.kernel.run(&self.w[r * c..(r + 1) * c], x, n, c, d)
    }
    fn tiles(&self) -> Tiles {
        if cpu_amx::fits(self.rows(), self.cols) {
            Tiles::ExactInputs
        } else {
            Tiles::No
        }
    }
    fn tile_block(&self, r0: usize, x: &cpu_amx::Packed, out: &mut [f32]) {
        cpu_amx::tile_block(self.w, self.cols, r0, x, out)
    }
    fn bf16_dot(&self) -> Tiles {
        if cpu_bf16dot::enabled() {
            Tiles::ExactInputs
        } else {
            Tiles::No
        }
    }
    fn dot_pairs_rows(&self, r0: usize, x: &cpu_bf16dot::Pairs, out: &mut [f32]) {
        let (c, rows) = (self.cols, out.len() / x.tokens().max(1));
        cpu_bf16dot::dot_rows(&self.w[r0 * c..(r0 + rows) * c], c, x, out)
    }
}

/// `y[t, o] = w[o] · x[t]`: [`gemv_bf16`]'s driver for any weight storage. Shapes must have
/// been checked ([`check_gemv`]).
pub(crate) fn gemv_rows<W: WeightRows>(x: &[f32], tokens: usize, w: &W, y: &mut [f32]) {
    let (out, inp) = (w.rows(), w.cols());
    let exact = std::cell::OnceCell::new();
    let exact = || *exact.get_or_init(|| cpu_amx::bf16_exact(x));
    if w.tiles().take(tokens, exact) {
        return gemv_tiles(x, tokens, w, y);
    }
    if cpu_bf16dot::take(tokens, w.bf16_dot(), exact) {
        let p = cpu_bf16dot::Pairs::new(x, tokens, inp);
        return by_row_tasks(tokens, out, y, |r0, dst| w.dot_pairs_rows(r0, &p, dst));
    }
    let packing = W::packing();
    let packed;
    let xp: &[f32] = if packing.in_order() {
        x
    } else {
        let mut v = vec![0f32; x.len()];
        packing.pack(x, inp, &mut v);
        packed = v;
        &packed
    };
    by_row_blocks(tokens, out, y, |r, t0, n, d| {
        w.dot(r, &xp[t0 * inp..(t0 + n) * inp], n, d)
    })
}

/// `y[t, o] = dot(o, t0, n, d)` for every output row `o` and token block `t0..t0 + n` (`n` ≤
/// [`TOKEN_BLOCK`]; `dot` writes `d[k]` for token `t0 + k`), output rows split across threads.
fn by_row_blocks(
    tokens: usize,
    out: usize,
    y: &mut [f32],
    dot: impl Fn(usize, usize, usize, &mut [f32]) + Sync,
) {
    by_row_tasks(tokens, out, y, |r0, dst| {
        for t0 in (0..tokens).step_by(TOKEN_BLOCK) {
            let n = TOKEN_BLOCK.min(tokens - t0);
            for (j, d) in dst.chunks_mut(tokens).enumerate() {
                dot(r0 + j, t0, n, &mut d[t0..t0 + n]);
            }
        }
    })
}

/// `y[t, o] = task(r0, dst)`'s `dst[(o − r0) · tokens + t]` for every output row `o`: blocks
/// of [`ROWS_PER_TASK`] rows from `r0`, split across threads, each task filling its rows'
/// `[rows, tokens]` block.
fn by_row_tasks(tokens: usize, out: usize, y: &mut [f32], task: impl Fn(usize, &mut [f32]) + Sync) {
    // One token (decode): `[out, 1]` is already y's layout, so write it in place.
    if tokens == 1 {
        y.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(chunk, dst)| task(chunk * ROWS_PER_TASK, dst));
        return;
    }
    // Each task fills its `[rows, tokens]` block in a buffer of its own and writes it into its
    // columns of every token's row of y, so the transpose runs in parallel (done serially after
    // the loop, it took 9% of a bf16 prefill's samples while the other worker idled).
    let dst = SharedOut::new(y);
    (0..out.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .for_each_init(Vec::new, |buf, b| {
            let r0 = b * ROWS_PER_TASK;
            let rows = ROWS_PER_TASK.min(out - r0);
            buf.clear();
            buf.resize(rows * tokens, 0f32);
            task(r0, buf);
            for t in 0..tokens {
                // SAFETY: `y` holds `tokens × out` values and this task alone writes columns
                // `r0..r0 + rows` of each token's row; `y` outlives the parallel loop.
                let row = unsafe { dst.slice(t * out + r0, rows) };
                for (k, v) in row.iter_mut().enumerate() {
                    *v = buf[k * tokens + t];
                }
            }
        });
}

/// [`gemv_rows`] on the AMX tiles: the activations packed once, each task multiplying its
/// block of output rows by every token and writing them into `y` itself (its columns of every
/// token's row), so the `[out, tokens]` result is never transposed as a whole.
fn gemv_tiles<W: WeightRows>(x: &[f32], tokens: usize, w: &W, y: &mut [f32]) {
    let (out, inp) = (w.rows(), w.cols());
    let p = cpu_amx::Packed::new(x, tokens, inp);
    let pad = p.padded();
    let dst = SharedOut::new(y);
    let blocks = out.div_ceil(ROWS_PER_TASK);
    (0..blocks)
        .into_par_iter()
        .for_each_init(Vec::new, |buf, b| {
            let r0 = b * ROWS_PER_TASK;
            let rows = ROWS_PER_TASK.min(out - r0);
            buf.resize(rows * pad, 0f32);
            w.tile_block(r0, &p, buf);
            for t in 0..tokens {
                // SAFETY: `y` holds `tokens × out` values and this task alone writes columns
                // `r0..r0 + rows` of each token's row; `y` outlives the parallel loop.
                let row = unsafe { dst.slice(t * out + r0, rows) };
                for (k, v) in row.iter_mut().enumerate() {
                    *v = buf[k * pad + t];
                }
            }
        });
}

/// An output buffer's base pointer, shared by parallel tasks that each write disjoint
/// elements of it ([`gemv_tiles`], [`by_row_tasks`], `cpu_moe`'s down pass: each task its
/// columns of every token's row).
pub(crate) struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint elements of a buffer that outlives them.
unsafe impl Sync for SharedOut {}
impl SharedOut {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    /// The `len` elements from `i`.
    ///
    /// # Safety
    /// They must lie inside the buffer, which must outlive the slice, and no other task may
    /// touch them while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, i: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(i), len)
    }
}

/// How a row kernel wants each activation row laid out (same length as the row).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Packing {
    /// In logical order (the portable bf16 kernel, anything else that reads f32 in order).
    InOrder,
    /// The bf16 SIMD kernels widen bf16 pairs in place (see [`RowKernel`]) and read each block
    /// of `2 · lanes` activations as its `lanes` even-indexed values, then its odd-indexed
    /// ones; values past the last whole block stay in order.
    EvenOdd(usize),
    /// A weight format's own transform of one row (`src` and `dst` the same length), e.g.
    /// `cpu_q8`'s 16-bit fixed-point activations.
    Rows(fn(&[f32], &mut [f32])),
}

impl Packing {
    /// Whether packing is a plain copy.
    pub(crate) fn in_order(&self) -> bool {
        matches!(self, Packing::InOrder)
    }

    /// Copies activation rows of `inp` values from `src` into this layout in `dst` (same
    /// length).
    pub(crate) fn pack(&self, src: &[f32], inp: usize, dst: &mut [f32]) {
        debug_assert_eq!(src.len(), dst.len());
        for (s, d) in src.chunks(inp).zip(dst.chunks_mut(inp)) {
            self.pack_row(s, d);
        }
    }

    /// [`Self::pack`] for one row.
    pub(crate) fn pack_row(&self, src: &[f32], dst: &mut [f32]) {
        let l = match *self {
            Packing::InOrder => {
                dst.copy_from_slice(src);
                return;
            }
            Packing::Rows(f) => {
                f(src, dst);
                return;
            }
            Packing::EvenOdd(l) => l,
        };
        let whole = src.len() / (2 * l) * (2 * l);
        for (s, d) in src[..whole]
            .chunks_exact(2 * l)
            .zip(dst[..whole].chunks_exact_mut(2 * l))
        {
            for j in 0..l {
                d[j] = s[2 * j];
                d[l + j] = s[2 * j + 1];
            }
        }
        dst[whole..].copy_from_slice(&src[whole..]);
    }
}

/// The fastest bf16 row kernel this CPU runs, and the activation layout it reads.
///
/// The SIMD kernels widen bf16 pairs in place: a 32-bit lane holding weights `2j` (low half)
/// and `2j + 1` (high half) becomes weight `2j` as f32 after a left shift by 16 and weight
/// `2j + 1` after masking off the low half. One full-width load and two single-cycle ops widen
/// a vector of pairs (zero-extending each half instead costs two loads, two cross-lane
/// shuffles and two shifts), so the activations they multiply are stored split the same way
/// ([`Packing`]).
#[derive(Clone, Copy)]
pub(crate) struct RowKernel {
    run: fn(&[bf16], &[f32], usize, usize, &mut [f32]),
    /// The activation layout `run` reads: pairs split even/odd per vector of f32 lanes, in
    /// order for the portable kernel.
    packing: Packing,
}

impl RowKernel {
    /// The activation layout [`Self::run`] reads.
    #[cfg(test)]
    pub(crate) fn packing(&self) -> Packing {
        self.packing
    }

    /// One weight row against `n` (≤ [`TOKEN_BLOCK`]) packed activation rows of `inp` values:
    /// `d[t] = row · x[t]`. `row.len() == inp`, `x.len() >= n * inp`, `d.len() >= n`.
    #[inline]
    pub(crate) fn run(&self, row: &[bf16], x: &[f32], n: usize, inp: usize, d: &mut [f32]) {
        assert!(row.len() == inp && x.len() >= n * inp && d.len() >= n && n <= TOKEN_BLOCK);
        (self.run)(row, x, n, inp, d)
    }
}

/// The fastest row kernel this CPU runs (detected once).
pub(crate) fn row_kernel() -> RowKernel {
    static K: std::sync::OnceLock<RowKernel> = std::sync::OnceLock::new();
    *K.get_or_init(select_kernel)
}

fn select_kernel() -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return RowKernel {
                run: row_avx512_entry,
                packing: Packing::EvenOdd(16),
            };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return RowKernel {
                run: row_avx2_entry,
                packing: Packing::EvenOdd(8),
            };
        }
    }
    RowKernel {
        run: row_portable,
        packing: Packing::InOrder,
    }
}

/// Reference: one weight row against every token, activations in order.
fn row_portable(row: &[bf16], x: &[f32], tokens: usize, inp: usize, d: &mut [f32]) {
    for t in 0..tokens {
        let xs = &x[t * inp..(t + 1) * inp];
        let mut s = 0f32;
        for (w, v) in row.iter().zip(xs) {
            s += w.to_f32() * v;
        }
        d[t] = s;
    }
}

/// Dispatches a runtime token count to a kernel monomorphised for it, so the accumulators
/// are a fixed-size array the compiler keeps in registers. The arguments after the count are
/// passed through.
macro_rules! by_tokens {
    ($f:ident, $tokens:expr, $($arg:expr),+) => {
        match $tokens {
            1 => $f::<1>($($arg),+),
            2 => $f::<2>($($arg),+),
            3 => $f::<3>($($arg),+),
            4 => $f::<4>($($arg),+),
            5 => $f::<5>($($arg),+),
            6 => $f::<6>($($arg),+),
            7 => $f::<7>($($arg),+),
            _ => $f::<8>($($arg),+),
        }
    };
}
pub(crate) use by_tokens;

#[cfg(target_arch = "x86_64")]
fn row_avx512_entry(row: &[bf16], x: &[f32], tokens: usize, inp: usize, d: &mut [f32]) {
    // SAFETY: selected only after run-time detection of avx512f; `RowKernel::run` checks
    // `row.len() == inp`, `x.len() >= tokens * inp` and `d.len() >= tokens`.
    unsafe { by_tokens!(row_avx512, tokens, row, x, inp, d) }
}

/// One bf16 weight row against `N` packed activation rows: 32 weights per step, the even and
/// odd ones in separate accumulator chains (which hides the FMA latency at one token).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_avx512<const N: usize>(row: &[bf16], x: &[f32], inp: usize, d: &mut [f32]) {
    use std::arch::x86_64::*;
    let n32 = inp / 32 * 32;
    let mut ae = [_mm512_setzero_ps(); N];
    let mut ao = [_mm512_setzero_ps(); N];
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let wp = row.as_ptr() as *const u16;
    let xp = x.as_ptr();
    let mut i = 0;
    while i < n32 {
        // A hint, never a fault: the address may lie past the matrix.
        _mm_prefetch::<PREFETCH_HINT>(wp.wrapping_add(i + PREFETCH_AHEAD) as *const i8);
        let v = _mm512_loadu_si512(wp.add(i) as *const __m512i);
        let we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        let wo = _mm512_castsi512_ps(_mm512_and_si512(v, high));
        for t in 0..N {
            ae[t] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xp.add(t * inp + i)), ae[t]);
            ao[t] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xp.add(t * inp + i + 16)), ao[t]);
        }
        i += 32;
    }
    for t in 0..N {
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(ae[t], ao[t]));
        for j in n32..inp {
            s += row[j].to_f32() * x[t * inp + j];
        }
        d[t] = s;
    }
}

/// The sum of a 256-bit vector's 8 f32 lanes, in lane order (the AVX2 kernels' final
/// reduction).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn sum_lanes256(v: std::arch::x86_64::__m256) -> f32 {
    let mut lanes = [0f32; 8];
    // SAFETY: an unaligned store of 8 f32 into an array of 8; AVX is implied by the caller's
    // kernel (an `__m256` value exists).
    unsafe { std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.iter().sum()
}

#[cfg(target_arch = "x86_64")]
fn row_avx2_entry(row: &[bf16], x: &[f32], tokens: usize, inp: usize, d: &mut [f32]) {
    // SAFETY: selected only after run-time detection of avx2 and fma; slices as above.
    unsafe { by_tokens!(row_avx2, tokens, row, x, inp, d) }
}

/// [`row_avx512`] with 8-lane vectors: 16 weights per step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2<const N: usize>(row: &[bf16], x: &[f32], inp: usize, d: &mut [f32]) {
    use std::arch::x86_64::*;
    let n16 = inp / 16 * 16;
    let mut ae = [_mm256_setzero_ps(); N];
    let mut ao = [_mm256_setzero_ps(); N];
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let wp = row.as_ptr() as *const u16;
    let xp = x.as_ptr();
    let mut i = 0;
    while i < n16 {
        let v = _mm256_loadu_si256(wp.add(i) as *const __m256i);
        let we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        let wo = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        for t in 0..N {
            ae[t] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xp.add(t * inp + i)), ae[t]);
            ao[t] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xp.add(t * inp + i + 8)), ao[t]);
        }
        i += 16;
    }
    for t in 0..N {
        let mut s = sum_lanes256(_mm256_add_ps(ae[t], ao[t]));
        for j in n16..inp {
            s += row[j].to_f32() * x[t * inp + j];
        }
        d[t] = s;
    }
}

/// A row-major f32 `[rows, cols]` matrix under this CPU's f32 row kernel.
pub(crate) struct F32Rows<'a> {
    w: &'a [f32],
    cols: usize,
    kernel: F32Kernel,
}

/// One f32 weight row against `n` (≤ [`TOKEN_BLOCK`]) activation rows in order:
/// `d[t] = row · x[t]`.
type F32Kernel = fn(&[f32], &[f32], usize, usize, &mut [f32]);

impl<'a> F32Rows<'a> {
    /// `w.len()` must be a multiple of `cols` (callers check shapes first).
    pub(crate) fn new(w: &'a [f32], cols: usize) -> Self {
        debug_assert!(cols > 0 && w.len().is_multiple_of(cols));
        static K: std::sync::OnceLock<F32Kernel> = std::sync::OnceLock::new();
        Self {
            w,
            cols,
            kernel: *K.get_or_init(select_f32_kernel),
        }
    }
}

impl WeightRows for F32Rows<'_> {
    fn rows(&self) -> usize {
        self.w.len() / self.cols
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn packing() -> Packing {
        Packing::InOrder
    }
    #[inline]
    fn dot(&self, r: usize, x: &[f32], n: usize, d: &mut [f32]) {
        let c = self.cols;
        assert!(x.len() >= n * c && d.len() >= n && n <= TOKEN_BLOCK);
        (self.kernel)(&self.w[r * c..(r + 1) * c], x, n, c, d)
    }
}

fn select_f32_kernel() -> F32Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return f32_row_avx512_entry;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return f32_row_avx2_entry;
        }
    }
    f32_row_portable
}

/// Reference: one f32 weight row against every token, in order.
fn f32_row_portable(row: &[f32], x: &[f32], tokens: usize, inp: usize, d: &mut [f32]) {
    for t in 0..tokens {
        d[t] = row
            .iter()
            .zip(&x[t * inp..(t + 1) * inp])
            .map(|(w, v)| w * v)
            .sum();
    }
}

#[cfg(target_arch = "x86_64")]
fn f32_row_avx512_entry(row: &[f32], x: &[f32], tokens: usize, inp: usize, d: &mut [f32]) {
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const N: usize>(row: &[f32], x: &[f32], inp: usize, d: &mut [f32]) {
        f32_row_body::<crate::paged::Avx512, N>(row, x, inp, d)
    }
    // SAFETY: selected only after run-time detection of avx512f; `F32Rows::dot` checks
    // `x.len() >= tokens * inp` and `d.len() >= tokens`, and its row has `inp` values.
    unsafe { by_tokens!(run, tokens, row, x, inp, d) }
}

#[cfg(target_arch = "x86_64")]
fn f32_row_avx2_entry(row: &[f32], x: &[f32], tokens: usize, inp: usize, d: &mut [f32]) {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<const N: usize>(row: &[f32], x: &[f32], inp: usize, d: &mut [f32]) {
        f32_row_body::<crate::paged::Avx2, N>(row, x, inp, d)
    }
    // SAFETY: selected only after run-time detection of avx2 and fma; slices as above.
    unsafe { by_tokens!(run, tokens, row, x, inp, d) }
}

/// One f32 weight row against `N` activation rows, `2 · S::LANES` weights per step in two
/// accumulator chains per token (hides the FMA latency at one token), the tail in scalar code.
///
/// # Safety
/// `S`'s CPU features are enabled in the caller; `x` holds `N` rows of `inp = row.len()`
/// values and `d.len() >= N`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f32_row_body<S: crate::paged::Simd, const N: usize>(
    row: &[f32],
    x: &[f32],
    inp: usize,
    d: &mut [f32],
) {
    let l = S::LANES;
    let whole = inp / (2 * l) * (2 * l);
    let mut a0 = [S::zero(); N];
    let mut a1 = [S::zero(); N];
    let (wp, xp) = (row.as_ptr(), x.as_ptr());
    let mut i = 0;
    while i < whole {
        S::prefetch(wp.wrapping_add(i + PREFETCH_AHEAD) as *const u8);
        let (w0, w1) = (S::load(wp.add(i)), S::load(wp.add(i + l)));
        for t in 0..N {
            a0[t] = S::fma(w0, S::load(xp.add(t * inp + i)), a0[t]);
            a1[t] = S::fma(w1, S::load(xp.add(t * inp + i + l)), a1[t]);
        }
        i += 2 * l;
    }
    for t in 0..N {
        let mut s = S::sum(a0[t]) + S::sum(a1[t]);
        for j in whole..inp {
            s += row[j] * x[t * inp + j];
        }
        d[t] = s;
    }
}

/// Most activation rows [`try_linear_f32`] takes. Its tasks split the weight rows only, and a
/// router has few (8 in the demo, 192 in Hy3: one to three tasks), so long prefill chunks go
/// to candle's GEMM, which also splits the tokens over threads and blocks for the caches.
pub const F32_GEMV_MAX_TOKENS: usize = 64;

/// `x · wᵀ` in f32 through [`gemv_f32`] when it applies (CPU, f32 contiguous `w` `[out, inp]`,
/// at most [`F32_GEMV_MAX_TOKENS`] rows of `x` in any float dtype); `None` when the caller
/// should use a general matmul. The result is f32.
pub fn try_linear_f32(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
) -> Result<Option<candle_core::Tensor>, KernelError> {
    use candle_core::{CpuStorage, DType, Storage};
    if !x.device().is_cpu() || w.dtype() != DType::F32 || w.rank() != 2 || x.rank() != 2 {
        return Ok(None);
    }
    let (tokens, inp) = x.dims2()?;
    let (out, winp) = w.dims2()?;
    if tokens == 0 || tokens > F32_GEMV_MAX_TOKENS || winp != inp {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let Storage::Cpu(CpuStorage::F32(all)) = &*storage else {
        return Ok(None);
    };
    let xv = f32_values(x)?;
    let mut y = vec![0f32; tokens * out];
    gemv_f32(&xv, tokens, &all[start..end], out, inp, &mut y)?;
    Ok(Some(candle_core::Tensor::from_vec(
        y,
        (tokens, out),
        x.device(),
    )?))
}

/// `x · wᵀ` for `x` `[T, in]` and `w` `[out, in]` in `x`'s dtype: bf16 weights, and f32
/// weights with f32 `x` of up to [`F32_GEMV_MAX_TOKENS`] rows, through the weight-streaming
/// kernels ([`try_linear_bf16`], [`try_linear_f32`]); everything else through candle's GEMM,
/// which takes a 2-token f32 product at several times a 1-token one's cost.
pub fn linear(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
) -> Result<candle_core::Tensor, KernelError> {
    if let Some(y) = try_linear_bf16(x, w)? {
        return Ok(y);
    }
    if x.dtype() == candle_core::DType::F32 {
        if let Some(y) = try_linear_f32(x, w)? {
            return Ok(y);
        }
    }
    Ok(x.matmul(&w.t()?)?)
}

/// `x · wᵀ` through [`gemv_bf16`] when it applies (CPU, bf16 contiguous `w` `[out, inp]`);
/// `None` when the caller should use a general matmul.
/// The result has `x`'s dtype.
pub fn try_linear_bf16(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
) -> Result<Option<candle_core::Tensor>, KernelError> {
    use candle_core::{CpuStorage, DType, Storage};
    if !x.device().is_cpu() || w.dtype() != DType::BF16 || w.rank() != 2 || x.rank() != 2 {
        return Ok(None);
    }
    let (tokens, inp) = x.dims2()?;
    let (out, winp) = w.dims2()?;
    if tokens == 0 || winp != inp {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let Storage::Cpu(CpuStorage::BF16(all)) = &*storage else {
        return Ok(None);
    };
    let wslice = &all[start..end];
    let xv = f32_values(x)?;
    let mut y = vec![0f32; tokens * out];
    gemv_bf16(&xv, tokens, wslice, out, inp, &mut y)?;
    let t = if x.dtype() == DType::BF16 {
        // One rounding pass into the result's storage instead of an f32 tensor converted.
        let yb: Vec<bf16> = y.iter().map(|&v| bf16::from_f32(v)).collect();
        candle_core::Tensor::from_vec(yb, (tokens, out), x.device())?
    } else {
        candle_core::Tensor::from_vec(y, (tokens, out), x.device())?.to_dtype(x.dtype())?
    };
    Ok(Some(t))
}

/// A CPU tensor's values as f32, read straight from contiguous bf16 or f32 storage (one pass,
/// one allocation), else through candle's conversion.
pub(crate) fn f32_values(x: &candle_core::Tensor) -> Result<Vec<f32>, KernelError> {
    use candle_core::{CpuStorage, DType, Storage};
    {
        let (storage, layout) = x.storage_and_layout();
        if let Some((a, b)) = layout.contiguous_offsets() {
            match &*storage {
                Storage::Cpu(CpuStorage::BF16(d)) => {
                    return Ok(d[a..b].iter().map(|v| v.to_f32()).collect())
                }
                Storage::Cpu(CpuStorage::F32(d)) => return Ok(d[a..b].to_vec()),
                _ => {}
            }
        }
    }
    Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parallel loops under polling workers give the same sums as without, a panic inside
    /// ends the polling (no hang), and concurrent callers never wait on each other.
    /// The CPU-time counters behind `others_idle` parse, and this process's own ticks grow
    /// while it burns CPU and are part of the machine's busy ticks.
    #[cfg(target_os = "linux")]
    #[test]
    fn cpu_time_counters_count_this_process() {
        let (all0, mine0) = (busy_ticks().unwrap(), own_ticks().unwrap());
        let start = std::time::Instant::now();
        let mut x = 1u64;
        // 10 ticks (100 ms) of this process's CPU time, however busy the machine is.
        while own_ticks().unwrap() < mine0 + 10 {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            assert!(start.elapsed().as_secs() < 60, "own ticks did not grow");
        }
        let (all1, mine1) = (busy_ticks().unwrap(), own_ticks().unwrap());
        // Both are sampled on the same ticks; allow one tick per CPU of skew.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        assert!(
            all1 - all0 + cpus >= mine1 - mine0,
            "machine busy {} ticks < own {}",
            all1 - all0,
            mine1 - mine0
        );
    }

    #[test]
    fn polling_workers_run_loops_and_end() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let sum = || (0..100_000u64).into_par_iter().map(|i| i * i).sum::<u64>();
        let want: u64 = (0..100_000u64).map(|i| i * i).sum();
        pool.install(|| {
            for _ in 0..50 {
                assert_eq!(keep_siblings_awake(|| sum() + sum()), 2 * want);
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                keep_siblings_awake(|| -> u64 { panic!("inside the forward") })
            }));
            assert!(r.is_err());
            assert_eq!(keep_siblings_awake(sum), want, "usable after a panic");
            let (a, b) = rayon::join(
                || keep_siblings_awake(|| (0..20).map(|_| sum()).sum::<u64>()),
                || keep_siblings_awake(|| (0..20).map(|_| sum()).sum::<u64>()),
            );
            assert_eq!((a, b), (20 * want, 20 * want));
        });
    }
    use rand::{Rng, SeedableRng};

    /// [`gemv_bf16`] on random bf16 weights against f64 sums, for each `(tokens, out, inp)`;
    /// with `bf16_inputs` the activations are bf16 values (what the AMX tiles take).
    fn check_gemv_against_f64(seed: u64, shapes: &[(usize, usize, usize)], bf16_inputs: bool) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for &(tokens, out, inp) in shapes {
            let w: Vec<bf16> = (0..out * inp)
                .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
                .collect();
            let x: Vec<f32> = (0..tokens * inp)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .map(|v| {
                    if bf16_inputs {
                        bf16::from_f32(v).to_f32()
                    } else {
                        v
                    }
                })
                .collect();
            let mut y = vec![f32::NAN; tokens * out];
            gemv_bf16(&x, tokens, &w, out, inp, &mut y).unwrap();
            for t in 0..tokens {
                for o in 0..out {
                    let want: f64 = (0..inp)
                        .map(|i| w[o * inp + i].to_f64() * x[t * inp + i] as f64)
                        .sum();
                    let got = y[t * out + o] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{tokens}x{out}x{inp} t{t} o{o}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_f64_reference_for_odd_shapes() {
        let shapes = [
            (1, 1, 1),
            (1, 130, 37),
            (3, 200, 64),
            (8, 65, 1000),
            (5, 7, 16),
            (21, 70, 48),
        ];
        check_gemv_against_f64(1, &shapes, false);
        assert!(gemv_bf16(&[], 0, &[bf16::ZERO; 2], 1, 2, &mut []).is_err());
        assert!(gemv_bf16(&[0.0; 3], 1, &[bf16::ZERO; 2], 1, 2, &mut [0.0; 1]).is_err());
    }

    /// bf16 activations on tile-sized shapes (the AMX path where the CPU has it) and on shapes
    /// the tiles cannot take (the `vdpbf16ps` kernel where the CPU has AVX512-BF16) against
    /// f64.
    #[test]
    fn bf16_activations_match_f64_reference() {
        check_gemv_against_f64(5, &[(8, 16, 32), (21, 96, 64), (40, 48, 256)], true);
        check_gemv_against_f64(6, &[(8, 7, 33), (9, 65, 1000), (20, 30, 101)], true);
    }

    /// Every f32 row kernel this CPU can run, for every token count and lengths around the
    /// vector steps, against f64 sums; and [`gemv_f32`] through the selected one, including
    /// its shape errors.
    #[test]
    fn f32_kernels_match_f64_reference() {
        let mut kernels: Vec<(&str, F32Kernel)> = vec![("portable", f32_row_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                kernels.push(("avx2", f32_row_avx2_entry));
            }
            if std::is_x86_feature_detected!("avx512f") {
                kernels.push(("avx512", f32_row_avx512_entry));
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let dot64 = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(&u, &v)| u as f64 * v as f64).sum()
        };
        for inp in [1, 15, 16, 17, 31, 32, 33, 64, 100, 576, 1031] {
            let row: Vec<f32> = (0..inp).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x: Vec<f32> = (0..TOKEN_BLOCK * inp)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            for (name, k) in &kernels {
                for n in 1..=TOKEN_BLOCK {
                    let mut d = [f32::NAN; TOKEN_BLOCK];
                    k(&row, &x, n, inp, &mut d);
                    for t in 0..n {
                        let want = dot64(&row, &x[t * inp..(t + 1) * inp]);
                        let got = d[t] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{name} inp {inp} n {n} t {t}: {got} vs {want}"
                        );
                    }
                    assert!(d[n..].iter().all(|v| v.is_nan()), "{name} wrote past n");
                }
            }
        }
        for (tokens, out, inp) in [(1, 192, 4096), (3, 8, 576), (9, 130, 37), (64, 65, 48)] {
            let w: Vec<f32> = (0..out * inp)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let x: Vec<f32> = (0..tokens * inp)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let mut y = vec![f32::NAN; tokens * out];
            gemv_f32(&x, tokens, &w, out, inp, &mut y).unwrap();
            for t in 0..tokens {
                for o in 0..out {
                    let want = dot64(&w[o * inp..(o + 1) * inp], &x[t * inp..(t + 1) * inp]);
                    let got = y[t * out + o] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{tokens}x{out}x{inp} t{t} o{o}: {got} vs {want}"
                    );
                }
            }
        }
        let err = gemv_f32(&[0.0; 3], 1, &[0.0; 2], 1, 2, &mut [0.0; 1]).unwrap_err();
        assert!(err.to_string().contains("gemv_f32 shapes"), "{err}");
    }

    /// [`try_linear_f32`] equals candle's f32 matmul on the router's shapes and declines what
    /// it does not take (bf16 weights, more than [`F32_GEMV_MAX_TOKENS`] rows).
    #[test]
    fn try_linear_f32_matches_candle_and_declines_the_rest() {
        use candle_core::{DType, Device, Tensor};
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (192, 256), &dev).unwrap();
        for tokens in [1, 5, F32_GEMV_MAX_TOKENS] {
            let x = Tensor::randn(0f32, 1.0, (tokens, 256), &dev).unwrap();
            for x in [x.clone(), x.to_dtype(DType::BF16).unwrap()] {
                let got = try_linear_f32(&x, &w).unwrap().expect("taken");
                assert_eq!(got.dtype(), DType::F32);
                let want = x
                    .to_dtype(DType::F32)
                    .unwrap()
                    .matmul(&w.t().unwrap())
                    .unwrap();
                let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
                let scale = want.abs().unwrap().max_all().unwrap();
                let (d, s) = (
                    diff.to_scalar::<f32>().unwrap(),
                    scale.to_scalar::<f32>().unwrap(),
                );
                assert!(d <= 1e-5 * s, "tokens {tokens}: max |Δ| {d} vs max |y| {s}");
            }
        }
        let long = Tensor::zeros((F32_GEMV_MAX_TOKENS + 1, 256), DType::F32, &dev).unwrap();
        assert!(try_linear_f32(&long, &w).unwrap().is_none());
        let one = Tensor::zeros((1, 256), DType::F32, &dev).unwrap();
        let wb = w.to_dtype(DType::BF16).unwrap();
        assert!(try_linear_f32(&one, &wb).unwrap().is_none());
    }

    /// Where logical element `i` of a row of `inp` values sits once packed.
    fn packed_index(p: Packing, i: usize, inp: usize) -> usize {
        let Packing::EvenOdd(l) = p else {
            return i;
        };
        if i >= inp / (2 * l) * (2 * l) {
            return i;
        }
        let (b, k) = (i / (2 * l), i % (2 * l));
        b * 2 * l + (k % 2) * l + k / 2
    }

    /// Every kernel this CPU can run (not only the one selected), on packed activations, for
    /// every token count and lengths around the vector steps.
    #[test]
    fn every_kernel_matches_reference() {
        let mut kernels = vec![RowKernel {
            run: row_portable,
            packing: Packing::InOrder,
        }];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                kernels.push(RowKernel {
                    run: row_avx2_entry,
                    packing: Packing::EvenOdd(8),
                });
            }
            if std::is_x86_feature_detected!("avx512f") {
                kernels.push(RowKernel {
                    run: row_avx512_entry,
                    packing: Packing::EvenOdd(16),
                });
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for k in &kernels {
            for inp in [1, 15, 16, 17, 31, 32, 33, 64, 100, 1024] {
                for n in 1..=TOKEN_BLOCK {
                    let w: Vec<bf16> = (0..inp)
                        .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
                        .collect();
                    let x: Vec<f32> = (0..n * inp).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let mut xp = vec![0f32; x.len()];
                    k.packing.pack(&x, inp, &mut xp);
                    for i in 0..inp {
                        assert_eq!(xp[packed_index(k.packing, i, inp)], x[i]);
                    }
                    let mut d = [f32::NAN; TOKEN_BLOCK];
                    k.run(&w, &xp, n, inp, &mut d);
                    for t in 0..n {
                        let want: f64 = (0..inp)
                            .map(|i| w[i].to_f64() * x[t * inp + i] as f64)
                            .sum();
                        assert!(
                            (d[t] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{:?} inp {inp} n {n} t {t}: {} vs {want}",
                            k.packing,
                            d[t]
                        );
                    }
                }
            }
        }
    }
}
