//! Paged attention and the KV write on the GPU (`kernels/paged_attention.cu`), with the layout
//! and contract of the CPU reference in [`crate::paged`]: K and V per layer are
//! `[num_blocks, block_size, kv_heads, head_dim]` (f32, bf16 or FP8 E4M3), a sequence's token `p` lives in
//! block `block_table[p / block_size]`, row `p % block_size`, and query head `h` reads KV head
//! `h / (heads / kv_heads)`.
//!
//! The attention kernel follows vLLM's paged attention v2 / flash-decoding split: the context is
//! cut into partitions that run as separate blocks (so one long sequence still covers every SM),
//! and a small kernel merges the partitions' softmax statistics. Each block serves up to
//! [`PAGED_HEAD_CHUNK`] query heads of one KV head, so at Hy3's 8:1 GQA ratio every K/V row is
//! read from memory once per step. Query rows carry their own position, so prefill chunks
//! (causal over the cached prefix) run through the same kernel as decode.
//!
//! Two layers, as for the MoE kernels:
//! - tensor ops: [`PagedBatch`] (a batch's block tables and positions, validated on the host
//!   and uploaded once per forward), [`reshape_and_cache`] and [`paged_attention`] on candle
//!   tensors, every shape and dtype checked with a sentence;
//! - [`PagedKernels`], the launchers on raw device views with caller-owned workspace (no
//!   allocation, no host synchronisation), for graph capture and the benchmark.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage, DeviceId};
use candle_core::{CpuStorage, CudaDevice, DType, Device, InplaceOp3, Layout, Tensor};
use float8::F8E4M3;
use half::bf16;

use super::{alloc, check_tensor, cuda_device, dim_i32, driver_err, grid_u32, invalid, view, wrap};
use crate::paged::{KvLayout, SeqAttn};
use crate::KernelError;

/// Largest head dimension the attention kernel takes (its V phase keeps at most 8 columns per
/// lane in registers: `PA_MAX_HEAD_DIM`).
pub const PAGED_MAX_HEAD_DIM: usize = 256;
/// Query heads one block serves (`PA_GROUP`): a KV head's rows are read once per chunk of this
/// many heads of its group, i.e. exactly once up to 8:1 GQA (Hy3: 64 query heads, 8 KV heads).
pub const PAGED_HEAD_CHUNK: usize = 8;
/// Most partitions one row's context is split into (`PA_MAX_PARTS`: the merge kernel keeps one
/// weight per partition in shared memory). With 512-token partitions: 512K tokens of context.
pub const PAGED_MAX_PARTITIONS: usize = 1024;
/// Most query rows one launch takes (they are the grid's z dimension).
pub const PAGED_MAX_ROWS: usize = 65535;
/// A row of [`PagedBatch::row_seq`] that belongs to no sequence (its output is zero), or a slot
/// with nothing to write.
pub const PAGED_NO_SEQ: u32 = u32::MAX;
/// Partition sizes the host chooses from, largest first (multiples of 32, at most `PA_MAX_PART`).
/// Larger partitions mean less merge work; smaller ones more blocks for short contexts.
const PARTITION_SIZES: [usize; 4] = [512, 256, 128, 64];
/// Blocks wanted per SM before the largest partition that reaches it is taken: with two or more
/// resident blocks one streams K/V while another is in its softmax or reduction. A starting
/// point from the kernel's shape (~20 KiB of shared memory and ~64 registers per 128-thread
/// block at head_dim 128 allow many more); not yet tuned on a GPU.
const MIN_BLOCKS_PER_SM: usize = 2;
/// Threads per block of every paged kernel (`PA_THREADS`).
const PA_THREADS: u32 = 128;
/// Warps per block (`PA_WARPS`).
const PA_WARPS: usize = 4;
/// Largest partition the kernel's shared-memory plan allows (`PA_MAX_PART`).
const PA_MAX_PART: usize = 512;

const PTX_PAGED: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const MODULE: &str = "switchyard_paged_attention";

/// KV cache element types the kernels read and write: f32, bf16 and FP8 E4M3.
pub trait CacheElem: CudaDType + DeviceRepr + sealed::Sealed {
    /// The candle dtype of this element type.
    const DTYPE: DType;
}

impl CacheElem for f32 {
    const DTYPE: DType = DType::F32;
}

impl CacheElem for bf16 {
    const DTYPE: DType = DType::BF16;
}

impl CacheElem for F8E4M3 {
    const DTYPE: DType = DType::F8E4M3;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for super::F8E4M3 {}
}

/// The paged-attention kernels loaded on one device, with the stream they launch on.
pub struct PagedKernels {
    stream: Arc<CudaStream>,
    /// `paged_attn_f32_hd{32,64,128,256}`.
    attn_f32: [CudaFunction; 4],
    /// `paged_attn_bf16_hd{32,64,128,256}`.
    attn_bf16: [CudaFunction; 4],
    /// `paged_attn_fp8_hd{32,64,128,256}`.
    attn_fp8: [CudaFunction; 4],
    reduce: CudaFunction,
    write_f32_f32: CudaFunction,
    write_f32_bf16: CudaFunction,
    write_bf16_bf16: CudaFunction,
    write_f32_fp8: CudaFunction,
    write_bf16_fp8: CudaFunction,
    sms: usize,
}

type Cache = Mutex<Vec<(DeviceId, Arc<PagedKernels>)>>;

/// Problem sizes of one attention launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedDims {
    /// Query rows `T`.
    pub rows: usize,
    /// Query heads.
    pub heads: usize,
    /// The cache geometry (`kv_heads` and `head_dim` included).
    pub layout: KvLayout,
    /// Sequences (rows of the block-table array).
    pub seqs: usize,
    /// Entries per sequence in the block-table array.
    pub max_blocks_per_seq: usize,
    /// Longest context of any row (positions `0..max_ctx`); sizes the partition grid.
    pub max_ctx: usize,
}

impl PagedDims {
    fn check(&self) -> Result<(), KernelError> {
        let (kvh, hd) = (self.layout.kv_heads, self.layout.head_dim);
        if self.heads == 0 || kvh == 0 || !self.heads.is_multiple_of(kvh) {
            return Err(invalid(format!(
                "paged attention needs the query heads to be a positive multiple of the KV \
                 heads, got {} query heads over {kvh} KV heads",
                self.heads
            )));
        }
        if hd == 0 || hd > PAGED_MAX_HEAD_DIM {
            return Err(invalid(format!(
                "the CUDA paged attention takes head_dim 1 to {PAGED_MAX_HEAD_DIM}, got {hd}"
            )));
        }
        if self.layout.block_size == 0 || self.layout.num_blocks == 0 {
            return Err(invalid(format!(
                "the KV cache needs at least one block of at least one token, got {:?}",
                self.layout
            )));
        }
        if self.rows > PAGED_MAX_ROWS {
            return Err(invalid(format!(
                "the CUDA paged attention takes at most {PAGED_MAX_ROWS} query rows per call, \
                 got {}",
                self.rows
            )));
        }
        dim_i32(self.layout.layer_elems(), "KV cache elements")?;
        dim_i32(self.rows * self.heads * hd, "query elements")?;
        dim_i32(self.seqs * self.max_blocks_per_seq, "block-table entries")?;
        Ok(())
    }

    /// Blocks per (row, partition): one per KV head and chunk of its query-head group.
    fn head_blocks(&self) -> usize {
        let group = self.heads / self.layout.kv_heads.max(1);
        self.layout.kv_heads * group.div_ceil(PAGED_HEAD_CHUNK)
    }

    /// Partitions of the longest row for partition size `part`.
    fn partitions(&self, part: usize) -> usize {
        self.max_ctx.div_ceil(part).max(1)
    }
}

/// Read-only device views of a batch's metadata (see [`PagedBatch`] for their meaning). Their
/// values are trusted by the kernels: build them with [`PagedBatch::new`], which validates
/// them against the cache on the host.
pub struct PagedMetaViews<'a> {
    /// `[rows]`: sequence of each query row, or [`PAGED_NO_SEQ`].
    pub row_seq: CudaView<'a, u32>,
    /// `[rows]`: position of each query row (it attends to `0..=pos`).
    pub row_pos: CudaView<'a, u32>,
    /// `[seqs * max_blocks_per_seq]`: block tables, row-major.
    pub block_tables: CudaView<'a, u32>,
}

/// Scratch of one attention launch: per (row, head, partition) the unnormalised output, the
/// score maximum and the softmax denominator. Sizes from [`PagedKernels::workspace_lens`].
pub struct PagedWorkspace<'a> {
    /// `[rows, heads, partitions, head_dim]`.
    pub acc: CudaViewMut<'a, f32>,
    /// `[rows, heads, partitions]`.
    pub max: CudaViewMut<'a, f32>,
    /// `[rows, heads, partitions]`.
    pub sum: CudaViewMut<'a, f32>,
}

impl PagedKernels {
    /// The kernels for `dev`, loading the PTX module the first time this device asks.
    pub fn for_device(dev: &CudaDevice) -> Result<Arc<Self>, KernelError> {
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(Vec::new()));
        let mut cache = cache
            .lock()
            .map_err(|_| KernelError::Cuda("the kernel cache lock was poisoned".into()))?;
        if let Some((_, k)) = cache.iter().find(|(id, _)| *id == dev.id()) {
            return Ok(k.clone());
        }
        let load = |name: &str| -> Result<CudaFunction, KernelError> {
            dev.get_or_load_custom_func(name, MODULE, PTX_PAGED)
                .map(|f| f.into_cuda_function())
                .map_err(|e| {
                    KernelError::Cuda(format!(
                        "could not load kernel {name} from module {MODULE}: {e}"
                    ))
                })
        };
        let four = |dt: &str| -> Result<[CudaFunction; 4], KernelError> {
            Ok([
                load(&format!("paged_attn_{dt}_hd32"))?,
                load(&format!("paged_attn_{dt}_hd64"))?,
                load(&format!("paged_attn_{dt}_hd128"))?,
                load(&format!("paged_attn_{dt}_hd256"))?,
            ])
        };
        let stream = dev.cuda_stream();
        let sms = stream
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_err("reading the SM count"))?;
        let k = Arc::new(Self {
            attn_f32: four("f32")?,
            attn_bf16: four("bf16")?,
            attn_fp8: four("fp8")?,
            reduce: load("paged_attn_reduce")?,
            write_f32_f32: load("paged_cache_write_f32_f32")?,
            write_f32_bf16: load("paged_cache_write_f32_bf16")?,
            write_bf16_bf16: load("paged_cache_write_bf16_bf16")?,
            write_f32_fp8: load("paged_cache_write_f32_fp8")?,
            write_bf16_fp8: load("paged_cache_write_bf16_fp8")?,
            sms: usize::try_from(sms).unwrap_or(1).max(1),
            stream,
        });
        cache.push((dev.id(), k.clone()));
        Ok(k)
    }

    /// The stream every launch of this set goes to (the device's candle stream).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Streaming multiprocessors on the device (what [`Self::partition_size`] sizes the grid
    /// for).
    pub fn sm_count(&self) -> usize {
        self.sms
    }

    /// The partition size [`paged_attention`] uses for `d`: the largest of 512/256/128/64
    /// tokens whose grid gives every SM [`MIN_BLOCKS_PER_SM`] blocks, else 64; then grown if
    /// the longest row would need more than [`PAGED_MAX_PARTITIONS`].
    pub fn partition_size(&self, d: &PagedDims) -> Result<usize, KernelError> {
        d.check()?;
        let want = self.sms * MIN_BLOCKS_PER_SM;
        let blocks = |p: usize| d.rows * d.head_blocks() * d.partitions(p);
        let mut part = PARTITION_SIZES
            .iter()
            .copied()
            .find(|&p| blocks(p) >= want)
            .unwrap_or(PARTITION_SIZES[PARTITION_SIZES.len() - 1]);
        while d.partitions(part) > PAGED_MAX_PARTITIONS && part < PA_MAX_PART {
            part *= 2;
        }
        if d.partitions(part) > PAGED_MAX_PARTITIONS {
            return Err(invalid(format!(
                "a context of {} tokens needs more than {PAGED_MAX_PARTITIONS} partitions of \
                 {PA_MAX_PART} tokens; the CUDA paged attention takes at most {} tokens",
                d.max_ctx,
                PAGED_MAX_PARTITIONS * PA_MAX_PART
            )));
        }
        Ok(part)
    }

    /// Elements of the workspace for `d` at partition size `part`: (`acc`, `max` and `sum`).
    /// Zero when no row needs more than one partition (the first kernel then writes the output
    /// itself).
    pub fn workspace_lens(d: &PagedDims, part: usize) -> (usize, usize) {
        let parts = d.partitions(part.max(1));
        if parts <= 1 {
            return (0, 0);
        }
        let stats = d.rows * d.heads * parts;
        (stats * d.layout.head_dim, stats)
    }

    fn attn_fn<T: CacheElem>(&self, head_dim: usize) -> &CudaFunction {
        let class = match head_dim {
            0..=32 => 0,
            33..=64 => 1,
            65..=128 => 2,
            _ => 3,
        };
        match T::DTYPE {
            DType::BF16 => &self.attn_bf16[class],
            DType::F8E4M3 => &self.attn_fp8[class],
            _ => &self.attn_f32[class],
        }
    }

    /// Launches paged attention: `q` (f32 `[rows, heads, head_dim]`) over the caches → `out`
    /// (f32, same shape), `scale` applied to the scores, `part` tokens per partition (a multiple
    /// of 32 up to 512; [`Self::partition_size`] picks one). Two launches at most (partitions,
    /// then the merge when a row has more than one); nothing allocated or synchronised.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_paged_attention<T: CacheElem>(
        &self,
        q: &CudaView<'_, f32>,
        k_cache: &CudaView<'_, T>,
        v_cache: &CudaView<'_, T>,
        meta: &PagedMetaViews<'_>,
        d: &PagedDims,
        scale: f32,
        part: usize,
        ws: &mut PagedWorkspace<'_>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        d.check()?;
        if part == 0 || !part.is_multiple_of(32) || part > PA_MAX_PART {
            return Err(invalid(format!(
                "the partition size must be a multiple of 32 from 32 to {PA_MAX_PART}, got {part}"
            )));
        }
        let parts = d.partitions(part);
        if parts > PAGED_MAX_PARTITIONS {
            return Err(invalid(format!(
                "a context of {} tokens in partitions of {part} needs {parts} partitions, more \
                 than the {PAGED_MAX_PARTITIONS} the merge kernel takes",
                d.max_ctx
            )));
        }
        let (hd, layer) = (d.layout.head_dim, d.layout.layer_elems());
        let qn = d.rows * d.heads * hd;
        let (acc_len, stat_len) = Self::workspace_lens(d, part);
        let sizes = [
            ("q", q.len(), qn, true),
            ("K cache", k_cache.len(), layer, true),
            ("V cache", v_cache.len(), layer, true),
            ("row_seq", meta.row_seq.len(), d.rows, true),
            ("row_pos", meta.row_pos.len(), d.rows, true),
            (
                "block tables",
                meta.block_tables.len(),
                d.seqs * d.max_blocks_per_seq,
                true,
            ),
            ("out", out.len(), qn, false),
            ("workspace acc", ws.acc.len(), acc_len, false),
            ("workspace max", ws.max.len(), stat_len, false),
            ("workspace sum", ws.sum.len(), stat_len, false),
        ];
        for (name, got, want, exact) in sizes {
            if (exact && got != want) || got < want {
                return Err(invalid(format!(
                    "paged attention: {name} holds {got} elements, expected {}{want} for {d:?}",
                    if exact { "" } else { "at least " }
                )));
            }
        }
        if d.rows == 0 {
            return Ok(());
        }
        let head_blocks = grid_u32(d.head_blocks(), "KV head blocks")?;
        let floats =
            PAGED_HEAD_CHUNK * hd + (part * PAGED_HEAD_CHUNK).max(PA_WARPS * PAGED_HEAD_CHUNK * hd);
        let cfg = LaunchConfig {
            grid_dim: (grid_u32(parts, "partitions")?, head_blocks, d.rows as u32),
            block_dim: (PA_THREADS, 1, 1),
            shared_mem_bytes: (floats * 4) as u32,
        };
        let (heads, kvh, hd_i, bs) = (
            dim_i32(d.heads, "heads")?,
            dim_i32(d.layout.kv_heads, "KV heads")?,
            dim_i32(hd, "head_dim")?,
            dim_i32(d.layout.block_size, "block size")?,
        );
        let (mb, part_i, parts_i) = (
            dim_i32(d.max_blocks_per_seq, "blocks per sequence")?,
            part as i32,
            parts as i32,
        );
        let f = self.attn_fn::<T>(hd);
        let mut b = self.stream.launch_builder(f);
        b.arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(&meta.row_seq)
            .arg(&meta.row_pos)
            .arg(&meta.block_tables)
            .arg(&mut ws.acc)
            .arg(&mut ws.max)
            .arg(&mut ws.sum)
            .arg(&mut *out)
            .arg(&heads)
            .arg(&kvh)
            .arg(&hd_i)
            .arg(&bs)
            .arg(&mb)
            .arg(&part_i)
            .arg(&parts_i)
            .arg(&scale);
        // SAFETY: argument list matches PA_ENTRY in paged_attention.cu; sizes checked above and
        // the shared memory stays under the 48 KiB a launch gets without asking (at most
        // (8·256 + max(512·8, 4·8·256))·4 = 40 KiB).
        unsafe { b.launch(cfg) }.map_err(driver_err("launching paged attention"))?;
        if parts > 1 {
            let cfg = LaunchConfig {
                grid_dim: (d.heads as u32, d.rows as u32, 1),
                block_dim: (PA_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let (acc_v, max_v, sum_v) = (ws.acc.as_view(), ws.max.as_view(), ws.sum.as_view());
            let mut b = self.stream.launch_builder(&self.reduce);
            b.arg(&acc_v)
                .arg(&max_v)
                .arg(&sum_v)
                .arg(&meta.row_seq)
                .arg(&meta.row_pos)
                .arg(&mut *out)
                .arg(&heads)
                .arg(&hd_i)
                .arg(&part_i)
                .arg(&parts_i);
            // SAFETY: argument list matches paged_attn_reduce; sizes checked above.
            unsafe { b.launch(cfg) }.map_err(driver_err("launching paged_attn_reduce"))?;
        }
        Ok(())
    }

    /// Writes `tokens` rows of `src` (`[tokens, kv_heads, head_dim]`, f32 or the cache's dtype)
    /// into `cache` at `slots` (u32 `[tokens]`, `slot = block * block_size + row`); slots at or
    /// past the cache's end (e.g. [`PAGED_NO_SEQ`]) are skipped. One launch, K or V.
    pub fn launch_cache_write<I: CacheElem, T: CacheElem>(
        &self,
        src: &CudaView<'_, I>,
        slots: &CudaView<'_, u32>,
        tokens: usize,
        layout: &KvLayout,
        cache: &mut CudaViewMut<'_, T>,
    ) -> Result<(), KernelError> {
        let te = layout.token_elems();
        if src.len() != tokens * te || slots.len() != tokens || cache.len() != layout.layer_elems()
        {
            return Err(invalid(format!(
                "KV write: {tokens} tokens need {} source elements, {tokens} slots and a cache \
                 of {} elements for {layout:?}; got {}, {} and {}",
                tokens * te,
                layout.layer_elems(),
                src.len(),
                slots.len(),
                cache.len()
            )));
        }
        let f = match (I::DTYPE, T::DTYPE) {
            (DType::F32, DType::F32) => &self.write_f32_f32,
            (DType::F32, DType::BF16) => &self.write_f32_bf16,
            (DType::BF16, DType::BF16) => &self.write_bf16_bf16,
            (DType::F32, DType::F8E4M3) => &self.write_f32_fp8,
            (DType::BF16, DType::F8E4M3) => &self.write_bf16_fp8,
            (i, c) => {
                return Err(invalid(format!(
                    "the KV write takes f32 keys/values or the cache's own dtype; got {i:?} into \
                     a {c:?} cache"
                )))
            }
        };
        let total = u32::try_from(layout.num_blocks * layout.block_size)
            .ok()
            .filter(|&s| s < PAGED_NO_SEQ)
            .ok_or_else(|| {
                invalid(format!(
                    "a cache of {} slots does not fit the kernels' u32 slot numbers",
                    layout.num_blocks * layout.block_size
                ))
            })?;
        if tokens == 0 {
            return Ok(());
        }
        let te_i = dim_i32(te, "token elements")?;
        dim_i32(layout.layer_elems(), "KV cache elements")?;
        let cfg = LaunchConfig {
            grid_dim: (grid_u32(tokens, "KV write tokens")?, 1, 1),
            block_dim: (PA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(src)
            .arg(slots)
            .arg(&mut *cache)
            .arg(&te_i)
            .arg(&total);
        // SAFETY: argument list matches CW_ENTRY in paged_attention.cu; sizes checked above.
        unsafe { b.launch(cfg) }.map_err(driver_err("launching the KV write"))?;
        Ok(())
    }
}

/// A batch's block tables and query positions on the device, validated on the host against the
/// cache geometry and uploaded once per forward (every layer reuses it).
///
/// Built from the same [`SeqAttn`] spans as the CPU [`crate::paged::paged_attention`]: query
/// row `q_start + i` of a sequence sits at position `ctx_len - q_len + i` and attends to
/// positions `0..=` that; rows no sequence covers give zero output.
#[derive(Debug, Clone)]
pub struct PagedBatch {
    /// Query rows.
    pub rows: usize,
    /// Sequences.
    pub seqs: usize,
    /// Entries per sequence in `block_tables` (the longest table; shorter ones are padded).
    pub max_blocks_per_seq: usize,
    /// Longest context of any row.
    pub max_ctx: usize,
    /// The cache geometry the tables were checked against.
    pub layout: KvLayout,
    /// u32 `[rows]`: sequence of each row, or [`PAGED_NO_SEQ`].
    pub row_seq: Tensor,
    /// u32 `[rows]`: position of each row.
    pub row_pos: Tensor,
    /// u32 `[seqs * max_blocks_per_seq]`: block tables, row-major.
    pub block_tables: Tensor,
    /// u32 `[rows]`: cache slot of each row's new key/value (`block * block_size + row`), or
    /// [`PAGED_NO_SEQ`] for a row no sequence covers: the slot mapping [`reshape_and_cache`]
    /// takes when the rows are this step's new tokens.
    pub slots: Tensor,
}

impl PagedBatch {
    /// Checks `seqs` for a batch of `rows` query rows against `layout` (the checks of the CPU
    /// reference) and uploads the metadata to `device`.
    pub fn new(
        device: &Device,
        seqs: &[SeqAttn<'_>],
        rows: usize,
        layout: &KvLayout,
    ) -> Result<Self, KernelError> {
        if !matches!(device, Device::Cuda(_)) {
            return Err(invalid(format!(
                "a paged batch for the CUDA kernels needs a CUDA device, got {:?}",
                device.location()
            )));
        }
        if rows > PAGED_MAX_ROWS {
            return Err(invalid(format!(
                "the CUDA paged attention takes at most {PAGED_MAX_ROWS} query rows, got {rows}"
            )));
        }
        let bs = layout.block_size;
        let total_slots = layout.num_blocks * layout.block_size;
        if bs == 0 || u32::try_from(total_slots).map_or(true, |s| s == PAGED_NO_SEQ) {
            return Err(invalid(format!(
                "the cache geometry {layout:?} has no blocks or more slots than u32 numbers"
            )));
        }
        let mut row_seq = vec![PAGED_NO_SEQ; rows];
        let mut row_pos = vec![0u32; rows];
        let mut slots = vec![PAGED_NO_SEQ; rows];
        let max_blocks = seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut tables = vec![0u32; seqs.len() * max_blocks];
        let mut max_ctx = 0;
        for (si, s) in seqs.iter().enumerate() {
            s.check(si, rows, layout)?;
            tables[si * max_blocks..si * max_blocks + s.block_table.len()]
                .copy_from_slice(s.block_table);
            let si_u32 = u32::try_from(si)
                .map_err(|_| invalid(format!("{} sequences is too many", seqs.len())))?;
            for i in 0..s.q_len {
                let pos = s.ctx_len - s.q_len + i;
                let r = s.q_start + i;
                row_seq[r] = si_u32;
                row_pos[r] = u32::try_from(pos)
                    .map_err(|_| invalid(format!("position {pos} does not fit u32")))?;
                slots[r] = (s.block_table[pos / bs] as usize * bs + pos % bs) as u32;
            }
            if s.q_len > 0 {
                max_ctx = max_ctx.max(s.ctx_len);
            }
        }
        Ok(Self {
            rows,
            seqs: seqs.len(),
            max_blocks_per_seq: max_blocks,
            max_ctx,
            layout: *layout,
            row_seq: upload(device, row_seq)?,
            row_pos: upload(device, row_pos)?,
            block_tables: upload(device, tables)?,
            slots: upload(device, slots)?,
        })
    }

    /// The launch sizes for `heads` query heads.
    pub fn dims(&self, heads: usize) -> PagedDims {
        PagedDims {
            rows: self.rows,
            heads,
            layout: self.layout,
            seqs: self.seqs,
            max_blocks_per_seq: self.max_blocks_per_seq,
            max_ctx: self.max_ctx,
        }
    }
}

/// A u32 vector as a 1-D device tensor (an empty one without a zero-byte allocation).
fn upload(device: &Device, v: Vec<u32>) -> Result<Tensor, KernelError> {
    if v.is_empty() {
        return Ok(Tensor::from_vec(vec![0u32], 1, device)?.narrow(0, 0, 0)?);
    }
    let n = v.len();
    Ok(Tensor::from_vec(v, n, device)?)
}

/// The cache geometry of a `[num_blocks, block_size, kv_heads, head_dim]` cache tensor.
fn cache_layout(c: &Tensor, what: &str) -> Result<KvLayout, KernelError> {
    match *c.dims() {
        [num_blocks, block_size, kv_heads, head_dim] => Ok(KvLayout {
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
        }),
        _ => Err(invalid(format!(
            "{what} must be [num_blocks, block_size, kv_heads, head_dim], got shape {:?}",
            c.dims()
        ))),
    }
}

/// Checks a K/V cache pair: same f32/bf16/FP8 dtype, same shape, contiguous, on `dev`.
fn check_caches(
    k_cache: &Tensor,
    v_cache: &Tensor,
    dev: &CudaDevice,
) -> Result<KvLayout, KernelError> {
    let dt = k_cache.dtype();
    if !matches!(dt, DType::F32 | DType::BF16 | DType::F8E4M3) {
        return Err(invalid(format!(
            "the KV cache must be f32, bf16 or f8e4m3, got {dt:?}"
        )));
    }
    check_tensor(k_cache, "K cache", dt, dev)?;
    check_tensor(v_cache, "V cache", dt, dev)?;
    let layout = cache_layout(k_cache, "K cache")?;
    if v_cache.dims() != k_cache.dims() {
        return Err(invalid(format!(
            "K cache {:?} and V cache {:?} differ in shape",
            k_cache.dims(),
            v_cache.dims()
        )));
    }
    Ok(layout)
}

/// The in-place KV write, run by candle with the cache's storage locked for writing.
struct CacheWrite {
    kern: Arc<PagedKernels>,
    tokens: usize,
    layout: KvLayout,
}

impl CacheWrite {
    fn run<I: CacheElem, T: CacheElem>(
        &self,
        cache: &mut CudaStorage,
        cache_l: &Layout,
        src: &CudaStorage,
        src_l: &Layout,
        slots: &CudaStorage,
        slots_l: &Layout,
    ) -> Result<(), KernelError> {
        let n = self.layout.layer_elems();
        let off = cache_l.start_offset();
        let cs = cache
            .as_cuda_slice_mut::<T>()
            .map_err(|e| invalid(format!("the KV cache has an unexpected dtype: {e}")))?;
        let total = cs.len();
        let mut cv = cs.try_slice_mut(off..off + n).ok_or_else(|| {
            invalid(format!(
                "KV cache layout [{off}, {}) is outside its storage of {total} elements",
                off + n
            ))
        })?;
        let sv = view_of::<I>(src, src_l, "keys/values")?;
        let lv = view_of::<u32>(slots, slots_l, "slots")?;
        self.kern
            .launch_cache_write::<I, T>(&sv, &lv, self.tokens, &self.layout, &mut cv)
    }
}

/// A device view of a contiguous CUDA storage's elements under `layout`.
fn view_of<'a, T: CudaDType>(
    s: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>, KernelError> {
    let slice = s
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

impl InplaceOp3 for CacheWrite {
    fn name(&self) -> &'static str {
        "switchyard-paged-cache-write"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        Err(candle_core::Error::Msg(
            "the CUDA KV write was given CPU tensors; use switchyard_kernels::reshape_and_cache"
                .into(),
        ))
    }

    fn cuda_fwd(
        &self,
        cache: &mut CudaStorage,
        cache_l: &Layout,
        src: &CudaStorage,
        src_l: &Layout,
        slots: &CudaStorage,
        slots_l: &Layout,
    ) -> candle_core::Result<()> {
        let r = match (src.dtype(), cache.dtype()) {
            (DType::F32, DType::F32) => {
                self.run::<f32, f32>(cache, cache_l, src, src_l, slots, slots_l)
            }
            (DType::F32, DType::BF16) => {
                self.run::<f32, bf16>(cache, cache_l, src, src_l, slots, slots_l)
            }
            (DType::BF16, DType::BF16) => {
                self.run::<bf16, bf16>(cache, cache_l, src, src_l, slots, slots_l)
            }
            (DType::F32, DType::F8E4M3) => {
                self.run::<f32, F8E4M3>(cache, cache_l, src, src_l, slots, slots_l)
            }
            (DType::BF16, DType::F8E4M3) => {
                self.run::<bf16, F8E4M3>(cache, cache_l, src, src_l, slots, slots_l)
            }
            (i, c) => Err(invalid(format!(
                "the KV write takes f32 keys/values or the cache's own dtype; got {i:?} into a \
                 {c:?} cache"
            ))),
        };
        r.map_err(|e| candle_core::Error::Cuda(Box::new(e)))
    }
}

/// Writes this step's keys and values (`[T, kv_heads, head_dim]`, f32 or the cache's dtype)
/// into the caches (`[num_blocks, block_size, kv_heads, head_dim]`, f32, bf16 or F8E4M3) at `slots`
/// (u32 `[T]`), in place, with the contract of [`crate::paged::reshape_and_cache`] (f32 values
/// rounded to nearest-even bf16 for a bf16 cache). Slot values are trusted on the device:
/// slots past the cache's end are skipped, not reported; [`PagedBatch::slots`] are validated.
pub fn reshape_and_cache(
    k: &Tensor,
    v: &Tensor,
    slots: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
) -> Result<(), KernelError> {
    let dev = cuda_device(k_cache, "K cache")?;
    let layout = check_caches(k_cache, v_cache, &dev)?;
    let in_dt = k.dtype();
    if in_dt != DType::F32 && in_dt != k_cache.dtype() {
        return Err(invalid(format!(
            "keys/values must be f32 or the cache's dtype {:?}, got {in_dt:?}",
            k_cache.dtype()
        )));
    }
    check_tensor(k, "keys", in_dt, &dev)?;
    check_tensor(v, "values", in_dt, &dev)?;
    check_tensor(slots, "slots", DType::U32, &dev)?;
    let t = k.dim(0).unwrap_or(0);
    let want = [t, layout.kv_heads, layout.head_dim];
    if k.dims() != want || v.dims() != want || slots.dims() != [t] {
        return Err(invalid(format!(
            "KV write: keys {:?} and values {:?} must be {want:?} and slots {:?} must be [{t}] \
             for a cache of {layout:?}",
            k.dims(),
            v.dims(),
            slots.dims()
        )));
    }
    if t == 0 {
        return Ok(());
    }
    let op = CacheWrite {
        kern: PagedKernels::for_device(&dev)?,
        tokens: t,
        layout,
    };
    k_cache.inplace_op3(k, slots, &op)?;
    v_cache.inplace_op3(v, slots, &op)?;
    Ok(())
}

/// Paged attention on the GPU: `q` (f32 `[T, heads, head_dim]`) over the caches (f32, bf16 or F8E4M3,
/// `[num_blocks, block_size, kv_heads, head_dim]`) for the rows and tables of `batch` → f32
/// `[T, heads, head_dim]`, with the contract of [`crate::paged::paged_attention`].
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    batch: &PagedBatch,
    scale: f32,
) -> Result<Tensor, KernelError> {
    let dev = cuda_device(q, "q")?;
    check_tensor(q, "q", DType::F32, &dev)?;
    let layout = check_caches(k_cache, v_cache, &dev)?;
    let (t, heads, hd) = q.dims3().map_err(|_| {
        invalid(format!(
            "q must be [tokens, heads, head_dim], got shape {:?}",
            q.dims()
        ))
    })?;
    if hd != layout.head_dim {
        return Err(invalid(format!(
            "q has head_dim {hd} but the cache has {}",
            layout.head_dim
        )));
    }
    if layout != batch.layout || t != batch.rows {
        return Err(invalid(format!(
            "the paged batch was built for {} rows over a cache of {:?}, but q has {t} rows and \
             the cache is {layout:?}",
            batch.rows, batch.layout
        )));
    }
    for (name, m) in [
        ("row_seq", &batch.row_seq),
        ("row_pos", &batch.row_pos),
        ("block_tables", &batch.block_tables),
    ] {
        check_tensor(m, name, DType::U32, &dev)?;
    }
    let d = batch.dims(heads);
    let kern = PagedKernels::for_device(&dev)?;
    if t == 0 {
        d.check()?;
        return Ok(wrap(
            alloc::<f32>(&dev, 0, "attention output")?,
            &dev,
            (0, heads, hd),
        ));
    }
    match k_cache.dtype() {
        DType::BF16 => attend::<bf16>(&kern, &dev, q, k_cache, v_cache, batch, &d, scale),
        DType::F8E4M3 => attend::<F8E4M3>(&kern, &dev, q, k_cache, v_cache, batch, &d, scale),
        _ => attend::<f32>(&kern, &dev, q, k_cache, v_cache, batch, &d, scale),
    }
}

#[allow(clippy::too_many_arguments)]
fn attend<T: CacheElem>(
    kern: &PagedKernels,
    dev: &CudaDevice,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    batch: &PagedBatch,
    d: &PagedDims,
    scale: f32,
) -> Result<Tensor, KernelError> {
    let part = kern.partition_size(d)?;
    let (acc_len, stat_len) = PagedKernels::workspace_lens(d, part);
    let n = d.rows * d.heads * d.layout.head_dim;
    let mut out = alloc::<f32>(dev, n, "attention output")?;
    let mut acc = alloc::<f32>(dev, acc_len, "attention workspace")?;
    let mut mx = alloc::<f32>(dev, stat_len, "attention workspace")?;
    let mut sm = alloc::<f32>(dev, stat_len, "attention workspace")?;
    {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k_cache.storage_and_layout();
        let (vs, vl) = v_cache.storage_and_layout();
        let (rs, rl) = batch.row_seq.storage_and_layout();
        let (ps, pl) = batch.row_pos.storage_and_layout();
        let (bs, bl) = batch.block_tables.storage_and_layout();
        let meta = PagedMetaViews {
            row_seq: view(&rs, rl, "row_seq")?,
            row_pos: view(&ps, pl, "row_pos")?,
            block_tables: view(&bs, bl, "block_tables")?,
        };
        let mut ws = PagedWorkspace {
            acc: acc.slice_mut(0..acc_len.max(1)),
            max: mx.slice_mut(0..stat_len.max(1)),
            sum: sm.slice_mut(0..stat_len.max(1)),
        };
        kern.launch_paged_attention::<T>(
            &view(&qs, ql, "q")?,
            &view(&ks, kl, "K cache")?,
            &view(&vs, vl, "V cache")?,
            &meta,
            d,
            scale,
            part,
            &mut ws,
            &mut out.slice_mut(0..n),
        )?;
    }
    Ok(wrap(out, dev, (d.rows, d.heads, d.layout.head_dim)))
}
