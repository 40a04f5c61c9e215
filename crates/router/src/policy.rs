//! Router policy: tiers, ordered rules, detector settings, classifier thresholds, budgets,
//! fallbacks and load overflow, read from TOML.
//!
//! # Merging with the defaults
//! `models/router/default.toml` is compiled into the crate. A user policy is merged over it so a
//! file that names only its tiers still gets every safety rule:
//! - `tiers`: the user's list replaces the default one; if it has no `kind = "local"` tier the
//!   default `local` tier is added.
//! - `rules`: the user's rules come first, then the default rules (set
//!   `inherit_default_rules = false` to drop the defaults; the detectors still apply).
//! - `routing`, `detectors`, `classifier`, `overflow`, `fallbacks`: merged key by key; the
//!   user's value wins.
//! - `budgets`: the user's list replaces the default one when present (`budgets = []` means no
//!   budgets).
//!
//! Detector findings (secrets, personal data, keep-local asks → `local-only`; injection →
//! `block`) are not rules and cannot be overridden by one; see [`crate::decide`].
//!
//! The name `local` always resolves: to a tier of that name, or else to the first local tier.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::breaker::BreakerConfig;
use crate::cascade::{CascadeConfig, Checks, JsonExpectation};
use crate::cost::Prices;
use crate::detect::{DetectorConfig, Detectors};

/// The default policy, embedded so safety never depends on a file being present.
pub const DEFAULT_POLICY_TOML: &str = include_str!("../../../models/router/default.toml");

/// Where the embedded default policy came from, for error messages.
const DEFAULT_POLICY_ORIGIN: &str = "models/router/default.toml (built in)";

/// The router's verdict on a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Serve on the local engine.
    Local,
    /// Serve on a remote frontier tier.
    Escalate,
    /// Serve locally and never send the content to a remote tier.
    LocalOnly,
    /// Refuse (or serve on the configured block tier).
    Block,
}

impl Action {
    /// The wire name (`local`, `escalate`, `local-only`, `block`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Local => "local",
            Action::Escalate => "escalate",
            Action::LocalOnly => "local-only",
            Action::Block => "block",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of place a tier is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierKind {
    /// The local engine.
    Local,
    /// An OpenAI-compatible chat-completions API.
    Openai,
    /// The Anthropic Messages API.
    Anthropic,
}

fn default_connect_timeout_ms() -> u64 {
    // Connecting to a healthy API takes well under a second even across continents.
    5_000
}
fn default_first_token_timeout_ms() -> u64 {
    // Frontier models with long prompts can think for tens of seconds before the first token.
    60_000
}
fn default_request_timeout_ms() -> u64 {
    // Long generations (8K tokens at ~40 tok/s) take ~3.5 minutes.
    300_000
}
fn default_max_concurrency() -> usize {
    64
}
fn default_max_retries() -> u32 {
    2
}
fn default_true() -> bool {
    true
}

/// One `[[tiers]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// The name requests and rules use.
    pub name: String,
    /// Local engine or a remote API kind.
    pub kind: TierKind,
    /// API root, e.g. `https://api.openai.com/v1` (remote tiers).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The environment variable holding the API key; when it is unset the tier is disabled.
    /// Omit it for an upstream that needs no key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The upstream model name.
    #[serde(default)]
    pub model: Option<String>,
    /// USD per million uncached input tokens.
    #[serde(default)]
    pub input_usd_per_mtok: f64,
    /// USD per million output tokens.
    #[serde(default)]
    pub output_usd_per_mtok: f64,
    /// USD per million cache-read input tokens; defaults to the input price (budgets then
    /// over- rather than under-estimate).
    #[serde(default)]
    pub cached_input_usd_per_mtok: Option<f64>,
    /// USD per million cache-write input tokens; defaults to the input price.
    #[serde(default)]
    pub cache_write_usd_per_mtok: Option<f64>,
    /// TCP + TLS connect timeout.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed until the response headers / first streamed token.
    #[serde(default = "default_first_token_timeout_ms")]
    pub first_token_timeout_ms: u64,
    /// Time allowed for a whole attempt.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Most requests in flight to this tier at once.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Retries after the first attempt on retryable failures (429, 5xx, timeouts).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Circuit breaker tuning.
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
}

impl TierConfig {
    /// Whether this is a remote tier.
    pub fn is_remote(&self) -> bool {
        self.kind != TierKind::Local
    }

    /// The tier's prices.
    pub fn prices(&self) -> Prices {
        Prices {
            input_usd_per_mtok: self.input_usd_per_mtok,
            output_usd_per_mtok: self.output_usd_per_mtok,
            cached_input_usd_per_mtok: self
                .cached_input_usd_per_mtok
                .unwrap_or(self.input_usd_per_mtok),
            cache_write_usd_per_mtok: self
                .cache_write_usd_per_mtok
                .unwrap_or(self.input_usd_per_mtok),
        }
    }

    /// The breaker tuning (defaults when unset).
    pub fn breaker_config(&self) -> BreakerConfig {
        self.breaker.unwrap_or_default()
    }
}

/// Which text a rule's content conditions look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// The latest user message: the task being asked (default).
    #[default]
    LastUser,
    /// Every user message.
    User,
    /// The system text.
    System,
    /// System, user, assistant and tool text.
    All,
}

/// One `[[rules]]` entry. All given conditions must hold; within a list any item may match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// A short name shown in reasons.
    pub name: String,
    /// What a match decides.
    pub action: Action,
    /// The tier to use (default: the escalate tier for `escalate`, the local tier otherwise,
    /// refuse for `block`).
    #[serde(default)]
    pub tier: Option<String>,
    /// Reason text shown to the user; defaults to the rule name.
    #[serde(default)]
    pub reason: Option<String>,
    /// Which text the content conditions read.
    #[serde(default)]
    pub scope: Scope,
    /// Regexes (case-insensitive unless they say `(?-i)`); any may match.
    #[serde(default)]
    pub regex: Vec<String>,
    /// Words or phrases matched on word boundaries, case-insensitively; any may match.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Regexes that veto the rule when any matches.
    #[serde(default)]
    pub unless: Vec<String>,
    /// Whether tools must (true) or must not (false) be present.
    #[serde(default)]
    pub tools: Option<bool>,
    /// Inclusive bounds on the characters of the scoped text.
    #[serde(default)]
    pub min_chars: Option<usize>,
    /// See `min_chars`.
    #[serde(default)]
    pub max_chars: Option<usize>,
    /// Inclusive bounds on the estimated prompt tokens of the whole request.
    #[serde(default)]
    pub min_tokens: Option<usize>,
    /// See `min_tokens`.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Endpoints (exact paths) the rule applies to.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// End-user ids the rule applies to.
    #[serde(default)]
    pub users: Vec<String>,
    /// API key ids the rule applies to.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Header name → regex its value must match.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Metadata key → regex its value must match.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Detector names (e.g. `email`) of which at least one must have fired.
    #[serde(default)]
    pub detectors: Vec<String>,
    /// Score name → minimum value (e.g. `difficulty = 0.7`, `scorer.legal = 0.6`).
    #[serde(default)]
    pub min_scores: BTreeMap<String, f64>,
}

/// `[routing]`: how actions map to tiers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// The action when no rule, explicit choice or classifier decides.
    pub default_action: Action,
    /// The tier `escalate` goes to (default: the first remote tier).
    #[serde(default)]
    pub escalate_tier: Option<String>,
    /// The tier blocked requests go to; unset refuses them with HTTP 400.
    #[serde(default)]
    pub block_tier: Option<String>,
    /// Honour `model: <tier>` and the `x-switchyard-route` header.
    #[serde(default = "default_true")]
    pub allow_explicit: bool,
}

/// `[classifier]`: when no rule matched, how scores decide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Difficulty (0..1) at or above which a request escalates.
    pub escalate_difficulty: f64,
    /// Least score a semantic category needs to decide.
    pub min_confidence: f64,
    /// Semantic category → action (e.g. `legal = "escalate"`).
    #[serde(default)]
    pub categories: BTreeMap<String, Action>,
}

/// What happens when a budget is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnExhausted {
    /// Serve on the local tier instead.
    #[default]
    Degrade,
    /// Refuse with HTTP 429.
    Refuse,
}

/// One `[[budgets]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Remote tier it caps; `"*"` caps each remote tier separately; unset caps all remote tiers
    /// together.
    #[serde(default)]
    pub tier: Option<String>,
    /// API key id it caps; `"*"` caps each key separately; unset caps all keys together.
    #[serde(default)]
    pub api_key: Option<String>,
    /// USD per UTC day.
    #[serde(default)]
    pub daily_usd: Option<f64>,
    /// USD per UTC month.
    #[serde(default)]
    pub monthly_usd: Option<f64>,
    /// Degrade to local or refuse.
    #[serde(default)]
    pub on_exhausted: OnExhausted,
}

/// `[overflow]`: spill `local` requests to a remote tier when the local queue is long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverflowConfig {
    /// Whether to overflow at all.
    pub enabled: bool,
    /// Local queue depth above which `local` requests overflow.
    pub max_local_queue: usize,
    /// Where they go (default: the escalate tier).
    #[serde(default)]
    pub tier: Option<String>,
}

/// The policy as written (after merging with the defaults), before compilation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Keep the default rules after the user's.
    #[serde(default = "default_true")]
    pub inherit_default_rules: bool,
    /// Tiers in preference order.
    pub tiers: Vec<TierConfig>,
    /// Action → tier mapping.
    pub routing: RoutingConfig,
    /// Ordered rules.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Detector settings.
    #[serde(default)]
    pub detectors: DetectorConfig,
    /// Classifier thresholds.
    pub classifier: ClassifierConfig,
    /// Spend caps.
    #[serde(default)]
    pub budgets: Vec<BudgetConfig>,
    /// Tier → ordered fallback tiers; `"*"` applies to tiers without their own entry.
    #[serde(default)]
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// Load overflow.
    pub overflow: OverflowConfig,
    /// Serve locally, check the answer, escalate the ones that fail.
    #[serde(default)]
    pub cascade: CascadeConfig,
}

/// Why a policy could not be loaded. Every message names the file, and the field when known.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read router policy {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema.
    #[error("router policy {origin} is not valid: {message}")]
    Parse {
        /// The file (or `<inline>`).
        origin: String,
        /// TOML's message, with line, column and key.
        message: String,
    },
    /// A value is out of range, refers to something missing, or does not compile.
    #[error("router policy {origin}: `{field}` {message}")]
    Invalid {
        /// The file (or `<inline>`).
        origin: String,
        /// The field path, e.g. `rules[2].regex[0]`.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The rule as written.
    pub spec: RuleConfig,
    regex: Vec<Regex>,
    keywords: Option<Regex>,
    unless: Vec<Regex>,
    headers: Vec<(String, Regex)>,
    metadata: Vec<(String, Regex)>,
}

/// A loaded, validated, compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    spec: PolicySpec,
    rules: Vec<Rule>,
    detectors: Detectors,
    cascade_match: Option<Regex>,
    origin: String,
}

fn merge_toml(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_toml(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn parse_table(text: &str, origin: &str) -> Result<toml::Table, PolicyError> {
    text.parse::<toml::Table>().map_err(|e| PolicyError::Parse {
        origin: origin.to_string(),
        message: e.to_string(),
    })
}

/// A partial policy, parsed only to report schema errors with line numbers before merging.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // fields exist so serde checks them
struct PartialSpec {
    #[serde(default)]
    inherit_default_rules: Option<bool>,
    #[serde(default)]
    tiers: Option<Vec<TierConfig>>,
    #[serde(default)]
    routing: Option<toml::Table>,
    #[serde(default)]
    rules: Option<Vec<RuleConfig>>,
    #[serde(default)]
    detectors: Option<DetectorConfig>,
    #[serde(default)]
    classifier: Option<toml::Table>,
    #[serde(default)]
    budgets: Option<Vec<BudgetConfig>>,
    #[serde(default)]
    fallbacks: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    overflow: Option<toml::Table>,
    #[serde(default)]
    cascade: Option<toml::Table>,
}

/// Checks that a field names a tier (remote when `Some(true)`, local when `Some(false)`).
type NeedTier<'a> = dyn Fn(String, &str, Option<bool>) -> Result<(), PolicyError> + 'a;

/// Checks `[cascade]`; returns its compiled `must_match`.
fn validate_cascade(
    spec: &PolicySpec,
    origin: &str,
    need_tier: &NeedTier<'_>,
) -> Result<Option<Regex>, PolicyError> {
    let c = &spec.cascade;
    let invalid = |field: &str, message: String| PolicyError::Invalid {
        origin: origin.to_string(),
        field: format!("cascade.{field}"),
        message,
    };
    if let Some(t) = &c.tier {
        need_tier("cascade.tier".into(), t, Some(true))?;
    }
    let has_remote = c.tier.is_some()
        || spec.routing.escalate_tier.is_some()
        || spec.tiers.iter().any(TierConfig::is_remote);
    if c.enabled && !has_remote {
        return Err(invalid(
            "enabled",
            "needs a remote tier to escalate to; add one to [[tiers]] or set enabled = false"
                .into(),
        ));
    }
    for (name, v) in [
        ("min_mean_logprob", c.min_mean_logprob),
        ("min_token_logprob", c.min_token_logprob),
    ] {
        if let Some(v) = v {
            if !v.is_finite() || v > 0.0 {
                return Err(invalid(
                    name,
                    format!("must be a log-probability ≤ 0 (or \"off\"), got {v}"),
                ));
            }
        }
    }
    if let Some(v) = c.max_mean_entropy {
        if !v.is_finite() || v < 0.0 {
            return Err(invalid(
                "max_mean_entropy",
                format!("must be an entropy ≥ 0 nats (or \"off\"), got {v}"),
            ));
        }
    }
    c.must_match
        .as_deref()
        .map(|p| {
            RegexBuilder::new(p)
                .size_limit(1 << 22)
                .build()
                .map_err(|e| invalid("must_match", format!("is not a valid regex: {e}")))
        })
        .transpose()
}

fn compile(field: &str, pattern: &str, origin: &str) -> Result<Regex, PolicyError> {
    RegexBuilder::new(pattern)
        .case_insensitive(true)
        .size_limit(1 << 22)
        .build()
        .map_err(|e| PolicyError::Invalid {
            origin: origin.to_string(),
            field: field.to_string(),
            message: format!("is not a valid regex: {e}"),
        })
}

impl Policy {
    /// The built-in default policy.
    pub fn default_policy() -> Policy {
        // The embedded file is tested by `default_policy_loads`; failing here is a build bug.
        Self::from_toml_str("", DEFAULT_POLICY_ORIGIN)
            .expect("the built-in default policy is valid")
    }

    /// Loads a policy file and merges it over the defaults.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Policy, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses policy text (named `origin` in errors) and merges it over the defaults.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        let parse_err = |message: String| PolicyError::Parse {
            origin: origin.to_string(),
            message,
        };
        let user = parse_table(text, origin)?;
        toml::from_str::<PartialSpec>(text).map_err(|e| parse_err(e.to_string()))?;
        let mut merged = parse_table(DEFAULT_POLICY_TOML, DEFAULT_POLICY_ORIGIN)?;
        let default_rules = merged.remove("rules");
        let default_local = merged
            .get("tiers")
            .and_then(|t| t.as_array())
            .and_then(|a| {
                a.iter()
                    .find(|t| t.get("kind").and_then(|k| k.as_str()) == Some("local"))
                    .cloned()
            });
        let inherit = user
            .get("inherit_default_rules")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let mut user = user;
        let user_rules = user.remove("rules");
        let user_tiers = user.remove("tiers");
        let user_budgets = user.remove("budgets");
        merge_toml(&mut merged, user);
        if let Some(toml::Value::Array(mut tiers)) = user_tiers {
            let has_local = tiers
                .iter()
                .any(|t| t.get("kind").and_then(|k| k.as_str()) == Some("local"));
            if !has_local {
                if let Some(local) = default_local {
                    tiers.insert(0, local);
                }
            }
            merged.insert("tiers".into(), toml::Value::Array(tiers));
        }
        if let Some(b) = user_budgets {
            merged.insert("budgets".into(), b);
        }
        let mut rules = match user_rules {
            Some(toml::Value::Array(r)) => r,
            _ => Vec::new(),
        };
        if inherit {
            if let Some(toml::Value::Array(d)) = default_rules {
                rules.extend(d);
            }
        }
        merged.insert("rules".into(), toml::Value::Array(rules));
        let spec: PolicySpec =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    parse_err(format!("after merging with the defaults: {e}"))
                })?;
        Self::from_spec(spec, origin)
    }

    /// Validates and compiles an already merged spec.
    pub fn from_spec(spec: PolicySpec, origin: &str) -> Result<Policy, PolicyError> {
        let invalid = |field: String, message: String| PolicyError::Invalid {
            origin: origin.to_string(),
            field,
            message,
        };
        // --- tiers
        let mut seen = Vec::new();
        for (i, t) in spec.tiers.iter().enumerate() {
            let f = |s: &str| format!("tiers[{i}].{s}");
            let ok_name = !t.name.is_empty()
                && t.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok_name {
                return Err(invalid(
                    f("name"),
                    format!(
                        "`{}` must be non-empty and use only letters, digits, `-`, `_` and `.`",
                        t.name
                    ),
                ));
            }
            if t.name == "auto" {
                return Err(invalid(
                    f("name"),
                    "`auto` is reserved for letting the router decide".into(),
                ));
            }
            if seen.contains(&t.name) {
                return Err(invalid(
                    f("name"),
                    format!("`{}` is used by two tiers", t.name),
                ));
            }
            seen.push(t.name.clone());
            if t.is_remote() {
                match &t.base_url {
                    Some(u) if u.starts_with("http://") || u.starts_with("https://") => {}
                    Some(u) => {
                        return Err(invalid(
                            f("base_url"),
                            format!("`{u}` must start with http:// or https://"),
                        ))
                    }
                    None => {
                        return Err(invalid(
                            f("base_url"),
                            "is required for a remote tier".into(),
                        ))
                    }
                }
                if t.model.as_deref().is_none_or(str::is_empty) {
                    return Err(invalid(f("model"), "is required for a remote tier".into()));
                }
            }
            for (name, v) in [
                ("input_usd_per_mtok", Some(t.input_usd_per_mtok)),
                ("output_usd_per_mtok", Some(t.output_usd_per_mtok)),
                ("cached_input_usd_per_mtok", t.cached_input_usd_per_mtok),
                ("cache_write_usd_per_mtok", t.cache_write_usd_per_mtok),
            ] {
                if let Some(v) = v {
                    if !v.is_finite() || v < 0.0 {
                        return Err(invalid(f(name), format!("must be a price ≥ 0, got {v}")));
                    }
                }
            }
            if t.max_concurrency == 0 {
                return Err(invalid(f("max_concurrency"), "must be at least 1".into()));
            }
            for (name, v) in [
                ("connect_timeout_ms", t.connect_timeout_ms),
                ("first_token_timeout_ms", t.first_token_timeout_ms),
                ("request_timeout_ms", t.request_timeout_ms),
            ] {
                if v == 0 {
                    return Err(invalid(f(name), "must be at least 1 ms".into()));
                }
            }
        }
        if !spec.tiers.iter().any(|t| t.kind == TierKind::Local) {
            return Err(invalid(
                "tiers".into(),
                "needs a tier with kind = \"local\"".into(),
            ));
        }
        let find = |name: &str| -> Option<&TierConfig> {
            spec.tiers.iter().find(|t| t.name == name).or_else(|| {
                (name == "local")
                    .then(|| spec.tiers.iter().find(|t| t.kind == TierKind::Local))
                    .flatten()
            })
        };
        let need_tier =
            |field: String, name: &str, remote: Option<bool>| -> Result<(), PolicyError> {
                match find(name) {
                    None => Err(invalid(
                        field,
                        format!(
                            "names tier `{name}`, which is not in [[tiers]] (have: {})",
                            seen.join(", ")
                        ),
                    )),
                    Some(t) if remote == Some(true) && !t.is_remote() => Err(invalid(
                        field,
                        format!("must name a remote tier; `{name}` is local"),
                    )),
                    Some(t) if remote == Some(false) && t.is_remote() => Err(invalid(
                        field,
                        format!("must name a local tier; `{name}` is remote"),
                    )),
                    Some(_) => Ok(()),
                }
            };
        // --- routing
        if let Some(t) = &spec.routing.escalate_tier {
            need_tier("routing.escalate_tier".into(), t, Some(true))?;
        }
        if let Some(t) = &spec.routing.block_tier {
            need_tier("routing.block_tier".into(), t, None)?;
        }
        if matches!(
            spec.routing.default_action,
            Action::Block | Action::LocalOnly
        ) {
            // Allowed (a strict deployment may default to local-only); nothing to check.
        }
        // --- overflow
        if let Some(t) = &spec.overflow.tier {
            need_tier("overflow.tier".into(), t, Some(true))?;
        }
        // --- cascade
        let cascade_match = validate_cascade(&spec, origin, &need_tier)?;
        // --- classifier
        for (name, v) in [
            (
                "classifier.escalate_difficulty",
                spec.classifier.escalate_difficulty,
            ),
            ("classifier.min_confidence", spec.classifier.min_confidence),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(invalid(
                    name.into(),
                    format!("must be between 0 and 1, got {v}"),
                ));
            }
        }
        // --- detectors
        for (name, v) in [
            (
                "detectors.secret_threshold",
                spec.detectors.secret_threshold,
            ),
            (
                "detectors.personal_data_threshold",
                spec.detectors.personal_data_threshold,
            ),
            (
                "detectors.keep_local_threshold",
                spec.detectors.keep_local_threshold,
            ),
            (
                "detectors.injection_threshold",
                spec.detectors.injection_threshold,
            ),
        ] {
            if !(0.0..=1.0).contains(&v) || v == 0.0 {
                return Err(invalid(name.into(), format!("must be in (0, 1], got {v}")));
            }
        }
        let detectors = Detectors::new(&spec.detectors)
            .map_err(|e| invalid(e.field, format!("is not a valid regex: {}", e.message)))?;
        // --- budgets
        for (i, b) in spec.budgets.iter().enumerate() {
            if let Some(t) = b.tier.as_deref().filter(|t| *t != "*") {
                need_tier(format!("budgets[{i}].tier"), t, Some(true))?;
            }
            for (name, v) in [("daily_usd", b.daily_usd), ("monthly_usd", b.monthly_usd)] {
                if let Some(v) = v {
                    if !v.is_finite() || v < 0.0 {
                        return Err(invalid(
                            format!("budgets[{i}].{name}"),
                            format!("must be ≥ 0, got {v}"),
                        ));
                    }
                }
            }
            if b.daily_usd.is_none() && b.monthly_usd.is_none() {
                return Err(invalid(
                    format!("budgets[{i}]"),
                    "needs daily_usd or monthly_usd".into(),
                ));
            }
        }
        // --- fallbacks
        for (from, chain) in &spec.fallbacks {
            if from != "*" {
                need_tier(format!("fallbacks.{from}"), from, None)?;
            }
            for (j, to) in chain.iter().enumerate() {
                need_tier(format!("fallbacks.{from}[{j}]"), to, None)?;
            }
        }
        // --- rules
        let mut rules = Vec::with_capacity(spec.rules.len());
        for (i, r) in spec.rules.iter().enumerate() {
            let f = |s: &str| format!("rules[{i}] (\"{}\").{s}", r.name);
            if r.name.is_empty() {
                return Err(invalid(
                    format!("rules[{i}].name"),
                    "must not be empty".into(),
                ));
            }
            if let Some(t) = &r.tier {
                let remote = match r.action {
                    Action::Escalate => Some(true),
                    Action::Local | Action::LocalOnly => Some(false),
                    Action::Block => None,
                };
                need_tier(f("tier"), t, remote)?;
            }
            let regex = r
                .regex
                .iter()
                .enumerate()
                .map(|(j, p)| compile(&f(&format!("regex[{j}]")), p, origin))
                .collect::<Result<Vec<_>, _>>()?;
            let unless = r
                .unless
                .iter()
                .enumerate()
                .map(|(j, p)| compile(&f(&format!("unless[{j}]")), p, origin))
                .collect::<Result<Vec<_>, _>>()?;
            let keywords = if r.keywords.is_empty() {
                None
            } else {
                if let Some(j) = r.keywords.iter().position(|k| k.trim().is_empty()) {
                    return Err(invalid(
                        f(&format!("keywords[{j}]")),
                        "must not be empty".into(),
                    ));
                }
                let alts: Vec<String> = r
                    .keywords
                    .iter()
                    .map(|k| regex::escape(k.trim()).replace(' ', r"\s+"))
                    .collect();
                Some(compile(
                    &f("keywords"),
                    &format!(r"\b(?:{})\b", alts.join("|")),
                    origin,
                )?)
            };
            let headers = r
                .headers
                .iter()
                .map(|(k, p)| {
                    Ok((
                        k.to_ascii_lowercase(),
                        compile(&f(&format!("headers.{k}")), p, origin)?,
                    ))
                })
                .collect::<Result<Vec<_>, PolicyError>>()?;
            let metadata = r
                .metadata
                .iter()
                .map(|(k, p)| Ok((k.clone(), compile(&f(&format!("metadata.{k}")), p, origin)?)))
                .collect::<Result<Vec<_>, PolicyError>>()?;
            rules.push(Rule {
                spec: r.clone(),
                regex,
                keywords,
                unless,
                headers,
                metadata,
            });
        }
        Ok(Policy {
            spec,
            rules,
            detectors,
            cascade_match,
            origin: origin.to_string(),
        })
    }

    /// The `[cascade]` table.
    pub fn cascade(&self) -> &CascadeConfig {
        &self.spec.cascade
    }

    /// The remote tier the cascade escalates to (whether or not it is enabled):
    /// `cascade.tier`, else the escalate tier; `None` when there is no remote tier.
    pub fn cascade_tier(&self) -> Option<&TierConfig> {
        match &self.spec.cascade.tier {
            Some(n) => self.tier(n),
            None => self.escalate_tier(),
        }
        .filter(|t| t.is_remote())
    }

    /// The checks a local answer to a request that expects `json` goes through.
    pub fn cascade_checks(&self, json: &JsonExpectation) -> Checks {
        self.spec.cascade.checks(self.cascade_match.clone(), json)
    }

    /// The merged policy as written.
    pub fn spec(&self) -> &PolicySpec {
        &self.spec
    }

    /// Where the policy came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Compiled rules in evaluation order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether a block or local-only rule reads a score the semantic scorer sets
    /// (`scorer.<category>`, or `difficulty`, which the scorer refines): only then does a
    /// request that names its tier need an embedding.
    pub fn safety_rules_read_scores(&self) -> bool {
        self.rules.iter().any(|r| {
            matches!(r.spec.action, Action::Block | Action::LocalOnly)
                && r.spec
                    .min_scores
                    .keys()
                    .any(|k| k.starts_with("scorer.") || k == "difficulty")
        })
    }

    /// Compiled detectors.
    pub fn detectors(&self) -> &Detectors {
        &self.detectors
    }

    /// All tiers.
    pub fn tiers(&self) -> &[TierConfig] {
        &self.spec.tiers
    }

    /// A tier by name; `local` falls back to the first local tier.
    pub fn tier(&self, name: &str) -> Option<&TierConfig> {
        self.spec
            .tiers
            .iter()
            .find(|t| t.name == name)
            .or_else(|| (name == "local").then(|| self.local_tier()))
    }

    /// The first local tier (validation guarantees one).
    pub fn local_tier(&self) -> &TierConfig {
        self.spec
            .tiers
            .iter()
            .find(|t| t.kind == TierKind::Local)
            .unwrap_or(&self.spec.tiers[0])
    }

    /// The tier `escalate` goes to: `routing.escalate_tier`, else the first remote tier.
    pub fn escalate_tier(&self) -> Option<&TierConfig> {
        match &self.spec.routing.escalate_tier {
            Some(n) => self.tier(n),
            None => self.spec.tiers.iter().find(|t| t.is_remote()),
        }
    }

    /// The fallback chain configured for `tier` (its own entry, else `"*"`), excluding itself.
    pub fn fallbacks_for(&self, tier: &str) -> Vec<&TierConfig> {
        let chain = self
            .spec
            .fallbacks
            .get(tier)
            .or_else(|| self.spec.fallbacks.get("*"));
        let mut out: Vec<&TierConfig> = Vec::new();
        for name in chain.into_iter().flatten() {
            if let Some(t) = self.tier(name) {
                if t.name != tier && !out.iter().any(|o| o.name == t.name) {
                    out.push(t);
                }
            }
        }
        out
    }
}

impl Rule {
    /// Whether the rule's non-content conditions and content conditions hold. `text` is the
    /// scoped text; `fired` tells whether a detector fired; `score` reads a decision score.
    pub fn matches(
        &self,
        req: &crate::request::RouteRequest,
        text: &str,
        fired: &dyn Fn(&str) -> bool,
        score: &dyn Fn(&str) -> Option<f64>,
    ) -> bool {
        let s = &self.spec;
        if let Some(t) = s.tools {
            if req.tools != t {
                return false;
            }
        }
        if !s.endpoints.is_empty() && !s.endpoints.contains(&req.endpoint) {
            return false;
        }
        if !s.users.is_empty() && !req.user.as_ref().is_some_and(|u| s.users.contains(u)) {
            return false;
        }
        if !s.api_keys.is_empty()
            && !req
                .api_key_id
                .as_ref()
                .is_some_and(|k| s.api_keys.contains(k))
        {
            return false;
        }
        for (name, re) in &self.headers {
            if !req.headers.get(name).is_some_and(|v| re.is_match(v)) {
                return false;
            }
        }
        for (name, re) in &self.metadata {
            if !req.metadata.get(name).is_some_and(|v| re.is_match(v)) {
                return false;
            }
        }
        let tokens = req.estimated_tokens();
        if s.min_tokens.is_some_and(|m| tokens < m) || s.max_tokens.is_some_and(|m| tokens > m) {
            return false;
        }
        if s.min_chars.is_some() || s.max_chars.is_some() {
            let chars = text.chars().count();
            if s.min_chars.is_some_and(|m| chars < m) || s.max_chars.is_some_and(|m| chars > m) {
                return false;
            }
        }
        if !s.detectors.is_empty() && !s.detectors.iter().any(|d| fired(d)) {
            return false;
        }
        for (name, min) in &s.min_scores {
            if !score(name).is_some_and(|v| v >= *min) {
                return false;
            }
        }
        let has_content = !self.regex.is_empty() || self.keywords.is_some();
        if has_content {
            let hit = self.regex.iter().any(|r| r.is_match(text))
                || self.keywords.as_ref().is_some_and(|k| k.is_match(text));
            if !hit {
                return false;
            }
        }
        !self.unless.iter().any(|r| r.is_match(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_loads() {
        let p = Policy::default_policy();
        assert_eq!(p.local_tier().name, "local");
        assert_eq!(p.escalate_tier().map(|t| t.name.as_str()), Some("frontier"));
        let f = p.tier("frontier").unwrap();
        assert_eq!(f.kind, TierKind::Openai);
        assert_eq!(f.api_key_env.as_deref(), Some("FRONTIER_API_KEY"));
        assert_eq!(f.model.as_deref(), Some("gpt-5.5"));
        assert_eq!(f.input_usd_per_mtok, 5.0);
        assert_eq!(f.output_usd_per_mtok, 15.0);
        assert!(p.rules().len() >= 8);
        assert!(!p.spec().budgets.is_empty());
    }

    #[test]
    fn tiers_only_policy_inherits_defaults() {
        let text = r#"
[[tiers]]
name = "claude"
kind = "anthropic"
base_url = "https://api.anthropic.com/v1"
api_key_env = "ANTHROPIC_API_KEY"
model = "claude-opus-4"
input_usd_per_mtok = 15.0
output_usd_per_mtok = 75.0
"#;
        let p = Policy::from_toml_str(text, "user.toml").unwrap();
        let d = Policy::default_policy();
        assert_eq!(p.tiers().len(), 2, "default local tier added");
        assert_eq!(p.local_tier().name, "local");
        assert_eq!(p.escalate_tier().unwrap().name, "claude");
        assert_eq!(p.rules().len(), d.rules().len());
        assert_eq!(p.spec().budgets, d.spec().budgets);
        assert_eq!(p.spec().detectors, d.spec().detectors);
        assert_eq!(p.spec().fallbacks, d.spec().fallbacks);
    }

    #[test]
    fn user_rules_come_first_and_tables_merge_by_key() {
        let text = r#"
[[rules]]
name = "acme-codename"
action = "local-only"
keywords = ["bluebird"]

[detectors]
entropy_bits_per_char = 4.0

[overflow]
max_local_queue = 3
"#;
        let p = Policy::from_toml_str(text, "user.toml").unwrap();
        let d = Policy::default_policy();
        assert_eq!(p.rules()[0].spec.name, "acme-codename");
        assert_eq!(p.rules().len(), d.rules().len() + 1);
        assert_eq!(p.spec().detectors.entropy_bits_per_char, 4.0);
        assert_eq!(
            p.spec().detectors.injection_threshold,
            d.spec().detectors.injection_threshold
        );
        assert_eq!(p.spec().overflow.max_local_queue, 3);
        assert_eq!(p.spec().overflow.enabled, d.spec().overflow.enabled);

        let no_inherit =
            "inherit_default_rules = false\n[[rules]]\nname = \"x\"\naction = \"local\"\n";
        assert_eq!(
            Policy::from_toml_str(no_inherit, "u")
                .unwrap()
                .rules()
                .len(),
            1
        );
        let no_budgets = "budgets = []\n";
        assert!(Policy::from_toml_str(no_budgets, "u")
            .unwrap()
            .spec()
            .budgets
            .is_empty());
    }

    #[test]
    fn errors_name_file_and_field() {
        let e = Policy::from_toml_str(
            "[[rules]]\nname = \"r\"\naction = \"local\"\nregex = [\"(\"]\n",
            "p.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("p.toml") && e.contains("rules[0] (\"r\").regex[0]"),
            "{e}"
        );

        let e = Policy::from_toml_str("[[rules]]\nname = \"r\"\naction = \"sideways\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("p.toml") && e.contains("action") && e.contains("line"),
            "{e}"
        );

        let e = Policy::from_toml_str("[routing]\nescalate_tier = \"nope\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("routing.escalate_tier") && e.contains("nope"),
            "{e}"
        );

        let e = Policy::from_toml_str(
            "[[tiers]]\nname = \"x\"\nkind = \"openai\"\nmodel = \"m\"\n",
            "p.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tiers[1].base_url"), "{e}");

        let e = Policy::from_toml_str("[routing]\ndefault_acton = \"local\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("default_acton"), "{e}");

        let e = Policy::from_path("/nonexistent/policy.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/policy.toml"), "{e}");

        let e = Policy::from_toml_str("[[budgets]]\ntier = \"*\"\ndaily_usd = -1.0\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("budgets[0].daily_usd"), "{e}");
    }
}
