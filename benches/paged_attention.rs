//! The CPU paged decode attention ([`switchyard_kernels::paged_attention`]) of one layer at
//! Hy3's head shapes: 64 query heads over 8 KV heads (GQA group 8), head_dim 128, blocks of 16
//! tokens (the engine's default). One query token per sequence, B = 1 and 8 sequences, with
//! 512 and 4096 tokens of context each; KV stored in f32 (the engine's default) and bf16.
//!
//! Decode attention reads every cached K and V element once per KV head group, so the
//! throughput is given in bytes of KV read per second (`B · ctx · 8 · 128 · 2 · elem` per call)
//! to compare with memory bandwidth (`switchyard bench` prints it). Block tables are a random
//! permutation of the pool, as after the block pool has handed blocks out and back for a while.

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use half::bf16;
use switchyard_benches::{test_mode, Rng, SEED};
use switchyard_kernels::cpu_gemv::on_worker;
use switchyard_kernels::{paged_attention, KvElem, KvLayout, SeqAttn};

/// Hy3's query heads.
const HEADS: usize = 64;
/// Hy3's KV heads.
const KV_HEADS: usize = 8;
/// Hy3's head_dim.
const HEAD_DIM: usize = 128;
/// The engine's default block size.
const BLOCK_SIZE: usize = 16;
/// Context lengths: a chat turn, and a long document.
const CONTEXTS: [usize; 2] = [512, 4096];
/// Context lengths in test mode.
const TEST_CONTEXTS: [usize; 1] = [64];
/// Sequences per decode step: batch-1 latency, and a small server batch.
const BATCHES: [usize; 2] = [1, 8];

/// One layer's K and V for `batch` sequences of up to `ctx` tokens, with their block tables.
struct Cache<T> {
    layout: KvLayout,
    k: Vec<T>,
    v: Vec<T>,
    tables: Vec<Vec<u32>>,
}

impl<T: KvElem> Cache<T> {
    fn new(batch: usize, ctx: usize, rng: &mut Rng) -> Self {
        let per_seq = ctx.div_ceil(BLOCK_SIZE);
        let layout = KvLayout {
            num_blocks: batch * per_seq,
            block_size: BLOCK_SIZE,
            kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
        };
        let n = layout.layer_elems();
        let k = (0..n).map(|_| T::from_f32(rng.uniform(1.0))).collect();
        let v = (0..n).map(|_| T::from_f32(rng.uniform(1.0))).collect();
        // Fisher–Yates over the pool, then consecutive runs of the shuffled ids per sequence.
        let mut ids: Vec<u32> = (0..layout.num_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.below(i + 1));
        }
        let tables = ids.chunks(per_seq).map(<[u32]>::to_vec).collect();
        Self {
            layout,
            k,
            v,
            tables,
        }
    }
}

fn bench_dtype<T: KvElem>(c: &mut Criterion, name: &str, contexts: &[usize]) {
    let mut g = c.benchmark_group("paged_attention");
    // B = 8 at 4096 tokens reads 256 MiB of f32 KV per call (~50 ms here): one call per sample.
    g.sampling_mode(SamplingMode::Flat);
    let max_ctx = contexts.iter().copied().max().unwrap_or(1);
    let max_batch = BATCHES.iter().copied().max().unwrap_or(1);
    // Built on first use (skipped by filters and `--list`), shared by every shape below.
    let mut cache: Option<Cache<T>> = None;
    let mut rng = Rng::new(SEED);
    let q = rng.vec_f32(max_batch * HEADS * HEAD_DIM, 1.0);
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    for &ctx in contexts {
        for b in BATCHES {
            let bytes = b * ctx * KV_HEADS * HEAD_DIM * 2 * std::mem::size_of::<T>();
            g.throughput(Throughput::Bytes(bytes as u64));
            let mut out = vec![0f32; b * HEADS * HEAD_DIM];
            g.bench_function(
                BenchmarkId::new(
                    format!("h{HEADS}_kv{KV_HEADS}_d{HEAD_DIM}_{name}"),
                    format!("b{b}_ctx{ctx}"),
                ),
                |bch| {
                    let kv = cache.get_or_insert_with(|| Cache::new(max_batch, max_ctx, &mut rng));
                    let seqs: Vec<SeqAttn<'_>> = (0..b)
                        .map(|s| SeqAttn {
                            q_start: s,
                            q_len: 1,
                            ctx_len: ctx,
                            block_table: &kv.tables[s],
                        })
                        .collect();
                    let q = &q[..b * HEADS * HEAD_DIM];
                    // On a rayon worker, as the model's forward runs it.
                    on_worker(|| {
                        bch.iter(|| {
                            paged_attention(
                                q, &kv.k, &kv.v, &kv.layout, &seqs, HEADS, scale, &mut out,
                            )
                            .expect("paged attention")
                        })
                    })
                },
            );
        }
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let contexts: &[usize] = if test_mode() {
        &TEST_CONTEXTS
    } else {
        &CONTEXTS
    };
    bench_dtype::<f32>(c, "f32", contexts);
    bench_dtype::<bf16>(c, "bf16", contexts);
}

criterion_group! {
    name = benches;
    config = switchyard_benches::criterion();
    targets = attention
}
criterion_main!(benches);
