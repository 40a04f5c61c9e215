//! Matrix products on the CPU with bf16 weights and f32 activations: `y[t] = W · x[t]`.
//!
//! Decode is bound by the bytes of weights read per token. Generic GEMM libraries convert bf16
//! weights block by block and tune for large M (candle's bf16 CPU matmul ran a 128-token
//! prefill of the `small` preset at 3.5 tok/s); here each weight row is widened to f32 in
//! registers (bf16 → f32 is a 16-bit shift) and multiplied into f32 accumulators for
//! [`TOKEN_BLOCK`] activation rows at a time. Work is split by blocks of output rows across
//! threads (rayon); a block's weights stay in cache while every token block passes over them.
//! AVX-512F and AVX2+FMA paths are chosen at run time; a portable loop is the reference.

use half::bf16;
use rayon::prelude::*;

use crate::KernelError;

/// Activation rows multiplied per pass over a weight row: 8 accumulators of 16 lanes fit the
/// 32 AVX-512 registers with room for the weights and activations.
pub const TOKEN_BLOCK: usize = 8;

/// bf16 weights (2 KiB) the AVX-512 kernel prefetches ahead of its loads. Interleaved A/B runs
/// on the 2-core dev VM (4096×4096, 1536×576, 768×1024, 1024×384 at one token): 512 / 1024 /
/// 2048 elements gave +13…+38% mean bytes/s over no prefetch, 1024 the best; the hardware
/// prefetcher alone leaves the two cores at about a quarter of the measured bandwidth.
const PREFETCH_AHEAD: usize = 1024;

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
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
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
    if tokens == 0 {
        return Err(KernelError::InvalidArgument(
            "gemv_bf16 needs at least one token".into(),
        ));
    }
    if x.len() != tokens * inp || w.len() != out * inp || y.len() != tokens * out {
        return Err(KernelError::InvalidArgument(format!(
            "gemv_bf16 shapes: x {} (want {}), w {} (want {}), y {} (want {})",
            x.len(),
            tokens * inp,
            w.len(),
            out * inp,
            y.len(),
            tokens * out
        )));
    }
    // Compute into a row-major [out, tokens] scratch so each task owns a contiguous range, then
    // transpose into y (tokens × out is tiny next to the weights).
    let kernel = row_kernel();
    // One token (decode): `[out, 1]` is already y's layout, so write it in place.
    let mut scratch = Vec::new();
    let acc: &mut [f32] = if tokens == 1 {
        y
    } else {
        scratch.resize(out * tokens, 0f32);
        &mut scratch
    };
    acc.par_chunks_mut(ROWS_PER_TASK * tokens)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let r0 = chunk * ROWS_PER_TASK;
            for t0 in (0..tokens).step_by(TOKEN_BLOCK) {
                let n = TOKEN_BLOCK.min(tokens - t0);
                let xs = &x[t0 * inp..(t0 + n) * inp];
                for (j, d) in dst.chunks_mut(tokens).enumerate() {
                    let row = &w[(r0 + j) * inp..(r0 + j + 1) * inp];
                    kernel(row, xs, n, inp, &mut d[t0..t0 + n]);
                }
            }
        });
    if tokens > 1 {
        for o in 0..out {
            for t in 0..tokens {
                y[t * out + o] = scratch[o * tokens + t];
            }
        }
    }
    Ok(())
}

/// A kernel computing one weight row against `tokens` (≤ [`TOKEN_BLOCK`]) activation rows.
pub(crate) type RowKernel = fn(&[bf16], &[f32], usize, usize, &mut [f32]);

/// The fastest row kernel this CPU runs (detected once).
pub(crate) fn row_kernel() -> RowKernel {
    static K: std::sync::OnceLock<RowKernel> = std::sync::OnceLock::new();
    *K.get_or_init(select_kernel)
}

fn select_kernel() -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return row_avx512_entry;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return row_avx2_entry;
        }
    }
    row_portable
}

/// Reference: one weight row against every token.
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
/// are a fixed-size array the compiler keeps in registers.
macro_rules! by_tokens {
    ($f:ident, $row:expr, $x:expr, $tokens:expr, $inp:expr, $d:expr) => {
        match $tokens {
            1 => $f::<1>($row, $x, $inp, $d),
            2 => $f::<2>($row, $x, $inp, $d),
            3 => $f::<3>($row, $x, $inp, $d),
            4 => $f::<4>($row, $x, $inp, $d),
            5 => $f::<5>($row, $x, $inp, $d),
            6 => $f::<6>($row, $x, $inp, $d),
            7 => $f::<7>($row, $x, $inp, $d),
            _ => $f::<8>($row, $x, $inp, $d),
        }
    };
}

#[cfg(target_arch = "x86_64")]
fn row_avx512_entry(row: &[bf16], x: &[f32], tokens: usize, inp: usize, d: &mut [f32]) {
    // SAFETY: selected only after run-time detection of avx512f; slices are checked by the
    // caller (`row.len() == inp`, `x.len() >= tokens * inp`, `d.len() >= tokens`).
    unsafe { by_tokens!(row_avx512, row, x, tokens, inp, d) }
}

/// One bf16 weight row against `N` activation rows. Two accumulator chains per token hide the
/// FMA latency when `N` is small (decode).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_avx512<const N: usize>(row: &[bf16], x: &[f32], inp: usize, d: &mut [f32]) {
    use std::arch::x86_64::*;
    let n32 = inp / 32 * 32;
    let mut a0 = [_mm512_setzero_ps(); N];
    let mut a1 = [_mm512_setzero_ps(); N];
    let wp = row.as_ptr() as *const u16;
    let xp = x.as_ptr();
    let mut i = 0;
    while i < n32 {
        // A hint, never a fault: the address may lie past the matrix.
        _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH_AHEAD) as *const i8);
        // 16 bf16 → 16 f32: zero-extend to 32 bits and shift into the high half.
        let h0 = _mm256_loadu_si256(wp.add(i) as *const __m256i);
        let h1 = _mm256_loadu_si256(wp.add(i + 16) as *const __m256i);
        let w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h0), 16));
        let w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h1), 16));
        for t in 0..N {
            a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp.add(t * inp + i)), a0[t]);
            a1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(t * inp + i + 16)), a1[t]);
        }
        i += 32;
    }
    for t in 0..N {
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
        for j in n32..inp {
            s += row[j].to_f32() * x[t * inp + j];
        }
        d[t] = s;
    }
}

#[cfg(target_arch = "x86_64")]
fn row_avx2_entry(row: &[bf16], x: &[f32], tokens: usize, inp: usize, d: &mut [f32]) {
    // SAFETY: selected only after run-time detection of avx2 and fma; slices as above.
    unsafe { by_tokens!(row_avx2, row, x, tokens, inp, d) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2<const N: usize>(row: &[bf16], x: &[f32], inp: usize, d: &mut [f32]) {
    use std::arch::x86_64::*;
    let n8 = inp / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); N];
    let wp = row.as_ptr() as *const u16;
    let xp = x.as_ptr();
    let mut i = 0;
    while i < n8 {
        let h = _mm_loadu_si128(wp.add(i) as *const __m128i);
        let wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        for (t, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(t * inp + i)), *a);
        }
        i += 8;
    }
    for t in 0..N {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[t]);
        let mut s: f32 = lanes.iter().sum();
        for j in n8..inp {
            s += row[j].to_f32() * x[t * inp + j];
        }
        d[t] = s;
    }
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
    let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut y = vec![0f32; tokens * out];
    gemv_bf16(&xv, tokens, wslice, out, inp, &mut y)?;
    let t = candle_core::Tensor::from_vec(y, (tokens, out), x.device())?;
    Ok(Some(t.to_dtype(x.dtype())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_f64_reference_for_odd_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for &(tokens, out, inp) in &[
            (1, 1, 1),
            (1, 130, 37),
            (3, 200, 64),
            (8, 65, 1000),
            (5, 7, 16),
            (21, 70, 48),
        ] {
            let w: Vec<bf16> = (0..out * inp)
                .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
                .collect();
            let x: Vec<f32> = (0..tokens * inp)
                .map(|_| rng.random_range(-1.0..1.0))
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
                        "t{t} o{o}: {got} vs {want}"
                    );
                }
            }
        }
        assert!(gemv_bf16(&[], 0, &[bf16::ZERO; 2], 1, 2, &mut []).is_err());
        assert!(gemv_bf16(&[0.0; 3], 1, &[bf16::ZERO; 2], 1, 2, &mut [0.0; 1]).is_err());
    }
}
