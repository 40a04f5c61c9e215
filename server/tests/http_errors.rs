//! Every error class of the HTTP API, against the real server: status, error shape (OpenAI and
//! Anthropic), `param`/`code`, and the routing headers; plus auth.

mod common;

use common::{anthropic_error, assert_routing_headers, client, openai_error, Opts, Server};
use serde_json::{json, Value};

async fn post(s: &Server, path: &str, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client()
        .post(s.url(path))
        .json(&body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, h, v)
}

fn chat(extra: Value) -> Value {
    let mut b =
        json!({"model": "local", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    b
}

#[tokio::test]
async fn malformed_json_is_400_in_both_shapes() {
    let s = Server::start();
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/messages"] {
        let r = client()
            .post(s.url(path))
            .header("content-type", "application/json")
            .body("{\"model\": \"local\", ")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "{path}");
        assert_routing_headers(r.headers());
        let v: Value = r.json().await.expect("json");
        if path == "/v1/messages" {
            assert_eq!(anthropic_error(&v)["type"], "invalid_request_error");
        } else {
            let e = openai_error(&v);
            assert_eq!(e["type"], "invalid_request_error");
            assert_eq!(e["code"], "invalid_json");
        }
    }
}

#[tokio::test]
async fn wrong_types_name_the_field() {
    let s = Server::start();
    let (st, _, v) = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"temperature": "hot"})),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(openai_error(&v)["param"], "temperature");
    let (st, _, v) = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "local", "messages": [{"role": 1, "content": "x"}]}),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(openai_error(&v)["param"], "messages[0].role");
    let (st, _, v) = post(&s, "/v1/chat/completions", json!({"messages": []})).await;
    assert_eq!(st, 400);
    let e = openai_error(&v);
    assert_eq!(e["param"], "model");
    assert_eq!(e["code"], "missing_required_parameter");
    let (st, _, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "local", "prompt": "x", "max_tokens": "many"}),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(openai_error(&v)["param"], "max_tokens");
    let (st, _, v) = post(
        &s,
        "/v1/messages",
        json!({"model": "local", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(st, 400, "max_tokens is required on /v1/messages");
    assert!(anthropic_error(&v)["message"]
        .as_str()
        .unwrap_or("")
        .contains("max_tokens"));
}

#[tokio::test]
async fn out_of_range_values_are_400_with_param() {
    let s = Server::start();
    let cases = [
        (json!({"temperature": 2.5}), "temperature"),
        (json!({"temperature": -0.1}), "temperature"),
        (json!({"top_p": 0.0}), "top_p"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"n": 0}), "n"),
        (json!({"n": 17}), "n"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (
            json!({"max_completion_tokens": -3}),
            "max_completion_tokens",
        ),
        (json!({"presence_penalty": 2.5}), "presence_penalty"),
        (json!({"frequency_penalty": -9}), "frequency_penalty"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"stop": [1, 2]}), "stop[0]"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages[0].content[0]",
        ),
    ];
    for (extra, param) in cases {
        let (st, h, v) = post(&s, "/v1/chat/completions", chat(extra.clone())).await;
        assert_eq!(st, 400, "{extra}: {v}");
        assert_eq!(openai_error(&v)["param"], param, "{extra}: {v}");
        assert_routing_headers(&h);
    }
    let (st, _, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "local", "prompt": "x", "logprobs": 30}),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(openai_error(&v)["param"], "logprobs");
    let (st, _, v) = post(
        &s,
        "/v1/messages",
        json!({"model": "local", "max_tokens": 4, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(st, 400);
    assert!(anthropic_error(&v)["message"]
        .as_str()
        .unwrap_or("")
        .contains("temperature"));
    let (st, _, v) = post(
        &s,
        "/v1/messages",
        json!({"model": "local", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(anthropic_error(&v)["type"], "invalid_request_error");
}

#[tokio::test]
async fn unknown_model_is_404_model_not_found() {
    let s = Server::start();
    let (st, h, v) = post(&s, "/v1/chat/completions", chat(json!({"model": "gpt-17"}))).await;
    assert_eq!(st, 404);
    assert_routing_headers(&h);
    let e = openai_error(&v);
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["param"], "model");
    let (st, _, v) = post(
        &s,
        "/v1/messages",
        json!({"model": "claude-x", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(st, 404);
    assert_eq!(anthropic_error(&v)["type"], "not_found_error");
    // The served id (the folder name), `local` and `auto` are accepted.
    for m in ["switchyard-tiny-model", "local", "auto"] {
        let (st, _, v) = post(&s, "/v1/chat/completions", chat(json!({"model": m}))).await;
        assert_eq!(st, 200, "{m}: {v}");
    }
    let r = client()
        .get(s.url("/v1/models/nope"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn oversized_body_is_413() {
    let s = Server::start_with(Opts {
        args: &["--max-body-bytes", "2KiB"],
        ..Opts::default()
    });
    let big = "x".repeat(4096);
    let (st, h, v) = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"messages": [{"role": "user", "content": big}]})),
    )
    .await;
    assert_eq!(st, 413);
    assert_routing_headers(&h);
    assert_eq!(openai_error(&v)["code"], "request_too_large");
    let (st, _, v) = post(
        &s,
        "/v1/messages",
        json!({"model": "local", "max_tokens": 4, "messages": [{"role": "user", "content": big}]}),
    )
    .await;
    assert_eq!(st, 413);
    assert_eq!(anthropic_error(&v)["type"], "request_too_large");
    // Under the limit still works.
    let (st, _, _) = post(&s, "/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn over_context_is_400_context_length_exceeded() {
    let s = Server::start();
    let (st, _, v) = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"max_tokens": 5000})),
    )
    .await;
    assert_eq!(st, 400);
    let e = openai_error(&v);
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["param"], "messages");
    let long = "word ".repeat(2000);
    let (st, _, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "local", "prompt": long}),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(openai_error(&v)["code"], "context_length_exceeded");
    let (st, _, v) = post(
        &s,
        "/v1/messages",
        json!({"model": "local", "max_tokens": 5000, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(anthropic_error(&v)["type"], "invalid_request_error");
}

#[tokio::test]
async fn queue_full_is_429_with_retry_after() {
    // One sequence at a time and one waiting: a burst overflows the queue.
    let s = Server::start_with(Opts {
        args: &["--max-num-seqs", "1", "--max-waiting", "1"],
        ..Opts::default()
    });
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let c = c.clone();
        let url = s.url(if i % 2 == 0 {
            "/v1/chat/completions"
        } else {
            "/v1/messages"
        });
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "local", "max_tokens": 64, "ignore_eos": true,
                              "messages": [{"role": "user", "content": format!("request {i}")}]});
            let r = c.post(&url).json(&body).send().await.expect("send");
            let st = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or("").to_string());
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (url, st, retry, v)
        }));
    }
    let mut refused = 0;
    for t in tasks {
        let (url, st, retry, v) = t.await.expect("task");
        if st == 429 {
            refused += 1;
            assert!(retry.is_some(), "429 without Retry-After");
            if url.ends_with("/v1/messages") {
                assert_eq!(anthropic_error(&v)["type"], "rate_limit_error");
            } else {
                let e = openai_error(&v);
                assert_eq!(e["type"], "rate_limit_error");
                assert_eq!(e["code"], "rate_limit_exceeded");
            }
        } else {
            assert_eq!(st, 200, "{v}");
        }
    }
    assert!(refused > 0, "no request was refused");
}

#[tokio::test]
async fn api_key_is_required_on_v1_only() {
    let key = "sk-test-4f9a1c0e7b";
    let s = Server::start_with(Opts {
        args: &["--api-key-env", "SWITCHYARD_TEST_KEY"],
        env: &[("SWITCHYARD_TEST_KEY", key)],
    });
    let c = client();
    let body = chat(json!({}));
    // No key, wrong key: 401 invalid_api_key.
    let r = c
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    assert_routing_headers(r.headers());
    let v: Value = r.json().await.expect("json");
    assert_eq!(openai_error(&v)["code"], "invalid_api_key");
    let r = c
        .get(s.url("/v1/models"))
        .bearer_auth("sk-wrong")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.expect("json");
    assert_eq!(openai_error(&v)["type"], "authentication_error");
    let r = c
        .post(s.url("/v1/messages"))
        .header("x-api-key", "nope")
        .json(&json!({"model": "local", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.expect("json");
    assert_eq!(anthropic_error(&v)["type"], "authentication_error");
    // Right key, either header.
    let r = c
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let r = c
        .get(s.url("/v1/models"))
        .header("x-api-key", key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    // vLLM's tokenizer endpoints are outside /v1 but still need the key.
    for path in ["/tokenize", "/detokenize"] {
        let body = json!({"prompt": "x", "tokens": [1]});
        let r = c.post(s.url(path)).json(&body).send().await.expect("send");
        assert_eq!(r.status(), 401, "{path}");
        let r = c
            .post(s.url(path))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "{path}");
    }
    // Probes and scrapers need no key.
    assert_eq!(
        c.get(s.url("/health")).send().await.expect("send").status(),
        200
    );
    assert_eq!(
        c.get(s.url("/metrics"))
            .send()
            .await
            .expect("send")
            .status(),
        200
    );
    // The key never reaches the log.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = s.log();
    assert!(
        log.contains("/v1/chat/completions"),
        "request log missing:\n{log}"
    );
    assert!(!log.contains(key), "the API key appeared in the log");
}

#[tokio::test]
async fn unknown_route_is_404_in_openai_shape() {
    let s = Server::start();
    let r = client().get(s.url("/v1/nope")).send().await.expect("send");
    assert_eq!(r.status(), 404);
    assert_routing_headers(r.headers());
    let v: Value = r.json().await.expect("json");
    assert_eq!(openai_error(&v)["type"], "not_found_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    use futures_util::StreamExt;
    let mut s = Server::start();
    let c = client();
    let r = c
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "local", "prompt": "abc", "max_tokens": 500, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::new();
    if let Some(Ok(b)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&b));
    }
    // Mid-stream: ask the server to stop, then read the rest.
    let pid = s.pid();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    assert!(killed.is_ok_and(|k| k.success()));
    while let Some(Ok(b)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&b));
    }
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "stream was cut: {}",
        &text[text.len().saturating_sub(200)..]
    );
    let status = tokio::task::block_in_place(|| s.terminate(std::time::Duration::from_secs(60)));
    assert!(
        status.is_some_and(|st| st.success()),
        "server did not exit cleanly: {status:?}"
    );
    assert!(s.log().contains("shutting down"));
}
