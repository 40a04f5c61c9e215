//! Bad inputs give errors that name what is wrong (never a panic): missing tensor, wrong
//! shape, unsupported dtype, truncated/corrupt safetensors, missing config fields, unknown
//! model_type, token id >= vocab, empty prompt; plus offline hf-hub resolution.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use switchyard_model::{HyV3Model, LoadOptions, Logits, ModelError};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle/f32_basic")
}

/// Copies the fixture's config and rewrites its weights through `edit`.
fn variant(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(fixture().join("config.json"), d.path().join("config.json")).unwrap();
    let mut w =
        candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut w);
    candle_core::safetensors::save(&w, d.path().join("model.safetensors")).unwrap();
    d
}

fn load_err(dir: &Path) -> String {
    match HyV3Model::load_dir(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor_is_named() {
    let d = variant(|w| {
        w.remove("model.layers.1.self_attn.k_proj.weight");
    });
    let e = load_err(d.path());
    assert!(
        e.contains("model.layers.1.self_attn.k_proj.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let d = variant(|w| {
        w.insert(
            "model.norm.weight".into(),
            Tensor::ones(7, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(d.path());
    assert!(
        e.contains("model.norm.weight") && e.contains("[7]") && e.contains("[48]"),
        "{e}"
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let d = variant(|w| {
        w.insert(
            "model.norm.weight".into(),
            Tensor::ones(48, DType::I64, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(d.path());
    assert!(e.contains("model.norm.weight") && e.contains("I64"), "{e}");
}

#[test]
fn truncated_and_corrupt_files_are_named() {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(fixture().join("config.json"), d.path().join("config.json")).unwrap();
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let f = d.path().join("model.safetensors");
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
    std::fs::write(&f, b"\x08\x00\x00\x00\x00\x00\x00\x00not json").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");
    // A shard listed in the index but absent.
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model-00001-of-00002.safetensors") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn config_errors_name_file_and_field() {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("model.safetensors"),
        d.path().join("model.safetensors"),
    )
    .unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    let mut c = cfg.clone();
    c.as_object_mut().unwrap().remove("num_attention_heads");
    std::fs::write(d.path().join("config.json"), c.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("config.json") && e.contains("num_attention_heads") && e.contains("missing"),
        "{e}"
    );
    let mut c = cfg.clone();
    c["model_type"] = "mixtral".into();
    std::fs::write(d.path().join("config.json"), c.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("mixtral") && e.contains("hy_v3"), "{e}");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn bad_token_ids_and_empty_prompts_are_errors() {
    let m = HyV3Model::load_dir(&fixture(), &LoadOptions::default()).unwrap();
    let mut c = m.new_cache();
    let e = m.forward(&[1, 2, 256], &mut c, Logits::Last).unwrap_err();
    assert!(matches!(e, ModelError::InvalidInput(_)));
    assert!(
        e.to_string().contains("256") && e.to_string().contains("vocabulary size 256"),
        "{e}"
    );
    let e = m
        .forward(&[], &mut c, Logits::Last)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty"), "{e}");
    assert!(c.is_empty(), "a failed forward must not advance the cache");
}

/// `--model owner/name` resolves from a populated hf-hub cache with no network.
#[test]
fn hub_id_resolves_offline_from_a_populated_cache() {
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.path().join("hub/models--acme--tiny-hy3");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join(f), snap.join(f)).unwrap();
    }
    // hf-hub reads HF_HOME; the variable is process-wide, so this test sets it once and
    // restores it (no other test in this binary reads it).
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let dir = switchyard_model::resolve_model("acme/tiny-hy3", None).unwrap();
    assert_eq!(dir, snap);
    let m = HyV3Model::load_dir(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(m.config().vocab_size, 256);
    let e = switchyard_model::resolve_model("acme/tiny-hy3", Some("v2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("HF_HUB_OFFLINE") && e.contains("v2"), "{e}");
    let e = switchyard_model::resolve_model("./no/such/dir", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such folder"), "{e}");
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::remove_var("HF_HOME");
}
