//! One MoE layer's forward on the CPU: router matmul (f32), gate top-k, dispatch, the routed
//! experts and the shared expert, combined in f32 — the same sequence of op-layer calls as
//! `Moe::forward` in `crates/model/src/hy_v3.rs` (its CPU path, including the fused
//! routed + shared pass up to 64 tokens), run on a rayon worker as the model runs it.
//! Criterion's `elem/s` is tokens/s.
//!
//! Shapes:
//! - `small`: the `small` preset's layer (H 1024, expert I 384, E 64, top-8, one shared
//!   expert), f32 and bf16: the layer the `tokens` bench runs seven of.
//! - `hy3_e64`: Hy3's expert shape (H 4096, I 1536, top-8, one shared expert, Hy3's gate) with
//!   **64 experts instead of 192**, bf16. All 192 would be 7.3 GB of random weights; 64 are
//!   2.4 GB. A token's work is unchanged (eight routed experts and the shared one of Hy3's
//!   size), so T = 1 is Hy3's per-layer decode cost; at larger T the tokens spread over fewer
//!   experts than in Hy3 (T = 256: 32 tokens per expert instead of ~11), so those numbers
//!   flatter Hy3 somewhat.
//!
//! T = 1 and 8 are decode steps, 64 the largest fused size, 256 a prefill chunk. The
//! `moe_weight_bytes` group repeats `hy3_e64` at T = 1 and 8 with the weight bytes the step
//! reads (router, each expert the gate picked, the shared expert) as throughput: decode is
//! bandwidth-bound, so compare that with the machine's memory bandwidth.

use candle_core::{DType, Tensor};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use switchyard_benches::{test_mode, Rng, SEED};
use switchyard_kernels::cpu_gemv::{on_worker, try_linear_bf16};
use switchyard_kernels::moe::{experts_forward_with_shared, mlp_forward_cpu_bf16};
use switchyard_kernels::{
    dispatch, experts_forward, gate_topk, ExpertWeights, GateConfig, GateOutput,
};
use switchyard_model::ModelConfig;

/// Tokens per call: decode (1, 8), the fused-path limit (64), a prefill chunk (256).
const TOKENS: [usize; 4] = [1, 8, 64, 256];
/// Routed experts of the Hy3-shaped layer: 64 of Hy3's 192, so its bf16 weights (2.4 GB) fit
/// beside the other agents' builds on a 23 GB machine.
const HY3_EXPERTS: usize = 64;
/// Routed experts of the Hy3-shaped layer in test mode (300 MB).
const TEST_HY3_EXPERTS: usize = 8;
/// Token counts in the `moe_weight_bytes` group: the bandwidth-bound decode sizes.
const BYTES_TOKENS: [usize; 2] = [1, 8];
/// `MAX_FUSED_MLP_TOKENS` of hy_v3.rs: up to this many tokens the bf16 shared expert runs in
/// the routed experts' two passes; above it, separately through the GEMV path.
const MAX_FUSED_MLP_TOKENS: usize = 64;
/// Uniform weights in ±this have the N(0, 0.02) spread of the test models.
const WEIGHT_SCALE: f32 = 0.035;

/// The router of a layer: cheap to build (E × H f32), so the bytes a step reads can be worked
/// out without generating the experts.
struct Router {
    weight: Tensor,
    bias: Vec<f32>,
    gate: GateConfig,
}

impl Router {
    fn random(cfg: &ModelConfig) -> Self {
        // Its own stream, so the routing does not depend on whether the experts exist yet.
        let mut rng = Rng::new(SEED + 1);
        let (h, e) = (cfg.hidden_size, cfg.num_experts);
        Self {
            weight: rng.tensor(&[e, h], WEIGHT_SCALE, DType::F32),
            bias: rng.vec_f32(e, 0.05),
            gate: cfg.gate_config(),
        }
    }

    fn route(&self, x: &Tensor) -> GateOutput {
        let logits = x
            .to_dtype(DType::F32)
            .and_then(|x| x.matmul(&self.weight.t()?))
            .and_then(|l| l.flatten_all()?.to_vec1::<f32>())
            .expect("router matmul");
        gate_topk(&logits, Some(&self.bias), &self.gate).expect("gate")
    }

    /// Bytes of weights a forward of `x` reads: the router, each routed expert the gate picked
    /// (once, however many tokens it serves), and the shared expert.
    fn bytes_read(&self, x: &Tensor, cfg: &ModelConfig, dtype: DType) -> u64 {
        let g = self.route(x);
        let plan = dispatch(&g, self.gate.num_experts).expect("dispatch");
        let expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size * dtype.size_in_bytes();
        let router = cfg.num_experts * cfg.hidden_size * 4;
        (router + (plan.active_experts().count() + 1) * expert) as u64
    }
}

/// One MoE layer's weights, laid out as `HyV3Model` loads them.
struct Layer {
    router: Router,
    experts: ExpertWeights,
    shared_gate_up: Tensor,
    shared_down: Tensor,
    inter: usize,
}

impl Layer {
    fn random(cfg: &ModelConfig, dtype: DType) -> Self {
        let mut rng = Rng::new(SEED);
        let (h, i, e) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
        Self {
            router: Router::random(cfg),
            experts: ExpertWeights {
                gate_up: rng.tensor(&[e, 2 * i, h], WEIGHT_SCALE, dtype),
                down: rng.tensor(&[e, h, i], WEIGHT_SCALE, dtype),
            },
            shared_gate_up: rng.tensor(&[2 * i, h], WEIGHT_SCALE, dtype),
            shared_down: rng.tensor(&[h, i], WEIGHT_SCALE, dtype),
            inter: i,
        }
    }

    /// `Moe::forward`'s CPU path (fp32 combine, as every preset has).
    fn forward(&self, x: &Tensor) -> Tensor {
        let g = self.router.route(x);
        let plan = dispatch(&g, self.router.gate.num_experts).expect("dispatch");
        let t = x.dim(0).expect("[T, H]");
        if t <= MAX_FUSED_MLP_TOKENS {
            if let Some(y) = experts_forward_with_shared(
                x,
                &self.experts,
                &self.shared_gate_up,
                &self.shared_down,
                &g,
                &plan,
            )
            .expect("fused experts")
            {
                return y.to_dtype(x.dtype()).expect("cast");
            }
        }
        let routed = experts_forward(x, &self.experts, &g, &plan).expect("experts");
        let shared = self.shared(x);
        (routed.to_dtype(DType::F32).expect("cast") + shared.to_dtype(DType::F32).expect("cast"))
            .and_then(|y| y.to_dtype(x.dtype()))
            .expect("combine")
    }

    /// hy_v3.rs's `Mlp::forward` for the shared expert.
    fn shared(&self, x: &Tensor) -> Tensor {
        let t = x.dim(0).expect("[T, H]");
        if t <= MAX_FUSED_MLP_TOKENS {
            if let Some(y) = mlp_forward_cpu_bf16(x, &self.shared_gate_up, &self.shared_down)
                .expect("shared expert")
            {
                return y.to_dtype(x.dtype()).expect("cast");
            }
        }
        let i = self.inter;
        let gu = matmul_t(x, &self.shared_gate_up);
        let act = (gu.narrow(1, 0, i).and_then(|g| g.silu()))
            .and_then(|g| g * gu.narrow(1, i, i)?)
            .expect("SwiGLU");
        matmul_t(&act, &self.shared_down)
    }
}

/// hy_v3.rs's `matmul_t`: the bf16 GEMV kernel where it applies, candle's matmul otherwise.
fn matmul_t(x: &Tensor, w: &Tensor) -> Tensor {
    match try_linear_bf16(x, w).expect("gemv") {
        Some(y) => y,
        None => x.matmul(&w.t().expect("t")).expect("matmul"),
    }
}

fn preset(name: &str) -> ModelConfig {
    switchyard_model::presets::preset(name).expect("a built-in preset")
}

/// Benchmarks `name` at every T of `tokens`, building the layer on first use and dropping it
/// at the end; with `bytes`, a second group gives weight bytes/s at [`BYTES_TOKENS`].
fn bench_layer(c: &mut Criterion, name: &str, cfg: &ModelConfig, dtype: DType, bytes: bool) {
    // Inputs from their own stream (the weights use SEED and SEED + 1).
    let mut rng = Rng::new(SEED + 2);
    let mut layer: Option<Layer> = None;
    let mut inputs: Vec<(usize, Tensor)> = Vec::new();
    for t in TOKENS {
        inputs.push((t, rng.tensor(&[t, cfg.hidden_size], 1.0, dtype)));
    }
    let id = format!(
        "{name}_{}",
        if dtype == DType::F32 { "f32" } else { "bf16" }
    );
    {
        let mut g = c.benchmark_group("moe");
        // The largest shape takes about a second per call: one call per sample.
        g.sampling_mode(SamplingMode::Flat);
        for (t, x) in &inputs {
            g.throughput(Throughput::Elements(*t as u64));
            g.bench_function(BenchmarkId::new(&id, format!("t{t}")), |b| {
                let l = layer.get_or_insert_with(|| Layer::random(cfg, dtype));
                on_worker(|| b.iter(|| l.forward(x)))
            });
        }
        g.finish();
    }
    if bytes {
        let router = Router::random(cfg);
        let mut g = c.benchmark_group("moe_weight_bytes");
        g.sampling_mode(SamplingMode::Flat);
        for (t, x) in inputs.iter().filter(|(t, _)| BYTES_TOKENS.contains(t)) {
            g.throughput(Throughput::Bytes(router.bytes_read(x, cfg, dtype)));
            g.bench_function(BenchmarkId::new(&id, format!("t{t}")), |b| {
                let l = layer.get_or_insert_with(|| Layer::random(cfg, dtype));
                on_worker(|| b.iter(|| l.forward(x)))
            });
        }
        g.finish();
    }
}

fn moe(c: &mut Criterion) {
    let small = preset("small");
    bench_layer(c, "small", &small, DType::F32, false);
    bench_layer(c, "small", &small, DType::BF16, false);
    let mut hy3 = preset("hy3");
    hy3.num_experts = if test_mode() {
        TEST_HY3_EXPERTS
    } else {
        HY3_EXPERTS
    };
    let name = format!("hy3_e{}", hy3.num_experts);
    bench_layer(c, &name, &hy3, DType::BF16, true);
}

criterion_group! {
    name = benches;
    config = switchyard_benches::criterion();
    targets = moe
}
criterion_main!(benches);
