//! Cascade checks: after the local tier answered, should the request be re-asked on the
//! frontier tier? [`check`] looks at the answer's token log-probabilities (mean, minimum,
//! entropy), its form (valid JSON, required keys, a regex the caller expects) and its content
//! (a refusal, an empty or truncated answer) and returns a verdict with every reason.
//!
//! The server calls this once a local answer is complete (for streamed answers, before the
//! client has seen anything, i.e. only when buffering is acceptable).
//!
//! ```
//! use switchyard_classifier::cascade::{check, Answer, CascadeConfig};
//!
//! let cfg = CascadeConfig { expect_json: true, ..CascadeConfig::default() };
//! let v = check(&cfg, &Answer { text: "{\"ok\": true", ..Answer::default() });
//! assert!(v.escalate);
//! assert!(v.reasons[0].contains("JSON"));
//! ```

use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

/// Thresholds; `None` disables a check.
#[derive(Debug, Clone)]
pub struct CascadeConfig {
    /// Escalate when the mean token log-probability is below this (nats).
    pub min_mean_logprob: Option<f64>,
    /// Escalate when any token's log-probability is below this.
    pub min_token_logprob: Option<f64>,
    /// Escalate when the mean per-token entropy (nats) is above this.
    pub max_mean_entropy: Option<f64>,
    /// The answer must be JSON (a fenced ```json block is accepted).
    pub expect_json: bool,
    /// With `expect_json`, top-level keys the object must have.
    pub required_keys: Vec<String>,
    /// The answer must match this.
    pub must_match: Option<Regex>,
    /// Escalate on refusals ("I can't help with that", "As an AI language model …").
    pub detect_refusal: bool,
    /// Escalate when the answer stopped on the length limit.
    pub escalate_on_truncation: bool,
    /// Escalate when the answer has fewer non-space characters than this.
    pub min_chars: usize,
}

impl Default for CascadeConfig {
    /// Log-probability thresholds of a small instruct model's confident answers sit above a
    /// mean of −1.0 nats/token; a single token under −6 (p < 0.25%) marks a guess. These are
    /// starting points for `route-eval --replay --calibrate`, not measurements.
    fn default() -> Self {
        Self {
            min_mean_logprob: Some(-1.0),
            min_token_logprob: None,
            max_mean_entropy: Some(2.5),
            expect_json: false,
            required_keys: Vec::new(),
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
    /// Log-probability of each generated token (empty when unknown).
    pub logprobs: &'a [f64],
    /// Entropy of each step's distribution, when the sampler reports it (else estimated from
    /// nothing: the entropy check is skipped).
    pub entropies: &'a [f64],
    /// `stop`, `length`, …
    pub finish_reason: Option<&'a str>,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Re-ask on the frontier tier.
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
pub fn parse_json_answer(text: &str) -> Option<serde_json::Value> {
    let t = text.trim();
    let inner = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|r| r.trim_end().strip_suffix("```"))
        .unwrap_or(t);
    serde_json::from_str(inner.trim()).ok()
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
pub fn check(cfg: &CascadeConfig, a: &Answer<'_>) -> Verdict {
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
                let missing: Vec<&str> = cfg
                    .required_keys
                    .iter()
                    .filter(|k| v.get(k.as_str()).is_none())
                    .map(String::as_str)
                    .collect();
                if !missing.is_empty() {
                    reasons.push(format!("the JSON lacks {}", missing.join(", ")));
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

    fn off() -> CascadeConfig {
        CascadeConfig {
            min_mean_logprob: None,
            min_token_logprob: None,
            max_mean_entropy: None,
            expect_json: false,
            required_keys: Vec::new(),
            must_match: None,
            detect_refusal: false,
            escalate_on_truncation: false,
            min_chars: 0,
        }
    }

    #[test]
    fn confident_answer_passes_defaults() {
        let v = check(
            &CascadeConfig::default(),
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
        let cfg = CascadeConfig {
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
        let json = CascadeConfig {
            expect_json: true,
            required_keys: vec!["name".into()],
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

        let re = CascadeConfig {
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

        let trunc = CascadeConfig {
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
}
