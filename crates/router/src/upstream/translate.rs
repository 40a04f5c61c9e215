//! Translation between the OpenAI chat-completions and Anthropic Messages wire formats:
//! requests, complete responses, and streamed events.
//!
//! Covered: system text, text and tool-call content, tool results, tool definitions, stop
//! sequences, sampling parameters, token limits, stop reasons and usage (including cached
//! tokens). Images and other non-text parts are dropped, and streamed tool-call deltas are not
//! translated (text deltas are).

use serde_json::{json, Map, Value};

use crate::cost::Usage;

/// Anthropic requires `max_tokens`; OpenAI bodies often omit it. This is what a request gets
/// when the client set none (Anthropic's own examples use 1024; long answers need more).
pub const DEFAULT_ANTHROPIC_MAX_TOKENS: u64 = 4096;

fn openai_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn copy(from: &Map<String, Value>, to: &mut Map<String, Value>, keys: &[(&str, &str)]) {
    for (a, b) in keys {
        if let Some(v) = from.get(*a) {
            if !v.is_null() {
                to.insert((*b).to_string(), v.clone());
            }
        }
    }
}

/// OpenAI chat-completions request → Anthropic Messages request for `model`.
pub fn openai_to_anthropic_request(body: &Value, model: &str) -> Value {
    let empty = Map::new();
    let obj = body.as_object().unwrap_or(&empty);
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let push = |messages: &mut Vec<Value>, role: &str, block: Value| {
        // Anthropic wants alternating roles; merge consecutive same-role blocks.
        if let Some(last) = messages.last_mut() {
            if last["role"] == role {
                if let Some(arr) = last["content"].as_array_mut() {
                    arr.push(block);
                    return;
                }
            }
        }
        messages.push(json!({"role": role, "content": [block]}));
    };
    for m in obj
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let text = m.get("content").map(openai_text).unwrap_or_default();
        match role {
            "system" | "developer" => system.push(text),
            "assistant" => {
                if !text.is_empty() {
                    push(
                        &mut messages,
                        "assistant",
                        json!({"type": "text", "text": text}),
                    );
                }
                for call in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let args = call
                        .pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .and_then(|a| serde_json::from_str::<Value>(a).ok())
                        .unwrap_or_else(|| json!({}));
                    push(
                        &mut messages,
                        "assistant",
                        json!({"type": "tool_use",
                               "id": call.get("id").cloned().unwrap_or(json!("call")),
                               "name": call.pointer("/function/name").cloned().unwrap_or(json!("tool")),
                               "input": args}),
                    );
                }
            }
            "tool" | "function" => push(
                &mut messages,
                "user",
                json!({"type": "tool_result",
                       "tool_use_id": m.get("tool_call_id").cloned().unwrap_or(json!("call")),
                       "content": text}),
            ),
            _ => push(&mut messages, "user", json!({"type": "text", "text": text})),
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n")));
    }
    out.insert("messages".into(), Value::Array(messages));
    let max = obj
        .get("max_completion_tokens")
        .or_else(|| obj.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_ANTHROPIC_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max));
    copy(
        obj,
        &mut out,
        &[
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("stream", "stream"),
        ],
    );
    match obj.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if let Some(tools) = obj.get("tools").and_then(Value::as_array) {
        let t: Vec<Value> = tools
            .iter()
            .filter_map(|t| t.get("function"))
            .map(|f| {
                json!({"name": f.get("name").cloned().unwrap_or(json!("tool")),
                       "description": f.get("description").cloned().unwrap_or(json!("")),
                       "input_schema": f.get("parameters").cloned().unwrap_or(json!({"type": "object"}))})
            })
            .collect();
        if !t.is_empty() {
            out.insert("tools".into(), Value::Array(t));
        }
    }
    if let Some(u) = obj.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": u}));
    }
    Value::Object(out)
}

fn anthropic_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Anthropic Messages request → OpenAI chat-completions request for `model`.
pub fn anthropic_to_openai_request(body: &Value, model: &str) -> Value {
    let empty = Map::new();
    let obj = body.as_object().unwrap_or(&empty);
    let mut messages = Vec::new();
    if let Some(system) = obj.get("system") {
        let s = anthropic_text(system);
        if !s.is_empty() {
            messages.push(json!({"role": "system", "content": s}));
        }
    }
    for m in obj
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let content = m.get("content").cloned().unwrap_or(Value::Null);
        let blocks = match &content {
            Value::Array(b) => b.clone(),
            Value::String(s) => vec![json!({"type": "text", "text": s})],
            _ => Vec::new(),
        };
        let text = anthropic_text(&Value::Array(blocks.clone()));
        let mut calls = Vec::new();
        for b in &blocks {
            match b.get("type").and_then(Value::as_str) {
                Some("tool_use") => calls.push(json!({
                    "id": b.get("id").cloned().unwrap_or(json!("call")),
                    "type": "function",
                    "function": {"name": b.get("name").cloned().unwrap_or(json!("tool")),
                                 "arguments": b.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into())}
                })),
                Some("tool_result") => messages.push(json!({
                    "role": "tool",
                    "tool_call_id": b.get("tool_use_id").cloned().unwrap_or(json!("call")),
                    "content": b.get("content").map(anthropic_text).unwrap_or_default()
                })),
                _ => {}
            }
        }
        if role == "assistant" {
            let mut msg = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            messages.push(msg);
        } else if !text.is_empty() {
            messages.push(json!({"role": "user", "content": text}));
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("messages".into(), Value::Array(messages));
    copy(
        obj,
        &mut out,
        &[
            ("max_tokens", "max_tokens"),
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("stream", "stream"),
            ("stop_sequences", "stop"),
        ],
    );
    if obj.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(tools) = obj.get("tools").and_then(Value::as_array) {
        let t: Vec<Value> = tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.get("name").cloned().unwrap_or(json!("tool")),
                    "description": t.get("description").cloned().unwrap_or(json!("")),
                    "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"}))}})
            })
            .collect();
        out.insert("tools".into(), Value::Array(t));
    }
    if let Some(u) = body.pointer("/metadata/user_id").and_then(Value::as_str) {
        out.insert("user".into(), json!(u));
    }
    Value::Object(out)
}

/// Anthropic stop reason → OpenAI finish reason.
pub fn finish_reason_from_anthropic(stop: Option<&str>) -> &'static str {
    match stop {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// OpenAI finish reason → Anthropic stop reason.
pub fn stop_reason_from_openai(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls") | Some("function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Normalised usage → an OpenAI `usage` object.
pub fn openai_usage(u: &Usage) -> Value {
    let prompt = u.prompt_tokens();
    json!({"prompt_tokens": prompt, "completion_tokens": u.output_tokens,
           "total_tokens": prompt + u.output_tokens,
           "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens}})
}

/// Normalised usage → an Anthropic `usage` object.
pub fn anthropic_usage(u: &Usage) -> Value {
    json!({"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
           "cache_read_input_tokens": u.cached_input_tokens,
           "cache_creation_input_tokens": u.cache_write_tokens})
}

/// Anthropic Messages response → OpenAI chat completion.
pub fn anthropic_to_openai_response(resp: &Value, created: u64) -> Value {
    let blocks = resp.get("content").cloned().unwrap_or(json!([]));
    let text = anthropic_text(&blocks);
    let calls: Vec<Value> = blocks
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
        .map(|b| {
            json!({"id": b.get("id").cloned().unwrap_or(json!("call")), "type": "function",
                   "function": {"name": b.get("name").cloned().unwrap_or(json!("tool")),
                                "arguments": b.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into())}})
        })
        .collect();
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let usage = Usage::from_anthropic(resp.get("usage").unwrap_or(&Value::Null));
    json!({
        "id": resp.get("id").cloned().unwrap_or(json!("chatcmpl-switchyard")),
        "object": "chat.completion",
        "created": created,
        "model": resp.get("model").cloned().unwrap_or(json!("")),
        "choices": [{"index": 0, "message": message,
                     "finish_reason": finish_reason_from_anthropic(resp.get("stop_reason").and_then(Value::as_str))}],
        "usage": openai_usage(&usage)
    })
}

/// OpenAI chat completion → Anthropic Messages response.
pub fn openai_to_anthropic_response(resp: &Value) -> Value {
    let choice = resp.pointer("/choices/0").cloned().unwrap_or(json!({}));
    let mut content = Vec::new();
    let text = choice
        .pointer("/message/content")
        .map(openai_text)
        .unwrap_or_default();
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in choice
        .pointer("/message/tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let input = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .and_then(|a| serde_json::from_str::<Value>(a).ok())
            .unwrap_or_else(|| json!({}));
        content.push(json!({"type": "tool_use", "id": call.get("id").cloned().unwrap_or(json!("call")),
                            "name": call.pointer("/function/name").cloned().unwrap_or(json!("tool")), "input": input}));
    }
    let usage = Usage::from_openai(resp.get("usage").unwrap_or(&Value::Null));
    json!({
        "id": resp.get("id").cloned().unwrap_or(json!("msg_switchyard")),
        "type": "message",
        "role": "assistant",
        "model": resp.get("model").cloned().unwrap_or(json!("")),
        "content": content,
        "stop_reason": stop_reason_from_openai(choice.get("finish_reason").and_then(Value::as_str)),
        "stop_sequence": null,
        "usage": anthropic_usage(&usage)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_keeps_the_conversation() {
        let openai = json!({
            "model": "auto", "max_tokens": 77, "temperature": 0.2, "stop": "END",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What's 2+2?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{\"e\":\"2+2\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "4"}
            ],
            "tools": [{"type": "function", "function": {"name": "calc", "description": "math", "parameters": {"type": "object"}}}]
        });
        let a = openai_to_anthropic_request(&openai, "claude-x");
        assert_eq!(a["model"], "claude-x");
        assert_eq!(a["system"], "Be brief.");
        assert_eq!(a["max_tokens"], 77);
        assert_eq!(a["stop_sequences"], json!(["END"]));
        assert_eq!(a["messages"][1]["content"][0]["type"], "tool_use");
        assert_eq!(a["messages"][1]["content"][0]["input"]["e"], "2+2");
        assert_eq!(a["messages"][2]["content"][0]["type"], "tool_result");
        assert_eq!(a["tools"][0]["input_schema"]["type"], "object");

        let back = anthropic_to_openai_request(&a, "gpt-x");
        assert_eq!(back["messages"][0]["role"], "system");
        assert_eq!(back["messages"][1]["content"], "What's 2+2?");
        assert_eq!(
            back["messages"][2]["tool_calls"][0]["function"]["name"],
            "calc"
        );
        assert_eq!(back["messages"][3]["role"], "tool");
        assert_eq!(back["messages"][3]["content"], "4");
        assert_eq!(back["max_tokens"], 77);
    }

    #[test]
    fn anthropic_max_tokens_defaults() {
        let a = openai_to_anthropic_request(
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
            "m",
        );
        assert_eq!(a["max_tokens"], DEFAULT_ANTHROPIC_MAX_TOKENS);
    }

    #[test]
    fn responses_translate_with_usage() {
        let anth = json!({"id": "msg_1", "type": "message", "model": "claude-x",
            "content": [{"type": "text", "text": "Four."}], "stop_reason": "max_tokens",
            "usage": {"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 90}});
        let o = anthropic_to_openai_response(&anth, 1);
        assert_eq!(o["choices"][0]["message"]["content"], "Four.");
        assert_eq!(o["choices"][0]["finish_reason"], "length");
        assert_eq!(o["usage"]["prompt_tokens"], 100);
        assert_eq!(o["usage"]["prompt_tokens_details"]["cached_tokens"], 90);

        let back = openai_to_anthropic_response(&o);
        assert_eq!(back["content"][0]["text"], "Four.");
        assert_eq!(back["stop_reason"], "max_tokens");
        assert_eq!(back["usage"]["input_tokens"], 10);
        assert_eq!(back["usage"]["cache_read_input_tokens"], 90);
    }
}
