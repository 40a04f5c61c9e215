//! Fits the difficulty model on the RouteLLM train split and writes the artifact
//! (`models/router/difficulty.safetensors` by default). Prints the train (out-of-fold) APGR
//! that chose the hyper-parameters, then the test APGR for information.
//!
//! `cargo run -p switchyard-classifier --example fit_difficulty -- [--pca N] [--out FILE]
//!  [--data DIR] [--cache FILE]`

use std::path::PathBuf;
use std::time::Instant;

use switchyard_classifier::cache::embed_cached;
use switchyard_classifier::difficulty::{fit, FitConfig};
use switchyard_classifier::route_eval::evaluate_routellm;
use switchyard_classifier::routellm::{self, Sample, Split};
use switchyard_classifier::Embedder;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut data = root.join("../shared/data/routellm");
    let mut cache = root.join(".cache/routellm-minilm.safetensors");
    let mut out = root.join("models/router/difficulty.safetensors");
    let mut cfg = FitConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--pca" => cfg.pca_dim = val()?.parse()?,
            "--out" => out = PathBuf::from(val()?),
            "--data" => data = PathBuf::from(val()?),
            "--cache" => cache = PathBuf::from(val()?),
            "--ks" => {
                cfg.ks = val()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--l2s" => {
                cfg.l2s = val()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let benches = routellm::load(&data)?;
    let e = Embedder::from_spec(None)?;
    let mut parts = Vec::new();
    for b in &benches {
        let samples: Vec<&Sample> = b.split(Split::Train);
        let names: Vec<&str> = vec![b.name.as_str(); samples.len()];
        let texts: Vec<&str> = samples.iter().map(|s| s.prompt.as_str()).collect();
        let t0 = Instant::now();
        let embs = embed_cached(&e, &texts, &cache, |d, t| {
            if d % 1024 == 0 || d == t {
                eprintln!("embedded {d}/{t}");
            }
        })?;
        eprintln!(
            "{}: {} train embeddings ready in {:.1}s",
            b.name,
            embs.len(),
            t0.elapsed().as_secs_f64()
        );
        let t1 = Instant::now();
        let (part, report) = fit(&embs, &samples, &names, &cfg)?;
        eprintln!(
            "{}: fitted in {:.1}s: {:?}",
            b.name,
            t1.elapsed().as_secs_f64(),
            part.info()
        );
        let mut grid = report.grid.clone();
        grid.sort_by(|a, b| b.3.total_cmp(&a.3));
        for g in grid.iter().take(5) {
            eprintln!(
                "  k {:>3} l2 {:>5} alpha {:.1}: train APGR {:.4}",
                g.0, g.1, g.2, g.3
            );
        }
        parts.push((b.name.clone(), part));
    }
    let model = switchyard_classifier::DifficultyModel::new(parts)?;
    model.save(&out)?;
    eprintln!(
        "wrote {} ({} bytes)",
        out.display(),
        std::fs::metadata(&out)?.len()
    );
    let back = switchyard_classifier::DifficultyModel::load(&out)?;
    for split in [Split::Train, Split::Test] {
        let s = evaluate_routellm(&data, split, &e, &back, Some(&cache), |_, _| {})?;
        println!("{split:?}: {}", serde_json::to_string(&s.apgr)?);
    }
    Ok(())
}
