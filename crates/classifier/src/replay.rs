//! Replaying tasks against a running server (`switchyard route-eval --replay`): the task file,
//! the checks on an answer, per-tier statistics, and the difficulty-threshold sweep of
//! `--calibrate`. Sending the requests is the caller's business (the binary does it over HTTP);
//! this module only judges and counts.
//!
//! The task file is JSON lines, one task per line; blank lines and lines starting with `//` are
//! skipped:
//!
//! ```text
//! {"prompt": "What is 6 x 7? Answer with the number only.", "check": {"exact": "42"}}
//! {"id": "sec-1", "prompt": "Review this login handler for vulnerabilities: ...", "check": {"regex": "(?i)injection"}}
//! {"prompt": "Give {\"city\": ...} for Paris as JSON.", "check": {"json_schema": {"type": "object", "required": ["city"]}}}
//! ```
//!
//! - `exact`: the answer, trimmed, equals the string (trimmed);
//! - `regex`: the answer matches (Rust `regex` syntax; `(?i)` for case-insensitive);
//! - `json_schema`: the answer parses as JSON (a ```` ```json ```` fence is accepted) and follows
//!   the schema (the subset `switchyard_router::cascade::schema_violation` checks: type, enum,
//!   const, required, properties, additionalProperties, items, min/max items and length).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// A task file that cannot be used.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is not a valid task.
    #[error("{origin}:{line}: {message}")]
    Line {
        /// The file.
        origin: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The file has no tasks.
    #[error("{0}: no tasks (one JSON object per line: {{\"prompt\": ..., \"check\": {{\"exact\" | \"regex\" | \"json_schema\": ...}}}})")]
    Empty(String),
}

/// How an answer is judged.
#[derive(Debug, Clone)]
pub enum Check {
    /// The trimmed answer equals this (trimmed).
    Exact(String),
    /// The answer matches this regex.
    Regex(Regex),
    /// The answer is JSON following this schema.
    JsonSchema(Value),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum CheckSpec {
    Exact(String),
    Regex(String),
    JsonSchema(Value),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskSpec {
    #[serde(default)]
    id: Option<String>,
    prompt: String,
    check: CheckSpec,
}

/// One task of a replay file.
#[derive(Debug, Clone)]
pub struct Task {
    /// 1-based line in the file.
    pub line: usize,
    /// The task's `id`, or `line N`.
    pub id: String,
    /// The user message sent.
    pub prompt: String,
    /// How its answer is judged.
    pub check: Check,
}

impl Check {
    /// `None` when `answer` passes, else why it does not.
    pub fn failure(&self, answer: &str) -> Option<String> {
        match self {
            Check::Exact(want) => (answer.trim() != want.trim())
                .then(|| format!("expected exactly {:?}", want.trim())),
            Check::Regex(re) => (!re.is_match(answer)).then(|| format!("no match for /{re}/")),
            Check::JsonSchema(schema) => {
                match switchyard_router::cascade::parse_json_answer(answer) {
                    None => Some("the answer is not JSON".into()),
                    Some(v) => switchyard_router::cascade::schema_violation(schema, &v),
                }
            }
        }
    }

    /// Whether `answer` passes.
    pub fn passes(&self, answer: &str) -> bool {
        self.failure(answer).is_none()
    }
}

/// Parses a task file's text; `origin` names it in errors (`origin:line: message`).
pub fn parse_tasks(text: &str, origin: &str) -> Result<Vec<Task>, ReplayError> {
    let bad = |line: usize, message: String| ReplayError::Line {
        origin: origin.to_string(),
        line,
        message,
    };
    let mut tasks = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let t = raw.trim();
        if t.is_empty() || t.starts_with("//") {
            continue;
        }
        let spec: TaskSpec = serde_json::from_str(t).map_err(|e| {
            bad(
                line,
                format!(
                    "{e} (a task is {{\"prompt\": ..., \"check\": {{\"exact\" | \"regex\" | \"json_schema\": ...}}}}, optional \"id\")"
                ),
            )
        })?;
        if spec.prompt.trim().is_empty() {
            return Err(bad(line, "empty prompt".into()));
        }
        let check = match spec.check {
            CheckSpec::Exact(s) => Check::Exact(s),
            CheckSpec::Regex(r) => Check::Regex(
                Regex::new(&r).map_err(|e| bad(line, format!("bad regex {r:?}: {e}")))?,
            ),
            CheckSpec::JsonSchema(s) if s.is_object() => Check::JsonSchema(s),
            CheckSpec::JsonSchema(s) => {
                return Err(bad(line, format!("json_schema must be an object, not {s}")))
            }
        };
        tasks.push(Task {
            line,
            id: spec.id.unwrap_or_else(|| format!("line {line}")),
            prompt: spec.prompt,
            check,
        });
    }
    if tasks.is_empty() {
        return Err(ReplayError::Empty(origin.to_string()));
    }
    Ok(tasks)
}

/// Reads and parses a task file.
pub fn load_tasks(path: &Path) -> Result<Vec<Task>, ReplayError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_tasks(&text, &path.display().to_string())
}

/// What happened to one request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    /// The task's line in the file.
    pub line: usize,
    /// The task's id.
    pub id: String,
    /// The `model` sent (`auto`, or a tier name when calibrating).
    pub model: String,
    /// The tier that answered (`x-switchyard-tier`; `none` when refused).
    pub tier: String,
    /// The router's action (`x-switchyard-action`).
    pub action: String,
    /// The router's reasons (`x-switchyard-reason`).
    pub reason: String,
    /// Whether the answer passed the task's check.
    pub pass: bool,
    /// Why it did not (the check's message, or the error).
    pub why: Option<String>,
    /// Send to last byte of the response, in milliseconds.
    pub latency_ms: f64,
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// `usage.completion_tokens`.
    pub completion_tokens: u64,
    /// `x-switchyard-cost-usd`.
    pub cost_usd: f64,
    /// HTTP or transport error, when there was no answer.
    pub error: Option<String>,
}

/// Totals over a set of outcomes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TierStats {
    /// Requests.
    pub requests: usize,
    /// Of which passed their check.
    pub passed: usize,
    /// `passed / requests` (0 with no requests).
    pub pass_rate: f64,
    /// Median latency (the lower middle value for an even count), ms.
    pub median_latency_ms: f64,
    /// Mean latency, ms.
    pub mean_latency_ms: f64,
    /// Largest latency, ms.
    pub max_latency_ms: f64,
    /// Summed prompt tokens.
    pub prompt_tokens: u64,
    /// Summed completion tokens.
    pub completion_tokens: u64,
    /// Summed cost, USD.
    pub cost_usd: f64,
    /// Requests that got no answer (HTTP error or refused).
    pub errors: usize,
}

/// Totals over `outcomes`.
pub fn stats<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> TierStats {
    let outcomes: Vec<&Outcome> = outcomes.into_iter().collect();
    let n = outcomes.len();
    let mut lat: Vec<f64> = outcomes.iter().map(|o| o.latency_ms).collect();
    lat.sort_by(f64::total_cmp);
    let passed = outcomes.iter().filter(|o| o.pass).count();
    let ratio = |x: f64| if n == 0 { 0.0 } else { x / n as f64 };
    TierStats {
        requests: n,
        passed,
        pass_rate: ratio(passed as f64),
        median_latency_ms: lat.get(n.saturating_sub(1) / 2).copied().unwrap_or(0.0),
        mean_latency_ms: ratio(lat.iter().sum()),
        max_latency_ms: lat.last().copied().unwrap_or(0.0),
        prompt_tokens: outcomes.iter().map(|o| o.prompt_tokens).sum(),
        completion_tokens: outcomes.iter().map(|o| o.completion_tokens).sum(),
        cost_usd: outcomes.iter().map(|o| o.cost_usd).sum(),
        errors: outcomes.iter().filter(|o| o.error.is_some()).count(),
    }
}

/// What `--replay` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// All requests.
    pub overall: TierStats,
    /// Tier that answered → its requests.
    pub tiers: BTreeMap<String, TierStats>,
    /// Every request, in file order.
    pub outcomes: Vec<Outcome>,
}

impl ReplayReport {
    /// Groups `outcomes` by the tier that answered.
    pub fn new(outcomes: Vec<Outcome>) -> Self {
        let mut by_tier: BTreeMap<String, Vec<&Outcome>> = BTreeMap::new();
        for o in &outcomes {
            by_tier.entry(o.tier.clone()).or_default().push(o);
        }
        Self {
            overall: stats(&outcomes),
            tiers: by_tier.into_iter().map(|(k, v)| (k, stats(v))).collect(),
            outcomes,
        }
    }
}

/// Where a task goes under a difficulty threshold `t`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Route {
    /// A rule, the safety floor, a semantic category or a difficulty of 1 settles it whatever
    /// the threshold; `outcome` is the server's own (`model: auto`) answer.
    Fixed,
    /// The difficulty step decides it: tier `above` when `difficulty >= t`, else `below`.
    Threshold {
        /// The task's difficulty as the router computes it.
        difficulty: f64,
        /// The tier when not escalated (normally the local one).
        below: String,
        /// The tier when escalated.
        above: String,
    },
}

/// One task's answers for calibration.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationRow {
    /// How the threshold routes it.
    pub route: Route,
    /// Tier name (or `auto` for a fixed task) → the answer it gave.
    pub outcomes: BTreeMap<String, Outcome>,
}

impl CalibrationRow {
    /// The outcome under threshold `t`.
    pub fn at(&self, t: f64) -> Option<&Outcome> {
        match &self.route {
            Route::Fixed => self.outcomes.get("auto"),
            Route::Threshold {
                difficulty,
                below,
                above,
            } => self
                .outcomes
                .get(if *difficulty >= t { above } else { below }),
        }
    }
}

/// The routed result at one threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepPoint {
    /// `classifier.escalate_difficulty`.
    pub threshold: f64,
    /// Tasks whose answer passed.
    pub passed: usize,
    /// Their share of all tasks.
    pub pass_rate: f64,
    /// Share of tasks answered by a tier other than `local_tier`.
    pub escalated: f64,
    /// Summed cost of the answers, USD.
    pub cost_usd: f64,
}

/// What `--calibrate` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// The pass rate asked for.
    pub target_pass_rate: f64,
    /// Tasks the threshold does not affect.
    pub fixed: usize,
    /// Tasks the threshold routes.
    pub threshold_dependent: usize,
    /// Every distinct threshold worth trying (the threshold-dependent tasks' difficulties and
    /// 1.0), highest first.
    pub sweep: Vec<SweepPoint>,
    /// The cheapest point meeting the target (the highest threshold among equally cheap
    /// ones); `None` when none does.
    pub chosen: Option<SweepPoint>,
}

/// Sweeps the difficulty threshold over `rows` and picks the cheapest one whose pass rate is at
/// least `target`. `local_tier` names the tier that does not count as escalated.
pub fn calibrate(rows: &[CalibrationRow], local_tier: &str, target: f64) -> Calibration {
    let mut thresholds: Vec<f64> = rows
        .iter()
        .filter_map(|r| match r.route {
            Route::Threshold { difficulty, .. } => Some(difficulty.clamp(0.0, 1.0)),
            Route::Fixed => None,
        })
        .chain(std::iter::once(1.0))
        .collect();
    thresholds.sort_by(|a, b| b.total_cmp(a));
    thresholds.dedup();
    let n = rows.len().max(1) as f64;
    let sweep: Vec<SweepPoint> = thresholds
        .into_iter()
        .map(|t| {
            let outs: Vec<Option<&Outcome>> = rows.iter().map(|r| r.at(t)).collect();
            let passed = outs.iter().filter(|o| o.is_some_and(|o| o.pass)).count();
            let escalated = outs
                .iter()
                .filter(|o| o.is_some_and(|o| o.tier != local_tier && o.tier != "none"))
                .count();
            SweepPoint {
                threshold: t,
                passed,
                pass_rate: passed as f64 / n,
                escalated: escalated as f64 / n,
                cost_usd: outs.iter().flatten().map(|o| o.cost_usd).sum(),
            }
        })
        .collect();
    // Highest threshold first, so among equal costs the least escalation wins.
    let chosen = sweep
        .iter()
        .filter(|p| p.pass_rate + 1e-12 >= target)
        .fold(None::<&SweepPoint>, |best, p| match best {
            Some(b) if b.cost_usd <= p.cost_usd + 1e-12 => Some(b),
            _ => Some(p),
        })
        .cloned();
    Calibration {
        target_pass_rate: target,
        fixed: rows.iter().filter(|r| r.route == Route::Fixed).count(),
        threshold_dependent: rows.iter().filter(|r| r.route != Route::Fixed).count(),
        sweep,
        chosen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tasks_and_names_bad_lines() {
        let text = r#"
// a comment
{"prompt": "p1", "check": {"exact": "42"}}

{"id": "r", "prompt": "p2", "check": {"regex": "^a+$"}}
{"prompt": "p3", "check": {"json_schema": {"type": "object", "required": ["a"]}}}
"#;
        let t = parse_tasks(text, "tasks.jsonl").unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!((t[0].line, t[0].id.as_str()), (3, "line 3"));
        assert_eq!((t[1].line, t[1].id.as_str()), (5, "r"));
        let err = |text: &str| parse_tasks(text, "f.jsonl").unwrap_err().to_string();
        let e = err("{\"prompt\": \"p\", \"check\": {\"exact\": \"1\"}}\n{\"prompt\": \"p\"}");
        assert!(e.starts_with("f.jsonl:2: "), "{e}");
        assert!(e.contains("check"), "{e}");
        let e = err(r#"{"prompt": "p", "check": {"regex": "("}}"#);
        assert!(
            e.starts_with("f.jsonl:1: bad regex") && e.contains("unclosed"),
            "{e}"
        );
        let e = err(r#"{"prompt": "p", "check": {"fuzzy": "x"}}"#);
        assert!(e.contains("unknown variant `fuzzy`"), "{e}");
        let e = err(r#"{"prompt": "p", "chek": {"exact": "x"}}"#);
        assert!(e.contains("unknown field `chek`"), "{e}");
        assert!(err(r#"{"prompt": " ", "check": {"exact": "x"}}"#).contains("empty prompt"));
        assert!(err(r#"{"prompt": "p", "check": {"json_schema": 3}}"#).contains("object"));
        assert!(err("not json").starts_with("f.jsonl:1: "));
        assert!(err("\n// nothing\n").contains("no tasks"));
    }

    #[test]
    fn checks_judge_answers() {
        let exact = Check::Exact("42".into());
        assert!(exact.passes(" 42\n"));
        assert!(exact.failure("41").unwrap().contains("\"42\""));
        let re = Check::Regex(Regex::new(r"\b42\b").unwrap());
        assert!(re.passes("it is 42."));
        assert!(!re.passes("420"));
        let schema = serde_json::json!({"type": "object", "required": ["a"],
            "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}}});
        let js = Check::JsonSchema(schema);
        assert!(js.passes("{\"a\": 1, \"b\": \"x\"}"));
        assert!(js.passes("```json\n{\"a\": 2}\n```"));
        assert!(!js.passes("{\"a\": 1.5}"));
        assert!(!js.passes("{\"b\": \"x\"}"));
        assert_eq!(js.failure("Sure!").unwrap(), "the answer is not JSON");
    }

    fn out(tier: &str, pass: bool, cost: f64, latency: f64) -> Outcome {
        Outcome {
            tier: tier.into(),
            pass,
            cost_usd: cost,
            latency_ms: latency,
            prompt_tokens: 10,
            completion_tokens: 2,
            ..Outcome::default()
        }
    }

    #[test]
    fn report_groups_by_tier() {
        let r = ReplayReport::new(vec![
            out("local", true, 0.0, 30.0),
            out("frontier", true, 0.5, 100.0),
            out("local", false, 0.0, 10.0),
            out("frontier", false, 0.5, 300.0),
            out("frontier", true, 0.5, 200.0),
        ]);
        assert_eq!(r.overall.requests, 5);
        assert_eq!(r.overall.passed, 3);
        assert!((r.overall.cost_usd - 1.5).abs() < 1e-12);
        let f = &r.tiers["frontier"];
        assert_eq!((f.requests, f.passed, f.prompt_tokens), (3, 2, 30));
        assert_eq!(f.median_latency_ms, 200.0);
        assert_eq!(f.max_latency_ms, 300.0);
        let l = &r.tiers["local"];
        assert_eq!(l.median_latency_ms, 10.0, "lower middle of two");
        assert_eq!(l.mean_latency_ms, 20.0);
        assert_eq!(stats(&[]), TierStats::default());
    }

    fn row(d: f64, local_pass: bool, remote_pass: bool) -> CalibrationRow {
        CalibrationRow {
            route: Route::Threshold {
                difficulty: d,
                below: "local".into(),
                above: "frontier".into(),
            },
            outcomes: [
                ("local".to_string(), out("local", local_pass, 0.0, 1.0)),
                (
                    "frontier".to_string(),
                    out("frontier", remote_pass, 1.0, 1.0),
                ),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn calibration_picks_the_cheapest_threshold_meeting_the_target() {
        let fixed = CalibrationRow {
            route: Route::Fixed,
            outcomes: [("auto".to_string(), out("frontier", true, 1.0, 1.0))]
                .into_iter()
                .collect(),
        };
        let rows = vec![
            fixed,
            row(0.9, false, true),
            row(0.6, false, true),
            row(0.3, true, true),
            row(0.1, true, false),
        ];
        let c = calibrate(&rows, "local", 0.8);
        assert_eq!((c.fixed, c.threshold_dependent), (1, 4));
        let ts: Vec<f64> = c.sweep.iter().map(|p| p.threshold).collect();
        assert_eq!(ts, vec![1.0, 0.9, 0.6, 0.3, 0.1]);
        // t = 1.0: only the fixed task is remote; the two hard ones fail locally (3/5).
        // t = 0.9: the hardest escalates (4/5, $2). t = 0.6: both hard ones (5/5, $3).
        // t = 0.1: everything remote, where the easiest task fails (4/5, $5).
        let rates: Vec<usize> = c.sweep.iter().map(|p| p.passed).collect();
        assert_eq!(rates, vec![3, 4, 5, 5, 4]);
        let p = c.chosen.unwrap();
        assert_eq!(p.threshold, 0.9);
        assert_eq!(p.passed, 4);
        assert!((p.escalated - 0.4).abs() < 1e-12 && (p.cost_usd - 2.0).abs() < 1e-12);
        // 5/5 costs $3 at 0.6 and $4 at 0.3: the cheaper wins.
        assert_eq!(
            calibrate(&rows, "local", 1.0).chosen.unwrap().threshold,
            0.6
        );
        assert_eq!(
            calibrate(&rows, "local", 0.6).chosen.unwrap().threshold,
            1.0
        );
        let none = CalibrationRow {
            route: Route::Fixed,
            outcomes: [("auto".to_string(), out("none", false, 0.0, 1.0))]
                .into_iter()
                .collect(),
        };
        assert!(calibrate(&[none], "local", 0.5).chosen.is_none());
    }
}
