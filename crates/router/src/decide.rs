//! The decision: `Decision = f(request, policy, state)`.
//!
//! Order of evaluation (the policy file header says the same for operators):
//! 1. **Safety floor.** Detector scores over their thresholds, and matching rules whose action
//!    is `block` or `local-only`, always apply: injection → `block`; secrets, personal data or
//!    a keep-it-local ask → `local-only`. Nothing later can lift them: a `local-only` request
//!    is served by a local tier whatever the explicit choice, rules, overflow or fallbacks say.
//! 2. **Explicit choice**: header `x-switchyard-route`, else `model`, naming `local`, a tier,
//!    or a remote tier's upstream model; `auto` (or an unknown name) lets the router decide.
//! 3. The **first matching routing rule** (`local` / `escalate`).
//! 4. The **classifier**: a [`SemanticScorer`]'s top category, then the difficulty score.
//! 5. `routing.default_action`.
//!
//! The tier is then resolved from the action: remote tiers whose API key is unset are
//! *disabled*, an open circuit breaker or a spent budget skips a tier, and the fallback chain
//! ends on the local tier. A `local` decision may overflow to a remote tier when the local queue
//! is over its limit, and otherwise may be marked for the [cascade](crate::cascade) (checked
//! after the fact, escalated if the answer fails). Every step that changed the outcome leaves a
//! reason.

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::breaker::BreakerPhase;
use crate::budget::Period;
use crate::detect::Signal;
use crate::policy::{Action, OnExhausted, Policy, Rule, Scope, TierConfig};
use crate::request::{Role, RouteRequest, CASCADE_HEADER, ROUTE_HEADER};
use crate::secret::ApiKey;
use crate::state::{RouterState, ANONYMOUS_KEY};

/// Why a request is refused instead of served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The HTTP status to answer with (400 for a blocked request, 429 for a spent budget).
    pub status: u16,
    /// A machine-readable code (`blocked_by_policy`, `budget_exhausted`).
    pub code: String,
    /// A sentence for the API user.
    pub message: String,
}

/// The router's decision. Serialises as `{"action", "tier", "reasons", "scores"}`, plus
/// `"cascade"` when the local answer is to be checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// What kind of request this is.
    pub action: Action,
    /// The tier that serves it; `None` when it is refused.
    pub tier: Option<String>,
    /// Why, in evaluation order.
    pub reasons: Vec<String>,
    /// Detector scores (`secret`, `personal_data`, `keep_local`, `injection`), `difficulty`
    /// and any `scorer.<category>` scores.
    pub scores: BTreeMap<String, f64>,
    /// Tiers to try, in order, if `tier` fails (never remote for `local-only`).
    #[serde(skip)]
    pub fallbacks: Vec<String>,
    /// Set when the request must be refused rather than served.
    #[serde(skip)]
    pub refusal: Option<Refusal>,
    /// The remote tier a cascade escalates to when the local answer fails its checks; set only
    /// on `local` decisions (see [`crate::cascade`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cascade: Option<String>,
}

impl Decision {
    /// The reasons joined for an HTTP header: ASCII only, `; `-separated, at most `max` bytes.
    pub fn header_reason(&self, max: usize) -> String {
        header_value(&self.reasons.join("; "), max)
    }
}

/// `s` as an HTTP header value: printable ASCII only (anything else becomes `?`), cut at `max`
/// bytes with `...` when cut.
pub fn header_value(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if out.len() > max {
        // Every char is ASCII now, so any byte index is a char boundary.
        out.truncate(max.saturating_sub(3));
        out.push_str("...");
    }
    out
}

/// Scores a semantic classifier gives a prompt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SemanticScores {
    /// Category → score in `0..=1` (names as in `[classifier.categories]`).
    pub categories: BTreeMap<String, f64>,
    /// Difficulty in `0..=1`, if the classifier estimates it.
    pub difficulty: Option<f64>,
}

/// A scorer failed; the rules decide without it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("semantic scorer failed: {0}")]
pub struct ScorerError(pub String);

/// A prompt classifier (e.g. sentence embeddings against labelled exemplars) that plugs into the
/// decision. With none, rules and the heuristic difficulty decide.
pub trait SemanticScorer: Send + Sync {
    /// Scores the task text (the latest user message).
    fn score(&self, prompt: &str) -> Result<SemanticScores, ScorerError>;
}

/// Decides without a semantic scorer (what `switchyard route` prints).
pub fn explain(policy: &Policy, req: &RouteRequest, state: &RouterState) -> Decision {
    decide(policy, req, state, None)
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

static REASONING_MARKERS: std::sync::LazyLock<Regex> = std::sync::LazyLock::new(|| {
    // A fixed pattern; covered by the difficulty tests.
    Regex::new(r"(?i)\b(why|trade-?offs?|compare|design|prove|optimal|strategy|evaluate|analy[sz]e|implications?|consequences|constraints|edge cases|step by step|plan|decide|justify|recommend|risks?|assumptions?|alternatives?)\b")
        .expect("difficulty marker pattern compiles")
});

/// A tokenizer-free difficulty estimate in `0..=1` from the task text: length, distinct
/// reasoning markers, several questions, enumerated requirements.
pub fn heuristic_difficulty(text: &str) -> f64 {
    let chars = text.chars().count() as f64;
    // Past ~3K characters a prompt is long whatever it asks; under 200 it is short.
    let length = ((chars - 200.0) / 3_000.0).clamp(0.0, 1.0) * 0.35;
    let mut markers: Vec<String> = REASONING_MARKERS
        .find_iter(text)
        .map(|m| m.as_str().to_ascii_lowercase())
        .collect();
    markers.sort();
    markers.dedup();
    let reasoning = (markers.len().min(4) as f64 / 4.0) * 0.45;
    let questions = match text.matches('?').count() {
        0 | 1 => 0.0,
        2 => 0.1,
        _ => 0.2,
    };
    let enumerated = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            t.starts_with("- ")
                || t.starts_with("* ")
                || t.split_once('.').is_some_and(|(n, _)| {
                    !n.is_empty() && n.len() <= 2 && n.chars().all(|c| c.is_ascii_digit())
                })
        })
        .count();
    let requirements = if enumerated >= 3 { 0.1 } else { 0.0 };
    (length + reasoning + questions + requirements).min(1.0)
}

fn scoped_text(req: &RouteRequest, scope: Scope) -> String {
    match scope {
        Scope::LastUser => req.last_user_text().to_string(),
        Scope::User => req.texts(&[Role::User]).collect::<Vec<_>>().join("\n"),
        Scope::System => req.system.clone(),
        Scope::All => req
            .texts(&[Role::System, Role::User, Role::Assistant, Role::Tool])
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

fn rule_reason(rule: &Rule) -> String {
    match &rule.spec.reason {
        Some(r) => format!("rule `{}`: {r}", rule.spec.name),
        None => format!("rule `{}` matched", rule.spec.name),
    }
}

enum Explicit<'p> {
    Auto,
    Tier(&'p TierConfig),
}

fn explicit_choice<'p>(
    policy: &'p Policy,
    req: &RouteRequest,
    reasons: &mut Vec<String>,
) -> Explicit<'p> {
    let (value, source) = match req.headers.get(ROUTE_HEADER) {
        Some(v) => (v.trim(), format!("header `{ROUTE_HEADER}`")),
        None => match req.model.as_deref() {
            Some(m) => (m.trim(), "`model`".to_string()),
            None => return Explicit::Auto,
        },
    };
    if value.is_empty() || value.eq_ignore_ascii_case("auto") {
        return Explicit::Auto;
    }
    let tier = policy.tier(value).or_else(|| {
        policy
            .tiers()
            .iter()
            .find(|t| t.is_remote() && t.model.as_deref() == Some(value))
    });
    match tier {
        Some(_) if !policy.spec().routing.allow_explicit => {
            reasons.push(format!(
                "{source} asks for `{value}`, but this policy does not allow choosing a tier; the router decides"
            ));
            Explicit::Auto
        }
        Some(t) => Explicit::Tier(t),
        None => {
            if source.starts_with("header") {
                reasons.push(format!(
                    "{source} names `{value}`, which is not a tier; the router decides"
                ));
            }
            Explicit::Auto
        }
    }
}

/// Why a remote tier cannot take the request now, or `None` when it can.
enum Unavailable {
    Skip(String),
    Refuse(String),
}

fn budget_exhausted(
    policy: &Policy,
    state: &RouterState,
    tier: &TierConfig,
    key: &str,
) -> Option<(OnExhausted, String)> {
    let mut hit: Option<(OnExhausted, String)> = None;
    for b in &policy.spec().budgets {
        let tier_filter = match b.tier.as_deref() {
            None => None,
            Some("*") => Some(tier.name.as_str()),
            Some(t) if t == tier.name => Some(t),
            Some(_) => continue,
        };
        let key_filter = match b.api_key.as_deref() {
            None => None,
            Some("*") => Some(key),
            Some(k) if k == key => Some(k),
            Some(_) => continue,
        };
        for (limit, period, label) in [
            (b.daily_usd, Period::Daily, "daily"),
            (b.monthly_usd, Period::Monthly, "monthly"),
        ] {
            let Some(limit) = limit else { continue };
            let spent = state.spent(tier_filter, key_filter, period);
            if spent >= limit {
                let scope = match (tier_filter, key_filter) {
                    (Some(t), Some(k)) => format!("tier `{t}` for API key `{k}`"),
                    (Some(t), None) => format!("tier `{t}`"),
                    (None, Some(k)) => format!("API key `{k}` across remote tiers"),
                    (None, None) => "all remote tiers".to_string(),
                };
                let msg =
                    format!("{label} budget of ${limit:.2} for {scope} is spent (${spent:.2})");
                let refuse = b.on_exhausted == OnExhausted::Refuse;
                if refuse || hit.is_none() {
                    hit = Some((b.on_exhausted, msg));
                }
                if refuse {
                    return hit;
                }
            }
        }
    }
    hit
}

fn remote_unavailable(
    policy: &Policy,
    state: &RouterState,
    tier: &TierConfig,
    key: &str,
) -> Option<Unavailable> {
    if let Some(var) = &tier.api_key_env {
        if ApiKey::from_env(var, state.env()).is_none() {
            return Some(Unavailable::Skip(format!(
                "tier `{}` is disabled: its API key variable {var} is unset",
                tier.name
            )));
        }
    }
    if state.breaker_phase(&tier.name) == BreakerPhase::Open {
        return Some(Unavailable::Skip(format!(
            "tier `{}` is failing (circuit breaker open)",
            tier.name
        )));
    }
    match budget_exhausted(policy, state, tier, key) {
        Some((OnExhausted::Refuse, msg)) => Some(Unavailable::Refuse(msg)),
        Some((OnExhausted::Degrade, msg)) => Some(Unavailable::Skip(format!("{msg}; degrading"))),
        None => None,
    }
}

/// Whether a `local` decision goes through the cascade, and to which remote tier: the policy's
/// `cascade.enabled` unless the request's `x-switchyard-cascade: on | off` says otherwise (`on`
/// only where explicit choices are allowed), and only while that tier is usable.
fn cascade_tier(
    policy: &Policy,
    state: &RouterState,
    req: &RouteRequest,
    key: &str,
    reasons: &mut Vec<String>,
) -> Option<String> {
    let enabled = policy.cascade().enabled;
    let asked = req
        .headers
        .get(CASCADE_HEADER)
        .map(|v| v.trim().to_ascii_lowercase());
    let on = match asked.as_deref() {
        None => enabled,
        Some("on" | "true" | "1") if policy.spec().routing.allow_explicit => true,
        Some("on" | "true" | "1") => {
            reasons.push(format!(
                "{CASCADE_HEADER} is ignored: the policy does not allow explicit choices"
            ));
            enabled
        }
        Some("off" | "false" | "0") => {
            if enabled {
                reasons.push("cascade turned off by the request".into());
            }
            false
        }
        Some(other) => {
            reasons.push(format!(
                "{CASCADE_HEADER}: `{other}` is not on or off; ignored"
            ));
            enabled
        }
    };
    if !on {
        return None;
    }
    let Some(tier) = policy.cascade_tier() else {
        reasons.push("cascade: there is no remote tier to escalate to".into());
        return None;
    };
    match remote_unavailable(policy, state, tier, key) {
        None => {
            reasons.push(format!(
                "cascade: the local answer is checked and escalated to `{}` if it fails",
                tier.name
            ));
            Some(tier.name.clone())
        }
        Some(Unavailable::Skip(why) | Unavailable::Refuse(why)) => {
            reasons.push(format!("cascade: not possible ({why})"));
            None
        }
    }
}

/// Decides with an optional semantic scorer.
pub fn decide(
    policy: &Policy,
    req: &RouteRequest,
    state: &RouterState,
    scorer: Option<&dyn SemanticScorer>,
) -> Decision {
    let cfg = policy.spec();
    let mut reasons = Vec::new();
    let mut scores = BTreeMap::new();

    // --- signals
    let det = policy.detectors().scan(req);
    for s in Signal::ALL {
        scores.insert(s.key().to_string(), round4(det.score(s)));
    }
    let task = req.last_user_text();
    scores.insert("difficulty".to_string(), round4(heuristic_difficulty(task)));
    let mut semantic = None;
    // The safety floor (block on injection, local-only on secrets, personal data or a
    // keep-local ask) does not depend on the semantic scores, so skip the embedding (most of
    // a decision's time) when a detector has already settled it. A request that names its
    // tier (`model: "local"`, the served model's id, the route header) only needs them when a
    // block or local-only rule reads them: routing rules and the classifier never run for it.
    let th = &cfg.detectors;
    let settled = det.score(Signal::Injection) >= th.injection_threshold
        || det.score(Signal::Secret) >= th.secret_threshold
        || det.score(Signal::PersonalData) >= th.personal_data_threshold
        || det.score(Signal::KeepLocal) >= th.keep_local_threshold;
    let explicit = explicit_choice(policy, req, &mut reasons);
    let pinned = matches!(explicit, Explicit::Tier(_)) && !policy.safety_rules_read_scores();
    if let Some(scorer) = scorer.filter(|_| !settled && !pinned) {
        match scorer.score(task) {
            Ok(s) => {
                for (k, v) in &s.categories {
                    scores.insert(format!("scorer.{k}"), round4(*v));
                }
                if let Some(d) = s.difficulty {
                    scores.insert("difficulty".to_string(), round4(d.clamp(0.0, 1.0)));
                }
                semantic = Some(s);
            }
            Err(e) => reasons.push(format!("{e}; rules decide")),
        }
    }

    // --- rules
    let mut routing_rule: Option<&Rule> = None;
    let mut block_rules: Vec<&Rule> = Vec::new();
    let mut local_only_rules: Vec<&Rule> = Vec::new();
    let fired = |name: &str| det.fired(name);
    let score_of = |name: &str| scores.get(name).copied();
    for rule in policy.rules() {
        let is_safety = matches!(rule.spec.action, Action::Block | Action::LocalOnly);
        if !is_safety && routing_rule.is_some() {
            continue;
        }
        let text = scoped_text(req, rule.spec.scope);
        if rule.matches(req, &text, &fired, &score_of) {
            match rule.spec.action {
                Action::Block => block_rules.push(rule),
                Action::LocalOnly => local_only_rules.push(rule),
                Action::Local | Action::Escalate => routing_rule = Some(rule),
            }
        }
    }

    // --- safety floor
    let mut local_only_reasons: Vec<String> = Vec::new();
    for (signal, threshold, label) in [
        (Signal::Secret, th.secret_threshold, "secret"),
        (
            Signal::PersonalData,
            th.personal_data_threshold,
            "personal data",
        ),
        (Signal::KeepLocal, th.keep_local_threshold, "keep-local ask"),
    ] {
        if det.score(signal) >= threshold {
            for f in det.of(signal) {
                local_only_reasons.push(format!("{label}: {}", f.detail));
            }
        }
    }
    local_only_reasons.extend(local_only_rules.iter().map(|r| rule_reason(r)));
    let local_only = !local_only_reasons.is_empty();

    let injection = det.score(Signal::Injection) >= th.injection_threshold;
    if injection || !block_rules.is_empty() {
        if injection {
            for f in det.of(Signal::Injection) {
                reasons.push(format!("injection: {}", f.detail));
            }
        }
        reasons.extend(block_rules.iter().map(|r| rule_reason(r)));
        let tier_name = block_rules
            .iter()
            .find_map(|r| r.spec.tier.clone())
            .or_else(|| cfg.routing.block_tier.clone());
        let tier = tier_name.as_deref().and_then(|n| policy.tier(n));
        return match tier {
            Some(t) => {
                let t = if t.is_remote() && local_only {
                    reasons.extend(local_only_reasons);
                    reasons.push(format!(
                        "block tier `{}` is remote but the content is local-only; serving on `{}`",
                        t.name,
                        policy.local_tier().name
                    ));
                    policy.local_tier()
                } else {
                    t
                };
                reasons.push(format!("blocked requests are served by tier `{}`", t.name));
                Decision {
                    action: Action::Block,
                    tier: Some(t.name.clone()),
                    reasons,
                    scores,
                    fallbacks: Vec::new(),
                    refusal: None,
                    cascade: None,
                }
            }
            None => {
                let message = format!(
                    "request blocked by the router policy: {}",
                    reasons
                        .first()
                        .cloned()
                        .unwrap_or_else(|| "policy rule".into())
                );
                Decision {
                    action: Action::Block,
                    tier: None,
                    reasons,
                    scores,
                    fallbacks: Vec::new(),
                    refusal: Some(Refusal {
                        status: 400,
                        code: "blocked_by_policy".into(),
                        message,
                    }),
                    cascade: None,
                }
            }
        };
    }

    if local_only {
        reasons.extend(local_only_reasons);
        let mut tier = local_only_rules
            .iter()
            .find_map(|r| r.spec.tier.as_deref().and_then(|n| policy.tier(n)))
            .unwrap_or_else(|| policy.local_tier());
        if let Explicit::Tier(t) = explicit {
            if t.is_remote() {
                reasons.push(format!(
                    "tier `{}` was requested, but local-only content is never sent to a remote tier; serving on `{}`",
                    t.name, tier.name
                ));
            } else {
                tier = t;
            }
        }
        return Decision {
            action: Action::LocalOnly,
            tier: Some(tier.name.clone()),
            reasons,
            scores,
            fallbacks: Vec::new(),
            refusal: None,
            cascade: None,
        };
    }

    // --- routing action
    let mut explicit_local = false;
    let (action, target): (Action, &TierConfig) = if let Explicit::Tier(t) = explicit {
        reasons.push(format!("tier `{}` requested explicitly", t.name));
        if t.is_remote() {
            (Action::Escalate, t)
        } else {
            explicit_local = true;
            (Action::Local, t)
        }
    } else if let Some(rule) = routing_rule {
        reasons.push(rule_reason(rule));
        let t = rule.spec.tier.as_deref().and_then(|n| policy.tier(n));
        (
            rule.spec.action,
            t.unwrap_or_else(|| default_tier(policy, rule.spec.action)),
        )
    } else if let Some((a, why)) = classify(policy, semantic.as_ref(), &scores) {
        reasons.push(why);
        (a, default_tier(policy, a))
    } else {
        let a = match cfg.routing.default_action {
            // A strict deployment may default everything to local-only; block as a default
            // would refuse every request, which validation allows but routing treats as local.
            Action::LocalOnly => {
                reasons.push("policy default: local-only".into());
                return Decision {
                    action: Action::LocalOnly,
                    tier: Some(policy.local_tier().name.clone()),
                    reasons,
                    scores,
                    fallbacks: Vec::new(),
                    refusal: None,
                    cascade: None,
                };
            }
            Action::Block => Action::Local,
            a => a,
        };
        reasons.push(format!("no rule matched; policy default is {a}"));
        (a, default_tier(policy, a))
    };

    let key = req.api_key_id.as_deref().unwrap_or(ANONYMOUS_KEY);

    // --- local: maybe overflow
    if !target.is_remote() {
        let of = &cfg.overflow;
        let depth = state.local_queue_depth();
        if action == Action::Local && !explicit_local && of.enabled && depth > of.max_local_queue {
            let over = of
                .tier
                .as_deref()
                .and_then(|n| policy.tier(n))
                .or_else(|| policy.escalate_tier());
            if let Some(o) = over.filter(|o| o.is_remote()) {
                match remote_unavailable(policy, state, o, key) {
                    None => {
                        reasons.push(format!(
                            "local queue depth {depth} is over {}; overflowing to `{}`",
                            of.max_local_queue, o.name
                        ));
                        return Decision {
                            action,
                            tier: Some(o.name.clone()),
                            reasons,
                            scores,
                            fallbacks: vec![target.name.clone()],
                            refusal: None,
                            cascade: None,
                        };
                    }
                    Some(Unavailable::Skip(why) | Unavailable::Refuse(why)) => {
                        reasons.push(format!(
                        "local queue depth {depth} is over {} but overflow is not possible: {why}",
                        of.max_local_queue
                    ))
                    }
                }
            }
        }
        let cascade = if action == Action::Local && !explicit_local {
            cascade_tier(policy, state, req, key, &mut reasons)
        } else {
            None
        };
        return Decision {
            action,
            tier: Some(target.name.clone()),
            reasons,
            scores,
            fallbacks: Vec::new(),
            refusal: None,
            cascade,
        };
    }

    // --- remote: walk the chain
    let mut chain: Vec<&TierConfig> = vec![target];
    for t in policy.fallbacks_for(&target.name) {
        if !chain.iter().any(|c| c.name == t.name) {
            chain.push(t);
        }
    }
    let mut usable: Vec<&TierConfig> = Vec::new();
    for t in chain {
        if !t.is_remote() {
            usable.push(t);
            continue;
        }
        match remote_unavailable(policy, state, t, key) {
            None => usable.push(t),
            Some(Unavailable::Skip(why)) => reasons.push(why),
            Some(Unavailable::Refuse(why)) => {
                reasons.push(format!("{why}; the policy refuses further remote requests"));
                return Decision {
                    action,
                    tier: None,
                    reasons,
                    scores,
                    fallbacks: Vec::new(),
                    refusal: Some(Refusal {
                        status: 429,
                        code: "budget_exhausted".into(),
                        message: format!(
                            "{why}; try again in the next budget period or ask for `local`"
                        ),
                    }),
                    cascade: None,
                };
            }
        }
    }
    let local = policy.local_tier();
    if !usable.iter().any(|t| !t.is_remote()) {
        // The local engine is the last resort of every chain.
        usable.push(local);
    }
    let chosen = usable[0];
    if chosen.name != target.name {
        reasons.push(format!("falling back to `{}`", chosen.name));
    }
    Decision {
        action,
        tier: Some(chosen.name.clone()),
        reasons,
        scores,
        fallbacks: usable[1..].iter().map(|t| t.name.clone()).collect(),
        refusal: None,
        cascade: None,
    }
}

fn default_tier(policy: &Policy, action: Action) -> &TierConfig {
    match action {
        Action::Escalate => policy
            .escalate_tier()
            .unwrap_or_else(|| policy.local_tier()),
        _ => policy.local_tier(),
    }
}

fn classify(
    policy: &Policy,
    semantic: Option<&SemanticScores>,
    scores: &BTreeMap<String, f64>,
) -> Option<(Action, String)> {
    let c = &policy.spec().classifier;
    if let Some(s) = semantic {
        let top = s
            .categories
            .iter()
            .filter(|(_, v)| v.is_finite())
            .max_by(|a, b| a.1.total_cmp(b.1));
        if let Some((cat, v)) = top {
            if *v >= c.min_confidence {
                if let Some(a) = c.categories.get(cat) {
                    if matches!(a, Action::Local | Action::Escalate) {
                        return Some((*a, format!("semantic classifier: `{cat}` ({v:.2}) -> {a}")));
                    }
                }
            }
        }
    }
    let d = scores.get("difficulty").copied().unwrap_or(0.0);
    (d >= c.escalate_difficulty).then(|| {
        (
            Action::Escalate,
            format!(
                "difficulty {d:.2} is at or over {:.2}",
                c.escalate_difficulty
            ),
        )
    })
}
