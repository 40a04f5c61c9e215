//! Request routing for Switchyard: which tier serves a request, and why.
//!
//! The router reads a request in a provider-neutral form ([`RouteRequest`], built from an OpenAI
//! chat-completions or Anthropic Messages body), runs content [detectors](detect) (secrets,
//! personal data, keep-it-local asks, prompt injection), applies the ordered rules of a
//! [`Policy`] (TOML, merged over the built-in `models/router/default.toml`), and returns a
//! [`Decision`] `{action, tier, reasons, scores}` with `action` one of `local`, `escalate`,
//! `local-only` or `block`.
//!
//! State that changes between requests (spend against budgets, circuit breakers, the local
//! queue depth) lives in a shared [`RouterState`] the server updates as requests finish.
//! A policy may also [cascade](cascade): serve locally, check the answer, escalate it if it
//! fails.
//!
//! ```
//! use switchyard_router::{explain, Action, Policy, RouteRequest, RouterState};
//!
//! let policy = Policy::default_policy();
//! let state = RouterState::default();
//! let req = RouteRequest::from_prompt("Translate 'good morning' into Spanish.");
//! let d = explain(&policy, &req, &state);
//! assert_eq!(d.action, Action::Local);
//! let json = serde_json::to_value(&d).unwrap();
//! assert!(json.get("reasons").is_some() && json.get("fallbacks").is_none());
//! ```
//!
//! Words: the MoE *gate* picks experts inside the model; this crate is the request *router*.
#![deny(missing_docs)]

pub mod breaker;
pub mod budget;
pub mod cascade;
pub mod cost;
pub mod decide;
pub mod detect;
pub mod eval;
pub mod policy;
pub mod request;
pub mod secret;
pub mod state;
pub mod telemetry;
pub mod upstream;

pub use breaker::{BreakerConfig, BreakerPhase, CircuitBreaker};
pub use budget::{BudgetLedger, Period};
pub use cascade::{CascadeConfig, JsonExpectation, Verdict};
pub use cost::{Prices, Usage};
pub use decide::{
    decide, explain, header_value, heuristic_difficulty, Decision, Refusal, ScorerError,
    SemanticScorer, SemanticScores,
};
pub use detect::{Detections, DetectorConfig, Detectors, Finding, Signal};
pub use policy::{Action, Policy, PolicyError, PolicySpec, TierConfig, TierKind};
pub use request::{
    Message, RequestError, Role, RouteRequest, WireFormat, CASCADE_HEADER, ROUTE_HEADER,
};
pub use secret::ApiKey;
pub use state::{Clock, EnvSource, ManualClock, RouterState, SystemClock};
pub use telemetry::{
    Attempt, CascadeOutcome, JsonlAppender, Outcome, TelemetryError, TelemetryRecord,
};
