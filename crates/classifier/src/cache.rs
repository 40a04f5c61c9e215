//! An embedding cache on disk, so fitting and evaluating over the ~15K RouteLLM prompts embeds
//! each prompt once. One safetensors file: `digests` `[N, 32]` u8 and `embeddings` `[N, D]`
//! f32. Texts missing from it are embedded and the file is rewritten (to a temporary name, then
//! renamed, so a killed run leaves the old file).
//!
//! The key is `sha256(text)` for a text shorter than the embedder's truncation limit (its
//! embedding does not depend on the limit), and `sha256(text ‖ "\0max_tokens=N")` for one the
//! limit cuts, so changing [`crate::MAX_TOKENS`] re-embeds exactly the texts it affects.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

use crate::embed::Embedder;
use crate::error::{ClassifierError, Result};

type Key = [u8; 32];

fn key(embedder: &Embedder, text: &str) -> Result<Key> {
    let mut h = Sha256::new();
    h.update(text.as_bytes());
    if embedder.tokenize(text)?.len() >= embedder.max_tokens() {
        h.update(format!("\0max_tokens={}", embedder.max_tokens()).as_bytes());
    }
    Ok(h.finalize().into())
}

fn read(path: &Path) -> Result<(usize, HashMap<Key, Vec<f32>>)> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| ClassifierError::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| ClassifierError::data(&shown, e.to_string()))?;
    let d = st
        .tensor("digests")
        .map_err(|e| ClassifierError::data(&shown, e.to_string()))?;
    let e = st
        .tensor("embeddings")
        .map_err(|e| ClassifierError::data(&shown, e.to_string()))?;
    let (n, dim) = match (d.shape(), e.shape()) {
        ([n, 32], [m, dim]) if n == m && e.dtype() == Dtype::F32 => (*n, *dim),
        _ => return Err(ClassifierError::data(&shown, "unexpected tensor shapes")),
    };
    let floats: Vec<f32> = e
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut map = HashMap::with_capacity(n);
    for i in 0..n {
        let mut k = [0u8; 32];
        k.copy_from_slice(&d.data()[i * 32..(i + 1) * 32]);
        map.insert(k, floats[i * dim..(i + 1) * dim].to_vec());
    }
    Ok((dim, map))
}

fn write(path: &Path, dim: usize, map: &HashMap<Key, Vec<f32>>) -> Result<()> {
    let mut keys: Vec<&Key> = map.keys().collect();
    keys.sort();
    let digests: Vec<u8> = keys.iter().flat_map(|k| k.iter().copied()).collect();
    let emb: Vec<u8> = keys
        .iter()
        .flat_map(|k| map[*k].iter().flat_map(|x| x.to_le_bytes()))
        .collect();
    let shown = path.display().to_string();
    let bad = |e: safetensors::SafeTensorError| ClassifierError::data(&shown, e.to_string());
    let views = vec![
        (
            "digests",
            TensorView::new(Dtype::U8, vec![keys.len(), 32], &digests).map_err(bad)?,
        ),
        (
            "embeddings",
            TensorView::new(Dtype::F32, vec![keys.len(), dim], &emb).map_err(bad)?,
        ),
    ];
    let bytes = safetensors::serialize(views, None).map_err(bad)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ClassifierError::io(parent, e))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| ClassifierError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ClassifierError::io(path, e))
}

/// Embeddings of `texts` (in order), read from `path` where present; the rest are embedded
/// and added to the file. `progress(done, todo)` is called as new texts are embedded.
pub fn embed_cached(
    embedder: &Embedder,
    texts: &[&str],
    path: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<f32>>> {
    let (mut map, stale) = if path.is_file() {
        match read(path) {
            Ok((dim, map)) if dim == embedder.dim() => (map, false),
            Ok(_) => (HashMap::new(), true),
            Err(e) => {
                tracing::warn!("ignoring unreadable embedding cache: {e}");
                (HashMap::new(), true)
            }
        }
    } else {
        (HashMap::new(), false)
    };
    let keys = texts
        .iter()
        .map(|t| key(embedder, t))
        .collect::<Result<Vec<_>>>()?;
    let mut missing: Vec<(&str, Key)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (t, k) in texts.iter().zip(&keys) {
        if !map.contains_key(k) && seen.insert(*k) {
            missing.push((t, *k));
        }
    }
    if !missing.is_empty() || stale {
        // Saved every CHUNK texts, so an interrupted run resumes where it stopped.
        const CHUNK: usize = 1024;
        let todo = missing.len();
        let mut done = 0;
        for chunk in missing.chunks(CHUNK) {
            let chunk_texts: Vec<&str> = chunk.iter().map(|(t, _)| *t).collect();
            let embs = embedder.embed_batch_with(&chunk_texts, |d| progress(done + d, todo))?;
            for ((_, k), e) in chunk.iter().zip(embs) {
                map.insert(*k, e);
            }
            done += chunk.len();
            write(path, embedder.dim(), &map)?;
        }
        if todo == 0 {
            write(path, embedder.dim(), &map)?;
        }
    }
    keys.iter()
        .map(|k| {
            map.get(k)
                .cloned()
                .ok_or_else(|| ClassifierError::Input("embedding missing from cache".into()))
        })
        .collect()
}
