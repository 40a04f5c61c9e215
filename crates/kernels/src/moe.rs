//! Expert dispatch and combine: groups the (token, slot) pairs chosen by the gate by expert,
//! runs each selected expert once over all of its tokens, and scatters the weighted outputs
//! back. Never a loop over tokens × experts and never a dense pass over all experts.
//!
//! [`dispatch`] is a counting sort (the same count → prefix-sum → place scheme the CUDA kernel
//! uses); [`experts_forward`] is the CPU reference for the grouped expert GEMMs.

use crate::cpu_gemv::linear;
use candle_core::{DType, Tensor};

use crate::gate::GateOutput;
use crate::KernelError;

/// The gate's choices regrouped by expert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    /// Routed experts.
    pub num_experts: usize,
    /// `offsets[e]..offsets[e+1]` indexes expert e's entries in `token_of`/`slot_of`; length E+1.
    pub offsets: Vec<usize>,
    /// Token index of each entry, grouped by expert, in token order within an expert.
    pub token_of: Vec<u32>,
    /// Flat gate slot (`t * top_k + j`) of each entry, aligned with `token_of`.
    pub slot_of: Vec<u32>,
}

impl DispatchPlan {
    /// Number of tokens routed to expert `e`.
    pub fn count(&self, e: usize) -> usize {
        self.offsets[e + 1] - self.offsets[e]
    }

    /// Experts that received at least one token.
    pub fn active_experts(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_experts).filter(|&e| self.count(e) > 0)
    }
}

/// Groups the gate output by expert (stable counting sort).
pub fn dispatch(gate: &GateOutput, num_experts: usize) -> Result<DispatchPlan, KernelError> {
    let mut counts = vec![0usize; num_experts + 1];
    for &id in &gate.ids {
        let id = id as usize;
        if id >= num_experts {
            return Err(KernelError::InvalidArgument(format!(
                "gate chose expert {id} but the layer has {num_experts} experts"
            )));
        }
        counts[id + 1] += 1;
    }
    for e in 0..num_experts {
        counts[e + 1] += counts[e];
    }
    let offsets = counts;
    let mut cursor = offsets.clone();
    let n = gate.ids.len();
    let mut token_of = vec![0u32; n];
    let mut slot_of = vec![0u32; n];
    for (slot, &id) in gate.ids.iter().enumerate() {
        let p = cursor[id as usize];
        cursor[id as usize] += 1;
        token_of[p] = (slot / gate.top_k) as u32;
        slot_of[p] = slot as u32;
    }
    Ok(DispatchPlan {
        num_experts,
        offsets,
        token_of,
        slot_of,
    })
}

/// Routed expert weights laid out for the grouped GEMMs: gate and up fused per expert.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// `[E, 2·I, H]`: rows `0..I` are the gate projection, `I..2I` the up projection.
    pub gate_up: Tensor,
    /// `[E, H, I]`.
    pub down: Tensor,
}

impl ExpertWeights {
    /// Checks the two tensors agree with each other and returns `(E, I, H)`.
    pub fn dims(&self) -> Result<(usize, usize, usize), KernelError> {
        let (e, i2, h) = self.gate_up.dims3()?;
        let (e2, h2, i) = self.down.dims3()?;
        if e != e2 || h != h2 || i2 != 2 * i {
            return Err(KernelError::InvalidArgument(format!(
                "expert weights disagree: gate_up {:?} vs down {:?}",
                self.gate_up.dims(),
                self.down.dims()
            )));
        }
        Ok((e, i, h))
    }
}

/// Runs the routed experts for `x` (`[T, H]`) as planned and returns `Σ_j w_j · E_j(x)` per
/// token (`[T, H]`, dtype of `x`). Each active expert runs once over its tokens; the
/// per-slot outputs are scaled by the gate weights (in f32) and reduced into their tokens by a
/// single scatter-add.
pub fn experts_forward(
    x: &Tensor,
    w: &ExpertWeights,
    gate: &GateOutput,
    plan: &DispatchPlan,
) -> Result<Tensor, KernelError> {
    let (t, h) = x.dims2()?;
    let (e, i, hw) = w.dims()?;
    if h != hw || e != plan.num_experts || gate.tokens != t {
        return Err(KernelError::InvalidArgument(format!(
            "experts_forward shapes: x [{t}, {h}], experts [{e}, _, {hw}], plan for {} experts, gate for {} tokens",
            plan.num_experts, gate.tokens
        )));
    }
    let dev = x.device();
    let dtype = x.dtype();
    if let Some(y) = cpu_bf16_experts(x, w, None, gate, plan, (e, i, h))? {
        return Ok(Tensor::from_vec(y, (t, h), dev)?.to_dtype(dtype)?);
    }
    let mut outs = Vec::with_capacity(e);
    for ex in plan.active_experts() {
        let (lo, hi) = (plan.offsets[ex], plan.offsets[ex + 1]);
        let n = hi - lo;
        let toks = Tensor::from_slice(&plan.token_of[lo..hi], n, dev)?;
        let xe = if n == t && t == 1 {
            x.clone()
        } else {
            x.index_select(&toks, 0)?
        };
        let gu = linear(&xe, &w.gate_up.get(ex)?)?;
        let act = (candle_nn_silu(&gu.narrow(1, 0, i)?)? * gu.narrow(1, i, i)?)?;
        let y = linear(&act, &w.down.get(ex)?)?;
        let wts: Vec<f32> = plan.slot_of[lo..hi]
            .iter()
            .map(|&s| gate.weights[s as usize])
            .collect();
        let wts = Tensor::from_vec(wts, (n, 1), dev)?;
        outs.push(
            y.to_dtype(DType::F32)?
                .broadcast_mul(&wts)?
                .to_dtype(dtype)?,
        );
    }
    let zeros = Tensor::zeros((t, h), dtype, dev)?;
    if outs.is_empty() {
        return Ok(zeros);
    }
    let ys = Tensor::cat(&outs, 0)?;
    let idx = Tensor::from_slice(&plan.token_of, plan.token_of.len(), dev)?;
    Ok(zeros.index_add(&idx, &ys, 0)?)
}

/// [`experts_forward`] with an ungated shared expert (`shared_gate_up` `[2·Is, H]`,
/// `shared_down` `[H, Is]`) run in the same two parallel passes and summed in f32 (transformers'
/// fp32 combine). Only where the CPU bf16 kernels apply (bf16 weights, contiguous, on the CPU);
/// `None` tells the caller to run the two separately. Returns `[T, H]` f32.
pub fn experts_forward_with_shared(
    x: &Tensor,
    w: &ExpertWeights,
    shared_gate_up: &Tensor,
    shared_down: &Tensor,
    gate: &GateOutput,
    plan: &DispatchPlan,
) -> Result<Option<Tensor>, KernelError> {
    let (t, h) = x.dims2()?;
    let (e, i, hw) = w.dims()?;
    let (si2, sh) = shared_gate_up.dims2()?;
    if h != hw || sh != h || e != plan.num_experts || gate.tokens != t {
        return Err(KernelError::InvalidArgument(format!(
            "experts_forward_with_shared shapes: x [{t}, {h}], experts [{e}, _, {hw}], shared gate_up [{si2}, {sh}], plan for {} experts, gate for {} tokens",
            plan.num_experts, gate.tokens
        )));
    }
    let shared = Some((shared_gate_up, shared_down, si2 / 2));
    Ok(cpu_bf16_experts(x, w, shared, gate, plan, (e, i, h))?
        .map(|y| Tensor::from_vec(y, (t, h), x.device()))
        .transpose()?)
}

/// A dense SwiGLU MLP (`gate_up` `[2·I, H]` with the gate rows first, `down` `[H, I]`) through
/// the CPU bf16 kernels' two parallel passes, activations in f32
/// ([`crate::cpu_moe::mlp_forward_bf16`]); `None` where they do not apply (not bf16, not
/// contiguous, not on the CPU). Returns `[T, H]` f32.
pub fn mlp_forward_cpu_bf16(
    x: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
) -> Result<Option<Tensor>, KernelError> {
    if !x.device().is_cpu() {
        return Ok(None);
    }
    let (t, h) = x.dims2()?;
    let (i2, gh) = gate_up.dims2()?;
    let (dh, i) = down.dims2()?;
    if gh != h || dh != h || i2 != 2 * i {
        return Err(KernelError::InvalidArgument(format!(
            "mlp_forward_cpu_bf16 shapes: x [{t}, {h}], gate_up [{i2}, {gh}], down [{dh}, {i}]"
        )));
    }
    let y = with_cpu_bf16(&[gate_up, down], |s| {
        let xf = crate::cpu_gemv::f32_values(x)?;
        let mlp = crate::cpu_moe::MlpWeights {
            gate_up: s[0],
            down: s[1],
            inter: i,
        };
        crate::cpu_moe::mlp_forward_bf16(&xf, t, h, mlp)
    })?;
    Ok(y.map(|y| Tensor::from_vec(y, (t, h), x.device()))
        .transpose()?)
}

/// [`crate::cpu_moe::experts_forward_bf16`] (with the shared expert `(gate_up, down, inter)`
/// when given) when every weight is contiguous bf16 on the CPU; `None` otherwise.
fn cpu_bf16_experts(
    x: &Tensor,
    w: &ExpertWeights,
    shared: Option<(&Tensor, &Tensor, usize)>,
    gate: &GateOutput,
    plan: &DispatchPlan,
    (e, i, h): (usize, usize, usize),
) -> Result<Option<Vec<f32>>, KernelError> {
    if !x.device().is_cpu() {
        return Ok(None);
    }
    let mut ts = vec![&w.gate_up, &w.down];
    if let Some((gu, dn, _)) = shared {
        ts.extend([gu, dn]);
    }
    with_cpu_bf16(&ts, |s| {
        let xf = crate::cpu_gemv::f32_values(x)?;
        let dims = crate::cpu_moe::ExpertDims {
            experts: e,
            inter: i,
            hidden: h,
        };
        let shared = shared.map(|(_, _, inter)| crate::cpu_moe::MlpWeights {
            gate_up: s[2],
            down: s[3],
            inter,
        });
        crate::cpu_moe::experts_forward_bf16(&xf, s[0], s[1], dims, gate, plan, shared)
    })
}

/// Calls `f` with the data of each tensor in `ts` when every one is contiguous bf16 on the
/// CPU; `None` otherwise.
fn with_cpu_bf16<R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[half::bf16]]) -> Result<R, KernelError>,
) -> Result<Option<R>, KernelError> {
    use candle_core::{CpuStorage, Storage};
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (st, l) in &guards {
        let (Storage::Cpu(CpuStorage::BF16(d)), Some((a, b))) = (&**st, l.contiguous_offsets())
        else {
            return Ok(None);
        };
        slices.push(&d[a..b]);
    }
    f(&slices).map(Some)
}

/// SiLU through candle-core's unary op (kept here so the op layer needs no candle-nn).
fn candle_nn_silu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.silu()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{gate_topk, GateConfig};
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    #[test]
    fn dispatch_groups_by_expert_and_covers_every_slot() {
        let gate = GateOutput {
            tokens: 3,
            top_k: 2,
            ids: vec![2, 0, 0, 2, 3, 0],
            weights: vec![0.0; 6],
        };
        let p = dispatch(&gate, 4).unwrap();
        assert_eq!(p.offsets, vec![0, 3, 3, 5, 6]);
        assert_eq!(p.token_of, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(p.slot_of, vec![1, 2, 5, 0, 3, 4]);
        assert_eq!(p.active_experts().collect::<Vec<_>>(), vec![0, 2, 3]);
        let bad = GateOutput {
            ids: vec![4, 0, 0, 0, 0, 0],
            ..gate
        };
        assert!(dispatch(&bad, 4).is_err());
    }

    /// Independent reference: loop over tokens and their k experts with plain f64 arithmetic.
    #[test]
    fn experts_forward_matches_per_token_loop() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (t, h, i, e, k) = (7, 12, 5, 6, 2);
        let dev = Device::Cpu;
        let rnd = |rng: &mut rand::rngs::StdRng, n: usize| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
        };
        let xv = rnd(&mut rng, t * h);
        let guv = rnd(&mut rng, e * 2 * i * h);
        let dv = rnd(&mut rng, e * h * i);
        let logits = rnd(&mut rng, t * e);
        let cfg = GateConfig::sigmoid(e, k, 1.5);
        let gate = gate_topk(&logits, None, &cfg).unwrap();
        let plan = dispatch(&gate, e).unwrap();
        let x = Tensor::from_vec(xv.clone(), (t, h), &dev).unwrap();
        let w = ExpertWeights {
            gate_up: Tensor::from_vec(guv.clone(), (e, 2 * i, h), &dev).unwrap(),
            down: Tensor::from_vec(dv.clone(), (e, h, i), &dev).unwrap(),
        };
        let got = experts_forward(&x, &w, &gate, &plan)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for tok in 0..t {
            let mut acc = vec![0f64; h];
            for j in 0..k {
                let ex = gate.ids[tok * k + j] as usize;
                let wt = gate.weights[tok * k + j] as f64;
                let mut act = vec![0f64; i];
                for (r, a) in act.iter_mut().enumerate() {
                    let row = |rr: usize| -> f64 {
                        (0..h)
                            .map(|c| guv[(ex * 2 * i + rr) * h + c] as f64 * xv[tok * h + c] as f64)
                            .sum()
                    };
                    let g = row(r);
                    let u = row(i + r);
                    *a = g / (1.0 + (-g).exp()) * u;
                }
                for (c, o) in acc.iter_mut().enumerate() {
                    let d: f64 = (0..i)
                        .map(|r| dv[(ex * h + c) * i + r] as f64 * act[r])
                        .sum();
                    *o += wt * d;
                }
            }
            for c in 0..h {
                assert!((got[tok][c] as f64 - acc[c]).abs() < 1e-4);
            }
        }
    }

    /// The fused CPU bf16 paths equal the unfused bf16 tensor ops bit for bit: a dense MLP
    /// (`gate_up` matmul, SiLU, mul, `down` matmul), and routed experts plus a shared expert
    /// added in f32 from two bf16 tensors.
    #[test]
    fn fused_bf16_paths_equal_unfused_ops() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let dev = Device::Cpu;
        let rnd = |rng: &mut rand::rngs::StdRng, dims: &[usize], scale: f32| -> Tensor {
            let n = dims.iter().product::<usize>();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
            Tensor::from_vec(v, dims, &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        for &(t, h, i, si, e, k) in &[
            (1, 64, 32, 32, 8, 2),
            (9, 48, 20, 40, 6, 3),
            (3, 33, 7, 14, 4, 4),
        ] {
            let x = rnd(&mut rng, &[t, h], 2.0);
            let experts = ExpertWeights {
                gate_up: rnd(&mut rng, &[e, 2 * i, h], 0.5),
                down: rnd(&mut rng, &[e, h, i], 0.5),
            };
            let (sgu, sdn) = (
                rnd(&mut rng, &[2 * si, h], 0.5),
                rnd(&mut rng, &[h, si], 0.5),
            );
            let unfused_mlp = |x: &Tensor| -> Tensor {
                let gu = linear(x, &sgu).unwrap();
                let act = (candle_nn_silu(&gu.narrow(1, 0, si).unwrap()).unwrap()
                    * gu.narrow(1, si, si).unwrap())
                .unwrap();
                linear(&act, &sdn).unwrap()
            };
            let bits = |t: &Tensor| -> Vec<u16> {
                t.to_dtype(DType::BF16)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<half::bf16>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            let dense = mlp_forward_cpu_bf16(&x, &sgu, &sdn).unwrap().unwrap();
            assert_eq!(dense.dtype(), DType::F32);
            assert_eq!(bits(&dense), bits(&unfused_mlp(&x)), "dense {t}x{h}x{si}");

            let logits: Vec<f32> = (0..t * e).map(|_| rng.random_range(-1.0..1.0)).collect();
            let cfg = GateConfig::sigmoid(e, k, 2.5);
            let gate = gate_topk(&logits, None, &cfg).unwrap();
            let plan = dispatch(&gate, e).unwrap();
            let fused = experts_forward_with_shared(&x, &experts, &sgu, &sdn, &gate, &plan)
                .unwrap()
                .unwrap();
            let routed = experts_forward(&x, &experts, &gate, &plan).unwrap();
            let unfused = (routed.to_dtype(DType::F32).unwrap()
                + unfused_mlp(&x).to_dtype(DType::F32).unwrap())
            .unwrap();
            assert_eq!(bits(&fused), bits(&unfused), "moe {t}x{h}x{i}x{e}");
        }
    }
}
