//! The engine loop: one thread owns the model, the paged KV cache and the scheduler. Requests
//! arrive over a channel; each request's tokens stream back over its own channel as they are
//! sampled (with text deltas, stop handling and logprobs). Dropping a request's stream cancels
//! it at the next step and frees its KV blocks.
//!
//! This is the actor pattern of TGI's router: callers never touch engine state, they send
//! commands and read events.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use switchyard_model::{KvDtype, Logits, ModelConfig, MtpOut, MtpSeq, PagedSeq};
use tokio::sync::mpsc as tmpsc;

use crate::block_pool::{BlockPool, SharedPool};
use crate::parallel::{EngineModel, Runner};
use crate::reasoning::ReasoningBudget;
use crate::sampling::{Sampler, SamplingParams, TokenLogprob};
use crate::scheduler::{
    AdmissionError, Scheduled, Scheduler, SchedulerConfig, SchedulingPolicy, SeqId, StepInput,
    StepPlan,
};
use crate::speculative::{Prediction, SpeculativeConfig, PREDICTION_DRAFT_TOKENS};
use crate::stop::{FinishReason, StopConfig, StopMatch, TextStream};
use crate::structured::{Constraint, ConstraintCompiler, OutputConstraint, StructuredError};
use crate::tokenizer::Tokenizer;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Scheduling limits.
    pub scheduler: SchedulerConfig,
    /// Tokens per KV block (vLLM's default 16: small enough to waste little at sequence ends,
    /// large enough that block tables stay short).
    pub block_size: usize,
    /// Bytes for the KV cache; `None` = a quarter of available memory on the CPU, on a GPU
    /// what `gpu_memory_utilization` leaves after the weights; capped at what
    /// `max_num_seqs × max_model_len` tokens need.
    pub kv_cache_memory: Option<u64>,
    /// Share of a GPU's memory the process may use, weights and KV cache together (vLLM's
    /// `--gpu-memory-utilization`); sizes the KV cache when `kv_cache_memory` is `None`.
    pub gpu_memory_utilization: f64,
    /// KV storage dtype.
    pub kv_dtype: KvDtype,
    /// Reuse cached KV blocks across requests with a common prefix.
    pub prefix_caching: bool,
    /// Speculative decoding (`--speculative-config`); `None` decodes one token per step.
    pub speculative: Option<SpeculativeConfig>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            block_size: 16,
            kv_cache_memory: None,
            gpu_memory_utilization: switchyard_model::plan::DEFAULT_GPU_MEMORY_UTILIZATION,
            kv_dtype: KvDtype::F32,
            prefix_caching: true,
            speculative: None,
        }
    }
}

/// A generation request (token ids in; the server applies chat templates before).
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Extra stop token ids (eos ids are added unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Do not stop at eos.
    pub ignore_eos: bool,
    /// Drop special tokens from the text.
    pub skip_special_tokens: bool,
    /// Keep a matched stop string at the end of the text (vLLM's `include_stop_str_in_output`).
    pub include_stop_str_in_output: bool,
    /// The first this-many generated tokens are never stop token ids (eos included) and stop
    /// strings completed within them do not count (vLLM's `min_tokens`; at most `max_tokens`).
    pub min_tokens: usize,
    /// Mixed into prefix-cache hashes (requests with different salts never share KV).
    pub cache_salt: u64,
    /// Attach each step's full logits to its token event (tests and debugging; costly).
    pub return_logits: bool,
    /// Structured output: only tokens that keep the output in this language are sampled, and
    /// the request stops when the language allows nothing more
    /// ([`EngineHandle::compile_constraint`]).
    pub constraint: Option<Constraint>,
    /// Predicted output tokens (OpenAI's Predicted Outputs): the draft source for this
    /// request's speculative decoding, with or without `--speculative-config`.
    pub prediction: Option<Vec<u32>>,
    /// `Some(n)`: report each prompt token's logprob given the tokens before it, with the `n`
    /// most likely alternatives (the completions API's `echo` with `logprobs`). The prompt is
    /// then computed in full: it does not share KV blocks with other requests.
    pub prompt_logprobs: Option<usize>,
    /// The output starts inside a reasoning block (the prompt opened `<think>`): after this
    /// many tokens of reasoning the closing tag is forced ([`ReasoningBudget`]).
    pub reasoning_budget: Option<usize>,
    /// Scheduling priority under [`SchedulingPolicy::Priority`]: lower values are served
    /// first and may preempt running requests with higher ones (vLLM's `priority`). Must be 0
    /// under [`SchedulingPolicy::Fcfs`].
    pub priority: i64,
}

/// A prompt token's logprob (the first token has none: nothing precedes it).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    /// The token.
    pub id: u32,
    /// Its logprob given the tokens before it.
    pub logprob: Option<f32>,
    /// Its rank in that distribution: how many tokens are at least as likely, itself
    /// included (vLLM's `rank`; 1 for the most likely).
    pub rank: Option<usize>,
    /// The most likely tokens at its position.
    pub top_logprobs: Vec<TokenLogprob>,
}

impl GenerateRequest {
    /// Greedy generation of up to `max_tokens` after `prompt`.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: false,
            skip_special_tokens: true,
            include_stop_str_in_output: false,
            min_tokens: 0,
            cache_salt: 0,
            return_logits: false,
            constraint: None,
            prediction: None,
            prompt_logprobs: None,
            reasoning_budget: None,
            priority: 0,
        }
    }
}

/// One generated token.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    /// Token id.
    pub id: u32,
    /// Text released by this token (may be empty while held back).
    pub text: String,
    /// Log-probability of the token.
    pub logprob: Option<f32>,
    /// Most likely alternatives.
    pub top_logprobs: Vec<TokenLogprob>,
    /// Entropy (nats) of the step's raw distribution, when logprobs were requested.
    pub entropy: Option<f32>,
    /// Full logits of the step, when requested.
    pub logits: Option<Vec<f32>>,
    /// On a request's first token only: prompt tokens served from the prefix cache (what
    /// [`Completion::cached_tokens`] reports at the end), so a stream can report its input
    /// usage before the answer is done (Anthropic's `message_start`).
    pub cached_tokens: Option<usize>,
    /// On a request's first token only, when asked for: the prompt's logprobs.
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
}

/// How a request ended.
#[derive(Debug, Clone)]
pub struct Completion {
    /// `stop` or `length`.
    pub finish_reason: FinishReason,
    /// What stopped it.
    pub stop: Option<StopMatch>,
    /// Text released at the end (held-back characters).
    pub text: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (stop tokens included).
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    /// Times the request was preempted and recomputed.
    pub preemptions: u32,
    /// Time from submission to the first token.
    pub ttft: Option<Duration>,
    /// Speculative draft tokens the model checked for this request.
    pub draft_tokens: usize,
    /// Of which accepted.
    pub accepted_draft_tokens: usize,
}

/// What a request's stream yields.
#[derive(Debug, Clone)]
pub enum Event {
    /// A sampled token.
    Token(TokenEvent),
    /// The request ended normally.
    Finished(Completion),
    /// The request failed inside the engine.
    Error(String),
}

/// Why a request was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    /// Refused by admission control.
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    /// A prompt token is not in the vocabulary.
    #[error("token id {id} is out of range for vocabulary size {vocab}")]
    InvalidToken {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Bad sampling parameters.
    #[error("{0}")]
    InvalidParams(String),
    /// The engine thread has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// Live counters for `/metrics`.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Sequences running.
    pub running: AtomicUsize,
    /// Sequences waiting in the scheduler.
    pub waiting: AtomicUsize,
    /// Requests submitted but not yet seen by the engine thread.
    pub pending: AtomicUsize,
    /// KV blocks in the cache.
    pub kv_blocks_total: AtomicUsize,
    /// KV blocks referenced.
    pub kv_blocks_used: AtomicUsize,
    /// Full prompt blocks looked up in the prefix cache.
    pub prefix_queries: AtomicU64,
    /// Of which hit.
    pub prefix_hits: AtomicU64,
    /// Tokens the model computed (prefill and decode).
    pub tokens_computed: AtomicU64,
    /// Tokens generated.
    pub tokens_generated: AtomicU64,
    /// Engine steps run.
    pub steps: AtomicU64,
    /// Preemptions.
    pub preemptions: AtomicU64,
    /// Speculative tokens proposed and checked by the model.
    pub spec_draft_tokens: AtomicU64,
    /// Of which accepted (each one a token generated without a step of its own).
    pub spec_accepted_tokens: AtomicU64,
    /// Nanoseconds spent in model forwards.
    pub busy_ns: AtomicU64,
}

/// Facts about the running engine.
#[derive(Debug)]
pub struct EngineInfo {
    /// Model configuration.
    pub model: ModelConfig,
    /// Tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// Effective scheduler limits.
    pub scheduler: SchedulerConfig,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the KV cache.
    pub num_blocks: usize,
    /// Bytes of KV cache.
    pub kv_cache_bytes: usize,
    /// Storage dtype of the KV cache.
    pub kv_dtype: KvDtype,
    /// Compute dtype of the model.
    pub dtype: candle_core::DType,
    /// Where the model and its KV cache live (`cpu`, `cuda:0`).
    pub device: String,
}

enum Cmd {
    Submit(Box<Submission>),
    Cancel(SeqId),
}

struct Submission {
    id: SeqId,
    req: GenerateRequest,
    tx: tmpsc::UnboundedSender<Event>,
    at: Instant,
}

/// Handle to a running engine; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    cmd: mpsc::Sender<Cmd>,
    next_id: Arc<AtomicU64>,
    metrics: Arc<EngineMetrics>,
    info: Arc<EngineInfo>,
    /// Built on the first structured-output request (indexing the vocabulary takes a moment).
    compiler: Arc<OnceLock<Result<ConstraintCompiler, StructuredError>>>,
}

/// The event stream of one request. Dropping it cancels the request.
pub struct RequestStream {
    id: SeqId,
    rx: tmpsc::UnboundedReceiver<Event>,
    cmd: mpsc::Sender<Cmd>,
    done: bool,
}

impl RequestStream {
    /// Engine-side id.
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// Next event (async). Cancel-safe: an event not returned stays queued.
    pub async fn recv(&mut self) -> Option<Event> {
        let e = self.rx.recv().await;
        self.note(&e);
        e
    }

    /// Next event, blocking the thread (for CLI use; not inside an async runtime).
    pub fn blocking_recv(&mut self) -> Option<Event> {
        let e = self.rx.blocking_recv();
        self.note(&e);
        e
    }

    fn note(&mut self, e: &Option<Event>) {
        if matches!(e, None | Some(Event::Finished(_)) | Some(Event::Error(_))) {
            self.done = true;
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.cmd.send(Cmd::Cancel(self.id));
        }
    }
}

impl EngineHandle {
    /// Starts the engine thread. Fails if the KV cache cannot hold one full-length sequence.
    ///
    /// `model` is a [`switchyard_model::HyV3Model`], or the ranks of a tensor-parallel split
    /// ([`crate::parallel::load_ranks`]): then every rank runs on its own thread with its own
    /// KV cache, driven in lockstep by the engine thread ([`crate::parallel`]), and the KV
    /// budget (`kv_cache_memory`) is for all ranks together.
    pub fn start(
        model: impl Into<EngineModel>,
        tokenizer: Arc<Tokenizer>,
        mut cfg: EngineConfig,
    ) -> Result<Self, String> {
        let model: EngineModel = model.into();
        let (mc, dtype, device) = model.facts()?;
        cfg.scheduler.max_model_len = cfg.scheduler.max_model_len.min(mc.max_position_embeddings);
        let per_token = model.kv_bytes_per_token(cfg.kv_dtype)?;
        let want_tokens = cfg.scheduler.max_num_seqs * cfg.scheduler.max_model_len;
        let bytes = match cfg.kv_cache_memory {
            // On the CPU the cache is host memory that is only touched as sequences fill it:
            // a budget beyond what is available would be granted now and kill the server
            // under load later, so it is refused up front.
            Some(b) if device.is_cpu() && b > available_memory() as u64 => {
                let gib = |v: u64| v as f64 / (1u64 << 30) as f64;
                let available = available_memory() as u64;
                return Err(format!(
                    "--kv-cache-memory {:.1} GiB is more than the {:.1} GiB of memory this \
                     machine has available after loading the model (MemAvailable); give at \
                     most that, or leave the flag out (the default takes 1/{} of it)",
                    gib(b),
                    gib(available),
                    switchyard_model::plan::DEFAULT_KV_SHARE_OF_HOST_MEMORY
                ));
            }
            Some(b) => b as usize,
            None => {
                default_kv_bytes(&device, cfg.gpu_memory_utilization)?.min(want_tokens * per_token)
            }
        };
        let num_blocks = bytes / (per_token * cfg.block_size);
        if num_blocks == 0 {
            let source = if cfg.kv_cache_memory.is_some() {
                "--kv-cache-memory"
            } else {
                "the memory left after loading the model"
            };
            return Err(format!(
                "the KV cache budget of {bytes} bytes ({source}) holds no block of {} tokens \
                 ({} bytes per token)",
                cfg.block_size, per_token
            ));
        }
        let runner = model.into_runner(num_blocks, cfg.block_size, cfg.kv_dtype)?;
        if cfg
            .speculative
            .as_ref()
            .is_some_and(SpeculativeConfig::uses_mtp)
            && !runner.has_mtp()
        {
            return Err(
                "--speculative-config method \"mtp\" needs the model's MTP layer: load \
                        the model with it (LoadOptions::load_mtp; the server does this for \
                        method mtp) on one rank"
                    .into(),
            );
        }
        tracing::info!(
            blocks = num_blocks,
            block_size = cfg.block_size,
            tokens = num_blocks * cfg.block_size,
            mib = runner.kv_bytes() / (1 << 20),
            dtype = cfg.kv_dtype.name(),
            "KV cache allocated"
        );
        let pool = SharedPool::new(BlockPool::new(
            num_blocks,
            cfg.block_size,
            cfg.prefix_caching,
        ));
        let sched = Scheduler::new(cfg.scheduler.clone(), pool);
        let metrics = Arc::new(EngineMetrics::default());
        metrics.kv_blocks_total.store(num_blocks, Ordering::Relaxed);
        let info = Arc::new(EngineInfo {
            model: mc,
            tokenizer: tokenizer.clone(),
            scheduler: cfg.scheduler.clone(),
            block_size: cfg.block_size,
            num_blocks,
            kv_cache_bytes: runner.kv_bytes(),
            kv_dtype: cfg.kv_dtype,
            dtype,
            device: device_name(&device),
        });
        let (tx, rx) = mpsc::channel();
        let m2 = metrics.clone();
        std::thread::Builder::new()
            .name("switchyard-engine".into())
            .spawn(move || {
                let mut l = Loop {
                    runner,
                    sched,
                    speculative: cfg.speculative,
                    tokenizer,
                    states: Default::default(),
                    metrics: m2,
                    seen_since_publish: 0,
                };
                l.run(rx)
            })
            .map_err(|e| format!("cannot start the engine thread: {e}"))?;
        Ok(Self {
            cmd: tx,
            next_id: Arc::new(AtomicU64::new(1)),
            metrics,
            info,
            compiler: Arc::default(),
        })
    }

    /// Facts about the engine.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Live counters.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    /// Compiles a structured-output constraint for [`GenerateRequest::constraint`] against this
    /// engine's vocabulary. Errors say what is wrong with the constraint.
    pub fn compile_constraint(&self, c: &OutputConstraint) -> Result<Constraint, StructuredError> {
        let compiler = self.compiler.get_or_init(|| {
            ConstraintCompiler::new(&self.info.tokenizer, self.info.model.vocab_size)
        });
        compiler.as_ref().map_err(Clone::clone)?.compile(c)
    }

    /// Checks a request without submitting it (same checks as [`Self::submit`]).
    pub fn validate(&self, req: &GenerateRequest) -> Result<(), SubmitError> {
        let cfg = &self.info.scheduler;
        let vocab = self.info.model.vocab_size;
        if let Some(&id) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(SubmitError::InvalidToken { id, vocab });
        }
        req.sampling
            .validate()
            .map_err(|e| SubmitError::InvalidParams(e.to_string()))?;
        if let Some(&(id, _)) = req
            .sampling
            .logit_bias
            .iter()
            .find(|b| b.0 as usize >= vocab)
        {
            return Err(SubmitError::InvalidParams(format!(
                "logit_bias: token id {id} is out of range for vocabulary size {vocab}"
            )));
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::InvalidParams(
                "max_tokens must be at least 1".into(),
            ));
        }
        if req.min_tokens > req.max_tokens {
            return Err(SubmitError::InvalidParams(format!(
                "min_tokens ({}) must not exceed max_tokens ({})",
                req.min_tokens, req.max_tokens
            )));
        }
        if let Some(&id) = req.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(SubmitError::InvalidParams(format!(
                "stop_token_ids: token id {id} is out of range for vocabulary size {vocab}"
            )));
        }
        if req.priority != 0 && cfg.policy != SchedulingPolicy::Priority {
            return Err(SubmitError::InvalidParams(format!(
                "priority: got {}, but priority scheduling is not enabled (the scheduling \
                 policy is {}; start with --scheduling-policy priority)",
                req.priority, cfg.policy
            )));
        }
        // The scheduler's admission rules, evaluated here so the caller gets the error
        // synchronously.
        crate::scheduler::check_admissible(
            cfg,
            self.info.num_blocks,
            self.info.block_size,
            req.prompt.len(),
            req.max_tokens,
        )?;
        let waiting = self.queued();
        if waiting >= cfg.max_waiting {
            return Err(AdmissionError::QueueFull { waiting }.into());
        }
        Ok(())
    }

    /// Requests queued: waiting in the scheduler plus submitted but not yet seen by it.
    fn queued(&self) -> usize {
        self.metrics.waiting.load(Ordering::Acquire) + self.metrics.pending.load(Ordering::Acquire)
    }

    /// Takes one place in the queue, or refuses with `QueueFull`. Check and take are one atomic
    /// step, so a burst of concurrent submits cannot all pass the check and overfill the queue.
    fn reserve_queue_slot(&self) -> Result<(), AdmissionError> {
        let max = self.info.scheduler.max_waiting;
        let pending = &self.metrics.pending;
        let mut p = pending.load(Ordering::Acquire);
        loop {
            let waiting = self.metrics.waiting.load(Ordering::Acquire) + p;
            if waiting >= max {
                return Err(AdmissionError::QueueFull { waiting });
            }
            match pending.compare_exchange_weak(p, p + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(now) => p = now,
            }
        }
    }

    /// Submits a request; its events arrive on the returned stream.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestStream, SubmitError> {
        self.validate(&req)?;
        self.reserve_queue_slot()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tmpsc::unbounded_channel();
        self.cmd
            .send(Cmd::Submit(Box::new(Submission {
                id,
                req,
                tx,
                at: Instant::now(),
            })))
            .map_err(|_| {
                self.metrics.pending.fetch_sub(1, Ordering::AcqRel);
                SubmitError::Stopped
            })?;
        Ok(RequestStream {
            id,
            rx,
            cmd: self.cmd.clone(),
            done: false,
        })
    }

    /// Runs a request to completion on the calling thread (CLI use).
    pub fn generate_blocking(
        &self,
        req: GenerateRequest,
    ) -> Result<(Vec<u32>, String, Completion), String> {
        let mut s = self.submit(req).map_err(|e| e.to_string())?;
        let mut ids = Vec::new();
        let mut text = String::new();
        while let Some(ev) = s.blocking_recv() {
            match ev {
                Event::Token(t) => {
                    ids.push(t.id);
                    text.push_str(&t.text);
                }
                Event::Finished(c) => {
                    text.push_str(&c.text);
                    return Ok((ids, text, c));
                }
                Event::Error(e) => return Err(e),
            }
        }
        Err("the engine stopped before the request finished".into())
    }
}

/// The most likely token of a `[1, vocab]` logits tensor; `None` if it cannot be read.
fn first_row(logits: &Tensor) -> Option<u32> {
    let row = logits.flatten_all().ok()?.to_vec1::<f32>().ok()?;
    Some(greedy(&row))
}

/// The most likely token (the lowest id on ties, as greedy sampling picks).
fn greedy(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// `cpu` or `cuda:N`, as `--device` spells it.
fn device_name(d: &candle_core::Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// KV cache bytes when the user gives no size. On a GPU, vLLM's rule: the cache gets what is left
/// of `utilization × total` after the weights and the CUDA context (free memory is read after
/// loading); on the CPU a quarter of the available host memory.
fn default_kv_bytes(device: &candle_core::Device, utilization: f64) -> Result<usize, String> {
    match switchyard_model::gpu_memory(device).map_err(|e| e.to_string())? {
        Some((free, total)) => {
            let budget = (total as f64 * utilization) as usize;
            let used = total.saturating_sub(free);
            if used >= budget {
                return Err(format!(
                    "--gpu-memory-utilization {utilization} allows {:.1} GiB of this GPU's \
                     {:.1} GiB, but {:.1} GiB are in use after loading the model: nothing is \
                     left for the KV cache; raise it, or give --kv-cache-memory",
                    budget as f64 / GIB,
                    total as f64 / GIB,
                    used as f64 / GIB
                ));
            }
            Ok(budget - used)
        }
        None => {
            Ok(available_memory()
                / switchyard_model::plan::DEFAULT_KV_SHARE_OF_HOST_MEMORY as usize)
        }
    }
}

/// Bytes per GiB, for messages.
const GIB: f64 = (1u64 << 30) as f64;

/// Bytes of memory available to this process (Linux `MemAvailable`; 8 GiB if unknown).
pub fn available_memory() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<usize>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30)
}

struct ReqState {
    tx: tmpsc::UnboundedSender<Event>,
    sampler: Sampler,
    stream: TextStream,
    max_tokens: usize,
    prompt_len: usize,
    return_logits: bool,
    constraint: Option<Constraint>,
    prediction: Option<Prediction>,
    /// Reasoning budget, when the request has one.
    budget: Option<ReasoningBudget>,
    /// Stop token ids (eos included unless ignored) kept out of the sample until `min_tokens`
    /// tokens exist; empty once that does not apply.
    min_tokens: usize,
    held_stop_ids: Vec<u32>,
    /// Prompt logprobs asked for (`n` alternatives), filled by position as the prompt is
    /// computed (a recompute after preemption overwrites, never duplicates).
    prompt_logprobs: Option<(usize, Vec<Option<PromptLogprob>>)>,
    /// Draft tokens checked and accepted so far.
    drafted: usize,
    accepted: usize,
    /// The MTP layer's drafts for the tokens from index `.0` of the sequence on (valid while
    /// the sequence has exactly `.0` tokens).
    mtp_draft: Option<(usize, Vec<u32>)>,
    submitted: Instant,
    ttft: Option<Duration>,
}

struct Loop {
    /// The model (or its ranks) and the paged KV cache(s).
    runner: Runner,
    sched: Scheduler,
    /// Draft proposer, when speculative decoding is on.
    speculative: Option<SpeculativeConfig>,
    tokenizer: Arc<Tokenizer>,
    states: std::collections::HashMap<SeqId, ReqState>,
    metrics: Arc<EngineMetrics>,
    /// Submissions handled since the last [`Loop::publish`].
    seen_since_publish: usize,
}

impl Loop {
    fn run(&mut self, rx: mpsc::Receiver<Cmd>) {
        loop {
            // Block when idle; otherwise take whatever arrived since the last step.
            if self.sched.is_idle() {
                match rx.recv() {
                    Ok(c) => self.handle(c),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(c) => self.handle(c),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        if self.sched.is_idle() {
                            return;
                        }
                        break;
                    }
                }
            }
            // Clients that went away: cancel now, free their blocks.
            let gone: Vec<SeqId> = self
                .states
                .iter()
                .filter(|(_, s)| s.tx.is_closed())
                .map(|(&id, _)| id)
                .collect();
            for id in gone {
                self.drop_request(id);
            }
            if !self.sched.is_idle() {
                self.step();
            }
            self.publish();
        }
    }

    fn handle(&mut self, c: Cmd) {
        match c {
            Cmd::Submit(s) => {
                // `pending` drops in `publish`, after `waiting` counts this request, so the
                // two never both miss it and the queue bound holds.
                self.seen_since_publish += 1;
                let Submission { id, req, tx, at } = *s;
                let mut stop_ids = req.stop_token_ids.clone();
                if !req.ignore_eos {
                    stop_ids.extend_from_slice(self.tokenizer.eos_token_ids());
                }
                let stream = TextStream::with_prompt(
                    StopConfig {
                        stop: req.stop.clone(),
                        stop_token_ids: stop_ids.clone(),
                        skip_special_tokens: req.skip_special_tokens,
                        include_stop_str_in_output: req.include_stop_str_in_output,
                        min_tokens: req.min_tokens,
                    },
                    &req.prompt,
                );
                let sampler = Sampler::with_prompt(req.sampling.clone(), &req.prompt);
                let (stream, sampler) = match (stream, sampler) {
                    (Ok(a), Ok(b)) => (a, b),
                    (Err(e), _) => {
                        let _ = tx.send(Event::Error(e.to_string()));
                        return;
                    }
                    (_, Err(e)) => {
                        let _ = tx.send(Event::Error(e.to_string()));
                        return;
                    }
                };
                let prompt_len = req.prompt.len();
                // Prompt logprobs need every prompt position computed: no shared blocks.
                let salt = if req.prompt_logprobs.is_some() {
                    u64::MAX - id
                } else {
                    req.cache_salt
                };
                if let Err(e) =
                    self.sched
                        .enqueue(id, req.prompt, req.max_tokens, salt, req.priority)
                {
                    let _ = tx.send(Event::Error(e.to_string()));
                    return;
                }
                self.states.insert(
                    id,
                    ReqState {
                        tx,
                        sampler,
                        stream,
                        max_tokens: req.max_tokens,
                        prompt_len,
                        return_logits: req.return_logits,
                        constraint: req.constraint,
                        prediction: req.prediction.map(Prediction::new),
                        budget: req.reasoning_budget.map(ReasoningBudget::new),
                        min_tokens: req.min_tokens,
                        held_stop_ids: if req.min_tokens > 0 { stop_ids } else { vec![] },
                        prompt_logprobs: req.prompt_logprobs.map(|n| (n, vec![None; prompt_len])),
                        drafted: 0,
                        accepted: 0,
                        mtp_draft: None,
                        submitted: at,
                        ttft: None,
                    },
                );
            }
            Cmd::Cancel(id) => self.drop_request(id),
        }
    }

    /// Ends a request that finished in a step that computed `len` tokens (and accepted
    /// `accepted` drafts): those tokens' full blocks are registered for prefix caching first,
    /// so a prompt whose first token already ends its request (`max_tokens: 1`, a
    /// classification) is still there for the next request that shares it.
    fn finish_request(&mut self, id: SeqId, len: usize, accepted: &[u32]) {
        self.sched.complete_draft(id, len, accepted, None);
        self.drop_request(id);
    }

    fn drop_request(&mut self, id: SeqId) {
        self.sched.remove(id);
        self.states.remove(&id);
    }

    fn step(&mut self) {
        let spec = self
            .speculative
            .as_ref()
            .filter(|s| s.drafts_at(self.sched.num_running()));
        // What the grammars of constrained requests force next: drafts that cost no guess.
        let mut forced: std::collections::HashMap<SeqId, Vec<u32>> = Default::default();
        for (&id, st) in self.states.iter_mut() {
            if let Some(c) = st.constraint.as_mut() {
                let f = c.forced_tokens(&self.tokenizer);
                if !f.is_empty() {
                    forced.insert(id, f);
                }
            }
        }
        let states = &self.states;
        let plan = if spec.is_none()
            && forced.is_empty()
            && states.values().all(|s| s.prediction.is_none())
        {
            self.sched.schedule()
        } else {
            // Forced tokens first, then a request's own prediction, then the server's
            // proposer.
            self.sched.schedule_with_drafts(|id, tokens, max| {
                if let Some(f) = forced.get(&id) {
                    return f[..f.len().min(max)].to_vec();
                }
                match states
                    .get(&id)
                    .and_then(|s| Some((s.prediction.as_ref()?, s)))
                {
                    Some((p, s)) => {
                        let k = spec.map_or(PREDICTION_DRAFT_TOKENS, |c| c.num_speculative_tokens);
                        p.propose(&tokens[s.prompt_len.min(tokens.len())..], k.min(max))
                    }
                    None => match spec {
                        Some(c) if c.uses_mtp() => states
                            .get(&id)
                            .and_then(|s| s.mtp_draft.as_ref())
                            .filter(|(len, _)| *len == tokens.len())
                            .map(|(_, d)| d[..d.len().min(max)].to_vec())
                            .unwrap_or_default(),
                        Some(c) => c.propose(tokens, max),
                        None => Vec::new(),
                    },
                }
            })
        };
        self.metrics
            .preemptions
            .fetch_add(plan.preempted.len() as u64, Ordering::Relaxed);
        if plan.scheduled.is_empty() {
            return;
        }
        let work = self.sched.step_inputs(&plan);
        let seqs: Vec<PagedSeq<'_>> = work
            .iter()
            .zip(&plan.scheduled)
            .map(|(w, s)| PagedSeq {
                tokens: &w.tokens,
                pos0: w.pos0,
                block_table: &w.block_table,
                // A drafted sequence needs the logits of its draft positions too, and a prompt
                // whose logprobs were asked for those of its positions.
                logits: if s.draft.is_empty() && !self.wants_prompt_logprobs(s) {
                    Logits::Last
                } else {
                    Logits::All
                },
            })
            .collect();
        let t0 = Instant::now();
        let mtp = self
            .speculative
            .as_ref()
            .is_some_and(SpeculativeConfig::uses_mtp);
        let out = if mtp {
            self.runner
                .forward_paged_with_hidden(&seqs)
                .map(|(l, h)| (l, Some(h)))
        } else {
            self.runner.forward_paged(&seqs).map(|l| (l, None))
        };
        self.metrics
            .busy_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.metrics.steps.fetch_add(1, Ordering::Relaxed);
        let total: usize = plan.scheduled.iter().map(|s| s.len + s.draft.len()).sum();
        self.metrics
            .tokens_computed
            .fetch_add(total as u64, Ordering::Relaxed);
        let (logits, hidden) = match out {
            Ok(l) => l,
            Err(e) => {
                // A failed forward fails the requests in it, never the engine.
                for s in &plan.scheduled {
                    if let Some(st) = self.states.get(&s.id) {
                        let _ = st
                            .tx
                            .send(Event::Error(format!("model forward failed: {e}")));
                    }
                    self.drop_request(s.id);
                }
                return;
            }
        };
        for (s, lg) in plan.scheduled.iter().zip(logits) {
            let lg = match self.record_prompt_logprobs(s, lg) {
                Ok(l) => l,
                Err(e) => {
                    if let Some(st) = self.states.get(&s.id) {
                        let _ = st.tx.send(Event::Error(e));
                    }
                    self.drop_request(s.id);
                    continue;
                }
            };
            if !s.samples {
                self.sched.complete(s.id, s.len, None);
                continue;
            }
            match self.sample_step(s, &lg) {
                Ok(()) => {}
                Err(e) => {
                    if let Some(st) = self.states.get(&s.id) {
                        let _ = st.tx.send(Event::Error(e));
                    }
                    self.drop_request(s.id);
                }
            }
        }
        if let Some(h) = hidden {
            self.mtp_step(&plan, &work, &h);
        }
    }

    /// Runs the MTP layer over the positions this step computed whose next token is now known
    /// (`p ≤ len − 2`: prompt tokens, accepted drafts and the sampled token), which fills its
    /// KV for them, and keeps the prediction at a decoding sequence's last such position,
    /// `len − 2`, as that sequence's draft for the token at `len`. Positions past it (a
    /// rejected draft) are recomputed next step, as the main model's are. A failure costs the
    /// drafts, never a request: they are only guesses the next step checks.
    fn mtp_step(&mut self, plan: &StepPlan, work: &[StepInput], hidden: &Tensor) {
        // (id, sequence length, next tokens, first position, first hidden row, step index,
        // whether its last position is len − 2).
        let mut next = Vec::new();
        let mut row = 0;
        // While the batch is too large to draft, only the KV is kept up (no lm_head rows).
        let drafting = self
            .speculative
            .as_ref()
            .is_some_and(|c| c.drafts_at(self.sched.num_running()));
        for (i, (s, w)) in plan.scheduled.iter().zip(work).enumerate() {
            let (r0, n) = (row, w.tokens.len());
            row += n;
            let Some(tokens) = self.sched.tokens(s.id) else {
                continue;
            };
            let len = tokens.len();
            if !self.states.contains_key(&s.id) || len < w.pos0 + 2 {
                continue;
            }
            let last = (w.pos0 + n - 1).min(len - 2);
            let toks = tokens[w.pos0 + 1..=last + 1].to_vec();
            next.push((s.id, len, toks, w.pos0, r0, i, drafting && last == len - 2));
        }
        let mut batch = Vec::with_capacity(next.len());
        for (_, _, toks, pos0, r0, i, wants) in &next {
            let Ok(h) = hidden.narrow(0, *r0, toks.len()) else {
                return;
            };
            batch.push(MtpSeq {
                next_tokens: toks,
                pos0: *pos0,
                block_table: &work[*i].block_table,
                hidden: h,
                logits: *wants,
            });
        }
        let Some(outs) = self.run_mtp(&batch) else {
            return;
        };
        // The first draft of each sequence that asked, then further ones by feeding the layer
        // its own output and draft at the next position (vLLM's chaining of one MTP layer);
        // those positions' MTP KV is rewritten once their real tokens are known.
        let k = self
            .speculative
            .as_ref()
            .map_or(1, |c| c.num_speculative_tokens);
        // (id, len, drafts so far, last output)
        let mut chains: Vec<(SeqId, usize, Vec<u32>, MtpOut)> = next
            .iter()
            .zip(outs)
            .filter_map(|((id, len, ..), o)| {
                let o = o?;
                let d = first_row(&o.logits)?;
                Some((*id, *len, vec![d], o))
            })
            .collect();
        // Chained drafts write the layer's KV at positions len − 1 … len + k − 3: blocks the
        // next step would allocate for its drafts anyway, taken now while they are free.
        // A chain never goes past the context (the verify step could not take its drafts).
        let max_len = self.sched.config().max_model_len;
        let tables: Vec<Option<Vec<u32>>> = chains
            .iter()
            .map(|(id, len, ..)| {
                let want = (len + k - 2).min(max_len);
                (k > 1 && want > *len - 1)
                    .then(|| self.sched.reserve(*id, want))
                    .flatten()
            })
            .collect();
        for j in 1..k {
            let live: Vec<usize> = (0..chains.len())
                .filter(|&c| {
                    let (_, len, drafts, _) = &chains[c];
                    tables[c].is_some() && drafts.len() == j && len - 2 + j < max_len
                })
                .collect();
            if live.is_empty() {
                break;
            }
            let toks: Vec<[u32; 1]> = live
                .iter()
                .map(|&c| [*chains[c].2.last().unwrap_or(&0)])
                .collect();
            let batch: Vec<MtpSeq<'_>> = live
                .iter()
                .zip(&toks)
                .filter_map(|(&c, t)| {
                    let (_, len, _, o) = &chains[c];
                    Some(MtpSeq {
                        next_tokens: t,
                        pos0: len - 2 + j,
                        block_table: tables[c].as_deref()?,
                        hidden: o.hidden.clone(),
                        logits: true,
                    })
                })
                .collect();
            let Some(outs) = self.run_mtp(&batch) else {
                return;
            };
            for (&c, o) in live.iter().zip(outs) {
                if let Some(o) = o {
                    if let Some(d) = first_row(&o.logits) {
                        chains[c].2.push(d);
                        chains[c].3 = o;
                    }
                }
            }
        }
        for (id, len, drafts, _) in chains {
            if let Some(st) = self.states.get_mut(&id) {
                st.mtp_draft = Some((len, drafts));
            }
        }
    }

    /// One MTP layer pass ([`Runner::mtp_forward_paged`]), timed as busy; `None` (drafts
    /// dropped, logged) when it fails.
    fn run_mtp(&mut self, batch: &[MtpSeq<'_>]) -> Option<Vec<Option<MtpOut>>> {
        let t0 = Instant::now();
        let out = self.runner.mtp_forward_paged(batch);
        self.metrics
            .busy_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match out {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(error = %e, "MTP step failed; no drafts this step");
                for st in self.states.values_mut() {
                    st.mtp_draft = None;
                }
                None
            }
        }
    }

    /// Whether step `s` computes prompt positions whose logprobs its request asked for.
    fn wants_prompt_logprobs(&self, s: &Scheduled) -> bool {
        self.states
            .get(&s.id)
            .is_some_and(|st| st.prompt_logprobs.is_some() && s.start < st.prompt_len)
    }

    /// Records the prompt logprobs a step's rows give (row j predicts position start + j + 1)
    /// and returns the rows left for sampling: the last one.
    fn record_prompt_logprobs(&mut self, s: &Scheduled, lg: Tensor) -> Result<Tensor, String> {
        if !self.wants_prompt_logprobs(s) {
            return Ok(lg);
        }
        let err = |e: candle_core::Error| e.to_string();
        let rows = lg.to_vec2::<f32>().map_err(err)?;
        let tokens = self.sched.tokens(s.id).unwrap_or(&[]).to_vec();
        let Some(st) = self.states.get_mut(&s.id) else {
            return Ok(lg);
        };
        let prompt_len = st.prompt_len;
        if let Some((n, slots)) = st.prompt_logprobs.as_mut() {
            for (j, row) in rows.iter().enumerate() {
                let pos = s.start + j + 1;
                if pos >= prompt_len {
                    break;
                }
                let (lp, top) = st
                    .sampler
                    .logprobs_of(row, tokens[pos], *n)
                    .map_err(|e| e.to_string())?;
                let own = row
                    .get(tokens[pos] as usize)
                    .copied()
                    .unwrap_or(f32::NEG_INFINITY);
                slots[pos] = Some(PromptLogprob {
                    id: tokens[pos],
                    logprob: Some(lp),
                    rank: Some(row.iter().filter(|&&l| l >= own).count()),
                    top_logprobs: top,
                });
            }
        }
        let last = rows.len().saturating_sub(1);
        lg.narrow(0, last, 1).map_err(err)
    }

    /// Samples what a sampling step `s` produced from its logits `lg` (one row, or one per
    /// position when it carried a draft) and records it with the scheduler.
    fn sample_step(&mut self, s: &Scheduled, lg: &Tensor) -> Result<(), String> {
        let err = |e: candle_core::Error| e.to_string();
        if s.draft.is_empty() {
            let row = lg
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(err)?;
            match self.sample(s.id, row, &[], None)? {
                Some(tok) => self.sched.complete(s.id, s.len, Some(tok)),
                None => self.finish_request(s.id, s.len, &[]),
            }
            return Ok(());
        }
        // Row i is the distribution after the known tokens and the first i drafts: sample it,
        // keep going while the sample is the draft, stop at the first disagreement (that
        // sample replaces the draft) or after the last row (a bonus token).
        let rows = lg.to_vec2::<f32>().map_err(err)?;
        self.metrics
            .spec_draft_tokens
            .fetch_add(s.draft.len() as u64, Ordering::Relaxed);
        if let Some(st) = self.states.get_mut(&s.id) {
            st.drafted += s.draft.len();
        }
        let mut accepted = Vec::with_capacity(s.draft.len());
        for (i, row) in rows.into_iter().enumerate() {
            let draft = s.draft.get(i).copied();
            let Some(tok) = self.sample(s.id, row, &accepted, draft)? else {
                self.finish_request(s.id, s.len, &accepted);
                return Ok(());
            };
            if Some(tok) == draft {
                self.metrics
                    .spec_accepted_tokens
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(st) = self.states.get_mut(&s.id) {
                    st.accepted += 1;
                }
                accepted.push(tok);
            } else {
                self.sched.complete_draft(s.id, s.len, &accepted, Some(tok));
                return Ok(());
            }
        }
        Err(format!(
            "the model returned {} logit rows for a step of 1 + {} tokens",
            accepted.len(),
            s.draft.len()
        ))
    }

    /// Samples the next token of `id` from `row`, streams it, and finishes the request when it
    /// stops. `accepted` are draft tokens already taken this step (not yet in the scheduler's
    /// sequence); `draft` is this position's draft, if any. Returns the token when the
    /// sequence continues, `None` when it is over (the caller then ends it with
    /// [`Loop::finish_request`]).
    fn sample(
        &mut self,
        id: SeqId,
        row: Vec<f32>,
        accepted: &[u32],
        draft: Option<u32>,
    ) -> Result<Option<u32>, String> {
        let mut tokens = self.sched.tokens(id).unwrap_or(&[]).to_vec();
        tokens.extend_from_slice(accepted);
        let Some(st) = self.states.get_mut(&id) else {
            return Ok(None);
        };
        let generated = &tokens[st.prompt_len..];
        // A spent reasoning budget forces the closing tag, token by token; otherwise the
        // constraint's mask (if any) applies.
        let tokenizer = &self.tokenizer;
        let close = || {
            let text = format!("\n{}\n", crate::reasoning::THINK_END);
            tokenizer.encode(&text, false).unwrap_or_default()
        };
        let forced = st.budget.as_mut().and_then(|b| b.forced(close));
        let allowed = match (forced, st.constraint.as_mut()) {
            (Some(t), _) => {
                let mut m = vec![0u32; row.len().div_ceil(32)];
                if let Some(w) = m.get_mut(t as usize / 32) {
                    *w |= 1 << (t % 32);
                }
                Some(m)
            }
            (None, Some(c)) => Some(c.allowed().map_err(|e| e.to_string())?),
            (None, None) => None,
        };
        let allowed = if forced.is_none() && generated.len() < st.min_tokens {
            hold_stop_ids(allowed, &st.held_stop_ids, row.len())
        } else {
            allowed
        };
        let pick = st
            .sampler
            .sample_with(&row, generated, draft, allowed.as_deref())
            .map_err(|e| e.to_string())?;
        if let Some(b) = st.budget.as_mut() {
            b.push(
                pick.id,
                &tokenizer.decode(&[pick.id], false).unwrap_or_default(),
            );
        }
        let first = st.ttft.is_none();
        if first {
            st.ttft = Some(st.submitted.elapsed());
        }
        self.metrics
            .tokens_generated
            .fetch_add(1, Ordering::Relaxed);
        let n_generated = generated.len() + 1;
        let mut delta = st
            .stream
            .push(&self.tokenizer, pick.id)
            .map_err(|e| e.to_string())?;
        // A structured output ends where its language does: at an end-of-sequence token the
        // grammar allowed (even with `ignore_eos`), or when the grammar allows nothing more.
        let mut complete = false;
        if let Some(c) = st.constraint.as_mut() {
            if c.is_eos(pick.id) {
                complete = true;
            } else {
                c.advance(pick.id).map_err(|e| e.to_string())?;
                complete = c.is_finished();
            }
        }
        let ends = if complete {
            Some(FinishReason::Stop)
        } else if n_generated >= st.max_tokens
            || tokens.len() + 1 >= self.sched.config().max_model_len
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        if let (None, Some(reason)) = (&delta.finish_reason, ends) {
            let tail = st
                .stream
                .finish(&self.tokenizer, reason)
                .map_err(|e| e.to_string())?;
            delta.text.push_str(&tail.text);
            delta.finish_reason = tail.finish_reason;
            delta.stop = tail.stop;
        }
        let ev = TokenEvent {
            id: pick.id,
            text: delta.text,
            logprob: pick.logprob,
            top_logprobs: pick.top_logprobs,
            entropy: pick.entropy,
            logits: st.return_logits.then_some(row),
            cached_tokens: first.then(|| self.sched.get(id).map_or(0, |s| s.num_cached)),
            prompt_logprobs: if first {
                st.prompt_logprobs.take().map(|(_, slots)| {
                    slots
                        .into_iter()
                        .zip(&tokens)
                        .map(|(slot, &id)| {
                            slot.unwrap_or(PromptLogprob {
                                id,
                                logprob: None,
                                rank: None,
                                top_logprobs: vec![],
                            })
                        })
                        .collect()
                })
            } else {
                None
            },
        };
        let _ = st.tx.send(Event::Token(ev));
        if let Some(reason) = delta.finish_reason {
            let seq = self.sched.get(id);
            let c = Completion {
                finish_reason: reason,
                stop: delta.stop,
                text: String::new(),
                prompt_tokens: st.prompt_len,
                completion_tokens: n_generated,
                cached_tokens: seq.map_or(0, |s| s.num_cached),
                preemptions: seq.map_or(0, |s| s.preemptions),
                ttft: st.ttft,
                draft_tokens: st.drafted,
                accepted_draft_tokens: st.accepted,
            };
            let _ = st.tx.send(Event::Finished(c));
            // The caller commits this step's tokens to the prefix cache, then drops it.
            return Ok(None);
        }
        Ok(Some(pick.id))
    }

    fn publish(&mut self) {
        let m = &self.metrics;
        m.running.store(self.sched.num_running(), Ordering::Relaxed);
        m.waiting.store(self.sched.num_waiting(), Ordering::Release);
        m.pending.fetch_sub(
            std::mem::take(&mut self.seen_since_publish),
            Ordering::AcqRel,
        );
        let st = self.sched.pool().lock().stats();
        m.kv_blocks_used.store(st.used, Ordering::Relaxed);
        m.prefix_queries.store(st.prefix_queries, Ordering::Relaxed);
        m.prefix_hits.store(st.prefix_hits, Ordering::Relaxed);
    }
}

/// The token mask with `stop_ids` taken out (vLLM's `min_tokens`): all of `vocab` when there
/// was no mask. A mask that allowed nothing but stop ids (a finished grammar) is kept as it
/// was: ending there beats generating outside the grammar.
fn hold_stop_ids(allowed: Option<Vec<u32>>, stop_ids: &[u32], vocab: usize) -> Option<Vec<u32>> {
    let mut mask = allowed.clone().unwrap_or_else(|| {
        let mut m = vec![u32::MAX; vocab.div_ceil(32)];
        if !vocab.is_multiple_of(32) {
            if let Some(last) = m.last_mut() {
                *last = (1u32 << (vocab % 32)) - 1;
            }
        }
        m
    });
    for &t in stop_ids {
        if let Some(w) = mask.get_mut(t as usize / 32) {
            *w &= !(1 << (t % 32));
        }
    }
    if mask.iter().all(|&w| w == 0) {
        allowed
    } else {
        Some(mask)
    }
}
