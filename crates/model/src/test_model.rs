//! Random-weight hy_v3 checkpoints for tests and benchmarks (`switchyard make-test-model`).
//!
//! Weights are drawn from N(0, 0.02) (the shape `../shared/PEERS.md` benchmarks), norm weights
//! near one and the expert bias small but large enough to change expert selection, all from a
//! seeded RNG so the same command always writes the same bytes. Router weights and the expert
//! bias are stored in f32 as in real Hy3 checkpoints; everything else in the requested dtype.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::config::{LayerKind, ModelConfig};
use crate::ModelError;

/// Standard deviation of the random weights (matches the peer benchmark model).
const WEIGHT_STD: f32 = 0.02;

struct Gen {
    rng: rand::rngs::StdRng,
    dtype: DType,
    out: HashMap<String, Tensor>,
}

impl Gen {
    fn normal(
        &mut self,
        name: String,
        shape: &[usize],
        std: f32,
        dtype: DType,
    ) -> Result<(), ModelError> {
        let n: usize = shape.iter().product();
        let d = Normal::new(0.0f32, std).map_err(|e| ModelError::InvalidInput(e.to_string()))?;
        let v: Vec<f32> = (0..n).map(|_| d.sample(&mut self.rng)).collect();
        let t = Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?;
        self.out.insert(name, t);
        Ok(())
    }
    fn w(&mut self, name: String, shape: &[usize]) -> Result<(), ModelError> {
        let dt = self.dtype;
        self.normal(name, shape, WEIGHT_STD, dt)
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
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(ModelError::InvalidInput(format!(
            "test models are f32, bf16 or f16, not {dtype:?}"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let mut g = Gen {
        rng: rand::rngs::StdRng::seed_from_u64(seed),
        dtype,
        out: HashMap::new(),
    };
    let (v, h, hd) = (cfg.vocab_size, cfg.hidden_size, cfg.head_dim);
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    g.w("model.embed_tokens.weight".into(), &[v, h])?;
    for (l, kind) in cfg.layer_kinds.iter().enumerate() {
        let p = format!("model.layers.{l}");
        g.norm(format!("{p}.input_layernorm.weight"), h)?;
        g.norm(format!("{p}.post_attention_layernorm.weight"), h)?;
        g.w(format!("{p}.self_attn.q_proj.weight"), &[nh * hd, h])?;
        g.w(format!("{p}.self_attn.k_proj.weight"), &[nkv * hd, h])?;
        g.w(format!("{p}.self_attn.v_proj.weight"), &[nkv * hd, h])?;
        g.w(format!("{p}.self_attn.o_proj.weight"), &[h, nh * hd])?;
        if cfg.qk_norm {
            g.norm(format!("{p}.self_attn.q_norm.weight"), hd)?;
            g.norm(format!("{p}.self_attn.k_norm.weight"), hd)?;
        }
        match kind {
            LayerKind::Dense => {
                let i = cfg.intermediate_size;
                g.w(format!("{p}.mlp.gate_proj.weight"), &[i, h])?;
                g.w(format!("{p}.mlp.up_proj.weight"), &[i, h])?;
                g.w(format!("{p}.mlp.down_proj.weight"), &[h, i])?;
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
                g.w(format!("{p}.mlp.experts.gate_up_proj"), &[e, 2 * i, h])?;
                g.w(format!("{p}.mlp.experts.down_proj"), &[e, h, i])?;
                let si = i * cfg.num_shared_experts;
                if si > 0 {
                    g.w(format!("{p}.mlp.shared_experts.gate_proj.weight"), &[si, h])?;
                    g.w(format!("{p}.mlp.shared_experts.up_proj.weight"), &[si, h])?;
                    g.w(format!("{p}.mlp.shared_experts.down_proj.weight"), &[h, si])?;
                }
            }
        }
    }
    g.norm("model.norm.weight".into(), h)?;
    if !cfg.tie_word_embeddings {
        g.w("lm_head.weight".into(), &[v, h])?;
    }
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&g.out, &path)?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&cfg.to_hf_json()).expect("config serialises");
    std::fs::write(&cfg_path, text).map_err(|e| ModelError::Io {
        path: cfg_path,
        source: e,
    })?;
    Ok(())
}
