//! Quantized weight-only kernels against plain arithmetic: Q8's quantization error bound per
//! weight and its product's error bound against unquantized f32 weights (derived in `cpu_q8`'s
//! module docs), and the MoE / MLP passes of both formats (Q8, Q4) against
//! dequantize-then-f64 loops. Q4's own bounds are `cpu_q4`'s unit tests.

use candle_core::{DType, Device, Tensor};
use half::bf16;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use switchyard_kernels::cpu_moe::ExpertDims;
use switchyard_kernels::cpu_q8::{gemv_q8, round_activations, set_tiles, Q8Matrix, Q8_BLOCK};
use switchyard_kernels::cpu_quant::{
    experts_forward_quant, experts_quant, linear_quant, mlp_forward_quant, mlp_quant, QuantExperts,
    QuantKind, QuantMatrix, QuantMlp,
};
use switchyard_kernels::{dispatch, gate_topk, GateConfig};

type Rng64 = rand::rngs::StdRng;

fn rnd(rng: &mut Rng64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A tensor's values as f32, in row-major order.
fn f32_values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// These tests check the row kernels' contract (16-bit activations, exact dequantized weights),
/// so every product stays on them: the AMX tile path rounds both to bf16 and has its own
/// tests (`cpu_q8`'s unit tests, `switchyard-model`'s `tests/q8.rs`). Every test here calls
/// this first, so the process-wide switch only ever moves one way.
fn row_kernels_only() {
    set_tiles(false);
}

/// Unit roundoff of f32.
const U: f64 = f32::EPSILON as f64 / 2.0;

/// γ_n: the relative bound on an f32 sum of `n` products against exact arithmetic.
fn gamma(n: usize) -> f64 {
    let nu = (n + 1) as f64 * U;
    nu / (1.0 - nu)
}

/// Checks `|w − q·scale| ≤ scale / 2` (in f64, where `q·scale` is exact) and that each
/// block's scale is its `max|w| / 127` rounded to f32 (or one ulp up).
fn check_round_trip(w: &[f32], m: &Q8Matrix) {
    let (rows, cols, b) = (m.rows(), m.cols(), Q8_BLOCK);
    for r in 0..rows {
        let (q, s) = (m.row_q(r), m.row_scales(r));
        for (blk, sc) in s.iter().enumerate() {
            let wb = &w[r * cols + blk * b..r * cols + (blk + 1) * b];
            let max = wb.iter().fold(0f64, |a, v| a.max(v.abs() as f64));
            let want = (max / 127.0) as f32;
            assert!(
                *sc == want || *sc == f32::from_bits(want.to_bits() + 1),
                "row {r} block {blk}: scale {sc} for max {max}"
            );
        }
        for c in 0..cols {
            let sc = s[c / b] as f64;
            let err = (w[r * cols + c] as f64 - q[c] as f64 * sc).abs();
            assert!(
                err <= sc / 2.0 * (1.0 + 1e-9),
                "[{r}, {c}] w {} q {} scale {sc}: error {err}",
                w[r * cols + c],
                q[c]
            );
        }
    }
}

#[test]
fn quantize_round_trip_is_within_half_a_step() {
    let mut rng = Rng64::seed_from_u64(1);
    let block = Q8_BLOCK;
    for &(rows, cols) in &[(1, 64), (3, 192), (70, 1024), (5, 1088)] {
        let mut w = rnd(&mut rng, rows * cols, 0.05);
        // An all-zero block, a block of tiny values, an outlier and subnormals.
        w[..block].fill(0.0);
        if rows * cols >= 4 * block {
            w[block..2 * block].iter_mut().for_each(|v| *v *= 1e-30);
            w[2 * block + 5] = 3.0;
            w[3 * block] = f32::from_bits(3);
        }
        let m = Q8Matrix::quantize(&w, rows, cols).unwrap();
        check_round_trip(&w, &m);
        // From bf16: the same as quantizing the widened values.
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let wf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let mb = Q8Matrix::quantize(&wb, rows, cols).unwrap();
        check_round_trip(&wf, &mb);
        assert_eq!(
            mb.dequantize(),
            Q8Matrix::quantize(&wf, rows, cols).unwrap().dequantize()
        );
    }
}

#[test]
fn quantize_errors_name_the_problem() {
    row_kernels_only();
    let msg = |r: Result<Q8Matrix, switchyard_kernels::KernelError>| r.unwrap_err().to_string();
    assert!(msg(Q8Matrix::quantize::<f32>(&[], 0, 64)).contains("empty"));
    assert!(msg(Q8Matrix::quantize(&[0f32; 96], 1, 96)).contains("not a multiple of 64"));
    assert!(msg(Q8Matrix::quantize(&[0f32; 100], 2, 64)).contains("100 values"));
    let mut w = vec![0.5f32; 3 * 64];
    w[64 + 7] = f32::NAN;
    assert!(msg(Q8Matrix::quantize(&w, 3, 64)).contains("[1, 7] is not finite"));
    w[64 + 7] = f32::INFINITY;
    assert!(msg(Q8Matrix::quantize(&w, 3, 64)).contains("[1, 7]"));
    let m = Q8Matrix::quantize(&[0.5f32; 128], 2, 64).unwrap();
    assert!(gemv_q8(&[0.0; 64], 0, &m, &mut []).is_err());
    assert!(gemv_q8(&[0.0; 63], 1, &m, &mut [0.0; 2]).is_err());
    assert!(gemv_q8(&[0.0; 64], 1, &m, &mut [0.0; 3]).is_err());
}

/// `gemv_q8` against the product with the unquantized f32 weights and activations, in f64.
/// Per output the bound is Σ_i (scale_b(i) / 2)·|x_i| (weights) + Σ_i |deq_i|·0.51·xs_b(i)
/// (activations rounded to 16 bits, `xs = max_b|x| / 32767`, half a step plus the rounding of
/// `x / xs`) + (γ_n + u)·Σ_i |deq_i·x_i| (f32 sums and scale products). Against the
/// dequantized weights times the rounded activations ([`round_activations`]) only the last
/// term remains.
fn check_gemv(rng: &mut Rng64, tokens: usize, out: usize, inp: usize) {
    row_kernels_only();
    let w = rnd(rng, out * inp, 0.1);
    let mut x = rnd(rng, tokens * inp, 1.0);
    x[0] = 8.0; // an outlier coarsens its block's activation grid
    let m = Q8Matrix::quantize(&w, out, inp).unwrap();
    let deq = m.dequantize();
    let mut y = vec![f32::NAN; tokens * out];
    gemv_q8(&x, tokens, &m, &mut y).unwrap();
    for t in 0..tokens {
        let xt = &x[t * inp..(t + 1) * inp];
        let xr = round_activations(xt);
        let step: Vec<f64> = xt
            .chunks(Q8_BLOCK)
            .map(|b| b.iter().fold(0f64, |a, v| a.max(v.abs() as f64)) / 32767.0)
            .collect();
        for o in 0..out {
            let s = m.row_scales(o);
            let (mut exact, mut on_deq, mut quant, mut mag) = (0f64, 0f64, 0f64, 0f64);
            for i in 0..inp {
                let (wi, di, xi) = (w[o * inp + i] as f64, deq[o * inp + i] as f64, xt[i] as f64);
                let b = i / Q8_BLOCK;
                exact += wi * xi;
                on_deq += di * xr[i] as f64;
                quant += s[b] as f64 / 2.0 * xi.abs() + di.abs() * 0.51 * step[b];
                mag += (di * xi).abs();
            }
            let got = y[t * out + o] as f64;
            let round = (gamma(inp) + 2.0 * U) * mag;
            assert!(
                (got - exact).abs() <= quant + round,
                "{tokens}x{out}x{inp} t{t} o{o}: {got} vs unquantized {exact}, bound {}",
                quant + round
            );
            assert!(
                (got - on_deq).abs() <= (gamma(inp) + 2.0 * U) * mag + 1e-30,
                "{tokens}x{out}x{inp} t{t} o{o}: {got} vs dequantized {on_deq}"
            );
        }
    }
}

#[test]
fn gemv_q8_is_within_the_q8_bound_of_the_f32_product() {
    let mut rng = Rng64::seed_from_u64(2);
    // Partial row blocks (out not a multiple of the 64-row tasks), every token count to 20.
    for tokens in 1..=20 {
        let out = [1, 63, 65, 130, 200][tokens % 5];
        let inp = [64, 128, 1024, 320][tokens % 4];
        check_gemv(&mut rng, tokens, out, inp);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn gemv_q8_bound_holds_for_random_shapes(
        seed in any::<u64>(),
        tokens in 1usize..=20,
        out in 1usize..=150,
        blocks in 1usize..=20,
    ) {
        let mut rng = Rng64::seed_from_u64(seed);
        check_gemv(&mut rng, tokens, out, blocks * Q8_BLOCK);
    }

    #[test]
    fn round_trip_holds_for_random_values(
        seed in any::<u64>(),
        rows in 1usize..=6,
        blocks in 1usize..=6,
        exp in -30i32..10,
    ) {
        let mut rng = Rng64::seed_from_u64(seed);
        let cols = blocks * Q8_BLOCK;
        let w = rnd(&mut rng, rows * cols, 2f32.powi(exp));
        check_round_trip(&w, &Q8Matrix::quantize(&w, rows, cols).unwrap());
    }
}

/// `down · (silu(gate · x) ⊙ (up · x))` in f64 on dequantized weights for one token (`x` as
/// the kernel rounds it, [`round_activations`]), and per output a bound on the kernels'
/// rounding error: each dot product of `n` terms is off by at most γ_n · Σ|terms|, carried
/// through SiLU (slope ≤ 1.1) and the product, plus a few roundings of the activation itself
/// (exp, division, product) and its rounding to the format's activation grid before `down`
/// (Q8: 16 bits per 64, Q4: 8 bits per 32). Q4 sums `q · d · x` and `m · x` apart (`cpu_q4`
/// module docs), so its magnitudes count `|m| · |x|` twice more.
fn mlp_f64(m: &QuantMlp, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (gu, dn) = (m.gate_up().dequantize_f64(), m.down().dequantize_f64());
    let (gum, dnm) = (m.gate_up().offsets_f64(), m.down().offsets_f64());
    let (h, i) = (m.hidden(), m.inter());
    let dot = |r: usize| -> (f64, f64) {
        (0..h).fold((0.0, 0.0), |(s, a), c| {
            let p = gu[r * h + c] * x[c] as f64;
            (
                s + p,
                a + p.abs() + 2.0 * (gum[r * h + c] * x[c] as f64).abs(),
            )
        })
    };
    let mut act = vec![0f64; i];
    let mut act_err = vec![0f64; i];
    for r in 0..i {
        let ((g, gm), (u, um)) = (dot(r), dot(i + r));
        let sg = g / (1.0 + (-g).exp());
        act[r] = sg * u;
        let (eg, eu) = (gamma(h) * gm, gamma(h) * um);
        act_err[r] = 1.1 * eg * (u.abs() + eu) + sg.abs() * eu + 8.0 * U * act[r].abs();
    }
    // The kernel rounds the activations to its grid before `down`.
    let (block, levels) = activation_grid(m.kind());
    let step: Vec<f64> = act
        .chunks(block)
        .map(|b| b.iter().fold(0f64, |m, v| m.max(v.abs())) / levels)
        .collect();
    // `down` multiplies the activations on that grid: so does the reference (a value whose
    // f64 and f32 computations round to neighbouring grid points is off by one step, which the
    // bound below allows for).
    let act_f32: Vec<f32> = act.iter().map(|&v| v as f32).collect();
    let on_grid = rounded(m.kind(), &act_f32);
    let y = (0..h)
        .map(|c| (0..i).map(|r| dn[c * i + r] * on_grid[r] as f64).sum())
        .collect();
    let err = (0..h)
        .map(|c| {
            (0..i)
                .map(|r| {
                    let d = dn[c * i + r].abs();
                    let e = act_err[r] + 1.02 * step[r / block];
                    let mag = d + 2.0 * dnm[c * i + r];
                    d * e + gamma(i) * mag * act[r].abs()
                })
                .sum()
        })
        .collect();
    (y, err)
}

/// Inputs per activation scale and the grid's largest magnitude, per format.
fn activation_grid(kind: QuantKind) -> (usize, f64) {
    match kind {
        QuantKind::Q8 => (Q8_BLOCK, 32767.0),
        QuantKind::Q4 => (32, 127.0),
    }
}

/// An activation row as `kind`'s row kernels round it.
fn rounded(kind: QuantKind, x: &[f32]) -> Vec<f32> {
    match kind {
        QuantKind::Q8 => round_activations(x),
        QuantKind::Q4 => switchyard_kernels::cpu_q4::round_activations(x),
    }
}

fn close(got: f32, want: f64, err: f64, what: &str) {
    // The rounding bound, twice over for the final weighted sums, plus an absolute floor.
    assert!(
        (got as f64 - want).abs() <= 2.0 * err + 1e-7,
        "{what}: {got} vs {want} (bound {err})"
    );
}

/// The routed experts with and without a shared expert, and the dense MLP, against per-token
/// f64 loops over the dequantized weights: decode, a batch where some experts get no token,
/// and sizes off the kernels' steps, in both formats.
#[test]
fn moe_and_mlp_match_dequantized_f64_loops() {
    row_kernels_only();
    for kind in [QuantKind::Q8, QuantKind::Q4] {
        moe_and_mlp_match(kind);
    }
}

fn moe_and_mlp_match(kind: QuantKind) {
    let mut rng = Rng64::seed_from_u64(3);
    for &(t, h, i, e, k) in &[
        (1, 128, 64, 8, 2),
        (37, 128, 192, 16, 4),
        (5, 64, 128, 6, 6),
        (20, 192, 64, 4, 1),
    ] {
        let dims = ExpertDims {
            experts: e,
            inter: i,
            hidden: h,
        };
        let gu: Vec<bf16> = rnd(&mut rng, e * 2 * i * h, 0.2)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let dn: Vec<bf16> = rnd(&mut rng, e * h * i, 0.2)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let q = |w: &[bf16], r, c| QuantMatrix::quantize(kind, w, r, c).unwrap();
        let experts = QuantExperts::new(
            (0..e)
                .map(|x| {
                    let g = q(&gu[x * 2 * i * h..(x + 1) * 2 * i * h], 2 * i, h);
                    QuantMlp::new(g, q(&dn[x * h * i..(x + 1) * h * i], h, i)).unwrap()
                })
                .collect(),
        )
        .unwrap();
        let stacked = QuantExperts::quantize(kind, &gu, &dn, dims).unwrap();
        assert_eq!(
            stacked.expert(e - 1).down().dequantize_f64(),
            experts.expert(e - 1).down().dequantize_f64()
        );
        let si = i + Q8_BLOCK;
        let sgu: Vec<bf16> = rnd(&mut rng, 2 * si * h, 0.2)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let sdn: Vec<bf16> = rnd(&mut rng, h * si, 0.2)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let shared = QuantMlp::new(q(&sgu, 2 * si, h), q(&sdn, h, si)).unwrap();
        let x = rnd(&mut rng, t * h, 1.0);
        let xr: Vec<f32> = x.chunks(h).flat_map(|r| rounded(kind, r)).collect();
        let logits: Vec<f32> = (0..t * e)
            .map(|j| rng.random_range(-1.0..1.0) + if j % e < 2 { 3.0 } else { 0.0 })
            .collect();
        let cfg = GateConfig::sigmoid(e, k, 2.826);
        let g = gate_topk(&logits, None, &cfg).unwrap();
        let plan = dispatch(&g, e).unwrap();
        let routed = experts_forward_quant(&x, &experts, &g, &plan, None).unwrap();
        let both = experts_forward_quant(&x, &experts, &g, &plan, Some(&shared)).unwrap();
        let dense = mlp_forward_quant(&x, t, &shared).unwrap();
        let what = format!("{} T{t} H{h} I{i} E{e} k{k}", kind.name());
        // Besides the worst-case bound per value: the relative RMS error of each output is
        // that of f32 rounding and the rare activation that lands on the neighbouring grid
        // point (measured 2026-11-29: Q8 ≤ 3.7e-6, Q4 ≤ 2.5e-7), far below the worst case,
        // which a small systematic error (1e-3 in the activations) would pass.
        let rms_tol = 1e-4;
        let mut rms = [[0f64; 2]; 3];
        for tok in 0..t {
            let xr = &xr[tok * h..(tok + 1) * h];
            let (mut want, mut mag) = (vec![0f64; h], vec![0f64; h]);
            for j in 0..k {
                let ex = g.ids[tok * k + j] as usize;
                let wt = g.weights[tok * k + j] as f64;
                let (y, m) = mlp_f64(experts.expert(ex), xr);
                for c in 0..h {
                    want[c] += wt * y[c];
                    mag[c] += wt.abs() * m[c];
                }
            }
            let (sy, sm) = mlp_f64(&shared, xr);
            for c in 0..h {
                let at = format!("{what} t{tok} c{c}");
                close(
                    routed[tok * h + c],
                    want[c],
                    mag[c],
                    &format!("routed {at}"),
                );
                close(
                    both[tok * h + c],
                    want[c] + sy[c],
                    mag[c] + sm[c],
                    &format!("routed+shared {at}"),
                );
                close(dense[tok * h + c], sy[c], sm[c], &format!("dense {at}"));
                let pairs = [
                    (routed[tok * h + c], want[c]),
                    (both[tok * h + c], want[c] + sy[c]),
                    (dense[tok * h + c], sy[c]),
                ];
                for (acc, (g, w)) in rms.iter_mut().zip(pairs) {
                    acc[0] += (g as f64 - w).powi(2);
                    acc[1] += w * w;
                }
            }
        }
        for (acc, name) in rms.iter().zip(["routed", "routed+shared", "dense"]) {
            let rel = (acc[0] / acc[1]).sqrt();
            assert!(rel <= rms_tol, "{name} {what}: relative RMS error {rel:e}");
        }
        // The tensor entry points give the same values.
        let xt = Tensor::from_vec(x.clone(), (t, h), &Device::Cpu).unwrap();
        let yt = experts_quant(&xt, &experts, &g, &plan, Some(&shared)).unwrap();
        assert_eq!(f32_values(&yt), both);
        let yd = mlp_quant(&xt, &shared).unwrap();
        assert_eq!(f32_values(&yd), dense);
    }
}

#[test]
fn shapes_that_disagree_are_errors() {
    row_kernels_only();
    let mk = |kind, r, c| QuantMatrix::quantize(kind, &vec![0.25f32; r * c], r, c).unwrap();
    let m = |r, c| mk(QuantKind::Q8, r, c);
    assert!(QuantMlp::new(m(128, 64), m(64, 128)).is_err());
    assert!(QuantMlp::new(m(128, 64), m(64, 64)).is_ok());
    let e = QuantMlp::new(m(128, 64), mk(QuantKind::Q4, 64, 64)).unwrap_err();
    assert!(e.to_string().contains("gate_up is q8, down is q4"), "{e}");
    let a = QuantMlp::new(m(128, 64), m(64, 64)).unwrap();
    let b = QuantMlp::new(m(256, 64), m(64, 128)).unwrap();
    let a4 = QuantMlp::new(mk(QuantKind::Q4, 128, 64), mk(QuantKind::Q4, 64, 64)).unwrap();
    assert!(QuantExperts::new(vec![]).is_err());
    assert!(QuantExperts::new(vec![a.clone(), b]).is_err());
    assert!(QuantExperts::new(vec![a.clone(), a4.clone()]).is_err());
    let ex = QuantExperts::new(vec![a.clone(), a.clone()]).unwrap();
    let g = switchyard_kernels::GateOutput {
        tokens: 1,
        top_k: 1,
        ids: vec![1],
        weights: vec![1.0],
    };
    let plan = dispatch(&g, 2).unwrap();
    assert!(experts_forward_quant(&[0.0; 63], &ex, &g, &plan, None).is_err());
    let plan3 = dispatch(&g, 3).unwrap();
    assert!(experts_forward_quant(&[0.0; 64], &ex, &g, &plan3, None).is_err());
    assert!(experts_forward_quant(&[0.0; 64], &ex, &g, &plan, Some(&a)).is_ok());
    assert!(experts_forward_quant(&[0.0; 64], &ex, &g, &plan, Some(&a4)).is_err());
    assert!(mlp_forward_quant(&[0.0; 65], 1, &a).is_err());
    let dims = ex.dims();
    assert!(QuantExperts::quantize(QuantKind::Q4, &[0f32; 10], &[0f32; 10], dims).is_err());
}

#[test]
fn tensor_entry_points_match_the_slices() {
    row_kernels_only();
    for kind in [QuantKind::Q8, QuantKind::Q4] {
        tensor_entry_points(kind);
    }
}

/// `linear_quant` and `from_tensor` as a model's `Linear` would call them: bf16 in, bf16 out,
/// the same values as the format's gemv rounded to bf16.
fn tensor_entry_points(kind: QuantKind) {
    let mut rng = Rng64::seed_from_u64(4);
    let (out, inp, t) = (96, 128, 3);
    let w = rnd(&mut rng, out * inp, 0.1);
    let wt = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let m = QuantMatrix::from_tensor(kind, &wt).unwrap();
    assert_eq!(m.kind(), kind);
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    assert_eq!(
        m.dequantize_f64(),
        QuantMatrix::quantize(kind, &wb, out, inp)
            .unwrap()
            .dequantize_f64()
    );
    // A non-contiguous (transposed) f32 tensor goes through f32.
    let tt = Tensor::from_vec(w.clone(), (inp, out), &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    let mt = QuantMatrix::from_tensor(kind, &tt).unwrap();
    assert_eq!((mt.rows(), mt.cols()), (out, inp));
    let x = rnd(&mut rng, t * inp, 1.0);
    let xb = Tensor::from_vec(x.clone(), (t, inp), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let y = linear_quant(&xb, &m).unwrap();
    assert_eq!((y.dims(), y.dtype()), (&[t, out][..], DType::BF16));
    let xr = f32_values(&xb);
    let mut want = vec![0f32; t * out];
    m.gemv(&xr, t, &mut want).unwrap();
    let got = f32_values(&y);
    let want: Vec<f32> = want.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    assert_eq!(got, want);
    // Stacked expert tensors quantize per expert.
    let (e, i, h) = (3, 64, 64);
    let gu = Tensor::from_vec(
        rnd(&mut rng, e * 2 * i * h, 0.1),
        (e, 2 * i, h),
        &Device::Cpu,
    )
    .unwrap();
    let dn = Tensor::from_vec(rnd(&mut rng, e * h * i, 0.1), (e, h, i), &Device::Cpu).unwrap();
    let ex = QuantExperts::from_tensors(kind, &gu, &dn).unwrap();
    assert_eq!(
        (
            ex.dims().experts,
            ex.dims().inter,
            ex.dims().hidden,
            ex.kind()
        ),
        (e, i, h, kind)
    );
    let d1 = dn.get(1).unwrap();
    assert_eq!(
        ex.expert(1).down().dequantize_f64(),
        QuantMatrix::from_tensor(kind, &d1)
            .unwrap()
            .dequantize_f64()
    );
    assert!(linear_quant(
        &Tensor::zeros((2, 65), DType::F32, &Device::Cpu).unwrap(),
        &m
    )
    .is_err());
}
