//! Continuous batching must not change results: sequences generated together (with chunked
//! prefill, mid-block prompt splits, and forced preemption) give exactly the tokens — and logits
//! within 1e-5 — of each sequence run alone through the plain contiguous-cache forward. Prefix
//! caching computes a shared prompt once and changes nothing in the output.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use switchyard_engine::engine::{EngineConfig, EngineHandle, Event, GenerateRequest};
use switchyard_engine::scheduler::{AdmissionError, SchedulerConfig};
use switchyard_model::KvDtype;

mod common;

use common::{alone, engine_cfg, load, make_model, max_logit_diff, prompts, together};

fn check(budget: usize, block: usize, blocks: Option<usize>) -> u32 {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let n = 12;
    let want: Vec<_> = prompts().iter().map(|p| alone(&m, p, n)).collect();
    let e = EngineHandle::start(m, t, engine_cfg(budget, block, blocks)).unwrap();
    let got = together(&e, &prompts(), n);
    let mut worst = 0f32;
    let mut preemptions = 0;
    for (i, ((gi, gr, pre), (wi, wr))) in got.iter().zip(&want).enumerate() {
        assert_eq!(gi, wi, "sequence {i}: tokens differ when batched");
        worst = worst.max(max_logit_diff(gr, wr));
        preemptions += pre;
    }
    println!("budget {budget} block {block} blocks {blocks:?}: max|Δlogit| {worst:.2e}, preemptions {preemptions}");
    assert!(worst <= 1e-5, "logits differ by {worst}");
    // Every block is free once all requests finished.
    let mut tries = 0;
    while e.metrics().kv_blocks_used.load(Ordering::Relaxed) != 0 && tries < 100 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        tries += 1;
    }
    assert_eq!(e.metrics().kv_blocks_used.load(Ordering::Relaxed), 0);
    preemptions
}

#[test]
fn batched_equals_alone() {
    check(2048, 16, None);
}

#[test]
fn chunked_prefill_with_mid_block_splits_equals_alone() {
    // 7-token budget splits every prompt into chunks across steps; 5-token blocks split them
    // mid-block.
    check(7, 5, None);
}

#[test]
fn preemption_by_a_tiny_cache_equals_alone() {
    // 14 blocks × 4 tokens = 56 slots for five sequences needing 16–43 each.
    let pre = check(64, 4, Some(14));
    assert!(pre > 0, "the tiny cache should have forced a preemption");
}

/// An FP8 cache in the same memory holds four times the f32 cache's blocks, and batching with
/// it (chunked prefill, 5-token blocks) gives the tokens of each sequence served alone through
/// the same FP8 cache, logits within f32 noise plus the rare E4M3 rounding flip it causes.
#[test]
fn fp8_cache_holds_four_times_f32_and_batches_like_alone() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let n = 12;
    let start = |kv_dtype, max_num_seqs| {
        let (m, t) = load(d.path());
        let mut cfg = engine_cfg(7, 5, Some(40));
        cfg.kv_dtype = kv_dtype;
        cfg.scheduler.max_num_seqs = max_num_seqs;
        EngineHandle::start(m, t, cfg).unwrap()
    };
    let f32_blocks = start(KvDtype::F32, 8).info().num_blocks;
    let batched = start(KvDtype::Fp8, 8);
    assert_eq!(f32_blocks, 40);
    assert_eq!(batched.info().num_blocks, 4 * f32_blocks);
    let got = together(&batched, &prompts(), n);
    let one_at_a_time = start(KvDtype::Fp8, 1);
    let mut worst = 0f32;
    for (i, p) in prompts().iter().enumerate() {
        let want = together(&one_at_a_time, std::slice::from_ref(p), n);
        assert_eq!(
            got[i].0, want[0].0,
            "sequence {i}: tokens differ when batched"
        );
        worst = worst.max(max_logit_diff(&got[i].1, &want[0].1));
    }
    println!("fp8 KV, batched vs one at a time: max|Δlogit| {worst:.2e}");
    assert!(worst <= 1e-3, "logits differ by {worst}");
    // And the cache really is FP8: the f32-cache reference differs by more than that.
    let (m, _) = load(d.path());
    let (_, exact) = alone(&m, &prompts()[3], n);
    let d_exact = max_logit_diff(&got[3].1, &exact);
    println!("fp8 KV vs the f32 contiguous cache: max|Δlogit| {d_exact:.2e}");
    assert!(d_exact > 1e-3, "fp8 logits equal f32's to {d_exact}");
}

#[test]
fn shared_prefix_is_computed_once() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let system: Vec<u32> = (0..64).map(|i| (i * 13 + 1) % 500).collect();
    let mk = |suffix: &[u32]| -> Vec<u32> { system.iter().chain(suffix).copied().collect() };
    let a = mk(&[5, 6, 7]);
    let b = mk(&[8, 9, 10, 11]);
    let n = 6;
    let (want_b, _) = alone(&m, &b, n);
    let e = EngineHandle::start(m, t, engine_cfg(2048, 16, None)).unwrap();
    let (ra, _, _) = e
        .generate_blocking(GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::greedy(a.clone(), n)
        })
        .unwrap();
    let _ = ra;
    let before = e.metrics().tokens_computed.load(Ordering::Relaxed);
    let (rb, _, cb) = e
        .generate_blocking(GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::greedy(b.clone(), n)
        })
        .unwrap();
    let computed = e.metrics().tokens_computed.load(Ordering::Relaxed) - before;
    assert_eq!(rb, want_b, "prefix-cached output differs");
    assert_eq!(
        cb.cached_tokens, 64,
        "the 64-token system prompt (4 full blocks) is reused"
    );
    // Only the 4-token suffix plus the n-1 decode steps were computed.
    assert_eq!(computed as usize, b.len() - 64 + (n - 1));
    let q = e.metrics().prefix_queries.load(Ordering::Relaxed);
    let h = e.metrics().prefix_hits.load(Ordering::Relaxed);
    assert!(h >= 4 && q >= h, "hits {h} of {q}");
}

#[test]
fn long_sequence_spans_many_block_table_pages() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let prompt: Vec<u32> = (0..300).map(|i| (i * 7 + 3) % 500).collect();
    let (want, _) = alone(&m, &prompt, 4);
    // 2-token blocks: the table holds over 150 entries.
    let mut cfg = engine_cfg(64, 2, Some(400));
    cfg.scheduler.max_model_len = 512;
    let e = EngineHandle::start(m, t, cfg).unwrap();
    let (got, _, _) = e
        .generate_blocking(GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::greedy(prompt, 4)
        })
        .unwrap();
    assert_eq!(got, want);
}

#[test]
fn full_context_is_planned_and_impossible_requests_are_refused() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 262_144);
    let (m, t) = load(d.path());
    // Cache sized for exactly one 256K-token sequence: 16384 blocks of 16 tokens.
    let per_token = 2 * 4 * 2 * 16 * 2; // bf16 KV
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_model_len: 262_144,
            max_num_seqs: 1,
            ..Default::default()
        },
        block_size: 16,
        kv_cache_memory: Some((262_144 * per_token) as u64),
        gpu_memory_utilization: 0.9,
        kv_dtype: KvDtype::Bf16,
        prefix_caching: true,
        speculative: None,
    };
    let e = EngineHandle::start(m, t, cfg).unwrap();
    assert_eq!(e.info().num_blocks * e.info().block_size, 262_144);
    assert!(e
        .validate(&GenerateRequest::greedy(vec![1; 200_000], 62_144))
        .is_ok());
    let err = e
        .validate(&GenerateRequest::greedy(vec![1; 200_000], 62_145))
        .unwrap_err();
    assert!(
        matches!(
            err,
            switchyard_engine::engine::SubmitError::Admission(AdmissionError::ContextLength { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("262144"), "{err}");
    let err = e.validate(&GenerateRequest::greedy(vec![], 5)).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = e
        .validate(&GenerateRequest::greedy(vec![600], 5))
        .unwrap_err();
    assert!(err.to_string().contains("600"), "{err}");
}

#[test]
fn dropping_a_stream_cancels_and_frees_blocks() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let e = EngineHandle::start(m, t, engine_cfg(2048, 4, None)).unwrap();
    let mut s = e
        .submit(GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::greedy(vec![1; 40], 80)
        })
        .unwrap();
    assert!(matches!(s.blocking_recv(), Some(Event::Token(_))));
    drop(s);
    let mut tries = 0;
    while (e.metrics().kv_blocks_used.load(Ordering::Relaxed) != 0
        || e.metrics().running.load(Ordering::Relaxed) != 0)
        && tries < 200
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
        tries += 1;
    }
    assert_eq!(e.metrics().kv_blocks_used.load(Ordering::Relaxed), 0);
    assert!(e.metrics().tokens_generated.load(Ordering::Relaxed) < 80);
}

#[test]
fn a_burst_is_either_refused_at_submit_or_served_to_the_end() {
    // One running, two waiting: most of each burst must be refused synchronously, and every
    // request that `submit` accepted must run to completion (never fail later as "queue full").
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let mut cfg = engine_cfg(2048, 4, None);
    cfg.scheduler.max_num_seqs = 1;
    cfg.scheduler.max_waiting = 2;
    let e = Arc::new(EngineHandle::start(m, t, cfg).unwrap());
    let (mut served, mut refused) = (0, 0);
    for round in 0..20u32 {
        let threads: Vec<_> = (0..6u32)
            .map(|i| {
                let e = e.clone();
                std::thread::spawn(move || {
                    let r = GenerateRequest {
                        ignore_eos: true,
                        ..GenerateRequest::greedy(vec![1 + i + round, 2, 3], 2)
                    };
                    match e.submit(r) {
                        Err(err) => {
                            assert!(
                                matches!(
                                    err,
                                    switchyard_engine::engine::SubmitError::Admission(
                                        AdmissionError::QueueFull { .. }
                                    )
                                ),
                                "{err}"
                            );
                            false
                        }
                        Ok(mut s) => loop {
                            match s.blocking_recv() {
                                Some(Event::Token(_)) => {}
                                Some(Event::Finished(_)) => break true,
                                Some(Event::Error(err)) => panic!("accepted, then failed: {err}"),
                                None => panic!("accepted, then the stream closed"),
                            }
                        },
                    }
                })
            })
            .collect();
        for t in threads {
            if t.join().unwrap() {
                served += 1;
            } else {
                refused += 1;
            }
        }
    }
    assert!(
        served >= 20 && refused > 0,
        "served {served}, refused {refused}"
    );
    let m = e.metrics();
    assert_eq!(m.pending.load(Ordering::Relaxed), 0);
    assert_eq!(m.waiting.load(Ordering::Relaxed), 0);
}

/// Prompt logprobs (`echo` with `logprobs`) equal log-softmax of the contiguous forward's logits
/// at every prompt position, also when the prompt is computed in 7-token chunks and when an
/// identical prompt is already in the prefix cache (it is recomputed, not skipped).
#[test]
fn prompt_logprobs_match_the_contiguous_forward() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let prompt = prompts()[3].clone(); // 31 tokens
    let all = m
        .forward(&prompt, &mut m.new_cache(), switchyard_model::Logits::All)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let want: Vec<f32> = (1..prompt.len())
        .map(|p| {
            let row = &all[p - 1];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
            (f64::from(row[prompt[p] as usize] - max) - z.ln()) as f32
        })
        .collect();
    // Rank: 1 + how many tokens the contiguous forward puts strictly above the prompt token
    // (the engine's logits differ in rounding, so a near-tie may move it by one).
    let want_rank: Vec<usize> = (1..prompt.len())
        .map(|p| {
            let row = &all[p - 1];
            1 + row.iter().filter(|&&l| l > row[prompt[p] as usize]).count()
        })
        .collect();
    let e = EngineHandle::start(m, t, engine_cfg(7, 5, None)).unwrap();
    for round in 0..2 {
        let mut s = e
            .submit(GenerateRequest {
                prompt_logprobs: Some(2),
                ..GenerateRequest::greedy(prompt.clone(), 2)
            })
            .unwrap();
        let first = match s.blocking_recv().unwrap() {
            Event::Token(t) => t,
            Event::Error(err) => panic!("{err}"),
            Event::Finished(_) => panic!("finished without a token"),
        };
        let got = first
            .prompt_logprobs
            .expect("prompt logprobs on the first token");
        assert_eq!(got.len(), prompt.len());
        assert_eq!(got[0].logprob, None);
        for (p, g) in got.iter().enumerate().skip(1) {
            assert_eq!(g.id, prompt[p]);
            let lp = g.logprob.unwrap();
            assert!(
                (lp - want[p - 1]).abs() < 1e-4,
                "round {round} position {p}: {lp} vs {}",
                want[p - 1]
            );
            assert_eq!(g.top_logprobs.len(), 2);
            assert!(g.top_logprobs[0].logprob >= lp - 1e-6);
            let rank = g.rank.unwrap();
            assert!(
                rank.abs_diff(want_rank[p - 1]) <= 1,
                "round {round} position {p}: rank {rank} vs {}",
                want_rank[p - 1]
            );
            if rank == 1 {
                assert_eq!(g.top_logprobs[0].id, g.id);
            }
        }
    }
}

/// A request that ends with its first token (`max_tokens: 1`) still leaves its prompt in the
/// prefix cache: the next request with that prompt reuses its full blocks.
#[test]
fn a_one_token_request_leaves_its_prompt_cached() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let e = EngineHandle::start(m, t, engine_cfg(64, 4, None)).unwrap();
    let prompt = prompts()[3].clone(); // 31 tokens: 7 full 4-token blocks
    let cached = |max_tokens: usize| {
        let mut s = e
            .submit(GenerateRequest::greedy(prompt.clone(), max_tokens))
            .unwrap();
        let first = match s.blocking_recv().unwrap() {
            Event::Token(t) => t,
            other => panic!("{other:?}"),
        };
        while let Some(ev) = s.blocking_recv() {
            if matches!(ev, Event::Finished(_)) {
                break;
            }
        }
        first.cached_tokens.unwrap()
    };
    assert_eq!(cached(1), 0);
    assert_eq!(cached(1), 28, "the first request's 7 full blocks");
}
