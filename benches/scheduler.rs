//! Cost of one engine step minus the forward: `Scheduler::schedule` (running sequences' decode
//! tokens, admissions with chunked prefill, block allocation and prefix-cache lookups in the
//! block pool), the per-sequence copies of tokens and block tables the engine makes for the
//! forward, `Scheduler::complete` with a sampled token (block commits and prefix hashing), and
//! retiring finished sequences while new requests arrive.
//!
//! The load is a busy server: 64 sequences running (the default `max_num_seqs`) and 256
//! waiting, 128-token prompts, 32–95 tokens generated each (staggered, so about one sequence
//! finishes and one prefill is admitted per step, as in steady state), prefix caching on, blocks
//! of 16 tokens. `roomy_pool` has blocks for everyone running; `tight_pool` has about three
//! quarters of that, so steps also preempt and re-admit. A step here should stay far below
//! a decode forward (~10 ms at the small preset); the time per step is the number to watch.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use switchyard_benches::{test_mode, Rng, SEED};
use switchyard_engine::block_pool::{BlockPool, SharedPool};
use switchyard_engine::scheduler::{Scheduler, SchedulerConfig, SeqId};

/// Running sequences: the default `SchedulerConfig::max_num_seqs`.
const RUNNING: usize = 64;
/// Waiting sequences kept queued behind them.
const WAITING: usize = 256;
/// Prompt tokens per request.
const PROMPT_LEN: usize = 128;
/// Generated tokens per request: `MIN_GEN + id % GEN_SPREAD`, so completions are staggered.
const MIN_GEN: usize = 32;
/// See [`MIN_GEN`].
const GEN_SPREAD: usize = 64;
/// Tokens per KV block (the engine's default).
const BLOCK_SIZE: usize = 16;
/// Vocabulary of the random prompts (the small preset's).
const VOCAB: usize = 32768;
/// Steps run before measuring, so the running set is full and completions are staggered.
const WARM_STEPS: usize = 300;

/// A scheduler under load, and what the engine loop would do around it.
struct Server {
    sched: Scheduler,
    rng: Rng,
    next_id: SeqId,
    max_tokens: Vec<usize>,
}

impl Server {
    fn new(pool_blocks: usize) -> Self {
        let pool = SharedPool::new(BlockPool::new(pool_blocks, BLOCK_SIZE, true));
        let cfg = SchedulerConfig {
            max_num_seqs: RUNNING,
            ..SchedulerConfig::default()
        };
        let mut s = Self {
            sched: Scheduler::new(cfg, pool),
            rng: Rng::new(SEED),
            next_id: 0,
            max_tokens: Vec::new(),
        };
        for _ in 0..RUNNING + WAITING {
            s.submit();
        }
        for _ in 0..WARM_STEPS {
            s.step();
        }
        s
    }

    fn submit(&mut self) {
        let id = self.next_id;
        self.next_id += 1;
        let max_tokens = MIN_GEN + id as usize % GEN_SPREAD;
        self.max_tokens.push(max_tokens);
        let prompt = self.rng.tokens(PROMPT_LEN, VOCAB);
        self.sched
            .add(id, prompt, max_tokens, 0)
            .expect("the request fits");
    }

    /// One engine step without the forward; returns the tokens it scheduled.
    fn step(&mut self) -> usize {
        let plan = self.sched.schedule();
        // The engine's owned copies of the step's inputs (engine.rs `step`).
        std::hint::black_box(self.sched.step_inputs(&plan));
        let mut tokens = 0;
        for s in &plan.scheduled {
            tokens += s.len;
            if !s.samples {
                self.sched.complete(s.id, s.len, None);
                continue;
            }
            let tok = self.rng.below(VOCAB) as u32;
            self.sched.complete(s.id, s.len, Some(tok));
            let done = self
                .sched
                .get(s.id)
                .is_some_and(|q| q.num_generated() >= self.max_tokens[s.id as usize]);
            if done {
                self.sched.remove(s.id);
                self.submit();
            }
        }
        tokens
    }
}

fn scheduler(c: &mut Criterion) {
    // Blocks one running sequence can hold at its longest.
    let per_seq = (PROMPT_LEN + MIN_GEN + GEN_SPREAD).div_ceil(BLOCK_SIZE);
    let pools = [
        // Twice what the running set needs: the prefix cache keeps freed blocks around.
        ("roomy_pool", 2 * RUNNING * per_seq),
        ("tight_pool", 3 * RUNNING * per_seq / 4),
    ];
    let mut g = c.benchmark_group("scheduler");
    for (name, blocks) in pools {
        let mut server: Option<Server> = None;
        g.bench_function(
            BenchmarkId::new(name, format!("w{WAITING}_r{RUNNING}")),
            |b| {
                let s = server.get_or_insert_with(|| Server::new(blocks));
                b.iter(|| s.step())
            },
        );
        if test_mode() {
            if let Some(s) = &server {
                eprintln!(
                    "scheduler/{name}: {} running, {} waiting after the run",
                    s.sched.num_running(),
                    s.sched.num_waiting()
                );
            }
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = switchyard_benches::criterion();
    targets = scheduler
}
criterion_main!(benches);
