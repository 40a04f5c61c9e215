//! Sentence embeddings: all-MiniLM-L6-v2 as sentence-transformers runs it — WordPiece
//! tokens (lower-cased, `[CLS] … [SEP]`, truncated at [`MAX_TOKENS`] = 128), the 6-layer BERT
//! encoder, mean pooling over the attention mask, L2 normalisation. 384 dimensions.
//!
//! The model is a local folder (`config.json`, `model.safetensors`, `tokenizer.json`), found
//! by [`locate_minilm`]: env `SWITCHYARD_MINILM_DIR`, else the folder `scripts/minilm.sh`
//! unpacks into (`${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/all-MiniLM-L6-v2`), else the
//! hub id `sentence-transformers/all-MiniLM-L6-v2` in the hf-hub cache.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use tokenizers::{Tokenizer, TruncationParams};

use crate::bert::{cpu, mean_pool_normalize, Bert, BertConfig};
use crate::error::{ClassifierError, Result};

/// The hub id of the embedding model.
pub const MINILM_HUB_ID: &str = "sentence-transformers/all-MiniLM-L6-v2";
/// Env var naming a local model folder.
pub const MINILM_DIR_ENV: &str = "SWITCHYARD_MINILM_DIR";
/// The folder name `scripts/minilm.sh` unpacks into, under the cache.
pub const MINILM_CACHE_NAME: &str = "all-MiniLM-L6-v2";
/// Inputs are truncated to this many tokens (special tokens included). The model was trained on
/// sequences of at most 128 word pieces and its tokenizer.json says 128; sentence-transformers
/// raises its `max_seq_length` to 256, but past 128 the forward pass costs more than a routing
/// decision may (a 256-token prompt took 50 ms of CPU, a 128-token one 22 ms) for positions the
/// model never saw in training. The difficulty model is fitted on embeddings made with this
/// limit (21% of the MMLU prompts are longer).
pub const MAX_TOKENS: usize = 128;
/// Characters kept per token of the truncation limit before tokenizing (8K for 128 tokens).
/// Only a text whose first `MAX_TOKENS` tokens span more than that — runs of whitespace, or
/// "words" over 100 characters, which WordPiece turns into one `[UNK]` each — embeds
/// differently than it would uncut.
pub const CHARS_PER_TOKEN: usize = 64;
/// Texts embedded per forward pass by [`Embedder::embed_batch`]: past 32, padding waste and
/// memory grow faster than the per-call overhead shrinks on a 2-core host.
pub const BATCH: usize = 32;

/// `${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}`.
pub fn cache_root() -> PathBuf {
    if let Some(c) = std::env::var_os("SWITCHYARD_CACHE").filter(|c| !c.is_empty()) {
        return PathBuf::from(c);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("switchyard")
}

fn is_model_dir(p: &Path) -> bool {
    ["config.json", "model.safetensors", "tokenizer.json"]
        .iter()
        .all(|f| p.join(f).is_file())
}

/// Finds the MiniLM folder: `$SWITCHYARD_MINILM_DIR`, the `scripts/minilm.sh` cache folder,
/// or the hf-hub cache. Never downloads.
pub fn locate_minilm() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os(MINILM_DIR_ENV).filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        return if is_model_dir(&d) {
            Ok(d)
        } else {
            Err(ClassifierError::ModelNotFound(format!(
                "{MINILM_DIR_ENV}={} lacks config.json, model.safetensors or tokenizer.json",
                d.display()
            )))
        };
    }
    let cached = cache_root().join(MINILM_CACHE_NAME);
    if is_model_dir(&cached) {
        return Ok(cached);
    }
    match switchyard_model::resolve_model(MINILM_HUB_ID, None) {
        Ok(d) if is_model_dir(&d) => Ok(d),
        _ => Err(ClassifierError::ModelNotFound(format!(
            "set {MINILM_DIR_ENV}, run scripts/minilm.sh (fills {}), or populate the hf-hub cache with {MINILM_HUB_ID}",
            cached.display()
        ))),
    }
}

/// A loaded sentence-embedding model. `Send + Sync`; embedding takes `&self`.
pub struct Embedder {
    bert: Bert,
    tokenizer: Tokenizer,
    max_tokens: usize,
    dir: PathBuf,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("dir", &self.dir)
            .field("dim", &self.bert.hidden_size())
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

impl Embedder {
    /// Loads the model from `spec`: a folder or a hub id (`owner/name`, from the hf-hub cache);
    /// `None` uses [`locate_minilm`].
    pub fn from_spec(spec: Option<&str>) -> Result<Self> {
        let dir = match spec {
            None => locate_minilm()?,
            Some(s) => switchyard_model::resolve_model(s, None)
                .map_err(|e| ClassifierError::ModelNotFound(e.to_string()))?,
        };
        Self::load(&dir)
    }

    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg_text =
            std::fs::read_to_string(&cfg_path).map_err(|e| ClassifierError::io(&cfg_path, e))?;
        let cfg: BertConfig = serde_json::from_str(&cfg_text)
            .map_err(|e| ClassifierError::Config(format!("{}: {e}", cfg_path.display())))?;
        let w_path = dir.join("model.safetensors");
        let bytes = std::fs::read(&w_path).map_err(|e| ClassifierError::io(&w_path, e))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &cpu())?;
        let bert = Bert::new(&cfg, vb)?;
        let t_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&t_path)
            .map_err(|e| ClassifierError::Tokenizer(format!("{}: {e}", t_path.display())))?;
        tokenizer.with_padding(None);
        Self {
            bert,
            tokenizer,
            max_tokens: 0,
            dir: dir.to_path_buf(),
        }
        .with_max_tokens(MAX_TOKENS)
    }

    /// Truncates inputs at `max_tokens` instead of [`MAX_TOKENS`] (capped by the model's
    /// position table). Embeddings made with another limit differ for longer texts, so the
    /// shipped difficulty model expects the default.
    pub fn with_max_tokens(mut self, max_tokens: usize) -> Result<Self> {
        let max_tokens = max_tokens.clamp(2, self.bert.max_positions());
        self.tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| ClassifierError::Tokenizer(e.to_string()))?;
        self.max_tokens = max_tokens;
        Ok(self)
    }

    /// The truncation limit in tokens.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Embedding width (384).
    pub fn dim(&self) -> usize {
        self.bert.hidden_size()
    }

    /// The folder the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Token ids of `text` as the model sees it (special tokens added, truncated).
    ///
    /// The tokenizer works through the whole text before truncating (59 ms for 200K
    /// characters), so the text is first cut to [`CHARS_PER_TOKEN`] characters per token of the
    /// limit: the first 128 tokens of prose span well under 1K characters.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let text = match text.char_indices().nth(self.max_tokens * CHARS_PER_TOKEN) {
            Some((cut, _)) => &text[..cut],
            None => text,
        };
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ClassifierError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(self.max_tokens);
        Ok(ids)
    }

    /// One unit-length embedding.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>> {
        let ids = self.tokenize(text)?;
        let mut out = self.forward(&[ids])?;
        out.pop()
            .ok_or_else(|| ClassifierError::Input("empty batch".into()))
    }

    /// Unit-length embeddings of `texts`, in order. Texts are grouped by token length so a
    /// forward pass pads little, [`BATCH`] at a time.
    pub fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        self.embed_batch_with(texts, |_| {})
    }

    /// [`embed_batch`](Self::embed_batch), calling `progress(done)` after each pass.
    pub fn embed_batch_with(
        &self,
        texts: &[&str],
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let ids = texts
            .iter()
            .map(|t| self.tokenize(t))
            .collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); ids.len()];
        let mut done = 0;
        for chunk in order.chunks(BATCH) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            for (&i, e) in chunk.iter().zip(self.forward(&batch)?) {
                out[i] = e;
            }
            done += chunk.len();
            progress(done);
        }
        Ok(out)
    }

    fn forward(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let b = batch.len();
        let t = batch.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0u32; b * t];
        for (r, row) in batch.iter().enumerate() {
            ids[r * t..r * t + row.len()].copy_from_slice(row);
            mask[r * t..r * t + row.len()].fill(1);
        }
        let dev = cpu();
        let ids = Tensor::from_vec(ids, (b, t), &dev)?;
        let mask = Tensor::from_vec(mask, (b, t), &dev)?;
        let hidden = self.bert.forward(&ids, &mask)?;
        Ok(mean_pool_normalize(&hidden, &mask)?.to_vec2::<f32>()?)
    }
}

/// Dot product (cosine for unit vectors).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Cosine similarity (0 when either vector is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let n = (dot(a, a) * dot(b, b)).sqrt();
    if n > 0.0 {
        dot(a, b) / n
    } else {
        0.0
    }
}
