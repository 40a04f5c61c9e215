//! 8-bit weight quantization (Q8) for the CPU kernels: int8 weights with one f32 scale per
//! block of [`Q8_BLOCK`] consecutive inputs of a row; activations come in and results go out
//! as f32. mistral.rs calls quantizing at load "in-situ quantization" (ISQ); this is its op
//! layer.
//!
//! Decode reads every active weight once per token, so it runs at memory bandwidth over the
//! weight bytes; int8 halves the bytes of bf16. The scheme is symmetric like llama.cpp's
//! Q8_0 (`scale = max|w| / 127`, `q = round(w / scale)`, `w ≈ q · scale`), but laid out for
//! the AVX-512 kernel rather than interleaved `{scale, 32 × q}` records: a row's int8 values
//! are contiguous and every row starts on a 64-byte line ([`Q8Matrix`]), and the scales are a
//! separate `[rows, cols / 64]` f32 array. The kernel streams one run of int8 lines per row
//! (one prefetch per line, no unaligned records), and a block's scale is one broadcast load.
//!
//! Integer products. Converting int8 weights to f32 costs a sign extension, a conversion and
//! a scaling per 16 weights before the FMA: 16 vector ops per 64 weights at one token against
//! 8 for bf16's in-place widening, and on the dev VM that f32 kernel read cache-resident
//! weights no faster than DRAM ones (compute-bound). So activations are rounded, per token,
//! to 16-bit fixed point with one f32 scale per block of 64 (`xs = max|x| / 32767`,
//! [`round_activations`]), and a block's dot product is exact integer arithmetic: 32 weights
//! widen to i16 in one op and `vpdpwssd` (AVX-512 VNNI) multiplies and adds 32 pairs into i32
//! lanes. Per 64 weights and token: two widenings (shared by all tokens), two integer
//! multiply-adds, one conversion and two f32 ops for both scales — 7 at one token. The
//! activation rounding is at most `xs / 2 = max_b|x| / 65534` per value: relative to the
//! block's largest value 258× finer than the weights' step, and finer than bf16's rounding
//! (which the model's activations already carry) for every value above 1/128 of it.
//!
//! Error: `|w − q·scale| ≤ scale / 2` per weight, so against f32 weights and activations a
//! product `y = Σ w_i x_i` is off by at most `Σ_b (scale_b / 2) Σ_{i∈b} |x_i|` (weights) `+
//! Σ_b (xs_b / 2) Σ_{i∈b} |w_i|` (activations) plus f32 rounding of the per-block sums. Relative
//! to `Σ |w_i x_i|` the weight term is at most `1/254` when a block's weights are of like
//! size; on normally distributed weights the measured relative RMS error of a product is
//! 5.5e-3 (block 64; 5.0e-3 with blocks of 32).
//!
//! The driver (`cpu_gemv`'s row-block split over rayon, [`TOKEN_BLOCK`] tokens per pass) and
//! the MoE/MLP passes (`cpu_moe`) are the bf16 ones, written over
//! `cpu_gemv::WeightRows`; only the row kernel and the activation layout differ.
//!
//! AMX tiles. Past about eight activation rows (prefill, batched steps) the row kernels are
//! compute-bound, as the bf16 ones are, and the bf16 tile kernel (`cpu_amx`) multiplies far
//! faster. The tiles multiply bf16 only, so each task's block of rows (≤ 64 × cols) is
//! dequantized once into a per-thread staging buffer in tile order (`q · scale` in f32,
//! rounded to bf16; AVX-512 BF16 where AMX is) and the same tile loop reads it there; the
//! activations are rounded to bf16. Each operand's rounding is at most 2⁻⁹ relative (the
//! weights' at most 2⁻⁹ of `q · scale`, under the quantization's own `1/254` of a block's
//! largest), so on the tiles Q8 computes at bf16 compute's accuracy. Measured on the oracle
//! fixtures (`switchyard-model` `tests/q8.rs`, 2026-11-29): logits vs transformers' f32 run
//! 0.130–0.160 max|Δ| on the tiles against 0.148–0.170 on the row kernels where routing is
//! not near-tied (transformers' own bf16 run: 0.110–0.116); decode (row kernels) vs prefill
//! (tiles) 0.055–0.065 on those, up from 5–7e-4 with one arithmetic. On the `small` preset
//! (dev VM, 2 cores) a 128-token prefill went from ~420 to ~1100 tok/s at batch 1 and ~400 to
//! ~1480 at batch 4; decode (one row per step) stays on the row kernels. [`set_tiles`]
//! switches it.

use candle_core::Tensor;
use half::bf16;
use rayon::prelude::*;

use crate::cpu_amx;
#[cfg(target_arch = "x86_64")]
use crate::cpu_gemv::{by_tokens, PREFETCH_HINT};
use crate::cpu_gemv::{check_gemv, gemv_rows, Packing, Tiles, WeightRows, TOKEN_BLOCK};
use crate::KernelError;

/// Inputs per weight scale and per activation scale. 64 with an f32 scale is 1.0625 bytes per
/// weight, as llama.cpp's Q8_0 (32 per f16 scale); 32 with an f32 scale is 1.125. Measured
/// with the f32-activation kernel (`cpu_q8` bench, 2026-11-28, load 4–7): weights/s of the two
/// were within the run-to-run noise (pair ratios over bf16 1.1–1.9 for both), the product's
/// relative RMS error 5.0e-3 (32) vs 5.5e-3 (64). Decode pays for bytes, so 64: 6% fewer bytes
/// for 10% more error, one scale per cache line of weights, and whole 64-value blocks for the
/// integer kernel's activation scales.
pub const Q8_BLOCK: usize = 64;

/// Largest magnitude of a 16-bit fixed-point activation (`i16::MAX`): a block's 4 products
/// per i32 lane stay below 2²⁴ (4 · 127 · 32767 < 16 777 216), so converting a lane to f32 is
/// exact.
pub(crate) const ACT_MAX: f32 = 32767.0;

/// Bytes of one cache line; each row's int8 values start on one.
pub(crate) const LINE: usize = 64;

/// int8 weights the AVX-512 kernel prefetches ahead of its loads (into L2, like the bf16
/// kernel): the bf16 kernel's 4 KiB distance in bytes.
pub(crate) const Q8_PREFETCH_AHEAD: usize = 4096;

/// One 64-byte-aligned line of int8 weights (the allocation unit that aligns rows).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [i8; LINE]);

/// Element types [`Q8Matrix::quantize`] reads.
pub trait Q8Source: Copy + Send + Sync {
    /// The value as f32 (exact for bf16, f16 and f32).
    fn to_f32(self) -> f32;
}

impl Q8Source for f32 {
    fn to_f32(self) -> f32 {
        self
    }
}

impl Q8Source for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl Q8Source for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// A `[rows, cols]` weight matrix in Q8: int8 values, row-major, each row a whole number of
/// 64-byte lines and starting on one, and f32 scales `[rows, cols / 64]`. Memory is
/// `rows · cols · 17 / 16` bytes.
#[derive(Clone)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    data: Vec<Line>,
    scales: Vec<f32>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q8Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

impl Q8Matrix {
    /// Quantizes a row-major `[rows, cols]` matrix with [`Q8_BLOCK`] inputs per scale.
    /// Errors name the problem: an empty shape, `cols` not a multiple of the block, a length
    /// that is not `rows · cols`, or a non-finite weight (its row and column).
    pub fn quantize<T: Q8Source>(w: &[T], rows: usize, cols: usize) -> Result<Self, KernelError> {
        let bad = |m: String| KernelError::InvalidArgument(format!("Q8 quantize: {m}"));
        let block = Q8_BLOCK;
        check_shape(w.len(), rows, cols, block).map_err(bad)?;
        let nb = cols / block;
        let mut data = vec![Line([0; LINE]); rows * cols / LINE];
        let mut scales = vec![0f32; rows * nb];
        data.par_chunks_mut(cols / LINE)
            .zip(scales.par_chunks_mut(nb))
            .enumerate()
            .try_for_each(|(r, (lines, sc))| {
                quantize_row(
                    &w[r * cols..(r + 1) * cols],
                    block,
                    lines_bytes_mut(lines),
                    sc,
                )
                .map_err(|c| (r, c))
            })
            .map_err(|(r, c)| bad(format!("weight [{r}, {c}] is not finite")))?;
        Ok(Self {
            rows,
            cols,
            data,
            scales,
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

    /// Bytes this matrix holds (int8 lines and scales).
    pub fn memory_bytes(&self) -> usize {
        self.data.len() * LINE + self.scales.len() * 4
    }

    /// Bytes a `[rows, cols]` matrix holds once quantized (`cols` a multiple of the block):
    /// a byte per weight and an f32 scale per [`Q8_BLOCK`].
    pub fn memory_bytes_for(rows: usize, cols: usize) -> usize {
        rows * cols + rows * (cols / Q8_BLOCK) * 4
    }

    /// Row `r`'s int8 values (`cols` of them, starting on a 64-byte boundary).
    pub fn row_q(&self, r: usize) -> &[i8] {
        &self.bytes()[r * self.cols..(r + 1) * self.cols]
    }

    /// Row `r`'s scales, one per block of inputs.
    pub fn row_scales(&self, r: usize) -> &[f32] {
        let nb = self.cols / Q8_BLOCK;
        &self.scales[r * nb..(r + 1) * nb]
    }

    /// The weights the kernels multiply: `q · scale` rounded to f32, `[rows, cols]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            let s = self.row_scales(r);
            out.extend(
                self.row_q(r)
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| q as f32 * s[i / Q8_BLOCK]),
            );
        }
        out
    }

    fn bytes(&self) -> &[i8] {
        // SAFETY: `Line` is `repr(C)` over `[i8; LINE]` (size LINE, no padding), so the vector
        // is `data.len() * LINE` initialised bytes.
        unsafe {
            std::slice::from_raw_parts(self.data.as_ptr() as *const i8, self.data.len() * LINE)
        }
    }
}

pub(crate) fn lines_bytes_mut(lines: &mut [Line]) -> &mut [i8] {
    // SAFETY: as in `Q8Matrix::bytes`, with the unique borrow of `lines` carried over.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut i8, lines.len() * LINE) }
}

/// Quantizes one row into `q` (at least `w.len()` bytes) and `s` (one scale per block); on a
/// non-finite weight returns its column. Scales and quotients are computed in f64 so that
/// `|w − q·scale| ≤ scale / 2` holds for every weight (the scale is rounded up to f32 when
/// rounding down would leave `max|w| / scale` above 127.5).
fn quantize_row<T: Q8Source>(
    w: &[T],
    block: usize,
    q: &mut [i8],
    s: &mut [f32],
) -> Result<(), usize> {
    for (b, (wb, qb)) in w
        .chunks_exact(block)
        .zip(q.chunks_exact_mut(block))
        .enumerate()
    {
        let mut m = 0f64;
        for (j, &v) in wb.iter().enumerate() {
            let v = v.to_f32();
            if !v.is_finite() {
                return Err(b * block + j);
            }
            m = m.max(v.abs() as f64);
        }
        let mut scale = (m / 127.0) as f32;
        if m > 0.0 && (scale as f64) * 127.5 < m {
            scale = f32::from_bits(scale.to_bits() + 1);
        }
        s[b] = scale;
        if m == 0.0 {
            continue;
        }
        // A multiply with `1 / scale` and rounding half away from zero by hand: a division and
        // a `round` call per weight were most of the quantizing time (as in `cpu_q4`). Where
        // the quotient is within an ulp of a half the code may be the other neighbour, whose
        // error is half a step up to that ulp.
        let inv = 1.0 / scale as f64;
        for (&v, q) in wb.iter().zip(qb) {
            let x = v.to_f32() as f64 * inv;
            let r = ((x.abs() + 0.5) as u32).min(127) as i8;
            *q = if x < 0.0 { -r } else { r };
        }
    }
    Ok(())
}

/// The shape checks of every quantizer: a non-empty `[rows, cols]`, `cols` a multiple of
/// `multiple`, `len` values; the message names what is wrong.
pub(crate) fn check_shape(
    len: usize,
    rows: usize,
    cols: usize,
    multiple: usize,
) -> Result<(), String> {
    if rows == 0 || cols == 0 {
        return Err(format!("empty matrix [{rows}, {cols}]"));
    }
    if !cols.is_multiple_of(multiple) {
        return Err(format!(
            "{cols} inputs per row is not a multiple of {multiple}"
        ));
    }
    if len != rows * cols {
        return Err(format!(
            "{len} values for a [{rows}, {cols}] matrix (want {})",
            rows * cols
        ));
    }
    Ok(())
}

/// A weight tensor's values: bf16 in place, anything else converted to f32.
pub(crate) enum Values<'a> {
    Bf16(&'a [bf16]),
    F32(&'a [f32]),
}

/// Calls `f` with `w`'s values in row-major order (CPU tensors only).
pub(crate) fn with_values<R>(
    w: &Tensor,
    f: impl FnOnce(Values<'_>) -> Result<R, KernelError>,
) -> Result<R, KernelError> {
    use candle_core::{CpuStorage, DType, Storage};
    if !w.device().is_cpu() {
        return Err(KernelError::InvalidArgument(
            "Q8 quantize: the weight tensor is not on the CPU".into(),
        ));
    }
    {
        let (st, l) = w.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::BF16(d)), Some((a, b))) = (&*st, l.contiguous_offsets()) {
            return f(Values::Bf16(&d[a..b]));
        }
    }
    let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    f(Values::F32(&v))
}

impl WeightRows for Q8Matrix {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn packing() -> Packing {
        Packing::Rows(pack_activations)
    }
    #[inline]
    fn dot(&self, r: usize, x: &[f32], n: usize, d: &mut [f32]) {
        q8_kernel().run(self.row_q(r), self.row_scales(r), x, n, d)
    }
    /// On the tiles with the activations rounded to bf16 (not the row kernels' 16-bit grid)
    /// and each weight `q · scale` rounded to bf16: see [`Tiles::RoundedInputs`] and the
    /// module docs.
    fn tiles(&self) -> Tiles {
        quantized_tiles(self.rows, self.cols)
    }
    /// On CPUs with AVX512-BF16 but no AMX: the rows dequantized to bf16 as the tiles' stage
    /// holds them, on the `vdpbf16ps` kernel with the activations rounded to bf16.
    fn bf16_dot(&self) -> Tiles {
        quantized_bf16_dot()
    }
    fn dot_pairs_rows(&self, r0: usize, x: &crate::cpu_bf16dot::Pairs, out: &mut [f32]) {
        dot_pairs_rows_dequantized(self.cols, r0, x, out, |r, row| self.dequant_row(r, row))
    }
    /// Dequantizes the block's rows into this thread's staging buffer in tile order, then
    /// multiplies it there: 64 rows × 4096 inputs stage in 512 KiB (L2), and at the 8+ tokens
    /// the tiles take each staged value is read once per 32 tokens.
    fn tile_block(&self, r0: usize, x: &cpu_amx::Packed, out: &mut [f32]) {
        cpu_amx::tile_block_via_stage(self.rows, r0, x, out, |r0, rows, st| {
            self.stage(r0, rows, st)
        })
    }
}

/// Whether Q8 products of many rows may run on the AMX tiles ([`set_tiles`]); starts from
/// `SWITCHYARD_Q8_TILES` (on unless `0`).
static TILES: std::sync::LazyLock<std::sync::atomic::AtomicBool> = std::sync::LazyLock::new(|| {
    std::sync::atomic::AtomicBool::new(!crate::env_off("SWITCHYARD_Q8_TILES"))
});

/// Lets Q8 products of at least `cpu_amx::min_tokens()` activation rows (prefill, batched
/// steps) run on the AMX tiles, or keeps every Q8 product on the int8 row kernels. Process-wide;
/// on by default (`SWITCHYARD_Q8_TILES=0` starts it off, `SWITCHYARD_AMX=0` turns off all
/// tiles). On the tiles the activations and the dequantized weights are rounded to bf16
/// instead of the row kernels' 16-bit activations and exact `q · scale`: on the `small`
/// preset that doubled prefill speed, at the accuracy of bf16 compute (the module docs give
/// the numbers). The row kernels' results do not depend on how many rows a step holds; the
/// tiles' do, at that accuracy — for tests that compare a step against another of a
/// different size, turn this off.
pub fn set_tiles(on: bool) {
    TILES.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether Q8 products may run on the tiles now ([`set_tiles`]) and the CPU has them.
pub fn tiles_enabled() -> bool {
    TILES.load(std::sync::atomic::Ordering::Relaxed) && cpu_amx::enabled()
}

/// Whether quantized (Q8, Q4) products of at least `cpu_amx::min_tokens()` rows round their
/// operands to bf16 on this machine while [`set_tiles`] allows it (whatever it says now, so
/// tests can ask outside their switch): on the AMX tiles, or on CPUs without them on the
/// `vdpbf16ps` kernel with the weights dequantized to bf16 row by row — the same values
/// rounded, so prefill computes the same on both kinds of CPU up to summation order.
pub fn bf16_products_available() -> bool {
    cpu_amx::enabled() || crate::cpu_bf16dot::enabled()
}

/// How a quantized matrix goes on the `vdpbf16ps` kernel: with rounded inputs where
/// [`set_tiles`] allows it and the CPU has AVX512-BF16 (the tiles go first where they apply).
pub(crate) fn quantized_bf16_dot() -> Tiles {
    if TILES.load(std::sync::atomic::Ordering::Relaxed) && crate::cpu_bf16dot::enabled() {
        Tiles::RoundedInputs
    } else {
        Tiles::No
    }
}

/// Rows `r0..` of a quantized matrix times every token of `x` on the `vdpbf16ps` kernel
/// ([`crate::cpu_gemv::WeightRows::dot_pairs_rows`]): per block of up to [`STAGE_ROWS`] rows,
/// each row dequantized to bf16 once (`dequant(r, row)`) into this thread's stage, then
/// [`crate::cpu_bf16dot::dot_rows`] over the stage.
pub(crate) fn dot_pairs_rows_dequantized(
    cols: usize,
    r0: usize,
    x: &crate::cpu_bf16dot::Pairs,
    out: &mut [f32],
    dequant: impl Fn(usize, &mut [bf16]),
) {
    thread_local! {
        static STAGE: std::cell::RefCell<Vec<bf16>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let tokens = x.tokens();
    if tokens == 0 {
        return;
    }
    STAGE.with_borrow_mut(|stage| {
        for (blk, dst) in out.chunks_mut(STAGE_ROWS * tokens).enumerate() {
            let rows = dst.len() / tokens;
            stage.resize(rows * cols, bf16::ZERO);
            for (k, row) in stage.chunks_exact_mut(cols).enumerate() {
                dequant(r0 + blk * STAGE_ROWS + k, row);
            }
            crate::cpu_bf16dot::dot_rows(stage, cols, x, dst);
        }
    })
}

/// Rows a quantized product on the `vdpbf16ps` kernel dequantizes at a time: 64 rows of 4096
/// bf16 inputs stage in 512 KiB (L2), and each block of 8 tokens then reads them from there,
/// the order [`crate::cpu_gemv`]'s row kernels use (rows inner, so a long prompt's activations
/// are read once per block of rows, not once per row).
const STAGE_ROWS: usize = 64;

/// How a quantized `[rows, cols]` matrix (Q8 or Q4) goes on the tiles: with the activations
/// rounded to bf16 where [`set_tiles`] allows it and the shape fits, else not at all.
pub(crate) fn quantized_tiles(rows: usize, cols: usize) -> Tiles {
    if tiles_enabled() && cpu_amx::fits(rows, cols) {
        Tiles::RoundedInputs
    } else {
        Tiles::No
    }
}

impl Q8Matrix {
    /// Rows `r0..r0 + rows` (a multiple of 16) dequantized to bf16 (`q · scale` in f32,
    /// rounded to nearest even) into `st` in tile order.
    fn stage(&self, r0: usize, rows: usize, st: &mut cpu_amx::Staged) {
        st.reset(rows, self.cols);
        for r in 0..rows {
            self.dequant_row(r0 + r, &mut cpu_amx::StagedRow(st, r));
        }
    }

    /// Row `r` dequantized to bf16 (`q · scale`, rounded to nearest even), block by block of
    /// [`cpu_amx::TILE_K`] into `out`: the AMX tiles' stage and the `vdpbf16ps` path's. One
    /// AVX-512 loop over the row where the CPU has it (as `cpu_q4`'s: block by block through a
    /// function pointer the calls cost as much as the arithmetic), else [`dequant_chunk`].
    fn dequant_row(&self, r: usize, out: &mut (impl cpu_amx::BlockSink + ?Sized)) {
        let (q, s) = (&self.row_q(r)[..self.cols], self.row_scales(r));
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512bf16") {
            assert!(s.len() * Q8_BLOCK == self.cols);
            // SAFETY: detected above; `q` holds `cols` values and `s` `cols / 64` (checked).
            unsafe { dequant_row_avx512(q, s, out) };
            return;
        }
        for (b, (qb, &sc)) in q.chunks_exact(Q8_BLOCK).zip(s).enumerate() {
            let (lo, hi) = qb.split_at(Q8_BLOCK / 2);
            dequant_chunk(lo, sc, out.block(2 * b));
            dequant_chunk(hi, sc, out.block(2 * b + 1));
        }
    }
}

/// [`dequant_chunk`] over a whole row, 32 values at a time: int8 → i32 → f32, times the
/// block's scale, and `vcvtne2ps2bf16` (round to nearest even) into each 64-byte block.
///
/// # Safety
/// AVX512F and AVX512-BF16 are available; `q.len() == 64 · s.len()` and `out` has a slot for
/// each of the `2 · s.len()` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dequant_row_avx512(q: &[i8], s: &[f32], out: &mut (impl cpu_amx::BlockSink + ?Sized)) {
    use std::arch::x86_64::*;
    let qp = q.as_ptr();
    for (b, &scale) in s.iter().enumerate() {
        let sv = _mm512_set1_ps(scale);
        for half in 0..2 {
            let at = b * Q8_BLOCK + half * cpu_amx::TILE_K;
            let v = |o: usize| {
                let x = _mm_loadu_si128(qp.add(at + o) as *const __m128i);
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x)), sv)
            };
            let r = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(v(16), v(0)));
            _mm512_storeu_si512(out.block(2 * b + half).as_mut_ptr() as *mut __m512i, r);
        }
    }
}

/// 32 int8 weights of one block as bf16: `q · scale` rounded to f32, then to bf16 (nearest,
/// ties to even), as [`dequant_row_avx512`] computes them.
fn dequant_chunk(q: &[i8], scale: f32, out: &mut [bf16; cpu_amx::TILE_K]) {
    assert_eq!(q.len(), cpu_amx::TILE_K);
    for (o, &v) in out.iter_mut().zip(q) {
        *o = bf16::from_f32(v as f32 * scale);
    }
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2^22` (NaN stays NaN): adding
/// and subtracting 1.5 · 2^23 leaves no fraction bits, and the default rounding mode rounds
/// ties to even. The same value as `f32::round_ties_even`, which compiles to a call to libm's
/// `rintf` without SSE4.1 in the target (in the q4 packing: 2% of the demo's decode samples, and ~12% of its decode
/// speed with the loop around it).
#[inline]
pub(crate) fn round_small_ties_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    (v + MAGIC) - MAGIC
}

/// One activation row of `inp` f32 values (a multiple of [`Q8_BLOCK`]) in the kernels' layout,
/// written over the same length: per block of 64, `xs = max|x| / 32767` and the values
/// `x / xs` rounded to the nearest integer (ties to even) as i16, two per 32-bit slot (the first in the low half) in the first
/// `inp / 2` slots, then the `inp / 64` scales, then zeros. A block holding a NaN or infinity
/// gets a NaN scale, so the products it enters are NaN as they would be in f32.
pub(crate) fn pack_activations(src: &[f32], dst: &mut [f32]) {
    let inp = src.len();
    assert!(inp.is_multiple_of(Q8_BLOCK) && dst.len() == inp);
    let (vals, rest) = dst.split_at_mut(inp / 2);
    let (scales, zeros) = rest.split_at_mut(inp / Q8_BLOCK);
    zeros.fill(0.0);
    for ((xb, vb), sc) in src
        .chunks_exact(Q8_BLOCK)
        .zip(vals.chunks_exact_mut(Q8_BLOCK / 2))
        .zip(scales.iter_mut())
    {
        let (m, finite) = xb.iter().fold((0f32, true), |(m, ok), v| {
            (m.max(v.abs()), ok && v.is_finite())
        });
        *sc = if !finite { f32::NAN } else { m / ACT_MAX };
        // `v / m` rather than `v · (32767 / m)`: the reciprocal overflows for blocks of tiny
        // values (m < 1e-34; their scale is subnormal, so their grid is coarser than half a
        // step, at magnitudes no product notices).
        let m = if m > 0.0 && finite { m } else { f32::INFINITY };
        let q = |v: f32| {
            round_small_ties_even((v / m) * ACT_MAX).clamp(-ACT_MAX, ACT_MAX) as i16 as u16 as u32
        };
        for (pair, slot) in xb.chunks_exact(2).zip(vb.iter_mut()) {
            *slot = f32::from_bits(q(pair[0]) | (q(pair[1]) << 16));
        }
    }
}

/// The activations the Q8 kernels multiply for an input row `x` (a multiple of [`Q8_BLOCK`]
/// values): each rounded (ties to even) to its block's 16-bit fixed-point grid, `round(x / xs) · xs` with
/// `xs = max_block|x| / 32767`. For references and error bounds.
pub fn round_activations(x: &[f32]) -> Vec<f32> {
    let mut packed = vec![0f32; x.len()];
    pack_activations(x, &mut packed);
    let inp = x.len();
    (0..inp)
        .map(|i| act_value(&packed, inp, i) as f32 * packed[inp / 2 + i / Q8_BLOCK])
        .collect()
}

/// Fixed-point activation `i` of a packed row of `inp` values.
pub(crate) fn act_value(packed: &[f32], inp: usize, i: usize) -> i16 {
    debug_assert!(i < inp);
    (packed[i / 2].to_bits() >> (16 * (i % 2))) as u16 as i16
}

/// `y[t, o] = Σ_i x̂[t, i] · deq(w)[o, i]` for `t < tokens`: `x` is `[tokens, w.cols()]` f32,
/// `y` is `[tokens, w.rows()]` f32, `x̂` the activations rounded to 16 bits per block of 64
/// ([`round_activations`]). [`crate::cpu_gemv::gemv_bf16`]'s contract and threading with Q8
/// weights. Where `cpu_quant::QuantMatrix::on_tiles` says so (8+ tokens on an AMX CPU, [`set_tiles`] on),
/// `x̂` and `deq(w)` are each rounded to bf16 instead (module docs).
pub fn gemv_q8(x: &[f32], tokens: usize, w: &Q8Matrix, y: &mut [f32]) -> Result<(), KernelError> {
    check_gemv("gemv_q8", x.len(), tokens, (0, 0), w.rows, w.cols, y.len())?;
    gemv_rows(x, tokens, w, y);
    Ok(())
}

/// A Q8 row kernel's entry point: `(q, scales, packed x, n, inp, d)`.
type Q8RowFn = fn(&[i8], &[f32], &[f32], usize, usize, &mut [f32]);

/// One Q8 row kernel: `d[t] = Σ_b s[b] · xs[t, b] · Σ_{i∈b} q[i] · xq[t, i]` for `t < n`,
/// activations packed by [`pack_activations`].
#[derive(Clone, Copy)]
struct Q8Kernel {
    run: Q8RowFn,
    name: &'static str,
}

impl Q8Kernel {
    /// `q` is one row (`inp` values, a multiple of [`Q8_BLOCK`]), `s` its `inp / 64` scales,
    /// `x` `n` (≤ [`TOKEN_BLOCK`]) packed activation rows of `inp` slots.
    #[inline]
    fn run(&self, q: &[i8], s: &[f32], x: &[f32], n: usize, d: &mut [f32]) {
        let inp = q.len();
        assert!(
            inp.is_multiple_of(Q8_BLOCK)
                && s.len() == inp / Q8_BLOCK
                && x.len() >= n * inp
                && d.len() >= n
                && n <= TOKEN_BLOCK
        );
        (self.run)(q, s, x, n, inp, d)
    }
}

/// Which Q8 row kernel this CPU runs: `avx512-vnni`, `avx2` or `portable` (benches print it).
pub fn q8_kernel_name() -> &'static str {
    q8_kernel().name
}

/// The fastest Q8 kernel this CPU runs (detected once).
fn q8_kernel() -> Q8Kernel {
    static K: std::sync::OnceLock<Q8Kernel> = std::sync::OnceLock::new();
    *K.get_or_init(|| *q8_kernels().last().expect("the portable kernel"))
}

/// Every Q8 kernel this CPU runs, slowest (the portable reference) first.
fn q8_kernels() -> Vec<Q8Kernel> {
    let mut k = vec![Q8Kernel {
        run: q8_portable,
        name: "portable",
    }];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            k.push(Q8Kernel {
                run: q8_avx2_entry,
                name: "avx2",
            });
        }
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
        {
            k.push(Q8Kernel {
                run: q8_avx512_entry,
                name: "avx512-vnni",
            });
        }
    }
    k
}

/// Reference: per token and block, the exact integer dot product, times the activation scale,
/// then the weight scale, summed over blocks in f32.
fn q8_portable(q: &[i8], s: &[f32], x: &[f32], n: usize, inp: usize, d: &mut [f32]) {
    for t in 0..n {
        let xt = &x[t * inp..(t + 1) * inp];
        let mut acc = 0f32;
        for (b, (qb, &sw)) in q.chunks_exact(Q8_BLOCK).zip(s).enumerate() {
            let dot: i32 = qb
                .iter()
                .enumerate()
                .map(|(j, &w)| w as i32 * act_value(xt, inp, b * Q8_BLOCK + j) as i32)
                .sum();
            acc += (dot as f32 * xt[inp / 2 + b]) * sw;
        }
        d[t] = acc;
    }
}

#[cfg(target_arch = "x86_64")]
fn q8_avx512_entry(q: &[i8], s: &[f32], x: &[f32], n: usize, inp: usize, d: &mut [f32]) {
    // SAFETY: selected only after run-time detection of avx512f, avx512bw and avx512vnni;
    // `Q8Kernel::run` checks `q.len() == inp` (a multiple of 64), `s.len() == inp / 64`,
    // `x.len() >= n * inp` and `d.len() >= n`.
    unsafe { by_tokens!(q8_avx512, n, q, s, x, inp, d) }
}

/// One Q8 row against `N` packed activation rows, one block of 64 weights per step: the
/// block's 64 int8 weights widen to i16 in two ops (shared by every token); per token,
/// `vpmaddwd` and `vpdpwssd` sum the 64 products into 16 i32 lanes (exact), which convert to
/// f32, are multiplied by the activation scale and added times the weight scale: 7 vector ops
/// per block at one token, 2 + 5 per token. Two f32 accumulator chains per token (even and
/// odd blocks) hide the FMA latency.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q8_avx512<const N: usize>(q: &[i8], s: &[f32], x: &[f32], inp: usize, d: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; N];
    let qp = q.as_ptr();
    let sp = s.as_ptr();
    let xp = x.as_ptr();
    // The scales of the rows this prefetch distance reaches (a hint, never a fault).
    _mm_prefetch::<PREFETCH_HINT>(sp.wrapping_add(Q8_PREFETCH_AHEAD / Q8_BLOCK) as *const i8);
    // Block `b` (weights `64·b..`) into accumulator chain `c`.
    macro_rules! block {
        ($b:expr, $c:expr) => {{
            let b = $b;
            let i = b * Q8_BLOCK;
            _mm_prefetch::<PREFETCH_HINT>(qp.wrapping_add(i + Q8_PREFETCH_AHEAD));
            let w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(qp.add(i) as *const __m256i));
            let w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(qp.add(i + 32) as *const __m256i));
            for (t, at) in acc.iter_mut().enumerate() {
                let xt = xp.add(t * inp);
                let xq = xt as *const i16;
                let mut p =
                    _mm512_madd_epi16(w0, _mm512_loadu_si512(xq.add(i) as *const __m512i));
                let x1 = _mm512_loadu_si512(xq.add(i + 32) as *const __m512i);
                // LLVM splits `_mm512_dpwssd_epi32` into `vpmaddwd` + `vpaddd` (one op more
                // per block and token); written out, it stays one instruction.
                // SAFETY: registers only (no memory, no stack); this function is compiled
                // with avx512vnni and runs only where it was detected.
                std::arch::asm!(
                    "vpdpwssd {p}, {w}, {x}",
                    p = inout(zmm_reg) p,
                    w = in(zmm_reg) w1,
                    x = in(zmm_reg) x1,
                    options(pure, nomem, nostack),
                );
                // Activation scale, then weight scale, each a broadcast from memory folded
                // into its instruction (multiplying the two scales first costs a scalar
                // multiply and a register broadcast, on the port the widenings use).
                let v = _mm512_mul_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(*xt.add(inp / 2 + b)));
                at[$c] = _mm512_fmadd_ps(v, _mm512_set1_ps(*sp.add(b)), at[$c]);
            }
        }};
    }
    let nb = inp / Q8_BLOCK;
    let mut b = 0;
    while b + 2 <= nb {
        block!(b, 0);
        block!(b + 1, 1);
        b += 2;
    }
    if b < nb {
        block!(b, 0);
    }
    for (dt, at) in d.iter_mut().zip(&acc) {
        *dt = _mm512_reduce_add_ps(_mm512_add_ps(at[0], at[1]));
    }
}

#[cfg(target_arch = "x86_64")]
fn q8_avx2_entry(q: &[i8], s: &[f32], x: &[f32], n: usize, inp: usize, d: &mut [f32]) {
    // SAFETY: selected only after run-time detection of avx2 and fma; slices as above.
    unsafe { by_tokens!(q8_avx2, n, q, s, x, inp, d) }
}

/// [`q8_avx512`] with 256-bit vectors and without VNNI: per block, four widenings of 16
/// weights, and per token four `vpmaddwd` summed into 8 i32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_avx2<const N: usize>(q: &[i8], s: &[f32], x: &[f32], inp: usize, d: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); N];
    let qp = q.as_ptr();
    let xp = x.as_ptr();
    for (b, &swf) in s.iter().enumerate() {
        let i = b * Q8_BLOCK;
        let w: [__m256i; 4] = std::array::from_fn(|k| {
            _mm256_cvtepi8_epi16(_mm_loadu_si128(qp.add(i + 16 * k) as *const __m128i))
        });
        let sw = _mm256_set1_ps(swf);
        for (t, at) in acc.iter_mut().enumerate() {
            let xt = xp.add(t * inp);
            let xq = xt as *const i16;
            let mut p = _mm256_setzero_si256();
            for (k, wk) in w.iter().enumerate() {
                let xv = _mm256_loadu_si256(xq.add(i + 16 * k) as *const __m256i);
                p = _mm256_add_epi32(p, _mm256_madd_epi16(*wk, xv));
            }
            let sc = _mm256_mul_ps(sw, _mm256_set1_ps(*xt.add(inp / 2 + b)));
            *at = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sc, *at);
        }
    }
    for (dt, at) in d.iter_mut().zip(&acc) {
        *dt = crate::cpu_gemv::sum_lanes256(*at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rnd(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// Bound on |a − b| for two f32 sums of the same `n` terms in different orders and
    /// groupings: each is within γ_n · Σ|terms| of the exact sum (γ_n = n·u / (1 − n·u),
    /// u = 2⁻²⁴), with one more rounding for the product of the scales.
    fn order_bound(n: usize, abs_sum: f64) -> f64 {
        let u = f32::EPSILON as f64 / 2.0;
        let g = (n + 1) as f64 * u / (1.0 - (n + 1) as f64 * u);
        2.0 * g * abs_sum + 1e-30
    }

    /// Every kernel this CPU runs against the portable reference on the same quantized row
    /// and packed activations, for every token count, lengths around the two-block step, and
    /// activations with an outlier, a zero block and tiny values.
    #[test]
    fn every_kernel_matches_the_portable_reference() {
        let kernels = q8_kernels();
        let reference = kernels[0];
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for k in &kernels[1..] {
            for inp in [64, 128, 192, 320, 1024, 1088] {
                for n in 1..=TOKEN_BLOCK {
                    let w = Q8Matrix::quantize(&rnd(&mut rng, inp), 1, inp).unwrap();
                    let mut x = rnd(&mut rng, n * inp);
                    x[3] = 40.0;
                    x[inp * n - 64..].fill(0.0);
                    if inp * n >= 128 {
                        x[inp * n - 70] *= 1e-20;
                    }
                    let mut xp = vec![0f32; x.len()];
                    for (s, d) in x.chunks(inp).zip(xp.chunks_mut(inp)) {
                        pack_activations(s, d);
                    }
                    let (mut got, mut want) = ([f32::NAN; 8], [f32::NAN; 8]);
                    k.run(w.row_q(0), w.row_scales(0), &xp, n, &mut got);
                    reference.run(w.row_q(0), w.row_scales(0), &xp, n, &mut want);
                    let deq = w.dequantize();
                    for t in 0..n {
                        let xr = round_activations(&x[t * inp..(t + 1) * inp]);
                        let abs: f64 = (0..inp).map(|i| (deq[i] as f64 * xr[i] as f64).abs()).sum();
                        assert!(
                            ((got[t] - want[t]) as f64).abs() <= order_bound(inp, abs),
                            "{} inp {inp} n {n} t {t}: {} vs {}",
                            k.name,
                            got[t],
                            want[t]
                        );
                    }
                }
            }
        }
    }

    /// The packed layout round-trips through [`round_activations`] within half a step, and a
    /// non-finite value makes its block's scale NaN.
    #[test]
    fn activations_round_to_half_a_step() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let mut x = rnd(&mut rng, 192);
        x[70] = -1e3;
        x[128..].iter_mut().for_each(|v| *v *= 1e-30);
        let r = round_activations(&x);
        for b in 0..3 {
            let xb = &x[b * 64..(b + 1) * 64];
            let step = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 32767.0;
            for (i, (&v, &q)) in xb.iter().zip(&r[b * 64..]).enumerate() {
                let err = (v as f64 - q as f64).abs();
                assert!(err <= 0.51 * step, "block {b} value {i}: {v} -> {q}");
            }
        }
        x[5] = f32::NAN;
        let r = round_activations(&x);
        assert!(r[..64].iter().all(|v| v.is_nan()) && r[64..].iter().all(|v| v.is_finite()));
    }

    /// The row dequantization (AVX-512 where the CPU has it) rounds exactly as the scalar
    /// blocks, into a plain row and into the tiles' stage: rows of quantized weights, and raw
    /// rows of random int8 values with random scales.
    #[test]
    fn row_dequantization_matches_the_scalar_blocks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let bits = |v: &[bf16]| v.iter().map(|b| b.to_bits()).collect::<Vec<_>>();
        let scalar = |q: &[i8], s: &[f32]| {
            let mut want = vec![bf16::NAN; q.len()];
            for (k, (qb, out)) in q
                .chunks_exact(32)
                .zip(want.chunks_exact_mut(32))
                .enumerate()
            {
                dequant_chunk(qb, s[k / 2], out.try_into().unwrap());
            }
            want
        };
        for (rows, cols) in [(3, 64), (16, 192), (32, 1024)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-1.5f32..0.7))
                .collect();
            let q = Q8Matrix::quantize(&w, rows, cols).unwrap();
            // The stage takes whole tiles of 16 rows.
            let mut st = cpu_amx::Staged::new();
            let staged = rows.is_multiple_of(16);
            if staged {
                q.stage(0, rows, &mut st);
            }
            for r in 0..rows {
                let want = scalar(&q.row_q(r)[..cols], q.row_scales(r));
                let mut fast = vec![bf16::NAN; cols];
                q.dequant_row(r, &mut fast[..]);
                assert_eq!(bits(&fast), bits(&want), "{rows}x{cols} row {r}");
                for b in (0..cols / 32).filter(|_| staged) {
                    let got = *st.chunk_mut(r, b);
                    let wb = &want[b * 32..(b + 1) * 32];
                    assert_eq!(
                        bits(&got),
                        bits(wb),
                        "staged {rows}x{cols} row {r} block {b}"
                    );
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512bf16") {
            for _ in 0..200 {
                let q: Vec<i8> = (0..128).map(|_| rng.random()).collect();
                let s: Vec<f32> = (0..2)
                    .map(|_| f32::from_bits(rng.random_range(0x3000_0000..0x4000_0000)))
                    .collect();
                let mut fast = vec![bf16::NAN; 128];
                // SAFETY: detected above; 128 values, 2 scales, 128 slots.
                unsafe { dequant_row_avx512(&q, &s, &mut fast[..]) };
                assert_eq!(bits(&fast), bits(&scalar(&q, &s)), "scales {s:?}");
            }
        }
    }

    #[test]
    fn rows_start_on_cache_lines_and_memory_is_about_one_byte_per_weight() {
        let w = Q8Matrix::quantize(&vec![0.5f32; 3 * 1088], 3, 1088).unwrap();
        for r in 0..3 {
            assert_eq!(w.row_q(r).as_ptr() as usize % 64, 0);
        }
        let big = Q8Matrix::quantize(&vec![bf16::ONE; 256 * 1024], 256, 1024).unwrap();
        assert_eq!(big.memory_bytes(), 256 * 1024 * 17 / 16);
    }
}
