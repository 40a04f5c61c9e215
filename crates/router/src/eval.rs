//! Labelled-suite evaluation: run a policy over `{"prompt", "expect"}` lines and report the
//! accuracy and every miss with its reasons (`switchyard route-eval --suite FILE.jsonl`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::decide::{decide, SemanticScorer};
use crate::policy::{Action, Policy};
use crate::request::RouteRequest;
use crate::state::{EnvSource, RouterState};

/// One labelled prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteCase {
    /// The user prompt.
    pub prompt: String,
    /// The action the policy should pick.
    pub expect: Action,
}

/// A case the policy got wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Miss {
    /// 1-based line in the suite file.
    pub line: usize,
    /// The prompt.
    pub prompt: String,
    /// The expected action.
    pub expect: Action,
    /// The action the policy picked.
    pub got: Action,
    /// The decision's reasons.
    pub reasons: Vec<String>,
}

/// The result of a suite run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteReport {
    /// Cases run.
    pub total: usize,
    /// Cases decided as expected.
    pub correct: usize,
    /// `correct / total`.
    pub accuracy: f64,
    /// expected action → (got action → count).
    pub confusion: BTreeMap<Action, BTreeMap<Action, usize>>,
    /// Every miss.
    pub misses: Vec<Miss>,
}

/// A suite file could not be read.
#[derive(Debug, Error)]
pub enum SuiteError {
    /// The file could not be read.
    #[error("cannot read suite {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is not a `{"prompt", "expect"}` object.
    #[error("suite {path} line {line}: {message}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Parses a JSONL suite (blank lines and lines starting with `//` are skipped); returns
/// `(line, case)` pairs.
pub fn parse_suite(text: &str, origin: &str) -> Result<Vec<(usize, SuiteCase)>, SuiteError> {
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() || l.starts_with("//") {
            continue;
        }
        let case: SuiteCase = serde_json::from_str(l).map_err(|e| SuiteError::Line {
            path: origin.to_string(),
            line: i + 1,
            message: e.to_string(),
        })?;
        out.push((i + 1, case));
    }
    Ok(out)
}

/// Reads a suite file.
pub fn load_suite(path: impl AsRef<Path>) -> Result<Vec<(usize, SuiteCase)>, SuiteError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| SuiteError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_suite(&text, &path.display().to_string())
}

/// Runs `cases` through `policy` with fresh state (no spend, breakers closed, no API keys), so
/// only the action is judged.
pub fn run_suite(
    policy: &Policy,
    cases: &[(usize, SuiteCase)],
    scorer: Option<&dyn SemanticScorer>,
) -> SuiteReport {
    let state = RouterState::new(
        std::sync::Arc::new(crate::state::SystemClock),
        EnvSource::Fixed(BTreeMap::new()),
    );
    let mut confusion: BTreeMap<Action, BTreeMap<Action, usize>> = BTreeMap::new();
    let mut misses = Vec::new();
    let mut correct = 0;
    for (line, c) in cases {
        let d = decide(
            policy,
            &RouteRequest::from_prompt(&c.prompt),
            &state,
            scorer,
        );
        *confusion
            .entry(c.expect)
            .or_default()
            .entry(d.action)
            .or_default() += 1;
        if d.action == c.expect {
            correct += 1;
        } else {
            misses.push(Miss {
                line: *line,
                prompt: c.prompt.clone(),
                expect: c.expect,
                got: d.action,
                reasons: d.reasons,
            });
        }
    }
    let total = cases.len();
    SuiteReport {
        total,
        correct,
        accuracy: if total == 0 {
            0.0
        } else {
            correct as f64 / total as f64
        },
        confusion,
        misses,
    }
}
