//! Routed expert compute on the GPU (`kernels/moe_experts.cu`), bf16 weights and activations
//! with f32 accumulation: the decode GEMV path and the tiled tensor-core path.

use candle_core::cuda_backend::cudarc::driver::{
    CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
};
use candle_core::{DType, Tensor};
use half::bf16;

use super::dispatch::{dispatch, max_tiles, CudaDispatchPlan};
use super::{
    alloc, check_tensor, cuda_device, dim_i32, driver_err, grid_u32, invalid, view, wrap,
    MoeKernels, GEMV_MAX_SLOTS, GEMV_MAX_TOKENS,
};
use crate::moe::ExpertWeights;
use crate::KernelError;

/// Threads per block of every expert kernel.
pub(crate) const EXPERT_THREADS: u32 = 256;
/// Warps per block of the expert kernels (`GEMV_WARPS` in moe_experts.cu).
const EXPERT_WARPS: usize = EXPERT_THREADS as usize / 32;
/// Outputs per GEMV block (`GEMV_OUT_PER_BLOCK` in moe_experts.cu: 8 warps x 2 rows).
const GEMV_OUT_PER_BLOCK: usize = 16;
/// Output columns per tile of the down GEMM (`TBN`); the gate/up GEMM covers half as many
/// intermediate columns (gate and up side by side).
const TILE_COLS: usize = 128;
/// Dynamic shared memory of each tiled GEMM block: 4 stages of a 64x64 A tile and a 128x64 B
/// tile in bf16 with 8 columns of padding (`sizeof(TileSmem)` in moe_experts.cu, which
/// static_asserts it).
pub(crate) const TILE_SMEM_BYTES: usize = 4 * (64 + 128) * 72 * 2;

/// Which expert kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertPath {
    /// GEMV up to [`super::AUTO_GEMV_MAX_TOKENS`] tokens (and [`GEMV_MAX_SLOTS`] slots), tiled
    /// above.
    #[default]
    Auto,
    /// Decode GEMV: each selected expert read once, top-k reduction fused; small batches only.
    Gemv,
    /// Decode GEMV whose down projection spreads experts over blocks and reduces with f32
    /// atomics (see [`MoeKernels::launch_experts_gemv`]); small batches only.
    GemvAtomic,
    /// [`ExpertPath::Gemv`] with the gate/up projection of [`GemvGateUp::Rows`] (a persistent
    /// grid, one output row per warp; same result bit for bit); small batches only. Opt-in
    /// until a GPU run has measured it against `Gemv` (docs/gpu-results.md, "Left").
    GemvRows,
    /// Grouped tensor-core GEMMs over the dispatch permutation; any batch.
    Tiled,
}

/// Which kernel computes the GEMV path's gate/up projection (`act`); both give the same
/// values bit for bit (each lane sums the same chunks in the same order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemvGateUp {
    /// `moe_gemv_gate_up`: one block per (slot, 16 outputs); blocks of repeated experts exit.
    #[default]
    Blocks,
    /// `moe_gemv_gate_up_rows{1,2,4,8}`: a persistent grid of SMs x resident blocks in which
    /// each warp takes one output row of one distinct expert at a time, so the last wave is
    /// spread over every SM (see the kernel's comment for the wave arithmetic).
    Rows,
}

/// Problem sizes of one expert launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeDims {
    /// Tokens `T`.
    pub tokens: usize,
    /// Slots per token `k` (routed experts chosen, plus any always-on shared expert the caller
    /// appended as an extra column).
    pub top_k: usize,
    /// Experts in the weight tensors `E`.
    pub experts: usize,
    /// Hidden size `H`.
    pub hidden: usize,
    /// Expert intermediate size `I`.
    pub inter: usize,
}

impl MoeDims {
    fn check(&self) -> Result<(), KernelError> {
        // 32 = the K step of the tiled kernels; also keeps every row 16-byte aligned.
        if self.hidden & 31 != 0 || self.inter & 31 != 0 || self.hidden == 0 || self.inter == 0 {
            return Err(invalid(format!(
                "the CUDA expert kernels need hidden and intermediate sizes that are positive \
                 multiples of 32, got hidden {} and intermediate {}",
                self.hidden, self.inter
            )));
        }
        if self.top_k == 0 || self.experts == 0 {
            return Err(invalid(format!(
                "expert launch needs top_k >= 1 and experts >= 1, got {} and {}",
                self.top_k, self.experts
            )));
        }
        dim_i32(self.tokens * self.top_k, "tokens x top_k")?;
        dim_i32(self.tokens * self.hidden, "tokens x hidden")?;
        dim_i32(
            self.tokens * self.top_k * self.inter,
            "slots x intermediate",
        )?;
        Ok(())
    }

    fn gemv_ok(&self) -> bool {
        self.tokens <= GEMV_MAX_TOKENS && self.tokens * self.top_k <= GEMV_MAX_SLOTS
    }
}

/// The read-only inputs of an expert launch as raw device views.
pub struct ExpertViews<'a> {
    /// `[T, H]` bf16.
    pub x: CudaView<'a, bf16>,
    /// `[E, 2I, H]` bf16.
    pub gate_up: CudaView<'a, bf16>,
    /// `[E, H, I]` bf16.
    pub down: CudaView<'a, bf16>,
    /// `[T, k]` f32 combine weights, indexed by flat slot `t * k + j`.
    pub weights: CudaView<'a, f32>,
}

impl ExpertViews<'_> {
    fn check(&self, d: &MoeDims) -> Result<(), KernelError> {
        let (t, k, e, h, i) = (d.tokens, d.top_k, d.experts, d.hidden, d.inter);
        let want = [
            ("x", self.x.len(), t * h),
            ("gate_up", self.gate_up.len(), e * 2 * i * h),
            ("down", self.down.len(), e * h * i),
            ("weights", self.weights.len(), t * k),
        ];
        for (name, got, exp) in want {
            if got != exp {
                return Err(invalid(format!(
                    "{name} holds {got} elements, expected {exp} for {d:?}"
                )));
            }
        }
        Ok(())
    }
}

impl MoeKernels {
    /// Decode path: `y = Σ_j w[t,j] · E_{ids[t,j]}(x[t])` for `T <= 8` tokens. `ids` is
    /// `[T, k]` u32; `act` (f32, `[T*k, I]`) is scratch; `y` is `[T, H]` bf16. Ids must be
    /// distinct within a token (the gate's are) and `< E` (others are skipped).
    ///
    /// Without `acc` the down projection runs as one block per chunk of H rows that walks the
    /// batch's distinct experts and sums the k slots of each token in registers (two launches,
    /// deterministic). With `acc` (f32 `[T, H]` scratch) it runs one block per (expert, chunk)
    /// and reduces with f32 atomics, then converts (memset + three launches; more bytes in
    /// flight, summation order not fixed). The gate/up projection is [`GemvGateUp::Blocks`];
    /// [`MoeKernels::launch_experts_gemv_with`] chooses it.
    pub fn launch_experts_gemv(
        &self,
        inp: &ExpertViews<'_>,
        ids: &CudaView<'_, u32>,
        d: &MoeDims,
        act: &mut CudaViewMut<'_, f32>,
        acc: Option<&mut CudaViewMut<'_, f32>>,
        y: &mut CudaViewMut<'_, bf16>,
    ) -> Result<(), KernelError> {
        self.launch_experts_gemv_with(inp, ids, d, GemvGateUp::Blocks, act, acc, y)
    }

    /// [`MoeKernels::launch_experts_gemv`] with the gate/up kernel chosen by `gate_up`.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_experts_gemv_with(
        &self,
        inp: &ExpertViews<'_>,
        ids: &CudaView<'_, u32>,
        d: &MoeDims,
        gate_up: GemvGateUp,
        act: &mut CudaViewMut<'_, f32>,
        acc: Option<&mut CudaViewMut<'_, f32>>,
        y: &mut CudaViewMut<'_, bf16>,
    ) -> Result<(), KernelError> {
        d.check()?;
        inp.check(d)?;
        if !d.gemv_ok() {
            return Err(invalid(format!(
                "the GEMV expert path handles at most {GEMV_MAX_TOKENS} tokens and \
                 {GEMV_MAX_SLOTS} slots, got {} tokens x {} slots; use the tiled path",
                d.tokens, d.top_k
            )));
        }
        let n = d.tokens * d.top_k;
        if ids.len() != n {
            return Err(invalid(format!(
                "gate ids hold {} entries, expected {n}",
                ids.len()
            )));
        }
        let th = d.tokens * d.hidden;
        if acc.as_ref().is_some_and(|a| a.len() < th) {
            return Err(invalid(format!(
                "GEMV accumulator too small: need {th} f32 for {d:?}"
            )));
        }
        if act.len() < n * d.inter || y.len() < d.tokens * d.hidden {
            return Err(invalid(format!(
                "GEMV buffers too small: act {} (need {}), y {} (need {})",
                act.len(),
                n * d.inter,
                y.len(),
                d.tokens * d.hidden
            )));
        }
        if d.tokens == 0 {
            return Ok(());
        }
        let (t, k, e, h, i) = (
            d.tokens as i32,
            d.top_k as i32,
            dim_i32(d.experts, "experts")?,
            dim_i32(d.hidden, "hidden")?,
            dim_i32(d.inter, "intermediate")?,
        );
        let (func, name, grid) = match gate_up {
            GemvGateUp::Blocks => (
                &self.gemv_gate_up,
                "moe_gemv_gate_up",
                (
                    grid_u32(d.inter.div_ceil(GEMV_OUT_PER_BLOCK), "gemv gate_up")?,
                    n as u32,
                    1,
                ),
            ),
            GemvGateUp::Rows => (
                &self.gemv_gate_up_rows[rows_index(d.tokens)],
                "moe_gemv_gate_up_rows",
                (self.gemv_rows_grid(d)?, 1, 1),
            ),
        };
        let cfg1 = LaunchConfig {
            grid_dim: grid,
            block_dim: (EXPERT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(func);
        b.arg(&inp.x)
            .arg(&inp.gate_up)
            .arg(ids)
            .arg(&mut *act)
            .arg(&t)
            .arg(&k)
            .arg(&e)
            .arg(&h)
            .arg(&i);
        // SAFETY: argument list matches moe_gemv_gate_up and moe_gemv_gate_up_rows* (the same
        // parameters); sizes checked above, T <= 8 = the largest rows kernel's MAXT.
        unsafe { b.launch(cfg1) }.map_err(|e| {
            KernelError::Cuda(format!("launching {name} (grid {grid:?}) failed: {e}"))
        })?;

        let act_v = act.as_view();
        if let Some(acc) = acc {
            self.stream
                .memset_zeros(&mut *acc)
                .map_err(driver_err("zeroing the expert accumulator"))?;
            let cfg2 = LaunchConfig {
                grid_dim: (
                    grid_u32(d.hidden.div_ceil(GEMV_OUT_PER_BLOCK), "gemv down")?,
                    n as u32,
                    1,
                ),
                block_dim: (EXPERT_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(&self.gemv_down_atomic);
            b.arg(&act_v)
                .arg(&inp.down)
                .arg(ids)
                .arg(&inp.weights)
                .arg(&mut *acc)
                .arg(&t)
                .arg(&k)
                .arg(&e)
                .arg(&h)
                .arg(&i);
            // SAFETY: argument list matches moe_gemv_down_atomic; sizes checked above.
            unsafe { b.launch(cfg2) }.map_err(driver_err("launching moe_gemv_down_atomic"))?;
            return self.launch_to_bf16(acc, y, th);
        }
        let cfg2 = LaunchConfig {
            grid_dim: (
                grid_u32(d.hidden.div_ceil(GEMV_OUT_PER_BLOCK), "gemv down")?,
                1,
                1,
            ),
            block_dim: (EXPERT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.gemv_down);
        b.arg(&act_v)
            .arg(&inp.down)
            .arg(ids)
            .arg(&inp.weights)
            .arg(&mut *y)
            .arg(&t)
            .arg(&k)
            .arg(&e)
            .arg(&h)
            .arg(&i);
        // SAFETY: argument list matches moe_gemv_down; sizes checked above.
        unsafe { b.launch(cfg2) }.map_err(driver_err("launching moe_gemv_down"))?;
        Ok(())
    }

    /// Blocks of the persistent [`GemvGateUp::Rows`] grid for `d`: every SM filled with as
    /// many blocks as fit (the occupancy the driver reported at load), but no more blocks than
    /// `T * k * I` items fill at one item per warp.
    pub fn gemv_rows_grid(&self, d: &MoeDims) -> Result<u32, KernelError> {
        let full = self.sm_count as usize * self.gemv_rows_per_sm[rows_index(d.tokens)] as usize;
        let items = d.tokens * d.top_k * d.inter;
        grid_u32(
            full.min(items.div_ceil(EXPERT_WARPS)).max(1),
            "gemv gate_up rows",
        )
    }

    /// Streaming multiprocessors, and the blocks per SM of the `moe_gemv_gate_up_rows{1,2,4,8}`
    /// kernels as the driver's occupancy query gave them (for reports).
    pub fn gemv_rows_occupancy(&self) -> (u32, [u32; 4]) {
        (self.sm_count, self.gemv_rows_per_sm)
    }

    /// Tiled path over a dispatch plan (see [`MoeKernels::launch_dispatch`]): grouped gate/up
    /// GEMM with SiLU·mul fused, grouped down GEMM whose epilogue applies the routing weight and
    /// adds into the f32 accumulator `acc` (`[T, H]`, zeroed here), then `y = bf16(acc)`.
    /// `act` (bf16, `[T*k, I]`) is scratch in permutation order.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_experts_tiled(
        &self,
        inp: &ExpertViews<'_>,
        d: &MoeDims,
        plan: &PlanViews<'_>,
        act: &mut CudaViewMut<'_, bf16>,
        acc: &mut CudaViewMut<'_, f32>,
        y: &mut CudaViewMut<'_, bf16>,
    ) -> Result<(), KernelError> {
        d.check()?;
        inp.check(d)?;
        let n = d.tokens * d.top_k;
        let mt = max_tiles(n, d.experts);
        if plan.offsets.len() != d.experts + 1
            || plan.token_of.len() < n
            || plan.slot_of.len() < n
            || plan.tile_expert.len() < mt
            || plan.tile_start.len() < mt
            || plan.num_tiles.is_empty()
        {
            return Err(invalid(format!(
                "dispatch plan does not match {d:?} (offsets {}, entries {}, tiles {})",
                plan.offsets.len(),
                plan.token_of.len(),
                plan.tile_expert.len()
            )));
        }
        let th = d.tokens * d.hidden;
        if act.len() < n * d.inter || acc.len() < th || y.len() < th {
            return Err(invalid(format!(
                "tiled buffers too small: act {} (need {}), acc {} and y {} (need {th})",
                act.len(),
                n * d.inter,
                acc.len(),
                y.len()
            )));
        }
        if d.tokens == 0 {
            return Ok(());
        }
        let (h, i) = (
            dim_i32(d.hidden, "hidden")?,
            dim_i32(d.inter, "intermediate")?,
        );
        let tiles = grid_u32(mt, "expert tiles")?;
        self.stream
            .memset_zeros(&mut *acc)
            .map_err(driver_err("zeroing the expert accumulator"))?;

        let cfg1 = LaunchConfig {
            grid_dim: (
                tiles,
                grid_u32(d.inter.div_ceil(TILE_COLS / 2), "gemm gate_up")?,
                1,
            ),
            block_dim: (EXPERT_THREADS, 1, 1),
            shared_mem_bytes: TILE_SMEM_BYTES as u32,
        };
        let mut b = self.stream.launch_builder(&self.gemm_gate_up);
        b.arg(&inp.x)
            .arg(&inp.gate_up)
            .arg(&plan.offsets)
            .arg(&plan.token_of)
            .arg(&plan.tile_expert)
            .arg(&plan.tile_start)
            .arg(&plan.num_tiles)
            .arg(&mut *act)
            .arg(&h)
            .arg(&i);
        // SAFETY: argument list matches moe_gemm_gate_up; sizes checked above.
        unsafe { b.launch(cfg1) }.map_err(driver_err("launching moe_gemm_gate_up"))?;

        let cfg2 = LaunchConfig {
            grid_dim: (
                tiles,
                grid_u32(d.hidden.div_ceil(TILE_COLS), "gemm down")?,
                1,
            ),
            block_dim: (EXPERT_THREADS, 1, 1),
            shared_mem_bytes: TILE_SMEM_BYTES as u32,
        };
        let act_v = act.as_view();
        let mut b = self.stream.launch_builder(&self.gemm_down);
        b.arg(&act_v)
            .arg(&inp.down)
            .arg(&plan.offsets)
            .arg(&plan.token_of)
            .arg(&plan.slot_of)
            .arg(&inp.weights)
            .arg(&plan.tile_expert)
            .arg(&plan.tile_start)
            .arg(&plan.num_tiles)
            .arg(&mut *acc)
            .arg(&h)
            .arg(&i);
        // SAFETY: argument list matches moe_gemm_down; sizes checked above.
        unsafe { b.launch(cfg2) }.map_err(driver_err("launching moe_gemm_down"))?;

        self.launch_to_bf16(acc, y, th)
    }

    /// `y[..n] = bf16(acc[..n])`.
    fn launch_to_bf16(
        &self,
        acc: &CudaViewMut<'_, f32>,
        y: &mut CudaViewMut<'_, bf16>,
        n: usize,
    ) -> Result<(), KernelError> {
        let cfg = LaunchConfig {
            grid_dim: (grid_u32(n.div_ceil(256), "f32 to bf16")?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let n_i = dim_i32(n, "elements")?;
        let acc_v = acc.as_view();
        let mut b = self.stream.launch_builder(&self.f32_to_bf16);
        b.arg(&acc_v).arg(&mut *y).arg(&n_i);
        // SAFETY: argument list matches moe_f32_to_bf16; sizes checked by the callers.
        unsafe { b.launch(cfg) }.map_err(driver_err("launching moe_f32_to_bf16"))?;
        Ok(())
    }
}

/// Which `moe_gemv_gate_up_rows{1,2,4,8}` serves `tokens` (the smallest MAXT >= T).
fn rows_index(tokens: usize) -> usize {
    match tokens {
        0..=1 => 0,
        2 => 1,
        3..=4 => 2,
        _ => 3,
    }
}

/// Read-only device views of a dispatch plan (see [`CudaDispatchPlan`]).
pub struct PlanViews<'a> {
    /// `[E + 1]`.
    pub offsets: CudaView<'a, u32>,
    /// `[T * k]`.
    pub token_of: CudaView<'a, u32>,
    /// `[T * k]`.
    pub slot_of: CudaView<'a, u32>,
    /// `[max_tiles]`.
    pub tile_expert: CudaView<'a, u32>,
    /// `[max_tiles]`.
    pub tile_start: CudaView<'a, u32>,
    /// `[1]`.
    pub num_tiles: CudaView<'a, u32>,
}

/// A `[0, h]` bf16 result (no zero-byte allocation).
fn empty_output(dev: &candle_core::CudaDevice, h: usize) -> Result<Tensor, KernelError> {
    Ok(wrap(alloc::<bf16>(dev, 0, "expert output")?, dev, (0, h)))
}

struct Checked {
    dev: candle_core::CudaDevice,
    dims: MoeDims,
}

/// Checks the expert op's tensors; `top_k` comes from the gate's `[T, k]` tensors.
fn check_inputs(
    x: &Tensor,
    w: &ExpertWeights,
    ids: Option<&Tensor>,
    weights: &Tensor,
) -> Result<Checked, KernelError> {
    let dev = cuda_device(x, "x")?;
    check_tensor(x, "x", DType::BF16, &dev)?;
    check_tensor(&w.gate_up, "expert gate_up weights", DType::BF16, &dev)?;
    check_tensor(&w.down, "expert down weights", DType::BF16, &dev)?;
    check_tensor(weights, "gate weights", DType::F32, &dev)?;
    let (t, h) = x
        .dims2()
        .map_err(|_| invalid(format!("x must be [tokens, hidden], got {:?}", x.dims())))?;
    let (e, i, hw) = w.dims()?;
    if hw != h {
        return Err(invalid(format!(
            "x has hidden size {h} but the expert weights expect {hw}"
        )));
    }
    let (tw, k) = weights.dims2().map_err(|_| {
        invalid(format!(
            "gate weights must be [tokens, k], got {:?}",
            weights.dims()
        ))
    })?;
    if tw != t {
        return Err(invalid(format!(
            "gate weights {:?} must be [{t}, k] for x [{t}, {h}]",
            weights.dims()
        )));
    }
    if let Some(ids) = ids {
        check_tensor(ids, "gate ids", DType::U32, &dev)?;
        if ids.dims() != [t, k] {
            return Err(invalid(format!(
                "gate ids {:?} must match gate weights [{t}, {k}]",
                ids.dims()
            )));
        }
    }
    let dims = MoeDims {
        tokens: t,
        top_k: k,
        experts: e,
        hidden: h,
        inter: i,
    };
    dims.check()?;
    Ok(Checked { dev, dims })
}

/// Runs the routed experts on the GPU: `x` bf16 `[T, H]`, expert weights bf16, the gate's
/// `ids` (u32 `[T, k]`) and `weights` (f32 `[T, k]`) → bf16 `[T, H]`, with the contract of
/// [`crate::moe::experts_forward`]. A shared expert joins as one more column of `ids`/`weights`
/// (its weights stored as one more expert, weight 1).
pub fn experts_forward(
    x: &Tensor,
    w: &ExpertWeights,
    ids: &Tensor,
    weights: &Tensor,
    path: ExpertPath,
) -> Result<Tensor, KernelError> {
    let c = check_inputs(x, w, Some(ids), weights)?;
    let d = c.dims;
    if d.tokens == 0 {
        return empty_output(&c.dev, d.hidden);
    }
    let (use_gemv, atomic, gate_up) = match path {
        ExpertPath::Auto => (
            d.gemv_ok() && d.tokens <= super::AUTO_GEMV_MAX_TOKENS,
            false,
            GemvGateUp::Blocks,
        ),
        ExpertPath::Gemv => (true, false, GemvGateUp::Blocks),
        ExpertPath::GemvAtomic => (true, true, GemvGateUp::Blocks),
        ExpertPath::GemvRows => (true, false, GemvGateUp::Rows),
        ExpertPath::Tiled => (false, false, GemvGateUp::Blocks),
    };
    if !use_gemv {
        let plan = dispatch(ids, d.experts)?;
        return experts_forward_planned(x, w, weights, &plan);
    }
    let kern = MoeKernels::for_device(&c.dev)?;
    let n = d.tokens * d.top_k;
    let mut act = alloc::<f32>(&c.dev, n * d.inter, "expert activations")?;
    let mut y = alloc::<bf16>(&c.dev, d.tokens * d.hidden, "expert output")?;
    {
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = w.gate_up.storage_and_layout();
        let (ds, dl) = w.down.storage_and_layout();
        let (is, il) = ids.storage_and_layout();
        let (ws, wl) = weights.storage_and_layout();
        let inp = ExpertViews {
            x: view(&xs, xl, "x")?,
            gate_up: view(&gs, gl, "expert gate_up weights")?,
            down: view(&ds, dl, "expert down weights")?,
            weights: view(&ws, wl, "gate weights")?,
        };
        let iv = view::<u32>(&is, il, "gate ids")?;
        let mut av = act.slice_mut(0..n * d.inter);
        let mut yv = y.slice_mut(0..d.tokens * d.hidden);
        if atomic {
            let mut acc = alloc::<f32>(&c.dev, d.tokens * d.hidden, "expert accumulator")?;
            let mut accv = acc.slice_mut(0..d.tokens * d.hidden);
            kern.launch_experts_gemv_with(
                &inp,
                &iv,
                &d,
                gate_up,
                &mut av,
                Some(&mut accv),
                &mut yv,
            )?;
        } else {
            kern.launch_experts_gemv_with(&inp, &iv, &d, gate_up, &mut av, None, &mut yv)?;
        }
    }
    Ok(wrap(y, &c.dev, (d.tokens, d.hidden)))
}

/// The tiled path over a plan from [`dispatch`] of the gate's ids (`weights` is still indexed by
/// flat slot `t * k + j`).
pub fn experts_forward_planned(
    x: &Tensor,
    w: &ExpertWeights,
    weights: &Tensor,
    plan: &CudaDispatchPlan,
) -> Result<Tensor, KernelError> {
    let c = check_inputs(x, w, None, weights)?;
    let (d, dev) = (c.dims, c.dev);
    for (name, t) in [
        ("dispatch offsets", &plan.offsets),
        ("dispatch token_of", &plan.token_of),
        ("dispatch slot_of", &plan.slot_of),
        ("dispatch tile_expert", &plan.tile_expert),
        ("dispatch tile_start", &plan.tile_start),
        ("dispatch num_tiles", &plan.num_tiles),
    ] {
        check_tensor(t, name, DType::U32, &dev)?;
    }
    if plan.tokens != d.tokens || plan.top_k != d.top_k || plan.num_experts != d.experts {
        return Err(invalid(format!(
            "the dispatch plan is for {} tokens x {} over {} experts, but the inputs are {} \
             tokens x {} over {} experts",
            plan.tokens, plan.top_k, plan.num_experts, d.tokens, d.top_k, d.experts
        )));
    }
    let (t, h) = (d.tokens, d.hidden);
    if t == 0 {
        return empty_output(&dev, h);
    }
    let kern = MoeKernels::for_device(&dev)?;
    let n = t * d.top_k;
    let mut act = alloc::<bf16>(&dev, n * d.inter, "expert activations")?;
    let mut acc = alloc::<f32>(&dev, t * h, "expert accumulator")?;
    let mut y = alloc::<bf16>(&dev, t * h, "expert output")?;
    {
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = w.gate_up.storage_and_layout();
        let (ds, dl) = w.down.storage_and_layout();
        let (ws, wl) = weights.storage_and_layout();
        let inp = ExpertViews {
            x: view(&xs, xl, "x")?,
            gate_up: view(&gs, gl, "expert gate_up weights")?,
            down: view(&ds, dl, "expert down weights")?,
            weights: view(&ws, wl, "gate weights")?,
        };
        let (os, ol) = plan.offsets.storage_and_layout();
        let (ts, tl) = plan.token_of.storage_and_layout();
        let (ss, sl) = plan.slot_of.storage_and_layout();
        let (es, el) = plan.tile_expert.storage_and_layout();
        let (ps, pl) = plan.tile_start.storage_and_layout();
        let (ns, nl) = plan.num_tiles.storage_and_layout();
        let pv = PlanViews {
            offsets: view(&os, ol, "dispatch offsets")?,
            token_of: view(&ts, tl, "dispatch token_of")?,
            slot_of: view(&ss, sl, "dispatch slot_of")?,
            tile_expert: view(&es, el, "dispatch tile_expert")?,
            tile_start: view(&ps, pl, "dispatch tile_start")?,
            num_tiles: view(&ns, nl, "dispatch num_tiles")?,
        };
        let mut av = act.slice_mut(0..n * d.inter);
        let mut accv = acc.slice_mut(0..t * h);
        let mut yv = y.slice_mut(0..t * h);
        kern.launch_experts_tiled(&inp, &d, &pv, &mut av, &mut accv, &mut yv)?;
    }
    Ok(wrap(y, &dev, (t, h)))
}
