//! The Anthropic Messages wire format: `POST /v1/messages`, so Anthropic-speaking agents can use
//! the server. Text content only. Streaming follows Anthropic's event sequence: `message_start`,
//! `content_block_start`, `ping`, one `content_block_delta` (`text_delta`) per generated token,
//! `content_block_stop`, `message_delta` (stop reason and usage), `message_stop`.
//!
//! Usage follows Anthropic's accounting: `input_tokens` excludes prompt tokens read from the
//! prefix cache, which are reported as `cache_read_input_tokens`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use switchyard_engine::chat::ChatMessage;
use switchyard_engine::engine::{Completion, TokenEvent};
use switchyard_engine::reasoning::{self, Part, ReasoningStream};
use switchyard_engine::sampling::SamplingParams;
use switchyard_engine::stop::{FinishReason, StopMatch};
use switchyard_engine::tool_calls::{ToolCallEvent, ToolCallStream};

use super::error::ApiError;
use super::local::{self, ChoiceOutput, SseFormat, Tracker, Usage};
use super::params;
use super::route::{Api, NormalizedRequest, PromptEnd};
use super::routing::{self, RequestRecord};
use super::{new_id, AppState};

/// Anthropic's temperature range is `[0, 1]`.
const ANTHROPIC_MAX_TEMPERATURE: f64 = 1.0;

/// A message as sent.
#[derive(Debug, Deserialize)]
pub struct InMessage {
    /// `user` or `assistant`.
    pub role: String,
    /// A string or a list of content blocks.
    pub content: Value,
}

/// `POST /v1/messages` body (fields this server does not use are ignored).
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    model: String,
    messages: Vec<InMessage>,
    max_tokens: i64,
    system: Option<Value>,
    stop_sequences: Option<Value>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    stream: Option<bool>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    /// Extended thinking: `{"type": "enabled", "budget_tokens": N}` or `{"type": "disabled"}`.
    thinking: Option<Value>,
    /// Extension (as on the OpenAI endpoints): keep generating past end-of-sequence tokens.
    ignore_eos: Option<bool>,
}

/// Anthropic's `thinking` as the chat template's `reasoning_effort` (Hy3's names): disabled is
/// `no_think`, enabled is `high`, or `low` under a small budget (below 2048 tokens, Anthropic's
/// lowest budget being 1024); absent leaves the template's default.
fn thinking_effort(v: Option<Value>) -> Result<Option<&'static str>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match v.get("type").and_then(Value::as_str) {
        Some("disabled") => Ok(Some("no_think")),
        Some("enabled") => match v.get("budget_tokens") {
            None => Ok(Some("high")),
            Some(b) => match b.as_u64() {
                Some(n) if n < 2048 => Ok(Some("low")),
                Some(_) => Ok(Some("high")),
                None => Err(ApiError::field(
                    "thinking.budget_tokens",
                    format!("must be a positive integer, got {b}"),
                )),
            },
        },
        _ => Err(ApiError::field(
            "thinking.type",
            "must be \"enabled\" or \"disabled\"",
        )),
    }
}

/// Text of a string or a list of `{"type": "text", "text"}` blocks.
fn blocks_text(v: Value, at: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s),
        Value::Array(blocks) => {
            let mut out = String::new();
            for (j, b) in blocks.into_iter().enumerate() {
                let here = format!("{at}[{j}]");
                let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
                if kind != "text" {
                    return Err(ApiError::Unsupported {
                        param: here,
                        message: format!(
                            "content blocks of type {kind:?} are not supported; send text blocks"
                        ),
                    });
                }
                let t = b
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::field(format!("{here}.text"), "must be a string"))?;
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(t);
            }
            Ok(out)
        }
        _ => Err(ApiError::field(
            at,
            "must be a string or a list of text blocks",
        )),
    }
}

/// One Anthropic turn as template messages. Text blocks are the turn's content; an assistant's
/// `tool_use` blocks become its `tool_calls`; a user's `tool_result` blocks become `tool`
/// messages (before the user's own text, as the results answer the previous turn).
fn turn(role: String, content: Value, at: &str) -> Result<Vec<ChatMessage>, ApiError> {
    let Value::Array(blocks) = content else {
        return Ok(vec![ChatMessage::new(role, blocks_text(content, at)?)]);
    };
    let mut text = Vec::new();
    let mut calls = Vec::new();
    let mut results = Vec::new();
    for (j, b) in blocks.into_iter().enumerate() {
        let here = format!("{at}[{j}]");
        match b.get("type").and_then(Value::as_str).unwrap_or("") {
            "tool_use" if role == "assistant" => {
                let field = |k: &str| {
                    b.get(k)
                        .cloned()
                        .ok_or_else(|| ApiError::MissingField(format!("{here}.{k}")))
                };
                let (id, name, input) = (field("id")?, field("name")?, field("input")?);
                calls.push(json!({"id": id, "type": "function",
                                  "function": {"name": name, "arguments": input}}));
            }
            "tool_result" if role == "user" => {
                let id = b
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::MissingField(format!("{here}.tool_use_id")))?;
                let body = match b.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(c) => blocks_text(c.clone(), &format!("{here}.content"))?,
                };
                let body = if b.get("is_error") == Some(&Value::Bool(true)) {
                    format!("Error: {body}")
                } else {
                    body
                };
                results.push(
                    ChatMessage::new("tool", body)
                        .with_field("tool_call_id", Value::String(id.to_string())),
                );
            }
            "tool_use" | "tool_result" => {
                return Err(ApiError::field(
                    here,
                    format!("a {role} turn cannot hold this block (tool_use is for assistant turns, tool_result for user turns)"),
                ))
            }
            _ => text.push(b),
        }
    }
    let mut out = results;
    if !text.is_empty() || !calls.is_empty() || out.is_empty() {
        let mut m = ChatMessage::new(role, blocks_text(Value::Array(text), at)?);
        if !calls.is_empty() {
            m = m.with_field("tool_calls", Value::Array(calls));
        }
        out.push(m);
    }
    Ok(out)
}

impl MessagesRequest {
    fn normalize(self) -> Result<NormalizedRequest, ApiError> {
        params::check_conversation(self.messages.len())?;
        let n_messages = self.messages.len();
        let tools = super::tools::anthropic(self.tools, self.tool_choice)?;
        let mut messages = Vec::with_capacity(self.messages.len() + 1);
        if let Some(s) = self.system {
            let text = blocks_text(s, "system")?;
            if !text.is_empty() {
                messages.push(ChatMessage::system(text));
            }
        }
        for (i, m) in self.messages.into_iter().enumerate() {
            let at = format!("messages[{i}]");
            if m.role != "user" && m.role != "assistant" {
                return Err(ApiError::field(
                    format!("{at}.role"),
                    format!("must be \"user\" or \"assistant\", got {:?} (put system text in the top-level `system` field)", m.role),
                ));
            }
            messages.extend(turn(m.role, m.content, &format!("{at}.content"))?);
        }
        // A final assistant turn with text is a prefill: the reply continues it.
        let last = messages.last().filter(|m| m.role == "assistant");
        let prefill = last.and_then(|m| match &m.content {
            Some(switchyard_engine::chat::MessageContent::Text(t)) if !t.is_empty() => Some(t),
            _ => None,
        });
        if prefill.is_some_and(|t| t.ends_with(char::is_whitespace)) {
            return Err(ApiError::field(
                format!("messages[{}].content", n_messages - 1),
                "final assistant content cannot end with trailing whitespace",
            ));
        }
        let prompt_end = if prefill.is_some() {
            PromptEnd::ContinueFinal
        } else {
            PromptEnd::NewTurn
        };
        Ok(NormalizedRequest {
            api: Api::AnthropicMessages,
            model: self.model,
            messages,
            prompts: vec![],
            max_tokens: params::max_tokens("max_tokens", Some(self.max_tokens))?,
            max_tokens_param: "max_tokens",
            sampling_set: switchyard_engine::generation_config::SetFields {
                temperature: self.temperature.is_some(),
                top_p: self.top_p.is_some(),
                top_k: self.top_k.is_some(),
                // Not Messages API fields: always the model's default where it has one.
                min_p: false,
                repetition_penalty: false,
            },
            sampling: SamplingParams {
                temperature: params::temperature(self.temperature, ANTHROPIC_MAX_TEMPERATURE, 1.0)?,
                top_k: params::top_k(self.top_k)?,
                top_p: params::top_p(self.top_p)?,
                ..SamplingParams::default()
            },
            stop: params::stop("stop_sequences", self.stop_sequences)?,
            n: 1,
            stream: self.stream.unwrap_or(false),
            include_usage: false,
            continuous_usage: false,
            template_kwargs: match thinking_effort(self.thinking.clone())? {
                Some(e) => Map::from_iter([("reasoning_effort".to_string(), Value::from(e))]),
                None => Map::new(),
            },
            ignore_eos: self.ignore_eos.unwrap_or(false),
            output: None,
            tools,
            prediction: None,
            echo: false,
            opens_reasoning: Default::default(),
            reasoning_budget: self
                .thinking
                .as_ref()
                .filter(|t| t["type"] == "enabled")
                .and_then(|t| t["budget_tokens"].as_u64())
                .map(|b| b as usize),
            controls: Default::default(),
            prompt_end,
        })
    }
}

/// `stop_reason` and `stop_sequence`.
fn stop_reason(c: &Completion) -> (&'static str, Option<String>) {
    match (c.finish_reason, &c.stop) {
        (FinishReason::Length, _) => ("max_tokens", None),
        (FinishReason::Stop, Some(StopMatch::String(s))) => ("stop_sequence", Some(s.clone())),
        (FinishReason::Stop, _) => ("end_turn", None),
    }
}

fn usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens.saturating_sub(u.cached_tokens),
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
    })
}

/// The Anthropic Messages endpoint on the engine.
pub struct Anthropic;

impl routing::LocalEndpoint for Anthropic {
    /// Serves a request on the local engine; the tracker takes `record` once the engine has
    /// it.
    async fn serve(
        state: &Arc<AppState>,
        req: NormalizedRequest,
        arrived: Instant,
        record: &mut Option<RequestRecord>,
    ) -> Result<Response, ApiError> {
        let prepared = local::prepare(state, &req).await?;
        let streams = local::submit(state, req.api, &prepared)?;
        let mut tracker = Tracker::new(state.clone(), req.api, arrived, &prepared, record);
        if req.stream {
            let fmt = EventFormat::new(state, &req, prepared.prompt_tokens());
            return Ok(Sse::new(local::sse(streams, fmt, tracker)).into_response());
        }
        let outs = local::collect(streams, &mut tracker, false).await?;
        Ok(json_response(state, &req, outs, tracker.usage))
    }

    /// The response to a finished local answer: a message, or (a held-back stream) its events.
    fn render(
        state: &Arc<AppState>,
        req: &NormalizedRequest,
        outs: Vec<ChoiceOutput>,
        usage: Usage,
    ) -> Response {
        if req.stream {
            let fmt = EventFormat::new(state, req, usage.prompt_tokens);
            return Sse::new(local::replay(outs, fmt, usage)).into_response();
        }
        json_response(state, req, outs, usage)
    }
}

/// A Messages API message object.
fn json_response(
    state: &AppState,
    req: &NormalizedRequest,
    outs: Vec<ChoiceOutput>,
    usage: Usage,
) -> Response {
    let out = outs.into_iter().next().unwrap_or_default();
    let (mut reason, seq) = out
        .completion
        .as_ref()
        .map(stop_reason)
        .unwrap_or(("end_turn", None));
    let (reasoning, answer) = reasoning::split(&out.text, local::opens_reasoning(state, req));
    let mut content = Vec::new();
    if let Some(r) = reasoning {
        content.push(json!({"type": "thinking", "thinking": r, "signature": ""}));
    }
    let mut calls = vec![];
    let mut text = answer;
    if let Some(t) = super::tools::active(state, req) {
        (text, calls) = t.split(&text);
    }
    if !text.is_empty() || calls.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    if !calls.is_empty() {
        content.extend(super::tools::anthropic_blocks(&calls));
        reason = "tool_use";
    }
    Json(json!({
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": state.model_id,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": seq,
        "usage": usage_json(usage),
    }))
    .into_response()
}

/// Anthropic's streaming events.
struct EventFormat {
    id: String,
    model: String,
    input_tokens: usize,
    stop: Option<(&'static str, Option<String>)>,
    /// `message_start` has been sent.
    started: bool,
    /// With tools, the call parser (taken at the end), and whether a call was made.
    tools: Option<ToolCallStream>,
    called: bool,
    /// Splits thinking from the answer.
    reasoning: ReasoningStream,
    /// The content block being streamed (`thinking`, `text` or `tool_use`) and its index.
    block: Option<(&'static str, usize)>,
    /// Index of the next block.
    next_block: usize,
}

impl EventFormat {
    fn new(state: &AppState, req: &NormalizedRequest, input_tokens: usize) -> Self {
        Self {
            id: new_id("msg_"),
            model: state.model_id.clone(),
            input_tokens,
            stop: None,
            started: false,
            tools: super::tools::active(state, req).map(|t| t.stream()),
            called: false,
            reasoning: ReasoningStream::new(local::opens_reasoning(state, req)),
            block: None,
            next_block: 0,
        }
    }

    /// Events for text of `kind` (`thinking` or `text`): a new block when the kind changes
    /// (closing the previous one), then the delta. The first block start is followed by
    /// `ping`, as Anthropic orders them.
    fn emit(&mut self, kind: &'static str, text: &str) -> Vec<SseEvent> {
        let mut out = vec![];
        let index = match self.block {
            Some((k, i)) if k == kind => i,
            _ => {
                let start = if kind == "thinking" {
                    json!({"type": "thinking", "thinking": "", "signature": ""})
                } else {
                    json!({"type": "text", "text": ""})
                };
                self.start_block(kind, start, &mut out)
            }
        };
        if !text.is_empty() {
            let delta = if kind == "thinking" {
                json!({"type": "thinking_delta", "thinking": text})
            } else {
                json!({"type": "text_delta", "text": text})
            };
            out.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": delta}),
            ));
        }
        out
    }

    /// Closes the open block and starts a `kind` block; returns its index.
    fn start_block(&mut self, kind: &'static str, block: Value, out: &mut Vec<SseEvent>) -> usize {
        if let Some((_, i)) = self.block.take() {
            out.push(block_stop(i));
        }
        let i = self.next_block;
        self.next_block += 1;
        out.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": i, "content_block": block}),
        ));
        if i == 0 {
            out.push(event("ping", json!({"type": "ping"})));
        }
        self.block = Some((kind, i));
        i
    }

    /// Events for split parts; answer text goes through the call parser when tools are on.
    fn emit_parts(&mut self, parts: Vec<Part>) -> Vec<SseEvent> {
        let mut out = vec![];
        for p in parts {
            match p {
                Part::Reasoning(r) => out.extend(self.emit("thinking", &r)),
                Part::Answer(a) => match &mut self.tools {
                    Some(s) => {
                        let events = s.push(&a);
                        out.extend(self.call_events(events));
                    }
                    None if !a.is_empty() => out.extend(self.emit("text", &a)),
                    None => {}
                },
            }
        }
        out
    }

    /// The call parser's events as blocks: text, and a `tool_use` block per call whose input
    /// streams as `input_json_delta`s.
    fn call_events(&mut self, events: Vec<ToolCallEvent>) -> Vec<SseEvent> {
        let mut out = vec![];
        for e in events {
            match e {
                ToolCallEvent::Content(c) => out.extend(self.emit("text", &c)),
                ToolCallEvent::CallStart { name, .. } => {
                    self.called = true;
                    let block = json!({"type": "tool_use", "id": new_id("toolu_"),
                                       "name": name, "input": {}});
                    self.start_block("tool_use", block, &mut out);
                }
                ToolCallEvent::Args { piece, .. } => {
                    if let Some(("tool_use", index)) = self.block {
                        out.push(event(
                            "content_block_delta",
                            json!({"type": "content_block_delta", "index": index,
                                   "delta": {"type": "input_json_delta", "partial_json": piece}}),
                        ));
                    }
                }
                ToolCallEvent::CallEnd { .. } => {
                    if let Some(("tool_use", index)) = self.block {
                        out.push(block_stop(index));
                        self.block = None;
                    }
                }
            }
        }
        out
    }
}

fn event(name: &'static str, data: Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

fn block_stop(index: usize) -> SseEvent {
    event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": index}),
    )
}

impl EventFormat {
    /// `message_start`, `content_block_start` and `ping`, once: sent with the first event of
    /// the answer rather than before it, because the input usage `message_start` reports
    /// (`cache_read_input_tokens` apart from `input_tokens`, as Anthropic counts them) is only
    /// known once the engine has looked the prompt up in its prefix cache.
    fn open(&mut self, cached_tokens: usize) -> Vec<SseEvent> {
        if self.started {
            return vec![];
        }
        self.started = true;
        let cached = cached_tokens.min(self.input_tokens);
        vec![event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {
                    "input_tokens": self.input_tokens - cached,
                    "output_tokens": 0,
                    "cache_read_input_tokens": cached,
                    "cache_creation_input_tokens": 0,
                },
            }}),
        )]
    }
}

impl SseFormat for EventFormat {
    fn start(&mut self) -> Vec<SseEvent> {
        vec![]
    }

    fn token(&mut self, _choice: usize, t: TokenEvent) -> Vec<SseEvent> {
        let mut out = self.open(t.cached_tokens.unwrap_or(0));
        let parts = self.reasoning.push(&t.text);
        out.extend(self.emit_parts(parts));
        out
    }

    fn finished(&mut self, _choice: usize, c: &Completion) -> Vec<SseEvent> {
        self.stop = Some(stop_reason(c));
        let mut out = self.open(c.cached_tokens);
        let mut rs = std::mem::replace(&mut self.reasoning, ReasoningStream::new(false));
        let mut parts = rs.push(&c.text);
        parts.extend(rs.finish());
        out.extend(self.emit_parts(parts));
        if let Some(s) = self.tools.take() {
            let events = s.finish();
            out.extend(self.call_events(events));
        }
        // A call cut off by the token limit ends as `max_tokens`, as Anthropic reports it.
        if self.called && c.finish_reason != FinishReason::Length {
            self.stop = Some(("tool_use", None));
        }
        out
    }

    fn end(&mut self, usage: Usage) -> Vec<SseEvent> {
        let (reason, seq) = self.stop.take().unwrap_or(("end_turn", None));
        let mut out = self.open(usage.cached_tokens);
        // A message without calls has a text block, if only an empty one.
        if !self.called && !matches!(self.block, Some(("text", _))) {
            out.extend(self.emit("text", ""));
        }
        if let Some((_, i)) = self.block.take() {
            out.push(block_stop(i));
        }
        out.extend([
            event(
                "message_delta",
                json!({"type": "message_delta",
                       "delta": {"stop_reason": reason, "stop_sequence": seq},
                       "usage": usage_json(usage)}),
            ),
            event("message_stop", json!({"type": "message_stop"})),
        ]);
        out
    }

    fn error(&mut self, e: ApiError) -> Vec<SseEvent> {
        vec![event("error", e.anthropic_body())]
    }
}

/// `POST /v1/messages`.
pub async fn messages(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let api = Api::AnthropicMessages;
    // Every failure, parsing included, goes through the router's bookkeeping (one telemetry
    // record per request); it answers in this endpoint's error shape.
    let (parsed, json) =
        match params::parse_body_json::<MessagesRequest>(body, state.max_body_bytes) {
            Ok((typed, json)) => (
                typed
                    .normalize()
                    .and_then(|r| params::with_output(r, &json)),
                json,
            ),
            Err(e) => (Err(e), Value::Null),
        };
    let routed = routing::route(&state, api, &headers, json, parsed, arrived).await;
    routing::respond::<Anthropic>(&state, routed, arrived).await
}

/// `POST /v1/messages/count_tokens`: the prompt tokens a Messages request would take on the
/// local model (`{"input_tokens": N}`); the body is a Messages request without `max_tokens`.
pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let counted = (|| {
        let (_, mut json) = params::parse_body_json::<Value>(body, state.max_body_bytes)?;
        if json.get("max_tokens").is_none() {
            json["max_tokens"] = json!(1);
        }
        let typed: MessagesRequest = params::from_json(&json)?;
        let req = params::with_output(typed.normalize()?, &json)?;
        state.check_model(&req.model)?;
        local::count_prompt_tokens(&state, &req)
    })();
    match counted {
        Ok(n) => Json(json!({"input_tokens": n})).into_response(),
        Err(e) => routing::error_response(Api::AnthropicMessages, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_system_and_blocks() {
        let r: MessagesRequest = serde_json::from_value(json!({
            "model": "m", "max_tokens": 5,
            "system": [{"type": "text", "text": "be brief"}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "stop_sequences": ["END"],
        }))
        .unwrap();
        let n = r.normalize().unwrap();
        assert_eq!(n.messages.len(), 2);
        assert_eq!(n.messages[0].role, "system");
        assert_eq!(n.stop, vec!["END".to_string()]);
        let bad: MessagesRequest = serde_json::from_value(json!({
            "model": "m", "max_tokens": 5, "temperature": 1.5,
            "messages": [{"role": "user", "content": "x"}],
        }))
        .unwrap();
        assert_eq!(bad.normalize().unwrap_err().param(), Some("temperature"));
    }
}
