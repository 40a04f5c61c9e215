//! One MoE layer's forward on the CPU through the model's own layer:
//! [`switchyard_model::MoeLayer`] is `hy_v3.rs`'s MoE block, built by the model's load code
//! (quantized as `--quantize q8|q4` quantizes at load) and run by the `forward` the model calls,
//! on a rayon worker as the model runs it. So this measures the model's sequence (router
//! matmul in f32, gate top-k, dispatch, routed experts and the shared expert, combined in f32;
//! the fused routed + shared pass up to 64 tokens for bf16, the quantized passes at any size) and
//! follows it when it changes. Criterion's `elem/s` is tokens/s.
//!
//! Variants: `f32` and `bf16` are the weights' dtype, which the activations share; `q8` (`q4`)
//! is the bf16 weights of the same seed quantized to Q8 (Q4) (`switchyard_model::isq`), with f32
//! activations, as the model computes with quantized weights.
//!
//! Shapes:
//! - `small`: the `small` preset's layer (H 1024, expert I 384, E 64, top-8, one shared
//!   expert), f32, bf16, q8 and q4: the layer the `tokens` bench runs seven of.
//! - `hy3_e64`: Hy3's expert shape (H 4096, I 1536, top-8, one shared expert, Hy3's gate) with
//!   **64 experts instead of 192**, bf16, q8 and q4. All 192 would be 7.3 GB of random bf16
//!   weights; 64 are 2.4 GB (1.3 GB as Q8; building it holds the bf16 weights it quantizes
//!   from too, 3.7 GB at the peak). A token's work is unchanged (eight routed experts and the
//!   shared one of Hy3's size), so T = 1 is Hy3's per-layer decode cost; at larger T the tokens
//!   spread over fewer experts than in Hy3 (T = 256: 32 tokens per expert instead of ~11), so
//!   those numbers flatter Hy3 somewhat. One layer is held at a time.
//!
//! T = 1 and 8 are decode steps, 64 the largest fused size, 256 a prefill chunk. The
//! `moe_weight_bytes` group repeats `hy3_e64` at T = 1 and 8 with the weight bytes the step
//! reads (`MoeLayer::weight_bytes_read`: router, each expert the gate picked, the shared
//! expert, as held) as throughput: decode is bandwidth-bound, so compare that with the
//! machine's memory bandwidth. Working that out routes the input through the layer, so a run
//! filtered to other shapes still builds the `hy3_e64` layers for that group.
//!
//! In test mode (`cargo test --benches`, or `-- --test`) `hy3_e64` has 8 experts (300 MB).

use candle_core::{DType, Tensor};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use switchyard_benches::{test_mode, Rng, SEED};
use switchyard_kernels::cpu_gemv::on_worker;
use switchyard_model::{IsqType, ModelConfig, MoeLayer, MoeWeights, SharedExpertWeights};

/// Tokens per call: decode (1, 8), the fused-path limit (64), a prefill chunk (256).
const TOKENS: [usize; 4] = [1, 8, 64, 256];
/// Routed experts of the Hy3-shaped layer: 64 of Hy3's 192, so its bf16 weights (2.4 GB) fit
/// beside the other agents' builds on a 23 GB machine.
const HY3_EXPERTS: usize = 64;
/// Routed experts of the Hy3-shaped layer in test mode (300 MB).
const TEST_HY3_EXPERTS: usize = 8;
/// Token counts in the `moe_weight_bytes` group: the bandwidth-bound decode sizes.
const BYTES_TOKENS: [usize; 2] = [1, 8];
/// Uniform weights in ±this have the N(0, 0.02) spread of the test models.
const WEIGHT_SCALE: f32 = 0.035;
/// Uniform expert bias in ±this: large enough to change some choices, as trained biases do.
const BIAS_SCALE: f32 = 0.05;

/// How a layer's weights are held.
#[derive(Debug, Clone, Copy)]
enum Variant {
    F32,
    Bf16,
    /// bf16 weights quantized to Q8 at build.
    Q8,
    /// bf16 weights quantized to Q4 at build.
    Q4,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::F32 => "f32",
            Variant::Bf16 => "bf16",
            Variant::Q8 => "q8",
            Variant::Q4 => "q4",
        }
    }

    /// The dtype the random weights are drawn in.
    fn weight_dtype(self) -> DType {
        match self {
            Variant::F32 => DType::F32,
            Variant::Bf16 | Variant::Q8 | Variant::Q4 => DType::BF16,
        }
    }

    fn quantize(self) -> Option<IsqType> {
        match self {
            Variant::Q8 => Some(IsqType::Q8),
            Variant::Q4 => Some(IsqType::Q4),
            Variant::F32 | Variant::Bf16 => None,
        }
    }
}

/// Random weights for one MoE layer of `cfg`, named as the checkpoint names them. The router
/// and bias have their own stream (SEED + 1), the experts SEED, so each variant of a shape
/// routes the same way and holds the same (rounded) expert weights.
fn random_weights(cfg: &ModelConfig, dtype: DType) -> MoeWeights {
    let (h, i, e) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
    let s = i * cfg.num_shared_experts;
    let mut router = Rng::new(SEED + 1);
    let gate = router.tensor(&[e, h], WEIGHT_SCALE, DType::F32);
    let bias = cfg
        .gate
        .expert_bias
        .then(|| router.tensor(&[e], BIAS_SCALE, DType::F32));
    let mut rng = Rng::new(SEED);
    MoeWeights {
        gate,
        e_score_correction_bias: bias,
        experts_gate_up_proj: rng.tensor(&[e, 2 * i, h], WEIGHT_SCALE, dtype),
        experts_down_proj: rng.tensor(&[e, h, i], WEIGHT_SCALE, dtype),
        shared_experts: (s > 0).then(|| SharedExpertWeights {
            gate_proj: rng.tensor(&[s, h], WEIGHT_SCALE, dtype),
            up_proj: rng.tensor(&[s, h], WEIGHT_SCALE, dtype),
            down_proj: rng.tensor(&[h, s], WEIGHT_SCALE, dtype),
        }),
    }
}

/// The layer of `cfg` for `variant` (the random weights are dropped once it is built).
fn build(cfg: &ModelConfig, variant: Variant) -> MoeLayer {
    let w = random_weights(cfg, variant.weight_dtype());
    MoeLayer::new(cfg, w, variant.quantize()).expect("an MoE layer of the preset's shape")
}

fn preset(name: &str) -> ModelConfig {
    switchyard_model::presets::preset(name).expect("a built-in preset")
}

/// Benchmarks `name` at every T of [`TOKENS`], building the layer on first use and dropping
/// it at the end; with `bytes`, a second group gives weight bytes/s at [`BYTES_TOKENS`].
fn bench_layer(c: &mut Criterion, name: &str, cfg: &ModelConfig, variant: Variant, bytes: bool) {
    // Inputs from their own stream (the weights use SEED and SEED + 1), drawn in f32 and
    // rounded to the layer's activation dtype on first use: every variant gets the same tokens.
    let mut rng = Rng::new(SEED + 2);
    let inputs: Vec<(usize, Tensor)> = TOKENS
        .iter()
        .map(|&t| (t, rng.tensor(&[t, cfg.hidden_size], 1.0, DType::F32)))
        .collect();
    let mut layer: Option<MoeLayer> = None;
    let cast = |l: &MoeLayer, x: &Tensor| x.to_dtype(l.activation_dtype()).expect("cast");
    let id = format!("{name}_{}", variant.name());
    {
        let mut g = c.benchmark_group("moe");
        // The largest shape takes about a second per call: one call per sample.
        g.sampling_mode(SamplingMode::Flat);
        for (t, x) in &inputs {
            g.throughput(Throughput::Elements(*t as u64));
            g.bench_function(BenchmarkId::new(&id, format!("t{t}")), |b| {
                let l = layer.get_or_insert_with(|| build(cfg, variant));
                let x = cast(l, x);
                on_worker(|| b.iter(|| l.forward(&x).expect("MoE forward")))
            });
        }
        g.finish();
    }
    if bytes {
        let mut g = c.benchmark_group("moe_weight_bytes");
        g.sampling_mode(SamplingMode::Flat);
        for (t, x) in inputs.iter().filter(|(t, _)| BYTES_TOKENS.contains(t)) {
            let l = layer.get_or_insert_with(|| build(cfg, variant));
            let x = cast(l, x);
            let read = l.weight_bytes_read(&x).expect("route the input");
            g.throughput(Throughput::Bytes(read));
            g.bench_function(BenchmarkId::new(&id, format!("t{t}")), |b| {
                on_worker(|| b.iter(|| l.forward(&x).expect("MoE forward")))
            });
        }
        g.finish();
    }
}

fn moe(c: &mut Criterion) {
    let small = preset("small");
    for v in [Variant::F32, Variant::Bf16, Variant::Q8, Variant::Q4] {
        bench_layer(c, "small", &small, v, false);
    }
    let mut hy3 = preset("hy3");
    hy3.num_experts = if test_mode() {
        TEST_HY3_EXPERTS
    } else {
        HY3_EXPERTS
    };
    let name = format!("hy3_e{}", hy3.num_experts);
    for v in [Variant::Bf16, Variant::Q8, Variant::Q4] {
        bench_layer(c, &name, &hy3, v, true);
    }
}

criterion_group! {
    name = benches;
    config = switchyard_benches::criterion();
    targets = moe
}
criterion_main!(benches);
