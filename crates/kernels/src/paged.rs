//! Paged attention (vLLM's block-table layout) on the CPU: the KV write for a batch of new
//! tokens (`reshape_and_cache`) and attention for a batch of sequences of different lengths
//! whose keys/values live in fixed-size blocks named by per-sequence block tables.
//!
//! Layout per layer: `[num_blocks, block_size, kv_heads, head_dim]` for K and for V. Token `p`
//! of a sequence lives in block `block_table[p / block_size]`, row `p % block_size`. The same
//! layout is what the CUDA kernels read, so the engine's block manager serves both.

use half::bf16;
use rayon::prelude::*;

use crate::KernelError;

/// Element type of the KV cache.
pub trait KvElem: Copy + Send + Sync + Default + 'static {
    /// Widen to f32 for arithmetic.
    fn to_f32(self) -> f32;
    /// Narrow from f32 for storage.
    fn from_f32(x: f32) -> Self;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl KvElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Geometry of one layer's paged KV storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

impl KvLayout {
    /// Elements of one token's K (or V) across heads.
    pub fn token_elems(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Elements of a whole layer's K (or V) buffer.
    pub fn layer_elems(&self) -> usize {
        self.num_blocks * self.block_size * self.token_elems()
    }
}

/// Writes new tokens' keys/values (`[T, kv_heads, head_dim]`, f32) into their cache slots
/// (`slot = block * block_size + row`).
pub fn reshape_and_cache<T: KvElem>(
    k: &[f32],
    v: &[f32],
    slots: &[usize],
    k_cache: &mut [T],
    v_cache: &mut [T],
    layout: &KvLayout,
) -> Result<(), KernelError> {
    let te = layout.token_elems();
    if k.len() != slots.len() * te || v.len() != k.len() {
        return Err(KernelError::InvalidArgument(format!(
            "reshape_and_cache: {} slots need K and V of {} elements, got {} and {}",
            slots.len(),
            slots.len() * te,
            k.len(),
            v.len()
        )));
    }
    let total_slots = layout.num_blocks * layout.block_size;
    if k_cache.len() != layout.layer_elems() || v_cache.len() != layout.layer_elems() {
        return Err(KernelError::InvalidArgument(
            "reshape_and_cache: cache buffers do not match the layout".into(),
        ));
    }
    for (i, &s) in slots.iter().enumerate() {
        if s >= total_slots {
            return Err(KernelError::InvalidArgument(format!(
                "reshape_and_cache: slot {s} outside the {total_slots} slots of the cache"
            )));
        }
        let dst = s * te;
        for j in 0..te {
            k_cache[dst + j] = T::from_f32(k[i * te + j]);
            v_cache[dst + j] = T::from_f32(v[i * te + j]);
        }
    }
    Ok(())
}

/// One sequence's part of a paged-attention batch.
#[derive(Debug, Clone)]
pub struct SeqAttn<'a> {
    /// First row of this sequence's queries in the batch.
    pub q_start: usize,
    /// Number of query tokens (1 for decode, a chunk for prefill).
    pub q_len: usize,
    /// Tokens in the cache for this sequence after this step's write (the queries are its last
    /// `q_len` positions).
    pub ctx_len: usize,
    /// Blocks holding positions `0..ctx_len`.
    pub block_table: &'a [u32],
}

/// Causal attention for queries `q` (`[T, heads, head_dim]`, f32) of several sequences over
/// their cached keys/values; writes `out` (`[T, heads, head_dim]`). GQA: query head `h` reads
/// KV head `h / (heads / kv_heads)`. Softmax is computed online in f32.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention<T: KvElem>(
    q: &[f32],
    k_cache: &[T],
    v_cache: &[T],
    layout: &KvLayout,
    seqs: &[SeqAttn<'_>],
    heads: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let hd = layout.head_dim;
    let kvh = layout.kv_heads;
    if heads == 0 || kvh == 0 || !heads.is_multiple_of(kvh) {
        return Err(KernelError::InvalidArgument(format!(
            "paged_attention: {heads} query heads over {kvh} KV heads"
        )));
    }
    if !q.len().is_multiple_of(heads * hd) || out.len() != q.len() {
        return Err(KernelError::InvalidArgument(
            "paged_attention: q/out are not [T, heads, head_dim]".into(),
        ));
    }
    let t = q.len() / (heads * hd);
    // Row → (sequence, position) map; checked up front so the parallel loop cannot fail.
    let mut row_pos = vec![(usize::MAX, 0usize); t];
    for (si, s) in seqs.iter().enumerate() {
        if s.q_len > s.ctx_len
            || s.q_start + s.q_len > t
            || s.block_table.len() * layout.block_size < s.ctx_len
        {
            return Err(KernelError::InvalidArgument(format!(
                "paged_attention: sequence {si} (q {}+{}, ctx {}, {} blocks) does not fit the batch of {t} rows",
                s.q_start,
                s.q_len,
                s.ctx_len,
                s.block_table.len()
            )));
        }
        if let Some(&b) = s
            .block_table
            .iter()
            .find(|&&b| b as usize >= layout.num_blocks)
        {
            return Err(KernelError::InvalidArgument(format!(
                "paged_attention: block {b} outside the pool of {}",
                layout.num_blocks
            )));
        }
        for i in 0..s.q_len {
            row_pos[s.q_start + i] = (si, s.ctx_len - s.q_len + i);
        }
    }
    let group = heads / kvh;
    let bs = layout.block_size;
    let te = layout.token_elems();
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (row, h) = (idx / heads, idx % heads);
        let (si, pos) = row_pos[row];
        if si == usize::MAX {
            o.fill(0.0);
            return;
        }
        let s = &seqs[si];
        let kh = h / group;
        let qv = &q[(row * heads + h) * hd..(row * heads + h + 1) * hd];
        let mut m = f32::NEG_INFINITY;
        let mut l = 0f32;
        let mut acc = vec![0f32; hd];
        for p in 0..=pos {
            let base = (s.block_table[p / bs] as usize * bs + p % bs) * te + kh * hd;
            let kr = &k_cache[base..base + hd];
            let mut dot = 0f32;
            for d in 0..hd {
                dot += qv[d] * kr[d].to_f32();
            }
            let x = dot * scale;
            let vr = &v_cache[base..base + hd];
            if x > m {
                let c = (m - x).exp();
                l = l * c + 1.0;
                for d in 0..hd {
                    acc[d] = acc[d] * c + vr[d].to_f32();
                }
                m = x;
            } else {
                let w = (x - m).exp();
                l += w;
                for d in 0..hd {
                    acc[d] += w * vr[d].to_f32();
                }
            }
        }
        for d in 0..hd {
            o[d] = acc[d] / l;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Reference: dense causal attention per sequence from contiguous K/V in f64.
    #[test]
    fn matches_dense_attention_through_scrambled_block_tables() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let layout = KvLayout {
            num_blocks: 32,
            block_size: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let heads = 4;
        let te = layout.token_elems();
        // Two sequences: 10 tokens (prefill chunk of 3 at the end) and 5 tokens (decode of 1).
        let lens = [10usize, 5];
        let q_lens = [3usize, 1];
        let tables: Vec<Vec<u32>> = vec![vec![7, 2, 30], vec![5, 19]];
        let mut kc = vec![0f32; layout.layer_elems()];
        let mut vc = vec![0f32; layout.layer_elems()];
        let mut dense_k = Vec::new();
        let mut dense_v = Vec::new();
        for (s, &n) in lens.iter().enumerate() {
            let k: Vec<f32> = (0..n * te).map(|_| rng.random_range(-1.0..1.0)).collect();
            let v: Vec<f32> = (0..n * te).map(|_| rng.random_range(-1.0..1.0)).collect();
            let slots: Vec<usize> = (0..n)
                .map(|p| tables[s][p / 4] as usize * 4 + p % 4)
                .collect();
            reshape_and_cache(&k, &v, &slots, &mut kc, &mut vc, &layout).unwrap();
            dense_k.push(k);
            dense_v.push(v);
        }
        let t = q_lens.iter().sum::<usize>();
        let q: Vec<f32> = (0..t * heads * 8)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let seqs = vec![
            SeqAttn {
                q_start: 0,
                q_len: 3,
                ctx_len: 10,
                block_table: &tables[0],
            },
            SeqAttn {
                q_start: 3,
                q_len: 1,
                ctx_len: 5,
                block_table: &tables[1],
            },
        ];
        let mut out = vec![f32::NAN; q.len()];
        let scale = 0.35;
        paged_attention(&q, &kc, &vc, &layout, &seqs, heads, scale, &mut out).unwrap();
        for (si, s) in seqs.iter().enumerate() {
            for i in 0..s.q_len {
                let row = s.q_start + i;
                let pos = s.ctx_len - s.q_len + i;
                for h in 0..heads {
                    let kh = h / 2;
                    let qv = &q[(row * heads + h) * 8..][..8];
                    let logits: Vec<f64> = (0..=pos)
                        .map(|p| {
                            (0..8)
                                .map(|d| qv[d] as f64 * dense_k[si][p * te + kh * 8 + d] as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = logits.iter().map(|x| (x - mx).exp()).sum();
                    for d in 0..8 {
                        let want: f64 = (0..=pos)
                            .map(|p| {
                                (logits[p] - mx).exp() / z * dense_v[si][p * te + kh * 8 + d] as f64
                            })
                            .sum();
                        let got = out[(row * heads + h) * 8 + d] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "seq {si} row {row} head {h}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_tables_are_errors() {
        let layout = KvLayout {
            num_blocks: 2,
            block_size: 4,
            kv_heads: 1,
            head_dim: 2,
        };
        let kc = vec![0f32; layout.layer_elems()];
        let q = vec![0f32; 2];
        let mut out = vec![0f32; 2];
        let bad = [SeqAttn {
            q_start: 0,
            q_len: 1,
            ctx_len: 1,
            block_table: &[9],
        }];
        assert!(paged_attention(&q, &kc, &kc, &layout, &bad, 1, 1.0, &mut out).is_err());
        let short = [SeqAttn {
            q_start: 0,
            q_len: 1,
            ctx_len: 5,
            block_table: &[0],
        }];
        assert!(paged_attention(&q, &kc, &kc, &layout, &short, 1, 1.0, &mut out).is_err());
        let (mut k2, mut v2) = (kc.clone(), kc.clone());
        assert!(reshape_and_cache(&[0.0; 2], &[0.0; 2], &[8], &mut k2, &mut v2, &layout).is_err());
    }
}
