//! Router intelligence for Switchyard: what a prompt is about and how hard it is.
//!
//! - [`embed`]: all-MiniLM-L6-v2 sentence embeddings in candle (mean-pooled, unit length).
//! - [`exemplars`]: a nearest-exemplar category classifier over labelled prompts
//!   (`models/router/exemplars.jsonl`), each category mapped to a router action.
//! - [`difficulty`]: P(the local tier fails and the frontier tier succeeds), fitted on the
//!   RouteLLM train split (kNN over embeddings blended with a logistic head).
//! - [`scorer`]: [`RouterScorer`], the `switchyard_router::SemanticScorer` that plugs both into
//!   `switchyard_router::decide`.
//! - [`routellm`]: the RouteLLM data, its fixed split, and the APGR metric with baselines;
//!   [`route_eval`] runs it for `switchyard route-eval --routellm` (summary JSON, SVG plot).
//! - [`replay`]: `switchyard route-eval --replay`'s task file, answer checks, per-tier totals
//!   and the difficulty-threshold sweep of `--calibrate`;
//!   [`cascade_calibration`] sets the cascade's confidence thresholds from the same replay.
//! - [`cache`]: an on-disk embedding cache keyed by `sha256(text)`.
//!
//! Words: the MoE *gate* picks experts inside the model; the request *router* picks a tier.
#![deny(missing_docs)]

pub mod bert;
pub mod cache;
pub mod cascade_calibration;
pub mod difficulty;
pub mod embed;
pub mod error;
pub mod exemplars;
mod linalg;
pub mod replay;
pub mod route_eval;
pub mod routellm;
pub mod scorer;

pub use difficulty::DifficultyModel;
pub use embed::{cosine, dot, locate_minilm, Embedder, MAX_TOKENS, MINILM_HUB_ID};
pub use error::{ClassifierError, Result};
pub use exemplars::{Exemplar, ExemplarIndex};
pub use scorer::{default_router_dir, DifficultyScale, RouterScorer};
