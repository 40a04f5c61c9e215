//! bf16 vs Q8 vs Q4 weights at decode (one token): the small preset's matrix shapes and one of
//! its MoE layers (64 experts, top-8, H 1024, I 384, plus the shared expert), in weights/s and
//! bytes/s, with every weight read from memory (working sets of [`MIB`] per format, rotated).
//!
//! `cargo bench -p switchyard-kernels --bench cpu_quant` runs criterion (throughput in
//! weights). On a shared machine compare with the interleaved A/B instead:
//! `QUANT_AB=7 cargo bench -p switchyard-kernels --bench cpu_quant` runs 7 rounds, each timing
//! the three formats back to back per shape (order rotating per round), and prints every
//! round's ratios over bf16 and the medians. `QUANT_AB_MIB` sets the working set per format
//! (default 512 MiB; e.g. 16 for cache-resident weights), `QUANT_AB_TOKENS` the tokens per
//! matrix product (default 1), `QUANT_AB_CASE` a substring of the cases to run.

use std::time::Instant;

use criterion::{criterion_group, Criterion, Throughput};
use half::bf16;
use rand::{Rng, SeedableRng};
use switchyard_kernels::cpu_gemv::{gemv_bf16, on_worker};
use switchyard_kernels::cpu_moe::{experts_forward_bf16, ExpertDims, MlpWeights};
use switchyard_kernels::cpu_q4::q4_kernel_name;
use switchyard_kernels::cpu_q8::q8_kernel_name;
use switchyard_kernels::cpu_quant::{
    experts_forward_quant, QuantExperts, QuantKind, QuantMatrix, QuantMlp,
};
use switchyard_kernels::{dispatch, gate_topk, DispatchPlan, GateConfig, GateOutput};

/// Working set per format, MiB: well past what the dev VM serves from cache (NOTES: ≤ 64 MiB
/// working sets read at ~2× DRAM speed).
const MIB: usize = 512;

/// `[out, inp]` shapes of the small preset (`crates/model/src/presets.rs`): o_proj, a dense
/// MLP-sized up projection, the one the brief names, and the lm_head.
const SHAPES: &[(usize, usize)] = &[(1024, 1024), (4096, 1024), (2816, 1024), (32768, 1024)];

/// Small preset MoE layer.
const MOE: ExpertDims = ExpertDims {
    experts: 64,
    inter: 384,
    hidden: 1024,
};
const TOP_K: usize = 8;

/// Tokens per gemv call (`QUANT_AB_TOKENS`, default 1 = decode; the MoE case is always 1).
fn tokens() -> usize {
    std::env::var("QUANT_AB_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn mib() -> usize {
    std::env::var("QUANT_AB_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MIB)
}

/// Weights like a trained layer's: roughly normal, std 0.02.
fn weights(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| {
            let u: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum();
            bf16::from_f32(u * 0.017)
        })
        .collect()
}

/// The formats, in [`Case::run`]'s numbering.
const FMT: [&str; 3] = ["bf16", "q8", "q4"];

/// The quantized formats after bf16.
const QUANT: [QuantKind; 2] = [QuantKind::Q8, QuantKind::Q4];

/// One benchmark case in every format: `run(fmt, k)` does call `k` (rotating copies).
struct Case {
    name: String,
    /// Weights read per call.
    weights: usize,
    /// Bytes read per call, per format.
    bytes: [usize; 3],
    /// Relative RMS difference of each quantized product from the bf16 one.
    rel_err: [f64; 2],
    run: Box<dyn FnMut(usize, usize) + Send>,
}

fn gemv_case(out: usize, inp: usize) -> Case {
    let mut rng = rand::rngs::StdRng::seed_from_u64(out as u64);
    let copies = (mib() << 20).div_ceil(out * inp * 2).max(1);
    let wb: Vec<Vec<bf16>> = (0..copies).map(|_| weights(&mut rng, out * inp)).collect();
    let t = tokens();
    let x: Vec<f32> = (0..t * inp).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut y = vec![0f32; t * out];
    gemv_bf16(&x, t, &wb[0], out, inp, &mut y).unwrap();
    let (mut bytes, mut rel_err) = ([out * inp * 2, 0, 0], [0f64; 2]);
    // Per format as many copies as fill the working set.
    let wq: Vec<Vec<QuantMatrix>> = QUANT
        .iter()
        .enumerate()
        .map(|(f, &kind)| {
            let t0 = Instant::now();
            let mut n = 0;
            let mut v = vec![QuantMatrix::quantize(kind, &wb[0], out, inp).unwrap()];
            bytes[f + 1] = v[0].memory_bytes();
            while v.len() * bytes[f + 1] < mib() << 20 {
                n += 1;
                v.push(QuantMatrix::quantize(kind, &wb[n % copies], out, inp).unwrap());
            }
            if std::env::var_os("QUANT_AB").is_some() {
                let rate = (v.len() * out * inp) as f64 / t0.elapsed().as_secs_f64();
                eprintln!(
                    "quantize {out}x{inp} from bf16 to {}: {:.0} M weights/s",
                    kind.name(),
                    rate / 1e6
                );
            }
            // The quantization error of the product: relative RMS against bf16 weights.
            let mut yq = vec![0f32; t * out];
            v[0].gemv(&x, t, &mut yq).unwrap();
            let (e2, y2) = y.iter().zip(&yq).fold((0f64, 0f64), |(e, s), (a, b)| {
                (e + (*a as f64 - *b as f64).powi(2), s + (*a as f64).powi(2))
            });
            rel_err[f] = (e2 / y2).sqrt();
            v
        })
        .collect();
    Case {
        rel_err,
        name: format!("{out}x{inp}_t{t}"),
        weights: out * inp,
        bytes,
        run: Box::new(move |fmt, k| {
            if fmt == 0 {
                gemv_bf16(&x, t, &wb[k % copies], out, inp, &mut y).unwrap();
            } else {
                let w = &wq[fmt - 1];
                w[k % w.len()].gemv(&x, t, &mut y).unwrap();
            }
        }),
    }
}

/// Stacked layer weights `(gate_up [E, 2I, H], down [E, H, I])` plus a shared expert.
type Layer = (Vec<bf16>, Vec<bf16>, Vec<bf16>, Vec<bf16>);

fn moe_case() -> Case {
    let ExpertDims {
        experts: e,
        inter: i,
        hidden: h,
    } = MOE;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let layer_bytes = (e + 1) * 3 * i * h * 2;
    let copies = (mib() << 20).div_ceil(layer_bytes).max(1);
    let layers: Vec<Layer> = (0..copies)
        .map(|_| {
            (
                weights(&mut rng, e * 2 * i * h),
                weights(&mut rng, e * h * i),
                weights(&mut rng, 2 * i * h),
                weights(&mut rng, h * i),
            )
        })
        .collect();
    // About the same bytes per format: twice the Q8 layers and three times the Q4 ones
    // (quantized from the bf16 ones in turn).
    let quant: Vec<Vec<(QuantExperts, QuantMlp)>> = QUANT
        .iter()
        .zip([2, 3])
        .map(|(&kind, times)| {
            (0..times * copies)
                .map(|k| {
                    let (gu, dn, sgu, sdn) = &layers[k % copies];
                    let q = |w: &[bf16], r, c| QuantMatrix::quantize(kind, w, r, c).unwrap();
                    let ex = (0..e)
                        .map(|x| {
                            let g = q(&gu[x * 2 * i * h..][..2 * i * h], 2 * i, h);
                            QuantMlp::new(g, q(&dn[x * h * i..][..h * i], h, i)).unwrap()
                        })
                        .collect();
                    let sh = QuantMlp::new(q(sgu, 2 * i, h), q(sdn, h, i)).unwrap();
                    (QuantExperts::new(ex).unwrap(), sh)
                })
                .collect()
        })
        .collect();
    let cfg = GateConfig::sigmoid(e, TOP_K, 2.826);
    let gates: Vec<(GateOutput, DispatchPlan)> = (0..97)
        .map(|_| {
            let logits: Vec<f32> = (0..e).map(|_| rng.random_range(-1.0..1.0)).collect();
            let g = gate_topk(&logits, None, &cfg).unwrap();
            let p = dispatch(&g, e).unwrap();
            (g, p)
        })
        .collect();
    let x: Vec<f32> = (0..h).map(|_| rng.random_range(-1.0..1.0)).collect();
    let active = (TOP_K + 1) * 3 * i * h;
    let qbytes = |f: usize| quant[f][0].1.memory_bytes() * (TOP_K + 1);
    Case {
        rel_err: [f64::NAN; 2],
        name: format!("moe_small_E{e}k{TOP_K}_t1"),
        weights: active,
        bytes: [active * 2, qbytes(0), qbytes(1)],
        run: Box::new(move |fmt, k| {
            let (g, p) = &gates[k % gates.len()];
            if fmt == 0 {
                let (gu, dn, sgu, sdn) = &layers[k % copies];
                let shared = MlpWeights {
                    gate_up: sgu,
                    down: sdn,
                    inter: i,
                };
                experts_forward_bf16(&x, gu, dn, MOE, g, p, Some(shared)).unwrap();
            } else {
                let q = &quant[fmt - 1];
                let (ex, sh) = &q[k % q.len()];
                experts_forward_quant(&x, ex, g, p, Some(sh)).unwrap();
            }
        }),
    }
}

fn cases() -> Vec<Case> {
    // `QUANT_AB_CASE=moe` (a substring of the names) runs only the matching cases, e.g. to
    // profile one of them.
    let only = std::env::var("QUANT_AB_CASE").unwrap_or_default();
    let mut c: Vec<Case> = SHAPES
        .iter()
        .filter(|(o, i)| format!("{o}x{i}").contains(&only))
        .map(|&(o, i)| gemv_case(o, i))
        .collect();
    if "moe_small".contains(&only) {
        c.push(moe_case());
    }
    c
}

fn bench(c: &mut Criterion) {
    for mut case in cases() {
        let mut g = c.benchmark_group(format!("decode_{}", case.name));
        g.throughput(Throughput::Elements(case.weights as u64));
        for (fmt, name) in FMT.iter().enumerate() {
            let mut k = 0;
            g.bench_function(*name, |b| {
                b.iter(|| {
                    k += 1;
                    (case.run)(fmt, k);
                })
            });
        }
        g.finish();
    }
}

/// Seconds per call over one timed run of `reps` calls, on a rayon worker as the model runs.
fn timed(case: &mut Case, fmt: usize, reps: usize, k: &mut usize) -> f64 {
    let run = &mut case.run;
    let k0 = *k;
    *k += reps;
    on_worker(|| {
        let t0 = Instant::now();
        for j in 0..reps {
            run(fmt, k0 + j);
        }
        t0.elapsed().as_secs_f64() / reps as f64
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn interleaved(rounds: usize) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "bf16 vs q8 (kernel {}) vs q4 (kernel {}), {} token(s), {} MiB per format, {rounds} \
         rounds; load {}",
        q8_kernel_name(),
        q4_kernel_name(),
        tokens(),
        mib(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>8} {:>8}  ratios over bf16 \
         per round (q8, q4)",
        "case",
        "bf16 Gw/s",
        "q8 Gw/s",
        "q4 Gw/s",
        "bf16 GB/s",
        "q8 GB/s",
        "q4 GB/s",
        "q8 ×",
        "q4 ×",
        "q8 err",
        "q4 err"
    );
    for mut case in cases() {
        // Calls per timed run: about 40 ms of bf16 work.
        let mut k = 0;
        let probe = timed(&mut case, 0, 3, &mut k);
        let reps = ((0.04 / probe) as usize).clamp(3, 2000);
        for f in 1..FMT.len() {
            timed(&mut case, f, reps, &mut k);
        }
        let mut secs: [Vec<f64>; 3] = Default::default();
        let mut ratios: [Vec<f64>; 2] = Default::default();
        for r in 0..rounds {
            let mut s = [0f64; 3];
            for j in 0..FMT.len() {
                let f = (r + j) % FMT.len();
                s[f] = timed(&mut case, f, reps, &mut k);
            }
            for f in 0..FMT.len() {
                secs[f].push(s[f]);
            }
            for q in 0..2 {
                ratios[q].push(s[0] / s[q + 1]);
            }
        }
        let list: Vec<String> = (0..rounds)
            .map(|r| format!("{:.2}/{:.2}", ratios[0][r], ratios[1][r]))
            .collect();
        let m: Vec<f64> = secs.iter_mut().map(|v| median(v)).collect();
        let w = case.weights as f64;
        println!(
            "{:<22} {:>9.2} {:>9.2} {:>9.2} {:>9.1} {:>9.1} {:>9.1} {:>6.2} {:>6.2} {:>8.1e} \
             {:>8.1e}  {}",
            case.name,
            w / m[0] / 1e9,
            w / m[1] / 1e9,
            w / m[2] / 1e9,
            case.bytes[0] as f64 / m[0] / 1e9,
            case.bytes[1] as f64 / m[1] / 1e9,
            case.bytes[2] as f64 / m[2] / 1e9,
            median(&mut ratios[0]),
            median(&mut ratios[1]),
            case.rel_err[0],
            case.rel_err[1],
            list.join(" ")
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}

fn main() {
    if let Some(rounds) = std::env::var("QUANT_AB").ok().and_then(|v| v.parse().ok()) {
        interleaved(rounds);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
