//! Built-in model shapes: `tiny` (tests), `small` (benchmarks; the shape `../shared/PEERS.md`
//! measures peers on) and `hy3` (the full Tencent Hy3 shape, for planning).

use crate::config::{GateSettings, LayerKind, ModelConfig, HY3_DEFAULT_ROPE_THETA};
use crate::ModelError;

/// Names accepted by [`preset`].
pub const PRESETS: &[&str] = &["tiny", "small", "hy3"];

/// Hy3's gate: sigmoid scores, selection-only bias, renormalised, × 2.826.
fn hy3_gate() -> GateSettings {
    GateSettings {
        sigmoid: true,
        expert_bias: true,
        renormalize: true,
        scaling: 2.826,
        n_group: 1,
        topk_group: 1,
    }
}

#[allow(clippy::too_many_arguments)]
fn shape(
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    dense: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    experts: usize,
    top_k: usize,
    moe_inter: usize,
    max_pos: usize,
) -> ModelConfig {
    ModelConfig {
        model_type: "hy_v3".into(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        rms_norm_eps: 1e-5,
        rope_theta: HY3_DEFAULT_ROPE_THETA,
        max_position_embeddings: max_pos,
        tie_word_embeddings: false,
        attention_bias: false,
        qk_norm: true,
        layer_kinds: (0..layers)
            .map(|i| {
                if i < dense {
                    LayerKind::Dense
                } else {
                    LayerKind::Moe
                }
            })
            .collect(),
        num_experts: experts,
        num_experts_per_tok: top_k,
        num_shared_experts: 1,
        moe_intermediate_size: moe_inter,
        gate: hy3_gate(),
        moe_fp32_combine: true,
        num_mtp_layers: 0,
        eos_token_ids: vec![],
        bos_token_id: None,
        quantization: None,
    }
}

/// Returns the named preset (`tiny`, `small`, `hy3`).
pub fn preset(name: &str) -> Result<ModelConfig, ModelError> {
    Ok(match name {
        // Small enough for unit tests in debug builds: 4 layers, 8 experts top-2.
        "tiny" => shape(512, 64, 128, 4, 1, 4, 2, 16, 8, 2, 32, 4096),
        // The benchmark shape of ../shared/PEERS.md (633M total, 137M active parameters).
        "small" => shape(32768, 1024, 3328, 8, 1, 16, 2, 64, 64, 8, 384, 32768),
        "hy3" => {
            let mut c = shape(
                120832, 4096, 13312, 80, 1, 64, 8, 128, 192, 8, 1536, 262_144,
            );
            c.num_mtp_layers = 1;
            c
        }
        other => {
            return Err(ModelError::Config {
                field: "preset".into(),
                message: format!(
                    "unknown preset {other:?}; choose one of {}",
                    PRESETS.join(", ")
                ),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn small_matches_the_peer_numbers() {
        let (total, active) = super::preset("small").unwrap().parameter_counts();
        assert_eq!(total, 633_424_320);
        // PEERS.md: 137,447,872 active excluding the embedding lookup.
        assert_eq!(active, 137_447_872);
    }
}
