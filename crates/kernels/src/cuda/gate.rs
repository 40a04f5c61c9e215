//! Gate top-k on the GPU (`kernels/moe_gate.cu`): one warp per token, no host synchronisation.

use candle_core::cuda_backend::cudarc::driver::{
    CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
};
use candle_core::{DType, Tensor};

use super::{
    alloc, check_tensor, cuda_device, driver_err, grid_u32, invalid, view, wrap, MoeKernels,
    GATE_MAX_EXPERTS, GATE_MAX_TOP_K,
};
use crate::gate::{GateConfig, ScoreFunction};
use crate::KernelError;

/// Warps (tokens) per block of the gate kernel.
const GATE_TOKENS_PER_BLOCK: usize = 4;

impl MoeKernels {
    /// Checks that the gate kernel can run `cfg`.
    pub fn check_gate_config(cfg: &GateConfig) -> Result<(), KernelError> {
        cfg.validate()?;
        if cfg.num_experts > GATE_MAX_EXPERTS {
            return Err(invalid(format!(
                "the CUDA gate handles at most {GATE_MAX_EXPERTS} experts, this layer has {}",
                cfg.num_experts
            )));
        }
        if cfg.top_k > GATE_MAX_TOP_K {
            return Err(invalid(format!(
                "the CUDA gate chooses at most {GATE_MAX_TOP_K} experts per token, top_k is {}",
                cfg.top_k
            )));
        }
        if cfg.n_group > 32 {
            return Err(invalid(format!(
                "the CUDA gate handles at most 32 expert groups, the config has {}",
                cfg.n_group
            )));
        }
        Ok(())
    }

    /// Launches the gate on `tokens` rows of f32 logits (`[tokens, E]`) with an optional
    /// selection-only bias (`[E]`), writing ids (`[tokens, k]`) and weights (`[tokens, k]`).
    pub fn launch_gate_topk(
        &self,
        logits: &CudaView<'_, f32>,
        bias: Option<&CudaView<'_, f32>>,
        cfg: &GateConfig,
        tokens: usize,
        ids: &mut CudaViewMut<'_, u32>,
        weights: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        Self::check_gate_config(cfg)?;
        let (e, k) = (cfg.num_experts, cfg.top_k);
        if logits.len() != tokens * e {
            return Err(invalid(format!(
                "router logits hold {} values, expected {tokens} tokens x {e} experts",
                logits.len()
            )));
        }
        if let Some(b) = bias {
            if b.len() != e {
                return Err(invalid(format!(
                    "expert bias has {} entries, expected {e}",
                    b.len()
                )));
            }
        }
        if ids.len() < tokens * k || weights.len() < tokens * k {
            return Err(invalid(format!(
                "gate outputs hold {} ids and {} weights, need {tokens} x {k}",
                ids.len(),
                weights.len()
            )));
        }
        if tokens == 0 {
            return Ok(());
        }
        let blocks = grid_u32(tokens.div_ceil(GATE_TOKENS_PER_BLOCK), "gate")?;
        let cfg_launch = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: ((32 * GATE_TOKENS_PER_BLOCK) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let t = super::dim_i32(tokens, "tokens")?;
        let (e, k) = (e as i32, k as i32);
        let score_fn: i32 = match cfg.score {
            ScoreFunction::Sigmoid => 0,
            ScoreFunction::Softmax => 1,
        };
        let (n_group, topk_group) = (cfg.n_group as i32, cfg.topk_group as i32);
        let renorm = cfg.renormalize as i32;
        let null: u64 = 0;
        let mut b = self.stream.launch_builder(&self.gate);
        b.arg(logits);
        match bias {
            Some(bias) => b.arg(bias),
            None => b.arg(&null),
        };
        b.arg(ids)
            .arg(weights)
            .arg(&t)
            .arg(&e)
            .arg(&k)
            .arg(&score_fn)
            .arg(&n_group)
            .arg(&topk_group)
            .arg(&renorm)
            .arg(&cfg.scaling)
            .arg(&cfg.renorm_eps);
        // SAFETY: argument list matches moe_gate_topk_f32; sizes checked above.
        unsafe { b.launch(cfg_launch) }.map_err(driver_err("launching moe_gate_topk_f32"))?;
        Ok(())
    }
}

/// Gate top-k on the GPU: f32 router logits `[T, E]` on a CUDA device and an optional f32
/// selection-only bias `[E]` → (`ids` u32 `[T, k]`, `weights` f32 `[T, k]`), with the contract of
/// [`crate::gate::gate_topk`] (ties to the lower expert id).
pub fn gate_topk(
    logits: &Tensor,
    bias: Option<&Tensor>,
    cfg: &GateConfig,
) -> Result<(Tensor, Tensor), KernelError> {
    let dev = cuda_device(logits, "router logits")?;
    check_tensor(logits, "router logits", DType::F32, &dev)?;
    let (t, e) = logits.dims2().map_err(|_| {
        invalid(format!(
            "router logits must be [tokens, experts], got shape {:?}",
            logits.dims()
        ))
    })?;
    if e != cfg.num_experts {
        return Err(invalid(format!(
            "router logits have {e} columns but the gate has {} experts",
            cfg.num_experts
        )));
    }
    if let Some(b) = bias {
        check_tensor(b, "expert bias", DType::F32, &dev)?;
        if b.dims() != [e] {
            return Err(invalid(format!(
                "expert bias must be [{e}], got shape {:?}",
                b.dims()
            )));
        }
    }
    let kern = MoeKernels::for_device(&dev)?;
    let k = cfg.top_k;
    let mut ids = alloc::<u32>(&dev, t * k, "gate ids")?;
    let mut weights = alloc::<f32>(&dev, t * k, "gate weights")?;
    {
        let (ls, ll) = logits.storage_and_layout();
        let lv = view::<f32>(&ls, ll, "router logits")?;
        let bias_guard = bias.map(|b| b.storage_and_layout());
        let bv = match &bias_guard {
            Some((bs, bl)) => Some(view::<f32>(bs, bl, "expert bias")?),
            None => None,
        };
        let mut iv = ids.slice_mut(0..t * k);
        let mut wv = weights.slice_mut(0..t * k);
        kern.launch_gate_topk(&lv, bv.as_ref(), cfg, t, &mut iv, &mut wv)?;
    }
    Ok((wrap(ids, &dev, (t, k)), wrap(weights, &dev, (t, k))))
}
