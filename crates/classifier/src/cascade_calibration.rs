//! Setting the cascade's confidence thresholds from data (`route-eval --replay --calibrate`).
//!
//! Every task of a replay file is answered once on the local tier with `logprobs: true`. A
//! [`CascadeRecord`] keeps that answer's per-token log-probabilities and entropies, whether it
//! passed the task's check, and (with `--measure-remote`) whether the cascade tier's answer
//! passed. [`calibrate_cascade`] then sweeps each confidence threshold of `[cascade]`
//! (`min_mean_logprob`, `min_token_logprob`, `max_mean_entropy`) on its own, the other two off.
//!
//! A point of the sweep is scored by running the cascade's own
//! [`check`](switchyard_router::cascade::check) on every recorded answer, with the policy's other
//! checks (refusal, truncation, empty answer, `must_match`) as the policy sets them, so a
//! threshold escalates here exactly the answers it would escalate in the server. Each point
//! reports the share escalated, the pass rate of the answers kept local, and the overall pass
//! rate: escalated answers assumed to pass, and measured when the remote tier was run.
//!
//! The chosen threshold is the one with the least escalation whose kept answers pass at least
//! the target ([`Target`]), within an escalation budget when one is given. Thresholds are
//! placed between neighbouring observed values and rounded to the fewest decimals that stay
//! between them (−0.35 and −1.53 give −1.0, not −0.94), so the printed value does the same as
//! the exact cut.
//!
//! ```
//! use switchyard_classifier::cascade_calibration::{calibrate_cascade, CascadeRecord, LocalAnswer, Signal, Target};
//! use switchyard_router::cascade::Checks;
//!
//! let answer = |lp: f64, pass: bool| CascadeRecord::from_answer(
//!     "t",
//!     pass,
//!     LocalAnswer { text: "x".into(), finish_reason: Some("stop".into()), logprobs: vec![lp], entropies: vec![0.5] },
//!     &Checks::default(),
//! );
//! let records = vec![answer(-0.1, true), answer(-0.2, true), answer(-2.0, false), answer(-0.3, false)];
//! let c = calibrate_cascade(&records, &Checks::default(), Target { kept_pass: 1.0, max_escalation: None });
//! let mean = &c.signals[0];
//! assert_eq!(mean.signal, Signal::MeanLogprob);
//! // Escalating the two least confident answers keeps only passing ones: a cut between -0.3 and -0.2.
//! let t = mean.chosen.as_ref().unwrap().threshold.unwrap();
//! assert!(-0.3 < t && t <= -0.2, "{t}");
//! assert_eq!(mean.chosen.as_ref().unwrap().escalated, 2);
//! ```

use serde::Serialize;
use serde_json::Value;
use switchyard_router::cascade::{check, Answer, Checks};

use crate::replay::Outcome;

/// One of the cascade's confidence thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Mean token log-probability; escalate below `min_mean_logprob`.
    MeanLogprob,
    /// Least token log-probability; escalate below `min_token_logprob`.
    MinTokenLogprob,
    /// Mean per-step entropy; escalate above `max_mean_entropy`.
    MeanEntropy,
}

impl Signal {
    /// All three, in the order reports list them.
    pub const ALL: [Signal; 3] = [
        Signal::MeanLogprob,
        Signal::MinTokenLogprob,
        Signal::MeanEntropy,
    ];

    /// The `[cascade]` field that sets it.
    pub fn field(self) -> &'static str {
        match self {
            Signal::MeanLogprob => "min_mean_logprob",
            Signal::MinTokenLogprob => "min_token_logprob",
            Signal::MeanEntropy => "max_mean_entropy",
        }
    }

    /// What it measures, for reports.
    pub fn label(self) -> &'static str {
        match self {
            Signal::MeanLogprob => "mean token logprob",
            Signal::MinTokenLogprob => "least token logprob",
            Signal::MeanEntropy => "mean token entropy",
        }
    }

    /// Whether a high value is the unconfident end (entropy) rather than a low one (logprobs).
    pub fn high_is_unsure(self) -> bool {
        self == Signal::MeanEntropy
    }

    /// The record's value of this signal.
    pub fn value(self, r: &CascadeRecord) -> Option<f64> {
        match self {
            Signal::MeanLogprob => r.mean_logprob,
            Signal::MinTokenLogprob => r.min_logprob,
            Signal::MeanEntropy => r.mean_entropy,
        }
    }

    /// `base` with this signal's threshold at `t` and the other two off.
    pub fn checks(self, base: &Checks, t: Option<f64>) -> Checks {
        let mut c = base.clone();
        c.min_mean_logprob = None;
        c.min_token_logprob = None;
        c.max_mean_entropy = None;
        match self {
            Signal::MeanLogprob => c.min_mean_logprob = t,
            Signal::MinTokenLogprob => c.min_token_logprob = t,
            Signal::MeanEntropy => c.max_mean_entropy = t,
        }
        c
    }

    /// Confidence on one scale for both kinds (higher = surer): the value, or minus it.
    fn confidence(self, v: f64) -> f64 {
        if self.high_is_unsure() {
            -v
        } else {
            v
        }
    }
}

/// A local answer as the OpenAI chat API returns it with `logprobs: true`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LocalAnswer {
    /// `choices[0].message.content`.
    pub text: String,
    /// `choices[0].finish_reason`.
    pub finish_reason: Option<String>,
    /// Each generated token's log-probability (`logprobs.content[i].logprob`).
    pub logprobs: Vec<f64>,
    /// Each step's entropy in nats (`logprobs.content[i].entropy`, a switchyard extension).
    pub entropies: Vec<f64>,
}

impl LocalAnswer {
    /// Reads `choices[0]` of a chat completion. Fails with a sentence naming the missing field
    /// when the response has no content or no logprobs, or a token has no `entropy` (a server
    /// that predates it).
    pub fn from_chat_response(v: &Value) -> Result<Self, String> {
        let choice = v
            .pointer("/choices/0")
            .ok_or("the response has no choices[0]")?;
        let text = choice
            .pointer("/message/content")
            .and_then(Value::as_str)
            .ok_or("the response has no choices[0].message.content")?
            .to_string();
        let content = choice
            .pointer("/logprobs/content")
            .and_then(Value::as_array)
            .ok_or("the response has no choices[0].logprobs.content (the server ignored `logprobs: true`)")?;
        let mut logprobs = Vec::with_capacity(content.len());
        let mut entropies = Vec::with_capacity(content.len());
        for (i, t) in content.iter().enumerate() {
            // A token without a finite logprob (JSON null) is skipped, as the cascade skips it.
            if let Some(lp) = t.get("logprob").and_then(Value::as_f64) {
                logprobs.push(lp);
            }
            match t.get("entropy") {
                None => {
                    return Err(format!(
                        "choices[0].logprobs.content[{i}] has no `entropy` (the server predates \
                         per-token entropies; rebuild it)"
                    ))
                }
                Some(h) => entropies.extend(h.as_f64()),
            }
        }
        Ok(Self {
            text,
            finish_reason: choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .map(str::to_string),
            logprobs,
            entropies,
        })
    }

    /// The cascade's view of it.
    pub fn as_answer(&self) -> Answer<'_> {
        Answer {
            text: &self.text,
            logprobs: &self.logprobs,
            entropies: &self.entropies,
            finish_reason: self.finish_reason.as_deref(),
        }
    }
}

/// One task answered on the local tier, with what the cascade would see.
#[derive(Debug, Clone, Serialize)]
pub struct CascadeRecord {
    /// The task's line in the file (0 when not from a file).
    pub line: usize,
    /// The task's id.
    pub id: String,
    /// The local answer passed the task's check.
    pub pass: bool,
    /// Mean token log-probability, as the cascade computes it.
    pub mean_logprob: Option<f64>,
    /// Least token log-probability.
    pub min_logprob: Option<f64>,
    /// Mean per-step entropy (nats).
    pub mean_entropy: Option<f64>,
    /// Why the policy's other checks (refusal, truncation, empty, `must_match`) escalate this
    /// answer whatever the thresholds; empty when they pass it.
    pub other_checks: Vec<String>,
    /// The answer itself.
    pub answer: LocalAnswer,
    /// The local request (latency, tokens, tier), when sent over HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<Outcome>,
    /// The cascade tier's answer to the same task (`--measure-remote`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<Outcome>,
}

impl CascadeRecord {
    /// A record of `answer` (which passed the task's check or not); `base` is the policy's
    /// cascade checks, whose thresholds are ignored here.
    pub fn from_answer(id: &str, pass: bool, answer: LocalAnswer, base: &Checks) -> Self {
        let v = check(&Signal::MeanLogprob.checks(base, None), &answer.as_answer());
        Self {
            line: 0,
            id: id.to_string(),
            pass,
            mean_logprob: v.mean_logprob,
            min_logprob: v.min_logprob,
            mean_entropy: v.mean_entropy,
            other_checks: v.reasons,
            answer,
            local: None,
            remote: None,
        }
    }

    /// A record of the local request `local` (its `pass` is the task's check on `answer`).
    pub fn from_outcome(local: Outcome, answer: LocalAnswer, base: &Checks) -> Self {
        let mut r = Self::from_answer(&local.id, local.pass, answer, base);
        r.line = local.line;
        r.local = Some(local);
        r
    }

    /// Whether the remote tier's answer passed (`None` when it was not run).
    pub fn remote_pass(&self) -> Option<bool> {
        self.remote.as_ref().map(|o| o.pass)
    }
}

/// What a threshold must achieve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Target {
    /// The answers kept local must pass at least this often (0..=1).
    pub kept_pass: f64,
    /// Escalate at most this share of tasks; `None` = no limit. When no threshold within the
    /// budget reaches `kept_pass`, the one within it whose kept answers pass most is chosen.
    pub max_escalation: Option<f64>,
}

/// The result of one threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurvePoint {
    /// The threshold (`None`: `"off"`, only the other checks escalate).
    pub threshold: Option<f64>,
    /// Tasks escalated (by the threshold or the other checks).
    pub escalated: usize,
    /// Their share of all tasks.
    pub escalation_rate: f64,
    /// Tasks kept local.
    pub kept: usize,
    /// Of which passed their check.
    pub kept_passed: usize,
    /// `kept_passed / kept` (`None` when nothing is kept).
    pub kept_pass_rate: Option<f64>,
    /// Share of all tasks passing if every escalated answer passes.
    pub pass_rate_assumed: f64,
    /// Share of all tasks passing with the remote tier's measured answers (when it was run for
    /// every task).
    pub pass_rate_measured: Option<f64>,
}

/// One signal's sweep and choice.
#[derive(Debug, Clone, Serialize)]
pub struct SignalCalibration {
    /// The signal.
    pub signal: Signal,
    /// Its `[cascade]` field.
    pub field: &'static str,
    /// Tasks whose answer has a value of it.
    pub tasks_with_value: usize,
    /// How well it separates passing from failing local answers: the probability that a
    /// passing answer is more confident than a failing one (ties count half); `None` without
    /// both kinds. 0.5 is chance.
    pub auroc: Option<f64>,
    /// `"off"`, then every distinct cut from the least to the most escalation.
    pub curve: Vec<CurvePoint>,
    /// The point chosen for the target (see [`Target`]).
    pub chosen: Option<CurvePoint>,
    /// Whether `chosen` reaches the kept-pass target (false: the best within the budget).
    pub meets_target: bool,
}

/// What the cascade part of `--calibrate` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CascadeCalibration {
    /// Tasks.
    pub tasks: usize,
    /// Local answers that passed their check.
    pub local_passed: usize,
    /// Tasks the policy's other checks escalate whatever the thresholds.
    pub escalated_by_other_checks: usize,
    /// Whether the remote tier was run on every task (`pass_rate_measured` is set).
    pub remote_measured: bool,
    /// The target.
    pub target: Target,
    /// Per signal, in [`Signal::ALL`] order.
    pub signals: Vec<SignalCalibration>,
    /// The signal the `[cascade]` snippet uses: of those meeting the target, the one escalating
    /// least (then: kept answers passing most); when none does, the one whose kept answers
    /// pass most within the budget (then: escalating least).
    pub recommended: Option<Signal>,
}

/// Sweeps each threshold over `records` (see the module docs). `base` is the policy's cascade
/// checks; its thresholds are replaced by the swept one.
pub fn calibrate_cascade(
    records: &[CascadeRecord],
    base: &Checks,
    target: Target,
) -> CascadeCalibration {
    let n = records.len();
    let remote_measured = n > 0 && records.iter().all(|r| r.remote.is_some());
    let signals: Vec<SignalCalibration> = Signal::ALL
        .iter()
        .map(|&s| calibrate_signal(records, base, s, target, remote_measured))
        .collect();
    let recommended = signals
        .iter()
        .filter_map(|c| c.chosen.as_ref().map(|p| (c, p)))
        .min_by(|(a, p), (b, q)| {
            let least_escalation = p.escalated.cmp(&q.escalated);
            let best_kept = kept_rate(q).total_cmp(&kept_rate(p));
            b.meets_target.cmp(&a.meets_target).then(if a.meets_target {
                least_escalation.then(best_kept)
            } else {
                best_kept.then(least_escalation)
            })
        })
        .map(|(c, _)| c.signal);
    CascadeCalibration {
        tasks: n,
        local_passed: records.iter().filter(|r| r.pass).count(),
        escalated_by_other_checks: records
            .iter()
            .filter(|r| !r.other_checks.is_empty())
            .count(),
        remote_measured,
        target,
        signals,
        recommended,
    }
}

fn kept_rate(p: &CurvePoint) -> f64 {
    p.kept_pass_rate.unwrap_or(-1.0)
}

fn calibrate_signal(
    records: &[CascadeRecord],
    base: &Checks,
    s: Signal,
    target: Target,
    remote_measured: bool,
) -> SignalCalibration {
    // Cuts only between answers the other checks keep: the others are escalated at any cut.
    let mut keys: Vec<f64> = records
        .iter()
        .filter(|r| r.other_checks.is_empty())
        .filter_map(|r| s.value(r))
        .filter(|v| v.is_finite())
        .map(|v| s.confidence(v))
        .collect();
    keys.sort_by(f64::total_cmp);
    keys.dedup();
    // Confidence is ≤ 0 for both kinds (logprob ≤ 0, −entropy ≤ 0), and so is every valid cut.
    // Cut j escalates every key ≤ keys[j]: it lies in (keys[j], keys[j + 1]], the last in
    // (keys[last], 0].
    let mut thresholds = vec![None];
    for (j, &lo) in keys.iter().enumerate() {
        let hi = keys.get(j + 1).copied().unwrap_or(0.0);
        if lo < hi {
            let cut = round_between(lo, hi);
            let t = if s.high_is_unsure() { -cut } else { cut };
            thresholds.push(Some(t + 0.0)); // + 0.0 turns −0 into 0
        }
    }
    let curve: Vec<CurvePoint> = thresholds
        .into_iter()
        .map(|t| score(records, base, s, t, remote_measured))
        .collect();
    let (chosen, meets_target) = choose(&curve, target);
    SignalCalibration {
        signal: s,
        field: s.field(),
        tasks_with_value: records.iter().filter(|r| s.value(r).is_some()).count(),
        auroc: auroc(records, s),
        curve,
        chosen,
        meets_target,
    }
}

/// Runs the cascade's check with `s` at `t` on every record.
fn score(
    records: &[CascadeRecord],
    base: &Checks,
    s: Signal,
    t: Option<f64>,
    remote_measured: bool,
) -> CurvePoint {
    let checks = s.checks(base, t);
    let n = records.len();
    let (mut escalated, mut kept_passed, mut remote_passed) = (0, 0, 0);
    for r in records {
        if check(&checks, &r.answer.as_answer()).escalate {
            escalated += 1;
            remote_passed += usize::from(r.remote_pass() == Some(true));
        } else {
            kept_passed += usize::from(r.pass);
        }
    }
    let kept = n - escalated;
    let share = |x: usize| if n == 0 { 0.0 } else { x as f64 / n as f64 };
    CurvePoint {
        threshold: t,
        escalated,
        escalation_rate: share(escalated),
        kept,
        kept_passed,
        kept_pass_rate: (kept > 0).then(|| kept_passed as f64 / kept as f64),
        pass_rate_assumed: share(kept_passed + escalated),
        pass_rate_measured: remote_measured.then(|| share(kept_passed + remote_passed)),
    }
}

/// The point with the least escalation that meets `target` within its budget; failing that,
/// with a budget, the point within it whose kept answers pass most.
fn choose(curve: &[CurvePoint], target: Target) -> (Option<CurvePoint>, bool) {
    const EPS: f64 = 1e-12;
    let budget = target.max_escalation.unwrap_or(1.0);
    let within: Vec<&CurvePoint> = curve
        .iter()
        .filter(|p| p.escalation_rate <= budget + EPS)
        .collect();
    let meeting = within
        .iter()
        .filter(|p| {
            p.kept_pass_rate
                .is_some_and(|r| r + EPS >= target.kept_pass)
        })
        .min_by(|p, q| {
            p.escalated
                .cmp(&q.escalated)
                .then(kept_rate(q).total_cmp(&kept_rate(p)))
        });
    if let Some(p) = meeting {
        return (Some((*p).clone()), true);
    }
    if target.max_escalation.is_none() {
        return (None, false);
    }
    let best = within
        .iter()
        .filter(|p| p.kept_pass_rate.is_some())
        .min_by(|p, q| {
            kept_rate(q)
                .total_cmp(&kept_rate(p))
                .then(p.escalated.cmp(&q.escalated))
        });
    (best.map(|p| (*p).clone()), false)
}

/// P(a passing answer is more confident than a failing one), ties counting half.
fn auroc(records: &[CascadeRecord], s: Signal) -> Option<f64> {
    let conf = |pass: bool| -> Vec<f64> {
        records
            .iter()
            .filter(|r| r.pass == pass)
            .filter_map(|r| s.value(r))
            .map(|v| s.confidence(v))
            .collect()
    };
    let (good, bad) = (conf(true), conf(false));
    if good.is_empty() || bad.is_empty() {
        return None;
    }
    let mut wins = 0.0;
    for g in &good {
        for b in &bad {
            wins += match g.total_cmp(b) {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Equal => 0.5,
                std::cmp::Ordering::Less => 0.0,
            };
        }
    }
    Some(wins / (good.len() * bad.len()) as f64)
}

/// A number in `(lo, hi]` with as few decimals as possible: the middle rounded to 0, 1, 2, …
/// decimals, the first that stays inside (the middle itself past 6).
pub fn round_between(lo: f64, hi: f64) -> f64 {
    let mid = lo + (hi - lo) / 2.0;
    for p in 0..=6 {
        let s = 10f64.powi(p);
        let c = (mid * s).round() / s;
        if lo < c && c <= hi {
            return c;
        }
    }
    mid
}

/// A threshold as TOML: `-1.0`, `-0.35`, `"off"`.
pub fn toml_threshold(t: Option<f64>) -> String {
    match t {
        None => "\"off\"".into(),
        Some(t) if t.fract() == 0.0 => format!("{t:.1}"),
        Some(t) => format!("{t}"),
    }
}

impl CascadeCalibration {
    /// The calibration of `s`.
    pub fn signal(&self, s: Signal) -> &SignalCalibration {
        &self.signals[Signal::ALL.iter().position(|&x| x == s).expect("in ALL")]
    }

    /// A `[cascade]` table with the recommended signal at its chosen threshold and the other
    /// two `"off"` (each was calibrated alone; together they would escalate more). `None` when
    /// no signal has a choice.
    pub fn toml_snippet(&self) -> Option<String> {
        let best = self.signal(self.recommended?);
        let p = best.chosen.as_ref()?;
        let mut s = String::from("[cascade]\n");
        s.push_str(&format!(
            "# route-eval --replay --calibrate, {} tasks: {}; {:.1}% escalated; overall pass {:.1}% if escalated answers pass{}\n",
            self.tasks,
            match (best.meets_target, p.kept_pass_rate) {
                (true, Some(k)) => format!(
                    "answers kept local pass {:.1}% (target {:.1}%)",
                    100.0 * k,
                    100.0 * self.target.kept_pass
                ),
                (false, Some(k)) => format!(
                    "answers kept local pass {:.1}%, short of the {:.1}% target within the {:.1}% escalation budget",
                    100.0 * k,
                    100.0 * self.target.kept_pass,
                    100.0 * self.target.max_escalation.unwrap_or(1.0)
                ),
                (_, None) => "nothing kept local".into(),
            },
            100.0 * p.escalation_rate,
            100.0 * p.pass_rate_assumed,
            p.pass_rate_measured
                .map(|m| format!(", {:.1}% measured", 100.0 * m))
                .unwrap_or_default(),
        ));
        for sig in Signal::ALL {
            let t = if sig == best.signal {
                p.threshold
            } else {
                None
            };
            s.push_str(&format!("{} = {}\n", sig.field(), toml_threshold(t)));
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn off() -> Checks {
        Checks {
            min_mean_logprob: None,
            min_token_logprob: None,
            max_mean_entropy: None,
            expect_json: false,
            schema: None,
            must_match: None,
            detect_refusal: true,
            escalate_on_truncation: true,
            min_chars: 1,
        }
    }

    fn rec(lps: &[f64], hs: &[f64], pass: bool, finish: &str) -> CascadeRecord {
        CascadeRecord::from_answer(
            "t",
            pass,
            LocalAnswer {
                text: "answer".into(),
                finish_reason: Some(finish.into()),
                logprobs: lps.to_vec(),
                entropies: hs.to_vec(),
            },
            &off(),
        )
    }

    #[test]
    fn rounds_to_the_fewest_decimals_between() {
        assert_eq!(round_between(-1.53, -0.35), -1.0);
        assert_eq!(round_between(-0.62, -0.58), -0.6);
        assert_eq!(
            round_between(-0.612, -0.611),
            -0.611,
            "the upper end is inside"
        );
        assert_eq!(round_between(-1.2, -1.0), -1.0, "the upper end is inside");
        assert_eq!(round_between(-2.0, -1.0), -1.5, "the lower end is not");
        assert_eq!(round_between(-0.2, 0.0), -0.0);
        let (lo, hi) = (-0.123_456_789_1, -0.123_456_789_0);
        let m = round_between(lo, hi);
        assert!(lo < m && m <= hi);
        assert_eq!(toml_threshold(Some(-1.0)), "-1.0");
        assert_eq!(toml_threshold(Some(-0.35)), "-0.35");
        assert_eq!(toml_threshold(Some(2.0)), "2.0");
        assert_eq!(toml_threshold(None), "\"off\"");
    }

    #[test]
    fn reads_the_chat_response() {
        let v = json!({"choices": [{"message": {"content": "Paris."}, "finish_reason": "stop",
            "logprobs": {"content": [
                {"token": "Paris", "logprob": -0.5, "entropy": 1.0, "top_logprobs": []},
                {"token": ".", "logprob": null, "entropy": 0.25, "top_logprobs": []}]}}]});
        let a = LocalAnswer::from_chat_response(&v).unwrap();
        assert_eq!(a.text, "Paris.");
        assert_eq!(a.finish_reason.as_deref(), Some("stop"));
        assert_eq!(a.logprobs, vec![-0.5]);
        assert_eq!(a.entropies, vec![1.0, 0.25]);
        let mut old = v.clone();
        old["choices"][0]["logprobs"]["content"][1]
            .as_object_mut()
            .unwrap()
            .remove("entropy");
        let e = LocalAnswer::from_chat_response(&old).unwrap_err();
        assert!(e.contains("content[1] has no `entropy`"), "{e}");
        let e =
            LocalAnswer::from_chat_response(&json!({"choices": [{"message": {"content": "x"}}]}))
                .unwrap_err();
        assert!(e.contains("logprobs.content"), "{e}");
        assert!(LocalAnswer::from_chat_response(&json!({}))
            .unwrap_err()
            .contains("choices[0]"));
    }

    #[test]
    fn records_the_cascade_numbers_and_other_checks() {
        let r = rec(&[-0.5, -1.5], &[1.0, 2.0], true, "stop");
        assert_eq!(r.mean_logprob, Some(-1.0));
        assert_eq!(r.min_logprob, Some(-1.5));
        assert_eq!(r.mean_entropy, Some(1.5));
        assert!(r.other_checks.is_empty());
        let t = rec(&[-0.1], &[0.1], true, "length");
        assert_eq!(t.other_checks.len(), 1, "{:?}", t.other_checks);
        assert!(t.other_checks[0].contains("length limit"));
    }

    /// Six answers: mean logprobs −0.1 … −3.0, pass for the confident half but one, and one
    /// truncated answer the other checks escalate anyway.
    fn six() -> Vec<CascadeRecord> {
        vec![
            rec(&[-0.1], &[0.2], true, "stop"),
            rec(&[-0.2], &[0.1], true, "stop"),
            rec(&[-0.5], &[0.9], false, "stop"),
            rec(&[-1.0], &[0.5], true, "stop"),
            rec(&[-3.0], &[2.0], false, "stop"),
            rec(&[-0.05], &[0.05], false, "length"),
        ]
    }

    #[test]
    fn sweeps_every_cut_and_picks_the_least_escalation_meeting_the_target() {
        let rs = six();
        let c = calibrate_cascade(
            &rs,
            &off(),
            Target {
                kept_pass: 0.75,
                max_escalation: None,
            },
        );
        assert_eq!(
            (c.tasks, c.local_passed, c.escalated_by_other_checks),
            (6, 3, 1)
        );
        let m = c.signal(Signal::MeanLogprob);
        let ts: Vec<Option<f64>> = m.curve.iter().map(|p| p.threshold).collect();
        // Cuts in (-3, -1], (-1, -0.5], (-0.5, -0.2], (-0.2, -0.1], (-0.1, 0], each the middle
        // rounded to the fewest decimals that stay inside.
        assert_eq!(
            ts,
            vec![
                None,
                Some(-2.0),
                Some(-0.8),
                Some(-0.4),
                Some(-0.15),
                Some(0.0)
            ]
        );
        let esc: Vec<usize> = m.curve.iter().map(|p| p.escalated).collect();
        assert_eq!(esc, vec![1, 2, 3, 4, 5, 6]);
        let kept: Vec<Option<f64>> = m.curve.iter().map(|p| p.kept_pass_rate).collect();
        assert_eq!(
            kept,
            vec![
                Some(0.6),
                Some(0.75),
                Some(2.0 / 3.0),
                Some(1.0),
                Some(1.0),
                None
            ]
        );
        // Off: the truncated one is escalated (and assumed to pass) plus 3 passing kept.
        assert!((m.curve[0].pass_rate_assumed - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(m.curve[0].pass_rate_measured, None);
        let p = m.chosen.as_ref().unwrap();
        assert!(m.meets_target);
        assert_eq!(p.threshold, Some(-2.0));
        assert_eq!(
            m.auroc,
            Some(5.0 / 9.0),
            "pass {{-0.1,-0.2,-1}} vs fail {{-0.5,-3,-0.05}}"
        );

        // Entropy escalates from the top: 2.0, 0.9, 0.5, 0.2, 0.1.
        let h = c.signal(Signal::MeanEntropy);
        let ts: Vec<Option<f64>> = h.curve.iter().map(|p| p.threshold).collect();
        assert_eq!(
            ts,
            vec![None, Some(1.0), Some(0.7), Some(0.4), Some(0.15), Some(0.0)]
        );
        let esc: Vec<usize> = h.curve.iter().map(|p| p.escalated).collect();
        assert_eq!(esc, vec![1, 2, 3, 4, 5, 6]);
        // Escalating 2.0 keeps 0.9 (failing) and three passing answers: 3/4.
        assert_eq!(h.chosen.as_ref().unwrap().threshold, Some(1.0));
        // A tie (2 escalated, 3/4 kept) goes to the first signal.
        assert_eq!(c.recommended, Some(Signal::MeanLogprob));

        let snippet = c.toml_snippet().unwrap();
        assert!(snippet.contains("min_mean_logprob = -2.0\n"), "{snippet}");
        assert!(
            snippet.contains("min_token_logprob = \"off\"\n"),
            "{snippet}"
        );
        assert!(
            snippet.contains("max_mean_entropy = \"off\"\n"),
            "{snippet}"
        );

        // 100% kept: the least escalation is 4 (mean logprob) or 3 (entropy): entropy wins.
        let c = calibrate_cascade(
            &rs,
            &off(),
            Target {
                kept_pass: 1.0,
                max_escalation: None,
            },
        );
        assert_eq!(
            c.signal(Signal::MeanLogprob)
                .chosen
                .as_ref()
                .unwrap()
                .escalated,
            4
        );
        assert_eq!(c.recommended, Some(Signal::MeanEntropy));
        // Within a 40% budget (2 of 6) 100% is out of reach: the best kept rate there.
        let c = calibrate_cascade(
            &rs,
            &off(),
            Target {
                kept_pass: 1.0,
                max_escalation: Some(0.4),
            },
        );
        let m = c.signal(Signal::MeanLogprob);
        assert!(!m.meets_target);
        assert_eq!(m.chosen.as_ref().unwrap().threshold, Some(-2.0));
        assert!(c
            .toml_snippet()
            .unwrap()
            .contains("short of the 100.0% target"));
        // Short of the target everywhere, the best kept rate wins over less escalation. With the
        // most confident answer failing, within 50% (3 of 6): mean logprob keeps 2/4 at 2
        // escalated, entropy 2/3 at 3 (it escalates 2.0 and 0.9 plus the truncated one).
        let mut worse = rs.clone();
        worse[0].pass = false;
        let c = calibrate_cascade(
            &worse,
            &off(),
            Target {
                kept_pass: 1.0,
                max_escalation: Some(0.5),
            },
        );
        assert!(c.signals.iter().all(|s| !s.meets_target));
        let m = c.signal(Signal::MeanLogprob).chosen.clone().unwrap();
        assert_eq!((m.escalated, m.kept_pass_rate), (2, Some(0.5)));
        let h = c.signal(Signal::MeanEntropy).chosen.clone().unwrap();
        assert_eq!((h.escalated, h.threshold), (3, Some(0.7)));
        assert_eq!(c.recommended, Some(Signal::MeanEntropy));
        assert!(c
            .toml_snippet()
            .unwrap()
            .contains("max_mean_entropy = 0.7\n"));
        // Without a budget an unreachable target chooses nothing.
        let none = calibrate_cascade(
            &rs[2..3],
            &off(),
            Target {
                kept_pass: 0.5,
                max_escalation: None,
            },
        );
        assert!(none.signals.iter().all(|s| s.chosen.is_none()));
        assert!(none.toml_snippet().is_none());
    }

    #[test]
    fn measured_remote_answers_replace_the_assumption() {
        let mut rs = six();
        for (i, r) in rs.iter_mut().enumerate() {
            r.remote = Some(Outcome {
                pass: i % 2 == 0,
                ..Outcome::default()
            });
        }
        let c = calibrate_cascade(
            &rs,
            &off(),
            Target {
                kept_pass: 0.9,
                max_escalation: None,
            },
        );
        assert!(c.remote_measured);
        let m = c.signal(Signal::MeanLogprob);
        // At -2.0: escalated = the truncated (index 5, remote fails) and -3.0 (index 4, passes);
        // kept passing: 3. (3 + 1) / 6.
        let p = &m.curve[1];
        assert_eq!(p.threshold, Some(-2.0));
        assert!((p.pass_rate_measured.unwrap() - 4.0 / 6.0).abs() < 1e-12);
        assert!((p.pass_rate_assumed - 5.0 / 6.0).abs() < 1e-12);
    }
}
