//! `switchyard route-eval`: how well does the router route?
//!
//! - `--routellm DIR --split test|train [--out DIR]`: the difficulty model against a random
//!   and a prompt-length router on RouteLLM's GSM8K and MMLU (APGR, quality against the
//!   fraction escalated, the escalation needed for 80% / 95%); writes `summary.json` and
//!   `frontier.svg`.
//! - `--suite FILE.jsonl`: a labelled `{"prompt", "expect"}` suite through the policy, with and
//!   without the semantic classifier: accuracy, confusion matrix, every miss with its reasons.
//! - `--replay FILE.jsonl --server URL`: sends `{"prompt", "check"}` tasks (format in
//!   [`switchyard_classifier::replay`]) to a running server (`model: "auto"`, one at a time)
//!   and reports pass rate, latency, tokens and cost per tier that answered. With
//!   `--calibrate --target-pass-rate X` it decides each task locally with the server's policy
//!   (`--policy`) and scorer (`--no-classifier` when the server runs without one): tasks a rule
//!   settles are sent once as `auto`, tasks the difficulty threshold routes are sent to both
//!   tiers by name; then it prints the `classifier.escalate_difficulty` that meets the target
//!   at the least cost. The same `--calibrate` also sends every task to the local tier (the
//!   served model id) with logprobs, records the confidence signals the cascade checks, and
//!   prints per signal the threshold sweep, the threshold meeting `--target-kept-pass` (within
//!   `--max-escalation`), and a `[cascade]` table
//!   ([`switchyard_classifier::cascade_calibration`]). `--calibrate difficulty|cascade` runs
//!   one of the two.
//!
//! `--json` prints the suite, replay or calibration report as JSON on stdout instead of tables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use switchyard_classifier::cascade_calibration::{
    calibrate_cascade, toml_threshold, CascadeCalibration, CascadeRecord, CurvePoint, LocalAnswer,
    Target as CascadeTarget,
};
use switchyard_classifier::replay::{
    calibrate, load_tasks, CalibrationRow, Outcome, ReplayReport, Route, Task, TierStats,
};
use switchyard_classifier::route_eval::{evaluate_routellm, write_outputs};
use switchyard_classifier::routellm::Split;
use switchyard_classifier::{default_router_dir, DifficultyModel, Embedder, RouterScorer};
use switchyard_router::eval::{load_suite, run_suite, SuiteReport};
use switchyard_router::{
    decide, EnvSource, JsonExpectation, Policy, RouteRequest, RouterState, SemanticScorer,
    SystemClock,
};

#[derive(clap::Args, Debug)]
pub struct RouteEvalArgs {
    /// RouteLLM data folder (gsm8k_responses.csv, mmlu/).
    #[arg(long, conflicts_with_all = ["suite", "replay"])]
    routellm: Option<PathBuf>,
    /// Which side of the fixed split to evaluate on (`--routellm`).
    #[arg(long, default_value = "test")]
    split: Split,
    /// A labelled suite, one `{"prompt", "expect"}` per line.
    #[arg(long, conflicts_with = "replay")]
    suite: Option<PathBuf>,
    /// Tasks to replay against a server, one `{"prompt", "check"}` per line.
    #[arg(long, requires = "server")]
    replay: Option<PathBuf>,
    /// The server's base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    server: Option<String>,
    /// API key for the server (sent as a bearer token).
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Router policy (TOML); default: the built-in models/router/default.toml.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Output folder (summary.json, frontier.svg, suite.json, replay.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Sentence-embedding model: a folder or hub id (default: $SWITCHYARD_MINILM_DIR, the
    /// scripts/minilm.sh cache, then the hf-hub cache).
    #[arg(long)]
    minilm: Option<String>,
    /// Folder with exemplars.jsonl and difficulty.safetensors (default: models/router).
    #[arg(long)]
    router_models: Option<PathBuf>,
    /// Embedding cache for the RouteLLM prompts (default: .cache/routellm-minilm.safetensors).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Suite and calibration: rules and the heuristic difficulty only, without the semantic
    /// classifier (as `serve` without --classifier).
    #[arg(long)]
    no_classifier: bool,
    /// Replay mode: calibrate thresholds. `difficulty`: the difficulty threshold that meets
    /// --target-pass-rate at least cost (tasks the threshold routes are sent to both tiers).
    /// `cascade`: the cascade's confidence thresholds (every task sent to the local tier with
    /// logprobs). No value, or `both`: both.
    #[arg(
        long,
        requires = "replay",
        num_args = 0..=1,
        default_missing_value = "both",
        value_name = "WHAT"
    )]
    calibrate: Option<Calibrate>,
    /// The pass rate `--calibrate` (difficulty) must reach, in 0..=1.
    #[arg(long, default_value_t = 0.9, value_parser = parse_fraction)]
    target_pass_rate: f64,
    /// `--calibrate` (cascade): the pass rate the answers kept local must reach, in 0..=1; the
    /// threshold escalating least that reaches it is chosen.
    #[arg(long, default_value_t = 0.9, value_parser = parse_fraction)]
    target_kept_pass: f64,
    /// `--calibrate` (cascade): escalate at most this share of tasks, in 0..=1 (when the target
    /// is out of reach within it, the threshold whose kept answers pass most is chosen).
    #[arg(long, value_parser = parse_fraction)]
    max_escalation: Option<f64>,
    /// `--calibrate` (cascade): also send every task to the cascade's remote tier and score
    /// escalated answers by its measured pass instead of assuming they pass.
    #[arg(long, requires = "calibrate")]
    measure_remote: bool,
    /// `max_tokens` for replayed requests.
    #[arg(long, default_value_t = 512)]
    max_tokens: u32,
    /// Replay: seconds one request may take before it counts as failed.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Print the suite, replay or calibration report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// What `--calibrate` calibrates.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Calibrate {
    /// The difficulty threshold and the cascade's thresholds.
    Both,
    /// `classifier.escalate_difficulty`.
    Difficulty,
    /// `[cascade]` `min_mean_logprob`, `min_token_logprob`, `max_mean_entropy`.
    Cascade,
}

impl Calibrate {
    fn difficulty(self) -> bool {
        self != Calibrate::Cascade
    }

    fn cascade(self) -> bool {
        self != Calibrate::Difficulty
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(format!("{s:?} is not a number in 0..=1")),
    }
}

pub fn run(a: RouteEvalArgs) -> Result<()> {
    if let Some(dir) = a.routellm.clone() {
        return run_routellm(&a, &dir);
    }
    if let Some(suite) = a.suite.clone() {
        return run_suite_mode(&a, &suite);
    }
    if let Some(tasks) = a.replay.clone() {
        return run_replay(&a, &tasks);
    }
    bail!("give one of --routellm DIR, --suite FILE.jsonl or --replay FILE.jsonl --server URL")
}

fn load_policy(a: &RouteEvalArgs) -> Result<Policy> {
    Ok(match &a.policy {
        Some(p) => {
            Policy::from_path(p).with_context(|| format!("loading policy {}", p.display()))?
        }
        None => Policy::default_policy(),
    })
}

fn router_dir(a: &RouteEvalArgs) -> PathBuf {
    a.router_models.clone().unwrap_or_else(default_router_dir)
}

fn embedder(a: &RouteEvalArgs) -> Result<Arc<Embedder>> {
    Ok(Arc::new(Embedder::from_spec(a.minilm.as_deref()).context(
        "loading the sentence-embedding model (run scripts/minilm.sh)",
    )?))
}

fn write_json(dir: &Path, name: &str, v: &impl Serialize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

// ----------------------------------------------------------------------------- RouteLLM

fn run_routellm(a: &RouteEvalArgs, data: &Path) -> Result<()> {
    let e = embedder(a)?;
    let art = router_dir(a).join(switchyard_classifier::scorer::DIFFICULTY_FILE);
    let model =
        DifficultyModel::load(&art).with_context(|| format!("loading {}", art.display()))?;
    let cache = a
        .cache
        .clone()
        .unwrap_or_else(|| PathBuf::from(".cache/routellm-minilm.safetensors"));
    let t0 = Instant::now();
    let mut last = Instant::now();
    let summary = evaluate_routellm(data, a.split, &e, &model, Some(&cache), |done, todo| {
        if last.elapsed().as_secs() >= 10 || done == todo {
            last = Instant::now();
            eprintln!("embedding prompts: {done}/{todo}");
        }
    })
    .with_context(|| format!("evaluating on {}", data.display()))?;
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("route-eval"));
    write_outputs(&summary, &out)?;
    println!(
        "RouteLLM {:?} split ({:.1}s)",
        a.split,
        t0.elapsed().as_secs_f64()
    );
    for (bench, b) in &summary.benchmarks {
        println!(
            "\n{bench}: n = {}, local accuracy {:.3}, frontier accuracy {:.3}",
            b.n, b.weak_accuracy, b.strong_accuracy
        );
        println!(
            "  {:<26} {:>6} {:>10} {:>10} {:>12} {:>12}",
            "router", "APGR", "CPT(80%)", "CPT(95%)", "80% quality", "95% quality"
        );
        for (name, r) in &b.routers {
            println!(
                "  {:<26} {:>6.3} {:>9.1}% {:>9.1}% {:>11.1}% {:>11.1}%",
                name,
                r.apgr,
                100.0 * r.escalated_for_80pct_pgr,
                100.0 * r.escalated_for_95pct_pgr,
                100.0 * r.escalated_for_80pct_quality,
                100.0 * r.escalated_for_95pct_quality
            );
        }
    }
    println!("\nCPT(x%): fraction escalated to recover x% of the local→frontier accuracy gap.");
    println!(
        "wrote {} and {}",
        out.join("summary.json").display(),
        out.join("frontier.svg").display()
    );
    Ok(())
}

// ----------------------------------------------------------------------------- suite

#[derive(Serialize)]
struct SuiteOut<'a> {
    with_classifier: Option<&'a SuiteReport>,
    rules_only: &'a SuiteReport,
}

fn print_report(title: &str, r: &SuiteReport) {
    println!(
        "{title}: {}/{} = {:.1}%",
        r.correct,
        r.total,
        100.0 * r.accuracy
    );
    let actions = ["local", "escalate", "local-only", "block"];
    println!(
        "  expected \\ got {:>10} {:>10} {:>10} {:>10}",
        actions[0], actions[1], actions[2], actions[3]
    );
    for (exp, row) in &r.confusion {
        let cell = |name: &str| {
            row.iter()
                .find(|(k, _)| k.as_str() == name)
                .map_or(0, |(_, v)| *v)
        };
        println!(
            "  {:<15} {:>10} {:>10} {:>10} {:>10}",
            exp.as_str(),
            cell(actions[0]),
            cell(actions[1]),
            cell(actions[2]),
            cell(actions[3])
        );
    }
    for m in &r.misses {
        let prompt: String = m.prompt.chars().take(100).collect();
        println!(
            "  miss line {}: expected {}, got {}: {prompt:?}",
            m.line,
            m.expect.as_str(),
            m.got.as_str()
        );
        for why in &m.reasons {
            println!("      - {why}");
        }
    }
}

fn run_suite_mode(a: &RouteEvalArgs, suite: &Path) -> Result<()> {
    let policy = load_policy(a)?;
    let cases = load_suite(suite)?;
    let rules = run_suite(&policy, &cases, None);
    let with = if a.no_classifier {
        None
    } else {
        let scorer = RouterScorer::load(&embedder(a)?, &router_dir(a))
            .context("loading the router classifier")?;
        let t0 = Instant::now();
        let r = run_suite(&policy, &cases, Some(&scorer as &dyn SemanticScorer));
        eprintln!(
            "{} decisions with the classifier in {:.2}s",
            cases.len(),
            t0.elapsed().as_secs_f64()
        );
        Some(r)
    };
    let both = SuiteOut {
        with_classifier: with.as_ref(),
        rules_only: &rules,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&both)?);
    } else {
        if let Some(w) = &with {
            print_report("with the semantic classifier", w);
            println!();
        }
        print_report("rules only", &rules);
    }
    if let Some(out) = &a.out {
        let p = write_json(out, "suite.json", &both)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

// ----------------------------------------------------------------------------- replay

/// What [`Target::check_reachable`] says when `/health` names no model.
const UNKNOWN_MODEL: &str = "unknown model";

/// The server a replay talks to.
struct Target {
    client: reqwest::Client,
    base: String,
    chat_url: String,
    api_key: Option<String>,
    max_tokens: u32,
}

impl Target {
    fn new(a: &RouteEvalArgs) -> Result<Self> {
        let given = a.server.as_deref().context("--replay needs --server URL")?;
        let url = reqwest::Url::parse(given).with_context(|| {
            format!("--server {given:?} is not a URL (e.g. http://127.0.0.1:8080)")
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("--server {given:?}: the scheme must be http or https");
        }
        let base = url
            .as_str()
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .to_string();
        Ok(Self {
            client: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .timeout(std::time::Duration::from_secs(a.timeout_s.max(1)))
                .build()?,
            chat_url: format!("{base}/v1/chat/completions"),
            base,
            api_key: a.api_key.clone(),
            max_tokens: a.max_tokens,
        })
    }

    /// `GET /health`; the served model's id. Fails with a sentence when nothing answers.
    async fn check_reachable(&self) -> Result<String> {
        let url = format!("{}/health", self.base);
        let resp = self.client.get(&url).send().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the server at {}: {} (is `switchyard serve` running there?)",
                self.base,
                error_chain(&e)
            )
        })?;
        let status = resp.status();
        let v: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            bail!(
                "{url} answered HTTP {status}; is {} a switchyard server?",
                self.base
            );
        }
        Ok(v["model"].as_str().unwrap_or(UNKNOWN_MODEL).to_string())
    }

    /// Sends `task` with `model`, judges the answer. An HTTP error or a timeout is an outcome
    /// (the task failed); a server that cannot be reached any more is an error.
    async fn send(&self, origin: &str, task: &Task, model: &str) -> Result<Outcome> {
        Ok(self.request(origin, task, model, false).await?.0)
    }

    /// [`send`](Self::send), asking for `logprobs` when told to; also returns the response's
    /// JSON when the request succeeded.
    async fn request(
        &self,
        origin: &str,
        task: &Task,
        model: &str,
        logprobs: bool,
    ) -> Result<(Outcome, Option<serde_json::Value>)> {
        let mut body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": task.prompt}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
        });
        if logprobs {
            body["logprobs"] = true.into();
        }
        let mut req = self.client.post(&self.chat_url).json(&body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let mut out = Outcome {
            line: task.line,
            id: task.id.clone(),
            model: model.to_string(),
            tier: "none".into(),
            ..Outcome::default()
        };
        let t0 = Instant::now();
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => bail!(
                "{origin}:{}: cannot reach {}: {}",
                task.line,
                self.chat_url,
                error_chain(&e)
            ),
            Err(e) => {
                out.latency_ms = t0.elapsed().as_secs_f64() * 1e3;
                out.error = Some(error_chain(&e));
                out.why = out.error.clone();
                return Ok((out, None));
            }
        };
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if let Some(t) = header("x-switchyard-tier") {
            out.tier = t;
        }
        out.action = header("x-switchyard-action").unwrap_or_default();
        out.reason = header("x-switchyard-reason").unwrap_or_default();
        out.cost_usd = header("x-switchyard-cost-usd")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0.0);
        let status = resp.status();
        let text = resp.text().await;
        out.latency_ms = t0.elapsed().as_secs_f64() * 1e3;
        let v: serde_json::Value = match text {
            Ok(t) => serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)),
            Err(e) => serde_json::Value::String(error_chain(&e)),
        };
        if !status.is_success() {
            let msg = v
                .pointer("/error/message")
                .and_then(|m| m.as_str())
                .map_or_else(|| v.to_string(), str::to_string);
            out.error = Some(format!("HTTP {}: {msg}", status.as_u16()));
            out.why = out.error.clone();
            return Ok((out, None));
        }
        let answer = v
            .pointer("/choices/0/message/content")
            .and_then(|c| c.as_str())
            .unwrap_or("");
        let tok = |p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
        out.prompt_tokens = tok("/usage/prompt_tokens");
        out.completion_tokens = tok("/usage/completion_tokens");
        out.why = task.check.failure(answer);
        out.pass = out.why.is_none();
        Ok((out, Some(v)))
    }

    /// [`send`](Self::send) to the tier named `tier`; an answer from any other tier (a
    /// fallback, or a server that does not honour explicit tiers) counts as failed.
    async fn send_pinned(&self, origin: &str, task: &Task, tier: &str) -> Result<Outcome> {
        let o = self.send(origin, task, tier).await?;
        Ok(pinned(o, tier))
    }
}

/// `o`, answered for a request that named tier `asked`, failed unless that tier answered.
fn pinned(mut o: Outcome, asked: &str) -> Outcome {
    if o.error.is_none() && o.tier != asked {
        o.pass = false;
        o.error = Some(format!(
            "asked for tier `{asked}`, answered by `{}`: {}",
            o.tier,
            if o.reason.is_empty() {
                "no reason given"
            } else {
                &o.reason
            }
        ));
        o.why = o.error.clone();
    }
    o
}

/// An error and its causes on one line (reqwest's own message is often just "error sending
/// request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn print_stats(name: &str, s: &TierStats) {
    println!(
        "  {name:<12} {:>4} requests  pass {:>5.1}%  latency median {:>6.0} ms, mean {:>6.0} ms  tokens {}/{}  cost ${:.6}  errors {}",
        s.requests,
        100.0 * s.pass_rate,
        s.median_latency_ms,
        s.mean_latency_ms,
        s.prompt_tokens,
        s.completion_tokens,
        s.cost_usd,
        s.errors
    );
}

fn run_replay(a: &RouteEvalArgs, tasks_path: &Path) -> Result<()> {
    let origin = tasks_path.display().to_string();
    let tasks = load_tasks(tasks_path)?;
    let target = Target::new(a)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let model = rt.block_on(target.check_reachable())?;
    eprintln!(
        "replaying {} tasks from {origin} against {} ({model})",
        tasks.len(),
        target.base
    );
    if let Some(what) = a.calibrate {
        return run_calibrate(a, what, &origin, &tasks, &target, &model, &rt);
    }
    let outcomes = rt.block_on(async {
        let mut v = Vec::with_capacity(tasks.len());
        for t in &tasks {
            v.push(target.send(&origin, t, "auto").await?);
        }
        anyhow::Ok(v)
    })?;
    let report = ReplayReport::new(outcomes);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let all = &report.overall;
        println!(
            "{} tasks: pass rate {:.1}%, cost ${:.6}, latency median {:.0} ms",
            all.requests,
            100.0 * all.pass_rate,
            all.cost_usd,
            all.median_latency_ms
        );
        for (tier, s) in &report.tiers {
            print_stats(tier, s);
        }
        for o in report.outcomes.iter().filter(|o| !o.pass) {
            println!(
                "  fail {}:{} ({}) on `{}`: {}",
                origin,
                o.line,
                o.id,
                o.tier,
                o.why.as_deref().unwrap_or("")
            );
        }
    }
    if let Some(out) = &a.out {
        let p = write_json(out, "replay.json", &report)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// `--calibrate`: the cascade's thresholds (first, so that the difficulty sweep can reuse the
/// local answers), then the difficulty threshold; reports both.
fn run_calibrate(
    a: &RouteEvalArgs,
    what: Calibrate,
    origin: &str,
    tasks: &[Task],
    target: &Target,
    served_model: &str,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let policy = load_policy(a)?;
    let mut report = serde_json::Map::new();
    let cascade = if what.cascade() {
        let records = rt.block_on(cascade_records(
            a,
            origin,
            tasks,
            target,
            &policy,
            served_model,
        ))?;
        let base = policy.cascade_checks(&JsonExpectation::default());
        let c = calibrate_cascade(
            &records,
            &base,
            CascadeTarget {
                kept_pass: a.target_kept_pass,
                max_escalation: a.max_escalation,
            },
        );
        let snippet = c.toml_snippet();
        report.insert(
            "cascade".into(),
            serde_json::json!({"calibration": c, "snippet": snippet, "tasks": records}),
        );
        Some((c, records, snippet))
    } else {
        None
    };
    let difficulty = if what.difficulty() {
        let reuse = cascade.as_ref().map(|(_, r, _)| r.as_slice());
        let rows = difficulty_rows(a, origin, tasks, target, &policy, reuse, rt)?;
        let c = calibrate(&rows, &policy.local_tier().name, a.target_pass_rate);
        report.insert("calibration".into(), serde_json::to_value(&c)?);
        report.insert("tasks".into(), serde_json::to_value(&rows)?);
        Some((c, rows))
    } else {
        None
    };
    let report = serde_json::Value::Object(report);
    if let Some(out) = &a.out {
        let p = write_json(out, "calibrate.json", &report)?;
        eprintln!("wrote {}", p.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if let Some((c, rows)) = &difficulty {
        print_difficulty(a, c, rows.len());
    }
    if let Some((c, records, snippet)) = &cascade {
        if difficulty.is_some() {
            println!();
        }
        print_cascade(a, c, records, snippet.as_deref(), served_model, &policy);
    }
    Ok(())
}

/// Every task on the local tier (`model` = the served model id, which pins it) with logprobs,
/// and with `--measure-remote` on the cascade's remote tier too.
async fn cascade_records(
    a: &RouteEvalArgs,
    origin: &str,
    tasks: &[Task],
    target: &Target,
    policy: &Policy,
    served_model: &str,
) -> Result<Vec<CascadeRecord>> {
    if served_model == UNKNOWN_MODEL {
        bail!(
            "{}/health names no model; --calibrate needs the served model id to send tasks to the local tier",
            target.base
        );
    }
    let remote = if a.measure_remote {
        let tier = policy.cascade_tier().with_context(|| {
            format!(
                "--measure-remote: the policy {} has no remote tier for the cascade to escalate to (set [cascade] tier, or [routing] escalate_tier)",
                policy.origin()
            )
        })?;
        Some(tier.name.clone())
    } else {
        None
    };
    let base = policy.cascade_checks(&JsonExpectation::default());
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (out, body) = target.request(origin, t, served_model, true).await?;
        let answer = match (&out.error, body) {
            (None, Some(v)) => LocalAnswer::from_chat_response(&v)
                .map_err(|e| anyhow::anyhow!("{origin}:{}: model `{served_model}`: {e}", t.line))?,
            // No answer: recorded as failed and empty (the cascade would escalate it).
            _ => LocalAnswer::default(),
        };
        let mut r = CascadeRecord::from_outcome(out, answer, &base);
        if let Some(tier) = &remote {
            r.remote = Some(target.send_pinned(origin, t, tier).await?);
        }
        records.push(r);
    }
    Ok(records)
}

/// `policy` with `classifier.escalate_difficulty = t`.
fn with_threshold(policy: &Policy, t: f64) -> Result<Policy> {
    let mut spec = policy.spec().clone();
    spec.classifier.escalate_difficulty = t;
    Ok(Policy::from_spec(spec, policy.origin())?)
}

/// Difficulty calibration: each task is decided as the server would (same policy, same
/// scorer), once with the threshold at 1 and once at 0. Where the two agree, a rule or the
/// safety floor settles the task and it is sent once with `model: "auto"`; where they differ,
/// the difficulty step decides it, and it is sent to both tiers by name (the local tier's
/// answer taken from `local_answers`, the cascade records, when there are some).
fn difficulty_rows(
    a: &RouteEvalArgs,
    origin: &str,
    tasks: &[Task],
    target: &Target,
    policy: &Policy,
    local_answers: Option<&[CascadeRecord]>,
    rt: &tokio::runtime::Runtime,
) -> Result<Vec<CalibrationRow>> {
    let never = with_threshold(policy, 1.0)?;
    let always = with_threshold(policy, 0.0)?;
    // Decide as if every tier's key were set: the keys live with the server, not here.
    let keys = policy
        .tiers()
        .iter()
        .filter_map(|t| t.api_key_env.clone())
        .map(|k| (k, "set".to_string()))
        .collect();
    let state = RouterState::new(Arc::new(SystemClock), EnvSource::Fixed(keys));
    let scorer = if a.no_classifier {
        None
    } else {
        Some(
            RouterScorer::load(&embedder(a)?, &router_dir(a))
                .context("loading the router classifier (--no-classifier for the heuristic difficulty, as `serve` without --classifier)")?,
        )
    };
    let scorer = scorer.as_ref().map(|s| s as &dyn SemanticScorer);
    rt.block_on(async {
        let mut rows = Vec::with_capacity(tasks.len());
        for (i, t) in tasks.iter().enumerate() {
            let req = RouteRequest::from_prompt(&t.prompt);
            let lo = decide(&never, &req, &state, scorer);
            let hi = decide(&always, &req, &state, scorer);
            let route = match (&lo.tier, &hi.tier) {
                (Some(below), Some(above)) if below != above => Route::Threshold {
                    difficulty: hi.scores.get("difficulty").copied().unwrap_or(0.0),
                    below: below.clone(),
                    above: above.clone(),
                },
                _ => Route::Fixed,
            };
            let models: Vec<String> = match &route {
                Route::Fixed => vec!["auto".into()],
                Route::Threshold { below, above, .. } => vec![below.clone(), above.clone()],
            };
            let mut outcomes = BTreeMap::new();
            for m in models {
                let known = local_answers
                    .and_then(|r| r.get(i))
                    .and_then(|r| r.local.as_ref())
                    .filter(|o| o.error.is_none() && o.tier == m);
                let o = match known {
                    // The same request at temperature 0, sent with logprobs: the same answer.
                    Some(o) => Outcome {
                        model: m.clone(),
                        ..o.clone()
                    },
                    None if m == "auto" => target.send(origin, t, &m).await?,
                    None => target.send_pinned(origin, t, &m).await?,
                };
                outcomes.insert(m, o);
            }
            rows.push(CalibrationRow { route, outcomes });
        }
        anyhow::Ok(rows)
    })
}

fn print_difficulty(
    a: &RouteEvalArgs,
    c: &switchyard_classifier::replay::Calibration,
    tasks: usize,
) {
    println!(
        "{} tasks: {} routed by the difficulty threshold, {} settled by rules or the safety floor",
        tasks, c.threshold_dependent, c.fixed
    );
    println!(
        "{:>10} {:>10} {:>10} {:>12}",
        "threshold", "pass", "escalated", "cost $"
    );
    for p in &c.sweep {
        println!(
            "{:>10.4} {:>9.1}% {:>9.1}% {:>12.6}",
            p.threshold,
            100.0 * p.pass_rate,
            100.0 * p.escalated,
            p.cost_usd
        );
    }
    match &c.chosen {
        Some(p) => println!(
            "\n[classifier]\nescalate_difficulty = {:.4}   # pass rate {:.1}% (target {:.1}%), {:.1}% escalated, ${:.6} for {} tasks",
            p.threshold,
            100.0 * p.pass_rate,
            100.0 * a.target_pass_rate,
            100.0 * p.escalated,
            p.cost_usd,
            tasks
        ),
        None => println!(
            "\nno threshold reaches a pass rate of {:.1}% (best: {:.1}%)",
            100.0 * a.target_pass_rate,
            100.0 * c.sweep.iter().map(|p| p.pass_rate).fold(0.0, f64::max)
        ),
    }
}

/// Curves longer than this are printed thinned (every 5% of escalation).
const FULL_CURVE_ROWS: usize = 30;

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn print_cascade(
    a: &RouteEvalArgs,
    c: &CascadeCalibration,
    records: &[CascadeRecord],
    snippet: Option<&str>,
    served_model: &str,
    policy: &Policy,
) {
    let n = c.tasks.max(1) as f64;
    println!(
        "cascade: {} tasks answered on the local tier (model `{served_model}`, max_tokens {}): {} passed ({}); the policy's other checks escalate {} whatever the thresholds",
        c.tasks,
        a.max_tokens,
        c.local_passed,
        pct(c.local_passed as f64 / n),
        c.escalated_by_other_checks
    );
    let remote = if c.remote_measured {
        let passed = records
            .iter()
            .filter(|r| r.remote_pass() == Some(true))
            .count();
        format!(
            "escalated answers scored by `{}`'s measured answers ({passed}/{} pass)",
            policy.cascade_tier().map_or("remote", |t| t.name.as_str()),
            c.tasks
        )
    } else {
        "escalated answers assumed to pass (--measure-remote runs the remote tier)".into()
    };
    println!(
        "target: answers kept local pass >= {}{}; {remote}",
        pct(c.target.kept_pass),
        c.target
            .max_escalation
            .map(|e| format!(", at most {} escalated", pct(e)))
            .unwrap_or_default()
    );
    for s in &c.signals {
        println!(
            "\n{} ({}): AUROC {}, {} tasks with a value",
            s.signal.label(),
            s.field,
            s.auroc.map_or("n/a".into(), |x| format!("{x:.3}")),
            s.tasks_with_value
        );
        println!(
            "{:>10} {:>10} {:>10} {:>13}{}",
            "threshold",
            "escalated",
            "kept pass",
            "overall pass",
            if c.remote_measured {
                format!(" {:>10}", "measured")
            } else {
                String::new()
            }
        );
        let row = |p: &CurvePoint| {
            println!(
                "{:>10} {:>10} {:>10} {:>13}{}",
                p.threshold
                    .map_or("off".to_string(), |t| toml_threshold(Some(t))),
                pct(p.escalation_rate),
                p.kept_pass_rate.map_or("-".into(), pct),
                pct(p.pass_rate_assumed),
                p.pass_rate_measured
                    .map(|m| format!(" {:>10}", pct(m)))
                    .unwrap_or_default()
            )
        };
        let thin = s.curve.len() > FULL_CURVE_ROWS;
        let mut next_step = 0.0;
        for (i, p) in s.curve.iter().enumerate() {
            let keep = !thin
                || i == 0
                || i + 1 == s.curve.len()
                || s.chosen.as_ref() == Some(p)
                || p.escalation_rate + 1e-12 >= next_step;
            if keep {
                row(p);
                next_step = (p.escalation_rate / 0.05).floor() * 0.05 + 0.05;
            }
        }
        if thin {
            println!(
                "  ({} points, thinned to every 5% of escalation; --json has all)",
                s.curve.len()
            );
        }
        match &s.chosen {
            Some(p) if s.meets_target => println!(
                "  chosen: {} = {}: {} escalated, kept answers pass {}",
                s.field,
                toml_threshold(p.threshold),
                pct(p.escalation_rate),
                p.kept_pass_rate.map_or("-".into(), pct)
            ),
            Some(p) => println!(
                "  no threshold reaches the target within the budget; best: {} = {}: {} escalated, kept answers pass {}",
                s.field,
                toml_threshold(p.threshold),
                pct(p.escalation_rate),
                p.kept_pass_rate.map_or("-".into(), pct)
            ),
            None => println!("  no threshold reaches the target"),
        }
    }
    match snippet {
        Some(t) => println!("\n{t}"),
        None => println!("\nno [cascade] thresholds reach the target; lower --target-kept-pass or give --max-escalation"),
    }
}
