//! Fills the RouteLLM embedding cache (`.cache/routellm-minilm.safetensors` in the repo root,
//! ignored by git) so fitting and `route-eval` start from it.
//!
//! `cargo run -p switchyard-classifier --example embed_routellm [-- DATA_DIR [CACHE_FILE]]`

use std::path::PathBuf;
use std::time::Instant;

use switchyard_classifier::{cache::embed_cached, routellm, Embedder};

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut args = std::env::args().skip(1);
    let data = args
        .next()
        .map_or_else(|| root.join("../shared/data/routellm"), PathBuf::from);
    let cache = args.next().map_or_else(
        || root.join(".cache/routellm-minilm.safetensors"),
        PathBuf::from,
    );
    let benches = routellm::load(&data)?;
    let texts: Vec<&str> = benches
        .iter()
        .flat_map(|b| b.samples.iter().map(|s| s.prompt.as_str()))
        .collect();
    let e = Embedder::from_spec(None)?;
    let t0 = Instant::now();
    let mut last = Instant::now();
    let out = embed_cached(&e, &texts, &cache, |done, todo| {
        if last.elapsed().as_secs() >= 10 || done == todo {
            last = Instant::now();
            eprintln!(
                "{done}/{todo} embedded ({:.1} prompts/s)",
                done as f64 / t0.elapsed().as_secs_f64()
            );
        }
    })?;
    eprintln!(
        "{} embeddings in {} ({:.1}s)",
        out.len(),
        cache.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
