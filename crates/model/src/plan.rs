//! Memory planning before anything is loaded: how a model's weights split across N GPUs and how
//! many tokens of KV cache fit in what is left on each. This is the arithmetic behind
//! `switchyard plan`; it reads only the model's config.
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
//! memory is the `bf16` plan (per-expert scales of fused expert tensors are not modelled either).

use serde::Serialize;

use crate::config::{LayerKind, ModelConfig};

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
}

impl WeightFormat {
    /// Parses `f32`, `bf16` or `fp8`.
    pub fn parse(s: &str) -> Result<Self, PlanError> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "fp8" | "e4m3" | "f8e4m3" => Ok(Self::Fp8),
            o => Err(PlanError::invalid(
                "--weights",
                format!("unknown weight format {o:?}; use bf16, fp8 or f32"),
            )),
        }
    }

    /// Bytes per projection-matrix element.
    fn matrix(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
            Self::Fp8 => 1,
        }
    }

    /// Bytes per embedding, lm_head or norm element.
    fn other(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::Fp8 => 2,
        }
    }

    /// Bytes of scales stored beside each projection matrix (`weight_scale`, `input_scale`).
    fn scales_per_matrix(self) -> u64 {
        match self {
            Self::Fp8 => 2 * 4,
            Self::F32 | Self::Bf16 => 0,
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
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "fp8" | "e4m3" | "fp8_e4m3" => Ok(Self::Fp8),
            o => Err(PlanError::invalid(
                "--kv-dtype",
                format!("unknown KV dtype {o:?}; use bf16, fp8 or f32"),
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
    /// GPUs (`--gpus`).
    pub gpus: usize,
    /// Memory of each GPU in bytes (`--gpu-memory`).
    pub gpu_memory_bytes: u64,
    /// Share of it the server may use (`--gpu-memory-utilization`).
    pub gpu_memory_utilization: f64,
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
    /// GPUs.
    pub gpus: usize,
    /// Memory of each GPU.
    pub gpu_memory_bytes: u64,
    /// Share the server may use.
    pub gpu_memory_utilization: f64,
    /// Bytes usable on each GPU.
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

/// Bytes of a `[rows, cols]` projection matrix with its scales.
fn matrix(f: WeightFormat, rows: usize, cols: usize) -> u64 {
    (rows * cols) as u64 * f.matrix() + f.scales_per_matrix()
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
    let mut b = WeightBytes {
        attention: matrix(f, qh * hd, h) + 2 * matrix(f, kvh * hd, h) + matrix(f, h, qh * hd),
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
            b.dense_and_shared = 3 * matrix(f, i, h);
        }
        LayerKind::Moe => {
            let (e, ie) = (cfg.num_experts, cfg.moe_intermediate_size);
            b.routed_experts = share(e, n, d) as u64 * 3 * matrix(f, ie, h);
            let si = share(ie * cfg.num_shared_experts, n, d);
            if si > 0 {
                b.dense_and_shared = 3 * matrix(f, si, h);
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

/// Plans `cfg` on the devices of `req`.
pub fn plan(cfg: &ModelConfig, req: &PlanRequest) -> Result<MemoryPlan, PlanError> {
    let n = req.gpus;
    if n == 0 {
        return Err(PlanError::invalid("--gpus", "must be at least 1"));
    }
    if req.gpu_memory_bytes == 0 {
        return Err(PlanError::invalid(
            "--gpu-memory",
            "must be more than 0 bytes",
        ));
    }
    if !(req.gpu_memory_utilization > 0.0 && req.gpu_memory_utilization <= 1.0) {
        return Err(PlanError::invalid(
            "--gpu-memory-utilization",
            format!("must be in (0, 1], got {}", req.gpu_memory_utilization),
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
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mtp_layers = if req.with_mtp { cfg.num_mtp_layers } else { 0 };
    let attn_layers = cfg.num_hidden_layers + mtp_layers;
    let usable = (req.gpu_memory_bytes as f64 * req.gpu_memory_utilization) as u64;
    let kv_per_token_dev = 2 * attn_layers as u64 * (split.1 * cfg.head_dim) as u64 * req.kv.size();
    let kv_per_token_all =
        2 * attn_layers as u64 * (cfg.num_key_value_heads * cfg.head_dim) as u64 * req.kv.size();

    let device_weights = |d: usize, parts: usize, split: (usize, usize)| -> WeightBytes {
        let mut w = WeightBytes::default();
        for &kind in &cfg.layer_kinds {
            w.add(&layer_bytes(cfg, kind, f, parts, d, split));
        }
        for _ in 0..mtp_layers {
            // An MTP layer is a MoE decoder layer plus the projection of [embedding; hidden]
            // and three norms (enorm, hnorm, final_layernorm).
            w.add(&layer_bytes(cfg, LayerKind::Moe, f, parts, d, split));
            w.other += matrix(f, h, 2 * h) + plain(f, 3 * h);
        }
        let vocab = share(v, parts, d);
        w.embedding_and_head = plain(f, vocab * h)
            + if cfg.tie_word_embeddings {
                0
            } else {
                plain(f, vocab * h)
            };
        w.other += plain(f, h); // final norm
        w
    };
    let weights_total_bytes = device_weights(0, 1, heads(cfg, 1)?).total();

    let mut devices = Vec::with_capacity(n);
    for d in 0..n {
        let weights = device_weights(d, n, split);
        let weights_bytes = weights.total();
        let activation_bytes = activations(cfg, req, n, d, split);
        let left = usable.saturating_sub(weights_bytes + activation_bytes);
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
        Some(format!(
            "GPU {} needs {:.1} GiB of weights and {:.1} GiB of activations, more than the \
             {:.1} GiB usable ({:.1} GiB × {}); add GPUs, use --weights fp8, or lower \
             --max-num-batched-tokens",
            d.device,
            gib(d.weights_bytes),
            gib(d.activation_bytes),
            gib(usable),
            gib(req.gpu_memory_bytes),
            req.gpu_memory_utilization
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
        gpus: n,
        gpu_memory_bytes: req.gpu_memory_bytes,
        gpu_memory_utilization: req.gpu_memory_utilization,
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
            gpu_memory_bytes: gib << 30,
            gpu_memory_utilization: DEFAULT_GPU_MEMORY_UTILIZATION,
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
        r.gpu_memory_utilization = 1.5;
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
