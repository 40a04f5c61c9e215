//! vLLM's extensions to the OpenAI API and prompt continuation, against the real server:
//! `truncate_prompt_tokens`, `cache_salt`, `prompt_logprobs`, `return_tokens_as_token_ids`,
//! `return_token_ids`, `stop_token_ids`, `min_tokens`, `include_stop_str_in_output`,
//! `skip_special_tokens` and the choices' `stop_reason`; `priority` with
//! `--scheduling-policy`; `/tokenize` and `/detokenize` (checked against the `tokenizers`
//! library reading the model's tokenizer.json, and against the chat endpoint's own prompt
//! count); `add_generation_prompt` / `continue_final_message` and Anthropic's prefill (checked
//! against a plain completion of the token ids `/tokenize` reports).

mod common;

use common::{
    assert_refused, chat_prompt_len, generate_json, generated_ids, model_dir, parse_sse, post,
    Server,
};
use serde_json::{json, Value};

/// The greedy tokens after `[5, 6, 7, 8]` (eos ignored), from `switchyard generate`.
fn greedy_ids(n: usize) -> Vec<u32> {
    let (ok, out, err) = generate_json(&[
        "--input-ids",
        "5,6,7,8",
        "--max-tokens",
        &n.to_string(),
        "--ignore-eos",
    ]);
    assert!(ok, "{err}");
    generated_ids(&out).into_iter().map(|i| i as u32).collect()
}

/// `body` with the fields of `extra` set over it.
fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

fn completion(extra: Value) -> Value {
    with(
        json!({"model": "local", "prompt": [5, 6, 7, 8], "max_tokens": 16,
               "temperature": 0, "ignore_eos": true}),
        extra,
    )
}

#[tokio::test]
async fn stop_token_ids_min_tokens_and_stop_reason() {
    let s = Server::start();
    let g = greedy_ids(16);
    // A token that does not occur before it, at position 2 or later.
    let k = (2..g.len())
        .find(|&i| !g[..i].contains(&g[i]))
        .expect("a fresh token");
    let stop_id = g[k];

    let r = post(
        &s,
        "/v1/completions",
        completion(json!({"stop_token_ids": [stop_id]})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let c = &v["choices"][0];
    assert_eq!(v["usage"]["completion_tokens"], k + 1, "{v}");
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(c["stop_reason"], stop_id, "{c}");
    // The text is that of the tokens before the stop token.
    let cut = post(
        &s,
        "/v1/completions",
        completion(json!({"max_tokens": k})),
        &[],
    )
    .await
    .json();
    assert_eq!(c["text"], cut["choices"][0]["text"]);
    assert_eq!(
        cut["choices"][0]["stop_reason"],
        Value::Null,
        "a length stop has none"
    );

    // min_tokens: at least that many tokens, none of them the stop token.
    let min = k + 2;
    let v = post(
        &s,
        "/v1/completions",
        completion(json!({"stop_token_ids": [stop_id], "min_tokens": min, "logprobs": 1})),
        &[],
    )
    .await
    .json();
    let n = v["usage"]["completion_tokens"].as_u64().expect("usage") as usize;
    assert!(n >= min, "{n} tokens with min_tokens {min}");
    let c = &v["choices"][0];
    match c["finish_reason"].as_str() {
        Some("stop") => assert_eq!(c["stop_reason"], stop_id),
        _ => assert_eq!(n, 16),
    }

    // Streaming: the last choice chunk carries the stop reason.
    let r = post(
        &s,
        "/v1/completions",
        completion(json!({"stop_token_ids": [stop_id], "stream": true})),
        &[],
    )
    .await;
    let events = parse_sse(&r.text);
    let last: Value = events
        .iter()
        .rev()
        .filter(|e| e.1 != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(&e.1).expect("json"))
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .expect("a finish chunk");
    assert_eq!(last["choices"][0]["stop_reason"], stop_id, "{last}");
}

#[tokio::test]
async fn include_stop_str_and_skip_special_tokens() {
    let s = Server::start();
    let chat = |extra: Value| {
        with(
            json!({"model": "local", "max_tokens": 24, "temperature": 0, "ignore_eos": true,
                   "messages": [{"role": "user", "content": "count"}]}),
            extra,
        )
    };
    let full = post(&s, "/v1/chat/completions", chat(json!({})), &[])
        .await
        .json();
    let text = full["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "24 tokens gave only {text:?}");
    let stop: String = chars[3..5].iter().collect();
    let end = text.find(&stop).expect("in the text") + stop.len();
    for (include, want) in [(false, &text[..end - stop.len()]), (true, &text[..end])] {
        let v = post(
            &s,
            "/v1/chat/completions",
            chat(json!({"stop": [stop], "include_stop_str_in_output": include})),
            &[],
        )
        .await
        .json();
        let c = &v["choices"][0];
        assert_eq!(c["message"]["content"], want, "include {include}");
        assert_eq!(c["finish_reason"], "stop");
        assert_eq!(c["stop_reason"], stop.as_str());
    }

    // Special tokens: push the end-of-text token with logit_bias; its text shows only when
    // skip_special_tokens is false.
    let tok =
        tokenizers::Tokenizer::from_file(model_dir().join("tokenizer.json")).expect("tokenizer");
    let eos = tok.token_to_id("<|endoftext|>").expect("eos");
    for (skip, want) in [(true, String::new()), (false, "<|endoftext|>".repeat(3))] {
        let v = post(
            &s,
            "/v1/completions",
            completion(
                json!({"max_tokens": 3, "logit_bias": {eos.to_string(): 100},
                              "skip_special_tokens": skip}),
            ),
            &[],
        )
        .await
        .json();
        assert_eq!(v["choices"][0]["text"], want.as_str(), "skip {skip}: {v}");
    }
}

#[tokio::test]
async fn output_control_errors_name_the_field() {
    let s = Server::start();
    for (extra, param) in [
        (json!({"min_tokens": -1}), "min_tokens"),
        (json!({"min_tokens": 17}), "min_tokens"),
        (json!({"min_tokens": "many"}), "min_tokens"),
        (json!({"stop_token_ids": [3, -4]}), "stop_token_ids[1]"),
        (
            json!({"stop_token_ids": [1_000_000_000]}),
            "stop_token_ids[0]",
        ),
        (json!({"stop_token_ids": "7"}), "stop_token_ids"),
        (
            json!({"include_stop_str_in_output": 1}),
            "include_stop_str_in_output",
        ),
        (json!({"skip_special_tokens": "no"}), "skip_special_tokens"),
    ] {
        assert_refused(&s, "/v1/completions", completion(extra), param).await;
    }
    // Without max_tokens the limit is the rest of the context.
    assert_refused(
        &s,
        "/v1/chat/completions",
        json!({"model": "local", "min_tokens": 100_000, "messages": [{"role": "user", "content": "x"}]}),
        "min_tokens",
    )
    .await;
}

#[tokio::test]
async fn truncate_prompt_tokens_keeps_the_end_of_the_prompt() {
    let s = Server::start();
    let long: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 200 + 5).collect();
    let body = |prompt: &[u32], extra: Value| {
        with(
            json!({"model": "local", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
            extra,
        )
    };
    let cut = post(
        &s,
        "/v1/completions",
        body(&long, json!({"truncate_prompt_tokens": 10})),
        &[],
    )
    .await
    .json();
    let tail = post(&s, "/v1/completions", body(&long[30..], json!({})), &[])
        .await
        .json();
    assert_eq!(cut["usage"]["prompt_tokens"], 10, "{cut}");
    assert_eq!(cut["choices"][0]["text"], tail["choices"][0]["text"]);
    // -1: as much as the context holds (all of a short prompt); a bound over it is refused.
    let all = post(
        &s,
        "/v1/completions",
        body(&long, json!({"truncate_prompt_tokens": -1})),
        &[],
    )
    .await
    .json();
    assert_eq!(all["usage"]["prompt_tokens"], 40, "{all}");
    let chat = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "local", "max_tokens": 2, "truncate_prompt_tokens": 5,
               "messages": [{"role": "user", "content": "a fairly long question for the model"}]}),
        &[],
    )
    .await
    .json();
    assert_eq!(chat["usage"]["prompt_tokens"], 5, "{chat}");
    for v in [json!(0), json!(-2), json!(513), json!("ten")] {
        assert_refused(
            &s,
            "/v1/completions",
            body(&long, json!({"truncate_prompt_tokens": v})),
            "truncate_prompt_tokens",
        )
        .await;
    }
}

#[tokio::test]
async fn cache_salt_keeps_prefix_cache_hits_within_one_salt() {
    let s = Server::start();
    let prompt: Vec<u32> = (0..64).map(|i| (i * 11 + 9) % 300 + 5).collect();
    let cached = |salt: Option<&str>| {
        let mut b = json!({"model": "local", "prompt": prompt, "max_tokens": 1});
        if let Some(v) = salt {
            b["cache_salt"] = json!(v);
        }
        let s = &s;
        async move {
            let v = post(s, "/v1/completions", b, &[]).await.json();
            v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .expect("cached_tokens")
        }
    };
    assert_eq!(cached(None).await, 0, "a cold cache");
    assert!(
        cached(None).await > 0,
        "the same prompt unsalted hits the cache"
    );
    assert_eq!(
        cached(Some("tenant-a-3f9c")).await,
        0,
        "another salt does not see it"
    );
    assert!(
        cached(Some("tenant-a-3f9c")).await > 0,
        "the same salt does"
    );
    assert_eq!(cached(Some("tenant-b-77d1")).await, 0);
    assert_refused(
        &s,
        "/v1/completions",
        json!({"model": "local", "prompt": "x", "cache_salt": ""}),
        "cache_salt",
    )
    .await;
}

#[tokio::test]
async fn prompt_logprobs_and_tokens_as_ids() {
    let s = Server::start();
    let prompt = [5u32, 6, 7, 8, 9, 10];
    let v = post(
        &s,
        "/v1/completions",
        completion(json!({"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2})),
        &[],
    )
    .await
    .json();
    let pl = v["choices"][0]["prompt_logprobs"]
        .as_array()
        .expect("prompt_logprobs")
        .clone();
    assert_eq!(pl.len(), prompt.len(), "{v}");
    assert!(pl[0].is_null());
    // Reference: the completions `echo` logprobs of the same prompt (checked against the
    // contiguous forward in the engine's tests).
    let echo = post(
        &s,
        "/v1/completions",
        completion(json!({"prompt": prompt, "max_tokens": 1, "echo": true, "logprobs": 2})),
        &[],
    )
    .await
    .json();
    let want = &echo["choices"][0]["logprobs"]["token_logprobs"];
    for (p, entry) in pl.iter().enumerate().skip(1) {
        let o = entry.as_object().expect("an object per prompt position");
        assert!((2..=3).contains(&o.len()), "{entry}");
        let own = &o[&prompt[p].to_string()];
        let lp = own["logprob"].as_f64().expect("logprob");
        assert!(
            (lp - want[p].as_f64().expect("echo logprob")).abs() < 1e-4,
            "position {p}: {entry} vs {}",
            want[p]
        );
        let rank = own["rank"].as_u64().expect("rank");
        assert!(rank >= 1);
        let best = o
            .values()
            .map(|e| e["logprob"].as_f64().unwrap_or(f64::MIN))
            .fold(f64::MIN, f64::max);
        assert_eq!(
            rank == 1,
            (best - lp).abs() < 1e-6,
            "position {p}: rank {rank}: {entry}"
        );
        assert!(o.values().all(|e| e["decoded_token"].is_string()));
    }
    // Chat: one list beside the choices, as long as the prompt.
    let c = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "local", "max_tokens": 1, "prompt_logprobs": 0, "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await
    .json();
    assert_eq!(
        c["prompt_logprobs"].as_array().map(Vec::len),
        c["usage"]["prompt_tokens"].as_u64().map(|n| n as usize),
        "{c}"
    );

    // Tokens as ids: the ids are the greedy tokens `generate` reports.
    let g = greedy_ids(4);
    let v = post(
        &s,
        "/v1/completions",
        completion(json!({"max_tokens": 4, "logprobs": 1, "return_tokens_as_token_ids": true})),
        &[],
    )
    .await
    .json();
    let toks: Vec<String> = v["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().unwrap_or_default().to_string())
        .collect();
    let want: Vec<String> = g.iter().map(|id| format!("token_id:{id}")).collect();
    assert_eq!(toks, want);
    let chat = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "local", "max_tokens": 3, "logprobs": true, "top_logprobs": 2, "return_tokens_as_token_ids": true,
               "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await
    .json();
    let content = chat["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content")
        .clone();
    assert!(!content.is_empty());
    for e in content {
        assert!(
            e["token"]
                .as_str()
                .is_some_and(|t| t.starts_with("token_id:")),
            "{e}"
        );
        assert!(e["top_logprobs"]
            .as_array()
            .expect("top")
            .iter()
            .all(|a| a["token"]
                .as_str()
                .is_some_and(|t| t.starts_with("token_id:"))));
    }
    for (body, param) in [
        (
            completion(json!({"prompt_logprobs": 21})),
            "prompt_logprobs",
        ),
        (
            completion(json!({"prompt_logprobs": -1})),
            "prompt_logprobs",
        ),
        (
            completion(json!({"prompt_logprobs": 1, "stream": true})),
            "prompt_logprobs",
        ),
        (
            completion(json!({"return_tokens_as_token_ids": "yes"})),
            "return_tokens_as_token_ids",
        ),
    ] {
        assert_refused(&s, "/v1/completions", body, param).await;
    }
}

#[tokio::test]
async fn tokenize_and_detokenize() {
    let s = Server::start();
    let tok =
        tokenizers::Tokenizer::from_file(model_dir().join("tokenizer.json")).expect("tokenizer");
    let text = "Hello, tokenizer: 12 apples & ünïcode!";
    let want: Vec<u32> = tok.encode(text, true).expect("encode").get_ids().to_vec();
    let r = post(
        &s,
        "/tokenize",
        json!({"prompt": text, "return_token_strs": true}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["tokens"], json!(want));
    assert_eq!(v["count"], want.len());
    assert_eq!(v["max_model_len"], 512);
    let strs: Vec<String> = want
        .iter()
        .map(|&i| tok.id_to_token(i).expect("token"))
        .collect();
    assert_eq!(v["token_strs"], json!(strs));
    let r = post(
        &s,
        "/detokenize",
        json!({"model": "local", "tokens": want}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["prompt"], text);

    // The chat form counts what the chat endpoint would prompt with.
    let messages =
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]);
    let v = post(&s, "/tokenize", json!({"messages": messages}), &[])
        .await
        .json();
    let chat = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "local", "max_tokens": 1, "messages": messages}),
        &[],
    )
    .await
    .json();
    assert_eq!(v["count"], chat["usage"]["prompt_tokens"], "{v}");
    assert_eq!(
        v["count"],
        chat_prompt_len(&[("system", "be brief"), ("user", "hi there")])
    );
    let bare = post(
        &s,
        "/tokenize",
        json!({"messages": messages, "add_generation_prompt": false}),
        &[],
    )
    .await
    .json();
    let (with, without) = (
        v["count"].as_u64().unwrap_or(0),
        bare["count"].as_u64().unwrap_or(0),
    );
    assert!(without > 0 && without < with, "{without} vs {with}");
    assert_eq!(
        v["tokens"]
            .as_array()
            .map(|t| t[..without as usize].to_vec()),
        bare["tokens"].as_array().cloned()
    );

    // Errors in the OpenAI shape, naming the field.
    for (path, body, param) in [
        ("/tokenize", json!({"prompt": 5}), "prompt"),
        ("/tokenize", json!({}), "prompt"),
        ("/tokenize", json!({"messages": []}), "messages"),
        ("/detokenize", json!({"tokens": [1, -2]}), "tokens[1]"),
        ("/detokenize", json!({"tokens": [1 << 30]}), "tokens[0]"),
        ("/detokenize", json!({}), "tokens"),
    ] {
        assert_refused(&s, path, body, param).await;
    }
    let r = post(
        &s,
        "/tokenize",
        json!({"model": "someone-else", "prompt": "x"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text);
}

#[tokio::test]
async fn prefill_continues_the_final_assistant_message() {
    let s = Server::start();
    let prefill = "Sure, the answer";
    let messages = json!([{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": prefill}]);
    // The prompt ends inside the assistant message.
    let t = post(&s, "/tokenize", json!({"messages": messages, "continue_final_message": true, "add_generation_prompt": false}), &[])
        .await
        .json();
    let ids = t["tokens"].clone();
    let prompt_text = post(&s, "/detokenize", json!({"tokens": ids}), &[])
        .await
        .json()["prompt"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(prompt_text.ends_with(prefill), "{prompt_text:?}");
    // Reference: a plain completion of exactly those tokens.
    let want = post(
        &s,
        "/v1/completions",
        json!({"model": "local", "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
        &[],
    )
    .await
    .json()["choices"][0]["text"]
        .clone();

    let chat = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "local", "messages": messages, "continue_final_message": true,
               "add_generation_prompt": false, "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
        &[],
    )
    .await;
    assert_eq!(chat.status, 200, "{}", chat.text);
    let chat = chat.json();
    assert_eq!(chat["choices"][0]["message"]["content"], want);
    assert_eq!(chat["usage"]["prompt_tokens"], t["count"]);

    let a = post(
        &s,
        "/v1/messages",
        json!({"model": "local", "messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
        &[],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = a.json();
    assert_eq!(a["content"][0]["text"], want, "{a}");
    // Anthropic counts prompt tokens read from the prefix cache apart.
    let u = &a["usage"];
    let input = u["input_tokens"].as_u64().unwrap_or(0)
        + u["cache_read_input_tokens"].as_u64().unwrap_or(0);
    assert_eq!(json!(input), t["count"], "{u}");

    // What cannot be continued is refused with the reason.
    let r = post(
        &s,
        "/v1/messages",
        json!({"model": "local", "max_tokens": 4,
               "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "trailing "}]}),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("trailing whitespace"), "{}", r.text);
    for (body, needle) in [
        (
            json!({"model": "local", "max_tokens": 4, "continue_final_message": true,
                   "messages": [{"role": "user", "content": "x"}]}),
            "only an assistant message can be continued",
        ),
        (
            json!({"model": "local", "max_tokens": 4, "continue_final_message": true, "add_generation_prompt": true,
                   "messages": messages}),
            "add_generation_prompt",
        ),
    ] {
        let r = post(&s, "/v1/chat/completions", body, &[]).await;
        assert_eq!(r.status, 400, "{}", r.text);
        assert!(r.text.contains(needle), "{}", r.text);
    }
}

/// `--chat-template` (vLLM's flag): a file or the template text replaces the model's template;
/// a value that is neither stops startup naming the flag.
#[tokio::test]
async fn chat_template_flag_replaces_the_models_template() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("t.jinja");
    let source = "{% for m in messages %}<<{{ m.role }}>>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<<assistant>>{% endif %}";
    std::fs::write(&file, source).expect("write template");
    let messages =
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]);
    let want = "<<system>>be brief\n<<user>>hi\n<<assistant>>";
    let file_arg = file.to_str().expect("utf-8").to_string();
    for flag in [file_arg.as_str(), source] {
        let s = Server::start_with(common::Opts {
            args: &["--chat-template", flag],
            ..Default::default()
        });
        let t = post(&s, "/tokenize", json!({"messages": messages}), &[])
            .await
            .json();
        let text = post(&s, "/detokenize", json!({"tokens": t["tokens"]}), &[])
            .await
            .json();
        assert_eq!(text["prompt"], want, "--chat-template {flag}");
        let chat = post(
            &s,
            "/v1/chat/completions",
            json!({"model": "local", "max_tokens": 1, "messages": messages}),
            &[],
        )
        .await
        .json();
        assert_eq!(chat["usage"]["prompt_tokens"], t["count"]);
    }
    // generate --chat takes it too: its prompt is the same text.
    let (ok, out, err) = common::generate_json(&[
        "--prompt",
        "hi",
        "--chat",
        "--chat-template",
        &file_arg,
        "--max-tokens",
        "1",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).expect("json");
    assert!(v["generated_ids"].is_array(), "{v}");
    let (ok, _, err) = common::run_cli(&[
        "serve",
        "--model",
        &common::model_arg(),
        "--port",
        "0",
        "--chat-template",
        "no-such-template.jinja",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--chat-template") && err.contains("no-such-template.jinja"),
        "{err}"
    );
}

/// vLLM's `priority` under `--scheduling-policy fcfs` (the default): 0 is accepted, anything
/// else is a 400 naming the field on every endpoint; a non-integer is a 400 too. Under
/// `--scheduling-policy priority` every endpoint accepts it, and the answer is the same.
#[tokio::test]
async fn priority_is_refused_under_fcfs_and_served_under_the_priority_policy() {
    let chat = |p: Value| {
        json!({"model": "local", "max_tokens": 6, "temperature": 0, "ignore_eos": true,
               "priority": p, "messages": [{"role": "user", "content": "hi"}]})
    };
    let messages = |p: Value| {
        json!({"model": "local", "max_tokens": 6, "temperature": 0, "priority": p,
               "messages": [{"role": "user", "content": "hi"}]})
    };
    let responses = |p: Value| {
        json!({"model": "local", "max_output_tokens": 6, "temperature": 0, "priority": p,
               "input": "hi"})
    };
    let fcfs = Server::start();
    for p in [json!(1), json!(-3)] {
        assert_refused(
            &fcfs,
            "/v1/completions",
            completion(json!({"priority": p})),
            "priority",
        )
        .await;
        assert_refused(&fcfs, "/v1/chat/completions", chat(p.clone()), "priority").await;
        assert_refused(&fcfs, "/v1/responses", responses(p.clone()), "priority").await;
        let r = post(&fcfs, "/v1/messages", messages(p.clone()), &[]).await;
        assert_eq!(r.status, 400, "{}", r.text);
        let msg = common::anthropic_error(&r.json())["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(msg.contains("priority"), "{msg}");
    }
    let r = post(&fcfs, "/v1/chat/completions", chat(json!(2)), &[]).await;
    let msg = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(msg.contains("--scheduling-policy priority"), "{msg}");
    for bad in [json!("high"), json!(1.5), json!([1])] {
        assert_refused(&fcfs, "/v1/chat/completions", chat(bad), "priority").await;
    }
    // 0 is every request's priority: accepted.
    let plain = post(
        &fcfs,
        "/v1/completions",
        completion(json!({"priority": 0})),
        &[],
    )
    .await;
    assert_eq!(plain.status, 200, "{}", plain.text);
    let plain_chat = post(&fcfs, "/v1/chat/completions", chat(json!(0)), &[]).await;
    assert_eq!(plain_chat.status, 200, "{}", plain_chat.text);

    let by_priority = Server::start_with(common::Opts {
        args: &["--scheduling-policy", "priority"],
        ..Default::default()
    });
    for p in [json!(-5), json!(0), json!(7)] {
        let r = post(
            &by_priority,
            "/v1/completions",
            completion(json!({"priority": p})),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.json()["choices"][0]["text"],
            plain.json()["choices"][0]["text"]
        );
        let r = post(&by_priority, "/v1/chat/completions", chat(p.clone()), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.json()["choices"][0]["message"],
            plain_chat.json()["choices"][0]["message"]
        );
        for (path, body) in [
            ("/v1/messages", messages(p.clone())),
            ("/v1/responses", responses(p.clone())),
        ] {
            let r = post(&by_priority, path, body, &[]).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text);
        }
    }
    assert_refused(
        &by_priority,
        "/v1/chat/completions",
        chat(json!("x")),
        "priority",
    )
    .await;
    // An unknown policy stops startup, naming the value.
    let (ok, _, err) = common::run_cli(&[
        "serve",
        "--model",
        &common::model_arg(),
        "--port",
        "0",
        "--scheduling-policy",
        "lottery",
    ]);
    assert!(!ok);
    assert!(err.contains("lottery"), "{err}");
}

/// The number in a Prometheus sample line of `/metrics`.
async fn gauge(s: &Server, name: &str) -> f64 {
    common::metric(&common::metrics_text(s).await, name).unwrap_or(0.0)
}

/// With one sequence slot, a high-priority request that arrives while a long low-priority one
/// runs is answered first (the long one is preempted and recomputed); the long one's answer
/// is the same as when it runs undisturbed.
#[tokio::test]
async fn a_high_priority_request_overtakes_a_running_low_priority_one() {
    let s = std::sync::Arc::new(Server::start_with(common::Opts {
        args: &["--scheduling-policy", "priority", "--max-num-seqs", "1"],
        ..Default::default()
    }));
    let long = |p: i64| completion(json!({"max_tokens": 400, "priority": p}));
    let alone = post(&s, "/v1/completions", long(0), &[]).await.json();
    // The engine publishes its gauges after the step that answered `alone`, which can come
    // after the answer reaches us: wait for its slot to read free, or the wait below could
    // see `alone` still running and send the high-priority request before the long one is
    // admitted (then nothing is preempted; seen once under the full suite's load).
    let t0 = std::time::Instant::now();
    while gauge(&s, "switchyard_num_requests_running").await > 0.0 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "the first request never left the slot"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let s2 = s.clone();
    let low = tokio::spawn(async move {
        let r = post(&s2, "/v1/completions", long(10), &[]).await;
        (r, std::time::Instant::now())
    });
    // Wait until the long request holds the slot.
    let t0 = std::time::Instant::now();
    while gauge(&s, "switchyard_num_requests_running").await < 1.0 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let high = post(
        &s,
        "/v1/completions",
        completion(json!({"max_tokens": 4, "priority": -1})),
        &[],
    )
    .await;
    let high_done = std::time::Instant::now();
    assert_eq!(high.status, 200, "{}", high.text);
    let (low, low_done) = low.await.expect("low request task");
    assert_eq!(low.status, 200, "{}", low.text);
    assert!(high_done < low_done, "the high-priority request waited");
    assert!(gauge(&s, "switchyard_engine_preemptions").await >= 1.0);
    let low = low.json();
    assert_eq!(low["usage"]["completion_tokens"], 400);
    assert_eq!(low["choices"][0]["text"], alone["choices"][0]["text"]);
}

/// The ids of every chunk's `choices[0].token_ids`, and the chunks.
fn streamed_ids(text: &str) -> (Vec<u64>, Vec<Value>) {
    let chunks: Vec<Value> = parse_sse(text)
        .into_iter()
        .filter(|e| e.1 != "[DONE]")
        .map(|e| serde_json::from_str(&e.1).expect("json chunk"))
        .collect();
    let ids = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["token_ids"].as_array())
        .flatten()
        .map(|x| x.as_u64().expect("id"))
        .collect();
    (ids, chunks)
}

/// vLLM's `return_token_ids`: completions choices carry `prompt_token_ids` and `token_ids`
/// (equal to the ids sent and `generate`'s greedy ids); chat responses carry the prompt's ids
/// at the top (equal to `/tokenize` of the conversation) and each choice's generated ids
/// (equal to `generate`'s greedy continuation of those prompt ids). Streams send the prompt
/// ids in the first chunk only and every generated id once, in order.
#[tokio::test]
async fn return_token_ids_reports_prompt_and_generated_ids() {
    let s = Server::start();
    let g = greedy_ids(16);
    let v = post(
        &s,
        "/v1/completions",
        completion(json!({"return_token_ids": true})),
        &[],
    )
    .await
    .json();
    let c = &v["choices"][0];
    assert_eq!(c["prompt_token_ids"], json!([5, 6, 7, 8]), "{c}");
    assert_eq!(c["token_ids"], json!(g), "{c}");
    let plain = post(&s, "/v1/completions", completion(json!({})), &[])
        .await
        .json();
    assert!(plain["choices"][0].get("token_ids").is_none(), "{plain}");
    assert!(plain["choices"][0].get("prompt_token_ids").is_none());
    assert_eq!(plain["choices"][0]["text"], c["text"]);
    // Several prompts and choices: each choice has its own prompt's ids.
    let v = post(
        &s,
        "/v1/completions",
        completion(
            json!({"prompt": [[5, 6, 7, 8], [9, 10]], "n": 2, "max_tokens": 3,
                          "return_token_ids": true}),
        ),
        &[],
    )
    .await
    .json();
    let prompts: Vec<&Value> = (0..4)
        .map(|i| &v["choices"][i]["prompt_token_ids"])
        .collect();
    assert_eq!(
        prompts,
        [
            json!([5, 6, 7, 8]),
            json!([5, 6, 7, 8]),
            json!([9, 10]),
            json!([9, 10])
        ]
        .iter()
        .collect::<Vec<_>>()
    );
    assert_eq!(v["choices"][0]["token_ids"], json!(g[..3]));

    // Streamed completions: prompt ids on the first chunk only, then each token's id.
    let r = post(
        &s,
        "/v1/completions",
        completion(json!({"return_token_ids": true, "stream": true})),
        &[],
    )
    .await;
    let (ids, chunks) = streamed_ids(&r.text);
    assert_eq!(ids, g.iter().map(|&i| u64::from(i)).collect::<Vec<_>>());
    assert_eq!(
        chunks[0]["choices"][0]["prompt_token_ids"],
        json!([5, 6, 7, 8])
    );
    assert!(chunks[1..]
        .iter()
        .all(|c| c["choices"][0].get("prompt_token_ids").is_none()));

    // Chat: the prompt ids are /tokenize's; the generated ids continue them greedily.
    let messages = json!([{"role": "user", "content": "count to ten"}]);
    let chat = |extra: Value| {
        with(
            json!({"model": "local", "max_tokens": 12, "temperature": 0, "ignore_eos": true,
                   "messages": messages, "return_token_ids": true}),
            extra,
        )
    };
    let t = post(&s, "/tokenize", json!({"messages": messages}), &[])
        .await
        .json();
    let v = post(&s, "/v1/chat/completions", chat(json!({})), &[])
        .await
        .json();
    assert_eq!(v["prompt_token_ids"], t["tokens"], "{v}");
    let prompt: Vec<String> = t["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|x| x.to_string())
        .collect();
    let (ok, out, err) = generate_json(&[
        "--input-ids",
        &prompt.join(","),
        "--max-tokens",
        "12",
        "--ignore-eos",
    ]);
    assert!(ok, "{err}");
    assert_eq!(v["choices"][0]["token_ids"], json!(generated_ids(&out)));
    assert_eq!(v["usage"]["completion_tokens"], 12);

    // Streamed chat: prompt ids at the top of the first chunk only; the ids equal the plain
    // response's.
    let r = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"stream": true})),
        &[],
    )
    .await;
    let (ids, chunks) = streamed_ids(&r.text);
    assert_eq!(json!(ids), v["choices"][0]["token_ids"]);
    assert_eq!(chunks[0]["prompt_token_ids"], t["tokens"]);
    assert!(chunks[1..]
        .iter()
        .all(|c| c.get("prompt_token_ids").is_none()));

    assert_refused(
        &s,
        "/v1/completions",
        completion(json!({"return_token_ids": "yes"})),
        "return_token_ids",
    )
    .await;
}

/// vLLM's `stream_options.continuous_usage_stats` (with `include_usage`): every chunk carries
/// the usage so far (prompt tokens fixed, completion tokens counting up by one per generated
/// token), and the final usage chunk agrees; chat and completions, two choices. Without it
/// the chunks' `usage` stays null.
#[tokio::test]
async fn continuous_usage_stats_count_up_on_every_chunk() {
    let s = Server::start();
    for (path, body) in [
        ("/v1/completions", completion(json!({"n": 2}))),
        (
            "/v1/chat/completions",
            json!({"model": "local", "max_tokens": 12, "temperature": 0, "ignore_eos": true,
                   "messages": [{"role": "user", "content": "Hi"}]}),
        ),
    ] {
        let mut body = body;
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": true});
        let r = post(&s, path, body.clone(), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let chunks: Vec<Value> = parse_sse(&r.text)
            .into_iter()
            .filter(|(_, d)| d != "[DONE]")
            .map(|(_, d)| serde_json::from_str(&d).unwrap())
            .collect();
        let last = chunks.last().unwrap()["usage"].clone();
        let (prompt, total) = (
            last["prompt_tokens"].as_u64().unwrap(),
            last["completion_tokens"].as_u64().unwrap(),
        );
        let mut seen = 0;
        for c in &chunks[..chunks.len() - 1] {
            let u = &c["usage"];
            assert_eq!(u["prompt_tokens"].as_u64(), Some(prompt), "{path}: {c}");
            let done = u["completion_tokens"].as_u64().unwrap();
            assert!(
                done >= seen && done <= total,
                "{path}: {done} after {seen}: {c}"
            );
            assert_eq!(u["total_tokens"].as_u64(), Some(prompt + done));
            seen = done;
        }
        assert_eq!(
            seen, total,
            "{path}: the last token chunk counts every token"
        );
        // include_usage alone: null usage on the chunks, the totals at the end.
        body["stream_options"] = json!({"include_usage": true});
        let r = post(&s, path, body, &[]).await;
        let chunks: Vec<Value> = parse_sse(&r.text)
            .into_iter()
            .filter(|(_, d)| d != "[DONE]")
            .map(|(_, d)| serde_json::from_str(&d).unwrap())
            .collect();
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null()));
        assert_eq!(
            chunks.last().unwrap()["usage"]["completion_tokens"].as_u64(),
            Some(total)
        );
    }
}
