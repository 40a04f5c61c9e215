//! Shared by the engine's integration tests: the tiny random model on disk and loaded, the
//! contiguous-cache greedy reference, the batch of prompts they generate from, and collecting a
//! batch's greedy tokens and logits from the engine.

#![allow(dead_code)]

use std::path::Path;

use std::sync::Arc;

use candle_core::DType;
use switchyard_engine::engine::{Completion, EngineConfig, EngineHandle, Event, GenerateRequest};
use switchyard_engine::scheduler::SchedulerConfig;
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_model::{HyV3Model, KvDtype, LoadOptions, Logits};

/// Writes the `tiny` preset with random f32 weights (seed 5) and a byte-level BPE tokenizer into
/// `dir`, with `max_pos` positions.
pub fn make_model(dir: &Path, max_pos: usize) {
    let mut cfg = switchyard_model::presets::preset("tiny").unwrap();
    cfg.max_position_embeddings = max_pos;
    switchyard_model::test_model::write_random_checkpoint(&cfg, dir, 5, DType::F32).unwrap();
    let tok =
        switchyard_engine::tokenizer::build_byte_level_bpe(cfg.vocab_size, &["<|endoftext|>"])
            .unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
}

/// The model and tokenizer in `dir` (f32).
pub fn load(dir: &Path) -> (HyV3Model, Arc<Tokenizer>) {
    let m = HyV3Model::load_dir(dir, &LoadOptions::default()).unwrap();
    let t = Arc::new(Tokenizer::from_dir(dir).unwrap());
    (m, t)
}

/// Greedy generation with the contiguous cache, one token per forward: the independent
/// reference the paged engine is compared with. Returns the tokens and each step's logits.
pub fn alone(m: &HyV3Model, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut c = m.new_cache();
    let mut last = m.forward(prompt, &mut c, Logits::Last).unwrap();
    let (mut ids, mut rows) = (vec![], vec![]);
    for _ in 0..n {
        let row = last.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let best = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        ids.push(best as u32);
        rows.push(row);
        last = m.forward(&[best as u32], &mut c, Logits::Last).unwrap();
    }
    (ids, rows)
}

/// Engine settings for the tiny model: `budget` tokens per step, `block`-token blocks, a KV
/// cache of `blocks` blocks (256 when `None`), f32 KV, prefix caching on.
pub fn engine_cfg(budget: usize, block: usize, blocks: Option<usize>) -> EngineConfig {
    let per_token = 2 * 4 * 2 * 16 * 4; // layers × kv heads × head_dim × f32, K and V
    EngineConfig {
        scheduler: SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: budget,
            max_model_len: 128,
            chunked_prefill: true,
            max_waiting: 100,
            policy: Default::default(),
        },
        block_size: block,
        kv_cache_memory: Some((blocks.unwrap_or(256) * block * per_token) as u64),
        gpu_memory_utilization: 0.9,
        kv_dtype: KvDtype::F32,
        prefix_caching: true,
        speculative: None,
    }
}

/// Five prompts of 4 to 31 tokens.
pub fn prompts() -> Vec<Vec<u32>> {
    [9usize, 23, 4, 31, 16]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            (0..n as u32)
                .map(|i| (i * 37 + k as u32 * 101 + 7) % 500)
                .collect()
        })
        .collect()
}

/// Submits every prompt at once (greedy, `n` tokens, EOS ignored) and collects each one's
/// tokens, per-step logits and preemption count.
pub fn together(
    e: &EngineHandle,
    ps: &[Vec<u32>],
    n: usize,
) -> Vec<(Vec<u32>, Vec<Vec<f32>>, u32)> {
    together_completions(e, ps, n)
        .into_iter()
        .map(|(ids, rows, c)| (ids, rows, c.preemptions))
        .collect()
}

/// [`together`] with each request's whole [`Completion`] (drafts, preemptions, timings).
pub fn together_completions(
    e: &EngineHandle,
    ps: &[Vec<u32>],
    n: usize,
) -> Vec<(Vec<u32>, Vec<Vec<f32>>, Completion)> {
    let mut streams: Vec<_> = ps
        .iter()
        .map(|p| {
            let r = GenerateRequest {
                ignore_eos: true,
                return_logits: true,
                ..GenerateRequest::greedy(p.clone(), n)
            };
            e.submit(r).unwrap()
        })
        .collect();
    streams
        .iter_mut()
        .map(|s| {
            let (mut ids, mut rows) = (vec![], vec![]);
            loop {
                match s.blocking_recv().unwrap() {
                    Event::Token(t) => {
                        ids.push(t.id);
                        rows.push(t.logits.unwrap());
                    }
                    Event::Finished(c) => return (ids, rows, c),
                    Event::Error(err) => panic!("{err}"),
                }
            }
        })
        .collect()
}

/// The largest |a − b| over two sequences' logit rows.
pub fn max_logit_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let mut worst = 0f32;
    for (ra, rb) in a.iter().zip(b) {
        for (x, y) in ra.iter().zip(rb) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}
