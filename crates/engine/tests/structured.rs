//! Structured outputs through the engine, on the tiny random model (whose unconstrained output
//! is noise, so anything well-formed comes from the constraint):
//! - greedy decoding under a choice constraint picks exactly the tokens of an independent
//!   reference: the contiguous forward's argmax over the tokens a brute-force check allows
//!   (those whose text keeps the output a prefix of some choice; EOS once it is one);
//! - sampled outputs always match the regex, parse and validate against the JSON schema, and
//!   end with `stop` where the language ends, also with speculative drafts and `ignore_eos`;
//! - a compiled constraint cloned for several requests advances independently.

use std::sync::Arc;

use serde_json::{json, Value};
use switchyard_engine::engine::{EngineConfig, EngineHandle, Event, GenerateRequest};
use switchyard_engine::sampling::SamplingParams;
use switchyard_engine::speculative::{SpeculativeConfig, SpeculativeMethod};
use switchyard_engine::stop::FinishReason;
use switchyard_engine::structured::OutputConstraint;
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_model::{HyV3Model, Logits};

mod common;

use common::{load, make_model};

fn engine(m: HyV3Model, t: Arc<Tokenizer>, spec: bool) -> EngineHandle {
    let mut cfg = EngineConfig::default();
    cfg.scheduler.max_model_len = 256;
    cfg.kv_cache_memory = Some(8 << 20);
    cfg.speculative = spec.then_some(SpeculativeConfig {
        method: SpeculativeMethod::Ngram,
        num_speculative_tokens: 4,
        prompt_lookup_min: 1,
        prompt_lookup_max: 3,
        disable_by_batch_size: None,
    });
    EngineHandle::start(m, t, cfg).unwrap()
}

/// Runs one request to the end: (ids, text, finish reason).
fn run(e: &EngineHandle, req: GenerateRequest) -> (Vec<u32>, String, FinishReason) {
    let mut s = e.submit(req).unwrap();
    let mut ids = vec![];
    let mut text = String::new();
    loop {
        match s.blocking_recv().unwrap() {
            Event::Token(t) => {
                ids.push(t.id);
                text.push_str(&t.text);
            }
            Event::Finished(c) => {
                text.push_str(&c.text);
                return (ids, text, c.finish_reason);
            }
            Event::Error(err) => panic!("{err}"),
        }
    }
}

const PROMPT: [u32; 7] = [17, 301, 45, 9, 250, 77, 3];

/// The reference: greedy over the contiguous forward, among tokens whose text keeps the
/// output a prefix of one of `choices`; EOS allowed once the output is one. Generation ends
/// at EOS, or without it once EOS is the only token allowed.
fn choice_reference(m: &HyV3Model, tok: &Tokenizer, prompt: &[u32], choices: &[&str]) -> Vec<u32> {
    let vocab = m.config().vocab_size;
    let eos = tok.eos_token_ids()[0];
    let texts: Vec<Option<String>> = (0..vocab as u32)
        .map(|t| {
            if tok.is_special(t) {
                None
            } else {
                tok.decode(&[t], false).ok()
            }
        })
        .collect();
    let mut c = m.new_cache();
    let mut last = m.forward(prompt, &mut c, Logits::Last).unwrap();
    let mut out: Vec<u32> = vec![];
    let mut text = String::new();
    loop {
        let row = last.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let allowed = |t: usize| -> bool {
            if t as u32 == eos {
                return choices.contains(&text.as_str());
            }
            match &texts[t] {
                Some(s) if !s.is_empty() && !s.contains('\u{fffd}') => {
                    let next = format!("{text}{s}");
                    choices.iter().any(|c| c.starts_with(&next))
                }
                _ => false,
            }
        };
        let ok: Vec<usize> = (0..vocab).filter(|&t| allowed(t)).collect();
        if ok == [eos as usize] {
            return out; // complete: nothing but the end is possible, so no step is spent on it
        }
        let best = ok
            .into_iter()
            .fold(None, |b: Option<usize>, t| match b {
                Some(b) if row[b] >= row[t] => Some(b),
                _ => Some(t),
            })
            .expect("some token is allowed");
        out.push(best as u32);
        if best as u32 == eos {
            return out;
        }
        text.push_str(texts[best].as_deref().unwrap());
        last = m.forward(&[best as u32], &mut c, Logits::Last).unwrap();
    }
}

#[test]
fn greedy_choice_equals_a_brute_force_reference() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    // Choices that are prefixes of others make EOS compete with going on.
    let choices = ["alpha", "beta", "gam", "gamma", "gamma delta", "gamut"];
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|k| PROMPT.iter().map(|&x| (x * (k + 1) + k) % 500).collect())
        .collect();
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| choice_reference(&m, &t, p, &choices))
        .collect();
    for spec in [false, true] {
        let (m2, t2) = load(d.path());
        let e = engine(m2, t2, spec);
        let c = e
            .compile_constraint(&OutputConstraint::Choice(
                choices.iter().map(|s| s.to_string()).collect(),
            ))
            .unwrap();
        for (p, want) in prompts.iter().zip(&want) {
            let (ids, text, reason) = run(
                &e,
                GenerateRequest {
                    constraint: Some(c.clone()),
                    ..GenerateRequest::greedy(p.clone(), 40)
                },
            );
            println!("speculative {spec}: {text:?} {ids:?}");
            assert_eq!(&ids, want, "speculative {spec}");
            assert!(choices.contains(&text.as_str()), "{text:?}");
            assert!(matches!(reason, FinishReason::Stop));
        }
    }
}

fn sampled(seed: u64, constraint: switchyard_engine::structured::Constraint) -> GenerateRequest {
    GenerateRequest {
        constraint: Some(constraint),
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        ..GenerateRequest::greedy(PROMPT.to_vec(), 120)
    }
}

#[test]
fn sampled_outputs_stay_in_the_language() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let re = regex::Regex::new(r"^[a-z]{2,5}@[a-z]{3}\.(com|org)$").unwrap();
    for spec in [false, true] {
        let (m, t) = load(d.path());
        let e = engine(m, t, spec);
        let rx = e
            .compile_constraint(&OutputConstraint::Regex(
                r"[a-z]{2,5}@[a-z]{3}\.(com|org)".into(),
            ))
            .unwrap();
        let schema = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "tier": {"enum": ["local", "frontier"]},
                "ok": {"type": "boolean"}
            },
            "required": ["name", "age", "tier", "ok"],
            "additionalProperties": false
        });
        let js = e
            .compile_constraint(&OutputConstraint::JsonSchema(schema))
            .unwrap();
        for seed in 0..6 {
            let (_, text, reason) = run(&e, sampled(seed, rx.clone()));
            assert!(re.is_match(&text), "regex output {text:?}");
            assert!(matches!(reason, FinishReason::Stop));
            // The schema's output, with `ignore_eos` too: it still ends where the JSON does.
            let mut req = sampled(seed, js.clone());
            req.ignore_eos = seed % 2 == 1;
            let (_, text, reason) = run(&e, req);
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|err| panic!("{text:?}: {err}"));
            let o = v.as_object().expect("an object");
            assert_eq!(o.len(), 4, "{text}");
            assert!(
                o["name"].as_str().is_some_and(|s| s.chars().count() <= 8),
                "{text}"
            );
            assert!(o["age"].as_u64().is_some_and(|a| a <= 120), "{text}");
            assert!(o["tier"] == "local" || o["tier"] == "frontier", "{text}");
            assert!(o["ok"].is_boolean(), "{text}");
            assert!(matches!(reason, FinishReason::Stop), "{reason:?}");
            println!("speculative {spec} seed {seed}: {text}");
        }
        let any = e.compile_constraint(&OutputConstraint::JsonObject).unwrap();
        let (_, text, _) = run(&e, sampled(1, any));
        // Any object, but a random model may run out of tokens inside it: then the text is a
        // prefix of an object, never something else.
        assert!(text.starts_with('{'), "{text:?}");
    }
}

/// Text the grammar forces is proposed as drafts and checked in one step ("jump-forward"):
/// the output still equals the brute-force reference, in fewer steps than tokens.
#[test]
fn forced_text_is_drafted_and_still_exact() {
    use std::sync::atomic::Ordering;
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let choices = [
        "the quick brown fox jumps over",
        "the quick brown fox sleeps under",
    ];
    let want = choice_reference(&m, &t, &PROMPT, &choices);
    let (m2, t2) = load(d.path());
    let e = engine(m2, t2, false);
    let c = e
        .compile_constraint(&OutputConstraint::Choice(
            choices.iter().map(|s| s.to_string()).collect(),
        ))
        .unwrap();
    let steps0 = e.metrics().steps.load(Ordering::Relaxed);
    let (ids, text, _) = run(
        &e,
        GenerateRequest {
            constraint: Some(c),
            ..GenerateRequest::greedy(PROMPT.to_vec(), 60)
        },
    );
    let steps = e.metrics().steps.load(Ordering::Relaxed) - steps0;
    let accepted = e.metrics().spec_accepted_tokens.load(Ordering::Relaxed);
    println!(
        "{text:?}: {} tokens in {steps} steps, {accepted} forced drafts accepted",
        ids.len()
    );
    assert_eq!(ids, want);
    assert!(accepted > 0, "forced text was not drafted");
    assert!(
        (steps as usize) < ids.len(),
        "{steps} steps for {} tokens",
        ids.len()
    );
}
