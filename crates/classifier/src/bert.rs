//! A small BERT encoder (the `BertModel` of transformers, without the pooler) in candle, enough
//! for sentence-embedding checkpoints such as all-MiniLM-L6-v2: absolute position embeddings,
//! post-LayerNorm blocks, exact (erf) GELU. Tensor names follow the checkpoint
//! (`embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`, …); a `bert.` prefix,
//! as some exports carry, is detected and accepted.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::error::ClassifierError;

/// The fields of a BERT `config.json` this encoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width (384 for MiniLM-L6).
    pub hidden_size: usize,
    /// Encoder blocks.
    pub num_hidden_layers: usize,
    /// Attention heads per block.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Learned positions; inputs are never longer than this.
    pub max_position_embeddings: usize,
    /// Token-type (segment) vocabulary.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Activation; only `gelu` (erf) and `gelu_new`/`gelu_pytorch_tanh` (tanh) are supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Only `absolute` is supported.
    #[serde(default = "default_pos")]
    pub position_embedding_type: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_pos() -> String {
    "absolute".into()
}

#[derive(Debug, Clone, Copy)]
enum Act {
    GeluErf,
    GeluTanh,
}

impl BertConfig {
    fn act(&self) -> Result<Act, ClassifierError> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Act::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Act::GeluTanh),
            other => Err(ClassifierError::Config(format!(
                "hidden_act `{other}` is not supported (gelu, gelu_new)"
            ))),
        }
    }

    fn validate(&self) -> Result<(), ClassifierError> {
        if self.position_embedding_type != "absolute" {
            return Err(ClassifierError::Config(format!(
                "position_embedding_type `{}` is not supported (absolute)",
                self.position_embedding_type
            )));
        }
        if self.hidden_size.checked_rem(self.num_attention_heads) != Some(0) {
            return Err(ClassifierError::Config(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        self.act().map(|_| ())
    }
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

impl Embeddings {
    fn new(cfg: &BertConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            word: embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("word_embeddings"))?,
            position: embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                vb.pp("position_embeddings"),
            )?,
            token_type: embedding(
                cfg.type_vocab_size,
                cfg.hidden_size,
                vb.pp("token_type_embeddings"),
            )?,
            norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// `ids`: `[B, T]` u32 → `[B, T, H]`. Token types are all 0 (single sentences).
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let pos = Tensor::arange(0u32, t as u32, ids.device())?.unsqueeze(0)?;
        let types = ids.zeros_like()?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&pos)?)?
            .add(&self.token_type.forward(&types)?)?;
        self.norm.forward(&x)
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
    heads: usize,
    head_dim: usize,
    act: Act,
}

impl Layer {
    fn new(cfg: &BertConfig, act: Act, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let att = vb.pp("attention");
        let sa = att.pp("self");
        Ok(Self {
            q: linear(h, h, sa.pp("query"))?,
            k: linear(h, h, sa.pp("key"))?,
            v: linear(h, h, sa.pp("value"))?,
            attn_out: linear(h, h, att.pp("output").pp("dense"))?,
            attn_norm: layer_norm(h, cfg.layer_norm_eps, att.pp("output").pp("LayerNorm"))?,
            up: linear(h, cfg.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            down: linear(cfg.intermediate_size, h, vb.pp("output").pp("dense"))?,
            out_norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            act,
        })
    }

    /// `x`: `[B, T, H]`; `bias`: `[B, 1, 1, T]` additive key mask (0 or a large negative).
    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h))?;
        let x = self
            .attn_norm
            .forward(&(self.attn_out.forward(&ctx)? + x)?)?;
        let up = self.up.forward(&x)?;
        let up = match self.act {
            Act::GeluErf => up.gelu_erf()?,
            Act::GeluTanh => up.gelu()?,
        };
        self.out_norm.forward(&(self.down.forward(&up)? + x)?)
    }
}

/// The encoder: token ids and attention mask in, last hidden states out.
pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    max_positions: usize,
    hidden: usize,
}

impl Bert {
    /// Builds the encoder from a checkpoint (tensors named as transformers' `BertModel`).
    pub fn new(cfg: &BertConfig, vb: VarBuilder) -> Result<Self, ClassifierError> {
        cfg.validate()?;
        let act = cfg.act()?;
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let embeddings = Embeddings::new(cfg, vb.pp("embeddings"))?;
        let enc = vb.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, act, enc.pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            max_positions: cfg.max_position_embeddings,
            hidden: cfg.hidden_size,
        })
    }

    /// Hidden width.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// The longest input the position table allows.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// `ids`, `mask`: `[B, T]` u32 (mask 1 for real tokens) → `[B, T, H]` f32.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, ClassifierError> {
        let (_, t) = ids.dims2()?;
        if t > self.max_positions {
            return Err(ClassifierError::Input(format!(
                "{t} tokens is over the model's {} positions",
                self.max_positions
            )));
        }
        // 0 where the key is a real token, -1e9 where it is padding.
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?
            .unsqueeze(1)?
            .unsqueeze(1)?;
        let mut x = self.embeddings.forward(ids)?;
        for l in &self.layers {
            x = l.forward(&x, &bias)?;
        }
        Ok(x)
    }
}

/// Mean over the positions where `mask` is 1, then L2-normalised: `[B, T, H]` → `[B, H]`.
pub fn mean_pool_normalize(hidden: &Tensor, mask: &Tensor) -> Result<Tensor, ClassifierError> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9f32, f32::MAX)?;
    let mean = sum.broadcast_div(&count)?;
    let norm = mean
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12f32, f32::MAX)?;
    Ok(mean.broadcast_div(&norm)?)
}

/// The CPU device (the classifier runs beside the engine, on the host).
pub fn cpu() -> Device {
    Device::Cpu
}
