//! Speculative decoding must not change greedy results: with prompt-lookup drafts on, every
//! sequence gives exactly the tokens — and, at every position, logits within 1e-5 — of the
//! sequence run alone through the plain contiguous-cache forward, also when drafts are cut by
//! the step budget, by a tiny KV cache that forces preemption, by `max_tokens`, or by a stop
//! token in the middle of an accepted draft. And the drafts must really be checked and kept.

use std::sync::atomic::Ordering;

use switchyard_engine::engine::{EngineConfig, EngineHandle, Event, GenerateRequest};
use switchyard_engine::sampling::SamplingParams;
use switchyard_engine::speculative::{SpeculativeConfig, SpeculativeMethod};
use switchyard_engine::stop::FinishReason;

mod common;

use common::{alone, load, make_model, max_logit_diff, prompts, together};

fn spec(k: usize) -> SpeculativeConfig {
    SpeculativeConfig {
        method: SpeculativeMethod::Ngram,
        num_speculative_tokens: k,
        prompt_lookup_min: 1,
        prompt_lookup_max: 3,
        disable_by_batch_size: None,
    }
}

fn engine_cfg(budget: usize, block: usize, blocks: usize, k: usize) -> EngineConfig {
    EngineConfig {
        speculative: Some(spec(k)),
        ..common::engine_cfg(budget, block, Some(blocks))
    }
}

/// Prompts that repeat themselves (a lookup finds matches from the first decode step) next to
/// the plain batch of the other engine tests.
fn spec_prompts() -> Vec<Vec<u32>> {
    let mut ps = prompts();
    let phrase: Vec<u32> = vec![11, 42, 7, 300, 5, 19];
    ps.push(phrase.iter().cycle().take(30).copied().collect());
    ps.push([&phrase[..], &[99, 98], &phrase[..], &[99]].concat());
    ps
}

fn wait_blocks_free(e: &EngineHandle) {
    for _ in 0..200 {
        if e.metrics().kv_blocks_used.load(Ordering::Relaxed) == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("KV blocks still in use after every request finished");
}

/// Runs the batch with drafts and compares with the reference; returns (drafted, accepted,
/// preemptions).
fn check(budget: usize, block: usize, blocks: usize, k: usize, n: usize) -> (u64, u64, u32) {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let ps = spec_prompts();
    let want: Vec<_> = ps.iter().map(|p| alone(&m, p, n)).collect();
    let e = EngineHandle::start(m, t, engine_cfg(budget, block, blocks, k)).unwrap();
    let got = together(&e, &ps, n);
    let mut worst = 0f32;
    let preemptions: u32 = got.iter().map(|g| g.2).sum();
    for (i, ((gi, gr, _), (wi, wr))) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            gi, wi,
            "sequence {i}: tokens differ with speculative decoding"
        );
        assert_eq!(gr.len(), n, "sequence {i}: one logit row per token");
        worst = worst.max(max_logit_diff(gr, wr));
    }
    let drafted = e.metrics().spec_draft_tokens.load(Ordering::Relaxed);
    let accepted = e.metrics().spec_accepted_tokens.load(Ordering::Relaxed);
    let steps = e.metrics().steps.load(Ordering::Relaxed);
    println!(
        "budget {budget} block {block} blocks {blocks} k {k}: max|Δlogit| {worst:.2e}, \
         drafted {drafted}, accepted {accepted}, steps {steps}, preemptions {preemptions}"
    );
    assert!(worst <= 1e-5, "logits differ by {worst}");
    assert!(
        accepted > 0 && drafted >= accepted,
        "{accepted} of {drafted}"
    );
    wait_blocks_free(&e);
    (drafted, accepted, preemptions)
}

#[test]
fn greedy_with_drafts_equals_alone() {
    let (drafted, accepted, _) = check(2048, 16, 256, 4, 24);
    // The repeating prompt alone should give long accepted runs.
    assert!(accepted >= 10, "{accepted} of {drafted} drafts accepted");
}

#[test]
fn drafts_cut_by_a_small_budget_and_odd_blocks_equal_alone() {
    // 7-token steps leave little room for drafts next to prefill chunks; 5-token blocks put
    // drafts across block boundaries.
    check(7, 5, 256, 5, 17);
}

#[test]
fn drafts_with_preemption_by_a_tiny_cache_equal_alone() {
    // 20 blocks × 4 tokens for seven sequences of up to 50 tokens: preemptions, and drafts
    // that find no free block.
    let (_, _, preemptions) = check(64, 4, 20, 3, 19);
    assert!(
        preemptions > 0,
        "the tiny cache should have forced a preemption"
    );
}

#[test]
fn a_stop_token_inside_an_accepted_draft_ends_the_request_there() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let prompt = spec_prompts().pop().unwrap();
    let n = 20;
    let (want, _) = alone(&m, &prompt, n);
    let e = EngineHandle::start(m, t, engine_cfg(2048, 16, 256, 4)).unwrap();
    // Without a stop: the reference tokens, and some of them came from accepted drafts.
    let (got, _, _) = e
        .generate_blocking(GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::greedy(prompt.clone(), n)
        })
        .unwrap();
    assert_eq!(got, want);
    assert!(e.metrics().spec_accepted_tokens.load(Ordering::Relaxed) > 0);
    // Each later token as a stop id in turn: output ends at its first occurrence.
    for j in [3, 7, n - 2] {
        let stop = want[j];
        let first = want.iter().position(|&x| x == stop).unwrap();
        let (got, _, c) = e
            .generate_blocking(GenerateRequest {
                ignore_eos: true,
                stop_token_ids: vec![stop],
                ..GenerateRequest::greedy(prompt.clone(), n)
            })
            .unwrap();
        assert_eq!(got, want[..=first], "stop id {stop}");
        assert!(matches!(c.finish_reason, FinishReason::Stop));
        assert_eq!(c.completion_tokens, first + 1);
    }
    wait_blocks_free(&e);
}

#[test]
fn sampled_generation_with_drafts_respects_limits_and_seeds() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let e = EngineHandle::start(m, t, engine_cfg(2048, 16, 256, 4)).unwrap();
    let prompt = spec_prompts().pop().unwrap();
    let run = |seed: u64, max_tokens: usize| {
        let req = GenerateRequest {
            ignore_eos: true,
            sampling: SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                seed: Some(seed),
                ..SamplingParams::default()
            },
            ..GenerateRequest::greedy(prompt.clone(), max_tokens)
        };
        let mut s = e.submit(req).unwrap();
        let mut ids = vec![];
        loop {
            match s.blocking_recv().unwrap() {
                Event::Token(t) => ids.push(t.id),
                Event::Finished(c) => {
                    assert_eq!(c.completion_tokens, ids.len());
                    return ids;
                }
                Event::Error(err) => panic!("{err}"),
            }
        }
    };
    for max_tokens in [1, 2, 5, 13] {
        let a = run(7, max_tokens);
        assert_eq!(a.len(), max_tokens);
        // One request at a time, so the drafts and the draws repeat exactly.
        assert_eq!(run(7, max_tokens), a, "seeded output is reproducible");
    }
    wait_blocks_free(&e);
}

#[test]
fn a_prediction_drafts_for_its_request_without_a_server_config() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let prompt = prompts()[1].clone();
    let n = 24;
    let (want, _) = alone(&m, &prompt, n);
    let mut cfg = engine_cfg(2048, 16, 256, 4);
    cfg.speculative = None;
    let e = EngineHandle::start(m, t, cfg).unwrap();
    let run = |prediction: Option<Vec<u32>>| {
        e.generate_blocking(GenerateRequest {
            ignore_eos: true,
            prediction,
            ..GenerateRequest::greedy(prompt.clone(), n)
        })
        .unwrap()
    };
    // The exact output as the prediction: every draft is accepted, in a few steps.
    let before = e.metrics().steps.load(Ordering::Relaxed);
    let (got, _, c) = run(Some(want.clone()));
    let steps = e.metrics().steps.load(Ordering::Relaxed) - before;
    assert_eq!(got, want);
    assert_eq!(c.draft_tokens, c.accepted_draft_tokens, "{c:?}");
    assert!(c.accepted_draft_tokens >= n - 4, "{c:?}");
    assert!(
        steps <= 5,
        "{steps} steps for {n} tokens with a perfect prediction"
    );
    // An edited prediction (a stretch replaced, the rest shifted): same output, fewer drafts kept.
    let mut edited = want[..8].to_vec();
    edited.extend([1, 2, 3]);
    edited.extend_from_slice(&want[12..]);
    let (got, _, c) = run(Some(edited));
    assert_eq!(got, want);
    assert!(
        c.accepted_draft_tokens > 0 && c.accepted_draft_tokens < c.draft_tokens,
        "{c:?}"
    );
    // Without a prediction nothing is drafted.
    let (got, _, c) = run(None);
    assert_eq!(got, want);
    assert_eq!(c.draft_tokens, 0);
    wait_blocks_free(&e);
}
