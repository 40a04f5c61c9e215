//! `switchyard make-test-model`: a random-weight hy_v3 checkpoint plus a byte-level BPE
//! tokenizer and a ChatML chat template, so everything runs offline.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::loading::parse_dtype;

/// Special tokens of test models: ChatML markers plus an end-of-text token.
const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// The ChatML template shipped with Switchyard.
const CHATML: &str = include_str!("../../models/templates/chatml.jinja");

#[derive(clap::Args, Debug)]
pub struct MakeTestModelArgs {
    /// Preset: tiny (tests) or small (benchmarks).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight dtype: f32, bf16 or fp8 (router and expert bias stay f32; fp8: per-tensor e4m3
    /// projections with weight_scale and input_scale, embeddings and norms bf16).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// MTP layers to add after the decoder layers (`num_nextn_predict_layers`; random weights,
    /// so their drafts are rarely right), for trying `--speculative-config` method `mtp`.
    #[arg(long)]
    mtp_layers: Option<usize>,
}

pub fn run(a: MakeTestModelArgs) -> Result<()> {
    let mut cfg = switchyard_model::presets::preset(&a.preset)?;
    if let Some(n) = a.mtp_layers {
        cfg.num_mtp_layers = n;
    }
    let dtype = match a.dtype.to_ascii_lowercase().as_str() {
        "fp8" | "e4m3" | "f8e4m3" => candle_core::DType::F8E4M3,
        _ => parse_dtype(&a.dtype, &candle_core::Device::Cpu)?,
    };
    let tok = switchyard_engine::tokenizer::build_byte_level_bpe(cfg.vocab_size, SPECIALS)?;
    let eos: Vec<u32> = ["<|endoftext|>", "<|im_end|>"]
        .iter()
        .filter_map(|t| tok.token_to_id(t))
        .collect();
    cfg.eos_token_ids = eos.clone();
    switchyard_model::test_model::write_random_checkpoint(&cfg, &a.out, a.seed, dtype)?;
    let tpath = a.out.join("tokenizer.json");
    tok.save(&tpath, false)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tpath.display()))?;
    let tc = serde_json::json!({
        "eos_token": "<|im_end|>",
        "bos_token": null,
        "chat_template": CHATML,
        "model_max_length": cfg.max_position_embeddings,
    });
    std::fs::write(
        a.out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?,
    )
    .context("writing tokenizer_config.json")?;
    std::fs::write(
        a.out.join("generation_config.json"),
        serde_json::to_string_pretty(&serde_json::json!({"eos_token_id": eos}))?,
    )
    .context("writing generation_config.json")?;
    let (total, active) = cfg.parameter_counts();
    eprintln!(
        "wrote {} test model to {} ({total} parameters, {active} active per token, {:?})",
        a.preset,
        a.out.display(),
        dtype
    );
    Ok(())
}
