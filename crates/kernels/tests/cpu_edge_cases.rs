//! Edge cases of the CPU reference ops that the CUDA kernels are checked against: no tokens,
//! experts that receive no tokens, every expert chosen (k = E), and a shared expert expressed as
//! one more always-chosen column (how the GPU benchmark runs Hy3's shared expert).

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use switchyard_kernels::{
    dispatch, experts_forward, gate_topk, ExpertWeights, GateConfig, GateOutput,
};

fn cfg(e: usize, k: usize) -> GateConfig {
    GateConfig::sigmoid(e, k, 2.826)
}

fn rnd(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn weights(rng: &mut rand::rngs::StdRng, e: usize, h: usize, i: usize) -> ExpertWeights {
    let dev = Device::Cpu;
    ExpertWeights {
        gate_up: Tensor::from_vec(rnd(rng, e * 2 * i * h), (e, 2 * i, h), &dev).unwrap(),
        down: Tensor::from_vec(rnd(rng, e * h * i), (e, h, i), &dev).unwrap(),
    }
}

/// Plain per-token loop in f64: Σ_j w_j · down_e · (silu(gate_e · x) ⊙ up_e · x).
fn per_token(x: &[f32], w: &ExpertWeights, g: &GateOutput, h: usize, i: usize) -> Vec<f64> {
    let gu: Vec<f32> = w.gate_up.flatten_all().unwrap().to_vec1().unwrap();
    let dn: Vec<f32> = w.down.flatten_all().unwrap().to_vec1().unwrap();
    let mut out = vec![0f64; g.tokens * h];
    for t in 0..g.tokens {
        for j in 0..g.top_k {
            let e = g.ids[t * g.top_k + j] as usize;
            let wt = g.weights[t * g.top_k + j] as f64;
            let row = |r: usize| -> f64 {
                (0..h)
                    .map(|c| gu[(e * 2 * i + r) * h + c] as f64 * x[t * h + c] as f64)
                    .sum()
            };
            let act: Vec<f64> = (0..i)
                .map(|r| {
                    let a = row(r);
                    a / (1.0 + (-a).exp()) * row(i + r)
                })
                .collect();
            for c in 0..h {
                let d: f64 = (0..i)
                    .map(|r| dn[(e * h + c) * i + r] as f64 * act[r])
                    .sum();
                out[t * h + c] += wt * d;
            }
        }
    }
    out
}

#[test]
fn no_tokens_flow_through_every_op() {
    let c = cfg(16, 4);
    let g = gate_topk(&[], None, &c).unwrap();
    assert_eq!((g.tokens, g.ids.len(), g.weights.len()), (0, 0, 0));
    let plan = dispatch(&g, 16).unwrap();
    assert_eq!(plan.offsets, vec![0; 17]);
    assert!(plan.token_of.is_empty() && plan.slot_of.is_empty());
    assert_eq!(plan.active_experts().count(), 0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let w = weights(&mut rng, 16, 8, 4);
    let x = Tensor::zeros((0, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = experts_forward(&x, &w, &g, &plan).unwrap();
    assert_eq!(y.dims(), &[0, 8]);
}

#[test]
fn k_equal_to_e_chooses_every_expert_in_score_order() {
    let c = cfg(8, 8);
    let logits = [0.3, -1.0, 2.0, 0.3, 0.0, -0.5, 1.0, 0.3];
    let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5];
    let g = gate_topk(&logits, Some(&bias), &c).unwrap();
    // 7 is lifted to the top by its bias; 0 and 3 tie and keep id order.
    assert_eq!(g.ids, vec![7, 2, 6, 0, 3, 4, 5, 1]);
    let sum: f32 = g.weights.iter().sum();
    assert!((sum - 2.826).abs() < 1e-5, "{sum}");
    // The weights use the unbiased scores: 0, 3 and 7 have the same logit.
    assert_eq!(g.weights[0], g.weights[3]);
    assert_eq!(g.weights[3], g.weights[4]);
    let plan = dispatch(&g, 8).unwrap();
    assert_eq!(plan.offsets, (0..=8).collect::<Vec<_>>());
}

#[test]
fn experts_without_tokens_are_skipped_and_the_rest_match_a_per_token_loop() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (t, h, i, e, k) = (9, 16, 8, 12, 3);
    let mut logits = rnd(&mut rng, t * e);
    // Experts 0..4 can never win: at least four experts get no tokens.
    for r in 0..t {
        for x in 0..4 {
            logits[r * e + x] = -40.0;
        }
    }
    let g = gate_topk(&logits, None, &cfg(e, k)).unwrap();
    let plan = dispatch(&g, e).unwrap();
    for x in 0..4 {
        assert_eq!(plan.count(x), 0);
    }
    assert!(plan.active_experts().all(|x| x >= 4));
    let w = weights(&mut rng, e, h, i);
    let xv = rnd(&mut rng, t * h);
    let x = Tensor::from_vec(xv.clone(), (t, h), &Device::Cpu).unwrap();
    let got: Vec<f32> = experts_forward(&x, &w, &g, &plan)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = per_token(&xv, &w, &g, h, i);
    for (a, b) in got.iter().zip(&want) {
        assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn a_shared_expert_is_one_more_always_chosen_column() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (t, h, i, e, k) = (5, 16, 8, 6, 2);
    let g = gate_topk(&rnd(&mut rng, t * e), None, &cfg(e, k)).unwrap();
    // Weights for e routed experts plus the shared one stored as expert e.
    let w = weights(&mut rng, e + 1, h, i);
    let mut ids = Vec::new();
    let mut ws = Vec::new();
    for r in 0..t {
        ids.extend_from_slice(&g.ids[r * k..(r + 1) * k]);
        ids.push(e as u32);
        ws.extend_from_slice(&g.weights[r * k..(r + 1) * k]);
        ws.push(1.0);
    }
    let with_shared = GateOutput {
        tokens: t,
        top_k: k + 1,
        ids,
        weights: ws,
    };
    let plan = dispatch(&with_shared, e + 1).unwrap();
    assert_eq!(plan.count(e), t);
    let xv = rnd(&mut rng, t * h);
    let x = Tensor::from_vec(xv.clone(), (t, h), &Device::Cpu).unwrap();
    let got: Vec<f32> = experts_forward(&x, &w, &with_shared, &plan)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = per_token(&xv, &w, &with_shared, h, i);
    for (a, b) in got.iter().zip(&want) {
        assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn dispatch_is_a_permutation_for_many_tokens() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (t, e, k) = (1000, 64, 8);
    let g = gate_topk(&rnd(&mut rng, t * e), None, &cfg(e, k)).unwrap();
    let plan = dispatch(&g, e).unwrap();
    let mut seen = vec![false; t * k];
    for (p, &s) in plan.slot_of.iter().enumerate() {
        assert!(!seen[s as usize]);
        seen[s as usize] = true;
        assert_eq!(plan.token_of[p], s / k as u32);
        let ex = g.ids[s as usize] as usize;
        assert!(plan.offsets[ex] <= p && p < plan.offsets[ex + 1]);
    }
    assert!(seen.iter().all(|&b| b));
}
