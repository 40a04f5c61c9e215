//! Tool calling on the local engine over both wire formats, on the tiny random model (its free
//! output never looks like a call, so every call comes from the server's machinery):
//! - a forced call (`required`, a named function; Anthropic `any` / `tool`) is generated under
//!   the function's schema and returned as OpenAI `tool_calls` / Anthropic `tool_use`, plain
//!   and streamed (`delta.tool_calls`; `input_json_delta` events);
//! - with `tool_choice: auto`, a call the model writes is parsed out of its text;
//! - conversations carrying calls and results render the same prompt from either API;
//! - bad tool definitions and choices are 400s naming the field.

mod common;

use common::{anthropic_error, openai_error, parse_sse, post, Opts, Server};
use serde_json::{json, Value};

/// Tool definitions take a few hundred tokens of the byte-level test tokenizer.
fn server() -> Server {
    Server::start_with(Opts {
        args: &["--max-model-len", "2048"],
        ..Default::default()
    })
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"], "additionalProperties": false}}})
}

fn other_tool() -> Value {
    json!({"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}, "additionalProperties": false}}})
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": "local", "max_tokens": 120, "temperature": 1.0, "seed": 7,
        "messages": [{"role": "user", "content": "Weather in Paris for 3 days?"}],
        "tools": [weather_tool(), other_tool()],
    });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

/// Checks an arguments object against the weather tool's schema.
fn assert_weather_args(a: &Value) {
    let o = a
        .as_object()
        .unwrap_or_else(|| panic!("arguments not an object: {a}"));
    assert!(
        o["city"].as_str().is_some_and(|c| c.chars().count() <= 12),
        "{a}"
    );
    assert!(
        o["days"].as_u64().is_some_and(|d| (1..=7).contains(&d)),
        "{a}"
    );
    assert_eq!(o.len(), 2, "{a}");
}

#[tokio::test]
async fn openai_forced_calls_plain_and_streamed() {
    let s = server();
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ] {
        let r = post(
            &s,
            "/v1/chat/completions",
            chat(json!({"tool_choice": choice, "n": 2})),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        for c in r.json()["choices"].as_array().expect("choices") {
            assert_eq!(c["finish_reason"], "tool_calls", "{c}");
            assert!(c["message"]["content"].is_null(), "{c}");
            let calls = c["message"]["tool_calls"].as_array().expect("tool_calls");
            assert_eq!(calls.len(), 1);
            let call = &calls[0];
            assert!(call["id"].as_str().is_some_and(|i| i.starts_with("call_")));
            assert_eq!(call["type"], "function");
            let name = call["function"]["name"].as_str().expect("name");
            let args: Value = serde_json::from_str(
                call["function"]["arguments"]
                    .as_str()
                    .expect("arguments string"),
            )
            .expect("arguments are JSON");
            if choice.is_object() || name == "get_weather" {
                assert_eq!(name, "get_weather");
                assert_weather_args(&args);
            } else {
                assert_eq!((name, args), ("noop", json!({})));
            }
        }
    }
    let body = chat(
        json!({"stream": true, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    );
    let r = post(&s, "/v1/chat/completions", body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut calls = vec![];
    let mut content = String::new();
    let mut finish = Value::Null;
    for (_, data) in parse_sse(&r.text) {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).expect("chunk");
        let d = &v["choices"][0]["delta"];
        content.push_str(d["content"].as_str().unwrap_or(""));
        if let Some(tc) = d["tool_calls"].as_array() {
            calls.extend(tc.iter().cloned());
        }
        if !v["choices"][0]["finish_reason"].is_null() {
            finish = v["choices"][0]["finish_reason"].clone();
        }
    }
    assert_eq!(content, "", "a forced call has no content");
    assert_eq!(finish, "tool_calls");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().expect("args"))
            .expect("JSON");
    assert_weather_args(&args);
}

#[tokio::test]
async fn auto_choice_parses_calls_the_model_writes() {
    let s = server();
    // The tiny model never writes a call by itself: a grammar makes it write some text and
    // then one call in the template's (Hermes) format, which the server must parse out.
    let grammar = r#"start: "Checking. <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"" /[a-z]{1,8}/ "\", \"days\": " /[1-7]/ "}}</tool_call>""#;
    let body = chat(json!({"tool_choice": "auto", "structured_outputs": {"grammar": grammar}}));
    let r = post(&s, "/v1/chat/completions", body.clone(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let c = &r.json()["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{c}");
    assert_eq!(c["message"]["content"], "Checking.", "{c}");
    let args: Value = serde_json::from_str(
        c["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .expect("args"),
    )
    .expect("JSON");
    assert_weather_args(&args);
    // Streamed: "Checking. " arrives as content before the call is complete.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let r = post(&s, "/v1/chat/completions", sb, &[]).await;
    let mut content = String::new();
    let mut names = vec![];
    for (_, data) in parse_sse(&r.text) {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).expect("chunk");
        content.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        for tc in v["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            names.push(tc["function"]["name"].clone());
        }
    }
    assert_eq!(content.trim(), "Checking.");
    assert_eq!(names, vec![json!("get_weather")]);
    // tool_choice none: no tools shown, nothing parsed.
    let mut nb = body;
    nb["tool_choice"] = json!("none");
    let r = post(&s, "/v1/chat/completions", nb, &[]).await;
    let c = &r.json()["choices"][0];
    assert!(
        c["message"]["content"]
            .as_str()
            .is_some_and(|t| t.contains("<tool_call>")),
        "{c}"
    );
    assert!(c["message"]["tool_calls"].is_null());
}

#[tokio::test]
async fn anthropic_forced_tool_use_plain_and_streamed() {
    let s = server();
    let tools = json!([{"name": "get_weather", "description": "Current weather",
        "input_schema": weather_tool()["function"]["parameters"]}, {"name": "noop"}]);
    let body = |choice: Value, stream: bool| {
        json!({
            "model": "local", "max_tokens": 120, "temperature": 1.0, "stream": stream,
            "messages": [{"role": "user", "content": "Weather?"}],
            "tools": tools, "tool_choice": choice,
        })
    };
    let r = post(
        &s,
        "/v1/messages",
        body(json!({"type": "tool", "name": "get_weather"}), false),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["stop_reason"], "tool_use", "{v}");
    let blocks = v["content"].as_array().expect("content");
    let tu: Vec<&Value> = blocks.iter().filter(|b| b["type"] == "tool_use").collect();
    assert_eq!(tu.len(), 1, "{v}");
    assert!(tu[0]["id"]
        .as_str()
        .is_some_and(|i| i.starts_with("toolu_")));
    assert_eq!(tu[0]["name"], "get_weather");
    assert_weather_args(&tu[0]["input"]);
    let r = post(&s, "/v1/messages", body(json!({"type": "any"}), true), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let events: Vec<(Option<String>, Value)> = parse_sse(&r.text)
        .into_iter()
        .map(|(e, d)| (e, serde_json::from_str(&d).expect("event JSON")))
        .collect();
    let start = events
        .iter()
        .find(|(_, d)| {
            d["type"] == "content_block_start" && d["content_block"]["type"] == "tool_use"
        })
        .expect("a tool_use block starts");
    let index = start.1["index"].clone();
    let json_text: String = events
        .iter()
        .filter(|(_, d)| d["type"] == "content_block_delta" && d["index"] == index)
        .map(|(_, d)| {
            d["delta"]["partial_json"]
                .as_str()
                .expect("input_json_delta")
                .to_string()
        })
        .collect();
    let input: Value = serde_json::from_str(&json_text).expect("input JSON");
    if start.1["content_block"]["name"] == "get_weather" {
        assert_weather_args(&input);
    } else {
        assert_eq!(input, json!({}));
    }
    assert!(events
        .iter()
        .any(|(_, d)| d["type"] == "content_block_stop" && d["index"] == index));
    let md = events
        .iter()
        .find(|(_, d)| d["type"] == "message_delta")
        .expect("message_delta");
    assert_eq!(md.1["delta"]["stop_reason"], "tool_use");
}

#[tokio::test]
async fn both_apis_render_the_same_tool_conversation() {
    let s = server();
    let openai = json!({
        "model": "local", "max_tokens": 1, "temperature": 0,
        "tools": [weather_tool()],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        ]
    });
    let anthropic = json!({
        "model": "local", "max_tokens": 1, "temperature": 0,
        "tools": [{"name": "get_weather", "description": "Current weather in a city",
                   "input_schema": weather_tool()["function"]["parameters"]}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                               "input": {"city": "Paris", "days": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "18 C, sunny"}]},
        ]
    });
    let a = post(&s, "/v1/chat/completions", openai, &[]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let b = post(&s, "/v1/messages", anthropic, &[]).await;
    assert_eq!(b.status, 200, "{}", b.text);
    let (a, b) = (a.json(), b.json());
    let pa = a["usage"]["prompt_tokens"].as_u64().expect("prompt_tokens");
    let pb = b["usage"]["input_tokens"].as_u64().expect("input_tokens")
        + b["usage"]["cache_read_input_tokens"].as_u64().unwrap_or(0);
    assert_eq!(pa, pb, "the two conversions render different prompts");
    // And greedy picks the same first token from the same prompt.
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["content"][0]["text"]
    );
}

#[tokio::test]
async fn bad_tools_and_choices_are_400_naming_the_field() {
    let s = server();
    for (extra, param) in [
        (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": [{"type": "function"}]}),
            "tools[0].function",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice.function.name",
        ),
        (json!({"tool_choice": "sometimes"}), "tool_choice"),
        (
            json!({"tools": [], "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"tool_choice": "required", "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            "messages[0].tool_call_id",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}),
            "messages[0].tool_calls",
        ),
    ] {
        let r = post(&s, "/v1/chat/completions", chat(extra.clone()), &[]).await;
        assert_eq!(r.status, 400, "{extra}: {}", r.text);
        let v = r.json();
        assert_eq!(openai_error(&v)["param"], param, "{extra}: {v}");
    }
    for (extra, needle) in [
        (
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            "tools[0].type",
        ),
        (
            json!({"tools": [{"name": "f"}], "tool_choice": {"type": "tool", "name": "g"}}),
            "tool_choice.name",
        ),
        (
            json!({"tools": [{"name": "f"}], "tool_choice": {"type": "maybe"}}),
            "tool_choice.type",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "1", "name": "f", "input": {}}]}]}),
            "messages[0].content[0]",
        ),
    ] {
        let mut body = json!({"model": "local", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let r = post(&s, "/v1/messages", body, &[]).await;
        assert_eq!(r.status, 400, "{extra}: {}", r.text);
        let v = r.json();
        let msg = anthropic_error(&v)["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(msg.contains(needle), "{extra}: {v}");
    }
}

/// Two calls in one answer come back as two; `parallel_tool_calls: false` (Anthropic:
/// `disable_parallel_tool_use`) keeps the first.
#[tokio::test]
async fn parallel_calls_and_their_opt_out() {
    let s = server();
    let call = |city: &str| {
        format!(
            r#"<tool_call>{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{city}\", \"days\": 1}}}}</tool_call>"#
        )
    };
    let grammar = format!("start: \"{}\" \"\\n\" \"{}\"", call("a"), call("b"));
    for (parallel, want) in [(Value::Null, 2), (json!(true), 2), (json!(false), 1)] {
        let mut body = chat(json!({"structured_outputs": {"grammar": grammar}, "max_tokens": 400}));
        if !parallel.is_null() {
            body["parallel_tool_calls"] = parallel.clone();
        }
        let r = post(&s, "/v1/chat/completions", body, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let calls = r.json()["choices"][0]["message"]["tool_calls"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(calls, want, "parallel_tool_calls {parallel}");
    }
    for (disable, want) in [(false, 2), (true, 1)] {
        let body = json!({"model": "local", "max_tokens": 400, "temperature": 0,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "get_weather", "input_schema": weather_tool()["function"]["parameters"]}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": disable},
            "structured_outputs": {"grammar": grammar}});
        let r = post(&s, "/v1/messages", body, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let uses = r.json()["content"]
            .as_array()
            .expect("content")
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .count();
        assert_eq!(uses, want, "disable_parallel_tool_use {disable}");
    }
}
