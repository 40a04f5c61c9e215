//! Prefill attention on AMX tiles: the query rows of a prefill chunk against their sequence's
//! paged keys and values, as two tile products per chunk of context (the loop of
//! FlashAttention-2, with [`crate::cpu_amx`]'s `tdpbf16ps` kernel doing the products).
//!
//! The FMA kernel of [`crate::paged`] spends `2 · head_dim` lane multiply-adds per score and
//! query head; at prefill every key and value row is used by all query rows of the chunk, so
//! that is compute, not memory: 35% of a 2048-token prefill of the `small` preset on the dev
//! VM (perf, 2026-11-29). Here:
//!
//! - first each chosen sequence's context is packed once per KV head and chunk of [`CHUNK`]
//!   tokens into the B-operand layout of the two products (keys with a token per lane, values
//!   with a dim per lane and consecutive tokens paired), shared by every task that reads it
//!   (a 2048-token prompt has 128 row blocks per head, each reading the context before it);
//!   an f32 cache is rounded to bf16 here;
//! - then one task is one KV head and up to [`ROW_BLOCK`] consecutive query rows of one
//!   sequence (`rows · group` queries, e.g. 128 at Hy3's group of 8). Its queries, rounded to
//!   bf16 once, are the A operand of `S = Q · Kᵀ` per chunk; the online softmax per query runs
//!   in f32 (AVX-512), causally masked, and rounds the weights to bf16 into row-major
//!   `[queries, chunk]`, the A operand of `O = P · V`; the chunk's output is added to the
//!   running output rescaled to the new maximum.
//!
//! Numerics: queries and softmax weights (and an f32 cache's keys and values) are rounded to
//! bf16, as GPU flash attention does; every product is exact in f32 and the tiles accumulate
//! in f32. The normaliser is the sum of the rounded weights, so each output is a convex
//! combination of value rows. The tests bound the difference from f64 attention on the same
//! bf16 queries.

// Elsewhere `usable` is false and only the planning half is compiled in.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports))]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::bf16;
use rayon::prelude::*;

use super::{exp_nonpositive, KvElem, SeqAttn, SyncPtr};
use crate::cpu_amx::{self, Packed, TILE_K, TILE_ROWS};

/// Query rows per task: 16 rows at a group of 8 query heads per KV head (Hy3, the `small`
/// preset) are 128 queries, eight A tiles, so each key and value tile loaded is used eight
/// times; more rows would mean fewer tasks than the cores can share on short prompts.
const ROW_BLOCK: usize = 16;

/// Fewest query rows of a sequence for the tile path; sequences with fewer (decode steps,
/// speculative verification) take the FMA kernel, where each cache row is streamed once for
/// all their queries. The same count as the weight tiles' threshold (`cpu_amx`), not tuned
/// on its own: at 8 rows and a group of 8, every key tile already feeds four query tiles.
pub(super) const MIN_ROWS: usize = 8;

/// Context tokens per step: the scores (`queries × CHUNK` f32, 32 KiB at 128 queries) and the
/// weights (16 KiB) stay in L1/L2 between the products and the softmax; a multiple of
/// [`TILE_K`], the depth of one tile step of `P · V`.
const CHUNK: usize = 64;
const _: () = assert!(CHUNK.is_multiple_of(TILE_K));

/// Whether the tile path can run for this head width on this machine (AMX, and the
/// AVX-512 BF16 conversions every AMX CPU has, used by the softmax).
pub(super) fn usable(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        head_dim.is_multiple_of(TILE_K)
            && cpu_amx::enabled()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = head_dim;
        false
    }
}

/// Rows `row0..row0 + rows` of sequence `seq` (positions from `pos0`) for KV head `kv_head`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Task {
    seq: usize,
    kv_head: usize,
    row0: usize,
    rows: usize,
    pos0: usize,
}

/// Cuts the chosen sequences into tasks: each sequence's rows into near-equal blocks of at
/// most [`ROW_BLOCK`], times every KV head. Blocks are listed last rows first (they see the
/// longest context), so the parallel loop starts the longest tasks first.
pub(super) fn plan(seqs: &[SeqAttn<'_>], chosen: &[bool], kv_heads: usize) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (seq, s) in seqs.iter().enumerate() {
        if !chosen[seq] {
            continue;
        }
        let blocks = s.q_len.div_ceil(ROW_BLOCK);
        let pos_start = s.ctx_len - s.q_len;
        for b in (0..blocks).rev() {
            let (r0, r1) = (b * s.q_len / blocks, (b + 1) * s.q_len / blocks);
            for kv_head in 0..kv_heads {
                tasks.push(Task {
                    seq,
                    kv_head,
                    row0: s.q_start + r0,
                    rows: r1 - r0,
                    pos0: pos_start + r0,
                });
            }
        }
    }
    tasks
}

/// What every task reads.
pub(super) struct Cx<'a, T> {
    pub(super) q: &'a [f32],
    pub(super) k: &'a [T],
    pub(super) v: &'a [T],
    pub(super) seqs: &'a [SeqAttn<'a>],
    pub(super) heads: usize,
    pub(super) group: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) block_size: usize,
    pub(super) token_elems: usize,
    pub(super) scale: f32,
}

/// One chunk of one sequence's context for one KV head, packed as the B operands.
struct Chunk {
    /// Tokens in the chunk (the last chunk of a context may be short).
    tokens: usize,
    /// Keys: a token per lane, its dims in pairs (`tokens` × `head_dim`).
    keys: Packed,
    /// Values: a dim per lane, consecutive tokens in pairs (`head_dim` × `tokens` rounded up
    /// to [`TILE_K`], the padding zero).
    values: Packed,
}

/// Packs chunk `c0..c0 + n` of sequence `seq`'s context for KV head `kv_head`.
fn pack_chunk<T: KvElem>(cx: &Cx<'_, T>, seq: usize, kv_head: usize, c0: usize, n: usize) -> Chunk {
    let hd = cx.head_dim;
    let table = cx.seqs[seq].block_table;
    let (bs, te) = (cx.block_size, cx.token_elems);
    // Element offset of position `p`'s K/V row for this head.
    let row_at = |p: usize| (table[p / bs] as usize * bs + p % bs) * te + kv_head * hd;
    let pair = |lo: T, hi: T| u32::from(lo.bf16_bits()) | (u32::from(hi.bf16_bits()) << 16);
    let mut keys = Packed::empty();
    let pairs = keys.reset(n, hd);
    for k in 0..n {
        let src = &cx.k[row_at(c0 + k)..][..hd];
        let lane = k % TILE_ROWS;
        let group = &mut pairs[k / TILE_ROWS * hd / 2 * TILE_ROWS..][..hd / 2 * TILE_ROWS];
        for (dst, two) in group.chunks_exact_mut(TILE_ROWS).zip(src.chunks_exact(2)) {
            dst[lane] = pair(two[0], two[1]);
        }
    }
    let cp = n.div_ceil(TILE_K) * TILE_K;
    let mut values = Packed::empty();
    let pairs = values.reset(hd, cp);
    for tp in 0..n.div_ceil(2) {
        let even = &cx.v[row_at(c0 + 2 * tp)..][..hd];
        let odd = (2 * tp + 1 < n).then(|| &cx.v[row_at(c0 + 2 * tp + 1)..][..hd]);
        // Dims `16g..16g + 16` are group `g`, whose tile row `tp` holds this token pair.
        for (g, dims) in pairs.chunks_exact_mut(cp / 2 * TILE_ROWS).enumerate() {
            let dst = &mut dims[tp * TILE_ROWS..][..TILE_ROWS];
            for (l, d) in dst.iter_mut().enumerate() {
                let at = g * TILE_ROWS + l;
                *d = pair(even[at], odd.map_or(T::default(), |o| o[at]));
            }
        }
    }
    Chunk {
        tokens: n,
        keys,
        values,
    }
}

/// Runs `tasks` in parallel, each writing its rows' query heads of `out`
/// (`[T, heads, head_dim]`).
///
/// # Safety
/// The tasks come from [`plan`] over sequences [`SeqAttn::check`] accepted for `cx`'s layout,
/// no two chosen sequences share a row and no other writer touches their rows; `out` holds
/// the call's `[T, heads, head_dim]` output and outlives the call; [`usable`] holds.
pub(super) unsafe fn run<T: KvElem>(cx: &Cx<'_, T>, tasks: &[Task], out: SyncPtr) {
    // Every chosen sequence's whole context, per KV head and chunk; `first[seq]` is the
    // index of its (head 0, chunk 0).
    let mut first = vec![usize::MAX; cx.seqs.len()];
    let mut jobs = Vec::new();
    for t in tasks {
        if first[t.seq] != usize::MAX {
            continue;
        }
        first[t.seq] = jobs.len();
        let ctx = cx.seqs[t.seq].ctx_len;
        for kv_head in 0..cx.kv_heads {
            for c0 in (0..ctx).step_by(CHUNK) {
                jobs.push((t.seq, kv_head, c0, CHUNK.min(ctx - c0)));
            }
        }
    }
    let chunks: Vec<Chunk> = jobs
        .par_iter()
        .map(|&(seq, kv_head, c0, n)| pack_chunk(cx, seq, kv_head, c0, n))
        .collect();
    tasks.par_iter().for_each_init(Scratch::default, |s, t| {
        let per_head = cx.seqs[t.seq].ctx_len.div_ceil(CHUNK);
        let mine = &chunks[first[t.seq] + t.kv_head * per_head..][..per_head];
        // SAFETY: as the caller promises; tasks of one call cover disjoint (row, head) pairs.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            task(cx, t, mine, s, out)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (mine, s, out);
            unreachable!("the tiles run only on x86_64 (`usable` is false elsewhere)")
        }
    });
}

/// A worker's buffers, reused across its tasks.
#[derive(Default)]
struct Scratch {
    /// Queries rounded to bf16, `[queries (padded to 16), head_dim]`.
    q: Vec<bf16>,
    /// Scores of a chunk, `[queries (padded), tokens (padded to 16)]`.
    s: Vec<f32>,
    /// Weights of a chunk rounded to bf16, `[queries (padded), tokens (padded to 32)]`.
    p: Vec<bf16>,
    /// The chunk's `P · V`, `[queries (padded), head_dim]`.
    o: Vec<f32>,
    /// Running unnormalised outputs, maxima (of scaled scores), sums, and each query's
    /// rescale factor for the current chunk.
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    c: Vec<f32>,
}

/// One task over its sequence's packed chunks for its KV head.
///
/// # Safety
/// As [`run`]; the CPU has AVX-512F and AVX-512 BF16 ([`usable`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn task<T: KvElem>(
    cx: &Cx<'_, T>,
    t: &Task,
    chunks: &[Chunk],
    s: &mut Scratch,
    out: SyncPtr,
) {
    let (hd, g) = (cx.head_dim, cx.group);
    let nq = t.rows * g;
    let nqp = nq.div_ceil(TILE_ROWS) * TILE_ROWS;
    let head0 = t.kv_head * g;
    // Query j is head `head0 + j % g` of row `row0 + j / g`.
    let q_row = |j: usize| (t.row0 + j / g) * cx.heads + head0 + j % g;

    s.q.clear();
    s.q.resize(nqp * hd, bf16::ZERO);
    for j in 0..nq {
        round_row(&cx.q[q_row(j) * hd..][..hd], &mut s.q[j * hd..][..hd]);
    }
    for (v, x) in [(&mut s.acc, 0.0), (&mut s.o, 0.0)] {
        v.clear();
        v.resize(nqp * hd, x);
    }
    for (v, x) in [
        (&mut s.m, f32::NEG_INFINITY),
        (&mut s.l, 0.0),
        (&mut s.c, 1.0),
    ] {
        v.clear();
        v.resize(nq, x);
    }

    let end = t.pos0 + t.rows;
    for (ci, chunk) in chunks.iter().enumerate() {
        let c0 = ci * CHUNK;
        if c0 >= end {
            break;
        }
        let n = chunk.tokens;
        let sp = chunk.keys.padded();
        // Every score is written by the product (no need to clear).
        if s.s.len() < nqp * sp {
            s.s.resize(nqp * sp, 0.0);
        }
        cpu_amx::tile_block(&s.q, hd, 0, &chunk.keys, &mut s.s[..nqp * sp]);

        // Online softmax. Each query's weights past the tokens it sees are zero; the rows of
        // padding queries (past `nq`) only feed padding outputs, so they are left as they are.
        let cp = n.div_ceil(TILE_K) * TILE_K;
        if s.p.len() < nqp * cp {
            s.p.resize(nqp * cp, bf16::ZERO);
        }
        for j in 0..nq {
            // Last position query j sees.
            let lim = t.pos0 + j / g;
            let valid = if lim < c0 { 0 } else { (lim - c0 + 1).min(n) };
            let p = &mut s.p[j * cp..][..cp];
            p[valid.next_multiple_of(16)..].fill(bf16::ZERO);
            if valid == 0 {
                s.c[j] = 1.0;
                continue;
            }
            let (m, c, sum) = softmax_row(&s.s[j * sp..][..sp], valid, cx.scale, s.m[j], p);
            s.m[j] = m;
            s.l[j] = s.l[j] * c + sum;
            s.c[j] = c;
        }

        cpu_amx::tile_block(&s.p[..nqp * cp], cp, 0, &chunk.values, &mut s.o);
        for j in 0..nq {
            let c = s.c[j];
            for (a, &o) in s.acc[j * hd..][..hd].iter_mut().zip(&s.o[j * hd..][..hd]) {
                *a = *a * c + o;
            }
        }
    }

    for j in 0..nq {
        // SAFETY: row `q_row(j)` of `out` is this task's (a chosen sequence's row, this KV
        // head's query head), inside `[T, heads, head_dim]`.
        let dst = std::slice::from_raw_parts_mut(out.get().add(q_row(j) * hd), hd);
        // The token with the largest score adds `e^0 = 1`, so `l >= 1`.
        let inv = 1.0 / s.l[j];
        for (o, &a) in dst.iter_mut().zip(&s.acc[j * hd..][..hd]) {
            *o = a * inv;
        }
    }
}

/// `src` rounded to bf16 (to nearest even) into `dst`; `src.len()` a multiple of 32.
///
/// # Safety
/// AVX-512F and AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_row(src: &[f32], dst: &mut [bf16]) {
    debug_assert!(src.len().is_multiple_of(32) && dst.len() == src.len());
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr() as *mut __m512i);
    for i in (0..src.len()).step_by(32) {
        let b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(sp.add(i + 16)), _mm512_loadu_ps(sp.add(i)));
        _mm512_storeu_si512(dp.add(i / 32), std::mem::transmute::<__m512bh, __m512i>(b));
    }
}

/// One query's chunk of the online softmax: from its raw scores `row` (a multiple of 16
/// long, the first `valid` seen), the scale and its running maximum `m_old` (of scaled
/// scores), writes the weights `e^(scale·x − m)` rounded to bf16 into `p` (zero past
/// `valid`) and returns the new maximum `m`, the rescale factor `e^(m_old − m)` for what was
/// accumulated before, and the sum of the rounded weights.
///
/// # Safety
/// AVX-512F and AVX-512 BF16; `row.len()` a multiple of 16, `0 < valid <= row.len() <=
/// p.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn softmax_row(
    row: &[f32],
    valid: usize,
    scale: f32,
    m_old: f32,
    p: &mut [bf16],
) -> (f32, f32, f32) {
    debug_assert!(row.len().is_multiple_of(16) && valid > 0 && valid <= row.len());
    let mask = |i: usize| -> __mmask16 {
        let left = valid.saturating_sub(i).min(16);
        ((1u32 << left) - 1) as __mmask16
    };
    let rp = row.as_ptr();
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < valid {
        mx = _mm512_mask_max_ps(mx, mask(i), mx, _mm512_loadu_ps(rp.add(i)));
        i += 16;
    }
    let m = (_mm512_reduce_max_ps(mx) * scale).max(m_old);
    // exp(−∞) = 0 on the first chunk, when the running sums are still zero.
    let c = exp_nonpositive(m_old - m);
    let (vs, vm) = (_mm512_set1_ps(scale), _mm512_set1_ps(m));
    let mut sum = _mm512_setzero_ps();
    let pp = p.as_mut_ptr() as *mut __m256i;
    let mut i = 0;
    while i < valid {
        let x = _mm512_fmsub_ps(_mm512_loadu_ps(rp.add(i)), vs, vm);
        let w = _mm512_maskz_mov_ps(mask(i), exp_nonpositive_x16(x));
        let b = _mm512_cvtneps_pbh(w);
        _mm256_storeu_si256(pp.add(i / 16), std::mem::transmute::<__m256bh, __m256i>(b));
        sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(b));
        i += 16;
    }
    (m, c, _mm512_reduce_add_ps(sum))
}

/// [`exp_nonpositive`] on 16 lanes (the compiler vectorises its branch-free steps).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp_nonpositive_x16(x: __m512) -> __m512 {
    let mut lanes = std::mem::transmute::<__m512, [f32; 16]>(x);
    for v in &mut lanes {
        *v = exp_nonpositive(*v);
    }
    std::mem::transmute::<[f32; 16], __m512>(lanes)
}
