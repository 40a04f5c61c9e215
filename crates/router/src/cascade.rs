//! The cascade: serve a request on the local tier first, then look at the finished answer and
//! decide whether to re-ask it on a remote tier.
//!
//! A policy turns it on with a `[cascade]` table ([`CascadeConfig`]). `decide` marks eligible
//! requests (decided `local` by a rule, the classifier or the default; never `local-only`,
//! never an explicit `local`, only while the cascade tier is usable) with
//! [`Decision::cascade`](crate::Decision); the server then serves them locally, runs [`check`]
//! on the answer, and escalates when it fails. [`check`] looks at the answer's token
//! log-probabilities (mean, minimum, entropy), its form (valid JSON and the request's JSON
//! schema when the request asked for JSON, a regex the policy requires) and its content (a
//! refusal, an empty or truncated answer) and returns a [`Verdict`] with every reason.
//!
//! ```
//! use switchyard_router::cascade::{check, Answer, Checks};
//!
//! let checks = Checks { expect_json: true, ..Checks::default() };
//! let v = check(&checks, &Answer { text: "{\"ok\": true", ..Answer::default() });
//! assert!(v.escalate);
//! assert!(v.reasons[0].contains("JSON"));
//! ```

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// The policy's `[cascade]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CascadeConfig {
    /// Check local answers and escalate the ones that fail.
    #[serde(default)]
    pub enabled: bool,
    /// The remote tier failed answers go to (default: the escalate tier).
    #[serde(default)]
    pub tier: Option<String>,
    /// Also cascade streamed requests, by holding the local answer back until it is checked
    /// (the client sees no token before the whole local answer exists). Off: streamed
    /// requests are served locally without a check.
    #[serde(default)]
    pub buffer_streams: bool,
    /// Escalate when the mean token log-probability (nats) is below this; `"off"` disables.
    #[serde(
        default,
        deserialize_with = "threshold",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_mean_logprob: Option<f64>,
    /// Escalate when any token's log-probability is below this; `"off"` disables.
    #[serde(
        default,
        deserialize_with = "threshold",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_token_logprob: Option<f64>,
    /// Escalate when the mean per-token entropy (nats) is above this; `"off"` disables.
    #[serde(
        default,
        deserialize_with = "threshold",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_mean_entropy: Option<f64>,
    /// Escalate refusals ("I can't help with that", "As an AI language model …").
    #[serde(default)]
    pub detect_refusal: bool,
    /// Escalate answers cut off by `max_tokens`.
    #[serde(default)]
    pub escalate_on_truncation: bool,
    /// Escalate answers with fewer non-space characters than this.
    #[serde(default)]
    pub min_chars: usize,
    /// Escalate answers that do not match this regex (case-sensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub must_match: Option<String>,
    /// When a request asks for JSON (`response_format` / `output_format`), escalate answers
    /// that are not JSON or break the request's schema.
    #[serde(default)]
    pub check_json: bool,
}

impl Default for CascadeConfig {
    /// What `models/router/default.toml` says, for code that builds a config by hand.
    fn default() -> Self {
        let c = Checks::default();
        Self {
            enabled: false,
            tier: None,
            buffer_streams: false,
            min_mean_logprob: c.min_mean_logprob,
            min_token_logprob: c.min_token_logprob,
            max_mean_entropy: c.max_mean_entropy,
            detect_refusal: c.detect_refusal,
            escalate_on_truncation: c.escalate_on_truncation,
            min_chars: c.min_chars,
            must_match: None,
            check_json: true,
        }
    }
}

/// A number, or the string `"off"` for `None`.
fn threshold<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum T {
        Num(f64),
        Text(String),
    }
    match T::deserialize(d)? {
        T::Num(x) => Ok(Some(x)),
        T::Text(s) if s == "off" => Ok(None),
        T::Text(s) => Err(serde::de::Error::custom(format!(
            "expected a number or \"off\", got \"{s}\""
        ))),
    }
}

impl CascadeConfig {
    /// The checks for one request: the policy's, plus JSON (and its schema) when the request
    /// asked for JSON and `check_json` is on. `must_match` is the compiled `must_match`.
    pub fn checks(&self, must_match: Option<Regex>, expect: &JsonExpectation) -> Checks {
        Checks {
            min_mean_logprob: self.min_mean_logprob,
            min_token_logprob: self.min_token_logprob,
            max_mean_entropy: self.max_mean_entropy,
            expect_json: self.check_json && expect.json,
            schema: if self.check_json {
                expect.schema.clone()
            } else {
                None
            },
            must_match,
            detect_refusal: self.detect_refusal,
            escalate_on_truncation: self.escalate_on_truncation,
            min_chars: self.min_chars,
        }
    }
}

/// Whether a request asked for JSON, and with which schema.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JsonExpectation {
    /// The answer must be JSON.
    pub json: bool,
    /// The JSON schema it must follow.
    pub schema: Option<Value>,
}

impl JsonExpectation {
    /// Reads OpenAI's `response_format` (`json_object`, or `json_schema` with
    /// `json_schema.schema`) or Anthropic's `output_format` (`json_schema` with `schema`).
    pub fn from_body(body: &Value) -> Self {
        let openai = body.get("response_format");
        let anthropic = body.get("output_format");
        let Some(f) = openai.or(anthropic) else {
            return Self::default();
        };
        match f.get("type").and_then(Value::as_str) {
            Some("json_object") => Self {
                json: true,
                schema: None,
            },
            Some("json_schema") => Self {
                json: true,
                schema: f
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .or_else(|| f.get("schema"))
                    .cloned(),
            },
            _ => Self::default(),
        }
    }
}

/// The checks one answer goes through; `None` / `false` disables a check.
#[derive(Debug, Clone)]
pub struct Checks {
    /// Escalate when the mean token log-probability is below this (nats).
    pub min_mean_logprob: Option<f64>,
    /// Escalate when any token's log-probability is below this.
    pub min_token_logprob: Option<f64>,
    /// Escalate when the mean per-token entropy (nats) is above this.
    pub max_mean_entropy: Option<f64>,
    /// The answer must be JSON (a fenced ```json block is accepted).
    pub expect_json: bool,
    /// With `expect_json`, the JSON schema the value must follow (see [`schema_violation`]).
    pub schema: Option<Value>,
    /// The answer must match this.
    pub must_match: Option<Regex>,
    /// Escalate on refusals.
    pub detect_refusal: bool,
    /// Escalate when the answer stopped on the length limit.
    pub escalate_on_truncation: bool,
    /// Escalate when the answer has fewer non-space characters than this.
    pub min_chars: usize,
}

impl Default for Checks {
    /// Measured with `route-eval --replay --calibrate cascade --target-kept-pass 0.9
    /// --max-escalation 0.5` on the demo model (SmolLM2-135M-Instruct upcycled, bf16) and the 90
    /// tasks of `models/router/cascade-tasks.jsonl`, 2026-11-28 (`docs/cascade-calibration.md`).
    /// No threshold keeps 90% of local answers right short of escalating 96.7%; within half the
    /// traffic the mean entropy does best: above 1.29 nats escalates 47.8% and the kept answers
    /// pass 59.6% (44.8% with no threshold). The two logprob thresholds, calibrated alone, were
    /// a task or two behind, and a second threshold only adds escalation, so they are off. The
    /// hand-set −1.0 mean logprob and 2.5 entropy escalated 10% for 46.9% kept.
    fn default() -> Self {
        Self {
            min_mean_logprob: None,
            min_token_logprob: None,
            max_mean_entropy: Some(1.29),
            expect_json: false,
            schema: None,
            must_match: None,
            detect_refusal: true,
            escalate_on_truncation: true,
            min_chars: 1,
        }
    }
}

/// A finished local answer.
#[derive(Debug, Clone, Default)]
pub struct Answer<'a> {
    /// The generated text.
    pub text: &'a str,
    /// Log-probability of each generated token (empty when unknown: those checks are skipped).
    pub logprobs: &'a [f64],
    /// Entropy of each step's distribution (empty when unknown: the entropy check is skipped).
    pub entropies: &'a [f64],
    /// `stop`, `length`, …
    pub finish_reason: Option<&'a str>,
}

/// The verdict on one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Re-ask on the remote tier.
    pub escalate: bool,
    /// Why (empty when the answer passes).
    pub reasons: Vec<String>,
    /// Mean token log-probability, when logprobs were given.
    pub mean_logprob: Option<f64>,
    /// Least token log-probability.
    pub min_logprob: Option<f64>,
    /// Mean entropy, when entropies were given.
    pub mean_entropy: Option<f64>,
}

static REFUSAL: LazyLock<Regex> = LazyLock::new(|| {
    // A fixed pattern; covered by the refusal tests.
    Regex::new(
        r"(?i)^\W*(i('m| am) (sorry|afraid)[^.]{0,40}(can(no|')t|unable|not able)|i can(no|')t (help|assist|comply|provide|do that)|i('m| am) (unable|not able) to (help|assist|comply|provide)|i (won't|will not) (help|assist|provide)|as an ai( language model)?,? i|sorry, (but )?i can(no|')t)",
    )
    .expect("refusal pattern compiles")
});

/// Whether `text` opens with a refusal.
pub fn is_refusal(text: &str) -> bool {
    REFUSAL.is_match(text)
}

/// The JSON value in `text`, accepting a ```json … ``` fence around it.
pub fn parse_json_answer(text: &str) -> Option<Value> {
    let t = text.trim();
    let inner = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|r| r.trim_end().strip_suffix("```"))
        .unwrap_or(t);
    serde_json::from_str(inner.trim()).ok()
}

/// Where `v` breaks `schema`, or `None` when it follows it. The subset of JSON Schema that
/// structured-output requests use: `type` (one or a list), `enum`, `const`, `required`,
/// `properties`, `additionalProperties: false`, `items`, `minItems`/`maxItems`. Other keywords
/// are not checked.
pub fn schema_violation(schema: &Value, v: &Value) -> Option<String> {
    violation_at(schema, v, "$")
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => true,
    }
}

fn violation_at(schema: &Value, v: &Value, at: &str) -> Option<String> {
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() && !types.iter().any(|t| type_ok(t, v)) {
        return Some(format!("{at} is not of type {}", types.join(" or ")));
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Some(format!("{at} is not one of the enum values"));
        }
    }
    if let Some(c) = schema.get("const") {
        if c != v {
            return Some(format!("{at} is not {c}"));
        }
    }
    if let Some(obj) = v.as_object() {
        if let Some(req) = schema.get("required").and_then(Value::as_array) {
            if let Some(k) = req
                .iter()
                .filter_map(Value::as_str)
                .find(|k| !obj.contains_key(*k))
            {
                return Some(format!("{at} lacks the required key `{k}`"));
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        if let Some(props) = props {
            for (k, s) in props {
                if let Some(x) = obj.get(k) {
                    if let Some(w) = violation_at(s, x, &format!("{at}.{k}")) {
                        return Some(w);
                    }
                }
            }
        }
        if schema.get("additionalProperties") == Some(&Value::Bool(false)) {
            if let Some(k) = obj
                .keys()
                .find(|k| !props.is_some_and(|p| p.contains_key(*k)))
            {
                return Some(format!("{at} has the key `{k}` the schema does not allow"));
            }
        }
    }
    if let Some(arr) = v.as_array() {
        let bound = |k: &str| schema.get(k).and_then(Value::as_u64).map(|n| n as usize);
        if bound("minItems").is_some_and(|n| arr.len() < n) {
            return Some(format!("{at} has too few items"));
        }
        if bound("maxItems").is_some_and(|n| arr.len() > n) {
            return Some(format!("{at} has too many items"));
        }
        if let Some(items) = schema.get("items") {
            for (i, x) in arr.iter().enumerate() {
                if let Some(w) = violation_at(items, x, &format!("{at}[{i}]")) {
                    return Some(w);
                }
            }
        }
    }
    None
}

/// Entropy (nats) of a distribution given by log-probabilities (normalised first, so a
/// truncated top-k list gives the entropy of the renormalised top-k).
pub fn entropy_from_logprobs(logprobs: &[f64]) -> f64 {
    let finite: Vec<f64> = logprobs.iter().copied().filter(|x| x.is_finite()).collect();
    if finite.is_empty() {
        return 0.0;
    }
    let m = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = finite.iter().map(|l| (l - m).exp()).sum();
    let lz = m + z.ln();
    -finite
        .iter()
        .map(|l| {
            let lp = l - lz;
            lp.exp() * lp
        })
        .sum::<f64>()
}

fn mean(xs: &[f64]) -> Option<f64> {
    let f: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    (!f.is_empty()).then(|| f.iter().sum::<f64>() / f.len() as f64)
}

/// Checks a local answer; see the module docs.
pub fn check(cfg: &Checks, a: &Answer<'_>) -> Verdict {
    let mut reasons = Vec::new();
    let mean_lp = mean(a.logprobs);
    let min_lp = a
        .logprobs
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .reduce(f64::min);
    let mean_h = mean(a.entropies);
    if a.text.chars().filter(|c| !c.is_whitespace()).count() < cfg.min_chars {
        reasons.push("the answer is empty".to_string());
    }
    if cfg.escalate_on_truncation && a.finish_reason == Some("length") {
        reasons.push("the answer stopped at the length limit".to_string());
    }
    if cfg.detect_refusal && is_refusal(a.text) {
        reasons.push("the local model refused".to_string());
    }
    if let (Some(t), Some(m)) = (cfg.min_mean_logprob, mean_lp) {
        if m < t {
            reasons.push(format!("mean token logprob {m:.2} is below {t:.2}"));
        }
    }
    if let (Some(t), Some(m)) = (cfg.min_token_logprob, min_lp) {
        if m < t {
            reasons.push(format!("a token's logprob {m:.2} is below {t:.2}"));
        }
    }
    if let (Some(t), Some(h)) = (cfg.max_mean_entropy, mean_h) {
        if h > t {
            reasons.push(format!("mean token entropy {h:.2} is above {t:.2}"));
        }
    }
    if cfg.expect_json {
        match parse_json_answer(a.text) {
            None => reasons.push("the answer is not valid JSON".to_string()),
            Some(v) => {
                if let Some(w) = cfg.schema.as_ref().and_then(|s| schema_violation(s, &v)) {
                    reasons.push(format!("the JSON breaks the schema: {w}"));
                }
            }
        }
    }
    if let Some(re) = &cfg.must_match {
        if !re.is_match(a.text) {
            reasons.push(format!("the answer does not match /{}/", re.as_str()));
        }
    }
    Verdict {
        escalate: !reasons.is_empty(),
        reasons,
        mean_logprob: mean_lp,
        min_logprob: min_lp,
        mean_entropy: mean_h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn off() -> Checks {
        Checks {
            min_mean_logprob: None,
            min_token_logprob: None,
            max_mean_entropy: None,
            expect_json: false,
            schema: None,
            must_match: None,
            detect_refusal: false,
            escalate_on_truncation: false,
            min_chars: 0,
        }
    }

    #[test]
    fn confident_answer_passes_defaults() {
        let v = check(
            &Checks::default(),
            &Answer {
                text: "Paris.",
                logprobs: &[-0.01, -0.2],
                entropies: &[0.1, 0.5],
                finish_reason: Some("stop"),
            },
        );
        assert!(!v.escalate, "{:?}", v.reasons);
        assert!((v.mean_logprob.unwrap() + 0.105).abs() < 1e-9);
        assert_eq!(v.min_logprob, Some(-0.2));
    }

    #[test]
    fn logprob_and_entropy_thresholds() {
        let cfg = Checks {
            min_mean_logprob: Some(-1.0),
            min_token_logprob: Some(-5.0),
            max_mean_entropy: Some(2.0),
            ..off()
        };
        let v = check(
            &cfg,
            &Answer {
                text: "maybe 42",
                logprobs: &[-0.5, -7.0],
                entropies: &[3.0, 2.5],
                ..Answer::default()
            },
        );
        assert!(v.escalate);
        assert_eq!(v.reasons.len(), 3, "{:?}", v.reasons);
        // No logprobs given: those checks are skipped, not failed.
        assert!(
            !check(
                &cfg,
                &Answer {
                    text: "x",
                    ..Answer::default()
                }
            )
            .escalate
        );
        // NaN logprobs are ignored.
        assert!(
            !check(
                &cfg,
                &Answer {
                    text: "x",
                    logprobs: &[f64::NAN],
                    ..Answer::default()
                }
            )
            .escalate
        );
    }

    #[test]
    fn json_regex_refusal_truncation_empty() {
        let json = Checks {
            expect_json: true,
            schema: Some(serde_json::json!({"type": "object", "required": ["name"]})),
            ..off()
        };
        assert!(
            !check(
                &json,
                &Answer {
                    text: "```json\n{\"name\": \"a\"}\n```",
                    ..Answer::default()
                }
            )
            .escalate
        );
        let v = check(
            &json,
            &Answer {
                text: "{\"id\": 1}",
                ..Answer::default()
            },
        );
        assert!(v.escalate && v.reasons[0].contains("name"));
        assert!(
            check(
                &json,
                &Answer {
                    text: "not json",
                    ..Answer::default()
                }
            )
            .escalate
        );

        let re = Checks {
            must_match: Some(Regex::new(r"^\d{4}-\d{2}-\d{2}$").unwrap()),
            ..off()
        };
        assert!(
            !check(
                &re,
                &Answer {
                    text: "2024-03-01",
                    ..Answer::default()
                }
            )
            .escalate
        );
        assert!(
            check(
                &re,
                &Answer {
                    text: "March 1st",
                    ..Answer::default()
                }
            )
            .escalate
        );

        assert!(is_refusal("I'm sorry, but I can't help with that."));
        assert!(is_refusal("As an AI language model, I cannot browse."));
        assert!(is_refusal("I cannot assist with this request."));
        assert!(!is_refusal("Sorry for the delay! Here is the table:"));
        assert!(!is_refusal("The function can't return None because ..."));

        let trunc = Checks {
            escalate_on_truncation: true,
            min_chars: 1,
            ..off()
        };
        assert!(
            check(
                &trunc,
                &Answer {
                    text: "a",
                    finish_reason: Some("length"),
                    ..Answer::default()
                }
            )
            .escalate
        );
        assert!(
            check(
                &trunc,
                &Answer {
                    text: "  \n",
                    ..Answer::default()
                }
            )
            .escalate
        );
    }

    #[test]
    fn entropy_of_uniform_and_peaked() {
        let u = entropy_from_logprobs(&[(0.25f64).ln(); 4]);
        assert!((u - 4f64.ln()).abs() < 1e-9);
        assert!(entropy_from_logprobs(&[0.0]) < 1e-12);
        assert_eq!(entropy_from_logprobs(&[]), 0.0);
        assert_eq!(entropy_from_logprobs(&[f64::NEG_INFINITY]), 0.0);
    }

    #[test]
    fn schema_subset() {
        use serde_json::json;
        let schema = json!({
            "type": "object",
            "required": ["name", "tags"],
            "additionalProperties": false,
            "properties": {
                "name": {"type": "string"},
                "age": {"type": ["integer", "null"]},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}
            }
        });
        let ok = json!({"name": "x", "age": null, "tags": ["a"]});
        assert_eq!(schema_violation(&schema, &ok), None);
        for (bad, want) in [
            (json!([1]), "$ is not of type object"),
            (json!({"tags": []}), "`name`"),
            (
                json!({"name": 1, "tags": []}),
                "$.name is not of type string",
            ),
            (json!({"name": "x", "tags": ["c"]}), "$.tags[0]"),
            (json!({"name": "x", "tags": ["a", "a", "b"]}), "too many"),
            (json!({"name": "x", "tags": [], "extra": 1}), "`extra`"),
            (json!({"name": "x", "tags": [], "age": 1.5}), "$.age"),
        ] {
            let w = schema_violation(&schema, &bad).expect("a violation");
            assert!(w.contains(want), "{bad}: {w}");
        }
    }

    #[test]
    fn json_expectation_from_both_wire_formats() {
        use serde_json::json;
        assert_eq!(
            JsonExpectation::from_body(&json!({})),
            JsonExpectation::default()
        );
        let o = JsonExpectation::from_body(&json!({"response_format": {"type": "json_object"}}));
        assert!(o.json && o.schema.is_none());
        let s = json!({"type": "object", "required": ["a"]});
        let o = JsonExpectation::from_body(&json!({"response_format":
            {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}}));
        assert_eq!(o.schema.as_ref(), Some(&s));
        let a = JsonExpectation::from_body(&json!({"output_format":
            {"type": "json_schema", "schema": s}}));
        assert!(a.json && a.schema.as_ref() == Some(&s));
        assert!(!JsonExpectation::from_body(&json!({"response_format": {"type": "text"}})).json);

        // The request's schema joins the policy's checks only with `check_json`.
        let cfg = CascadeConfig::default();
        let checks = cfg.checks(None, &a);
        assert!(checks.expect_json && checks.schema.is_some());
        let off = CascadeConfig {
            check_json: false,
            ..cfg
        };
        let checks = off.checks(None, &a);
        assert!(!checks.expect_json && checks.schema.is_none());
    }

    #[test]
    fn the_default_policy_says_what_default_says() {
        assert_eq!(
            crate::Policy::default_policy().cascade(),
            &CascadeConfig::default()
        );
    }

    #[test]
    fn thresholds_take_numbers_or_off() {
        let c: CascadeConfig =
            toml::from_str("min_mean_logprob = -2\nmax_mean_entropy = \"off\"").unwrap();
        assert_eq!(c.min_mean_logprob, Some(-2.0));
        assert_eq!(c.max_mean_entropy, None);
        let e = toml::from_str::<CascadeConfig>("min_token_logprob = \"never\"").unwrap_err();
        assert!(e.to_string().contains("\"off\""), "{e}");
    }
}
