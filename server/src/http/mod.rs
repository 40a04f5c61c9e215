//! The HTTP server: OpenAI- and Anthropic-compatible endpoints over the local engine, with
//! validation, auth, SSE streaming, Prometheus metrics and routing headers.
//!
//! Layout: [`openai`] and [`anthropic`] parse their wire formats into a
//! [`route::NormalizedRequest`]; [`routing`] asks the request router (`crates/router`) where it
//! goes and serves remote tiers; [`local`] serves it on the engine. [`error`] holds the one
//! error enum and its two shapes; [`params`] the shared body parsing and range checks;
//! [`metrics`] the registry.
//!
//! Layers, outermost first: request log + request metrics (method, path, status, latency; never
//! headers, so never a key), routing headers on every response, API-key check on `/v1/*` and
//! vLLM's `/tokenize` and `/detokenize` ([`tokenize`]), body size limit.

pub mod anthropic;
pub mod cascade;
pub mod error;
pub mod local;
pub mod metrics;
pub mod openai;
pub mod params;
pub mod response_store;
pub mod responses;
pub mod route;
pub mod routing;
pub mod tokenize;
pub mod tools;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use switchyard_engine::chat::ChatTemplate;
use switchyard_engine::engine::EngineHandle;
use switchyard_engine::tokenizer::Tokenizer;

use error::ApiError;
use route::{RouteHeaders, TIER_HEADER};

/// Model names every server answers to besides its served id.
pub const MODEL_ALIASES: &[&str] = &["local", "auto"];

/// Everything the handlers share.
pub struct AppState {
    /// The local engine.
    pub engine: EngineHandle,
    /// Its tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The model's chat template.
    pub template: ChatTemplate,
    /// The template for requests with tools when `template` cannot render them
    /// ([`ChatTemplate::tools_fallback`]).
    pub tools_template: Option<ChatTemplate>,
    /// The id `/v1/models` lists and responses name.
    pub model_id: String,
    /// Further names requests may use for the served model (`--served-model-name A B ...`).
    pub other_names: Vec<String>,
    /// The model folder.
    pub model_dir: PathBuf,
    /// The API key `/v1/*` requires, if any.
    pub api_key: Option<String>,
    /// Prometheus metrics.
    pub metrics: metrics::Metrics,
    /// The request router: policy, state, upstream clients, scorer, telemetry.
    pub routing: routing::Routing,
    /// Unix time the server started (`created` of the model card).
    pub created: u64,
    /// `system_fingerprint`: the build and model.
    pub fingerprint: String,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Cap on `max_tokens` when an OpenAI request gives none.
    pub default_max_tokens: usize,
    /// The model's sampling defaults (`--generation-config`), for fields a request leaves
    /// unset.
    pub generation_defaults: switchyard_engine::generation_config::GenerationDefaults,
    /// Stored Responses API responses (`previous_response_id`, `GET /v1/responses/{id}`).
    pub responses: response_store::ResponseStore,
    /// The tool-call format `--tool-call-parser` forces; `None` reads it off the template.
    pub tool_call_format: Option<switchyard_engine::tool_calls::ToolCallFormat>,
    /// Log one line per request (`--disable-log-requests` turns it off).
    pub log_requests: bool,
    /// Streams end with a usage chunk even unasked (`--enable-force-include-usage`).
    pub force_include_usage: bool,
}

impl AppState {
    /// Whether `model` is one of the served model's names (not `local`/`auto` or a tier).
    pub fn names_served_model(&self, model: &str) -> bool {
        model == self.model_id || self.other_names.iter().any(|n| n == model)
    }

    /// Ok if `model` names this server's model (its id, `local` or `auto`), a router tier, or
    /// a remote tier's upstream model.
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if self.names_served_model(model)
            || MODEL_ALIASES.contains(&model)
            || self.routing.accepts_model(model)
        {
            Ok(())
        } else {
            Err(ApiError::ModelNotFound {
                model: model.to_string(),
                served: self.model_id.clone(),
            })
        }
    }
}

/// The application: every route and layer.
pub fn app(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{id}", get(openai::get_model))
        .route("/v1/responses", post(responses::responses))
        .route(
            "/v1/responses/{id}",
            get(responses::get_response).delete(responses::delete_response),
        )
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key))
        .layer(DefaultBodyLimit::max(state.max_body_bytes));
    Router::new()
        .route("/health", get(health))
        // vLLM's version endpoint and SageMaker's liveness probe.
        .route("/version", get(version))
        .route("/ping", get(health).post(health))
        .route("/metrics", get(metrics_text))
        .merge(v1)
        .fallback(not_found)
        .layer(middleware::from_fn(routing_headers))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// `GET /health`: 200 while the engine runs.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let m = state.engine.metrics();
    let ld = |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::Relaxed);
    Json(json!({
        "status": "ok",
        "model": state.model_id,
        "running": ld(&m.running),
        "waiting": ld(&m.waiting) + ld(&m.pending),
    }))
    .into_response()
}

/// `GET /version`: this build's version, as vLLM answers it.
async fn version() -> Response {
    Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

/// `GET /metrics`: Prometheus text format.
async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.render(&state.engine) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot render metrics: {e}"),
        )
            .into_response(),
    }
}

/// Unknown paths: 404 in the shape the path's API speaks.
async fn not_found(method: Method, uri: Uri) -> Response {
    error::for_path(
        uri.path(),
        ApiError::NotFound {
            method: method.to_string(),
            path: uri.path().to_string(),
        },
    )
}

/// The key a request carries: `Authorization: Bearer <key>` or `x-api-key: <key>`.
fn presented_key(h: &HeaderMap) -> Option<&str> {
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if let Some(k) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return Some(k.trim());
        }
    }
    h.get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Compares keys in time independent of where they differ.
fn keys_equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as usize;
    }
    diff == 0
}

/// Requires the API key on `/v1/*` (and `/tokenize`, `/detokenize`) when one is configured.
async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = state.api_key.as_deref() else {
        return next.run(req).await;
    };
    match presented_key(req.headers()) {
        Some(k) if keys_equal(k, key) => next.run(req).await,
        Some(_) => error::for_path(req.uri().path(), ApiError::InvalidApiKey),
        None => error::for_path(req.uri().path(), ApiError::MissingApiKey),
    }
}

/// Every response carries the routing headers; handlers that routed set their decision's, the
/// rest (health, metrics, refusals before routing) say the local tier answered.
async fn routing_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    if !resp.headers().contains_key(TIER_HEADER) {
        RouteHeaders::local("answered by the server before routing")
            .write_headers(resp.headers_mut());
    }
    resp
}

/// Longest `x-request-id` a client may choose; a longer (or non-printable) one is replaced.
const MAX_REQUEST_ID: usize = 128;

/// The request's id: the client's `x-request-id` when it is 1 to [`MAX_REQUEST_ID`] printable
/// ASCII characters, else a fresh `req_…` id.
fn request_id(h: &HeaderMap) -> String {
    h.get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID)
        .filter(|v| v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| new_id("req_"))
}

/// Logs each request (method, path, status, latency, id) and counts it by endpoint and status;
/// every response carries the request's `x-request-id` (the client's, or a new one), as
/// OpenAI's API and vLLM's `--enable-request-id-headers` send it.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let id = request_id(req.headers());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let mut resp = next.run(req).await;
    if let Ok(v) = header::HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status();
    let secs = t0.elapsed().as_secs_f64();
    state
        .metrics
        .requests
        .with_label_values(&[endpoint.as_str(), status.as_str()])
        .inc();
    state
        .metrics
        .request_latency
        .with_label_values(&[endpoint.as_str()])
        .observe(secs);
    if state.log_requests {
        tracing::info!(
            target: "switchyard::http",
            %method,
            path = %path,
            status = status.as_u16(),
            latency_ms = format!("{:.1}", secs * 1e3),
            request_id = %id,
            "request"
        );
    }
    resp
}

/// `prefix` + 24 random hex digits.
pub fn new_id(prefix: &str) -> String {
    let r: u128 = rand::random();
    format!("{prefix}{:024x}", r & ((1u128 << 96) - 1))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `fp_` + a hash of the server version and model id (changes when either does).
pub fn fingerprint(model_id: &str, model_dir: &std::path::Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    env!("CARGO_PKG_VERSION").hash(&mut h);
    model_id.hash(&mut h);
    model_dir.hash(&mut h);
    format!("fp_{:010x}", h.finish() & 0xff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        use axum::http::HeaderValue;
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-1"),
        );
        assert_eq!(presented_key(&h), Some("sk-1"));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("sk-2"));
        assert_eq!(presented_key(&h), Some("sk-2"));
        assert!(keys_equal("abc", "abc"));
        assert!(!keys_equal("abc", "abd"));
        assert!(!keys_equal("abc", "abcd"));
        assert!(!keys_equal("", "a"));
    }

    #[test]
    fn ids() {
        let id = new_id("chatcmpl-");
        assert_eq!(id.len(), "chatcmpl-".len() + 24);
    }
}
