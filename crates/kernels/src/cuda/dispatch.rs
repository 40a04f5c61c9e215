//! Expert dispatch on the GPU (`kernels/moe_dispatch.cu`): count → prefix sum → place, plus the
//! row tiles the grouped GEMMs walk, in one launch with no host synchronisation.

use candle_core::cuda_backend::cudarc::driver::{
    CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
};
use candle_core::{DType, Tensor};

use super::{
    alloc, check_tensor, cuda_device, dim_i32, driver_err, invalid, view, wrap, MoeKernels,
    DISPATCH_MAX_EXPERTS, TILE_ROWS,
};
use crate::KernelError;

/// Threads of the single dispatch block (`DISPATCH_THREADS` in moe_dispatch.cu).
const DISPATCH_THREADS: u32 = 1024;

/// Upper bound on the row tiles of a plan with `slots` entries over `experts` experts: every
/// expert contributes at most one partial tile.
pub fn max_tiles(slots: usize, experts: usize) -> usize {
    slots.div_ceil(TILE_ROWS) + experts.min(slots)
}

/// The gate's choices grouped by expert, on the device (the GPU form of
/// [`crate::moe::DispatchPlan`]). All tensors are u32.
#[derive(Debug, Clone)]
pub struct CudaDispatchPlan {
    /// Routed experts.
    pub num_experts: usize,
    /// Tokens the plan covers.
    pub tokens: usize,
    /// Experts per token.
    pub top_k: usize,
    /// `[E + 1]`: expert e's entries are `offsets[e]..offsets[e+1]` of `token_of`/`slot_of`.
    pub offsets: Tensor,
    /// `[T * k]`: token of each entry, grouped by expert (order within an expert unspecified).
    pub token_of: Tensor,
    /// `[T * k]`: flat gate slot (`t * k + j`) of each entry.
    pub slot_of: Tensor,
    /// `[max_tiles]`: expert of each row tile (valid below `num_tiles`).
    pub tile_expert: Tensor,
    /// `[max_tiles]`: first permutation row of each tile.
    pub tile_start: Tensor,
    /// `[1]`: number of real tiles.
    pub num_tiles: Tensor,
    /// Length of the tile arrays (the grid the GEMMs launch).
    pub max_tiles: usize,
}

/// Raw device views of a dispatch plan's buffers, for [`MoeKernels::launch_dispatch`].
pub struct DispatchViews<'a> {
    /// `[E + 1]`.
    pub offsets: CudaViewMut<'a, u32>,
    /// `[T * k]`.
    pub token_of: CudaViewMut<'a, u32>,
    /// `[T * k]`.
    pub slot_of: CudaViewMut<'a, u32>,
    /// `[max_tiles]`.
    pub tile_expert: CudaViewMut<'a, u32>,
    /// `[max_tiles]`.
    pub tile_start: CudaViewMut<'a, u32>,
    /// `[1]`.
    pub num_tiles: CudaViewMut<'a, u32>,
}

impl MoeKernels {
    /// Launches the dispatch of `ids` (`[tokens, top_k]`, u32) over `num_experts` experts into
    /// `out` (sizes per [`DispatchViews`], `max_tiles` = [`max_tiles`]`(tokens * top_k, E)`).
    /// Ids `>= num_experts` are dropped on the GPU (the gate never writes them).
    pub fn launch_dispatch(
        &self,
        ids: &CudaView<'_, u32>,
        tokens: usize,
        top_k: usize,
        num_experts: usize,
        out: &mut DispatchViews<'_>,
    ) -> Result<(), KernelError> {
        let n = tokens * top_k;
        if num_experts == 0 || num_experts > DISPATCH_MAX_EXPERTS {
            return Err(invalid(format!(
                "the CUDA dispatch handles 1 to {DISPATCH_MAX_EXPERTS} experts, got {num_experts}"
            )));
        }
        if top_k == 0 {
            return Err(invalid("dispatch needs top_k >= 1".into()));
        }
        if ids.len() != n {
            return Err(invalid(format!(
                "gate ids hold {} entries, expected {tokens} tokens x {top_k}",
                ids.len()
            )));
        }
        let mt = max_tiles(n, num_experts);
        if out.offsets.len() < num_experts + 1
            || out.token_of.len() < n
            || out.slot_of.len() < n
            || out.tile_expert.len() < mt
            || out.tile_start.len() < mt
            || out.num_tiles.is_empty()
        {
            return Err(invalid(format!(
                "dispatch buffers too small for {n} entries over {num_experts} experts \
                 ({mt} tiles)"
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (DISPATCH_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_i, k_i, e_i) = (dim_i32(n, "gate slots")?, top_k as i32, num_experts as i32);
        let (rows_i, mt_i) = (TILE_ROWS as i32, dim_i32(mt.max(1), "tiles")?);
        let mut b = self.stream.launch_builder(&self.dispatch);
        b.arg(ids)
            .arg(&n_i)
            .arg(&k_i)
            .arg(&e_i)
            .arg(&rows_i)
            .arg(&mut out.offsets)
            .arg(&mut out.token_of)
            .arg(&mut out.slot_of)
            .arg(&mut out.tile_expert)
            .arg(&mut out.tile_start)
            .arg(&mut out.num_tiles)
            .arg(&mt_i);
        // SAFETY: argument list matches moe_dispatch; buffer sizes checked above.
        unsafe { b.launch(cfg) }.map_err(driver_err("launching moe_dispatch"))?;
        Ok(())
    }
}

/// Groups the gate's choices (`ids`, u32 `[T, k]` on a CUDA device) by expert on the device,
/// with the contract of [`crate::moe::dispatch`] except that the order of entries within an
/// expert is unspecified.
pub fn dispatch(ids: &Tensor, num_experts: usize) -> Result<CudaDispatchPlan, KernelError> {
    let dev = cuda_device(ids, "gate ids")?;
    check_tensor(ids, "gate ids", DType::U32, &dev)?;
    let (t, k) = ids.dims2().map_err(|_| {
        invalid(format!(
            "gate ids must be [tokens, top_k], got shape {:?}",
            ids.dims()
        ))
    })?;
    let kern = MoeKernels::for_device(&dev)?;
    let n = t * k;
    let mt = max_tiles(n, num_experts).max(1);
    let mut offsets = alloc::<u32>(&dev, num_experts + 1, "dispatch offsets")?;
    let mut token_of = alloc::<u32>(&dev, n, "dispatch token_of")?;
    let mut slot_of = alloc::<u32>(&dev, n, "dispatch slot_of")?;
    let mut tile_expert = alloc::<u32>(&dev, mt, "dispatch tile_expert")?;
    let mut tile_start = alloc::<u32>(&dev, mt, "dispatch tile_start")?;
    let mut num_tiles = alloc::<u32>(&dev, 1, "dispatch num_tiles")?;
    {
        let (is, il) = ids.storage_and_layout();
        let iv = view::<u32>(&is, il, "gate ids")?;
        let mut out = DispatchViews {
            offsets: offsets.slice_mut(0..num_experts + 1),
            token_of: token_of.slice_mut(0..n),
            slot_of: slot_of.slice_mut(0..n),
            tile_expert: tile_expert.slice_mut(0..mt),
            tile_start: tile_start.slice_mut(0..mt),
            num_tiles: num_tiles.slice_mut(0..1),
        };
        kern.launch_dispatch(&iv, t, k, num_experts, &mut out)?;
    }
    Ok(CudaDispatchPlan {
        num_experts,
        tokens: t,
        top_k: k,
        offsets: wrap(offsets, &dev, num_experts + 1),
        token_of: wrap(token_of, &dev, n),
        slot_of: wrap(slot_of, &dev, n),
        tile_expert: wrap(tile_expert, &dev, mt),
        tile_start: wrap(tile_start, &dev, mt),
        num_tiles: wrap(num_tiles, &dev, 1),
        max_tiles: mt,
    })
}
