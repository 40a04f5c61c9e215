//! vLLM's output controls in the engine: `stop_token_ids` end the output before the token's
//! text, and `min_tokens` keeps every stop token id (end-of-sequence included) out of the first
//! tokens. The reference is the contiguous-cache forward with an argmax that skips the held
//! ids, computed here step by step, independently of the engine's sampler and mask code.

mod common;

use std::collections::HashSet;

use switchyard_engine::engine::{EngineHandle, Event, GenerateRequest};
use switchyard_engine::speculative::SpeculativeConfig;
use switchyard_engine::stop::{FinishReason, StopMatch};
use switchyard_model::{HyV3Model, Logits};

/// Greedy contiguous generation of `n` tokens where the first `hold` steps skip `held` ids.
fn reference(
    m: &HyV3Model,
    prompt: &[u32],
    n: usize,
    held: &HashSet<u32>,
    hold: usize,
) -> Vec<u32> {
    let mut c = m.new_cache();
    let mut last = m.forward(prompt, &mut c, Logits::Last).unwrap();
    let mut ids = vec![];
    for step in 0..n {
        let row = last.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let best = (0..row.len())
            .filter(|&i| step >= hold || !held.contains(&(i as u32)))
            .fold(None, |b: Option<usize>, i| match b {
                Some(b) if row[b] >= row[i] => Some(b),
                _ => Some(i),
            })
            .unwrap();
        ids.push(best as u32);
        last = m.forward(&[best as u32], &mut c, Logits::Last).unwrap();
    }
    ids
}

/// Runs `req` to the end: its tokens, text and how it finished.
fn run(
    e: &EngineHandle,
    req: GenerateRequest,
) -> (Vec<u32>, String, FinishReason, Option<StopMatch>) {
    let mut s = e.submit(req).unwrap();
    let (mut ids, mut text) = (vec![], String::new());
    loop {
        match s.blocking_recv().unwrap() {
            Event::Token(t) => {
                ids.push(t.id);
                text.push_str(&t.text);
            }
            Event::Finished(c) => return (ids, text, c.finish_reason, c.stop),
            Event::Error(err) => panic!("{err}"),
        }
    }
}

/// A prompt that repeats itself, so prompt-lookup drafts find matches.
fn prompt() -> Vec<u32> {
    let base: Vec<u32> = (0..12).map(|i| (i * 41 + 13) % 500).collect();
    [base.clone(), base.clone(), base[..6].to_vec()].concat()
}

fn check(speculative: Option<SpeculativeConfig>) {
    let dir = tempfile::tempdir().unwrap();
    common::make_model(dir.path(), 128);
    let (m, tok) = common::load(dir.path());
    let mut cfg = common::engine_cfg(64, 16, None);
    cfg.speculative = speculative;
    let e = EngineHandle::start(common::load(dir.path()).0, tok.clone(), cfg).unwrap();
    let p = prompt();
    let eos: HashSet<u32> = tok.eos_token_ids().iter().copied().collect();
    let free = reference(&m, &p, 20, &HashSet::new(), 0);
    // A stop id: the first generated token that did not occur before it, at step 2 or later.
    let at = (2..free.len())
        .find(|&i| !free[..i].contains(&free[i]) && !eos.contains(&free[i]))
        .expect("a fresh token in the greedy output");
    let stop_id = free[at];

    // stop_token_ids: the output ends with the stop token, whose text is left out.
    let (ids, text, finish, stop) = run(
        &e,
        GenerateRequest {
            stop_token_ids: vec![stop_id],
            ignore_eos: true,
            ..GenerateRequest::greedy(p.clone(), 20)
        },
    );
    assert_eq!(ids, free[..=at], "stops at the stop id");
    // Its text is that of the tokens before it, as a length limit there would end it.
    let (_, cut_text, _, _) = run(
        &e,
        GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::greedy(p.clone(), at)
        },
    );
    assert_eq!(text, cut_text);
    assert_eq!(finish, FinishReason::Stop);
    assert_eq!(stop, Some(StopMatch::Token(stop_id)));

    // min_tokens: neither the stop id nor eos in the first `min` tokens.
    let mins: std::collections::BTreeSet<usize> = [1, at / 2, at + 1, at + 4, 20]
        .into_iter()
        .map(|m| m.clamp(1, 20))
        .collect();
    for min in mins {
        let mut held = eos.clone();
        held.insert(stop_id);
        let want = reference(&m, &p, 20, &held, min);
        let hit = (min..want.len()).find(|&i| held.contains(&want[i]));
        let end = hit.map_or(want.len(), |i| i + 1);
        let (ids, _, finish, stop) = run(
            &e,
            GenerateRequest {
                stop_token_ids: vec![stop_id],
                min_tokens: min,
                ..GenerateRequest::greedy(p.clone(), 20)
            },
        );
        assert_eq!(ids, want[..end], "min_tokens {min}");
        assert!(ids.len() >= min, "min_tokens {min}: {} tokens", ids.len());
        assert!(
            ids[..min].iter().all(|t| !held.contains(t)),
            "min_tokens {min}: a stop id was generated early"
        );
        if hit.is_some() {
            assert_eq!(finish, FinishReason::Stop);
            assert_eq!(stop, Some(StopMatch::Token(want[end - 1])));
        } else {
            assert_eq!(finish, FinishReason::Length);
        }
    }
}

#[test]
fn stop_token_ids_and_min_tokens_follow_the_reference() {
    check(None);
}

#[test]
fn stop_token_ids_and_min_tokens_hold_with_drafts() {
    check(Some(
        SpeculativeConfig::parse_json(
            r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}"#,
        )
        .unwrap(),
    ));
}

#[test]
fn min_tokens_beyond_max_tokens_and_unknown_stop_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    common::make_model(dir.path(), 128);
    let (m, tok) = common::load(dir.path());
    let e = EngineHandle::start(m, tok, common::engine_cfg(64, 16, None)).unwrap();
    let err = e
        .submit(GenerateRequest {
            min_tokens: 9,
            ..GenerateRequest::greedy(vec![1, 2, 3], 8)
        })
        .err()
        .expect("refused");
    assert!(err.to_string().contains("min_tokens (9)"), "{err}");
    let err = e
        .submit(GenerateRequest {
            stop_token_ids: vec![1 << 30],
            ..GenerateRequest::greedy(vec![1, 2, 3], 8)
        })
        .err()
        .expect("refused");
    assert!(err.to_string().contains("stop_token_ids"), "{err}");
}
