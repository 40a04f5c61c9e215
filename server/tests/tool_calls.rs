//! Tool calling on the local engine over both wire formats, on the tiny random model (its free
//! output never looks like a call, so every call comes from the server's machinery):
//! - a forced call (`required`, a named function; Anthropic `any` / `tool`) is generated under
//!   the function's schema and returned as OpenAI `tool_calls` / Anthropic `tool_use`, plain
//!   and streamed: the call opens once its name is known and its arguments follow in pieces
//!   (`delta.tool_calls` entries; `input_json_delta` events), equal to the non-streamed ones;
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
    let streamed = openai_stream(&r.text);
    assert_eq!(streamed.content, "", "a forced call has no content");
    assert_eq!(streamed.finish, "tool_calls");
    assert_eq!(streamed.calls.len(), 1, "{:?}", streamed.calls);
    assert_eq!(streamed.calls[0].0, "get_weather");
    assert_weather_args(&streamed.calls[0].1);
}

/// A streamed OpenAI chat answer: content, calls (name, parsed arguments, argument pieces),
/// finish reason. Checks the `delta.tool_calls` protocol on the way: a call's first entry has
/// its id, type and name with empty arguments, later ones only argument pieces.
struct OpenAiStream {
    content: String,
    calls: Vec<(String, Value, usize)>,
    finish: Value,
}

fn openai_stream(text: &str) -> OpenAiStream {
    let mut content = String::new();
    let mut calls: Vec<(String, String, usize)> = vec![];
    let mut finish = Value::Null;
    for (_, data) in parse_sse(text) {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).expect("chunk");
        let d = &v["choices"][0]["delta"];
        content.push_str(d["content"].as_str().unwrap_or(""));
        let entries = d["tool_calls"].as_array().cloned().unwrap_or_default();
        let mut seen: Vec<&Value> = entries.iter().map(|tc| &tc["index"]).collect();
        seen.dedup();
        assert_eq!(
            seen.len(),
            entries.len(),
            "one entry per call in a chunk: {d}"
        );
        for tc in &entries {
            let index = tc["index"].as_u64().expect("index") as usize;
            let args = tc["function"]["arguments"].as_str().expect("arguments");
            if index == calls.len() {
                assert!(
                    tc["id"].as_str().is_some_and(|i| i.starts_with("call_")),
                    "{tc}"
                );
                assert_eq!(tc["type"], "function", "{tc}");
                assert_eq!(args, "", "the opening entry has no arguments yet: {tc}");
                let name = tc["function"]["name"].as_str().expect("name");
                calls.push((name.to_string(), String::new(), 0));
            } else {
                assert_eq!(
                    index + 1,
                    calls.len(),
                    "calls stream one after another: {tc}"
                );
                assert!(
                    tc.get("id").is_none() && tc["function"].get("name").is_none(),
                    "{tc}"
                );
                calls[index].1.push_str(args);
                calls[index].2 += 1;
            }
        }
        if !v["choices"][0]["finish_reason"].is_null() {
            finish = v["choices"][0]["finish_reason"].clone();
        }
    }
    let calls = calls
        .into_iter()
        .map(|(name, args, pieces)| {
            let parsed = serde_json::from_str(&args)
                .unwrap_or_else(|e| panic!("arguments {args:?} are not JSON: {e}"));
            (name, parsed, pieces)
        })
        .collect();
    OpenAiStream {
        content,
        calls,
        finish,
    }
}

/// An Anthropic stream's `tool_use` blocks: name, the concatenated `partial_json` parsed,
/// and how many pieces it came in; checks each block opens with an empty input and closes.
fn anthropic_tool_uses(text: &str) -> Vec<(String, Value, usize)> {
    let events: Vec<Value> = parse_sse(text)
        .into_iter()
        .map(|(_, d)| serde_json::from_str(&d).expect("event JSON"))
        .collect();
    let mut uses = vec![];
    for (k, e) in events.iter().enumerate() {
        if e["type"] != "content_block_start" || e["content_block"]["type"] != "tool_use" {
            continue;
        }
        let b = &e["content_block"];
        assert!(
            b["id"].as_str().is_some_and(|i| i.starts_with("toolu_")),
            "{e}"
        );
        assert_eq!(b["input"], json!({}), "{e}");
        let index = &e["index"];
        let mut json_text = String::new();
        let mut pieces = 0;
        let mut stopped = false;
        for f in &events[k + 1..] {
            if f["index"] != *index {
                continue;
            }
            if f["type"] == "content_block_stop" {
                stopped = true;
                break;
            }
            assert_eq!(f["delta"]["type"], "input_json_delta", "{f}");
            json_text.push_str(f["delta"]["partial_json"].as_str().expect("partial_json"));
            pieces += 1;
        }
        assert!(stopped, "tool_use block {index} is closed");
        let input = serde_json::from_str(&json_text)
            .unwrap_or_else(|e| panic!("input {json_text:?} is not JSON: {e}"));
        uses.push((b["name"].as_str().expect("name").to_string(), input, pieces));
    }
    uses
}

/// Greedy, so that the plain and the streamed request write the same call: the streamed
/// arguments arrive in pieces and join into the plain response's arguments.
#[tokio::test]
async fn streamed_arguments_arrive_in_pieces_and_equal_the_plain_ones() {
    let s = server();
    let body = chat(json!({"temperature": 0,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}));
    let r = post(&s, "/v1/chat/completions", body.clone(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let call = &r.json()["choices"][0]["message"]["tool_calls"][0];
    let plain: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().expect("arguments"))
            .expect("JSON");
    assert_weather_args(&plain);
    let mut sb = body;
    sb["stream"] = json!(true);
    let r = post(&s, "/v1/chat/completions", sb, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let streamed = openai_stream(&r.text);
    assert_eq!(streamed.finish, "tool_calls");
    assert_eq!(streamed.calls.len(), 1, "{:?}", streamed.calls);
    let (name, args, pieces) = &streamed.calls[0];
    assert_eq!(name, "get_weather");
    assert_eq!(*args, plain);
    assert!(*pieces > 1, "arguments {args} came in {pieces} piece(s)");

    let tools = json!([{"name": "get_weather", "description": "Current weather",
        "input_schema": weather_tool()["function"]["parameters"]}, {"name": "noop"}]);
    let body = json!({"model": "local", "max_tokens": 120, "temperature": 0,
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": tools, "tool_choice": {"type": "tool", "name": "get_weather"}});
    let r = post(&s, "/v1/messages", body.clone(), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let plain = v["content"]
        .as_array()
        .expect("content")
        .iter()
        .find(|b| b["type"] == "tool_use")
        .expect("tool_use")["input"]
        .clone();
    assert_weather_args(&plain);
    let mut sb = body;
    sb["stream"] = json!(true);
    let r = post(&s, "/v1/messages", sb, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let uses = anthropic_tool_uses(&r.text);
    assert_eq!(uses.len(), 1, "{}", r.text);
    let (name, input, pieces) = &uses[0];
    assert_eq!(name, "get_weather");
    assert_eq!(*input, plain);
    assert!(*pieces > 1, "input {input} came in {pieces} piece(s)");
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
    let streamed = openai_stream(&r.text);
    assert_eq!(streamed.content.trim(), "Checking.");
    assert_eq!(streamed.finish, "tool_calls");
    assert_eq!(streamed.calls.len(), 1);
    assert_eq!(streamed.calls[0].0, "get_weather");
    assert_eq!(streamed.calls[0].1, args);
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

/// Two calls in one answer come back as two, plain and streamed (numbered 0 and 1);
/// `parallel_tool_calls: false` (Anthropic: `disable_parallel_tool_use`) keeps the first.
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
        let r = post(&s, "/v1/chat/completions", body.clone(), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let calls = r.json()["choices"][0]["message"]["tool_calls"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(calls, want, "parallel_tool_calls {parallel}");
        let mut sb = body;
        sb["stream"] = json!(true);
        let r = post(&s, "/v1/chat/completions", sb, &[]).await;
        let streamed = openai_stream(&r.text);
        let cities: Vec<&Value> = streamed.calls.iter().map(|c| &c.1["city"]).collect();
        let all = [json!("a"), json!("b")];
        assert_eq!(
            cities,
            all[..want].iter().collect::<Vec<_>>(),
            "streamed, parallel_tool_calls {parallel}"
        );
        assert_eq!(streamed.finish, "tool_calls");
        assert_eq!(streamed.content.trim(), "");
    }
    for (disable, want) in [(false, 2), (true, 1)] {
        let body = json!({"model": "local", "max_tokens": 400, "temperature": 0,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "get_weather", "input_schema": weather_tool()["function"]["parameters"]}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": disable},
            "structured_outputs": {"grammar": grammar}});
        let r = post(&s, "/v1/messages", body.clone(), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let uses = r.json()["content"]
            .as_array()
            .expect("content")
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .count();
        assert_eq!(uses, want, "disable_parallel_tool_use {disable}");
        let mut sb = body;
        sb["stream"] = json!(true);
        let r = post(&s, "/v1/messages", sb, &[]).await;
        let uses = anthropic_tool_uses(&r.text);
        assert_eq!(
            uses.len(),
            want,
            "streamed, disable_parallel_tool_use {disable}"
        );
        assert!(!r.text.contains("\"text_delta\""), "no text: {}", r.text);
    }
}

/// A call cut off by `max_tokens` after it started streaming ends as the providers report it:
/// OpenAI `finish_reason: "length"`, Anthropic `stop_reason: "max_tokens"`, not as a call.
#[tokio::test]
async fn a_call_cut_off_by_the_limit_ends_as_length() {
    let s = server();
    // The forced call opens with `<tool_call>{"name":"get_weather","arguments":{"city":"`
    // (about 50 tokens of the byte-level tokenizer), so 56 tokens end inside its arguments.
    let body = chat(
        json!({"stream": true, "max_tokens": 56, "temperature": 0, "tool_choice": "required"}),
    );
    let text = post(&s, "/v1/chat/completions", body, &[]).await.text;
    let mut started = false;
    let mut finish = Value::Null;
    for (_, data) in parse_sse(&text) {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).expect("chunk");
        let c = &v["choices"][0];
        started |= c["delta"]["tool_calls"][0]["function"]["name"] == "get_weather";
        if !c["finish_reason"].is_null() {
            finish = c["finish_reason"].clone();
        }
    }
    assert!(started, "the call started streaming: {text}");
    assert_eq!(finish, "length", "{text}");

    let body = json!({"model": "local", "max_tokens": 56, "temperature": 0, "stream": true,
                      "tool_choice": {"type": "any"},
                      "messages": [{"role": "user", "content": "Weather in Paris for 3 days?"}],
                      "tools": [{"name": "get_weather", "description": "Current weather in a city",
                                 "input_schema": weather_tool()["function"]["parameters"]}]});
    let text = post(&s, "/v1/messages", body, &[]).await.text;
    let evs = parse_sse(&text);
    let started = evs
        .iter()
        .any(|(_, d)| d.contains("\"tool_use\"") && d.contains("content_block_start"));
    let stop = evs
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["type"] == "message_delta")
        .map(|v| v["delta"]["stop_reason"].clone());
    assert!(started, "the tool_use block started: {text}");
    assert_eq!(stop, Some(json!("max_tokens")), "{text}");
}
