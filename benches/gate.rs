//! The MoE gate at Hy3's shape: [`switchyard_kernels::gate_topk`] on f32 router logits for 192
//! experts, top-8 by sigmoid score plus the selection-only expert bias, weights renormalised
//! and scaled by 2.826 (the `hy3` preset's gate). Criterion's `elem/s` is tokens/s.
//!
//! T = 1 is a batch-1 decode step's layer, 64 a batched decode step, 256 and 1024 prefill
//! chunks; the gate turns parallel at 32 tokens, so both sides of that switch are covered.
//! The router matmul that produces the logits is not included (the `moe` bench has it).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchyard_benches::{Rng, SEED};
use switchyard_kernels::cpu_gemv::on_worker;
use switchyard_kernels::gate_topk;

/// Tokens per gate call: decode (1, 64) and prefill chunk (256, 1024) sizes.
const TOKENS: [usize; 4] = [1, 64, 256, 1024];
/// Spread of the random logits: sigmoid scores between ~0.05 and ~0.95, as a trained router's.
const LOGIT_SCALE: f32 = 3.0;
/// Spread of the random expert bias: large enough to change some selections.
const BIAS_SCALE: f32 = 0.05;

fn gate(c: &mut Criterion) {
    let cfg = switchyard_model::presets::preset("hy3")
        .expect("the hy3 preset")
        .gate_config();
    let e = cfg.num_experts;
    let mut rng = Rng::new(SEED);
    let bias = rng.vec_f32(e, BIAS_SCALE);
    let mut g = c.benchmark_group("gate");
    for t in TOKENS {
        let logits = rng.vec_f32(t * e, LOGIT_SCALE);
        g.throughput(Throughput::Elements(t as u64));
        g.bench_function(
            BenchmarkId::new(format!("e{e}_k{}_sigmoid_bias", cfg.top_k), format!("t{t}")),
            // On a rayon worker, as the model's forward calls it.
            |b| on_worker(|| b.iter(|| gate_topk(&logits, Some(&bias), &cfg).expect("gate"))),
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = switchyard_benches::criterion();
    targets = gate
}
criterion_main!(benches);
