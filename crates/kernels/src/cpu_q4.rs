//! 4-bit weight quantization (Q4) for the CPU kernels: llama.cpp's Q4_1 scheme — per block of
//! [`Q4_BLOCK`] consecutive inputs of a row, an f16 step `d` and an f16 minimum `m`, and each
//! weight stored as `q ∈ 0..=15` with `w ≈ q · d + m` — laid out for the AVX-512 kernel.
//!
//! Why: decode streams every active weight once per token, so its speed is bytes per weight.
//! Q4 is 4 + 32/32 = 5 bits per weight, 0.59× Q8's 8.5 ([`crate::cpu_q8`]) and 0.31× bf16's.
//! The asymmetric grid (a minimum besides the step) follows Q4_1 rather than the symmetric
//! Q4_0: on the normally distributed weights of a projection it halves the error of a grid
//! centred on zero for one more f16 per block, and it is the grid the demo model's GGUF
//! source (SmolLM2 Q4_1) was quantized to.
//!
//! Layout. Rows start on 64-byte lines; a row's 4-bit values come in groups of 64 weights
//! (two blocks) in 32 bytes, byte `k` holding weight `k` in its low nibble and weight `k + 32`
//! in its high one, so one zero-extension of the 32 bytes to 16-bit lanes gives the first
//! block's values in order (`& 0xF`) and the second's (`>> 4`). Steps and minimums are separate
//! `[rows, cols / 32]` f16 arrays (converted 16 at a time with `vcvtph2ps`).
//!
//! Products. The activations are [`crate::cpu_q8`]'s: per token rounded to 16-bit fixed point
//! with one f32 scale `xs` per 64 inputs, plus (for the minimum) each block's sum of the
//! rounded activations `S_b`. Then `y = Σ_b d_b · xs · Σ_{i∈b} q_i x̂_i + Σ_b m_b · S_b`, the
//! first sum exact integer arithmetic per block (`vpmaddwd`: 15 · 32767 · 2 < 2²⁴, so a lane
//! converts to f32 exactly), the second a short f32 dot product over the blocks. Per 64
//! weights and token: two multiply-adds, two conversions, three f32 ops — 7, as Q8 — plus three
//! shared by every token (widen, mask, shift) for half of Q8's weight bytes.
//!
//! Error: `|w − (q · d + m)| ≤ d / 2` for every weight ([`Q4Matrix::quantize`] rounds the
//! minimum down and the step up to f16 so that the whole block lies on the grid's span), with
//! `d ≈ (max − min) / 15` of the block: about 17× Q8's step, so a product's relative error is
//! ~0.09 RMS on normally distributed weights (Q8: 5.5e-3). Activations add Q8's
//! `max_64|x| / 65534` per value. On the AMX tiles (8+ rows) the weights `q · d + m` and the
//! activations are each rounded to bf16 as for Q8.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu_amx;
#[cfg(target_arch = "x86_64")]
use crate::cpu_gemv::{by_tokens, PREFETCH_HINT};
use crate::cpu_gemv::{check_gemv, gemv_rows, Packing, Tiles, WeightRows, TOKEN_BLOCK};
use crate::cpu_q8::{
    check_shape, lines_bytes_mut, round_small_ties_even, Line, Q8Source, LINE, Q8_PREFETCH_AHEAD,
};
use crate::KernelError;

/// Inputs per step and minimum: Q4_1's 32. One f16 pair per 32 weights is 1 bit per weight;
/// blocks of 64 would save half of that but widen each block's range, and with it the step,
/// on real weights (one outlier stretches twice as many weights' grid).
pub const Q4_BLOCK: usize = 32;

/// Weights per packed group (32 bytes): two blocks, and one activation scale block of
/// [`Q8_BLOCK`]. Rows are a whole number of groups.
const GROUP: usize = 64;

/// Largest quantized value (4 bits).
const Q_MAX: f64 = 15.0;

/// Blocks whose steps and minimums a kernel converts to f32 at a time (1024 weights): the two
/// 32-entry arrays stay in L1 next to the 512 bytes of weights they scale.
const SEG_BLOCKS: usize = 32;

/// A `[rows, cols]` weight matrix in Q4: 4-bit values (module docs' layout), rows back to back
/// in one 64-byte-aligned allocation, and f16 steps and minimums `[rows, cols / 32]`. Memory
/// is `rows · cols · 5 / 8` bytes (plus the allocation's last line). Rows are not padded to
/// cache lines (Q8's are): a row is `cols / 2` bytes, so a width of 576 (the demo model's
/// hidden size) would pad 288 bytes to 320 and read 11% more per token; 64-byte loads that
/// straddle two lines cost the kernel less than those bytes.
#[derive(Clone)]
pub struct Q4Matrix {
    rows: usize,
    cols: usize,
    /// Bytes from one row's start to the next (`cols / 2`).
    stride: usize,
    data: Vec<Line>,
    steps: Vec<f16>,
    mins: Vec<f16>,
}

impl std::fmt::Debug for Q4Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q4Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

impl Q4Matrix {
    /// Quantizes a row-major `[rows, cols]` matrix with [`Q4_BLOCK`] inputs per step. Errors
    /// name the problem: an empty shape, `cols` not a multiple of 64, a length that is not
    /// `rows · cols`, a non-finite weight or one beyond f16's range (its row and column).
    pub fn quantize<T: Q8Source>(w: &[T], rows: usize, cols: usize) -> Result<Self, KernelError> {
        let bad = |m: String| KernelError::InvalidArgument(format!("Q4 quantize: {m}"));
        check_shape(w.len(), rows, cols, GROUP).map_err(bad)?;
        let stride = cols / 2;
        let nb = cols / Q4_BLOCK;
        let mut data = vec![Line([0; LINE]); (rows * stride).div_ceil(LINE)];
        let mut steps = vec![f16::ZERO; rows * nb];
        let mut mins = vec![f16::ZERO; rows * nb];
        let bytes = lines_bytes_mut(&mut data);
        // SAFETY: i8 and u8 have the same size and alignment.
        let bytes = unsafe { &mut *(bytes as *mut [i8] as *mut [u8]) };
        bytes[..rows * stride]
            .par_chunks_mut(stride)
            .zip(steps.par_chunks_mut(nb))
            .zip(mins.par_chunks_mut(nb))
            .enumerate()
            .try_for_each(|(r, ((q, d), m))| {
                quantize_row(&w[r * cols..(r + 1) * cols], q, d, m).map_err(|(c, why)| (r, c, why))
            })
            .map_err(|(r, c, why)| bad(format!("weight [{r}, {c}] {why}")))?;
        Ok(Self {
            rows,
            cols,
            stride,
            data,
            steps,
            mins,
        })
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Inputs per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes this matrix holds (4-bit lines, steps and minimums).
    pub fn memory_bytes(&self) -> usize {
        self.data.len() * LINE + (self.steps.len() + self.mins.len()) * 2
    }

    /// Bytes a `[rows, cols]` matrix holds once quantized (`cols` a multiple of 64): half a
    /// byte per weight, rows back to back in whole 64-byte lines, and an f16 step and minimum
    /// per [`Q4_BLOCK`].
    pub fn memory_bytes_for(rows: usize, cols: usize) -> usize {
        (rows * cols / 2).div_ceil(LINE) * LINE + rows * (cols / Q4_BLOCK) * 4
    }

    /// Row `r`'s packed 4-bit values (`cols / 2` bytes).
    fn row_bytes(&self, r: usize) -> &[u8] {
        // SAFETY: `Line` is `repr(C)` over `[i8; LINE]`, so the vector is `data.len() * LINE`
        // initialised bytes; u8 and i8 share size and alignment.
        let all = unsafe {
            std::slice::from_raw_parts(self.data.as_ptr() as *const u8, self.data.len() * LINE)
        };
        &all[r * self.stride..r * self.stride + self.cols / 2]
    }

    /// Row `r`'s steps and minimums, one each per block.
    fn row_scales(&self, r: usize) -> (&[f16], &[f16]) {
        let nb = self.cols / Q4_BLOCK;
        (
            &self.steps[r * nb..(r + 1) * nb],
            &self.mins[r * nb..(r + 1) * nb],
        )
    }

    /// Weight `[r, c]`'s 4-bit value, step and minimum.
    pub fn code(&self, r: usize, c: usize) -> (u8, f16, f16) {
        let (d, m) = self.row_scales(r);
        (
            nibble(self.row_bytes(r), c),
            d[c / Q4_BLOCK],
            m[c / Q4_BLOCK],
        )
    }

    /// The weights the kernels multiply, `q · d + m` (exact in f64), `[rows, cols]` row-major.
    pub fn dequantize_f64(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            out.extend((0..self.cols).map(|c| {
                let (q, d, m) = self.code(r, c);
                q as f64 * d.to_f64() + m.to_f64()
            }));
        }
        out
    }
}

/// Value `i` of a row's packed 4-bit values.
#[inline]
fn nibble(row: &[u8], i: usize) -> u8 {
    let (g, k) = (i / GROUP, i % GROUP);
    let b = row[g * (GROUP / 2) + k % (GROUP / 2)];
    if k < GROUP / 2 {
        b & 0xF
    } else {
        b >> 4
    }
}

/// Quantizes one row into `q` (`cols / 2` bytes at least), `d` and `m` (one per block); on a
/// weight it cannot take returns its column and why. The minimum is rounded down and the step
/// up to f16 (in f64 arithmetic) so that `[m, m + 15·d]` covers the block and every weight is
/// within `d / 2` of its grid value.
fn quantize_row<T: Q8Source>(
    w: &[T],
    q: &mut [u8],
    d: &mut [f16],
    m: &mut [f16],
) -> Result<(), (usize, &'static str)> {
    q.fill(0);
    for (b, wb) in w.chunks_exact(Q4_BLOCK).enumerate() {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for (j, &v) in wb.iter().enumerate() {
            let v = v.to_f32() as f64;
            if !v.is_finite() {
                return Err((b * Q4_BLOCK + j, "is not finite"));
            }
            if v.abs() > f16::MAX.to_f64() {
                return Err((b * Q4_BLOCK + j, "is beyond f16's range (65504)"));
            }
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let mut mb = f16::from_f64(lo);
        if mb.to_f64() > lo {
            mb = next_down(mb);
        }
        let mut db = f16::from_f64((hi - mb.to_f64()) / Q_MAX);
        while db.to_f64() * Q_MAX + mb.to_f64() < hi {
            db = f16::from_bits(db.to_bits() + 1);
        }
        (d[b], m[b]) = (db, mb);
        // Codes as `floor(x + 0.5)` of `x = (w − m) / d ≥ 0` (`m` is at most the block's
        // least value), by a multiply with `1 / d`: a division and `round` per weight were
        // most of a q4 load (2026-11-29, demo model: ~50% of the 4.4 s). Where `x` is within
        // an ulp of a half the code may be the other neighbour, whose error is `d / 2` up to
        // that ulp as well.
        let (dv, mv) = (db.to_f64(), mb.to_f64());
        let inv = if dv > 0.0 { 1.0 / dv } else { 0.0 };
        for (j, &v) in wb.iter().enumerate() {
            let x = (v.to_f32() as f64 - mv) * inv;
            let code = ((x + 0.5) as u32).min(Q_MAX as u32) as u8;
            let i = b * Q4_BLOCK + j;
            let (g, k) = (i / GROUP, i % GROUP);
            let byte = &mut q[g * (GROUP / 2) + k % (GROUP / 2)];
            *byte |= if k < GROUP / 2 { code } else { code << 4 };
        }
    }
    Ok(())
}

/// The next f16 towards −∞ (for a finite value).
fn next_down(x: f16) -> f16 {
    let b = x.to_bits();
    if x.to_f64() > 0.0 {
        f16::from_bits(b - 1)
    } else if x.to_f64() == 0.0 {
        f16::from_bits(0x8001)
    } else {
        f16::from_bits(b + 1)
    }
}

impl WeightRows for Q4Matrix {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn packing() -> Packing {
        Packing::Rows(pack_activations_q4)
    }
    #[inline]
    fn dot(&self, r: usize, x: &[f32], n: usize, out: &mut [f32]) {
        let (d, m) = self.row_scales(r);
        q4_kernel().run(self.row_bytes(r), d, m, x, n, out)
    }
    /// As Q8 ([`crate::cpu_q8`]): on the tiles with the activations rounded to bf16 and each
    /// weight `q · d + m` rounded to bf16; [`crate::cpu_q8::set_tiles`] switches both.
    fn tiles(&self) -> Tiles {
        crate::cpu_q8::quantized_tiles(self.rows, self.cols)
    }
    /// As Q8: on CPUs with AVX512-BF16 but no AMX, the rows dequantized to bf16 as the tiles'
    /// stage holds them, on the `vdpbf16ps` kernel with the activations rounded to bf16.
    fn bf16_dot(&self) -> Tiles {
        crate::cpu_q8::quantized_bf16_dot()
    }
    fn dot_pairs_rows(&self, r0: usize, x: &crate::cpu_bf16dot::Pairs, out: &mut [f32]) {
        crate::cpu_q8::dot_pairs_rows_dequantized(self.cols, r0, x, out, |r, row| {
            self.dequant_row(r, row)
        })
    }
    /// Dequantizes the block's rows into this thread's staging buffer in tile order, then
    /// multiplies it there (as [`crate::cpu_q8::Q8Matrix`]'s `tile_block`).
    fn tile_block(&self, r0: usize, x: &cpu_amx::Packed, out: &mut [f32]) {
        cpu_amx::tile_block_via_stage(self.rows, r0, x, out, |r0, rows, st| {
            self.stage(r0, rows, st)
        })
    }
}

impl Q4Matrix {
    /// Rows `r0..r0 + rows` (a multiple of 16) dequantized to bf16 (`q · d + m` fused in f32,
    /// rounded to nearest even) into `st` in tile order.
    fn stage(&self, r0: usize, rows: usize, st: &mut cpu_amx::Staged) {
        st.reset(rows, self.cols);
        for r in 0..rows {
            self.dequant_row(r0 + r, &mut cpu_amx::StagedRow(st, r));
        }
    }

    /// Row `r` dequantized to bf16 (`q · d + m` fused in f32, rounded to nearest even), block
    /// by block of [`Q4_BLOCK`] into `out`: the AMX tiles' stage and the `vdpbf16ps` path's.
    /// One AVX-512 loop over the row where the CPU has it (called block by block through a
    /// function pointer, with scalar f16 conversions of each step and minimum, the calls cost
    /// more than the arithmetic: 18% of a batch-64 q4 decode's samples), else [`dequant_block`]
    /// per block.
    fn dequant_row(&self, r: usize, out: &mut (impl cpu_amx::BlockSink + ?Sized)) {
        let (q, (d, m)) = (self.row_bytes(r), self.row_scales(r));
        #[cfg(target_arch = "x86_64")]
        if dequant_row_avx512_available() {
            assert!(q.len() * 2 == self.cols && d.len() == m.len());
            assert!(d.len() * Q4_BLOCK == self.cols && self.cols.is_multiple_of(GROUP));
            // SAFETY: detected above; `q` holds `cols / 2` bytes and `d`, `m` `cols / 32`
            // values, an even number (checked).
            unsafe { dequant_row_avx512(q, d, m, out) };
            return;
        }
        for (g, bytes) in q.chunks_exact(GROUP / 2).enumerate() {
            let bytes: &[u8; GROUP / 2] = bytes.try_into().expect("a group is 32 bytes");
            for half in 0..2 {
                let b = 2 * g + half;
                dequant_block(bytes, half == 1, d[b].to_f32(), m[b].to_f32(), out.block(b));
            }
        }
    }
}

/// Whether [`dequant_row_avx512`] runs here (AVX-512 BF16 wherever AMX is).
#[cfg(target_arch = "x86_64")]
fn dequant_row_avx512_available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::is_x86_feature_detected!("avx512bf16")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("f16c")
    })
}

/// [`dequant_block`] over a whole row: per group of 64 weights (32 bytes), the low nibbles are
/// block `2g`, the high ones block `2g + 1`. A block's 16 possible values `k · d + m` (`k` <
/// 16, one fused multiply-add each, rounded to bf16 by `vcvtneps2bf16`) form a table that
/// `vpermw` looks the 32 nibbles up in: three instructions per 32 weights instead of widening,
/// converting and scaling each weight, with the same rounding.
///
/// # Safety
/// AVX512F/BW/BF16 and F16C are available; `q.len() == 16 · d.len()`, `m.len() == d.len()`,
/// `d.len()` is even and `out` has a slot for each of the `d.len()` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,f16c")]
unsafe fn dequant_row_avx512(
    q: &[u8],
    d: &[f16],
    m: &[f16],
    out: &mut (impl cpu_amx::BlockSink + ?Sized),
) {
    use std::arch::x86_64::*;
    let nib = _mm256_set1_epi8(0xF);
    let ks = _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    );
    let scale = |h: f16| _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)));
    let mut block = |v: __m256i, b: usize| {
        let t = _mm512_fmadd_ps(ks, _mm512_set1_ps(scale(d[b])), _mm512_set1_ps(scale(m[b])));
        let table = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(t));
        let r = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(v), _mm512_castsi256_si512(table));
        _mm512_storeu_si512(out.block(b).as_mut_ptr() as *mut __m512i, r);
    };
    for g in 0..d.len() / 2 {
        let v = _mm256_loadu_si256(q.as_ptr().add(g * GROUP / 2) as *const __m256i);
        block(_mm256_and_si256(v, nib), 2 * g);
        block(_mm256_and_si256(_mm256_srli_epi16(v, 4), nib), 2 * g + 1);
    }
}

/// One block of a group (`high`: the high nibbles, the group's second block) as bf16:
/// `q · d + m` as one f32 fused multiply-add, rounded to nearest even (the reference
/// [`dequant_row_avx512`] matches).
fn dequant_block(
    bytes: &[u8; GROUP / 2],
    high: bool,
    d: f32,
    m: f32,
    out: &mut [bf16; cpu_amx::TILE_K],
) {
    for (o, &b) in out.iter_mut().zip(bytes) {
        let q = if high { b >> 4 } else { b & 0xF };
        *o = bf16::from_f32((q as f32).mul_add(d, m));
    }
}

/// Largest magnitude of an 8-bit activation: `vpdpbusd` sums four products of a 4-bit weight
/// and an activation per i32 lane (4 · 15 · 127 < 2¹⁵), exact, and so is their conversion.
const ACT8_MAX: f32 = 127.0;

/// One activation row in the Q4 kernels' layout, written over `dst` (as long as `src`, `inp`
/// f32 slots): per block of 32, `xs = max|x| / 127` and the values `round(x / xs)` (to nearest,
/// ties to even) as i8, stored as bytes in the first `inp / 4` slots at [`act_offset`] (the
/// blocks of each 128 inputs in the order 0, 2, 1, 3, which is how the weights' low and high
/// nibbles of two groups pair up); then, at the same positions divided by 4, 8 copies of each
/// block's `xs` (per-lane scales: `vpdpbusd` leaves a block's sums in 8 lanes); then each
/// block's `S_b = xs · Σ q` in `inp / 32` slots (in block order); zeros after. A block holding
/// a NaN or infinity gets NaN scales and sums, so the products it enters are NaN as they would
/// be in f32.
fn pack_activations_q4(src: &[f32], dst: &mut [f32]) {
    let inp = src.len();
    assert!(inp.is_multiple_of(GROUP) && dst.len() == inp);
    let nb = inp / Q4_BLOCK;
    let (vals, rest) = dst.split_at_mut(inp / 4);
    let (lanes, rest) = rest.split_at_mut(inp / 4);
    let (sums, zeros) = rest.split_at_mut(nb);
    zeros.fill(0.0);
    for (b, xb) in src.chunks_exact(Q4_BLOCK).enumerate() {
        let (m, finite) = xb.iter().fold((0f32, true), |(m, ok), v| {
            (m.max(v.abs()), ok && v.is_finite())
        });
        let xs = if finite { m / ACT8_MAX } else { f32::NAN };
        // `v / m` rather than `v · (127 / m)`: see `cpu_q8::pack_activations`.
        let m = if m > 0.0 && finite { m } else { f32::INFINITY };
        let q = |v: f32| round_small_ties_even((v / m) * ACT8_MAX).clamp(-ACT8_MAX, ACT8_MAX) as i8;
        let at = act_offset(b, nb);
        let mut total = 0i32;
        for (four, slot) in xb
            .chunks_exact(4)
            .zip(&mut vals[at / 4..at / 4 + Q4_BLOCK / 4])
        {
            let mut bits = 0u32;
            for (k, &v) in four.iter().enumerate() {
                let c = q(v);
                total += c as i32;
                bits |= (c as u8 as u32) << (8 * k);
            }
            *slot = f32::from_bits(bits);
        }
        lanes[at / 4..at / 4 + 8].fill(xs);
        sums[b] = total as f32 * xs;
    }
}

/// Where block `b` (of `nb`) of a packed row keeps its 32 activation bytes; its 8 lane scales
/// are at slot `offset / 4` of the scale region. Each whole 128 inputs (blocks `4c..4c + 4`)
/// holds its blocks in the order 0, 2, 1, 3: a 64-byte load of the weights of 128 inputs gives
/// blocks 0 and 2 in its low nibbles and 1 and 3 in its high ones. A last group of 64 (when
/// `nb` is not a multiple of 4) stays in order.
#[inline]
fn act_offset(b: usize, nb: usize) -> usize {
    if b >= nb / 4 * 4 {
        return b * Q4_BLOCK;
    }
    const ORDER: [usize; 4] = [0, 2, 1, 3];
    (b / 4) * 4 * Q4_BLOCK + ORDER[b % 4] * Q4_BLOCK
}

/// 8-bit activation `i` of a packed row of `inp` values.
fn act8(packed: &[f32], inp: usize, i: usize) -> i8 {
    let at = act_offset(i / Q4_BLOCK, inp / Q4_BLOCK) + i % Q4_BLOCK;
    (packed[at / 4].to_bits() >> (8 * (at % 4))) as u8 as i8
}

/// Activation scale of block `b` of a packed row of `inp` values.
fn act_scale(packed: &[f32], inp: usize, b: usize) -> f32 {
    packed[inp / 4 + act_offset(b, inp / Q4_BLOCK) / 4]
}

/// The activations the Q4 row kernels multiply for an input row `x` (a multiple of 64
/// values): each rounded to its block of 32's 8-bit grid, `round(x / xs) · xs` with `xs =
/// max_block|x| / 127`. For references and error bounds.
pub fn round_activations(x: &[f32]) -> Vec<f32> {
    let inp = x.len();
    let mut p = vec![0f32; inp];
    pack_activations_q4(x, &mut p);
    (0..inp)
        .map(|i| act8(&p, inp, i) as f32 * act_scale(&p, inp, i / Q4_BLOCK))
        .collect()
}

/// `y[t, o] = Σ_i x̂[t, i] · deq(w)[o, i]` for `t < tokens`: `x` is `[tokens, w.cols()]` f32,
/// `y` is `[tokens, w.rows()]` f32, `x̂` the activations rounded to 8 bits per block of 32
/// ([`round_activations`]) and `deq(w) = q · d + m`. [`crate::cpu_q8::gemv_q8`]'s threading
/// and AMX tiles with Q4 weights.
pub fn gemv_q4(x: &[f32], tokens: usize, w: &Q4Matrix, y: &mut [f32]) -> Result<(), KernelError> {
    check_gemv("gemv_q4", x.len(), tokens, (0, 0), w.rows, w.cols, y.len())?;
    gemv_rows(x, tokens, w, y);
    Ok(())
}

/// A Q4 row kernel's entry point: `(q, steps, mins, packed x, n, inp, out)`.
type Q4RowFn = fn(&[u8], &[f16], &[f16], &[f32], usize, usize, &mut [f32]);

/// One Q4 row kernel: `out[t] = Σ_b (d[b] · xs[t, b] · Σ_{i∈b} q[i] · xq[t, i] + m[b] ·
/// S[t, b])` for `t < n`, activations packed by [`pack_activations_q4`].
#[derive(Clone, Copy)]
struct Q4Kernel {
    run: Q4RowFn,
    name: &'static str,
}

impl Q4Kernel {
    /// `q` is one row's `inp / 2` bytes (`inp` a multiple of 64), `d`/`m` its `inp / 32`
    /// steps and minimums, `x` `n` (≤ [`TOKEN_BLOCK`]) packed activation rows of `inp` slots.
    #[inline]
    fn run(&self, q: &[u8], d: &[f16], m: &[f16], x: &[f32], n: usize, out: &mut [f32]) {
        let inp = q.len() * 2;
        assert!(
            inp.is_multiple_of(GROUP)
                && d.len() == inp / Q4_BLOCK
                && m.len() == d.len()
                && x.len() >= n * inp
                && out.len() >= n
                && n <= TOKEN_BLOCK
        );
        (self.run)(q, d, m, x, n, inp, out)
    }
}

/// Which Q4 row kernel this CPU runs: `avx512-vnni`, `avx2` or `portable` (benches print it).
pub fn q4_kernel_name() -> &'static str {
    q4_kernel().name
}

/// The fastest Q4 kernel this CPU runs (detected once).
fn q4_kernel() -> Q4Kernel {
    static K: std::sync::OnceLock<Q4Kernel> = std::sync::OnceLock::new();
    *K.get_or_init(|| *q4_kernels().last().expect("the portable kernel"))
}

/// Every Q4 kernel this CPU runs, slowest (the portable reference) first.
fn q4_kernels() -> Vec<Q4Kernel> {
    let mut k = vec![Q4Kernel {
        run: q4_portable,
        name: "portable",
    }];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            k.push(Q4Kernel {
                run: q4_avx2_entry,
                name: "avx2",
            });
        }
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vnni")
        {
            k.push(Q4Kernel {
                run: q4_avx512_entry,
                name: "avx512-vnni",
            });
        }
    }
    k
}

/// The packed row's slot offsets: per-lane scales, block sums.
fn offsets(inp: usize) -> (usize, usize) {
    (inp / 4, inp / 2)
}

/// Reference: per token and block, the exact integer dot product times the step and the
/// activation scale, plus the minimum times the block's activation sum, summed in f32.
fn q4_portable(q: &[u8], d: &[f16], m: &[f16], x: &[f32], n: usize, inp: usize, out: &mut [f32]) {
    let (_, sums) = offsets(inp);
    for t in 0..n {
        let xt = &x[t * inp..(t + 1) * inp];
        let mut acc = 0f32;
        for b in 0..inp / Q4_BLOCK {
            let dot: i32 = (b * Q4_BLOCK..(b + 1) * Q4_BLOCK)
                .map(|i| nibble(q, i) as i32 * act8(xt, inp, i) as i32)
                .sum();
            let xs = act_scale(xt, inp, b);
            acc += dot as f32 * (d[b].to_f32() * xs) + m[b].to_f32() * xt[sums + b];
        }
        out[t] = acc;
    }
}

#[cfg(target_arch = "x86_64")]
fn q4_avx512_entry(
    q: &[u8],
    d: &[f16],
    m: &[f16],
    x: &[f32],
    n: usize,
    inp: usize,
    out: &mut [f32],
) {
    // SAFETY: selected only after run-time detection of avx512f/bw/vl/dq/vnni;
    // `Q4Kernel::run` checks `q.len() == inp / 2` (`inp` a multiple of 64), `d.len() ==
    // m.len() == inp / 32`, `x.len() >= n * inp` and `out.len() >= n`.
    unsafe { by_tokens!(q4_avx512, n, q, d, m, x, inp, out) }
}

/// The minimums' term `Σ_b m_b · S_b` of blocks `b0..b0 + nbs` into `acc[t]`, and the blocks'
/// steps as f32 into `ds`: 16 blocks per `vcvtph2ps` and FMA (masked at a segment's tail).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn segment_scales<const N: usize>(
    (d, m): (&[f16], &[f16]),
    (b0, nbs): (usize, usize),
    x: *const f32,
    (inp, sums): (usize, usize),
    ds: &mut [f32; SEG_BLOCKS],
    acc: &mut [[std::arch::x86_64::__m512; 2]; N],
) {
    use std::arch::x86_64::*;
    let (dp, mp) = (d.as_ptr() as *const i16, m.as_ptr() as *const i16);
    // The steps and minimums of the weights the loop prefetches ([`Q8_PREFETCH_AHEAD`] bytes
    // of 4-bit values ahead = 2 f16 per 32 of them): rows lie back to back, so past this row's
    // end these are the next rows' (a hint, never a fault). Without them the two small
    // streams missed the cache once per segment.
    let ahead = b0 + Q8_PREFETCH_AHEAD * 2 / Q4_BLOCK;
    _mm_prefetch::<PREFETCH_HINT>(dp.wrapping_add(ahead) as *const i8);
    _mm_prefetch::<PREFETCH_HINT>(mp.wrapping_add(ahead) as *const i8);
    let mut k = 0;
    while k < nbs {
        let lanes = (nbs - k).min(16);
        let mask: __mmask16 = if lanes == 16 { !0 } else { (1 << lanes) - 1 };
        let dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, dp.add(b0 + k)));
        _mm512_storeu_ps(ds.as_mut_ptr().add(k), dv);
        let mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mp.add(b0 + k)));
        for (t, at) in acc.iter_mut().enumerate() {
            let sv = _mm512_maskz_loadu_ps(mask, x.add(t * inp + sums + b0 + k));
            at[1] = _mm512_fmadd_ps(mv, sv, at[1]);
        }
        k += 16;
    }
}

/// `vpdpbusd` from zero: the sums of four `u8 × i8` products per i32 lane of `w` and `x`.
/// Written out so it stays one instruction (LLVM splits the intrinsic, as in `cpu_q8`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
unsafe fn dot_u8_i8(
    w: std::arch::x86_64::__m512i,
    x: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512i {
    let mut p = std::arch::x86_64::_mm512_setzero_si512();
    // SAFETY: registers only; compiled with and run after detecting avx512vnni.
    std::arch::asm!(
        "vpdpbusd {p}, {w}, {x}",
        p = inout(zmm_reg) p,
        w = in(zmm_reg) w,
        x = in(zmm_reg) x,
        options(pure, nomem, nostack),
    );
    p
}

/// One Q4 row against `N` packed activation rows. Per segment of up to [`SEG_BLOCKS`] blocks,
/// the steps convert to f32 and the minimums' term goes into the accumulators
/// ([`segment_scales`]). Then per 128 weights one 64-byte load gives, masked and shifted, two
/// vectors of 64 4-bit values (blocks 0 and 2 of the 128 in the low nibbles, 1 and 3 in the
/// high), and their steps two per-lane vectors, shared by every token; per token two
/// `vpdpbusd` against the 8-bit activations (packed in that block order, [`act_offset`]) give
/// each block's exact sums in 8 i32 lanes, converted and multiplied by the steps times the
/// per-lane activation scales: 4 vector ops per 64 weights and token, 5 shared per 128 (a
/// 64-weight step shared 5 per 64, ~1.3× slower at one token). A row whose length is an odd
/// number of 64s ends with one such 64-weight step. Two accumulator chains per token.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
unsafe fn q4_avx512<const N: usize>(
    q: &[u8],
    d: &[f16],
    m: &[f16],
    x: &[f32],
    inp: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (lanes, sums) = offsets(inp);
    let nb = inp / Q4_BLOCK;
    let mut acc = [[_mm512_setzero_ps(); 2]; N];
    let (qp, xp) = (q.as_ptr(), x.as_ptr());
    let low = _mm512_set1_epi8(0xF);
    // Lanes 0–7 of block `a`'s step, 8–15 of block `b`'s.
    let steps = |a: f32, b: f32| _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
    let mut ds = [0f32; SEG_BLOCKS];
    let mut b0 = 0;
    while b0 < nb {
        let nbs = SEG_BLOCKS.min(nb - b0);
        segment_scales((d, m), (b0, nbs), xp, (inp, sums), &mut ds, &mut acc);
        for c in 0..nbs / 4 {
            let j = 4 * c;
            let i = (b0 + j) * Q4_BLOCK;
            _mm_prefetch::<PREFETCH_HINT>(qp.wrapping_add(i / 2 + Q8_PREFETCH_AHEAD) as *const i8);
            let z = _mm512_loadu_si512(qp.add(i / 2) as *const __m512i);
            let lo = _mm512_and_si512(z, low);
            let hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), low);
            let (dlo, dhi) = (steps(ds[j], ds[j + 2]), steps(ds[j + 1], ds[j + 3]));
            for (t, at) in acc.iter_mut().enumerate() {
                let xt = xp.add(t * inp);
                let xb = (xt as *const u8).add(i);
                let p0 = dot_u8_i8(lo, _mm512_loadu_si512(xb as *const __m512i));
                let p1 = dot_u8_i8(hi, _mm512_loadu_si512(xb.add(64) as *const __m512i));
                let s0 = _mm512_mul_ps(dlo, _mm512_loadu_ps(xt.add(lanes + i / 4)));
                let s1 = _mm512_mul_ps(dhi, _mm512_loadu_ps(xt.add(lanes + i / 4 + 16)));
                at[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), s0, at[0]);
                at[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), s1, at[1]);
            }
        }
        if nbs % 4 == 2 {
            // The row's last 64 weights: one group, its two blocks in order.
            let j = nbs - 2;
            let i = (b0 + j) * Q4_BLOCK;
            let v = _mm256_loadu_si256(qp.add(i / 2) as *const __m256i);
            let low = _mm256_set1_epi8(0xF);
            let lo = _mm256_and_si256(v, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            let w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            let dl = steps(ds[j], ds[j + 1]);
            for (t, at) in acc.iter_mut().enumerate() {
                let xt = xp.add(t * inp);
                let p = dot_u8_i8(
                    w,
                    _mm512_loadu_si512((xt as *const u8).add(i) as *const __m512i),
                );
                let s = _mm512_mul_ps(dl, _mm512_loadu_ps(xt.add(lanes + i / 4)));
                at[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, at[0]);
            }
        }
        b0 += nbs;
    }
    for (o, at) in out.iter_mut().zip(&acc) {
        *o = _mm512_reduce_add_ps(_mm512_add_ps(at[0], at[1]));
    }
}

#[cfg(target_arch = "x86_64")]
fn q4_avx2_entry(q: &[u8], d: &[f16], m: &[f16], x: &[f32], n: usize, inp: usize, out: &mut [f32]) {
    // SAFETY: selected only after run-time detection of avx2, fma and f16c; slices as above.
    unsafe { by_tokens!(q4_avx2, n, q, d, m, x, inp, out) }
}

/// [`q4_avx512`] with 256-bit vectors and without VNNI: per block of 32, `vpmaddubsw` (4-bit
/// weights times 8-bit activations, pairs summed to i16: at most 2 · 15 · 127, no saturation)
/// and `vpmaddwd` by ones give 8 i32 lanes, scaled by the step times the activation scale;
/// the minimums' term goes 8 blocks per FMA (a tail of 2, 4 or 6 blocks one at a time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_avx2<const N: usize>(
    q: &[u8],
    d: &[f16],
    m: &[f16],
    x: &[f32],
    inp: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (lanes, sums) = offsets(inp);
    let nb = inp / Q4_BLOCK;
    let mut acc = [_mm256_setzero_ps(); N];
    let (qp, xp) = (q.as_ptr(), x.as_ptr());
    let (low, ones) = (_mm256_set1_epi8(0xF), _mm256_set1_epi16(1));
    let mut ds = [0f32; SEG_BLOCKS];
    let mut ms = [0f32; SEG_BLOCKS];
    let mut b0 = 0;
    while b0 < nb {
        let nbs = SEG_BLOCKS.min(nb - b0);
        let mut k = 0;
        while k + 8 <= nbs {
            let dv = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().add(b0 + k) as *const __m128i));
            let mv = _mm256_cvtph_ps(_mm_loadu_si128(m.as_ptr().add(b0 + k) as *const __m128i));
            _mm256_storeu_ps(ds.as_mut_ptr().add(k), dv);
            _mm256_storeu_ps(ms.as_mut_ptr().add(k), mv);
            k += 8;
        }
        for j in k..nbs {
            ds[j] = d[b0 + j].to_f32();
            ms[j] = m[b0 + j].to_f32();
        }
        for (t, at) in acc.iter_mut().enumerate() {
            let st = xp.add(t * inp + sums + b0);
            let mut k = 0;
            while k + 8 <= nbs {
                let sv = _mm256_loadu_ps(st.add(k));
                *at = _mm256_fmadd_ps(_mm256_loadu_ps(ms.as_ptr().add(k)), sv, *at);
                k += 8;
            }
            let tail: f32 = (k..nbs).map(|j| ms[j] * *st.add(j)).sum();
            *at = _mm256_add_ps(*at, _mm256_setr_ps(tail, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0));
        }
        for g in 0..nbs / 2 {
            let i = (b0 + 2 * g) * Q4_BLOCK;
            let v = _mm256_loadu_si256(qp.add(i / 2) as *const __m256i);
            let lo = _mm256_and_si256(v, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            // The two blocks' activation bytes (and lane scales at a quarter of that).
            let (o0, o1) = (act_offset(b0 + 2 * g, nb), act_offset(b0 + 2 * g + 1, nb));
            for (t, at) in acc.iter_mut().enumerate() {
                let xt = xp.add(t * inp);
                let xb = xt as *const u8;
                let x0 = _mm256_loadu_si256(xb.add(o0) as *const __m256i);
                let x1 = _mm256_loadu_si256(xb.add(o1) as *const __m256i);
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), ones);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), ones);
                let s0 = _mm256_set1_ps(ds[2 * g] * *xt.add(lanes + o0 / 4));
                let s1 = _mm256_set1_ps(ds[2 * g + 1] * *xt.add(lanes + o1 / 4));
                *at = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), s0, *at);
                *at = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), s1, *at);
            }
        }
        b0 += nbs;
    }
    for (o, at) in out.iter_mut().zip(&acc) {
        *o = crate::cpu_gemv::sum_lanes256(*at);
    }
}

#[cfg(test)]
mod tests {
    /// The magic-number rounding equals `round_ties_even` on the range it is used for (|v| ≤
    /// 127 after scaling: every 97th f32 there, and the neighbours of every tie).
    #[test]
    fn small_rounding_is_round_ties_even() {
        let mut checked = 0;
        for bits in (0u32..=127.5f32.to_bits())
            .step_by(97)
            .chain((0..=128).flat_map(|k| {
                let t = k as f32 + 0.5;
                let b = t.to_bits();
                [b - 1, b, b + 1]
            }))
        {
            for v in [f32::from_bits(bits), -f32::from_bits(bits)] {
                // Equal as numbers (a rounded -0.4 may come out +0; both are code 0).
                assert_eq!(round_small_ties_even(v), v.round_ties_even(), "{v}");
                checked += 1;
            }
        }
        assert!(checked > 2_000_000, "{checked}");
        assert!(round_small_ties_even(f32::NAN).is_nan());
    }

    use super::*;
    use rand::{Rng, SeedableRng};

    fn rnd(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// Bound on |a − b| for two f32 evaluations of the same sum of `n` terms in different
    /// orders and groupings (γ-bound with a few roundings per term for the scale products).
    fn order_bound(n: usize, abs_sum: f64) -> f64 {
        let u = f32::EPSILON as f64 / 2.0;
        let k = (n + 4) as f64 * u;
        2.0 * k / (1.0 - k) * abs_sum + 1e-30
    }

    /// Every kernel this CPU runs against the f64 sum of what it multiplies — the
    /// dequantized weights `q · d + m` times the rounded activations — for every token count,
    /// row lengths around the segment and group steps, and activations with an outlier, a
    /// zero block and tiny values. The portable reference is held to the same bound.
    #[test]
    fn every_kernel_matches_the_f64_product_of_what_it_multiplies() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for k in &q4_kernels() {
            for inp in [64, 128, 192, 512, 1024, 1088, 2112] {
                for n in 1..=TOKEN_BLOCK {
                    let mut wv = rnd(&mut rng, inp);
                    wv[7] = 3.0;
                    let near = &mut wv[inp - 40..inp - 8];
                    near.iter_mut().for_each(|v| *v = 0.25 + *v * 1e-3);
                    let w = Q4Matrix::quantize(&wv, 1, inp).unwrap();
                    let deq = w.dequantize_f64();
                    let mut x = rnd(&mut rng, n * inp);
                    x[3] = 40.0;
                    x[inp * n - 64..].fill(0.0);
                    if inp * n >= 128 {
                        x[inp * n - 70] *= 1e-20;
                    }
                    let mut xp = vec![0f32; x.len()];
                    for (s, d) in x.chunks(inp).zip(xp.chunks_mut(inp)) {
                        pack_activations_q4(s, d);
                    }
                    let mut got = [f32::NAN; TOKEN_BLOCK];
                    let (d, m) = w.row_scales(0);
                    k.run(w.row_bytes(0), d, m, &xp, n, &mut got);
                    for t in 0..n {
                        let xr = round_activations(&x[t * inp..(t + 1) * inp]);
                        let terms = (0..inp).map(|i| deq[i] * xr[i] as f64);
                        let (want, abs) = terms.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                        // The minimums' term sums `m · S` whose magnitude can exceed the
                        // products' (|m| · Σ|x|): bound on both.
                        let side: f64 = (0..inp)
                            .map(|i| (w.code(0, i).2.to_f64() * xr[i] as f64).abs())
                            .sum();
                        assert!(
                            (got[t] as f64 - want).abs() <= order_bound(inp, abs + 2.0 * side),
                            "{} inp {inp} n {n} t {t}: {} vs {want}",
                            k.name,
                            got[t]
                        );
                    }
                }
            }
        }
    }

    /// Every weight within half a step of its grid value, the step no wider than the block's
    /// range over 15 allows (plus f16 rounding), a constant block exact, and errors that name
    /// the weight.
    #[test]
    fn quantize_is_within_half_a_step() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let (rows, cols) = (5, 192);
        let mut w = rnd(&mut rng, rows * cols);
        w[cols..cols + 32].fill(-0.375);
        w[2 * cols + 5] = 1e4;
        w[3 * cols..3 * cols + 32]
            .iter_mut()
            .for_each(|v| *v *= 1e-6);
        let q = Q4Matrix::quantize(&w, rows, cols).unwrap();
        let deq = q.dequantize_f64();
        for r in 0..rows {
            for b in 0..cols / Q4_BLOCK {
                let blk = &w[r * cols + b * 32..][..32];
                let (lo, hi) = blk.iter().fold((f64::MAX, f64::MIN), |(l, h), &v| {
                    (l.min(v as f64), h.max(v as f64))
                });
                let (_, d, _) = q.code(r, b * 32);
                let d = d.to_f64();
                assert!(
                    d <= (hi - lo) / 15.0 * (1.0 + 2e-3) + 1e-7,
                    "r{r} b{b} step {d}"
                );
                for j in 0..32 {
                    let i = r * cols + b * 32 + j;
                    let err = (w[i] as f64 - deq[i]).abs();
                    assert!(
                        err <= d / 2.0 * (1.0 + 1e-9) + 1e-12,
                        "[{r}, {}]: {err}",
                        b * 32 + j
                    );
                }
            }
        }
        assert!(deq[cols..cols + 32].iter().all(|&v| v == -0.375));
        let e = |w: &[f32], r, c| Q4Matrix::quantize(w, r, c).unwrap_err().to_string();
        let mut bad = vec![0f32; 128];
        bad[70] = f32::NAN;
        assert!(e(&bad, 1, 128).contains("weight [0, 70] is not finite"));
        bad[70] = 1e5;
        assert!(e(&bad, 2, 64).contains("weight [1, 6] is beyond f16"));
        assert!(e(&bad, 1, 96).contains("multiple of 64"));
        assert!(e(&bad, 3, 64).contains("want 192"));
    }

    /// The row dequantization (AVX-512 where the CPU has it) rounds exactly as the scalar
    /// blocks, both nibbles, into a plain row and into the tiles' stage: rows of quantized
    /// weights, and raw rows of random bytes with random steps and minimums.
    #[test]
    fn row_dequantization_matches_the_scalar_blocks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let bits = |v: &[bf16]| v.iter().map(|b| b.to_bits()).collect::<Vec<_>>();
        let scalar = |q: &[u8], d: &[f16], m: &[f16]| {
            let mut want = vec![bf16::NAN; 2 * q.len()];
            for (g, bytes) in q.chunks_exact(GROUP / 2).enumerate() {
                for half in 0..2 {
                    let b = 2 * g + half;
                    let out = &mut want[b * Q4_BLOCK..(b + 1) * Q4_BLOCK];
                    let (d, m) = (d[b].to_f32(), m[b].to_f32());
                    dequant_block(
                        bytes.try_into().unwrap(),
                        half == 1,
                        d,
                        m,
                        out.try_into().unwrap(),
                    );
                }
            }
            want
        };
        for (rows, cols) in [(3, 64), (16, 192), (32, 1024)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-1.5f32..0.7))
                .collect();
            let q = Q4Matrix::quantize(&w, rows, cols).unwrap();
            // The stage takes whole tiles of 16 rows.
            let mut st = cpu_amx::Staged::new();
            let staged = rows.is_multiple_of(16);
            if staged {
                q.stage(0, rows, &mut st);
            }
            for r in 0..rows {
                let (d, m) = q.row_scales(r);
                let want = scalar(q.row_bytes(r), d, m);
                let mut fast = vec![bf16::NAN; cols];
                q.dequant_row(r, &mut fast[..]);
                assert_eq!(bits(&fast), bits(&want), "{rows}x{cols} row {r}");
                for b in (0..cols / Q4_BLOCK).filter(|_| staged) {
                    let got = *st.chunk_mut(r, b);
                    let wb = &want[b * Q4_BLOCK..(b + 1) * Q4_BLOCK];
                    assert_eq!(
                        bits(&got),
                        bits(wb),
                        "staged {rows}x{cols} row {r} block {b}"
                    );
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if dequant_row_avx512_available() {
            for _ in 0..200 {
                let q: Vec<u8> = (0..64).map(|_| rng.random()).collect();
                let sc = |rng: &mut rand::rngs::StdRng, sign: f32| -> Vec<f16> {
                    (0..4)
                        .map(|_| {
                            f16::from_bits(rng.random_range(0x1000..0x3c00)) * f16::from_f32(sign)
                        })
                        .collect()
                };
                let (d, m) = (sc(&mut rng, 1.0), sc(&mut rng, -1.0));
                let mut fast = vec![bf16::NAN; 128];
                // SAFETY: detected above; 64 bytes, 4 (even) steps and minimums, 128 slots.
                unsafe { dequant_row_avx512(&q, &d, &m, &mut fast[..]) };
                assert_eq!(bits(&fast), bits(&scalar(&q, &d, &m)), "d {d:?} m {m:?}");
            }
        }
    }

    #[test]
    fn rows_are_back_to_back_and_memory_is_five_bits_per_weight() {
        let w = Q4Matrix::quantize(&vec![0.5f32; 3 * 192], 3, 192).unwrap();
        for r in 0..3 {
            assert_eq!(
                w.row_bytes(r).as_ptr() as usize,
                w.row_bytes(0).as_ptr() as usize + r * 96
            );
        }
        let demo = Q4Matrix::quantize(&vec![bf16::ONE; 256 * 576], 256, 576).unwrap();
        assert_eq!(demo.memory_bytes(), 256 * 576 * 5 / 8);
    }
}
