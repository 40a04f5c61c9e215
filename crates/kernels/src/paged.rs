//! Paged attention (vLLM's block-table layout) on the CPU: the KV write for a batch of new
//! tokens (`reshape_and_cache`) and attention for a batch of sequences of different lengths
//! whose keys/values live in fixed-size blocks named by per-sequence block tables.
//!
//! Layout per layer: `[num_blocks, block_size, kv_heads, head_dim]` for K and for V. Token `p`
//! of a sequence lives in block `block_table[p / block_size]`, row `p % block_size`. The same
//! layout is what the CUDA kernels read, so the engine's block manager serves both.
//!
//! # Attention kernel
//!
//! Decode attention reads the whole cache once per step and does two multiply-adds per element
//! read per query head, so on the CPU it is bound by memory bandwidth as long as each K/V row
//! is read once for every query that uses it. The kernel follows flash-decoding (vLLM's paged
//! attention v2, as `kernels/paged_attention.cu` does on the GPU):
//!
//! - **GQA-aware units.** A unit is one KV head and up to `MAX_QUERIES` queries that read it:
//!   the query heads of its group times consecutive query rows of a prefill chunk (decode has
//!   one row). Every K and V row is loaded once per unit and used for all of its queries.
//! - **Tasks over whole cache rows.** A task (the unit of parallel work) is a chunk of query
//!   rows of one sequence over a range of its context, with all its units: for each tile of
//!   `TILE` tokens it runs every KV head in turn, so each token's cache row
//!   (`kv_heads · head_dim` contiguous elements, 2–4 KiB at Hy3's shapes) is read in full at
//!   once instead of one head's slice per page visit. At Hy3's shapes this took batch-1
//!   bf16 decode from 4.7 to 5.4 GB/s over one task per KV head.
//! - **Tiles and online softmax.** Per tile and unit: the scores of every query (each K row
//!   loaded once, dotted with all queries; the query block's 8 lane sums reduced together), a
//!   running max and sum per query (rescaling the accumulator when the max grows), then
//!   `acc += w · V` with each V row loaded once and the accumulators of a block of
//!   `QUERY_BLOCK` queries in registers. The next tile's rows are prefetched while the
//!   current one is scored: consecutive tokens' rows sit in different blocks or a whole row
//!   apart, which the hardware prefetchers do not follow.
//! - **Causal prefill rows.** Query row `i` of a sequence sits at position
//!   `ctx_len - q_len + i` and attends to positions `0..=` that; inside a tile the tokens a
//!   query may see are a prefix, so masking is a per-query count of valid tokens.
//! - **Context partitions.** When a batch has fewer than `MIN_TASKS` row chunks (one
//!   sequence at decode has one), each context is cut into up to `MIN_TASKS / chunks`
//!   partitions of at least `MIN_PARTITION` tokens that run as separate tasks, and their
//!   (max, sum, unnormalised output) per query are merged afterwards, so every thread has
//!   work at batch 1.
//! - **SIMD.** Scores and the V update use AVX-512F (16 lanes) or AVX2+FMA (8 lanes), chosen
//!   at run time, with a portable loop otherwise; bf16 K/V are widened to f32 in registers
//!   (zero-extend to 32 bits, shift left by 16, as in [`crate::cpu_gemv`]), FP8 E4M3 K/V
//!   through half precision (two shifts into f16's fields, `vcvtph2ps`, times 256). Queries are
//!   pre-multiplied by `scale`; exponentials use `exp_nonpositive` (a polynomial good to
//!   a few ulp). Arithmetic is f32 throughout.

pub use float8::F8E4M3;
use half::bf16;
use rayon::prelude::*;

use crate::KernelError;

mod tiles;

/// Element type of the KV cache.
pub trait KvElem: Copy + Send + Sync + Default + 'static {
    /// Widen to f32 for arithmetic.
    fn to_f32(self) -> f32;
    /// Narrow from f32 for storage.
    fn from_f32(x: f32) -> Self;
    /// The value rounded to bf16 (to nearest even), as bits: what the AMX tiles read.
    fn bf16_bits(self) -> u16;
    /// Whether prefill attention may run on the AMX tiles: the cache holds bf16 values
    /// already, so the tiles add only the rounding of queries and softmax weights. An f32
    /// cache is the exact path and stays on the f32 kernel.
    const PREFILL_ON_TILES: bool;
    /// The kernels' loads widen an element to its value divided by this power of two (FP8:
    /// 256, which saves a multiply per vector; see `FP8_TO_F16_SCALE`). The kernels fold it
    /// into the pre-scaled queries and the final normalisation; powers of two scale exactly,
    /// so the results are those of exact loads.
    const WIDEN_SCALE: f32 = 1.0;
    /// The value as the kernels' loads widen it: `to_f32() / WIDEN_SCALE`.
    #[inline(always)]
    fn to_f32_widened(self) -> f32 {
        self.to_f32() * (1.0 / Self::WIDEN_SCALE)
    }
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        bf16::from_f32(self).to_bits()
    }
    const PREFILL_ON_TILES: bool = false;
}

impl KvElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        self.to_bits()
    }
    const PREFILL_ON_TILES: bool = true;
}

/// FP8 E4M3 (vLLM's `fp8` KV cache): a quarter of f32's bytes. Stored with a unit scale, as
/// vLLM does when the checkpoint names none: values saturate at ±448 and lose precision below
/// 2^-6 (subnormals) and to zero below 2^-10. Writes round to nearest even and saturate
/// (`float8`'s conversion, the same as CUDA's `__NV_SATFINITE`).
impl KvElem for F8E4M3 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        F8E4M3::to_f32(&self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        F8E4M3::from_f32(x)
    }
    /// Exact: every E4M3 value is a bf16 value (3 of bf16's 7 mantissa bits, exponents
    /// 2^-9…2^8 inside bf16's range).
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        bf16::from_f32(F8E4M3::to_f32(&self)).to_bits()
    }
    const PREFILL_ON_TILES: bool = true;
    const WIDEN_SCALE: f32 = FP8_TO_F16_SCALE;
}

/// Half-precision bits whose value is `1/256` of the E4M3 byte `b`'s: E4M3's exponent bias is
/// 7 against f16's 15, so shifting sign, exponent and mantissa into f16's fields (the
/// mantissa's 3 bits on top of f16's 10) gives the same number scaled by 2^-8, subnormals
/// included (E4M3 subnormals land on f16 subnormals with the same scale). The byte 0x7F (NaN)
/// reads as 480; the cache never holds it, because writes saturate. The loads leave the
/// 2^-8 in (`KvElem::WIDEN_SCALE`).
const FP8_TO_F16_SCALE: f32 = 256.0;

/// The SIMD loads build those bits from the byte sign-extended to 16 bits and shifted left by
/// 7: exponent and mantissa land in bits 7–13, copies of the sign in bits 14–15; keeping bits
/// 7–13 and 15 leaves the f16 value.
#[cfg(target_arch = "x86_64")]
const FP8_TO_F16_MASK: i16 = 0xBF80u16 as i16;

/// Geometry of one layer's paged KV storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

impl KvLayout {
    /// Elements of one token's K (or V) across heads.
    pub fn token_elems(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Elements of a whole layer's K (or V) buffer.
    pub fn layer_elems(&self) -> usize {
        self.num_blocks * self.block_size * self.token_elems()
    }
}

/// Writes new tokens' keys/values (`[T, kv_heads, head_dim]`, f32) into their cache slots
/// (`slot = block * block_size + row`).
pub fn reshape_and_cache<T: KvElem>(
    k: &[f32],
    v: &[f32],
    slots: &[usize],
    k_cache: &mut [T],
    v_cache: &mut [T],
    layout: &KvLayout,
) -> Result<(), KernelError> {
    let te = layout.token_elems();
    if k.len() != slots.len() * te || v.len() != k.len() {
        return Err(KernelError::InvalidArgument(format!(
            "reshape_and_cache: {} slots need K and V of {} elements, got {} and {}",
            slots.len(),
            slots.len() * te,
            k.len(),
            v.len()
        )));
    }
    let total_slots = layout.num_blocks * layout.block_size;
    if k_cache.len() != layout.layer_elems() || v_cache.len() != layout.layer_elems() {
        return Err(KernelError::InvalidArgument(
            "reshape_and_cache: cache buffers do not match the layout".into(),
        ));
    }
    for (i, &s) in slots.iter().enumerate() {
        if s >= total_slots {
            return Err(KernelError::InvalidArgument(format!(
                "reshape_and_cache: slot {s} outside the {total_slots} slots of the cache"
            )));
        }
        let dst = s * te;
        for j in 0..te {
            k_cache[dst + j] = T::from_f32(k[i * te + j]);
            v_cache[dst + j] = T::from_f32(v[i * te + j]);
        }
    }
    Ok(())
}

/// One sequence's part of a paged-attention batch.
#[derive(Debug, Clone)]
pub struct SeqAttn<'a> {
    /// First row of this sequence's queries in the batch.
    pub q_start: usize,
    /// Number of query tokens (1 for decode, a chunk for prefill).
    pub q_len: usize,
    /// Tokens in the cache for this sequence after this step's write (the queries are its last
    /// `q_len` positions).
    pub ctx_len: usize,
    /// Blocks holding positions `0..ctx_len`.
    pub block_table: &'a [u32],
}

impl SeqAttn<'_> {
    /// Checks that sequence `index` fits a batch of `rows` query rows and names only blocks
    /// of `layout`'s pool (the CPU op and the CUDA batch builder both check this up front, so
    /// their kernels cannot index out of bounds).
    pub fn check(&self, index: usize, rows: usize, layout: &KvLayout) -> Result<(), KernelError> {
        if self.q_len > self.ctx_len
            || self.q_start + self.q_len > rows
            || self.block_table.len() * layout.block_size < self.ctx_len
        {
            return Err(KernelError::InvalidArgument(format!(
                "paged attention: sequence {index} (q {}+{}, ctx {}, {} blocks of {}) does not \
                 fit the batch of {rows} rows",
                self.q_start,
                self.q_len,
                self.ctx_len,
                self.block_table.len(),
                layout.block_size
            )));
        }
        if let Some(&b) = self
            .block_table
            .iter()
            .find(|&&b| b as usize >= layout.num_blocks)
        {
            return Err(KernelError::InvalidArgument(format!(
                "paged attention: sequence {index} names block {b}, outside the pool of {}",
                layout.num_blocks
            )));
        }
        Ok(())
    }
}

/// Tokens per tile: the scores of a tile for every query sit on the stack (`MAX_QUERIES · TILE`
/// f32, 2 KiB), and the tile's K or V rows (32 KiB at head_dim 256 in f32) stay in L1 between
/// the passes over them. The per-tile softmax bookkeeping (max, rescale) is amortised over this
/// many tokens.
const TILE: usize = 32;
const _: () = assert!(
    TILE.is_multiple_of(16),
    "the softmax loops take 16-wide chunks"
);

/// Queries one unit serves: up to 16 query heads of one KV head (or fewer heads times
/// consecutive prefill rows). Hy3 has 8 query heads per KV head, so a decode unit covers its
/// whole group and every K/V row is read from memory once per step; larger groups are split
/// into units of 16 heads, each reading the rows again (from cache: they run one after the
/// other on the same tile).
const MAX_QUERIES: usize = 16;

/// Queries whose accumulators are held in registers while a K or V row passes: 8 chains of
/// multiply-adds hide the FMA latency and fit AVX2's 16 registers with the row and query.
const QUERY_BLOCK: usize = 8;

/// Fewest tasks a call should have before contexts are split into partitions: one sequence
/// at decode becomes up to 32 tasks, four per thread up to 8 threads, so a busy or slow core
/// does not hold the step up (work stealing evens out the rest). Raised to twice the thread
/// count on larger pools.
const MIN_TASKS: usize = 32;

/// Fewest tokens in a context partition: 256 tokens are 1 MiB of bf16 K/V at Hy3's shapes
/// (8 KV heads, head_dim 128), against `8 · MAX_QUERIES · (head_dim + 2)` floats (66 KiB)
/// of partial result to write and merge.
const MIN_PARTITION: usize = 256;

/// Causal attention for queries `q` (`[T, heads, head_dim]`, f32) of several sequences over
/// their cached keys/values; writes `out` (`[T, heads, head_dim]`). GQA: query head `h` reads
/// KV head `h / (heads / kv_heads)`. Query row `q_start + i` of a sequence is at position
/// `ctx_len - q_len + i` and attends to positions `0..=` that; rows no sequence covers are set
/// to zero (a row two sequences claim belongs to the later one). Softmax is computed online in
/// f32. See the module docs for the kernel.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention<T: KvElem>(
    q: &[f32],
    k_cache: &[T],
    v_cache: &[T],
    layout: &KvLayout,
    seqs: &[SeqAttn<'_>],
    heads: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let split = Split {
        min_tasks: MIN_TASKS.max(2 * rayon::current_num_threads()),
        min_partition: MIN_PARTITION,
    };
    let tile_rows =
        (T::PREFILL_ON_TILES && tiles::usable(layout.head_dim)).then_some(tiles::MIN_ROWS);
    attend(
        q,
        k_cache,
        v_cache,
        layout,
        seqs,
        heads,
        scale,
        out,
        Kernel::detect(),
        split,
        tile_rows,
    )
}

/// The SIMD flavour of the attention kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// Fixed-size arrays the compiler vectorises for the baseline target.
    Portable,
    /// AVX2, FMA and F16C, 8 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F, 16 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }
}

/// When contexts are cut into partitions (see [`MIN_TASKS`], [`MIN_PARTITION`]).
#[derive(Clone, Copy, Debug)]
struct Split {
    min_tasks: usize,
    min_partition: usize,
}

/// [`paged_attention`] with the kernel and the partitioning chosen by the caller (the tests
/// run every kernel the CPU has, with and without partitions). Sequences with at least
/// `tile_rows` query rows (`None`: none) run on AMX tiles ([`tiles`]; the caller has checked
/// [`tiles::usable`]), the rest on `kernel`.
#[allow(clippy::too_many_arguments)]
fn attend<T: KvElem>(
    q: &[f32],
    k_cache: &[T],
    v_cache: &[T],
    layout: &KvLayout,
    seqs: &[SeqAttn<'_>],
    heads: usize,
    scale: f32,
    out: &mut [f32],
    kernel: Kernel,
    split: Split,
    tile_rows: Option<usize>,
) -> Result<(), KernelError> {
    let hd = layout.head_dim;
    let kvh = layout.kv_heads;
    if heads == 0 || kvh == 0 || hd == 0 || !heads.is_multiple_of(kvh) {
        return Err(KernelError::InvalidArgument(format!(
            "paged_attention: {heads} query heads over {kvh} KV heads of width {hd}"
        )));
    }
    if !q.len().is_multiple_of(heads * hd) || out.len() != q.len() {
        return Err(KernelError::InvalidArgument(
            "paged_attention: q/out are not [T, heads, head_dim]".into(),
        ));
    }
    if k_cache.len() < layout.layer_elems() || v_cache.len() < layout.layer_elems() {
        return Err(KernelError::InvalidArgument(
            "paged_attention: cache buffers are smaller than the layout".into(),
        ));
    }
    let t = q.len() / (heads * hd);
    // Row → (sequence, position) map; checked up front so the parallel loop cannot fail.
    let mut row_pos = vec![(usize::MAX, 0usize); t];
    for (si, s) in seqs.iter().enumerate() {
        s.check(si, t, layout)?;
        for i in 0..s.q_len {
            row_pos[s.q_start + i] = (si, s.ctx_len - s.q_len + i);
        }
    }
    for (row, o) in out.chunks_mut(heads * hd).enumerate() {
        if row_pos[row].0 == usize::MAX {
            o.fill(0.0);
        }
    }
    // Prefill chunks go to the tiles when every row of theirs is theirs (a row two sequences
    // claim belongs to the later one); the FMA kernel skips their rows.
    let on_tiles: Vec<bool> = seqs
        .iter()
        .enumerate()
        .map(|(si, s)| {
            tile_rows.is_some_and(|min| s.q_len >= min)
                && (s.q_start..s.q_start + s.q_len).all(|r| row_pos[r].0 == si)
        })
        .collect();
    let tile_tasks = tiles::plan(seqs, &on_tiles, kvh);
    for (s, _) in seqs.iter().zip(&on_tiles).filter(|(_, &on)| on) {
        for (si, _) in &mut row_pos[s.q_start..s.q_start + s.q_len] {
            *si = usize::MAX;
        }
    }
    let plan = Plan::new(&row_pos, heads / kvh, kvh, split);
    let cx = Cx {
        q,
        k: k_cache,
        v: v_cache,
        seqs,
        units: &plan.units,
        heads,
        group: heads / kvh,
        head_dim: hd,
        block_size: layout.block_size,
        token_elems: layout.token_elems(),
        scale,
    };
    let run: TaskFn<T> = match kernel {
        Kernel::Portable => task_portable::<T>,
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => task_avx2::<T>,
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => task_avx512::<T>,
    };
    let slot = plan.slot_len(hd);
    let mut partials = vec![0f32; plan.partials * slot];
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let part_ptr = SyncPtr(partials.as_mut_ptr());
    let on_tiles = || {
        let tcx = tiles::Cx {
            q,
            k: k_cache,
            v: v_cache,
            seqs,
            heads,
            group: heads / kvh,
            kv_heads: kvh,
            head_dim: hd,
            block_size: layout.block_size,
            token_elems: layout.token_elems(),
            scale,
        };
        // SAFETY: the tasks cover the rows of checked sequences that own them, which the
        // FMA plan no longer holds; `out` outlives the call; the caller checked `usable`.
        unsafe { tiles::run(&tcx, &tile_tasks, out_ptr) }
    };
    let on_fma = || {
        plan.tasks.par_iter().for_each_init(
            || Scratch::new(plan.units.len(), hd),
            |scratch, task| {
                // SAFETY: `kernel` was detected on this CPU (or is the portable one); the plan only
                // holds tasks whose rows, heads, positions and blocks were checked above.
                unsafe { run(&cx, task, scratch) };
                match task.part {
                    // SAFETY: tasks of one-part groups cover disjoint rows of `out`, so no two
                    // threads write the same element, and `out` outlives the loop.
                    None => unsafe { scratch.finish(task, &cx, out_ptr) },
                    // SAFETY: each partial has its own `slot`-sized range of `partials`, which
                    // outlives the loop.
                    Some(p) => unsafe {
                        let dst =
                            std::slice::from_raw_parts_mut(part_ptr.get().add(p * slot), slot);
                        scratch.save(hd, dst)
                    },
                }
            },
        )
    };
    if tile_tasks.is_empty() {
        on_fma();
    } else if plan.tasks.is_empty() {
        on_tiles();
    } else {
        rayon::join(on_tiles, on_fma);
    }
    plan.groups.par_iter().for_each(|g| {
        if g.parts > 1 {
            let parts = &plan.tasks[g.first..g.first + g.parts];
            // SAFETY: groups cover disjoint rows of `out`, as above.
            unsafe { merge(parts, &partials, slot, &cx, out_ptr) };
        }
    });
    Ok(())
}

/// A raw pointer the parallel loops share; each task writes its own elements (see the SAFETY
/// notes where it is used).
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);

impl SyncPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: only used for disjoint writes from the tasks of one call, which outlives them.
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

/// The inputs every task reads.
struct Cx<'a, T> {
    q: &'a [f32],
    k: &'a [T],
    v: &'a [T],
    seqs: &'a [SeqAttn<'a>],
    /// The query-head ranges every task serves, one KV head each.
    units: &'a [Unit],
    heads: usize,
    group: usize,
    head_dim: usize,
    block_size: usize,
    token_elems: usize,
    scale: f32,
}

/// Query heads `head0..head0 + heads`, all in the group of KV head `head0 / group`: the queries
/// (times a task's rows) that share each K/V row the task loads for that head.
#[derive(Clone, Copy, Debug)]
struct Unit {
    head0: usize,
    heads: usize,
}

/// One unit of parallel work: every query head of rows `row0..row0 + rows` (consecutive
/// positions from `pos0`) of sequence `seq`, over context positions `c0..c1`. Walking all KV
/// heads of a token together reads its cache rows (`kv_heads · head_dim` elements, contiguous)
/// in full, so a page of the cache is read once and whole rather than once per head.
#[derive(Clone, Copy, Debug)]
struct Task {
    seq: usize,
    row0: usize,
    rows: usize,
    pos0: usize,
    c0: usize,
    c1: usize,
    /// The partial-result slot when the context is split, `None` when this task finishes its
    /// rows itself.
    part: Option<usize>,
}

/// Consecutive tasks (`first..first + parts`) that split one context and are merged.
#[derive(Clone, Copy, Debug)]
struct Group {
    first: usize,
    parts: usize,
}

/// The tasks of one call.
#[derive(Debug)]
struct Plan {
    units: Vec<Unit>,
    tasks: Vec<Task>,
    groups: Vec<Group>,
    /// Tasks that write a partial result.
    partials: usize,
}

impl Plan {
    /// Cuts the batch into tasks: rows into chunks of consecutive positions of one sequence
    /// (as many as keep a unit within [`MAX_QUERIES`] queries), each context into partitions
    /// when there are fewer than `split.min_tasks` chunks.
    fn new(row_pos: &[(usize, usize)], group: usize, kv_heads: usize, split: Split) -> Self {
        let heads_per_unit = group.min(MAX_QUERIES);
        let rows_per_task = MAX_QUERIES / heads_per_unit;
        let mut units = Vec::new();
        for kh in 0..kv_heads {
            for head0 in (kh * group..(kh + 1) * group).step_by(heads_per_unit) {
                units.push(Unit {
                    head0,
                    heads: heads_per_unit.min((kh + 1) * group - head0),
                });
            }
        }
        // (seq, row0, rows, pos0)
        let mut chunks = Vec::new();
        let mut r = 0;
        while r < row_pos.len() {
            let (si, pos) = row_pos[r];
            if si == usize::MAX {
                r += 1;
                continue;
            }
            let mut n = 1;
            while n < rows_per_task && r + n < row_pos.len() && row_pos[r + n] == (si, pos + n) {
                n += 1;
            }
            chunks.push((si, r, n, pos));
            r += n;
        }
        let most_parts = if chunks.is_empty() || chunks.len() >= split.min_tasks {
            1
        } else {
            split.min_tasks.div_ceil(chunks.len())
        };
        let mut tasks = Vec::with_capacity(chunks.len());
        let mut groups = Vec::with_capacity(chunks.len());
        let mut partials = 0;
        for &(seq, row0, rows, pos0) in &chunks {
            let len = pos0 + rows;
            let parts = most_parts
                .min(len.div_ceil(split.min_partition.max(1)))
                .max(1);
            let psize = len.div_ceil(parts);
            let parts = len.div_ceil(psize);
            groups.push(Group {
                first: tasks.len(),
                parts,
            });
            for p in 0..parts {
                let part = (parts > 1).then(|| {
                    partials += 1;
                    partials - 1
                });
                tasks.push(Task {
                    seq,
                    row0,
                    rows,
                    pos0,
                    c0: p * psize,
                    c1: len.min((p + 1) * psize),
                    part,
                });
            }
        }
        Plan {
            units,
            tasks,
            groups,
            partials,
        }
    }

    /// Floats of one partial result: per unit, accumulators, maxima and sums of
    /// [`MAX_QUERIES`] queries.
    fn slot_len(&self, head_dim: usize) -> usize {
        self.units.len() * MAX_QUERIES * (head_dim + 2)
    }
}

/// A task's working state (one per rayon worker, reused across tasks), per unit and query
/// (`u · MAX_QUERIES + j`, query `j = r · unit.heads + h`): the query (pre-scaled), its
/// unnormalised output, running max and sum.
struct Scratch {
    q: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl Scratch {
    fn new(units: usize, head_dim: usize) -> Self {
        let n = units * MAX_QUERIES;
        Self {
            q: vec![0f32; n * head_dim],
            acc: vec![0f32; n * head_dim],
            m: vec![f32::NEG_INFINITY; n],
            l: vec![0f32; n],
        }
    }

    /// Writes the task's normalised outputs into `out`.
    ///
    /// # Safety
    /// `out` points at the call's `[T, heads, head_dim]` output and no other thread writes
    /// the task's rows.
    unsafe fn finish<T: KvElem>(&self, task: &Task, cx: &Cx<'_, T>, out: SyncPtr) {
        let hd = cx.head_dim;
        for (u, unit) in cx.units.iter().enumerate() {
            for j in 0..task.rows * unit.heads {
                let (r, h) = (j / unit.heads, j % unit.heads);
                let at = ((task.row0 + r) * cx.heads + unit.head0 + h) * hd;
                // SAFETY: `at + hd <= T · heads · head_dim` (rows and heads of a planned task).
                let o = std::slice::from_raw_parts_mut(out.get().add(at), hd);
                let i = u * MAX_QUERIES + j;
                // The accumulators sum V as widened (`KvElem::WIDEN_SCALE`).
                let inv = T::WIDEN_SCALE / self.l[i];
                for (o, a) in o.iter_mut().zip(&self.acc[i * hd..(i + 1) * hd]) {
                    *o = a * inv;
                }
            }
        }
    }

    /// Copies the partial result (accumulators, then maxima, then sums) into `slot`.
    fn save(&self, hd: usize, slot: &mut [f32]) {
        let n = self.m.len();
        slot[..n * hd].copy_from_slice(&self.acc);
        slot[n * hd..n * (hd + 1)].copy_from_slice(&self.m);
        slot[n * (hd + 1)..].copy_from_slice(&self.l);
    }
}

/// Merges the partial results of a group's partitions and writes the normalised outputs: with
/// `M = max m_p`, `out = Σ e^(m_p − M) acc_p / Σ e^(m_p − M) l_p`. A partition that starts
/// after a query's position has `l_p = 0` and is skipped; the first partition holds position 0,
/// which every query sees.
///
/// # Safety
/// As [`Scratch::finish`]: no other thread writes the group's rows.
unsafe fn merge<T: KvElem>(
    parts: &[Task],
    partials: &[f32],
    slot: usize,
    cx: &Cx<'_, T>,
    out: SyncPtr,
) {
    let hd = cx.head_dim;
    let n = cx.units.len() * MAX_QUERIES;
    let t0 = &parts[0];
    // (accumulators, maxima, sums) of a part.
    let stats = |p: &Task| {
        let s = &partials[p.part.expect("a split task has a slot") * slot..][..slot];
        (&s[..n * hd], &s[n * hd..n * (hd + 1)], &s[n * (hd + 1)..])
    };
    let mut acc = vec![0f32; hd];
    for (u, unit) in cx.units.iter().enumerate() {
        for j in 0..t0.rows * unit.heads {
            let i = u * MAX_QUERIES + j;
            let mut m = f32::NEG_INFINITY;
            for p in parts {
                let (_, pm, pl) = stats(p);
                if pl[i] > 0.0 {
                    m = m.max(pm[i]);
                }
            }
            acc.fill(0.0);
            let mut l = 0f32;
            for p in parts {
                let (pa, pm, pl) = stats(p);
                if pl[i] > 0.0 {
                    let c = (pm[i] - m).exp();
                    l += c * pl[i];
                    for (x, y) in acc.iter_mut().zip(&pa[i * hd..(i + 1) * hd]) {
                        *x += c * y;
                    }
                }
            }
            let (r, h) = (j / unit.heads, j % unit.heads);
            let at = ((t0.row0 + r) * cx.heads + unit.head0 + h) * hd;
            // SAFETY: in bounds as in `Scratch::finish`; this group's rows are written only here.
            let o = std::slice::from_raw_parts_mut(out.get().add(at), hd);
            let inv = T::WIDEN_SCALE / l;
            for (o, a) in o.iter_mut().zip(&acc) {
                *o = a * inv;
            }
        }
    }
}

/// A task runner for one kernel flavour.
///
/// # Safety
/// The kernel's CPU features are present; the task comes from a [`Plan`] of checked inputs.
type TaskFn<T> = unsafe fn(&Cx<'_, T>, &Task, &mut Scratch);

unsafe fn task_portable<T: KvElem>(cx: &Cx<'_, T>, task: &Task, s: &mut Scratch) {
    task_body::<Portable, T>(cx, task, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn task_avx2<T: KvElem>(cx: &Cx<'_, T>, task: &Task, s: &mut Scratch) {
    task_body::<Avx2, T>(cx, task, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn task_avx512<T: KvElem>(cx: &Cx<'_, T>, task: &Task, s: &mut Scratch) {
    task_body::<Avx512, T>(cx, task, s)
}

/// Dispatches a runtime query count (1..=[`QUERY_BLOCK`]) to a function monomorphised for it,
/// so its accumulators are a fixed-size array kept in registers.
macro_rules! by_queries {
    ($f:ident::<$s:ty, $t:ty>, $n:expr, $($arg:expr),+) => {
        match $n {
            1 => $f::<$s, $t, 1>($($arg),+),
            2 => $f::<$s, $t, 2>($($arg),+),
            3 => $f::<$s, $t, 3>($($arg),+),
            4 => $f::<$s, $t, 4>($($arg),+),
            5 => $f::<$s, $t, 5>($($arg),+),
            6 => $f::<$s, $t, 6>($($arg),+),
            7 => $f::<$s, $t, 7>($($arg),+),
            _ => $f::<$s, $t, 8>($($arg),+),
        }
    };
}

/// One task: the online-softmax walk over its context, tile by tile and, within a tile, unit
/// by unit (KV head by KV head); leaves the unnormalised outputs, maxima and sums in `s`.
///
/// # Safety
/// `S`'s CPU features are enabled in the caller; the task's rows, heads and positions fit
/// `cx` and every block of the sequence's table lies in the pool (checked by [`attend`]).
#[inline(always)]
unsafe fn task_body<S: Simd, T: KvElem>(cx: &Cx<'_, T>, task: &Task, s: &mut Scratch) {
    let hd = cx.head_dim;
    // Queries, pre-scaled, per block of QUERY_BLOCK as `dot_block` reads them: lane-wide
    // chunks of every query of the block in turn, then the tails past the last whole chunk.
    let vec_end = hd / S::LANES * S::LANES;
    // The loads widen K to its value / WIDEN_SCALE; the queries make up for it.
    let qscale = cx.scale * T::WIDEN_SCALE;
    for (u, unit) in cx.units.iter().enumerate() {
        let nq = task.rows * unit.heads;
        for jb in (0..nq).step_by(QUERY_BLOCK) {
            let nb = (nq - jb).min(QUERY_BLOCK);
            let dst = &mut s.q[(u * MAX_QUERIES + jb) * hd..][..nb * hd];
            for jj in 0..nb {
                let j = jb + jj;
                let (r, h) = (j / unit.heads, j % unit.heads);
                let src = &cx.q[((task.row0 + r) * cx.heads + unit.head0 + h) * hd..][..hd];
                let (body, tail) = src.split_at(vec_end);
                for (c, chunk) in body.chunks_exact(S::LANES).enumerate() {
                    let at = (c * nb + jj) * S::LANES;
                    for (d, x) in dst[at..at + S::LANES].iter_mut().zip(chunk) {
                        *d = x * qscale;
                    }
                }
                let at = vec_end * nb + jj * tail.len();
                for (d, x) in dst[at..at + tail.len()].iter_mut().zip(tail) {
                    *d = x * qscale;
                }
            }
        }
    }
    s.acc.fill(0.0);
    s.m.fill(f32::NEG_INFINITY);
    s.l.fill(0.0);

    let table = cx.seqs[task.seq].block_table;
    let (bs, te) = (cx.block_size, cx.token_elems);
    // Element offset of each token's K/V row (all heads) in the cache.
    let offsets = |p0: usize, n: usize, o: &mut [usize; TILE]| {
        for (t, o) in o[..n].iter_mut().enumerate() {
            let p = p0 + t;
            *o = (table[p / bs] as usize * bs + p % bs) * te;
        }
    };
    let row_bytes = hd * std::mem::size_of::<T>();
    let (kp, vp) = (cx.k.as_ptr(), cx.v.as_ptr());
    let mut cur = [0usize; TILE];
    let mut next = [0usize; TILE];
    let mut p0 = task.c0;
    let mut n = TILE.min(task.c1 - p0);
    offsets(p0, n, &mut cur);
    let mut w = [[0f32; TILE]; MAX_QUERIES];
    while n > 0 {
        let p1 = p0 + n;
        let nn = TILE.min(task.c1 - p1);
        offsets(p1, nn, &mut next);
        for (u, unit) in cx.units.iter().enumerate() {
            let head_off = unit.head0 / cx.group * hd;
            let nq = task.rows * unit.heads;
            let q = s.q.as_ptr().add(u * MAX_QUERIES * hd);
            // The rows the next unit reads (the next KV head on this tile, or the first on
            // the next tile): one unit's tile (16 KiB of bf16 K/V at Hy3's shapes) ahead stays
            // in L1 until it is used and is still far enough ahead to hide DRAM latency.
            let (pf_rows, pf_head) = match cx.units.get(u + 1) {
                Some(nu) => (&cur[..n], nu.head0 / cx.group * hd),
                None => (&next[..nn], cx.units[0].head0 / cx.group * hd),
            };
            // Scores: each K row once, against every query of the unit.
            for (t, &o) in cur[..n].iter().enumerate() {
                if let Some(&pf) = pf_rows.get(t) {
                    // A hint, never a fault; spread over this unit's work.
                    for b in (0..row_bytes).step_by(64) {
                        S::prefetch((kp.add(pf + pf_head) as *const u8).add(b));
                        S::prefetch((vp.add(pf + pf_head) as *const u8).add(b));
                    }
                }
                let kr = kp.add(o + head_off);
                for jb in (0..nq).step_by(QUERY_BLOCK) {
                    by_queries!(
                        dot_block::<S, T>,
                        (nq - jb).min(QUERY_BLOCK),
                        kr,
                        q.add(jb * hd),
                        hd,
                        &mut w[jb..],
                        t
                    );
                }
            }
            // Online softmax: scores become weights relative to each query's running max.
            for (j, row) in w[..nq].iter_mut().enumerate() {
                let i = u * MAX_QUERIES + j;
                // Last position query j attends to.
                let lim = task.pos0 + j / unit.heads;
                let valid = if lim < p0 { 0 } else { (lim - p0 + 1).min(n) };
                if valid == 0 {
                    *row = [0.0; TILE];
                    continue;
                }
                // Lane-wise max and sum over 16-wide chunks so the loops vectorise (`>` rather
                // than `f32::max`, whose NaN rule does not); tokens past `valid` are masked.
                for (t, x) in row.iter_mut().enumerate() {
                    if t >= valid {
                        *x = f32::NEG_INFINITY;
                    }
                }
                let mut maxes = [f32::NEG_INFINITY; 16];
                for c in row.chunks_exact(16) {
                    for (m, &x) in maxes.iter_mut().zip(c) {
                        *m = if x > *m { x } else { *m };
                    }
                }
                let mx = maxes
                    .iter()
                    .fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
                if mx > s.m[i] {
                    if s.l[i] > 0.0 {
                        let c = (s.m[i] - mx).exp();
                        s.l[i] *= c;
                        for a in &mut s.acc[i * hd..(i + 1) * hd] {
                            *a *= c;
                        }
                    }
                    s.m[i] = mx;
                }
                let m = s.m[i];
                // Masked scores are −∞, so their weights are exactly 0.
                for x in row.iter_mut() {
                    *x = exp_nonpositive(*x - m);
                }
                let mut sums = [0f32; 16];
                for c in row.chunks_exact(16) {
                    for (s, &x) in sums.iter_mut().zip(c) {
                        *s += x;
                    }
                }
                s.l[i] += sums.iter().sum::<f32>();
            }
            // acc += w · V: each V row once, against every query of the unit.
            let acc = s.acc.as_mut_ptr().add(u * MAX_QUERIES * hd);
            for jb in (0..nq).step_by(QUERY_BLOCK) {
                by_queries!(
                    axpy_block::<S, T>,
                    (nq - jb).min(QUERY_BLOCK),
                    vp.add(head_off),
                    &cur[..n],
                    &w[jb..],
                    acc.add(jb * hd),
                    hd
                );
            }
        }
        p0 = p1;
        n = nn;
        cur = next;
    }
}

/// Scores of token `t` against `N` queries: `w[j][t] = q_j · k` (queries pre-scaled, packed
/// by [`task_body`]: chunk `c` of query `j` at `(c · N + j) · LANES`, tails after the chunks).
///
/// # Safety
/// `k` points at `hd` elements and `q` at `N · hd` floats; `w.len() >= N`, `t < TILE`.
#[inline(always)]
unsafe fn dot_block<S: Simd, T: KvElem, const N: usize>(
    k: *const T,
    q: *const f32,
    hd: usize,
    w: &mut [[f32; TILE]],
    t: usize,
) {
    let vec_end = hd / S::LANES * S::LANES;
    let mut acc = [S::zero(); N];
    let mut d = 0;
    let mut qc = q;
    while d < vec_end {
        let kv = S::load_kv(k.add(d));
        for (j, a) in acc.iter_mut().enumerate() {
            *a = S::fma(S::load(qc.add(j * S::LANES)), kv, *a);
        }
        d += S::LANES;
        qc = qc.add(N * S::LANES);
    }
    let tail = hd - vec_end;
    let sums = if N > 2 {
        let mut v = [S::zero(); 8];
        v[..N].copy_from_slice(&acc);
        S::sum8(v)
    } else {
        std::array::from_fn(|j| if j < N { S::sum(acc[j]) } else { 0.0 })
    };
    for (j, &x) in sums[..N].iter().enumerate() {
        let mut x = x;
        for e in 0..tail {
            x += *q.add(vec_end * N + j * tail + e) * (*k.add(vec_end + e)).to_f32_widened();
        }
        w[j][t] = x;
    }
}

/// `acc_j += Σ_t w[j][t] · v_t` for `N` queries over the tile's V rows (`v + offs[t]`).
///
/// # Safety
/// Every `v + offs[t]` points at `hd` elements, `acc` at `N · hd` floats; `w.len() >= N`.
#[inline(always)]
unsafe fn axpy_block<S: Simd, T: KvElem, const N: usize>(
    v: *const T,
    offs: &[usize],
    w: &[[f32; TILE]],
    acc: *mut f32,
    hd: usize,
) {
    let w = &w[..N];
    let offs = &offs[..offs.len().min(TILE)];
    let vec_end = hd / S::LANES * S::LANES;
    let mut d = 0;
    while d < vec_end {
        let mut a = [S::zero(); N];
        for (j, a) in a.iter_mut().enumerate() {
            *a = S::load(acc.add(j * hd + d));
        }
        for (t, &o) in offs.iter().enumerate() {
            let vv = S::load_kv(v.add(o + d));
            for (j, a) in a.iter_mut().enumerate() {
                *a = S::fma(S::splat(w[j][t]), vv, *a);
            }
        }
        for (j, a) in a.iter().enumerate() {
            S::store(acc.add(j * hd + d), *a);
        }
        d += S::LANES;
    }
    for d in vec_end..hd {
        for (j, w) in w.iter().enumerate() {
            let mut x = *acc.add(j * hd + d);
            for (t, &o) in offs.iter().enumerate() {
                x += w[t] * (*v.add(o + d)).to_f32_widened();
            }
            *acc.add(j * hd + d) = x;
        }
    }
}

/// `e^x` for `x <= 0` (the softmax's `s − max`; larger `x` are taken as 0), within a few ulp:
/// `x = n·ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by its Taylor series to `r^7` (truncation
/// below `0.35^8 / 8! = 5e-9`), scaled by `2^n` through the exponent bits.
/// Below −87 (where `2^n` would leave the normal range) the result is 0; the softmax weight of
/// such a token is under `e^-87 ≈ 1.6e-38` of the max's. Branch-free, so the tile loops
/// vectorise it.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n · LN2_HI` is exact for |n| < 2^11 (Cody–Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const FLOOR: f32 = -87.0;
    // 1.5 · 2^23: adding it rounds to an integer (ties to even) held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(FLOOR, 0.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n: `n + 127` in the exponent field (`t`'s low bits are `n` modulo 2^22).
    let bits = (t.to_bits().wrapping_sub(ROUND.to_bits()) as i32 + 127) as u32;
    let scale = f32::from_bits(bits << 23);
    if x >= FLOOR {
        p * scale
    } else {
        0.0
    }
}

/// The vector operations the kernel is written over. Every method is `unsafe`: it may use CPU
/// features the caller has to have enabled, and pointers must be valid for `LANES` elements.
pub(crate) trait Simd {
    /// f32 lanes per vector.
    const LANES: usize;
    /// A vector of `LANES` f32.
    type V: Copy;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `LANES` cache elements widened to f32.
    unsafe fn load_kv<T: KvElem>(p: *const T) -> Self::V;
    /// `a · b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Sum of the lanes.
    unsafe fn sum(v: Self::V) -> f32;
    /// Sums of the lanes of 8 vectors (a transposing reduction where the ISA has one).
    #[inline(always)]
    unsafe fn sum8(v: [Self::V; 8]) -> [f32; 8] {
        std::array::from_fn(|j| Self::sum(v[j]))
    }
    /// Prefetch hint for the cache line at `p` (any address).
    unsafe fn prefetch(p: *const u8);
}

/// Whether `T` is `U` (folded at compile time).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn is<T: 'static, U: 'static>() -> bool {
    use std::any::TypeId;
    TypeId::of::<T>() == TypeId::of::<U>()
}

/// The portable flavour: 8-lane arrays, element by element.
pub(crate) struct Portable;

impl Simd for Portable {
    const LANES: usize = 8;
    type V = [f32; 8];
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::ptr::read_unaligned(p as *const [f32; 8])
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::ptr::write_unaligned(p as *mut [f32; 8], v)
    }
    #[inline(always)]
    unsafe fn load_kv<T: KvElem>(p: *const T) -> Self::V {
        std::array::from_fn(|i| (*p.add(i)).to_f32_widened())
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn sum(v: Self::V) -> f32 {
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
    #[inline(always)]
    unsafe fn prefetch(_: *const u8) {}
}

/// AVX2 + FMA: 8 lanes.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx2 {
    const LANES: usize = 8;
    type V = std::arch::x86_64::__m256;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        std::arch::x86_64::_mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::arch::x86_64::_mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_kv<T: KvElem>(p: *const T) -> Self::V {
        use std::arch::x86_64::*;
        if is::<T, f32>() {
            _mm256_loadu_ps(p as *const f32)
        } else if is::<T, half::bf16>() {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        } else if is::<T, F8E4M3>() {
            // See `FP8_TO_F16_SCALE` and `FP8_TO_F16_MASK`; then F16C.
            let b = _mm_cvtepi8_epi16(_mm_loadl_epi64(p as *const __m128i));
            _mm256_cvtph_ps(_mm_and_si128(
                _mm_slli_epi16::<7>(b),
                _mm_set1_epi16(FP8_TO_F16_MASK),
            ))
        } else {
            Self::load(Portable::load_kv(p).as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn sum(v: Self::V) -> f32 {
        use std::arch::x86_64::*;
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        use std::arch::x86_64::*;
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    }
}

/// AVX-512F: 16 lanes.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx512 {
    const LANES: usize = 16;
    type V = std::arch::x86_64::__m512;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        std::arch::x86_64::_mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::arch::x86_64::_mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_kv<T: KvElem>(p: *const T) -> Self::V {
        use std::arch::x86_64::*;
        if is::<T, f32>() {
            _mm512_loadu_ps(p as *const f32)
        } else if is::<T, half::bf16>() {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        } else if is::<T, F8E4M3>() {
            // As for AVX2: 16 bytes → 16 halves → 16 floats.
            let b = _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i));
            _mm512_cvtph_ps(_mm256_and_si256(
                _mm256_slli_epi16::<7>(b),
                _mm256_set1_epi16(FP8_TO_F16_MASK),
            ))
        } else {
            let a: [f32; 16] = std::array::from_fn(|i| (*p.add(i)).to_f32_widened());
            Self::load(a.as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn sum(v: Self::V) -> f32 {
        std::arch::x86_64::_mm512_reduce_add_ps(v)
    }
    /// Pairs of vectors are folded into one at each step, halving the lanes per vector: 23
    /// shuffles and adds for 8 sums where 8 separate reductions take about 70.
    #[inline(always)]
    unsafe fn sum8(v: [Self::V; 8]) -> [f32; 8] {
        use std::arch::x86_64::*;
        // 512 → 256 bits: lanes 0..8 hold a's 8 partial sums, lanes 8..16 b's.
        let halves = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            )
        };
        // 256 → 128: 128-bit lane k holds 4 partial sums of input k (of a's pair, then b's).
        let quarters = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            )
        };
        let lo = quarters(halves(v[0], v[1]), halves(v[2], v[3]));
        let hi = quarters(halves(v[4], v[5]), halves(v[6], v[7]));
        // Within each 128-bit lane k: [lo pair sums, hi pair sums], then adjacent pairs.
        let g = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(lo, hi),
            _mm512_shuffle_ps::<0xEE>(lo, hi),
        );
        let h = _mm512_add_ps(g, _mm512_shuffle_ps::<0xB1>(g, g));
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), h);
        // Lane 4k holds input k's sum, lane 4k + 2 input 4 + k's.
        std::array::from_fn(|j| lanes[4 * (j % 4) + 2 * (j / 4)])
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        use std::arch::x86_64::*;
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The scalar implementation this module had before the GQA-aware kernel (one query head
    /// at a time, each K/V row re-read per head, online softmax in f32), kept as a reference.
    #[allow(clippy::too_many_arguments)]
    fn reference<T: KvElem>(
        q: &[f32],
        k_cache: &[T],
        v_cache: &[T],
        layout: &KvLayout,
        seqs: &[SeqAttn<'_>],
        heads: usize,
        scale: f32,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let hd = layout.head_dim;
        let kvh = layout.kv_heads;
        if heads == 0 || kvh == 0 || !heads.is_multiple_of(kvh) {
            return Err(KernelError::InvalidArgument(format!(
                "paged_attention: {heads} query heads over {kvh} KV heads"
            )));
        }
        if !q.len().is_multiple_of(heads * hd) || out.len() != q.len() {
            return Err(KernelError::InvalidArgument(
                "paged_attention: q/out are not [T, heads, head_dim]".into(),
            ));
        }
        let t = q.len() / (heads * hd);
        // Row → (sequence, position) map; checked up front so the parallel loop cannot fail.
        let mut row_pos = vec![(usize::MAX, 0usize); t];
        for (si, s) in seqs.iter().enumerate() {
            if s.q_len > s.ctx_len
                || s.q_start + s.q_len > t
                || s.block_table.len() * layout.block_size < s.ctx_len
            {
                return Err(KernelError::InvalidArgument(format!(
                    "paged_attention: sequence {si} (q {}+{}, ctx {}, {} blocks) does not fit the batch of {t} rows",
                    s.q_start,
                    s.q_len,
                    s.ctx_len,
                    s.block_table.len()
                )));
            }
            if let Some(&b) = s
                .block_table
                .iter()
                .find(|&&b| b as usize >= layout.num_blocks)
            {
                return Err(KernelError::InvalidArgument(format!(
                    "paged_attention: block {b} outside the pool of {}",
                    layout.num_blocks
                )));
            }
            for i in 0..s.q_len {
                row_pos[s.q_start + i] = (si, s.ctx_len - s.q_len + i);
            }
        }
        let group = heads / kvh;
        let bs = layout.block_size;
        let te = layout.token_elems();
        out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
            let (row, h) = (idx / heads, idx % heads);
            let (si, pos) = row_pos[row];
            if si == usize::MAX {
                o.fill(0.0);
                return;
            }
            let s = &seqs[si];
            let kh = h / group;
            let qv = &q[(row * heads + h) * hd..(row * heads + h + 1) * hd];
            let mut m = f32::NEG_INFINITY;
            let mut l = 0f32;
            let mut acc = vec![0f32; hd];
            for p in 0..=pos {
                let base = (s.block_table[p / bs] as usize * bs + p % bs) * te + kh * hd;
                let kr = &k_cache[base..base + hd];
                let mut dot = 0f32;
                for d in 0..hd {
                    dot += qv[d] * kr[d].to_f32();
                }
                let x = dot * scale;
                let vr = &v_cache[base..base + hd];
                if x > m {
                    let c = (m - x).exp();
                    l = l * c + 1.0;
                    for d in 0..hd {
                        acc[d] = acc[d] * c + vr[d].to_f32();
                    }
                    m = x;
                } else {
                    let w = (x - m).exp();
                    l += w;
                    for d in 0..hd {
                        acc[d] += w * vr[d].to_f32();
                    }
                }
            }
            for d in 0..hd {
                o[d] = acc[d] / l;
            }
        });
        Ok(())
    }

    /// The kernels this CPU can run.
    fn kernels() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut k = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                k.push(Kernel::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f") {
                k.push(Kernel::Avx512);
            }
        }
        k
    }

    #[test]
    fn exp_is_within_a_few_ulp() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        // 4 ulp (2^-22): the polynomial's truncation is 5e-9, the rest is f32 rounding in
        // the reduction and Horner steps.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-87.5), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn plan_covers_every_query_once_and_tiles_contexts() {
        // Rows: seq 0 prefill of 37 rows at 100.., a gap row, seq 1 decode at 4999.
        let mut row_pos: Vec<(usize, usize)> = (0..37).map(|i| (0, 100 + i)).collect();
        row_pos.push((usize::MAX, 0));
        row_pos.push((1, 4999));
        for (group, kvh) in [(1, 3), (5, 2), (8, 8), (16, 1), (40, 2)] {
            for split in [
                Split {
                    min_tasks: 1,
                    min_partition: 1,
                },
                Split {
                    min_tasks: 200,
                    min_partition: 7,
                },
            ] {
                let plan = Plan::new(&row_pos, group, kvh, split);
                let heads = group * kvh;
                let mut seen = vec![0u32; row_pos.len() * heads];
                for g in &plan.groups {
                    let parts = &plan.tasks[g.first..g.first + g.parts];
                    let t0 = parts[0];
                    let len = t0.pos0 + t0.rows;
                    assert_eq!(parts[0].c0, 0);
                    assert_eq!(parts[g.parts - 1].c1, len);
                    for w in parts.windows(2) {
                        assert_eq!(w[0].c1, w[1].c0);
                        assert!(w[0].c0 < w[0].c1);
                    }
                    for r in t0.row0..t0.row0 + t0.rows {
                        assert_eq!(row_pos[r], (t0.seq, t0.pos0 + r - t0.row0));
                        for u in &plan.units {
                            assert!(u.heads * t0.rows <= MAX_QUERIES);
                            assert_eq!(u.head0 / group, (u.head0 + u.heads - 1) / group);
                            for h in u.head0..u.head0 + u.heads {
                                seen[r * heads + h] += 1;
                            }
                        }
                    }
                }
                for (r, &(si, _)) in row_pos.iter().enumerate() {
                    let want = u32::from(si != usize::MAX);
                    assert!(seen[r * heads..(r + 1) * heads].iter().all(|&c| c == want));
                }
            }
        }
    }

    /// One random batch: K/V written through `reshape_and_cache` into scrambled blocks, and the
    /// dense per-sequence copies (as stored, i.e. after rounding to `T`) for the f64 reference.
    struct Case<T> {
        layout: KvLayout,
        heads: usize,
        scale: f32,
        tables: Vec<Vec<u32>>,
        /// (q_start, q_len, ctx_len) per sequence.
        spans: Vec<(usize, usize, usize)>,
        rows: usize,
        q: Vec<f32>,
        kc: Vec<T>,
        vc: Vec<T>,
        dense_k: Vec<Vec<f64>>,
        dense_v: Vec<Vec<f64>>,
    }

    impl<T: KvElem> Case<T> {
        #[allow(clippy::too_many_arguments)]
        fn new(
            rng: &mut rand::rngs::StdRng,
            group: usize,
            kv_heads: usize,
            head_dim: usize,
            block_size: usize,
            ctxs: &[(usize, usize)],
            logit_scale: f32,
        ) -> Self {
            let per: Vec<usize> = ctxs.iter().map(|&(c, _)| c.div_ceil(block_size)).collect();
            // A spare block or two so tables do not cover the pool exactly.
            let num_blocks = per.iter().sum::<usize>() + 2;
            let layout = KvLayout {
                num_blocks,
                block_size,
                kv_heads,
                head_dim,
            };
            let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, rng.random_range(0..=i));
            }
            let mut tables = Vec::new();
            let mut at = 0;
            for &n in &per {
                tables.push(ids[at..at + n].to_vec());
                at += n;
            }
            let te = layout.token_elems();
            let mut kc = vec![T::default(); layout.layer_elems()];
            let mut vc = vec![T::default(); layout.layer_elems()];
            let (mut dense_k, mut dense_v) = (Vec::new(), Vec::new());
            for (s, &(n, _)) in ctxs.iter().enumerate() {
                let k: Vec<f32> = (0..n * te).map(|_| rng.random_range(-1.0..1.0)).collect();
                let v: Vec<f32> = (0..n * te).map(|_| rng.random_range(-1.0..1.0)).collect();
                let slots: Vec<usize> = (0..n)
                    .map(|p| tables[s][p / block_size] as usize * block_size + p % block_size)
                    .collect();
                reshape_and_cache(&k, &v, &slots, &mut kc, &mut vc, &layout).unwrap();
                let stored =
                    |x: &[f32]| x.iter().map(|&x| T::from_f32(x).to_f32() as f64).collect();
                dense_k.push(stored(&k));
                dense_v.push(stored(&v));
            }
            // Rows: each sequence's queries in order, one uncovered row between sequences.
            let mut spans = Vec::new();
            let mut row = 0;
            for &(n, q_len) in ctxs {
                spans.push((row, q_len, n));
                row += q_len + 1;
            }
            let heads = group * kv_heads;
            let q = (0..row * heads * head_dim)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            Self {
                layout,
                heads,
                scale: logit_scale / (head_dim as f32).sqrt(),
                tables,
                spans,
                rows: row,
                q,
                kc,
                vc,
                dense_k,
                dense_v,
            }
        }

        fn seqs(&self) -> Vec<SeqAttn<'_>> {
            self.spans
                .iter()
                .zip(&self.tables)
                .map(|(&(q_start, q_len, ctx_len), t)| SeqAttn {
                    q_start,
                    q_len,
                    ctx_len,
                    block_table: t,
                })
                .collect()
        }

        /// Dense causal attention in f64 (uncovered rows zero).
        fn dense(&self) -> Vec<f64> {
            self.dense_with_spread().0
        }

        /// [`Self::dense`], and per output the weighted spread of the values around it,
        /// `Σ_t w_t · |v_t − out|`: how far rounding every weight by a relative `u` can move
        /// that output, in units of `u`.
        fn dense_with_spread(&self) -> (Vec<f64>, Vec<f64>) {
            let (hd, heads) = (self.layout.head_dim, self.heads);
            let te = self.layout.token_elems();
            let group = heads / self.layout.kv_heads;
            let mut out = vec![0f64; self.rows * heads * hd];
            let mut spread = vec![0f64; self.rows * heads * hd];
            for (s, &(q_start, q_len, ctx)) in self.spans.iter().enumerate() {
                let (k, v) = (&self.dense_k[s], &self.dense_v[s]);
                for i in 0..q_len {
                    let (row, pos) = (q_start + i, ctx - q_len + i);
                    for h in 0..heads {
                        let kh = (h / group) * hd;
                        let qv = &self.q[(row * heads + h) * hd..][..hd];
                        let logits: Vec<f64> = (0..=pos)
                            .map(|p| {
                                let kr = &k[p * te + kh..][..hd];
                                qv.iter().zip(kr).map(|(&a, &b)| a as f64 * b).sum::<f64>()
                                    * self.scale as f64
                            })
                            .collect();
                        let mx = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let w: Vec<f64> = logits.iter().map(|x| (x - mx).exp()).collect();
                        let z: f64 = w.iter().sum();
                        let o = &mut out[(row * heads + h) * hd..][..hd];
                        for (p, &wp) in w.iter().enumerate() {
                            let vr = &v[p * te + kh..][..hd];
                            for (o, &x) in o.iter_mut().zip(vr) {
                                *o += wp / z * x;
                            }
                        }
                        let sp = &mut spread[(row * heads + h) * hd..][..hd];
                        for (p, &wp) in w.iter().enumerate() {
                            let vr = &v[p * te + kh..][..hd];
                            for ((sp, &x), &o) in sp.iter_mut().zip(vr).zip(o.iter()) {
                                *sp += wp / z * (x - o).abs();
                            }
                        }
                    }
                }
            }
            (out, spread)
        }

        fn run(&self, kernel: Kernel, split: Split) -> Vec<f32> {
            let mut out = vec![f32::NAN; self.q.len()];
            #[rustfmt::skip]
            attend(&self.q, &self.kc, &self.vc, &self.layout, &self.seqs(), self.heads,
                   self.scale, &mut out, kernel, split, None)
            .unwrap();
            out
        }
    }

    fn max_diff(a: &[f32], want: &[f64]) -> f64 {
        assert_eq!(a.len(), want.len());
        a.iter()
            .zip(want)
            .map(|(&x, &y)| (x as f64 - y).abs())
            .fold(
                0.0,
                |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
            )
    }

    /// Largest |Δ| from the f64 dense attention allowed for the new kernels (outputs are convex
    /// combinations of V values in [-1, 1]).
    ///
    /// Everything is f32 with unit roundoff u = 6e-8. A logit `s` carries a relative rounding
    /// error of a few u (products, lane-wise sums of `head_dim / lanes` terms, a tree at the
    /// end), i.e. an absolute error of a few u·|s|; at logit scale 12 the largest logits reach
    /// ~40, giving ~1e-6 on the weights and so on the outputs. The softmax sum and the V
    /// accumulation add up to 5000 positive weights in lane-wise partial sums (≈√n · u
    /// relative), and the exponential is within 4 ulp. Measured worst over both sweeps
    /// (seeds 21, 22): 1.9e-6; the bound leaves a factor 2.5. A mistake moves outputs much
    /// further: dropping or repeating one position of 5000 shifts them by about
    /// |v_p − out| / 5000 ≈ 2e-4 (40× the bound), a wrong mask, head or partition by O(0.1).
    const TOL: f64 = 5e-6;

    /// The same for the old scalar kernel, whose sums are sequential over the whole context
    /// (measured worst 9.2e-6 at 4241 positions and logit scale 12): the sweep checks the
    /// reference too, so the two bounds together say the new kernel is the more accurate.
    const REF_TOL: f64 = 2e-5;

    /// One to three sequences' `(context, query rows)`: contexts drawn from `long_ctx` or
    /// `short_ctx`, rows by `q_len(rng, context)`.
    fn random_spans(
        rng: &mut rand::rngs::StdRng,
        long: bool,
        long_ctx: std::ops::RangeInclusive<usize>,
        short_ctx: std::ops::RangeInclusive<usize>,
        q_len: impl Fn(&mut rand::rngs::StdRng, usize) -> usize,
    ) -> Vec<(usize, usize)> {
        let n_seqs = rng.random_range(1..=3);
        (0..n_seqs)
            .map(|_| {
                let ctx = rng.random_range(if long {
                    long_ctx.clone()
                } else {
                    short_ctx.clone()
                });
                (ctx, q_len(rng, ctx))
            })
            .collect()
    }

    /// Random shapes through every kernel, with and without context partitions, against f64
    /// dense attention: GQA 1…16, head_dim 8…256 (not all multiples of 16), block sizes 1, 5
    /// and 16, contexts 1…5000 with decode rows and prefill chunks, f32 and bf16 KV, scrambled
    /// block tables and uncovered rows.
    fn sweep<T: KvElem>(seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let head_dims = [8, 12, 24, 40, 64, 100, 128, 136, 200, 256];
        let splits = [
            Split {
                min_tasks: 1,
                min_partition: usize::MAX,
            },
            Split {
                min_tasks: MIN_TASKS,
                min_partition: MIN_PARTITION,
            },
            Split {
                min_tasks: 64,
                min_partition: 13,
            },
        ];
        let (mut worst_new, mut worst_ref) = (0f64, 0f64);
        for case in 0..24 {
            let group = [1, 2, 4, 8, 16][case % 5];
            let kv_heads = rng.random_range(1..=2);
            let head_dim = head_dims[rng.random_range(0..head_dims.len())];
            let block_size = [1, 5, 16][case % 3];
            // Long contexts with few heads and narrow rows keep the f64 reference quick.
            let long = case % 4 == 0;
            let ctxs = random_spans(&mut rng, long, 3000..=5000, 1..=700, |rng, ctx| {
                if rng.random_bool(0.5) {
                    1
                } else {
                    rng.random_range(1..=ctx.min(if long { 3 } else { 40 }))
                }
            });
            let head_dim = if long { head_dim.min(64) } else { head_dim };
            let logit_scale = [1.0, 4.0, 12.0][case % 3];
            let c = Case::<T>::new(
                &mut rng,
                group,
                kv_heads,
                head_dim,
                block_size,
                &ctxs,
                logit_scale,
            );
            let want = c.dense();
            let mut old = vec![f32::NAN; c.q.len()];
            reference(
                &c.q,
                &c.kc,
                &c.vc,
                &c.layout,
                &c.seqs(),
                c.heads,
                c.scale,
                &mut old,
            )
            .unwrap();
            let d = max_diff(&old, &want);
            worst_ref = worst_ref.max(d);
            assert!(d < REF_TOL, "case {case}: old scalar kernel off by {d:e}");
            for kernel in kernels() {
                for split in splits {
                    let d = max_diff(&c.run(kernel, split), &want);
                    worst_new = worst_new.max(d);
                    assert!(
                        d < TOL,
                        "case {case} ({kernel:?}, {split:?}, group {group}, kv {kv_heads}, \
                         hd {head_dim}, bs {block_size}, ctxs {ctxs:?}): max |Δ| {d:e}"
                    );
                }
            }
        }
        eprintln!("max |Δ| from f64: new {worst_new:e}, old scalar {worst_ref:e}");
    }

    #[test]
    fn every_kernel_matches_dense_f64_f32_kv() {
        sweep::<f32>(21);
    }

    #[test]
    fn every_kernel_matches_dense_f64_bf16_kv() {
        sweep::<bf16>(22);
    }

    #[test]
    fn every_kernel_matches_dense_f64_fp8_kv() {
        sweep::<F8E4M3>(23);
    }

    /// Every byte the cache can hold widens to the same f32 in the SIMD loads as in `float8`'s
    /// scalar conversion (the NaN byte aside, which writes never produce), and writes round
    /// to nearest even and saturate at ±448.
    #[test]
    fn fp8_loads_widen_every_byte_exactly() {
        let bytes: Vec<F8E4M3> = (0..=255u8).map(F8E4M3::from_bits).collect();
        // The loads leave out the factor 2^8 (`WIDEN_SCALE`), exactly.
        let want: Vec<f32> = bytes.iter().map(|b| b.to_f32() / 256.0).collect();
        let check = |got: &[f32], lanes: usize, at: usize| {
            for (i, (&g, &w)) in got.iter().zip(&want[at..at + lanes]).enumerate() {
                let b = at + i;
                if b & 0x7F == 0x7F {
                    assert!(w.is_nan());
                    continue;
                }
                assert_eq!(g.to_bits(), w.to_bits(), "byte {b:#04x}: {g} vs {w}");
            }
        };
        for at in (0..256).step_by(8) {
            check(unsafe { &Portable::load_kv(bytes.as_ptr().add(at)) }, 8, at);
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2(p: *const F8E4M3) -> [f32; 8] {
                    std::mem::transmute(Avx2::load_kv(p))
                }
                for at in (0..256).step_by(8) {
                    check(&unsafe { avx2(bytes.as_ptr().add(at)) }, 8, at);
                }
            }
            if std::is_x86_feature_detected!("avx512f") {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512(p: *const F8E4M3) -> [f32; 16] {
                    std::mem::transmute(Avx512::load_kv(p))
                }
                for at in (0..256).step_by(16) {
                    check(&unsafe { avx512(bytes.as_ptr().add(at)) }, 16, at);
                }
            }
        }
        // Writes: the nearest E4M3 value, ties to the even mantissa, saturation, signed zero.
        let w = |x: f32| <F8E4M3 as KvElem>::from_f32(x).to_f32();
        assert_eq!(w(1000.0), 448.0);
        assert_eq!(w(-1e30), -448.0);
        assert_eq!(w(1.0625), 1.0); // halfway between 1 and 1.125: even mantissa
        assert_eq!(w(1.1875), 1.25); // halfway between 1.125 and 1.25: even mantissa
        assert_eq!(w(3.0 / 512.0), 3.0 / 512.0); // a subnormal: 3 · 2^-9
        assert_eq!(w(2f32.powi(-11)), 0.0);
        assert_eq!(w(-0.3).to_bits(), (-0.3125f32).to_bits());
        for b in &bytes {
            let x = b.to_f32();
            if x.is_finite() {
                assert_eq!(w(x).to_bits(), x.to_bits(), "round trip of {x}");
                assert_eq!(f32::from(bf16::from_bits(b.bf16_bits())), x);
            }
        }
    }

    /// The production entry point agrees with the scalar reference on Hy3's shapes (64 query
    /// heads over 8 KV heads, head_dim 128, blocks of 16) at decode and for a prefill chunk.
    #[test]
    fn hy3_shapes_match_the_scalar_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let c = Case::<bf16>::new(
            &mut rng,
            8,
            8,
            128,
            16,
            &[(1500, 1), (700, 24), (33, 1)],
            1.0,
        );
        let mut old = vec![f32::NAN; c.q.len()];
        reference(
            &c.q,
            &c.kc,
            &c.vc,
            &c.layout,
            &c.seqs(),
            c.heads,
            c.scale,
            &mut old,
        )
        .unwrap();
        // The FMA kernels (the prefill chunk too: no tiles).
        let split = Split {
            min_tasks: MIN_TASKS,
            min_partition: MIN_PARTITION,
        };
        let mut new = vec![f32::NAN; c.q.len()];
        #[rustfmt::skip]
        attend(&c.q, &c.kc, &c.vc, &c.layout, &c.seqs(), c.heads, c.scale, &mut new,
               Kernel::detect(), split, None)
        .unwrap();
        let d = old
            .iter()
            .zip(&new)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 4e-6, "max |Δ| {d:e}");
        // The production entry point: the prefill chunk on the tiles where the CPU has them
        // (bf16 queries and weights, see `TILE_TOL`).
        let mut prod = vec![f32::NAN; c.q.len()];
        paged_attention(
            &c.q,
            &c.kc,
            &c.vc,
            &c.layout,
            &c.seqs(),
            c.heads,
            c.scale,
            &mut prod,
        )
        .unwrap();
        let d = old
            .iter()
            .zip(&prod)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < TILE_TOL as f32, "max |Δ| {d:e}");
    }

    /// How far the tile path may be from f64 attention on the same bf16-rounded queries. The
    /// softmax weights are rounded to bf16 (relative error `δ_t`, `|δ_t| <= u = 2^-8`, bf16
    /// having 8 significant bits) and
    /// normalised by the sum of the rounded weights, so an output moves by
    /// `Σ_t w_t δ_t (v_t − out) / Σ_t w_t (1 + δ_t)`: at most `u / (1 − u) · Σ_t w_t |v_t −
    /// out|` (the spread [`Case::dense_with_spread`] computes). The f32 parts (exact products
    /// accumulated in f32, the exponential within a few ulp, the rescaling, which scales the
    /// sums and the outputs alike) add ~1e-6 at these sizes: `TILE_ABS`. Any mistake that
    /// drops, repeats or unmasks a token, or mixes heads, moves a peaked output by O(0.1) and
    /// a flat one over `n` tokens by about `mean |v − out| / n`, above `u · mean |v − out|`
    /// for the contexts of up to 300 tokens most cases use.
    fn tile_bound(spread: f64) -> f64 {
        const U: f64 = 1.0 / 256.0;
        const TILE_ABS: f64 = 1e-5;
        U / (1.0 - U) * spread + TILE_ABS
    }

    /// Largest |Δ| of the production entry point from the FMA kernels when it takes the tiles
    /// (the Hy3-shapes test): at most `u / (1 − u) · 2` (values in [-1, 1]) plus the FMA
    /// kernels' own error.
    const TILE_TOL: f64 = 8e-3;

    /// The tile path against f64 dense attention on bf16-rounded queries (and keys and
    /// values: an f32 cache is rounded as it is packed): GQA 1…16, head_dim 32/64/128, block
    /// sizes 1, 5, 16, contexts to 2500 with prefill chunks of 1…70 rows (every sequence on
    /// the tiles, and only those of at least `MIN_ROWS` rows, the rest on the FMA kernel in
    /// the same call), scrambled block tables and uncovered rows.
    fn tile_sweep<T: KvElem>(seed: u64) {
        if !tiles::usable(32) {
            eprintln!("skipped: this CPU or kernel has no AMX");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let split = Split {
            min_tasks: MIN_TASKS,
            min_partition: MIN_PARTITION,
        };
        let mut worst = 0f64;
        for case in 0..18 {
            let group = [1, 2, 4, 8, 16, 8][case % 6];
            let kv_heads = rng.random_range(1..=2);
            let head_dim = [32, 64, 128][case % 3];
            let block_size = [1, 5, 16][case / 3 % 3];
            let long = case % 5 == 0;
            let ctxs = random_spans(&mut rng, long, 1500..=2500, 1..=300, |rng, ctx| {
                rng.random_range(1..=ctx.min(70))
            });
            let logit_scale = [1.0, 4.0, 12.0][case / 2 % 3];
            let mut c = Case::<T>::new(
                &mut rng,
                group,
                kv_heads,
                head_dim,
                block_size,
                &ctxs,
                logit_scale,
            );
            // The tiles read the queries, keys and values rounded to bf16; so does the
            // reference.
            for x in &mut c.q {
                *x = bf16::from_f32(*x).to_f32();
            }
            for x in c.dense_k.iter_mut().chain(&mut c.dense_v).flatten() {
                *x = bf16::from_f32(*x as f32).to_f64();
            }
            let (want, spread) = c.dense_with_spread();
            for min_rows in [1, tiles::MIN_ROWS] {
                let mut out = vec![f32::NAN; c.q.len()];
                #[rustfmt::skip]
                attend(&c.q, &c.kc, &c.vc, &c.layout, &c.seqs(), c.heads, c.scale, &mut out,
                       Kernel::detect(), split, Some(min_rows))
                .unwrap();
                for (i, ((&got, &want), &spread)) in out.iter().zip(&want).zip(&spread).enumerate()
                {
                    let d = (got as f64 - want).abs();
                    let bound = tile_bound(spread);
                    worst = worst.max(d / bound);
                    assert!(
                        d <= bound,
                        "case {case} (tiles from {min_rows} rows, group {group}, kv {kv_heads}, \
                         hd {head_dim}, bs {block_size}, ctxs {ctxs:?}), output {i}: {got} vs \
                         {want}, |Δ| {d:e} over the bound {bound:e}"
                    );
                }
            }
        }
        eprintln!("tiles: worst |Δ| / bound {worst:.3}");
    }

    #[test]
    fn tiles_match_dense_f64_bf16_kv() {
        tile_sweep::<bf16>(23);
    }

    #[test]
    fn tiles_match_dense_f64_f32_kv() {
        tile_sweep::<f32>(24);
    }

    #[test]
    fn tiles_match_dense_f64_fp8_kv() {
        tile_sweep::<F8E4M3>(25);
    }

    /// Reference: dense causal attention per sequence from contiguous K/V in f64.
    #[test]
    fn matches_dense_attention_through_scrambled_block_tables() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let layout = KvLayout {
            num_blocks: 32,
            block_size: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let heads = 4;
        let te = layout.token_elems();
        // Two sequences: 10 tokens (prefill chunk of 3 at the end) and 5 tokens (decode of 1).
        let lens = [10usize, 5];
        let q_lens = [3usize, 1];
        let tables: Vec<Vec<u32>> = vec![vec![7, 2, 30], vec![5, 19]];
        let mut kc = vec![0f32; layout.layer_elems()];
        let mut vc = vec![0f32; layout.layer_elems()];
        let mut dense_k = Vec::new();
        let mut dense_v = Vec::new();
        for (s, &n) in lens.iter().enumerate() {
            let k: Vec<f32> = (0..n * te).map(|_| rng.random_range(-1.0..1.0)).collect();
            let v: Vec<f32> = (0..n * te).map(|_| rng.random_range(-1.0..1.0)).collect();
            let slots: Vec<usize> = (0..n)
                .map(|p| tables[s][p / 4] as usize * 4 + p % 4)
                .collect();
            reshape_and_cache(&k, &v, &slots, &mut kc, &mut vc, &layout).unwrap();
            dense_k.push(k);
            dense_v.push(v);
        }
        let t = q_lens.iter().sum::<usize>();
        let q: Vec<f32> = (0..t * heads * 8)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let seqs = vec![
            SeqAttn {
                q_start: 0,
                q_len: 3,
                ctx_len: 10,
                block_table: &tables[0],
            },
            SeqAttn {
                q_start: 3,
                q_len: 1,
                ctx_len: 5,
                block_table: &tables[1],
            },
        ];
        let mut out = vec![f32::NAN; q.len()];
        let scale = 0.35;
        paged_attention(&q, &kc, &vc, &layout, &seqs, heads, scale, &mut out).unwrap();
        for (si, s) in seqs.iter().enumerate() {
            for i in 0..s.q_len {
                let row = s.q_start + i;
                let pos = s.ctx_len - s.q_len + i;
                for h in 0..heads {
                    let kh = h / 2;
                    let qv = &q[(row * heads + h) * 8..][..8];
                    let logits: Vec<f64> = (0..=pos)
                        .map(|p| {
                            (0..8)
                                .map(|d| qv[d] as f64 * dense_k[si][p * te + kh * 8 + d] as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = logits.iter().map(|x| (x - mx).exp()).sum();
                    for d in 0..8 {
                        let want: f64 = (0..=pos)
                            .map(|p| {
                                (logits[p] - mx).exp() / z * dense_v[si][p * te + kh * 8 + d] as f64
                            })
                            .sum();
                        let got = out[(row * heads + h) * 8 + d] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "seq {si} row {row} head {h}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_tables_are_errors() {
        let layout = KvLayout {
            num_blocks: 2,
            block_size: 4,
            kv_heads: 1,
            head_dim: 2,
        };
        let kc = vec![0f32; layout.layer_elems()];
        let q = vec![0f32; 2];
        let mut out = vec![0f32; 2];
        let bad = [SeqAttn {
            q_start: 0,
            q_len: 1,
            ctx_len: 1,
            block_table: &[9],
        }];
        assert!(paged_attention(&q, &kc, &kc, &layout, &bad, 1, 1.0, &mut out).is_err());
        let short = [SeqAttn {
            q_start: 0,
            q_len: 1,
            ctx_len: 5,
            block_table: &[0],
        }];
        assert!(paged_attention(&q, &kc, &kc, &layout, &short, 1, 1.0, &mut out).is_err());
        let (mut k2, mut v2) = (kc.clone(), kc.clone());
        assert!(reshape_and_cache(&[0.0; 2], &[0.0; 2], &[8], &mut k2, &mut v2, &layout).is_err());
    }
}
