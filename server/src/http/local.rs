//! Serving a [`NormalizedRequest`] on the local engine: render the chat template, tokenise,
//! submit one engine request per choice, and read the choices' events either to completion
//! ([`collect`]) or as one merged stream that the wire formats turn into SSE ([`sse`]).
//!
//! Cancellation is by ownership: the engine's [`RequestStream`]s live inside the future or the
//! SSE body stream, so when a client disconnects and hyper drops the body (or the handler
//! future), the streams drop, which cancels the requests and frees their KV blocks.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::Event as SseEvent;
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use switchyard_engine::chat::RenderOptions;
use switchyard_engine::engine::{Completion, Event, GenerateRequest, RequestStream, TokenEvent};
use switchyard_engine::structured::{grammar_after_reasoning, OutputConstraint};
use switchyard_router::Outcome;

use super::error::ApiError;
use super::route::{Api, NormalizedRequest, PromptEnd, PromptInput};
use super::routing::RequestRecord;
use super::AppState;

/// Token counts of a whole request, as the wire formats report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (each distinct prompt once, however many choices it has).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    /// Speculative draft tokens checked over all choices.
    pub draft_tokens: usize,
    /// Of which accepted.
    pub accepted_draft_tokens: usize,
}

/// A request ready for the engine: its prompts' token ids and one engine request per choice
/// (choice `i` belongs to prompt `i / n`).
pub struct Prepared {
    /// Token ids of each prompt.
    pub prompts: Vec<Vec<u32>>,
    /// Engine requests, `n` per prompt.
    pub requests: Vec<GenerateRequest>,
    /// Choices per prompt.
    pub n: usize,
    /// The request field holding the token limit, for a context-length refusal.
    pub max_tokens_param: &'static str,
}

impl Prepared {
    /// Prompt tokens of the whole request.
    pub fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(Vec::len).sum()
    }

    /// The prompt ids of choice `i`.
    pub fn choice_prompt(&self, i: usize) -> &[u32] {
        self.prompts
            .get(i / self.n.max(1))
            .map_or(&[][..], Vec::as_slice)
    }

    /// Gives every collected choice its prompt's ids (vLLM's `return_token_ids`).
    pub fn attach_prompt_ids(&self, outs: &mut [ChoiceOutput]) {
        for (i, o) in outs.iter_mut().enumerate() {
            o.prompt_token_ids = self.choice_prompt(i).to_vec();
        }
    }
}

/// Renders and tokenises the prompts (on a blocking thread: templates and tokenisers of long
/// prompts take milliseconds) and builds the engine requests.
pub async fn prepare(state: &Arc<AppState>, req: &NormalizedRequest) -> Result<Prepared, ApiError> {
    let st = state.clone();
    let r = req.clone();
    // Tokenising and compiling a grammar both take milliseconds: off the async workers.
    let (mut prompts, constraint, prediction, thinking) = tokio::task::spawn_blocking(move || {
        let prompts = tokenize(&st, &r)?;
        // A forced tool call is a grammar too; it cannot be combined with another format.
        let forced = match r.tools.as_ref() {
            Some(t) => super::tools::forced(&st, t)?,
            None => None,
        };
        // Output that starts inside the template's open `<think>` block gets free thoughts
        // first; the constraint applies to the answer after `</think>`.
        let thinking = opens_reasoning(&st, &r);
        let spec = match (&r.output, forced) {
            (Some(o), Some(_)) => {
                return Err(ApiError::field(
                    o.param.clone(),
                    "cannot be combined with a tool_choice that forces a tool call",
                ))
            }
            (Some(o), None) => {
                let c = if thinking {
                    o.constraint.after_reasoning()
                } else {
                    o.constraint.clone()
                };
                Some((c, o.param.clone()))
            }
            (None, Some(OutputConstraint::Grammar(g))) if thinking => Some((
                OutputConstraint::Grammar(grammar_after_reasoning(&g)),
                "tool_choice".to_string(),
            )),
            (None, Some(g)) => Some((g, "tool_choice".to_string())),
            (None, None) => None,
        };
        let constraint = match spec {
            Some((c, param)) => Some(
                st.engine
                    .compile_constraint(&c)
                    .map_err(|e| ApiError::field(param, e.to_string()))?,
            ),
            None => None,
        };
        // OpenAI's Predicted Outputs: the predicted text is this request's draft source.
        let prediction = match &r.prediction {
            Some(text) => Some(st.tokenizer.encode(text, false).map_err(|e| {
                ApiError::field("prediction", format!("could not be tokenised: {e}"))
            })?),
            None => None,
        };
        Ok::<_, ApiError>((prompts, constraint, prediction, thinking))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))??;
    // The probe ran on a copy: keep its answer for the response paths.
    let _ = req.opens_reasoning.set(thinking);
    let info = state.engine.info();
    let vocab = info.model.vocab_size;
    if let Some(&(id, _)) = req
        .sampling
        .logit_bias
        .iter()
        .find(|b| b.0 as usize >= vocab)
    {
        return Err(ApiError::field(
            "logit_bias",
            format!("token id {id} is out of range for vocabulary size {vocab}"),
        ));
    }
    if let Some((i, id)) = req
        .controls
        .stop_token_ids
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(ApiError::field(
            format!("stop_token_ids[{i}]"),
            format!("token id {id} is out of range for vocabulary size {vocab}"),
        ));
    }
    let (max_model_len, max_waiting) = (info.scheduler.max_model_len, info.scheduler.max_waiting);
    // vLLM's truncate_prompt_tokens: keep the end of each prompt (the template's own start and
    // the first messages go first, as in vLLM).
    if let Some(keep) = req.controls.truncate_prompt_tokens {
        let keep = keep.unwrap_or(max_model_len);
        if keep > max_model_len {
            return Err(ApiError::field(
                "truncate_prompt_tokens",
                format!("{keep} is more than the maximum context length ({max_model_len} tokens)"),
            ));
        }
        for ids in &mut prompts {
            let cut = ids.len().saturating_sub(keep);
            ids.drain(..cut);
        }
    }
    let choices = prompts.len() * req.n;
    if choices > max_waiting {
        // Each choice takes a queue place; more than the queue holds would be refused with
        // 429 however long the client waited.
        let (param, what) = if req.n > 1 {
            ("n", format!("{} prompt(s) x n={}", prompts.len(), req.n))
        } else {
            (req.api.prompt_param(), format!("{} prompts", prompts.len()))
        };
        return Err(ApiError::field(
            param,
            format!("the request asks for {choices} choices ({what}) but this server queues at most {max_waiting} at a time; send fewer prompts or a smaller n"),
        ));
    }
    // The model's generation config fills what the request left unset (vLLM's
    // `--generation-config auto`).
    let mut base = req.sampling.clone();
    state.generation_defaults.apply(&mut base, req.sampling_set);
    let mut requests = Vec::with_capacity(choices);
    for ids in &prompts {
        let max_tokens = match req.max_tokens {
            Some(m) => m,
            None => {
                // vLLM's default: the rest of the context, capped so one request without a
                // limit cannot hold a sequence for minutes.
                if ids.len() >= max_model_len {
                    return Err(ApiError::ContextLength {
                        param: req.api.prompt_param().into(),
                        message: format!(
                            "The prompt has {} tokens but the maximum context length is {max_model_len} tokens, which leaves no room to generate. Shorten the prompt ({}).",
                            ids.len(),
                            req.api.prompt_fields()
                        ),
                    });
                }
                // vLLM: the model's `max_new_tokens`, when its generation config has one.
                (max_model_len - ids.len())
                    .min(state.default_max_tokens)
                    .min(
                        state
                            .generation_defaults
                            .max_new_tokens
                            .unwrap_or(usize::MAX),
                    )
            }
        };
        if req.controls.min_tokens > max_tokens {
            return Err(ApiError::field(
                "min_tokens",
                format!(
                    "must not exceed the tokens this request may generate ({max_tokens}), got {}",
                    req.controls.min_tokens
                ),
            ));
        }
        for i in 0..req.n {
            let mut sampling = base.clone();
            // Distinct choices from one seed: choice i draws with seed + i.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            requests.push(GenerateRequest {
                prompt: ids.clone(),
                max_tokens,
                sampling,
                stop: req.stop.clone(),
                stop_token_ids: req.controls.stop_token_ids.clone(),
                ignore_eos: req.ignore_eos,
                skip_special_tokens: req.controls.skip_special_tokens,
                include_stop_str_in_output: req.controls.include_stop_str_in_output,
                min_tokens: req.controls.min_tokens,
                cache_salt: req.controls.cache_salt,
                return_logits: false,
                constraint: constraint.clone(),
                prediction: prediction.clone(),
                // `echo` with `logprobs`, or vLLM's `prompt_logprobs`: the prompt's logprobs.
                prompt_logprobs: req
                    .sampling
                    .logprobs
                    .filter(|_| req.echo)
                    .max(req.controls.prompt_logprobs),
                reasoning_budget: req.reasoning_budget.filter(|_| thinking),
                priority: req.controls.priority,
            });
        }
    }
    Ok(Prepared {
        prompts,
        requests,
        n: req.n,
        max_tokens_param: req.max_tokens_param,
    })
}

/// The prompt tokens of a chat request as the local model would see them (template, tools
/// and all), for Anthropic's `count_tokens`.
pub fn count_prompt_tokens(state: &AppState, req: &NormalizedRequest) -> Result<usize, ApiError> {
    Ok(tokenize(state, req)?.iter().map(Vec::len).sum())
}

/// Whether a chat request's prompt leaves the model inside a `<think>` block (Hy3's template
/// opens one unless `reasoning_effort` is `no_think`), so its output starts with reasoning.
/// Read off the template's generation prompt for a one-message probe with the request's
/// template variables: what follows the last message does not depend on the messages.
pub fn opens_reasoning(state: &AppState, req: &NormalizedRequest) -> bool {
    if req.api == Api::OpenAiCompletions {
        return false;
    }
    *req.opens_reasoning.get_or_init(|| {
        let (template, opts) = render_setup(state, req);
        // A prompt that continues the final message ends in that message's text: render it.
        let probe = [switchyard_engine::chat::ChatMessage::user(".")];
        let messages = if req.prompt_end == PromptEnd::NewTurn {
            &probe[..]
        } else {
            &req.messages[..]
        };
        template
            .render(messages, &opts)
            .is_ok_and(|p| switchyard_engine::reasoning::prompt_opens_reasoning(&p))
    })
}

/// A chat request's prompt text: its conversation through the chat template (tools, template
/// variables and where the prompt ends included).
pub fn render(state: &AppState, req: &NormalizedRequest) -> Result<String, ApiError> {
    let (template, opts) = render_setup(state, req);
    template
        .render(&req.messages, &opts)
        .map_err(|e| ApiError::field(req.api.prompt_param(), e.to_string()))
}

/// The template and options a chat request renders with.
fn render_setup<'a>(
    state: &'a AppState,
    req: &NormalizedRequest,
) -> (&'a switchyard_engine::chat::ChatTemplate, RenderOptions) {
    let mut opts = RenderOptions::generation();
    opts.add_generation_prompt = req.prompt_end == PromptEnd::NewTurn;
    opts.continue_final_message = req.prompt_end == PromptEnd::ContinueFinal;
    opts.kwargs = req.template_kwargs.clone();
    match req.tools.as_ref().filter(|t| t.active()) {
        Some(t) => {
            opts = opts.with_tools(t.tools.clone());
            (super::tools::template(state), opts)
        }
        None => (&state.template, opts),
    }
}

fn tokenize(state: &AppState, req: &NormalizedRequest) -> Result<Vec<Vec<u32>>, ApiError> {
    let tok = &state.tokenizer;
    let param = req.api.prompt_param();
    let enc = |text: &str, special: bool| {
        tok.encode(text, special)
            .map_err(|e| ApiError::field(param, format!("the text could not be tokenised: {e}")))
    };
    match req.api {
        Api::OpenAiChat | Api::AnthropicMessages => Ok(vec![enc(&render(state, req)?, false)?]),
        Api::OpenAiCompletions => req
            .prompts
            .iter()
            .map(|p| match p {
                PromptInput::Text(t) => enc(t, true),
                PromptInput::Tokens(ids) => Ok(ids.clone()),
            })
            .collect(),
    }
}

/// Submits every choice; on a refusal the choices already submitted are dropped (cancelled).
pub fn submit(state: &AppState, api: Api, p: &Prepared) -> Result<Vec<RequestStream>, ApiError> {
    p.requests
        .iter()
        .map(|r| {
            state
                .engine
                .submit(r.clone())
                .map_err(|e| ApiError::from_submit(e, api, p.max_tokens_param))
        })
        .collect()
}

/// One event of one choice.
#[derive(Debug)]
pub enum ChoiceEvent {
    /// A token of choice `.0`.
    Token(usize, TokenEvent),
    /// Choice `.0` finished.
    Finished(usize, Completion),
    /// A choice failed.
    Error(String),
}

/// The choices' events merged in arrival order. Each engine stream is owned by the merged
/// stream and dropped when its choice ends or when the merged stream is dropped.
pub fn merge(streams: Vec<RequestStream>) -> SelectAll<BoxStream<'static, ChoiceEvent>> {
    stream::select_all(streams.into_iter().enumerate().map(|(i, s)| {
        stream::unfold(Some(s), move |st| async move {
            let mut s = st?;
            Some(match s.recv().await {
                Some(Event::Token(t)) => (ChoiceEvent::Token(i, t), Some(s)),
                Some(Event::Finished(c)) => (ChoiceEvent::Finished(i, c), None),
                Some(Event::Error(e)) => (ChoiceEvent::Error(e), None),
                None => (
                    ChoiceEvent::Error("the engine stopped before the request finished".into()),
                    None,
                ),
            })
        })
        .boxed()
    }))
}

/// Per-request bookkeeping for `/metrics`: token counts and latencies as choices finish, and a
/// cancellation count if it is dropped before every choice finished (the client went away).
/// It owns the request's telemetry record once the engine has the request, and writes it when
/// dropped: served, failed or cancelled.
pub struct Tracker {
    state: Arc<AppState>,
    api: Api,
    arrived: Instant,
    n: usize,
    choices: usize,
    finished: usize,
    failed: Option<String>,
    streaming: bool,
    ttft: Option<Duration>,
    record: Option<RequestRecord>,
    /// Usage so far.
    pub usage: Usage,
}

impl Tracker {
    /// Tracks a request of `choices` choices, `n` per prompt, that arrived at `arrived`;
    /// `record` (taken from the caller) is completed when the tracker drops.
    pub fn new(
        state: Arc<AppState>,
        api: Api,
        arrived: Instant,
        p: &Prepared,
        record: &mut Option<RequestRecord>,
    ) -> Self {
        Self {
            state,
            api,
            arrived,
            n: p.n,
            choices: p.requests.len(),
            finished: 0,
            failed: None,
            streaming: false,
            ttft: None,
            record: record.take(),
            usage: Usage {
                prompt_tokens: p.prompt_tokens(),
                ..Usage::default()
            },
        }
    }

    /// Records a generated token (the first one sets the time to first token).
    pub fn token(&mut self) {
        if self.ttft.is_none() {
            self.ttft = Some(self.arrived.elapsed());
        }
    }

    /// Records a finished choice.
    pub fn finish(&mut self, choice: usize, c: &Completion) {
        let ep = self.api.endpoint();
        let m = &self.state.metrics;
        self.finished += 1;
        self.usage.completion_tokens += c.completion_tokens;
        self.usage.draft_tokens += c.draft_tokens;
        self.usage.accepted_draft_tokens += c.accepted_draft_tokens;
        // The first choice of each prompt carries the prompt's counts (once per prompt).
        let within_prompt = choice % self.n.max(1);
        if within_prompt == 0 {
            self.usage.cached_tokens += c.cached_tokens;
            m.prompt_tokens
                .with_label_values(&[ep])
                .inc_by(c.prompt_tokens as u64);
            m.cached_tokens
                .with_label_values(&[ep])
                .inc_by(c.cached_tokens as u64);
        }
        m.generation_tokens
            .with_label_values(&[ep])
            .inc_by(c.completion_tokens as u64);
        m.finished
            .with_label_values(&[ep, c.finish_reason.as_str()])
            .inc();
        if let Some(t) = c.ttft {
            m.ttft.with_label_values(&[ep]).observe(t.as_secs_f64());
        }
        if self.finished == self.choices {
            m.e2e_latency
                .with_label_values(&[ep])
                .observe(self.arrived.elapsed().as_secs_f64());
        }
    }

    /// Records an engine failure (not a cancellation).
    pub fn fail(&mut self, error: &str) {
        self.failed = Some(error.to_string());
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let complete = self.finished >= self.choices;
        if !complete && self.failed.is_none() {
            self.state
                .metrics
                .cancelled
                .with_label_values(&[self.api.endpoint()])
                .inc();
        }
        if let Some(mut r) = self.record.take() {
            r.set_local_usage(self.usage);
            if let Some(t) = self.ttft {
                r.set_ttft(t);
            }
            let outcome = match (&self.failed, complete) {
                (Some(_), _) if self.streaming => Outcome::StreamError,
                (Some(_), _) => Outcome::Error,
                (None, true) => Outcome::Ok,
                (None, false) => Outcome::Cancelled,
            };
            r.finish(outcome, self.failed.take());
        }
    }
}

/// What a non-streaming request collected for one choice.
#[derive(Debug, Default)]
pub struct ChoiceOutput {
    /// The generated text.
    pub text: String,
    /// Token events (kept only when logprobs were asked for).
    pub tokens: Vec<TokenEvent>,
    /// The generated token ids (always kept: four bytes a token).
    pub token_ids: Vec<u32>,
    /// The prompt's token ids, when the response reports them
    /// ([`Prepared::attach_prompt_ids`]).
    pub prompt_token_ids: Vec<u32>,
    /// How it ended.
    pub completion: Option<Completion>,
}

/// Runs every choice to completion.
pub async fn collect(
    streams: Vec<RequestStream>,
    tracker: &mut Tracker,
    keep_tokens: bool,
) -> Result<Vec<ChoiceOutput>, ApiError> {
    let mut out: Vec<ChoiceOutput> = (0..streams.len())
        .map(|_| ChoiceOutput::default())
        .collect();
    let mut events = merge(streams);
    while let Some(ev) = events.next().await {
        match ev {
            ChoiceEvent::Token(i, t) => {
                tracker.token();
                if let Some(o) = out.get_mut(i) {
                    o.text.push_str(&t.text);
                    o.token_ids.push(t.id);
                    if keep_tokens {
                        o.tokens.push(t);
                    }
                }
            }
            ChoiceEvent::Finished(i, c) => {
                tracker.finish(i, &c);
                if let Some(o) = out.get_mut(i) {
                    o.text.push_str(&c.text);
                    o.completion = Some(c);
                }
            }
            ChoiceEvent::Error(e) => {
                tracker.fail(&e);
                return Err(ApiError::Internal(e));
            }
        }
    }
    Ok(out)
}

/// Runs a request to completion with every token event kept, leaving its record with the
/// caller (the cascade writes it after checking the answer): the choices and the usage.
pub async fn run(
    state: &Arc<AppState>,
    req: &NormalizedRequest,
    arrived: Instant,
) -> Result<(Vec<ChoiceOutput>, Usage), ApiError> {
    let prepared = prepare(state, req).await?;
    let streams = submit(state, req.api, &prepared)?;
    let mut tracker = Tracker::new(state.clone(), req.api, arrived, &prepared, &mut None);
    let mut outs = collect(streams, &mut tracker, true).await?;
    if req.controls.return_token_ids {
        prepared.attach_prompt_ids(&mut outs);
    }
    Ok((outs, tracker.usage))
}

/// The SSE events of choices that already finished, as [`sse`] would have sent them live (a
/// stream the cascade held back until the answer was checked).
pub fn replay<F: SseFormat>(
    outs: Vec<ChoiceOutput>,
    mut format: F,
    usage: Usage,
) -> impl futures_util::Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let mut events = format.start();
    for (i, o) in outs.into_iter().enumerate() {
        for t in o.tokens {
            events.extend(format.token(i, t));
        }
        if let Some(c) = &o.completion {
            events.extend(format.finished(i, c));
        }
    }
    events.extend(format.end(usage));
    stream::iter(events.into_iter().map(Ok))
}

/// Turns choice events into a wire format's SSE events.
pub trait SseFormat: Send + 'static {
    /// Events sent before any token.
    fn start(&mut self) -> Vec<SseEvent>;
    /// Events for one token.
    fn token(&mut self, choice: usize, t: TokenEvent) -> Vec<SseEvent>;
    /// Events for a finished choice.
    fn finished(&mut self, choice: usize, c: &Completion) -> Vec<SseEvent>;
    /// Events after every choice finished.
    fn end(&mut self, usage: Usage) -> Vec<SseEvent>;
    /// Events for a failure; the stream ends after them.
    fn error(&mut self, e: ApiError) -> Vec<SseEvent>;
}

struct SseState<F> {
    events: SelectAll<BoxStream<'static, ChoiceEvent>>,
    format: F,
    tracker: Tracker,
    queue: VecDeque<SseEvent>,
    done: bool,
}

/// The SSE body of a streaming request. Dropping it (client gone) drops the engine streams.
pub fn sse<F: SseFormat>(
    streams: Vec<RequestStream>,
    mut format: F,
    mut tracker: Tracker,
) -> impl futures_util::Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    tracker.streaming = true;
    let queue: VecDeque<SseEvent> = format.start().into();
    let st = SseState {
        events: merge(streams),
        format,
        tracker,
        queue,
        done: false,
    };
    stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some((Ok(e), st));
            }
            if st.done {
                return None;
            }
            match st.events.next().await {
                Some(ChoiceEvent::Token(i, t)) => {
                    st.tracker.token();
                    let evs = st.format.token(i, t);
                    st.queue.extend(evs);
                }
                Some(ChoiceEvent::Finished(i, c)) => {
                    st.tracker.finish(i, &c);
                    let evs = st.format.finished(i, &c);
                    st.queue.extend(evs);
                }
                Some(ChoiceEvent::Error(e)) => {
                    st.tracker.fail(&e);
                    let evs = st.format.error(ApiError::Internal(e));
                    st.queue.extend(evs);
                    st.done = true;
                    // Stop the other choices now rather than when the body is dropped.
                    st.events = SelectAll::new();
                }
                None => {
                    let evs = st.format.end(st.tracker.usage);
                    st.queue.extend(evs);
                    st.done = true;
                }
            }
        }
    })
}

/// The token's text and bytes for logprobs. Byte-level BPE pieces of a multi-byte character
/// decode to U+FFFD on their own; their bytes then come from the byte-level alphabet.
pub fn token_text(state: &AppState, id: u32) -> (String, Vec<u8>) {
    let tok = &state.tokenizer;
    let text = tok.decode(&[id], false).unwrap_or_default();
    if !text.contains('\u{FFFD}') {
        let b = text.as_bytes().to_vec();
        return (text, b);
    }
    match tok.id_to_token(id).and_then(|p| byte_level_bytes(&p)) {
        Some(b) => (text, b),
        None => {
            let b = text.as_bytes().to_vec();
            (text, b)
        }
    }
}

/// Inverts GPT-2's byte-to-unicode table (printable bytes map to themselves; the other bytes to
/// U+0100 upwards in order); `None` if a character is outside the table.
fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    piece
        .chars()
        .map(|c| {
            let cp = c as u32;
            if printable(cp) {
                return Some(cp as u8);
            }
            let k = cp.checked_sub(256)?;
            // The k-th non-printable byte.
            (0u32..=255)
                .filter(|&b| !printable(b))
                .nth(k as usize)
                .map(|b| b as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_level_inverse() {
        // 'Ġ' (U+0120) is byte 0x20 (space), the 33rd non-printable byte.
        assert_eq!(super::byte_level_bytes("Ġhi"), Some(b" hi".to_vec()));
        assert_eq!(super::byte_level_bytes("\u{2581}x"), None);
    }
}
