//! MTP drafts (`--speculative-config '{"method": "mtp", "num_speculative_tokens": 1}'`): the
//! model's MTP layer runs after every step and its prediction of the token after next is the
//! next step's draft.
//!
//! - With the random MTP layer of the tiny test model, greedy output and every position's
//!   logits equal the sequence run alone (contiguous cache, no drafts), also with small step
//!   budgets, odd block sizes and a cache small enough to force preemption.
//! - With MTP layers built so that their drafts are known without running them, the drafted
//!   and accepted counts of every request must equal a walk along the plain greedy output with
//!   the engine's rules (one draft per step once the prompt is done, none for the last token,
//!   an accepted draft adds a bonus token). The block's outputs are zeroed, so the layer
//!   passes `eh_proj`'s output to `lm_head`:
//!   - `eh_proj = [0 | I]` passes `hnorm(h[p])`: the main model's own prediction at `p`, so
//!     the draft for token `L` is token `L − 1` (checks the hidden rows and positions);
//!   - `eh_proj = [I | 0]` with `lm_head` tied to the embedding passes `enorm(embed(t[p+1]))`:
//!     the draft is the token whose embedding is most like token `L − 1`'s, computed here from
//!     the embedding matrix (checks the next tokens the engine feeds).
//!
//!   An off-by-one in any of them changes the drafts, and so the counts.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use switchyard_engine::engine::{EngineConfig, EngineHandle};
use switchyard_engine::speculative::{SpeculativeConfig, SpeculativeMethod};
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_model::{HyV3Model, LoadOptions};

mod common;

use common::{alone, max_logit_diff, prompts, together_completions};

/// What the tiny model's MTP layer is (see the module docs).
#[derive(Clone, Copy, PartialEq)]
enum Mtp {
    /// As drawn: random.
    Random,
    /// Drafts token `L − 1` through the hidden-state path.
    PreviousByHidden,
    /// Drafts the token most like token `L − 1` through the token path.
    LikeNextToken,
}

/// The tiny preset with one MTP layer (seed 5: the same main weights as the other engine
/// tests' model), its MTP layer rewritten as `kind` says.
fn make_mtp_model(dir: &Path, kind: Mtp) {
    let mut cfg = switchyard_model::presets::preset("tiny").unwrap();
    cfg.max_position_embeddings = 4096;
    cfg.num_mtp_layers = 1;
    switchyard_model::test_model::write_random_checkpoint(&cfg, dir, 5, DType::F32).unwrap();
    let tok =
        switchyard_engine::tokenizer::build_byte_level_bpe(cfg.vocab_size, &["<|endoftext|>"])
            .unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    if kind == Mtp::Random {
        return;
    }
    let path = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let p = format!("model.layers.{}", cfg.num_hidden_layers);
    let h = cfg.hidden_size;
    let dev = &Device::Cpu;
    let (eye, zeros) = (
        Tensor::eye(h, DType::F32, dev).unwrap(),
        Tensor::zeros((h, h), DType::F32, dev).unwrap(),
    );
    let eh = match kind {
        Mtp::PreviousByHidden => [zeros, eye],
        _ => {
            let e = t["model.embed_tokens.weight"].clone();
            t.insert("lm_head.weight".into(), e);
            [eye, zeros]
        }
    };
    t.insert(format!("{p}.eh_proj.weight"), Tensor::cat(&eh, 1).unwrap());
    // Norm weights of 1: positive rescalings, which leave lm_head's argmax where it was.
    for n in ["enorm", "hnorm", "final_layernorm"] {
        t.insert(
            format!("{p}.{n}.weight"),
            Tensor::ones(h, DType::F32, dev).unwrap(),
        );
    }
    // The block adds nothing to its residual stream: attention and both MLP outputs are 0.
    for n in [
        "self_attn.o_proj.weight",
        "mlp.experts.down_proj",
        "mlp.shared_experts.down_proj.weight",
    ] {
        let k = format!("{p}.{n}");
        let z = t[&k].zeros_like().unwrap();
        t.insert(k, z);
    }
    candle_core::safetensors::save(&t, &path).unwrap();
}

/// The draft for the token after `prev` of an [`Mtp::LikeNextToken`] layer: the token whose
/// embedding row has the largest dot product with `prev`'s (lm_head is the embedding).
fn like(embed: &[Vec<f32>], prev: u32) -> u32 {
    let e = &embed[prev as usize];
    let dot = |r: &Vec<f32>| {
        r.iter()
            .zip(e)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum::<f64>()
    };
    let mut best = 0;
    for j in 1..embed.len() {
        if dot(&embed[j]) > dot(&embed[best]) {
            best = j;
        }
    }
    best as u32
}

fn load_mtp(dir: &Path) -> (HyV3Model, Arc<Tokenizer>) {
    let opts = LoadOptions {
        load_mtp: true,
        ..Default::default()
    };
    let m = HyV3Model::load_dir(dir, &opts).unwrap();
    (m, Arc::new(Tokenizer::from_dir(dir).unwrap()))
}

fn mtp_cfg(budget: usize, block: usize, blocks: usize, k: usize) -> EngineConfig {
    EngineConfig {
        speculative: Some(SpeculativeConfig {
            method: SpeculativeMethod::Mtp,
            num_speculative_tokens: k,
            prompt_lookup_min: 2,
            prompt_lookup_max: 4,
            disable_by_batch_size: None,
        }),
        ..common::engine_cfg(budget, block, Some(blocks))
    }
}

/// Drafts and accepted drafts for a request whose greedy output is `out` (`n` tokens) when the
/// drafts after token `p` are `chain(p)` (up to `k` of them, as many as fit before the
/// request's last token), accepted while they match.
fn walk(out: &[u32], k: usize, chain: impl Fn(u32) -> u32) -> (usize, usize) {
    let n = out.len();
    let (mut g, mut drafted, mut accepted) = (1, 0, 0);
    while g < n {
        // `g` tokens out; the step makes one token after its accepted drafts.
        let room = (n - g - 1).min(k);
        let mut a = 0;
        let mut d = out[g - 1];
        for j in 0..room {
            d = chain(d);
            if out[g + j] != d {
                break;
            }
            a += 1;
        }
        drafted += room;
        accepted += a;
        g += a + 1;
    }
    (drafted, accepted)
}

fn check(
    kind: Mtp,
    k: usize,
    budget: usize,
    block: usize,
    blocks: usize,
    n: usize,
) -> (usize, usize, u32) {
    let d = tempfile::tempdir().unwrap();
    make_mtp_model(d.path(), kind);
    let (m, t) = load_mtp(d.path());
    let embed: Vec<Vec<f32>> =
        candle_core::safetensors::load(d.path().join("model.safetensors"), &Device::Cpu).unwrap()
            ["model.embed_tokens.weight"]
            .to_vec2()
            .unwrap();
    let ps = prompts();
    let want: Vec<_> = ps.iter().map(|p| alone(&m, p, n)).collect();
    let e = EngineHandle::start(m, t, mtp_cfg(budget, block, blocks, k)).unwrap();
    let got = together_completions(&e, &ps, n);
    let (mut drafted, mut accepted, mut preempted) = (0, 0, 0);
    for (i, ((ids, rows, c), (wi, wr))) in got.iter().zip(&want).enumerate() {
        let (dr, ac, pre) = (&c.draft_tokens, &c.accepted_draft_tokens, &c.preemptions);
        assert_eq!(ids, wi, "sequence {i}: tokens differ with MTP drafts");
        let worst = max_logit_diff(rows, wr);
        assert!(worst <= 1e-5, "sequence {i}: logits differ by {worst}");
        // Exact with room in the cache and the step budget: a tight cache drops drafts that
        // find no free block and preempts, and a small budget can leave the last prompt token
        // to a step of its own, which then carries a draft for the first output token too.
        let expected = match kind {
            Mtp::Random => None,
            Mtp::PreviousByHidden => Some(walk(wi, k, |t| t)),
            Mtp::LikeNextToken => Some(walk(wi, k, |t| like(&embed, t))),
        };
        if let Some(x) = expected.filter(|_| blocks >= 256 && budget >= 2048) {
            assert_eq!(
                (*dr, *ac),
                x,
                "sequence {i}: drafted/accepted vs the walk of {wi:?}"
            );
        }
        drafted += dr;
        accepted += ac;
        preempted += pre;
    }
    println!(
        "{}: k {k} budget {budget} block {block} blocks {blocks}: drafted {drafted}, accepted \
         {accepted}, preemptions {preempted}",
        match kind {
            Mtp::Random => "random",
            Mtp::PreviousByHidden => "previous token by hidden state",
            Mtp::LikeNextToken => "like the next token",
        }
    );
    assert!(drafted > 0, "no MTP drafts were made");
    (drafted, accepted, preempted)
}

#[test]
fn random_mtp_drafts_leave_greedy_output_unchanged() {
    check(Mtp::Random, 1, 2048, 16, 256, 24);
    // 7-token steps: prefill chunks end mid-prompt, and the MTP layer runs on each chunk.
    check(Mtp::Random, 1, 7, 5, 256, 17);
    // Chained drafts, across block boundaries.
    check(Mtp::Random, 3, 2048, 4, 256, 24);
}

#[test]
fn known_drafts_are_made_and_accepted_where_the_walk_says() {
    for kind in [Mtp::PreviousByHidden, Mtp::LikeNextToken] {
        let (_, accepted, _) = check(kind, 1, 2048, 16, 256, 40);
        assert!(accepted > 0, "the walk should find drafts to accept");
        check(kind, 1, 7, 5, 256, 23);
    }
}

/// Several drafts per step from one MTP layer: the layer fed its own output at the next
/// position (the hidden path keeps predicting the previous token; the token path follows the
/// most-similar-embedding chain), with 4-token blocks so chains cross block ends.
#[test]
fn chained_drafts_follow_the_walk() {
    for kind in [Mtp::PreviousByHidden, Mtp::LikeNextToken] {
        for k in [2, 4] {
            let (_, accepted, _) = check(kind, k, 2048, 4, 256, 40);
            assert!(accepted > 0);
        }
    }
}

#[test]
fn mtp_drafts_with_preemption_equal_alone() {
    let (_, _, preemptions) = check(Mtp::PreviousByHidden, 1, 64, 4, 18, 19);
    assert!(
        preemptions > 0,
        "the tiny cache should have forced a preemption"
    );
    check(Mtp::LikeNextToken, 3, 64, 4, 18, 19);
}

/// `disable_by_batch_size`: with the batch at or above it nothing is drafted (the MTP layer
/// still keeps its KV), and the output is unchanged.
#[test]
fn no_drafts_at_or_above_disable_by_batch_size() {
    let d = tempfile::tempdir().unwrap();
    make_mtp_model(d.path(), Mtp::PreviousByHidden);
    let (m, t) = load_mtp(d.path());
    let ps = prompts();
    let n = 12;
    let want: Vec<_> = ps.iter().map(|p| alone(&m, p, n).0).collect();
    let mut cfg = mtp_cfg(2048, 16, 256, 1);
    if let Some(c) = cfg.speculative.as_mut() {
        c.disable_by_batch_size = Some(2);
    }
    let e = EngineHandle::start(m, t, cfg).unwrap();
    let got = together_completions(&e, &ps, n);
    for ((ids, _, c), w) in got.iter().zip(&want) {
        assert_eq!(ids, w);
        assert_eq!(
            c.draft_tokens,
            0,
            "drafted with {} requests running",
            ps.len()
        );
    }
}

#[test]
fn mtp_needs_the_layer_loaded() {
    let d = tempfile::tempdir().unwrap();
    make_mtp_model(d.path(), Mtp::Random);
    let (m, t) = common::load(d.path());
    let Err(e) = EngineHandle::start(m, t, mtp_cfg(2048, 16, 64, 1)) else {
        panic!("an engine with MTP drafts started without the MTP layer");
    };
    assert!(e.contains("MTP layer"), "{e}");
    let bad = SpeculativeConfig::parse_json(r#"{"method": "mtp", "num_speculative_tokens": 17}"#)
        .unwrap_err()
        .to_string();
    assert!(bad.contains("num_speculative_tokens"), "{bad}");
    SpeculativeConfig::parse_json(r#"{"method": "mtp", "num_speculative_tokens": 1}"#).unwrap();
}
