//! Tokenizer: a thin wrapper over the Hugging Face `tokenizers` crate, plus the pieces of a model
//! folder that say which ids end a sequence.
//!
//! A model folder holds `tokenizer.json` (the tokenizer itself) and usually
//! `tokenizer_config.json` (bos/eos token strings, `add_bos_token`, the chat template),
//! `config.json` and `generation_config.json` (`eos_token_id` as an int or a list). The end of
//! sequence set is the union of all three, in the order transformers' `generate` would find
//! them ([`resolve_eos_ids`]).
//!
//! [`build_byte_level_bpe`] makes a GPT-2 style byte-level BPE tokenizer of an exact size for the
//! random-weight test models that `switchyard make-test-model` writes: it learns merges on a small
//! embedded English + code corpus and, once that corpus is used up, keeps learning on
//! deterministic synthetic text until the vocabulary is full. The same arguments always give the
//! same `tokenizer.json` bytes.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer as _,
};

/// File names inside a model folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Holds `bos_token`, `eos_token`, `add_bos_token` and often `chat_template`.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Model config; may carry `eos_token_id` / `bos_token_id`.
pub const CONFIG_FILE: &str = "config.json";
/// Generation defaults; its `eos_token_id` is what transformers' `generate` stops on.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// End-of-sequence spellings tried when no config file names one, so that a bare
/// `tokenizer.json` still stops generation (GPT-2/ChatML, Llama/SentencePiece, Hunyuan).
const FALLBACK_EOS_TOKENS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "</s>",
    "<|eot_id|>",
    "<｜hy_place▁holder▁no▁2｜>",
    "<｜hy_end▁of▁sentence｜>",
];

/// Errors from loading or using a tokenizer; each names the file or the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `tokenizer.json` exists but the tokenizers crate rejected it.
    #[error("{} is not a tokenizer the tokenizers library can load: {message}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// What the tokenizers library said.
        message: String,
    },
    /// A JSON config file is malformed or has a field of the wrong type.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Encoding text failed.
    #[error("cannot encode the text: {0}")]
    Encode(String),
    /// Decoding token ids failed.
    #[error("cannot decode token ids: {0}")]
    Decode(String),
    /// Arguments to [`build_byte_level_bpe`] cannot produce a tokenizer.
    #[error("cannot build the test tokenizer: {0}")]
    Build(String),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, TokenizerError>;

/// A token with a special role (bos, eos, chat markers, ...), as registered in `tokenizer.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    /// Its id.
    pub id: u32,
    /// Its text.
    pub content: String,
}

/// A loaded tokenizer with the model folder's bos/eos settings.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    bos_token_id: Option<u32>,
    eos_token: Option<String>,
    eos_token_ids: Vec<u32>,
    /// `add_bos_token` from `tokenizer_config.json`: older Llama-style folders ask for a BOS that
    /// the `tokenizer.json` post-processor does not add by itself.
    add_bos_token: bool,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model folder together with the bos/eos settings of
    /// `tokenizer_config.json`, `config.json` and `generation_config.json` (each optional).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            return Err(TokenizerError::Io {
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the model folder has no tokenizer.json",
                ),
                path,
            });
        }
        let inner = load_tokenizer_json(&path)?;
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = read_json_if_exists(&config_path)?;
        let (bos_token, eos_token, add_bos_token) = match &config {
            Some(cfg) => (
                token_string_field(cfg, "bos_token", &config_path)?,
                token_string_field(cfg, "eos_token", &config_path)?,
                match cfg.get("add_bos_token") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(TokenizerError::Config {
                            path: config_path,
                            message: format!("`add_bos_token` must be true or false, not {other}"),
                        })
                    }
                },
            ),
            None => (None, None, false),
        };
        let mut bos_token_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        if bos_token_id.is_none() {
            let model_config_path = dir.join(CONFIG_FILE);
            if let Some(cfg) = read_json_if_exists(&model_config_path)? {
                bos_token_id = id_list_field(&cfg, "bos_token_id", &model_config_path)?
                    .first()
                    .copied();
            }
        }
        let eos_token_ids = resolve_eos_ids(dir, &inner)?;
        Ok(Self {
            inner,
            bos_token,
            bos_token_id,
            eos_token,
            eos_token_ids,
            add_bos_token,
        })
    }

    /// Loads a bare `tokenizer.json`; eos ids come from the well-known end-of-sequence spellings
    /// that its vocabulary contains.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Ok(Self::from_tokenizer(load_tokenizer_json(path.as_ref())?))
    }

    /// Wraps an already built tokenizer (for example one from [`build_byte_level_bpe`]).
    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> Self {
        let eos_token_ids = fallback_eos_ids(&inner);
        let eos_token = eos_token_ids.first().and_then(|&id| inner.id_to_token(id));
        Self {
            inner,
            bos_token: None,
            bos_token_id: None,
            eos_token,
            eos_token_ids,
            add_bos_token: false,
        }
    }

    /// Replaces the end-of-sequence ids (for example with a request's extra stop token ids).
    pub fn set_eos_token_ids(&mut self, ids: Vec<u32>) {
        self.eos_token_ids = ids;
    }

    /// Encodes `text`. With `add_special_tokens` the tokenizer's post-processor runs (it may add
    /// BOS), and a BOS the folder asks for with `add_bos_token` is added if it is missing. Chat
    /// prompts rendered by a template already contain their special tokens: encode them with
    /// `add_special_tokens = false`, as transformers' `apply_chat_template` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special_tokens && self.add_bos_token {
            if let Some(bos) = self.bos_token_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text; `skip_special_tokens` drops bos/eos/chat markers from the output.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Number of token ids, added tokens included (the size the model's embedding must cover).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The token string of an id (byte-level tokens are in their mapped-character form).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Special tokens registered in `tokenizer.json`, sorted by id.
    pub fn special_tokens(&self) -> Vec<SpecialToken> {
        self.added_tokens_where(|t| t.special)
    }

    /// All added tokens (special or not), sorted by id.
    pub fn added_tokens(&self) -> Vec<SpecialToken> {
        self.added_tokens_where(|_| true)
    }

    fn added_tokens_where(&self, keep: impl Fn(&AddedToken) -> bool) -> Vec<SpecialToken> {
        let mut tokens: Vec<SpecialToken> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| keep(t))
            .map(|(id, t)| SpecialToken {
                id,
                content: t.content,
            })
            .collect();
        tokens.sort_by_key(|t| t.id);
        tokens
    }

    /// Whether `id` is a special token (dropped by `decode(.., true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_vocabulary()
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// The ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }

    /// The BOS token's text, from `tokenizer_config.json`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The BOS token's id, from `tokenizer_config.json` or `config.json`.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The EOS token's text (what a chat template sees as `eos_token`).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The wrapped tokenizers-crate tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn read_json_if_exists(path: &Path) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Config {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })
}

/// Reads a token field that transformers writes either as `"text"` or as an AddedToken object
/// `{"content": "text", ...}`; `null` and absence both mean none.
fn token_string_field(cfg: &Value, field: &str, path: &Path) -> Result<Option<String>> {
    match cfg.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(obj)) => match obj.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::Config {
                path: path.to_path_buf(),
                message: format!("`{field}` is an object without a string `content`"),
            }),
        },
        Some(other) => Err(TokenizerError::Config {
            path: path.to_path_buf(),
            message: format!("`{field}` must be a string or {{\"content\": ...}}, not {other}"),
        }),
    }
}

/// Reads an id field written as an int, a list of ints, or null.
fn id_list_field(cfg: &Value, field: &str, path: &Path) -> Result<Vec<u32>> {
    let bad = |v: &Value| TokenizerError::Config {
        path: path.to_path_buf(),
        message: format!("`{field}` must be a token id or a list of token ids, not {v}"),
    };
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(v))
    };
    match cfg.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// The ids that end generation for the model in `model_dir`: the union, in this order and
/// without repeats, of `generation_config.json`'s `eos_token_id`, `config.json`'s `eos_token_id`
/// (each an int or a list) and `tokenizer_config.json`'s `eos_token` (a string or `{content}`)
/// looked up in `tokenizer`. Missing files are skipped; a malformed one is an error that names it.
/// When none of them names an eos, the well-known spellings (`<|endoftext|>`, `<|im_end|>`,
/// `</s>`, ...) present in the vocabulary are used, so a bare test tokenizer still stops.
pub fn resolve_eos_ids(
    model_dir: impl AsRef<Path>,
    tokenizer: &tokenizers::Tokenizer,
) -> Result<Vec<u32>> {
    let dir = model_dir.as_ref();
    let mut ids: Vec<u32> = Vec::new();
    let push = |id: u32, ids: &mut Vec<u32>| {
        if !ids.contains(&id) {
            ids.push(id);
        }
    };
    for file in [GENERATION_CONFIG_FILE, CONFIG_FILE] {
        let path = dir.join(file);
        if let Some(cfg) = read_json_if_exists(&path)? {
            for id in id_list_field(&cfg, "eos_token_id", &path)? {
                push(id, &mut ids);
            }
        }
    }
    let path = dir.join(TOKENIZER_CONFIG_FILE);
    if let Some(cfg) = read_json_if_exists(&path)? {
        if let Some(token) = token_string_field(&cfg, "eos_token", &path)? {
            match tokenizer.token_to_id(&token) {
                Some(id) => push(id, &mut ids),
                None => tracing::warn!(
                    file = %path.display(),
                    eos_token = %token,
                    "eos_token is not in the tokenizer's vocabulary; ignoring it"
                ),
            }
        }
    }
    if ids.is_empty() {
        ids = fallback_eos_ids(tokenizer);
    }
    Ok(ids)
}

fn fallback_eos_ids(tokenizer: &tokenizers::Tokenizer) -> Vec<u32> {
    let mut ids = Vec::new();
    for token in FALLBACK_EOS_TOKENS {
        if let Some(id) = tokenizer.token_to_id(token) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

// ---------------------------------------------------------------------------------------------
// Byte-level BPE construction for test models.
// ---------------------------------------------------------------------------------------------

/// Byte-level alphabet size: every byte value has its own token, so any UTF-8 text encodes.
const BYTE_TOKENS: usize = 256;

/// English + code text the merges are learned from first (a few KB, written for this crate).
const BPE_CORPUS: &str = include_str!("bpe_corpus.txt");

/// Synthetic pre-tokens generated per top-up round once the corpus can give no more merges.
/// Each round adds a few thousand new words, each of which ends as one token at most, so a
/// 32K vocabulary needs about ten rounds.
const SYNTHETIC_WORDS_PER_ROUND: usize = 4096;

/// Rounds of synthetic text after which we give up (far above what a 256K vocabulary needs).
const MAX_SYNTHETIC_ROUNDS: u64 = 4096;

/// Builds a GPT-2 style byte-level BPE tokenizer with exactly `vocab_size` ids: the 256 byte
/// tokens (ids 0..256, in byte order), learned merges, then `special_tokens` as special added
/// tokens with the last ids, in the order given. The ByteLevel pre-tokenizer (GPT-2 regex, no
/// prefix space) and decoder make every UTF-8 string round-trip exactly. Merges are learned
/// greedily (most frequent pair first, ties to the lowest pair of ids) on an embedded corpus,
/// then on deterministic synthetic text, so the output is the same on every run.
pub fn build_byte_level_bpe(
    vocab_size: usize,
    special_tokens: &[&str],
) -> Result<tokenizers::Tokenizer> {
    let mut seen = HashSet::new();
    for token in special_tokens {
        if token.is_empty() {
            return Err(TokenizerError::Build(
                "a special token is the empty string".into(),
            ));
        }
        if !seen.insert(*token) {
            return Err(TokenizerError::Build(format!(
                "special token {token:?} is listed twice"
            )));
        }
    }
    let minimum = BYTE_TOKENS + special_tokens.len();
    if vocab_size < minimum {
        return Err(TokenizerError::Build(format!(
            "vocab_size {vocab_size} is too small: the 256 byte tokens and {} special tokens \
             need at least {minimum}",
            special_tokens.len()
        )));
    }
    if u32::try_from(vocab_size).is_err() {
        return Err(TokenizerError::Build(format!(
            "vocab_size {vocab_size} does not fit in a u32 token id"
        )));
    }
    let model_size = vocab_size - special_tokens.len();

    let pre_tokenizer = ByteLevel::new(false, true, true);
    let mut trainer = BpeTrainer::new(special_tokens);
    trainer.add_text(&pre_tokenizer, BPE_CORPUS)?;
    let mut round = 0u64;
    while trainer.tokens.len() < model_size {
        if trainer.merge_next() {
            continue;
        }
        if round >= MAX_SYNTHETIC_ROUNDS {
            return Err(TokenizerError::Build(format!(
                "synthetic text ran out after {} tokens; {vocab_size} is too large",
                trainer.tokens.len()
            )));
        }
        let text = synthetic_text(round, SYNTHETIC_WORDS_PER_ROUND);
        trainer.add_text(&pre_tokenizer, &text)?;
        round += 1;
    }

    let vocab: Vocab = trainer
        .tokens
        .iter()
        .enumerate()
        .map(|(id, s)| (s.clone(), id as u32))
        .collect();
    let merges: Vec<(String, String)> = trainer
        .merges
        .iter()
        .map(|&(a, b)| {
            (
                trainer.tokens[a as usize].clone(),
                trainer.tokens[b as usize].clone(),
            )
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_post_processor(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, true, true)));
    tokenizer
        .add_special_tokens(special_tokens.iter().map(|t| AddedToken::from(*t, true)))
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    let got = tokenizer.get_vocab_size(true);
    if got != vocab_size {
        return Err(TokenizerError::Build(format!(
            "built {got} tokens instead of {vocab_size} (a special token collides with a learned \
             token)"
        )));
    }
    Ok(tokenizer)
}

/// GPT-2's byte → printable-character table: printable Latin-1 bytes map to themselves, the
/// rest to U+0100 onwards in byte order.
fn byte_to_char_table() -> [char; BYTE_TOKENS] {
    let mut table = ['\0'; BYTE_TOKENS];
    let mut next = 256u32;
    for (byte, slot) in table.iter_mut().enumerate() {
        let b = byte as u32;
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let code = if printable {
            b
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    table
}

/// A distinct pre-token and how often it occurs, as a sequence of token ids.
struct Word {
    symbols: Vec<u32>,
    count: i64,
}

/// Greedy BPE learner with incremental pair counts and a lazily updated max-heap.
struct BpeTrainer {
    /// Token id → byte-level string.
    tokens: Vec<String>,
    /// Byte-level string → token id.
    token_ids: HashMap<String, u32>,
    /// Byte-level char → byte token id.
    char_ids: HashMap<char, u32>,
    /// Learned merges in rank order.
    merges: Vec<(u32, u32)>,
    /// Pair → (rank, merged id), to encode words added after some merges were learned.
    merge_map: HashMap<(u32, u32), (usize, u32)>,
    words: Vec<Word>,
    pair_counts: HashMap<(u32, u32), i64>,
    /// Pair → indices of words that contained it when it was last seen (may hold stale entries).
    pair_words: HashMap<(u32, u32), Vec<u32>>,
    heap: BinaryHeap<(i64, Reverse<(u32, u32)>)>,
    /// Strings no merge may produce: the special tokens, so each stays a single distinct id.
    forbidden: HashSet<String>,
}

impl BpeTrainer {
    fn new(special_tokens: &[&str]) -> Self {
        let table = byte_to_char_table();
        let tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        let token_ids = tokens
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        let char_ids = table
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .collect();
        Self {
            tokens,
            token_ids,
            char_ids,
            merges: Vec::new(),
            merge_map: HashMap::new(),
            words: Vec::new(),
            pair_counts: HashMap::new(),
            pair_words: HashMap::new(),
            heap: BinaryHeap::new(),
            forbidden: special_tokens.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Pre-tokenizes `text` like the final tokenizer will and adds its words, already encoded
    /// with the merges learned so far.
    fn add_text(&mut self, pre_tokenizer: &ByteLevel, text: &str) -> Result<()> {
        let mut pre = PreTokenizedString::from(text);
        pre_tokenizer
            .pre_tokenize(&mut pre)
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        for (piece, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::None) {
            *counts.entry(piece.to_string()).or_default() += 1;
        }
        let mut touched = HashSet::new();
        for (piece, count) in counts {
            let mut symbols = Vec::with_capacity(piece.len());
            for c in piece.chars() {
                match self.char_ids.get(&c) {
                    Some(&id) => symbols.push(id),
                    None => {
                        return Err(TokenizerError::Build(format!(
                            "pre-tokenizer produced {c:?}, which is not a byte-level character"
                        )))
                    }
                }
            }
            self.encode_with_merges(&mut symbols);
            let index = self.words.len() as u32;
            for pair in symbols.windows(2) {
                let pair = (pair[0], pair[1]);
                *self.pair_counts.entry(pair).or_default() += count;
                self.pair_words.entry(pair).or_default().push(index);
                touched.insert(pair);
            }
            self.words.push(Word { symbols, count });
        }
        self.push_pairs(touched);
        Ok(())
    }

    /// Applies learned merges to a fresh word, lowest rank first (standard BPE encoding).
    fn encode_with_merges(&self, symbols: &mut Vec<u32>) {
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.merge_map.get(&(w[0], w[1])).map(|&(r, n)| (r, i, n)))
                .min();
            let Some((_, i, new_id)) = best else { return };
            symbols[i] = new_id;
            symbols.remove(i + 1);
        }
    }

    fn push_pairs(&mut self, pairs: HashSet<(u32, u32)>) {
        for pair in pairs {
            let count = self.pair_counts.get(&pair).copied().unwrap_or(0);
            if count > 0 {
                self.heap.push((count, Reverse(pair)));
            }
        }
    }

    /// Learns one merge; false when no pair is left.
    fn merge_next(&mut self) -> bool {
        while let Some((count, Reverse(pair))) = self.heap.pop() {
            if self.merge_map.contains_key(&pair)
                || self.pair_counts.get(&pair).copied().unwrap_or(0) != count
            {
                continue; // stale heap entry
            }
            let merged = format!(
                "{}{}",
                self.tokens[pair.0 as usize], self.tokens[pair.1 as usize]
            );
            if self.forbidden.contains(&merged) {
                self.pair_counts.insert(pair, 0);
                continue;
            }
            let new_id = match self.token_ids.get(&merged) {
                Some(&id) => id,
                None => {
                    let id = self.tokens.len() as u32;
                    self.tokens.push(merged.clone());
                    self.token_ids.insert(merged, id);
                    id
                }
            };
            self.merge_map.insert(pair, (self.merges.len(), new_id));
            self.merges.push(pair);
            self.apply_merge(pair, new_id);
            return true;
        }
        false
    }

    fn apply_merge(&mut self, (a, b): (u32, u32), new_id: u32) {
        let mut indices = self.pair_words.remove(&(a, b)).unwrap_or_default();
        indices.sort_unstable();
        indices.dedup();
        let affects = |p: &(u32, u32)| [a, b, new_id].iter().any(|&x| x == p.0 || x == p.1);
        let mut touched = HashSet::new();
        for index in indices {
            let word = &mut self.words[index as usize];
            if !word.symbols.windows(2).any(|w| w[0] == a && w[1] == b) {
                continue;
            }
            for w in word.symbols.windows(2) {
                let p = (w[0], w[1]);
                if affects(&p) {
                    *self.pair_counts.entry(p).or_default() -= word.count;
                    touched.insert(p);
                }
            }
            let mut merged = Vec::with_capacity(word.symbols.len());
            let mut i = 0;
            while i < word.symbols.len() {
                if i + 1 < word.symbols.len() && word.symbols[i] == a && word.symbols[i + 1] == b {
                    merged.push(new_id);
                    i += 2;
                } else {
                    merged.push(word.symbols[i]);
                    i += 1;
                }
            }
            word.symbols = merged;
            for w in word.symbols.windows(2) {
                let p = (w[0], w[1]);
                if affects(&p) {
                    *self.pair_counts.entry(p).or_default() += word.count;
                    touched.insert(p);
                    if p.0 == new_id || p.1 == new_id {
                        self.pair_words.entry(p).or_default().push(index);
                    }
                }
            }
        }
        self.pair_counts.remove(&(a, b));
        touched.remove(&(a, b));
        self.push_pairs(touched);
    }
}

/// xorshift64*: a tiny deterministic generator, so synthetic text never depends on a library's
/// RNG algorithm staying the same.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so nearby seeds give unrelated streams (and never 0).
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Deterministic word-like text for round `round`: pronounceable words, capitalised words,
/// identifiers and numbers, with code punctuation, so later merges look like the corpus ones.
fn synthetic_text(round: u64, words: usize) -> String {
    const ONSETS: &[&str] = &[
        "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
        "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "sl", "st", "str", "th", "tr", "",
    ];
    const VOWELS: &[&str] = &[
        "a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "ie", "oo", "ou",
    ];
    const CODAS: &[&str] = &[
        "", "", "", "n", "r", "s", "t", "l", "m", "ng", "nd", "st", "ck", "rt", "x",
    ];
    const PUNCT: &[&str] = &[
        ".", ",", ";", ":", "()", "{}", "[]", " =", " ->", "::", "!", "?", " +", "\n", "\n    ",
    ];
    let mut rng = XorShift::new(round);
    let mut out = String::with_capacity(words * 8);
    for _ in 0..words {
        let kind = rng.below(10);
        if kind == 9 {
            out.push(' ');
            out.push_str(&(rng.next() % 100_000).to_string());
        } else {
            let syllables = 1 + rng.below(4);
            let mut word = String::new();
            for _ in 0..syllables {
                word.push_str(rng.pick(ONSETS));
                word.push_str(rng.pick(VOWELS));
                word.push_str(rng.pick(CODAS));
            }
            if kind == 8 {
                let mut chars = word.chars();
                if let Some(first) = chars.next() {
                    word = first.to_uppercase().chain(chars).collect();
                }
            }
            if kind != 7 {
                out.push(' ');
            }
            out.push_str(&word);
        }
        if rng.below(6) == 0 {
            out.push_str(rng.pick(PUNCT));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

    fn tiny() -> tokenizers::Tokenizer {
        build_byte_level_bpe(512, SPECIALS).expect("tiny tokenizer builds")
    }

    fn round_trip(tok: &tokenizers::Tokenizer, text: &str) {
        let ids = tok.encode_fast(text, false).unwrap().get_ids().to_vec();
        let back = tok.decode(&ids, false).unwrap();
        assert_eq!(back, text, "ids {ids:?}");
    }

    #[test]
    fn byte_table_matches_the_byte_level_alphabet() {
        let table: HashSet<char> = byte_to_char_table().into_iter().collect();
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(table, alphabet);
    }

    #[test]
    fn tiny_tokenizer_round_trips_any_text() {
        let tok = tiny();
        for text in [
            "Hello, world!",
            "  leading and trailing spaces  ",
            "naïve café, Straße, привет, 你好世界",
            "emoji: 🦀🚀👩‍👩‍👧 and flags 🇫🇷",
            "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
            "tabs\tand\r\nwindows newlines\n\n\n",
            "\u{0}\u{1}\u{7f} control bytes",
            "",
        ] {
            round_trip(&tok, text);
        }
    }

    #[test]
    fn vocab_sizes_are_exact() {
        assert_eq!(tiny().get_vocab_size(true), 512);
        let small = build_byte_level_bpe(32768, SPECIALS).unwrap();
        assert_eq!(small.get_vocab_size(true), 32768);
        round_trip(&small, "The quick brown fox 🦊 jumps over 13 lazy dogs.");
        let bare = build_byte_level_bpe(256, &[]).unwrap();
        assert_eq!(bare.get_vocab_size(true), 256);
        round_trip(&bare, "bytes only ✓");
    }

    #[test]
    fn merges_shorten_text() {
        let tok = tiny();
        let text = "The quick brown fox jumps over the lazy dog.";
        let ids = tok.encode_fast(text, false).unwrap().get_ids().len();
        assert!(ids < text.len(), "{ids} tokens for {} bytes", text.len());
    }

    #[test]
    fn special_tokens_are_single_ids_at_the_end() {
        let tok = tiny();
        for (i, special) in SPECIALS.iter().enumerate() {
            let id = tok.token_to_id(special).unwrap();
            assert_eq!(id as usize, 512 - SPECIALS.len() + i);
            let ids = tok
                .encode_fast(format!("a{special}b").as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            assert!(ids.contains(&id), "{special} in {ids:?}");
            assert_eq!(ids.len(), 3);
        }
        let hy = ["<｜hy_User｜>", "<｜hy_Assistant｜>"];
        let tok = build_byte_level_bpe(400, &hy).unwrap();
        let ids = tok
            .encode_fast("<｜hy_User｜>hi<｜hy_Assistant｜>", false)
            .unwrap();
        assert_eq!(ids.get_ids()[0], 398);
        assert_eq!(*ids.get_ids().last().unwrap(), 399);
    }

    #[test]
    fn output_is_deterministic() {
        let a = tiny().to_string(false).unwrap();
        let b = tiny().to_string(false).unwrap();
        assert_eq!(a, b);
        let reloaded = tokenizers::Tokenizer::from_bytes(a.as_bytes()).unwrap();
        assert_eq!(reloaded.to_string(false).unwrap(), a);
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(build_byte_level_bpe(100, &[]).is_err());
        assert!(build_byte_level_bpe(258, &["<a>", "<b>", "<c>"]).is_err());
        assert!(build_byte_level_bpe(300, &["<a>", "<a>"]).is_err());
        assert!(build_byte_level_bpe(300, &[""]).is_err());
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn loads_a_model_folder_with_eos_from_all_configs() {
        let dir = tempfile::tempdir().unwrap();
        tiny().save(dir.path().join(TOKENIZER_FILE), false).unwrap();
        write(
            dir.path(),
            CONFIG_FILE,
            r#"{"eos_token_id": 509, "bos_token_id": 510}"#,
        );
        write(
            dir.path(),
            GENERATION_CONFIG_FILE,
            r#"{"eos_token_id": [511, 509]}"#,
        );
        write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            r#"{"eos_token": {"content": "<|endoftext|>"}, "bos_token": "<|im_start|>", "add_bos_token": true}"#,
        );
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.eos_token_ids(), &[511, 509]);
        assert!(tok.is_eos(511) && !tok.is_eos(5));
        assert_eq!(tok.bos_token(), Some("<|im_start|>"));
        assert_eq!(tok.bos_token_id(), Some(510));
        assert_eq!(tok.eos_token(), Some("<|endoftext|>"));
        assert_eq!(tok.vocab_size(), 512);
        let ids = tok.encode("hi", true).unwrap();
        assert_eq!(ids[0], 510, "add_bos_token prepends bos");
        assert_ne!(tok.encode("hi", false).unwrap()[0], 510);
        assert_eq!(tok.decode(&ids, true).unwrap(), "hi");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>hi");
        assert_eq!(tok.special_tokens().len(), 3);
        assert!(tok.is_special(511) && !tok.is_special(300));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(511));
        assert_eq!(tok.id_to_token(511).as_deref(), Some("<|im_end|>"));
    }

    #[test]
    fn eos_falls_back_to_known_spellings() {
        let dir = tempfile::tempdir().unwrap();
        tiny().save(dir.path().join(TOKENIZER_FILE), false).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.eos_token_ids(), &[509, 511]);
        assert_eq!(
            Tokenizer::from_tokenizer(tiny()).eos_token_ids(),
            &[509, 511]
        );
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        write(dir.path(), TOKENIZER_FILE, "{not json");
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        tiny().save(dir.path().join(TOKENIZER_FILE), false).unwrap();
        write(dir.path(), CONFIG_FILE, r#"{"eos_token_id": "two"}"#);
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("eos_token_id"),
            "{err}"
        );
        write(dir.path(), CONFIG_FILE, "{}");
        write(dir.path(), TOKENIZER_CONFIG_FILE, "[1,");
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json"), "{err}");
    }
}
