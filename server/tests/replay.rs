//! `switchyard route-eval --replay` end to end: the real server on the tiny model, routing with a
//! policy whose `frontier` tier is a fake OpenAI-compatible upstream in this process (it answers
//! "Remote answer." with 1000 prompt tokens, 400 of them cached, and 100 completion tokens;
//! [`common::upstream`]), and the real `switchyard route-eval` run as a subprocess against it.
//!
//! The tiny model answers gibberish, so a task checked for exactly "Remote answer." passes if
//! and only if the frontier answered it, and a task checked with `(?s).*` always passes: every
//! pass rate, count, token total and cost below is known in advance.
//!
//! Covered: the per-tier report (`--json`) against what the fake sent and was sent; the table
//! output; `--calibrate` picking the cheapest threshold that meets a target (JSON and the
//! printed `escalate_difficulty` line); an unreachable server, a bad task line (file:line) and a
//! bad URL failing with one clear sentence before anything is sent.

mod common;

use std::path::Path;
use std::process::Output;

use common::upstream::{setup, FRONTIER_JSON_COST};
use serde_json::Value;

/// Settled by the default policy's `security-sensitive` rule: escalated.
const SECURITY: &str =
    "Review this authentication code change for security vulnerabilities before we ship it";
const SECURITY_2: &str =
    "Is this password reset flow secure? Look for vulnerabilities in how tokens are generated.";
/// Settled by the `transformation` rule: local.
const TRANSLATE: &str = "Translate 'good morning' into Spanish";
const SUMMARISE: &str =
    "Summarize this in one line: the meeting moved from Tuesday to Thursday at 3pm.";
/// No rule matches these; the heuristic difficulty (reasoning markers, questions) decides.
/// (No reasoning markers: 0; `recommend`, `justify`: 0.225; `recommend`, `plan`, `risks`,
/// `why`: 0.45.)
const EASY: &str = "Give me three names for a bakery.";
const MEDIUM: &str = "Recommend a first programming language for my nephew and justify it.";
const HARD: &str =
    "I want to learn the guitar; recommend a plan and the risks of teaching myself, and why?";

const REMOTE: &str = r#"{"exact": "Remote answer."}"#;
const ANYTHING: &str = r#"{"regex": "(?s).*"}"#;

fn task(prompt: &str, check: &str) -> String {
    format!(
        r#"{{"prompt": {}, "check": {check}}}"#,
        serde_json::to_string(prompt).unwrap()
    )
}

/// Runs `switchyard route-eval ARGS` (without blocking the runtime the fake upstreams run on).
async fn route_eval(args: &[&str]) -> Output {
    tokio::process::Command::new(common::BIN)
        .arg("route-eval")
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("run route-eval")
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "route-eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn write(dir: &Path, name: &str, lines: &[String]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p.to_string_lossy().into_owned()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test]
async fn replay_reports_each_tier_and_calibrate_finds_the_threshold() {
    let su = setup("").await;
    let dir = tempfile::tempdir().unwrap();
    let base = su.server.base.clone();
    let policy = su.policy.to_string_lossy().into_owned();

    // ---- replay: 3 tasks escalated by a rule, 2 kept local by one.
    let tasks = write(
        dir.path(),
        "tasks.jsonl",
        &[
            "// security reviews go to the frontier".to_string(),
            task(SECURITY, REMOTE),
            task(SECURITY_2, r#"{"regex": "^Remote"}"#),
            task(SECURITY, r#"{"json_schema": {"type": "object"}}"#),
            String::new(),
            task(TRANSLATE, ANYTHING),
            task(SUMMARISE, REMOTE),
        ],
    );
    let out = route_eval(&[
        "--replay",
        &tasks,
        "--server",
        &base,
        "--max-tokens",
        "4",
        "--json",
    ])
    .await;
    let r = stdout_json(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("replaying 5 tasks") && stderr.contains("switchyard-tiny-model"),
        "{stderr}"
    );

    let all = &r["overall"];
    assert_eq!(all["requests"], 5, "{r}");
    assert_eq!(all["passed"], 3, "{r}");
    assert!(close(all["pass_rate"].as_f64().unwrap(), 0.6));
    assert_eq!(all["errors"], 0);

    let f = &r["tiers"]["frontier"];
    assert_eq!(f["requests"], 3, "{r}");
    assert_eq!(
        f["passed"], 2,
        "exact and regex pass, the JSON check fails: {r}"
    );
    assert!(close(f["pass_rate"].as_f64().unwrap(), 2.0 / 3.0));
    // The fake's usage, three times, priced at the tier's $5 / $0.5 cached / $15 per Mtok.
    assert_eq!(f["prompt_tokens"], 3000);
    assert_eq!(f["completion_tokens"], 300);
    assert!(
        close(f["cost_usd"].as_f64().unwrap(), 3.0 * FRONTIER_JSON_COST),
        "{f}"
    );
    assert_eq!(su.frontier.hits().len(), 3);
    for (_, body) in su.frontier.hits() {
        assert_eq!(body["model"], "gpt-test");
        assert_eq!(body["max_tokens"], 4);
    }
    assert!(su.claude.hits().is_empty());

    let l = &r["tiers"]["local"];
    assert_eq!(l["requests"], 2, "{r}");
    assert_eq!(l["passed"], 1, "{r}");
    assert_eq!(l["cost_usd"], 0.0);
    assert!(l["prompt_tokens"].as_u64().unwrap() > 0, "{l}");
    let done = l["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&done), "at most 4 tokens per request: {l}");

    // Outcomes in file order, with the lines, routing headers and latencies behind the totals.
    let outcomes = r["outcomes"].as_array().unwrap();
    let lines: Vec<u64> = outcomes
        .iter()
        .map(|o| o["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![2, 3, 4, 6, 7]);
    let tiers: Vec<&str> = outcomes
        .iter()
        .map(|o| o["tier"].as_str().unwrap())
        .collect();
    assert_eq!(
        tiers,
        vec!["frontier", "frontier", "frontier", "local", "local"]
    );
    let actions: Vec<&str> = outcomes
        .iter()
        .map(|o| o["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        vec!["escalate", "escalate", "escalate", "local", "local"]
    );
    assert_eq!(outcomes[2]["why"], "the answer is not JSON");
    assert!(outcomes[4]["why"]
        .as_str()
        .unwrap()
        .contains("Remote answer."));
    for (tier, want) in [("frontier", 0..3), ("local", 3..5)] {
        let mut lat: Vec<f64> = outcomes[want]
            .iter()
            .map(|o| o["latency_ms"].as_f64().unwrap())
            .collect();
        assert!(lat.iter().all(|x| *x > 0.0), "{lat:?}");
        lat.sort_by(f64::total_cmp);
        let s = &r["tiers"][tier];
        assert_eq!(
            s["median_latency_ms"].as_f64().unwrap(),
            lat[(lat.len() - 1) / 2]
        );
        assert_eq!(s["max_latency_ms"].as_f64().unwrap(), lat[lat.len() - 1]);
        let mean = lat.iter().sum::<f64>() / lat.len() as f64;
        assert!((s["mean_latency_ms"].as_f64().unwrap() - mean).abs() < 1e-6);
    }

    // The table says the same.
    let out = route_eval(&["--replay", &tasks, "--server", &base, "--max-tokens", "4"]).await;
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("5 tasks: pass rate 60.0%"), "{table}");
    assert!(
        table.contains("frontier        3 requests  pass  66.7%"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "{}:4 (line 4) on `frontier`: the answer is not JSON",
            tasks
        )),
        "{table}"
    );

    // ---- calibrate (heuristic difficulty, as this server runs without --classifier):
    // SECURITY and TRANSLATE are settled by rules; EASY, MEDIUM and HARD are routed by the
    // threshold. Only the frontier passes MEDIUM and HARD.
    let tasks = write(
        dir.path(),
        "calibrate.jsonl",
        &[
            task(SECURITY, REMOTE),
            task(TRANSLATE, ANYTHING),
            task(EASY, ANYTHING),
            task(MEDIUM, REMOTE),
            task(HARD, REMOTE),
        ],
    );
    let hits_before = su.frontier.hits().len();
    let args = [
        "--replay",
        tasks.as_str(),
        "--server",
        base.as_str(),
        "--calibrate",
        "--no-classifier",
        "--policy",
        policy.as_str(),
        "--target-pass-rate",
        "0.8",
        "--max-tokens",
        "4",
    ];
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let v = stdout_json(&route_eval(&with_json).await);
    let c = &v["calibration"];
    assert_eq!(c["fixed"], 2, "{v}");
    assert_eq!(c["threshold_dependent"], 3, "{v}");
    let rows = v["tasks"].as_array().unwrap();
    let d = |i: usize| rows[i]["route"]["difficulty"].as_f64().unwrap();
    assert_eq!(rows[0]["route"]["kind"], "fixed");
    assert_eq!(rows[0]["outcomes"]["auto"]["tier"], "frontier");
    assert_eq!(rows[1]["outcomes"]["auto"]["tier"], "local");
    for row in &rows[2..] {
        assert_eq!(row["route"]["kind"], "threshold", "{row}");
        assert_eq!(row["route"]["below"], "local");
        assert_eq!(row["route"]["above"], "frontier");
        assert_eq!(row["outcomes"]["local"]["tier"], "local");
        assert_eq!(row["outcomes"]["frontier"]["tier"], "frontier");
    }
    assert!(d(2) < d(3) && d(3) < d(4), "EASY < MEDIUM < HARD: {v}");
    // Sent: the two fixed tasks once (one to the frontier), the three others to both tiers.
    assert_eq!(su.frontier.hits().len() - hits_before, 4);
    // 4/5 needs one of MEDIUM and HARD escalated: the cheapest threshold is HARD's difficulty.
    let chosen = &c["chosen"];
    assert_eq!(chosen["threshold"].as_f64().unwrap(), d(4), "{v}");
    assert_eq!(chosen["passed"], 4);
    assert!(close(chosen["escalated"].as_f64().unwrap(), 0.4));
    assert!(close(
        chosen["cost_usd"].as_f64().unwrap(),
        2.0 * FRONTIER_JSON_COST
    ));
    // The sweep: 1.0 escalates none of the three (3/5), HARD's difficulty one, MEDIUM's two
    // (5/5), EASY's all three (5/5, dearer).
    let sweep: Vec<(f64, u64)> = c["sweep"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["threshold"].as_f64().unwrap(),
                p["passed"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(sweep, vec![(1.0, 3), (d(4), 4), (d(3), 5), (d(2), 5)]);

    let out = route_eval(&args).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("escalate_difficulty = {:.4}", d(4))),
        "{text}"
    );
    assert!(text.contains("pass rate 80.0% (target 80.0%)"), "{text}");
    let mut full = args.to_vec();
    full[9] = "1.0";
    let out = route_eval(&full).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("escalate_difficulty = {:.4}", d(3))),
        "{text}"
    );
}

#[tokio::test]
async fn bad_input_fails_with_one_sentence_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.jsonl", &[task(EASY, ANYTHING)]);

    // Nothing listens on port 1.
    let out = route_eval(&["--replay", &good, "--server", "http://127.0.0.1:1"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the server at http://127.0.0.1:1"),
        "{err}"
    );
    assert!(err.lines().count() <= 3, "{err}");

    // A bad line is reported with file:line before any connection is tried.
    let bad = write(
        dir.path(),
        "bad.jsonl",
        &[
            task(EASY, ANYTHING),
            r#"{"prompt": "x", "check": {"regex": "("}}"#.to_string(),
        ],
    );
    let out = route_eval(&["--replay", &bad, "--server", "http://127.0.0.1:1"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{bad}:2: bad regex")), "{err}");
    assert!(!err.contains("cannot reach"), "{err}");

    let typo = write(
        dir.path(),
        "typo.jsonl",
        &[r#"{"prompt": "x", "chek": {"exact": "y"}}"#.to_string()],
    );
    let out = route_eval(&["--replay", &typo, "--server", "http://127.0.0.1:1"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{typo}:1: unknown field `chek`")),
        "{err}"
    );

    let out = route_eval(&["--replay", &good, "--server", "localhost:8080"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http or https"), "{err}");

    let out = route_eval(&[
        "--replay",
        "/no/such/tasks.jsonl",
        "--server",
        "http://127.0.0.1:1",
    ])
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/tasks.jsonl"), "{err}");
}
