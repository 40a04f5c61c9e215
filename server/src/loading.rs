//! Model loading shared by every subcommand: resolve `--model` (folder or hub id), parse the
//! config, open the checkpoint, build the layers with a progress bar (indicatif on a terminal,
//! log lines otherwise), load the tokenizer, and start the engine.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use switchyard_engine::engine::{EngineConfig, EngineHandle};
use switchyard_engine::parallel::load_ranks;
#[cfg(doc)]
use switchyard_engine::parallel::RankGroup;
use switchyard_engine::scheduler::{SchedulerConfig, SchedulingPolicy};
use switchyard_engine::speculative::SpeculativeConfig;
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_model::{
    Checkpoint, DeviceSpec, HyV3Model, IsqType, KvDtype, LoadOptions, ModelConfig,
};

/// Where the model comes from and how to compute.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder (config.json, *.safetensors, tokenizer.json) or hub id `owner/name`.
    #[arg(long)]
    pub model: String,
    /// Hub revision (branch, tag or commit) when `--model` is a hub id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Compute dtype: f32, bf16 or f16; `auto` is f32 on the CPU (exact) and bf16 on a GPU
    /// (what the CUDA expert kernels run).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Where to run: `cpu`, `cuda`, `cuda:N`, or `auto` (the first GPU when this build has CUDA
    /// and one answers, otherwise the CPU).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Ranks to split the model over (vLLM's flag; alias `-tp`): attention and dense MLPs
    /// tensor parallel, routed experts expert parallel, as `switchyard plan` lays them out.
    /// On the CPU the ranks are threads of this process sharing its cores: useful to verify
    /// the sharded execution, not faster. On a GPU only 1 is supported for now.
    #[arg(long = "tensor-parallel-size", default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// Quantize the weights while loading (in-situ quantization; alias `--isq`): `q8` (or
    /// `q8_0`) stores every projection as int8 with an f32 scale per 64 inputs, about half of
    /// bf16's bytes; `q4` (or `q4_1`) as 4-bit values with an f16 step and minimum per 32
    /// inputs (llama.cpp's Q4_1 grid), under a third of bf16's bytes, with the lm_head at q8.
    /// Both compute in f32; `--dtype` then sets what stays dense (the embedding). CPU only.
    #[arg(long, visible_alias = "isq", value_name = "TYPE")]
    pub quantize: Option<IsqType>,
}

/// vLLM's short form of `--tensor-parallel-size`: `-tp N` or `-tp=N` (clap's short flags are
/// one letter, so the argument list is rewritten before parsing).
pub fn expand_tp_alias(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.map(|a| match a.to_str() {
        Some("-tp") => "--tensor-parallel-size".into(),
        Some(s) if s.starts_with("-tp=") => format!("--tensor-parallel-size={}", &s[4..]).into(),
        _ => a,
    })
    .collect()
}

/// Engine sizing (vLLM's flag names).
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// Longest prompt + completion (default: the model's context, capped at 32768 on CPU).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Token budget of one engine step (decodes + prefill chunks).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Bytes of KV cache (accepts suffixes: 512MiB, 2GiB); default: a quarter of free memory.
    #[arg(long)]
    pub kv_cache_memory: Option<String>,
    /// KV cache dtype: f32, bf16, fp8 (E4M3, unit scale; also `fp8_e4m3`), or `auto`
    /// (vLLM's default): f32 when the model computes exactly in f32 (`--dtype f32`, the CPU's
    /// `--dtype auto`, no `--quantize`), bf16 otherwise (half the memory and the attention
    /// bytes of f32). fp8 halves bf16's again. Also spelled `--kv-cache-dtype`, as in vLLM.
    #[arg(long, visible_alias = "kv-cache-dtype", default_value = "auto")]
    pub kv_dtype: String,
    /// Share of the GPU's memory to use for the weights and the KV cache together (vLLM's
    /// flag, default 0.9): without --kv-cache-memory, the KV cache gets what this leaves after
    /// loading the model. No effect on the CPU, whose KV cache --kv-cache-memory sizes.
    #[arg(long, value_name = "FRACTION")]
    pub gpu_memory_utilization: Option<f64>,
    /// Disable prefix caching (also vLLM's `--no-enable-prefix-caching`).
    #[arg(long, visible_alias = "no-enable-prefix-caching")]
    pub no_prefix_caching: bool,
    /// Prefix caching on, the default (vLLM's flag).
    #[arg(long, conflicts_with = "no_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Disable chunked prefill (also vLLM's `--no-enable-chunked-prefill`).
    #[arg(long, visible_alias = "no-enable-chunked-prefill")]
    pub no_chunked_prefill: bool,
    /// Chunked prefill on, the default (vLLM's flag).
    #[arg(long, conflicts_with = "no_chunked_prefill")]
    pub enable_chunked_prefill: bool,
    /// Most requests queued before new ones get HTTP 429.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Speculative decoding, as vLLM's JSON: `{"method": "ngram", "num_speculative_tokens": 4,
    /// "prompt_lookup_min": 2, "prompt_lookup_max": 4}` (prompt lookup: drafts copied from
    /// earlier in the sequence, checked by the model in one step), or `{"method": "mtp",
    /// "num_speculative_tokens": 1}` (the checkpoint's MTP layer drafts the token after next;
    /// the layer is loaded for it).
    #[arg(long, value_name = "JSON")]
    pub speculative_config: Option<String>,
    /// Order requests are served in (vLLM's flag): `fcfs` (arrival order; a request `priority`
    /// other than 0 is refused) or `priority` (lower `priority` first, ties by arrival; a
    /// waiting request preempts running ones it outranks when the KV cache or --max-num-seqs
    /// is full).
    #[arg(long, default_value = "fcfs", value_name = "fcfs|priority")]
    pub scheduling_policy: SchedulingPolicy,
}

/// CPU-default cap on the context when the user gives none: a 256K default would size the KV
/// cache for sequences nobody runs on a laptop.
const DEFAULT_MAX_MODEL_LEN_CAP: usize = 32768;

/// Parses `f32` / `bf16` / `f16`, or `auto`: bf16 on a GPU, f32 elsewhere.
pub fn parse_dtype(s: &str, device: &Device) -> Result<DType> {
    match s {
        "auto" if device.is_cuda() => Ok(DType::BF16),
        "auto" => Ok(DType::F32),
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        o => anyhow::bail!("unknown --dtype {o:?}; use auto, f32, bf16 or f16"),
    }
}

/// Parses byte sizes such as `1073741824`, `512MiB`, `2GiB`, `1.5GB`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("invalid size {s:?}"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1048576.0,
        "g" | "gb" => 1e9,
        "gib" => 1073741824.0,
        "t" | "tb" => 1e12,
        "tib" => 1099511627776.0,
        u => anyhow::bail!("unknown size unit {u:?} in {s:?}"),
    };
    Ok((n * mult) as u64)
}

/// A loaded model with its tokenizer and folder.
pub struct Loaded {
    /// The model: one entry, or the ranks of `--tensor-parallel-size N` in rank order (each
    /// holding only its slices; run them with the engine or [`RankGroup`]).
    pub ranks: Vec<HyV3Model>,
    /// Its tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The model folder.
    pub dir: PathBuf,
}

impl Loaded {
    /// The model (rank 0 of a split).
    pub fn model(&self) -> &HyV3Model {
        &self.ranks[0]
    }

    /// Bytes of weights every rank holds together (quantized weights at their real size).
    pub fn weight_bytes(&self) -> u64 {
        self.ranks.iter().map(HyV3Model::weight_bytes).sum()
    }
}

/// Resolves and loads the model and tokenizer (without its MTP layer: [`load_for`] loads it
/// when the engine's speculative decoding asks for it).
pub fn load(args: &ModelArgs) -> Result<Loaded> {
    load_with(args, false)
}

/// [`load`] for an engine run with `engine`'s flags: with the MTP layer when
/// `--speculative-config` names method `mtp`.
pub fn load_for(args: &ModelArgs, engine: &EngineArgs) -> Result<Loaded> {
    let mtp = engine
        .speculative_config
        .as_deref()
        .map(SpeculativeConfig::parse_json)
        .transpose()?
        .is_some_and(|c| c.uses_mtp());
    load_with(args, mtp)
}

fn load_with(args: &ModelArgs, load_mtp: bool) -> Result<Loaded> {
    let tp = args.tensor_parallel_size;
    if tp == 0 {
        anyhow::bail!("--tensor-parallel-size must be at least 1");
    }
    let device = DeviceSpec::parse(&args.device)?.open()?;
    let dtype = parse_dtype(&args.dtype, &device)?;
    let dir = switchyard_model::resolve_model(&args.model, args.revision.as_deref())?;
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    if load_mtp && cfg.num_mtp_layers == 0 {
        anyhow::bail!(
            "--speculative-config method \"mtp\": {} has no MTP layer (config.json's \
             num_nextn_predict_layers is 0); use method \"ngram\" or a checkpoint with one",
            dir.display()
        );
    }
    if load_mtp && tp > 1 {
        anyhow::bail!(
            "--speculative-config method \"mtp\" runs on one rank; it cannot be combined with \
             --tensor-parallel-size {tp}"
        );
    }
    if device.is_cpu() {
        check_host_memory(&cfg, dtype, args.quantize, tp)?;
    }
    let ckpt = Arc::new(Checkpoint::open(&dir)?.with_weight_block(cfg.weight_block()));
    let total = cfg.num_hidden_layers * tp;
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "loading {msg} [{bar:40}] {pos}/{len} layers ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(dir.display().to_string());
        b
    });
    let t0 = std::time::Instant::now();
    let opts = LoadOptions {
        dtype,
        device: device.clone(),
        load_mtp,
        quantize: args.quantize,
    };
    let log_every = (total / 10).max(1);
    if tp > 1 {
        tracing::info!(
            ranks = tp,
            "tensor parallel: {tp} ranks on {}",
            if device.is_cpu() {
                "threads sharing the CPU (verifies the sharded execution; not faster)"
            } else {
                "the device"
            }
        );
    }
    let ranks = load_ranks(&cfg, ckpt, &opts, tp, |done, total| match &bar {
        Some(b) => b.set_position(done as u64),
        None => {
            if done % log_every == 0 || done == total {
                tracing::info!("loaded {done}/{total} layers");
            }
        }
    })
    .with_context(|| format!("loading the model from {}", dir.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let (params, active) = cfg.parameter_counts();
    let weight_bytes: u64 = ranks.iter().map(HyV3Model::weight_bytes).sum();
    tracing::info!(
        dir = %dir.display(),
        params,
        active,
        weights = format!("{:.1} MiB", weight_bytes as f64 / (1u64 << 20) as f64),
        quantize = args.quantize.map_or("none", IsqType::name),
        checkpoint = cfg
            .quantization
            .as_ref()
            .map_or_else(|| "unquantized".to_string(), |q| {
                format!("{} (dequantized to {dtype:?} at load)", q.describe())
            }),
        secs = t0.elapsed().as_secs_f32(),
        "model loaded"
    );
    let tokenizer = Arc::new(
        Tokenizer::from_dir(&dir)
            .with_context(|| format!("loading the tokenizer from {}", dir.display()))?,
    );
    Ok(Loaded {
        ranks,
        tokenizer,
        dir,
    })
}

/// Refuses, before a weight is read, to load more weights into host memory than it has
/// available: the loader copies every weight into memory (and `--quantize` keeps only the
/// quantized copy), so a model that does not fit would otherwise swap or be killed by the
/// kernel partway through a long load. The bytes are `switchyard plan --device cpu`'s, exact for
/// the formats the loader holds (see `switchyard_model::plan`).
fn check_host_memory(
    cfg: &ModelConfig,
    dtype: candle_core::DType,
    quantize: Option<IsqType>,
    tp: usize,
) -> Result<()> {
    use switchyard_model::plan::{smaller_formats, weight_bytes, WeightFormat};
    let format = WeightFormat::held(dtype, quantize);
    // A split the model cannot take is the loader's to refuse, naming the config field.
    let Ok(need) = weight_bytes(cfg, format, tp) else {
        return Ok(());
    };
    let available = switchyard_engine::engine::available_memory() as u64;
    if need > available {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        anyhow::bail!(
            "the model's weights need {:.1} GiB of memory as {} ({}), more than the {:.1} GiB \
             this machine has available (MemAvailable); {} (`switchyard plan --device cpu` \
             shows the budget)",
            gib(need),
            format.name(),
            match quantize {
                Some(q) => format!("--quantize {q}"),
                None => format!("--dtype {}", dtype.as_str()),
            },
            gib(available),
            smaller_formats(cfg, format, available),
        );
    }
    Ok(())
}

/// The chat template to serve with: `--chat-template` (a file, or the template itself, as
/// vLLM's flag takes it) or else the model's own, with the tokenizer's special tokens.
pub fn chat_template(
    tok: &Tokenizer,
    dir: &std::path::Path,
    flag: Option<&str>,
) -> Result<switchyard_engine::chat::ChatTemplate> {
    use switchyard_engine::chat::ChatTemplate;
    let t = match flag {
        None => ChatTemplate::from_model_dir(dir)
            .with_context(|| format!("loading the chat template of {}", dir.display()))?,
        Some(v) => {
            let path = std::path::Path::new(v);
            if path.is_file() {
                let source = std::fs::read_to_string(path)
                    .with_context(|| format!("--chat-template: reading {}", path.display()))?;
                ChatTemplate::new(&source, path.display().to_string())
                    .with_context(|| format!("--chat-template {}", path.display()))?
            } else if v.contains("{{") || v.contains("{%") {
                ChatTemplate::new(v, "--chat-template").context("--chat-template")?
            } else {
                anyhow::bail!("--chat-template {v:?}: no such file, and not a Jinja template either (give a path or the template text)");
            }
        }
    };
    Ok(t.with_special_tokens(
        tok.bos_token().map(String::from),
        tok.eos_token().map(String::from),
    ))
}

/// Token ids of a text prompt: with `chat`, the chat template applied to it as one user
/// message (and `reasoning_effort` passed to the template); otherwise the text as is, with the
/// tokenizer's BOS where it adds one.
pub fn encode_prompt(
    tok: &Tokenizer,
    dir: &std::path::Path,
    text: &str,
    chat: bool,
    reasoning_effort: Option<&str>,
    chat_template_flag: Option<&str>,
) -> Result<Vec<u32>> {
    if !chat {
        return Ok(tok.encode(text, true)?);
    }
    use switchyard_engine::chat::{ChatMessage, RenderOptions};
    let t = chat_template(tok, dir, chat_template_flag)?;
    let mut opts = RenderOptions::generation();
    if let Some(r) = reasoning_effort {
        opts = opts.with_kwarg("reasoning_effort", r.to_string());
    }
    let rendered = t.render(&[ChatMessage::user(text)], &opts)?;
    Ok(tok.encode(&rendered, false)?)
}

/// Engine configuration from the flags and the model (`exact`: it computes in f32 with dense
/// weights, which `--kv-dtype auto` keeps exact).
pub fn engine_config(args: &EngineArgs, model: &ModelConfig, exact: bool) -> Result<EngineConfig> {
    let max_model_len = args
        .max_model_len
        .unwrap_or(model.max_position_embeddings.min(DEFAULT_MAX_MODEL_LEN_CAP));
    if max_model_len > model.max_position_embeddings {
        anyhow::bail!(
            "--max-model-len {max_model_len} exceeds the model's context of {} tokens",
            model.max_position_embeddings
        );
    }
    if args.block_size == 0 || args.max_num_seqs == 0 || args.max_num_batched_tokens == 0 {
        anyhow::bail!("--block-size, --max-num-seqs and --max-num-batched-tokens must be positive");
    }
    let gpu_memory_utilization = match args.gpu_memory_utilization {
        None => switchyard_model::plan::DEFAULT_GPU_MEMORY_UTILIZATION,
        Some(u) if u > 0.0 && u <= 1.0 => u,
        Some(u) => anyhow::bail!("--gpu-memory-utilization {u}: must be above 0 and at most 1"),
    };
    Ok(EngineConfig {
        scheduler: SchedulerConfig {
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: args.max_num_batched_tokens,
            max_model_len,
            chunked_prefill: !args.no_chunked_prefill,
            max_waiting: args.max_waiting,
            policy: args.scheduling_policy,
        },
        block_size: args.block_size,
        gpu_memory_utilization,
        kv_cache_memory: args
            .kv_cache_memory
            .as_deref()
            .map(parse_bytes)
            .transpose()?,
        kv_dtype: match args.kv_dtype.as_str() {
            "auto" if exact => KvDtype::F32,
            "auto" => KvDtype::Bf16,
            o => KvDtype::from_name(o).ok_or_else(|| {
                anyhow::anyhow!("unknown --kv-dtype {o:?}; use auto, f32, bf16 or fp8")
            })?,
        },
        prefix_caching: !args.no_prefix_caching,
        speculative: args
            .speculative_config
            .as_deref()
            .map(SpeculativeConfig::parse_json)
            .transpose()?,
    })
}

/// Loads the model and starts the engine.
pub fn start_engine(m: &ModelArgs, e: &EngineArgs) -> Result<(EngineHandle, PathBuf)> {
    let l = load_for(m, e)?;
    let dir = l.dir.clone();
    Ok((start_loaded(l, e)?, dir))
}

/// Starts the engine on a loaded model.
pub fn start_loaded(l: Loaded, e: &EngineArgs) -> Result<EngineHandle> {
    let m = l.model();
    let exact = m.dtype() == DType::F32 && m.quantization().is_none();
    let cfg = engine_config(e, m.config(), exact)?;
    if e.gpu_memory_utilization.is_some() && m.device().is_cpu() {
        tracing::info!(
            "--gpu-memory-utilization has no effect on the CPU; --kv-cache-memory sizes the KV \
             cache there"
        );
    }
    EngineHandle::start(l.ranks, l.tokenizer, cfg).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_sizes() {
        assert_eq!(super::parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(super::parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(super::parse_bytes("1000").unwrap(), 1000);
        assert!(super::parse_bytes("12 parsecs").is_err());
    }
}
