//! `switchyard plan`: how a model splits across N GPUs before anything is loaded — weights per
//! device by part, activation buffers, the KV cache left over and how many tokens it holds,
//! and whether a `--max-context` sequence fits (and why not). With `--device cpu` the same for
//! the CPU tier: the weights in host memory (`--weights q8|q4` for `--quantize`) and the KV
//! cache the server sizes by default. Reads only the model's config; the arithmetic is
//! `switchyard_model::plan`.

use anyhow::{Context, Result};
use switchyard_model::plan::{
    plan, KvFormat, MemoryPlan, PlanDevice, PlanRequest, WeightFormat,
    DEFAULT_GPU_MEMORY_UTILIZATION,
};
use switchyard_model::ModelConfig;

use crate::loading::parse_bytes;

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// Model folder, config.json, or hub id `owner/name` (only config.json is fetched).
    #[arg(long, required_unless_present = "preset", conflicts_with = "preset")]
    model: Option<String>,
    /// A built-in shape instead of a model: tiny, small or hy3.
    #[arg(long)]
    preset: Option<String>,
    /// Hub revision when `--model` is a hub id.
    #[arg(long)]
    revision: Option<String>,
    /// Where the model runs: `cuda` (GPUs) or `cpu` (the host's memory).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// GPUs (tensor parallel attention and MLPs, expert parallel routed experts).
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    /// Memory of each GPU (80GiB for an H100, 141GB for an H200) [default: 80GiB].
    #[arg(long)]
    gpu_memory: Option<String>,
    /// Share of each GPU's memory to use; the rest is left to CUDA, cuBLAS and NCCL
    /// [default: 0.9].
    #[arg(long)]
    gpu_memory_utilization: Option<f64>,
    /// Host memory the CPU tier may use (`--device cpu`) [default: this machine's available
    /// memory, /proc/meminfo's MemAvailable, as `serve` sees it when it loads].
    #[arg(long)]
    memory: Option<String>,
    /// Weight format: bf16, fp8 or f32; with `--device cpu` also q8 or q4 (what `--quantize`
    /// holds).
    #[arg(long, default_value = "bf16")]
    weights: String,
    /// KV cache dtype: bf16, fp8 or f32 (also spelled `--kv-cache-dtype`, as in vLLM).
    #[arg(long, visible_alias = "kv-cache-dtype", default_value = "bf16")]
    kv_dtype: String,
    /// Longest sequence that must fit (default: the model's context length).
    #[arg(long)]
    max_context: Option<usize>,
    /// Sequences decoded together (sizes the logits buffer).
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Tokens in one engine step (sizes the activation buffers).
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Also hold the MTP layers (for speculative decoding).
    #[arg(long)]
    with_mtp: bool,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: PlanArgs) -> Result<()> {
    let (name, cfg) = match (&a.model, &a.preset) {
        (_, Some(p)) => (format!("preset {p}"), switchyard_model::presets::preset(p)?),
        (Some(m), None) => {
            let path = switchyard_model::resolve_config(m, a.revision.as_deref())?;
            let cfg = ModelConfig::from_file(&path)?;
            (path.display().to_string(), cfg)
        }
        (None, None) => anyhow::bail!("give --model M or --preset NAME"),
    };
    let device = PlanDevice::parse(&a.device)?;
    let (memory_bytes, memory_utilization) = match device {
        PlanDevice::Cuda => {
            if a.memory.is_some() {
                anyhow::bail!(
                    "--memory: is the host memory of --device cpu; for GPUs give --gpu-memory"
                );
            }
            let m = a.gpu_memory.as_deref().unwrap_or("80GiB");
            (
                parse_bytes(m).context("--gpu-memory")?,
                a.gpu_memory_utilization
                    .unwrap_or(DEFAULT_GPU_MEMORY_UTILIZATION),
            )
        }
        PlanDevice::Cpu => {
            for (given, flag) in [
                (a.gpu_memory.is_some(), "--gpu-memory"),
                (
                    a.gpu_memory_utilization.is_some(),
                    "--gpu-memory-utilization",
                ),
            ] {
                if given {
                    anyhow::bail!("{flag}: not used with --device cpu (give --memory)");
                }
            }
            let m = match &a.memory {
                Some(m) => parse_bytes(m).context("--memory")?,
                None => switchyard_engine::engine::available_memory() as u64,
            };
            (m, 1.0)
        }
    };
    let req = PlanRequest {
        device,
        gpus: a.gpus,
        memory_bytes,
        memory_utilization,
        weights: WeightFormat::parse(&a.weights)?,
        kv: KvFormat::parse(&a.kv_dtype)?,
        max_context: a.max_context.unwrap_or(cfg.max_position_embeddings),
        max_num_seqs: a.max_num_seqs,
        max_num_batched_tokens: a.max_num_batched_tokens,
        block_size: a.block_size,
        with_mtp: a.with_mtp,
    };
    let p = plan(&cfg, &req)?;
    if a.json {
        let mut v = serde_json::to_value(&p)?;
        v["model"] = serde_json::Value::String(name);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&name, &p));
    }
    Ok(())
}

fn gib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 30) as f64)
}

/// The plan as a table a person reads.
fn render(name: &str, p: &MemoryPlan) -> String {
    let mut s = format!(
        "{name}: {:.1}B parameters ({:.1}B active per token), {} GiB of {} weights\n",
        p.parameters_total as f64 / 1e9,
        p.parameters_active as f64 / 1e9,
        gib(p.weights_total_bytes),
        p.weights_format.name(),
    );
    s += &match p.device {
        PlanDevice::Cuda => format!(
            "{} GPU(s) × {} GiB at {:.2} → {} GiB usable each; KV {:?}: {} KiB per token ({} \
             KiB per GPU)\n\n",
            p.gpus,
            gib(p.memory_bytes),
            p.memory_utilization,
            gib(p.usable_bytes_per_device),
            p.kv_dtype,
            p.kv_bytes_per_token as f64 / 1024.0,
            p.kv_bytes_per_token_per_device as f64 / 1024.0,
        ),
        PlanDevice::Cpu => format!(
            "CPU with {} GiB of memory; the KV cache gets 1/{} of what the weights leave; KV \
             {:?}: {} KiB per token\n\n",
            gib(p.memory_bytes),
            switchyard_model::plan::DEFAULT_KV_SHARE_OF_HOST_MEMORY,
            p.kv_dtype,
            p.kv_bytes_per_token as f64 / 1024.0,
        ),
    };
    s += &format!(
        "{:>3} {:>5} {:>3} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9} {:>11}\n",
        if p.device == PlanDevice::Cpu {
            "cpu"
        } else {
            "gpu"
        },
        "heads",
        "kv",
        "experts",
        "attn",
        "experts",
        "dense+sh",
        "emb+head",
        "other",
        "weights",
        "activ.",
        "KV cache",
        "KV tokens"
    );
    for d in &p.devices {
        let w = &d.weights;
        s += &format!(
            "{:>3} {:>5} {:>3} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9} {:>11}\n",
            d.device,
            d.attention_heads,
            d.kv_heads,
            d.routed_experts,
            gib(w.attention),
            gib(w.routed_experts),
            gib(w.dense_and_shared),
            gib(w.embedding_and_head),
            gib(w.other),
            gib(d.weights_bytes),
            gib(d.activation_bytes),
            gib(d.kv_cache_bytes),
            d.kv_tokens,
        );
    }
    s += "(sizes in GiB)\n\n";
    match &p.reason {
        None => {
            s += &format!(
                "fits: {} tokens of KV cache, {:.2} sequences of {} tokens at once\n",
                p.kv_tokens, p.max_concurrency_at_max_context, p.max_context
            )
        }
        Some(r) => s += &format!("does not fit: {r}\n"),
    }
    s
}
