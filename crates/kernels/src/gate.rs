//! MoE gate top-k: turns router logits into the experts each token visits and their weights.
//!
//! The gate is described by data ([`GateConfig`]), not by per-model code paths, so every MoE
//! family the engine supports (Hy3's sigmoid + selection-only bias, DeepSeek-V3's grouped
//! selection, Mixtral/Qwen's softmax) runs through this one op. The CPU version here is the
//! reference the CUDA kernel is checked against.

use rayon::prelude::*;

use crate::KernelError;

/// How router logits become per-expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScoreFunction {
    /// `s = sigmoid(logit)` per expert (Hy3, DeepSeek-V3).
    #[default]
    Sigmoid,
    /// `s = softmax(logits)` over all experts (Mixtral, Qwen-MoE).
    Softmax,
}

/// Everything that defines a gate's expert selection and weighting.
#[derive(Debug, Clone, PartialEq)]
pub struct GateConfig {
    /// Routed experts per layer.
    pub num_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Score function applied to the logits.
    pub score: ScoreFunction,
    /// Expert groups for group-limited selection (1 = no grouping).
    pub n_group: usize,
    /// Groups kept per token when `n_group > 1`.
    pub topk_group: usize,
    /// Divide the chosen scores by their sum.
    pub renormalize: bool,
    /// Multiplier applied to the final weights (Hy3: 2.826).
    pub scaling: f32,
    /// Added to the renormalisation denominator; transformers' Hy3 uses 1e-20 so a token whose
    /// scores all underflow does not divide by zero.
    pub renorm_eps: f32,
}

impl GateConfig {
    /// Hy3's kind of routing: sigmoid scores, no expert groups, the chosen scores renormalised
    /// (with transformers' `renorm_eps` of 1e-20) and multiplied by `scaling` (Hy3: 2.826).
    pub fn sigmoid(num_experts: usize, top_k: usize, scaling: f32) -> Self {
        GateConfig {
            num_experts,
            top_k,
            score: ScoreFunction::Sigmoid,
            n_group: 1,
            topk_group: 1,
            renormalize: true,
            scaling,
            renorm_eps: 1e-20,
        }
    }

    /// Checks that the configuration can be executed.
    pub fn validate(&self) -> Result<(), KernelError> {
        if self.num_experts == 0 || self.top_k == 0 || self.top_k > self.num_experts {
            return Err(KernelError::InvalidArgument(format!(
                "gate needs 1 <= top_k <= num_experts, got top_k {} with {} experts",
                self.top_k, self.num_experts
            )));
        }
        if self.n_group == 0
            || !self.num_experts.is_multiple_of(self.n_group)
            || self.topk_group == 0
            || self.topk_group > self.n_group
        {
            return Err(KernelError::InvalidArgument(format!(
                "gate grouping invalid: {} experts in {} groups keeping {}",
                self.num_experts, self.n_group, self.topk_group
            )));
        }
        if self.n_group > 1 && self.top_k > self.topk_group * (self.num_experts / self.n_group) {
            return Err(KernelError::InvalidArgument(format!(
                "gate top_k {} exceeds the experts in {} kept groups",
                self.top_k, self.topk_group
            )));
        }
        Ok(())
    }
}

/// Result of the gate for `T` tokens: `ids[t*k + j]` is token t's j-th expert (in descending
/// order of the selection score) and `weights[t*k + j]` its combine weight.
#[derive(Debug, Clone, PartialEq)]
pub struct GateOutput {
    /// Number of tokens.
    pub tokens: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Chosen expert ids, `[tokens, top_k]` row-major.
    pub ids: Vec<u32>,
    /// Combine weights, `[tokens, top_k]` row-major.
    pub weights: Vec<f32>,
}

/// Tokens below this count are gated on the calling thread: the rayon fork/join costs more than
/// the work (a decode step has 1–16 tokens per layer).
const PARALLEL_GATE_MIN_TOKENS: usize = 32;

/// Runs the gate on f32 router logits `[tokens, num_experts]` with an optional selection-only
/// bias (`[num_experts]`, added to the scores for choosing experts but not to their weights).
pub fn gate_topk(
    logits: &[f32],
    bias: Option<&[f32]>,
    cfg: &GateConfig,
) -> Result<GateOutput, KernelError> {
    cfg.validate()?;
    let e = cfg.num_experts;
    if !logits.len().is_multiple_of(e) {
        return Err(KernelError::InvalidArgument(format!(
            "router logits length {} is not a multiple of {} experts",
            logits.len(),
            e
        )));
    }
    if let Some(b) = bias {
        if b.len() != e {
            return Err(KernelError::InvalidArgument(format!(
                "expert bias has {} entries, expected {}",
                b.len(),
                e
            )));
        }
    }
    let tokens = logits.len() / e;
    let k = cfg.top_k;
    let mut ids = vec![0u32; tokens * k];
    let mut weights = vec![0f32; tokens * k];
    let run = |(row, (ids, ws)): (&[f32], (&mut [u32], &mut [f32]))| {
        let mut scratch = Scratch::new(e);
        gate_one(row, bias, cfg, &mut scratch, ids, ws);
    };
    if tokens >= PARALLEL_GATE_MIN_TOKENS {
        logits
            .par_chunks(e)
            .zip(ids.par_chunks_mut(k).zip(weights.par_chunks_mut(k)))
            .for_each(run);
    } else {
        logits
            .chunks(e)
            .zip(ids.chunks_mut(k).zip(weights.chunks_mut(k)))
            .for_each(run);
    }
    Ok(GateOutput {
        tokens,
        top_k: k,
        ids,
        weights,
    })
}

struct Scratch {
    scores: Vec<f32>,
    choice: Vec<f32>,
    order: Vec<u32>,
}

impl Scratch {
    fn new(e: usize) -> Self {
        Self {
            scores: vec![0.0; e],
            choice: vec![0.0; e],
            order: Vec::with_capacity(e),
        }
    }
}

/// Descending by value, ties broken by the lower expert id (deterministic, matches the CUDA
/// kernel's rule).
fn better(a: (f32, u32), b: (f32, u32)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

fn gate_one(
    row: &[f32],
    bias: Option<&[f32]>,
    cfg: &GateConfig,
    s: &mut Scratch,
    ids: &mut [u32],
    ws: &mut [f32],
) {
    let e = cfg.num_experts;
    match cfg.score {
        ScoreFunction::Sigmoid => {
            for (o, &x) in s.scores.iter_mut().zip(row) {
                *o = 1.0 / (1.0 + (-x).exp());
            }
        }
        ScoreFunction::Softmax => {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for (o, &x) in s.scores.iter_mut().zip(row) {
                *o = (x - max).exp();
                sum += *o;
            }
            for o in s.scores.iter_mut() {
                *o /= sum;
            }
        }
    }
    for i in 0..e {
        s.choice[i] = s.scores[i] + bias.map_or(0.0, |b| b[i]);
    }
    if cfg.n_group > 1 {
        // Group score = sum of the group's top-2 choice scores (DeepSeek-V3); groups outside the
        // best `topk_group` are masked out of selection.
        let gsize = e / cfg.n_group;
        let mut gscores: Vec<(f32, u32)> = (0..cfg.n_group)
            .map(|g| {
                let grp = &s.choice[g * gsize..(g + 1) * gsize];
                let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in grp {
                    if v > a {
                        b = a;
                        a = v;
                    } else if v > b {
                        b = v;
                    }
                }
                let top2 = if gsize >= 2 { a + b } else { a };
                (top2, g as u32)
            })
            .collect();
        gscores.sort_by(|x, y| {
            if better(*x, *y) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
        for &(_, g) in &gscores[cfg.topk_group..] {
            let g = g as usize;
            for v in &mut s.choice[g * gsize..(g + 1) * gsize] {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    // Partial selection: keep the k best in `order` by insertion (k <= 16 in practice).
    s.order.clear();
    for i in 0..e as u32 {
        let cand = (s.choice[i as usize], i);
        if s.order.len() == cfg.top_k {
            let last = *s.order.last().expect("k >= 1");
            if !better(cand, (s.choice[last as usize], last)) {
                continue;
            }
            s.order.pop();
        }
        let pos = s
            .order
            .iter()
            .position(|&j| better(cand, (s.choice[j as usize], j)))
            .unwrap_or(s.order.len());
        s.order.insert(pos, i);
    }
    let mut sum = 0.0f32;
    for (j, &id) in s.order.iter().enumerate() {
        ids[j] = id;
        ws[j] = s.scores[id as usize];
        sum += ws[j];
    }
    let scale = if cfg.renormalize {
        cfg.scaling / (sum + cfg.renorm_eps)
    } else {
        cfg.scaling
    };
    for w in ws.iter_mut() {
        *w *= scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hy3(e: usize, k: usize) -> GateConfig {
        GateConfig::sigmoid(e, k, 2.826)
    }

    /// Reference written the slow, obvious way: full sort of (score+bias, id).
    fn reference(row: &[f32], bias: &[f32], cfg: &GateConfig) -> (Vec<u32>, Vec<f32>) {
        let s: Vec<f64> = row
            .iter()
            .map(|&x| 1.0 / (1.0 + (-x as f64).exp()))
            .collect();
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| {
            let (va, vb) = (s[a] + bias[a] as f64, s[b] + bias[b] as f64);
            vb.partial_cmp(&va).unwrap().then(a.cmp(&b))
        });
        let chosen = &idx[..cfg.top_k];
        let sum: f64 = chosen.iter().map(|&i| s[i]).sum();
        (
            chosen.iter().map(|&i| i as u32).collect(),
            chosen
                .iter()
                .map(|&i| (s[i] / sum * cfg.scaling as f64) as f32)
                .collect(),
        )
    }

    #[test]
    fn matches_sorted_reference_and_bias_changes_selection() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let cfg = hy3(192, 8);
        let t = 64;
        let logits: Vec<f32> = (0..t * 192).map(|_| rng.random_range(-3.0..3.0)).collect();
        let bias: Vec<f32> = (0..192).map(|_| rng.random_range(-0.3..0.3)).collect();
        let out = gate_topk(&logits, Some(&bias), &cfg).unwrap();
        let nobias = gate_topk(&logits, None, &cfg).unwrap();
        let mut changed = 0;
        for r in 0..t {
            let (ids, ws) = reference(&logits[r * 192..(r + 1) * 192], &bias, &cfg);
            assert_eq!(&out.ids[r * 8..(r + 1) * 8], &ids[..]);
            for (a, b) in out.weights[r * 8..(r + 1) * 8].iter().zip(&ws) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            let s: f32 = out.weights[r * 8..(r + 1) * 8].iter().sum();
            assert!((s - 2.826).abs() < 1e-4);
            if nobias.ids[r * 8..(r + 1) * 8] != out.ids[r * 8..(r + 1) * 8] {
                changed += 1;
            }
        }
        assert!(changed > 0, "bias never changed the selection");
    }

    #[test]
    fn ties_go_to_lower_expert_id() {
        let cfg = hy3(8, 3);
        let out = gate_topk(&[0.5; 8], None, &cfg).unwrap();
        assert_eq!(out.ids, vec![0, 1, 2]);
        let w = 2.826 / 3.0;
        assert!(out.weights.iter().all(|x| (x - w).abs() < 1e-6));
    }

    #[test]
    fn softmax_without_renorm_gives_probabilities() {
        let mut cfg = hy3(4, 2);
        cfg.score = ScoreFunction::Softmax;
        cfg.renormalize = false;
        cfg.scaling = 1.0;
        let out = gate_topk(&[0.0, 1.0, 2.0, 3.0], None, &cfg).unwrap();
        let z: f32 = [0.0f32, 1.0, 2.0, 3.0].iter().map(|x| x.exp()).sum();
        assert_eq!(out.ids, vec![3, 2]);
        assert!((out.weights[0] - 3f32.exp() / z).abs() < 1e-6);
        assert!((out.weights[1] - 2f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn grouped_selection_stays_in_best_groups() {
        let mut cfg = hy3(8, 2);
        cfg.n_group = 4;
        cfg.topk_group = 1;
        // Group 2 (experts 4,5) has the best pair sum although expert 0 has the best single score.
        let logits = [3.0, -3.0, 0.0, 0.0, 2.5, 2.5, -1.0, -1.0];
        let out = gate_topk(&logits, None, &cfg).unwrap();
        assert_eq!(out.ids, vec![4, 5]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let cfg = hy3(4, 5);
        assert!(gate_topk(&[0.0; 4], None, &cfg).is_err());
        let cfg = hy3(4, 2);
        assert!(gate_topk(&[0.0; 5], None, &cfg).is_err());
        assert!(gate_topk(&[0.0; 4], Some(&[0.0; 3]), &cfg).is_err());
    }
}
