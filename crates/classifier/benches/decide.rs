//! Decision latency with the semantic classifier: `decide(...)` for one prompt, embedding
//! included, on the CPU. Acceptance: median ≤ 30 ms on the 2-core dev machine.
//!
//! `cargo bench -p switchyard-classifier --bench decide` (needs the MiniLM folder:
//! scripts/minilm.sh, or $SWITCHYARD_MINILM_DIR).

use criterion::{criterion_group, criterion_main, Criterion};
use switchyard_classifier::RouterScorer;
use switchyard_router::{decide, Policy, RouteRequest, RouterState, SemanticScorer};

const PROMPTS: [(&str, &str); 3] = [
    ("short", "What is the capital of Australia?"),
    (
        "medium",
        "Our checkout service intermittently returns 502s only in production, roughly once an hour. \
         The load balancer logs show upstream resets. What should we look at first, and why?",
    ),
    (
        "mmlu",
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:",
    ),
];

fn bench(c: &mut Criterion) {
    let scorer = match RouterScorer::load_default() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skipping the decide bench: {e}");
            return;
        }
    };
    let policy = Policy::default_policy();
    let state = RouterState::default();
    let mut g = c.benchmark_group("decide_with_classifier");
    g.sample_size(30);
    for (name, prompt) in PROMPTS {
        let req = RouteRequest::from_prompt(prompt);
        g.bench_function(name, |b| {
            b.iter(|| decide(&policy, &req, &state, Some(&scorer as &dyn SemanticScorer)))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("embed");
    g.sample_size(30);
    for (name, prompt) in PROMPTS {
        g.bench_function(name, |b| {
            b.iter(|| scorer.embedder().embed(prompt).expect("embed"))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
