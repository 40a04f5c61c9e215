//! Memory planning before anything is loaded: how a model's weights split across N GPUs and how
//! many tokens of KV cache fit in what is left on each — or, for the CPU tier, whether the
//! weights (bf16, f32, or quantized at load with `--quantize q8|q4`) fit in the host's memory
//! and how many tokens the KV cache the server sizes by default holds. This is the arithmetic
//! behind `switchyard plan` and the loader's check that a model fits before it reads a weight;
//! it reads only the model's config.
//!
//! The layout is the usual one for MoE serving on one node (vLLM's tensor parallel plus expert
//! parallel):
//! - attention is tensor parallel by heads: each device holds `heads / N` query heads and
//!   `kv_heads / N` KV heads, or one replicated KV head when `N > kv_heads`;
//! - dense MLPs and the shared expert are tensor parallel along their intermediate size;
//! - routed experts are expert parallel: each device holds whole experts, `E / N` of them
//!   (the first `E % N` devices one more);
//! - the embedding and lm_head are vocabulary parallel;
//! - norms, the MoE gate's weight and its expert bias are replicated.
//!
//! [`crate::HyV3Model::load_parallel`] runs exactly this layout ([`crate::parallel`]; CPU ranks
//! for now), splitting by the same rule ([`crate::parallel::split`]); `tests/parallel.rs`
//! checks that every rank holds the bytes planned here for it, in f32 and bf16.
//!
//! Stored sizes follow real Hy3 checkpoints: the gate weight and expert bias are f32 in every
//! format; in FP8 checkpoints the projection matrices are e4m3 with an f32 `weight_scale` and
//! `input_scale` each, while embeddings, lm_head and norms stay bf16. The FP8 figures are the
//! checkpoint's bytes (`tests/plan.rs` checks them against the `fp8_hub` fixture and FP8 test
//! models to the byte), that is what an FP8-compute engine holds. Switchyard's loader today
//! dequantizes FP8 weights into the compute dtype (see [`crate::weights`]), so what it holds in
//! memory is the `bf16` plan. Scales are counted per tensor; per-expert, per-channel and block
//! scales (a grid per matrix: 4 bytes per 16K weights for 128×128 blocks) are not modelled.
//!
//! The `q8` and `q4` formats are what the CPU holds after `--quantize` ([`crate::isq`]): every
//! projection in the kernels' format at the bytes `QuantKind::matrix_bytes` gives (inputs
//! padded to whole blocks, SwiGLU intermediates padded too, q/k/v stacked into one matrix), the
//! lm_head at q8 (its own copy even when tied to the embedding), and the embedding, norms,
//! biases, gate weight and expert bias in f32 — the CPU's `--dtype auto`. (`--dtype bf16` with
//! `--quantize` stores the embedding in bf16: the plan is then high by half the embedding.)
//! `tests/parallel.rs` checks every rank's quantized bytes against these to the byte.

use candle_core::DType;
use serde::Serialize;

use crate::config::{LayerKind, ModelConfig};
use crate::isq::{self, IsqType};

/// Share of the memory left after loading the weights that the KV cache takes on the CPU
/// when `--kv-cache-memory` is not given: the rest stays for activations, the tokenizer, the
/// HTTP server and whatever else runs on the machine. The engine sizes its cache with it, and
/// CPU plans predict that cache.
pub const DEFAULT_KV_SHARE_OF_HOST_MEMORY: u64 = 4;

/// Where the planned model runs (`switchyard plan --device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanDevice {
    /// NVIDIA GPUs (`--gpus` of them, `--gpu-memory` each).
    Cuda,
    /// The host's CPU and memory (`--memory`).
    Cpu,
}

impl PlanDevice {
    /// Parses `cuda` (also `gpu`) or `cpu`.
    pub fn parse(s: &str) -> Result<Self, PlanError> {
        match s.to_ascii_lowercase().as_str() {
            "cuda" | "gpu" => Ok(Self::Cuda),
            "cpu" => Ok(Self::Cpu),
            o => Err(PlanError::invalid(
                "--device",
                format!("unknown device {o:?}; use cuda or cpu"),
            )),
        }
    }
}

/// Share of GPU memory the server may use; the rest is left for the CUDA context, cuBLAS and
/// NCCL workspaces and allocator fragmentation (vLLM's `--gpu-memory-utilization` default).
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.90;

/// How projection weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// Everything in f32 (test checkpoints).
    F32,
    /// bf16, with the gate weight and expert bias in f32 (the released Hy3 checkpoint).
    Bf16,
    /// e4m3 projections with per-tensor f32 scales; embeddings, lm_head and norms in bf16.
    Fp8,
    /// `--quantize q8` on the CPU: int8 projections with an f32 scale per 64 inputs; the
    /// embedding and everything else in f32.
    Q8,
    /// `--quantize q4` on the CPU: 4-bit projections with an f16 step and minimum per 32
    /// inputs, the lm_head at q8; the embedding and everything else in f32.
    Q4,
}

impl WeightFormat {
    /// Parses `f32`, `bf16`, `fp8`, `q8` (`q8_0`) or `q4` (`q4_1`).
    pub fn parse(s: &str) -> Result<Self, PlanError> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "fp8" | "e4m3" | "f8e4m3" => Ok(Self::Fp8),
            o => match o.parse::<IsqType>() {
                Ok(q) => Ok(Self::quantized(q)),
                Err(_) => Err(PlanError::invalid(
                    "--weights",
                    format!("unknown weight format {o:?}; use bf16, fp8, f32, q8 or q4"),
                )),
            },
        }
    }

    /// The name `--weights` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        }
    }

    /// The format of `--quantize q`.
    pub fn quantized(q: IsqType) -> Self {
        match q {
            IsqType::Q8 => Self::Q8,
            IsqType::Q4 => Self::Q4,
        }
    }

    /// What the loader holds on the CPU for `--dtype dtype` and `--quantize quantize` (f16
    /// takes bf16's bytes).
    pub fn held(dtype: DType, quantize: Option<IsqType>) -> Self {
        match (quantize, dtype) {
            (Some(q), _) => Self::quantized(q),
            (None, DType::F32 | DType::F64) => Self::F32,
            (None, _) => Self::Bf16,
        }
    }

    /// The `--quantize` format, for `q8` and `q4`.
    fn isq(self) -> Option<IsqType> {
        match self {
            Self::Q8 => Some(IsqType::Q8),
            Self::Q4 => Some(IsqType::Q4),
            Self::F32 | Self::Bf16 | Self::Fp8 => None,
        }
    }

    /// Bytes per projection-matrix element, for the unquantized formats.
    fn matrix(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
            Self::Fp8 | Self::Q8 | Self::Q4 => 1,
        }
    }

    /// Bytes per embedding, lm_head or norm element.
    fn other(self) -> u64 {
        match self {
            Self::F32 | Self::Q8 | Self::Q4 => 4,
            Self::Bf16 | Self::Fp8 => 2,
        }
    }

    /// Bytes of scales stored beside each projection matrix (`weight_scale`, `input_scale`).
    fn scales_per_matrix(self) -> u64 {
        match self {
            Self::Fp8 => 2 * 4,
            Self::F32 | Self::Bf16 | Self::Q8 | Self::Q4 => 0,
        }
    }
}

/// How the KV cache stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvFormat {
    /// 4 bytes per element.
    F32,
    /// 2 bytes per element.
    Bf16,
    /// 1 byte per element (e4m3 with a per-tensor scale).
    Fp8,
}

impl KvFormat {
    /// Parses `f32`, `bf16` or `fp8`.
    pub fn parse(s: &str) -> Result<Self, PlanError> {
        match crate::KvDtype::from_name(s) {
            Some(crate::KvDtype::F32) => Ok(Self::F32),
            Some(crate::KvDtype::Bf16) => Ok(Self::Bf16),
            Some(crate::KvDtype::Fp8) => Ok(Self::Fp8),
            None => Err(PlanError::invalid(
                "--kv-dtype",
                format!("unknown KV dtype {s:?}; use bf16, fp8 or f32"),
            )),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
            Self::Fp8 => 1,
        }
    }
}

/// A planning input that cannot be planned; `flag` is the `switchyard plan` flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The value of a flag is unusable.
    #[error("{flag}: {message}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl PlanError {
    fn invalid(flag: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            flag,
            message: message.into(),
        }
    }
}

/// What to plan for (each field is a `switchyard plan` flag).
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// GPUs or the CPU (`--device`).
    pub device: PlanDevice,
    /// GPUs (`--gpus`); 1 for the CPU.
    pub gpus: usize,
    /// Memory of each GPU in bytes (`--gpu-memory`), or the host memory the server may use
    /// (`--memory`).
    pub memory_bytes: u64,
    /// Share of each GPU's memory the server may use (`--gpu-memory-utilization`); 1 for the
    /// CPU, where the KV cache takes [`DEFAULT_KV_SHARE_OF_HOST_MEMORY`]'s share of what the
    /// weights leave.
    pub memory_utilization: f64,
    /// Weight storage (`--weights`).
    pub weights: WeightFormat,
    /// KV cache storage (`--kv-dtype`).
    pub kv: KvFormat,
    /// Longest sequence that must fit (`--max-context`).
    pub max_context: usize,
    /// Sequences decoded together (`--max-num-seqs`): sizes the logits buffer.
    pub max_num_seqs: usize,
    /// Tokens in one engine step (`--max-num-batched-tokens`): sizes the activations.
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block (`--block-size`): the cache holds whole blocks.
    pub block_size: usize,
    /// Also hold the MTP layers for speculative decoding (`--with-mtp`).
    pub with_mtp: bool,
}

/// Bytes on one device, by part.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WeightBytes {
    /// Attention projections, their biases and QK-norms.
    pub attention: u64,
    /// Routed experts.
    pub routed_experts: u64,
    /// Dense MLPs and shared experts.
    pub dense_and_shared: u64,
    /// Embedding and lm_head.
    pub embedding_and_head: u64,
    /// Norms, MoE gate weights and expert biases, MTP projections.
    pub other: u64,
}

impl WeightBytes {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.attention
            + self.routed_experts
            + self.dense_and_shared
            + self.embedding_and_head
            + self.other
    }

    fn add(&mut self, o: &WeightBytes) {
        self.attention += o.attention;
        self.routed_experts += o.routed_experts;
        self.dense_and_shared += o.dense_and_shared;
        self.embedding_and_head += o.embedding_and_head;
        self.other += o.other;
    }
}

/// One device's share.
#[derive(Debug, Clone, Serialize)]
pub struct DevicePlan {
    /// Device index.
    pub device: usize,
    /// Query heads held.
    pub attention_heads: usize,
    /// KV heads held (replicas count once per device).
    pub kv_heads: usize,
    /// Routed experts held (per MoE layer).
    pub routed_experts: usize,
    /// Weight bytes by part.
    pub weights: WeightBytes,
    /// Weight bytes in all.
    pub weights_bytes: u64,
    /// Activation and logits buffers for one engine step (an upper estimate, f32).
    pub activation_bytes: u64,
    /// What is left for the KV cache (0 when the rest does not fit).
    pub kv_cache_bytes: u64,
    /// Tokens of KV cache that fit, in whole blocks.
    pub kv_tokens: u64,
}

/// The plan.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    /// GPUs or the CPU.
    pub device: PlanDevice,
    /// GPUs (1 for the CPU).
    pub gpus: usize,
    /// Memory of each GPU, or of the host.
    pub memory_bytes: u64,
    /// Share the server may use.
    pub memory_utilization: f64,
    /// Bytes usable on each device.
    pub usable_bytes_per_device: u64,
    /// Weight storage.
    pub weights_format: WeightFormat,
    /// KV storage.
    pub kv_dtype: KvFormat,
    /// Parameters (without MTP layers).
    pub parameters_total: u64,
    /// Parameters used per token (without the embedding lookup).
    pub parameters_active: u64,
    /// Bytes of every weight planned for, stored once (replicas not counted).
    pub weights_total_bytes: u64,
    /// KV bytes one token takes across all devices (replicated KV heads counted once).
    pub kv_bytes_per_token: u64,
    /// KV bytes one token takes on each device.
    pub kv_bytes_per_token_per_device: u64,
    /// Each device.
    pub devices: Vec<DevicePlan>,
    /// Tokens of KV cache the whole deployment holds (the least of any device).
    pub kv_tokens: u64,
    /// The sequence length that must fit.
    pub max_context: usize,
    /// How many sequences of `max_context` tokens the cache holds at once.
    pub max_concurrency_at_max_context: f64,
    /// Whether the weights, activations and one `max_context` sequence fit.
    pub fits: bool,
    /// Why not, when it does not fit.
    pub reason: Option<String>,
}

/// Device `d`'s part of `total` split over `n` devices as evenly as possible.
fn share(total: usize, n: usize, d: usize) -> usize {
    total / n + usize::from(d < total % n)
}

/// Bytes of a `[rows, cols]` projection matrix with its scales (quantized: inputs padded to
/// whole blocks, as the loader pads them).
fn matrix(f: WeightFormat, rows: usize, cols: usize) -> u64 {
    match f.isq() {
        Some(q) => q.kind().matrix_bytes(rows, isq::padded(cols)) as u64,
        None => (rows * cols) as u64 * f.matrix() + f.scales_per_matrix(),
    }
}

/// Bytes of a SwiGLU MLP with intermediate size `i` over hidden size `h` (gate, up, down);
/// quantized, both sizes padded to whole blocks and gate/up fused, as `isq::pad_swiglu` does.
fn swiglu(f: WeightFormat, i: usize, h: usize) -> u64 {
    match f.isq() {
        Some(_) => {
            let (i, h) = (isq::padded(i), isq::padded(h));
            matrix(f, 2 * i, h) + matrix(f, h, i)
        }
        None => 3 * matrix(f, i, h),
    }
}

/// Bytes of a bf16/f32 vector or table of `n` elements (norms, embeddings, biases).
fn plain(f: WeightFormat, n: usize) -> u64 {
    n as u64 * f.other()
}

/// Per-device head split: `(query heads, KV heads)`.
fn heads(cfg: &ModelConfig, n: usize) -> Result<(usize, usize), PlanError> {
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    if !nh.is_multiple_of(n) {
        return Err(PlanError::invalid(
            "--gpus",
            format!(
                "{n} GPUs cannot split the model's {nh} attention heads evenly (tensor \
                 parallelism gives every GPU the same number of heads); use a divisor of {nh}"
            ),
        ));
    }
    let kv = if nkv >= n {
        if !nkv.is_multiple_of(n) {
            return Err(PlanError::invalid(
                "--gpus",
                format!("{n} GPUs cannot split the model's {nkv} KV heads evenly"),
            ));
        }
        nkv / n
    } else {
        if !n.is_multiple_of(nkv) {
            return Err(PlanError::invalid(
                "--gpus",
                format!(
                    "{n} GPUs cannot hold replicas of the model's {nkv} KV heads evenly \
                     (more GPUs than KV heads needs a multiple of {nkv})"
                ),
            ));
        }
        1
    };
    Ok((nh / n, kv))
}

/// One decoder layer's weights on device `d` of `n`.
fn layer_bytes(
    cfg: &ModelConfig,
    kind: LayerKind,
    f: WeightFormat,
    n: usize,
    d: usize,
    (qh, kvh): (usize, usize),
) -> WeightBytes {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    // Quantized, q/k/v are one stacked matrix (one padding of the lines, no per-tensor scales).
    let qkv = match f.isq() {
        Some(_) => matrix(f, (qh + 2 * kvh) * hd, h),
        None => matrix(f, qh * hd, h) + 2 * matrix(f, kvh * hd, h),
    };
    let mut b = WeightBytes {
        attention: qkv + matrix(f, h, qh * hd),
        other: plain(f, 2 * h),
        ..Default::default()
    };
    if cfg.attention_bias {
        b.attention += plain(f, qh * hd + 2 * kvh * hd + h);
    }
    if cfg.qk_norm {
        b.attention += plain(f, 2 * hd);
    }
    match kind {
        LayerKind::Dense => {
            let i = share(cfg.intermediate_size, n, d);
            b.dense_and_shared = swiglu(f, i, h);
        }
        LayerKind::Moe => {
            let (e, ie) = (cfg.num_experts, cfg.moe_intermediate_size);
            b.routed_experts = share(e, n, d) as u64 * swiglu(f, ie, h);
            let si = share(ie * cfg.num_shared_experts, n, d);
            if si > 0 {
                b.dense_and_shared = swiglu(f, si, h);
            }
            // The gate weight and the expert bias are f32 in every format.
            b.other += (e * h) as u64 * 4;
            if cfg.gate.expert_bias {
                b.other += e as u64 * 4;
            }
        }
    }
    b
}

/// Bytes of weights `cfg` takes in format `f` over `ranks` tensor-parallel ranks, every rank's
/// share added (replicated parts once per rank): what the loader is about to hold.
pub fn weight_bytes(cfg: &ModelConfig, f: WeightFormat, ranks: usize) -> Result<u64, PlanError> {
    (0..ranks.max(1)).try_fold(0, |sum, r| {
        Ok(sum + rank_weight_bytes(cfg, f, ranks, r)?.total())
    })
}

/// Rank `rank`'s weights of `cfg` in format `f` split over `ranks` tensor-parallel ranks (the
/// layout of the module docs), by part.
pub fn rank_weight_bytes(
    cfg: &ModelConfig,
    f: WeightFormat,
    ranks: usize,
    rank: usize,
) -> Result<WeightBytes, PlanError> {
    if ranks == 0 || rank >= ranks {
        return Err(PlanError::invalid(
            "--tensor-parallel-size",
            format!("rank {rank} of {ranks}: must be at least 1 and above the rank"),
        ));
    }
    let split = heads(cfg, ranks).map_err(|e| match e {
        PlanError::Invalid { message, .. } => PlanError::Invalid {
            flag: "--tensor-parallel-size",
            message,
        },
    })?;
    Ok(device_weights(cfg, f, false, ranks, rank, split))
}

/// Device `d`'s weights of `cfg` split over `parts` devices.
fn device_weights(
    cfg: &ModelConfig,
    f: WeightFormat,
    with_mtp: bool,
    parts: usize,
    d: usize,
    split: (usize, usize),
) -> WeightBytes {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut w = WeightBytes::default();
    for &kind in &cfg.layer_kinds {
        w.add(&layer_bytes(cfg, kind, f, parts, d, split));
    }
    for _ in 0..if with_mtp { cfg.num_mtp_layers } else { 0 } {
        // An MTP layer is a MoE decoder layer plus the projection of [embedding; hidden]
        // and three norms (enorm, hnorm, final_layernorm).
        w.add(&layer_bytes(cfg, LayerKind::Moe, f, parts, d, split));
        w.other += matrix(f, h, 2 * h) + plain(f, 3 * h);
    }
    let vocab = share(v, parts, d);
    let head = match f.isq() {
        // A quantized head is its own copy, tied or not.
        Some(q) => matrix(WeightFormat::quantized(q.lm_head()), vocab, h),
        None if cfg.tie_word_embeddings => 0,
        None => plain(f, vocab * h),
    };
    w.embedding_and_head = plain(f, vocab * h) + head;
    w.other += plain(f, h); // final norm
    w
}

/// What to try when the weights in format `f` do not fit in `usable` bytes of host memory:
/// the smaller CPU formats with their sizes, or a bigger host when `f` is the smallest.
pub fn smaller_formats(cfg: &ModelConfig, f: WeightFormat, usable: u64) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let own = weight_bytes(cfg, f, 1).unwrap_or(u64::MAX);
    let options: Vec<String> = [WeightFormat::Q8, WeightFormat::Q4]
        .into_iter()
        .filter_map(|g| {
            let b = weight_bytes(cfg, g, 1).ok()?;
            (b < own).then(|| {
                format!(
                    "--quantize {} ({:.1} GiB{})",
                    g.name(),
                    gib(b),
                    if b <= usable {
                        ", fits"
                    } else {
                        ", does not fit either"
                    }
                )
            })
        })
        .collect();
    if options.is_empty() {
        "use a host with more memory".into()
    } else {
        format!(
            "quantize at load with {}, or use a host with more memory",
            options.join(" or ")
        )
    }
}

/// Plans `cfg` on the devices of `req`.
pub fn plan(cfg: &ModelConfig, req: &PlanRequest) -> Result<MemoryPlan, PlanError> {
    let n = req.gpus;
    let cpu = req.device == PlanDevice::Cpu;
    if n == 0 {
        return Err(PlanError::invalid("--gpus", "must be at least 1"));
    }
    if req.memory_bytes == 0 {
        return Err(PlanError::invalid(
            if cpu { "--memory" } else { "--gpu-memory" },
            "must be more than 0 bytes",
        ));
    }
    if !(req.memory_utilization > 0.0 && req.memory_utilization <= 1.0) {
        return Err(PlanError::invalid(
            "--gpu-memory-utilization",
            format!("must be in (0, 1], got {}", req.memory_utilization),
        ));
    }
    if cpu {
        if n != 1 {
            return Err(PlanError::invalid(
                "--gpus",
                "a CPU plan is for one host (tensor-parallel ranks on the CPU share its \
                 memory and are not faster); leave --gpus out with --device cpu",
            ));
        }
        if req.kv == KvFormat::Fp8 {
            return Err(PlanError::invalid(
                "--kv-dtype",
                "the CPU's KV cache holds f32 or bf16",
            ));
        }
        if req.weights == WeightFormat::Fp8 {
            return Err(PlanError::invalid(
                "--weights",
                "the CPU holds FP8 checkpoints dequantized to --dtype; plan them as bf16 or \
                 f32, or as q8/q4 for --quantize",
            ));
        }
    } else if req.weights.isq().is_some() {
        return Err(PlanError::invalid(
            "--weights",
            format!(
                "{} weights (--quantize) run on the CPU kernels only; use --device cpu, or \
                 bf16/fp8 on GPUs",
                req.weights.isq().map_or("", IsqType::name)
            ),
        ));
    }
    for (flag, v) in [
        ("--max-context", req.max_context),
        ("--max-num-seqs", req.max_num_seqs),
        ("--max-num-batched-tokens", req.max_num_batched_tokens),
        ("--block-size", req.block_size),
    ] {
        if v == 0 {
            return Err(PlanError::invalid(flag, "must be at least 1"));
        }
    }
    if cfg.num_mtp_layers == 0 && req.with_mtp {
        return Err(PlanError::invalid(
            "--with-mtp",
            "the model's config declares no MTP layers",
        ));
    }
    let split = heads(cfg, n)?;
    let f = req.weights;
    let mtp_layers = if req.with_mtp { cfg.num_mtp_layers } else { 0 };
    let attn_layers = cfg.num_hidden_layers + mtp_layers;
    let usable = (req.memory_bytes as f64 * req.memory_utilization) as u64;
    let kv_per_token_dev = 2 * attn_layers as u64 * (split.1 * cfg.head_dim) as u64 * req.kv.size();
    let kv_per_token_all =
        2 * attn_layers as u64 * (cfg.num_key_value_heads * cfg.head_dim) as u64 * req.kv.size();

    let with_mtp = req.with_mtp;
    let weights_total_bytes = device_weights(cfg, f, with_mtp, 1, 0, heads(cfg, 1)?).total();

    let mut devices = Vec::with_capacity(n);
    for d in 0..n {
        let weights = device_weights(cfg, f, with_mtp, n, d, split);
        let weights_bytes = weights.total();
        let activation_bytes = activations(cfg, req, n, d, split);
        let left = if cpu {
            // What the engine gives its cache by default: a share of what the weights leave.
            usable.saturating_sub(weights_bytes) / DEFAULT_KV_SHARE_OF_HOST_MEMORY
        } else {
            usable.saturating_sub(weights_bytes + activation_bytes)
        };
        let block = req.block_size as u64;
        let kv_tokens = left
            .checked_div(kv_per_token_dev)
            .map_or(0, |t| t / block * block);
        devices.push(DevicePlan {
            device: d,
            attention_heads: split.0,
            kv_heads: split.1,
            routed_experts: share(cfg.num_experts, n, d),
            weights,
            weights_bytes,
            activation_bytes,
            kv_cache_bytes: kv_tokens * kv_per_token_dev,
            kv_tokens,
        });
    }
    let kv_tokens = devices.iter().map(|d| d.kv_tokens).min().unwrap_or(0);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let reason = if let Some(d) = devices
        .iter()
        .find(|d| d.weights_bytes + d.activation_bytes > usable)
    {
        Some(if cpu {
            format!(
                "the weights need {:.1} GiB ({}) and the activations {:.1} GiB, more than the \
                 {:.1} GiB of memory (--memory); {}",
                gib(d.weights_bytes),
                f.name(),
                gib(d.activation_bytes),
                gib(usable),
                smaller_formats(cfg, f, usable),
            )
        } else {
            format!(
                "GPU {} needs {:.1} GiB of weights and {:.1} GiB of activations, more than the \
             {:.1} GiB usable ({:.1} GiB × {}); add GPUs, use --weights fp8, or lower \
             --max-num-batched-tokens",
                d.device,
                gib(d.weights_bytes),
                gib(d.activation_bytes),
                gib(usable),
                gib(req.memory_bytes),
                req.memory_utilization
            )
        })
    } else if kv_tokens < req.max_context as u64 && cpu {
        let d = &devices[0];
        let need = req.max_context as u64 * kv_per_token_dev;
        let room = usable.saturating_sub(d.weights_bytes + d.activation_bytes);
        let fix = if need <= room {
            format!(
                "serve with --kv-cache-memory {:.1}GiB or more (the weights and activations \
                 leave {:.1} GiB), or lower --max-context",
                gib(need).max(0.1),
                gib(room)
            )
        } else {
            format!(
                "the whole context needs {:.1} GiB, more than the {:.1} GiB the weights and \
                 activations leave; lower --max-context, {}{}",
                gib(need),
                gib(room),
                if req.kv == KvFormat::F32 {
                    "use --kv-dtype bf16, "
                } else {
                    ""
                },
                smaller_formats(cfg, f, usable)
            )
        };
        Some(format!(
            "the KV cache the server sizes by default (1/{DEFAULT_KV_SHARE_OF_HOST_MEMORY} of \
             the {:.1} GiB the weights leave: {:.1} GiB) holds {kv_tokens} tokens, fewer than \
             --max-context {}; {fix}",
            gib(usable.saturating_sub(d.weights_bytes)),
            gib(d.kv_cache_bytes),
            req.max_context,
        ))
    } else if kv_tokens < req.max_context as u64 {
        Some(format!(
            "the KV cache holds {kv_tokens} tokens, fewer than --max-context {} ({:.1} GiB per \
             GPU needed, {:.1} GiB left); add GPUs, use --kv-dtype fp8 or --weights fp8, or \
             lower --max-context",
            req.max_context,
            gib(req.max_context as u64 * kv_per_token_dev),
            gib(devices.iter().map(|d| d.kv_cache_bytes).min().unwrap_or(0)),
        ))
    } else {
        None
    };
    let (parameters_total, parameters_active) = cfg.parameter_counts();
    Ok(MemoryPlan {
        device: req.device,
        gpus: n,
        memory_bytes: req.memory_bytes,
        memory_utilization: req.memory_utilization,
        usable_bytes_per_device: usable,
        weights_format: f,
        kv_dtype: req.kv,
        parameters_total,
        parameters_active,
        weights_total_bytes,
        kv_bytes_per_token: kv_per_token_all,
        kv_bytes_per_token_per_device: kv_per_token_dev,
        devices,
        kv_tokens,
        max_context: req.max_context,
        max_concurrency_at_max_context: kv_tokens as f64 / req.max_context as f64,
        fits: reason.is_none(),
        reason,
    })
}

/// An upper estimate of device `d`'s activation buffers for one engine step, in f32: the
/// residual stream and its normed copy, this device's q/k/v and attention output, the widest MLP
/// intermediate (a dense layer's slice, or every routed expert's gate/up pair if all tokens of
/// the step landed here, plus the shared expert's slice), the gate's logits, and the sampled
/// rows' full-vocabulary logits.
fn activations(
    cfg: &ModelConfig,
    req: &PlanRequest,
    n: usize,
    d: usize,
    (qh, kvh): (usize, usize),
) -> u64 {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let dense = if cfg.layer_kinds.contains(&LayerKind::Dense) {
        2 * share(cfg.intermediate_size, n, d)
    } else {
        0
    };
    let moe = if cfg.layer_kinds.contains(&LayerKind::Moe) {
        2 * cfg.num_experts_per_tok * cfg.moe_intermediate_size
            + 2 * share(cfg.moe_intermediate_size * cfg.num_shared_experts, n, d)
            + cfg.num_experts
    } else {
        0
    };
    let per_token = 2 * h + (2 * qh + 2 * kvh) * hd + dense.max(moe);
    let step = req.max_num_batched_tokens as u64 * per_token as u64;
    let logits = req.max_num_seqs.min(req.max_num_batched_tokens) as u64 * cfg.vocab_size as u64;
    4 * (step + logits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(gpus: usize, gib: u64, weights: WeightFormat) -> PlanRequest {
        PlanRequest {
            gpus,
            device: PlanDevice::Cuda,
            memory_bytes: gib << 30,
            memory_utilization: DEFAULT_GPU_MEMORY_UTILIZATION,
            weights,
            kv: KvFormat::Bf16,
            max_context: 262_144,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            block_size: 16,
            with_mtp: false,
        }
    }

    #[test]
    fn hy3_kv_per_token_is_the_model_card_figure() {
        // DESIGN.md: 2 × 80 × 8 × 128 × 2 B = 320 KiB per token in bf16.
        let cfg = crate::presets::preset("hy3").unwrap();
        let p = plan(&cfg, &req(8, 141, WeightFormat::Fp8)).unwrap();
        assert_eq!(p.kv_bytes_per_token, 320 * 1024);
        assert_eq!(p.kv_bytes_per_token_per_device, 40 * 1024);
        assert!(p
            .devices
            .iter()
            .all(|d| d.kv_heads == 1 && d.routed_experts == 24));
    }

    #[test]
    fn device_shares_add_up_to_the_whole() {
        // Everything is split without overlap except the replicated parts: norms, the gate
        // and, with more GPUs than KV heads, the KV projections.
        let cfg = crate::presets::preset("hy3").unwrap();
        for f in [WeightFormat::Bf16, WeightFormat::Fp8] {
            let whole = plan(&cfg, &req(1, 1 << 12, f)).unwrap();
            for n in [2, 4, 8] {
                let p = plan(&cfg, &req(n, 1 << 12, f)).unwrap();
                let sum = |g: fn(&WeightBytes) -> u64| -> u64 {
                    p.devices.iter().map(|d| g(&d.weights)).sum()
                };
                assert_eq!(
                    sum(|w| w.routed_experts),
                    whole.devices[0].weights.routed_experts
                );
                assert_eq!(
                    sum(|w| w.embedding_and_head),
                    whole.devices[0].weights.embedding_and_head
                );
                assert_eq!(sum(|w| w.other), n as u64 * whole.devices[0].weights.other);
            }
        }
    }

    #[test]
    fn bad_inputs_name_the_flag() {
        let cfg = crate::presets::preset("hy3").unwrap();
        let e = plan(&cfg, &req(3, 80, WeightFormat::Bf16)).unwrap_err();
        assert!(e.to_string().starts_with("--gpus:"), "{e}");
        assert!(e.to_string().contains("64 attention heads"), "{e}");
        let e = plan(&cfg, &req(0, 80, WeightFormat::Bf16)).unwrap_err();
        assert!(e.to_string().starts_with("--gpus:"), "{e}");
        let mut r = req(8, 80, WeightFormat::Bf16);
        r.memory_utilization = 1.5;
        let e = plan(&cfg, &r).unwrap_err();
        assert!(
            e.to_string().starts_with("--gpu-memory-utilization:"),
            "{e}"
        );
        let small = crate::presets::preset("small").unwrap();
        let mut r = req(1, 80, WeightFormat::Bf16);
        r.with_mtp = true;
        let e = plan(&small, &r).unwrap_err();
        assert!(e.to_string().starts_with("--with-mtp:"), "{e}");
        assert!(WeightFormat::parse("int4")
            .unwrap_err()
            .to_string()
            .contains("--weights"));
        assert!(KvFormat::parse("q8")
            .unwrap_err()
            .to_string()
            .contains("--kv-dtype"));
    }
}
