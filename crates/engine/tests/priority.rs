//! Priority scheduling (`SchedulingPolicy::Priority`, vLLM's `--scheduling-policy priority`)
//! on the real engine: a request with a lower priority value that arrives while the only slot
//! (or the KV cache) is taken preempts the running one and finishes first; the preempted one
//! recomputes and still generates exactly the tokens it generates alone. Waiting requests start
//! in (priority, arrival) order. Under FCFS a non-zero priority is refused at submission.

use std::time::{Duration, Instant};

use switchyard_engine::engine::{
    Completion, EngineConfig, EngineHandle, Event, GenerateRequest, RequestStream, SubmitError,
};
use switchyard_engine::scheduler::SchedulingPolicy;

mod common;

use common::{alone, engine_cfg, load, make_model, prompts};

/// What one request's stream delivered, and when.
struct Outcome {
    ids: Vec<u32>,
    done: Completion,
    /// When the first token was sampled (submission instant + the engine's ttft).
    first_token: Instant,
    /// When the test thread received the end.
    finished: Instant,
}

fn request(prompt: &[u32], n: usize, priority: i64) -> GenerateRequest {
    GenerateRequest {
        ignore_eos: true,
        priority,
        ..GenerateRequest::greedy(prompt.to_vec(), n)
    }
}

/// Reads a stream to its end on its own thread (so the end is timed when it happens).
fn read(
    mut s: RequestStream,
    submitted: Instant,
    seen: Vec<u32>,
) -> std::thread::JoinHandle<Outcome> {
    std::thread::spawn(move || {
        let mut ids = seen;
        loop {
            match s.blocking_recv() {
                Some(Event::Token(t)) => ids.push(t.id),
                Some(Event::Finished(c)) => {
                    return Outcome {
                        ids,
                        first_token: submitted + c.ttft.unwrap_or(Duration::ZERO),
                        finished: Instant::now(),
                        done: c,
                    }
                }
                Some(Event::Error(e)) => panic!("{e}"),
                None => panic!("the stream closed before the request finished"),
            }
        }
    })
}

fn cfg(policy: SchedulingPolicy, max_num_seqs: usize, blocks: Option<usize>) -> EngineConfig {
    let mut c = engine_cfg(2048, 4, blocks);
    c.scheduler.max_num_seqs = max_num_seqs;
    c.scheduler.policy = policy;
    c
}

/// A long low-priority request (priority 5) runs; once it has produced a token, a short
/// high-priority one (`hi_n` tokens; priority -1 under the priority policy, 0 under FCFS)
/// arrives. Returns (low, high).
fn low_then_high(e: &EngineHandle, policy: SchedulingPolicy, hi_n: usize) -> (Outcome, Outcome) {
    let ps = prompts();
    let (lo_p, hi_p) = if policy == SchedulingPolicy::Priority {
        (5, -1)
    } else {
        (0, 0)
    };
    let t_lo = Instant::now();
    let mut lo = e.submit(request(&ps[3], 60, lo_p)).unwrap();
    let first = match lo.blocking_recv() {
        Some(Event::Token(t)) => t.id,
        o => panic!("expected a token, got {o:?}"),
    };
    let lo = read(lo, t_lo, vec![first]);
    let t_hi = Instant::now();
    let hi = read(e.submit(request(&ps[1], hi_n, hi_p)).unwrap(), t_hi, vec![]);
    (lo.join().unwrap(), hi.join().unwrap())
}

#[test]
fn a_high_priority_arrival_preempts_for_the_only_slot_and_finishes_first() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let ps = prompts();
    let want_lo = alone(&m, &ps[3], 60).0;
    let want_hi = alone(&m, &ps[1], 12).0;
    let e = EngineHandle::start(m, t, cfg(SchedulingPolicy::Priority, 1, None)).unwrap();
    let (lo, hi) = low_then_high(&e, SchedulingPolicy::Priority, 12);
    assert!(
        hi.finished < lo.finished,
        "the high-priority request should finish first"
    );
    assert_eq!(
        lo.done.preemptions, 1,
        "the low-priority request is preempted once"
    );
    assert_eq!(hi.done.preemptions, 0);
    // Preemption (recompute) changes nothing in either output.
    assert_eq!(
        lo.ids, want_lo,
        "the preempted request's greedy tokens changed"
    );
    assert_eq!(hi.ids, want_hi);
    assert_eq!(lo.done.completion_tokens, 60);
}

#[test]
fn fcfs_makes_the_later_request_wait_and_refuses_priorities() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let e = EngineHandle::start(m, t, cfg(SchedulingPolicy::Fcfs, 1, None)).unwrap();
    let (lo, hi) = low_then_high(&e, SchedulingPolicy::Fcfs, 12);
    assert!(lo.finished < hi.finished, "FCFS serves in arrival order");
    assert_eq!(lo.done.preemptions, 0);
    match e.submit(request(&prompts()[0], 4, 1)) {
        Err(SubmitError::InvalidParams(m)) => {
            assert!(
                m.contains("priority") && m.contains("--scheduling-policy"),
                "{m}"
            )
        }
        Err(o) => panic!("wrong error: {o}"),
        Ok(_) => panic!("a priority under FCFS was accepted"),
    }
}

#[test]
fn kv_pressure_preempts_the_lowest_priority_not_the_newest() {
    // 24 blocks of 4 tokens: the long request alone needs 23, the short one 14. Both fit at
    // first; as they grow one must go. FCFS would preempt the newest (the high-priority one).
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let ps = prompts();
    let want_lo = alone(&m, &ps[3], 60).0;
    let want_hi = alone(&m, &ps[1], 30).0;
    let e = EngineHandle::start(m, t, cfg(SchedulingPolicy::Priority, 8, Some(24))).unwrap();
    let (lo, hi) = low_then_high(&e, SchedulingPolicy::Priority, 30);
    assert_eq!(
        hi.done.preemptions, 0,
        "the high-priority request is never the victim"
    );
    assert!(
        lo.done.preemptions >= 1,
        "the cache should have forced a preemption"
    );
    assert_eq!(lo.ids, want_lo);
    assert_eq!(hi.ids, want_hi);
}

#[test]
fn waiting_requests_start_by_priority_then_arrival() {
    let d = tempfile::tempdir().unwrap();
    make_model(d.path(), 4096);
    let (m, t) = load(d.path());
    let e = EngineHandle::start(m, t, cfg(SchedulingPolicy::Priority, 1, None)).unwrap();
    let ps = prompts();
    // A blocker that outranks everything keeps the one slot while the others queue up.
    let t0 = Instant::now();
    let mut blocker = e.submit(request(&ps[3], 60, -10)).unwrap();
    assert!(matches!(blocker.blocking_recv(), Some(Event::Token(_))));
    let blocker = read(blocker, t0, vec![]);
    let priorities = [3i64, 1, 2, 1, 0, 3];
    let readers: Vec<_> = priorities
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let at = Instant::now();
            let s = e.submit(request(&ps[i % ps.len()], 3, p)).unwrap();
            read(s, at, vec![])
        })
        .collect();
    let outs: Vec<Outcome> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let b = blocker.join().unwrap();
    assert_eq!(b.done.preemptions, 0);
    let mut order: Vec<usize> = (0..outs.len()).collect();
    order.sort_by_key(|&i| outs[i].first_token);
    assert_eq!(
        order,
        vec![4, 1, 3, 2, 0, 5],
        "start order by (priority, arrival)"
    );
    for (i, o) in outs.iter().enumerate() {
        assert!(
            o.first_token > b.first_token,
            "request {i} started before the blocker"
        );
        assert_eq!(o.done.preemptions, 0, "request {i}");
    }
}
