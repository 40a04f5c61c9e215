//! One hy_v3 MoE block on its own, for benchmarks and tests: [`MoeLayer`] wraps the model's
//! own MoE layer type, built by the same code the model loads with and run by the same
//! `forward` the model calls, so a measurement of it is a measurement of the model's layer (the
//! `moe` bench of `switchyard-benches`), including the `--quantize q8` path.
//!
//! Two ways in: [`MoeLayer::load`] reads one layer of a checkpoint through [`Weights`] (the
//! path `model.layers.{i}.mlp`, as the model loads it), and [`MoeLayer::new`] takes the same
//! tensors already in memory ([`MoeWeights`], fields named after the checkpoint's tensors), for
//! random bench weights too large to write to disk first. Both quantize, when asked, exactly as
//! [`crate::isq`] does at load: routed experts one at a time, the shared expert after fusing
//! gate and up, zero-padded to whole blocks.
//!
//! Single rank only: no tensor or expert parallelism (the model's collectives are not part of
//! one layer's forward).

use candle_core::{DType, Tensor};

use super::{tensor_bytes, Mlp, Moe, MoeExec};
use crate::config::ModelConfig;
use crate::isq::{self, IsqType};
use crate::parallel::Shard;
use crate::weights::Weights;
use crate::ModelError;

/// One MoE block's tensors in memory, each named after the checkpoint tensor it stands for
/// under `model.layers.{i}.mlp` (fused experts layout, as transformers' `save_pretrained`
/// writes hy_v3).
#[derive(Debug, Clone)]
pub struct MoeWeights {
    /// `gate.weight` `[E, H]`: the router (used in f32 whatever its dtype, as loaded).
    pub gate: Tensor,
    /// `e_score_correction_bias` `[E]`: the selection-only expert bias; required exactly when
    /// the config's gate has one (`gate.expert_bias`).
    pub e_score_correction_bias: Option<Tensor>,
    /// `experts.gate_up_proj` `[E, 2·I, H]` (gate rows first). Its dtype is the layer's dtype.
    pub experts_gate_up_proj: Tensor,
    /// `experts.down_proj` `[E, H, I]`.
    pub experts_down_proj: Tensor,
    /// `shared_experts.*`: required exactly when the config has shared experts.
    pub shared_experts: Option<SharedExpertWeights>,
}

/// The shared expert's `shared_experts.{gate,up,down}_proj.weight`, for `S` =
/// `moe_intermediate_size · num_shared_experts`.
#[derive(Debug, Clone)]
pub struct SharedExpertWeights {
    /// `gate_proj.weight` `[S, H]`.
    pub gate_proj: Tensor,
    /// `up_proj.weight` `[S, H]`.
    pub up_proj: Tensor,
    /// `down_proj.weight` `[H, S]`.
    pub down_proj: Tensor,
}

/// One hy_v3 MoE block (router, gate top-k, routed experts, shared expert, combine): the
/// model's own layer, built and run by the model's code (see the module docs).
#[derive(Debug, Clone)]
pub struct MoeLayer {
    moe: Moe,
    /// What `forward` takes and returns: the weights' dtype, f32 when quantized.
    act_dtype: DType,
    hidden: usize,
    quantize: Option<IsqType>,
}

impl MoeLayer {
    /// Loads the block at `w` (a checkpoint's `model.layers.{i}.mlp`) as the model loads it;
    /// `w`'s dtype is the compute dtype. With `quantize`, `w` must load f32, as the model's
    /// layers do when quantized ([`super::HyV3Model::activation_dtype`]).
    pub fn load(
        w: &Weights,
        cfg: &ModelConfig,
        quantize: Option<IsqType>,
    ) -> Result<Self, ModelError> {
        isq::check_device(quantize, w.device())?;
        if let (Some(q), dt) = (quantize, w.dtype()) {
            if dt != DType::F32 {
                return Err(ModelError::LoadOption {
                    flag: isq::QUANTIZE_FLAG.into(),
                    message: format!(
                        "{} {q}: a quantized layer loads its weights in f32, as the model \
                         does; these Weights load {dt:?}",
                        isq::QUANTIZE_FLAG
                    ),
                });
            }
        }
        Ok(Self {
            moe: Moe::load(w, cfg, &Shard::single(), quantize)?,
            act_dtype: w.dtype(),
            hidden: cfg.hidden_size,
            quantize,
        })
    }

    /// Builds the block from tensors in memory, checked against `cfg`. The layer computes in
    /// the dtype of `experts_gate_up_proj` (the shared expert is converted to it), or in f32
    /// when `quantize` asks for Q8 (the weights are then quantized from their own dtype, which
    /// gives the Q8 values of their f32 widening, and dropped).
    pub fn new(
        cfg: &ModelConfig,
        weights: MoeWeights,
        quantize: Option<IsqType>,
    ) -> Result<Self, ModelError> {
        let MoeWeights {
            gate,
            e_score_correction_bias: bias,
            experts_gate_up_proj: gate_up,
            experts_down_proj: down,
            shared_experts,
        } = weights;
        isq::check_device(quantize, gate_up.device())?;
        let (h, e, i) = (cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size);
        let s = i * cfg.num_shared_experts;
        check_shape("gate", &gate, &[e, h])?;
        check_shape("experts_gate_up_proj", &gate_up, &[e, 2 * i, h])?;
        check_shape("experts_down_proj", &down, &[e, h, i])?;
        let bias = match (bias, cfg.gate.expert_bias) {
            (Some(b), true) => {
                check_shape("e_score_correction_bias", &b, &[e])?;
                Some(b.to_dtype(DType::F32)?)
            }
            (None, false) => None,
            (b, _) => {
                return Err(presence(
                    "e_score_correction_bias",
                    b.is_some(),
                    "gate.expert_bias",
                ))
            }
        };
        let dtype = gate_up.dtype();
        let shared = match (shared_experts, s > 0) {
            (Some(sh), true) => {
                check_shape("shared_experts.gate_proj", &sh.gate_proj, &[s, h])?;
                check_shape("shared_experts.up_proj", &sh.up_proj, &[s, h])?;
                check_shape("shared_experts.down_proj", &sh.down_proj, &[h, s])?;
                Some(Mlp::new(
                    sh.gate_proj.to_dtype(dtype)?,
                    sh.up_proj.to_dtype(dtype)?,
                    sh.down_proj.to_dtype(dtype)?,
                    quantize,
                )?)
            }
            (None, false) => None,
            (sh, _) => {
                return Err(presence(
                    "shared_experts",
                    sh.is_some(),
                    "num_shared_experts",
                ))
            }
        };
        let router = gate.to_dtype(DType::F32)?;
        let down = down.to_dtype(dtype)?;
        let (exec, shared) = match quantize {
            Some(q) => {
                let experts = (0..e).map(|j| Ok((gate_up.get(j)?, down.get(j)?)));
                (MoeExec::quantized(q, 0, experts, bias)?, shared)
            }
            None => {
                let experts = switchyard_kernels::ExpertWeights { gate_up, down };
                MoeExec::choose(experts, bias, shared, &cfg.gate_config(), dtype)?
            }
        };
        Ok(Self {
            moe: Moe::from_parts(cfg, router, shared, exec, (0, e)),
            act_dtype: if quantize.is_some() {
                DType::F32
            } else {
                dtype
            },
            hidden: h,
            quantize,
        })
    }

    /// The block's output for `x` `[T, H]` in [`Self::activation_dtype`]: the model's MoE
    /// forward on one rank, output in the input's dtype. On the CPU the model runs its whole
    /// forward pass on a rayon worker (`switchyard_kernels::cpu_gemv::on_worker`); call this
    /// inside one to measure what the model runs.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        self.check_input(x)?;
        self.moe.forward(x, self.act_dtype)
    }

    /// The dtype [`Self::forward`] takes and returns: the weights' dtype, or f32 when they are
    /// quantized (as [`super::HyV3Model::activation_dtype`]).
    pub fn activation_dtype(&self) -> DType {
        self.act_dtype
    }

    /// The quantization the weights were built with.
    pub fn quantization(&self) -> Option<IsqType> {
        self.quantize
    }

    /// How the routed experts run (`reference`, `q8`, `q4`, or with the `cuda` feature on a GPU
    /// `cuda-gate+reference-experts` or `cuda-kernels`), as [`super::HyV3Model::moe_paths`].
    pub fn path(&self) -> &'static str {
        self.moe.exec.name()
    }

    /// Bytes of weights a forward of `x` reads: the router, each routed expert the gate picks
    /// for `x` (once, however many tokens it serves) and the shared expert, as held (Q8 values
    /// and scales when quantized). Decode is bandwidth-bound, so these over the step's time
    /// compare with the machine's memory bandwidth. Host-routed layers only (the CPU paths).
    pub fn weight_bytes_read(&self, x: &Tensor) -> Result<u64, ModelError> {
        self.check_input(x)?;
        let m = &self.moe;
        let logits = m.logits(x)?;
        let routed: u64 = match &m.exec {
            MoeExec::Reference { bias, experts } => {
                let (_, plan) = m.route_host(&logits, bias.as_deref())?;
                let per = (tensor_bytes(&experts.gate_up) + tensor_bytes(&experts.down))
                    / experts.gate_up.dim(0)?.max(1) as u64;
                plan.active_experts().count() as u64 * per
            }
            MoeExec::Quant { bias, experts } => {
                let (_, plan) = m.route_host(&logits, bias.as_deref())?;
                plan.active_experts()
                    .map(|j| experts.expert(j).memory_bytes() as u64)
                    .sum()
            }
            #[cfg(feature = "cuda")]
            MoeExec::CudaGate { .. } | MoeExec::CudaKernels(_) => {
                return Err(ModelError::InvalidInput(format!(
                    "weight_bytes_read routes on the host; this layer runs {}",
                    self.path()
                )))
            }
        };
        Ok(tensor_bytes(&m.router) + routed + m.shared.as_ref().map_or(0, Mlp::bytes))
    }

    /// `x` must be `[T, H]` in the activation dtype.
    fn check_input(&self, x: &Tensor) -> Result<(), ModelError> {
        let ok_shape = matches!(x.dims(), [_, h] if *h == self.hidden);
        if !ok_shape || x.dtype() != self.act_dtype {
            return Err(ModelError::InvalidInput(format!(
                "the MoE layer takes [tokens, {}] {:?} activations{}; got {:?} {:?}",
                self.hidden,
                self.act_dtype,
                if self.quantize.is_some() {
                    " (f32 with quantized weights)"
                } else {
                    ""
                },
                x.dims(),
                x.dtype()
            )));
        }
        Ok(())
    }
}

/// Fails unless `t` has the shape the config implies.
fn check_shape(name: &str, t: &Tensor, want: &[usize]) -> Result<(), ModelError> {
    if t.dims() == want {
        return Ok(());
    }
    Err(ModelError::InvalidInput(format!(
        "MoeWeights.{name} has shape {:?}; the config implies {want:?}",
        t.dims()
    )))
}

/// The error for a tensor given without the config field that calls for it, or missing
/// although the field does.
fn presence(name: &str, given: bool, field: &str) -> ModelError {
    ModelError::Config {
        field: field.into(),
        message: if given {
            format!("MoeWeights.{name} is given but the config has none")
        } else {
            format!("the config calls for MoeWeights.{name}, which is missing")
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{Device, Tensor};
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    use super::*;
    use crate::config::LayerKind;
    use crate::hy_v3::{FeedForward, HyV3Model, LoadOptions};
    use crate::weights::Checkpoint;

    /// Seed of the test model and the inputs.
    const SEED: u64 = 11;
    /// Token counts: a decode-sized step (the fused CPU paths) and one above
    /// `MAX_FUSED_MLP_TOKENS` (64; the unfused ones).
    const TOKENS: [usize; 2] = [5, 70];
    /// The public layer runs the model's own code on the same weights: equal to f32 rounding
    /// (measured 2026-11-28: bit for bit, every case).
    const SAME_CODE_TOL: f32 = 1e-6;
    /// Q8 vs f32 weights, as RMS of the difference over RMS of the f32 output. One Q8 product
    /// is off by ~5.5e-3 relative RMS (`cpu_q8` module docs); the block chains two (gate/up,
    /// then down) for each expert and the shared one. Measured 2026-11-28 on this tiny model
    /// (every dimension zero-padded to 64): 0.0098–0.0114 quantized from f32, 0.0102–0.0124
    /// from bf16 weights; bf16 weights and activations (no Q8): 0.0046–0.0048. About twice
    /// the worst, so a real regression (a wrong scale, a lost padding column) still fails.
    const Q8_REL_TOL: f32 = 0.025;

    struct Fixture {
        _dir: tempfile::TempDir,
        cfg: ModelConfig,
        ckpt: Arc<Checkpoint>,
        /// Index of the first MoE layer.
        layer: usize,
    }

    fn tiny() -> Fixture {
        let cfg = crate::presets::preset("tiny").unwrap();
        let dir = tempfile::tempdir().unwrap();
        crate::test_model::write_random_checkpoint(&cfg, dir.path(), SEED, DType::F32).unwrap();
        let ckpt = Arc::new(Checkpoint::open(dir.path()).unwrap());
        let layer = cfg
            .layer_kinds
            .iter()
            .position(|k| *k == LayerKind::Moe)
            .unwrap();
        Fixture {
            _dir: dir,
            cfg,
            ckpt,
            layer,
        }
    }

    impl Fixture {
        fn weights(&self, dtype: DType) -> Weights {
            Weights::new(self.ckpt.clone(), dtype, Device::Cpu)
                .pp("model.layers")
                .pp(self.layer)
                .pp("mlp")
        }

        /// The layer's tensors read from the checkpoint by name, for [`MoeLayer::new`].
        fn moe_weights(&self, dtype: DType) -> MoeWeights {
            let w = self.weights(dtype);
            let c = &self.cfg;
            let (h, e, i) = (c.hidden_size, c.num_experts, c.moe_intermediate_size);
            let s = i * c.num_shared_experts;
            let sh = w.pp("shared_experts");
            MoeWeights {
                gate: w.pp("gate").get_f32(&[e, h], "weight").unwrap(),
                e_score_correction_bias: Some(w.get_f32(&[e], "e_score_correction_bias").unwrap()),
                experts_gate_up_proj: w.pp("experts").get(&[e, 2 * i, h], "gate_up_proj").unwrap(),
                experts_down_proj: w.pp("experts").get(&[e, h, i], "down_proj").unwrap(),
                shared_experts: Some(SharedExpertWeights {
                    gate_proj: sh.pp("gate_proj").get(&[s, h], "weight").unwrap(),
                    up_proj: sh.pp("up_proj").get(&[s, h], "weight").unwrap(),
                    down_proj: sh.pp("down_proj").get(&[h, s], "weight").unwrap(),
                }),
            }
        }

        /// The whole model's own MoE output for this layer and `x`, as `run_layers` calls it.
        fn model_output(&self, opts: &LoadOptions, x: &Tensor) -> Tensor {
            let model =
                HyV3Model::load(self.cfg.clone(), self.ckpt.clone(), opts, |_, _| {}).unwrap();
            let FeedForward::Moe(m) = &model.layers[self.layer].mlp else {
                panic!("layer {} is not an MoE layer", self.layer)
            };
            m.forward(x, model.activation_dtype()).unwrap()
        }
    }

    /// Post-norm-like activations: N(0, 1), seeded.
    fn input(t: usize, h: usize, dtype: DType) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(SEED + t as u64);
        let n = Normal::new(0f32, 1.0).unwrap();
        let v: Vec<f32> = (0..t * h).map(|_| n.sample(&mut rng)).collect();
        Tensor::from_vec(v, (t, h), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        f32s(a)
            .iter()
            .zip(f32s(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// RMS of `got − want` over RMS of `want`.
    fn rel_rms(got: &Tensor, want: &Tensor) -> f32 {
        let (g, w) = (f32s(got), f32s(want));
        let d: f32 = g.iter().zip(&w).map(|(a, b)| (a - b) * (a - b)).sum();
        let n: f32 = w.iter().map(|b| b * b).sum();
        (d / n).sqrt()
    }

    #[test]
    fn public_layer_computes_what_the_models_layer_computes() {
        let f = tiny();
        let h = f.cfg.hidden_size;
        for dtype in [DType::F32, DType::BF16] {
            let opts = LoadOptions {
                dtype,
                ..Default::default()
            };
            let loaded = MoeLayer::load(&f.weights(dtype), &f.cfg, None).unwrap();
            let built = MoeLayer::new(&f.cfg, f.moe_weights(dtype), None).unwrap();
            assert_eq!(built.activation_dtype(), dtype);
            assert_eq!(built.path(), "reference");
            for t in TOKENS {
                let x = input(t, h, dtype);
                let want = f.model_output(&opts, &x);
                for (how, layer) in [("load", &loaded), ("new", &built)] {
                    let got = layer.forward(&x).unwrap();
                    assert_eq!(got.dtype(), dtype);
                    let d = max_abs_diff(&got, &want);
                    assert!(d <= SAME_CODE_TOL, "{how} {dtype:?} T={t}: {d}");
                }
            }
        }
    }

    #[test]
    fn q8_layer_is_the_quantized_models_layer_and_near_f32() {
        let f = tiny();
        let h = f.cfg.hidden_size;
        let q8 = Some(IsqType::Q8);
        let opts = LoadOptions {
            quantize: q8,
            ..Default::default()
        };
        let loaded = MoeLayer::load(&f.weights(DType::F32), &f.cfg, q8).unwrap();
        let built = MoeLayer::new(&f.cfg, f.moe_weights(DType::F32), q8).unwrap();
        // Quantized from bf16 weights: the Q8 values of their f32 widening.
        let from_bf16 = MoeLayer::new(&f.cfg, f.moe_weights(DType::BF16), q8).unwrap();
        let dense = MoeLayer::new(&f.cfg, f.moe_weights(DType::F32), None).unwrap();
        let bf16 = MoeLayer::new(&f.cfg, f.moe_weights(DType::BF16), None).unwrap();
        assert_eq!(built.path(), "q8");
        assert_eq!(built.activation_dtype(), DType::F32);
        assert_eq!(from_bf16.activation_dtype(), DType::F32);
        for t in TOKENS {
            let x = input(t, h, DType::F32);
            let want = f.model_output(&opts, &x);
            for (how, layer) in [("load", &loaded), ("new", &built)] {
                let d = max_abs_diff(&layer.forward(&x).unwrap(), &want);
                assert!(d <= SAME_CODE_TOL, "{how} q8 T={t}: {d}");
            }
            let exact = dense.forward(&x).unwrap();
            let e_q8 = rel_rms(&built.forward(&x).unwrap(), &exact);
            let e_q8_bf16 = rel_rms(&from_bf16.forward(&x).unwrap(), &exact);
            let xb = x.to_dtype(DType::BF16).unwrap();
            let e_bf16 = rel_rms(&bf16.forward(&xb).unwrap(), &exact);
            assert!(
                e_q8 < Q8_REL_TOL && e_q8_bf16 < Q8_REL_TOL,
                "T={t}: q8 vs f32 {e_q8}, q8 from bf16 {e_q8_bf16} (bf16 vs f32 {e_bf16})"
            );
        }
    }

    #[test]
    fn bytes_read_count_the_chosen_experts() {
        let f = tiny();
        let c = &f.cfg;
        let (h, e, i) = (c.hidden_size, c.num_experts, c.moe_intermediate_size);
        let layer = MoeLayer::new(c, f.moe_weights(DType::F32), None).unwrap();
        // One token reads its top-k experts, the router and the shared expert.
        let expert = (3 * i * h * 4) as u64;
        let want = (e * h * 4) as u64 + (c.num_experts_per_tok as u64 + 1) * expert;
        let x = input(1, h, DType::F32);
        assert_eq!(layer.weight_bytes_read(&x).unwrap(), want);
        // Many tokens read every expert once.
        let x = input(64, h, DType::F32);
        let all = (e * h * 4) as u64 + (e as u64 + 1) * expert;
        assert_eq!(layer.weight_bytes_read(&x).unwrap(), all);
    }

    #[test]
    fn refuses_inputs_and_weights_that_do_not_fit() {
        let f = tiny();
        let h = f.cfg.hidden_size;
        let q8 = MoeLayer::new(&f.cfg, f.moe_weights(DType::BF16), Some(IsqType::Q8)).unwrap();
        let e = q8
            .forward(&input(2, h, DType::BF16))
            .unwrap_err()
            .to_string();
        assert!(e.contains("F32") && e.contains("quantized"), "{e}");
        let e = q8
            .forward(&input(2, h + 1, DType::F32))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("[tokens, {h}]")), "{e}");
        let mut w = f.moe_weights(DType::F32);
        w.experts_down_proj = w.experts_down_proj.narrow(0, 1, 2).unwrap();
        let e = MoeLayer::new(&f.cfg, w, None).unwrap_err().to_string();
        assert!(e.contains("experts_down_proj"), "{e}");
        let mut w = f.moe_weights(DType::F32);
        w.e_score_correction_bias = None;
        let e = MoeLayer::new(&f.cfg, w, None).unwrap_err().to_string();
        assert!(e.contains("e_score_correction_bias"), "{e}");
        let e = MoeLayer::load(&f.weights(DType::BF16), &f.cfg, Some(IsqType::Q8))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--quantize") && e.contains("f32"), "{e}");
    }
}
