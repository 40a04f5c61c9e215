//! A `vllm serve` launch line starts Switchyard unchanged (`server/src/vllm_flags.rs`): the
//! flags with an effect are checked for it (`--api-key`, CORS's `--allowed-origins` family,
//! `--tool-call-parser`, `--disable-log-requests`, the prefix-caching and chunked-prefill
//! spellings), the others are accepted and logged as having no effect, and bad values are
//! refused naming the flag.

mod common;

use common::{client, post, run_cli, Opts, Server};
use serde_json::{json, Value};

/// The body of `GET path`.
async fn get_text(s: &Server, path: &str) -> String {
    client()
        .get(s.url(path))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn chat() -> Value {
    json!({"model": "local", "max_tokens": 4, "temperature": 0,
           "messages": [{"role": "user", "content": "Hi"}]})
}

/// A launch line as written for vLLM, with an API key and one allowed origin.
fn vllm_server(extra: &[&str]) -> Server {
    let mut args = vec![
        "--api-key",
        "sk-test",
        "--trust-remote-code",
        "--enforce-eager",
        "--disable-log-stats",
        "--enable-auto-tool-choice",
        "--reasoning-parser",
        "hy_v3",
        "--gpu-memory-utilization",
        "0.85",
        "--enable-prefix-caching",
        "--no-enable-chunked-prefill",
        "--uvicorn-log-level",
        "warning",
        "--allowed-origins",
        r#"["http://localhost:3000"]"#,
        "--max-model-len",
        "2048",
    ];
    args.extend_from_slice(extra);
    Server::start_with(Opts {
        args: &args,
        ..Default::default()
    })
}

#[tokio::test]
async fn a_vllm_launch_line_serves_with_its_key_and_cors() {
    let s = vllm_server(&["--disable-log-requests"]);
    // --api-key: required on /v1, as with --api-key-env.
    assert_eq!(
        post(&s, "/v1/chat/completions", chat(), &[]).await.status,
        401
    );
    let ok = post(
        &s,
        "/v1/chat/completions",
        chat(),
        &[("authorization", "Bearer sk-test")],
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text);

    // CORS preflight from the allowed origin: answered before the key check.
    let pre = client()
        .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
        .header("origin", "http://localhost:3000")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 200);
    let h = pre.headers();
    assert_eq!(
        h["access-control-allow-origin"], "http://localhost:3000",
        "{h:?}"
    );
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    assert!(methods == "*" || methods.contains("POST"), "{methods}");
    // The actual request carries the header too; another origin gets none.
    let key = ("authorization", "Bearer sk-test");
    let path = "/v1/chat/completions";
    let r = post(
        &s,
        path,
        chat(),
        &[("origin", "http://localhost:3000"), key],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        "http://localhost:3000"
    );
    let other = post(&s, path, chat(), &[("origin", "http://evil.example"), key]).await;
    assert!(other.header_opt("access-control-allow-origin").is_none());

    // The flags without an effect say so; --disable-log-requests drops the per-request lines
    // (the metrics still count the requests).
    let log = s.log();
    for flag in [
        "--trust-remote-code",
        "--enforce-eager",
        "--disable-log-stats",
        "--enable-auto-tool-choice",
        "--uvicorn-log-level",
        "--gpu-memory-utilization",
    ] {
        assert!(
            log.contains(flag) && log.contains("no effect"),
            "{flag} not reported:\n{log}"
        );
    }
    assert!(!log.contains("latency_ms"), "request lines logged:\n{log}");
    let metrics = get_text(&s, "/metrics").await;
    assert!(
        common::metric_sum(&metrics, "switchyard_http_requests_total", &[]) >= 4.0,
        "{metrics}"
    );
}

/// Without `--allowed-origins` no CORS headers are sent (unlike vLLM's default `*`), and
/// request lines are logged.
#[tokio::test]
async fn without_allowed_origins_there_is_no_cors() {
    let s = Server::start();
    let pre = client()
        .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
        .header("origin", "http://localhost:3000")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(pre.headers().get("access-control-allow-origin").is_none());
    let r = post(
        &s,
        "/v1/chat/completions",
        chat(),
        &[("origin", "http://localhost:3000")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.header_opt("access-control-allow-origin").is_none());
    assert!(s.log().contains("latency_ms"));
}

/// The raw text of a forced call (`tool_choice` names the function), from its token ids.
async fn forced_call_text(s: &Server) -> (Value, String) {
    let tool = json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 8}},
            "required": ["city"], "additionalProperties": false}}});
    let v = post(
        s,
        "/v1/chat/completions",
        json!({"model": "local", "max_tokens": 80, "temperature": 1.0, "seed": 3,
               "messages": [{"role": "user", "content": "Weather?"}],
               "tools": [tool], "return_token_ids": true,
               "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        &[],
    )
    .await
    .json();
    let choice = &v["choices"][0];
    let ids = choice["token_ids"].clone();
    let text = post(
        s,
        "/detokenize",
        json!({"model": "local", "tokens": ids}),
        &[],
    )
    .await
    .json()["prompt"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string();
    (choice["message"]["tool_calls"][0].clone(), text)
}

/// `--tool-call-parser` picks the format a call is written and read in: the tiny model's
/// template is Hermes (JSON in `<tool_call>`), and `hy_v3` makes the forced call Hy3's
/// `<arg_key>`/`<arg_value>` form, parsed back into the same OpenAI `tool_calls` shape.
#[tokio::test]
async fn tool_call_parser_sets_the_call_format() {
    for (parser, marker) in [("auto", "{\"name\""), ("hy_v3", "<arg_key>city</arg_key>")] {
        let s = Server::start_with(Opts {
            args: &["--max-model-len", "2048", "--tool-call-parser", parser],
            ..Default::default()
        });
        let (call, text) = forced_call_text(&s).await;
        assert!(text.contains(marker), "{parser}: {text}");
        assert_eq!(
            call["function"]["name"], "get_weather",
            "{parser}: {call} {text:?}"
        );
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        let city = args["city"].as_str().unwrap_or_else(|| panic!("{args}"));
        assert!(city.chars().count() <= 8, "{parser}: {args}");
    }
}

#[test]
fn bad_vllm_flag_values_are_refused_naming_the_flag() {
    let model = common::model_arg();
    for (extra, words) in [
        (
            &["--gpu-memory-utilization", "1.5"][..],
            "--gpu-memory-utilization 1.5",
        ),
        (
            &["--gpu-memory-utilization", "0"][..],
            "--gpu-memory-utilization 0",
        ),
        (
            &["--tool-call-parser", "mistral"][..],
            "--tool-call-parser \"mistral\"",
        ),
        (
            &["--reasoning-parser", "gptoss"][..],
            "--reasoning-parser \"gptoss\"",
        ),
        (&["--api-key", " "][..], "--api-key is empty"),
        (
            &["--api-key", "k", "--api-key-env", "K"][..],
            "--api-key-env",
        ),
        (
            &["--allowed-origins", "*", "--allow-credentials"][..],
            "--allow-credentials",
        ),
        (
            &["--allowed-origins", "localhost:3000"][..],
            "--allowed-origins",
        ),
        (&["--allowed-methods", "GET"][..], "--allowed-origins"),
        (
            &["--enable-prefix-caching", "--no-prefix-caching"][..],
            "--no-prefix-caching",
        ),
    ] {
        let mut args = vec!["serve", "--model", model.as_str(), "--port", "0"];
        args.extend_from_slice(extra);
        let (ok, _, err) = run_cli(&args);
        assert!(!ok, "{extra:?} was accepted");
        assert!(err.contains(words), "{extra:?}: {err}");
    }
}

/// `--served-model-name` with several names (requests may use any; responses and `/v1/models`
/// say the first), vLLM's `GET /version` and SageMaker's `/ping`.
#[tokio::test]
async fn several_served_names_version_and_ping() {
    let s = Server::start_with(Opts {
        args: &["--served-model-name", "hy3-mini", "tiny-alias"],
        ..Default::default()
    });
    for name in ["hy3-mini", "tiny-alias"] {
        let mut body = chat();
        body["model"] = json!(name);
        let r = post(&s, "/v1/chat/completions", body, &[]).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text);
        assert_eq!(r.json()["model"], "hy3-mini");
    }
    let mut body = chat();
    body["model"] = json!("other");
    let r = post(&s, "/v1/chat/completions", body, &[]).await;
    assert_eq!(r.status, 404, "{}", r.text);
    let models: Value = serde_json::from_str(&get_text(&s, "/v1/models").await).unwrap();
    assert_eq!(models["data"][0]["id"], "hy3-mini", "{models}");
    let v: Value = serde_json::from_str(&get_text(&s, "/version").await).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let r = client()
            .request(method, s.url("/ping"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// `--enable-force-include-usage`: a stream that did not ask for usage still ends with the
/// usage chunk (null usage on the others), with the right counts.
#[tokio::test]
async fn force_include_usage_ends_every_stream_with_usage() {
    let s = Server::start_with(Opts {
        args: &["--enable-force-include-usage"],
        ..Default::default()
    });
    let mut body = chat();
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let r = post(&s, "/v1/chat/completions", body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let chunks: Vec<Value> = common::parse_sse(&r.text)
        .into_iter()
        .filter(|(_, d)| d != "[DONE]")
        .map(|(_, d)| serde_json::from_str(&d).unwrap())
        .collect();
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(last["usage"]["completion_tokens"], 4, "{last}");
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));
}

/// Every response carries `x-request-id`: the client's when it sent a usable one (echoed, also
/// on errors and on `/health`), else a fresh `req_` + 24 hex digits, different per request;
/// the per-request log line names it.
#[tokio::test]
async fn responses_carry_the_request_id() {
    let s = Server::start();
    let fresh = |r: &common::Reply| {
        let id = r.header("x-request-id").to_string();
        assert!(
            id.len() == 28
                && id.starts_with("req_")
                && id[4..].bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        id
    };
    let a = post(&s, "/v1/chat/completions", chat(), &[]).await;
    let b = post(&s, "/v1/chat/completions", chat(), &[]).await;
    assert_ne!(fresh(&a), fresh(&b));
    let mine = post(
        &s,
        "/v1/chat/completions",
        chat(),
        &[("x-request-id", "trace-42")],
    )
    .await;
    assert_eq!(mine.header("x-request-id"), "trace-42");
    let mut bad = chat();
    bad["temperature"] = json!(-1);
    let err = post(
        &s,
        "/v1/chat/completions",
        bad,
        &[("x-request-id", "trace-43")],
    )
    .await;
    assert_eq!((err.status, err.header("x-request-id")), (400, "trace-43"));
    let long = "x".repeat(129);
    fresh(
        &post(
            &s,
            "/v1/chat/completions",
            chat(),
            &[("x-request-id", &long)],
        )
        .await,
    );
    let h = client()
        .get(s.url("/health"))
        .header("x-request-id", "probe-1")
        .send()
        .await
        .unwrap();
    assert_eq!(h.headers()["x-request-id"], "probe-1");
    assert!(s.log().contains("request_id=trace-42"), "{}", s.log());
}
