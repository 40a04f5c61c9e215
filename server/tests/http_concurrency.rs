//! Concurrency against the real server: 64 simultaneous streams complete with exact usage, and
//! 200 streams dropped by their clients after the first token free every KV block.

mod common;

use std::time::{Duration, Instant};

use common::{chat_prompt_len, client, metric, Server};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// Reads an SSE response until `[DONE]`, returning the parsed chunks.
async fn read_chunks(r: reqwest::Response) -> Vec<Value> {
    let body = r.text().await.expect("body");
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "stream did not end with [DONE]: {body}"
    );
    common::parse_sse(&body)
        .into_iter()
        .filter(|(_, d)| d != "[DONE]")
        .map(|(_, d)| serde_json::from_str(&d).expect("chunk json"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_streams_have_exact_usage() {
    let s = Server::start();
    let c = client();
    const N: usize = 64;
    const MAX_TOKENS: usize = 32;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..N {
        let c = c.clone();
        let url = s.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let prompt = format!("concurrent request number {i}: tell me something");
            let r = c
                .post(&url)
                .json(&json!({"model": "local", "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": i,
                              "stream": true, "stream_options": {"include_usage": true},
                              "messages": [{"role": "user", "content": prompt}]}))
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200);
            (prompt, read_chunks(r).await)
        }));
    }
    let mut generated = 0u64;
    for t in tasks {
        let (prompt, chunks) = t.await.expect("task");
        let usage = &chunks.last().expect("usage chunk")["usage"];
        let tokens = chunks
            .iter()
            .filter(|c| {
                let ch = &c["choices"][0];
                ch["finish_reason"].is_null() && ch["delta"].get("role").is_none() && ch.is_object()
            })
            .count() as u64;
        assert_eq!(
            usage["completion_tokens"].as_u64(),
            Some(tokens),
            "completion_tokens vs tokens received"
        );
        assert!(tokens >= 1 && tokens <= MAX_TOKENS as u64);
        assert_eq!(
            usage["prompt_tokens"].as_u64(),
            Some(chat_prompt_len(&[("user", &prompt)]) as u64)
        );
        assert_eq!(
            chunks
                .iter()
                .filter(|c| c["choices"][0]["finish_reason"].is_string())
                .count(),
            1
        );
        generated += tokens;
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "64 concurrent streams: {secs:.2} s, {generated} tokens, {:.0} generated tokens/s",
        generated as f64 / secs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_dropped_streams_free_every_kv_block() {
    let s = Server::start();
    let c = client();
    const N: usize = 200;
    let mut tasks = Vec::new();
    for i in 0..N {
        let c = c.clone();
        let url = s.url(if i % 2 == 0 {
            "/v1/chat/completions"
        } else {
            "/v1/messages"
        });
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(&url)
                .json(
                    &json!({"model": "local", "max_tokens": 400, "ignore_eos": true, "stream": true,
                              "messages": [{"role": "user", "content": format!("cancel me {i}")}]}),
                )
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200);
            // Read until the first generated token, then drop the connection.
            let mut body = r.bytes_stream();
            let mut seen = String::new();
            while let Some(Ok(b)) = body.next().await {
                seen.push_str(&String::from_utf8_lossy(&b));
                let first_token = if url.ends_with("/v1/messages") {
                    seen.contains("content_block_delta")
                } else {
                    // The role chunk, then the first token's chunk.
                    seen.matches("data:").count() >= 2
                };
                if first_token {
                    break;
                }
            }
            assert!(
                !seen.contains("[DONE]") && !seen.contains("message_stop"),
                "finished before the client dropped it"
            );
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    // The engine notices each drop at its next step; poll until every block is free.
    let t0 = Instant::now();
    let mut last = String::new();
    loop {
        last = c
            .get(s.url("/metrics"))
            .send()
            .await
            .expect("send")
            .text()
            .await
            .unwrap_or(last);
        let used = metric(&last, "switchyard_kv_cache_blocks_used");
        let running = metric(&last, "switchyard_num_requests_running");
        let waiting = metric(&last, "switchyard_num_requests_waiting");
        let cancelled = common::metric_sum(&last, "switchyard_requests_cancelled_total", &[]);
        if used == Some(0.0)
            && running == Some(0.0)
            && waiting == Some(0.0)
            && cancelled == N as f64
        {
            eprintln!(
                "200 dropped streams: all KV blocks free {:.0} ms after the last drop",
                t0.elapsed().as_secs_f64() * 1e3
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "KV blocks still used 10 s after the clients left: used={used:?} running={running:?} waiting={waiting:?} cancelled={cancelled}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(&last, "switchyard_kv_cache_blocks_free"),
        metric(&last, "switchyard_kv_cache_blocks_total")
    );
    // The server still serves afterwards.
    let v: Value = c
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "local", "prompt": "after", "max_tokens": 3}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert!(v["usage"]["completion_tokens"]
        .as_u64()
        .is_some_and(|n| n >= 1));
}

/// Every new decoding feature at once, on one small server with speculative drafts on and a KV
/// cache small enough to preempt: structured outputs, forced tool calls, predictions,
/// logit_bias, echo and plain requests, streamed and not, 24 in flight. Every answer has its
/// promised shape, and afterwards nothing runs and no KV block is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_feature_requests_together_all_finish_in_shape() {
    let s = Server::start_with(common::Opts {
        args: &[
            "--max-model-len",
            "1024",
            "--kv-cache-memory",
            "1MiB",
            "--speculative-config",
            r#"{"method":"ngram","num_speculative_tokens":3,"prompt_lookup_min":1}"#,
        ],
        ..Default::default()
    });
    let c = client();
    let schema = json!({"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
                        "required": ["k", "n"], "additionalProperties": false});
    let tool = json!({"type": "function", "function": {"name": "t", "parameters": {"type": "object",
        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"], "additionalProperties": false}}});
    let mut tasks = Vec::new();
    for i in 0..24usize {
        let c = c.clone();
        let (schema, tool) = (schema.clone(), tool.clone());
        let chat_url = s.url("/v1/chat/completions");
        let comp_url = s.url("/v1/completions");
        tasks.push(tokio::spawn(async move {
            let stream = i % 2 == 1;
            let msgs = json!([{"role": "user", "content": format!("abc abc abc request {i}")}]);
            let (url, body, kind) = match i % 6 {
                0 => (chat_url, json!({"model": "local", "messages": msgs, "max_tokens": 60, "temperature": 1.0, "seed": i,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}), "schema"),
                1 => (chat_url, json!({"model": "local", "messages": msgs, "max_tokens": 60, "temperature": 1.0, "seed": i,
                    "tools": [tool], "tool_choice": "required"}), "tool"),
                2 => (chat_url, json!({"model": "local", "messages": msgs, "max_tokens": 20, "temperature": 0,
                    "prediction": {"type": "content", "content": "abc abc abc abc"}}), "plain"),
                3 => (comp_url, json!({"model": "local", "prompt": "abc abc abc", "max_tokens": 8, "echo": true, "logprobs": 1}), "echo"),
                4 => (chat_url, json!({"model": "local", "messages": msgs, "max_tokens": 16, "logit_bias": {"65": 100}}), "plain"),
                _ => (comp_url, json!({"model": "local", "prompt": format!("xyz {i} xyz {i} xyz"), "max_tokens": 24, "ignore_eos": true}), "plain"),
            };
            let mut body = body;
            if stream && kind != "echo" {
                body["stream"] = json!(true);
            }
            let r = c.post(&url).json(&body).send().await.expect("send");
            assert_eq!(r.status(), 200, "request {i} ({kind})");
            let text = r.text().await.expect("body");
            (i, kind, stream && kind != "echo", text)
        }));
    }
    for t in tasks {
        let (i, kind, streamed, text) = t.await.expect("task");
        // Gather the answer: content (or text) and tool calls, from JSON or SSE.
        let (mut content, mut calls) = (String::new(), Vec::<Value>::new());
        let mut take = |v: &Value| {
            let ch = &v["choices"][0];
            let m = if streamed {
                &ch["delta"]
            } else {
                &ch["message"]
            };
            content.push_str(m["content"].as_str().or(ch["text"].as_str()).unwrap_or(""));
            // A streamed call comes in pieces: its first entry names it, later ones (same
            // index) add argument text.
            for t in m["tool_calls"].as_array().into_iter().flatten() {
                match calls
                    .iter_mut()
                    .find(|c| streamed && c["index"] == t["index"])
                {
                    Some(c) => {
                        let joined = format!(
                            "{}{}",
                            c["function"]["arguments"].as_str().unwrap_or(""),
                            t["function"]["arguments"].as_str().unwrap_or("")
                        );
                        c["function"]["arguments"] = json!(joined);
                    }
                    None => calls.push(t.clone()),
                }
            }
        };
        if streamed {
            assert!(text.ends_with("data: [DONE]\n\n"), "request {i}: {text}");
            for (_, d) in common::parse_sse(&text) {
                if d != "[DONE]" {
                    take(&serde_json::from_str(&d).expect("chunk"));
                }
            }
        } else {
            take(&serde_json::from_str(&text).expect("json"));
        }
        match kind {
            "schema" => {
                let v: Value = serde_json::from_str(&content)
                    .unwrap_or_else(|e| panic!("request {i}: {e}: {content:?}"));
                assert!(v["k"] == "a" || v["k"] == "b", "request {i}: {content}");
            }
            "tool" => {
                assert_eq!(calls.len(), 1, "request {i}: {text}");
                let args: Value =
                    serde_json::from_str(calls[0]["function"]["arguments"].as_str().expect("args"))
                        .expect("JSON args");
                assert!(
                    args["x"].as_u64().is_some_and(|x| x <= 9),
                    "request {i}: {args}"
                );
            }
            "echo" => assert!(
                content.starts_with("abc abc abc"),
                "request {i}: {content:?}"
            ),
            _ => {}
        }
    }
    // Nothing left running, no block held.
    let mut used = f64::NAN;
    for _ in 0..100 {
        let m = common::metrics_text(&s).await;
        used = metric(&m, "switchyard_kv_cache_blocks_used").unwrap_or(f64::NAN);
        if used == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(used, 0.0);
    let m = common::metrics_text(&s).await;
    let pre = metric(&m, "switchyard_engine_preemptions").unwrap_or(0.0);
    let acc = metric(&m, "switchyard_spec_decode_accepted_tokens").unwrap_or(0.0);
    println!("mixed features: {pre} preemptions, {acc} draft tokens accepted");
    assert!(pre > 0.0, "the 1 MiB cache should have forced preemptions");
    assert!(
        acc > 0.0,
        "drafts (lookup, prediction or forced text) should have been accepted"
    );
}
