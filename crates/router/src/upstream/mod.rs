//! Upstream clients for remote tiers: OpenAI-compatible chat completions and Anthropic Messages.
//!
//! [`Upstreams::dispatch`] takes a router [`Decision`] and the client's request body and walks
//! the decision's tier and fallback chain:
//! - each remote tier gets up to `1 + max_retries` attempts; 408/409/429/5xx/529 answers,
//!   timeouts, connection errors and malformed bodies are retried with exponential backoff and
//!   equal jitter, waiting at least what `Retry-After` asks (a tier asking for more than
//!   [`RetryPolicy::max_retry_after_ms`] is abandoned for the next one at once);
//! - every attempt has a connect timeout, a time-to-headers (and, for streams, time-to-first-
//!   event) timeout and a whole-attempt timeout, from the tier's config;
//! - each tier's circuit breaker (in [`RouterState`]) admits or skips it and learns the result;
//! - a `400`/`413`/`422` answer is the request's fault and is returned without falling back;
//! - reaching a local tier in the chain returns [`Dispatch::Local`] so the server runs the
//!   engine.
//!
//! Requests and responses are translated when the client's wire format differs from the tier's
//! kind. Streams are read by a task that translates events, tracks usage, and records spend and
//! breaker results when the stream ends; once the first event has been handed out a failure can
//! no longer be retried and arrives as one [`UpstreamError::Stream`] item.
//!
//! Cancel safety: dropping the future of `dispatch` drops the in-flight HTTP request; dropping
//! an [`UpstreamStream`] stops its reader task at the next event.

pub mod sse;
pub mod stream;
pub mod translate;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use rand::Rng;
use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use serde_json::Value;
use thiserror::Error;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::cost::Usage;
use crate::decide::{Decision, Refusal};
use crate::policy::{Policy, TierConfig, TierKind};
use crate::request::WireFormat;
use crate::secret::ApiKey;
use crate::state::RouterState;
use sse::{SseEvent, SseParser};
use stream::StreamTranslator;
pub use stream::{StreamSummary, UpstreamStream};

/// The Anthropic API version header value this client speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Longest upstream error body quoted in an error message.
const MAX_ERROR_SNIPPET: usize = 300;

/// Events buffered between the stream reader task and the consumer; small, so a slow client
/// applies back-pressure to the upstream read.
const STREAM_CHANNEL_DEPTH: usize = 32;

/// A failure talking to a remote tier. Messages never contain API keys.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum UpstreamError {
    /// The tier's API key variable is unset.
    #[error("tier `{tier}` is disabled: its API key variable {var} is unset")]
    Disabled {
        /// Tier name.
        tier: String,
        /// The environment variable.
        var: String,
    },
    /// The tier's circuit breaker is open.
    #[error("tier `{tier}` is failing (circuit breaker open)")]
    BreakerOpen {
        /// Tier name.
        tier: String,
    },
    /// Connecting or sending failed.
    #[error("could not reach tier `{tier}`: {message}")]
    Connect {
        /// Tier name.
        tier: String,
        /// What failed.
        message: String,
    },
    /// A timeout fired.
    #[error("tier `{tier}` did not {phase} within {ms} ms")]
    Timeout {
        /// Tier name.
        tier: String,
        /// What was awaited (`answer`, `send the first event`, `finish`, ...).
        phase: String,
        /// The limit.
        ms: u64,
    },
    /// A non-success HTTP status.
    #[error("tier `{tier}` answered HTTP {status}: {message}")]
    Status {
        /// Tier name.
        tier: String,
        /// The status.
        status: u16,
        /// The upstream's error message (truncated).
        message: String,
        /// What `Retry-After` asked for.
        retry_after_ms: Option<u64>,
    },
    /// A success status with a body that cannot be used.
    #[error("tier `{tier}` sent an unusable response: {message}")]
    Malformed {
        /// Tier name.
        tier: String,
        /// What is wrong.
        message: String,
    },
    /// The stream failed after output reached the client.
    #[error("the stream from tier `{tier}` failed after it had started: {message}")]
    Stream {
        /// Tier name.
        tier: String,
        /// What failed.
        message: String,
    },
    /// The client could not be built (bad TLS setup, bad header value).
    #[error("cannot set up the client for tier `{tier}`: {message}")]
    Setup {
        /// Tier name.
        tier: String,
        /// What failed.
        message: String,
    },
}

impl UpstreamError {
    /// Whether another attempt at the same tier may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Malformed { .. } => true,
            UpstreamError::Status { status, .. } => {
                matches!(status, 408 | 409 | 429 | 500 | 502 | 503 | 504 | 529)
            }
            _ => false,
        }
    }

    /// Whether the request itself is at fault, so no other tier will do better.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            UpstreamError::Status {
                status: 400 | 413 | 422,
                ..
            }
        )
    }

    /// The HTTP status the server should answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            UpstreamError::Status { status, .. } if self.is_client_error() => *status,
            UpstreamError::Timeout { .. } => 504,
            _ => 502,
        }
    }
}

/// Retry timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First backoff; doubles each retry.
    pub base_ms: u64,
    /// Backoff cap.
    pub max_backoff_ms: u64,
    /// A `Retry-After` longer than this abandons the tier instead of waiting.
    pub max_retry_after_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // 250 ms → 500 ms → 1 s ... capped at 8 s: two retries add ≤ 1.5 s to a request, and a
        // client waiting on a frontier model tolerates that far better than a failure. A
        // provider asking for more than 20 s is better left for the next tier.
        RetryPolicy {
            base_ms: 250,
            max_backoff_ms: 8_000,
            max_retry_after_ms: 20_000,
        }
    }
}

impl RetryPolicy {
    /// Delay before retry number `retry` (0-based): equal jitter over the exponential backoff,
    /// raised to at least `retry_after_ms`.
    pub fn delay_ms(&self, retry: u32, retry_after_ms: Option<u64>) -> u64 {
        let exp = self
            .base_ms
            .saturating_mul(1u64 << retry.min(20))
            .min(self.max_backoff_ms);
        let jittered = exp / 2 + rand::rng().random_range(0..=exp / 2);
        jittered.max(retry_after_ms.unwrap_or(0))
    }
}

/// Parses `Retry-After` (delta-seconds or an HTTP date) or `retry-after-ms`, relative to
/// `now_ms`.
pub fn parse_retry_after(headers: &HeaderMap, now_ms: u64) -> Option<u64> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(ms as u64);
    }
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(secs.saturating_mul(1_000));
    }
    http_date_ms(v).map(|at| at.saturating_sub(now_ms))
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) to Unix milliseconds.
fn http_date_ms(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: i64 = parts[1].parse().ok()?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == parts[2])? as i64 + 1;
    let year: i64 = parts[3].parse().ok()?;
    let hms: Vec<i64> = parts[4].split(':').filter_map(|x| x.parse().ok()).collect();
    if hms.len() != 3 {
        return None;
    }
    // days_from_civil (Howard Hinnant), the inverse of budget::civil_from_days.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hms[0] * 3_600 + hms[1] * 60 + hms[2];
    u64::try_from(secs).ok().map(|s| s * 1_000)
}

/// A request to send upstream: the client's body in the client's wire format.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// The body as the client sent it.
    pub body: Value,
    /// The client's wire format.
    pub format: WireFormat,
}

impl UpstreamRequest {
    /// Whether the client asked for a stream.
    pub fn stream(&self) -> bool {
        self.body
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    fn client_wants_usage(&self) -> bool {
        self.body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// The body to send to `tier` (translated, with the tier's model, usage requested).
    pub fn body_for(&self, tier: &TierConfig) -> Value {
        let model = tier.model.as_deref().unwrap_or_default();
        let mut body = match (self.format, tier.kind) {
            (WireFormat::OpenAi, TierKind::Anthropic) => {
                translate::openai_to_anthropic_request(&self.body, model)
            }
            (WireFormat::Anthropic, TierKind::Openai) => {
                translate::anthropic_to_openai_request(&self.body, model)
            }
            _ => self.body.clone(),
        };
        if let Some(o) = body.as_object_mut() {
            o.insert("model".into(), Value::String(model.to_string()));
            if tier.kind == TierKind::Openai && self.stream() {
                o.insert(
                    "stream_options".into(),
                    serde_json::json!({"include_usage": true}),
                );
            }
        }
        body
    }
}

/// A response from a remote tier.
#[derive(Debug)]
pub enum UpstreamBody {
    /// A complete JSON response in the client's wire format.
    Json {
        /// The body.
        value: Value,
        /// Normalised usage.
        usage: Usage,
        /// Cost at the tier's prices.
        cost_usd: f64,
    },
    /// A stream of events in the client's wire format.
    Stream(UpstreamStream),
}

/// What happened along the chain.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DispatchReport {
    /// Retries across all tiers.
    pub retries: u32,
    /// Tiers tried (or skipped) and abandoned, in order.
    pub abandoned: Vec<String>,
    /// One line per failed attempt or skipped tier.
    pub errors: Vec<String>,
}

/// The result of [`Upstreams::dispatch`].
#[derive(Debug)]
pub enum Dispatch {
    /// A remote tier answered.
    Remote {
        /// The tier that answered.
        tier: String,
        /// Its response.
        body: UpstreamBody,
        /// Retries and fallbacks on the way.
        report: DispatchReport,
    },
    /// The chain reached a local tier: run the engine.
    Local {
        /// The local tier.
        tier: String,
        /// Retries and fallbacks on the way.
        report: DispatchReport,
    },
    /// The decision refused the request.
    Refused(Refusal),
    /// Every tier failed, or the request itself was rejected upstream.
    Failed {
        /// The last error.
        error: UpstreamError,
        /// Retries and fallbacks on the way.
        report: DispatchReport,
    },
}

/// Where a stream reports its spend and outcome when it ends.
#[derive(Debug, Clone)]
pub struct Accounting {
    /// The shared router state (spend ledger, breakers).
    pub state: Arc<RouterState>,
    /// The caller's API key id, charged for the spend.
    pub api_key_id: Option<String>,
}

/// A client for one remote tier.
#[derive(Debug, Clone)]
pub struct TierClient {
    tier: TierConfig,
    key: Option<ApiKey>,
    http: reqwest::Client,
    slots: Arc<Semaphore>,
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let msg = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("message"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| text.trim().to_string());
    msg.chars().take(MAX_ERROR_SNIPPET).collect()
}

fn now_ms() -> u64 {
    crate::state::Clock::now_ms(&crate::state::SystemClock)
}

impl TierClient {
    /// A client for `tier` with `key` (`None` for keyless upstreams).
    pub fn new(tier: &TierConfig, key: Option<ApiKey>) -> Result<Self, UpstreamError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(tier.connect_timeout_ms))
            .build()
            .map_err(|e| UpstreamError::Setup {
                tier: tier.name.clone(),
                message: e.to_string(),
            })?;
        Ok(TierClient {
            tier: tier.clone(),
            key,
            http,
            slots: Arc::new(Semaphore::new(tier.max_concurrency)),
        })
    }

    /// The tier this client talks to.
    pub fn tier(&self) -> &TierConfig {
        &self.tier
    }

    fn url(&self) -> String {
        let base = self
            .tier
            .base_url
            .as_deref()
            .unwrap_or_default()
            .trim_end_matches('/');
        match self.tier.kind {
            TierKind::Anthropic => format!("{base}/messages"),
            _ => format!("{base}/chat/completions"),
        }
    }

    fn err_timeout(&self, phase: &str, ms: u64) -> UpstreamError {
        UpstreamError::Timeout {
            tier: self.tier.name.clone(),
            phase: phase.to_string(),
            ms,
        }
    }

    fn malformed(&self, message: String) -> UpstreamError {
        UpstreamError::Malformed {
            tier: self.tier.name.clone(),
            message,
        }
    }

    /// One attempt. For streams, returns once the first client event is available, so any
    /// failure before output is still retryable.
    pub async fn attempt(
        &self,
        req: &UpstreamRequest,
        acct: Option<Accounting>,
    ) -> Result<UpstreamBody, UpstreamError> {
        let t = &self.tier;
        let first_ms = t.first_token_timeout_ms;
        let permit: OwnedSemaphorePermit = tokio::time::timeout(
            Duration::from_millis(first_ms),
            self.slots.clone().acquire_owned(),
        )
        .await
        .map_err(|_| self.err_timeout("free a concurrency slot", first_ms))?
        .map_err(|_| self.err_timeout("free a concurrency slot", first_ms))?;
        let mut rb = self.http.post(self.url()).json(&req.body_for(t));
        match t.kind {
            TierKind::Anthropic => {
                rb = rb.header("anthropic-version", ANTHROPIC_VERSION);
                if let Some(k) = &self.key {
                    rb = rb.header("x-api-key", k.expose());
                }
            }
            _ => {
                if let Some(k) = &self.key {
                    rb = rb.bearer_auth(k.expose());
                }
            }
        }
        let resp = tokio::time::timeout(Duration::from_millis(first_ms), rb.send())
            .await
            .map_err(|_| self.err_timeout("answer", first_ms))?
            .map_err(|e| UpstreamError::Connect {
                tier: t.name.clone(),
                message: if e.is_connect() {
                    "connection failed".to_string()
                } else {
                    e.without_url().to_string()
                },
            })?;
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !status.is_success() {
            let retry_after_ms = parse_retry_after(resp.headers(), now_ms());
            let body = tokio::time::timeout(Duration::from_millis(first_ms), resp.bytes())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(UpstreamError::Status {
                tier: t.name.clone(),
                status: status.as_u16(),
                message: snippet(&body),
                retry_after_ms,
            });
        }
        let upstream_format = match t.kind {
            TierKind::Anthropic => WireFormat::Anthropic,
            _ => WireFormat::OpenAi,
        };
        if req.stream() {
            if !content_type.starts_with("text/event-stream") {
                return Err(self.malformed(format!(
                    "content-type `{content_type}`, expected text/event-stream"
                )));
            }
            return self
                .start_stream(resp, req, upstream_format, permit, acct)
                .await;
        }
        if !content_type.starts_with("application/json") {
            return Err(self.malformed(format!(
                "content-type `{content_type}`, expected application/json"
            )));
        }
        let total_ms = t.request_timeout_ms;
        let bytes = tokio::time::timeout(Duration::from_millis(total_ms), resp.bytes())
            .await
            .map_err(|_| self.err_timeout("finish the response", total_ms))?
            .map_err(|e| UpstreamError::Connect {
                tier: t.name.clone(),
                message: format!("reading the body failed: {}", e.without_url()),
            })?;
        drop(permit);
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| self.malformed(format!("malformed JSON body ({e})")))?;
        let (usage, value) = match (upstream_format, req.format) {
            (WireFormat::OpenAi, client) => {
                let usage = Usage::from_openai(value.get("usage").unwrap_or(&Value::Null));
                if value.get("choices").and_then(Value::as_array).is_none() {
                    return Err(self.malformed("the JSON body has no `choices`".into()));
                }
                let v = if client == WireFormat::Anthropic {
                    translate::openai_to_anthropic_response(&value)
                } else {
                    value
                };
                (usage, v)
            }
            (WireFormat::Anthropic, client) => {
                let usage = Usage::from_anthropic(value.get("usage").unwrap_or(&Value::Null));
                if value.get("content").and_then(Value::as_array).is_none() {
                    return Err(self.malformed("the JSON body has no `content`".into()));
                }
                let v = if client == WireFormat::OpenAi {
                    translate::anthropic_to_openai_response(&value, now_ms() / 1_000)
                } else {
                    value
                };
                (usage, v)
            }
        };
        Ok(UpstreamBody::Json {
            value,
            usage,
            cost_usd: usage.cost_usd(&t.prices()),
        })
    }

    async fn start_stream(
        &self,
        resp: reqwest::Response,
        req: &UpstreamRequest,
        upstream: WireFormat,
        permit: OwnedSemaphorePermit,
        acct: Option<Accounting>,
    ) -> Result<UpstreamBody, UpstreamError> {
        let t = self.tier.clone();
        let (tx, mut rx) = mpsc::channel::<Result<SseEvent, UpstreamError>>(STREAM_CHANNEL_DEPTH);
        let summary = Arc::new(Mutex::new(StreamSummary::default()));
        let translator = StreamTranslator::new(
            upstream,
            req.format,
            req.client_wants_usage(),
            t.model.as_deref().unwrap_or_default(),
            now_ms() / 1_000,
        );
        tokio::spawn(read_stream(
            resp,
            t.clone(),
            translator,
            tx,
            summary.clone(),
            permit,
            acct,
        ));
        let first_ms = t.first_token_timeout_ms;
        match tokio::time::timeout(Duration::from_millis(first_ms), rx.recv()).await {
            Err(_) => Err(self.err_timeout("send the first event", first_ms)),
            Ok(None) => Err(self.malformed("the stream ended before any event".into())),
            // The reader reports pre-output failures as `Stream`; before output they are
            // ordinary, retryable failures.
            Ok(Some(Err(UpstreamError::Stream { message, .. }))) => Err(self.malformed(message)),
            Ok(Some(Err(e))) => Err(e),
            Ok(Some(Ok(first))) => Ok(UpstreamBody::Stream(UpstreamStream {
                first: Some(first),
                rx,
                summary,
            })),
        }
    }
}

async fn read_stream(
    resp: reqwest::Response,
    tier: TierConfig,
    mut tr: StreamTranslator,
    tx: mpsc::Sender<Result<SseEvent, UpstreamError>>,
    summary: Arc<Mutex<StreamSummary>>,
    permit: OwnedSemaphorePermit,
    acct: Option<Accounting>,
) {
    let idle = Duration::from_millis(tier.first_token_timeout_ms);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(tier.request_timeout_ms);
    let mut body = resp.bytes_stream();
    let mut parser = SseParser::new();
    let fail = |message: String| UpstreamError::Stream {
        tier: tier.name.clone(),
        message,
    };
    let mut error: Option<String> = None;
    // Failures before any output are retried by `dispatch`, which also tells the breaker; only
    // a stream that reached the client reports its own outcome.
    let mut sent_any = false;
    'read: loop {
        let wait = idle.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let chunk = match tokio::time::timeout(wait, body.next()).await {
            Err(_) => {
                error = Some(format!("no data for {} ms", wait.as_millis()));
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                error = Some(format!("the connection broke: {}", e.without_url()));
                break;
            }
            Ok(Some(Ok(c))) => c,
        };
        let events = match parser.feed(&chunk) {
            Ok(ev) => ev,
            Err(e) => {
                error = Some(e);
                break;
            }
        };
        for ev in events {
            match tr.on_event(ev) {
                Ok(out) => {
                    for e in out {
                        sent_any = true;
                        if tx.send(Ok(e)).await.is_err() {
                            // The client went away; dropping `body` cancels the upstream.
                            break 'read;
                        }
                    }
                }
                Err(e) => {
                    error = Some(e);
                    break 'read;
                }
            }
        }
        if tr.is_done() {
            break;
        }
    }
    drop(permit);
    if error.is_none() && !tr.is_done() && !tx.is_closed() {
        error = Some("the stream ended before the response was complete".into());
    }
    let usage = tr.usage();
    let cost = usage.cost_usd(&tier.prices());
    {
        let mut s = summary.lock().unwrap_or_else(|p| p.into_inner());
        s.usage = usage;
        s.cost_usd = cost;
        s.completed = tr.is_done();
        s.error = error.clone();
    }
    if let Some(Accounting { state, api_key_id }) = &acct {
        state.record_spend(&tier.name, api_key_id.as_deref(), cost);
        match &error {
            None => state.record_success(&tier.name),
            Some(_) if sent_any => state.record_failure(&tier.name, tier.breaker_config()),
            Some(_) => {}
        }
    }
    if let Some(e) = error {
        let _ = tx.send(Err(fail(e))).await;
    }
}

/// Clients for every enabled remote tier of a policy, plus the dispatch logic.
#[derive(Debug, Clone)]
pub struct Upstreams {
    policy: Arc<Policy>,
    state: Arc<RouterState>,
    clients: BTreeMap<String, TierClient>,
    retry: RetryPolicy,
}

impl Upstreams {
    /// Builds clients for the policy's remote tiers whose keys are set (keys are read once,
    /// here, through the state's key source).
    pub fn new(policy: Arc<Policy>, state: Arc<RouterState>) -> Result<Self, UpstreamError> {
        let mut clients = BTreeMap::new();
        for t in policy.tiers().iter().filter(|t| t.is_remote()) {
            let key = match &t.api_key_env {
                Some(var) => match ApiKey::from_env(var, state.env()) {
                    Some(k) => Some(k),
                    None => continue,
                },
                None => None,
            };
            clients.insert(t.name.clone(), TierClient::new(t, key)?);
        }
        Ok(Upstreams {
            policy,
            state,
            clients,
            retry: RetryPolicy::default(),
        })
    }

    /// Replaces the retry timing (tests use short delays).
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Serves `req` along `decision`'s tier and fallbacks. `api_key_id` is charged for spend.
    pub async fn dispatch(
        &self,
        decision: &Decision,
        req: &UpstreamRequest,
        api_key_id: Option<&str>,
    ) -> Dispatch {
        if let Some(r) = &decision.refusal {
            return Dispatch::Refused(r.clone());
        }
        let mut report = DispatchReport::default();
        let chain: Vec<&String> = decision
            .tier
            .iter()
            .chain(decision.fallbacks.iter())
            .collect();
        let mut last: Option<UpstreamError> = None;
        for name in chain {
            let Some(tier) = self.policy.tier(name) else {
                continue;
            };
            if !tier.is_remote() {
                return Dispatch::Local {
                    tier: tier.name.clone(),
                    report,
                };
            }
            let Some(client) = self.clients.get(&tier.name) else {
                let e = UpstreamError::Disabled {
                    tier: tier.name.clone(),
                    var: tier.api_key_env.clone().unwrap_or_default(),
                };
                report.errors.push(e.to_string());
                report.abandoned.push(tier.name.clone());
                last = Some(e);
                continue;
            };
            if !self
                .state
                .breaker_try_acquire(&tier.name, tier.breaker_config())
            {
                let e = UpstreamError::BreakerOpen {
                    tier: tier.name.clone(),
                };
                report.errors.push(e.to_string());
                report.abandoned.push(tier.name.clone());
                last = Some(e);
                continue;
            }
            match self.try_tier(client, req, api_key_id, &mut report).await {
                Ok(body) => {
                    if let UpstreamBody::Json { cost_usd, .. } = &body {
                        self.state.record_spend(&tier.name, api_key_id, *cost_usd);
                        self.state.record_success(&tier.name);
                    }
                    return Dispatch::Remote {
                        tier: tier.name.clone(),
                        body,
                        report,
                    };
                }
                Err(e) => {
                    if e.is_client_error() {
                        // The tier worked; the request was bad.
                        self.state.record_success(&tier.name);
                        return Dispatch::Failed { error: e, report };
                    }
                    self.state.record_failure(&tier.name, tier.breaker_config());
                    report.abandoned.push(tier.name.clone());
                    last = Some(e);
                }
            }
        }
        // Decisions always end their chain on a local tier, so this is reached only for a
        // hand-built decision whose remote tiers all failed.
        match last {
            Some(error) => Dispatch::Failed { error, report },
            None => Dispatch::Local {
                tier: self.policy.local_tier().name.clone(),
                report,
            },
        }
    }

    async fn try_tier(
        &self,
        client: &TierClient,
        req: &UpstreamRequest,
        api_key_id: Option<&str>,
        report: &mut DispatchReport,
    ) -> Result<UpstreamBody, UpstreamError> {
        let max_retries = client.tier().max_retries;
        let mut retry = 0u32;
        loop {
            let acct = Accounting {
                state: self.state.clone(),
                api_key_id: api_key_id.map(str::to_string),
            };
            match client.attempt(req, Some(acct)).await {
                Ok(b) => return Ok(b),
                Err(e) => {
                    report.errors.push(e.to_string());
                    if !e.retryable() || retry >= max_retries {
                        return Err(e);
                    }
                    let retry_after = match &e {
                        UpstreamError::Status { retry_after_ms, .. } => *retry_after_ms,
                        _ => None,
                    };
                    if retry_after.is_some_and(|ms| ms > self.retry.max_retry_after_ms) {
                        return Err(e);
                    }
                    let delay = self.retry.delay_ms(retry, retry_after);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    retry += 1;
                    report.retries += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(parse_retry_after(&h, 0), Some(7_000));
        // 1994-11-06T08:49:37Z = 784111777 s
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(parse_retry_after(&h, 784_111_770_000), Some(7_000));
        assert_eq!(
            parse_retry_after(&h, 784_111_790_000),
            Some(0),
            "a past date means now"
        );
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(parse_retry_after(&h, 0), Some(250));
        let mut bad = HeaderMap::new();
        bad.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&bad, 0), None);
    }

    #[test]
    fn backoff_is_bounded_jittered_and_respects_retry_after() {
        let p = RetryPolicy {
            base_ms: 100,
            max_backoff_ms: 1_000,
            max_retry_after_ms: 5_000,
        };
        for retry in 0..10 {
            let exp = (100u64 << retry).min(1_000);
            let d = p.delay_ms(retry, None);
            assert!(d >= exp / 2 && d <= exp, "retry {retry}: {d}");
        }
        assert_eq!(p.delay_ms(0, Some(3_000)), 3_000);
        assert!(
            p.delay_ms(40, None) <= 1_000,
            "no overflow on large retry counts"
        );
    }

    #[test]
    fn error_classes() {
        let s = |status| UpstreamError::Status {
            tier: "t".into(),
            status,
            message: String::new(),
            retry_after_ms: None,
        };
        assert!(s(429).retryable() && s(503).retryable() && s(529).retryable());
        assert!(!s(401).retryable() && !s(400).retryable());
        assert!(s(400).is_client_error() && s(400).http_status() == 400);
        assert_eq!(s(401).http_status(), 502);
        let stream = UpstreamError::Stream {
            tier: "t".into(),
            message: "x".into(),
        };
        assert!(!stream.retryable());
    }
}
