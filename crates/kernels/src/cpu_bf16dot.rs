//! A bf16 row kernel on AVX512-BF16's `vdpbf16ps`, for CPUs that have it but no AMX tiles
//! (AMD Zen 4/5, Intel Cooper Lake), or steps too small for the tiles.
//!
//! `vdpbf16ps` multiplies 16 pairs of bf16 values by 16 other pairs and adds each pair's two
//! products into one f32 lane: 32 multiply-adds per instruction, against 16 for a 512-bit FMA
//! plus the shift or mask that widens bf16 weights to f32 in [`crate::cpu_gemv`]'s row
//! kernels. The weights are read as they lie in memory (a row of bf16 is a row of pairs); the
//! activations are rounded to bf16 (to nearest even, as the AMX packing rounds them:
//! [`crate::cpu_amx::round_pairs`]) and stored as pairs ([`Pairs`]). Products of bf16 values
//! are exact in f32 and the sums are f32, so for activations that are bf16 values already
//! only the summation order differs from the FMA kernels (`vdpbf16ps` reads bf16 denormals
//! as zero and flushes f32 denormal results).
//!
//! Used where [`take`] says so: bf16 weights, activations that are bf16 values already (a
//! bf16 model's hidden states: [`crate::cpu_gemv`]'s dense products, and an expert group's
//! input in [`crate::cpu_moe`], whose SiLU·mul products are then rounded to bf16 before the
//! down projection, as on the tiles), at least [`min_tokens`] rows, AVX512-BF16 detected, and
//! `SWITCHYARD_BF16_DOT` not `0`. The AMX tiles, where they apply, go first.
//!
//! Quantized weights (Q8, Q4) take it too, on any activations rounded to bf16, where the tiles
//! do not ([`crate::cpu_q8::set_tiles`] switches both): each row is dequantized to bf16 once
//! per product (`q · scale`, `q · d + m`, as the tiles' stage holds it) and multiplied by every
//! token. So a CPU without AMX (AMD Zen 4/5) rounds what an AMX CPU rounds at prefill. Before,
//! it ran the integer row kernels there, whose 8-bit activations (Q4) put the SmolLM2 demo
//! 0.194 RMS from the f32 logits over 1000 tokens and flipped its near-tied first answer
//! token (NOTES.md, session 10).

use half::bf16;

use crate::cpu_gemv::{Tiles, TOKEN_BLOCK};

/// Whether this CPU runs the kernel (AVX512F and AVX512-BF16) and `SWITCHYARD_BF16_DOT` is not
/// `0` (checked once).
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !crate::env_off("SWITCHYARD_BF16_DOT") && detected())
}

/// Whether the CPU has the instructions, whatever the switch says.
fn detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Fewest activation rows for which this kernel replaces the FMA row kernels: prefill and
/// expert groups of prefill size, not decode. Measured on the dev VM (2026-11-29, AMX off):
/// the kernel alone (`speed` below, one thread, 1024-wide rows) against the FMA kernel ×1.2
/// (1 token) to ×1.4 (2–4) with weights in L2 but ×1.00–1.06 from DRAM, where decode reads
/// them; the `small` preset bf16 (`switchyard bench --prompt-len 128 --gen-len 64`) prefilled
/// 173–196 → 222–232 tok/s at batch 1 and decoded within the noise (30.6–36.5 → 32.7–37.3
/// tok/s with the kernel from 1 token; 29.7–41.0 with it from 8, i.e. decode on the FMA
/// kernel). At 8 the rows it rounds to bf16 are those the AMX tiles round on CPUs that have
/// them, so both kinds of CPU compute the same values up to summation order.
const DEFAULT_MIN_TOKENS: usize = 8;

/// [`DEFAULT_MIN_TOKENS`], or `SWITCHYARD_BF16_DOT_MIN_TOKENS` (read once; a knob for tuning on
/// other CPUs).
pub(crate) fn min_tokens() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| crate::env_count("SWITCHYARD_BF16_DOT_MIN_TOKENS", DEFAULT_MIN_TOKENS))
}

/// Whether `tokens` activation rows multiplying weights that take this kernel on `inputs`
/// ([`crate::cpu_gemv::WeightRows::bf16_dot`]) go through it; `exact` says whether they are
/// bf16 values already (asked last, and only for [`Tiles::ExactInputs`]).
pub(crate) fn take(tokens: usize, inputs: Tiles, exact: impl FnOnce() -> bool) -> bool {
    enabled()
        && tokens >= min_tokens()
        && match inputs {
            Tiles::No => false,
            Tiles::ExactInputs => exact(),
            Tiles::RoundedInputs => true,
        }
}

/// Tokens [`Pairs::from_columns`] gathers per pass over the columns: 16 f32 are one 64-byte
/// cache line of each column, and 16 rows of 4096 inputs (256 KiB) stay in L2.
const COLUMN_BLOCK: usize = 16;

/// Activation rows rounded to bf16, each stored as `cols.div_ceil(2)` pairs (the even input
/// in the low half; a zero high half after an odd last input).
pub(crate) struct Pairs {
    words: Vec<u32>,
    stride: usize,
    cols: usize,
}

impl Pairs {
    /// Packs `tokens` rows of `cols` values; `row(t)` is token `t`'s row.
    pub(crate) fn from_rows<'a>(
        tokens: usize,
        cols: usize,
        row: impl Fn(usize) -> &'a [f32],
    ) -> Self {
        let stride = cols.div_ceil(2);
        let mut words = vec![0u32; tokens * stride];
        for (t, dst) in words
            .chunks_exact_mut(stride.max(1))
            .enumerate()
            .take(tokens)
        {
            let src = row(t);
            assert_eq!(src.len(), cols);
            crate::cpu_amx::round_pairs(src, dst);
        }
        Self {
            words,
            stride,
            cols,
        }
    }

    /// Packs row-major `[tokens, cols]` activations.
    pub(crate) fn new(x: &[f32], tokens: usize, cols: usize) -> Self {
        Self::from_rows(tokens, cols, |t| &x[t * cols..(t + 1) * cols])
    }

    /// Packs the transpose of row-major `[cols, tokens]` values: token `t`'s row is column `t`.
    /// Columns are gathered [`COLUMN_BLOCK`] tokens at a time, so `a` is read in order (one
    /// token at a time read each value from its own cache line: 4.5% of a q4 prefill).
    pub(crate) fn from_columns(a: &[f32], cols: usize, tokens: usize) -> Self {
        assert_eq!(a.len(), cols * tokens);
        let mut rows = vec![0f32; COLUMN_BLOCK * cols];
        let mut p = Self::from_rows(0, cols, |_| &[]);
        let stride = p.stride;
        p.words.resize(tokens * stride, 0);
        for t0 in (0..tokens).step_by(COLUMN_BLOCK) {
            let n = COLUMN_BLOCK.min(tokens - t0);
            for c in 0..cols {
                for (k, &v) in a[c * tokens + t0..][..n].iter().enumerate() {
                    rows[k * cols + c] = v;
                }
            }
            for k in 0..n {
                let dst = &mut p.words[(t0 + k) * stride..(t0 + k + 1) * stride];
                crate::cpu_amx::round_pairs(&rows[k * cols..(k + 1) * cols], dst);
            }
        }
        p
    }

    /// Activation rows held.
    pub(crate) fn tokens(&self) -> usize {
        self.words.len().checked_div(self.stride).unwrap_or(0)
    }
}

/// `d[k] = row · x[t0 + k]` for `k < n` (1 ..= [`TOKEN_BLOCK`]) with `row` one weight row of
/// `x`'s width.
#[inline]
pub(crate) fn dot(row: &[bf16], x: &Pairs, t0: usize, n: usize, d: &mut [f32]) {
    assert!(row.len() == x.cols && (1..=TOKEN_BLOCK).contains(&n));
    assert!(t0 + n <= x.tokens() && d.len() >= n);
    let xs = &x.words[t0 * x.stride..(t0 + n) * x.stride];
    #[cfg(target_arch = "x86_64")]
    if detected() {
        // SAFETY: avx512f/avx512bf16 detected; `xs` holds `n` rows of `stride` pairs for
        // `row.len()` inputs (checked above) and `d` at least `n` values.
        unsafe {
            let s = x.stride;
            match n {
                1 => row_dot::<1, 4>(row, xs, s, d),
                2 => row_dot::<2, 2>(row, xs, s, d),
                3 => row_dot::<3, 2>(row, xs, s, d),
                4 => row_dot::<4, 2>(row, xs, s, d),
                5 => row_dot::<5, 2>(row, xs, s, d),
                6 => row_dot::<6, 1>(row, xs, s, d),
                7 => row_dot::<7, 1>(row, xs, s, d),
                _ => row_dot::<8, 1>(row, xs, s, d),
            }
        }
        return;
    }
    row_portable(row, xs, x.stride, n, d)
}

/// `out[k · T + t] = w[k] · x[t]` for the rows `w[k]` of `w` (`cols` each, row-major) and
/// every token `t < T` of `x`: per block of [`TOKEN_BLOCK`] tokens, every row (the weights
/// stay in cache while the activations stream by once per call).
pub(crate) fn dot_rows(w: &[bf16], cols: usize, x: &Pairs, out: &mut [f32]) {
    let tokens = x.tokens();
    if tokens == 0 || cols == 0 {
        return;
    }
    for t0 in (0..tokens).step_by(TOKEN_BLOCK) {
        let n = TOKEN_BLOCK.min(tokens - t0);
        for (row, dst) in w.chunks_exact(cols).zip(out.chunks_exact_mut(tokens)) {
            dot(row, x, t0, n, &mut dst[t0..t0 + n]);
        }
    }
}

/// The value of the bf16 in half `hi` (0 low, 1 high) of a pair.
#[inline]
fn half_of(word: u32, hi: usize) -> f32 {
    f32::from_bits(if hi == 1 {
        word & 0xffff_0000
    } else {
        word << 16
    })
}

/// Reference: the same products as [`row_dot`], summed in order.
fn row_portable(row: &[bf16], x: &[u32], stride: usize, n: usize, d: &mut [f32]) {
    for (t, dt) in d.iter_mut().enumerate().take(n) {
        let xr = &x[t * stride..];
        *dt = row
            .iter()
            .enumerate()
            .map(|(i, w)| w.to_f32() * half_of(xr[i / 2], i % 2))
            .sum();
    }
}

/// One bf16 weight row against `N` rows of pairs (`stride` pairs apart): `U` × 16 pairs per
/// step, each of the `U` slices into its own accumulators (at one token, four chains hide the
/// instruction's latency); masked loads for the last partial 16 pairs, the odd last input in
/// scalar code.
///
/// # Safety
/// AVX512F and AVX512-BF16 are available; `x` holds `N` rows of `stride ≥ row.len().div_ceil(2)`
/// pairs; `d.len() >= N`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn row_dot<const N: usize, const U: usize>(
    row: &[bf16],
    x: &[u32],
    stride: usize,
    d: &mut [f32],
) {
    use crate::cpu_gemv::PREFETCH_HINT;
    use std::arch::x86_64::*;
    /// bf16 weights prefetched ahead, as `cpu_gemv`'s FMA kernel does (4 KiB).
    const AHEAD: usize = 2048;
    let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
    let inp = row.len();
    let pairs = inp / 2;
    let whole = pairs / (16 * U) * (16 * U);
    let wp = row.as_ptr() as *const u32;
    let wh = row.as_ptr() as *const u16;
    let xp = x.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); N]; U];
    let mut j = 0;
    while j < whole {
        for (u, au) in acc.iter_mut().enumerate() {
            let at = j + 16 * u;
            // A hint, never a fault: the address may lie past the matrix.
            _mm_prefetch::<PREFETCH_HINT>(wh.wrapping_add(2 * at + AHEAD) as *const i8);
            let w = bh(_mm512_loadu_si512(wp.add(at) as *const __m512i));
            for (t, a) in au.iter_mut().enumerate() {
                let xv = bh(_mm512_loadu_si512(xp.add(t * stride + at) as *const __m512i));
                *a = _mm512_dpbf16_ps(*a, w, xv);
            }
        }
        j += 16 * U;
    }
    while j < pairs {
        let left = pairs - j;
        let m: __mmask16 = if left >= 16 {
            !0
        } else {
            ((1u32 << left) - 1) as u16
        };
        let w = bh(_mm512_maskz_loadu_epi32(m, wp.add(j) as *const i32));
        for (t, a) in acc[0].iter_mut().enumerate() {
            let xv = bh(_mm512_maskz_loadu_epi32(
                m,
                xp.add(t * stride + j) as *const i32,
            ));
            *a = _mm512_dpbf16_ps(*a, w, xv);
        }
        j += 16;
    }
    for t in 0..N {
        let mut v = acc[0][t];
        for au in &acc[1..] {
            v = _mm512_add_ps(v, au[t]);
        }
        let mut s = _mm512_reduce_add_ps(v);
        if inp % 2 == 1 {
            s += row[inp - 1].to_f32() * half_of(x[t * stride + pairs], 0);
        }
        d[t] = s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Packing the transpose of `[cols, tokens]` values gives the words packing the
    /// transposed rows gives, for odd widths and token counts around the gather block.
    #[test]
    fn columns_pack_as_their_transposed_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for (cols, tokens) in [(1, 1), (7, 15), (64, 16), (33, 17), (1536, 40)] {
            let a: Vec<f32> = (0..cols * tokens)
                .map(|_| rng.random_range(-3.0..3.0))
                .collect();
            let rows: Vec<f32> = (0..tokens * cols)
                .map(|i| a[(i % cols) * tokens + i / cols])
                .collect();
            let got = Pairs::from_columns(&a, cols, tokens);
            let want = Pairs::new(&rows, tokens, cols);
            assert_eq!(got.tokens(), tokens);
            assert!(got.words == want.words, "{cols}x{tokens}");
        }
    }

    fn random_bf16(rng: &mut impl Rng, n: usize) -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
            .collect()
    }

    /// The kernel against f64 sums of the bf16-rounded operands, for every token count, odd
    /// widths and widths around the 16- and 64-pair steps, at offsets into the packed rows.
    /// Activations are not bf16 values, so the rounding is checked too; an input order
    /// swapped within a pair, or pairs misplaced, fails by far more than the bound.
    #[test]
    fn matches_f64_on_bf16_rounded_operands() {
        if !detected() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for cols in [
            1, 2, 3, 31, 32, 33, 63, 64, 65, 127, 128, 130, 1000, 1024, 1057,
        ] {
            let tokens = 11;
            let w = random_bf16(&mut rng, 3 * cols);
            let x: Vec<f32> = (0..tokens * cols)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let p = Pairs::new(&x, tokens, cols);
            for r in 0..3 {
                let row = &w[r * cols..(r + 1) * cols];
                for n in 1..=TOKEN_BLOCK {
                    for t0 in [0, tokens - n] {
                        let mut d = [f32::NAN; TOKEN_BLOCK];
                        dot(row, &p, t0, n, &mut d);
                        for k in 0..n {
                            let xr = &x[(t0 + k) * cols..][..cols];
                            let want: f64 = row
                                .iter()
                                .zip(xr)
                                .map(|(w, &v)| w.to_f64() * bf16::from_f32(v).to_f64())
                                .sum();
                            assert!(
                                (d[k] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "cols {cols} row {r} n {n} t{}: {} vs {want}",
                                t0 + k,
                                d[k]
                            );
                        }
                    }
                }
            }
        }
    }

    /// Row and column packing agree, round to nearest even as `half` does, and an odd last
    /// input gets a zero partner.
    #[test]
    fn packing_rounds_in_pairs() {
        let (tokens, cols) = (5, 67);
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let x: Vec<f32> = (0..tokens * cols)
            .map(|_| rng.random_range(-3.0f32..3.0))
            .collect();
        let mut xt = vec![0f32; x.len()];
        for t in 0..tokens {
            for c in 0..cols {
                xt[c * tokens + t] = x[t * cols + c];
            }
        }
        let (p, pt) = (
            Pairs::new(&x, tokens, cols),
            Pairs::from_columns(&xt, cols, tokens),
        );
        assert_eq!(p.words, pt.words);
        assert_eq!(p.tokens(), tokens);
        for t in 0..tokens {
            for c in 0..cols {
                let got = half_of(p.words[t * p.stride + c / 2], c % 2);
                assert_eq!(got, bf16::from_f32(x[t * cols + c]).to_f32());
            }
            assert_eq!(p.words[t * p.stride + cols / 2] >> 16, 0);
        }
    }

    /// Kernel throughput against the FMA row kernel (`cargo test --release -p
    /// switchyard-kernels bf16dot::tests::speed -- --ignored --nocapture`): one thread,
    /// weights from L2 (compute) and from DRAM (memory), 1..=8 tokens.
    #[test]
    #[ignore]
    fn speed() {
        if !detected() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let k = crate::cpu_gemv::row_kernel();
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let cols = 1024;
        for (what, rows) in [("L2 256 KiB", 128usize), ("DRAM 256 MiB", 131072)] {
            let w = random_bf16(&mut rng, rows * cols);
            for n in 1..=TOKEN_BLOCK {
                let x: Vec<f32> = (0..n * cols)
                    .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_f32())
                    .collect();
                let mut xf = vec![0f32; x.len()];
                k.packing().pack(&x, cols, &mut xf);
                let p = Pairs::new(&x, n, cols);
                let reps = (1 << 28) / (rows * cols);
                let mut d = [0f32; TOKEN_BLOCK];
                let mut best = [f64::MAX; 2];
                for _ in 0..5 {
                    for (which, b) in best.iter_mut().enumerate() {
                        let t = std::time::Instant::now();
                        for _ in 0..reps.max(1) {
                            for r in 0..rows {
                                let row = &w[r * cols..(r + 1) * cols];
                                if which == 0 {
                                    k.run(row, &xf, n, cols, &mut d);
                                } else {
                                    dot(row, &p, 0, n, &mut d);
                                }
                                std::hint::black_box(&d);
                            }
                        }
                        let bytes = (reps.max(1) * rows * cols * 2) as f64;
                        *b = b.min(t.elapsed().as_secs_f64() / bytes * 1e9);
                    }
                }
                eprintln!(
                    "{what} n={n}: fma {:.1} GB/s, vdpbf16ps {:.1} GB/s ({:.2}x)",
                    1.0 / best[0],
                    1.0 / best[1],
                    best[0] / best[1]
                );
            }
        }
    }
}
