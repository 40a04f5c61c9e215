//! The OpenAI wire format: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.
//!
//! Requests are parsed into typed structs (wrong types → 400 naming the field), range-checked,
//! and normalised into a [`NormalizedRequest`]; the router ([`super::routing`]) decides where it
//! goes, and either a remote tier or the local engine serves it. Streaming follows OpenAI's chunk sequence: for chat, a role chunk
//! per choice, one chunk per generated token (so a client can count tokens, and logprobs ride on
//! their token's chunk), a chunk with `finish_reason`, then with `stream_options.include_usage`
//! a chunk with empty `choices` and the `usage`, then `data: [DONE]`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use switchyard_engine::chat::{ChatMessage, ContentPart, MessageContent};
use switchyard_engine::engine::{Completion, TokenEvent};
use switchyard_engine::generation_config::SetFields;
use switchyard_engine::reasoning::{self, Part, ReasoningStream};
use switchyard_engine::sampling::SamplingParams;
use switchyard_engine::stop::{FinishReason, StopMatch};
use switchyard_engine::tool_calls::{ToolCallEvent, ToolCallStream};

use super::error::{ApiError, OpenAiError};
use super::local::{self, token_text, ChoiceOutput, SseFormat, Tracker, Usage};
use super::params;
use super::route::{Api, NormalizedRequest, PromptEnd, PromptInput};
use super::routing::{self, RequestRecord};
use super::{new_id, unix_now, AppState};

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a usage chunk before `[DONE]`.
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// vLLM's extension: with `include_usage`, every chunk also carries the usage so far.
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

impl StreamOptions {
    /// `(include_usage, continuous usage)` of a request's `stream_options`.
    fn flags(o: Option<StreamOptions>) -> (bool, bool) {
        let o = o.unwrap_or_default();
        let include = o.include_usage.unwrap_or(false);
        (
            include,
            include && o.continuous_usage_stats.unwrap_or(false),
        )
    }
}

/// A chat message as sent.
#[derive(Debug, Deserialize)]
pub struct InMessage {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// A string, a list of text parts, or null (assistant only).
    #[serde(default)]
    pub content: Option<Value>,
    /// Participant name (passed to the template).
    #[serde(default)]
    pub name: Option<String>,
    /// An assistant turn's calls.
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
    /// A `tool` message: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// `POST /v1/chat/completions` body (fields this server does not use are ignored).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<InMessage>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    n: Option<i64>,
    stop: Option<Value>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    reasoning_effort: Option<String>,
    /// vLLM's cap on reasoning tokens: after this many tokens inside the thinking block its
    /// closing tag is forced (Anthropic's `thinking.budget_tokens`).
    thinking_token_budget: Option<i64>,
    chat_template_kwargs: Option<Map<String, Value>>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    prediction: Option<Value>,
    ignore_eos: Option<bool>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
}

/// `POST /v1/completions` body.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    model: String,
    prompt: Value,
    max_tokens: Option<i64>,
    n: Option<i64>,
    best_of: Option<i64>,
    stop: Option<Value>,
    logprobs: Option<i64>,
    echo: Option<bool>,
    suffix: Option<String>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    ignore_eos: Option<bool>,
}

/// The sampling fields both OpenAI endpoints accept. They are read from the request's JSON in a
/// second pass ([`params::from_json`]) rather than `#[serde(flatten)]`ed into each request
/// struct, because serde loses the field path of a type error inside a flattened struct.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    seed: Option<serde_json::Number>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<Map<String, Value>>,
}

impl SamplingFields {
    /// Which of the fields a generation config may default the request set.
    fn set_fields(&self) -> SetFields {
        SetFields {
            temperature: self.temperature.is_some(),
            top_p: self.top_p.is_some(),
            top_k: self.top_k.is_some(),
            min_p: self.min_p.is_some(),
            repetition_penalty: self.repetition_penalty.is_some(),
        }
    }

    /// Range-checks the fields into the engine's parameters; every error names its field.
    fn into_params(self, logprobs: Option<usize>) -> Result<SamplingParams, ApiError> {
        Ok(SamplingParams {
            temperature: params::temperature(
                self.temperature,
                params::OPENAI_MAX_TEMPERATURE,
                1.0,
            )?,
            top_k: params::top_k(self.top_k)?,
            top_p: params::top_p(self.top_p)?,
            min_p: params::min_p(self.min_p)?,
            repetition_penalty: params::repetition_penalty(self.repetition_penalty)?,
            frequency_penalty: params::penalty("frequency_penalty", self.frequency_penalty)?,
            presence_penalty: params::penalty("presence_penalty", self.presence_penalty)?,
            seed: seed(self.seed)?,
            logprobs,
            logit_bias: params::logit_bias(self.logit_bias)?,
        })
    }
}

fn seed(v: Option<serde_json::Number>) -> Result<Option<u64>, ApiError> {
    match v {
        None => Ok(None),
        Some(n) => n
            .as_u64()
            .or_else(|| n.as_i64().map(|i| i as u64))
            .map(Some)
            .ok_or_else(|| ApiError::field("seed", format!("must be an integer, got {n}"))),
    }
}

/// Content as the template sees it; only text is accepted.
fn content(v: Option<Value>, at: &str, role: &str) -> Result<Option<MessageContent>, ApiError> {
    match v {
        None | Some(Value::Null) => {
            if role == "assistant" {
                Ok(None)
            } else {
                Err(ApiError::MissingField(format!("{at}.content")))
            }
        }
        Some(Value::String(s)) => Ok(Some(MessageContent::Text(s))),
        Some(Value::Array(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for (j, p) in parts.into_iter().enumerate() {
                let here = format!("{at}.content[{j}]");
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                if kind != "text" {
                    return Err(ApiError::Unsupported {
                        param: here,
                        message: format!("content parts of type {kind:?} cannot be read by this text-only model; send text parts"),
                    });
                }
                match p.get("text").and_then(Value::as_str) {
                    Some(t) => out.push(ContentPart::text(t)),
                    None => {
                        return Err(ApiError::field(format!("{here}.text"), "must be a string"))
                    }
                }
            }
            Ok(Some(MessageContent::Parts(out)))
        }
        Some(_) => Err(ApiError::field(
            format!("{at}.content"),
            "must be a string or a list of text parts",
        )),
    }
}

/// `prediction`: `{"type": "content", "content": TEXT or [text parts]}`.
fn prediction(v: Option<Value>) -> Result<Option<String>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    if v.get("type").and_then(Value::as_str) != Some("content") {
        return Err(ApiError::field("prediction.type", "must be \"content\""));
    }
    match content(v.get("content").cloned(), "prediction", "user")? {
        Some(MessageContent::Text(t)) => Ok(Some(t)),
        Some(MessageContent::Parts(ps)) => Ok(Some(
            ps.iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join(""),
        )),
        None => Ok(None),
    }
}

/// An assistant's `tool_calls` as templates expect them: `arguments` an object where the
/// JSON string holds one (transformers' convention; the Hy3 template writes each argument).
fn template_calls(calls: Vec<Value>, at: &str) -> Result<Value, ApiError> {
    let mut out = Vec::with_capacity(calls.len());
    for (j, mut c) in calls.into_iter().enumerate() {
        let here = format!("{at}.tool_calls[{j}].function");
        let f = c
            .get_mut("function")
            .filter(|f| f.is_object())
            .ok_or_else(|| ApiError::MissingField(here.clone()))?;
        if !f.get("name").is_some_and(Value::is_string) {
            return Err(ApiError::MissingField(format!("{here}.name")));
        }
        if let Some(Value::String(s)) = f.get("arguments") {
            if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(s) {
                f["arguments"] = v;
            }
        }
        out.push(c);
    }
    Ok(Value::Array(out))
}

impl ChatRequest {
    fn normalize(self, sampling: SamplingFields) -> Result<NormalizedRequest, ApiError> {
        params::check_conversation(self.messages.len())?;
        let tools = super::tools::openai(self.tools, self.tool_choice, self.parallel_tool_calls)?;
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            let at = format!("messages[{i}]");
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => "tool",
                other => {
                    return Err(ApiError::field(
                        format!("{at}.role"),
                        format!(
                        "must be one of system, developer, user, assistant, tool; got {other:?}"
                    ),
                    ))
                }
            };
            let has_calls = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
            let mut msg = ChatMessage {
                role: role.to_string(),
                content: content(m.content, &at, if has_calls { "assistant" } else { role })?,
                extra: Map::new(),
            };
            if let Some(n) = m.name {
                msg = msg.with_field("name", Value::String(n));
            }
            if let Some(calls) = m.tool_calls {
                if role != "assistant" {
                    return Err(ApiError::field(
                        format!("{at}.tool_calls"),
                        "only assistant messages carry tool calls",
                    ));
                }
                msg = msg.with_field("tool_calls", template_calls(calls, &at)?);
            }
            if role == "tool" {
                let id = m
                    .tool_call_id
                    .ok_or_else(|| ApiError::MissingField(format!("{at}.tool_call_id")))?;
                msg = msg.with_field("tool_call_id", Value::String(id));
            }
            messages.push(msg);
        }
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (true, k) => Some(params::top_logprobs("top_logprobs", k.unwrap_or(0))?),
            (false, Some(k)) if k > 0 => {
                return Err(ApiError::field(
                    "top_logprobs",
                    "requires logprobs to be true",
                ));
            }
            (false, _) => None,
        };
        let max_tokens_param = if self.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        let max_tokens = params::max_tokens(
            max_tokens_param,
            self.max_completion_tokens.or(self.max_tokens),
        )?;
        let prompt_end = match (self.add_generation_prompt, self.continue_final_message) {
            (Some(true), Some(true)) => {
                return Err(ApiError::field(
                    "continue_final_message",
                    "cannot be combined with add_generation_prompt: true (continue the final message or start a new turn, not both)",
                ))
            }
            (_, Some(true)) => PromptEnd::ContinueFinal,
            (Some(false), _) => PromptEnd::AsRendered,
            _ => PromptEnd::NewTurn,
        };
        let reasoning_budget = match self.thinking_token_budget {
            None => None,
            Some(b) if b >= 0 => Some(b as usize),
            Some(b) => {
                return Err(ApiError::field(
                    "thinking_token_budget",
                    format!("must be a non-negative number of tokens, got {b}"),
                ))
            }
        };
        let mut kwargs = self.chat_template_kwargs.unwrap_or_default();
        if let Some(r) = self.reasoning_effort {
            kwargs.insert("reasoning_effort".into(), Value::String(r));
        }
        let (include_usage, continuous_usage) = StreamOptions::flags(self.stream_options);
        Ok(NormalizedRequest {
            api: Api::OpenAiChat,
            model: self.model,
            messages,
            prompts: vec![],
            max_tokens,
            max_tokens_param,
            sampling_set: sampling.set_fields(),
            sampling: sampling.into_params(logprobs)?,
            stop: params::stop("stop", self.stop)?,
            n: params::n(self.n)?,
            stream: self.stream.unwrap_or(false),
            include_usage,
            continuous_usage,
            template_kwargs: kwargs,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            output: None,
            tools,
            prediction: prediction(self.prediction)?,
            echo: false,
            opens_reasoning: Default::default(),
            reasoning_budget,
            controls: Default::default(),
            prompt_end,
        })
    }
}

fn prompts(v: Value) -> Result<Vec<PromptInput>, ApiError> {
    let tokens = |items: Vec<Value>, at: &str| -> Result<Vec<u32>, ApiError> {
        items
            .into_iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| {
                        ApiError::field(
                            format!("{at}[{i}]"),
                            "token ids must be non-negative integers",
                        )
                    })
            })
            .collect()
    };
    let out = match v {
        Value::String(s) => vec![PromptInput::Text(s)],
        Value::Array(items) if items.is_empty() => return Err(ApiError::field("prompt", "must not be empty")),
        Value::Array(items) if items.iter().all(Value::is_number) => vec![PromptInput::Tokens(tokens(items, "prompt")?)],
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::String(s) => Ok(PromptInput::Text(s)),
                Value::Array(ids) => Ok(PromptInput::Tokens(tokens(ids, &format!("prompt[{i}]"))?)),
                _ => Err(ApiError::field(format!("prompt[{i}]"), "must be a string or a list of token ids")),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::field(
                "prompt",
                "must be a string, a list of strings, a list of token ids, or a list of lists of token ids",
            ))
        }
    };
    if out.len() > params::MAX_PROMPTS {
        return Err(ApiError::field(
            "prompt",
            format!("at most {} prompts per request", params::MAX_PROMPTS),
        ));
    }
    Ok(out)
}

impl CompletionRequest {
    fn normalize(self, sampling: SamplingFields) -> Result<NormalizedRequest, ApiError> {
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::Unsupported {
                param: "suffix".into(),
                message: "insertion with a suffix is not implemented".into(),
            });
        }
        let n = params::n(self.n)?;
        if let Some(b) = self.best_of {
            if b != n as i64 {
                return Err(ApiError::Unsupported {
                    param: "best_of".into(),
                    message: "best_of must equal n (server-side ranking is not implemented)".into(),
                });
            }
        }
        let logprobs = self
            .logprobs
            .map(|k| params::top_logprobs("logprobs", k))
            .transpose()?;
        let (include_usage, continuous_usage) = StreamOptions::flags(self.stream_options);
        Ok(NormalizedRequest {
            api: Api::OpenAiCompletions,
            model: self.model,
            messages: vec![],
            prompts: prompts(self.prompt)?,
            max_tokens: params::max_tokens("max_tokens", self.max_tokens)?,
            max_tokens_param: "max_tokens",
            sampling_set: sampling.set_fields(),
            sampling: sampling.into_params(logprobs)?,
            stop: params::stop("stop", self.stop)?,
            n,
            stream: self.stream.unwrap_or(false),
            include_usage,
            continuous_usage,
            template_kwargs: Map::new(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            output: None,
            tools: None,
            prediction: None,
            echo: self.echo.unwrap_or(false),
            opens_reasoning: Default::default(),
            reasoning_budget: None,
            controls: Default::default(),
            prompt_end: Default::default(),
        })
    }
}

/// What every response and chunk of one request shares.
#[derive(Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
}

impl Meta {
    fn new(state: &AppState, api: Api) -> Self {
        Self {
            id: new_id(if api == Api::OpenAiChat {
                "chatcmpl-"
            } else {
                "cmpl-"
            }),
            created: unix_now(),
            model: state.model_id.clone(),
            fingerprint: state.fingerprint.clone(),
        }
    }
}

/// `usage`; with a `prediction`, `completion_tokens_details` says how much of it the answer
/// used (accepted drafts) and how many predicted tokens the model checked and refused.
fn usage_json(u: Usage, prediction: bool) -> Value {
    let mut v = json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    });
    if prediction {
        v["completion_tokens_details"] = json!({
            "accepted_prediction_tokens": u.accepted_draft_tokens,
            "rejected_prediction_tokens": u.draft_tokens - u.accepted_draft_tokens,
        });
    }
    v
}

/// A token as logprobs name it: its text (and bytes), or `token_id:<id>` with vLLM's
/// `return_tokens_as_token_ids`.
fn token_label(state: &AppState, as_ids: bool, id: u32) -> (String, Vec<u8>) {
    let (text, bytes) = token_text(state, id);
    if as_ids {
        (format!("token_id:{id}"), bytes)
    } else {
        (text, bytes)
    }
}

/// vLLM's `prompt_logprobs`: per prompt token, null for the first, else the token and the
/// `n` most likely alternatives, each keyed by id with its logprob, rank and text.
fn vllm_prompt_logprobs(
    state: &AppState,
    as_ids: bool,
    first: Option<&TokenEvent>,
    n: usize,
) -> Value {
    let Some(pl) = first.and_then(|t| t.prompt_logprobs.as_ref()) else {
        return Value::Null;
    };
    let entry = |id: u32, logprob: f32, rank: Option<usize>| json!({"logprob": logprob, "rank": rank, "decoded_token": token_label(state, as_ids, id).0});
    pl.iter()
        .map(|p| match p.logprob {
            None => Value::Null,
            Some(lp) => {
                let mut m = Map::new();
                for (i, a) in p.top_logprobs.iter().take(n).enumerate() {
                    m.insert(a.id.to_string(), entry(a.id, a.logprob, Some(i + 1)));
                }
                m.insert(p.id.to_string(), entry(p.id, lp, p.rank));
                Value::Object(m)
            }
        })
        .collect()
}

/// Chat `logprobs.content` entry of one token.
fn chat_logprob(state: &AppState, as_ids: bool, t: &TokenEvent) -> Value {
    let entry = |id: u32, lp: f32| {
        let (text, bytes) = token_label(state, as_ids, id);
        json!({"token": text, "logprob": lp, "bytes": bytes})
    };
    let mut e = entry(t.id, t.logprob.unwrap_or(f32::NEG_INFINITY));
    e["top_logprobs"] = t
        .top_logprobs
        .iter()
        .map(|a| entry(a.id, a.logprob))
        .collect();
    // Not in OpenAI's schema: the entropy (nats) of the step's raw distribution, the number the
    // cascade's `max_mean_entropy` checks; `route-eval --replay --calibrate` reads it.
    if let Some(h) = t.entropy {
        e["entropy"] = json!(h);
    }
    e
}

/// Completions logprobs of a run of tokens starting at text offset `offset`.
fn completion_logprobs(
    state: &AppState,
    as_ids: bool,
    tokens: &[TokenEvent],
    mut offset: usize,
) -> Value {
    let (mut toks, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
    for t in tokens {
        let (text, _) = token_label(state, as_ids, t.id);
        offs.push(offset);
        offset += t.text.len();
        toks.push(text);
        lps.push(t.logprob);
        let top: Map<String, Value> = t
            .top_logprobs
            .iter()
            .map(|a| (token_label(state, as_ids, a.id).0, json!(a.logprob)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
}

/// Completions `echo` of choice `i`'s prompt: its text (as sent, or decoded from ids) and,
/// when the first token event carries them, its logprobs in the completions shape (the first
/// token's logprob and alternatives are null: nothing precedes it).
fn prompt_echo(
    state: &AppState,
    req: &NormalizedRequest,
    choice: usize,
    first: Option<&TokenEvent>,
) -> (String, Option<Value>) {
    let text = match req.prompts.get(choice / req.n.max(1)) {
        Some(PromptInput::Text(t)) => t.clone(),
        Some(PromptInput::Tokens(ids)) => state.tokenizer.decode(ids, false).unwrap_or_default(),
        None => String::new(),
    };
    let as_ids = req.controls.return_tokens_as_token_ids;
    let top_n = req.sampling.logprobs.unwrap_or(0);
    let lp = first.and_then(|t| t.prompt_logprobs.as_ref()).map(|pl| {
        let (mut toks, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
        let mut offset = 0;
        for p in pl {
            let (tok, _) = token_label(state, as_ids, p.id);
            offs.push(offset);
            offset += tok.len();
            toks.push(tok);
            lps.push(json!(p.logprob));
            tops.push(match p.logprob {
                None => Value::Null,
                Some(_) => Value::Object(
                    p.top_logprobs
                        .iter()
                        .take(top_n)
                        .map(|a| (token_label(state, as_ids, a.id).0, json!(a.logprob)))
                        .collect(),
                ),
            });
        }
        json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
    });
    (text, lp)
}

/// `a` then `b`, field by field (completions logprobs objects).
fn join_logprobs(mut a: Value, b: Value) -> Value {
    for k in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(x), Some(y)) = (a[k].as_array_mut(), b[k].as_array()) {
            x.extend(y.iter().cloned());
        }
    }
    a
}

/// The OpenAI endpoints on the engine.
pub struct OpenAi;

impl routing::LocalEndpoint for OpenAi {
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
        let meta = Meta::new(state, req.api);
        if req.stream {
            let prompt_ids = req.controls.return_token_ids.then(|| {
                (0..streams.len())
                    .map(|i| prepared.choice_prompt(i).to_vec())
                    .collect()
            });
            let fmt = ChunkFormat::new(
                state,
                &req,
                meta,
                streams.len(),
                prompt_ids,
                prepared.prompt_tokens(),
            );
            return Ok(Sse::new(local::sse(streams, fmt, tracker)).into_response());
        }
        // Token events carry the logprobs (the first one also the prompt's).
        let keep = req.sampling.logprobs.is_some() || req.controls.prompt_logprobs.is_some();
        let mut outs = local::collect(streams, &mut tracker, keep).await?;
        if req.controls.return_token_ids {
            prepared.attach_prompt_ids(&mut outs);
        }
        Ok(json_response(state, &req, meta, &outs, tracker.usage))
    }

    /// The response to finished local choices: JSON, or (a held-back stream) the SSE events.
    fn render(
        state: &Arc<AppState>,
        req: &NormalizedRequest,
        outs: Vec<ChoiceOutput>,
        usage: Usage,
    ) -> Response {
        let meta = Meta::new(state, req.api);
        if req.stream {
            let prompt_ids = req
                .controls
                .return_token_ids
                .then(|| outs.iter().map(|o| o.prompt_token_ids.clone()).collect());
            let fmt = ChunkFormat::new(
                state,
                req,
                meta,
                outs.len(),
                prompt_ids,
                usage.prompt_tokens,
            );
            return Sse::new(local::replay(outs, fmt, usage)).into_response();
        }
        json_response(state, req, meta, &outs, usage)
    }
}

/// A chat completion or text completion object.
fn json_response(
    state: &AppState,
    req: &NormalizedRequest,
    meta: Meta,
    outs: &[ChoiceOutput],
    usage: Usage,
) -> Response {
    let chat = req.api == Api::OpenAiChat;
    let logprobs = req.sampling.logprobs.is_some();
    let as_ids = req.controls.return_tokens_as_token_ids;
    // vLLM's `return_token_ids`: generated ids on each choice; the prompt's on the response
    // (chat: one prompt for every choice) or on each choice (completions).
    let ids = req.controls.return_token_ids;
    let tools = super::tools::active(state, req);
    let opened = chat && local::opens_reasoning(state, req);
    let prompt_lp = |o: &ChoiceOutput| {
        req.controls
            .prompt_logprobs
            .map(|n| vllm_prompt_logprobs(state, as_ids, o.tokens.first(), n))
    };
    let choices: Vec<Value> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let mut finish = o.completion.as_ref().map(|c| c.finish_reason.as_str());
            if chat {
                let lp = logprobs.then(|| json!({"content": o.tokens.iter().map(|t| chat_logprob(state, as_ids, t)).collect::<Vec<_>>()}));
                let (reasoning, answer) = reasoning::split(&o.text, opened);
                let mut message = json!({"role": "assistant", "content": answer});
                if let Some(r) = reasoning {
                    message["reasoning_content"] = json!(r);
                }
                if let Some(t) = &tools {
                    let (content, calls) = t.split(&answer);
                    if !calls.is_empty() {
                        message["content"] = if content.is_empty() {
                            Value::Null
                        } else {
                            Value::String(content)
                        };
                        message["tool_calls"] = super::tools::openai_calls(&calls);
                        finish = Some("tool_calls");
                    }
                }
                let mut c = json!({
                    "index": i,
                    "message": message,
                    "logprobs": lp,
                    "finish_reason": finish,
                    "stop_reason": stop_reason(state, o.completion.as_ref()),
                });
                if ids {
                    c["token_ids"] = json!(o.token_ids);
                }
                c
            } else {
                let echo = req.echo.then(|| prompt_echo(state, req, i, o.tokens.first()));
                let (prefix, mut lp) = match echo {
                    Some((text, lp)) => (text, lp),
                    None => (String::new(), None),
                };
                if logprobs {
                    let gen = completion_logprobs(state, as_ids, &o.tokens, prefix.len());
                    lp = Some(match lp {
                        Some(p) => join_logprobs(p, gen),
                        None => gen,
                    });
                }
                let mut c = json!({"index": i, "text": format!("{prefix}{}", o.text), "logprobs": lp, "finish_reason": finish,
                       "stop_reason": stop_reason(state, o.completion.as_ref())});
                if let Some(p) = prompt_lp(o) {
                    c["prompt_logprobs"] = p;
                }
                if ids {
                    c["prompt_token_ids"] = json!(o.prompt_token_ids);
                    c["token_ids"] = json!(o.token_ids);
                }
                c
            }
        })
        .collect();
    let mut body = json!({
        "id": meta.id,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.fingerprint,
        "choices": choices,
        "usage": usage_json(usage, req.prediction.is_some()),
    });
    // vLLM puts a chat's prompt logprobs beside the choices (one prompt for all of them).
    if let (true, Some(p)) = (chat, outs.first().and_then(prompt_lp)) {
        body["prompt_logprobs"] = p;
    }
    if chat && ids {
        body["prompt_token_ids"] = json!(outs.first().map(|o| &o.prompt_token_ids));
    }
    Json(body).into_response()
}

/// OpenAI chunk streams (chat and completions).
struct ChunkFormat {
    state: Arc<AppState>,
    meta: Meta,
    chat: bool,
    choices: usize,
    include_usage: bool,
    /// With continuous usage: the request's prompt tokens and the tokens generated so far
    /// (every choice), reported on every chunk.
    running_usage: Option<(usize, usize)>,
    logprobs: bool,
    /// Logprobs name tokens by id (`return_tokens_as_token_ids`).
    as_ids: bool,
    /// Completions `text_offset` of each choice's next token.
    offsets: Vec<usize>,
    /// With tools, each choice's call parser.
    tools: Option<Vec<Option<ToolCallStream>>>,
    /// The request has a `prediction` (usage reports on it).
    prediction: bool,
    /// With `echo`: the request (its prompts), and which choices have sent theirs.
    echo: Option<NormalizedRequest>,
    echoed: Vec<bool>,
    /// Each choice's reasoning splitter, and whether reasoning text can occur at all (the
    /// prompt opened a `<think>` block; otherwise only an answer starting with one).
    reasoning: Vec<ReasoningStream>,
    reasoning_possible: bool,
    /// With `return_token_ids`: the ids still to send.
    ids: Option<StreamIds>,
}

/// vLLM's `return_token_ids` in a stream: the prompt's ids go in the first chunk (chat: on the
/// chunk; completions: on each choice's first), each choice's generated ids in the first chunk
/// of that choice sent after them (a token whose text is held back, as a possible tool call or
/// reasoning tag, sends its id with the next chunk).
struct StreamIds {
    /// Each choice's prompt ids.
    prompts: Vec<Vec<u32>>,
    /// Whether each choice's prompt ids were sent (chat: the first entry stands for all).
    prompt_sent: Vec<bool>,
    /// Each choice's generated ids not sent yet.
    pending: Vec<Vec<u32>>,
}

/// `delta.tool_calls` entries in the chunks they go in: at most one entry per call in a chunk
/// (a call's opening entry and its first arguments go in two, as OpenAI and vLLM send them).
fn call_groups(calls: Vec<Value>) -> Vec<Vec<Value>> {
    let mut groups: Vec<Vec<Value>> = vec![];
    for c in calls {
        match groups.last_mut() {
            Some(g) if !g.iter().any(|e| e["index"] == c["index"]) => g.push(c),
            _ => groups.push(vec![c]),
        }
    }
    groups
}

/// A choice's new output, sorted.
#[derive(Default)]
struct Routed {
    reasoning: String,
    answer: String,
    /// `delta.tool_calls` entries.
    calls: Vec<Value>,
    /// The choice has made a call.
    called: bool,
}

impl ChunkFormat {
    /// `prompt_ids`: each choice's prompt ids, when the stream reports token ids;
    /// `prompt_tokens`: the request's (for continuous usage).
    fn new(
        state: &Arc<AppState>,
        req: &NormalizedRequest,
        meta: Meta,
        choices: usize,
        prompt_ids: Option<Vec<Vec<u32>>>,
        prompt_tokens: usize,
    ) -> Self {
        let opened = local::opens_reasoning(state, req);
        Self {
            state: state.clone(),
            meta,
            chat: req.api == Api::OpenAiChat,
            choices,
            include_usage: req.include_usage,
            running_usage: req.continuous_usage.then_some((prompt_tokens, 0)),
            logprobs: req.sampling.logprobs.is_some(),
            as_ids: req.controls.return_tokens_as_token_ids,
            offsets: vec![0; choices],
            tools: super::tools::active(state, req)
                .map(|t| (0..choices).map(|_| Some(t.stream())).collect()),
            prediction: req.prediction.is_some(),
            echo: (req.echo && req.api == Api::OpenAiCompletions).then(|| req.clone()),
            echoed: vec![false; choices],
            reasoning: (0..choices).map(|_| ReasoningStream::new(opened)).collect(),
            reasoning_possible: opened,
            ids: prompt_ids.map(|prompts| StreamIds {
                prompt_sent: vec![false; prompts.len()],
                pending: vec![vec![]; prompts.len()],
                prompts,
            }),
        }
    }

    /// Sorts a choice's parts into reasoning text, answer text and (with tools) call events;
    /// answer text that may be a call is held back. `end`: the choice is over, the call parser
    /// says what it still holds.
    fn route_parts(&mut self, i: usize, parts: Vec<Part>, end: bool) -> Routed {
        let mut r = Routed::default();
        let mut events = vec![];
        for p in parts {
            match p {
                Part::Reasoning(t) => r.reasoning.push_str(&t),
                Part::Answer(a) => match self.tools.as_mut().and_then(|s| s[i].as_mut()) {
                    Some(s) => events.extend(s.push(&a)),
                    None => r.answer.push_str(&a),
                },
            }
        }
        if let Some(slot) = self.tools.as_mut().map(|s| &mut s[i]) {
            r.called = slot.as_ref().is_some_and(ToolCallStream::made_calls);
            if end {
                events.extend(slot.take().map(ToolCallStream::finish).unwrap_or_default());
            }
        }
        r.called |= events
            .iter()
            .any(|e| matches!(e, ToolCallEvent::CallStart { .. }));
        for e in &events {
            if let ToolCallEvent::Content(c) = e {
                r.answer.push_str(c);
            }
        }
        r.calls = super::tools::openai_deltas(&events);
        r
    }

    fn chunk(&mut self, mut choices: Vec<Value>) -> SseEvent {
        let mut prompt = None;
        if let Some(ids) = self.ids.as_mut() {
            for c in &mut choices {
                let i = c["index"].as_u64().unwrap_or(0) as usize;
                if let Some(p) = ids.pending.get_mut(i) {
                    c["token_ids"] = json!(std::mem::take(p));
                }
                let at = if self.chat { 0 } else { i };
                if let Some(sent) = ids.prompt_sent.get_mut(at).filter(|s| !**s) {
                    *sent = true;
                    let p = json!(ids.prompts.get(at));
                    if self.chat {
                        prompt = Some(p);
                    } else {
                        c["prompt_token_ids"] = p;
                    }
                }
            }
        }
        let mut c = json!({
            "id": self.meta.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": self.meta.fingerprint,
            "choices": choices,
        });
        if let Some((prompt, done)) = self.running_usage {
            c["usage"] = json!({
                "prompt_tokens": prompt,
                "completion_tokens": done,
                "total_tokens": prompt + done,
            });
        } else if self.include_usage {
            c["usage"] = Value::Null;
        }
        if let Some(p) = prompt {
            c["prompt_token_ids"] = p;
        }
        SseEvent::default().data(c.to_string())
    }

    /// Notes a generated token whose id the next chunk of choice `i` reports.
    fn note_id(&mut self, i: usize, id: u32) {
        if let Some(p) = self.ids.as_mut().and_then(|ids| ids.pending.get_mut(i)) {
            p.push(id);
        }
    }
}

impl SseFormat for ChunkFormat {
    fn start(&mut self) -> Vec<SseEvent> {
        if !self.chat {
            return vec![];
        }
        (0..self.choices)
            .map(|i| {
                self.chunk(vec![json!({
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null,
                })])
            })
            .collect()
    }

    fn token(&mut self, i: usize, t: TokenEvent) -> Vec<SseEvent> {
        if let Some((_, done)) = self.running_usage.as_mut() {
            *done += 1;
        }
        if self.chat {
            self.note_id(i, t.id);
            let lp = self
                .logprobs
                .then(|| json!({"content": [chat_logprob(&self.state, self.as_ids, &t)]}));
            let parts = self.reasoning[i].push(&t.text);
            let Routed {
                reasoning,
                answer,
                calls,
                ..
            } = self.route_parts(i, parts, false);
            let mut groups = call_groups(calls).into_iter();
            let calls = groups.next().unwrap_or_default();
            let holding = self.tools.is_some() || self.reasoning_possible;
            if reasoning.is_empty()
                && answer.is_empty()
                && calls.is_empty()
                && lp.is_none()
                && holding
            {
                return vec![];
            }
            let mut delta = json!({});
            if !reasoning.is_empty() {
                delta["reasoning_content"] = json!(reasoning);
            }
            if !answer.is_empty() || (reasoning.is_empty() && calls.is_empty()) {
                delta["content"] = json!(answer);
            }
            if !calls.is_empty() {
                delta["tool_calls"] = json!(calls);
            }
            let first = json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": null});
            let mut out = vec![self.chunk(vec![first])];
            for g in groups {
                let delta = json!({"tool_calls": g});
                out.push(self.chunk(vec![
                    json!({"index": i, "delta": delta, "logprobs": null, "finish_reason": null}),
                ]));
            }
            return out;
        }
        // Completions: each token as it comes, after the echoed prompt.
        let mut out = vec![];
        if let Some(req) = self
            .echo
            .as_ref()
            .filter(|_| self.offsets[i] == 0 && !self.echoed[i])
        {
            self.echoed[i] = true;
            let (text, lp) = prompt_echo(&self.state, req, i, Some(&t));
            let lp = if self.logprobs { lp } else { None };
            self.offsets[i] = text.len();
            out.push(self.chunk(vec![
                json!({"index": i, "text": text, "logprobs": lp, "finish_reason": null}),
            ]));
        }
        self.note_id(i, t.id);
        let off = self.offsets.get(i).copied().unwrap_or(0);
        let lp = self
            .logprobs
            .then(|| completion_logprobs(&self.state, self.as_ids, std::slice::from_ref(&t), off));
        if let Some(o) = self.offsets.get_mut(i) {
            *o += t.text.len();
        }
        out.push(self.chunk(vec![
            json!({"index": i, "text": t.text, "logprobs": lp, "finish_reason": null}),
        ]));
        out
    }

    fn finished(&mut self, i: usize, c: &Completion) -> Vec<SseEvent> {
        let reason = c.finish_reason.as_str();
        let stopped_by = stop_reason(&self.state, Some(c));
        if !self.chat {
            let off = json!({"index": i, "text": c.text, "logprobs": null, "finish_reason": reason,
                             "stop_reason": stopped_by});
            return vec![self.chunk(vec![off])];
        }
        // What the reasoning and tool splitters still hold, with the rest of the calls.
        let mut rs = std::mem::replace(&mut self.reasoning[i], ReasoningStream::new(false));
        let mut parts = rs.push(&c.text);
        parts.extend(rs.finish());
        let Routed {
            reasoning,
            answer: text,
            calls,
            called,
        } = self.route_parts(i, parts, true);
        // A call cut off by the token limit ends as `length`, as OpenAI reports it.
        let reason = if called && c.finish_reason != FinishReason::Length {
            "tool_calls"
        } else {
            reason
        };
        let chunk = |delta: Value, reason: Option<&str>| {
            let mut c =
                json!({"index": i, "delta": delta, "logprobs": null, "finish_reason": reason});
            if reason.is_some() {
                c["stop_reason"] = stopped_by.clone();
            }
            c
        };
        if reasoning.is_empty() && calls.is_empty() {
            let delta = if text.is_empty() {
                json!({})
            } else {
                json!({"content": text})
            };
            return vec![self.chunk(vec![chunk(delta, Some(reason))])];
        }
        let mut out = vec![];
        if !reasoning.is_empty() {
            out.push(self.chunk(vec![chunk(json!({"reasoning_content": reasoning}), None)]));
        }
        if !text.is_empty() {
            out.push(self.chunk(vec![chunk(json!({"content": text}), None)]));
        }
        for g in call_groups(calls) {
            out.push(self.chunk(vec![chunk(json!({"tool_calls": g}), None)]));
        }
        out.push(self.chunk(vec![chunk(json!({}), Some(reason))]));
        out
    }

    fn end(&mut self, usage: Usage) -> Vec<SseEvent> {
        let mut out = vec![];
        if self.include_usage {
            let c = json!({
                "id": self.meta.id,
                "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
                "created": self.meta.created,
                "model": self.meta.model,
                "system_fingerprint": self.meta.fingerprint,
                "choices": [],
                "usage": usage_json(usage, self.prediction),
            });
            out.push(SseEvent::default().data(c.to_string()));
        }
        out.push(SseEvent::default().data("[DONE]"));
        out
    }

    fn error(&mut self, e: ApiError) -> Vec<SseEvent> {
        vec![
            SseEvent::default().data(e.openai_body().to_string()),
            SseEvent::default().data("[DONE]"),
        ]
    }
}

/// Routes and serves a parsed request; errors in the OpenAI shape; routing headers on the
/// response.
async fn handle(
    state: Arc<AppState>,
    api: Api,
    headers: &HeaderMap,
    body: Value,
    parsed: Result<NormalizedRequest, ApiError>,
    arrived: Instant,
) -> Response {
    // vLLM's --enable-force-include-usage: every local stream ends with its usage.
    let parsed = parsed.map(|mut r| {
        r.include_usage |= state.force_include_usage && r.stream;
        r
    });
    let routed = routing::route(&state, api, headers, body, parsed, arrived).await;
    routing::respond::<OpenAi>(&state, routed, arrived).await
}

/// vLLM's `stop_reason` of a finished choice: the stop string, or the requested stop token
/// id, that ended it; null when it ended otherwise (end of sequence, the length limit, a
/// complete structured output).
fn stop_reason(state: &AppState, c: Option<&Completion>) -> Value {
    match c.and_then(|c| c.stop.as_ref()) {
        Some(StopMatch::String(s)) => json!(s),
        Some(StopMatch::Token(id)) if !state.tokenizer.eos_token_ids().contains(id) => json!(id),
        _ => Value::Null,
    }
}

/// A chat completions request from its JSON body, every field checked and normalised (also
/// the chat form of `/tokenize`).
pub fn chat_request(json: &Value) -> Result<NormalizedRequest, ApiError> {
    let typed: ChatRequest = params::from_json(json)?;
    params::with_output(typed.normalize(params::from_json(json)?)?, json)
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    // Every failure, parsing included, goes through the router's bookkeeping (one telemetry
    // record per request); it answers in this endpoint's error shape.
    let (parsed, json) = match params::parse_body_json::<Value>(body, state.max_body_bytes) {
        Ok((_, json)) => (chat_request(&json), json),
        Err(e) => (Err(e), Value::Null),
    };
    handle(state, Api::OpenAiChat, &headers, json, parsed, arrived).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let parsed = params::parse_body_json::<CompletionRequest>(body, state.max_body_bytes)
        .and_then(|(r, json)| params::with_output(r.normalize(params::from_json(&json)?)?, &json));
    handle(
        state,
        Api::OpenAiCompletions,
        &headers,
        Value::Null,
        parsed,
        arrived,
    )
    .await
}

fn model_card(state: &AppState) -> Value {
    json!({
        "id": state.model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "switchyard",
        "root": state.model_dir.display().to_string(),
        "max_model_len": state.engine.info().scheduler.max_model_len,
    })
}

/// `GET /v1/models`.
pub async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    Json(json!({"object": "list", "data": [model_card(&state)]})).into_response()
}

/// `GET /v1/models/{id}`. An id that is not UTF-8 once percent-decoded is a 400 in the OpenAI
/// shape (axum's own rejection is plain text).
pub async fn get_model(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match id {
        Ok(Path(id)) => id,
        Err(e) => {
            return OpenAiError(ApiError::field("model", e.body_text())).into_response();
        }
    };
    match state.check_model(&id) {
        Ok(()) => Json(model_card(&state)).into_response(),
        Err(e) => OpenAiError(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_shapes() {
        assert_eq!(
            prompts(json!("hi")).unwrap(),
            vec![PromptInput::Text("hi".into())]
        );
        assert_eq!(
            prompts(json!([1, 2])).unwrap(),
            vec![PromptInput::Tokens(vec![1, 2])]
        );
        assert_eq!(prompts(json!([[1], "a"])).unwrap().len(), 2);
        assert!(prompts(json!([-1])).is_err());
        assert!(prompts(json!(3)).is_err());
        assert!(prompts(json!([])).is_err());
    }

    #[test]
    fn completions_sampling_fields_are_checked_and_named() {
        let parse = |v: Value| -> Result<NormalizedRequest, ApiError> {
            let r: CompletionRequest = params::from_json(&v)?;
            r.normalize(params::from_json(&v)?)
        };
        let r = parse(
            json!({"model": "m", "prompt": "hi", "temperature": 0.5, "top_k": 7,
                             "seed": 3, "presence_penalty": 1.0}),
        )
        .unwrap();
        assert_eq!(r.sampling.temperature, 0.5);
        assert_eq!(r.sampling.top_k, Some(7));
        assert_eq!(r.sampling.seed, Some(3));
        assert_eq!(r.sampling.presence_penalty, 1.0);
        for (body, field) in [
            (
                json!({"model": "m", "prompt": "hi", "top_k": "many"}),
                "top_k",
            ),
            (json!({"model": "m", "prompt": "hi", "min_p": 2.0}), "min_p"),
            (json!({"model": "m", "prompt": "hi", "seed": 1.5}), "seed"),
            (
                json!({"model": "m", "prompt": "hi", "frequency_penalty": 9.0}),
                "frequency_penalty",
            ),
        ] {
            assert_eq!(parse(body).unwrap_err().param(), Some(field));
        }
    }

    #[test]
    fn chat_validation() {
        let parse = |v: Value| -> Result<NormalizedRequest, ApiError> {
            let r: ChatRequest = params::from_json(&v)?;
            r.normalize(params::from_json(&v)?)
        };
        let ok = json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
        let r = parse(ok).unwrap();
        assert_eq!(r.n, 1);
        assert_eq!(r.max_tokens, None);
        let bad_role = json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]});
        assert_eq!(
            parse(bad_role).unwrap_err().param(),
            Some("messages[0].role")
        );
        let image = json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]});
        assert_eq!(
            parse(image).unwrap_err().param(),
            Some("messages[0].content[0]")
        );
        let top = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2});
        assert_eq!(parse(top).unwrap_err().param(), Some("top_logprobs"));
        let hot = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"});
        assert_eq!(parse(hot).unwrap_err().param(), Some("temperature"));
        let mt = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0});
        assert_eq!(
            parse(mt).unwrap_err().param(),
            Some("max_completion_tokens")
        );
    }
}
