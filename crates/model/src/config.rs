//! Model configuration: `config.json` of a hy_v3 checkpoint in either dialect, normalised into
//! one [`ModelConfig`].
//!
//! Two dialects exist in the wild:
//! - what transformers' `save_pretrained` writes (`mlp_layer_types`, `rope_parameters`,
//!   `num_experts_per_tok`, `moe_intermediate_size`, ...), and
//! - the hub dialect of Tencent's own checkpoints (`first_k_dense_replace`, top-level
//!   `rope_theta`, `moe_topk`, `qk_norm`, `moe_router_use_sigmoid`,
//!   `moe_router_enable_expert_bias`, `route_norm`, `expert_hidden_dim`, ...).
//!
//! The MoE gate is described as data ([`switchyard_kernels::GateConfig`]), so other MoE families
//! only need another parser, not another forward pass.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use switchyard_kernels::{GateConfig, ScoreFunction};

use crate::ModelError;

/// `model_type` values this engine can run.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["hy_v3"];

/// Hy3's RoPE base, already NTK-scaled for 256K context (transformers' `default_theta`).
pub const HY3_DEFAULT_ROPE_THETA: f64 = 11_158_840.0;
/// transformers' `HYV3Config.router_scaling_factor` default.
pub const HY3_DEFAULT_ROUTER_SCALING: f64 = 2.826;
/// transformers' `HYV3Config.max_position_embeddings` default.
const HY3_DEFAULT_MAX_POSITIONS: usize = 131_072;

/// What the feed-forward part of a decoder layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerKind {
    /// Dense SwiGLU MLP with `intermediate_size`.
    Dense,
    /// Routed experts plus shared experts.
    Moe,
}

/// MoE gate settings as read from the config (serialisable mirror of
/// [`switchyard_kernels::GateConfig`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateSettings {
    /// `true`: sigmoid scores; `false`: softmax.
    pub sigmoid: bool,
    /// Whether layers carry a selection-only expert bias.
    pub expert_bias: bool,
    /// Renormalise the chosen weights to sum to one.
    pub renormalize: bool,
    /// Multiplier on the final weights.
    pub scaling: f64,
    /// Expert groups (1 = none).
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
}

/// Normalised configuration of a hy_v3-style MoE transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Always one of [`SUPPORTED_MODEL_TYPES`].
    pub model_type: String,
    /// Vocabulary size (rows of the embedding and lm_head).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Dense-layer MLP width.
    pub intermediate_size: usize,
    /// Decoder layers (MTP layers excluded).
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base (no further scaling is applied).
    pub rope_theta: f64,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Whether lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v/o projections.
    pub attention_bias: bool,
    /// Per-head RMSNorm on queries and keys before RoPE.
    pub qk_norm: bool,
    /// Kind of each decoder layer.
    pub layer_kinds: Vec<LayerKind>,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Shared experts (fused into one MLP of `moe_intermediate_size × num_shared_experts`).
    pub num_shared_experts: usize,
    /// Routed expert MLP width.
    pub moe_intermediate_size: usize,
    /// Gate behaviour.
    pub gate: GateSettings,
    /// Add routed and shared outputs in f32 (transformers' `enable_moe_fp32_combine`).
    pub moe_fp32_combine: bool,
    /// MTP (next-n prediction) layers stored after the decoder layers.
    pub num_mtp_layers: usize,
    /// End-of-sequence token ids named by the config.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// How the checkpoint's weights are quantized (`quantization_config`); `None` for plain
    /// f32/bf16 checkpoints.
    #[serde(default)]
    pub quantization: Option<Quantization>,
}

/// A checkpoint's `quantization_config`, as far as the loader needs it.
///
/// FP8 (e4m3) weights in the two dialects FP8 checkpoints on the Hub use, each projection with
/// f32/bf16 scales beside it (see [`crate::weights`]):
/// - `quant_method: "fp8"` (transformers' FP8 and FineGrainedFP8 configs, Hy3's FP8 release,
///   DeepSeek-V3 and Qwen3-FP8): a `weight_scale` per tensor, or with `weight_block_size` a
///   `weight_scale_inv` per block of weights;
/// - `quant_method: "compressed-tensors"` with `format: "float-quantized"` (or
///   `naive-quantized`; llm-compressor's `FP8`, `FP8_DYNAMIC` and `FP8_BLOCK` schemes): 8-bit
///   float weights per tensor, per output channel or per block (`block_structure`).
///
/// The loader dequantizes them into the compute dtype, so the activation scheme is recorded but
/// not applied. Other methods and formats (GPTQ, AWQ, integer or 4-bit compressed-tensors) are
/// refused naming the field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Quantization {
    /// FP8 e4m3 weights (either dialect).
    Fp8 {
        /// How activations are scaled (`static`: an `input_scale` per projection; `dynamic`:
        /// none stored).
        activation_scheme: ActivationScheme,
        /// Modules left unquantized (`ignored_layers`, `modules_to_not_convert`, compressed-tensors'
        /// `ignore`).
        not_converted: Vec<String>,
        /// How the weight scales are laid out, as the config declares it (the loader reads the
        /// layout from each scale's shape; the block size it needs only where a matrix is not a
        /// whole number of blocks).
        weight_scales: WeightScales,
    },
}

/// The layout of FP8 weight scales a config declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WeightScales {
    /// One scale per tensor (or per expert of a fused expert tensor); `quant_method: "fp8"`
    /// without `weight_block_size`, compressed-tensors' `strategy: "tensor"`.
    PerTensor,
    /// One scale per output row (compressed-tensors' `strategy: "channel"`).
    PerChannel,
    /// One scale per `[rows, columns]` block (`weight_block_size`, compressed-tensors'
    /// `strategy: "block"` with `block_structure`); edge blocks may be partial.
    Block([usize; 2]),
}

impl Quantization {
    /// A short description for logs, e.g. `fp8 e4m3, 128x128 blocks, dynamic activations`.
    pub fn describe(&self) -> String {
        match self {
            Quantization::Fp8 {
                activation_scheme,
                weight_scales,
                ..
            } => format!(
                "fp8 e4m3, {} scales, {} activations",
                match weight_scales {
                    WeightScales::Block([r, c]) => format!("{r}x{c} block"),
                    WeightScales::PerChannel => "per-channel".into(),
                    WeightScales::PerTensor => "per-tensor".into(),
                },
                match activation_scheme {
                    ActivationScheme::Static => "static",
                    ActivationScheme::Dynamic => "dynamic",
                    ActivationScheme::WeightOnly => "unquantized",
                }
            ),
        }
    }

    /// The block of weights one scale covers, when the scales are block-wise.
    pub fn weight_block(&self) -> Option<[usize; 2]> {
        match self {
            Quantization::Fp8 {
                weight_scales: WeightScales::Block(b),
                ..
            } => Some(*b),
            Quantization::Fp8 { .. } => None,
        }
    }
}

/// How an FP8 checkpoint scales activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActivationScheme {
    /// A calibrated `input_scale` is stored beside each quantized projection.
    Static,
    /// Scales computed per batch at run time; nothing stored.
    Dynamic,
    /// Activations are not quantized (weight-only FP8, compressed-tensors' W8A16).
    WeightOnly,
}

/// `quant_method` values the loader accepts.
pub const SUPPORTED_QUANT_METHODS: &[&str] = &["fp8", "compressed-tensors"];

/// Parses `quantization_config` (absent or null: not quantized).
fn quantization(o: &Map<String, Value>) -> Result<Option<Quantization>, ModelError> {
    const KEY: &str = "quantization_config";
    let Some(q) = o.get(KEY).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad = |field: &str, message: String| ModelError::Config {
        field: format!("{KEY}.{field}"),
        message,
    };
    let q = q
        .as_object()
        .ok_or_else(|| bad("", "expected an object".into()))?;
    let r = Reader(q);
    let nested = |e: ModelError| match e {
        ModelError::Config { field, message } => bad(&field, message),
        e => e,
    };
    let method = r
        .string("quant_method")
        .map_err(nested)?
        .ok_or_else(|| bad("quant_method", "required field is missing".into()))?;
    if method.eq_ignore_ascii_case("compressed-tensors") {
        return compressed_tensors(&r).map_err(nested).map(Some);
    }
    if !method.eq_ignore_ascii_case("fp8") {
        return Err(bad(
            "quant_method",
            format!(
                "unsupported quantization method {method:?}; supported: {} (FP8 e4m3 weights)",
                SUPPORTED_QUANT_METHODS.join(", ")
            ),
        ));
    }
    let weight_scales = match r.get("weight_block_size") {
        None => WeightScales::PerTensor,
        Some(v) => WeightScales::Block(block_shape(v).map_err(|m| bad("weight_block_size", m))?),
    };
    if let Some(fmt) = r.string("fmt").map_err(nested)? {
        if !matches!(fmt.to_ascii_lowercase().as_str(), "e4m3" | "float8_e4m3fn") {
            return Err(bad(
                "fmt",
                format!("FP8 format {fmt:?} is not supported; only e4m3"),
            ));
        }
    }
    // transformers' FP8 configs default to dynamic activation scales.
    let activation_scheme = match r.string("activation_scheme").map_err(nested)? {
        None => ActivationScheme::Dynamic,
        Some(s) if s.eq_ignore_ascii_case("static") => ActivationScheme::Static,
        Some(s) if s.eq_ignore_ascii_case("dynamic") => ActivationScheme::Dynamic,
        Some(s) => {
            return Err(bad(
                "activation_scheme",
                format!("expected \"static\" or \"dynamic\", found {s:?}"),
            ))
        }
    };
    let mut not_converted = Vec::new();
    for key in ["ignored_layers", "modules_to_not_convert"] {
        not_converted.extend(names(&r, key).map_err(nested)?);
    }
    Ok(Some(Quantization::Fp8 {
        activation_scheme,
        not_converted,
        weight_scales,
    }))
}

/// A list of module names (`ignored_layers`, `ignore`); absent is empty.
fn names(r: &Reader, key: &str) -> Result<Vec<String>, ModelError> {
    match r.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| r.bad(key, &format!("entries must be strings, found {x}")))
            })
            .collect(),
        Some(v) => Err(r.bad(key, &format!("expected a list of names, found {v}"))),
    }
}

/// `[rows, columns]` of a scale block: two positive integers.
fn block_shape(v: &Value) -> Result<[usize; 2], String> {
    let dims: Vec<u64> = v
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    match dims[..] {
        [r, c] if r > 0 && c > 0 && v.as_array().is_some_and(|a| a.len() == 2) => {
            Ok([r as usize, c as usize])
        }
        _ => Err(format!(
            "expected [rows, columns] of one scale block (two positive integers), found {v}"
        )),
    }
}

/// compressed-tensors' `quantization_config`: only 8-bit float weights (`float-quantized`) load.
fn compressed_tensors(r: &Reader) -> Result<Quantization, ModelError> {
    let top_format = r.string("format")?;
    let groups = match r.get("config_groups") {
        Some(Value::Object(g)) if !g.is_empty() => g,
        Some(v) => {
            return Err(r.bad(
                "config_groups",
                &format!("expected an object of quantization groups, found {v}"),
            ))
        }
        None => return Err(r.missing("config_groups")),
    };
    let mut weight_scales: Option<WeightScales> = None;
    let mut activation_scheme = None;
    for (name, g) in groups {
        let field = |f: &str| format!("config_groups.{name}.{f}");
        let g = g
            .as_object()
            .ok_or_else(|| r.bad(&field(""), "expected an object"))?;
        let gr = Reader(g);
        let in_group = |e: ModelError| match e {
            ModelError::Config { field: f, message } => ModelError::Config {
                field: field(&f),
                message,
            },
            e => e,
        };
        // The format is per group in mixed-precision configs, else at the top.
        let format = match gr.string("format").map_err(in_group)? {
            Some(f) => Some(f),
            None => top_format.clone(),
        };
        // `naive-quantized` stores the quantized values unpacked: for 8-bit float weights
        // (checked below) the same bytes as `float-quantized`.
        if let Some(f) = format.filter(|f| f != "float-quantized" && f != "naive-quantized") {
            return Err(r.bad(
                if gr.get("format").is_some() {
                    field("format")
                } else {
                    "format".into()
                }
                .as_str(),
                &format!(
                    "compressed-tensors format {f:?} is not supported; only \"float-quantized\" \
                     or \"naive-quantized\" with 8-bit float weights (FP8 e4m3)"
                ),
            ));
        }
        let w = match gr.get("weights") {
            Some(Value::Object(w)) => Reader(w),
            _ => return Err(r.bad(&field("weights"), "expected an object")),
        };
        let in_weights = |e: ModelError| match e {
            ModelError::Config { field: f, message } => ModelError::Config {
                field: field(&format!("weights.{f}")),
                message,
            },
            e => e,
        };
        let ty = w.string("type").map_err(in_weights)?.unwrap_or_default();
        let bits = w.usize("num_bits").map_err(in_weights)?.unwrap_or(0);
        if ty != "float" || bits != 8 {
            return Err(r.bad(
                &field("weights"),
                &format!("{bits}-bit {ty} weights are not supported; only 8-bit float (FP8 e4m3)"),
            ));
        }
        if w.bool("symmetric").map_err(in_weights)? == Some(false) {
            return Err(r.bad(
                &field("weights.symmetric"),
                "asymmetric (zero-point) FP8 weights are not supported",
            ));
        }
        let strategy = w
            .string("strategy")
            .map_err(in_weights)?
            .unwrap_or_default();
        let layout = match strategy.as_str() {
            "tensor" => WeightScales::PerTensor,
            "channel" => WeightScales::PerChannel,
            "block" => WeightScales::Block(
                block_shape(w.get("block_structure").unwrap_or(&Value::Null))
                    .map_err(|m| r.bad(&field("weights.block_structure"), &m))?,
            ),
            s => {
                return Err(r.bad(
                    &field("weights.strategy"),
                    &format!(
                        "weight strategy {s:?} is not supported; FP8 weights load per \"tensor\", \
                         \"channel\" or \"block\""
                    ),
                ))
            }
        };
        match weight_scales {
            Some(a) if a != layout => {
                return Err(r.bad(
                    &field("weights.strategy"),
                    &format!(
                        "groups lay out weight scales differently ({a:?} and {layout:?}); one \
                         layout for all groups is supported"
                    ),
                ))
            }
            _ => weight_scales = Some(layout),
        }
        let scheme = match gr.get("input_activations") {
            None => ActivationScheme::WeightOnly,
            Some(Value::Object(a)) => match Reader(a).bool("dynamic").map_err(in_group)? {
                Some(true) => ActivationScheme::Dynamic,
                _ => ActivationScheme::Static,
            },
            Some(v) => {
                return Err(r.bad(
                    &field("input_activations"),
                    &format!("expected an object or null, found {v}"),
                ))
            }
        };
        // Groups may differ; the first group's scheme is recorded (it is not applied).
        activation_scheme = activation_scheme.or(Some(scheme));
    }
    Ok(Quantization::Fp8 {
        activation_scheme: activation_scheme.unwrap_or(ActivationScheme::WeightOnly),
        not_converted: names(r, "ignore")?,
        weight_scales: weight_scales.unwrap_or(WeightScales::PerTensor),
    })
}

impl ModelConfig {
    /// Reads and normalises `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json_str(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and normalises the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        let v: Value = serde_json::from_str(text).map_err(|e| ModelError::Config {
            field: "<json>".into(),
            message: format!("not valid JSON: {e}"),
        })?;
        let obj = v.as_object().ok_or_else(|| ModelError::Config {
            field: "<root>".into(),
            message: "config.json must be a JSON object".into(),
        })?;
        Self::from_json(obj)
    }

    /// Normalises a parsed config object.
    pub fn from_json(o: &Map<String, Value>) -> Result<Self, ModelError> {
        let r = Reader(o);
        let model_type = r
            .string("model_type")?
            .ok_or_else(|| r.missing("model_type"))?;
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(ModelError::UnsupportedModelType {
                found: model_type,
                supported: SUPPORTED_MODEL_TYPES.join(", "),
            });
        }
        let hidden_size = r.req_usize("hidden_size")?;
        let num_hidden_layers = r.req_usize("num_hidden_layers")?;
        let num_attention_heads = r.req_usize("num_attention_heads")?;
        let vocab_size = r.req_usize("vocab_size")?;
        let num_key_value_heads = r
            .usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let head_dim = match r.usize("head_dim")? {
            Some(d) => d,
            None => hidden_size / num_attention_heads.max(1),
        };
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || !num_attention_heads.is_multiple_of(num_key_value_heads)
        {
            return Err(ModelError::Config {
                field: "num_key_value_heads".into(),
                message: format!(
                    "{num_attention_heads} query heads cannot be shared by {num_key_value_heads} key/value heads"
                ),
            });
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(ModelError::Config {
                field: "head_dim".into(),
                message: format!("RoPE needs an even, non-zero head_dim; got {head_dim}"),
            });
        }

        // Layer kinds: explicit list (transformers) or first-k-dense (hub dialect).
        let layer_kinds = if let Some(list) = o.get("mlp_layer_types").filter(|v| !v.is_null()) {
            let arr = list
                .as_array()
                .ok_or_else(|| r.bad("mlp_layer_types", "expected a list"))?;
            let kinds = arr
                .iter()
                .map(|x| match x.as_str() {
                    Some("dense") => Ok(LayerKind::Dense),
                    Some("sparse") | Some("moe") => Ok(LayerKind::Moe),
                    _ => Err(r.bad(
                        "mlp_layer_types",
                        &format!("entries must be \"dense\" or \"sparse\", found {x}"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if kinds.len() < num_hidden_layers {
                return Err(r.bad(
                    "mlp_layer_types",
                    &format!("has {} entries for {num_hidden_layers} layers", kinds.len()),
                ));
            }
            kinds[..num_hidden_layers].to_vec()
        } else {
            let k = match r.usize("first_k_dense_replace")? {
                Some(k) => k,
                // transformers' default: layer 0 dense, the rest sparse.
                None => 1.min(num_hidden_layers),
            };
            (0..num_hidden_layers)
                .map(|i| {
                    if i < k {
                        LayerKind::Dense
                    } else {
                        LayerKind::Moe
                    }
                })
                .collect()
        };
        let any_moe = layer_kinds.contains(&LayerKind::Moe);
        let any_dense = layer_kinds.contains(&LayerKind::Dense);

        let intermediate_size = if any_dense {
            r.req_usize("intermediate_size")?
        } else {
            r.usize("intermediate_size")?.unwrap_or(0)
        };
        let num_experts = first_usize(
            &r,
            &["num_experts", "num_local_experts", "n_routed_experts"],
        )?;
        let top_k = first_usize(&r, &["num_experts_per_tok", "moe_topk"])?;
        let moe_inter = first_usize(&r, &["moe_intermediate_size", "expert_hidden_dim"])?;
        let (num_experts, num_experts_per_tok, moe_intermediate_size) = if any_moe {
            (
                num_experts.ok_or_else(|| r.missing("num_experts"))?,
                top_k.ok_or_else(|| r.missing("num_experts_per_tok (or moe_topk)"))?,
                moe_inter
                    .ok_or_else(|| r.missing("moe_intermediate_size (or expert_hidden_dim)"))?,
            )
        } else {
            (
                num_experts.unwrap_or(0),
                top_k.unwrap_or(0),
                moe_inter.unwrap_or(0),
            )
        };
        if any_moe && (num_experts_per_tok == 0 || num_experts_per_tok > num_experts) {
            return Err(r.bad(
                "num_experts_per_tok",
                &format!(
                    "must be between 1 and num_experts ({num_experts}), got {num_experts_per_tok}"
                ),
            ));
        }
        let num_shared_experts = r.usize("num_shared_experts")?.unwrap_or(1);

        let rope_theta = rope_theta(&r)?;
        let sigmoid = match r.string("scoring_func")? {
            Some(s) if s == "softmax" => false,
            Some(s) if s == "sigmoid" => true,
            Some(s) => return Err(r.bad("scoring_func", &format!("unknown score function {s:?}"))),
            None => r.bool("moe_router_use_sigmoid")?.unwrap_or(true),
        };
        let gate = GateSettings {
            sigmoid,
            expert_bias: r.bool("moe_router_enable_expert_bias")?.unwrap_or(true),
            renormalize: match r.bool("route_norm")? {
                Some(b) => b,
                None => r.bool("norm_topk_prob")?.unwrap_or(true),
            },
            scaling: match r.f64("router_scaling_factor")? {
                Some(x) => x,
                None => r
                    .f64("routed_scaling_factor")?
                    .unwrap_or(HY3_DEFAULT_ROUTER_SCALING),
            },
            n_group: r.usize("n_group")?.unwrap_or(1).max(1),
            topk_group: r.usize("topk_group")?.unwrap_or(1).max(1),
        };
        let eos_token_ids = match o.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            Some(_) => {
                return Err(r.bad("eos_token_id", "expected an integer or a list of integers"))
            }
        };
        let cfg = ModelConfig {
            model_type,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: r.f64("rms_norm_eps")?.unwrap_or(1e-5),
            rope_theta,
            max_position_embeddings: r
                .usize("max_position_embeddings")?
                .unwrap_or(HY3_DEFAULT_MAX_POSITIONS),
            tie_word_embeddings: r.bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: r.bool("attention_bias")?.unwrap_or(false),
            qk_norm: match r.bool("qk_norm")? {
                Some(b) => b,
                None => r.bool("use_qk_norm")?.unwrap_or(true),
            },
            layer_kinds,
            num_experts,
            num_experts_per_tok,
            num_shared_experts,
            moe_intermediate_size,
            gate,
            moe_fp32_combine: r.bool("enable_moe_fp32_combine")?.unwrap_or(true),
            num_mtp_layers: first_usize(&r, &["num_nextn_predict_layers", "num_mtp_layers"])?
                .unwrap_or(0),
            eos_token_ids,
            bos_token_id: r.usize("bos_token_id")?.map(|x| x as u32),
            quantization: quantization(o)?,
        };
        cfg.gate_config()
            .validate()
            .map_err(|e| ModelError::Config {
                field: "num_experts_per_tok / n_group / topk_group".into(),
                message: e.to_string(),
            })?;
        Ok(cfg)
    }

    /// The gate as the op layer wants it.
    pub fn gate_config(&self) -> GateConfig {
        GateConfig {
            num_experts: self.num_experts.max(1),
            top_k: self.num_experts_per_tok.max(1),
            score: if self.gate.sigmoid {
                ScoreFunction::Sigmoid
            } else {
                ScoreFunction::Softmax
            },
            n_group: self.gate.n_group,
            topk_group: self.gate.topk_group,
            renormalize: self.gate.renormalize,
            scaling: self.gate.scaling as f32,
            renorm_eps: 1e-20,
        }
    }

    /// Writes the config in transformers' dialect (what `save_pretrained` would write).
    pub fn to_hf_json(&self) -> Value {
        let kinds: Vec<&str> = self
            .layer_kinds
            .iter()
            .map(|k| match k {
                LayerKind::Dense => "dense",
                LayerKind::Moe => "sparse",
            })
            .collect();
        let mut v = serde_json::json!({
            "architectures": ["HYV3ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": false,
            "mlp_layer_types": kinds,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_shared_experts": self.num_shared_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "router_scaling_factor": self.gate.scaling,
            "enable_moe_fp32_combine": self.moe_fp32_combine,
            "eos_token_id": self.eos_token_ids,
            "bos_token_id": self.bos_token_id,
            "torch_dtype": "bfloat16",
        });
        if self.num_mtp_layers > 0 {
            v["num_nextn_predict_layers"] = self.num_mtp_layers.into();
        }
        if !self.qk_norm {
            // Not a transformers key: Switchyard's switch for models without QK-norm.
            v["qk_norm"] = Value::Bool(false);
        }
        if !self.gate.sigmoid {
            v["scoring_func"] = Value::String("softmax".into());
        }
        if !self.gate.expert_bias {
            v["moe_router_enable_expert_bias"] = Value::Bool(false);
        }
        if !self.gate.renormalize {
            v["route_norm"] = Value::Bool(false);
        }
        if let Some(Quantization::Fp8 {
            activation_scheme,
            not_converted,
            weight_scales,
        }) = &self.quantization
        {
            let q = if *weight_scales == WeightScales::PerChannel {
                // transformers' FP8 config has no per-channel form; compressed-tensors has.
                let inputs = match activation_scheme {
                    ActivationScheme::WeightOnly => Value::Null,
                    scheme => serde_json::json!({
                        "num_bits": 8, "type": "float", "symmetric": true,
                        "dynamic": *scheme == ActivationScheme::Dynamic,
                        "strategy": if *scheme == ActivationScheme::Dynamic { "token" } else { "tensor" },
                    }),
                };
                serde_json::json!({
                    "quant_method": "compressed-tensors",
                    "format": "float-quantized",
                    "config_groups": {"group_0": {
                        "targets": ["Linear"],
                        "weights": {"num_bits": 8, "type": "float", "symmetric": true,
                                    "strategy": "channel", "dynamic": false},
                        "input_activations": inputs,
                    }},
                    "ignore": not_converted,
                })
            } else {
                let mut q = serde_json::json!({
                    "quant_method": "fp8",
                    "fmt": "e4m3",
                    // transformers' FP8 config has no weight-only scheme; "dynamic" stores no
                    // scales either.
                    "activation_scheme": match activation_scheme {
                        ActivationScheme::Static => "static",
                        ActivationScheme::Dynamic | ActivationScheme::WeightOnly => "dynamic",
                    },
                    "ignored_layers": not_converted,
                });
                if let WeightScales::Block(b) = weight_scales {
                    q["weight_block_size"] = serde_json::json!(b);
                }
                q
            };
            v["quantization_config"] = q;
        }
        v
    }

    /// The block of weights one FP8 scale covers, for [`crate::Checkpoint::with_weight_block`].
    pub fn weight_block(&self) -> Option<[usize; 2]> {
        self.quantization
            .as_ref()
            .and_then(Quantization::weight_block)
    }

    /// Parameters in the checkpoint (embedding and lm_head included, MTP excluded).
    pub fn num_parameters(&self) -> u64 {
        self.parameter_counts().0
    }

    /// `(total, active per token excluding the embedding lookup)`.
    pub fn parameter_counts(&self) -> (u64, u64) {
        let h = self.hidden_size as u64;
        let q = (self.num_attention_heads * self.head_dim) as u64;
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
        let attn = h * q * 2
            + h * kv * 2
            + if self.qk_norm {
                2 * self.head_dim as u64
            } else {
                0
            };
        let norms = 2 * h;
        let emb = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        let (mut total, mut active) = (emb + head + h, head + h);
        for k in &self.layer_kinds {
            let ffn_total;
            let ffn_active;
            match k {
                LayerKind::Dense => {
                    ffn_total = 3 * h * self.intermediate_size as u64;
                    ffn_active = ffn_total;
                }
                LayerKind::Moe => {
                    let e = 3 * h * self.moe_intermediate_size as u64;
                    let router = self.num_experts as u64 * h;
                    let bias = if self.gate.expert_bias {
                        self.num_experts as u64
                    } else {
                        0
                    };
                    let shared = e * self.num_shared_experts as u64;
                    ffn_total = e * self.num_experts as u64 + router + bias + shared;
                    ffn_active = e * self.num_experts_per_tok as u64 + router + bias + shared;
                }
            }
            total += attn + norms + ffn_total;
            active += attn + norms + ffn_active;
        }
        (total, active)
    }
}

fn first_usize(r: &Reader, keys: &[&str]) -> Result<Option<usize>, ModelError> {
    for k in keys {
        if let Some(v) = r.usize(k)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

fn rope_theta(r: &Reader) -> Result<f64, ModelError> {
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(p) = r.0.get(key).filter(|v| !v.is_null()) {
            let p = p
                .as_object()
                .ok_or_else(|| r.bad(key, "expected an object"))?;
            let ty = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            if ty != "default" {
                return Err(r.bad(
                    key,
                    &format!("rope_type {ty:?} is not supported (only \"default\": Hy3's theta is already NTK-scaled)"),
                ));
            }
            if let Some(t) = p.get("rope_theta") {
                return t
                    .as_f64()
                    .ok_or_else(|| r.bad(key, "rope_theta must be a number"));
            }
        }
    }
    Ok(r.f64("rope_theta")?.unwrap_or(HY3_DEFAULT_ROPE_THETA))
}

/// Typed access to config fields with errors that name the field.
struct Reader<'a>(&'a Map<String, Value>);

impl Reader<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn missing(&self, k: &str) -> ModelError {
        ModelError::Config {
            field: k.into(),
            message: "required field is missing".into(),
        }
    }
    fn bad(&self, k: &str, m: &str) -> ModelError {
        ModelError::Config {
            field: k.into(),
            message: m.into(),
        }
    }
    fn usize(&self, k: &str) -> Result<Option<usize>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            // Per-layer lists (Hunyuan's `moe_topk: [8, 8, ...]`) must agree; take the value.
            Some(Value::Array(a)) if !a.is_empty() => {
                let vals: Vec<Option<u64>> = a.iter().map(|x| x.as_u64()).collect();
                match vals[0] {
                    Some(first) if vals.iter().all(|v| *v == Some(first)) => {
                        Ok(Some(first as usize))
                    }
                    _ => Err(self.bad(
                        k,
                        "per-layer lists must hold one repeated non-negative integer",
                    )),
                }
            }
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.bad(k, &format!("expected a non-negative integer, found {v}"))),
        }
    }
    fn req_usize(&self, k: &str) -> Result<usize, ModelError> {
        self.usize(k)?.ok_or_else(|| self.missing(k))
    }
    fn f64(&self, k: &str) -> Result<Option<f64>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(k, &format!("expected a number, found {v}"))),
        }
    }
    fn bool(&self, k: &str) -> Result<Option<bool>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(k, &format!("expected true or false, found {v}"))),
        }
    }
    fn string(&self, k: &str) -> Result<Option<String>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.bad(k, &format!("expected a string, found {v}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf() -> Value {
        serde_json::json!({
            "model_type": "hy_v3", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "mlp_layer_types": ["dense", "sparse", "sparse"], "num_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 16, "num_shared_experts": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "router_scaling_factor": 2.5, "eos_token_id": [1, 2]
        })
    }

    #[test]
    fn both_dialects_normalise_to_the_same_config() {
        let a = ModelConfig::from_json(hf().as_object().unwrap()).unwrap();
        let hub = serde_json::json!({
            "model_type": "hy_v3", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "first_k_dense_replace": 1, "num_experts": 8, "moe_topk": [2, 2, 2],
            "expert_hidden_dim": 16, "num_shared_experts": 1, "rope_theta": 10000.0,
            "qk_norm": true, "moe_router_use_sigmoid": true, "moe_router_enable_expert_bias": true,
            "route_norm": true, "router_scaling_factor": 2.5, "eos_token_id": [1, 2]
        });
        let b = ModelConfig::from_json(hub.as_object().unwrap()).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.layer_kinds,
            vec![LayerKind::Dense, LayerKind::Moe, LayerKind::Moe]
        );
        // Round trip through the transformers dialect.
        let c = ModelConfig::from_json(a.to_hf_json().as_object().unwrap()).unwrap();
        assert_eq!(a, c);
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = hf();
        v["model_type"] = "llama".into();
        let e = ModelConfig::from_json(v.as_object().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("llama") && e.contains("hy_v3"), "{e}");
        let mut v = hf();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_json(v.as_object().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_size") && e.contains("missing"), "{e}");
        let mut v = hf();
        v["num_experts_per_tok"] = 9.into();
        let e = ModelConfig::from_json(v.as_object().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_experts_per_tok"), "{e}");
        let mut v = hf();
        v["num_attention_heads"] = "four".into();
        let e = ModelConfig::from_json(v.as_object().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("num_attention_heads") && e.contains("integer"),
            "{e}"
        );
        let mut v = hf();
        v["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let e = ModelConfig::from_json(v.as_object().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("yarn"), "{e}");
        let e = ModelConfig::from_json_str("{not json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("JSON"), "{e}");
    }

    #[test]
    fn hy3_preset_counts_match_the_model_card() {
        let cfg = crate::presets::preset("hy3").unwrap();
        let (total, active) = cfg.parameter_counts();
        // Model card: 295B total, 21B active (MTP excluded here).
        assert!((280e9..300e9).contains(&(total as f64)), "{total}");
        assert!((19e9..23e9).contains(&(active as f64)), "{active}");
    }
}
