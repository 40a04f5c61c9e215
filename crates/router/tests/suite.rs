//! The default policy against the labelled suite `models/router/suite.jsonl`.

use std::path::PathBuf;

use switchyard_router::eval::{load_suite, run_suite};
use switchyard_router::{Action, Policy};

/// The default policy must decide at least this share of the suite as labelled.
const MIN_ACCURACY: f64 = 0.90;

fn suite_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/router/suite.jsonl")
}

#[test]
fn default_policy_scores_on_suite() {
    let cases = load_suite(suite_path()).expect("suite loads");
    for action in [
        Action::Local,
        Action::Escalate,
        Action::LocalOnly,
        Action::Block,
    ] {
        let n = cases.iter().filter(|(_, c)| c.expect == action).count();
        assert!(n >= 15, "suite has only {n} `{action}` cases; want >= 15");
    }
    assert!(cases.len() >= 80);
    let report = run_suite(&Policy::default_policy(), &cases, None);
    for m in &report.misses {
        println!(
            "MISS line {}: expected {} got {}\n  prompt: {}\n  reasons: {:?}",
            m.line, m.expect, m.got, m.prompt, m.reasons
        );
    }
    println!(
        "suite: {}/{} = {:.1}%  confusion: {:?}",
        report.correct,
        report.total,
        report.accuracy * 100.0,
        report.confusion
    );
    assert!(
        report.accuracy >= MIN_ACCURACY,
        "default policy scored {:.1}% on the suite (want >= {:.0}%)",
        report.accuracy * 100.0,
        MIN_ACCURACY * 100.0
    );
}

#[test]
fn no_sensitive_case_ever_leaves_the_machine() {
    // The misses allowed by MIN_ACCURACY must never be a local-only or block case that was
    // escalated: that would send protected content to a remote tier.
    let cases = load_suite(suite_path()).expect("suite loads");
    let report = run_suite(&Policy::default_policy(), &cases, None);
    for m in &report.misses {
        assert!(
            !(matches!(m.expect, Action::LocalOnly | Action::Block) && m.got == Action::Escalate),
            "line {}: a {} case was escalated: {}",
            m.line,
            m.expect,
            m.prompt
        );
    }
}
