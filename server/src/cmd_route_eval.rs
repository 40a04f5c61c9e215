//! `switchyard route-eval`: how well does the router route?
//!
//! - `--routellm DIR --split test|train [--out DIR]`: the difficulty model against a random
//!   and a prompt-length router on RouteLLM's GSM8K and MMLU (APGR, quality against the
//!   fraction escalated, the escalation needed for 80% / 95%); writes `summary.json` and
//!   `frontier.svg`.
//! - `--suite FILE.jsonl`: a labelled `{"prompt", "expect"}` suite through the policy, with and
//!   without the semantic classifier: accuracy, confusion matrix, every miss with its reasons.
//! - `--replay FILE.jsonl --server URL`: sends `{"prompt", "check"}` tasks to a running server
//!   (`model: "auto"`) and reports pass rate, latency, tokens and cost per tier; with
//!   `--calibrate --target-pass-rate X` it sends every task to the local and the escalation
//!   tier instead and prints the difficulty threshold that meets the target at least cost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use switchyard_classifier::route_eval::{evaluate_routellm, write_outputs};
use switchyard_classifier::routellm::Split;
use switchyard_classifier::{default_router_dir, DifficultyModel, Embedder, RouterScorer};
use switchyard_router::eval::{load_suite, run_suite, SuiteReport};
use switchyard_router::{Policy, SemanticScorer};

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
    /// Suite mode: rules only, without the semantic classifier.
    #[arg(long)]
    no_classifier: bool,
    /// Replay mode: send every task to both tiers and print the threshold for a pass rate.
    #[arg(long, requires = "replay")]
    calibrate: bool,
    /// The pass rate `--calibrate` must reach.
    #[arg(long, default_value_t = 0.9)]
    target_pass_rate: f64,
    /// `max_tokens` for replayed requests.
    #[arg(long, default_value_t = 512)]
    max_tokens: u32,
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
    if let Some(w) = &with {
        print_report("with the semantic classifier", w);
        println!();
    }
    print_report("rules only", &rules);
    if let Some(out) = &a.out {
        let p = write_json(
            out,
            "suite.json",
            &SuiteOut {
                with_classifier: with.as_ref(),
                rules_only: &rules,
            },
        )?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

// ----------------------------------------------------------------------------- replay

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Check {
    /// The answer, trimmed, equals this.
    Exact(String),
    /// The answer matches this regex.
    Regex(String),
    /// The answer is JSON valid against this schema (type, properties, required, items, enum).
    JsonSchema(serde_json::Value),
}

#[derive(Debug, Clone, Deserialize)]
struct Task {
    prompt: String,
    check: Check,
}

fn schema_ok(schema: &serde_json::Value, v: &serde_json::Value) -> bool {
    use serde_json::Value;
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "number" => v.is_number(),
            "integer" => v.is_i64() || v.is_u64(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => true,
        };
        if !ok {
            return false;
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return false;
        }
    }
    if let (Some(req), Some(obj)) = (
        schema.get("required").and_then(Value::as_array),
        v.as_object(),
    ) {
        if req
            .iter()
            .filter_map(Value::as_str)
            .any(|k| !obj.contains_key(k))
        {
            return false;
        }
    }
    if let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(Value::as_object),
        v.as_object(),
    ) {
        for (k, s) in props {
            if let Some(x) = obj.get(k) {
                if !schema_ok(s, x) {
                    return false;
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        if !arr.iter().all(|x| schema_ok(items, x)) {
            return false;
        }
    }
    true
}

fn passes(check: &Check, text: &str) -> Result<bool> {
    Ok(match check {
        Check::Exact(s) => text.trim() == s.trim(),
        Check::Regex(r) => regex::Regex::new(r)
            .with_context(|| format!("bad regex {r:?}"))?
            .is_match(text),
        Check::JsonSchema(s) => {
            switchyard_router::cascade::parse_json_answer(text).is_some_and(|v| schema_ok(s, &v))
        }
    })
}

#[derive(Debug, Clone, Serialize)]
struct Outcome {
    tier: String,
    pass: bool,
    latency_ms: f64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: f64,
    error: Option<String>,
}

async fn send(
    client: &reqwest::Client,
    a: &RouteEvalArgs,
    url: &str,
    model: &str,
    prompt: &str,
    check: &Check,
) -> Result<Outcome> {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": a.max_tokens,
        "temperature": 0,
    });
    let mut req = client.post(url).json(&body);
    if let Some(k) = &a.api_key {
        req = req.bearer_auth(k);
    }
    let t0 = Instant::now();
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            return Ok(Outcome {
                tier: "error".into(),
                pass: false,
                latency_ms: 0.0,
                prompt_tokens: 0,
                completion_tokens: 0,
                cost_usd: 0.0,
                error: Some(e.to_string()),
            })
        }
    };
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let tier = header("x-switchyard-tier").unwrap_or_else(|| "unknown".into());
    let cost = header("x-switchyard-cost-usd")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0.0);
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    let latency_ms = t0.elapsed().as_secs_f64() * 1e3;
    if !status.is_success() {
        return Ok(Outcome {
            tier,
            pass: false,
            latency_ms,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: cost,
            error: Some(format!("HTTP {status}: {v}")),
        });
    }
    let text = v
        .pointer("/choices/0/message/content")
        .and_then(|c| c.as_str())
        .unwrap_or("");
    let tok = |p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
    Ok(Outcome {
        tier,
        pass: passes(check, text)?,
        latency_ms,
        prompt_tokens: tok("/usage/prompt_tokens"),
        completion_tokens: tok("/usage/completion_tokens"),
        cost_usd: cost,
        error: None,
    })
}

#[derive(Debug, Default, Serialize)]
struct TierStats {
    requests: usize,
    passed: usize,
    pass_rate: f64,
    median_latency_ms: f64,
    mean_latency_ms: f64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: f64,
    errors: usize,
}

fn stats(outcomes: &[&Outcome]) -> TierStats {
    let mut lat: Vec<f64> = outcomes.iter().map(|o| o.latency_ms).collect();
    lat.sort_by(f64::total_cmp);
    let n = outcomes.len();
    let passed = outcomes.iter().filter(|o| o.pass).count();
    TierStats {
        requests: n,
        passed,
        pass_rate: if n == 0 {
            0.0
        } else {
            passed as f64 / n as f64
        },
        median_latency_ms: lat.get(n / 2).copied().unwrap_or(0.0),
        mean_latency_ms: if n == 0 {
            0.0
        } else {
            lat.iter().sum::<f64>() / n as f64
        },
        prompt_tokens: outcomes.iter().map(|o| o.prompt_tokens).sum(),
        completion_tokens: outcomes.iter().map(|o| o.completion_tokens).sum(),
        cost_usd: outcomes.iter().map(|o| o.cost_usd).sum(),
        errors: outcomes.iter().filter(|o| o.error.is_some()).count(),
    }
}

fn load_tasks(path: &Path) -> Result<Vec<Task>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with("//"))
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

fn run_replay(a: &RouteEvalArgs, tasks_path: &Path) -> Result<()> {
    let tasks = load_tasks(tasks_path)?;
    for t in &tasks {
        passes(&t.check, "")?; // reject bad regexes before sending anything
    }
    let base = a.server.clone().context("--replay needs --server URL")?;
    let url = format!(
        "{}/v1/chat/completions",
        base.trim_end_matches('/').trim_end_matches("/v1")
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(600))
        .build()?;
    if !a.calibrate {
        let outcomes: Vec<Outcome> = rt.block_on(async {
            let mut v = Vec::new();
            for t in &tasks {
                v.push(send(&client, a, &url, "auto", &t.prompt, &t.check).await?);
            }
            anyhow::Ok(v)
        })?;
        let mut by_tier: BTreeMap<String, Vec<&Outcome>> = BTreeMap::new();
        for o in &outcomes {
            by_tier.entry(o.tier.clone()).or_default().push(o);
        }
        let all = stats(&outcomes.iter().collect::<Vec<_>>());
        let tiers: BTreeMap<String, TierStats> =
            by_tier.iter().map(|(k, v)| (k.clone(), stats(v))).collect();
        println!(
            "{} tasks: pass rate {:.1}%, cost ${:.4}, median latency {:.0} ms",
            all.requests,
            100.0 * all.pass_rate,
            all.cost_usd,
            all.median_latency_ms
        );
        for (tier, s) in &tiers {
            println!(
                "  {tier:<12} {:>4} requests  pass {:>5.1}%  median {:>6.0} ms  tokens {}/{}  cost ${:.4}  errors {}",
                s.requests, 100.0 * s.pass_rate, s.median_latency_ms, s.prompt_tokens, s.completion_tokens, s.cost_usd, s.errors
            );
        }
        if let Some(out) = &a.out {
            let p = write_json(
                out,
                "replay.json",
                &serde_json::json!({"overall": all, "tiers": tiers, "outcomes": outcomes}),
            )?;
            println!("wrote {}", p.display());
        }
        return Ok(());
    }

    // Calibration: every task on both tiers, then sweep the difficulty threshold.
    let policy = load_policy(a)?;
    let local = policy.local_tier().name.clone();
    let remote = policy
        .escalate_tier()
        .map(|t| t.name.clone())
        .context("the policy has no remote tier to calibrate against")?;
    let scorer = RouterScorer::load(&embedder(a)?, &router_dir(a))?;
    let mut rows = Vec::new();
    for t in &tasks {
        let d = scorer
            .score_text(&t.prompt)?
            .difficulty
            .context("no difficulty model (models/router/difficulty.safetensors)")?;
        rows.push((d, t));
    }
    let results: Vec<(f64, Outcome, Outcome)> = rt.block_on(async {
        let mut v = Vec::new();
        for (d, t) in &rows {
            let l = send(&client, a, &url, &local, &t.prompt, &t.check).await?;
            let r = send(&client, a, &url, &remote, &t.prompt, &t.check).await?;
            v.push((*d, l, r));
        }
        anyhow::Ok(v)
    })?;
    let n = results.len().max(1) as f64;
    let mut thresholds: Vec<f64> = results.iter().map(|r| r.0).collect();
    thresholds.push(f64::INFINITY);
    thresholds.sort_by(f64::total_cmp);
    thresholds.dedup();
    let mut best: Option<(f64, f64, f64, f64)> = None; // (threshold, pass, escalated, cost)
    println!(
        "{:>10} {:>10} {:>10} {:>10}",
        "threshold", "pass", "escalated", "cost $"
    );
    for &t in thresholds.iter().rev() {
        let (mut pass, mut esc, mut cost) = (0.0, 0.0, 0.0);
        for (d, l, r) in &results {
            let o = if *d >= t {
                esc += 1.0;
                r
            } else {
                l
            };
            pass += o.pass as u8 as f64;
            cost += o.cost_usd;
        }
        let (pass, esc) = (pass / n, esc / n);
        println!(
            "{t:>10.4} {:>9.1}% {:>9.1}% {cost:>10.4}",
            100.0 * pass,
            100.0 * esc
        );
        if pass >= a.target_pass_rate && best.is_none() {
            best = Some((t, pass, esc, cost));
        }
    }
    match best {
        Some((t, pass, esc, cost)) if t.is_finite() => println!(
            "\nescalate_difficulty = {t:.4}   # pass rate {:.1}% with {:.1}% escalated, ${cost:.4} for {} tasks",
            100.0 * pass, 100.0 * esc, results.len()
        ),
        Some(_) => println!("\nthe local tier alone meets {:.1}%: escalate_difficulty = 1.0", 100.0 * a.target_pass_rate),
        None => println!("\nno threshold reaches {:.1}% (the frontier tier alone does not)", 100.0 * a.target_pass_rate),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        assert!(passes(&Check::Exact("42".into()), " 42\n").unwrap());
        assert!(!passes(&Check::Exact("42".into()), "41").unwrap());
        assert!(passes(&Check::Regex(r"\b42\b".into()), "it is 42.").unwrap());
        assert!(passes(&Check::Regex("(".into()), "").is_err());
        let schema = serde_json::json!({"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}}});
        assert!(passes(
            &Check::JsonSchema(schema.clone()),
            "{\"a\": 1, \"b\": \"x\"}"
        )
        .unwrap());
        assert!(!passes(&Check::JsonSchema(schema.clone()), "{\"a\": 1.5}").unwrap());
        assert!(!passes(&Check::JsonSchema(schema.clone()), "{\"b\": \"x\"}").unwrap());
        assert!(!passes(&Check::JsonSchema(schema), "{\"a\": 1, \"b\": \"z\"}").unwrap());
        let t: Task = serde_json::from_str(r#"{"prompt": "p", "check": {"regex": "a+"}}"#).unwrap();
        assert!(matches!(t.check, Check::Regex(_)));
    }
}
