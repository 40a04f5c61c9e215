//! The engine over a tensor-parallel split (`switchyard_engine::parallel`): with 2 and 4 ranks it
//! generates exactly the greedy tokens of one rank for a batch of prompts (logits within 1e-4),
//! a cancelled request leaves the ranks serving the next one, and shutting the engine down ends
//! every rank thread.
//!
//! One test function on purpose: it counts this process's rank threads, which other tests
//! running at the same time would disturb.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_engine::engine::{EngineConfig, EngineHandle, Event, GenerateRequest};
use switchyard_engine::parallel::load_ranks;
use switchyard_engine::scheduler::SchedulerConfig;
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_model::{Checkpoint, KvDtype, LoadOptions, ModelConfig};

mod common;

use common::{make_model, max_logit_diff, prompts, together};

fn start(dir: &Path, world: usize) -> EngineHandle {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Arc::new(Checkpoint::open(dir).unwrap());
    let ranks = load_ranks(&cfg, ckpt, &LoadOptions::default(), world, |_, _| {}).unwrap();
    assert_eq!(ranks.len(), world);
    let tok = Arc::new(Tokenizer::from_dir(dir).unwrap());
    let ecfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 24,
            max_model_len: 128,
            chunked_prefill: true,
            max_waiting: 100,
            policy: Default::default(),
        },
        block_size: 5,
        kv_cache_memory: Some(64 << 20),
        gpu_memory_utilization: 0.9,
        kv_dtype: KvDtype::F32,
        prefix_caching: true,
        speculative: None,
    };
    EngineHandle::start(ranks, tok, ecfg).unwrap()
}

/// Every prompt submitted at once; greedy tokens and per-step logits of each.
fn generate(e: &EngineHandle, n: usize) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
    together(e, &prompts(), n)
        .into_iter()
        .map(|(ids, rows, _)| (ids, rows))
        .collect()
}

/// Threads of this process named like rank threads (`switchyard-rank-N`, cut to 15 bytes).
fn rank_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|t| t.ok())
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("switchyard-rank"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn tensor_parallel_engine_generates_the_tokens_of_one_rank_and_shuts_down_cleanly() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let n = 12;
    let one = {
        let e = start(d.path(), 1);
        assert_eq!(rank_threads(), 0);
        generate(&e, n)
    };
    for world in [2, 4] {
        let e = start(d.path(), world);
        assert_eq!(rank_threads(), world);
        let got = generate(&e, n);
        let mut worst = 0f32;
        for (i, ((gi, gr), (wi, wr))) in got.iter().zip(&one).enumerate() {
            assert_eq!(gi, wi, "tp={world} sequence {i}: tokens differ from tp=1");
            worst = worst.max(max_logit_diff(gr, wr));
        }
        println!("engine tp={world}: tokens equal to tp=1, logits max|Δ| {worst:.2e}");
        assert!(worst <= 1e-4, "tp={world}: logits differ by {worst}");

        // A request cancelled mid-generation (its stream dropped) leaves the ranks serving.
        let mut s = e
            .submit(GenerateRequest {
                ignore_eos: true,
                ..GenerateRequest::greedy(prompts()[3].clone(), 60)
            })
            .unwrap();
        assert!(matches!(s.blocking_recv(), Some(Event::Token(_))));
        drop(s);
        let again = generate(&e, 3);
        assert_eq!(again[0].0, one[0].0[..3], "tp={world}: after a cancel");

        // Shutting the engine down ends every rank thread.
        drop(e);
        let t0 = Instant::now();
        while rank_threads() > 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "tp={world}: {} rank threads still running after shutdown",
                rank_threads()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
