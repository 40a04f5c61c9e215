//! Decision latency with the semantic classifier: `decide(...)` for one prompt, embedding
//! included, on the CPU. Acceptance: median ≤ 30 ms on the 2-core dev machine.
//!
//! `cargo bench -p switchyard-classifier --bench decide` (needs the MiniLM folder:
//! scripts/minilm.sh, or $SWITCHYARD_MINILM_DIR).
//!
//! Prompts: short (9 tokens), medium (41), an MMLU question (47), and a long one (307
//! tokens, so the embedding sees the first [`switchyard_classifier::MAX_TOKENS`]). The
//! `decide_rules_only` group is the same decision without the classifier, `embed` the MiniLM
//! forward alone, `score` the exemplar and difficulty scoring of a known embedding.

use criterion::{criterion_group, criterion_main, Criterion};
use switchyard_classifier::RouterScorer;
use switchyard_router::{decide, Policy, RouteRequest, RouterState, SemanticScorer};

const LONG: &str = "We run a payments platform on Kubernetes across two regions. Since last \
    Tuesday's deploy, roughly one in two hundred card authorisations times out at the API \
    gateway after 30 seconds, but only for merchants in the EU region, and only between 09:00 \
    and 11:00 UTC. The gateway logs show the upstream authorisation service accepting the \
    connection and never answering; the authorisation service's own logs show the request \
    arriving, a call to the fraud-scoring service starting, and nothing after it. The \
    fraud-scoring service runs with four replicas behind a ClusterIP service, uses a Postgres \
    connection pool of twenty connections per replica, and its p99 latency on the dashboard is \
    flat at 80 ms. The deploy changed three things: the Go version of the authorisation \
    service (1.21 to 1.22), the HTTP client's idle connection timeout (90 s to 30 s), and the \
    fraud-scoring service's database migration that added an index concurrently. Rolling back \
    the authorisation service alone did not help. Our on-call engineer suspects the \
    connection pool, our database administrator suspects lock contention from the index \
    build, and our network team says nothing changed on their side. Walk through how you \
    would find the root cause: which hypotheses you would rule out first and with what \
    evidence, what you would measure during the 09:00 window, and what the most likely \
    explanation is given that the timeouts are regional and time-boxed.";

const PROMPTS: [(&str, &str); 4] = [
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
    ("long", LONG),
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
    let mut g = c.benchmark_group("decide_rules_only");
    g.sample_size(30);
    for (name, prompt) in PROMPTS {
        let req = RouteRequest::from_prompt(prompt);
        g.bench_function(name, |b| b.iter(|| decide(&policy, &req, &state, None)));
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
    let mut g = c.benchmark_group("score");
    g.sample_size(30);
    for (name, prompt) in PROMPTS {
        let emb = scorer.embedder().embed(prompt).expect("embed");
        let chars = prompt.chars().count();
        g.bench_function(name, |b| {
            b.iter(|| scorer.score_embedding(&emb, chars).expect("score"))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
