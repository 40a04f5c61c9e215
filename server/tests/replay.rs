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

/// One local answer as the replay recorded it, and the numbers this test derives from it
/// itself (not through the calibration code).
struct Recorded {
    pass: bool,
    remote_pass: bool,
    /// The policy's other checks escalate it: here only an empty answer can (refusals need
    /// words, and the truncation check is off).
    other: bool,
    mean: f64,
    min: f64,
    entropy: f64,
}

impl Recorded {
    fn from_json(r: &Value) -> Self {
        let nums = |k: &str| -> Vec<f64> {
            r["answer"][k]
                .as_array()
                .unwrap_or_else(|| panic!("no answer.{k}: {r}"))
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let (lps, hs) = (nums("logprobs"), nums("entropies"));
        assert!(!lps.is_empty() && lps.len() == hs.len(), "{r}");
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
        Self {
            pass: r["pass"].as_bool().unwrap(),
            remote_pass: r["remote"]["pass"].as_bool().unwrap(),
            other: r["answer"]["text"].as_str().unwrap().trim().is_empty(),
            mean: mean(&lps),
            min: lps.iter().copied().fold(f64::INFINITY, f64::min),
            entropy: mean(&hs),
        }
    }

    /// The value of `signal` and whether a high value is the unsure end.
    fn value(&self, signal: &str) -> (f64, bool) {
        match signal {
            "mean_logprob" => (self.mean, false),
            "min_token_logprob" => (self.min, false),
            "mean_entropy" => (self.entropy, true),
            s => panic!("unknown signal {s}"),
        }
    }

    fn escalated(&self, signal: &str, t: Option<f64>) -> bool {
        let (v, high_unsure) = self.value(signal);
        self.other || t.is_some_and(|t| if high_unsure { v > t } else { v < t })
    }
}

/// (escalated, kept, kept passed, overall pass assumed, overall pass measured) at `t`.
fn expected_point(rs: &[Recorded], signal: &str, t: Option<f64>) -> (u64, u64, u64, f64, f64) {
    let n = rs.len() as f64;
    let esc: Vec<&Recorded> = rs.iter().filter(|r| r.escalated(signal, t)).collect();
    let kept_passed = rs
        .iter()
        .filter(|r| !r.escalated(signal, t) && r.pass)
        .count();
    let remote_passed = esc.iter().filter(|r| r.remote_pass).count();
    (
        esc.len() as u64,
        (rs.len() - esc.len()) as u64,
        kept_passed as u64,
        (kept_passed + esc.len()) as f64 / n,
        (kept_passed + remote_passed) as f64 / n,
    )
}

/// The point the target picks, by brute force over `curve`: the least escalation among points
/// within the budget whose kept answers pass ≥ `kept`; else, with a budget, the best kept pass
/// rate within it. Returns the index and whether it meets the target.
fn expected_choice(curve: &[Value], kept: f64, budget: Option<f64>) -> Option<(usize, bool)> {
    let rate = |p: &Value| p["kept_pass_rate"].as_f64();
    let esc = |p: &Value| p["escalated"].as_u64().unwrap();
    let within: Vec<usize> = (0..curve.len())
        .filter(|&i| curve[i]["escalation_rate"].as_f64().unwrap() <= budget.unwrap_or(1.0) + 1e-12)
        .collect();
    let mut best: Option<usize> = None;
    for &i in &within {
        if rate(&curve[i]).is_some_and(|r| r + 1e-12 >= kept)
            && best.is_none_or(|b| esc(&curve[i]) < esc(&curve[b]))
        {
            best = Some(i);
        }
    }
    if let Some(b) = best {
        return Some((b, true));
    }
    budget?;
    let mut best: Option<usize> = None;
    for &i in &within {
        let Some(r) = rate(&curve[i]) else { continue };
        if best.is_none_or(|b| r > rate(&curve[b]).unwrap()) {
            best = Some(i);
        }
    }
    best.map(|b| (b, false))
}

/// Prompts whose answers from the tiny model differ; the first is settled `local` by a rule,
/// so the cascade itself can be asked to check it.
const CASCADE_PROMPTS: [&str; 10] = [
    TRANSLATE,
    SUMMARISE,
    EASY,
    MEDIUM,
    HARD,
    "What is 6 x 7? Answer with the number only.",
    "Name a colour.",
    "Write one sentence about the sea.",
    "List two prime numbers.",
    "Say hello in French.",
];

#[tokio::test]
async fn calibrate_cascade_matches_an_independent_computation() {
    // The tiny model's answers always stop at max_tokens: the truncation check off, so the
    // thresholds decide.
    let su = setup("\n[cascade]\nescalate_on_truncation = false\n").await;
    let dir = tempfile::tempdir().unwrap();
    let base = su.server.base.clone();
    let policy = su.policy.to_string_lossy().into_owned();
    // Locally, ANYTHING passes and REMOTE fails; the frontier passes both.
    let lines: Vec<String> = CASCADE_PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| task(p, if i % 3 == 1 { REMOTE } else { ANYTHING }))
        .collect();
    let tasks = write(dir.path(), "cascade.jsonl", &lines);
    let args = [
        "--replay",
        tasks.as_str(),
        "--server",
        base.as_str(),
        "--policy",
        policy.as_str(),
        "--calibrate",
        "cascade",
        "--measure-remote",
        "--target-kept-pass",
        "0.9",
        "--max-tokens",
        "6",
    ];
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let v = stdout_json(&route_eval(&with_json).await);
    assert!(
        v.get("calibration").is_none(),
        "difficulty not asked for: {v}"
    );
    // --measure-remote: every task once to the frontier; the local ones never go there.
    assert_eq!(su.frontier.hits().len(), CASCADE_PROMPTS.len());
    let c = &v["cascade"]["calibration"];
    let raw = v["cascade"]["tasks"].as_array().unwrap();
    assert_eq!(raw.len(), CASCADE_PROMPTS.len());
    assert_eq!(c["tasks"], CASCADE_PROMPTS.len());
    assert_eq!(c["remote_measured"], true);
    let rs: Vec<Recorded> = raw.iter().map(Recorded::from_json).collect();
    for (i, (r, j)) in rs.iter().zip(raw).enumerate() {
        assert_eq!(j["local"]["tier"], "local", "{j}");
        assert_eq!(j["local"]["model"], "switchyard-tiny-model", "{j}");
        assert_eq!(j["remote"]["tier"], "frontier", "{j}");
        assert_eq!(r.pass, i % 3 != 1, "{j}");
        assert!(r.remote_pass, "{j}");
        assert_eq!(
            j["other_checks"].as_array().unwrap().is_empty(),
            !r.other,
            "{j}"
        );
        for (k, want) in [
            ("mean_logprob", r.mean),
            ("min_logprob", r.min),
            ("mean_entropy", r.entropy),
        ] {
            let got = j[k].as_f64().unwrap();
            assert!((got - want).abs() < 1e-12, "{k}: {got} vs {want}: {j}");
        }
    }
    assert_eq!(
        c["local_passed"].as_u64().unwrap() as usize,
        rs.iter().filter(|r| r.pass).count()
    );

    // The recorded tokens are what the server's logprobs say for the same request.
    let direct = common::post(
        &su.server,
        "/v1/chat/completions",
        serde_json::json!({"model": "switchyard-tiny-model", "max_tokens": 6, "temperature": 0,
            "logprobs": true, "messages": [{"role": "user", "content": CASCADE_PROMPTS[2]}]}),
        &[],
    )
    .await
    .json();
    let content = direct["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    let lps: Vec<f64> = content
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect();
    let hs: Vec<f64> = content
        .iter()
        .map(|t| t["entropy"].as_f64().unwrap())
        .collect();
    // Same answer; the numbers agree to float noise (a repeated prompt is served from the
    // prefix cache, whose prefill rounds differently: about 1e-7 here).
    assert_eq!(
        raw[2]["answer"]["text"],
        direct["choices"][0]["message"]["content"]
    );
    for (k, want) in [("logprobs", &lps), ("entropies", &hs)] {
        let got: Vec<f64> = raw[2]["answer"][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len(), "{k}");
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((g - w).abs() < 1e-4, "{k}: replay {got:?}, direct {want:?}");
        }
    }
    assert!(
        hs.iter().all(|h| *h > 0.0),
        "a random model is unsure: {hs:?}"
    );

    // ... and the numbers the cascade itself computes: TRANSLATE is decided `local` by a rule,
    // so with the cascade on its verdict lands in telemetry.
    let r = common::post(
        &su.server,
        "/v1/chat/completions",
        serde_json::json!({"model": "auto", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": TRANSLATE}]}),
        &[("x-switchyard-cascade", "on")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let telemetry = std::fs::read_to_string(&su.telemetry).unwrap();
    let rec: Value = serde_json::from_str(telemetry.lines().last().unwrap()).unwrap();
    let verdict = &rec["attempts"][0]["verdict"];
    for (k, want) in [
        ("mean_logprob", rs[0].mean),
        ("min_logprob", rs[0].min),
        ("mean_entropy", rs[0].entropy),
    ] {
        let got = verdict[k].as_f64().unwrap_or_else(|| panic!("{k}: {rec}"));
        assert!(
            (got - want).abs() < 1e-4,
            "{k}: cascade {got}, replay {want}"
        );
    }

    // Every point of every curve, recomputed from the records.
    let kept_target = 0.9;
    let signals = c["signals"].as_array().unwrap();
    assert_eq!(signals.len(), 3);
    for s in signals {
        let name = s["signal"].as_str().unwrap();
        let curve = s["curve"].as_array().unwrap();
        assert!(
            curve[0]["threshold"].is_null(),
            "the first point is off: {s}"
        );
        for p in curve {
            let t = p["threshold"].as_f64();
            let (esc, kept, kept_passed, assumed, measured) = expected_point(&rs, name, t);
            assert_eq!(p["escalated"].as_u64().unwrap(), esc, "{name} at {t:?}");
            assert_eq!(p["kept"].as_u64().unwrap(), kept, "{name} at {t:?}");
            assert_eq!(
                p["kept_passed"].as_u64().unwrap(),
                kept_passed,
                "{name} at {t:?}"
            );
            let kr = p["kept_pass_rate"].as_f64();
            assert_eq!(kr.is_none(), kept == 0);
            if let Some(kr) = kr {
                assert!((kr - kept_passed as f64 / kept as f64).abs() < 1e-12);
            }
            assert!((p["pass_rate_assumed"].as_f64().unwrap() - assumed).abs() < 1e-12);
            assert!((p["pass_rate_measured"].as_f64().unwrap() - measured).abs() < 1e-12);
            // A threshold a policy accepts.
            if let Some(t) = t {
                assert!(
                    if name == "mean_entropy" {
                        t >= 0.0
                    } else {
                        t <= 0.0
                    },
                    "{t}"
                );
            }
        }
        // Every cut between neighbouring values is on the curve: escalating the k least
        // confident answers, for every k (up to a value of 0, which no threshold can cut).
        let mut confidence: Vec<f64> = rs
            .iter()
            .filter(|r| !r.other)
            .map(|r| match r.value(name) {
                (v, true) => -v,
                (v, false) => v,
            })
            .collect();
        confidence.sort_by(f64::total_cmp);
        confidence.dedup();
        let other = rs.iter().filter(|r| r.other).count();
        let want: Vec<u64> = std::iter::once(other)
            .chain(confidence.iter().filter(|&&u| u < 0.0).map(|&u| {
                other
                    + rs.iter()
                        .filter(|r| !r.other)
                        .filter(|r| {
                            let (v, hi) = r.value(name);
                            (if hi { -v } else { v }) <= u
                        })
                        .count()
            }))
            .map(|x| x as u64)
            .collect();
        let got: Vec<u64> = curve
            .iter()
            .map(|p| p["escalated"].as_u64().unwrap())
            .collect();
        assert_eq!(got, want, "{name}");

        let chosen = expected_choice(curve, kept_target, None);
        match chosen {
            Some((i, meets)) => {
                assert_eq!(s["chosen"], curve[i], "{name}");
                assert_eq!(s["meets_target"], meets, "{name}");
            }
            None => assert!(s["chosen"].is_null(), "{name}: {s}"),
        }
        // AUROC: passing answers more confident than failing ones, ties half.
        let conf = |r: &Recorded| match r.value(name) {
            (v, true) => -v,
            (v, false) => v,
        };
        let (good, bad): (Vec<&Recorded>, Vec<&Recorded>) = rs.iter().partition(|r| r.pass);
        let mut wins = 0.0;
        for g in &good {
            for b in &bad {
                wins += match conf(g).total_cmp(&conf(b)) {
                    std::cmp::Ordering::Greater => 1.0,
                    std::cmp::Ordering::Equal => 0.5,
                    std::cmp::Ordering::Less => 0.0,
                };
            }
        }
        let auroc = wins / (good.len() * bad.len()) as f64;
        assert!(
            (s["auroc"].as_f64().unwrap() - auroc).abs() < 1e-12,
            "{name}"
        );
    }

    // 7 of 10 local answers pass: 90% needs a threshold (on this model, every signal has one).
    for s in signals {
        assert!(s["chosen"]["threshold"].is_number(), "{s}");
    }

    // The snippet: the recommended signal at its chosen threshold, the others off; a policy
    // with it pasted in loads and says the same.
    let snippet = v["cascade"]["snippet"].as_str();
    let rec_signal = c["recommended"].as_str();
    let best = rec_signal.map(|r| signals.iter().find(|s| s["signal"] == r).unwrap());
    // Of the signals meeting the target, the one escalating least.
    let least = signals
        .iter()
        .filter(|s| s["meets_target"] == true)
        .map(|s| s["chosen"]["escalated"].as_u64().unwrap())
        .min();
    assert_eq!(
        best.filter(|b| b["meets_target"] == true)
            .map(|b| b["chosen"]["escalated"].as_u64().unwrap()),
        least,
        "{c}"
    );
    if let (Some(snippet), Some(best)) = (snippet, best) {
        let p = switchyard_router::Policy::from_toml_str(snippet, "snippet")
            .unwrap_or_else(|e| panic!("{e}\n{snippet}"));
        let cfg = p.cascade();
        let t = best["chosen"]["threshold"].as_f64();
        let want = |s: &str| if best["signal"] == s { t } else { None };
        assert_eq!(cfg.min_mean_logprob, want("mean_logprob"), "{snippet}");
        assert_eq!(
            cfg.min_token_logprob,
            want("min_token_logprob"),
            "{snippet}"
        );
        assert_eq!(cfg.max_mean_entropy, want("mean_entropy"), "{snippet}");
        // The table output prints the same snippet and the choices.
        let out = route_eval(&args).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(snippet), "{text}");
        assert!(
            text.contains("mean token logprob (min_mean_logprob): AUROC"),
            "{text}"
        );
        assert!(text.contains("measured"), "{text}");
    } else {
        assert!(snippet.is_none() && best.is_none(), "{v}");
    }

    // A budget: 100% kept is likely out of reach within 30% escalation; either way the choice
    // is the brute-force one.
    let mut budget = with_json.clone();
    budget[10] = "1.0";
    budget.extend(["--max-escalation", "0.3"]);
    let v = stdout_json(&route_eval(&budget).await);
    for s in v["cascade"]["calibration"]["signals"].as_array().unwrap() {
        let curve = s["curve"].as_array().unwrap();
        let (i, meets) = expected_choice(curve, 1.0, Some(0.3)).expect("off is within any budget");
        assert_eq!(s["chosen"], curve[i], "{s}");
        assert_eq!(s["meets_target"], meets);
        assert!(s["chosen"]["escalation_rate"].as_f64().unwrap() <= 0.3 + 1e-12);
    }
    // The snippet's signal: the least escalation among those meeting the target, else the best
    // kept pass rate within the budget.
    let c = &v["cascade"]["calibration"];
    let signals = c["signals"].as_array().unwrap();
    let key = |s: &Value| {
        let p = &s["chosen"];
        let kept = p["kept_pass_rate"].as_f64().unwrap_or(-1.0);
        let esc = p["escalated"].as_u64().unwrap() as f64;
        if s["meets_target"] == true {
            (1.0, -esc, kept)
        } else {
            (0.0, kept, -esc)
        }
    };
    let best =
        signals
            .iter()
            .map(key)
            .fold((-1.0, f64::NEG_INFINITY, f64::NEG_INFINITY), |a, b| {
                if b > a {
                    b
                } else {
                    a
                }
            });
    let rec = signals
        .iter()
        .find(|s| s["signal"] == c["recommended"])
        .expect("a recommended signal");
    assert_eq!(key(rec), best, "{c}");

    // A policy without a remote tier cannot measure one.
    let local_only = write(
        dir.path(),
        "local.toml",
        &["[[tiers]]\nname = \"local\"\nkind = \"local\"".to_string()],
    );
    let mut no_remote = args.to_vec();
    no_remote[5] = local_only.as_str();
    let out = route_eval(&no_remote).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--measure-remote") && err.contains("no remote tier"),
        "{err}"
    );
}
