//! The success paths of the HTTP API against the real server: response bodies, usage, SSE
//! framing (OpenAI chunks, `include_usage`, `[DONE]`; Anthropic's event sequence), headers,
//! `n`, logprobs, stop strings, `/v1/models`, `/health` and `/metrics`.

mod common;

use common::{
    assert_routing_headers, chat_prompt_len, client, metric, metric_sum, parse_sse, Server,
};
use serde_json::{json, Value};

#[tokio::test]
async fn chat_completion_body_and_usage() {
    let s = Server::start();
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "local", "max_tokens": 8, "temperature": 0,
                      "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hello"}]}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_routing_headers(r.headers());
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().is_some_and(|i| i.starts_with("chatcmpl-")));
    assert!(v["system_fingerprint"]
        .as_str()
        .is_some_and(|f| f.starts_with("fp_")));
    assert_eq!(v["model"], "switchyard-tiny-model");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    assert!(c["message"]["content"].is_string());
    assert!(matches!(
        c["finish_reason"].as_str(),
        Some("stop") | Some("length")
    ));
    let u = &v["usage"];
    let prompt = chat_prompt_len(&[("system", "be brief"), ("user", "hello")]);
    assert_eq!(u["prompt_tokens"], prompt);
    let completion = u["completion_tokens"].as_u64().unwrap_or(0);
    assert!((1..=8).contains(&completion), "{u}");
    assert_eq!(u["total_tokens"].as_u64(), Some(prompt as u64 + completion));
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());
    if c["finish_reason"] == "length" {
        assert_eq!(completion, 8);
    }
}

#[tokio::test]
async fn chat_is_deterministic_at_temperature_zero_and_n_gives_choices() {
    let s = Server::start();
    let body = json!({"model": "local", "max_tokens": 12, "temperature": 0, "n": 3, "ignore_eos": true,
                      "messages": [{"role": "user", "content": "same"}]});
    let v: Value = client()
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let choices = v["choices"].as_array().cloned().unwrap_or_default();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["content"], choices[0]["message"]["content"]);
        assert_eq!(c["finish_reason"], "length");
    }
    assert_eq!(v["usage"]["completion_tokens"], 36);
    assert_eq!(
        v["usage"]["prompt_tokens"],
        chat_prompt_len(&[("user", "same")])
    );
}

#[tokio::test]
async fn chat_stream_with_include_usage() {
    let s = Server::start();
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "local", "max_tokens": 10, "stream": true, "stream_options": {"include_usage": true},
                      "logprobs": true, "top_logprobs": 2, "messages": [{"role": "user", "content": "stream please"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_routing_headers(r.headers());
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/event-stream"));
    let body = r.text().await.expect("body");
    let events = parse_sse(&body);
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(events.iter().all(|(name, _)| name.is_none()));
    let (last, rest) = events.split_last().expect("events");
    assert_eq!(last.1, "[DONE]");
    let chunks: Vec<Value> = rest
        .iter()
        .map(|(_, d)| serde_json::from_str(d).expect("chunk json"))
        .collect();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert!(c["system_fingerprint"].is_string());
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = chunks.last().expect("usage chunk");
    assert_eq!(usage_chunk["choices"].as_array().map(Vec::len), Some(0));
    let u = &usage_chunk["usage"];
    // Every chunk before the usage chunk carries `usage: null`.
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null() && c.get("usage").is_some()));
    let token_chunks: Vec<&Value> = chunks[1..chunks.len() - 1]
        .iter()
        .filter(|c| c["choices"][0]["finish_reason"].is_null())
        .collect();
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| c["choices"][0]["finish_reason"].is_string())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(
        u["completion_tokens"].as_u64(),
        Some(token_chunks.len() as u64)
    );
    assert_eq!(
        u["prompt_tokens"],
        chat_prompt_len(&[("user", "stream please")])
    );
    for c in &token_chunks {
        let lp = &c["choices"][0]["logprobs"]["content"];
        assert_eq!(lp.as_array().map(Vec::len), Some(1));
        assert!(lp[0]["logprob"].as_f64().is_some_and(|x| x <= 0.0));
        assert_eq!(lp[0]["top_logprobs"].as_array().map(Vec::len), Some(2));
        assert!(lp[0]["bytes"].is_array());
    }
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage() {
    let s = Server::start();
    let body = client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "local", "max_tokens": 3, "stream": true, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("body");
    assert!(!body.contains("\"usage\""), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn completions_plain_stream_logprobs_and_stop() {
    let s = Server::start();
    let c = client();
    // Token-id prompt: prompt_tokens is its length.
    let v: Value = c
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "local", "prompt": [5, 6, 7, 8], "max_tokens": 6, "logprobs": 3, "ignore_eos": true}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().map(Vec::len), Some(6));
    assert_eq!(lp["token_logprobs"].as_array().map(Vec::len), Some(6));
    assert_eq!(lp["text_offset"][0], 0);
    assert!(lp["top_logprobs"][0]
        .as_object()
        .is_some_and(|o| !o.is_empty() && o.len() <= 3));
    // Two prompts × n=2 → four choices.
    let v: Value = c
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "local", "prompt": ["a b", "c d"], "n": 2, "max_tokens": 2, "ignore_eos": true}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(4));
    assert_eq!(v["usage"]["completion_tokens"], 8);
    // Streaming.
    let body = c
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "local", "prompt": "once upon", "max_tokens": 5, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}}))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("body");
    let events = parse_sse(&body);
    assert_eq!(events.last().map(|e| e.1.as_str()), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).expect("json"))
        .collect();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let tokens = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["finish_reason"].is_null()
                && !c["choices"].as_array().is_some_and(Vec::is_empty)
        })
        .count();
    assert_eq!(tokens, 5);
    assert_eq!(
        chunks
            .last()
            .map(|c| c["usage"]["completion_tokens"].clone()),
        Some(json!(5))
    );
    // A stop string that the text must not contain: generate, then stop on a piece of it.
    let full: Value = c
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "local", "prompt": "xyz", "max_tokens": 24, "temperature": 0, "ignore_eos": true}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let text = full["choices"][0]["text"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "24 tokens gave only {text:?}");
    {
        let stop: String = chars[3..5].iter().collect();
        let v: Value = c
            .post(s.url("/v1/completions"))
            .json(&json!({"model": "local", "prompt": "xyz", "max_tokens": 24, "temperature": 0, "ignore_eos": true, "stop": stop}))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let got = v["choices"][0]["text"].as_str().unwrap_or("");
        assert!(
            !got.contains(&stop),
            "{got:?} contains the stop string {stop:?}"
        );
        assert!(text.starts_with(got));
    }
}

#[tokio::test]
async fn anthropic_messages_plain_and_stream() {
    let s = Server::start();
    let c = client();
    let r = c
        .post(s.url("/v1/messages"))
        .json(
            &json!({"model": "local", "max_tokens": 7, "system": "terse", "temperature": 0,
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_routing_headers(r.headers());
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert!(v["id"].as_str().is_some_and(|i| i.starts_with("msg_")));
    assert_eq!(v["content"][0]["type"], "text");
    assert!(matches!(
        v["stop_reason"].as_str(),
        Some("end_turn") | Some("max_tokens")
    ));
    let u = &v["usage"];
    let prompt = chat_prompt_len(&[("system", "terse"), ("user", "hi")]) as u64;
    assert_eq!(
        u["input_tokens"].as_u64().unwrap_or(0)
            + u["cache_read_input_tokens"].as_u64().unwrap_or(0),
        prompt
    );
    assert!(u["output_tokens"]
        .as_u64()
        .is_some_and(|o| (1..=7).contains(&o)));

    let r = c
        .post(s.url("/v1/messages"))
        .json(&json!({"model": "local", "max_tokens": 6, "stream": true, "messages": [{"role": "user", "content": "go"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_routing_headers(r.headers());
    let body = r.text().await.expect("body");
    let events = parse_sse(&body);
    let names: Vec<&str> = events
        .iter()
        .map(|(n, _)| n.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(
        &names[..3],
        &["message_start", "content_block_start", "ping"]
    );
    assert_eq!(
        &names[names.len() - 3..],
        &["content_block_stop", "message_delta", "message_stop"]
    );
    let deltas: Vec<Value> = events
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("content_block_delta"))
        .map(|(_, d)| serde_json::from_str(d).expect("json"))
        .collect();
    assert!(deltas.iter().all(|d| d["delta"]["type"] == "text_delta"));
    for (name, data) in &events {
        let v: Value = serde_json::from_str(data).expect("json");
        assert_eq!(
            v["type"].as_str(),
            name.as_deref(),
            "event name and type agree"
        );
    }
    let md: Value = serde_json::from_str(&events[events.len() - 2].1).expect("json");
    // Deltas carry text, not tokens: a token whose text is held back (a partial UTF-8
    // character, a possible stop string or tag) sends none.
    let out = md["usage"]["output_tokens"].as_u64().unwrap_or(0);
    assert!(
        out >= deltas.len() as u64 && !deltas.is_empty(),
        "{out} tokens, {} deltas",
        deltas.len()
    );
    assert!(matches!(
        md["delta"]["stop_reason"].as_str(),
        Some("end_turn") | Some("max_tokens")
    ));
    if md["delta"]["stop_reason"] == "max_tokens" {
        assert_eq!(out, 6);
    }
    let start: Value = serde_json::from_str(&events[0].1).expect("json");
    let su = &start["message"]["usage"];
    assert_eq!(
        su["input_tokens"].as_u64().unwrap() + su["cache_read_input_tokens"].as_u64().unwrap(),
        chat_prompt_len(&[("user", "go")]) as u64
    );
}

/// Anthropic counts prompt tokens read from the cache apart from `input_tokens`, in
/// `message_start` as in the final usage; a repeated prompt is served from the prefix cache.
#[tokio::test]
async fn anthropic_stream_reports_cached_input_tokens_at_message_start() {
    let s = Server::start();
    let c = client();
    let text = "Tell me about the history of the Rust programming language, its ownership \
                model, and how borrowing works in practice, with short examples.";
    let prompt = chat_prompt_len(&[("user", text)]) as u64;
    let mut starts = Vec::new();
    for _ in 0..2 {
        let body = c
            .post(s.url("/v1/messages"))
            .json(
                &json!({"model": "local", "max_tokens": 3, "stream": true, "temperature": 0,
                          "messages": [{"role": "user", "content": text}]}),
            )
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("body");
        let events = parse_sse(&body);
        let data = |name: &str| -> Value {
            let (_, d) = events
                .iter()
                .find(|(n, _)| n.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no {name} in {body}"));
            serde_json::from_str(d).expect("json")
        };
        let start = data("message_start")["message"]["usage"].clone();
        let end = data("message_delta")["usage"].clone();
        for u in [&start, &end] {
            assert_eq!(
                u["input_tokens"].as_u64().unwrap()
                    + u["cache_read_input_tokens"].as_u64().unwrap(),
                prompt,
                "{u}"
            );
        }
        assert_eq!(
            start["cache_read_input_tokens"], end["cache_read_input_tokens"],
            "message_start and the final usage agree"
        );
        starts.push(start["cache_read_input_tokens"].as_u64().unwrap());
    }
    assert!(
        starts[1] > 0 && starts[1] >= starts[0],
        "the repeated prompt reads the cache: {starts:?} of {prompt} tokens"
    );
}

#[tokio::test]
async fn anthropic_stop_sequence() {
    let s = Server::start();
    let c = client();
    let body = |stop: Option<&str>| {
        let mut b = json!({"model": "local", "max_tokens": 24, "temperature": 0, "ignore_eos": true, "messages": [{"role": "user", "content": "q"}]});
        if let Some(st) = stop {
            b["stop_sequences"] = json!([st]);
        }
        b
    };
    let v: Value = c
        .post(s.url("/v1/messages"))
        .json(&body(None))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let text = v["content"][0]["text"].as_str().unwrap_or("").to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 4, "24 tokens gave only {text:?}");
    {
        let stop: String = chars[2..4].iter().collect();
        let v: Value = c
            .post(s.url("/v1/messages"))
            .json(&body(Some(&stop)))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(v["stop_reason"], "stop_sequence", "{v}");
        assert_eq!(v["stop_sequence"], stop.as_str());
    }
}

#[tokio::test]
async fn models_health_metrics() {
    let s = Server::start();
    let c = client();
    let v: Value = c
        .get(s.url("/v1/models"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "switchyard-tiny-model");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["max_model_len"], 512);
    let r = c.get(s.url("/health")).send().await.expect("send");
    assert_eq!(r.status(), 200);
    assert_routing_headers(r.headers());
    let _ = c
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "local", "max_tokens": 3, "messages": [{"role": "user", "content": "m"}]}))
        .send()
        .await
        .expect("send");
    let _ = c
        .post(s.url("/v1/chat/completions"))
        .body("{")
        .send()
        .await
        .expect("send");
    let text = c
        .get(s.url("/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert_eq!(
        metric_sum(
            &text,
            "switchyard_http_requests_total",
            &["endpoint=\"/v1/chat/completions\"", "status=\"200\""]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "switchyard_http_requests_total",
            &["endpoint=\"/v1/chat/completions\"", "status=\"400\""]
        ),
        1.0
    );
    assert!(metric_sum(&text, "switchyard_generation_tokens_total", &[]) >= 1.0);
    assert!(metric_sum(&text, "switchyard_prompt_tokens_total", &[]) >= 1.0);
    assert_eq!(
        metric_sum(&text, "switchyard_time_to_first_token_seconds_count", &[]),
        1.0
    );
    assert!(metric(&text, "switchyard_http_request_duration_seconds_count").is_some());
    for g in [
        "switchyard_num_requests_running",
        "switchyard_num_requests_waiting",
        "switchyard_kv_cache_blocks_used",
        "switchyard_kv_cache_blocks_free",
        "switchyard_kv_cache_blocks_total",
        "switchyard_prefix_cache_hit_rate",
    ] {
        assert!(metric(&text, g).is_some(), "{g} missing:\n{text}");
    }
    assert!(metric(&text, "switchyard_kv_cache_blocks_total").is_some_and(|t| t > 0.0));
}

#[tokio::test]
async fn prefix_cache_reports_cached_tokens() {
    let s = Server::start();
    let c = client();
    let long = "the same long system prompt, repeated so it spans several KV blocks. ".repeat(4);
    let body = json!({"model": "local", "max_tokens": 2, "messages": [{"role": "system", "content": long}, {"role": "user", "content": "q"}]});
    let _ = c
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("send");
    let v: Value = c
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        cached >= 16,
        "second identical prompt should hit the prefix cache: {v}"
    );
    let text = c
        .get(s.url("/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert!(metric(&text, "switchyard_prefix_cache_hit_rate").is_some_and(|r| r > 0.0));
}

#[tokio::test]
async fn logit_bias_forces_and_bans_tokens() {
    use switchyard_engine::tokenizer::Tokenizer;
    let s = Server::start();
    let tok = Tokenizer::from_dir(common::model_dir()).expect("tokenizer");
    let complete = |bias: Value, temperature: f64| {
        json!({"model": "local", "prompt": [5, 9, 13], "max_tokens": 1,
               "temperature": temperature, "seed": 3, "logit_bias": bias})
    };
    let text = |r: &common::Reply| {
        r.json()["choices"][0]["text"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    // +100 forces a token even when sampling.
    let q = tok.encode("Q", false).expect("encode")[0];
    let r = common::post(
        &s,
        "/v1/completions",
        complete(json!({q.to_string(): 100}), 1.0),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(text(&r), "Q");
    // -100 bans the greedy choice.
    let r = common::post(&s, "/v1/completions", complete(json!({}), 0.0), &[]).await;
    let first = text(&r);
    let ids = tok.encode(&first, false).expect("encode");
    assert_eq!(ids.len(), 1, "{first:?}");
    let banned = json!({ids[0].to_string(): -100});
    let r = common::post(&s, "/v1/completions", complete(banned, 0.0), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_ne!(text(&r), first);
    for bias in [
        json!({"abc": 1}),
        json!({"5": 101}),
        json!({"5": "x"}),
        json!({"99999999": 1}),
    ] {
        let r = common::post(&s, "/v1/completions", complete(bias.clone(), 0.0), &[]).await;
        assert_eq!(r.status, 400, "{bias}: {}", r.text);
        assert_eq!(
            r.json()["error"]["param"],
            "logit_bias",
            "{bias}: {}",
            r.text
        );
    }
}

/// `echo` with `logprobs` on completions, as lm-evaluation-harness scores a continuation: the
/// prompt comes back first with one logprob per token after the first, equal to log-softmax
/// of the `logits` command's rows (the contiguous forward, an independent path).
#[tokio::test]
async fn echo_returns_the_prompt_with_its_logprobs() {
    let s = Server::start();
    let prompt: Vec<u32> = vec![5, 9, 13, 2, 77, 300, 41];
    let body = json!({"model": "local", "prompt": prompt, "max_tokens": 1, "temperature": 0,
                      "echo": true, "logprobs": 1});
    let r = common::post(&s, "/v1/completions", body.clone(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let c = &v["choices"][0];
    let lp = &c["logprobs"];
    let lps = lp["token_logprobs"].as_array().expect("token_logprobs");
    assert_eq!(lps.len(), prompt.len() + 1, "{lp}");
    assert!(lps[0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
    // The reference: logits of every position from the CLI.
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("l.safetensors");
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let (ok, _, err) = common::run_cli(&[
        "logits",
        "--model",
        &common::model_arg(),
        "--input-ids",
        &ids.join(","),
        "--out",
        out.to_str().expect("path"),
    ]);
    assert!(ok, "{err}");
    let rows = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).expect("load")
        ["logits"]
        .to_vec2::<f32>()
        .expect("rows");
    for p in 1..prompt.len() {
        let row = &rows[p - 1];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
        let want = f64::from(row[prompt[p] as usize] - max) - z.ln();
        let got = lps[p].as_f64().expect("logprob");
        assert!((got - want).abs() < 1e-3, "position {p}: {got} vs {want}");
        assert_eq!(lp["top_logprobs"][p].as_object().map(|o| o.len()), Some(1));
    }
    // The text is the prompt's, then the completion's; offsets run over both.
    let text = c["text"].as_str().expect("text");
    let offs = lp["text_offset"].as_array().expect("offsets");
    assert_eq!(offs[0], 0);
    assert!(offs.windows(2).all(|w| w[0].as_u64() <= w[1].as_u64()));
    assert!(offs[prompt.len()]
        .as_u64()
        .is_some_and(|o| o as usize <= text.len()));
    // Streamed: the prompt arrives in the first chunk.
    let mut sb = body;
    sb["stream"] = json!(true);
    let r = common::post(&s, "/v1/completions", sb, &[]).await;
    let chunks: Vec<Value> = parse_sse(&r.text)
        .into_iter()
        .filter(|(_, d)| d != "[DONE]")
        .map(|(_, d)| serde_json::from_str(&d).expect("chunk"))
        .collect();
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(
        chunks[0]["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .map(Vec::len),
        Some(prompt.len())
    );
    // A text prompt is echoed as sent.
    let r = common::post(
        &s,
        "/v1/completions",
        json!({"model": "local", "prompt": "Hello there", "max_tokens": 2, "echo": true}),
        &[],
    )
    .await;
    assert!(
        r.json()["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("Hello there")),
        "{}",
        r.text
    );
}

/// Anthropic's `count_tokens` counts what `/v1/messages` would put in the prompt (template,
/// system, tools); errors in Anthropic's shape.
#[tokio::test]
async fn anthropic_count_tokens_matches_the_served_prompt() {
    let s = Server::start_with(common::Opts {
        args: &["--max-model-len", "2048"],
        ..Default::default()
    });
    for extra in [
        json!({}),
        json!({"system": "be brief", "tools": [{"name": "f", "input_schema": {"type": "object"}}]}),
    ] {
        let mut body =
            json!({"model": "local", "messages": [{"role": "user", "content": "hello there"}]});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let r = common::post(&s, "/v1/messages/count_tokens", body.clone(), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let counted = r.json()["input_tokens"].as_u64().expect("input_tokens");
        body["max_tokens"] = json!(1);
        let m = common::post(&s, "/v1/messages", body, &[]).await.json();
        let u = &m["usage"];
        let served = u["input_tokens"].as_u64().unwrap_or(0)
            + u["cache_read_input_tokens"].as_u64().unwrap_or(0);
        assert_eq!(counted, served, "{extra}: {m}");
    }
    let r = common::post(
        &s,
        "/v1/messages/count_tokens",
        json!({"model": "local", "messages": []}),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    common::anthropic_error(&r.json());
    let r = common::post(
        &s,
        "/v1/messages/count_tokens",
        json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        &[],
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text);
}
