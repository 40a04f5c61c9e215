//! The routed experts of one MoE layer on the CPU with bf16 weights, in two parallel passes
//! over all active experts at once: gate+up with SiLU·mul fused, then down. The general path
//! ([`crate::experts_forward`] over candle ops) runs about a dozen tensor ops and two parallel
//! regions per expert; at decode that is 8 experts × (2 thread wake-ups + small allocations)
//! per layer for a few MiB of weights, and the overhead, not the memory, sets the speed.
//!
//! Layout: the (token, slot) entries are grouped by expert as the [`DispatchPlan`] orders
//! them. Each pass splits every active expert's output rows into tasks of [`ROWS_PER_TASK`]
//! rows, so work spreads over the cores whether one expert or all of them are active, and
//! each task writes its own `[rows, tokens]` block. Accumulation is f32 throughout (the
//! SiLU·mul activations are not rounded to bf16 in between).

use half::bf16;
use rayon::prelude::*;

use crate::cpu_gemv::{row_kernel, TOKEN_BLOCK};
use crate::gate::GateOutput;
use crate::moe::DispatchPlan;
use crate::KernelError;

/// Output rows per task: as `cpu_gemv`'s (a few hundred KiB of weights per task at Hy3 sizes).
const ROWS_PER_TASK: usize = 64;

/// Shapes: `E` experts, intermediate `I`, hidden `H`.
#[derive(Debug, Clone, Copy)]
pub struct ExpertDims {
    /// Routed experts.
    pub experts: usize,
    /// Intermediate size of one expert.
    pub inter: usize,
    /// Hidden size.
    pub hidden: usize,
}

/// `out[t] = Σ_j w_j · down_e(silu(gate_e(x_t)) · up_e(x_t))` over the gate's choices, for
/// `x` `[T, H]` f32, `gate_up` `[E, 2I, H]` and `down` `[E, H, I]` bf16; returns `[T, H]` f32.
pub fn experts_forward_bf16(
    x: &[f32],
    gate_up: &[bf16],
    down: &[bf16],
    dims: ExpertDims,
    gate: &GateOutput,
    plan: &DispatchPlan,
) -> Result<Vec<f32>, KernelError> {
    let ExpertDims {
        experts: e,
        inter: i,
        hidden: h,
    } = dims;
    let t = gate.tokens;
    if x.len() != t * h
        || gate_up.len() != e * 2 * i * h
        || down.len() != e * h * i
        || plan.num_experts != e
        || plan.offsets.len() != e + 1
    {
        return Err(KernelError::InvalidArgument(format!(
            "experts_forward_bf16 shapes: x {} for [{t}, {h}], gate_up {} for [{e}, {}, {h}], down {} for [{e}, {h}, {i}], plan for {} experts",
            x.len(),
            gate_up.len(),
            2 * i,
            down.len(),
            plan.num_experts
        )));
    }
    let entries = plan.token_of.len();
    let kernel = row_kernel();

    // Each entry's activation row, grouped by expert, in the kernel's layout.
    let mut xs = vec![0f32; entries * h];
    for (p, &tok) in plan.token_of.iter().enumerate() {
        let tok = tok as usize;
        kernel.pack_row(&x[tok * h..(tok + 1) * h], &mut xs[p * h..(p + 1) * h]);
    }

    // Pass 1: act = silu(gate · x) * (up · x), per expert `[I, n]` (row-major over rows).
    let mut act = vec![0f32; entries * i];
    tasks(&mut act, plan, i).into_par_iter().for_each(|task| {
        let (lo, n) = (plan.offsets[task.expert], task.tokens);
        let xe = &xs[lo * h..(lo + n) * h];
        let base = task.expert * 2 * i * h;
        let (mut g, mut u) = ([0f32; TOKEN_BLOCK], [0f32; TOKEN_BLOCK]);
        for (k, dst) in task.out.chunks_mut(n).enumerate() {
            let r = task.row0 + k;
            let grow = &gate_up[base + r * h..base + (r + 1) * h];
            let urow = &gate_up[base + (i + r) * h..base + (i + r + 1) * h];
            for t0 in (0..n).step_by(TOKEN_BLOCK) {
                let nb = TOKEN_BLOCK.min(n - t0);
                let xb = &xe[t0 * h..(t0 + nb) * h];
                kernel.run(grow, xb, nb, h, &mut g[..nb]);
                kernel.run(urow, xb, nb, h, &mut u[..nb]);
                for j in 0..nb {
                    dst[t0 + j] = silu(g[j]) * u[j];
                }
            }
        }
    });

    // Token-major activations in the kernel's layout for the down projection.
    let mut act_t = vec![0f32; entries * i];
    let slot: Vec<usize> = (0..i).map(|r| kernel.packed_index(r, i)).collect();
    for ex in 0..e {
        let (lo, hi) = (plan.offsets[ex], plan.offsets[ex + 1]);
        let n = hi - lo;
        let blk = &act[lo * i..hi * i];
        let dst = &mut act_t[lo * i..hi * i];
        for (r, &pr) in slot.iter().enumerate() {
            for tk in 0..n {
                dst[tk * i + pr] = blk[r * n + tk];
            }
        }
    }

    // Pass 2: y = down · act, per expert `[H, n]`.
    let mut ys = vec![0f32; entries * h];
    tasks(&mut ys, plan, h).into_par_iter().for_each(|task| {
        let (lo, n) = (plan.offsets[task.expert], task.tokens);
        let ae = &act_t[lo * i..(lo + n) * i];
        let base = task.expert * h * i;
        for (k, dst) in task.out.chunks_mut(n).enumerate() {
            let r = task.row0 + k;
            let row = &down[base + r * i..base + (r + 1) * i];
            for t0 in (0..n).step_by(TOKEN_BLOCK) {
                let nb = TOKEN_BLOCK.min(n - t0);
                kernel.run(
                    row,
                    &ae[t0 * i..(t0 + nb) * i],
                    nb,
                    i,
                    &mut dst[t0..t0 + nb],
                );
            }
        }
    });

    // Weighted sum into the tokens (the top-k reduction).
    let mut out = vec![0f32; t * h];
    for ex in 0..e {
        let (lo, hi) = (plan.offsets[ex], plan.offsets[ex + 1]);
        let n = hi - lo;
        let blk = &ys[lo * h..hi * h];
        for tk in 0..n {
            let p = lo + tk;
            let tok = plan.token_of[p] as usize;
            let wgt = gate.weights[plan.slot_of[p] as usize];
            let o = &mut out[tok * h..(tok + 1) * h];
            for (r, v) in o.iter_mut().enumerate() {
                *v += wgt * blk[r * n + tk];
            }
        }
    }
    Ok(out)
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// A block of output rows of one expert: rows `row0..row0 + out.len() / tokens`, each holding
/// the expert's `tokens` values.
struct Task<'a> {
    expert: usize,
    tokens: usize,
    row0: usize,
    out: &'a mut [f32],
}

/// Splits `buf` (every active expert's `[rows, n]` block, in expert order) into tasks of at
/// most [`ROWS_PER_TASK`] rows.
fn tasks<'a>(buf: &'a mut [f32], plan: &DispatchPlan, rows: usize) -> Vec<Task<'a>> {
    let mut out = Vec::new();
    let mut rest = buf;
    for ex in 0..plan.num_experts {
        let n = plan.count(ex);
        if n == 0 {
            continue;
        }
        let (blk, tail) = rest.split_at_mut(rows * n);
        rest = tail;
        for (c, chunk) in blk.chunks_mut(ROWS_PER_TASK * n).enumerate() {
            out.push(Task {
                expert: ex,
                tokens: n,
                row0: c * ROWS_PER_TASK,
                out: chunk,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{gate_topk, GateConfig, ScoreFunction};
    use crate::moe::dispatch;
    use rand::{Rng, SeedableRng};

    /// Against plain f64 arithmetic per token and choice, on bf16 weights: decode (one token),
    /// a prefill batch where some experts get no token, and sizes off the kernels' steps.
    #[test]
    fn matches_per_token_f64_loop() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for &(t, h, i, e, k) in &[
            (1, 64, 32, 8, 2),
            (37, 72, 40, 16, 4),
            (5, 33, 7, 6, 6),
            (130, 64, 70, 4, 1),
        ] {
            let rnd = |rng: &mut rand::rngs::StdRng, n: usize| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
            };
            let x = rnd(&mut rng, t * h);
            let gu: Vec<bf16> = rnd(&mut rng, e * 2 * i * h)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let dn: Vec<bf16> = rnd(&mut rng, e * h * i)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            // Biased logits leave some experts without tokens.
            let logits: Vec<f32> = (0..t * e)
                .map(|j| rng.random_range(-1.0..1.0) + if j % e < 2 { 3.0 } else { 0.0 })
                .collect();
            let cfg = GateConfig {
                num_experts: e,
                top_k: k,
                score: ScoreFunction::Sigmoid,
                n_group: 1,
                topk_group: 1,
                renormalize: true,
                scaling: 1.5,
                renorm_eps: 1e-20,
            };
            let g = gate_topk(&logits, None, &cfg).unwrap();
            let plan = dispatch(&g, e).unwrap();
            let dims = ExpertDims {
                experts: e,
                inter: i,
                hidden: h,
            };
            let got = experts_forward_bf16(&x, &gu, &dn, dims, &g, &plan).unwrap();
            for tok in 0..t {
                let mut want = vec![0f64; h];
                for j in 0..k {
                    let ex = g.ids[tok * k + j] as usize;
                    let wt = g.weights[tok * k + j] as f64;
                    let dot = |row: usize| -> f64 {
                        (0..h)
                            .map(|c| {
                                gu[(ex * 2 * i + row) * h + c].to_f64() * x[tok * h + c] as f64
                            })
                            .sum()
                    };
                    let act: Vec<f64> = (0..i)
                        .map(|r| {
                            let (a, b) = (dot(r), dot(i + r));
                            a / (1.0 + (-a).exp()) * b
                        })
                        .collect();
                    for (c, o) in want.iter_mut().enumerate() {
                        let d: f64 = (0..i)
                            .map(|r| dn[(ex * h + c) * i + r].to_f64() * act[r])
                            .sum();
                        *o += wt * d;
                    }
                }
                for c in 0..h {
                    let (a, b) = (got[tok * h + c] as f64, want[c]);
                    assert!(
                        (a - b).abs() <= 1e-3 * (1.0 + b.abs()),
                        "{t}x{h}x{i}x{e}: t{tok} c{c}: {a} vs {b}"
                    );
                }
            }
        }
        // Shapes that disagree are errors.
        let g = GateOutput {
            tokens: 1,
            top_k: 1,
            ids: vec![0],
            weights: vec![1.0],
        };
        let plan = dispatch(&g, 2).unwrap();
        let dims = ExpertDims {
            experts: 2,
            inter: 2,
            hidden: 4,
        };
        assert!(experts_forward_bf16(
            &[0.0; 3],
            &[bf16::ZERO; 32],
            &[bf16::ZERO; 16],
            dims,
            &g,
            &plan
        )
        .is_err());
    }
}
