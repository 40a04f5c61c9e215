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

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, D};
use switchyard_kernels::{dispatch, experts_forward, gate_topk, ExpertWeights, GateConfig};

use crate::config::{LayerKind, ModelConfig};
use crate::kv_cache::KvCache;
use crate::paged_cache::{KvDtype, PagedBatchMeta, PagedKvCache};
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
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            load_mtp: false,
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

/// `y = x · Wᵀ (+ b)` with the weight kept as stored (`[out, in]`).
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(w: &Weights, out: usize, inp: usize, bias: bool) -> Result<Self, ModelError> {
        Ok(Self {
            weight: w.get(&[out, inp], "weight")?,
            bias: if bias {
                Some(w.get(&[out], "bias")?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let y = matmul_t(x, &self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `x · wᵀ` for `x` `[T, in]` and `w` `[out, in]`: decode-sized bf16 products go through the
/// op layer's weight-streaming kernel, everything else through candle's GEMM.
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor, ModelError> {
    match switchyard_kernels::cpu_gemv::try_linear_bf16(x, w)? {
        Some(y) => Ok(y),
        None => Ok(x.matmul(&w.t()?)?),
    }
}

/// SwiGLU MLP with gate and up fused into one `[2·I, H]` matrix at load time.
/// Most tokens for which a dense MLP or the shared expert runs in `cpu_moe`'s fused two-pass
/// path (bf16 on the CPU). The fusion saves parallel loops, which is what decode pays for; at
/// prefill sizes the per-projection GEMV path is faster (small preset bf16, batch 16 × 128
/// prompt tokens: prefill 208–232 tok/s fused for every size vs 272–284 with this limit;
/// batch 4: 251–263 vs 287–302; decode unchanged).
const MAX_FUSED_MLP_TOKENS: usize = 64;

#[derive(Debug, Clone)]
struct Mlp {
    gate_up: Tensor,
    down: Tensor,
    inter: usize,
}

impl Mlp {
    fn load(w: &Weights, hidden: usize, inter: usize) -> Result<Self, ModelError> {
        let g = w.pp("gate_proj").get(&[inter, hidden], "weight")?;
        let u = w.pp("up_proj").get(&[inter, hidden], "weight")?;
        Ok(Self {
            gate_up: Tensor::cat(&[g, u], 0)?,
            down: w.pp("down_proj").get(&[hidden, inter], "weight")?,
            inter,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        // bf16 on the CPU at decode sizes: both projections in two parallel passes, rounded as
        // the ops below round.
        if x.dim(0)? <= MAX_FUSED_MLP_TOKENS {
            if let Some(y) =
                switchyard_kernels::moe::mlp_forward_cpu_bf16(x, &self.gate_up, &self.down)?
            {
                return Ok(y.to_dtype(x.dtype())?);
            }
        }
        let gu = matmul_t(x, &self.gate_up)?;
        let act = (gu.narrow(D::Minus1, 0, self.inter)?.silu()?
            * gu.narrow(D::Minus1, self.inter, self.inter)?)?;
        matmul_t(&act, &self.down)
    }
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
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn load(w: &Weights, cfg: &ModelConfig) -> Result<Self, ModelError> {
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
        let bias = match (q.bias, k.bias, v.bias) {
            (Some(qb), Some(kb), Some(vb)) => Some(Tensor::cat(&[qb, kb, vb], 0)?),
            _ => None,
        };
        Ok(Self {
            qkv_proj: Linear {
                weight: Tensor::cat(&[q.weight, k.weight, v.weight], 0)?,
                bias,
            },
            o_proj: Linear::load(&w.pp("o_proj"), h, nh * hd, b)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            scale: 1.0 / (hd as f64).sqrt(),
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
        let (q, k, v) = (f32v(q)?, f32v(k)?, f32v(v)?);
        let mut out = vec![0f32; t * nh * hd];
        kv.write_and_attend(layer, &k, &v, batch, &q, nh, self.scale as f32, &mut out)?;
        let out = Tensor::from_vec(out, (t, nh * hd), x.device())?.to_dtype(x.dtype())?;
        self.o_proj.forward(&out)
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
        reshape_and_cache(&kv_in(k)?, &kv_in(v)?, &batch.slots, k_cache, v_cache)?;
        let q = q.transpose(0, 1)?.to_dtype(DType::F32)?.contiguous()?;
        let out = paged_attention(&q, k_cache, v_cache, batch, self.scale as f32)?;
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
        let bias = match bias {
            Some(b) => Some(b.to_vec1::<f32>()?),
            None => None,
        };
        Ok((MoeExec::Reference { bias, experts }, shared))
    }

    fn name(&self) -> &'static str {
        match self {
            MoeExec::Reference { .. } => "reference",
            #[cfg(feature = "cuda")]
            MoeExec::CudaGate { .. } => "cuda-gate+reference-experts",
            #[cfg(feature = "cuda")]
            MoeExec::CudaKernels(_) => "cuda-kernels",
        }
    }
}

impl Moe {
    fn load(w: &Weights, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let (h, e, i) = (cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size);
        let router = w.pp("gate").get_f32(&[e, h], "weight")?;
        let bias = if cfg.gate.expert_bias {
            Some(w.get_f32(&[e], "e_score_correction_bias")?)
        } else {
            None
        };
        let ex = w.pp("experts");
        let experts = if ex.contains("gate_up_proj") {
            ExpertWeights {
                gate_up: ex.get(&[e, 2 * i, h], "gate_up_proj")?,
                down: ex.get(&[e, h, i], "down_proj")?,
            }
        } else {
            // Per-expert tensors (hub dialect): stack into the fused layout once, at load.
            let mut gu = Vec::with_capacity(e);
            let mut dn = Vec::with_capacity(e);
            for j in 0..e {
                let x = ex.pp(j);
                let g = x.pp("gate_proj").get(&[i, h], "weight")?;
                let u = x.pp("up_proj").get(&[i, h], "weight")?;
                gu.push(Tensor::cat(&[g, u], 0)?);
                dn.push(x.pp("down_proj").get(&[h, i], "weight")?);
            }
            ExpertWeights {
                gate_up: Tensor::stack(&gu, 0)?,
                down: Tensor::stack(&dn, 0)?,
            }
        };
        let shared = if cfg.num_shared_experts > 0 {
            Some(Mlp::load(
                &w.pp("shared_experts"),
                h,
                i * cfg.num_shared_experts,
            )?)
        } else {
            None
        };
        let gate = cfg.gate_config();
        let (exec, shared) = MoeExec::choose(experts, bias, shared, &gate, w.dtype())?;
        Ok(Self {
            router,
            gate,
            shared,
            fp32_combine: cfg.moe_fp32_combine,
            exec,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let logits = x.to_dtype(DType::F32)?.matmul(&self.router.t()?)?;
        let routed = match &self.exec {
            MoeExec::Reference { bias, experts } => {
                let logits = logits.flatten_all()?.to_vec1::<f32>()?;
                let g = gate_topk(&logits, bias.as_deref(), &self.gate)?;
                let plan = dispatch(&g, self.gate.num_experts)?;
                // bf16 on the CPU: the shared expert joins the routed experts' two parallel
                // passes and the sum stays in f32 (so only with the fp32 combine).
                let fuse = self.fp32_combine && x.dim(0)? <= MAX_FUSED_MLP_TOKENS;
                if let (Some(s), true) = (&self.shared, fuse) {
                    if let Some(y) = switchyard_kernels::moe::experts_forward_with_shared(
                        x, experts, &s.gate_up, &s.down, &g, &plan,
                    )? {
                        return Ok(y.to_dtype(x.dtype())?);
                    }
                }
                experts_forward(x, experts, &g, &plan)?
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
        };
        Ok(match &self.shared {
            None => routed,
            Some(s) => {
                let sh = s.forward(x)?;
                if self.fp32_combine {
                    (routed.to_dtype(DType::F32)? + sh.to_dtype(DType::F32)?)?
                        .to_dtype(x.dtype())?
                } else {
                    (routed + sh)?
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
                .is_some_and(|s| s.gate_up.dims() == [2 * i, h] && s.down.dims() == [h, i]);
            let (mut gate_up, mut down) = (experts.gate_up, experts.down);
            let shared = match shared {
                Some(s) if fusable => {
                    gate_up = Tensor::cat(&[&gate_up, &s.gate_up.unsqueeze(0)?], 0)?;
                    down = Tensor::cat(&[&down, &s.down.unsqueeze(0)?], 0)?;
                    None
                }
                other => other,
            };
            let (pi, ph) = (
                i.next_multiple_of(KERNEL_DIM_MULTIPLE),
                h.next_multiple_of(KERNEL_DIM_MULTIPLE),
            );
            if pi != i {
                let g = gate_up.narrow(1, 0, i)?.pad_with_zeros(1, 0, pi - i)?;
                let u = gate_up.narrow(1, i, i)?.pad_with_zeros(1, 0, pi - i)?;
                gate_up = Tensor::cat(&[g, u], 1)?;
                down = down.pad_with_zeros(2, 0, pi - i)?;
            }
            if ph != h {
                gate_up = gate_up.pad_with_zeros(2, 0, ph - h)?;
                down = down.pad_with_zeros(1, 0, ph - h)?;
            }
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
    fn load(w: &Weights, cfg: &ModelConfig, kind: LayerKind) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        Ok(Self {
            input_layernorm: RmsNorm::load(&w.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
            self_attn: Attention::load(&w.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                &w.pp("post_attention_layernorm"),
                h,
                cfg.rms_norm_eps,
            )?,
            mlp: match kind {
                LayerKind::Dense => {
                    FeedForward::Dense(Mlp::load(&w.pp("mlp"), h, cfg.intermediate_size)?)
                }
                LayerKind::Moe => FeedForward::Moe(Moe::load(&w.pp("mlp"), cfg)?),
            },
        })
    }
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
    lm_head: Tensor,
    rope: Rope,
    dtype: DType,
    device: Device,
    mtp: Option<HashMap<String, Tensor>>,
}

impl HyV3Model {
    /// Loads `config.json` and the weights of a model folder.
    pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Arc::new(Checkpoint::open(dir)?);
        Self::load(cfg, ckpt, opts, |_, _| {})
    }

    /// Builds the model from a parsed config and an opened checkpoint; `progress(done, total)`
    /// is called after each layer (for a loading bar).
    pub fn load(
        cfg: ModelConfig,
        ckpt: Arc<Checkpoint>,
        opts: &LoadOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let root = Weights::new(ckpt.clone(), opts.dtype, opts.device.clone());
        let m = root.pp("model");
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = m.pp("embed_tokens").get(&[v, h], "weight")?;
        let total = cfg.num_hidden_layers;
        let mut layers = Vec::with_capacity(total);
        for (i, kind) in cfg.layer_kinds.iter().enumerate() {
            layers.push(DecoderLayer::load(&m.pp("layers").pp(i), &cfg, *kind)?);
            progress(i + 1, total);
        }
        let norm = RmsNorm::load(&m.pp("norm"), h, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings && !root.contains("lm_head.weight") {
            embed.clone()
        } else {
            root.pp("lm_head").get(&[v, h], "weight")?
        };
        let mtp = if opts.load_mtp {
            let mut map = HashMap::new();
            for l in 0..cfg.num_mtp_layers.max(1) {
                let prefix = format!("model.layers.{}.", cfg.num_hidden_layers + l);
                let names: Vec<String> = ckpt
                    .names()
                    .filter(|n| n.starts_with(&prefix))
                    .map(str::to_string)
                    .collect();
                for n in names {
                    let st = ckpt.get_any_shape(&n, opts.dtype, &opts.device)?;
                    map.insert(n, st);
                }
            }
            if map.is_empty() {
                return Err(ModelError::MissingTensor {
                    name: format!("model.layers.{}.* (MTP layer)", cfg.num_hidden_layers),
                    dir: ckpt.dir().to_path_buf(),
                });
            }
            Some(map)
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
            device: opts.device.clone(),
            mtp,
            cfg,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// MTP layer tensors, when loaded with `load_mtp`.
    pub fn mtp_tensors(&self) -> Option<&HashMap<String, Tensor>> {
        self.mtp.as_ref()
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
        self.on_cpu_worker(|| self.forward_contiguous(ids, cache, which))
    }

    /// Runs a forward pass on a rayon worker when the model is on the CPU, so the kernels'
    /// parallel loops start inside the pool ([`switchyard_kernels::cpu_gemv::on_worker`]).
    fn on_cpu_worker<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.device.is_cpu() {
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
        self.validate_input(ids, cache.len())?;
        let t = ids.len();
        let pos0 = cache.len();
        let (cos, sin) = self.rope.tables(pos0..pos0 + t, self.dtype, &self.device)?;
        let x = self.run_layers(ids, |i, attn, hn| attn.forward(hn, &cos, &sin, cache, i))?;
        cache.advance(t);
        let x = match which {
            Logits::All => x,
            Logits::Last => x.narrow(0, t - 1, 1)?,
        };
        self.head(&x)
    }

    /// Runs a batch of sequences (prefill chunks, decodes, or both) through the paged KV cache.
    /// Returns one f32 logits tensor per sequence: `[1, vocab]` for [`Logits::Last`], or
    /// `[tokens, vocab]` for [`Logits::All`].
    pub fn forward_paged(
        &self,
        seqs: &[PagedSeq<'_>],
        kv: &mut PagedKvCache,
    ) -> Result<Vec<Tensor>, ModelError> {
        self.on_cpu_worker(|| self.forward_paged_batch(seqs, kv))
    }

    fn forward_paged_batch(
        &self,
        seqs: &[PagedSeq<'_>],
        kv: &mut PagedKvCache,
    ) -> Result<Vec<Tensor>, ModelError> {
        if seqs.is_empty() {
            return Ok(vec![]);
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut attn = Vec::with_capacity(seqs.len());
        let mut slots = Vec::new();
        let bs = kv.layout().block_size;
        for s in seqs {
            self.validate_input(s.tokens, s.pos0)?;
            let ctx = s.pos0 + s.tokens.len();
            if s.block_table.len() * bs < ctx {
                return Err(ModelError::InvalidInput(format!(
                    "block table of {} blocks cannot hold {ctx} tokens",
                    s.block_table.len()
                )));
            }
            attn.push(switchyard_kernels::SeqAttn {
                q_start: ids.len(),
                q_len: s.tokens.len(),
                ctx_len: ctx,
                block_table: s.block_table,
            });
            for p in s.pos0..ctx {
                positions.push(p);
                slots.push(s.block_table[p / bs] as usize * bs + p % bs);
            }
            ids.extend_from_slice(s.tokens);
        }
        let meta = PagedBatchMeta {
            seqs: &attn,
            slots: &slots,
            #[cfg(feature = "cuda")]
            device: if kv.is_on_device() {
                Some(switchyard_kernels::cuda::PagedBatch::new(
                    &self.device,
                    &attn,
                    ids.len(),
                    kv.layout(),
                )?)
            } else {
                None
            },
        };
        let (cos, sin) = self
            .rope
            .tables(positions.iter().copied(), self.dtype, &self.device)?;
        let x = self.run_layers(&ids, |i, a, hn| {
            a.forward_paged(hn, &cos, &sin, kv, i, &meta)
        })?;
        // Final norm and lm_head only on the rows someone asked for.
        let mut rows = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        for (s, a) in seqs.iter().zip(&attn) {
            let start = rows.len();
            match s.logits {
                Logits::All => rows.extend((a.q_start..a.q_start + a.q_len).map(|r| r as u32)),
                Logits::Last => rows.push((a.q_start + a.q_len - 1) as u32),
            }
            spans.push((start, rows.len() - start));
        }
        let idx = Tensor::from_slice(&rows, rows.len(), &self.device)?;
        let logits = self.head(&x.index_select(&idx, 0)?)?;
        spans
            .into_iter()
            .map(|(s, n)| Ok(logits.narrow(0, s, n)?))
            .collect()
    }

    fn run_layers(
        &self,
        ids: &[u32],
        mut attend: impl FnMut(usize, &Attention, &Tensor) -> Result<Tensor, ModelError>,
    ) -> Result<Tensor, ModelError> {
        let input = Tensor::from_slice(ids, ids.len(), &self.device)?;
        let mut x = self.embed_tokens.forward(&input)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let hn = layer.input_layernorm.forward(&x)?;
            let a = attend(i, &layer.self_attn, &hn)?;
            let x1 = (x + a)?;
            let hn = layer.post_attention_layernorm.forward(&x1)?;
            let f = match &layer.mlp {
                FeedForward::Dense(m) => m.forward(&hn)?,
                FeedForward::Moe(m) => m.forward(&hn)?,
            };
            x = (x1 + f)?;
        }
        Ok(x)
    }

    fn head(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let x = self.norm.forward(x)?;
        Ok(matmul_t(&x, &self.lm_head)?.to_dtype(DType::F32)?)
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

    /// A paged KV cache on the model's device with `num_blocks` blocks of `block_size` tokens
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
            self.cfg.num_hidden_layers,
            switchyard_kernels::KvLayout {
                num_blocks,
                block_size,
                kv_heads: self.cfg.num_key_value_heads,
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
            self.cfg.num_hidden_layers,
            switchyard_kernels::KvLayout {
                num_blocks,
                block_size,
                kv_heads: self.cfg.num_key_value_heads,
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
