//! Random-weight hy_v3 checkpoints for tests and benchmarks (`switchyard make-test-model`).
//!
//! Weights are drawn from N(0, 0.02) (the shape `../shared/PEERS.md` benchmarks), norm weights
//! near one and the expert bias small but large enough to change expert selection, all from a
//! seeded RNG so the same command always writes the same bytes. Router weights and the expert
//! bias are stored in f32 as in real Hy3 checkpoints; everything else in the requested dtype.
//!
//! `DType::F8E4M3` writes an FP8 checkpoint in the form of Hy3's FP8 release: every projection
//! matrix per tensor in e4m3 (`scale = amax / 448`) with f32 `weight_scale` and `input_scale`,
//! routed experts as per-expert tensors (`mlp.experts.{j}.gate_proj.weight`, ...), embeddings,
//! lm_head and norms in bf16, and `quantization_config` in `config.json`. The random draws are
//! the same as for the other dtypes, so an FP8 model is the bf16 model of the same seed, quantized.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::config::{ActivationScheme, LayerKind, ModelConfig, Quantization, WeightScales};
use crate::ModelError;

/// Standard deviation of the random weights (matches the peer benchmark model).
const WEIGHT_STD: f32 = 0.02;
/// Largest finite e4m3 value: per-tensor FP8 scales are `amax / E4M3_MAX`.
const E4M3_MAX: f32 = 448.0;
/// `input_scale` of FP8 test models: amax 4.48 over 448. Random models have no calibration
/// data, and the loader only validates this value (activations are not quantized).
const TEST_INPUT_SCALE: f32 = 0.01;

struct Gen {
    rng: rand::rngs::StdRng,
    /// dtype of embeddings, lm_head and norms (bf16 for FP8 checkpoints).
    dtype: DType,
    /// Store projection matrices as e4m3 with scales.
    fp8: bool,
    out: HashMap<String, Tensor>,
}

impl Gen {
    fn draw(&mut self, shape: &[usize], std: f32) -> Result<Tensor, ModelError> {
        let n: usize = shape.iter().product();
        let d = Normal::new(0.0f32, std).map_err(|e| ModelError::InvalidInput(e.to_string()))?;
        let v: Vec<f32> = (0..n).map(|_| d.sample(&mut self.rng)).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
    fn normal(
        &mut self,
        name: String,
        shape: &[usize],
        std: f32,
        dtype: DType,
    ) -> Result<(), ModelError> {
        let t = self.draw(shape, std)?.to_dtype(dtype)?;
        self.out.insert(name, t);
        Ok(())
    }
    fn w(&mut self, name: String, shape: &[usize]) -> Result<(), ModelError> {
        let dt = self.dtype;
        self.normal(name, shape, WEIGHT_STD, dt)
    }
    /// A projection matrix `<prefix>.weight`.
    fn proj(&mut self, prefix: String, shape: &[usize]) -> Result<(), ModelError> {
        let t = self.draw(shape, WEIGHT_STD)?;
        self.put_proj(prefix, t)
    }
    /// Stores the f32 matrix `t` as `<prefix>.weight`: in e4m3 with its scales for FP8.
    fn put_proj(&mut self, prefix: String, t: Tensor) -> Result<(), ModelError> {
        if !self.fp8 {
            self.out
                .insert(format!("{prefix}.weight"), t.to_dtype(self.dtype)?);
            return Ok(());
        }
        let amax = t.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
        let q = t
            .broadcast_div(&Tensor::new(scale, &Device::Cpu)?)?
            .to_dtype(DType::F8E4M3)?;
        self.out.insert(format!("{prefix}.weight"), q);
        self.out.insert(
            format!("{prefix}.weight_scale"),
            Tensor::new(scale, &Device::Cpu)?,
        );
        self.out.insert(
            format!("{prefix}.input_scale"),
            Tensor::new(TEST_INPUT_SCALE, &Device::Cpu)?,
        );
        Ok(())
    }
    /// One decoder layer's tensors under `p` (`model.layers.{l}`).
    fn layer(&mut self, cfg: &ModelConfig, p: &str, kind: LayerKind) -> Result<(), ModelError> {
        let g = self;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        g.norm(format!("{p}.input_layernorm.weight"), h)?;
        g.norm(format!("{p}.post_attention_layernorm.weight"), h)?;
        g.proj(format!("{p}.self_attn.q_proj"), &[nh * hd, h])?;
        g.proj(format!("{p}.self_attn.k_proj"), &[nkv * hd, h])?;
        g.proj(format!("{p}.self_attn.v_proj"), &[nkv * hd, h])?;
        g.proj(format!("{p}.self_attn.o_proj"), &[h, nh * hd])?;
        if cfg.qk_norm {
            g.norm(format!("{p}.self_attn.q_norm.weight"), hd)?;
            g.norm(format!("{p}.self_attn.k_norm.weight"), hd)?;
        }
        match kind {
            LayerKind::Dense => {
                let i = cfg.intermediate_size;
                g.proj(format!("{p}.mlp.gate_proj"), &[i, h])?;
                g.proj(format!("{p}.mlp.up_proj"), &[i, h])?;
                g.proj(format!("{p}.mlp.down_proj"), &[h, i])?;
            }
            LayerKind::Moe => {
                let (e, i) = (cfg.num_experts, cfg.moe_intermediate_size);
                g.normal(
                    format!("{p}.mlp.gate.weight"),
                    &[e, h],
                    WEIGHT_STD,
                    DType::F32,
                )?;
                if cfg.gate.expert_bias {
                    // Sigmoid scores of N(0,0.02) weights sit near 0.5 ± 0.01: a bias of this
                    // size reorders the choice for many tokens, as trained biases do.
                    g.normal(
                        format!("{p}.mlp.e_score_correction_bias"),
                        &[e],
                        0.01,
                        DType::F32,
                    )?;
                }
                if g.fp8 {
                    // Per-expert tensors with a scale each, as Hy3's FP8 release stores them.
                    let gate_up = g.draw(&[e, 2 * i, h], WEIGHT_STD)?;
                    let down = g.draw(&[e, h, i], WEIGHT_STD)?;
                    for j in 0..e {
                        let x = format!("{p}.mlp.experts.{j}");
                        let gu = gate_up.get(j)?;
                        g.put_proj(format!("{x}.gate_proj"), gu.narrow(0, 0, i)?)?;
                        g.put_proj(format!("{x}.up_proj"), gu.narrow(0, i, i)?)?;
                        g.put_proj(format!("{x}.down_proj"), down.get(j)?)?;
                    }
                } else {
                    g.w(format!("{p}.mlp.experts.gate_up_proj"), &[e, 2 * i, h])?;
                    g.w(format!("{p}.mlp.experts.down_proj"), &[e, h, i])?;
                }
                let si = i * cfg.num_shared_experts;
                if si > 0 {
                    g.proj(format!("{p}.mlp.shared_experts.gate_proj"), &[si, h])?;
                    g.proj(format!("{p}.mlp.shared_experts.up_proj"), &[si, h])?;
                    g.proj(format!("{p}.mlp.shared_experts.down_proj"), &[h, si])?;
                }
            }
        }
        Ok(())
    }
    fn norm(&mut self, name: String, n: usize) -> Result<(), ModelError> {
        let v: Vec<f32> = (0..n)
            .map(|_| 1.0 + self.rng.random_range(-0.1..0.1))
            .collect();
        let t = Tensor::from_vec(v, n, &Device::Cpu)?.to_dtype(self.dtype)?;
        self.out.insert(name, t);
        Ok(())
    }
}

/// Writes `config.json` and `model.safetensors` for `cfg` with random weights into `dir`.
pub fn write_random_checkpoint(
    cfg: &ModelConfig,
    dir: &Path,
    seed: u64,
    dtype: DType,
) -> Result<(), ModelError> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F8E4M3) {
        return Err(ModelError::InvalidInput(format!(
            "test models are f32, bf16, f16 or fp8 (e4m3), not {dtype:?}"
        )));
    }
    let fp8 = dtype == DType::F8E4M3;
    std::fs::create_dir_all(dir).map_err(|e| ModelError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let mut g = Gen {
        rng: rand::rngs::StdRng::seed_from_u64(seed),
        dtype: if fp8 { DType::BF16 } else { dtype },
        fp8,
        out: HashMap::new(),
    };
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    g.w("model.embed_tokens.weight".into(), &[v, h])?;
    for (l, kind) in cfg.layer_kinds.iter().enumerate() {
        g.layer(cfg, &format!("model.layers.{l}"), *kind)?;
    }
    g.norm("model.norm.weight".into(), h)?;
    if !cfg.tie_word_embeddings {
        g.w("lm_head.weight".into(), &[v, h])?;
    }
    // MTP layers last, so a config with them draws the same main weights as one without.
    let kind = cfg.layer_kinds.last().copied().unwrap_or(LayerKind::Moe);
    for l in cfg.num_hidden_layers..cfg.num_hidden_layers + cfg.num_mtp_layers {
        let p = format!("model.layers.{l}");
        for n in ["enorm", "hnorm", "final_layernorm"] {
            g.norm(format!("{p}.{n}.weight"), h)?;
        }
        g.proj(format!("{p}.eh_proj"), &[h, 2 * h])?;
        g.layer(cfg, &p, kind)?;
    }
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&g.out, &path)?;
    let cfg_path = dir.join("config.json");
    let mut cfg = cfg.clone();
    if fp8 {
        cfg.quantization = Some(Quantization::Fp8 {
            activation_scheme: ActivationScheme::Static,
            not_converted: vec!["lm_head".into()],
            weight_scales: WeightScales::PerTensor,
        });
    }
    let text = serde_json::to_string_pretty(&cfg.to_hf_json()).expect("config serialises");
    std::fs::write(&cfg_path, text).map_err(|e| ModelError::Io {
        path: cfg_path,
        source: e,
    })?;
    Ok(())
}
