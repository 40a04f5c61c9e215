//! Continuous-batching scheduler (vLLM v1 style): waiting and running queues, a per-step
//! token budget shared by decodes and **chunked prefills**, a cap on running sequences,
//! preemption by recompute when KV blocks run out, and refusal at submission of requests that
//! could never fit.
//!
//! Two queue policies, as vLLM's `--scheduling-policy`: [`SchedulingPolicy::Fcfs`] serves in
//! arrival order (a preempted sequence goes back to the front of the queue), and
//! [`SchedulingPolicy::Priority`] orders both queues by `(priority, arrival)` — lower priority
//! values first — and, when a waiting sequence outranks a running one and the KV cache or
//! `max_num_seqs` leaves it no room, preempts the lowest-ranked running sequence for it (as
//! vLLM's priority preemption; the victim recomputes later, so its output does not change).
//!
//! The scheduler knows sequences only as token lists and block tables; sampling, streaming and
//! the model are the engine loop's business.

use std::collections::VecDeque;

use crate::block_pool::{BlockTable, SharedPool};

/// Identifier of a request inside the engine.
pub type SeqId = u64;

/// The order waiting requests are served in (vLLM's `--scheduling-policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SchedulingPolicy {
    /// First come, first served; request priorities are not accepted.
    #[default]
    Fcfs,
    /// Lower `priority` value first, ties by arrival; a waiting request preempts running
    /// requests it outranks when there is no room for it.
    Priority,
}

impl SchedulingPolicy {
    /// The flag value (`fcfs`, `priority`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fcfs => "fcfs",
            Self::Priority => "priority",
        }
    }
}

impl std::fmt::Display for SchedulingPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scheduling policy name that is neither `fcfs` nor `priority`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduling policy {0:?}; use fcfs or priority")]
pub struct UnknownPolicy(pub String);

impl std::str::FromStr for SchedulingPolicy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fcfs" => Ok(Self::Fcfs),
            "priority" => Ok(Self::Priority),
            o => Err(UnknownPolicy(o.to_string())),
        }
    }
}

/// Limits the scheduler enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens computed in one step (decodes + prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Longest prompt + completion a sequence may reach.
    pub max_model_len: usize,
    /// Split long prompts across steps; when off a prompt must fit one step's budget.
    pub chunked_prefill: bool,
    /// Most requests waiting before new ones are refused as "queue full".
    pub max_waiting: usize,
    /// Queue order and preemption for priority.
    pub policy: SchedulingPolicy,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            // vLLM's default for chunked prefill: keeps decode latency low while a long prompt
            // is being prefilled.
            max_num_batched_tokens: 2048,
            max_model_len: 4096,
            chunked_prefill: true,
            max_waiting: 1024,
            policy: SchedulingPolicy::Fcfs,
        }
    }
}

/// Why a request was refused at submission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// Prompt plus completion is longer than the model's context.
    #[error("this request needs {needed} tokens ({prompt} in the prompt + {max_tokens} to generate) but the maximum context length is {limit} tokens")]
    ContextLength {
        /// Prompt tokens.
        prompt: usize,
        /// Requested completion tokens.
        max_tokens: usize,
        /// Their sum.
        needed: usize,
        /// `max_model_len`.
        limit: usize,
    },
    /// Even the whole KV cache could not hold this request.
    #[error("this request needs {needed} KV blocks but the whole cache has {total}")]
    CacheTooSmall {
        /// Blocks needed.
        needed: usize,
        /// Blocks in the cache.
        total: usize,
    },
    /// The prompt is longer than one step's budget and chunked prefill is off.
    #[error("the prompt has {prompt} tokens, more than max_num_batched_tokens ({budget}) with chunked prefill disabled")]
    PromptOverBudget {
        /// Prompt tokens.
        prompt: usize,
        /// Step budget.
        budget: usize,
    },
    /// Too many requests are waiting.
    #[error("the server is at capacity ({waiting} requests waiting); retry later")]
    QueueFull {
        /// Requests waiting.
        waiting: usize,
    },
    /// The prompt is empty.
    #[error("the prompt is empty")]
    EmptyPrompt,
}

/// Whether a request with `prompt` tokens asking for `max_tokens` could ever run under `cfg`
/// with a cache of `total_blocks` blocks of `block_size` tokens.
pub fn check_admissible(
    cfg: &SchedulerConfig,
    total_blocks: usize,
    block_size: usize,
    prompt: usize,
    max_tokens: usize,
) -> Result<(), AdmissionError> {
    if prompt == 0 {
        return Err(AdmissionError::EmptyPrompt);
    }
    let needed = prompt + max_tokens;
    if needed > cfg.max_model_len {
        return Err(AdmissionError::ContextLength {
            prompt,
            max_tokens,
            needed,
            limit: cfg.max_model_len,
        });
    }
    // The last generated token is never computed, so `needed - 1` slots suffice.
    let blocks = (needed - 1).max(1).div_ceil(block_size);
    if blocks > total_blocks {
        return Err(AdmissionError::CacheTooSmall {
            needed: blocks,
            total: total_blocks,
        });
    }
    if !cfg.chunked_prefill && prompt > cfg.max_num_batched_tokens {
        return Err(AdmissionError::PromptOverBudget {
            prompt,
            budget: cfg.max_num_batched_tokens,
        });
    }
    Ok(())
}

/// A sequence as the scheduler sees it.
#[derive(Debug)]
pub struct Sequence {
    /// Request id.
    pub id: SeqId,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    /// Length of the prompt part of `tokens`.
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    /// Prompt tokens served from the prefix cache at (last) admission.
    pub num_cached: usize,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// KV blocks.
    pub blocks: BlockTable,
    /// Times this sequence was preempted.
    pub preemptions: u32,
    /// Request priority (lower is served earlier; only [`SchedulingPolicy::Priority`] reads it).
    pub priority: i64,
    /// Order of arrival at the scheduler (kept across preemptions).
    pub arrival: u64,
}

impl Sequence {
    /// Generated tokens so far.
    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Rank under [`SchedulingPolicy::Priority`]: smaller is served first.
    pub fn rank(&self) -> (i64, u64) {
        (self.priority, self.arrival)
    }
}

/// One sequence's work in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    /// Request id.
    pub id: SeqId,
    /// First token position computed this step (= `num_computed` before it).
    pub start: usize,
    /// Tokens computed this step.
    pub len: usize,
    /// Whether this step computes the last known token, so a new one will be sampled.
    pub samples: bool,
    /// Speculative tokens computed after the known ones ([`crate::speculative`]); the step
    /// samples at each of them too, and keeps them while they agree.
    pub draft: Vec<u32>,
}

/// The plan for one step.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepPlan {
    /// Work, in batch order.
    pub scheduled: Vec<Scheduled>,
    /// Sequences preempted while planning (their KV was dropped; they will recompute).
    pub preempted: Vec<SeqId>,
}

/// Owned copies of one scheduled sequence's inputs to a step's forward (small: the step's
/// tokens and the block ids), so the forward can run while the scheduler stays borrowable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepInput {
    /// The tokens computed this step.
    pub tokens: Vec<u32>,
    /// Position of the first of them.
    pub pos0: usize,
    /// The sequence's KV block table.
    pub block_table: Vec<u32>,
}

/// Waiting and running queues plus the block pool.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: SharedPool,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    total_blocks: usize,
    block_size: usize,
    /// Next [`Sequence::arrival`].
    next_arrival: u64,
}

impl Scheduler {
    /// A scheduler over `pool`.
    pub fn new(cfg: SchedulerConfig, pool: SharedPool) -> Self {
        let (total_blocks, block_size) = {
            let p = pool.lock();
            (p.stats().total, p.block_size())
        };
        Self {
            cfg,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            total_blocks,
            block_size,
            next_arrival: 0,
        }
    }

    /// The limits.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// The block pool.
    pub fn pool(&self) -> &SharedPool {
        &self.pool
    }

    /// Checks a request could ever run, without queueing it.
    pub fn check_admissible(&self, prompt: usize, max_tokens: usize) -> Result<(), AdmissionError> {
        check_admissible(
            &self.cfg,
            self.total_blocks,
            self.block_size,
            prompt,
            max_tokens,
        )
    }

    /// Queues a request of priority 0 after checking it can ever run and that the queue has
    /// room.
    pub fn add(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        max_tokens: usize,
        cache_salt: u64,
    ) -> Result<(), AdmissionError> {
        self.add_with_priority(id, prompt, max_tokens, cache_salt, 0)
    }

    /// [`Scheduler::add`] with a priority (lower is served earlier under
    /// [`SchedulingPolicy::Priority`]; FCFS ignores it).
    pub fn add_with_priority(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        max_tokens: usize,
        cache_salt: u64,
        priority: i64,
    ) -> Result<(), AdmissionError> {
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(AdmissionError::QueueFull {
                waiting: self.waiting.len(),
            });
        }
        self.enqueue(id, prompt, max_tokens, cache_salt, priority)
    }

    /// Queues a request whose place in the queue was already granted (the engine reserves it
    /// when the request is submitted), checking only that it can ever run. Preempted sequences
    /// also sit in the waiting queue, so re-checking the bound here could refuse a request the
    /// caller was already told is accepted. `priority` as in [`Scheduler::add_with_priority`].
    pub fn enqueue(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        max_tokens: usize,
        cache_salt: u64,
        priority: i64,
    ) -> Result<(), AdmissionError> {
        self.check_admissible(prompt.len(), max_tokens)?;
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let seq = Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            num_cached: 0,
            max_tokens,
            blocks: BlockTable::new(self.pool.clone(), cache_salt),
            preemptions: 0,
            priority,
            arrival,
        };
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.waiting.push_back(seq),
            SchedulingPolicy::Priority => self.insert_waiting(seq),
        }
        Ok(())
    }

    /// Puts a waiting sequence at its place by rank (priority policy).
    fn insert_waiting(&mut self, seq: Sequence) {
        let at = self.waiting.partition_point(|w| w.rank() <= seq.rank());
        self.waiting.insert(at, seq);
    }

    /// Puts an admitted sequence into the running queue: last under FCFS, at its place by rank
    /// under the priority policy, so the last running sequence is always the one to preempt.
    fn insert_running(&mut self, seq: Sequence) {
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.running.push(seq),
            SchedulingPolicy::Priority => {
                let at = self.running.partition_point(|r| r.rank() <= seq.rank());
                self.running.insert(at, seq);
            }
        }
    }

    /// Preempts the last running sequence (the newest under FCFS, the lowest-ranked under the
    /// priority policy): its KV is dropped and it waits to recompute. Returns its id.
    fn preempt_last(&mut self, plan: &mut StepPlan) -> Option<SeqId> {
        let mut v = self.running.pop()?;
        plan.preempted.push(v.id);
        plan.scheduled.retain(|s| s.id != v.id);
        v.blocks.clear();
        v.num_computed = 0;
        v.preemptions += 1;
        let id = v.id;
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.waiting.push_front(v),
            SchedulingPolicy::Priority => self.insert_waiting(v),
        }
        Some(id)
    }

    /// Sequences waiting to start (or restart).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences admitted and holding KV blocks.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// A running sequence.
    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.running.iter().find(|s| s.id == id)
    }

    /// Ids of every sequence, running then waiting.
    pub fn ids(&self) -> Vec<SeqId> {
        self.running
            .iter()
            .map(|s| s.id)
            .chain(self.waiting.iter().map(|s| s.id))
            .collect()
    }

    /// Removes a sequence wherever it is; its blocks are freed. Returns whether it existed.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            return Some(self.running.remove(i));
        }
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            return self.waiting.remove(i);
        }
        None
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> StepPlan {
        self.schedule_with_drafts(|_, _, _| Vec::new())
    }

    /// Plans the next step, asking `propose(id, tokens, max)` for up to `max` draft tokens to
    /// follow each decoding sequence's `tokens`. Drafts use budget and KV blocks left over after the
    /// sequence's own token: they never preempt anyone, and they stop where the sequence must
    /// (its `max_tokens`, `max_model_len`).
    pub fn schedule_with_drafts(
        &mut self,
        mut propose: impl FnMut(SeqId, &[u32], usize) -> Vec<u32>,
    ) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        // 1. Running sequences, oldest first: decodes and continuing prefill chunks.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let (remaining, computed) = {
                let s = &self.running[i];
                (s.tokens.len() - s.num_computed, s.num_computed)
            };
            let n = remaining.min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            // Find blocks, preempting the last running sequences (the newest, or under the
            // priority policy the lowest-ranked) if needed.
            loop {
                if self.running[i].blocks.ensure_capacity(computed + n) {
                    break;
                }
                let victim = self.running.len() - 1;
                self.preempt_last(&mut plan);
                if victim == i {
                    break;
                }
            }
            if i >= self.running.len() {
                break; // preempted itself
            }
            let max_model_len = self.cfg.max_model_len;
            let s = &mut self.running[i];
            let mut draft = Vec::new();
            if remaining == 1 && budget > 1 {
                // Room for the draft: each accepted token is one more output token, and the
                // step always adds one sampled token after them.
                let room = (s.max_tokens.saturating_sub(s.num_generated()))
                    .min(max_model_len.saturating_sub(s.tokens.len()))
                    .saturating_sub(1)
                    .min(budget - 1);
                if room > 0 {
                    draft = propose(s.id, &s.tokens, room);
                    draft.truncate(room);
                    if !draft.is_empty() && !s.blocks.ensure_capacity(computed + 1 + draft.len()) {
                        draft.clear();
                    }
                }
            }
            budget -= n + draft.len();
            plan.scheduled.push(Scheduled {
                id: s.id,
                start: s.num_computed,
                len: n,
                samples: s.num_computed + n == s.tokens.len(),
                draft,
            });
            i += 1;
        }
        // Budget given back by sequences preempted for blocks above is not reused this step:
        // keeps the plan simple and the next step picks them up first.
        // 2. Admit waiting sequences in order while budget, slots and blocks allow. Under the
        // priority policy a waiting sequence that finds no slot or no blocks preempts running
        // sequences it outranks, lowest-ranked first.
        while budget > 0 {
            let Some(front) = self.waiting.front() else {
                break;
            };
            if plan.preempted.contains(&front.id) {
                // Just preempted: wait for the next step.
                break;
            }
            let rank = front.rank();
            if self.running.len() >= self.cfg.max_num_seqs {
                if self.outranks_last_running(rank) {
                    self.preempt_for_admission(&mut plan, &mut budget);
                    continue;
                }
                break;
            }
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            let cached = s.blocks.claim_prefix(&s.tokens);
            let remaining = s.tokens.len() - cached;
            if !self.cfg.chunked_prefill && remaining > budget {
                s.blocks.clear();
                self.waiting.push_front(s);
                break;
            }
            let n = remaining.min(budget);
            if !s.blocks.ensure_capacity(cached + n) {
                s.blocks.clear();
                self.waiting.push_front(s);
                if self.outranks_last_running(rank) {
                    self.preempt_for_admission(&mut plan, &mut budget);
                    continue;
                }
                break;
            }
            s.num_computed = cached;
            if s.num_generated() == 0 {
                s.num_cached = cached;
            }
            plan.scheduled.push(Scheduled {
                id: s.id,
                start: cached,
                len: n,
                samples: cached + n == s.tokens.len(),
                draft: Vec::new(),
            });
            budget -= n;
            self.insert_running(s);
        }
        plan
    }

    /// Whether a waiting sequence of `rank` may preempt the last running sequence: only under
    /// the priority policy, and only one it outranks.
    fn outranks_last_running(&self, rank: (i64, u64)) -> bool {
        self.cfg.policy == SchedulingPolicy::Priority
            && self.running.last().is_some_and(|r| r.rank() > rank)
    }

    /// Preempts the last running sequence for a waiting one, giving back the budget it was
    /// planned to use this step.
    fn preempt_for_admission(&mut self, plan: &mut StepPlan, budget: &mut usize) {
        if let Some(v) = self.running.last() {
            if let Some(sc) = plan.scheduled.iter().find(|x| x.id == v.id) {
                *budget += sc.len + sc.draft.len();
            }
        }
        self.preempt_last(plan);
    }

    /// Records that a step computed `len` tokens of `id` and, if it sampled, appends the new
    /// token. Registers newly full blocks for prefix caching.
    pub fn complete(&mut self, id: SeqId, len: usize, sampled: Option<u32>) {
        self.complete_draft(id, len, &[], sampled)
    }

    /// [`Scheduler::complete`] for a step that computed `draft` tokens after `len` known ones:
    /// the first `accepted` of them join the sequence (their K/V are already in the cache),
    /// then `sampled`. The K/V written for rejected draft tokens lies past `num_computed` and
    /// is overwritten by the next step.
    pub fn complete_draft(
        &mut self,
        id: SeqId,
        len: usize,
        accepted: &[u32],
        sampled: Option<u32>,
    ) {
        if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
            s.tokens.extend_from_slice(accepted);
            s.num_computed += len + accepted.len();
            let computed = s.num_computed;
            s.blocks.commit(&s.tokens, computed);
            if let Some(t) = sampled {
                s.tokens.push(t);
            }
        }
    }

    /// The inputs of `plan`'s scheduled sequences, in batch order.
    ///
    /// # Panics
    /// When a scheduled sequence is no longer running (the plan is from an earlier step).
    pub fn step_inputs(&self, plan: &StepPlan) -> Vec<StepInput> {
        plan.scheduled
            .iter()
            .map(|s| {
                let seq = self.get(s.id).expect("scheduled sequence is running");
                StepInput {
                    tokens: [&seq.tokens[s.start..s.start + s.len], &s.draft[..]].concat(),
                    pos0: s.start,
                    block_table: seq.blocks.blocks().to_vec(),
                }
            })
            .collect()
    }

    /// Token list of a running sequence.
    pub fn tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.get(id).map(|s| s.tokens.as_slice())
    }

    /// Gives running sequence `id` blocks for `n_tokens` positions if free blocks allow
    /// (never preempting) and returns its block table then; `None` when it is not running or
    /// the blocks are not free. For work ahead of the next step's own allocation (chained MTP
    /// drafts write their KV there); the step would allocate the same blocks for the drafts.
    pub fn reserve(&mut self, id: SeqId, n_tokens: usize) -> Option<Vec<u32>> {
        let s = self.running.iter_mut().find(|s| s.id == id)?;
        s.blocks
            .ensure_capacity(n_tokens)
            .then(|| s.blocks.blocks().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_pool::BlockPool;
    use proptest::prelude::*;

    fn sched(blocks: usize, bs: usize, budget: usize, max_seqs: usize) -> Scheduler {
        sched_with(SchedulingPolicy::Fcfs, blocks, bs, budget, max_seqs)
    }

    fn sched_with(
        policy: SchedulingPolicy,
        blocks: usize,
        bs: usize,
        budget: usize,
        max_seqs: usize,
    ) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_num_seqs: max_seqs,
                max_num_batched_tokens: budget,
                max_model_len: 512,
                chunked_prefill: true,
                max_waiting: 1000,
                policy,
            },
            SharedPool::new(BlockPool::new(blocks, bs, true)),
        )
    }

    #[test]
    fn chunked_prefill_mixes_with_decodes() {
        let mut s = sched(64, 4, 8, 8);
        s.add(1, vec![1; 3], 10, 0).unwrap();
        let p = s.schedule();
        assert_eq!(
            p.scheduled,
            vec![Scheduled {
                id: 1,
                start: 0,
                len: 3,
                samples: true,
                draft: vec![],
            }]
        );
        s.complete(1, 3, Some(5));
        s.add(2, vec![2; 20], 4, 0).unwrap();
        // Seq 1 decodes one token; seq 2 gets the remaining 7 of the budget.
        let p = s.schedule();
        assert_eq!(
            p.scheduled,
            vec![
                Scheduled {
                    id: 1,
                    start: 3,
                    len: 1,
                    samples: true,
                    draft: vec![],
                },
                Scheduled {
                    id: 2,
                    start: 0,
                    len: 7,
                    samples: false,
                    draft: vec![],
                }
            ]
        );
    }

    #[test]
    fn refuses_what_can_never_fit() {
        let s = sched(4, 4, 8, 8);
        assert!(matches!(
            s.check_admissible(500, 100),
            Err(AdmissionError::ContextLength { .. })
        ));
        assert!(matches!(
            s.check_admissible(10, 10),
            Err(AdmissionError::CacheTooSmall { .. })
        ));
        assert!(matches!(
            s.check_admissible(0, 1),
            Err(AdmissionError::EmptyPrompt)
        ));
        assert!(s.check_admissible(8, 8).is_ok());
    }

    #[test]
    fn preempts_newest_when_blocks_run_out() {
        let mut s = sched(4, 4, 64, 8);
        s.add(1, vec![1; 7], 9, 0).unwrap();
        s.add(2, vec![2; 7], 9, 0).unwrap();
        let p = s.schedule();
        assert_eq!(p.scheduled.len(), 2);
        s.complete(1, 7, Some(0));
        s.complete(2, 7, Some(0));
        // Both need a third block at position 8: only one can have it.
        for _ in 0..1 {
            let p = s.schedule();
            s.complete(1, 1, Some(0));
            let _ = p;
        }
        let p = s.schedule();
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn drafts_use_leftover_budget_and_stop_at_max_tokens() {
        let mut s = sched(64, 4, 8, 8);
        s.add(1, vec![1, 2, 3], 6, 0).unwrap();
        s.add(2, vec![4; 3], 6, 0).unwrap();
        // Prefill: no drafts (the proposer is not asked).
        let p = s.schedule_with_drafts(|_, _, _| panic!("asked to draft a prefill"));
        assert!(p.scheduled.iter().all(|x| x.draft.is_empty()));
        s.complete(1, 3, Some(9));
        s.complete(2, 3, Some(9));
        // Decode: 1 + 4 for the first, then 1 + 2 for the second (budget 8).
        let mut asked = vec![];
        let p = s.schedule_with_drafts(|_, t, max| {
            asked.push((t.to_vec(), max));
            vec![7; max]
        });
        assert_eq!(asked, vec![(vec![1, 2, 3, 9], 4), (vec![4, 4, 4, 9], 2)]);
        let lens: Vec<(usize, usize)> =
            p.scheduled.iter().map(|x| (x.len, x.draft.len())).collect();
        assert_eq!(lens, vec![(1, 4), (1, 2)]);
        let inputs = s.step_inputs(&p);
        assert_eq!(inputs[0].tokens, vec![9, 7, 7, 7, 7]);
        assert_eq!(inputs[0].pos0, 3);
        // Two of four accepted, then a sampled token: 4 generated, K/V for 3 + 1 + 2.
        s.complete_draft(1, 1, &[7, 7], Some(5));
        let q = s.get(1).unwrap();
        assert_eq!(q.tokens, vec![1, 2, 3, 9, 7, 7, 5]);
        assert_eq!(q.num_computed, 6);
        // Two generated tokens are left: at most one draft (then one sampled token).
        s.complete_draft(2, 1, &[], Some(8));
        let p = s.schedule_with_drafts(|_, _, max| vec![7; max + 3]);
        let drafts: Vec<usize> = p.scheduled.iter().map(|x| x.draft.len()).collect();
        assert_eq!(drafts, vec![1, 3]);
    }

    /// Runs `s` to the end, one token per sampling step, finishing each sequence at its
    /// `max_tokens`: the ids in the order they were first admitted, and every preemption.
    fn drain(s: &mut Scheduler) -> (Vec<SeqId>, Vec<SeqId>) {
        let (mut admitted, mut preempted) = (vec![], vec![]);
        for _ in 0..10_000 {
            if s.is_idle() {
                return (admitted, preempted);
            }
            let p = s.schedule();
            preempted.extend(&p.preempted);
            for sc in p.scheduled {
                if !admitted.contains(&sc.id) {
                    admitted.push(sc.id);
                }
                s.complete(sc.id, sc.len, sc.samples.then_some(1));
                let q = s.get(sc.id).unwrap();
                if q.num_generated() >= q.max_tokens {
                    s.remove(sc.id);
                }
            }
        }
        panic!("no progress");
    }

    #[test]
    fn priority_orders_the_waiting_queue_ties_by_arrival() {
        let arrivals = [(1, 5), (2, 0), (3, 5), (4, -1), (5, 0)];
        for (policy, want) in [
            (SchedulingPolicy::Fcfs, vec![1, 2, 3, 4, 5]),
            (SchedulingPolicy::Priority, vec![4, 2, 5, 1, 3]),
        ] {
            let mut s = sched_with(policy, 64, 4, 64, 1);
            for (id, prio) in arrivals {
                let prio = if policy == SchedulingPolicy::Fcfs {
                    0
                } else {
                    prio
                };
                s.add_with_priority(id, vec![id as u32; 3], 2, 0, prio)
                    .unwrap();
            }
            let (order, preempted) = drain(&mut s);
            assert_eq!(order, want, "{policy}");
            assert!(preempted.is_empty(), "{policy}: {preempted:?}");
        }
    }

    #[test]
    fn a_waiting_request_preempts_the_lowest_ranked_running_one_for_a_slot() {
        for policy in [SchedulingPolicy::Fcfs, SchedulingPolicy::Priority] {
            let mut s = sched_with(policy, 64, 4, 64, 2);
            // 1 (priority 5) and 2 (priority 1) run; 3 (priority 5, later) and 4 (priority 0)
            // arrive while both slots are taken.
            s.add_with_priority(1, vec![1; 3], 8, 0, 5).unwrap();
            s.add_with_priority(2, vec![2; 3], 8, 0, 1).unwrap();
            let p = s.schedule();
            s.complete(1, 3, Some(0));
            s.complete(2, 3, Some(0));
            assert_eq!(p.scheduled.len(), 2);
            s.add_with_priority(3, vec![3; 3], 8, 0, 5).unwrap();
            s.add_with_priority(4, vec![4; 3], 8, 0, 0).unwrap();
            let p = s.schedule();
            let ids: Vec<SeqId> = p.scheduled.iter().map(|x| x.id).collect();
            match policy {
                SchedulingPolicy::Fcfs => {
                    assert!(p.preempted.is_empty());
                    assert_eq!(ids, vec![1, 2]);
                }
                SchedulingPolicy::Priority => {
                    // 4 outranks 1 (not 2); 3 outranks no one. 1's decode budget went to 4.
                    assert_eq!(p.preempted, vec![1]);
                    assert_eq!(ids, vec![2, 4]);
                    let w: Vec<SeqId> = s.waiting.iter().map(|x| x.id).collect();
                    assert_eq!(w, vec![1, 3], "1 keeps its place before 3");
                    assert_eq!(s.waiting[0].tokens, vec![1, 1, 1, 0], "keeps its tokens");
                }
            }
        }
    }

    #[test]
    fn a_waiting_request_preempts_for_kv_blocks() {
        // 4 blocks of 4 tokens: 1 holds 3 of them (prompt 10); 2 needs 2 for its prompt of 8.
        let mut s = sched_with(SchedulingPolicy::Priority, 4, 4, 64, 8);
        s.add_with_priority(1, vec![1; 10], 4, 0, 3).unwrap();
        let p = s.schedule();
        s.complete(1, p.scheduled[0].len, Some(0));
        s.add_with_priority(2, vec![2; 8], 4, 0, 3).unwrap();
        s.add_with_priority(3, vec![3; 8], 4, 0, -2).unwrap();
        let p = s.schedule();
        assert_eq!(p.preempted, vec![1], "3 outranks 1");
        let ids: Vec<SeqId> = p.scheduled.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![3]);
        // Equal rank never preempts: 2 (same priority as 1, later) waits behind 1.
        let w: Vec<SeqId> = s.waiting.iter().map(|x| x.id).collect();
        assert_eq!(w, vec![1, 2]);
        let (_, preempted) = drain(&mut s);
        assert!(preempted.is_empty(), "{preempted:?}");
        assert_eq!(s.pool().lock().num_free(), 4);
    }

    proptest! {
        /// Random arrivals, steps, completions and cancellations: every request either finishes
        /// or was refused, no block leaks, and budgets hold every step.
        #[test]
        fn every_request_finishes_and_blocks_return(
            arrivals in prop::collection::vec((1usize..30, 1usize..12, 0u8..4, -2i64..3), 1..25),
            cancel_every in 3usize..9,
            draft_k in 0usize..4,
            accept_every in 1usize..4,
            by_priority in any::<bool>(),
        ) {
            let total = 12;
            let policy = if by_priority { SchedulingPolicy::Priority } else { SchedulingPolicy::Fcfs };
            let mut s = sched_with(policy, total, 4, 16, 4);
            let mut finished = 0usize;
            let mut refused = 0usize;
            let mut cancelled = 0usize;
            let n = arrivals.len();
            let mut arr = arrivals.into_iter().enumerate().peekable();
            let mut step = 0usize;
            while arr.peek().is_some() || !s.is_idle() {
                step += 1;
                prop_assert!(step < 10_000, "no progress");
                if let Some((i, (p, m, pre, prio))) = arr.next() {
                    let prompt: Vec<u32> = (0..p as u32).map(|x| x % (pre as u32 + 1)).collect();
                    if s.add_with_priority(i as u64, prompt, m, 0, prio).is_err() { refused += 1; }
                }
                if step.is_multiple_of(cancel_every) {
                    if let Some(&id) = s.ids().first() {
                        s.remove(id);
                        cancelled += 1;
                    }
                }
                // Drafts of up to `draft_k` tokens; a prefix of them is accepted.
                let plan = s.schedule_with_drafts(|_, t, max| vec![t[t.len() - 1]; draft_k.min(max + 1)]);
                let total_len: usize = plan.scheduled.iter().map(|x| x.len + x.draft.len()).sum();
                prop_assert!(total_len <= 16);
                prop_assert!(s.num_running() <= 4);
                let inputs = s.step_inputs(&plan);
                for (sc, input) in plan.scheduled.into_iter().zip(inputs) {
                    prop_assert_eq!(input.tokens.len(), sc.len + sc.draft.len());
                    let seq = s.get(sc.id).unwrap();
                    prop_assert!(
                        input.block_table.len() * 4 >= sc.start + input.tokens.len(),
                        "blocks for the draft"
                    );
                    let left = seq.max_tokens - seq.num_generated();
                    prop_assert!(sc.draft.is_empty() || (sc.samples && sc.draft.len() < left));
                    let tok = if sc.samples { Some(1) } else { None };
                    let accepted = sc.draft.len().min(step % accept_every);
                    s.complete_draft(sc.id, sc.len, &sc.draft[..accepted], tok);
                    let seq = s.get(sc.id).unwrap();
                    prop_assert!(seq.num_generated() <= seq.max_tokens);
                    if sc.samples {
                        prop_assert_eq!(seq.num_computed + 1, seq.tokens.len());
                    } else {
                        prop_assert!(seq.num_computed < seq.tokens.len());
                    }
                    if seq.num_generated() >= seq.max_tokens {
                        s.remove(sc.id);
                        finished += 1;
                    }
                }
            }
            prop_assert_eq!(finished + refused + cancelled, n);
            prop_assert_eq!(s.pool().lock().num_free(), total);
        }
    }
}
