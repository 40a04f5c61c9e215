//! Structured outputs over HTTP on the tiny random model (its free output is noise, so
//! well-formed output can only come from the constraint): OpenAI's `response_format`
//! (`json_object`, `json_schema`), vLLM's `structured_outputs` and `guided_*` fields, and
//! Anthropic's `output_format`, plain and streamed, with `n > 1`; bad constraints are 400s in
//! each API's error shape naming the field.

mod common;

use common::{anthropic_error, openai_error, parse_sse, post, Server};
use serde_json::{json, Value};

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "likes": {"type": "array", "items": {"enum": ["tea", "coffee"]}, "maxItems": 3}
        },
        "required": ["name", "age", "likes"],
        "additionalProperties": false
    })
}

/// Checks `text` is a JSON object valid under [`person_schema`].
fn assert_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {text}"));
    assert_eq!(o.len(), 3, "{text}");
    assert!(
        o["name"].as_str().is_some_and(|s| s.chars().count() <= 10),
        "{text}"
    );
    assert!(o["age"].as_u64().is_some_and(|a| a <= 130), "{text}");
    let likes = o["likes"].as_array().expect("likes");
    assert!(
        likes.len() <= 3 && likes.iter().all(|l| l == "tea" || l == "coffee"),
        "{text}"
    );
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": "local",
        "max_tokens": 120,
        "temperature": 1.0,
        "seed": 11,
        "messages": [{"role": "user", "content": "Describe a person as JSON."}]
    });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn openai_response_format_json_schema_and_object() {
    let s = Server::start();
    let body = chat(json!({
        "n": 3,
        "response_format": {"type": "json_schema",
            "json_schema": {"name": "person", "strict": true, "schema": person_schema()}}
    }));
    let r = post(&s, "/v1/chat/completions", body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    for c in choices {
        assert_person(c["message"]["content"].as_str().expect("content"));
        assert_eq!(c["finish_reason"], "stop", "{c}");
    }
    // Streamed: the deltas put together are the same kind of object.
    let body = chat(json!({
        "stream": true,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": person_schema()}}
    }));
    let r = post(&s, "/v1/chat/completions", body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut text = String::new();
    let mut finish = Value::Null;
    for (_, data) in parse_sse(&r.text) {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).expect("chunk");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if !v["choices"][0]["finish_reason"].is_null() {
            finish = v["choices"][0]["finish_reason"].clone();
        }
    }
    assert_person(&text);
    assert_eq!(finish, "stop");
    // json_object: any object; a random model may stop mid-object only at max_tokens.
    let body = chat(json!({"response_format": {"type": "json_object"}, "max_tokens": 400}));
    let r = post(&s, "/v1/chat/completions", body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let c = &r.json()["choices"][0];
    let content = c["message"]["content"].as_str().expect("content");
    if c["finish_reason"] == "stop" {
        // JSON numbers have no range limit (a random model writes 1e3292); check the syntax
        // without converting them.
        serde_json::from_str::<serde::de::IgnoredAny>(content)
            .unwrap_or_else(|e| panic!("{e}: {content}"));
        assert!(content.starts_with('{'), "{content}");
    } else {
        assert!(content.starts_with('{'), "{content}");
    }
    // `"type": "text"` is no constraint at all.
    let r = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"response_format": {"type": "text"}, "max_tokens": 4})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn vllm_fields_on_completions_and_anthropic_output_format() {
    let s = Server::start();
    let complete = |extra: Value| {
        let mut body = json!({"model": "local", "prompt": "Pick one:", "max_tokens": 40,
                              "temperature": 1.0, "seed": 5, "n": 4});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        body
    };
    let choices = ["red", "green", "light blue"];
    for body in [
        complete(json!({"structured_outputs": {"choice": choices}})),
        complete(json!({"guided_choice": choices})),
    ] {
        let r = post(&s, "/v1/completions", body, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        for c in r.json()["choices"].as_array().expect("choices") {
            let t = c["text"].as_str().expect("text");
            assert!(choices.contains(&t), "{t:?}");
            assert_eq!(c["finish_reason"], "stop");
        }
    }
    let re = regex::Regex::new(r"^\d{3}-\d{4}$").expect("regex");
    for body in [
        complete(json!({"structured_outputs": {"regex": r"\d{3}-\d{4}"}})),
        complete(json!({"guided_regex": r"\d{3}-\d{4}"})),
    ] {
        let r = post(&s, "/v1/completions", body, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        for c in r.json()["choices"].as_array().expect("choices") {
            let t = c["text"].as_str().expect("text");
            assert!(re.is_match(t), "{t:?}");
        }
    }
    // A schema given as a string (vLLM accepts both), and a Lark grammar.
    let r = post(
        &s,
        "/v1/completions",
        complete(json!({"guided_json": person_schema().to_string(), "max_tokens": 120})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for c in r.json()["choices"].as_array().expect("choices") {
        assert_person(c["text"].as_str().expect("text"));
    }
    let grammar = "start: \"(\" num (\"+\" num)* \")\"\nnum: /[1-9]/";
    let r = post(
        &s,
        "/v1/completions",
        complete(json!({"structured_outputs": {"grammar": grammar}})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let sum = regex::Regex::new(r"^\([1-9](\+[1-9])*\)$").expect("regex");
    for c in r.json()["choices"].as_array().expect("choices") {
        let t = c["text"].as_str().expect("text");
        if c["finish_reason"] == "stop" {
            assert!(sum.is_match(t), "{t:?}");
        }
    }
    // Anthropic Messages with output_format.
    let body = json!({
        "model": "local", "max_tokens": 120, "temperature": 1.0,
        "messages": [{"role": "user", "content": "A person, as JSON."}],
        "output_format": {"type": "json_schema", "schema": person_schema()}
    });
    let r = post(&s, "/v1/messages", body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_person(v["content"][0]["text"].as_str().expect("text"));
    assert_eq!(v["stop_reason"], "end_turn", "{v}");
}

#[tokio::test]
async fn bad_constraints_are_400_naming_the_field() {
    let s = Server::start();
    for (extra, param) in [
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"structured_outputs": {"regex": "(["}}),
            "structured_outputs.regex",
        ),
        (
            json!({"structured_outputs": {"choice": []}}),
            "structured_outputs.choice",
        ),
        (
            json!({"structured_outputs": {"regexp": "a"}}),
            "structured_outputs",
        ),
        (json!({"guided_json": "{not json"}), "guided_json"),
        (json!({"guided_json": [1, 2]}), "guided_json"),
        (
            json!({"response_format": {"type": "json_object"}, "guided_regex": "a+"}),
            "guided_regex",
        ),
    ] {
        let r = post(&s, "/v1/chat/completions", chat(extra.clone()), &[]).await;
        assert_eq!(r.status, 400, "{extra}: {}", r.text);
        let v = r.json();
        let e = openai_error(&v);
        let got = e["param"].as_str().unwrap_or("");
        assert!(
            got.starts_with(param),
            "{extra}: param {got:?}, want {param:?}: {v}"
        );
    }
    let body = json!({
        "model": "local", "max_tokens": 10,
        "messages": [{"role": "user", "content": "x"}],
        "output_format": {"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}
    });
    let r = post(&s, "/v1/messages", body, &[]).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let v = r.json();
    let e = anthropic_error(&v);
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("output_format")),
        "{v}"
    );
}

#[test]
fn generate_flags_constrain_the_output_and_name_bad_values() {
    use common::{generate_json, run_cli};
    let schema = person_schema().to_string();
    let (ok, out, err) = generate_json(&[
        "--input-ids",
        "5,9,13",
        "--max-tokens",
        "120",
        "--temperature",
        "1",
        "--seed",
        "4",
        "--json-schema",
        &schema,
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).expect("generate --json");
    assert_person(v["text"].as_str().expect("text"));
    let dir = tempfile::tempdir().expect("tempdir");
    let g = dir.path().join("sum.lark");
    std::fs::write(&g, "start: /[1-9]/ (\"+\" /[1-9]/)*\n").expect("write grammar");
    let (ok, out, err) = generate_json(&[
        "--input-ids",
        "5,9,13",
        "--max-tokens",
        "9",
        "--grammar",
        &format!("@{}", g.display()),
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).expect("generate --json");
    let t = v["text"].as_str().expect("text");
    let re = regex::Regex::new(r"^[1-9](\+[1-9])*$").expect("regex");
    assert!(re.is_match(t), "{t:?}");
    for (flag, value, needle) in [
        ("--regex", "([", "--regex"),
        ("--json-schema", "{nope", "--json-schema"),
        ("--grammar", "@/no/such/file.lark", "/no/such/file.lark"),
    ] {
        let (ok, _, err) = generate_json(&["--input-ids", "1,2", flag, value]);
        assert!(!ok && err.contains(needle), "{flag} {value}: {err}");
    }
    // One constraint at a time.
    let (ok, _, err) = run_cli(&[
        "generate",
        "--model",
        &common::model_arg(),
        "--input-ids",
        "1",
        "--regex",
        "a",
        "--json-schema",
        "{}",
    ]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
}
