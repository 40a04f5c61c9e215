//! Reasoning output apart from the answer, on the tiny model served with Hy3's chat template
//! (which opens `<think>` at the end of the prompt): OpenAI `reasoning_content` (plain and as
//! `delta.reasoning_content`) and Anthropic `thinking` blocks (plain and streamed as their own
//! block). A Lark grammar (which describes the whole output, reasoning included) makes the
//! random model write a known thought and answer; with `reasoning_effort: no_think` the
//! template closes the block and nothing is parsed; an answer format (a JSON schema) keeps
//! it open and applies after it.

mod common;

use common::{model_dir, parse_sse, post, Opts, Server};
use serde_json::{json, Value};

/// The tiny model with Hy3's template.
fn hy3_server() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        let from = model_dir().join(f);
        if from.exists() {
            std::fs::copy(&from, dir.path().join(f)).expect("copy the tiny model");
        }
    }
    let template = include_str!("../../models/templates/hy3.jinja");
    std::fs::write(dir.path().join("chat_template.jinja"), template).expect("write template");
    let s = Server::start_model(
        dir.path(),
        Opts {
            args: &["--max-model-len", "2048"],
            ..Default::default()
        },
    );
    (s, dir)
}

/// Forces the output to be `think` + "\n</think>\n" + `answer` (the shape Hy3 writes).
fn forced(think: &str, answer: &str) -> Value {
    let text = format!("{think}\n</think>\n{answer}");
    json!({"structured_outputs": {"grammar": format!("start: {}", Value::from(text))}})
}

fn body(api_extra: Value, base: Value) -> Value {
    let mut b = base;
    for (k, v) in api_extra.as_object().expect("object") {
        b[k] = v.clone();
    }
    b
}

#[tokio::test]
async fn openai_reasoning_content_plain_and_streamed() {
    let (s, _dir) = hy3_server();
    let base = json!({"model": "local", "max_tokens": 200, "temperature": 0,
                      "messages": [{"role": "user", "content": "2+2?"}]});
    let r = post(
        &s,
        "/v1/chat/completions",
        body(forced("add two and two", "4"), base.clone()),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let m = &r.json()["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "add two and two", "{m}");
    assert_eq!(m["content"], "4", "{m}");
    let mut sb = body(forced("add two and two", "4"), base.clone());
    sb["stream"] = json!(true);
    let r = post(&s, "/v1/chat/completions", sb, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (mut reasoning, mut content) = (String::new(), String::new());
    for (_, data) in parse_sse(&r.text) {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).expect("chunk");
        let d = &v["choices"][0]["delta"];
        reasoning.push_str(d["reasoning_content"].as_str().unwrap_or(""));
        content.push_str(d["content"].as_str().unwrap_or(""));
    }
    assert_eq!(
        (reasoning.as_str(), content.as_str()),
        ("add two and two", "4")
    );
    // no_think: the template closes the block, so the same text is all answer.
    let mut nb = body(
        json!({"structured_outputs": {"grammar": "start: \"4\""}}),
        base,
    );
    nb["chat_template_kwargs"] = json!({"reasoning_effort": "no_think"});
    let r = post(&s, "/v1/chat/completions", nb, &[]).await;
    let m = &r.json()["choices"][0]["message"];
    assert_eq!(m["content"], "4", "{m}");
    assert!(m["reasoning_content"].is_null(), "{m}");
}

#[tokio::test]
async fn anthropic_thinking_blocks_plain_and_streamed() {
    let (s, _dir) = hy3_server();
    let base = json!({"model": "local", "max_tokens": 200, "temperature": 0,
                      "messages": [{"role": "user", "content": "2+2?"}]});
    let r = post(
        &s,
        "/v1/messages",
        body(forced("add them", "4"), base.clone()),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["content"][0]["type"], "thinking", "{v}");
    assert_eq!(v["content"][0]["thinking"], "add them", "{v}");
    assert_eq!(v["content"][1], json!({"type": "text", "text": "4"}), "{v}");
    let mut sb = body(forced("add them", "4"), base);
    sb["stream"] = json!(true);
    let r = post(&s, "/v1/messages", sb, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let events: Vec<Value> = parse_sse(&r.text)
        .into_iter()
        .map(|(_, d)| serde_json::from_str(&d).expect("event"))
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        &kinds[..3],
        &["message_start", "content_block_start", "ping"],
        "{kinds:?}"
    );
    let starts: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "content_block_start")
        .collect();
    assert_eq!(starts.len(), 2, "{kinds:?}");
    assert_eq!(
        (
            starts[0]["index"].clone(),
            starts[0]["content_block"]["type"].clone()
        ),
        (json!(0), json!("thinking"))
    );
    assert_eq!(
        (
            starts[1]["index"].clone(),
            starts[1]["content_block"]["type"].clone()
        ),
        (json!(1), json!("text"))
    );
    let text_of = |index: u64, field: &str| -> String {
        events
            .iter()
            .filter(|e| e["type"] == "content_block_delta" && e["index"] == index)
            .map(|e| e["delta"][field].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(text_of(0, "thinking"), "add them");
    assert_eq!(text_of(1, "text"), "4");
    // Block 0 stops before block 1 starts; both stop before message_delta.
    let pos = |pred: &dyn Fn(&Value) -> bool| events.iter().position(pred).expect("event");
    assert!(
        pos(&|e| e["type"] == "content_block_stop" && e["index"] == 0)
            < pos(&|e| e["type"] == "content_block_start" && e["index"] == 1)
    );
    assert!(
        pos(&|e| e["type"] == "content_block_stop" && e["index"] == 1)
            < pos(&|e| e["type"] == "message_delta")
    );
}

/// A structured output leaves the reasoning block open: the model thinks first and the
/// format applies to the answer after `</think>` (the grammar is
/// `OutputConstraint::after_reasoning`, unit-tested in the engine). The random model never
/// closes its thoughts in 40 tokens, so here all of it is reasoning and the prompt is the
/// unconstrained one.
#[tokio::test]
async fn structured_outputs_apply_after_the_reasoning() {
    let (s, _dir) = hy3_server();
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                        "required": ["n"], "additionalProperties": false});
    let plain = json!({"model": "local", "max_tokens": 40, "temperature": 0,
                       "messages": [{"role": "user", "content": "2+2?"}]});
    let mut b = plain.clone();
    b["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "n", "schema": schema}});
    let r = post(&s, "/v1/chat/completions", b, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let c = &v["choices"][0];
    assert!(
        c["message"]["reasoning_content"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{c}"
    );
    let content = c["message"]["content"].as_str().unwrap_or("");
    if c["finish_reason"] == "stop" {
        let n: Value = serde_json::from_str(content).expect("JSON answer");
        assert!(n["n"].as_u64().is_some_and(|n| n <= 9), "{c}");
    } else {
        assert_eq!(content, "", "{c}");
    }
    let r2 = post(&s, "/v1/chat/completions", plain, &[]).await;
    assert_eq!(
        r2.json()["usage"]["prompt_tokens"],
        v["usage"]["prompt_tokens"]
    );
}

/// Anthropic's `thinking` picks the template's reasoning mode: disabled renders Hy3's
/// `no_think` prompt, a small budget `low`, otherwise `high`.
#[tokio::test]
async fn anthropic_thinking_sets_the_reasoning_effort() {
    let (s, _dir) = hy3_server();
    let prompt_tokens = |v: &Value| {
        v["usage"]["input_tokens"].as_u64().unwrap_or(0)
            + v["usage"]["cache_read_input_tokens"].as_u64().unwrap_or(0)
    };
    let msg = |thinking: Value| {
        let mut b = json!({"model": "local", "max_tokens": 1, "temperature": 0,
                           "messages": [{"role": "user", "content": "2+2?"}]});
        if !thinking.is_null() {
            b["thinking"] = thinking;
        }
        b
    };
    let chat = |effort: &str| {
        json!({"model": "local", "max_tokens": 1, "temperature": 0,
               "messages": [{"role": "user", "content": "2+2?"}],
               "chat_template_kwargs": {"reasoning_effort": effort}})
    };
    for (thinking, effort) in [
        (json!({"type": "disabled"}), "no_think"),
        (json!({"type": "enabled", "budget_tokens": 1024}), "low"),
        (json!({"type": "enabled", "budget_tokens": 16000}), "high"),
        (Value::Null, "high"),
    ] {
        let a = post(&s, "/v1/messages", msg(thinking.clone()), &[]).await;
        assert_eq!(a.status, 200, "{}", a.text);
        let o = post(&s, "/v1/chat/completions", chat(effort), &[])
            .await
            .json();
        assert_eq!(
            prompt_tokens(&a.json()),
            o["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
            "{thinking} vs {effort}"
        );
    }
    let r = post(&s, "/v1/messages", msg(json!({"type": "sometimes"})), &[]).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("thinking.type"), "{}", r.text);
}

/// `thinking.budget_tokens` caps the reasoning: the random model never closes its thoughts by
/// itself, so an answer block after a short thinking block shows the tag was forced.
#[tokio::test]
async fn a_thinking_budget_forces_the_answer() {
    let (s, _dir) = hy3_server();
    let body = |thinking: Value| {
        json!({"model": "local", "max_tokens": 40, "temperature": 0, "thinking": thinking,
               "messages": [{"role": "user", "content": "2+2?"}]})
    };
    let r = post(
        &s,
        "/v1/messages",
        body(json!({"type": "enabled", "budget_tokens": 6})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let blocks = v["content"].as_array().expect("content");
    assert_eq!(blocks[0]["type"], "thinking", "{v}");
    assert_eq!(blocks[1]["type"], "text", "{v}");
    let thought = blocks[0]["thinking"].as_str().expect("thinking");
    assert!(
        !thought.is_empty() && !blocks[1]["text"].as_str().unwrap_or("").is_empty(),
        "{v}"
    );
    // Without a budget the same prompt (reasoning_effort low, as budget 6 picks) thinks until
    // max_tokens, and the budgeted thoughts are its beginning (greedy).
    let r = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "local", "max_tokens": 40, "temperature": 0,
               "messages": [{"role": "user", "content": "2+2?"}],
               "chat_template_kwargs": {"reasoning_effort": "low"}}),
        &[],
    )
    .await;
    let m = &r.json()["choices"][0]["message"];
    assert_eq!(m["content"], "", "{m}");
    let long = m["reasoning_content"].as_str().expect("reasoning");
    assert!(
        long.starts_with(thought.trim_end()),
        "{thought:?} vs {long:?}"
    );
}

/// vLLM's `thinking_token_budget` on chat completions caps the reasoning as Anthropic's
/// `budget_tokens` does: the random model never closes its thoughts by itself, so an answer
/// after the budget's tokens of reasoning shows the closing tag was forced, and those thoughts
/// are the beginning of the unbudgeted ones (greedy). A negative budget is a 400 naming it.
#[tokio::test]
async fn openai_thinking_token_budget_forces_the_answer() {
    let (s, _dir) = hy3_server();
    let body = |budget: Value| {
        let mut b = json!({"model": "local", "max_tokens": 40, "temperature": 0,
                           "messages": [{"role": "user", "content": "2+2?"}],
                           "chat_template_kwargs": {"reasoning_effort": "low"}});
        if !budget.is_null() {
            b["thinking_token_budget"] = budget;
        }
        b
    };
    let r = post(&s, "/v1/chat/completions", body(json!(6)), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let m = &v["choices"][0]["message"];
    let thought = m["reasoning_content"].as_str().expect("reasoning");
    let answer = m["content"].as_str().expect("content");
    assert!(!thought.is_empty() && !answer.is_empty(), "{v}");
    let r = post(&s, "/v1/chat/completions", body(Value::Null), &[]).await;
    let m = &r.json()["choices"][0]["message"];
    assert_eq!(m["content"], "", "{m}");
    let long = m["reasoning_content"].as_str().expect("reasoning");
    assert!(
        long.starts_with(thought.trim_end()) && long.len() > thought.trim_end().len(),
        "{thought:?} vs {long:?}"
    );
    for bad in [json!(-1), json!("many")] {
        let r = post(&s, "/v1/chat/completions", body(bad.clone()), &[]).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text);
        assert!(
            r.text.contains("thinking_token_budget"),
            "{bad}: {}",
            r.text
        );
    }
}
