//! Paged KV storage for all layers of a model: one `[num_blocks, block_size, kv_heads,
//! head_dim]` buffer for K and one for V per layer, in f32, bf16 or FP8 E4M3. Which blocks
//! belong to which sequence is the engine's business (its block manager hands out block
//! tables); this type only stores and reads through them.
//!
//! The buffers live in host memory (the CPU paged attention of `switchyard_kernels`), or, with
//! the `cuda` feature and a cache made by [`PagedKvCache::new_on`] for a CUDA device, as device
//! tensors that the CUDA paged-attention kernels read in place.

use bytemuck::zeroed_vec;
use candle_core::Device;
#[cfg(feature = "cuda")]
use candle_core::Tensor;
use half::bf16;
use switchyard_kernels::{paged_attention, reshape_and_cache, KvElem, KvLayout, SeqAttn, F8E4M3};

use crate::ModelError;

/// Storage dtype of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// 4 bytes per element: exact.
    F32,
    /// 2 bytes per element: half the memory, rounding in the cache.
    Bf16,
    /// 1 byte per element, FP8 E4M3 with a unit scale (vLLM's `--kv-cache-dtype fp8` when the
    /// checkpoint has no KV scales): a quarter of f32's memory and attention bytes, 3
    /// mantissa bits, saturating at ±448.
    Fp8,
}

impl KvDtype {
    /// Bytes per stored element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
            KvDtype::Fp8 => 1,
        }
    }

    /// The name `--kv-dtype` takes for it.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
            KvDtype::Fp8 => "fp8",
        }
    }

    /// The dtype a `--kv-dtype` name stands for (`auto` is the caller's to resolve).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(Self::F32),
            "bf16" | "bfloat16" => Some(Self::Bf16),
            "fp8" | "fp8_e4m3" | "e4m3" => Some(Self::Fp8),
            _ => None,
        }
    }
}

enum Buf {
    F32(Vec<f32>, Vec<f32>),
    Bf16(Vec<bf16>, Vec<bf16>),
    Fp8(Vec<F8E4M3>, Vec<F8E4M3>),
    /// K and V as `[num_blocks, block_size, kv_heads, head_dim]` tensors on a CUDA device.
    #[cfg(feature = "cuda")]
    Device(Tensor, Tensor),
}

/// Block-table positions of a batch, shared by all layers of one forward.
pub struct PagedBatchMeta<'a> {
    /// Per-sequence attention spans.
    pub seqs: &'a [SeqAttn<'a>],
    /// Cache slot of every new token, in batch order.
    pub slots: &'a [usize],
    /// The same batch uploaded for the CUDA kernels, when the cache is on a CUDA device.
    #[cfg(feature = "cuda")]
    pub device: Option<switchyard_kernels::cuda::PagedBatch>,
}

/// KV cache of every layer, addressed by block tables.
pub struct PagedKvCache {
    layout: KvLayout,
    dtype: KvDtype,
    layers: Vec<Buf>,
}

impl std::fmt::Debug for PagedKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKvCache")
            .field("layout", &self.layout)
            .field("dtype", &self.dtype)
            .field("layers", &self.layers.len())
            .finish()
    }
}

impl PagedKvCache {
    /// Allocates zeroed storage for `layers` layers. The buffers come from zeroed allocations,
    /// which the OS maps lazily: a cache of many GiB costs nothing until blocks are written
    /// (filling a bf16 cache of 5 GiB element by element took 14 s at start-up on the 2-core
    /// VM, page faults included).
    pub fn new(layers: usize, layout: KvLayout, dtype: KvDtype) -> Self {
        let n = layout.layer_elems();
        let layers = (0..layers)
            .map(|_| match dtype {
                KvDtype::F32 => Buf::F32(zeroed_vec(n), zeroed_vec(n)),
                KvDtype::Bf16 => Buf::Bf16(zeroed_vec(n), zeroed_vec(n)),
                KvDtype::Fp8 => Buf::Fp8(zeroed_vec(n), zeroed_vec(n)),
            })
            .collect();
        Self {
            layout,
            dtype,
            layers,
        }
    }

    /// Allocates zeroed storage for `layers` layers on `device`: host buffers for the CPU,
    /// device tensors for a CUDA device when built with `cuda` (host buffers otherwise).
    pub fn new_on(
        layers: usize,
        layout: KvLayout,
        dtype: KvDtype,
        device: &Device,
    ) -> Result<Self, ModelError> {
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            let dt = match dtype {
                KvDtype::F32 => candle_core::DType::F32,
                KvDtype::Bf16 => candle_core::DType::BF16,
                KvDtype::Fp8 => candle_core::DType::F8E4M3,
            };
            let shape = (
                layout.num_blocks,
                layout.block_size,
                layout.kv_heads,
                layout.head_dim,
            );
            let layers = (0..layers)
                .map(|_| -> Result<Buf, ModelError> {
                    Ok(Buf::Device(
                        Tensor::zeros(shape, dt, device)?,
                        Tensor::zeros(shape, dt, device)?,
                    ))
                })
                .collect::<Result<_, _>>()?;
            return Ok(Self {
                layout,
                dtype,
                layers,
            });
        }
        let _ = device;
        Ok(Self::new(layers, layout, dtype))
    }

    /// Whether the buffers are device tensors (the CUDA kernels' path).
    pub fn is_on_device(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let Some(Buf::Device(..)) = self.layers.first() {
            return true;
        }
        false
    }

    /// K and V of `layer` when they are device tensors.
    #[cfg(feature = "cuda")]
    pub(crate) fn device_layer(&self, layer: usize) -> Result<(&Tensor, &Tensor), ModelError> {
        match self.layers.get(layer) {
            Some(Buf::Device(k, v)) => Ok((k, v)),
            Some(_) => Err(ModelError::InvalidInput(format!(
                "the KV storage of layer {layer} is in host memory, not on the device"
            ))),
            None => Err(ModelError::InvalidInput(format!(
                "no KV storage for layer {layer}"
            ))),
        }
    }

    /// Bytes one token's K and V take across all layers.
    pub fn bytes_per_token(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> usize {
        2 * layers * kv_heads * head_dim * dtype.size()
    }

    /// Layers held (the decoder layers, plus the MTP layer when the model loaded it).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Geometry per layer.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Storage dtype.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Total bytes held.
    pub fn bytes(&self) -> usize {
        2 * self.layers.len() * self.layout.layer_elems() * self.dtype.size()
    }

    /// Writes this step's K/V for `layer` and runs paged attention for the batch.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_and_attend(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        batch: &PagedBatchMeta<'_>,
        q: &[f32],
        heads: usize,
        scale: f32,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let layout = self.layout;
        let buf = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::InvalidInput(format!("no KV storage for layer {layer}")))?;
        fn host<T: KvElem>(
            kc: &mut [T],
            vc: &mut [T],
            (k, v, q, out): (&[f32], &[f32], &[f32], &mut [f32]),
            batch: &PagedBatchMeta<'_>,
            layout: &KvLayout,
            heads: usize,
            scale: f32,
        ) -> Result<(), ModelError> {
            reshape_and_cache(k, v, batch.slots, kc, vc, layout)?;
            paged_attention(q, kc, vc, layout, batch.seqs, heads, scale, out)?;
            Ok(())
        }
        let io = (k, v, q, out);
        match buf {
            Buf::F32(kc, vc) => host(kc, vc, io, batch, &layout, heads, scale)?,
            Buf::Bf16(kc, vc) => host(kc, vc, io, batch, &layout, heads, scale)?,
            Buf::Fp8(kc, vc) => host(kc, vc, io, batch, &layout, heads, scale)?,
            #[cfg(feature = "cuda")]
            Buf::Device(..) => {
                return Err(ModelError::InvalidInput(format!(
                    "the KV storage of layer {layer} is on the device; the host attention path \
                     cannot use it"
                )))
            }
        }
        Ok(())
    }
}
