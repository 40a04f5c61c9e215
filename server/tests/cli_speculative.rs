//! `--speculative-config` (vLLM's flag, prompt-lookup drafts) on the real binary: greedy
//! `generate` gives the tokens it gives without drafts; `serve` answers the same completion
//! text (plain and streamed) as a server without drafts and reports drafted and accepted
//! tokens on `/metrics`; `bench --json` reports the acceptance; bad configs are refused
//! naming the flag and the field.

mod common;

use common::{
    bench_json, client, generate_json, generated_ids as ids, metric, model_arg, parse_sse, run_cli,
    Opts, Server,
};
use serde_json::{json, Value};

const SPEC: &str = r#"{"method":"ngram","num_speculative_tokens":4,"prompt_lookup_min":1}"#;

/// A prompt that repeats a phrase, so lookups find matches from the first decode step.
fn repeating_ids() -> Vec<String> {
    [11u32, 42, 7, 300, 5, 19]
        .iter()
        .cycle()
        .take(27)
        .map(u32::to_string)
        .collect()
}

#[test]
fn greedy_generate_with_drafts_equals_without() {
    let prompt = repeating_ids().join(",");
    let base = ["--input-ids", &prompt, "--max-tokens", "24", "--ignore-eos"];
    let (ok, plain, err) = generate_json(&base);
    assert!(ok, "{err}");
    let (ok, drafted, err) = generate_json(&[&base[..], &["--speculative-config", SPEC]].concat());
    assert!(ok, "{err}");
    assert_eq!(ids(&drafted), ids(&plain));
    assert_eq!(ids(&plain).len(), 24);
}

async fn completion(s: &Server, stream: bool) -> (String, Value) {
    let body = json!({
        "model": "local",
        "prompt": "abc abc abc abc abc abc abc abc abc",
        "max_tokens": 20,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
    });
    let r = client()
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("POST /v1/completions");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    if !stream {
        let v: Value = serde_json::from_str(&text).expect("JSON");
        return (v["choices"][0]["text"].as_str().expect("text").into(), v);
    }
    let mut out = String::new();
    for (_, data) in parse_sse(&text) {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).expect("SSE JSON");
        out.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    (out, Value::Null)
}

#[tokio::test]
async fn serve_with_drafts_answers_as_without_and_counts_them() {
    let plain = Server::start();
    let spec = Server::start_with(Opts {
        args: &["--speculative-config", SPEC],
        ..Default::default()
    });
    let (want, v) = completion(&plain, false).await;
    assert_eq!(v["usage"]["completion_tokens"], 20);
    let (got, v) = completion(&spec, false).await;
    assert_eq!(got, want, "completion text with drafts");
    assert_eq!(v["usage"]["completion_tokens"], 20);
    let (streamed, _) = completion(&spec, true).await;
    assert_eq!(streamed, want, "streamed text with drafts");

    let m = common::metrics_text(&spec).await;
    let drafted = metric(&m, "switchyard_spec_decode_draft_tokens").expect("draft metric");
    let accepted = metric(&m, "switchyard_spec_decode_accepted_tokens").expect("accepted metric");
    println!("tiny model, repeating prompt: {accepted} of {drafted} drafts accepted");
    assert!(
        accepted > 0.0 && drafted >= accepted,
        "{accepted} of {drafted}"
    );
    // Accepted drafts are generated tokens that needed no step of their own.
    let steps = metric(&m, "switchyard_engine_steps").expect("steps");
    assert!(steps < 40.0, "{steps} steps for two 20-token answers");
}

#[test]
fn bench_reports_the_acceptance() {
    let v = bench_json(&["--speculative-config", SPEC]);
    let s = &v["speculative"];
    let (d, a) = (
        s["draft_tokens"].as_u64().expect("draft_tokens"),
        s["accepted_tokens"].as_u64().expect("accepted_tokens"),
    );
    assert!(a <= d, "{s}");
    let rate = s["acceptance_rate"].as_f64().expect("acceptance_rate");
    assert!((rate - a as f64 / d.max(1) as f64).abs() < 1e-9, "{s}");
    assert!(bench_json(&[])["speculative"].is_null());
}

#[test]
fn bad_configs_are_refused_naming_the_flag() {
    let dir = model_arg();
    for (cfg, field) in [
        ("{not json", "--speculative-config"),
        (r#"{"method":"eagle","num_speculative_tokens":2}"#, "eagle"),
        (
            r#"{"method":"ngram","num_speculative_tokens":0}"#,
            "num_speculative_tokens",
        ),
        (
            r#"{"method":"ngram","num_speculative_tokens":2,"model":"x"}"#,
            "model",
        ),
        (
            r#"{"method":"ngram","num_speculative_tokens":2,"prompt_lookup_min":3,"prompt_lookup_max":2}"#,
            "prompt_lookup_min",
        ),
    ] {
        for cmd in ["generate", "serve"] {
            let mut args = vec![cmd, "--model", dir.as_str(), "--speculative-config", cfg];
            if cmd == "generate" {
                args.extend(["--input-ids", "1,2"]);
            } else {
                args.extend(["--port", "0"]);
            }
            let (ok, _, err) = run_cli(&args);
            assert!(!ok, "{cmd} accepted {cfg}");
            assert!(
                err.contains("--speculative-config") && err.contains(field),
                "{cmd} {cfg}: {err}"
            );
        }
    }
}

/// OpenAI's Predicted Outputs on a server without `--speculative-config`: the same answer, and
/// `usage.completion_tokens_details` says how much of the prediction was used.
#[tokio::test]
async fn chat_prediction_is_used_as_drafts() {
    let s = Server::start();
    let chat = |prediction: Value| {
        let mut b = json!({"model": "local", "max_tokens": 24, "temperature": 0, "ignore_eos": true,
                           "messages": [{"role": "user", "content": "Repeat after me."}]});
        if !prediction.is_null() {
            b["prediction"] = prediction;
        }
        b
    };
    let r = common::post(&s, "/v1/chat/completions", chat(Value::Null), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let want = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    assert!(v["usage"]["completion_tokens_details"].is_null(), "{v}");
    for prediction in [
        json!({"type": "content", "content": want}),
        json!({"type": "content", "content": [{"type": "text", "text": want}]}),
    ] {
        let r = common::post(&s, "/v1/chat/completions", chat(prediction), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let v = r.json();
        assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
        let d = &v["usage"]["completion_tokens_details"];
        let accepted = d["accepted_prediction_tokens"].as_u64().expect("accepted");
        println!("prediction of the answer itself: {d}");
        // 12 measured: the tiny model's own tokens are often not the canonical tokenisation of
        // its text, so the re-tokenised prediction drifts; real models stay closer.
        assert!(accepted >= 8, "{d}");
    }
    let r = common::post(
        &s,
        "/v1/chat/completions",
        chat(json!({"type": "content", "content": "zzzz qqqq"})),
        &[],
    )
    .await;
    assert_eq!(r.json()["choices"][0]["message"]["content"], want.as_str());
    for bad in [
        json!({"type": "text", "content": "x"}),
        json!({"type": "content", "content": 5}),
    ] {
        let r = common::post(&s, "/v1/chat/completions", chat(bad.clone()), &[]).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text);
        assert!(
            r.json()["error"]["param"]
                .as_str()
                .is_some_and(|p| p.starts_with("prediction")),
            "{}",
            r.text
        );
    }
}

/// Method `mtp` on a test model with an MTP layer (`make-test-model --mtp-layers 1`): the layer
/// is loaded, `generate` gives the tokens it gives without drafts, and `bench --json` counts the
/// drafts, also three a step (the layer chained). A model without an MTP layer is refused
/// naming the field.
#[test]
fn mtp_drafts_from_the_models_mtp_layer() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    let (ok, _, err) = run_cli(&[
        "make-test-model",
        "--preset",
        "tiny",
        "--out",
        dir,
        "--seed",
        "3",
        "--mtp-layers",
        "1",
    ]);
    assert!(ok, "{err}");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["num_nextn_predict_layers"], 1);
    const MTP: &str = r#"{"method":"mtp","num_speculative_tokens":1}"#;
    let gen = |extra: &[&str]| {
        let args = [
            &[
                "generate",
                "--model",
                dir,
                "--json",
                "--input-ids",
                "5,6,7,8,9",
            ][..],
            &["--max-tokens", "16", "--ignore-eos"],
            extra,
        ]
        .concat();
        let (ok, out, err) = run_cli(&args);
        assert!(ok, "{err}");
        ids(&out)
    };
    let plain = gen(&[]);
    assert_eq!(plain.len(), 16);
    assert_eq!(gen(&["--speculative-config", MTP]), plain);

    let (ok, out, err) = run_cli(&[
        "bench",
        "--model",
        dir,
        "--prompt-len",
        "8",
        "--gen-len",
        "6",
        "--json",
        "--speculative-config",
        MTP,
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["speculative"]["method"], "mtp", "{v}");
    let drafts = v["speculative"]["draft_tokens"]
        .as_u64()
        .expect("draft_tokens");
    assert!(drafts > 0, "{v}");

    // The shared test model has no MTP layer.
    let model = model_arg();
    let (ok, _, err) = run_cli(&[
        "generate",
        "--model",
        model.as_str(),
        "--input-ids",
        "1,2",
        "--speculative-config",
        MTP,
    ]);
    assert!(!ok);
    assert!(
        err.contains("num_nextn_predict_layers") && err.contains("mtp"),
        "{err}"
    );
    // Three drafts a step from the one layer, chained.
    assert_eq!(
        gen(&[
            "--speculative-config",
            r#"{"method":"mtp","num_speculative_tokens":3}"#
        ]),
        plain
    );
}
