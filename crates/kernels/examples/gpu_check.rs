//! GPU check and benchmark of the CUDA kernels (feature `cuda`; run by scripts/gpu-check.sh).
//!
//! 1. Checks every kernel against its CPU reference on fresh random inputs (seed printed; set
//!    GPU_CHECK_SEED to repeat a run): gate top-k (ids identical, weights within 1e-5), dispatch
//!    (a permutation grouped by expert with the reference's offsets, per-expert sets and tiles),
//!    the expert paths (GEMV with each gate/up and down kernel variant at T ≤ 8, and tiled;
//!    ‖out − ref‖ / ‖ref‖ ≤ 1e-2 against the crate's CPU `experts_forward` in f32 on the same
//!    bf16-rounded inputs), and paged attention: the KV write bit-exact
//!    against `paged::reshape_and_cache`, attention against `paged::paged_attention` (f32 and
//!    bf16 KV, GQA 8:1, 16:1, 2:1 and 1:1, head_dim 128/64/12, blocks of 16/32/5, one batch of
//!    decode rows at several contexts plus a prefill chunk and an uncovered row, at the tensor
//!    op's partition size and forced ones). Outputs are poisoned (0xFF bytes: NaN / u32::MAX)
//!    before each launch so an unwritten element fails the check.
//! 2. Times the ops at Hy3 shapes (H 4096, I 1536, 192 routed experts top-8 + 1 shared expert;
//!    paged decode with 64 query / 8 KV heads, head_dim 128, bf16 KV, contexts 4K and 32K)
//!    with CUDA events after warm-up, median of many repetitions, rotating input sets so the
//!    caches do not serve repeated inputs; compares the MoE layer with a per-expert loop of
//!    candle ops (the crate's CPU-reference code path run on CUDA tensors, as candle-nn-style
//!    MoE does).
//!
//! The results table is printed last. Exit status: 0 all checks passed, 1 a check failed,
//! 2 the run could not proceed (no CUDA device, driver error).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{
    result as cu, sys, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr,
};
use candle_core::{CudaDevice, DType, Device, Tensor};
use float8::F8E4M3;
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchyard_kernels::cuda::{
    self as kc, max_tiles, DispatchViews, ExpertPath, ExpertViews, GemvGateUp, MoeDims, MoeKernels,
    PlanViews, TILE_ROWS,
};
use switchyard_kernels::gate::{gate_topk, GateConfig, GateOutput, ScoreFunction};
use switchyard_kernels::moe::{dispatch, experts_forward, ExpertWeights};
use switchyard_kernels::paged::{paged_attention, reshape_and_cache, KvElem, KvLayout, SeqAttn};

/// H200 HBM3e bandwidth by the datasheet; the achieved figures are quoted against it.
const HBM_BYTES_PER_S: f64 = 4.8e12;
const CHECK_TOKENS: [usize; 6] = [1, 7, 64, 256, 1024, 4096];
/// With GPU_CHECK_QUICK set (e.g. under compute-sanitizer): small T only, no benchmark.
const QUICK_TOKENS: [usize; 3] = [1, 7, 64];
/// The expert check adds T = 2, 3, 4, 8 to the above so that every GEMV kernel instance
/// (`moe_gemv_gate_up_rows{1,2,4,8}`, the smallest that holds T) runs, at T below and at its
/// token bound.
const EXPERT_CHECK_TOKENS: [usize; 10] = [1, 2, 3, 4, 7, 8, 64, 256, 1024, 4096];
const EXPERT_QUICK_TOKENS: [usize; 6] = [1, 2, 3, 7, 8, 64];

fn check_tokens() -> &'static [usize] {
    if quick() {
        &QUICK_TOKENS
    } else {
        &CHECK_TOKENS
    }
}

fn expert_check_tokens() -> &'static [usize] {
    if quick() {
        &EXPERT_QUICK_TOKENS
    } else {
        &EXPERT_CHECK_TOKENS
    }
}

fn quick() -> bool {
    std::env::var_os("GPU_CHECK_QUICK").is_some()
}
/// Tokens compared against the CPU expert reference when T is larger.
const EXPERT_CHECK_SUBSET: usize = 256;
const EXPERT_REL_TOL: f64 = 1e-2;
const GATE_W_TOL: f32 = 1e-5;
/// Two choice values closer than this are a rounding tie (sigmoid/exp differ by an ulp or two
/// between the CPU's libm and CUDA); a swap between such experts is reported, not failed.
const NEAR_TIE: f32 = 1e-6;

fn main() -> ExitCode {
    match run() {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!("gpu_check: {n} check(s) FAILED");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("gpu_check: cannot run: {e:#}");
            ExitCode::from(2)
        }
    }
}

struct Ctx {
    device: Device,
    stream: Arc<CudaStream>,
    kern: Arc<MoeKernels>,
    kern_paged: Arc<kc::PagedKernels>,
    rng: StdRng,
    failures: usize,
    passes: usize,
    notes: Vec<String>,
}

impl Ctx {
    fn verdict(&mut self, ok: bool, line: String) {
        if ok {
            self.passes += 1;
            println!("  ok    {line}");
        } else {
            self.failures += 1;
            println!("  FAIL  {line}");
        }
    }
}

fn run() -> Result<usize> {
    let seed: u64 = match std::env::var("GPU_CHECK_SEED") {
        Ok(s) => s.parse().context("GPU_CHECK_SEED must be an integer")?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    let dev = CudaDevice::new_with_stream(0)
        .map_err(|e| anyhow!("{e}"))
        .context("opening CUDA device 0 (is there a GPU and a CUDA 13 driver?)")?;
    // One stream only: the cudarc per-buffer events that order several streams are not needed,
    // and they would get in the way of graph capture.
    unsafe { dev.disable_event_tracking() };
    let stream = dev.cuda_stream();
    let cx = stream.context();
    let name = cx.name().unwrap_or_else(|_| "?".into());
    let (maj, min) = cx.compute_capability().unwrap_or((0, 0));
    let mem = cx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    println!("gpu_check: device {name} (sm_{maj}{min}, {mem:.0} GiB), seed {seed}");
    let t0 = Instant::now();
    let kern = MoeKernels::for_device(&dev).context("loading the MoE kernels")?;
    let kern_paged =
        kc::PagedKernels::for_device(&dev).context("loading the paged-attention kernels")?;
    stream.synchronize()?;
    println!(
        "gpu_check: kernels loaded (PTX JIT) in {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let mut c = Ctx {
        device: Device::Cuda(dev.clone()),
        stream,
        kern,
        kern_paged,
        rng: StdRng::seed_from_u64(seed),
        failures: 0,
        passes: 0,
        notes: Vec::new(),
    };
    if std::env::var_os("GPU_CHECK_PROFILE").is_some() {
        profile_paged(&mut c)?;
        profile(&mut c)?;
        return Ok(0);
    }
    let t_check = Instant::now();
    check_gate(&mut c)?;
    check_dispatch(&mut c)?;
    check_experts(&mut c)?;
    check_tensor_api(&mut c)?;
    check_paged(&mut c)?;
    println!(
        "\ngpu_check: correctness {} passed, {} failed ({:.1} s)",
        c.passes,
        c.failures,
        t_check.elapsed().as_secs_f64()
    );
    if quick() {
        println!("gpu_check: quick mode, no benchmark");
        return Ok(c.failures);
    }
    let mut table = bench(&mut c).unwrap_or_else(|e| {
        c.failures += 1;
        format!("benchmark FAILED: {e:#}")
    });
    table.push_str(&bench_paged(&mut c).unwrap_or_else(|e| {
        c.failures += 1;
        format!("\npaged-attention benchmark FAILED: {e:#}\n")
    }));
    for n in &c.notes {
        println!("note: {n}");
    }
    println!("\n{table}");
    println!(
        "gpu_check: correctness {} passed, {} failed",
        c.passes, c.failures
    );
    Ok(c.failures)
}

// ------------------------------------------------------------------------------------------
// helpers

fn normal(rng: &mut StdRng) -> f32 {
    // Box-Muller; fine for test data.
    let u1: f32 = rng.random_range(1e-7f32..1.0);
    let u2: f32 = rng.random_range(0.0f32..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn bf16_vec(rng: &mut StdRng, n: usize, std: f32) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(normal(rng) * std)).collect()
}

/// Copies `v` to the device (at least one element, so empty inputs need no zero-byte buffer).
fn upload<T: DeviceRepr + Default + Clone>(c: &Ctx, v: &[T]) -> Result<CudaSlice<T>> {
    if v.is_empty() {
        Ok(c.stream.clone_htod(&[T::default()])?)
    } else {
        Ok(c.stream.clone_htod(v)?)
    }
}

/// A fresh buffer with every byte 0xFF (NaN for floats, u32::MAX for ids).
fn poisoned<T: DeviceRepr>(c: &Ctx, n: usize) -> Result<CudaSlice<T>> {
    let n = n.max(1);
    let mut s = unsafe { c.stream.alloc::<T>(n) }?;
    {
        let (ptr, _guard) = s.device_ptr_mut(&c.stream);
        unsafe {
            cu::memset_d8_async(
                ptr,
                0xFF,
                n * std::mem::size_of::<T>(),
                c.stream.cu_stream(),
            )
        }?;
    }
    Ok(s)
}

/// Router logits with the cases the gate must get right: plain random rows, rows quantised to
/// a few values (many exact ties), and constant rows (all tied). Experts in `dead` never win.
fn make_logits(rng: &mut StdRng, t: usize, e: usize, dead: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(t * e);
    for r in 0..t {
        let kind = if r % 11 == 10 {
            2
        } else if r % 5 == 4 {
            1
        } else {
            0
        };
        let constant = rng.random_range(-1.0f32..1.0);
        for x in 0..e {
            let val = if x < dead {
                -30.0
            } else {
                match kind {
                    0 => normal(rng) * 1.5,
                    1 => (rng.random_range(-4i32..=4) as f32) * 0.5,
                    _ => constant,
                }
            };
            v.push(val);
        }
    }
    v
}

/// Bias with ties (multiples of 0.05).
fn make_bias(rng: &mut StdRng, e: usize) -> Vec<f32> {
    (0..e)
        .map(|_| rng.random_range(-6i32..=6) as f32 * 0.05)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn rel_err(out: &[f32], reference: &[f32]) -> (f64, f64, usize) {
    let (mut num, mut den, mut max_abs, mut nan) = (0f64, 0f64, 0f64, 0usize);
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() {
            nan += 1;
            continue;
        }
        let d = (o - r) as f64;
        num += d * d;
        den += (r as f64) * (r as f64);
        max_abs = max_abs.max(d.abs());
    }
    ((num / den.max(1e-300)).sqrt(), max_abs, nan)
}

// ------------------------------------------------------------------------------------------
// gate

struct GateCase {
    name: &'static str,
    cfg: GateConfig,
    bias: bool,
    dead: usize,
}

fn gate_cases() -> Vec<GateCase> {
    let hy3 = |e: usize, k: usize| GateConfig::sigmoid(e, k, 2.826);
    vec![
        GateCase {
            name: "E192/k8 sigmoid+bias (Hy3)",
            cfg: hy3(192, 8),
            bias: true,
            dead: 0,
        },
        GateCase {
            name: "E64/k8 sigmoid+bias, 4 dead experts",
            cfg: hy3(64, 8),
            bias: true,
            dead: 4,
        },
        GateCase {
            name: "E64/k6 softmax, no renorm",
            cfg: GateConfig {
                score: ScoreFunction::Softmax,
                renormalize: false,
                scaling: 1.0,
                ..hy3(64, 6)
            },
            bias: false,
            dead: 0,
        },
        GateCase {
            name: "E256/k8 grouped 8/4 (DeepSeek-V3)",
            cfg: GateConfig {
                n_group: 8,
                topk_group: 4,
                ..hy3(256, 8)
            },
            bias: true,
            dead: 0,
        },
        GateCase {
            name: "E512/k16 sigmoid+bias",
            cfg: hy3(512, 16),
            bias: true,
            dead: 0,
        },
        GateCase {
            name: "E33/k3 sigmoid",
            cfg: hy3(33, 3),
            bias: false,
            dead: 0,
        },
        GateCase {
            name: "E8/k8 (k = E)",
            cfg: hy3(8, 8),
            bias: true,
            dead: 0,
        },
    ]
}

/// CPU choice value of expert `i` in `row` (what the gate ranks by).
fn choice_values(row: &[f32], bias: Option<&[f32]>, score: ScoreFunction) -> Vec<f32> {
    let s: Vec<f32> = match score {
        ScoreFunction::Sigmoid => row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        ScoreFunction::Softmax => {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let ex: Vec<f32> = row.iter().map(|&x| (x - m).exp()).collect();
            let z: f32 = ex.iter().sum();
            ex.iter().map(|v| v / z).collect()
        }
    };
    s.iter()
        .enumerate()
        .map(|(i, v)| v + bias.map_or(0.0, |b| b[i]))
        .collect()
}

fn check_gate(c: &mut Ctx) -> Result<()> {
    println!("\n== gate top-k (ids identical, weights within {GATE_W_TOL:e})");
    for case in gate_cases() {
        for &t in std::iter::once(&0).chain(check_tokens().iter()) {
            let res = (|| -> Result<()> {
                let cfg = &case.cfg;
                let (e, k) = (cfg.num_experts, cfg.top_k);
                let logits = make_logits(&mut c.rng, t, e, case.dead);
                let bias = case.bias.then(|| make_bias(&mut c.rng, e));
                let reference = gate_topk(&logits, bias.as_deref(), cfg)?;
                let d_logits = upload(c, &logits)?;
                let d_bias = match &bias {
                    Some(b) => Some(upload(c, b)?),
                    None => None,
                };
                let mut ids = poisoned::<u32>(c, t * k)?;
                let mut ws = poisoned::<f32>(c, t * k)?;
                {
                    let bv = d_bias.as_ref().map(|b| b.slice(..));
                    c.kern.launch_gate_topk(
                        &d_logits.slice(0..t * e),
                        bv.as_ref(),
                        cfg,
                        t,
                        &mut ids.slice_mut(0..t * k),
                        &mut ws.slice_mut(0..t * k),
                    )?;
                }
                c.stream.synchronize().context("gate kernel")?;
                let g_ids = c.stream.clone_dtoh(&ids)?;
                let g_ws = c.stream.clone_dtoh(&ws)?;
                let (mut same, mut near, mut bad, mut max_dw) = (0usize, 0usize, 0usize, 0f32);
                for r in 0..t {
                    let (a, b) = (
                        &g_ids[r * k..(r + 1) * k],
                        &reference.ids[r * k..(r + 1) * k],
                    );
                    if a == b {
                        same += 1;
                        for j in 0..k {
                            let (x, y) = (g_ws[r * k + j], reference.weights[r * k + j]);
                            let d = if x.is_finite() {
                                (x - y).abs()
                            } else {
                                f32::INFINITY
                            };
                            max_dw = max_dw.max(d);
                        }
                        continue;
                    }
                    // Differ: a rounding tie if every position's choice values agree closely.
                    let ch = choice_values(&logits[r * e..(r + 1) * e], bias.as_deref(), cfg.score);
                    let mut tie = a.iter().zip(b).all(|(&x, &y)| {
                        (x as usize) < e && (ch[x as usize] - ch[y as usize]).abs() <= NEAR_TIE
                    });
                    if !tie && cfg.n_group > 1 {
                        // Group-limited choice: a near tie between the last kept group and the
                        // first dropped one changes which experts are eligible at all.
                        let gsize = e / cfg.n_group;
                        let mut gs: Vec<f32> = (0..cfg.n_group)
                            .map(|g| {
                                let mut v = ch[g * gsize..(g + 1) * gsize].to_vec();
                                v.sort_by(|p, q| q.partial_cmp(p).unwrap());
                                v[0] + v.get(1).copied().unwrap_or(0.0)
                            })
                            .collect();
                        gs.sort_by(|p, q| q.partial_cmp(p).unwrap());
                        tie = (gs[cfg.topk_group - 1] - gs[cfg.topk_group]).abs() <= NEAR_TIE;
                    }
                    if tie {
                        near += 1;
                    } else {
                        bad += 1;
                        if bad <= 2 {
                            println!("        token {r}: gpu {a:?} cpu {b:?}");
                        }
                    }
                }
                let ok = bad == 0 && max_dw <= GATE_W_TOL && near * 100 <= t.max(1);
                c.verdict(
                    ok,
                    format!(
                        "gate {:<38} T={t:<5} ids same {same}/{t}, rounding-tie swaps {near}, \
                     wrong {bad}, max|Δw| {max_dw:.1e}",
                        case.name
                    ),
                );
                Ok(())
            })();
            if let Err(err) = res {
                c.verdict(false, format!("gate {} T={t}: error: {err:#}", case.name));
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// dispatch

fn check_dispatch(c: &mut Ctx) -> Result<()> {
    println!("\n== dispatch (permutation grouped by expert; offsets, per-expert sets, tiles)");
    for &(e, k, dead) in &[
        (192usize, 8usize, 0usize),
        (64, 8, 4),
        (8, 8, 0),
        (512, 16, 0),
    ] {
        for &t in std::iter::once(&0).chain(check_tokens().iter()) {
            let res = (|| -> Result<()> {
                let cfg = GateConfig::sigmoid(e, k, 1.0);
                // Skewed routing so some experts are crowded and others empty.
                let mut logits = make_logits(&mut c.rng, t, e, dead);
                for (i, v) in logits.iter_mut().enumerate() {
                    if i % e < e / 8 {
                        *v += 1.0;
                    }
                }
                let gate = gate_topk(&logits, None, &cfg)?;
                let plan = dispatch(&gate, e)?;
                let n = t * k;
                let mt = max_tiles(n, e).max(1);
                let d_ids = upload(c, &gate.ids)?;
                let mut offs = poisoned::<u32>(c, e + 1)?;
                let mut tok = poisoned::<u32>(c, n)?;
                let mut slot = poisoned::<u32>(c, n)?;
                let mut te = poisoned::<u32>(c, mt)?;
                let mut ts = poisoned::<u32>(c, mt)?;
                let mut nt = poisoned::<u32>(c, 1)?;
                {
                    let mut v = DispatchViews {
                        offsets: offs.slice_mut(0..e + 1),
                        token_of: tok.slice_mut(0..n),
                        slot_of: slot.slice_mut(0..n),
                        tile_expert: te.slice_mut(0..mt),
                        tile_start: ts.slice_mut(0..mt),
                        num_tiles: nt.slice_mut(0..1),
                    };
                    c.kern
                        .launch_dispatch(&d_ids.slice(0..n), t, k, e, &mut v)?;
                }
                c.stream.synchronize().context("dispatch kernel")?;
                let g_offs = c.stream.clone_dtoh(&offs)?;
                let g_tok = c.stream.clone_dtoh(&tok)?;
                let g_slot = c.stream.clone_dtoh(&slot)?;
                let g_te = c.stream.clone_dtoh(&te)?;
                let g_ts = c.stream.clone_dtoh(&ts)?;
                let g_nt = c.stream.clone_dtoh(&nt)?[0] as usize;
                let mut why = Vec::new();
                let want_offs: Vec<u32> = plan.offsets.iter().map(|&o| o as u32).collect();
                if g_offs[..e + 1] != want_offs[..] {
                    why.push("offsets differ".to_string());
                }
                let mut seen = vec![false; n];
                for p in 0..n {
                    let s = g_slot[p] as usize;
                    if s >= n || seen[s] {
                        why.push(format!("slot_of[{p}] = {s} is not a permutation entry"));
                        break;
                    }
                    seen[s] = true;
                    if g_tok[p] as usize != s / k {
                        why.push(format!(
                            "token_of[{p}] = {} but slot {s} is token {}",
                            g_tok[p],
                            s / k
                        ));
                        break;
                    }
                }
                if why.is_empty() {
                    for ex in 0..e {
                        let (lo, hi) = (plan.offsets[ex], plan.offsets[ex + 1]);
                        let mut got: Vec<u32> = g_slot[lo..hi].to_vec();
                        got.sort_unstable();
                        if got[..] != plan.slot_of[lo..hi] {
                            why.push(format!("expert {ex}'s entries differ"));
                            break;
                        }
                    }
                }
                let mut want_tiles = Vec::new();
                for ex in 0..e {
                    let (lo, hi) = (plan.offsets[ex], plan.offsets[ex + 1]);
                    let mut r = lo;
                    while r < hi {
                        want_tiles.push((ex as u32, r as u32));
                        r += TILE_ROWS;
                    }
                }
                if g_nt != want_tiles.len() {
                    why.push(format!("num_tiles {g_nt}, expected {}", want_tiles.len()));
                } else if (0..g_nt).any(|m| (g_te[m], g_ts[m]) != want_tiles[m]) {
                    why.push("tile list differs".into());
                }
                let empty = (0..e).filter(|&x| plan.count(x) == 0).count();
                c.verdict(
                    why.is_empty(),
                    format!(
                        "dispatch E={e:<3} k={k:<2} T={t:<5} {n} entries, {empty} empty experts, \
                     {g_nt} tiles{}",
                        if why.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", why.join("; "))
                        }
                    ),
                );
                Ok(())
            })();
            if let Err(err) = res {
                c.verdict(false, format!("dispatch E={e} k={k} T={t}: error: {err:#}"));
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// experts

struct ExpertCase {
    name: &'static str,
    e: usize,
    k: usize,
    h: usize,
    i: usize,
    shared: bool,
}

/// Host-side problem: bf16 weights and the routing (with the shared expert as an extra column).
struct Problem {
    e_total: usize,
    k_total: usize,
    h: usize,
    i: usize,
    gate_up: Vec<bf16>,
    down: Vec<bf16>,
}

fn make_problem(rng: &mut StdRng, case: &ExpertCase) -> Problem {
    let e_total = case.e + case.shared as usize;
    let (h, i) = (case.h, case.i);
    Problem {
        e_total,
        k_total: case.k + case.shared as usize,
        h,
        i,
        gate_up: bf16_vec(rng, e_total * 2 * i * h, 1.0 / (h as f32).sqrt()),
        down: bf16_vec(rng, e_total * h * i, 1.0 / (i as f32).sqrt()),
    }
}

/// Routing for `t` tokens from the CPU gate, with the shared expert appended (id E, weight 1).
fn make_routing(rng: &mut StdRng, case: &ExpertCase, t: usize) -> Result<GateOutput> {
    let cfg = GateConfig::sigmoid(case.e, case.k, 2.826);
    let logits = make_logits(rng, t, case.e, 3);
    let bias = make_bias(rng, case.e);
    let g = gate_topk(&logits, Some(&bias), &cfg)?;
    if !case.shared {
        return Ok(g);
    }
    let k2 = case.k + 1;
    let mut ids = Vec::with_capacity(t * k2);
    let mut weights = Vec::with_capacity(t * k2);
    for r in 0..t {
        ids.extend_from_slice(&g.ids[r * case.k..(r + 1) * case.k]);
        ids.push(case.e as u32);
        weights.extend_from_slice(&g.weights[r * case.k..(r + 1) * case.k]);
        weights.push(1.0);
    }
    Ok(GateOutput {
        tokens: t,
        top_k: k2,
        ids,
        weights,
    })
}

/// The crate's CPU reference (`experts_forward`, f32) on the rows `rows` of the problem.
fn cpu_reference(p: &Problem, x: &[bf16], g: &GateOutput, rows: &[usize]) -> Result<Vec<f32>> {
    let (h, i, e, k) = (p.h, p.i, p.e_total, p.k_total);
    let cpu = Device::Cpu;
    let f = |v: &[bf16]| v.iter().map(|b| b.to_f32()).collect::<Vec<f32>>();
    let w = ExpertWeights {
        gate_up: Tensor::from_vec(f(&p.gate_up), (e, 2 * i, h), &cpu)?,
        down: Tensor::from_vec(f(&p.down), (e, h, i), &cpu)?,
    };
    let mut xs = Vec::with_capacity(rows.len() * h);
    let mut ids = Vec::with_capacity(rows.len() * k);
    let mut ws = Vec::with_capacity(rows.len() * k);
    for &r in rows {
        xs.extend(x[r * h..(r + 1) * h].iter().map(|b| b.to_f32()));
        ids.extend_from_slice(&g.ids[r * k..(r + 1) * k]);
        ws.extend_from_slice(&g.weights[r * k..(r + 1) * k]);
    }
    let sub = GateOutput {
        tokens: rows.len(),
        top_k: k,
        ids,
        weights: ws,
    };
    let plan = dispatch(&sub, e)?;
    let xt = Tensor::from_vec(xs, (rows.len(), h), &cpu)?;
    let y = experts_forward(&xt, &w, &sub, &plan)?;
    Ok(y.flatten_all()?.to_vec1::<f32>()?)
}

fn check_rows(t: usize, rng: &mut StdRng) -> Vec<usize> {
    if t <= EXPERT_CHECK_SUBSET {
        return (0..t).collect();
    }
    let mut rows: Vec<usize> = (0..EXPERT_CHECK_SUBSET - 2)
        .map(|_| rng.random_range(0..t))
        .collect();
    rows.push(0);
    rows.push(t - 1);
    rows.sort_unstable();
    rows.dedup();
    rows
}

fn check_experts(c: &mut Ctx) -> Result<()> {
    println!(
        "\n== experts (bf16, f32 accumulate; ‖out−ref‖/‖ref‖ ≤ {EXPERT_REL_TOL:e} vs CPU f32 \
         experts_forward; ≤{EXPERT_CHECK_SUBSET} tokens compared)"
    );
    let cases = [
        ExpertCase {
            name: "E64+1 shared, k8+1, H512, I256",
            e: 64,
            k: 8,
            h: 512,
            i: 256,
            shared: true,
        },
        ExpertCase {
            name: "E192, k8, H416, I160 (partial tiles)",
            e: 192,
            k: 8,
            h: 416,
            i: 160,
            shared: false,
        },
    ];
    for case in &cases {
        let p = make_problem(&mut c.rng, case);
        let d_gu = c.stream.clone_htod(&p.gate_up)?;
        let d_dn = c.stream.clone_htod(&p.down)?;
        for &t in expert_check_tokens().iter() {
            let res = (|| -> Result<()> {
                let g = make_routing(&mut c.rng, case, t)?;
                let x = bf16_vec(&mut c.rng, t * p.h, 1.0);
                let rows = check_rows(t, &mut c.rng);
                let reference = cpu_reference(&p, &x, &g, &rows)?;
                let d_x = c.stream.clone_htod(&x)?;
                let d_ids = c.stream.clone_htod(&g.ids)?;
                let d_w = c.stream.clone_htod(&g.weights)?;
                let dims = MoeDims {
                    tokens: t,
                    top_k: p.k_total,
                    experts: p.e_total,
                    hidden: p.h,
                    inter: p.i,
                };
                let n = t * p.k_total;
                let paths: &[ExpertPath] = if t <= kc::GEMV_MAX_TOKENS {
                    &[
                        ExpertPath::Gemv,
                        ExpertPath::GemvAtomic,
                        ExpertPath::GemvRows,
                        ExpertPath::Tiled,
                    ]
                } else {
                    &[ExpertPath::Tiled]
                };
                // Gemv's output, to say whether GemvRows (the same act by construction) gives
                // the same bits (information only; the reference check decides).
                let mut gemv_bits: Option<Vec<u32>> = None;
                for &path in paths {
                    let mut y = poisoned::<bf16>(c, t * p.h)?;
                    let inp = ExpertViews {
                        x: d_x.slice(..),
                        gate_up: d_gu.slice(..),
                        down: d_dn.slice(..),
                        weights: d_w.slice(..),
                    };
                    let t0 = Instant::now();
                    match path {
                        ExpertPath::Gemv | ExpertPath::GemvAtomic | ExpertPath::GemvRows => {
                            let mut act = poisoned::<f32>(c, n * p.i)?;
                            let mut acc = poisoned::<f32>(c, t * p.h)?;
                            let mut accv = acc.slice_mut(..);
                            let gate_up = if path == ExpertPath::GemvRows {
                                GemvGateUp::Rows
                            } else {
                                GemvGateUp::Blocks
                            };
                            c.kern.launch_experts_gemv_with(
                                &inp,
                                &d_ids.slice(..),
                                &dims,
                                gate_up,
                                &mut act.slice_mut(..),
                                (path == ExpertPath::GemvAtomic).then_some(&mut accv),
                                &mut y.slice_mut(..),
                            )?;
                        }
                        _ => {
                            let mt = max_tiles(n, p.e_total).max(1);
                            let mut offs = poisoned::<u32>(c, p.e_total + 1)?;
                            let mut tok = poisoned::<u32>(c, n)?;
                            let mut slot = poisoned::<u32>(c, n)?;
                            let mut te = poisoned::<u32>(c, mt)?;
                            let mut ts = poisoned::<u32>(c, mt)?;
                            let mut nt = poisoned::<u32>(c, 1)?;
                            {
                                let mut v = DispatchViews {
                                    offsets: offs.slice_mut(..),
                                    token_of: tok.slice_mut(0..n),
                                    slot_of: slot.slice_mut(0..n),
                                    tile_expert: te.slice_mut(..),
                                    tile_start: ts.slice_mut(..),
                                    num_tiles: nt.slice_mut(..),
                                };
                                c.kern.launch_dispatch(
                                    &d_ids.slice(..),
                                    t,
                                    p.k_total,
                                    p.e_total,
                                    &mut v,
                                )?;
                            }
                            let mut act = poisoned::<bf16>(c, n * p.i)?;
                            let mut acc = poisoned::<f32>(c, t * p.h)?;
                            let pv = PlanViews {
                                offsets: offs.slice(..),
                                token_of: tok.slice(0..n),
                                slot_of: slot.slice(0..n),
                                tile_expert: te.slice(..),
                                tile_start: ts.slice(..),
                                num_tiles: nt.slice(..),
                            };
                            c.kern.launch_experts_tiled(
                                &inp,
                                &dims,
                                &pv,
                                &mut act.slice_mut(..),
                                &mut acc.slice_mut(..),
                                &mut y.slice_mut(..),
                            )?;
                        }
                    }
                    c.stream
                        .synchronize()
                        .with_context(|| format!("expert kernels ({path:?}, T={t})"))?;
                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                    let out: Vec<f32> = c
                        .stream
                        .clone_dtoh(&y)?
                        .iter()
                        .map(|b| b.to_f32())
                        .collect();
                    let unwritten = out[..t * p.h].iter().filter(|v| !v.is_finite()).count();
                    let sub: Vec<f32> = rows
                        .iter()
                        .flat_map(|&r| out[r * p.h..(r + 1) * p.h].iter().copied())
                        .collect();
                    let (rel, max_abs, _) = rel_err(&sub, &reference);
                    let ok = unwritten == 0 && rel <= EXPERT_REL_TOL;
                    let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                    let vs_gemv = match (path, &gemv_bits) {
                        (ExpertPath::GemvRows, Some(g)) if *g == bits => ", y = Gemv's bit for bit",
                        (ExpertPath::GemvRows, Some(_)) => ", y differs from Gemv's (see rel)",
                        _ => "",
                    };
                    if path == ExpertPath::Gemv {
                        gemv_bits = Some(bits);
                    }
                    c.verdict(
                        ok,
                        format!(
                            "experts {:<38} {:<5} T={t:<5} rel {rel:.2e} max|Δ| {max_abs:.2e} \
                         non-finite {unwritten} ({} tokens compared, {ms:.1} ms){vs_gemv}",
                            case.name,
                            format!("{path:?}"),
                            rows.len()
                        ),
                    );
                }
                Ok(())
            })();
            if let Err(err) = res {
                c.verdict(
                    false,
                    format!("experts {} T={t}: error: {err:#}", case.name),
                );
            }
        }
    }
    Ok(())
}

/// The tensor-level API (what the model calls) must give what the raw launchers give.
fn check_tensor_api(c: &mut Ctx) -> Result<()> {
    println!("\n== tensor API (gate_topk / dispatch / experts_forward on candle tensors)");
    let case = ExpertCase {
        name: "api",
        e: 64,
        k: 8,
        h: 256,
        i: 128,
        shared: false,
    };
    let p = make_problem(&mut c.rng, &case);
    let cfg = GateConfig::sigmoid(64, 8, 2.826);
    let w = ExpertWeights {
        gate_up: Tensor::from_vec(p.gate_up.clone(), (64, 256, 256), &c.device)?,
        down: Tensor::from_vec(p.down.clone(), (64, 256, 128), &c.device)?,
    };
    for &t in &[0usize, 3, 300] {
        let res = (|| -> Result<()> {
            let logits = make_logits(&mut c.rng, t, 64, 0);
            let bias = make_bias(&mut c.rng, 64);
            let x = bf16_vec(&mut c.rng, t * 256, 1.0);
            let reference = gate_topk(&logits, Some(&bias), &cfg)?;
            // Built by narrowing so T = 0 needs no zero-byte allocation.
            let lt = Tensor::from_vec(
                [logits.clone(), vec![0.0; 64]].concat(),
                (t + 1, 64),
                &c.device,
            )?
            .narrow(0, 0, t)?;
            let bt = Tensor::from_vec(bias.clone(), 64, &c.device)?;
            let xt = Tensor::from_vec(
                [x.clone(), vec![bf16::ZERO; 256]].concat(),
                (t + 1, 256),
                &c.device,
            )?
            .narrow(0, 0, t)?;
            let (ids, ws) = kc::gate_topk(&lt, Some(&bt), &cfg)?;
            let plan = kc::dispatch(&ids, 64)?;
            let y_auto = kc::experts_forward(&xt, &w, &ids, &ws, ExpertPath::Auto)?;
            let y_tiled = kc::experts_forward_planned(&xt, &w, &ws, &plan)?;
            if t == 0 {
                // Empty in, empty out; no element ops (candle launches none on empty tensors).
                let offsets: Vec<u32> = plan.offsets.to_vec1()?;
                let tiles: Vec<u32> = plan.num_tiles.to_vec1()?;
                let ok = ids.dims() == [0, 8]
                    && ws.dims() == [0, 8]
                    && y_auto.dims() == [0, 256]
                    && y_tiled.dims() == [0, 256]
                    && offsets.iter().all(|&o| o == 0)
                    && tiles == [0];
                c.verdict(
                    ok,
                    format!(
                        "tensor API T=0: ids {:?}, y {:?}, offsets all zero and no tiles: {ok}",
                        ids.dims(),
                        y_auto.dims()
                    ),
                );
                return Ok(());
            }
            let g_ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
            let g_ws: Vec<f32> = ws.flatten_all()?.to_vec1()?;
            let g = GateOutput {
                tokens: t,
                top_k: 8,
                ids: g_ids.clone(),
                weights: g_ws,
            };
            let rows: Vec<usize> = (0..t).collect();
            let reference_y = cpu_reference(&p, &x, &g, &rows)?;
            let f = |y: &Tensor| -> Result<Vec<f32>> {
                Ok(y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            };
            let (ya, yt) = (f(&y_auto)?, f(&y_tiled)?);
            let (ra, _, na) = rel_err(&ya, &reference_y);
            let (rt, _, nt) = rel_err(&yt, &reference_y);
            let offsets: Vec<u32> = plan.offsets.to_vec1()?;
            let cpu_plan = dispatch(&g, 64)?;
            let same_offsets = offsets
                .iter()
                .zip(&cpu_plan.offsets)
                .all(|(&a, &b)| a as usize == b);
            let ids_match = g_ids
                .chunks(8)
                .zip(reference.ids.chunks(8))
                .filter(|(a, b)| a != b)
                .count();
            let ok = y_auto.dims() == [t, 256]
                && (t == 0 || (ra <= EXPERT_REL_TOL && rt <= EXPERT_REL_TOL))
                && na + nt == 0
                && same_offsets
                && ids_match * 100 <= t.max(1);
            c.verdict(
                ok,
                format!(
                    "tensor API T={t:<4} auto rel {ra:.2e}, planned-tiled rel {rt:.2e}, offsets \
                 {}, gate rows differing from CPU {ids_match}",
                    if same_offsets { "match" } else { "DIFFER" }
                ),
            );
            Ok(())
        })();
        if let Err(err) = res {
            c.verdict(false, format!("tensor API T={t}: error: {err:#}"));
        }
    }
    // A wrong dtype must come back as a sentence, not a panic.
    let bad = Tensor::zeros((2, 64), DType::F16, &c.device)?;
    match kc::gate_topk(&bad, None, &cfg) {
        Err(e) => c.verdict(true, format!("wrong dtype rejected: {e}")),
        Ok(_) => c.verdict(false, "f16 logits were accepted".into()),
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// benchmark

/// Times `f` with CUDA events: `warm` calls, then `groups` groups of `per` back-to-back calls;
/// returns the median µs per call over groups.
fn time_events(
    c: &Ctx,
    warm: usize,
    groups: usize,
    per: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    let mut it = 0;
    for _ in 0..warm {
        f(it)?;
        it += 1;
    }
    c.stream.synchronize()?;
    let mut v = Vec::with_capacity(groups);
    for _ in 0..groups {
        let a = c
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        for _ in 0..per {
            f(it)?;
            it += 1;
        }
        let b = c
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        b.synchronize()?;
        v.push(a.elapsed_ms(&b)? as f64 * 1e3 / per as f64);
    }
    Ok(median(v))
}

const SETS: usize = 8;

struct BenchRow {
    t: usize,
    path: &'static str,
    layer_us: f64,
    experts_us: f64,
    distinct: f64,
    naive_us: f64,
    rel: f64,
}

fn bench(c: &mut Ctx) -> Result<String> {
    let (h, i, e, k) = (4096usize, 1536usize, 192usize, 8usize);
    let (e_tot, k_tot) = (e + 1, k + 1);
    println!(
        "\n== benchmark at Hy3 shapes: H {h}, I {i}, {e} experts top-{k} + 1 shared \
         (expert {e}, weight 1)"
    );
    let cfg = GateConfig::sigmoid(e, k, 2.826);
    let t0 = Instant::now();
    let w = hy3_weights(c, e_tot, h, i)?;
    let expert_bytes = (3 * h * i * 2) as f64;
    println!(
        "  weights: {:.2} GB bf16 made in {:.1} s",
        expert_bytes * e_tot as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );
    let (sms, per_sm) = c.kern.gemv_rows_occupancy();
    let t1 = MoeDims {
        tokens: 1,
        top_k: k_tot,
        experts: e_tot,
        hidden: h,
        inter: i,
    };
    c.notes.push(format!(
        "gemv-rows: {sms} SMs x {per_sm:?} blocks per SM for moe_gemv_gate_up_rows1/2/4/8 \
         (driver occupancy query); T=1 grid {} blocks of 8 warps for {} rows",
        c.kern.gemv_rows_grid(&t1)?,
        k_tot * i
    ));
    // A small bias (±0.03) so routing spreads over all experts, as a trained load-balancing
    // bias makes it; the ±0.3 test bias would crowd the high-bias experts.
    let bias_small: Vec<f32> = make_bias(&mut c.rng, e).iter().map(|b| b * 0.1).collect();
    let bias = Tensor::from_vec(bias_small, e, &c.device)?;

    // Gate alone at T = 256 (and a few other sizes), through a CUDA graph of 100 launches
    // over 8 rotating logit buffers so launch overhead stays out of the number.
    let mut gate_lines = Vec::new();
    for &t in &[1usize, 64, 256, 1024, 4096] {
        let res = (|| -> Result<()> {
            let logit_bufs: Vec<CudaSlice<f32>> = (0..SETS)
                .map(|_| c.stream.clone_htod(&make_logits(&mut c.rng, t, e, 0)))
                .collect::<Result<_, _>>()?;
            let bias_host = make_bias(&mut c.rng, e);
            let d_bias = c.stream.clone_htod(&bias_host)?;
            let mut ids = unsafe { c.stream.alloc::<u32>(t * k) }?;
            let mut ws = unsafe { c.stream.alloc::<f32>(t * k) }?;
            let mut launch = |it: usize| -> Result<()> {
                c.kern.launch_gate_topk(
                    &logit_bufs[it % SETS].slice(..),
                    Some(&d_bias.slice(..)),
                    &cfg,
                    t,
                    &mut ids.slice_mut(..),
                    &mut ws.slice_mut(..),
                )?;
                Ok(())
            };
            let plain = time_events(c, 20, 20, 50, &mut launch)?;
            let graph_us = graph_time(c, &mut launch).unwrap_or_else(|err| {
                println!("  (graph timing unavailable: {err:#})");
                f64::NAN
            });
            gate_lines.push(format!(
                "| gate top-k E={e} k={k} | {t} | {graph_us:.2} | {plain:.2} |"
            ));
            println!("  gate T={t}: {graph_us:.2} µs per launch in a graph, {plain:.2} µs launched one by one");
            Ok(())
        })();
        if let Err(err) = res {
            c.verdict(false, format!("gate timing T={t}: error: {err:#}"));
        }
    }

    let mut rows = Vec::new();
    let mut dispatch_lines = Vec::new();
    for &t in &[1usize, 2, 4, 8, 64, 256, 1024] {
        let res = (|| -> Result<()> {
            // 8 input sets: x and router logits.
            let xs: Vec<Tensor> = (0..SETS)
                .map(|_| {
                    Tensor::randn(0f32, 1.0, (t, h), &c.device)
                        .and_then(|x| x.to_dtype(DType::BF16))
                })
                .collect::<Result<_, _>>()?;
            let logits: Vec<Tensor> = (0..SETS)
                .map(|_| Tensor::from_vec(make_logits(&mut c.rng, t, e, 0), (t, e), &c.device))
                .collect::<Result<_, _>>()?;
            let shared_ids = Tensor::from_vec(vec![e as u32; t], (t, 1), &c.device)?;
            let shared_w = Tensor::from_vec(vec![1f32; t], (t, 1), &c.device)?;
            let route = |s: usize| -> Result<(Tensor, Tensor)> {
                let (ids, ws) = kc::gate_topk(&logits[s], Some(&bias), &cfg)?;
                Ok((
                    Tensor::cat(&[&ids, &shared_ids], 1)?,
                    Tensor::cat(&[&ws, &shared_w], 1)?,
                ))
            };
            let routes: Vec<(Tensor, Tensor)> = (0..SETS).map(route).collect::<Result<_>>()?;
            let mut distinct = 0f64;
            for (ids, _) in &routes {
                let mut v: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                v.sort_unstable();
                v.dedup();
                distinct += v.len() as f64 / SETS as f64;
            }
            let paths: &[(&'static str, ExpertPath)] = if t <= kc::GEMV_MAX_TOKENS {
                &[
                    ("gemv", ExpertPath::Gemv),
                    ("gemv-rows", ExpertPath::GemvRows),
                    ("gemv-atomic", ExpertPath::GemvAtomic),
                    ("tiled", ExpertPath::Tiled),
                ]
            } else {
                &[("tiled", ExpertPath::Tiled)]
            };
            // Dispatch alone: the tensor op (allocates its outputs), and the raw launcher on
            // preallocated buffers replayed from a graph (the kernel's own time).
            let disp_us = time_events(c, 3, 10, 10, |it| {
                kc::dispatch(&routes[it % SETS].0, e_tot)?;
                Ok(())
            })?;
            let n = t * k_tot;
            let mt = max_tiles(n, e_tot).max(1);
            let id_bufs: Vec<CudaSlice<u32>> = routes
                .iter()
                .map(|(ids, _)| -> Result<CudaSlice<u32>> {
                    Ok(c.stream.clone_htod(&ids.flatten_all()?.to_vec1::<u32>()?)?)
                })
                .collect::<Result<_>>()?;
            let mut offs = unsafe { c.stream.alloc::<u32>(e_tot + 1) }?;
            let mut tok = unsafe { c.stream.alloc::<u32>(n) }?;
            let mut slot = unsafe { c.stream.alloc::<u32>(n) }?;
            let mut te = unsafe { c.stream.alloc::<u32>(mt) }?;
            let mut ts = unsafe { c.stream.alloc::<u32>(mt) }?;
            let mut nt = unsafe { c.stream.alloc::<u32>(1) }?;
            let mut launch = |it: usize| -> Result<()> {
                let mut v = DispatchViews {
                    offsets: offs.slice_mut(..),
                    token_of: tok.slice_mut(..),
                    slot_of: slot.slice_mut(..),
                    tile_expert: te.slice_mut(..),
                    tile_start: ts.slice_mut(..),
                    num_tiles: nt.slice_mut(..),
                };
                c.kern
                    .launch_dispatch(&id_bufs[it % SETS].slice(..), t, k_tot, e_tot, &mut v)?;
                Ok(())
            };
            let disp_graph = graph_time(c, &mut launch).unwrap_or(f64::NAN);
            dispatch_lines.push(format!(
                "| dispatch E={e_tot} k={k_tot} | {t} | {disp_graph:.2} | {disp_us:.2} |"
            ));

            // Naive candle per-expert loop: routing to the host, then index_select + matmul per
            // expert (the crate's reference code on CUDA tensors).
            let naive_run = || -> Result<f64> {
                let mut naive = Vec::new();
                for rep in 0..4 {
                    let s = rep % SETS;
                    c.stream.synchronize()?;
                    let t1 = Instant::now();
                    let (ids, ws) = &routes[s];
                    let g = GateOutput {
                        tokens: t,
                        top_k: k_tot,
                        ids: ids.flatten_all()?.to_vec1()?,
                        weights: ws.flatten_all()?.to_vec1()?,
                    };
                    let plan = dispatch(&g, e_tot)?;
                    let y = experts_forward(&xs[s], &w, &g, &plan)?;
                    drop(y);
                    c.stream.synchronize()?;
                    if rep > 0 {
                        naive.push(t1.elapsed().as_secs_f64() * 1e6);
                    }
                }
                Ok(median(naive))
            };
            let naive_us = naive_run().unwrap_or_else(|err| {
                println!("  naive candle loop failed at T={t}: {err:#}");
                f64::NAN
            });

            for &(pname, path) in paths {
                let res = (|| -> Result<()> {
                    let experts_us = time_events(c, 3, 7, 4, |it| {
                        let (ids, ws) = &routes[it % SETS];
                        kc::experts_forward(&xs[it % SETS], &w, ids, ws, path)?;
                        Ok(())
                    })?;
                    let layer_us = time_events(c, 3, 7, 4, |it| {
                        let (ids, ws) = route(it % SETS)?;
                        kc::experts_forward(&xs[it % SETS], &w, &ids, &ws, path)?;
                        Ok(())
                    })?;
                    // Spot check at this shape: two tokens against the CPU reference.
                    let rel =
                        spot_check(c, &w, &xs[0], &routes[0], path, h, i).unwrap_or_else(|err| {
                            println!("  spot check failed: {err:#}");
                            f64::NAN
                        });
                    let ok = rel <= EXPERT_REL_TOL;
                    c.verdict(
                        ok,
                        format!("bench-shape spot check T={t} {pname}: rel {rel:.2e} on 2 tokens"),
                    );
                    println!(
                "  T={t:<5} {pname:<5} layer {layer_us:9.1} µs  experts {experts_us:9.1} µs  \
                 distinct experts {distinct:.1}  naive candle {naive_us:9.1} µs"
            );
                    rows.push(BenchRow {
                        t,
                        path: pname,
                        layer_us,
                        experts_us,
                        distinct,
                        naive_us,
                        rel,
                    });
                    Ok(())
                })();
                if let Err(err) = res {
                    c.verdict(false, format!("bench T={t} {pname}: error: {err:#}"));
                }
            }
            Ok(())
        })();
        if let Err(err) = res {
            c.verdict(false, format!("bench T={t}: error: {err:#}"));
        }
    }

    let mut out = String::new();
    out.push_str(&format!(
        "Results (H {h}, I {i}, E {e} + 1 shared, top-{k} + shared, bf16 weights, f32 accumulate)\n\n"
    ));
    out.push_str("| op | T | µs (graph) | µs (launch by launch) |\n|---|---|---|---|\n");
    for l in &gate_lines {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(
        "\n| op | T | µs (kernel, graph) | µs (tensor op, allocates) |\n|---|---|---|---|\n",
    );
    for l in &dispatch_lines {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(
        "\n| T | path | MoE layer µs | experts µs | distinct experts | GB/s | % of 4.8 TB/s | TFLOP/s | naive candle µs | speed-up | rel err |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let bytes = r.distinct * expert_bytes;
        let gbs = bytes / (r.experts_us * 1e-6) / 1e9;
        let flops = 2.0 * r.t as f64 * k_tot as f64 * 3.0 * h as f64 * i as f64;
        let tflops = flops / (r.experts_us * 1e-6) / 1e12;
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0}% | {:.1} | {:.0} | {:.1}x | {:.1e} |\n",
            r.t,
            r.path,
            r.layer_us,
            r.experts_us,
            r.distinct,
            gbs,
            100.0 * bytes / (r.experts_us * 1e-6) / HBM_BYTES_PER_S,
            tflops,
            r.naive_us,
            r.naive_us / r.layer_us,
            r.rel
        ));
    }
    out.push_str(
        "\nMoE layer = gate top-k + shared-expert column + (dispatch) + experts; experts = the expert \
         kernels alone. GB/s counts the bf16 bytes of the distinct experts touched (shared included) \
         once; TFLOP/s counts 2·T·(k+1)·3·H·I. Naive candle = routing copied to the host, then \
         index_select + matmul per expert through candle ops (wall clock, includes its host syncs). \
         gemv-rows = gemv with moe_gemv_gate_up_rows* (persistent grid, one output row per warp) \
         and the same down kernel, so its difference to the gemv row is the gate/up kernel's.\n",
    );
    Ok(out)
}

/// Random bf16 expert weights, made on the device in chunks of 16 experts so no single op spans
/// more than 2^31 elements.
fn hy3_weights(c: &Ctx, e_tot: usize, h: usize, i: usize) -> Result<ExpertWeights> {
    let make = |rows: usize, cols: usize, std: f32| -> Result<Tensor> {
        let mut parts = Vec::new();
        let mut done = 0;
        while done < e_tot {
            let n = 16.min(e_tot - done);
            parts
                .push(Tensor::randn(0f32, std, (n, rows, cols), &c.device)?.to_dtype(DType::BF16)?);
            done += n;
        }
        Ok(Tensor::cat(&parts, 0)?)
    };
    let w = ExpertWeights {
        gate_up: make(2 * i, h, 1.0 / (h as f32).sqrt())?,
        down: make(h, i, 1.0 / (i as f32).sqrt())?,
    };
    c.stream.synchronize()?;
    Ok(w)
}

/// GPU_CHECK_PROFILE: just the expert kernels at Hy3 shapes (GEMV at T=1 with each variant,
/// tiled at T=256), twice each, for a profiler to look at.
fn profile(c: &mut Ctx) -> Result<()> {
    let (h, i, e, k) = (4096usize, 1536usize, 192usize, 8usize);
    let w = hy3_weights(c, e + 1, h, i)?;
    for &(t, path) in &[
        (1usize, ExpertPath::Gemv),
        (1, ExpertPath::GemvAtomic),
        (1, ExpertPath::GemvRows),
        (256, ExpertPath::Tiled),
    ] {
        let g = make_routing(
            &mut c.rng,
            &ExpertCase {
                name: "profile",
                e,
                k,
                h,
                i,
                shared: true,
            },
            t,
        )?;
        let ids = Tensor::from_vec(g.ids.clone(), (t, k + 1), &c.device)?;
        let ws = Tensor::from_vec(g.weights.clone(), (t, k + 1), &c.device)?;
        let x = Tensor::randn(0f32, 1.0, (t, h), &c.device)?.to_dtype(DType::BF16)?;
        for _ in 0..2 {
            kc::experts_forward(&x, &w, &ids, &ws, path)?;
        }
        c.stream.synchronize()?;
        println!("profile: T={t} {path:?} done");
    }
    Ok(())
}

/// Times `launch` replayed from a CUDA graph of 100 launches.
fn graph_time(c: &Ctx, launch: &mut impl FnMut(usize) -> Result<()>) -> Result<f64> {
    const PER_GRAPH: usize = 100;
    c.stream.synchronize()?;
    c.stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let mut captured = Ok(());
    for it in 0..PER_GRAPH {
        if let Err(e) = launch(it) {
            captured = Err(e);
            break;
        }
    }
    let graph = c.stream.end_capture(sys::CUgraphInstantiate_flags_enum(0));
    captured?;
    let graph = graph?.ok_or_else(|| anyhow!("capture produced no graph"))?;
    for _ in 0..3 {
        graph.launch()?;
    }
    c.stream.synchronize()?;
    let mut v = Vec::new();
    for _ in 0..20 {
        let a = c
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        graph.launch()?;
        let b = c
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        b.synchronize()?;
        v.push(a.elapsed_ms(&b)? as f64 * 1e3 / PER_GRAPH as f64);
    }
    Ok(median(v))
}

/// Relative error of the GPU experts on tokens 0 and T-1 of one input set against the CPU
/// reference, with the touched experts copied to the host.
fn spot_check(
    c: &Ctx,
    w: &ExpertWeights,
    x: &Tensor,
    route: &(Tensor, Tensor),
    path: ExpertPath,
    h: usize,
    i: usize,
) -> Result<f64> {
    let (ids, ws) = route;
    let y = kc::experts_forward(x, w, ids, ws, path)?;
    let t = x.dim(0)?;
    let k = ids.dim(1)?;
    let rows: Vec<usize> = if t == 1 { vec![0] } else { vec![0, t - 1] };
    let all_ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    let all_ws: Vec<f32> = ws.flatten_all()?.to_vec1()?;
    let mut touched: Vec<u32> = rows
        .iter()
        .flat_map(|&r| all_ids[r * k..(r + 1) * k].iter().copied())
        .collect();
    touched.sort_unstable();
    touched.dedup();
    let sel = Tensor::from_vec(touched.clone(), touched.len(), &c.device)?;
    let cpu = Device::Cpu;
    let mini = ExpertWeights {
        gate_up: w
            .gate_up
            .index_select(&sel, 0)?
            .to_dtype(DType::F32)?
            .to_device(&cpu)?,
        down: w
            .down
            .index_select(&sel, 0)?
            .to_dtype(DType::F32)?
            .to_device(&cpu)?,
    };
    let mut sub_ids = Vec::new();
    let mut sub_ws = Vec::new();
    let mut sub_x = Vec::new();
    let xf: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    for &r in &rows {
        for j in 0..k {
            let id = all_ids[r * k + j];
            sub_ids.push(touched.binary_search(&id).map_err(|_| anyhow!("id lost"))? as u32);
            sub_ws.push(all_ws[r * k + j]);
        }
        sub_x.extend_from_slice(&xf[r * h..(r + 1) * h]);
    }
    let g = GateOutput {
        tokens: rows.len(),
        top_k: k,
        ids: sub_ids,
        weights: sub_ws,
    };
    let plan = dispatch(&g, touched.len())?;
    let xt = Tensor::from_vec(sub_x, (rows.len(), h), &cpu)?;
    let reference: Vec<f32> = experts_forward(&xt, &mini, &g, &plan)?
        .flatten_all()?
        .to_vec1()?;
    let yf: Vec<f32> = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let got: Vec<f32> = rows
        .iter()
        .flat_map(|&r| yf[r * h..(r + 1) * h].iter().copied())
        .collect();
    let (rel, _, nan) = rel_err(&got, &reference);
    let _ = i;
    if nan > 0 {
        bail!("{nan} non-finite outputs at the bench shape");
    }
    Ok(rel)
}

// ------------------------------------------------------------------------------------------
// paged attention

/// f32 KV: the GPU and the CPU reference read the same cache values, so only f32 summation
/// order differs.
const PAGED_REL_TOL_F32: f64 = 1e-4;
/// bf16 and FP8 KV (issue #7's bound; both sides read the same cache values, so the error
/// seen is far smaller).
const PAGED_REL_TOL_BF16: f64 = 1e-2;
/// Decode contexts checked (1, block edges, partial last blocks, several partitions).
const PAGED_CONTEXTS: [usize; 8] = [1, 15, 16, 17, 100, 513, 1500, 4097];
const PAGED_QUICK_CONTEXTS: [usize; 5] = [1, 16, 17, 100, 300];
/// A prefill chunk in the same batch: `q_len` rows at the end of a `ctx`-token context.
const PAGED_CHUNK: (usize, usize) = (7, 40);
/// Partition sizes forced through the raw launcher (besides the tensor op's own choice): the
/// smallest (many partitions to merge) and the largest.
const PAGED_FORCED_PARTS: [usize; 2] = [32, 512];
/// Bytes of KV the benchmark rotates over per shape, so repeated calls stream from HBM rather
/// than the 50 MB L2 of an H200.
const PAGED_ROTATE_BYTES: usize = 256 << 20;

struct PagedCase {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    /// Also run under GPU_CHECK_QUICK.
    quick: bool,
}

fn paged_cases() -> Vec<PagedCase> {
    let case = |name, heads, kv_heads, head_dim, block_size, quick| PagedCase {
        name,
        heads,
        kv_heads,
        head_dim,
        block_size,
        quick,
    };
    vec![
        case("GQA 8:1 hd128 bs16", 16, 2, 128, 16, true),
        case("GQA 8:1 hd64 bs32", 16, 2, 64, 32, false),
        case("1:1 hd128 bs32", 4, 4, 128, 32, true),
        case("1:1 hd64 bs16", 4, 4, 64, 16, false),
        case("GQA 16:1 hd128 bs16 (2 head chunks)", 32, 2, 128, 16, false),
        case("GQA 2:1 hd12 bs5 (tiny oracle, scalar)", 4, 2, 12, 5, true),
    ]
}

/// A device view of a contiguous CUDA tensor's elements (for the raw launchers).
fn dview<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a candle_core::Storage,
    l: &candle_core::Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let candle_core::Storage::Cuda(cs) = s else {
        bail!("not a CUDA tensor");
    };
    let slice = cs.as_cuda_slice::<T>()?;
    let (off, n) = (l.start_offset(), l.shape().elem_count());
    slice
        .try_slice(off..off + n)
        .ok_or_else(|| anyhow!("layout outside its storage"))
}

/// One random batch for a paged case: caches filled through the CPU reference write, the same
/// writes through the GPU op, and the query rows.
struct PagedProblem {
    layout: KvLayout,
    tables: Vec<Vec<u32>>,
    /// (q_start, q_len, ctx_len) per sequence.
    spans: Vec<(usize, usize, usize)>,
    rows: usize,
    q: Vec<f32>,
}

impl PagedProblem {
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
}

fn make_paged_problem(rng: &mut StdRng, case: &PagedCase, contexts: &[usize]) -> PagedProblem {
    let bs = case.block_size;
    // Rows: the prefill chunk first, one row that no sequence covers, then one decode row per
    // context.
    let (cq, cctx) = PAGED_CHUNK;
    let mut spans = vec![(0, cq, cctx)];
    let mut row = cq + 1;
    for &ctx in contexts {
        spans.push((row, 1, ctx));
        row += 1;
    }
    let need: usize = spans.iter().map(|s| s.2.div_ceil(bs)).sum();
    let num_blocks = need + need / 8 + 3;
    // Scrambled block ids: a random permutation of the pool handed out in order.
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        let j = rng.random_range(0..=i);
        ids.swap(i, j);
    }
    let mut next = 0;
    let tables = spans
        .iter()
        .map(|s| {
            let n = s.2.div_ceil(bs);
            let t = ids[next..next + n].to_vec();
            next += n;
            t
        })
        .collect();
    let q = (0..row * case.heads * case.head_dim)
        .map(|_| normal(rng))
        .collect();
    PagedProblem {
        layout: KvLayout {
            num_blocks,
            block_size: bs,
            kv_heads: case.kv_heads,
            head_dim: case.head_dim,
        },
        tables,
        spans,
        rows: row,
        q,
    }
}

/// Host cache contents of either dtype, as raw bits for exact comparison and as the CPU
/// reference's element type.
trait HostKv: KvElem + candle_core::WithDType + kc::CacheElem {
    fn bits(v: &[Self]) -> Vec<u32>;
}
impl HostKv for f32 {
    fn bits(v: &[Self]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
impl HostKv for bf16 {
    fn bits(v: &[Self]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits() as u32).collect()
    }
}
impl HostKv for F8E4M3 {
    fn bits(v: &[Self]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits() as u32).collect()
    }
}

fn check_paged(c: &mut Ctx) -> Result<()> {
    println!(
        "\n== paged attention (KV write bit-exact; attention ‖out−ref‖/‖ref‖ ≤ \
         {PAGED_REL_TOL_F32:e} f32 KV, ≤ {PAGED_REL_TOL_BF16:e} bf16 and fp8 KV, vs \
         crates/kernels paged.rs)"
    );
    let contexts: &[usize] = if quick() {
        &PAGED_QUICK_CONTEXTS
    } else {
        &PAGED_CONTEXTS
    };
    for case in paged_cases().into_iter().filter(|p| p.quick || !quick()) {
        for kv in [DType::F32, DType::BF16, DType::F8E4M3] {
            let res = match kv {
                DType::F32 => check_paged_case::<f32>(c, &case, contexts),
                DType::BF16 => check_paged_case::<bf16>(c, &case, contexts),
                _ => check_paged_case::<F8E4M3>(c, &case, contexts),
            };
            if let Err(err) = res {
                c.verdict(
                    false,
                    format!("paged {} {kv:?} KV: error: {err:#}", case.name),
                );
            }
        }
    }
    // Bad input comes back as a sentence.
    let q = Tensor::zeros((1, 3, 64), DType::F32, &c.device)?;
    let cache = Tensor::zeros((2, 16, 2, 64), DType::BF16, &c.device)?;
    let table = [0u32];
    let seqs = [SeqAttn {
        q_start: 0,
        q_len: 1,
        ctx_len: 1,
        block_table: &table,
    }];
    let layout = KvLayout {
        num_blocks: 2,
        block_size: 16,
        kv_heads: 2,
        head_dim: 64,
    };
    let batch = kc::PagedBatch::new(&c.device, &seqs, 1, &layout)?;
    match kc::paged_attention(&q, &cache, &cache, &batch, 0.125) {
        Err(e) => c.verdict(true, format!("3 query heads over 2 KV heads rejected: {e}")),
        Ok(_) => c.verdict(false, "3 query heads over 2 KV heads were accepted".into()),
    }
    let bad_table = [5u32];
    let bad = [SeqAttn {
        block_table: &bad_table,
        ..seqs[0].clone()
    }];
    match kc::PagedBatch::new(&c.device, &bad, 1, &layout) {
        Err(e) => c.verdict(true, format!("block outside the pool rejected: {e}")),
        Ok(_) => c.verdict(false, "a block outside the pool was accepted".into()),
    }
    Ok(())
}

fn check_paged_case<T: HostKv>(c: &mut Ctx, case: &PagedCase, contexts: &[usize]) -> Result<()> {
    let kv_dt = <T as candle_core::WithDType>::DTYPE;
    let p = make_paged_problem(&mut c.rng, case, contexts);
    let (layout, te) = (p.layout, p.layout.token_elems());
    let seqs = p.seqs();

    // KV write: every cached token of every sequence, plus two rows with nothing to write.
    let mut slots = Vec::new();
    for (s, t) in p.spans.iter().zip(&p.tables) {
        for pos in 0..s.2 {
            slots.push(
                t[pos / layout.block_size] as usize * layout.block_size + pos % layout.block_size,
            );
        }
    }
    let n_new = slots.len();
    let k: Vec<f32> = (0..(n_new + 2) * te).map(|_| normal(&mut c.rng)).collect();
    let v: Vec<f32> = (0..(n_new + 2) * te).map(|_| normal(&mut c.rng)).collect();
    let init: Vec<T> = (0..layout.layer_elems())
        .map(|_| T::from_f32(normal(&mut c.rng)))
        .collect();
    // The CPU write of the values as the GPU receives them (f32, or rounded to bf16 first:
    // an FP8 cache rounds the bf16 value, which can differ from rounding the f32 at ties).
    let host_write = |in_dt: DType| -> Result<(Vec<T>, Vec<T>)> {
        let as_input = |x: &[f32]| -> Vec<f32> {
            match in_dt {
                DType::BF16 => x.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
                _ => x.to_vec(),
            }
        };
        let (mut kh, mut vh) = (init.clone(), init.clone());
        #[rustfmt::skip]
        reshape_and_cache(&as_input(&k[..n_new * te]), &as_input(&v[..n_new * te]), &slots,
                          &mut kh, &mut vh, &layout)?;
        Ok((kh, vh))
    };
    let (k_host, v_host) = host_write(DType::F32)?;
    let cache_shape = (
        layout.num_blocks,
        layout.block_size,
        layout.kv_heads,
        layout.head_dim,
    );
    let mut dev_slots: Vec<u32> = slots.iter().map(|&s| s as u32).collect();
    dev_slots.extend([
        kc::PAGED_NO_SEQ,
        (layout.num_blocks * layout.block_size) as u32,
    ]);
    let slots_t = Tensor::from_vec(dev_slots, n_new + 2, &c.device)?;
    let input_dtypes: &[DType] = if kv_dt == DType::F32 {
        &[DType::F32]
    } else {
        &[DType::F32, DType::BF16]
    };
    let mut caches = None;
    for &in_dt in input_dtypes {
        let kc_t = Tensor::from_vec(init.clone(), cache_shape, &c.device)?;
        let vc_t = Tensor::from_vec(init.clone(), cache_shape, &c.device)?;
        let shape = (n_new + 2, layout.kv_heads, layout.head_dim);
        let kt = Tensor::from_vec(k.clone(), shape, &c.device)?.to_dtype(in_dt)?;
        let vt = Tensor::from_vec(v.clone(), shape, &c.device)?.to_dtype(in_dt)?;
        kc::reshape_and_cache(&kt, &vt, &slots_t, &kc_t, &vc_t)?;
        let kg: Vec<T> = kc_t.flatten_all()?.to_vec1()?;
        let vg: Vec<T> = vc_t.flatten_all()?.to_vec1()?;
        let (kw, vw) = host_write(in_dt)?;
        let differ = |a: &[T], b: &[T]| {
            T::bits(a)
                .iter()
                .zip(T::bits(b))
                .filter(|(x, y)| **x != *y)
                .count()
        };
        let diff = differ(&kg, &kw) + differ(&vg, &vw);
        c.verdict(
            diff == 0,
            format!(
                "paged KV write {:<38} {in_dt:?}→{kv_dt:?} {n_new} tokens + 2 skipped slots: \
                 {diff} elements differ from the CPU write",
                case.name
            ),
        );
        caches.get_or_insert((kc_t, vc_t));
    }
    let (kc_t, vc_t) = caches.ok_or_else(|| anyhow!("no cache written"))?;

    // Attention: the CPU reference on the CPU-written cache, the GPU on the GPU-written one.
    let (heads, hd) = (case.heads, case.head_dim);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut reference = vec![0f32; p.q.len()];
    paged_attention(
        &p.q,
        &k_host,
        &v_host,
        &layout,
        &seqs,
        heads,
        scale,
        &mut reference,
    )?;
    let tol = if kv_dt == DType::F32 {
        PAGED_REL_TOL_F32
    } else {
        PAGED_REL_TOL_BF16
    };
    let batch = kc::PagedBatch::new(&c.device, &seqs, p.rows, &layout)?;
    let qt = Tensor::from_vec(p.q.clone(), (p.rows, heads, hd), &c.device)?;
    let max_ctx = batch.max_ctx;
    let report = |c: &mut Ctx, how: String, out: &[f32]| {
        let (rel, max_abs, nan) = rel_err(out, &reference);
        let pad_row = PAGED_CHUNK.0;
        let pad_zero = out[pad_row * heads * hd..(pad_row + 1) * heads * hd]
            .iter()
            .all(|&x| x == 0.0);
        c.verdict(
            rel <= tol && nan == 0 && pad_zero,
            format!(
                "paged attn {:<38} {kv_dt:?} KV {how:<14} {} rows, ctx ≤ {max_ctx}: rel \
                 {rel:.2e} max|Δ| {max_abs:.2e} non-finite {nan}, uncovered row zero: {pad_zero}",
                case.name, p.rows
            ),
        );
    };
    // The tensor op (its own partition size).
    let d = batch.dims(heads);
    let auto_part = c.kern_paged.partition_size(&d)?;
    let out: Vec<f32> = kc::paged_attention(&qt, &kc_t, &vc_t, &batch, scale)?
        .flatten_all()?
        .to_vec1()?;
    report(c, format!("op (part {auto_part})"), &out);
    // The raw launcher at forced partition sizes, outputs and workspace poisoned.
    for part in PAGED_FORCED_PARTS {
        let (acc_len, stat_len) = kc::PagedKernels::workspace_lens(&d, part);
        let mut acc = poisoned::<f32>(c, acc_len)?;
        let mut mx = poisoned::<f32>(c, stat_len)?;
        let mut sm = poisoned::<f32>(c, stat_len)?;
        let mut out = poisoned::<f32>(c, p.q.len())?;
        #[rustfmt::skip]
        launch_paged_raw::<T>(&c.kern_paged, &qt, &kc_t, &vc_t, &batch, &d, scale, part,
                              [&mut acc, &mut mx, &mut sm], &mut out)?;
        c.stream.synchronize().context("paged attention kernels")?;
        let got = c.stream.clone_dtoh(&out)?;
        report(c, format!("raw part {part}"), &got[..p.q.len()]);
    }
    Ok(())
}

/// The raw paged-attention launcher on tensors' device views: `ws` is the workspace
/// (accumulators, maxima, sums), `out` the output; nothing allocated or synchronised.
#[allow(clippy::too_many_arguments)]
fn launch_paged_raw<T: HostKv>(
    kern: &kc::PagedKernels,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    batch: &kc::PagedBatch,
    d: &kc::PagedDims,
    scale: f32,
    part: usize,
    ws: [&mut CudaSlice<f32>; 3],
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k_cache.storage_and_layout();
    let (vs, vl) = v_cache.storage_and_layout();
    let (rs, rl) = batch.row_seq.storage_and_layout();
    let (ps, pl) = batch.row_pos.storage_and_layout();
    let (bs, bl) = batch.block_tables.storage_and_layout();
    let meta = kc::PagedMetaViews {
        row_seq: dview(&rs, rl)?,
        row_pos: dview(&ps, pl)?,
        block_tables: dview(&bs, bl)?,
    };
    let [acc, mx, sm] = ws;
    let mut ws = kc::PagedWorkspace {
        acc: acc.slice_mut(..),
        max: mx.slice_mut(..),
        sum: sm.slice_mut(..),
    };
    kern.launch_paged_attention::<T>(
        &dview(&qs, ql)?,
        &dview(&ks, kl)?,
        &dview(&vs, vl)?,
        &meta,
        d,
        scale,
        part,
        &mut ws,
        &mut out.slice_mut(..),
    )?;
    Ok(())
}

struct PagedBenchRow {
    kv: DType,
    ctx: usize,
    batch: usize,
    kernel_us: f64,
    op_us: f64,
    bytes: f64,
    part: usize,
    rel: f64,
}

/// Paged-attention decode at Hy3 shapes: 64 query heads over 8 KV heads, head_dim 128, bf16
/// and FP8 KV in blocks of 16, contexts 4K and 32K, batch 1 and 8.
fn bench_paged(c: &mut Ctx) -> Result<String> {
    let (heads, kvh, hd, bs) = (64usize, 8usize, 128usize, 16usize);
    println!(
        "\n== paged attention decode at Hy3 shapes: {heads} query heads, {kvh} KV heads, \
         head_dim {hd}, bf16 and fp8 KV, blocks of {bs}"
    );
    let mut rows = Vec::new();
    for kv in [DType::BF16, DType::F8E4M3] {
        for &(ctx, batch) in &[(4096usize, 1usize), (4096, 8), (32768, 1), (32768, 8)] {
            let res = match kv {
                DType::BF16 => bench_paged_shape::<bf16>(c, ctx, batch, &mut rows),
                _ => bench_paged_shape::<F8E4M3>(c, ctx, batch, &mut rows),
            };
            if let Err(err) = res {
                c.verdict(
                    false,
                    format!("paged bench {kv:?} ctx {ctx} batch {batch}: error: {err:#}"),
                );
            }
        }
    }
    let mut out = String::new();
    out.push_str(&format!(
        "\nPaged attention decode ({heads} query heads / {kvh} KV heads, head_dim {hd}, blocks \
         of {bs})\n\n"
    ));
    out.push_str(
        "| KV | context | batch | µs (kernels) | µs (tensor op) | KV MB read | GB/s | % of 4.8 TB/s | partition | rel err |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let gbs = r.bytes / (r.kernel_us * 1e-6) / 1e9;
        out.push_str(&format!(
            "| {:?} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0}% | {} | {:.1e} |\n",
            r.kv,
            r.ctx,
            r.batch,
            r.kernel_us,
            r.op_us,
            r.bytes / 1e6,
            gbs,
            100.0 * r.bytes / (r.kernel_us * 1e-6) / HBM_BYTES_PER_S,
            r.part,
            r.rel
        ));
    }
    out.push_str(
        "\nKV MB read = K and V of every context token once (at the KV dtype's size), the least a decode step \
         reads; µs (kernels) = partition + merge launches on preallocated buffers; µs (tensor \
         op) adds the output and workspace allocations.\n",
    );
    Ok(out)
}

/// One row of [`bench_paged`]: decode at `ctx` tokens for `batch` sequences over a cache of `T`.
fn bench_paged_shape<T: HostKv>(
    c: &mut Ctx,
    ctx: usize,
    batch: usize,
    rows: &mut Vec<PagedBenchRow>,
) -> Result<()> {
    let (heads, kvh, hd, bs) = (64usize, 8usize, 128usize, 16usize);
    let scale = 1.0 / (hd as f32).sqrt();
    let bytes = batch * ctx * kvh * hd * 2 * std::mem::size_of::<T>();
    let sets = PAGED_ROTATE_BYTES.div_ceil(bytes).clamp(1, SETS);
    let bps = ctx / bs;
    let num_blocks = sets * batch * bps;
    let layout = KvLayout {
        num_blocks,
        block_size: bs,
        kv_heads: kvh,
        head_dim: hd,
    };
    let shape = (num_blocks, bs, kvh, hd);
    // Filled through the KV write from normal f32 keys and values, 64K tokens per launch.
    let kv_dt = <T as candle_core::WithDType>::DTYPE;
    let kc_t = Tensor::zeros(shape, kv_dt, &c.device)?;
    let vc_t = Tensor::zeros(shape, kv_dt, &c.device)?;
    let slots_total = num_blocks * bs;
    for s0 in (0..slots_total).step_by(1 << 16) {
        let n = (1usize << 16).min(slots_total - s0);
        let slots = Tensor::arange(s0 as u32, (s0 + n) as u32, &c.device)?;
        let k = Tensor::randn(0f32, 1.0, (n, kvh, hd), &c.device)?;
        let v = Tensor::randn(0f32, 1.0, (n, kvh, hd), &c.device)?;
        kc::reshape_and_cache(&k, &v, &slots, &kc_t, &vc_t)?;
    }
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        let j = c.rng.random_range(0..=i);
        ids.swap(i, j);
    }
    let tables: Vec<Vec<u32>> = ids.chunks(bps).map(|ch| ch.to_vec()).collect();
    let batches: Vec<kc::PagedBatch> = (0..sets)
        .map(|s| {
            let seqs: Vec<SeqAttn<'_>> = (0..batch)
                .map(|b| SeqAttn {
                    q_start: b,
                    q_len: 1,
                    ctx_len: ctx,
                    block_table: &tables[s * batch + b],
                })
                .collect();
            kc::PagedBatch::new(&c.device, &seqs, batch, &layout)
        })
        .collect::<Result<_, _>>()?;
    let qs: Vec<Tensor> = (0..sets)
        .map(|_| Tensor::randn(0f32, 1.0, (batch, heads, hd), &c.device))
        .collect::<Result<_, _>>()?;
    let d = batches[0].dims(heads);
    let part = c.kern_paged.partition_size(&d)?;
    let op_us = time_events(c, 3, 7, 4, |it| {
        let s = it % sets;
        kc::paged_attention(&qs[s], &kc_t, &vc_t, &batches[s], scale)?;
        Ok(())
    })?;
    // Kernels alone: preallocated output and workspace.
    let (acc_len, stat_len) = kc::PagedKernels::workspace_lens(&d, part);
    let mut acc = unsafe { c.stream.alloc::<f32>(acc_len.max(1)) }?;
    let mut mx = unsafe { c.stream.alloc::<f32>(stat_len.max(1)) }?;
    let mut sm = unsafe { c.stream.alloc::<f32>(stat_len.max(1)) }?;
    let mut out = unsafe { c.stream.alloc::<f32>(batch * heads * hd) }?;
    let kern = c.kern_paged.clone();
    let kernel_us = time_events(c, 3, 7, 4, |it| {
        let s = it % sets;
        #[rustfmt::skip]
        launch_paged_raw::<T>(&kern, &qs[s], &kc_t, &vc_t, &batches[s], &d, scale, part,
                              [&mut acc, &mut mx, &mut sm], &mut out)?;
        Ok(())
    })?;
    // Spot check at this shape: sequence 0 of set 0 against the CPU reference on its
    // blocks copied to the host.
    let rel = (|| -> Result<f64> {
        let y: Vec<f32> = kc::paged_attention(&qs[0], &kc_t, &vc_t, &batches[0], scale)?
            .narrow(0, 0, 1)?
            .flatten_all()?
            .to_vec1()?;
        let idx = Tensor::from_vec(tables[0].clone(), bps, &c.device)?;
        let host = |t: &Tensor| -> Result<Vec<T>> {
            Ok(t.index_select(&idx, 0)?.flatten_all()?.to_vec1()?)
        };
        let (kh, vh) = (host(&kc_t)?, host(&vc_t)?);
        let q0: Vec<f32> = qs[0].narrow(0, 0, 1)?.flatten_all()?.to_vec1()?;
        let sub = KvLayout {
            num_blocks: bps,
            ..layout
        };
        let table: Vec<u32> = (0..bps as u32).collect();
        let seq = [SeqAttn {
            q_start: 0,
            q_len: 1,
            ctx_len: ctx,
            block_table: &table,
        }];
        let mut reference = vec![0f32; heads * hd];
        paged_attention(&q0, &kh, &vh, &sub, &seq, heads, scale, &mut reference)?;
        let (rel, _, nan) = rel_err(&y, &reference);
        if nan > 0 {
            bail!("{nan} non-finite outputs");
        }
        Ok(rel)
    })()
    .unwrap_or_else(|err| {
        println!("  spot check failed: {err:#}");
        f64::NAN
    });
    c.verdict(
        rel <= PAGED_REL_TOL_BF16,
        format!("paged bench-shape spot check {kv_dt:?} ctx {ctx} batch {batch}: rel {rel:.2e}"),
    );
    println!(
        "  {kv_dt:?} ctx {ctx:<6} batch {batch}: kernels {kernel_us:8.1} µs, tensor op {op_us:8.1} \
         µs, partitions of {part}, {:.1} GB/s, {sets} rotating sets",
        bytes as f64 / (kernel_us * 1e-6) / 1e9
    );
    rows.push(PagedBenchRow {
        kv: kv_dt,
        ctx,
        batch,
        kernel_us,
        op_us,
        bytes: bytes as f64,
        part,
        rel,
    });
    Ok(())
}

/// GPU_CHECK_PROFILE: paged-attention decode at 32K context (batch 1 and 8), once each.
fn profile_paged(c: &mut Ctx) -> Result<()> {
    let (heads, kvh, hd, bs, ctx) = (64usize, 8usize, 128usize, 16usize, 32768usize);
    for batch in [1usize, 8] {
        let bps = ctx / bs;
        let layout = KvLayout {
            num_blocks: batch * bps,
            block_size: bs,
            kv_heads: kvh,
            head_dim: hd,
        };
        let shape = (layout.num_blocks, bs, kvh, hd);
        let kc_t = Tensor::zeros(shape, DType::BF16, &c.device)?;
        let vc_t = Tensor::zeros(shape, DType::BF16, &c.device)?;
        let tables: Vec<Vec<u32>> = (0..batch)
            .map(|b| ((b * bps) as u32..((b + 1) * bps) as u32).collect())
            .collect();
        let seqs: Vec<SeqAttn<'_>> = tables
            .iter()
            .enumerate()
            .map(|(b, t)| SeqAttn {
                q_start: b,
                q_len: 1,
                ctx_len: ctx,
                block_table: t,
            })
            .collect();
        let pb = kc::PagedBatch::new(&c.device, &seqs, batch, &layout)?;
        let q = Tensor::randn(0f32, 1.0, (batch, heads, hd), &c.device)?;
        kc::paged_attention(&q, &kc_t, &vc_t, &pb, 0.088)?;
        c.stream.synchronize()?;
        println!("profile: paged attention ctx {ctx} batch {batch} done");
    }
    Ok(())
}
