//! CUDA implementations of the op layer (feature `cuda`), each with the contract of its CPU
//! reference in [`crate::gate`] / [`crate::moe`] and checked against it by
//! `examples/gpu_check.rs` (`scripts/gpu-check.sh`).
//!
//! The kernels live in `kernels/*.cu` at the workspace root; `build.rs` turns them into PTX
//! that is embedded here and JIT-loaded once per device through candle's cudarc
//! (`candle_core::cuda_backend::cudarc`). Every op launches on the stream of the candle
//! [`CudaDevice`] that owns its tensors, so it orders with candle's own work without a host
//! synchronisation.
//!
//! Two layers:
//! - tensor ops ([`gate_topk`], [`dispatch`], [`experts_forward`]): candle tensors in, candle
//!   tensors out, every shape and dtype checked with a sentence;
//! - [`MoeKernels`], the launchers on raw device views, for callers that keep their own buffers
//!   (no allocation per step) or capture CUDA graphs.
//!
//! Paged attention (`paged.rs`: [`paged_attention`], [`reshape_and_cache`], [`PagedKernels`])
//! reads the block-pool layout of [`crate::paged`], split over context partitions as vLLM's
//! paged attention v2 does.
//!
//! The expert compute follows the split used by vLLM's fused-MoE and llama.cpp's `mmvq`/`mmq`:
//! a GEMV path for decode batches that reads every selected expert once and fuses the top-k
//! reduction, and grouped tensor-core GEMMs over the dispatch permutation for prefill.

mod dispatch;
mod experts;
mod gate;
mod paged;

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, CudaView, DriverError,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Layout, Shape, Storage, Tensor};

use crate::KernelError;

pub use dispatch::{dispatch, max_tiles, CudaDispatchPlan, DispatchViews};
pub use experts::{
    experts_forward, experts_forward_planned, ExpertPath, ExpertViews, GemvGateUp, MoeDims,
    PlanViews,
};
pub use gate::gate_topk;
pub use paged::{
    paged_attention, reshape_and_cache, CacheElem, PagedBatch, PagedDims, PagedKernels,
    PagedMetaViews, PagedWorkspace, PAGED_HEAD_CHUNK, PAGED_MAX_HEAD_DIM, PAGED_MAX_PARTITIONS,
    PAGED_MAX_ROWS, PAGED_NO_SEQ,
};

/// Most tokens the GEMV path takes: its kernels keep one accumulator per token in registers
/// (`GEMV_MAX_TOKENS` in moe_experts.cu).
pub const GEMV_MAX_TOKENS: usize = 8;
/// Tokens up to which [`ExpertPath::Auto`] takes the GEMV path. Measured on an H200
/// (docs/gpu-results.md, Hy3 shapes): at T=1 GEMV 111 µs vs tiled 142 µs; at T=8 tiled 580 µs
/// vs GEMV 634 µs. T=2 and 4 were not measured yet; 4 splits the difference until they are
/// (gpu_check's benchmark now times both paths there).
pub const AUTO_GEMV_MAX_TOKENS: usize = 4;
/// Most (token, expert) slots the GEMV path handles in one launch (`T * k`).
pub const GEMV_MAX_SLOTS: usize = 128;
/// Rows per tile of the grouped GEMMs (`TBM` in moe_experts.cu); the dispatch plan is cut into
/// tiles of this many rows.
pub const TILE_ROWS: usize = 64;
/// Most experts the gate kernel handles (16 scores per lane of one warp).
pub const GATE_MAX_EXPERTS: usize = 512;
/// Most experts chosen per token by the gate kernel.
pub const GATE_MAX_TOP_K: usize = 32;
/// Most experts the dispatch kernel counts (its counters live in shared memory).
pub const DISPATCH_MAX_EXPERTS: usize = 4096;

const PTX_GATE: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_gate.ptx"));
const PTX_DISPATCH: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_dispatch.ptx"));
const PTX_EXPERTS: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_experts.ptx"));
/// Module name the expert kernels load under.
const EXPERTS: &str = "switchyard_moe_experts";

/// The MoE kernels loaded on one device, with the stream they launch on.
///
/// Get it with [`MoeKernels::for_device`] (loaded once per device and cached). The `launch_*`
/// methods take raw device views and check their sizes; they never allocate or synchronise.
pub struct MoeKernels {
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) gate: CudaFunction,
    pub(crate) dispatch: CudaFunction,
    pub(crate) gemv_gate_up: CudaFunction,
    pub(crate) gemv_down: CudaFunction,
    pub(crate) gemv_down_atomic: CudaFunction,
    /// `moe_gemv_gate_up_rows{1,2,4,8}` (accumulators for at most that many tokens).
    pub(crate) gemv_gate_up_rows: [CudaFunction; 4],
    /// Blocks of each `gemv_gate_up_rows` kernel that fit on one SM at once.
    pub(crate) gemv_rows_per_sm: [u32; 4],
    /// Streaming multiprocessors of the device.
    pub(crate) sm_count: u32,
    pub(crate) gemm_gate_up: CudaFunction,
    pub(crate) gemm_down: CudaFunction,
    pub(crate) f32_to_bf16: CudaFunction,
}

type Cache = Mutex<Vec<(DeviceId, Arc<MoeKernels>)>>;

impl MoeKernels {
    /// The kernels for `dev`, loading the PTX modules the first time this device asks.
    pub fn for_device(dev: &CudaDevice) -> Result<Arc<Self>, KernelError> {
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(Vec::new()));
        let mut cache = cache
            .lock()
            .map_err(|_| KernelError::Cuda("the kernel cache lock was poisoned".into()))?;
        if let Some((_, k)) = cache.iter().find(|(id, _)| *id == dev.id()) {
            return Ok(k.clone());
        }
        let load = |name: &str, module: &str, ptx: &str| -> Result<CudaFunction, KernelError> {
            dev.get_or_load_custom_func(name, module, ptx)
                .map(|f| f.into_cuda_function())
                .map_err(|e| {
                    KernelError::Cuda(format!(
                        "could not load kernel {name} from module {module}: {e}"
                    ))
                })
        };
        let rows = |t: usize| load(&format!("moe_gemv_gate_up_rows{t}"), EXPERTS, PTX_EXPERTS);
        let gemv_gate_up_rows = [rows(1)?, rows(2)?, rows(4)?, rows(8)?];
        // The persistent kernels are correct at any grid size; these only size it. A failed
        // query falls back to one block per SM rather than failing the whole kernel set.
        let stream = dev.cuda_stream();
        // The occupancy query runs in the current context: make it this device's.
        let _ = stream.context().bind_to_thread();
        let sm_count = stream
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_or(1, |n| n.max(1) as u32);
        let gemv_rows_per_sm = gemv_gate_up_rows.each_ref().map(|f| {
            f.occupancy_max_active_blocks_per_multiprocessor(experts::EXPERT_THREADS, 0, None)
                .map_or(1, |b| b.max(1))
        });
        let k = Arc::new(Self {
            stream,
            gate: load("moe_gate_topk_f32", "switchyard_moe_gate", PTX_GATE)?,
            dispatch: load("moe_dispatch", "switchyard_moe_dispatch", PTX_DISPATCH)?,
            gemv_gate_up: load("moe_gemv_gate_up", "switchyard_moe_experts", PTX_EXPERTS)?,
            gemv_down: load("moe_gemv_down", "switchyard_moe_experts", PTX_EXPERTS)?,
            gemv_down_atomic: load(
                "moe_gemv_down_atomic",
                "switchyard_moe_experts",
                PTX_EXPERTS,
            )?,
            gemv_gate_up_rows,
            gemv_rows_per_sm,
            sm_count,
            gemm_gate_up: load("moe_gemm_gate_up", "switchyard_moe_experts", PTX_EXPERTS)?,
            gemm_down: load("moe_gemm_down", "switchyard_moe_experts", PTX_EXPERTS)?,
            f32_to_bf16: load("moe_f32_to_bf16", "switchyard_moe_experts", PTX_EXPERTS)?,
        });
        // The tiled GEMMs keep a 4-stage pipeline in 108 KiB of dynamic shared memory, above the
        // 48 KiB a launch gets without asking.
        for (f, name) in [
            (&k.gemm_gate_up, "moe_gemm_gate_up"),
            (&k.gemm_down, "moe_gemm_down"),
        ] {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                experts::TILE_SMEM_BYTES as i32,
            )
            .map_err(|e| {
                KernelError::Cuda(format!(
                    "could not give {name} {} bytes of shared memory: {e}",
                    experts::TILE_SMEM_BYTES
                ))
            })?;
        }
        cache.push((dev.id(), k.clone()));
        Ok(k)
    }

    /// The stream every launch of this set goes to (the device's candle stream).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// Maps a driver error to a sentence naming what failed.
pub(crate) fn driver_err(what: &str) -> impl FnOnce(DriverError) -> KernelError + '_ {
    move |e| KernelError::Cuda(format!("{what} failed: {e}"))
}

pub(crate) fn invalid(msg: String) -> KernelError {
    KernelError::InvalidArgument(msg)
}

/// The CUDA device a tensor lives on, or a sentence saying it is elsewhere.
pub(crate) fn cuda_device(t: &Tensor, what: &str) -> Result<CudaDevice, KernelError> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => Err(invalid(format!(
            "{what} must be on a CUDA device for the CUDA op, but it is on {:?}",
            other.location()
        ))),
    }
}

/// Checks that `t` has `dtype`, lives on `dev`, and is contiguous.
pub(crate) fn check_tensor(
    t: &Tensor,
    what: &str,
    dtype: DType,
    dev: &CudaDevice,
) -> Result<(), KernelError> {
    if t.dtype() != dtype {
        return Err(invalid(format!(
            "{what} must be {dtype:?}, but it is {:?}",
            t.dtype()
        )));
    }
    match t.device() {
        Device::Cuda(d) if d.id() == dev.id() => {}
        other => {
            return Err(invalid(format!(
                "{what} must be on the same CUDA device as the other inputs, but it is on {:?}",
                other.location()
            )))
        }
    }
    if !t.is_contiguous() {
        return Err(invalid(format!(
            "{what} must be contiguous (call .contiguous() first); its layout is {:?}",
            t.layout().stride()
        )));
    }
    Ok(())
}

/// A device view of a contiguous CUDA tensor's elements, borrowed from its storage guard.
pub(crate) fn view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>, KernelError> {
    let Storage::Cuda(cs) = storage else {
        return Err(invalid(format!("{what} is not stored on a CUDA device")));
    };
    let slice = cs
        .as_cuda_slice::<T>()
        .map_err(|e| invalid(format!("{what} has an unexpected dtype: {e}")))?;
    let off = layout.start_offset();
    let n = layout.shape().elem_count();
    slice.try_slice(off..off + n).ok_or_else(|| {
        invalid(format!(
            "{what}: layout [{off}, {}) is outside its storage of {} elements",
            off + n,
            slice.len()
        ))
    })
}

/// Wraps a device buffer as a candle tensor of `shape` on `dev`.
pub(crate) fn wrap<T: CudaDType, S: Into<Shape>>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    shape: S,
) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// Allocates `n` uninitialised elements on the device's stream (every caller overwrites them).
pub(crate) fn alloc<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &CudaDevice,
    n: usize,
    what: &str,
) -> Result<CudaSlice<T>, KernelError> {
    // SAFETY: the kernels write every element before anything reads it (checked by the GPU
    // check, which poisons outputs first).
    unsafe { dev.alloc::<T>(n.max(1)) }
        .map_err(|e| KernelError::Cuda(format!("allocating {what} ({n} elements) failed: {e}")))
}

fn grid_u32(n: usize, what: &str) -> Result<u32, KernelError> {
    u32::try_from(n)
        .ok()
        .filter(|&g| g > 0 && g < (1 << 31))
        .ok_or_else(|| invalid(format!("{what}: grid size {n} is out of range")))
}

fn dim_i32(n: usize, what: &str) -> Result<i32, KernelError> {
    i32::try_from(n).map_err(|_| invalid(format!("{what} = {n} does not fit the kernels' i32")))
}

/// Free and total memory of the GPU behind `device`, in bytes (`cuMemGetInfo` in its context);
/// an error for a non-CUDA device.
pub fn memory_info(device: &Device) -> Result<(usize, usize), KernelError> {
    let Device::Cuda(dev) = device else {
        return Err(invalid(format!(
            "memory_info needs a CUDA device, got {device:?}"
        )));
    };
    dev.cuda_stream()
        .context()
        .mem_get_info()
        .map_err(|e| KernelError::Cuda(format!("querying the device's free memory failed: {e}")))
}
