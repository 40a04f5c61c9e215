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
