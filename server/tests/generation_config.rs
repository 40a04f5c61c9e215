//! `--generation-config` (vLLM's flag): with `auto`, the default, the model's
//! generation_config.json supplies the sampling fields and the token limit a request leaves
//! unset; values the request sets win; `vllm` ignores the file; bad values stop the server at
//! start-up naming the file and key.

mod common;

use std::path::Path;

use common::{client, model_dir, run_cli, Opts, Server};
use serde_json::{json, Value};

/// A copy of the tiny test model whose generation_config.json also holds `extra`.
fn model_with(extra: Value) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(model_dir()).expect("model dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), d.path().join(e.file_name())).expect("copy");
    }
    let path = d.path().join("generation_config.json");
    let mut cfg: Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    for (k, v) in extra.as_object().expect("object") {
        cfg[k] = v.clone();
    }
    std::fs::write(&path, cfg.to_string()).expect("write generation_config.json");
    d
}

/// A chat completion's text and completion-token count.
async fn chat(s: &Server, body: Value) -> (String, u64) {
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        v["usage"]["completion_tokens"].as_u64().expect("usage"),
    )
}

fn ask(extra: Value) -> Value {
    let mut b = json!({
        "model": "local",
        "messages": [{"role": "user", "content": "Name a colour and a fruit."}],
        "ignore_eos": true,
    });
    for (k, v) in extra.as_object().expect("object") {
        b[k] = v.clone();
    }
    b
}

fn start(model: &Path, args: &[&str]) -> Server {
    Server::start_model(model, Opts { args, env: &[] })
}

#[tokio::test]
async fn model_defaults_fill_unset_fields_and_requests_win() {
    // Greedy by default, 6 tokens unless the request says otherwise.
    let m = model_with(json!({"temperature": 0.0, "max_new_tokens": 6}));
    let auto = start(m.path(), &[]);
    assert!(
        auto.log().contains("temperature=0, max_new_tokens=6"),
        "{}",
        auto.log()
    );
    let (greedy, n) = chat(&auto, ask(json!({"temperature": 0, "max_tokens": 6}))).await;
    assert_eq!(n, 6);
    // Unset temperature and max_tokens: the model's defaults, whatever the seed.
    for seed in [1, 2, 3] {
        let (text, n) = chat(&auto, ask(json!({"seed": seed}))).await;
        assert_eq!((text.as_str(), n), (greedy.as_str(), 6), "seed {seed}");
    }
    // Anthropic's endpoint has no temperature here either: greedy too.
    let r: Value = client()
        .post(auto.url("/v1/messages"))
        .json(&json!({
            "model": "local", "max_tokens": 6, "ignore_eos": true,
            "messages": [{"role": "user", "content": "Name a colour and a fruit."}],
        }))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(r["content"][0]["text"], greedy.as_str(), "{r}");

    // `vllm` ignores the file: temperature 1, the usual token limit.
    let plain = start(
        m.path(),
        &["--generation-config", "vllm", "--max-model-len", "64"],
    );
    let (a, na) = chat(&plain, ask(json!({"seed": 1}))).await;
    let (b, _) = chat(&plain, ask(json!({"seed": 2}))).await;
    assert!(na > 6, "{na} tokens");
    assert_ne!(a, b, "two seeds sampled the same text at temperature 1");
    // A temperature the request sets wins over the model's default: the same sampled text on
    // both servers.
    let explicit = ask(json!({"seed": 1, "temperature": 1.0, "max_tokens": 6}));
    let (on_auto, _) = chat(&auto, explicit.clone()).await;
    let (on_plain, _) = chat(&plain, explicit).await;
    assert_eq!(on_auto, on_plain);
    assert_ne!(on_auto, greedy, "temperature 1 sampled the greedy text");
}

#[test]
fn bad_generation_configs_stop_the_server_naming_the_problem() {
    let m = model_with(json!({"top_p": 0}));
    let model = m.path().to_str().expect("utf-8");
    let (ok, _, err) = run_cli(&["serve", "--model", model, "--port", "0"]);
    assert!(!ok);
    assert!(
        err.contains("generation_config.json") && err.contains("top_p"),
        "{err}"
    );
    let (ok, _, err) = run_cli(&[
        "serve",
        "--model",
        model,
        "--port",
        "0",
        "--generation-config",
        "/no/such/folder",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--generation-config") && err.contains("/no/such/folder"),
        "{err}"
    );
}
