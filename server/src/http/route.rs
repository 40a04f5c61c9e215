//! The routing seam: every inference handler normalises its request, asks the [`RoutePolicy`]
//! in the app state where it goes, and only then calls the local engine. This build has one
//! policy, [`LocalOnly`]; the request router (`crates/router`) plugs in here by implementing
//! the trait, and remote tiers by handling [`Target::Remote`] in the handlers.
//!
//! Every response carries the routing headers of DESIGN.md (`x-switchyard-tier`, `-action`,
//! `-reason`, `-cost-usd`).

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
/// Request header that picks a tier by name.
pub const ROUTE_HEADER: HeaderName = HeaderName::from_static("x-switchyard-route");

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
    /// The `x-switchyard-route` header, if any.
    pub route_header: Option<String>,
    /// Conversation (chat and messages); empty for completions.
    pub messages: Vec<ChatMessage>,
    /// Prompts (completions only; one choice set per prompt).
    pub prompts: Vec<PromptInput>,
    /// Tokens to generate; `None`: the rest of the context (OpenAI endpoints only).
    pub max_tokens: Option<usize>,
    /// Sampling settings (validated).
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Choices per prompt.
    pub n: usize,
    /// Stream as SSE.
    pub stream: bool,
    /// Send a usage chunk at the end of the stream.
    pub include_usage: bool,
    /// Chat template variables (`reasoning_effort`, `chat_template_kwargs`).
    pub template_kwargs: serde_json::Map<String, serde_json::Value>,
    /// Keep generating past end-of-sequence tokens (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
}

#[allow(dead_code)] // used by routers that classify content; none is wired yet
impl NormalizedRequest {
    /// All prompt text, for routers that classify content.
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

/// Where a request goes.
#[allow(dead_code)] // `Remote` and `Block` come from the router, once it is wired in
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// The local engine.
    Local,
    /// A remote tier, by name.
    Remote(String),
    /// Refused, with the message for the client.
    Block(String),
}

/// A routing decision, with what the response headers say about it.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDecision {
    /// Where it goes.
    pub target: Target,
    /// Tier name (`local` for the engine).
    pub tier: String,
    /// `local`, `escalate`, `local-only` or `block`.
    pub action: String,
    /// Why, in evaluation order.
    pub reasons: Vec<String>,
    /// Estimated cost in US dollars (0 locally).
    pub cost_usd: f64,
}

impl RouteDecision {
    /// Served by the local engine for `reason`.
    pub fn local(reason: impl Into<String>) -> Self {
        Self {
            target: Target::Local,
            tier: "local".into(),
            action: "local".into(),
            reasons: vec![reason.into()],
            cost_usd: 0.0,
        }
    }

    /// Writes the routing headers.
    pub fn write_headers(&self, h: &mut HeaderMap) {
        let set = |h: &mut HeaderMap, k: HeaderName, v: &str| {
            if let Ok(v) = HeaderValue::from_str(&header_safe(v, MAX_REASON_BYTES)) {
                h.insert(k, v);
            }
        };
        set(h, TIER_HEADER, &self.tier);
        set(h, ACTION_HEADER, &self.action);
        set(h, REASON_HEADER, &self.reasons.join("; "));
        set(h, COST_HEADER, &format_cost(self.cost_usd));
    }
}

/// Chooses where a request is served. Implementations must be cheap or do their slow work off
/// the async runtime: `route` is called on a request task.
pub trait RoutePolicy: Send + Sync {
    /// The decision for `req`.
    fn route(&self, req: &NormalizedRequest) -> RouteDecision;
}

/// The policy of a server without a router: everything is served locally.
#[derive(Debug, Default)]
pub struct LocalOnly;

impl RoutePolicy for LocalOnly {
    fn route(&self, req: &NormalizedRequest) -> RouteDecision {
        let why = match (req.route_header.as_deref(), req.model.as_str()) {
            (Some(t), _) => format!("x-switchyard-route={t}; no router configured, served locally"),
            (None, "auto") => "model=auto; no router configured, served locally".to_string(),
            (None, "local") => "model=local".to_string(),
            (None, _) => "served model requested".to_string(),
        };
        RouteDecision::local(why)
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

/// Printable ASCII only (header values), cut at `max` bytes.
fn header_safe(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    out.truncate(max);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_written() {
        let mut h = HeaderMap::new();
        RouteDecision::local("model=local\nwith newline é").write_headers(&mut h);
        assert_eq!(h[TIER_HEADER], "local");
        assert_eq!(h[ACTION_HEADER], "local");
        assert_eq!(h[COST_HEADER], "0");
        assert_eq!(h[REASON_HEADER], "model=local?with newline ?");
        assert_eq!(format_cost(0.00125), "0.00125");
    }
}
