//! `switchyard generate` and `switchyard logits`.

use anyhow::{bail, Context, Result};
use switchyard_engine::engine::GenerateRequest;
use switchyard_engine::sampling::SamplingParams;
use switchyard_engine::structured::OutputConstraint;
use switchyard_model::Logits;

use crate::loading::{self, EngineArgs, ModelArgs};

/// `generate` flags (DESIGN.md contract).
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text.
    #[arg(long, conflicts_with = "input_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    input_ids: Option<Vec<u32>>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Apply the model's chat template to the prompt (as one user message).
    #[arg(long)]
    chat: bool,
    /// Hy3 reasoning effort for the chat template: no_think, low or high.
    #[arg(long)]
    reasoning_effort: Option<String>,
    /// Chat template to use instead of the model's: a Jinja file, or the template text
    /// (vLLM's flag).
    #[arg(long, value_name = "FILE|TEMPLATE")]
    chat_template: Option<String>,
    /// Print `{"generated_ids": [...], "text": "..."}`.
    #[arg(long)]
    json: bool,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Constrain the output to this JSON schema (inline JSON, or @FILE).
    #[arg(long, value_name = "SCHEMA", group = "structured")]
    json_schema: Option<String>,
    /// Constrain the output to match this regular expression.
    #[arg(long, value_name = "REGEX", group = "structured")]
    regex: Option<String>,
    /// Constrain the output to this Lark grammar (llguidance's dialect; inline or @FILE).
    #[arg(long, value_name = "LARK", group = "structured")]
    grammar: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Inline text, or the contents of the file after `@`.
fn inline_or_file(flag: &str, v: &str) -> Result<String> {
    match v.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("{flag} {v}")),
        None => Ok(v.to_string()),
    }
}

/// The structured-output constraint the flags ask for.
fn output_constraint(a: &GenerateArgs) -> Result<Option<(OutputConstraint, &'static str)>> {
    if let Some(s) = &a.json_schema {
        let text = inline_or_file("--json-schema", s)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("--json-schema is not JSON: {text:.80}"))?;
        return Ok(Some((OutputConstraint::JsonSchema(v), "--json-schema")));
    }
    if let Some(r) = &a.regex {
        return Ok(Some((OutputConstraint::Regex(r.clone()), "--regex")));
    }
    if let Some(g) = &a.grammar {
        let text = inline_or_file("--grammar", g)?;
        return Ok(Some((OutputConstraint::Grammar(text), "--grammar")));
    }
    Ok(None)
}

/// `logits` flags.
#[derive(clap::Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    input_ids: Vec<u32>,
    /// Output safetensors file (tensor `logits`, f32 `[T, vocab]`).
    #[arg(long)]
    out: std::path::PathBuf,
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let output = output_constraint(&a)?;
    let (engine, dir) = loading::start_engine(&a.model, &a.engine)?;
    let constraint = output
        .map(|(c, flag)| {
            engine
                .compile_constraint(&c)
                .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
        })
        .transpose()?;
    let tok = engine.info().tokenizer.clone();
    let prompt = match (&a.prompt, &a.input_ids) {
        (Some(p), _) => loading::encode_prompt(
            &tok,
            &dir,
            p,
            a.chat,
            a.reasoning_effort.as_deref(),
            a.chat_template.as_deref(),
        )?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --prompt TEXT or --input-ids 1,2,3"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty: give some text or at least one token id");
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        ..SamplingParams::greedy()
    };
    let req = GenerateRequest {
        sampling,
        ignore_eos: a.ignore_eos,
        constraint,
        ..GenerateRequest::greedy(prompt, a.max_tokens)
    };
    let (ids, text, _c) = engine.generate_blocking(req).map_err(anyhow::Error::msg)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"generated_ids": ids, "text": text})
        );
    } else {
        println!("{text}");
    }
    Ok(())
}

pub fn run_logits(a: LogitsArgs) -> Result<()> {
    let l = loading::load(&a.model)?;
    let vocab = l.model().config().vocab_size;
    let logits = if l.ranks.len() == 1 {
        let mut cache = l.model().new_cache();
        l.model().forward(&a.input_ids, &mut cache, Logits::All)?
    } else {
        // Every rank runs the same ids; rank 0's gathered logits are the output.
        let g = switchyard_engine::parallel::RankGroup::start(l.ranks, None)
            .map_err(anyhow::Error::msg)?;
        g.forward_fresh(&a.input_ids, Logits::All)
            .map_err(anyhow::Error::msg)?
    };
    let map = std::collections::HashMap::from([("logits".to_string(), logits)]);
    candle_core::safetensors::save(&map, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote logits [{}, {}] to {}",
        a.input_ids.len(),
        vocab,
        a.out.display()
    );
    Ok(())
}
