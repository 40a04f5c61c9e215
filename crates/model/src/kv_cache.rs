//! Contiguous per-sequence KV cache for incremental decoding.
//!
//! Each layer keeps `[kv_heads, capacity, head_dim]` buffers that grow in chunks; appending
//! writes in place (`slice_set`), so a decode step copies only its own new keys and values.
//! The paged cache of the engine (block tables, prefix sharing) replaces this for serving;
//! this one is the single-sequence reference it is tested against.

use candle_core::Tensor;

use crate::ModelError;

/// Tokens the buffers grow by when full: large enough that growth is rare, small enough that a
/// short prompt does not reserve much memory.
const GROW_TOKENS: usize = 256;

/// KV cache of one sequence across all layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers)
                .map(|_| candle_nn::kv_cache::KvCache::new(1, GROW_TOKENS))
                .collect(),
            len: 0,
        }
    }

    /// Tokens already cached (= position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends this step's keys/values (`[kv_heads, T, head_dim]`) for `layer` and returns all
    /// cached keys/values including them.
    pub fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let c = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::InvalidInput(format!("no KV cache for layer {layer}")))?;
        Ok(c.append(&k.contiguous()?, &v.contiguous()?)?)
    }

    /// Marks `n` more tokens as cached (called once per forward, after all layers appended).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Drops everything.
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            l.reset();
        }
        self.len = 0;
    }
}
