//! One telemetry record per request, appended as a JSON line.
//!
//! The record holds what routing evaluation and cost reports need (decision, latency, tokens,
//! cost, retries, fallbacks, outcome) and nothing that could carry a credential: no headers, no
//! prompt text, and reasons come from the decision, whose detector details are redacted.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::budget::rfc3339_utc;
use crate::cascade::Verdict;
use crate::cost::Usage;
use crate::decide::Decision;
use crate::policy::Action;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Served completely.
    Ok,
    /// Refused by policy (blocked or budget).
    Refused,
    /// Failed before any output reached the client.
    Error,
    /// Failed after streaming had started; the client saw a stream error.
    StreamError,
    /// The client went away.
    Cancelled,
}

/// One request's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRecord {
    /// Request id.
    pub id: String,
    /// RFC 3339 UTC time the request arrived.
    pub time: String,
    /// HTTP path.
    pub endpoint: String,
    /// The router's action.
    pub action: Action,
    /// The tier that finally served it (after fallbacks), if any.
    pub tier: Option<String>,
    /// Decision reasons.
    pub reasons: Vec<String>,
    /// Total latency in milliseconds.
    pub latency_ms: u64,
    /// Time to first token in milliseconds (streams).
    pub ttft_ms: Option<u64>,
    /// Uncached prompt tokens.
    pub tokens_in: u64,
    /// Generated tokens.
    pub tokens_out: u64,
    /// Prompt tokens read from (or written to) a provider cache.
    pub tokens_cached: u64,
    /// Cost in USD.
    pub cost_usd: f64,
    /// Retries across all tiers.
    pub retries: u32,
    /// Tiers tried and abandoned before the one that served, in order.
    pub fallbacks: Vec<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// The error shown to the client, if any.
    pub error: Option<String>,
    /// What the cascade did, when the request went through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cascade: Option<CascadeOutcome>,
    /// Each attempt at an answer, in order, when there was more than one way to answer (the
    /// cascade: the local answer, then the remote one). The token and cost fields above are
    /// then the sums over the attempts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
}

/// What the cascade did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CascadeOutcome {
    /// The local answer passed its checks and was served.
    Passed,
    /// The local answer failed; the remote tier's answer was served.
    Escalated,
    /// The local answer failed, the remote tier failed too; the local answer was served.
    EscalationFailed,
}

impl CascadeOutcome {
    /// The snake_case name (as in telemetry and the `x-switchyard-cascade` response header).
    pub fn as_str(self) -> &'static str {
        match self {
            CascadeOutcome::Passed => "passed",
            CascadeOutcome::Escalated => "escalated",
            CascadeOutcome::EscalationFailed => "escalation_failed",
        }
    }
}

/// One attempt at answering a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// The tier that tried.
    pub tier: String,
    /// How long the attempt took, in milliseconds.
    pub latency_ms: u64,
    /// Uncached prompt tokens.
    pub tokens_in: u64,
    /// Generated tokens.
    pub tokens_out: u64,
    /// Prompt tokens read from (or written to) a provider cache.
    pub tokens_cached: u64,
    /// Cost in USD.
    pub cost_usd: f64,
    /// `ok` when it produced an answer, else `error`.
    pub outcome: Outcome,
    /// The error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The cascade's checks on this attempt's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
}

impl Attempt {
    /// An attempt on `tier` that took `latency_ms` and used `usage` for `cost_usd`.
    pub fn new(tier: &str, latency_ms: u64, usage: &Usage, cost_usd: f64) -> Self {
        Self {
            tier: tier.to_string(),
            latency_ms,
            tokens_in: usage.input_tokens,
            tokens_out: usage.output_tokens,
            tokens_cached: usage.cached_input_tokens + usage.cache_write_tokens,
            cost_usd,
            outcome: Outcome::Ok,
            error: None,
            verdict: None,
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A process-unique request id: `req-<unix ms hex>-<counter hex>`.
pub fn new_request_id(now_ms: u64) -> String {
    format!(
        "req-{now_ms:x}-{:x}",
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

impl TelemetryRecord {
    /// A record for a decision made at `now_ms`, to be completed when the request ends.
    pub fn from_decision(id: String, now_ms: u64, endpoint: &str, decision: &Decision) -> Self {
        TelemetryRecord {
            id,
            time: rfc3339_utc(now_ms),
            endpoint: endpoint.to_string(),
            action: decision.action,
            tier: decision.tier.clone(),
            reasons: decision.reasons.clone(),
            latency_ms: 0,
            ttft_ms: None,
            tokens_in: 0,
            tokens_out: 0,
            tokens_cached: 0,
            cost_usd: 0.0,
            retries: 0,
            fallbacks: Vec::new(),
            outcome: if decision.refusal.is_some() {
                Outcome::Refused
            } else {
                Outcome::Ok
            },
            error: None,
            cascade: None,
            attempts: Vec::new(),
        }
    }

    /// Fills the token and cost fields from normalised usage.
    pub fn set_usage(&mut self, usage: &Usage, cost_usd: f64) {
        self.tokens_in = usage.input_tokens;
        self.tokens_out = usage.output_tokens;
        self.tokens_cached = usage.cached_input_tokens + usage.cache_write_tokens;
        self.cost_usd = cost_usd;
    }

    /// Appends an attempt and adds its tokens and cost to the record's totals.
    pub fn add_attempt(&mut self, a: Attempt) {
        self.tokens_in += a.tokens_in;
        self.tokens_out += a.tokens_out;
        self.tokens_cached += a.tokens_cached;
        self.cost_usd += a.cost_usd;
        self.attempts.push(a);
    }
}

/// Appending failed.
#[derive(Debug, Error)]
pub enum TelemetryError {
    /// The file could not be opened or written.
    #[error("cannot write telemetry to {path}: {source}")]
    Io {
        /// The JSONL file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The record could not be serialised.
    #[error("cannot serialise a telemetry record: {0}")]
    Json(#[from] serde_json::Error),
}

/// Appends records to a JSONL file; safe to share between threads. Each record is flushed as
/// one `write` of a whole line, so a crash loses at most the record being written.
#[derive(Debug)]
pub struct JsonlAppender {
    path: PathBuf,
    file: Mutex<BufWriter<File>>,
}

impl JsonlAppender {
    /// Opens (creating if needed) `path` for appending.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, TelemetryError> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| TelemetryError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(JsonlAppender {
            path,
            file: Mutex::new(BufWriter::new(file)),
        })
    }

    /// Appends one record as a line.
    pub fn append(&self, record: &TelemetryRecord) -> Result<(), TelemetryError> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let mut w = self.file.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(&line)
            .and_then(|_| w.flush())
            .map_err(|source| TelemetryError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn appends_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let app = JsonlAppender::open(&path).unwrap();
        let d = Decision {
            action: Action::Escalate,
            tier: Some("frontier".into()),
            reasons: vec!["rule `legal`".into()],
            scores: BTreeMap::new(),
            fallbacks: vec!["local".into()],
            refusal: None,
            cascade: None,
        };
        let mut r = TelemetryRecord::from_decision(
            new_request_id(1),
            1_769_900_400_000,
            "/v1/messages",
            &d,
        );
        r.set_usage(
            &Usage {
                input_tokens: 10,
                cached_input_tokens: 5,
                cache_write_tokens: 1,
                output_tokens: 7,
            },
            0.01,
        );
        app.append(&r).unwrap();
        r.outcome = Outcome::StreamError;
        app.append(&r).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["outcome"], "stream_error");
        assert_eq!(v["action"], "escalate");
        assert_eq!(v["tokens_cached"], 6);
        assert_eq!(v["time"], "2026-01-31T23:00:00.000Z");
        let back: TelemetryRecord = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(back.tier.as_deref(), Some("frontier"));
    }
}
