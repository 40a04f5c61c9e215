//! The hy_v3 (Tencent Hy3) MoE transformer, following transformers' `modeling_hy_v3.py`:
//! pre-norm decoder layers; attention with per-head QK RMSNorm applied **before** NeoX
//! (half-split) RoPE, GQA and a causal softmax in f32; a dense SwiGLU MLP for dense layers; an
//! MoE block for the others (sigmoid gate with a selection-only expert bias, renormalised top-k
//! weights × `router_scaling_factor`, routed experts plus an ungated shared expert, combined in
//! f32); final RMSNorm and an untied lm_head.
//!
//! Layers are built from [`Weights`] paths that mirror the checkpoint's tensor names. The MoE
//! block calls the op layer (`switchyard_kernels`) for gating, dispatch and the expert GEMMs.
//! With the `cuda` feature and the weights on a CUDA device it calls the CUDA ops instead
//! (`MoeExec`, decided once at load): bf16 models run gate, dispatch and experts as kernels;
//! f32 models run the CUDA gate with the reference expert GEMMs. Everything else is candle ops
//! with CUDA implementations, and a paged KV cache created on the device
//! ([`HyV3Model::try_new_paged_cache`]) runs the CUDA paged-attention kernels.
//!
//! Tensor/expert parallel ([`HyV3Model::load_parallel`], [`crate::parallel`]): a rank loads only
//! its slices (the layout of [`crate::plan`]) and its forward pass adds the collectives:
//! attention over its heads then a row-parallel `o_proj` and one all-reduce (the `o_proj` bias
//! after it); dense MLPs and the shared expert column- then row-parallel; routed experts by
//! whole experts: the gate runs on every rank (same input bits, same choices) and each rank
//! runs only the (token, expert) pairs of its experts, adding its shared-expert slice, then one
//! all-reduce per MoE layer; the embedding is a masked lookup of the rank's vocabulary rows
//! plus an all-reduce, the lm_head the rank's vocabulary columns plus an all-gather. One rank
//! (world 1) takes none of these paths: no collective, no extra copy.
//!
//! In-situ quantization ([`LoadOptions::quantize`], [`crate::isq`]): projections are
//! quantized to Q8 or Q4 while loading (after q/k/v stacking and a rank's narrowing) and run in
//! `switchyard_kernels::cpu_quant`; MoE blocks take `MoeExec::Quant`, and activations are f32
//! throughout ([`HyV3Model::activation_dtype`]).
//!
//! [`MoeLayer`] (`hy_v3/moe_layer.rs`) is one MoE block on its own, built and run by this
//! file's code, for the `moe` bench and for tests.

mod moe_layer;

pub use moe_layer::{MoeLayer, MoeWeights, SharedExpertWeights};

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, D};
use switchyard_kernels::cpu_q8::Q8_BLOCK;
use switchyard_kernels::cpu_quant::{QuantExperts, QuantMatrix, QuantMlp};
use switchyard_kernels::{
    dispatch, experts_forward, gate_topk, DispatchPlan, ExpertWeights, GateConfig, GateOutput,
};

use crate::config::{LayerKind, ModelConfig};
use crate::isq::{self, IsqType};
use crate::kv_cache::KvCache;
use crate::paged_cache::{KvDtype, PagedBatchMeta, PagedKvCache};
use crate::parallel::{Communicator, Shard, TP_FLAG};
use crate::weights::{Checkpoint, Weights};
use crate::ModelError;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype for weights and activations (router and expert bias always stay f32).
    pub dtype: DType,
    /// Device to load onto.
    pub device: Device,
    /// Load the MTP (next-n prediction) layers stored after the decoder layers.
    pub load_mtp: bool,
    /// Quantize the projection weights while loading ([`crate::isq`]; CPU only). The model
    /// then computes in f32 (see [`HyV3Model::activation_dtype`]) and `dtype` is the stored
    /// dtype of what stays dense: the embedding and MTP tensors.
    pub quantize: Option<IsqType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            load_mtp: false,
            quantize: None,
        }
    }
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every input position (`[T, vocab]`).
    All,
    /// Only the last position (`[1, vocab]`), all a generation step needs.
    Last,
}

/// RMSNorm with f32 accumulation: `w · (x / sqrt(mean(x²) + eps))`.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(w: &Weights, size: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(Self {
            weight: w.get(&[size], "weight")?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

/// A projection's `[out, in]` weight: as loaded, or quantized at load ([`crate::isq`]).
#[derive(Debug, Clone)]
enum LinearWeight {
    Dense(Tensor),
    /// Inputs zero-padded to whole blocks when `in` is not a multiple of [`Q8_BLOCK`].
    Quant(Arc<QuantMatrix>),
}

impl LinearWeight {
    /// Quantizes a dense weight when `isq` asks for it; the dense tensor is dropped.
    fn quantize(w: Tensor, isq: Option<IsqType>) -> Result<Self, ModelError> {
        Ok(match isq {
            None => LinearWeight::Dense(w),
            Some(q) => {
                let w = isq::pad_last(&w, isq::padded(w.dim(1)?))?;
                LinearWeight::Quant(Arc::new(QuantMatrix::from_tensor(q.kind(), &w)?))
            }
        })
    }

    /// `x · wᵀ` for `x` `[T, in]`.
    fn matmul_t(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match self {
            LinearWeight::Dense(w) => matmul_t(x, w),
            LinearWeight::Quant(q) => Ok(switchyard_kernels::cpu_quant::linear_quant(
                &isq::pad_last(x, q.cols())?,
                q,
            )?),
        }
    }

    /// Bytes held.
    fn bytes(&self) -> u64 {
        match self {
            LinearWeight::Dense(w) => tensor_bytes(w),
            LinearWeight::Quant(q) => q.memory_bytes() as u64,
        }
    }
}

/// Bytes of a tensor's elements.
fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// `y = x · Wᵀ (+ b)` with the weight kept as stored (`[out, in]`) or quantized.
#[derive(Debug, Clone)]
struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(w: &Weights, out: usize, inp: usize, bias: bool) -> Result<Self, ModelError> {
        Ok(Self {
            weight: LinearWeight::Dense(w.get(&[out, inp], "weight")?),
            bias: if bias {
                Some(w.get(&[out], "bias")?)
            } else {
                None
            },
        })
    }

    /// Loads entries `start..start + len` of the weight along `dim` (0: output rows,
    /// column-parallel, with the bias rows; 1: input columns, row-parallel, bias left to the
    /// caller to add once after the all-reduce).
    fn load_split(
        w: &Weights,
        (out, inp): (usize, usize),
        bias: bool,
        dim: usize,
        (start, len): (usize, usize),
    ) -> Result<Self, ModelError> {
        let weight = LinearWeight::Dense(w.get_narrow(&[out, inp], "weight", dim, start, len)?);
        let bias = if bias && dim == 0 {
            Some(w.get_narrow(&[out], "bias", 0, start, len)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// q/k/v stacked into one projection (their weights and, when all have one, biases),
    /// quantized after stacking when `isq` asks for it.
    fn stack_qkv([q, k, v]: [Linear; 3], isq: Option<IsqType>) -> Result<Self, ModelError> {
        let bias = match (q.bias, k.bias, v.bias) {
            (Some(qb), Some(kb), Some(vb)) => Some(Tensor::cat(&[qb, kb, vb], 0)?),
            _ => None,
        };
        let dense = |l: LinearWeight| match l {
            LinearWeight::Dense(t) => Ok(t),
            LinearWeight::Quant(_) => Err(ModelError::InvalidInput(
                "q/k/v are stacked before quantizing".into(),
            )),
        };
        let w = Tensor::cat(&[dense(q.weight)?, dense(k.weight)?, dense(v.weight)?], 0)?;
        Ok(Self {
            weight: LinearWeight::quantize(w, isq)?,
            bias,
        })
    }

    /// This projection with its weight quantized when `isq` asks for it.
    fn quantized(self, isq: Option<IsqType>) -> Result<Self, ModelError> {
        Ok(match self.weight {
            LinearWeight::Dense(w) => Self {
                weight: LinearWeight::quantize(w, isq)?,
                bias: self.bias,
            },
            quantized => Self {
                weight: quantized,
                bias: self.bias,
            },
        })
    }

    /// Bytes of the weight and bias.
    fn bytes(&self) -> u64 {
        self.weight.bytes() + self.bias.as_ref().map_or(0, tensor_bytes)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let y = self.weight.matmul_t(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `x · wᵀ` for `x` `[T, in]` and `w` `[out, in]` ([`switchyard_kernels::cpu_gemv::linear`]).
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor, ModelError> {
    Ok(switchyard_kernels::cpu_gemv::linear(x, w)?)
}

/// `x + y`: the op layer's bf16 add on the CPU (same rounding as candle's), else candle's.
fn residual_add(x: &Tensor, y: &Tensor) -> Result<Tensor, ModelError> {
    match switchyard_kernels::cpu_ops::add_bf16(x, y)? {
        Some(s) => Ok(s),
        None => Ok((x + y)?),
    }
}

/// SwiGLU MLP with gate and up fused into one `[2·I, H]` matrix at load time.
/// Most tokens for which a dense MLP or the shared expert runs in `cpu_moe`'s fused two-pass
/// path (bf16 on the CPU). The fusion saves parallel loops, which is what decode pays for; at
/// prefill sizes the per-projection GEMV path is faster (small preset bf16, batch 16 × 128
/// prompt tokens: prefill 208–232 tok/s fused for every size vs 272–284 with this limit;
/// batch 4: 251–263 vs 287–302; decode unchanged). With AMX tiles in both paths it still holds
/// (2026-11-29, batch 4 × 128: 1037–1112 fused vs 1173–1257 unfused). Quantized weights take
/// their fused path at any size (there is no unfused quantized path).
const MAX_FUSED_MLP_TOKENS: usize = 64;

/// A SwiGLU MLP's weights, gate and up fused: as loaded, or quantized at load.
#[derive(Debug, Clone)]
enum MlpWeights {
    /// `gate_up` `[2·I, H]` (gate rows first) and `down` `[H, I]`.
    Dense { gate_up: Tensor, down: Tensor },
    /// Zero-padded to whole blocks ([`isq::pad_swiglu`]); its output is `H'` wide.
    Quant(QuantMlp),
}

/// Names the weights a load-time error came from: a weight `--quantize` cannot represent (not
/// finite; for q4 also beyond f16's range) is an op-layer error naming its row and column, and
/// this puts the module's checkpoint path in front (`model.layers.3.mlp.experts.17: ...`) and
/// reports it against the flag. Other errors pass through.
fn quantizing(what: impl std::fmt::Display) -> impl FnOnce(ModelError) -> ModelError {
    move |e| match e {
        ModelError::Kernel(k) => ModelError::LoadOption {
            flag: isq::QUANTIZE_FLAG.into(),
            message: format!("{what}: {k}"),
        },
        ModelError::LoadOption { flag, message } if flag == isq::QUANTIZE_FLAG => {
            ModelError::LoadOption {
                flag,
                message: format!("{what}.{message}"),
            }
        }
        e => e,
    }
}

/// Quantizes SwiGLU weights `gate_up` `[2·I, H]` and `down` `[H, I]`, padded to whole blocks;
/// the dense tensors are dropped.
fn quant_mlp(isq: IsqType, gate_up: Tensor, down: Tensor) -> Result<QuantMlp, ModelError> {
    let (gate_up, down) = isq::pad_swiglu(gate_up, down, Q8_BLOCK)?;
    Ok(QuantMlp::from_tensors(isq.kind(), &gate_up, &down)?)
}

#[derive(Debug, Clone)]
struct Mlp {
    weights: MlpWeights,
    inter: usize,
    hidden: usize,
}

impl Mlp {
    /// Fuses gate and up (`[I, H]` each) and quantizes when `isq` asks for it.
    fn new(
        gate: Tensor,
        up: Tensor,
        down: Tensor,
        isq: Option<IsqType>,
    ) -> Result<Self, ModelError> {
        let (inter, hidden) = gate.dims2()?;
        let gate_up = Tensor::cat(&[gate, up], 0)?;
        let weights = match isq {
            None => MlpWeights::Dense { gate_up, down },
            Some(q) => MlpWeights::Quant(quant_mlp(q, gate_up, down)?),
        };
        Ok(Self {
            weights,
            inter,
            hidden,
        })
    }

    fn load(
        w: &Weights,
        hidden: usize,
        inter: usize,
        isq: Option<IsqType>,
    ) -> Result<Self, ModelError> {
        let g = w.pp("gate_proj").get(&[inter, hidden], "weight")?;
        let u = w.pp("up_proj").get(&[inter, hidden], "weight")?;
        let d = w.pp("down_proj").get(&[hidden, inter], "weight")?;
        Self::new(g, u, d, isq)
    }

    /// This rank's slice along the intermediate size (gate/up rows, down columns); `None`
    /// when the slice is empty (more ranks than intermediate rows).
    fn load_shard(
        w: &Weights,
        hidden: usize,
        inter: usize,
        shard: &Shard,
        isq: Option<IsqType>,
    ) -> Result<Option<Self>, ModelError> {
        if shard.is_single() {
            return Self::load(w, hidden, inter, isq).map(Some);
        }
        let (i0, il) = shard.split(inter);
        if il == 0 {
            return Ok(None);
        }
        let g = w
            .pp("gate_proj")
            .get_narrow(&[inter, hidden], "weight", 0, i0, il)?;
        let u = w
            .pp("up_proj")
            .get_narrow(&[inter, hidden], "weight", 0, i0, il)?;
        let d = w
            .pp("down_proj")
            .get_narrow(&[hidden, inter], "weight", 1, i0, il)?;
        Self::new(g, u, d, isq).map(Some)
    }

    /// `(gate_up, down)` when the weights are dense.
    fn dense(&self) -> Option<(&Tensor, &Tensor)> {
        match &self.weights {
            MlpWeights::Dense { gate_up, down } => Some((gate_up, down)),
            MlpWeights::Quant(_) => None,
        }
    }

    /// The quantized weights, when quantized.
    fn quantized(&self) -> Option<&QuantMlp> {
        match &self.weights {
            MlpWeights::Quant(q) => Some(q),
            MlpWeights::Dense { .. } => None,
        }
    }

    /// Bytes held.
    fn bytes(&self) -> u64 {
        match &self.weights {
            MlpWeights::Dense { gate_up, down } => tensor_bytes(gate_up) + tensor_bytes(down),
            MlpWeights::Quant(q) => q.memory_bytes() as u64,
        }
    }

    /// The MLP's output in `out` (the input's dtype, or f32 for a rank's partial result that
    /// is all-reduced before rounding).
    fn forward(&self, x: &Tensor, out: DType) -> Result<Tensor, ModelError> {
        let (gate_up, down) = match &self.weights {
            // Quantized: both projections in the kernels' two parallel passes at any token
            // count (there is no unfused quantized path to fall back to), f32 out.
            MlpWeights::Quant(q) => {
                let xp = isq::pad_last(x, q.hidden())?;
                let y = switchyard_kernels::cpu_quant::mlp_quant(&xp, q)?;
                return Ok(narrow_hidden(y, self.hidden)?.to_dtype(out)?);
            }
            MlpWeights::Dense { gate_up, down } => (gate_up, down),
        };
        // bf16 on the CPU at decode sizes: both projections in two parallel passes, rounded as
        // the ops below round.
        if x.dim(0)? <= MAX_FUSED_MLP_TOKENS {
            if let Some(y) = switchyard_kernels::moe::mlp_forward_cpu_bf16(x, gate_up, down)? {
                return Ok(y.to_dtype(out)?);
            }
        }
        let gu = matmul_t(x, gate_up)?;
        let act = (gu.narrow(D::Minus1, 0, self.inter)?.silu()?
            * gu.narrow(D::Minus1, self.inter, self.inter)?)?;
        Ok(matmul_t(&act, down)?.to_dtype(out)?)
    }
}

/// The first `hidden` columns of a `[T, H']` result computed with zero-padded weights.
fn narrow_hidden(y: Tensor, hidden: usize) -> Result<Tensor, ModelError> {
    Ok(if y.dim(1)? == hidden {
        y
    } else {
        y.narrow(1, 0, hidden)?.contiguous()?
    })
}

/// Rotary embedding tables computed on demand for the positions of a step.
#[derive(Debug, Clone)]
struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.head_dim;
        let inv_freq = (0..d / 2)
            .map(|i| (1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64)) as f32)
            .collect();
        Self { inv_freq }
    }

    /// `(cos, sin)` of shape `[T, head_dim/2]` for the given positions.
    fn tables(
        &self,
        positions: impl ExactSizeIterator<Item = usize>,
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let half = self.inv_freq.len();
        let t = positions.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in positions {
            for &f in &self.inv_freq {
                // f32 product as transformers computes it, then cos/sin.
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), dev)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (t, half), dev)?.to_dtype(dtype)?,
        ))
    }
}

#[derive(Debug, Clone)]
struct Attention {
    /// `q_proj`, `k_proj` and `v_proj` stacked at load into one `[(nh + 2·nkv)·hd, H]`
    /// projection: one pass over the input, one parallel loop at decode instead of three.
    qkv_proj: Linear,
    /// Row-parallel on a rank of several: its bias is then in `o_bias`.
    o_proj: Linear,
    /// `o_proj`'s bias when `o_proj` is row-parallel: added once, after the all-reduce.
    o_bias: Option<Tensor>,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    /// The checkpoint's per-layer KV cache scales `(k_scale, v_scale)` (FP8 checkpoints
    /// calibrated for an FP8 KV cache); applied only when the paged cache stores FP8.
    kv_scales: Option<(f32, f32)>,
}

/// Where FP8 checkpoints keep a layer's KV cache scales, under `self_attn`: compressed-tensors'
/// and ModelOpt's `k_scale`/`v_scale`, AutoFP8's `k_proj.output_scale`/`v_proj.output_scale`,
/// and the older single `kv_scale` for both.
const KV_SCALE_NAMES: [(&str, &str); 3] = [
    ("k_scale", "v_scale"),
    ("k_proj.output_scale", "v_proj.output_scale"),
    ("kv_scale", "kv_scale"),
];

/// A layer's KV cache scales, when the checkpoint has them as one positive finite number each
/// (per-head scales are left out with a warning: the FP8 cache then uses a unit scale, as
/// without scales).
fn load_kv_scales(w: &Weights) -> Result<Option<(f32, f32)>, ModelError> {
    let Some((kn, vn)) = KV_SCALE_NAMES
        .iter()
        .find(|(k, v)| w.contains(k) && w.contains(v))
    else {
        return Ok(None);
    };
    let read = |name: &str| -> Result<Option<f32>, ModelError> {
        let path = w.path(name);
        let shape = w.checkpoint().shape_of(&path)?;
        if shape.iter().product::<usize>() != 1 {
            tracing::warn!(
                tensor = %path,
                ?shape,
                "KV cache scales other than one per tensor are not supported; an FP8 KV cache \
                 uses a unit scale for this layer"
            );
            return Ok(None);
        }
        let v = w.get_f32(&shape, name)?.flatten_all()?.to_vec1::<f32>()?[0];
        if !(v.is_finite() && v > 0.0) {
            return Err(ModelError::Quantization {
                name: path,
                path: w.checkpoint().dir().to_path_buf(),
                message: format!("holds {v}; KV cache scales must be finite and greater than zero"),
            });
        }
        Ok(Some(v))
    };
    Ok(match (read(kn)?, read(vn)?) {
        (Some(k), Some(v)) => Some((k, v)),
        _ => None,
    })
}

impl Attention {
    fn load(
        w: &Weights,
        cfg: &ModelConfig,
        shard: &Shard,
        isq: Option<IsqType>,
    ) -> Result<Self, ModelError> {
        if !shard.is_single() {
            return Self::load_shard(w, cfg, shard, isq);
        }
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let b = cfg.attention_bias;
        let norm = |name: &str| -> Result<Option<RmsNorm>, ModelError> {
            if cfg.qk_norm {
                Ok(Some(RmsNorm::load(&w.pp(name), hd, cfg.rms_norm_eps)?))
            } else {
                Ok(None)
            }
        };
        let q = Linear::load(&w.pp("q_proj"), nh * hd, h, b)?;
        let k = Linear::load(&w.pp("k_proj"), nkv * hd, h, b)?;
        let v = Linear::load(&w.pp("v_proj"), nkv * hd, h, b)?;
        Ok(Self {
            qkv_proj: Linear::stack_qkv([q, k, v], isq)?,
            o_proj: Linear::load(&w.pp("o_proj"), h, nh * hd, b)?.quantized(isq)?,
            o_bias: None,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            scale: 1.0 / (hd as f64).sqrt(),
            kv_scales: load_kv_scales(w)?,
        })
    }

    /// This rank's heads: its query heads' rows of `q_proj`, its KV heads' rows of `k_proj`
    /// and `v_proj`, the matching columns of `o_proj`; QK-norms replicated.
    fn load_shard(
        w: &Weights,
        cfg: &ModelConfig,
        shard: &Shard,
        isq: Option<IsqType>,
    ) -> Result<Self, ModelError> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (q0, qh) = shard.query_heads(cfg);
        let (k0, kh) = shard.kv_heads(cfg);
        let b = cfg.attention_bias;
        let norm = |name: &str| -> Result<Option<RmsNorm>, ModelError> {
            if cfg.qk_norm {
                Ok(Some(RmsNorm::load(&w.pp(name), hd, cfg.rms_norm_eps)?))
            } else {
                Ok(None)
            }
        };
        let q = Linear::load_split(&w.pp("q_proj"), (nh * hd, h), b, 0, (q0 * hd, qh * hd))?;
        let kv_rows = (k0 * hd, kh * hd);
        let k = Linear::load_split(&w.pp("k_proj"), (nkv * hd, h), b, 0, kv_rows)?;
        let v = Linear::load_split(&w.pp("v_proj"), (nkv * hd, h), b, 0, kv_rows)?;
        let o = w.pp("o_proj");
        Ok(Self {
            qkv_proj: Linear::stack_qkv([q, k, v], isq)?,
            o_proj: Linear::load_split(&o, (h, nh * hd), b, 1, (q0 * hd, qh * hd))?
                .quantized(isq)?,
            o_bias: if b { Some(o.get(&[h], "bias")?) } else { None },
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            heads: qh,
            kv_heads: kh,
            head_dim: hd,
            scale: 1.0 / (hd as f64).sqrt(),
            kv_scales: load_kv_scales(w)?,
        })
    }

    /// Adds the row-parallel `o_proj`'s bias to the all-reduced output (nothing on one rank,
    /// where `o_proj` carries its own bias).
    fn add_o_bias(&self, y: Tensor) -> Result<Tensor, ModelError> {
        Ok(match &self.o_bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Projections, QK-norm and RoPE: returns q `[nh, T, hd]`, k and v `[nkv, T, hd]`.
    fn qkv(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor), ModelError> {
        let (t, _) = x.dims2()?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let qkv = self.qkv_proj.forward(x)?;
        let mut q = qkv.narrow(1, 0, nh * hd)?.reshape((t, nh, hd))?;
        let mut k = qkv.narrow(1, nh * hd, nkv * hd)?.reshape((t, nkv, hd))?;
        let v = qkv
            .narrow(1, (nh + nkv) * hd, nkv * hd)?
            .reshape((t, nkv, hd))?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let q =
            candle_nn::rotary_emb::rope(&q.transpose(0, 1)?.unsqueeze(0)?.contiguous()?, cos, sin)?
                .squeeze(0)?;
        let k =
            candle_nn::rotary_emb::rope(&k.transpose(0, 1)?.unsqueeze(0)?.contiguous()?, cos, sin)?
                .squeeze(0)?;
        let v = v.transpose(0, 1)?.contiguous()?;
        Ok((q, k, v))
    }

    /// Attention for a batch of sequences whose K/V live in the paged cache.
    fn forward_paged(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        kv: &mut PagedKvCache,
        layer: usize,
        batch: &PagedBatchMeta<'_>,
    ) -> Result<Tensor, ModelError> {
        #[cfg(feature = "cuda")]
        if let Some(db) = &batch.device {
            return self.forward_paged_cuda(x, cos, sin, kv, layer, db);
        }
        let (t, _) = x.dims2()?;
        let (nh, hd) = (self.heads, self.head_dim);
        let (q, k, v) = self.qkv(x, cos, sin)?;
        let f32v = |x: Tensor| -> Result<Vec<f32>, ModelError> {
            Ok(x.transpose(0, 1)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let (q, mut k, mut v) = (f32v(q)?, f32v(k)?, f32v(v)?);
        let (ks, vs) = self.cache_scales(kv.dtype());
        // An FP8 cache with the checkpoint's scales stores k / k_scale and v / v_scale; the
        // scores take k_scale back through the softmax scale, the output v_scale.
        if ks != 1.0 || vs != 1.0 {
            k.iter_mut().for_each(|x| *x /= ks);
            v.iter_mut().for_each(|x| *x /= vs);
        }
        let mut out = vec![0f32; t * nh * hd];
        let scale = self.scale as f32 * ks;
        kv.write_and_attend(layer, &k, &v, batch, &q, nh, scale, &mut out)?;
        if vs != 1.0 {
            out.iter_mut().for_each(|x| *x *= vs);
        }
        let out = Tensor::from_vec(out, (t, nh * hd), x.device())?.to_dtype(x.dtype())?;
        self.o_proj.forward(&out)
    }

    /// `(k_scale, v_scale)` for a paged cache of `dtype`: the checkpoint's for FP8, else 1.
    fn cache_scales(&self, dtype: KvDtype) -> (f32, f32) {
        match (dtype, self.kv_scales) {
            (KvDtype::Fp8, Some(s)) => s,
            _ => (1.0, 1.0),
        }
    }

    /// [`Self::forward_paged`] with the cache on a CUDA device: the KV write and paged
    /// attention run as kernels over the batch's device-side block tables.
    #[cfg(feature = "cuda")]
    fn forward_paged_cuda(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        kv: &PagedKvCache,
        layer: usize,
        batch: &switchyard_kernels::cuda::PagedBatch,
    ) -> Result<Tensor, ModelError> {
        use switchyard_kernels::cuda::{paged_attention, reshape_and_cache};
        let (t, _) = x.dims2()?;
        let (nh, hd) = (self.heads, self.head_dim);
        let (q, k, v) = self.qkv(x, cos, sin)?;
        let (k_cache, v_cache) = kv.device_layer(layer)?;
        // The write takes f32 or the cache's own dtype.
        let kv_in = |x: Tensor| -> Result<Tensor, ModelError> {
            let x = x.transpose(0, 1)?;
            let x = if x.dtype() == k_cache.dtype() {
                x
            } else {
                x.to_dtype(DType::F32)?
            };
            Ok(x.contiguous()?)
        };
        let (ks, vs) = self.cache_scales(kv.dtype());
        let (k, v) = if ks != 1.0 || vs != 1.0 {
            let div = |x: Tensor, s: f32| -> Result<Tensor, ModelError> {
                Ok(x.to_dtype(DType::F32)?
                    .broadcast_div(&Tensor::new(s, x.device())?)?)
            };
            (div(k, ks)?, div(v, vs)?)
        } else {
            (k, v)
        };
        reshape_and_cache(&kv_in(k)?, &kv_in(v)?, &batch.slots, k_cache, v_cache)?;
        let q = q.transpose(0, 1)?.to_dtype(DType::F32)?.contiguous()?;
        let out = paged_attention(&q, k_cache, v_cache, batch, self.scale as f32 * ks)?;
        let out = if vs != 1.0 {
            out.affine(vs as f64, 0.0)?
        } else {
            out
        };
        let out = out.reshape((t, nh * hd))?.to_dtype(x.dtype())?;
        self.o_proj.forward(&out)
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor, ModelError> {
        let (t, _) = x.dims2()?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (q, k, v) = self.qkv(x, cos, sin)?;
        let pos0 = cache.len();
        let (k_all, v_all) = cache.append(layer, &k, &v)?;
        let s = k_all.dim(1)?;
        let g = nh / nkv;
        // Group query heads by their KV head: [nkv, g·T, hd]; no repeat of K/V.
        let qg = q.reshape((nkv, g * t, hd))?;
        let scores = (qg.matmul(&k_all.t()?)? * self.scale)?.to_dtype(DType::F32)?;
        let scores = if t > 1 {
            let mask = causal_mask(t, s, pos0, g, x.device())?;
            scores.broadcast_add(&mask)?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v_all.dtype())?;
        let out = probs.matmul(&v_all.contiguous()?)?; // [nkv, g·T, hd]
        let out = out
            .reshape((nh, t, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((t, nh * hd))?;
        self.o_proj.forward(&out)
    }
}

/// Additive causal mask `[g·T, S]`: row `(group, t)` sees keys at positions `<= pos0 + t`.
fn causal_mask(
    t: usize,
    s: usize,
    pos0: usize,
    g: usize,
    dev: &Device,
) -> Result<Tensor, ModelError> {
    let mut m = vec![0f32; g * t * s];
    for gi in 0..g {
        for ti in 0..t {
            let row = &mut m[(gi * t + ti) * s..(gi * t + ti + 1) * s];
            for (j, v) in row.iter_mut().enumerate() {
                if j > pos0 + ti {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (g * t, s), dev)?)
}

/// MoE block: gate → dispatch → routed experts, plus the shared expert.
#[derive(Debug, Clone)]
struct Moe {
    router: Tensor,
    gate: GateConfig,
    /// The shared expert, unless the CUDA path runs it as one more expert column.
    shared: Option<Mlp>,
    fp32_combine: bool,
    exec: MoeExec,
    /// First routed expert this rank holds (0 on one rank).
    expert_start: usize,
    /// Routed experts this rank holds (all of them on one rank).
    local_experts: usize,
}

/// How an MoE block computes its routed experts. Chosen once at load by [`MoeExec::choose`]
/// from the device, the compute dtype and the gate's shape.
#[derive(Debug, Clone)]
enum MoeExec {
    /// The op layer's reference ops: gate top-k and dispatch on the host, one GEMM pair per
    /// active expert through candle. Any device (on a GPU the router logits go to the host).
    Reference {
        bias: Option<Vec<f32>>,
        experts: ExpertWeights,
    },
    /// CUDA, f32 compute (the expert kernels are bf16-only, and f32 is the exactness mode): the
    /// CUDA gate, then the T×k routing copied to the host and the reference expert GEMMs on
    /// the device.
    #[cfg(feature = "cuda")]
    CudaGate {
        bias: Option<Tensor>,
        experts: ExpertWeights,
    },
    /// CUDA, bf16 compute: gate top-k, dispatch and the expert kernels of
    /// `switchyard_kernels::cuda`, no host synchronisation.
    #[cfg(feature = "cuda")]
    CudaKernels(cuda_moe::CudaMoe),
    /// Experts quantized at load (`--quantize q8|q4`, CPU): gate top-k and dispatch on the
    /// host, then `cpu_quant::experts_quant`'s two parallel passes over the active experts,
    /// with a quantized shared expert in the same passes; f32 out. Weights zero-padded to whole
    /// blocks.
    Quant {
        bias: Option<Vec<f32>>,
        experts: QuantExperts,
    },
}

/// The expert bias as the host-side gate takes it.
fn host_bias(bias: Option<Tensor>) -> Result<Option<Vec<f32>>, ModelError> {
    Ok(bias.map(|b| b.to_vec1::<f32>()).transpose()?)
}

impl MoeExec {
    /// Picks the execution for a layer whose weights are loaded; returns it with the shared
    /// expert the caller still has to run (`None` when the CUDA kernels took it as a column).
    fn choose(
        experts: ExpertWeights,
        bias: Option<Tensor>,
        shared: Option<Mlp>,
        gate: &GateConfig,
        dtype: DType,
    ) -> Result<(Self, Option<Mlp>), ModelError> {
        #[cfg(feature = "cuda")]
        if experts.gate_up.device().is_cuda()
            && switchyard_kernels::cuda::MoeKernels::check_gate_config(gate).is_ok()
        {
            if dtype == DType::BF16 {
                let (c, shared) = cuda_moe::CudaMoe::new(experts, bias, shared)?;
                return Ok((MoeExec::CudaKernels(c), shared));
            }
            return Ok((MoeExec::CudaGate { bias, experts }, shared));
        }
        let _ = (gate, dtype);
        let bias = host_bias(bias)?;
        Ok((MoeExec::Reference { bias, experts }, shared))
    }

    /// [`MoeExec::Quant`] from dense routed experts (`[2I, H]` and `[H, I]` each), quantized
    /// one at a time: the dense copy of one expert is the peak beyond the quantized weights
    /// when `experts` reads them lazily.
    /// `first` is the first expert's id (errors name `experts.{id}`).
    fn quantized(
        isq: IsqType,
        first: usize,
        experts: impl Iterator<Item = Result<(Tensor, Tensor), ModelError>>,
        bias: Option<Tensor>,
    ) -> Result<Self, ModelError> {
        let experts = experts
            .enumerate()
            .map(|(j, r)| {
                r.and_then(|(gu, dn)| quant_mlp(isq, gu, dn))
                    .map_err(quantizing(format!("experts.{}", first + j)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MoeExec::Quant {
            bias: host_bias(bias)?,
            experts: QuantExperts::new(experts)?,
        })
    }

    fn name(&self) -> &'static str {
        match self {
            MoeExec::Reference { .. } => "reference",
            #[cfg(feature = "cuda")]
            MoeExec::CudaGate { .. } => "cuda-gate+reference-experts",
            #[cfg(feature = "cuda")]
            MoeExec::CudaKernels(_) => "cuda-kernels",
            MoeExec::Quant { experts, .. } => experts.kind().name(),
        }
    }
}

impl Moe {
    fn load(
        w: &Weights,
        cfg: &ModelConfig,
        shard: &Shard,
        isq: Option<IsqType>,
    ) -> Result<Self, ModelError> {
        let (h, e, i) = (cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size);
        let (e0, el) = shard.split(e);
        let router = w.pp("gate").get_f32(&[e, h], "weight")?;
        let bias = if cfg.gate.expert_bias {
            Some(w.get_f32(&[e], "e_score_correction_bias")?)
        } else {
            None
        };
        let shared = if cfg.num_shared_experts > 0 {
            Mlp::load_shard(
                &w.pp("shared_experts"),
                h,
                i * cfg.num_shared_experts,
                shard,
                isq,
            )
            .map_err(quantizing("shared_experts"))?
        } else {
            None
        };
        let ex = w.pp("experts");
        let fused = ex.contains("gate_up_proj");
        // Expert `j`'s `[2I, H]` and `[H, I]` weights from either layout.
        let expert = |j: usize| -> Result<(Tensor, Tensor), ModelError> {
            if fused {
                let gu = ex.get_narrow(&[e, 2 * i, h], "gate_up_proj", 0, j, 1)?;
                let dn = ex.get_narrow(&[e, h, i], "down_proj", 0, j, 1)?;
                return Ok((gu.squeeze(0)?, dn.squeeze(0)?));
            }
            let x = ex.pp(j);
            let g = x.pp("gate_proj").get(&[i, h], "weight")?;
            let u = x.pp("up_proj").get(&[i, h], "weight")?;
            let dn = x.pp("down_proj").get(&[h, i], "weight")?;
            Ok((Tensor::cat(&[g, u], 0)?, dn))
        };
        let gate = cfg.gate_config();
        let (exec, shared) = if let (Some(q), true) = (isq, el > 0) {
            (
                MoeExec::quantized(q, e0, (e0..e0 + el).map(expert), bias)?,
                shared,
            )
        } else {
            let experts = if el == 0 {
                let (dt, dev) = (w.dtype(), w.device());
                ExpertWeights {
                    gate_up: Tensor::zeros((0, 2 * i, h), dt, dev)?,
                    down: Tensor::zeros((0, h, i), dt, dev)?,
                }
            } else if !shard.is_single() && fused {
                // This rank's whole experts: a contiguous run of the fused tensors.
                ExpertWeights {
                    gate_up: ex.get_narrow(&[e, 2 * i, h], "gate_up_proj", 0, e0, el)?,
                    down: ex.get_narrow(&[e, h, i], "down_proj", 0, e0, el)?,
                }
            } else if fused {
                ExpertWeights {
                    gate_up: ex.get(&[e, 2 * i, h], "gate_up_proj")?,
                    down: ex.get(&[e, h, i], "down_proj")?,
                }
            } else {
                // Per-expert tensors (hub dialect): stack into the fused layout once, at load.
                let (gu, dn): (Vec<_>, Vec<_>) = (e0..e0 + el)
                    .map(expert)
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .unzip();
                ExpertWeights {
                    gate_up: Tensor::stack(&gu, 0)?,
                    down: Tensor::stack(&dn, 0)?,
                }
            };
            MoeExec::choose(experts, bias, shared, &gate, w.dtype())?
        };
        Ok(Self::from_parts(cfg, router, shared, exec, (e0, el)))
    }

    /// The block around its loaded parts: the f32 `router` `[E, H]`, the shared expert the
    /// caller still runs, and this rank's `(first, count)` routed experts held by `exec`.
    fn from_parts(
        cfg: &ModelConfig,
        router: Tensor,
        shared: Option<Mlp>,
        exec: MoeExec,
        (expert_start, local_experts): (usize, usize),
    ) -> Self {
        Self {
            router,
            gate: cfg.gate_config(),
            shared,
            fp32_combine: cfg.moe_fp32_combine,
            exec,
            expert_start,
            local_experts,
        }
    }

    /// The part of `plan` whose experts this rank holds, renumbered from 0 (the gate output
    /// it indexes is unchanged). `plan` itself when the rank holds every expert.
    fn local_plan(&self, plan: DispatchPlan) -> DispatchPlan {
        if self.local_experts == plan.num_experts {
            return plan;
        }
        let (e0, el) = (self.expert_start, self.local_experts);
        let (a, b) = (plan.offsets[e0], plan.offsets[e0 + el]);
        DispatchPlan {
            num_experts: el,
            offsets: plan.offsets[e0..=e0 + el].iter().map(|o| o - a).collect(),
            token_of: plan.token_of[a..b].to_vec(),
            slot_of: plan.slot_of[a..b].to_vec(),
        }
    }

    /// f32 router logits `[T, E]` of `x` `[T, H]`.
    fn logits(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        if let Some(l) = switchyard_kernels::cpu_gemv::try_linear_f32(x, &self.router)? {
            return Ok(l);
        }
        Ok(x.to_dtype(DType::F32)?.matmul(&self.router.t()?)?)
    }

    /// Host-side routing of `logits`: gate top-k, then the dispatch plan of the (token,
    /// expert) pairs whose expert this rank holds (expert parallel; all of them on one rank).
    fn route_host(
        &self,
        logits: &Tensor,
        bias: Option<&[f32]>,
    ) -> Result<(GateOutput, DispatchPlan), ModelError> {
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        let g = gate_topk(&logits, bias, &self.gate)?;
        let plan = self.local_plan(dispatch(&g, self.gate.num_experts)?);
        Ok((g, plan))
    }

    /// The block's output in `out`: the input's dtype, or f32 on a rank of several, whose
    /// partial sum (its experts plus its shared-expert slice) is all-reduced before rounding.
    fn forward(&self, x: &Tensor, out: DType) -> Result<Tensor, ModelError> {
        let logits = self.logits(x)?;
        let routed = match &self.exec {
            MoeExec::Reference { bias, experts } => {
                let (g, plan) = self.route_host(&logits, bias.as_deref())?;
                // bf16 on the CPU: the shared expert joins the routed experts' two parallel
                // passes and the sum stays in f32 (so only with the fp32 combine).
                let fuse = self.fp32_combine && x.dim(0)? <= MAX_FUSED_MLP_TOKENS;
                if self.local_experts == 0 {
                    Tensor::zeros(x.dims(), x.dtype(), x.device())?
                } else {
                    if let (Some((sg, sd)), true) =
                        (self.shared.as_ref().and_then(Mlp::dense), fuse)
                    {
                        if let Some(y) = switchyard_kernels::moe::experts_forward_with_shared(
                            x, experts, sg, sd, &g, &plan,
                        )? {
                            return Ok(y.to_dtype(out)?);
                        }
                    }
                    experts_forward(x, experts, &g, &plan)?
                }
            }
            #[cfg(feature = "cuda")]
            MoeExec::CudaGate { bias, experts } => {
                let (ids, ws) =
                    switchyard_kernels::cuda::gate_topk(&logits, bias.as_ref(), &self.gate)?;
                let g = switchyard_kernels::GateOutput {
                    tokens: x.dim(0)?,
                    top_k: self.gate.top_k,
                    ids: ids.flatten_all()?.to_vec1()?,
                    weights: ws.flatten_all()?.to_vec1()?,
                };
                let plan = dispatch(&g, self.gate.num_experts)?;
                experts_forward(x, experts, &g, &plan)?
            }
            #[cfg(feature = "cuda")]
            MoeExec::CudaKernels(c) => c.forward(x, &logits, &self.gate)?,
            MoeExec::Quant { bias, experts } => {
                let (g, plan) = self.route_host(&logits, bias.as_deref())?;
                // The shared expert joins the two passes and the sum is f32: the fp32
                // combine, which f32 activations make the only combine.
                let fuse = self.fp32_combine || x.dtype() == DType::F32;
                let shared = self
                    .shared
                    .as_ref()
                    .and_then(Mlp::quantized)
                    .filter(|_| fuse);
                let xp = isq::pad_last(x, experts.dims().hidden)?;
                let y =
                    switchyard_kernels::cpu_quant::experts_quant(&xp, experts, &g, &plan, shared)?;
                let y = narrow_hidden(y, x.dim(1)?)?;
                if shared.is_some() || self.shared.is_none() {
                    return Ok(y.to_dtype(out)?);
                }
                y.to_dtype(x.dtype())?
            }
        };
        Ok(match &self.shared {
            None => routed.to_dtype(out)?,
            Some(s) => {
                let sh = s.forward(x, x.dtype())?;
                if self.fp32_combine {
                    (routed.to_dtype(DType::F32)? + sh.to_dtype(DType::F32)?)?.to_dtype(out)?
                } else {
                    (routed + sh)?.to_dtype(out)?
                }
            }
        })
    }
}

/// The MoE block on the CUDA kernels (bf16).
#[cfg(feature = "cuda")]
mod cuda_moe {
    use candle_core::{DType, Tensor};
    use switchyard_kernels::cuda::{experts_forward, gate_topk, ExpertPath};
    use switchyard_kernels::{ExpertWeights, GateConfig};

    use super::Mlp;
    use crate::ModelError;

    /// The expert kernels take hidden and intermediate sizes that are multiples of this (their
    /// K step; `MoeDims::check` in switchyard-kernels). Smaller models are zero-padded up to
    /// it at load, which changes no result: padded inputs and weights are zero, SiLU(0)·0 = 0.
    const KERNEL_DIM_MULTIPLE: usize = 32;

    /// Routed experts laid out for the kernels.
    #[derive(Debug, Clone)]
    pub(super) struct CudaMoe {
        /// `[E (+1), 2I', H']` and `[E (+1), H', I']` bf16, zero-padded to multiples of 32,
        /// with the shared expert as expert `E` when `shared_column`.
        experts: ExpertWeights,
        bias: Option<Tensor>,
        hidden: usize,
        padded_hidden: usize,
        routed_experts: usize,
        /// The shared expert runs as one more column of the routing (id `E`, weight 1), so the
        /// kernels sum it with the routed experts in f32 (transformers' fp32 combine).
        shared_column: bool,
    }

    impl CudaMoe {
        /// Lays the weights out for the kernels; returns the shared expert when it cannot be a
        /// column (its intermediate size differs from the routed experts': more than one shared
        /// expert).
        pub(super) fn new(
            experts: ExpertWeights,
            bias: Option<Tensor>,
            shared: Option<Mlp>,
        ) -> Result<(Self, Option<Mlp>), ModelError> {
            let (e, i, h) = experts.dims()?;
            let fusable = shared
                .as_ref()
                .and_then(Mlp::dense)
                .is_some_and(|(g, d)| g.dims() == [2 * i, h] && d.dims() == [h, i]);
            let (mut gate_up, mut down) = (experts.gate_up, experts.down);
            let shared = match shared.as_ref().and_then(Mlp::dense) {
                Some((sg, sd)) if fusable => {
                    gate_up = Tensor::cat(&[&gate_up, &sg.unsqueeze(0)?], 0)?;
                    down = Tensor::cat(&[&down, &sd.unsqueeze(0)?], 0)?;
                    None
                }
                _ => shared,
            };
            let ph = h.next_multiple_of(KERNEL_DIM_MULTIPLE);
            let (gate_up, down) = crate::isq::pad_swiglu(gate_up, down, KERNEL_DIM_MULTIPLE)?;
            let experts = ExpertWeights {
                gate_up: gate_up.to_dtype(DType::BF16)?.contiguous()?,
                down: down.to_dtype(DType::BF16)?.contiguous()?,
            };
            Ok((
                Self {
                    experts,
                    bias,
                    hidden: h,
                    padded_hidden: ph,
                    routed_experts: e,
                    shared_column: fusable,
                },
                shared,
            ))
        }

        /// Bytes of the padded kernel weights and the expert bias.
        pub(super) fn weight_bytes(&self) -> u64 {
            let b = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
            b(&self.experts.gate_up) + b(&self.experts.down) + self.bias.as_ref().map_or(0, b)
        }

        /// Routed experts (and the shared one when it is a column) for `x` (`[T, H]` bf16)
        /// given its f32 router logits (`[T, E]`).
        pub(super) fn forward(
            &self,
            x: &Tensor,
            logits: &Tensor,
            gate: &GateConfig,
        ) -> Result<Tensor, ModelError> {
            let (t, h) = x.dims2()?;
            let (mut ids, mut ws) = gate_topk(&logits.contiguous()?, self.bias.as_ref(), gate)?;
            if self.shared_column {
                let dev = x.device();
                let sid = Tensor::full(self.routed_experts as u32, (t, 1), dev)?;
                let sw = Tensor::ones((t, 1), DType::F32, dev)?;
                ids = Tensor::cat(&[&ids, &sid], 1)?;
                ws = Tensor::cat(&[&ws, &sw], 1)?;
            }
            let xb = x.to_dtype(DType::BF16)?;
            let xp = if self.padded_hidden != h {
                xb.pad_with_zeros(1, 0, self.padded_hidden - h)?
            } else {
                xb.contiguous()?
            };
            let y = experts_forward(&xp, &self.experts, &ids, &ws, ExpertPath::Auto)?;
            let y = if self.padded_hidden != self.hidden {
                y.narrow(1, 0, self.hidden)?
            } else {
                y
            };
            Ok(y.to_dtype(x.dtype())?)
        }
    }
}

#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

impl DecoderLayer {
    fn load(
        w: &Weights,
        cfg: &ModelConfig,
        kind: LayerKind,
        shard: &Shard,
        isq: Option<IsqType>,
    ) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        Ok(Self {
            input_layernorm: RmsNorm::load(&w.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
            self_attn: Attention::load(&w.pp("self_attn"), cfg, shard, isq)
                .map_err(quantizing(w.path("self_attn")))?,
            post_attention_layernorm: RmsNorm::load(
                &w.pp("post_attention_layernorm"),
                h,
                cfg.rms_norm_eps,
            )?,
            mlp: match kind {
                LayerKind::Dense => FeedForward::Dense(
                    // `Shard::validate` keeps every rank's slice non-empty.
                    Mlp::load_shard(&w.pp("mlp"), h, cfg.intermediate_size, shard, isq)
                        .map_err(quantizing(w.path("mlp")))?
                        .ok_or_else(|| ModelError::Sharding {
                            field: "intermediate_size".into(),
                            message: format!("an empty slice for rank {}", shard.rank),
                        })?,
                ),
                LayerKind::Moe => FeedForward::Moe(
                    Moe::load(&w.pp("mlp"), cfg, shard, isq).map_err(quantizing(w.path("mlp")))?,
                ),
            },
        })
    }

    /// Bytes of this layer's weights (norms, attention, MLP or MoE).
    fn bytes(&self) -> u64 {
        let b = tensor_bytes;
        let ob = |t: &Option<Tensor>| t.as_ref().map_or(0, b);
        let mlp = Mlp::bytes;
        let l = self;
        let mut n = b(&l.input_layernorm.weight) + b(&l.post_attention_layernorm.weight);
        let a = &l.self_attn;
        n += a.qkv_proj.bytes() + a.o_proj.bytes() + ob(&a.o_bias);
        for q in [&a.q_norm, &a.k_norm].into_iter().flatten() {
            n += b(&q.weight);
        }
        n += match &l.mlp {
            FeedForward::Dense(m) => mlp(m),
            FeedForward::Moe(m) => {
                let experts = match &m.exec {
                    MoeExec::Reference { bias, experts } => {
                        bias.as_ref().map_or(0, |v| 4 * v.len() as u64)
                            + b(&experts.gate_up)
                            + b(&experts.down)
                    }
                    #[cfg(feature = "cuda")]
                    MoeExec::CudaGate { bias, experts } => {
                        ob(bias) + b(&experts.gate_up) + b(&experts.down)
                    }
                    #[cfg(feature = "cuda")]
                    MoeExec::CudaKernels(c) => c.weight_bytes(),
                    MoeExec::Quant { bias, experts } => {
                        bias.as_ref().map_or(0, |v| 4 * v.len() as u64)
                            + experts.memory_bytes() as u64
                    }
                };
                b(&m.router) + experts + m.shared.as_ref().map_or(0, mlp)
            }
        };
        n
    }
}

/// The MTP (multi-token prediction) layer Hy3 ships after its decoder layers, as
/// `model.layers.{num_hidden_layers}.*` (transformers skips it; vLLM's `hy_v3_mtp` reads it
/// under these names): from the embedding of token `p + 1` and the main model's final-normed
/// hidden state at position `p` it predicts token `p + 2`, a draft for speculative decoding.
///
/// `x = eh_proj([enorm(embed(t[p+1])), hnorm(h[p])])`, then one decoder layer (attention at
/// position `p` over this layer's own KV, and an MoE), then `final_layernorm`, and the main
/// model's `lm_head`. The embedding at position 0 is zeroed, as Tencent's reference and vLLM do.
#[derive(Debug, Clone)]
struct MtpLayer {
    enorm: RmsNorm,
    hnorm: RmsNorm,
    /// `[hidden, 2 × hidden]` over `[enorm(embedding), hnorm(hidden)]`.
    eh_proj: Linear,
    block: DecoderLayer,
    final_layernorm: RmsNorm,
}

impl MtpLayer {
    fn load(
        w: &Weights,
        cfg: &ModelConfig,
        shard: &Shard,
        isq: Option<IsqType>,
    ) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps;
        // Hy3's MTP block is an MoE layer like the decoder layers after the first.
        let kind = cfg.layer_kinds.last().copied().unwrap_or(LayerKind::Moe);
        Ok(Self {
            enorm: RmsNorm::load(&w.pp("enorm"), h, eps)?,
            hnorm: RmsNorm::load(&w.pp("hnorm"), h, eps)?,
            eh_proj: Linear::load(&w.pp("eh_proj"), h, 2 * h, false)?
                .quantized(isq)
                .map_err(quantizing(w.path("eh_proj")))?,
            block: DecoderLayer::load(w, cfg, kind, shard, isq)?,
            final_layernorm: RmsNorm::load(&w.pp("final_layernorm"), h, eps)?,
        })
    }

    fn bytes(&self) -> u64 {
        let b = tensor_bytes;
        b(&self.enorm.weight)
            + b(&self.hnorm.weight)
            + b(&self.final_layernorm.weight)
            + self.eh_proj.bytes()
            + self.block.bytes()
    }
}

/// What the MTP layer gives for a sequence's last position ([`HyV3Model::mtp_forward_paged`]).
#[derive(Debug, Clone)]
pub struct MtpOut {
    /// f32 logits `[1, vocab]`: the distribution of the token after the last `next_tokens`.
    pub logits: Tensor,
    /// The layer's final-normed output there, `[1, hidden]`: what a further MTP step (a
    /// second draft token) reads as its hidden state, as vLLM chains one MTP layer.
    pub hidden: Tensor,
}

/// One sequence's part of a paged MTP step ([`HyV3Model::mtp_forward_paged`]).
#[derive(Debug, Clone)]
pub struct MtpSeq<'a> {
    /// The token after each position: position `pos0 + i` takes `next_tokens[i]`.
    pub next_tokens: &'a [u32],
    /// First position.
    pub pos0: usize,
    /// Blocks covering positions `0..pos0 + next_tokens.len()` (the main model's table).
    pub block_table: &'a [u32],
    /// The main model's final-normed hidden states at these positions, `[n, hidden]`.
    pub hidden: Tensor,
    /// Return the logits of the last position (the draft for the token after
    /// `next_tokens.last()`).
    pub logits: bool,
}

/// A paged batch laid out: token ids, attention spans, positions and cache slots.
#[derive(Default)]
struct PagedPlan<'a> {
    ids: Vec<u32>,
    attn: Vec<switchyard_kernels::SeqAttn<'a>>,
    positions: Vec<usize>,
    slots: Vec<usize>,
}

/// One sequence's part of a paged forward.
#[derive(Debug, Clone)]
pub struct PagedSeq<'a> {
    /// Tokens computed this step (a prefill chunk, or one decode token).
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in the cache (position of `tokens[0]`).
    pub pos0: usize,
    /// Blocks covering positions `0..pos0 + tokens.len()`.
    pub block_table: &'a [u32],
    /// Which logits to return.
    pub logits: Logits,
}

/// A loaded hy_v3 model.
#[derive(Debug, Clone)]
pub struct HyV3Model {
    cfg: ModelConfig,
    embed_tokens: candle_nn::Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: LinearWeight,
    rope: Rope,
    /// `LoadOptions::dtype`: the weights' dtype (of what stays dense, when quantized).
    dtype: DType,
    /// The dtype activations are computed in: `dtype`, or f32 with quantized weights.
    act_dtype: DType,
    quantize: Option<IsqType>,
    device: Device,
    mtp: Option<Box<MtpLayer>>,
    /// Which part of the model this is (rank 0 of 1 for the whole model).
    shard: Shard,
    /// The group's communicator; `None` on one rank (no collectives at all).
    comm: Option<Arc<dyn Communicator>>,
    /// `(first id, ids)` of the vocabulary rows held by `embed_tokens` and `lm_head`.
    vocab: (usize, usize),
    /// KV heads this rank's attention (and paged cache) holds.
    kv_heads: usize,
    /// Whether `lm_head` is the embedding's tensor (tied and not stored).
    tied_head: bool,
}

impl HyV3Model {
    /// Loads `config.json` and the weights of a model folder.
    pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Arc::new(Checkpoint::open(dir)?.with_weight_block(cfg.weight_block()));
        Self::load(cfg, ckpt, opts, |_, _| {})
    }

    /// Builds the model from a parsed config and an opened checkpoint; `progress(done, total)`
    /// is called after each layer (for a loading bar).
    pub fn load(
        cfg: ModelConfig,
        ckpt: Arc<Checkpoint>,
        opts: &LoadOptions,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        Self::load_inner(cfg, ckpt, opts, None, progress)
    }

    /// Loads `config.json` and this rank's slices of the weights of a model folder
    /// ([`Self::load_parallel`]).
    pub fn load_dir_parallel(
        dir: &Path,
        opts: &LoadOptions,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Arc::new(Checkpoint::open(dir)?.with_weight_block(cfg.weight_block()));
        Self::load_parallel(cfg, ckpt, opts, comm, |_, _| {})
    }

    /// Loads rank `comm.rank()` of `comm.world_size()`: only this rank's slices are read from
    /// the checkpoint (the layout of [`crate::plan`]; see the module docs), and the forward
    /// passes run the collectives over `comm`. Every rank of the group must be loaded from the
    /// same checkpoint and be driven with the same inputs. A world of 1 is [`Self::load`].
    /// Refused, naming the config field and `--tensor-parallel-size`, when the heads do not
    /// split; refused on a CUDA device (the expert-parallel CUDA MoE path and an NCCL
    /// communicator are not implemented) and with `load_mtp`.
    pub fn load_parallel(
        cfg: ModelConfig,
        ckpt: Arc<Checkpoint>,
        opts: &LoadOptions,
        comm: Arc<dyn Communicator>,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        Self::load_inner(cfg, ckpt, opts, Some(comm), progress)
    }

    fn load_inner(
        cfg: ModelConfig,
        ckpt: Arc<Checkpoint>,
        opts: &LoadOptions,
        comm: Option<Arc<dyn Communicator>>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let shard = comm.as_ref().map_or(Shard::single(), |c| Shard {
            rank: c.rank(),
            world: c.world_size(),
        });
        shard.validate(&cfg)?;
        isq::check_device(opts.quantize, &opts.device)?;
        let comm = if shard.is_single() { None } else { comm };
        if !shard.is_single() {
            let n = shard.world;
            if !opts.device.is_cpu() {
                return Err(ModelError::Sharding {
                    field: "device".into(),
                    message: format!(
                        "{TP_FLAG} {n} runs on the CPU only (--device cpu): expert-parallel \
                         MoE on the CUDA kernels and an NCCL communicator are not implemented"
                    ),
                });
            }
            if opts.load_mtp {
                return Err(ModelError::Sharding {
                    field: "num_nextn_predict_layers".into(),
                    message: format!("MTP layers cannot be loaded with {TP_FLAG} {n}"),
                });
            }
        }
        let isq = opts.quantize;
        let act_dtype = Self::activation_dtype_for(opts);
        if isq.is_some() {
            let unaligned = isq::unaligned_inputs(&cfg);
            if !unaligned.is_empty() {
                tracing::info!(
                    "{} {}: zero-padding projection inputs to whole blocks of {Q8_BLOCK} ({}); \
                     results are unchanged, memory and time grow with the padding",
                    isq::QUANTIZE_FLAG,
                    isq.map_or("", IsqType::name),
                    unaligned.join(", ")
                );
            }
        }
        // Layers load in the activation dtype (norms, biases; projections are quantized from
        // it); the embedding stays in the requested dtype.
        let root = Weights::new(ckpt.clone(), act_dtype, opts.device.clone());
        let m = root.pp("model");
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let vocab = shard.split(v);
        let embed = Weights::new(ckpt.clone(), opts.dtype, opts.device.clone())
            .pp("model")
            .pp("embed_tokens")
            .get_narrow(&[v, h], "weight", 0, vocab.0, vocab.1)?;
        let total = cfg.num_hidden_layers;
        let mut layers = Vec::with_capacity(total);
        for (i, kind) in cfg.layer_kinds.iter().enumerate() {
            layers.push(DecoderLayer::load(
                &m.pp("layers").pp(i),
                &cfg,
                *kind,
                &shard,
                isq,
            )?);
            progress(i + 1, total);
        }
        let scaled = layers
            .iter()
            .filter(|l| l.self_attn.kv_scales.is_some())
            .count();
        if scaled > 0 {
            tracing::info!(
                "the checkpoint has KV cache scales for {scaled} of {total} layers (used by an \
                 FP8 KV cache, --kv-dtype fp8)"
            );
        }
        let norm = RmsNorm::load(&m.pp("norm"), h, cfg.rms_norm_eps)?;
        let tied_head = cfg.tie_word_embeddings && !root.contains("lm_head.weight");
        let lm_head = if tied_head {
            embed.to_dtype(act_dtype)?
        } else {
            root.pp("lm_head")
                .get_narrow(&[v, h], "weight", 0, vocab.0, vocab.1)?
        };
        // Tied and dense: the embedding's own tensor (the conversion above is a no-op then).
        let lm_head = LinearWeight::quantize(lm_head, isq.map(IsqType::lm_head))
            .map_err(quantizing("lm_head"))?;
        let mtp = if opts.load_mtp {
            let l = cfg.num_hidden_layers;
            let w = m.pp("layers").pp(l);
            if !ckpt
                .names()
                .any(|n| n.starts_with(&format!("{}.", w.path("eh_proj"))))
            {
                return Err(ModelError::MissingTensor {
                    name: format!("model.layers.{l}.eh_proj.weight (the MTP layer)"),
                    dir: ckpt.dir().to_path_buf(),
                });
            }
            Some(Box::new(MtpLayer::load(&w, &cfg, &shard, isq)?))
        } else {
            None
        };
        Ok(Self {
            rope: Rope::new(&cfg),
            embed_tokens: candle_nn::Embedding::new(embed, h),
            layers,
            norm,
            lm_head,
            dtype: opts.dtype,
            act_dtype,
            quantize: isq,
            device: opts.device.clone(),
            mtp,
            shard,
            comm,
            vocab,
            kv_heads: shard.kv_heads(&cfg).1,
            tied_head,
            cfg,
        })
    }

    /// Which part of the model this is (rank 0 of 1 for the whole model).
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// KV heads this rank holds (all of them on one rank): the `kv_heads` of its paged cache.
    pub fn local_kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Bytes of weights this rank holds (every tensor once; a tied lm_head is the embedding).
    /// Equals the plan's per-device weight bytes ([`crate::plan`]) for f32 and bf16 models.
    /// With quantized weights these are the bytes they really hold (int8 values and scales,
    /// padding included), so the figure falls to about 1.06/2 of bf16's for the projections.
    pub fn weight_bytes(&self) -> u64 {
        let b = tensor_bytes;
        let mut n = b(self.embed_tokens.embeddings()) + b(&self.norm.weight);
        // A tied dense head is the embedding's tensor; a quantized one is its own copy.
        if !self.tied_head || self.quantize.is_some() {
            n += self.lm_head.bytes();
        }
        n += self.layers.iter().map(DecoderLayer::bytes).sum::<u64>();
        if let Some(mtp) = &self.mtp {
            n += mtp.bytes();
        }
        n
    }

    /// All-reduces a row-parallel partial result over the group; `x` itself on one rank.
    fn all_reduce(&self, x: Tensor) -> Result<Tensor, ModelError> {
        match &self.comm {
            None => Ok(x),
            Some(c) => Ok(c.all_reduce_sum(&x)?),
        }
    }

    /// Fails the group when a forward pass failed after it may have entered a collective, so
    /// no other rank waits for this one. Input validation errors are the same on every rank
    /// (same inputs) and come before any collective, so they leave the group usable.
    fn abort_on_error<R>(&self, r: Result<R, ModelError>) -> Result<R, ModelError> {
        if let (Err(e), Some(c)) = (&r, &self.comm) {
            if !matches!(e, ModelError::InvalidInput(_)) {
                c.abort(&e.to_string());
            }
        }
        r
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The dtype of the weights as loaded (`LoadOptions::dtype`; with quantization, of the
    /// parts that stay dense).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype activations are computed in: [`Self::dtype`], or f32 when the weights are
    /// quantized (the Q8 kernels take and give f32, so f32 activations skip a bf16 rounding
    /// and a conversion at every projection; see [`crate::isq`]).
    pub fn activation_dtype(&self) -> DType {
        self.act_dtype
    }

    fn activation_dtype_for(opts: &LoadOptions) -> DType {
        match opts.quantize {
            Some(_) => DType::F32,
            None => opts.dtype,
        }
    }

    /// The in-situ quantization the weights were loaded with.
    pub fn quantization(&self) -> Option<IsqType> {
        self.quantize
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the MTP layer is loaded (`LoadOptions::load_mtp`).
    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    /// Layers with a KV cache: the decoder layers, and the MTP layer when loaded (its KV is
    /// the paged cache's last layer).
    pub fn kv_layers(&self) -> usize {
        self.cfg.num_hidden_layers + usize::from(self.mtp.is_some())
    }

    /// A fresh KV cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers)
    }

    /// Checks token ids against the vocabulary and the context length.
    pub fn validate_input(&self, ids: &[u32], cached: usize) -> Result<(), ModelError> {
        if ids.is_empty() {
            return Err(ModelError::InvalidInput(
                "empty input: at least one token is needed".into(),
            ));
        }
        if let Some((i, &bad)) = ids
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= self.cfg.vocab_size)
        {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} at position {i} is out of range for vocabulary size {}",
                self.cfg.vocab_size
            )));
        }
        if cached + ids.len() > self.cfg.max_position_embeddings {
            return Err(ModelError::InvalidInput(format!(
                "{} tokens exceed the model's context of {} tokens",
                cached + ids.len(),
                self.cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Runs `ids` after what `cache` holds, appends their keys/values, and returns f32 logits.
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        which: Logits,
    ) -> Result<Tensor, ModelError> {
        let r = self.on_cpu_worker(|| self.forward_contiguous(ids, cache, which));
        self.abort_on_error(r)
    }

    /// Runs a forward pass on a rayon worker when the model is on the CPU, so the kernels'
    /// parallel loops start inside the pool ([`switchyard_kernels::cpu_gemv::on_worker`]).
    ///
    /// Not on a rank of several: a rank waits inside collectives, and a rank parked on one of
    /// the pool's few workers would keep the other ranks' work (queued behind it) from ever
    /// running. Such a rank runs on its own thread and its parallel loops join the pool.
    fn on_cpu_worker<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.device.is_cpu() && self.comm.is_none() {
            switchyard_kernels::cpu_gemv::on_worker(f)
        } else {
            f()
        }
    }

    fn forward_contiguous(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        which: Logits,
    ) -> Result<Tensor, ModelError> {
        let t = ids.len();
        let x = self.layers_contiguous(ids, cache)?;
        let x = match which {
            Logits::All => x,
            Logits::Last => x.narrow(0, t - 1, 1)?,
        };
        self.head(&x)
    }

    /// The decoder layers over `ids` after what `cache` holds (appending their K/V): the last
    /// layer's output, before the final norm.
    fn layers_contiguous(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor, ModelError> {
        self.validate_input(ids, cache.len())?;
        let t = ids.len();
        let pos0 = cache.len();
        let (cos, sin) = self
            .rope
            .tables(pos0..pos0 + t, self.act_dtype, &self.device)?;
        let x = self.run_layers(ids, |i, attn, hn| attn.forward(hn, &cos, &sin, cache, i))?;
        cache.advance(t);
        Ok(x)
    }

    /// [`Self::forward`] with every position's logits and the final-normed hidden states
    /// (`[tokens, hidden]`, what the MTP layer reads).
    pub fn forward_with_hidden(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let r = self.on_cpu_worker(|| {
            let h = self.norm.forward(&self.layers_contiguous(ids, cache)?)?;
            Ok((self.project(&h)?, h))
        });
        self.abort_on_error(r)
    }

    /// An empty KV cache for the MTP layer alone ([`Self::mtp_forward`]).
    pub fn new_mtp_cache(&self) -> KvCache {
        KvCache::new(1)
    }

    /// The MTP layer over the positions after what `cache` (an [`Self::new_mtp_cache`]) holds:
    /// position `p` takes the token after it (`next_ids`) and the main model's final-normed
    /// hidden state there (`hidden`, `[n, hidden]`); returns f32 logits `[n, vocab]`, row `i`
    /// predicting the token after `next_ids[i]`.
    pub fn mtp_forward(
        &self,
        next_ids: &[u32],
        hidden: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        let r = self.on_cpu_worker(|| {
            self.validate_input(next_ids, cache.len())?;
            let (n, pos0) = (next_ids.len(), cache.len());
            let positions: Vec<usize> = (pos0..pos0 + n).collect();
            let (cos, sin) = self
                .rope
                .tables(pos0..pos0 + n, self.act_dtype, &self.device)?;
            let z = self.mtp_block(next_ids, &positions, hidden, |a, hn| {
                a.forward(hn, &cos, &sin, cache, 0)
            })?;
            cache.advance(n);
            self.project(&z)
        });
        self.abort_on_error(r)
    }

    /// Runs a batch of sequences (prefill chunks, decodes, or both) through the paged KV cache.
    /// Returns one f32 logits tensor per sequence: `[1, vocab]` for [`Logits::Last`], or
    /// `[tokens, vocab]` for [`Logits::All`].
    pub fn forward_paged(
        &self,
        seqs: &[PagedSeq<'_>],
        kv: &mut PagedKvCache,
    ) -> Result<Vec<Tensor>, ModelError> {
        let r = self.on_cpu_worker(|| self.forward_paged_batch(seqs, kv, false));
        self.abort_on_error(r).map(|(l, _)| l)
    }

    /// [`Self::forward_paged`] that also returns every computed position's final-normed hidden
    /// state, `[tokens in the batch, hidden]` in batch order (what [`Self::mtp_forward_paged`]
    /// reads).
    pub fn forward_paged_with_hidden(
        &self,
        seqs: &[PagedSeq<'_>],
        kv: &mut PagedKvCache,
    ) -> Result<(Vec<Tensor>, Tensor), ModelError> {
        let r = self.on_cpu_worker(|| self.forward_paged_batch(seqs, kv, true));
        let (logits, hidden) = self.abort_on_error(r)?;
        let hidden = hidden.ok_or_else(|| ModelError::InvalidInput("an empty batch".into()))?;
        Ok((logits, hidden))
    }

    /// The attention spans, positions and cache slots of a paged batch of `(pos0, tokens,
    /// block table)`, checked against the vocabulary, the context and the block tables.
    fn paged_plan<'b>(
        &self,
        items: impl Iterator<Item = (usize, &'b [u32], &'b [u32])>,
        bs: usize,
    ) -> Result<PagedPlan<'b>, ModelError> {
        let mut p = PagedPlan::default();
        for (pos0, tokens, block_table) in items {
            self.validate_input(tokens, pos0)?;
            let ctx = pos0 + tokens.len();
            if block_table.len() * bs < ctx {
                return Err(ModelError::InvalidInput(format!(
                    "block table of {} blocks cannot hold {ctx} tokens",
                    block_table.len()
                )));
            }
            p.attn.push(switchyard_kernels::SeqAttn {
                q_start: p.ids.len(),
                q_len: tokens.len(),
                ctx_len: ctx,
                block_table,
            });
            for q in pos0..ctx {
                p.positions.push(q);
                p.slots.push(block_table[q / bs] as usize * bs + q % bs);
            }
            p.ids.extend_from_slice(tokens);
        }
        Ok(p)
    }

    /// The batch metadata the attention layers read, for a [`PagedPlan`].
    fn paged_meta<'b>(
        &self,
        p: &'b PagedPlan<'b>,
        kv: &PagedKvCache,
    ) -> Result<PagedBatchMeta<'b>, ModelError> {
        #[cfg(not(feature = "cuda"))]
        let _ = kv;
        Ok(PagedBatchMeta {
            seqs: &p.attn,
            slots: &p.slots,
            #[cfg(feature = "cuda")]
            device: if kv.is_on_device() {
                Some(switchyard_kernels::cuda::PagedBatch::new(
                    &self.device,
                    &p.attn,
                    p.ids.len(),
                    kv.layout(),
                )?)
            } else {
                None
            },
        })
    }

    fn forward_paged_batch(
        &self,
        seqs: &[PagedSeq<'_>],
        kv: &mut PagedKvCache,
        want_hidden: bool,
    ) -> Result<(Vec<Tensor>, Option<Tensor>), ModelError> {
        if seqs.is_empty() {
            return Ok((vec![], None));
        }
        let plan = self.paged_plan(
            seqs.iter().map(|s| (s.pos0, s.tokens, s.block_table)),
            kv.layout().block_size,
        )?;
        let meta = self.paged_meta(&plan, kv)?;
        let (cos, sin) =
            self.rope
                .tables(plan.positions.iter().copied(), self.act_dtype, &self.device)?;
        let x = self.run_layers(&plan.ids, |i, a, hn| {
            a.forward_paged(hn, &cos, &sin, kv, i, &meta)
        })?;
        // Final norm and lm_head only on the rows someone asked for (the norm on all of them
        // when the hidden states are wanted too; it is row-wise, so the logits are the same).
        let mut rows = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        for (s, a) in seqs.iter().zip(&plan.attn) {
            let start = rows.len();
            match s.logits {
                Logits::All => rows.extend((a.q_start..a.q_start + a.q_len).map(|r| r as u32)),
                Logits::Last => rows.push((a.q_start + a.q_len - 1) as u32),
            }
            spans.push((start, rows.len() - start));
        }
        let idx = Tensor::from_slice(&rows, rows.len(), &self.device)?;
        let (logits, hidden) = if want_hidden {
            let h = self.norm.forward(&x)?;
            (self.project(&h.index_select(&idx, 0)?)?, Some(h))
        } else {
            (self.head(&x.index_select(&idx, 0)?)?, None)
        };
        let logits = spans
            .into_iter()
            .map(|(s, n)| Ok(logits.narrow(0, s, n)?))
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok((logits, hidden))
    }

    /// The MTP layer over a batch of sequences whose main-model positions were computed
    /// through the same paged cache (its K/V go to the cache's last layer, at the same
    /// slots). Returns, per sequence that asked for it, its last position's [`MtpOut`].
    pub fn mtp_forward_paged(
        &self,
        seqs: &[MtpSeq<'_>],
        kv: &mut PagedKvCache,
    ) -> Result<Vec<Option<MtpOut>>, ModelError> {
        let r = self.on_cpu_worker(|| self.mtp_paged_batch(seqs, kv));
        self.abort_on_error(r)
    }

    fn mtp_paged_batch(
        &self,
        seqs: &[MtpSeq<'_>],
        kv: &mut PagedKvCache,
    ) -> Result<Vec<Option<MtpOut>>, ModelError> {
        if seqs.is_empty() {
            return Ok(vec![]);
        }
        let layer = self.cfg.num_hidden_layers;
        if kv.num_layers() <= layer {
            return Err(ModelError::InvalidInput(
                "the paged cache has no layer for the MTP layer (allocate it after loading \
                 the MTP layer)"
                    .into(),
            ));
        }
        let plan = self.paged_plan(
            seqs.iter().map(|s| (s.pos0, s.next_tokens, s.block_table)),
            kv.layout().block_size,
        )?;
        let meta = self.paged_meta(&plan, kv)?;
        let (cos, sin) =
            self.rope
                .tables(plan.positions.iter().copied(), self.act_dtype, &self.device)?;
        let hidden = Tensor::cat(
            &seqs.iter().map(|s| s.hidden.clone()).collect::<Vec<_>>(),
            0,
        )?;
        let z = self.mtp_block(&plan.ids, &plan.positions, &hidden, |a, hn| {
            a.forward_paged(hn, &cos, &sin, kv, layer, &meta)
        })?;
        let rows: Vec<u32> = seqs
            .iter()
            .zip(&plan.attn)
            .filter(|(s, _)| s.logits)
            .map(|(_, a)| (a.q_start + a.q_len - 1) as u32)
            .collect();
        if rows.is_empty() {
            return Ok(vec![None; seqs.len()]);
        }
        let idx = Tensor::from_slice(&rows, rows.len(), &self.device)?;
        let z = z.index_select(&idx, 0)?;
        let logits = self.project(&z)?;
        let mut next = 0;
        seqs.iter()
            .map(|s| {
                if !s.logits {
                    return Ok(None);
                }
                next += 1;
                Ok(Some(MtpOut {
                    logits: logits.narrow(0, next - 1, 1)?,
                    hidden: z.narrow(0, next - 1, 1)?,
                }))
            })
            .collect()
    }

    fn run_layers(
        &self,
        ids: &[u32],
        mut attend: impl FnMut(usize, &Attention, &Tensor) -> Result<Tensor, ModelError>,
    ) -> Result<Tensor, ModelError> {
        let mut x = self.embed(ids)?;
        // A rank's MLP/MoE partials stay f32 until the all-reduce has summed them (they are
        // f32 already where the CPU kernels combine in f32); one rank rounds as it always did.
        let partial = if self.comm.is_some() {
            DType::F32
        } else {
            self.act_dtype
        };
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(layer, &x, partial, |a, hn| attend(i, a, hn))?;
        }
        Ok(x)
    }

    /// One decoder layer: attention (through `attend`) and the MLP or MoE, each with its
    /// residual. `partial` is the dtype a rank's MLP partials stay in until the all-reduce.
    fn layer_forward(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        partial: DType,
        attend: impl FnOnce(&Attention, &Tensor) -> Result<Tensor, ModelError>,
    ) -> Result<Tensor, ModelError> {
        let hn = layer.input_layernorm.forward(x)?;
        let a = attend(&layer.self_attn, &hn)?;
        let a = layer.self_attn.add_o_bias(self.all_reduce(a)?)?;
        let x1 = residual_add(x, &a)?;
        let hn = layer.post_attention_layernorm.forward(&x1)?;
        let f = match &layer.mlp {
            FeedForward::Dense(m) => m.forward(&hn, partial)?,
            FeedForward::Moe(m) => m.forward(&hn, partial)?,
        };
        residual_add(&x1, &self.all_reduce(f)?.to_dtype(self.act_dtype)?)
    }

    /// The MTP layer over positions `positions` (tokens `next_ids` after them, the main
    /// model's final-normed hidden states `hidden` at them): its final-normed output, ready
    /// for `lm_head`.
    fn mtp_block(
        &self,
        next_ids: &[u32],
        positions: &[usize],
        hidden: &Tensor,
        attend: impl FnOnce(&Attention, &Tensor) -> Result<Tensor, ModelError>,
    ) -> Result<Tensor, ModelError> {
        let mtp = self.mtp.as_ref().ok_or_else(|| {
            ModelError::InvalidInput("the MTP layer is not loaded (load_mtp)".into())
        })?;
        if hidden.dim(0)? != next_ids.len() || positions.len() != next_ids.len() {
            return Err(ModelError::InvalidInput(format!(
                "MTP step: {} tokens, {} positions and {} hidden rows",
                next_ids.len(),
                positions.len(),
                hidden.dim(0)?
            )));
        }
        let mut e = self.embed(next_ids)?;
        if positions.contains(&0) {
            let keep: Vec<f32> = positions
                .iter()
                .map(|&p| f32::from(u8::from(p > 0)))
                .collect();
            let keep = Tensor::from_vec(keep, (positions.len(), 1), &self.device)?
                .to_dtype(self.act_dtype)?;
            e = e.broadcast_mul(&keep)?;
        }
        let h = hidden.to_dtype(self.act_dtype)?;
        let x = Tensor::cat(&[mtp.enorm.forward(&e)?, mtp.hnorm.forward(&h)?], 1)?;
        let x = mtp.eh_proj.forward(&x)?;
        let y = self.layer_forward(&mtp.block, &x, self.act_dtype, attend)?;
        mtp.final_layernorm.forward(&y)
    }

    /// Embedding lookup. On a rank of several: the rows of ids in this rank's vocabulary
    /// slice, zeros for the others, summed over the group (exact: every id has one owner).
    fn embed(&self, ids: &[u32]) -> Result<Tensor, ModelError> {
        let Some(comm) = &self.comm else {
            let input = Tensor::from_slice(ids, ids.len(), &self.device)?;
            return Ok(self
                .embed_tokens
                .forward(&input)?
                .to_dtype(self.act_dtype)?);
        };
        let (v0, vl) = self.vocab;
        let owned = |t: u32| (v0..v0 + vl).contains(&(t as usize));
        let local: Vec<u32> = ids
            .iter()
            .map(|&t| if owned(t) { t - v0 as u32 } else { 0 })
            .collect();
        let mask: Vec<f32> = ids.iter().map(|&t| f32::from(u8::from(owned(t)))).collect();
        let input = Tensor::from_vec(local, ids.len(), &self.device)?;
        let mask =
            Tensor::from_vec(mask, (ids.len(), 1), &self.device)?.to_dtype(self.act_dtype)?;
        let x = self
            .embed_tokens
            .forward(&input)?
            .to_dtype(self.act_dtype)?
            .broadcast_mul(&mask)?;
        Ok(comm.all_reduce_sum(&x)?)
    }

    /// Final norm and lm_head, f32 logits over the whole vocabulary (on a rank of several,
    /// this rank's vocabulary columns gathered from every rank).
    fn head(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        self.project(&self.norm.forward(x)?)
    }

    /// lm_head on final-normed rows: f32 logits (gathered over the group on a rank of several).
    fn project(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let logits = self.lm_head.matmul_t(x)?.to_dtype(DType::F32)?;
        match &self.comm {
            None => Ok(logits),
            Some(c) => Ok(c.all_gather(&logits, 1)?),
        }
    }

    /// The execution each MoE layer uses (`reference`, `cuda-gate+reference-experts` or
    /// `cuda-kernels`), in layer order: what a GPU run actually exercised.
    pub fn moe_paths(&self) -> Vec<&'static str> {
        self.layers
            .iter()
            .filter_map(|l| match &l.mlp {
                FeedForward::Moe(m) => Some(m.exec.name()),
                FeedForward::Dense(_) => None,
            })
            .collect()
    }

    /// A paged KV cache (this rank's KV heads) on the model's device with `num_blocks` blocks
    /// of `block_size` tokens
    /// (zeroed): device tensors read by the CUDA paged-attention kernels when the model is on a
    /// CUDA device and this crate is built with `cuda`, host memory otherwise (as
    /// [`Self::new_paged_cache`]).
    pub fn try_new_paged_cache(
        &self,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> Result<PagedKvCache, ModelError> {
        PagedKvCache::new_on(
            self.kv_layers(),
            switchyard_kernels::KvLayout {
                num_blocks,
                block_size,
                kv_heads: self.kv_heads,
                head_dim: self.cfg.head_dim,
            },
            dtype,
            &self.device,
        )
    }

    /// A paged KV cache in host memory for this model with `num_blocks` blocks of `block_size`
    /// tokens (any model device: on a GPU each layer copies its q/k/v to the host).
    pub fn new_paged_cache(
        &self,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> PagedKvCache {
        PagedKvCache::new(
            self.kv_layers(),
            switchyard_kernels::KvLayout {
                num_blocks,
                block_size,
                kv_heads: self.kv_heads,
                head_dim: self.cfg.head_dim,
            },
            dtype,
        )
    }
}

impl Checkpoint {
    /// Loads a tensor of whatever shape it has (used for optional extras such as MTP layers).
    pub fn get_any_shape(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let shape = self.shape_of(name)?;
        self.get(name, &shape, dtype, device)
    }
}
