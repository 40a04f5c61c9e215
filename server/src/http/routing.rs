//! The request router wired into the server: every inference request is decided by
//! [`switchyard_router::decide`] and served where the decision says.
//!
//! Per request, in order:
//! 1. the body is parsed and normalised for the local engine; errors are answered at once (an
//!    *unsupported* feature such as tools or images only fails if the request ends up local);
//! 2. the raw JSON becomes a `RouteRequest` (credential headers left out), the router state
//!    learns the local queue depth (engine waiting + pending + running), and `decide` runs on a
//!    blocking thread (detectors and a semantic scorer are CPU work);
//! 3. the decision is carried out:
//!    - a refusal (`block` → 400 `blocked_by_policy`, spent budget → 429) answers in the
//!      endpoint's error shape;
//!    - a local tier (`local`, `local-only`, or an escalation whose remote tiers are disabled)
//!      goes to the engine; `local-only` never reaches a remote tier, whatever was asked;
//!    - a remote tier goes to [`Upstreams::dispatch`], which retries, walks the fallback chain
//!      and translates formats; JSON and SSE come back in the client's wire format, and when
//!      the chain ends on the local tier the engine serves it, with the fallback in the reasons.
//!
//! Every routed response carries the routing headers ([`RouteHeaders`]), set before a stream's
//! body starts; a remote stream's cost is not known then, so its header is the estimate for the
//! prompt alone (prompt tokens × input price) and the real cost goes to telemetry.
//!
//! Every request leaves one [`TelemetryRecord`] (a JSON line with `--telemetry`) and updates the
//! router metrics. A [`RequestRecord`] travels with the request and is written exactly once:
//! explicitly when the request ends, or on drop (the client went away: `cancelled`).
//!
//! `model` picks the tier as DESIGN.md says (`auto`, `local`, a tier name, or header
//! `x-switchyard-route`); the served model's own id counts as `local`. `/v1/completions` is
//! routed too (blocks and local-only apply), but always served locally: remote tiers speak chat.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::Value;
use switchyard_router::cascade::Checks;
use switchyard_router::telemetry::new_request_id;
use switchyard_router::upstream::{
    Dispatch, DispatchReport, StreamSummary, UpstreamBody, UpstreamError, UpstreamRequest,
    UpstreamStream, Upstreams,
};
use switchyard_router::{
    decide, Action, ApiKey, Attempt, CascadeOutcome, Decision, JsonExpectation, JsonlAppender,
    Message, Outcome, Policy, Role, RouteRequest, RouterState, SemanticScorer, TelemetryRecord,
    TierConfig, Usage, WireFormat, ROUTE_HEADER,
};

use super::error::{AnthropicError, ApiError, OpenAiError};
use super::local;
use super::params;
use super::route::{Api, NormalizedRequest, RouteHeaders};
use super::AppState;

/// Request headers never shown to the router (its rules may match headers, and decisions are
/// logged): credentials stay out of routing entirely.
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "cookie",
];

/// The router as the server holds it.
pub struct Routing {
    /// The loaded policy (`--router`, or the built-in default).
    pub policy: Arc<Policy>,
    /// Spend, breakers, queue depth.
    pub state: Arc<RouterState>,
    /// Clients for the enabled remote tiers.
    pub upstreams: Upstreams,
    /// The semantic classifier, when one is plugged in (the classifier crate); `None` decides
    /// with rules and the heuristic difficulty.
    pub scorer: Option<Arc<dyn SemanticScorer>>,
    /// `--telemetry FILE.jsonl`.
    pub telemetry: Option<JsonlAppender>,
}

impl Routing {
    /// The router over `policy`, reading keys through `state`'s key source.
    pub fn new(
        policy: Arc<Policy>,
        state: Arc<RouterState>,
        telemetry: Option<JsonlAppender>,
    ) -> Result<Self, UpstreamError> {
        let upstreams = Upstreams::new(policy.clone(), state.clone())?;
        Ok(Self {
            policy,
            state,
            upstreams,
            scorer: None,
            telemetry,
        })
    }

    /// One phrase per remote tier: enabled, or disabled and why (the key variable's name,
    /// never its value).
    pub fn tier_summary(&self) -> Vec<String> {
        self.policy
            .tiers()
            .iter()
            .filter(|t| t.is_remote())
            .map(|t| {
                let what = format!(
                    "`{}` ({}, model {})",
                    t.name,
                    match t.kind {
                        switchyard_router::TierKind::Anthropic => "anthropic",
                        _ => "openai",
                    },
                    t.model.as_deref().unwrap_or("?")
                );
                match &t.api_key_env {
                    Some(var) if ApiKey::from_env(var, self.state.env()).is_none() => {
                        format!("{what} disabled: {var} is unset")
                    }
                    Some(var) => format!("{what} enabled (key from {var})"),
                    None => format!("{what} enabled (no key needed)"),
                }
            })
            .collect()
    }

    /// Whether `model` names a tier, or a remote tier's upstream model.
    pub fn accepts_model(&self, model: &str) -> bool {
        self.policy.tier(model).is_some()
            || self
                .policy
                .tiers()
                .iter()
                .any(|t| t.is_remote() && t.model.as_deref() == Some(model))
    }

    fn remote_tier(&self, name: &str) -> Option<&TierConfig> {
        self.policy.tier(name).filter(|t| t.is_remote())
    }
}

/// One request's telemetry record and router metrics, written exactly once: by
/// [`RequestRecord::finish`], or on drop as `cancelled`.
pub struct RequestRecord {
    app: Arc<AppState>,
    rec: TelemetryRecord,
    arrived: Instant,
    attempt_started: Option<Instant>,
    written: bool,
}

impl RequestRecord {
    fn new(app: Arc<AppState>, endpoint: &str, decision: &Decision, arrived: Instant) -> Self {
        let now = app.routing.state.now_ms();
        let at = now.saturating_sub(arrived.elapsed().as_millis() as u64);
        let rec = TelemetryRecord::from_decision(new_request_id(now), at, endpoint, decision);
        Self {
            app,
            rec,
            arrived,
            attempt_started: None,
            written: false,
        }
    }

    pub(super) fn served_by(&mut self, tier: Option<&str>) {
        self.rec.tier = tier.map(str::to_string);
    }

    fn fell_back_from(&mut self, tier: &str) {
        if !self.rec.fallbacks.iter().any(|t| t == tier) {
            self.rec.fallbacks.push(tier.to_string());
        }
    }

    pub(super) fn report(&mut self, report: &DispatchReport) {
        self.rec.retries += report.retries;
        for t in &report.abandoned {
            self.fell_back_from(t);
        }
    }

    /// Token counts of a local generation (cost 0).
    pub fn set_local_usage(&mut self, u: local::Usage) {
        self.rec.set_usage(&router_usage(u), 0.0);
    }

    fn set_remote_usage(&mut self, u: &Usage, cost_usd: f64) {
        if self.rec.cascade.is_some() {
            // The cascade's remote attempt (streamed): one more attempt, totals summed.
            let tier = self.rec.tier.clone().unwrap_or_default();
            let ms = self
                .attempt_started
                .map_or(0, |t| t.elapsed().as_millis() as u64);
            self.rec.add_attempt(Attempt::new(&tier, ms, u, cost_usd));
        } else {
            self.rec.set_usage(u, cost_usd);
        }
    }

    /// Records a cascade attempt and what the cascade did so far.
    pub fn cascade_attempt(&mut self, a: Attempt, outcome: CascadeOutcome) {
        self.rec.cascade = Some(outcome);
        self.rec.add_attempt(a);
    }

    /// Marks the start of the attempt a later [`Self::set_remote_usage`] completes.
    pub(super) fn start_attempt(&mut self) {
        self.attempt_started = Some(Instant::now());
    }

    /// Time from arrival to the first token (kept from the first call).
    pub fn set_ttft(&mut self, d: Duration) {
        if self.rec.ttft_ms.is_none() {
            self.rec.ttft_ms = Some(d.as_millis() as u64);
        }
    }

    /// Writes the record with how the request ended.
    pub fn finish(mut self, outcome: Outcome, error: Option<String>) {
        self.write(outcome, error);
    }

    fn write(&mut self, outcome: Outcome, error: Option<String>) {
        if self.written {
            return;
        }
        self.written = true;
        self.rec.outcome = outcome;
        self.rec.error = error;
        self.rec.latency_ms = self.arrived.elapsed().as_millis() as u64;
        let m = &self.app.metrics;
        let tier = self.rec.tier.as_deref().unwrap_or("none");
        m.router_requests
            .with_label_values(&[self.rec.action.as_str(), tier])
            .inc();
        if self.rec.cost_usd > 0.0 && self.rec.cost_usd.is_finite() {
            m.router_cost_usd
                .with_label_values(&[tier])
                .inc_by(self.rec.cost_usd);
        }
        for from in &self.rec.fallbacks {
            m.router_fallbacks
                .with_label_values(&[from.as_str(), tier])
                .inc();
        }
        if let Some(c) = self.rec.cascade {
            m.router_cascade.with_label_values(&[c.as_str()]).inc();
        }
        if self.rec.retries > 0 {
            m.router_retries
                .with_label_values(&[tier])
                .inc_by(u64::from(self.rec.retries));
        }
        append(&self.app, &self.rec);
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        // Nobody finished it: the handler future or the response body was dropped because the
        // client went away.
        self.write(Outcome::Cancelled, None);
    }
}

fn append(app: &AppState, rec: &TelemetryRecord) {
    if let Some(t) = &app.routing.telemetry {
        if let Err(e) = t.append(rec) {
            tracing::warn!(target: "switchyard::router", error = %e, "telemetry record lost");
        }
    }
}

/// A local generation's token counts in the router's terms.
pub(super) fn router_usage(u: local::Usage) -> Usage {
    let cached = u.cached_tokens as u64;
    Usage {
        input_tokens: (u.prompt_tokens as u64).saturating_sub(cached),
        cached_input_tokens: cached,
        cache_write_tokens: 0,
        output_tokens: u.completion_tokens as u64,
    }
}

/// The error response in the shape `api` speaks.
pub fn error_response(api: Api, e: ApiError) -> Response {
    match api {
        Api::AnthropicMessages => AnthropicError(e).into_response(),
        _ => OpenAiError(e).into_response(),
    }
}

/// What [`route`] decided.
pub enum Routed {
    /// Answered already (remote response, refusal or error), headers set.
    Done(Response),
    /// The local engine serves it.
    Local(Box<LocalServe>),
}

/// A request for the engine: write `headers` on its response and finish `record` (hand it to
/// the engine's tracker, or finish it on an error).
pub struct LocalServe {
    /// The request for the engine.
    pub req: NormalizedRequest,
    /// The routing headers.
    pub headers: RouteHeaders,
    /// The request's record.
    pub record: RequestRecord,
    /// Set when the local answer is to be checked and maybe escalated
    /// ([`super::cascade::serve`]).
    pub cascade: Option<CascadePlan>,
}

/// How to escalate a locally served request whose answer fails the cascade's checks.
pub struct CascadePlan {
    /// The checks, with the request's JSON expectation.
    pub checks: Checks,
    /// The escalation: action `escalate`, the cascade tier, then its remote fallbacks (never
    /// the local tier: the local answer exists already).
    pub decision: Decision,
    /// The request as sent, for the remote tier.
    pub upstream: UpstreamRequest,
    /// The caller's API key id (budgets).
    pub api_key_id: Option<String>,
    /// The router's estimate of the prompt's tokens (a remote stream's cost header).
    pub estimated_prompt_tokens: u64,
}

/// How an endpoint serves a request on the engine and renders finished local choices.
pub trait LocalEndpoint {
    /// Serves `req` on the engine (JSON or SSE); the engine's tracker takes `record`.
    fn serve<'a>(
        state: &'a Arc<AppState>,
        req: NormalizedRequest,
        arrived: Instant,
        record: &'a mut Option<RequestRecord>,
    ) -> impl std::future::Future<Output = Result<Response, ApiError>> + Send + 'a;

    /// The response for choices that already finished (the cascade's local answer): JSON, or
    /// the SSE events of a held-back stream.
    fn render(
        state: &Arc<AppState>,
        req: &NormalizedRequest,
        outs: Vec<local::ChoiceOutput>,
        usage: local::Usage,
    ) -> Response;
}

/// The response to a routed request: as decided remotely, or served by `E` on the engine
/// (through the cascade when the decision asks for it).
pub async fn respond<E: LocalEndpoint>(
    state: &Arc<AppState>,
    routed: Routed,
    arrived: Instant,
) -> Response {
    let plan = match routed {
        Routed::Done(resp) => return resp,
        Routed::Local(plan) => *plan,
    };
    let LocalServe {
        req,
        headers,
        record,
        cascade,
    } = plan;
    if let Some(c) = cascade {
        let st = state.clone();
        return super::cascade::serve(state, req, headers, record, c, arrived, move |r, o, u| {
            E::render(&st, r, o, u)
        })
        .await;
    }
    let api = req.api;
    let mut record = Some(record);
    let result = E::serve(state, req, arrived, &mut record).await;
    finish_local(api, result, &headers, record)
}

/// Finishes a locally served request: the error shape on failure, the routing headers, and the
/// record if the engine's tracker did not take it.
pub fn finish_local(
    api: Api,
    result: Result<Response, ApiError>,
    headers: &RouteHeaders,
    record: Option<RequestRecord>,
) -> Response {
    let mut resp = match result {
        Ok(r) => {
            if let Some(r) = record {
                r.finish(Outcome::Ok, None);
            }
            r
        }
        Err(e) => {
            if let Some(r) = record {
                r.finish(Outcome::Error, Some(e.to_string()));
            }
            error_response(api, e)
        }
    };
    headers.write_headers(resp.headers_mut());
    resp
}

/// A request rejected before routing: the error in the endpoint's shape and a record saying so
/// (no decision was made, so no router metrics).
fn rejected(app: &Arc<AppState>, api: Api, arrived: Instant, e: ApiError) -> Routed {
    let d = Decision {
        action: Action::Local,
        tier: None,
        reasons: vec!["rejected before routing".into()],
        scores: Default::default(),
        fallbacks: Vec::new(),
        refusal: None,
        cascade: None,
    };
    let mut r = RequestRecord::new(app.clone(), api.endpoint(), &d, arrived);
    r.rec.outcome = Outcome::Error;
    r.rec.error = Some(e.to_string());
    r.rec.latency_ms = arrived.elapsed().as_millis() as u64;
    r.written = true;
    append(app, &r.rec);
    Routed::Done(error_response(api, e))
}

/// A stable, non-reversible id for an API key (`key-` + 12 hex digits of its SHA-256), used
/// for per-key budgets and telemetry.
fn api_key_id(key: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(key.as_bytes());
    let hex: String = d.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("key-{hex}")
}

/// Requests waiting for the local engine (queued, not yet running). Running sequences are not
/// counted: a busy engine that keeps up is not overloaded, and the policy's overflow limit is
/// about how long a new request would wait.
fn local_queue_depth(app: &AppState) -> usize {
    use std::sync::atomic::Ordering::Relaxed;
    let m = app.engine.metrics();
    m.waiting.load(Relaxed) + m.pending.load(Relaxed)
}

/// The router's view of a completions request: its text prompts as one user message.
fn completions_route_request(req: &NormalizedRequest) -> RouteRequest {
    RouteRequest {
        endpoint: Api::OpenAiCompletions.endpoint().into(),
        format: WireFormat::OpenAi,
        model: Some(req.model.clone()),
        messages: vec![Message {
            role: Role::User,
            text: req.text(),
        }],
        max_tokens: req.max_tokens.map(|m| m as u64),
        stream: req.stream,
        ..RouteRequest::default()
    }
}

/// Decides where a request goes and serves it remotely, or hands it back for the engine.
///
/// `body` is the request JSON as sent; `local` its normalised form (or why it cannot be served
/// locally). Cancel-safe: dropping the future drops any upstream call, and the record is written
/// as cancelled.
pub async fn route(
    app: &Arc<AppState>,
    api: Api,
    http_headers: &HeaderMap,
    body: Value,
    local: Result<NormalizedRequest, ApiError>,
    arrived: Instant,
) -> Routed {
    // vLLM refuses a priority it will not honour, whichever tier would serve the request.
    let policy = app.engine.info().scheduler.policy;
    let local = local.and_then(|r| {
        params::check_priority(r.controls.priority, policy)?;
        Ok(r)
    });
    // A request the engine cannot read fails now, unless only an unsupported feature (tools,
    // images) is at fault and a remote tier might serve it.
    let local = match local {
        Err(e) if api == Api::OpenAiCompletions || !matches!(e, ApiError::Unsupported { .. }) => {
            return rejected(app, api, arrived, e)
        }
        other => other,
    };
    let model = match &local {
        Ok(r) => r.model.clone(),
        Err(_) => body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    };
    if let Err(e) = app.check_model(&model) {
        return rejected(app, api, arrived, e);
    }
    let rreq = match (api, &local) {
        (Api::OpenAiChat, _) => RouteRequest::from_openai_chat(&body),
        (Api::AnthropicMessages, _) => RouteRequest::from_anthropic_messages(&body),
        (Api::OpenAiCompletions, Ok(r)) => Ok(completions_route_request(r)),
        (Api::OpenAiCompletions, Err(e)) => return rejected(app, api, arrived, e.clone()),
    };
    let mut rreq = match rreq {
        Ok(r) => r.with_endpoint(api.endpoint()),
        Err(e) => {
            return rejected(
                app,
                api,
                arrived,
                ApiError::field("messages", e.to_string()),
            )
        }
    };
    let r = &app.routing;
    if app.names_served_model(&model) && r.policy.tier(&model).is_none() {
        // Naming the served model is asking for it: the local tier, not the router's choice
        // (`auto` is that). The safety floor still applies.
        rreq = rreq.with_model(&r.policy.local_tier().name);
    }
    for (name, value) in http_headers {
        if CREDENTIAL_HEADERS.contains(&name.as_str()) {
            continue;
        }
        if let Ok(v) = value.to_str() {
            rreq = rreq.with_header(name.as_str(), v);
        }
    }
    // Per-key budgets need a stable identity for the caller's key, never the key itself.
    if let Some(k) = super::presented_key(http_headers).filter(|k| !k.is_empty()) {
        rreq = rreq.with_api_key_id(&api_key_id(k));
    }

    r.state.set_local_queue_depth(local_queue_depth(app));
    let (policy, state, scorer) = (r.policy.clone(), r.state.clone(), r.scorer.clone());
    let decided = tokio::task::spawn_blocking(move || {
        let d = decide(&policy, &rreq, &state, scorer.as_deref());
        (d, rreq)
    })
    .await;
    let (decision, rreq) = match decided {
        Ok(x) => x,
        Err(e) => {
            return rejected(
                app,
                api,
                arrived,
                ApiError::Internal(format!("the router failed: {e}")),
            )
        }
    };
    let mut record = RequestRecord::new(app.clone(), api.endpoint(), &decision, arrived);
    let mut headers = RouteHeaders {
        tier: decision.tier.clone().unwrap_or_else(|| "none".into()),
        action: decision.action.as_str().to_string(),
        reasons: decision.reasons.clone(),
        cost_usd: 0.0,
        cascade: None,
    };
    let local_name = r.policy.local_tier().name.clone();
    let wants_remote = decision
        .tier
        .as_deref()
        .is_some_and(|t| r.remote_tier(t).is_some());

    // Completions never leave the machine; only a block refuses them.
    if api == Api::OpenAiCompletions
        && decision.action != Action::Block
        && (wants_remote || decision.refusal.is_some())
    {
        headers.reasons.push(format!(
            "{} is served locally: remote tiers speak chat",
            api.endpoint()
        ));
        return serve_here(api, local, headers, record, &local_name);
    }

    if let Some(f) = &decision.refusal {
        return refuse(api, headers, record, f.status, &f.code, &f.message);
    }

    if !wants_remote {
        let fell_back = decision
            .reasons
            .iter()
            .any(|why| why.starts_with("falling back to"));
        if decision.action == Action::Escalate && fell_back {
            // The escalate tier was skipped (disabled, breaker open, budget) inside `decide`.
            if let Some(t) = intended_remote(&r.policy, &rreq) {
                record.fell_back_from(&t);
            }
        }
        let plan = decision
            .cascade
            .as_deref()
            .and_then(|t| cascade_plan(r, api, t, &local, &body, &rreq, &mut headers));
        let mut routed = serve_here(
            api,
            local,
            headers,
            record,
            decision.tier.as_deref().unwrap_or(&local_name),
        );
        if let Routed::Local(serve) = &mut routed {
            serve.cascade = plan;
        }
        return routed;
    }
    if decision.action == Action::LocalOnly {
        // `decide` never does this; the guarantee does not rest on it.
        headers.reasons.push(format!(
            "local-only content is never sent to a remote tier; serving on `{local_name}`"
        ));
        return serve_here(api, local, headers, record, &local_name);
    }

    let format = match api {
        Api::AnthropicMessages => WireFormat::Anthropic,
        _ => WireFormat::OpenAi,
    };
    let up = UpstreamRequest { body, format };
    let key = rreq.api_key_id.as_deref();
    match r.upstreams.dispatch(&decision, &up, key).await {
        Dispatch::Remote { tier, body, report } => {
            record.served_by(Some(&tier));
            record.report(&report);
            headers.tier = tier.clone();
            if !report.abandoned.is_empty() {
                headers.reasons.push(format!(
                    "{} failed; served by `{tier}` ({})",
                    tier_list(&report.abandoned),
                    report
                        .errors
                        .last()
                        .map(String::as_str)
                        .unwrap_or("no detail")
                ));
            }
            match body {
                UpstreamBody::Json {
                    value,
                    usage,
                    cost_usd,
                } => {
                    record.set_remote_usage(&usage, cost_usd);
                    record.finish(Outcome::Ok, None);
                    headers.cost_usd = cost_usd;
                    let mut resp = Json(value).into_response();
                    headers.write_headers(resp.headers_mut());
                    Routed::Done(resp)
                }
                UpstreamBody::Stream(s) => {
                    headers.cost_usd =
                        prompt_cost_estimate(&r.policy, &tier, rreq.estimated_tokens() as u64);
                    let mut resp = sse_response(remote_sse(api, s, record, arrived));
                    headers.write_headers(resp.headers_mut());
                    Routed::Done(resp)
                }
            }
        }
        Dispatch::Local { tier, report } => {
            record.report(&report);
            headers.reasons.push(format!(
                "{} failed ({}); falling back to `{tier}`",
                tier_list(&report.abandoned),
                report
                    .errors
                    .last()
                    .map(String::as_str)
                    .unwrap_or("no detail")
            ));
            serve_here(api, local, headers, record, &tier)
        }
        Dispatch::Refused(f) => refuse(api, headers, record, f.status, &f.code, &f.message),
        Dispatch::Failed { error, report } => {
            record.report(&report);
            let e = ApiError::Upstream {
                status: error.http_status(),
                message: error.to_string(),
            };
            record.finish(Outcome::Error, Some(e.to_string()));
            let mut resp = error_response(api, e);
            headers.write_headers(resp.headers_mut());
            Routed::Done(resp)
        }
    }
}

/// The cascade for a request `decide` marked for it (escalating to `tier`), unless this
/// request cannot go through it; then a reason says why.
fn cascade_plan(
    r: &Routing,
    api: Api,
    tier: &str,
    local: &Result<NormalizedRequest, ApiError>,
    body: &Value,
    rreq: &RouteRequest,
    headers: &mut RouteHeaders,
) -> Option<CascadePlan> {
    let req = local.as_ref().ok()?;
    let skip = if api == Api::OpenAiCompletions {
        Some("completions are served locally only".to_string())
    } else if req.stream && !r.policy.cascade().buffer_streams {
        Some("streamed requests are not held back (cascade.buffer_streams = false)".into())
    } else if req.n > 1 {
        Some(format!("n = {} choices", req.n))
    } else {
        None
    };
    if let Some(why) = skip {
        headers.reasons.push(format!("cascade skipped: {why}"));
        return None;
    }
    let mut fallbacks = Vec::new();
    for t in r.policy.fallbacks_for(tier) {
        if t.is_remote() && !fallbacks.contains(&t.name) {
            fallbacks.push(t.name.clone());
        }
    }
    Some(CascadePlan {
        checks: r.policy.cascade_checks(&JsonExpectation::from_body(body)),
        decision: Decision {
            action: Action::Escalate,
            tier: Some(tier.to_string()),
            reasons: Vec::new(),
            scores: Default::default(),
            fallbacks,
            refusal: None,
            cascade: None,
        },
        upstream: UpstreamRequest {
            body: body.clone(),
            format: match api {
                Api::AnthropicMessages => WireFormat::Anthropic,
                _ => WireFormat::OpenAi,
            },
        },
        api_key_id: rreq.api_key_id.clone(),
        estimated_prompt_tokens: rreq.estimated_tokens() as u64,
    })
}

/// What `prompt_tokens` of input cost on `tier`: the cost header of a remote stream, whose
/// real cost is only known when it ends.
pub(super) fn prompt_cost_estimate(policy: &Policy, tier: &str, prompt_tokens: u64) -> f64 {
    policy
        .tier(tier)
        .map(|t| {
            Usage {
                input_tokens: prompt_tokens,
                ..Usage::default()
            }
            .cost_usd(&t.prices())
        })
        .unwrap_or(0.0)
}

pub(super) fn tier_list(tiers: &[String]) -> String {
    if tiers.is_empty() {
        return "the remote tier".into();
    }
    let names: Vec<String> = tiers.iter().map(|t| format!("tier `{t}`")).collect();
    names.join(", ")
}

/// The remote tier an escalation meant to use: the one named by header or `model`, else the
/// policy's escalate tier.
fn intended_remote(policy: &Policy, req: &RouteRequest) -> Option<String> {
    let named = req
        .headers
        .get(ROUTE_HEADER)
        .or(req.model.as_ref())
        .map(|v| v.trim())
        .and_then(|v| {
            policy.tier(v).or_else(|| {
                policy
                    .tiers()
                    .iter()
                    .find(|t| t.is_remote() && t.model.as_deref() == Some(v))
            })
        })
        .filter(|t| t.is_remote());
    named
        .or_else(|| policy.escalate_tier())
        .map(|t| t.name.clone())
}

/// Hands the request to the engine as tier `tier`.
fn serve_here(
    api: Api,
    local: Result<NormalizedRequest, ApiError>,
    mut headers: RouteHeaders,
    mut record: RequestRecord,
    tier: &str,
) -> Routed {
    headers.tier = tier.to_string();
    headers.cost_usd = 0.0;
    record.served_by(Some(tier));
    match local {
        Ok(req) => Routed::Local(Box::new(LocalServe {
            req,
            headers,
            record,
            cascade: None,
        })),
        Err(e) => {
            record.finish(Outcome::Error, Some(e.to_string()));
            let mut resp = error_response(api, e);
            headers.write_headers(resp.headers_mut());
            Routed::Done(resp)
        }
    }
}

fn refuse(
    api: Api,
    mut headers: RouteHeaders,
    mut record: RequestRecord,
    status: u16,
    code: &str,
    message: &str,
) -> Routed {
    headers.tier = "none".into();
    headers.cost_usd = 0.0;
    record.served_by(None);
    record.finish(Outcome::Refused, Some(message.to_string()));
    let e = ApiError::Refused {
        status,
        code: code.to_string(),
        message: message.to_string(),
    };
    let mut resp = error_response(api, e);
    headers.write_headers(resp.headers_mut());
    Routed::Done(resp)
}

pub(super) fn sse_response<S>(body: S) -> Response
where
    S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// A remote stream on its way to the client, with the record it completes.
struct RemoteStream {
    api: Api,
    inner: UpstreamStream,
    summary: Arc<Mutex<StreamSummary>>,
    record: Option<RequestRecord>,
    arrived: Instant,
    done: bool,
}

impl RemoteStream {
    fn summary(&self) -> StreamSummary {
        self.summary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn close(&mut self, outcome: Outcome, error: Option<String>) {
        let s = self.summary();
        if let Some(mut r) = self.record.take() {
            r.set_remote_usage(&s.usage, s.cost_usd);
            r.finish(outcome, error.or(s.error));
        }
    }
}

impl Drop for RemoteStream {
    fn drop(&mut self) {
        if self.record.is_some() {
            // The client went away mid-stream; keep what usage is known.
            self.close(Outcome::Cancelled, None);
        }
    }
}

/// The client's SSE bytes from an upstream stream: events pass through as they come (already
/// in the client's format); a failure after output started ends the stream with an error event
/// in that format.
pub(super) fn remote_sse(
    api: Api,
    inner: UpstreamStream,
    record: RequestRecord,
    arrived: Instant,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let summary = inner.summary_handle();
    let st = RemoteStream {
        api,
        inner,
        summary,
        record: Some(record),
        arrived,
        done: false,
    };
    stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        match st.inner.next().await {
            Some(Ok(ev)) => {
                if let Some(r) = st.record.as_mut() {
                    r.set_ttft(st.arrived.elapsed());
                }
                Some((Ok(Bytes::from(ev.to_wire())), st))
            }
            Some(Err(e)) => {
                st.done = true;
                let msg = e.to_string();
                st.close(Outcome::StreamError, Some(msg.clone()));
                let err = ApiError::Upstream {
                    status: 502,
                    message: msg,
                };
                let bytes = match st.api {
                    Api::AnthropicMessages => {
                        format!("event: error\ndata: {}\n\n", err.anthropic_body())
                    }
                    _ => format!("data: {}\n\ndata: [DONE]\n\n", err.openai_body()),
                };
                Some((Ok(Bytes::from(bytes)), st))
            }
            None => {
                st.done = true;
                let s = st.summary();
                let outcome = if s.error.is_some() {
                    Outcome::StreamError
                } else {
                    Outcome::Ok
                };
                st.close(outcome, None);
                None
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_key_ids_are_stable_distinct_and_hide_the_key() {
        let a = super::api_key_id("sk-secret-one");
        assert_eq!(a, super::api_key_id("sk-secret-one"));
        assert_ne!(a, super::api_key_id("sk-secret-two"));
        assert!(
            a.starts_with("key-") && a.len() == 16 && !a.contains("secret"),
            "{a}"
        );
    }
}
