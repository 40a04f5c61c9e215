//! The request shapes the router and the engine share, and the routing headers.
//!
//! Every inference handler normalises its request into a [`NormalizedRequest`] (what the local
//! engine serves); [`super::routing`] turns the raw body into the router's `RouteRequest`,
//! decides, and serves on the local engine or a remote tier. Every `/v1` response carries the
//! routing headers of DESIGN.md (`x-switchyard-tier`, `-action`, `-reason`, `-cost-usd`), written
//! by [`RouteHeaders::write_headers`].

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use switchyard_engine::chat::ChatMessage;
use switchyard_engine::sampling::SamplingParams;

/// Header naming the tier.
pub const TIER_HEADER: HeaderName = HeaderName::from_static("x-switchyard-tier");
/// Header naming the router's action.
pub const ACTION_HEADER: HeaderName = HeaderName::from_static("x-switchyard-action");
/// Header with the reasons, `; `-separated.
pub const REASON_HEADER: HeaderName = HeaderName::from_static("x-switchyard-reason");
/// Header with the request's cost in US dollars.
pub const COST_HEADER: HeaderName = HeaderName::from_static("x-switchyard-cost-usd");
/// Response header: what the cascade did (`passed`, `escalated`, `escalation_failed`); only
/// on responses to requests that went through it.
pub const CASCADE_HEADER: HeaderName = HeaderName::from_static("x-switchyard-cascade");

/// Most bytes of the reason header (proxies cap header sizes; reasons are summaries).
const MAX_REASON_BYTES: usize = 512;

/// The wire format a request arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/chat/completions`.
    OpenAiChat,
    /// `POST /v1/completions`.
    OpenAiCompletions,
    /// `POST /v1/messages`.
    AnthropicMessages,
}

impl Api {
    /// The endpoint path, for metrics labels.
    pub fn endpoint(self) -> &'static str {
        match self {
            Api::OpenAiChat => "/v1/chat/completions",
            Api::OpenAiCompletions => "/v1/completions",
            Api::AnthropicMessages => "/v1/messages",
        }
    }

    /// The request field that holds the prompt, for error `param`s.
    pub fn prompt_param(self) -> &'static str {
        match self {
            Api::OpenAiCompletions => "prompt",
            _ => "messages",
        }
    }

    /// Every request field the prompt is made of, for error messages (the Anthropic shape has
    /// no `param`, so its messages name the fields).
    pub fn prompt_fields(self) -> &'static str {
        match self {
            Api::OpenAiChat => "messages",
            Api::OpenAiCompletions => "prompt",
            Api::AnthropicMessages => "system and messages",
        }
    }
}

/// A completions prompt: text, or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Text, tokenised with the model's special tokens.
    Text(String),
    /// Token ids, used as given.
    Tokens(Vec<u32>),
}

/// A request in one shape whatever wire format it came in, validated: what the router decides
/// on and what the local engine (or, later, an upstream) serves.
#[derive(Debug, Clone)]
pub struct NormalizedRequest {
    /// Wire format.
    pub api: Api,
    /// The `model` field as sent (`local`, `auto`, the served id, or a tier name).
    pub model: String,
    /// Conversation (chat and messages); empty for completions.
    pub messages: Vec<ChatMessage>,
    /// Prompts (completions only; one choice set per prompt).
    pub prompts: Vec<PromptInput>,
    /// Tokens to generate; `None`: the rest of the context (OpenAI endpoints only).
    pub max_tokens: Option<usize>,
    /// The request field `max_tokens` came from (`max_tokens` or `max_completion_tokens`),
    /// named when prompt plus completion does not fit the context.
    pub max_tokens_param: &'static str,
    /// Sampling settings (validated).
    pub sampling: SamplingParams,
    /// Which of the fields the model's generation config may default the request set itself.
    pub sampling_set: switchyard_engine::generation_config::SetFields,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Choices per prompt.
    pub n: usize,
    /// Stream as SSE.
    pub stream: bool,
    /// Send a usage chunk at the end of the stream.
    pub include_usage: bool,
    /// With `include_usage`: every chunk carries the usage so far (vLLM's
    /// `stream_options.continuous_usage_stats`).
    pub continuous_usage: bool,
    /// Chat template variables (`reasoning_effort`, `chat_template_kwargs`).
    pub template_kwargs: serde_json::Map<String, serde_json::Value>,
    /// Keep generating past end-of-sequence tokens (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    /// Structured output asked for (`response_format`, `structured_outputs`, `output_format`).
    pub output: Option<super::params::OutputSpec>,
    /// Tool definitions and `tool_choice`.
    pub tools: Option<super::tools::ToolRequest>,
    /// Predicted output text (OpenAI's `prediction`), the draft source of speculative decoding.
    pub prediction: Option<String>,
    /// Completions `echo`: the prompt is returned before the completion (with its logprobs
    /// when `logprobs` is set).
    pub echo: bool,
    /// Whether the prompt opens a reasoning block, once probed
    /// ([`super::local::opens_reasoning`]; several response paths ask).
    pub opens_reasoning: std::sync::OnceLock<bool>,
    /// Most reasoning tokens before `</think>` is forced (Anthropic `thinking.budget_tokens`).
    pub reasoning_budget: Option<usize>,
    /// vLLM's output controls (`min_tokens`, `stop_token_ids`, ...; OpenAI endpoints).
    pub controls: super::params::GenerationControls,
    /// Chat: how the prompt ends — with the header of a new assistant turn (the default), inside
    /// the final assistant message so the model continues it (Anthropic prefill, vLLM's
    /// `continue_final_message`), or right after the last message (vLLM's
    /// `add_generation_prompt: false`).
    pub prompt_end: PromptEnd,
}

/// Where a chat prompt ends ([`NormalizedRequest::prompt_end`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PromptEnd {
    /// The header of a new assistant turn.
    #[default]
    NewTurn,
    /// Inside the final assistant message.
    ContinueFinal,
    /// After the last message, no header.
    AsRendered,
}

impl NormalizedRequest {
    /// All prompt text (system, user and assistant), for routing a completions request.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for m in &self.messages {
            if let Some(c) = &m.content {
                match c {
                    switchyard_engine::chat::MessageContent::Text(t) => out.push_str(t),
                    switchyard_engine::chat::MessageContent::Parts(ps) => {
                        for p in ps {
                            if let Some(t) = &p.text {
                                out.push_str(t);
                            }
                        }
                    }
                }
                out.push('\n');
            }
        }
        for p in &self.prompts {
            if let PromptInput::Text(t) = p {
                out.push_str(t);
                out.push('\n');
            }
        }
        out
    }
}

/// What the routing headers of one response say.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteHeaders {
    /// Tier that served the request (`local` for the engine, `none` when refused).
    pub tier: String,
    /// `local`, `escalate`, `local-only` or `block`.
    pub action: String,
    /// Why, in evaluation order.
    pub reasons: Vec<String>,
    /// Cost in US dollars (0 locally; an estimate for remote streams).
    pub cost_usd: f64,
    /// What the cascade did, when the request went through it.
    pub cascade: Option<&'static str>,
}

impl RouteHeaders {
    /// Served by the local engine for `reason`.
    pub fn local(reason: impl Into<String>) -> Self {
        Self {
            tier: "local".into(),
            action: "local".into(),
            reasons: vec![reason.into()],
            cost_usd: 0.0,
            cascade: None,
        }
    }

    /// Writes the routing headers (ASCII only; the reasons at most [`MAX_REASON_BYTES`]).
    pub fn write_headers(&self, h: &mut HeaderMap) {
        let set = |h: &mut HeaderMap, k: HeaderName, v: &str| {
            if let Ok(v) =
                HeaderValue::from_str(&switchyard_router::header_value(v, MAX_REASON_BYTES))
            {
                h.insert(k, v);
            }
        };
        set(h, TIER_HEADER, &self.tier);
        set(h, ACTION_HEADER, &self.action);
        set(h, REASON_HEADER, &self.reasons.join("; "));
        set(h, COST_HEADER, &format_cost(self.cost_usd));
        if let Some(c) = self.cascade {
            set(h, CASCADE_HEADER, c);
        }
    }
}

/// `0`, or the cost with up to 8 decimals and no trailing zeros.
fn format_cost(c: f64) -> String {
    if c == 0.0 || !c.is_finite() {
        return "0".into();
    }
    let s = format!("{c:.8}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_written() {
        let mut h = HeaderMap::new();
        RouteHeaders::local("model=local\nwith newline é").write_headers(&mut h);
        assert_eq!(h[TIER_HEADER], "local");
        assert_eq!(h[ACTION_HEADER], "local");
        assert_eq!(h[COST_HEADER], "0");
        assert_eq!(h[REASON_HEADER], "model=local?with newline ?");
        assert_eq!(format_cost(0.00125), "0.00125");
        let long = RouteHeaders {
            reasons: vec!["x".repeat(2 * MAX_REASON_BYTES)],
            ..RouteHeaders::local("")
        };
        long.write_headers(&mut h);
        let r = h[REASON_HEADER].to_str().unwrap_or("");
        assert_eq!(r.len(), MAX_REASON_BYTES);
        assert!(r.ends_with("..."));
    }
}
