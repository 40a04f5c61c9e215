//! OpenAI's Responses API, `POST /v1/responses`, as a bridge over chat completions (what
//! LiteLLM does for providers without it): the request becomes a chat completions request,
//! which is routed, served (locally or by a remote tier) and billed like any other, and its
//! answer — JSON or the SSE chunk stream — is turned back into a `response` object or the
//! Responses event stream (`response.created` … `response.output_text.delta` …
//! `response.completed`). Agents built on the Responses API (the OpenAI Agents SDK, Codex)
//! can then use the local tier.
//!
//! Served: `input` as text or items (messages with text parts, `function_call` and
//! `function_call_output` items; `reasoning` items are dropped), `instructions`,
//! `max_output_tokens`, `temperature`, `top_p`, function `tools`, `tool_choice`,
//! `parallel_tool_calls`, `text.format` (text, JSON object, JSON schema), `reasoning.effort`,
//! `metadata` (echoed). Responses are stored (unless `store: false`) in a bounded in-memory
//! [`ResponseStore`](super::response_store::ResponseStore), so `previous_response_id` continues
//! a conversation and `GET`/`DELETE /v1/responses/{id}` work until the server restarts.
//! `background`, `conversation`, non-function tools and image or file inputs are refused
//! naming the field (this is a text model).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{stream, StreamExt};
use serde_json::{json, Map, Value};
use switchyard_router::upstream::sse::{SseEvent, SseParser};

use super::error::{ApiError, OpenAiError};
use super::route::Api;
use super::{new_id, openai, params, routing, unix_now, AppState};

/// Sampling and control fields copied as they are into the chat request (the Responses API
/// has `temperature` and `top_p`; the rest are the extensions the chat endpoint also reads).
const PASSED_THROUGH: &[&str] = &[
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "min_tokens",
    "parallel_tool_calls",
    "user",
    "priority",
];

/// `POST /v1/responses`.
pub async fn responses(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let (req, chat, conversation, names) =
        match params::parse_body_json::<Value>(body, state.max_body_bytes).and_then(|(_, json)| {
            let prior = previous_conversation(&state, &json)?;
            let prior_len = prior.len();
            let (chat, conv) = to_chat(&json, prior)?;
            // Chat messages before the input's: the instructions and the earlier turns.
            let chat_len = chat["messages"].as_array().map_or(0, Vec::len);
            let input_offset = json["input"]
                .is_array()
                .then(|| chat_len - (conv.len() - prior_len));
            Ok((json, chat, conv, FieldNames { input_offset }))
        }) {
            Ok(v) => v,
            Err(e) => return OpenAiError(e).into_response(),
        };
    let parsed = openai::chat_request(&chat).map_err(|e| names.rename_error(e));
    let stream = chat["stream"] == json!(true);
    let routed = routing::route(&state, Api::OpenAiChat, &headers, chat, parsed, arrived).await;
    let resp = routing::respond::<openai::OpenAi>(&state, routed, arrived).await;
    if !resp.status().is_success() {
        // An error in the OpenAI shape, which the Responses API shares, about the chat fields.
        return error_in_responses_terms(resp, &names).await;
    }
    let keep = req.get("store") != Some(&Value::Bool(false));
    let saver = keep.then(|| Saver {
        state: state.clone(),
        conversation,
    });
    let shell = ResponseShell::new(&req, saver);
    if stream {
        stream_response(resp, shell)
    } else {
        json_response(resp, shell).await
    }
}

/// A refusal from the chat pipeline (context length, queue, routing) with the fields named as
/// the Responses request spells them.
async fn error_in_responses_terms(resp: Response, names: &FieldNames) -> Response {
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return Response::from_parts(parts, axum::body::Body::empty());
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    if let Some(p) = v.pointer("/error/param").and_then(Value::as_str) {
        v["error"]["param"] = json!(names.rename(p));
    }
    if let Some(m) = v.pointer("/error/message").and_then(Value::as_str) {
        let m = m
            .replace("max_tokens", "max_output_tokens")
            .replace("(messages)", "(input, instructions)");
        v["error"]["message"] = json!(m);
    }
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(v.to_string()))
}

/// How a chat request's field paths read in the Responses request it was made from.
struct FieldNames {
    /// Chat messages before the first one made from `input` (instructions, earlier turns);
    /// `None` when `input` is a string.
    input_offset: Option<usize>,
}

impl FieldNames {
    /// A chat request's field path as the Responses request spells it.
    fn rename(&self, p: &str) -> String {
        if p == "max_tokens" {
            return "max_output_tokens".into();
        }
        if let Some(rest) = p.strip_prefix("messages") {
            let item = rest.strip_prefix('[').and_then(|r| r.split_once(']'));
            if let (Some((i, tail)), Some(offset)) = (item, self.input_offset) {
                if let Some(i) = i.parse::<usize>().ok().and_then(|i| i.checked_sub(offset)) {
                    return format!("input[{i}]{tail}");
                }
            }
            return "input".into();
        }
        if let Some(rest) = p.strip_prefix("tools[") {
            return format!("tools[{}", rest.replacen("].function.", "].", 1));
        }
        if let Some(rest) = p.strip_prefix("response_format") {
            let rest = rest.strip_prefix(".json_schema").unwrap_or(rest);
            return format!("text.format{rest}");
        }
        match p {
            "reasoning_effort" => "reasoning.effort".into(),
            "tool_choice.function.name" => "tool_choice.name".into(),
            _ => p.to_string(),
        }
    }

    /// An error the chat request's checks found, naming the Responses field.
    fn rename_error(&self, e: ApiError) -> ApiError {
        match e {
            ApiError::InvalidField { param, message } => ApiError::InvalidField {
                param: self.rename(&param),
                message,
            },
            ApiError::MissingField(p) => ApiError::MissingField(self.rename(&p)),
            ApiError::Unsupported { param, message } => ApiError::Unsupported {
                param: self.rename(&param),
                message,
            },
            other => other,
        }
    }
}

fn field_err(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::field(param, message)
}

/// The conversation a request continues (`previous_response_id`), as chat messages.
fn previous_conversation(state: &AppState, req: &Value) -> Result<Vec<Value>, ApiError> {
    match req.get("previous_response_id") {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(id)) => state
            .responses
            .get(id)
            .map(|s| s.conversation)
            .ok_or_else(|| {
                field_err(
                    "previous_response_id",
                    format!("no stored response with id {id:?} (responses are kept in memory until the server restarts, and not at all with store: false)"),
                )
            }),
        Some(_) => Err(field_err("previous_response_id", "must be a string")),
    }
}

/// The chat completions request a Responses request asks for, and the conversation it holds
/// (`prior` then its input, as chat messages; without `instructions`, which a continuation
/// does not inherit).
pub fn to_chat(req: &Value, prior: Vec<Value>) -> Result<(Value, Vec<Value>), ApiError> {
    let obj = req.as_object().ok_or(ApiError::NotAnObject)?;
    if obj.get("conversation").is_some_and(|v| !v.is_null()) {
        return Err(field_err(
            "conversation",
            "conversation objects are not supported; use previous_response_id or send the whole conversation in `input`",
        ));
    }
    if obj.get("background") == Some(&Value::Bool(true)) {
        return Err(field_err(
            "background",
            "background responses are not supported; leave it false",
        ));
    }
    let model = obj
        .get("model")
        .ok_or_else(|| ApiError::MissingField("model".into()))?
        .as_str()
        .ok_or_else(|| field_err("model", "must be a string"))?;
    let mut messages = Vec::new();
    match obj.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(_) => return Err(field_err("instructions", "must be a string")),
    }
    let system = messages.len();
    messages.extend(prior);
    match obj.get("input") {
        None => return Err(ApiError::MissingField("input".into())),
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => input_items(items, &mut messages)?,
        Some(_) => {
            return Err(field_err(
                "input",
                "must be a string or an array of input items",
            ))
        }
    }
    let conversation = messages[system..].to_vec();
    let mut chat = json!({"model": model, "messages": messages});
    for key in PASSED_THROUGH {
        if let Some(v) = obj.get(*key).filter(|v| !v.is_null()) {
            chat[*key] = v.clone();
        }
    }
    if let Some(m) = obj.get("max_output_tokens").filter(|v| !v.is_null()) {
        chat["max_tokens"] = m.clone();
    }
    if obj.get("stream") == Some(&Value::Bool(true)) {
        chat["stream"] = json!(true);
        chat["stream_options"] = json!({"include_usage": true});
    } else if let Some(s) = obj
        .get("stream")
        .filter(|v| !v.is_null() && !v.is_boolean())
    {
        return Err(field_err("stream", format!("must be a boolean, got {s}")));
    }
    if let Some(tools) = obj.get("tools").filter(|v| !v.is_null()) {
        let Value::Array(tools) = tools else {
            return Err(field_err("tools", "must be an array"));
        };
        let mut out = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(field_err(
                    format!("tools[{i}].type"),
                    format!(
                        "only function tools are served here, got {}",
                        t.get("type").unwrap_or(&Value::Null)
                    ),
                ));
            }
            let mut f = Map::new();
            for k in ["name", "description", "parameters", "strict"] {
                if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                    f.insert(k.into(), v.clone());
                }
            }
            out.push(json!({"type": "function", "function": f}));
        }
        chat["tools"] = Value::Array(out);
    }
    match obj.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => chat["tool_choice"] = json!(s),
        Some(c) if c.get("type").and_then(Value::as_str) == Some("function") => {
            let name = c.get("name").cloned().unwrap_or(Value::Null);
            chat["tool_choice"] = json!({"type": "function", "function": {"name": name}});
        }
        Some(c) => {
            return Err(field_err(
                "tool_choice",
                format!("must be \"auto\", \"none\", \"required\" or a function, got {c}"),
            ))
        }
    }
    if let Some(format) = obj.get("text").and_then(|t| t.get("format")) {
        match format.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => chat["response_format"] = json!({"type": "json_object"}),
            Some("json_schema") => {
                let mut schema = Map::new();
                for k in ["name", "schema", "strict", "description"] {
                    if let Some(v) = format.get(k) {
                        schema.insert(k.into(), v.clone());
                    }
                }
                chat["response_format"] = json!({"type": "json_schema", "json_schema": schema});
            }
            _ => {
                return Err(field_err(
                    "text.format.type",
                    "must be \"text\", \"json_object\" or \"json_schema\"",
                ))
            }
        }
    }
    if let Some(effort) = obj.get("reasoning").and_then(|r| r.get("effort")) {
        // Hy3's template knows no_think / low / high; other templates ignore the variable.
        let e = match effort.as_str() {
            Some("none" | "minimal") => "no_think",
            Some("low") => "low",
            Some("medium" | "high") => "high",
            _ => {
                return Err(field_err(
                    "reasoning.effort",
                    "must be \"minimal\", \"low\", \"medium\" or \"high\"",
                ))
            }
        };
        chat["reasoning_effort"] = json!(e);
    }
    Ok((chat, conversation))
}

/// Appends the chat messages of Responses input items; consecutive `function_call` items
/// become one assistant turn with parallel calls.
fn input_items(items: &[Value], messages: &mut Vec<Value>) -> Result<(), ApiError> {
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        match kind {
            "message" => {
                let role = item
                    .get("role")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::MissingField(format!("{at}.role")))?;
                let role = match role {
                    "user" | "assistant" | "system" => role,
                    "developer" => "system",
                    other => {
                        return Err(field_err(
                            format!("{at}.role"),
                            format!("must be user, assistant, system or developer, got {other:?}"),
                        ))
                    }
                };
                let text = content_text(item.get("content"), &format!("{at}.content"))?;
                messages.push(json!({"role": role, "content": text}));
            }
            "function_call" => {
                let get = |k: &str| {
                    item.get(k)
                        .and_then(Value::as_str)
                        .ok_or_else(|| ApiError::MissingField(format!("{at}.{k}")))
                };
                let call = json!({"id": get("call_id")?, "type": "function",
                                  "function": {"name": get("name")?, "arguments": get("arguments")?}});
                let joins = messages.last().is_some_and(|m: &Value| {
                    m["role"] == "assistant" && m.get("tool_calls").is_some() && m["content"].is_null()
                });
                if joins {
                    if let Some(Value::Array(calls)) =
                        messages.last_mut().and_then(|m| m.get_mut("tool_calls"))
                    {
                        calls.push(call);
                    }
                } else {
                    messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
                }
            }
            "function_call_output" => {
                let id = item
                    .get("call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::MissingField(format!("{at}.call_id")))?;
                let output = content_text(item.get("output"), &format!("{at}.output"))?;
                messages.push(json!({"role": "tool", "tool_call_id": id, "content": output}));
            }
            // Earlier reasoning is not replayed (chat templates drop it from past turns).
            "reasoning" => {}
            other => {
                return Err(field_err(
                    format!("{at}.type"),
                    format!("input items of type {other:?} are not supported; send messages, function_call and function_call_output items"),
                ))
            }
        }
    }
    Ok(())
}

/// The text of a message's `content` (a string or text parts).
fn content_text(content: Option<&Value>, at: &str) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Err(ApiError::MissingField(at.to_string())),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        text.push_str(p.get("text").and_then(Value::as_str).ok_or_else(|| {
                            ApiError::MissingField(format!("{at}[{j}].text"))
                        })?)
                    }
                    other => {
                        return Err(field_err(
                            format!("{at}[{j}].type"),
                            format!(
                                "content parts of type {} cannot be read by this text-only model; send input_text parts",
                                other.map_or("(none)".to_string(), |o| format!("{o:?}"))
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        Some(_) => Err(field_err(
            at,
            "must be a string or an array of content parts",
        )),
    }
}

/// Stores a finished response with its conversation (unless the request said `store: false`).
struct Saver {
    state: Arc<AppState>,
    conversation: Vec<Value>,
}

impl Saver {
    /// Appends the response's answer to the conversation as an assistant turn and keeps both.
    fn save(self, response: &Value) {
        let Saver {
            state,
            mut conversation,
        } = self;
        let output = response["output"].as_array().cloned().unwrap_or_default();
        let text: String = output
            .iter()
            .filter(|i| i["type"] == "message")
            .flat_map(|i| i["content"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["text"].as_str().map(String::from))
            .collect();
        let calls: Vec<Value> = output
            .iter()
            .filter(|i| i["type"] == "function_call")
            .map(|i| {
                json!({"id": i["call_id"], "type": "function",
                            "function": {"name": i["name"], "arguments": i["arguments"]}})
            })
            .collect();
        let mut turn = json!({"role": "assistant", "content": text});
        if !calls.is_empty() {
            turn["content"] = if text.is_empty() {
                Value::Null
            } else {
                json!(text)
            };
            turn["tool_calls"] = Value::Array(calls);
        }
        conversation.push(turn);
        let id = response["id"].as_str().unwrap_or_default().to_string();
        state.responses.put(id, conversation, response.clone());
    }
}

/// What every `response` object repeats from its request, and where it is stored.
struct ResponseShell {
    id: String,
    created_at: u64,
    fields: Map<String, Value>,
    saver: Option<Saver>,
}

impl ResponseShell {
    fn new(req: &Value, saver: Option<Saver>) -> Self {
        let mut fields = Map::new();
        let get = |k: &str| req.get(k).cloned().unwrap_or(Value::Null);
        for k in [
            "instructions",
            "max_output_tokens",
            "temperature",
            "top_p",
            "metadata",
            "user",
        ] {
            fields.insert(k.into(), get(k));
        }
        fields.insert(
            "tools".into(),
            req.get("tools").cloned().unwrap_or(json!([])),
        );
        fields.insert(
            "tool_choice".into(),
            req.get("tool_choice").cloned().unwrap_or(json!("auto")),
        );
        fields.insert(
            "parallel_tool_calls".into(),
            req.get("parallel_tool_calls")
                .cloned()
                .unwrap_or(json!(true)),
        );
        fields.insert(
            "text".into(),
            req.get("text")
                .cloned()
                .unwrap_or(json!({"format": {"type": "text"}})),
        );
        fields.insert(
            "reasoning".into(),
            req.get("reasoning").cloned().unwrap_or(Value::Null),
        );
        fields.insert("store".into(), json!(saver.is_some()));
        fields.insert(
            "previous_response_id".into(),
            req.get("previous_response_id")
                .cloned()
                .unwrap_or(Value::Null),
        );
        Self {
            id: new_id("resp_"),
            created_at: unix_now(),
            fields,
            saver,
        }
    }

    /// Stores the finished response object (when the request lets it be stored).
    fn finished(&mut self, response: &Value) {
        if let Some(s) = self.saver.take() {
            s.save(response);
        }
    }

    /// The `response` object with this status, output and usage.
    fn object(&self, model: &Value, status: &str, output: &[Value], usage: Value) -> Value {
        let mut o = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": model,
            "output": output,
            "error": null,
            "incomplete_details": if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "usage": usage,
        });
        if let Some(m) = o.as_object_mut() {
            for (k, v) in &self.fields {
                m.insert(k.clone(), v.clone());
            }
        }
        o
    }
}

/// Responses `usage` from chat `usage`.
fn usage(u: &Value) -> Value {
    if u.is_null() {
        return Value::Null;
    }
    let n = |p: &str| u.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    json!({
        "input_tokens": n("/prompt_tokens"),
        "input_tokens_details": {"cached_tokens": n("/prompt_tokens_details/cached_tokens")},
        "output_tokens": n("/completion_tokens"),
        "output_tokens_details": {"reasoning_tokens": n("/completion_tokens_details/reasoning_tokens")},
        "total_tokens": n("/prompt_tokens") + n("/completion_tokens"),
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn reasoning_item(id: &str, text: &str) -> Value {
    json!({"type": "reasoning", "id": id, "summary": [],
           "content": [{"type": "reasoning_text", "text": text}]})
}

fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
           "arguments": arguments, "status": status})
}

/// A non-streamed chat completion turned into a `response` object.
async fn json_response(resp: Response, mut shell: ResponseShell) -> Response {
    let (parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            return OpenAiError(ApiError::Internal(format!("reading the chat answer: {e}")))
                .into_response()
        }
    };
    let chat: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return OpenAiError(ApiError::Internal(format!(
                "the chat answer is not JSON: {e}"
            )))
            .into_response()
        }
    };
    let choice = &chat["choices"][0];
    let msg = &choice["message"];
    let mut output = Vec::new();
    if let Some(r) = msg["reasoning_content"].as_str().filter(|r| !r.is_empty()) {
        output.push(reasoning_item(&new_id("rs_"), r));
    }
    if let Some(t) = msg["content"].as_str().filter(|t| !t.is_empty()) {
        output.push(message_item(&new_id("msg_"), t, "completed"));
    }
    for c in msg["tool_calls"].as_array().into_iter().flatten() {
        let f = &c["function"];
        output.push(call_item(
            &new_id("fc_"),
            c["id"].as_str().unwrap_or_default(),
            f["name"].as_str().unwrap_or_default(),
            f["arguments"].as_str().unwrap_or("{}"),
            "completed",
        ));
    }
    let status = if choice["finish_reason"] == "length" {
        "incomplete"
    } else {
        "completed"
    };
    let body = shell.object(&chat["model"], status, &output, usage(&chat["usage"]));
    shell.finished(&body);
    with_routing_headers(Json(body).into_response(), &parts.headers)
}

/// `out` with the routing headers (`x-switchyard-*`) of the chat answer it was made from.
fn with_routing_headers(mut out: Response, from: &HeaderMap) -> Response {
    for (k, v) in from {
        if k.as_str().starts_with("x-switchyard-") {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

/// The open output item of a stream.
enum Open {
    None,
    Reasoning { id: String, text: String },
    Message { id: String, text: String },
}

/// Turns chat completion chunks into Responses stream events.
struct EventWriter {
    shell: ResponseShell,
    model: Value,
    seq: u64,
    open: Open,
    /// Finished output items, in order.
    output: Vec<Value>,
    /// Function calls by their chat `index`: (output index, item id, call id, name, arguments).
    calls: Vec<(usize, usize, String, String, String, String)>,
    finish: Option<String>,
    usage: Value,
}

impl EventWriter {
    fn new(shell: ResponseShell) -> Self {
        Self {
            shell,
            model: Value::Null,
            seq: 0,
            open: Open::None,
            output: Vec::new(),
            calls: Vec::new(),
            finish: None,
            usage: Value::Null,
        }
    }

    fn event(&mut self, kind: &str, mut data: Value) -> String {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        SseEvent::named(kind, data.to_string()).to_wire()
    }

    fn start(&mut self) -> String {
        let r = self
            .shell
            .object(&self.model, "in_progress", &[], Value::Null);
        let mut out = self.event("response.created", json!({"response": r}));
        out += &self.event("response.in_progress", json!({"response": r}));
        out
    }

    fn next_index(&self) -> usize {
        self.output.len() + usize::from(!matches!(self.open, Open::None))
    }

    /// Closes the open reasoning or message item.
    fn close(&mut self) -> String {
        let index = self.output.len();
        match std::mem::replace(&mut self.open, Open::None) {
            Open::None => String::new(),
            Open::Reasoning { id, text } => {
                let mut out = self.event(
                    "response.reasoning_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                );
                let item = reasoning_item(&id, &text);
                out += &self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
                out
            }
            Open::Message { id, text } => {
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                let mut out = self.event("response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}));
                out += &self.event(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
                let item = message_item(&id, &text, "completed");
                out += &self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
                out
            }
        }
    }

    fn reasoning(&mut self, delta: &str) -> String {
        let mut out = String::new();
        if !matches!(self.open, Open::Reasoning { .. }) {
            out += &self.close();
            let id = new_id("rs_");
            let index = self.output.len();
            out += &self.event("response.output_item.added",
                json!({"output_index": index, "item": {"type": "reasoning", "id": id, "summary": []}}));
            self.open = Open::Reasoning {
                id,
                text: String::new(),
            };
        }
        let index = self.output.len();
        if let Open::Reasoning { id, text } = &mut self.open {
            text.push_str(delta);
            let id = id.clone();
            out += &self.event(
                "response.reasoning_text.delta",
                json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta}),
            );
        }
        out
    }

    fn text(&mut self, delta: &str) -> String {
        let mut out = String::new();
        if !matches!(self.open, Open::Message { .. }) {
            out += &self.close();
            let id = new_id("msg_");
            let index = self.output.len();
            out += &self.event("response.output_item.added",
                json!({"output_index": index, "item": {"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []}}));
            out += &self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                       "part": {"type": "output_text", "text": "", "annotations": []}}),
            );
            self.open = Open::Message {
                id,
                text: String::new(),
            };
        }
        let index = self.output.len();
        if let Open::Message { id, text } = &mut self.open {
            text.push_str(delta);
            let id = id.clone();
            out += &self.event("response.output_text.delta",
                json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": []}));
        }
        out
    }

    /// A chat `delta.tool_calls` entry: a new call (with id and name) or more arguments.
    fn tool_call(&mut self, c: &Value) -> String {
        let mut out = self.close();
        let index = c["index"].as_u64().unwrap_or(0) as usize;
        let f = &c["function"];
        let pos = match self.calls.iter().position(|k| k.0 == index) {
            Some(p) => p,
            None => {
                let output_index = self.next_index() + self.calls.len();
                let (id, call_id) = (
                    new_id("fc_"),
                    c["id"].as_str().unwrap_or_default().to_string(),
                );
                let name = f["name"].as_str().unwrap_or_default().to_string();
                out += &self.event(
                    "response.output_item.added",
                    json!({"output_index": output_index,
                    "item": call_item(&id, &call_id, &name, "", "in_progress")}),
                );
                self.calls
                    .push((index, output_index, id, call_id, name, String::new()));
                self.calls.len() - 1
            }
        };
        if let Some(piece) = f["arguments"].as_str().filter(|p| !p.is_empty()) {
            self.calls[pos].5.push_str(piece);
            let (output_index, id) = (self.calls[pos].1, self.calls[pos].2.clone());
            out += &self.event(
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": output_index, "delta": piece}),
            );
        }
        out
    }

    /// One chat chunk's events.
    fn chunk(&mut self, chunk: &Value) -> String {
        if self.model.is_null() {
            self.model = chunk["model"].clone();
        }
        if !chunk["usage"].is_null() {
            self.usage = usage(&chunk["usage"]);
        }
        let mut out = String::new();
        let Some(choice) = chunk["choices"].get(0) else {
            return out;
        };
        let delta = &choice["delta"];
        if let Some(r) = delta["reasoning_content"]
            .as_str()
            .filter(|r| !r.is_empty())
        {
            out += &self.reasoning(r);
        }
        if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            out += &self.text(t);
        }
        for c in delta["tool_calls"].as_array().into_iter().flatten() {
            out += &self.tool_call(c);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.finish = Some(f.to_string());
        }
        out
    }

    /// The closing events: open items done, then `response.completed` (or `.incomplete`).
    fn end(&mut self) -> String {
        let mut out = self.close();
        for (_, output_index, id, call_id, name, args) in std::mem::take(&mut self.calls) {
            out += &self.event(
                "response.function_call_arguments.done",
                json!({"item_id": id, "output_index": output_index, "arguments": args}),
            );
            let item = call_item(&id, &call_id, &name, &args, "completed");
            out += &self.event(
                "response.output_item.done",
                json!({"output_index": output_index, "item": item}),
            );
            self.output.push(item);
        }
        let status = if self.finish.as_deref() == Some("length") {
            "incomplete"
        } else {
            "completed"
        };
        let r = self
            .shell
            .object(&self.model, status, &self.output, self.usage.clone());
        self.shell.finished(&r);
        out += &self.event(&format!("response.{status}"), json!({"response": r}));
        out
    }

    fn error(&mut self, e: &Value) -> String {
        let err = &e["error"];
        self.event(
            "error",
            json!({"code": err["code"], "message": err["message"], "param": err["param"]}),
        )
    }
}

/// A streamed chat completion turned into the Responses event stream.
fn stream_response(resp: Response, shell: ResponseShell) -> Response {
    let (parts, body) = resp.into_parts();
    let state = (
        body.into_data_stream(),
        SseParser::new(),
        EventWriter::new(shell),
        false,
        true,
    );
    let events = stream::unfold(
        state,
        |(mut body, mut parser, mut w, mut done, first)| async move {
            if done {
                return None;
            }
            let mut out = if first { w.start() } else { String::new() };
            match body.next().await {
                Some(Ok(bytes)) => match parser.feed(&bytes) {
                    Ok(evs) => {
                        for ev in evs {
                            if ev.data == "[DONE]" {
                                out += &w.end();
                                done = true;
                                break;
                            }
                            match serde_json::from_str::<Value>(&ev.data) {
                                Ok(v) if v.get("error").is_some() => {
                                    out += &w.error(&v);
                                    done = true;
                                    break;
                                }
                                Ok(v) => out += &w.chunk(&v),
                                Err(_) => {}
                            }
                        }
                    }
                    Err(e) => {
                        out += &w.error(&json!({"error": {"message": e, "code": "stream_error"}}));
                        done = true;
                    }
                },
                Some(Err(e)) => {
                    out += &w.error(
                        &json!({"error": {"message": e.to_string(), "code": "stream_error"}}),
                    );
                    done = true;
                }
                None => {
                    out += &w.end();
                    done = true;
                }
            }
            Some((
                Ok::<_, Infallible>(Bytes::from(out)),
                (body, parser, w, done, false),
            ))
        },
    );
    with_routing_headers(routing::sse_response(events), &parts.headers)
}

/// `GET /v1/responses/{id}`: a stored response.
pub async fn get_response(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match state.responses.get(&id) {
        Some(s) => Json(s.response).into_response(),
        None => not_stored(&id),
    }
}

/// `DELETE /v1/responses/{id}`: forgets a stored response.
pub async fn delete_response(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Response {
    if state.responses.remove(&id) {
        Json(json!({"id": id, "object": "response", "deleted": true})).into_response()
    } else {
        not_stored(&id)
    }
}

fn not_stored(id: &str) -> Response {
    OpenAiError(ApiError::ResponseNotFound(id.to_string())).into_response()
}
