//! MiniLM embeddings against transformers' (scripts/minilm_reference.py).

mod common;

use serde::Deserialize;
use switchyard_classifier::{cosine, dot};

#[derive(Deserialize)]
struct Reference {
    max_tokens: usize,
    sentences: Vec<String>,
    token_counts: Vec<usize>,
    embeddings: Vec<Vec<f32>>,
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/minilm_reference.json"),
    )
    .expect("fixture");
    serde_json::from_str(&text).expect("fixture parses")
}

#[test]
fn matches_transformers_one_by_one_and_batched() {
    let r = reference();
    // The fixture was made at sentence-transformers' limit (256 tokens, its last sentence is
    // that long), which also checks the encoder past the default limit of 128.
    let e = switchyard_classifier::Embedder::load(&common::minilm_dir())
        .and_then(|e| e.with_max_tokens(r.max_tokens))
        .expect("load MiniLM");
    assert_eq!(e.max_tokens(), r.max_tokens);
    assert_eq!(e.dim(), 384);
    let texts: Vec<&str> = r.sentences.iter().map(String::as_str).collect();
    let batched = e.embed_batch(&texts).expect("batch");
    let mut worst = 1.0f32;
    for (i, s) in r.sentences.iter().enumerate() {
        assert_eq!(
            e.tokenize(s).unwrap().len(),
            r.token_counts[i],
            "tokens of {s:?}"
        );
        let one = e.embed(s).expect("embed");
        assert!((dot(&one, &one) - 1.0).abs() < 1e-4, "unit length");
        let c1 = cosine(&one, &r.embeddings[i]);
        let c2 = cosine(&batched[i], &r.embeddings[i]);
        assert!(c1 >= 0.999, "sentence {i} {s:?}: cosine {c1}");
        assert!(
            c2 >= 0.999,
            "sentence {i} {s:?} (batched with padding): cosine {c2}"
        );
        worst = worst.min(c1).min(c2);
    }
    eprintln!("worst cosine vs transformers: {worst:.6}");
}

#[test]
fn similar_prompts_are_closer_than_unrelated_ones() {
    let e = common::embedder();
    let a = e.embed("Translate this sentence into French.").unwrap();
    let b = e
        .embed("Please translate the following text to French.")
        .unwrap();
    let c = e
        .embed("My kubernetes pod keeps crashing with OOMKilled.")
        .unwrap();
    assert!(dot(&a, &b) > dot(&a, &c) + 0.3);
}

#[test]
fn empty_batch_and_odd_input_do_not_panic() {
    let e = common::embedder();
    assert!(e.embed_batch(&[]).unwrap().is_empty());
    let long = "word ".repeat(5_000);
    assert_eq!(
        e.tokenize(&long).unwrap().len(),
        switchyard_classifier::MAX_TOKENS
    );
    let v = e.embed(&long).unwrap();
    assert_eq!(v.len(), 384);
    assert!(v.iter().all(|x| x.is_finite()));
    let v = e.embed("\u{0}\u{feff}\u{200b}").unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
}
