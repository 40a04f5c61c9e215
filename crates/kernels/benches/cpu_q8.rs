//! bf16 vs Q8 weights at decode (one token): the small preset's matrix shapes and one of its
//! MoE layers (64 experts, top-8, H 1024, I 384, plus the shared expert), in weights/s and
//! bytes/s, with every weight read from memory (working sets of [`MIB`] per format, rotated).
//!
//! `cargo bench -p switchyard-kernels --bench cpu_q8` runs criterion (throughput in weights).
//! On a shared machine compare with the interleaved A/B instead:
//! `Q8_AB=7 cargo bench -p switchyard-kernels --bench cpu_q8` runs 7 rounds, each timing bf16
//! and q8 back to back per shape (order alternating per round), and prints every pair's ratio
//! and the medians. `Q8_AB_MIB` sets the working set per format (default 512 MiB; e.g. 16 for
//! cache-resident weights), `Q8_AB_TOKENS` the tokens per matrix product (default 1),
//! `Q8_AB_CASE` a substring of the cases to run.

use std::time::Instant;

use criterion::{criterion_group, Criterion, Throughput};
use half::bf16;
use rand::{Rng, SeedableRng};
use switchyard_kernels::cpu_gemv::{gemv_bf16, on_worker};
use switchyard_kernels::cpu_moe::{experts_forward_bf16, ExpertDims, MlpWeights};
use switchyard_kernels::cpu_q8::{
    experts_forward_q8, gemv_q8, q8_kernel_name, Q8Experts, Q8Matrix, Q8Mlp,
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

/// Tokens per gemv call (`Q8_AB_TOKENS`, default 1 = decode; the MoE case is always 1).
fn tokens() -> usize {
    std::env::var("Q8_AB_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn mib() -> usize {
    std::env::var("Q8_AB_MIB")
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

/// One benchmark case in both formats: `run(fmt, k)` does call `k` (rotating copies).
struct Case {
    name: String,
    /// Weights read per call.
    weights: usize,
    /// Bytes read per call: bf16, q8.
    bytes: [usize; 2],
    /// Relative RMS difference of the q8 product from the bf16 one.
    rel_err: f64,
    run: Box<dyn FnMut(usize, usize) + Send>,
}

fn gemv_case(out: usize, inp: usize) -> Case {
    let mut rng = rand::rngs::StdRng::seed_from_u64(out as u64);
    let copies = (mib() << 20).div_ceil(out * inp * 2).max(1);
    let wb: Vec<Vec<bf16>> = (0..copies).map(|_| weights(&mut rng, out * inp)).collect();
    let qcopies = (mib() << 20).div_ceil(out * inp).max(1);
    let t0 = Instant::now();
    let wq: Vec<Q8Matrix> = (0..qcopies)
        .map(|k| Q8Matrix::quantize(&wb[k % copies], out, inp).unwrap())
        .collect();
    if std::env::var_os("Q8_AB").is_some() {
        let rate = (qcopies * out * inp) as f64 / t0.elapsed().as_secs_f64();
        eprintln!(
            "quantize {out}x{inp} from bf16: {:.0} M weights/s",
            rate / 1e6
        );
    }
    let t = tokens();
    let x: Vec<f32> = (0..t * inp).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut y = vec![0f32; t * out];
    let qbytes = wq[0].memory_bytes();
    // The quantization error of the product: relative RMS of q8 against bf16 weights.
    let mut yq = vec![0f32; t * out];
    gemv_bf16(&x, t, &wb[0], out, inp, &mut y).unwrap();
    gemv_q8(&x, t, &wq[0], &mut yq).unwrap();
    let (e2, y2) = y.iter().zip(&yq).fold((0f64, 0f64), |(e, s), (a, b)| {
        (e + (*a as f64 - *b as f64).powi(2), s + (*a as f64).powi(2))
    });
    Case {
        rel_err: (e2 / y2).sqrt(),
        name: format!("{out}x{inp}_t{t}"),
        weights: out * inp,
        bytes: [out * inp * 2, qbytes],
        run: Box::new(move |fmt, k| {
            if fmt == 0 {
                gemv_bf16(&x, t, &wb[k % copies], out, inp, &mut y).unwrap();
            } else {
                gemv_q8(&x, t, &wq[k % qcopies], &mut y).unwrap();
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
    // Same bytes per format: twice the Q8 layers (quantized from the bf16 ones in turn).
    let qcopies = 2 * copies;
    let q8: Vec<(Q8Experts, Q8Mlp)> = (0..qcopies)
        .map(|k| {
            let (gu, dn, sgu, sdn) = &layers[k % copies];
            let ex = (0..e)
                .map(|x| {
                    Q8Mlp::new(
                        Q8Matrix::quantize(&gu[x * 2 * i * h..][..2 * i * h], 2 * i, h).unwrap(),
                        Q8Matrix::quantize(&dn[x * h * i..][..h * i], h, i).unwrap(),
                    )
                    .unwrap()
                })
                .collect();
            let sh = Q8Mlp::new(
                Q8Matrix::quantize(sgu, 2 * i, h).unwrap(),
                Q8Matrix::quantize(sdn, h, i).unwrap(),
            )
            .unwrap();
            (Q8Experts::new(ex).unwrap(), sh)
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
    let qbytes = q8[0].1.memory_bytes() * (TOP_K + 1);
    Case {
        rel_err: f64::NAN,
        name: format!("moe_small_E{e}k{TOP_K}_t1"),
        weights: active,
        bytes: [active * 2, qbytes],
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
                let (ex, sh) = &q8[k % qcopies];
                experts_forward_q8(&x, ex, g, p, Some(sh)).unwrap();
            }
        }),
    }
}

fn cases() -> Vec<Case> {
    // `Q8_AB_CASE=moe` (a substring of the names) runs only the matching cases, e.g. to
    // profile one of them.
    let only = std::env::var("Q8_AB_CASE").unwrap_or_default();
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

const FMT: [&str; 2] = ["bf16", "q8"];

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
        "bf16 vs q8 (kernel {}), {} token(s), {} MiB per format, {rounds} rounds; load {}",
        q8_kernel_name(),
        tokens(),
        mib(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "{:<22} {:>10} {:>10} {:>9} {:>9} {:>7} {:>8}  pair ratios (q8/bf16 weights/s)",
        "case", "bf16 Gw/s", "q8 Gw/s", "bf16 GB/s", "q8 GB/s", "ratio", "q8 err"
    );
    for mut case in cases() {
        // Calls per timed run: about 40 ms of bf16 work.
        let mut k = 0;
        let probe = timed(&mut case, 0, 3, &mut k);
        let reps = ((0.04 / probe) as usize).clamp(3, 2000);
        timed(&mut case, 1, reps, &mut k);
        let (mut sb, mut sq, mut ratios) = (vec![], vec![], vec![]);
        for r in 0..rounds {
            let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
            let mut s = [0f64; 2];
            for f in order {
                s[f] = timed(&mut case, f, reps, &mut k);
            }
            sb.push(s[0]);
            sq.push(s[1]);
            ratios.push(s[0] / s[1]);
        }
        let list: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        let (mb, mq) = (median(&mut sb), median(&mut sq));
        let w = case.weights as f64;
        println!(
            "{:<22} {:>10.2} {:>10.2} {:>9.1} {:>9.1} {:>7.2} {:>8.1e}  {}",
            case.name,
            w / mb / 1e9,
            w / mq / 1e9,
            case.bytes[0] as f64 / mb / 1e9,
            case.bytes[1] as f64 / mq / 1e9,
            median(&mut ratios),
            case.rel_err,
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
    if let Some(rounds) = std::env::var("Q8_AB").ok().and_then(|v| v.parse().ok()) {
        interleaved(rounds);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
