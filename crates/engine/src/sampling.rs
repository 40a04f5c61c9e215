//! Sampling: turns one position's logits into the next token.
//!
//! The pipeline follows Hugging Face `generate` / vLLM, in this order:
//!
//! 1. **Penalties** on the logits. Repetition (HF/CTRL): for every token already in the prompt
//!    or the output, a positive logit is divided by the penalty and a negative one multiplied.
//!    Frequency and presence (OpenAI): `logit -= count * frequency_penalty` and
//!    `logit -= presence_penalty` if `count > 0`, counting the generated tokens only.
//! 2. **Temperature 0 → greedy**: argmax, ties to the lowest id.
//! 3. **Temperature**: `logit / T`.
//! 4. **Truncation**: top-k, then top-p (the smallest set, in descending probability, whose mass
//!    reaches `top_p`, renormalised after top-k), then min-p (keep `p >= min_p * p_max`).
//! 5. **Draw** from what is left with a per-request ChaCha RNG, seeded from `seed` when given, so
//!    the same seed and inputs give the same tokens on every run and machine.
//!
//! **Logprobs** are those of the raw model distribution: log-softmax of the logits before
//! penalties, temperature and truncation. This is vLLM's default (`raw_logprobs`) and what the
//! OpenAI API reports — the model's belief, not the sampler's, so a logprob does not change when
//! a request changes its temperature or top-p.
//!
//! Speed: nothing sorts the vocabulary. Without truncation a draw is two linear passes. Top-k is a
//! `select_nth_unstable` (O(V)) plus a sort of k items. Top-p without top-k selects a growing head
//! (256, then ×4) until it holds `top_p` of the mass, so a peaked distribution costs O(V) and only
//! a flat one degrades towards a full sort. Buffers live in the [`Sampler`] and are reused.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet};

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Highest temperature accepted: the top of OpenAI's documented range; above it text is noise.
pub const MAX_TEMPERATURE: f32 = 2.0;
/// Bound of OpenAI's documented range for `frequency_penalty` and `presence_penalty`, ±2.
pub const MAX_ABS_PENALTY: f32 = 2.0;
/// Most alternatives per position: OpenAI's `top_logprobs` maximum.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Largest |logit bias| (OpenAI's range: ±100 bans or forces a token at any temperature).
pub const MAX_LOGIT_BIAS: f32 = 100.0;
/// First head size tried for top-p without top-k; chat models usually reach top_p=0.9–0.95
/// within a few hundred tokens, so one select of the vocabulary plus one small sort suffices.
const TOP_P_INITIAL_HEAD: usize = 256;
/// Growth factor of the head when it does not yet hold `top_p` of the mass.
const TOP_P_HEAD_GROWTH: usize = 4;

/// Errors from sampling; parameter errors name the request field.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    /// A parameter is out of range.
    #[error("invalid `{field}`: {message}")]
    InvalidParameter {
        /// The request field.
        field: &'static str,
        /// The accepted range and the value given.
        message: String,
    },
    /// The logits slice is empty.
    #[error("the model returned no logits")]
    EmptyLogits,
    /// The logits contain NaN (the model's numbers broke down).
    #[error("the model returned NaN logits (first at token {0})")]
    NanLogits(usize),
    /// The logits contain +inf, so no distribution is defined.
    #[error("the model returned an infinite logit at token {0}")]
    InfiniteLogit(usize),
    /// Every logit is -inf.
    #[error("every logit is -inf; there is no token to sample")]
    NoCandidates,
    /// The logits tensor has the wrong shape.
    #[error("the logits tensor must be [vocab] or [1, vocab], not {0:?}")]
    Shape(Vec<usize>),
    /// Reading the logits tensor failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, SamplingError>;

/// Per-request sampling settings, with OpenAI-compatible defaults (temperature 1, no truncation,
/// no penalties).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 is greedy; otherwise logits are divided by it. Range `[0, 2]`.
    pub temperature: f32,
    /// Keep the k most likely tokens; `None` or `Some(0)` disables (vLLM treats 0 the same).
    pub top_k: Option<usize>,
    /// Nucleus sampling mass, `(0, 1]`; 1 disables.
    pub top_p: f32,
    /// Drop tokens below `min_p` times the top probability, `[0, 1]`; 0 disables.
    pub min_p: f32,
    /// HF/CTRL repetition penalty over prompt and output tokens, `> 0`; 1 disables.
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty over output tokens, `[-2, 2]`.
    pub frequency_penalty: f32,
    /// OpenAI presence penalty over output tokens, `[-2, 2]`.
    pub presence_penalty: f32,
    /// RNG seed; the same seed reproduces the same tokens.
    pub seed: Option<u64>,
    /// `Some(n)`: report the chosen token's logprob and the `n` most likely alternatives
    /// (`n <= 20`); `None`: no logprobs.
    pub logprobs: Option<usize>,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`, each in
    /// `[-100, 100]`); logprobs still describe the unbiased distribution.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            logprobs: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), everything else default.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether the next token is the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }

    /// Checks every field's range; the error names the first field that is out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, message: String| {
            Err(SamplingError::InvalidParameter { field, message })
        };
        if !(self.temperature.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&self.temperature)) {
            return bad(
                "temperature",
                format!(
                    "must be between 0 and {MAX_TEMPERATURE}, got {}",
                    self.temperature
                ),
            );
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(self.min_p.is_finite() && (0.0..=1.0).contains(&self.min_p)) {
            return bad(
                "min_p",
                format!("must be between 0 and 1, got {}", self.min_p),
            );
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!(
                    "must be greater than 0 (1 disables it), got {}",
                    self.repetition_penalty
                ),
            );
        }
        for (field, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(value.is_finite() && value.abs() <= MAX_ABS_PENALTY) {
                return bad(
                    field,
                    format!(
                        "must be between -{MAX_ABS_PENALTY} and {MAX_ABS_PENALTY}, got {value}"
                    ),
                );
            }
        }
        if let Some(&(id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(b.is_finite() && b.abs() <= MAX_LOGIT_BIAS))
        {
            return bad(
                "logit_bias",
                format!("token {id}: the bias must be between -{MAX_LOGIT_BIAS} and {MAX_LOGIT_BIAS}, got {b}"),
            );
        }
        if let Some(n) = self.logprobs {
            if n > MAX_TOP_LOGPROBS {
                return bad(
                    "top_logprobs",
                    format!("must be at most {MAX_TOP_LOGPROBS}, got {n}"),
                );
            }
        }
        Ok(())
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }

    fn effective_top_k(&self) -> Option<usize> {
        self.top_k.filter(|&k| k > 0)
    }
}

/// A token id with its logprob.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    /// The token.
    pub id: u32,
    /// Natural-log probability under the raw model distribution.
    pub logprob: f32,
}

/// The sampler's choice for one position.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    /// The chosen token.
    pub id: u32,
    /// Its raw-distribution logprob, when `logprobs` was requested.
    pub logprob: Option<f32>,
    /// The `logprobs` most likely tokens of the raw distribution, most likely first (ties: lowest
    /// id first); empty unless requested.
    pub top_logprobs: Vec<TokenLogprob>,
    /// Entropy (nats) of the raw distribution at this position, when `logprobs` was requested:
    /// the model's uncertainty, which the router's cascade checks.
    pub entropy: Option<f32>,
}

/// Samples tokens for one sequence. Holds the RNG, the penalty counts and reusable buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Prompt tokens, for the repetition penalty.
    prompt_tokens: HashSet<u32>,
    /// Occurrences of each generated token seen so far.
    counts: HashMap<u32, u32>,
    /// How many generated tokens `counts` covers, and the last of them (to notice a new list).
    counted: usize,
    last_counted: Option<u32>,
    /// Penalised logits.
    work: Vec<f32>,
    /// Unnormalised probabilities `exp((l - max) / T)`, one per token, for the plain draw.
    weights: Vec<f32>,
    /// The sorted head: token ids, most likely first.
    head: Vec<u32>,
    /// (logit, id) pairs for selecting a large head without indirection.
    pairs: Vec<(f32, u32)>,
    /// Bounded min-heap for selecting a small head in one pass.
    heap: BinaryHeap<Reverse<Ranked>>,
    /// Candidates after truncation: (id, unnormalised probability).
    candidates: Vec<(u32, f64)>,
}

impl Sampler {
    /// A sampler for `params` (validated here).
    pub fn new(params: SamplingParams) -> Result<Self> {
        Self::with_prompt(params, &[])
    }

    /// A sampler whose repetition penalty also covers `prompt_ids`, as HF and vLLM apply it.
    pub fn with_prompt(params: SamplingParams, prompt_ids: &[u32]) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let prompt_tokens = if params.repetition_penalty != 1.0 {
            prompt_ids.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Ok(Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            prompt_tokens,
            counts: HashMap::new(),
            counted: 0,
            last_counted: None,
            work: Vec::new(),
            weights: Vec::new(),
            head: Vec::new(),
            pairs: Vec::new(),
            heap: BinaryHeap::new(),
            candidates: Vec::new(),
        })
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from one position's logits. `generated` is the sequence's output so
    /// far (it grows by one token per call; the penalty counts are updated incrementally).
    pub fn sample(&mut self, logits: &[f32], generated: &[u32]) -> Result<SampledToken> {
        self.sample_with(logits, generated, None, None)
    }

    /// [`Sampler::sample`] at a position where a speculative proposer guessed `draft`
    /// ([`crate::speculative`]): returns `draft` itself when it is accepted, otherwise another
    /// token. The result has exactly the distribution [`Sampler::sample`] draws from (the
    /// speculative-sampling rule for a proposer that puts all its mass on one token: accept
    /// with probability p(draft), else draw from p with the draft removed), so drafts change
    /// speed, never output statistics. Greedy sampling ignores the draft.
    pub fn sample_draft(
        &mut self,
        logits: &[f32],
        generated: &[u32],
        draft: u32,
    ) -> Result<SampledToken> {
        self.sample_with(logits, generated, Some(draft), None)
    }

    /// [`Sampler::sample`] or [`Sampler::sample_draft`] among the tokens `allowed` lets
    /// through (bit `i % 32` of word `i / 32` for token `i`; a structured-output constraint,
    /// [`crate::structured`]); every other token has probability zero. The logprobs, top
    /// logprobs and entropy still describe the model's raw distribution.
    pub fn sample_with(
        &mut self,
        logits: &[f32],
        generated: &[u32],
        draft: Option<u32>,
        allowed: Option<&[u32]>,
    ) -> Result<SampledToken> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        let raw_max = checked_max(logits)?;
        if raw_max == f32::NEG_INFINITY {
            return Err(SamplingError::NoCandidates);
        }
        let greedy = self.params.is_greedy();
        let penalties = self.params.has_penalties();
        let biased = !self.params.logit_bias.is_empty();
        let id = if penalties || biased || allowed.is_some() {
            let mut work = std::mem::take(&mut self.work);
            work.clear();
            work.extend_from_slice(logits);
            if penalties {
                self.update_counts(generated);
                penalize(&mut work, &self.counts, &self.prompt_tokens, &self.params);
            }
            for &(t, b) in &self.params.logit_bias {
                if let Some(l) = work.get_mut(t as usize) {
                    *l += b;
                }
            }
            if let Some(mask) = allowed {
                apply_mask(&mut work, mask);
            }
            // Penalties keep finite logits finite and -inf at -inf; a mask may leave nothing.
            let max = max_of(&work);
            let drawn = if max == f32::NEG_INFINITY {
                Err(SamplingError::NoCandidates)
            } else if greedy {
                Ok(argmax(&work, max))
            } else {
                self.draw(&work, max, draft)
            };
            self.work = work;
            drawn?
        } else if greedy {
            argmax(logits, raw_max)
        } else {
            self.draw(logits, raw_max, draft)?
        };

        let (logprob, top_logprobs, entropy) = match self.params.logprobs {
            Some(n) => {
                let z = sum_weights(logits, Scale::new(raw_max, 1.0));
                let norm = f64::from(raw_max) + z.ln();
                let logprob = |id: u32| (f64::from(logits[id as usize]) - norm) as f32;
                self.select_head(logits, n);
                let top = self
                    .head
                    .iter()
                    .map(|&id| TokenLogprob {
                        id,
                        logprob: logprob(id),
                    })
                    .collect();
                (Some(logprob(id)), top, Some(entropy(logits, raw_max, z)))
            }
            None => (None, Vec::new(), None),
        };
        Ok(SampledToken {
            id,
            logprob,
            top_logprobs,
            entropy,
        })
    }

    /// The raw-distribution logprob of `token` under `logits` and the `top` most likely
    /// tokens (most likely first, ties to the lowest id): what prompt logprobs report for a
    /// token the model was given rather than sampled.
    pub fn logprobs_of(
        &mut self,
        logits: &[f32],
        token: u32,
        top: usize,
    ) -> Result<(f32, Vec<TokenLogprob>)> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        let max = checked_max(logits)?;
        let z = sum_weights(logits, Scale::new(max, 1.0));
        let norm = f64::from(max) + z.ln();
        let lp = |id: u32| {
            logits
                .get(id as usize)
                .map_or(f32::NEG_INFINITY, |&l| (f64::from(l) - norm) as f32)
        };
        self.select_head(logits, top);
        let head = self
            .head
            .iter()
            .map(|&id| TokenLogprob {
                id,
                logprob: lp(id),
            })
            .collect();
        Ok((lp(token), head))
    }

    /// [`Sampler::sample`] for a candle tensor of shape `[vocab]` or `[1, vocab]` (any float
    /// dtype, any device; it is copied to the host as f32).
    pub fn sample_tensor(&mut self, logits: &Tensor, generated: &[u32]) -> Result<SampledToken> {
        let dims = logits.dims().to_vec();
        let flat = match dims.as_slice() {
            [_] => logits.clone(),
            [1, _] => logits.squeeze(0)?,
            _ => return Err(SamplingError::Shape(dims)),
        };
        let values = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.sample(&values, generated)
    }

    fn update_counts(&mut self, generated: &[u32]) {
        let continues = generated.len() >= self.counted
            && (self.counted == 0 || generated.get(self.counted - 1) == self.last_counted.as_ref());
        if !continues {
            self.counts.clear();
            self.counted = 0;
        }
        for &id in &generated[self.counted..] {
            *self.counts.entry(id).or_default() += 1;
        }
        self.counted = generated.len();
        self.last_counted = generated.last().copied();
    }

    /// Temperature, truncation and the random draw; `max` is the largest logit (finite). With a
    /// `draft`, the draft is kept with its probability and otherwise the draw excludes it.
    fn draw(&mut self, logits: &[f32], max: f32, draft: Option<u32>) -> Result<u32> {
        if max == f32::NEG_INFINITY {
            return Err(SamplingError::NoCandidates);
        }
        let scale = Scale::new(max, self.params.temperature);
        let top_k = self.params.effective_top_k().filter(|&k| k < logits.len());
        let top_p = f64::from(self.params.top_p);
        let min_p = self.params.min_p;

        if top_k.is_none() && top_p >= 1.0 && min_p == 0.0 {
            // Plain softmax draw: weights and their total in one pass, then a cumulative scan.
            let mut weights = std::mem::take(&mut self.weights);
            weights.clear();
            weights.extend(logits.iter().map(|&l| scale.weight(l)));
            let mut total = sum_f64(&weights);
            let mut skip = u32::MAX;
            if let Some(d) = draft {
                let wd = weights.get(d as usize).map_or(0.0, |&w| f64::from(w));
                if self.keeps_draft(wd, total) {
                    self.weights = weights;
                    return Ok(d);
                }
                total -= wd;
                skip = d;
            }
            let target = self.rng.random::<f64>() * total;
            let mut acc = 0.0;
            let mut chosen = None;
            for (i, &w) in weights.iter().enumerate() {
                if w > 0.0 && i as u32 != skip {
                    acc += f64::from(w);
                    chosen = Some(i as u32);
                    if acc > target {
                        break;
                    }
                }
            }
            self.weights = weights;
            return chosen.ok_or(SamplingError::NoCandidates);
        }

        self.truncate(logits, scale, top_k, top_p, min_p);
        let mut total: f64 = self.candidates.iter().map(|&(_, w)| w).sum();
        let mut skip = u32::MAX;
        if let Some(d) = draft {
            let wd = self
                .candidates
                .iter()
                .find(|&&(id, _)| id == d)
                .map_or(0.0, |&(_, w)| w);
            if self.keeps_draft(wd, total) {
                return Ok(d);
            }
            total -= wd;
            skip = d;
        }
        let target = self.rng.random::<f64>() * total;
        let mut acc = 0.0;
        for &(id, w) in self.candidates.iter().filter(|c| c.0 != skip) {
            acc += w;
            if acc > target {
                return Ok(id);
            }
        }
        self.candidates
            .iter()
            .rev()
            .find(|c| c.0 != skip)
            .map(|&(id, _)| id)
            .ok_or(SamplingError::NoCandidates)
    }

    /// The accept step of speculative sampling: keeps a draft of weight `w` out of `total`
    /// with probability `w / total`. Also keeps it when nothing else is left to draw (the
    /// rest of the mass rounded to zero).
    fn keeps_draft(&mut self, w: f64, total: f64) -> bool {
        w > 0.0 && (self.rng.random::<f64>() * total < w || total - w <= 0.0)
    }

    /// Fills `self.candidates` with the tokens that survive top-k, top-p and min-p, most likely
    /// first (in id order for min-p alone), each with its unnormalised probability.
    fn truncate(
        &mut self,
        logits: &[f32],
        scale: Scale,
        top_k: Option<usize>,
        top_p: f64,
        min_p: f32,
    ) {
        self.candidates.clear();
        let vocab = logits.len();
        if top_k.is_none() && top_p >= 1.0 {
            // min-p alone needs no order: one filtering pass. The top token's weight is 1, so
            // `p >= min_p * p_max` is `w >= min_p`, i.e. `l >= max + T·ln(min_p)`: compare in
            // logit space and take exponentials of the survivors only.
            let floor = scale.max + self.params.temperature * min_p.ln();
            for (i, &l) in logits.iter().enumerate() {
                if l >= floor {
                    let w = scale.weight(l);
                    if w > 0.0 {
                        self.candidates.push((i as u32, f64::from(w)));
                    }
                }
            }
            return;
        }

        // Mass that top-p is measured against: the top-k set, or the whole vocabulary.
        let total = match top_k {
            Some(k) => {
                self.select_head(logits, k);
                self.head
                    .iter()
                    .map(|&i| f64::from(scale.weight(logits[i as usize])))
                    .sum()
            }
            None => {
                self.select_head(logits, TOP_P_INITIAL_HEAD.min(vocab));
                sum_weights(logits, scale)
            }
        };
        let goal = top_p * total;
        let mut mass = 0.0;
        let mut next = 0;
        'walk: loop {
            while next < self.head.len() {
                if top_p < 1.0 && mass >= goal && !self.candidates.is_empty() {
                    break 'walk;
                }
                let id = self.head[next];
                let w = scale.weight(logits[id as usize]);
                if w <= 0.0 {
                    break 'walk;
                }
                mass += f64::from(w);
                self.candidates.push((id, f64::from(w)));
                next += 1;
            }
            if top_k.is_some() || self.head.len() >= vocab {
                break;
            }
            // The head holds less than top_p of the mass: select a bigger one and go on.
            let grown = (self.head.len() * TOP_P_HEAD_GROWTH).min(vocab);
            self.select_head(logits, grown);
        }
        if min_p > 0.0 {
            // Sorted descending, so min-p keeps a prefix; the first candidate has weight 1.
            let min_p = f64::from(min_p);
            let keep = self
                .candidates
                .iter()
                .take_while(|&&(_, w)| w >= min_p)
                .count()
                .max(1);
            self.candidates.truncate(keep);
        }
    }

    /// Puts the ids of the `n` largest logits into `self.head`, largest first, ties to the lowest
    /// id. Small heads use a bounded heap (one pass, a compare per token); large ones a
    /// `select_nth_unstable` over contiguous (logit, id) pairs.
    fn select_head(&mut self, logits: &[f32], n: usize) {
        let n = n.min(logits.len());
        self.head.clear();
        if n == 0 {
            return;
        }
        if n <= HEAP_SELECT_MAX {
            self.heap.clear();
            for (i, &l) in logits.iter().enumerate() {
                let entry = Ranked {
                    logit: l,
                    id: i as u32,
                };
                if self.heap.len() < n {
                    self.heap.push(Reverse(entry));
                } else if let Some(mut min) = self.heap.peek_mut() {
                    // Later ids lose ties, so only a strictly larger logit gets in.
                    if l > min.0.logit {
                        *min = Reverse(entry);
                    }
                }
            }
            let sorted = std::mem::take(&mut self.heap).into_sorted_vec();
            self.head.extend(sorted.iter().map(|r| r.0.id));
            self.heap = BinaryHeap::from(sorted);
            return;
        }
        self.pairs.clear();
        self.pairs
            .extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if n < self.pairs.len() {
            self.pairs.select_nth_unstable_by(n - 1, desc);
        }
        self.pairs[..n].sort_unstable_by(desc);
        self.head.extend(self.pairs[..n].iter().map(|&(_, id)| id));
    }

    #[cfg(test)]
    fn candidate_probs(&mut self, logits: &[f32]) -> Vec<(u32, f64)> {
        let scale = Scale::new(max_of(logits), self.params.temperature);
        let top_k = self.params.effective_top_k().filter(|&k| k < logits.len());
        self.truncate(
            logits,
            scale,
            top_k,
            f64::from(self.params.top_p),
            self.params.min_p,
        );
        let total: f64 = self.candidates.iter().map(|&(_, w)| w).sum();
        self.candidates
            .iter()
            .map(|&(id, w)| (id, w / total))
            .collect()
    }
}

/// Heads up to this size are selected with a bounded heap; larger ones with a partial sort.
/// Top-k settings (20–100) and top-N logprobs (≤ 20) fall on the heap side: one pass over a
/// 120K vocabulary costs about as much as computing its max.
const HEAP_SELECT_MAX: usize = 512;

/// A logit with its id, ordered by logit and then by *lower* id first, so ties go to the lowest id.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ranked {
    logit: f32,
    id: u32,
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.logit
            .total_cmp(&other.logit)
            .then(other.id.cmp(&self.id))
    }
}

/// `l ↦ exp((l - max) / T)` in f32 (sums are accumulated in f64).
#[derive(Debug, Clone, Copy)]
struct Scale {
    max: f32,
    inv_t: f32,
}

impl Scale {
    fn new(max: f32, temperature: f32) -> Self {
        Self {
            max,
            // Below ~3e-39 `1/T` overflows, and `0 * inf` would make the top token's weight NaN
            // (no candidates); f32::MAX keeps the limit T -> 0, the argmax.
            inv_t: (1.0 / temperature).min(f32::MAX),
        }
    }

    #[inline]
    fn weight(self, logit: f32) -> f32 {
        exp_nonpositive((logit - self.max) * self.inv_t)
    }
}

/// `e^x` for `x <= 0` (and -inf), relative error below 3e-7 (a few ulps), written without branches or calls so
/// that a loop over a vocabulary vectorises (libm's `expf` costs several ns per call, the larger
/// part of a 120K-token draw). Range reduction `x = n·ln2 + r`, `|r| <= ln2/2`, then a degree-7
/// Taylor polynomial for `e^r` and `2^n` built from the exponent bits. Results below
/// `e^-87.3` (the smallest normal f32) are flushed to 0, as are NaN inputs.
#[inline]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·ln2 is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MIN_X: f32 = -87.3;
    let underflow = x.is_nan() || x < MIN_X;
    let x = if underflow || x > 0.0 { 0.0 } else { x };
    // Round to nearest by adding 1.5·2^23: the sum's low mantissa bits then hold n as an integer,
    // so neither libm's `roundf` nor a (saturating, unvectorisable) float→int cast is needed.
    const ROUNDER: f32 = 12_582_912.0;
    let shifted = x * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let n_bits = (shifted.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    // Horner form of Σ r^k / k!, k = 0..=7.
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    let two_n = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
    if underflow {
        0.0
    } else {
        p * two_n
    }
}

/// Applies repetition (HF/CTRL), frequency and presence (OpenAI) penalties in place. Ids outside
/// the logits are ignored.
fn penalize(
    logits: &mut [f32],
    counts: &HashMap<u32, u32>,
    prompt_tokens: &HashSet<u32>,
    params: &SamplingParams,
) {
    let rep = params.repetition_penalty;
    if rep != 1.0 {
        let mut apply = |id: u32| {
            if let Some(l) = logits.get_mut(id as usize) {
                let v = if *l > 0.0 { *l / rep } else { *l * rep };
                // A tiny or huge penalty must not turn a finite logit infinite (+inf leaves
                // nothing to sample, -inf masks the token).
                *l = if l.is_finite() {
                    v.clamp(f32::MIN, f32::MAX)
                } else {
                    v
                };
            }
        };
        for &id in prompt_tokens {
            apply(id);
        }
        for &id in counts.keys() {
            if !prompt_tokens.contains(&id) {
                apply(id);
            }
        }
    }
    if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
        for (&id, &count) in counts {
            if let Some(l) = logits.get_mut(id as usize) {
                *l -= count as f32 * params.frequency_penalty + params.presence_penalty;
            }
        }
    }
}

/// Max of the logits, rejecting NaN and +inf. The scan is branch-free so it vectorises; the
/// offending index is looked up only on failure.
fn checked_max(logits: &[f32]) -> Result<f32> {
    let mut max = [f32::NEG_INFINITY; SCAN_LANES];
    let mut bad = [false; SCAN_LANES];
    let chunks = logits.chunks_exact(SCAN_LANES);
    let rest = chunks.remainder();
    for chunk in chunks.filter_map(|c| <&[f32; SCAN_LANES]>::try_from(c).ok()) {
        for ((m, b), &l) in max.iter_mut().zip(bad.iter_mut()).zip(chunk) {
            *m = if l > *m { l } else { *m };
            *b |= l.is_nan() | (l == f32::INFINITY);
        }
    }
    for &l in rest {
        max[0] = if l > max[0] { l } else { max[0] };
        bad[0] |= l.is_nan() | (l == f32::INFINITY);
    }
    if bad.iter().any(|&b| b) {
        if let Some(i) = logits.iter().position(|l| l.is_nan()) {
            return Err(SamplingError::NanLogits(i));
        }
        if let Some(i) = logits.iter().position(|&l| l == f32::INFINITY) {
            return Err(SamplingError::InfiniteLogit(i));
        }
    }
    Ok(max.into_iter().fold(f32::NEG_INFINITY, f32::max))
}

/// Lanes of the chunked scans: eight f32 fill one AVX register, so the compiler keeps eight
/// independent maxima in flight.
const SCAN_LANES: usize = 8;

/// Max of logits already known to hold no NaN.
fn max_of(logits: &[f32]) -> f32 {
    let mut max = [f32::NEG_INFINITY; SCAN_LANES];
    let chunks = logits.chunks_exact(SCAN_LANES);
    let rest = chunks.remainder();
    for chunk in chunks.filter_map(|c| <&[f32; SCAN_LANES]>::try_from(c).ok()) {
        for (m, &l) in max.iter_mut().zip(chunk) {
            *m = if l > *m { l } else { *m };
        }
    }
    rest.iter()
        .chain(max.iter())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Entropy of softmax(`logits`) given its maximum and `z = Σ exp(l - max)`:
/// `H = ln z − Σ exp(l − max)·(l − max) / z` (masked `-inf` logits add nothing).
fn entropy(logits: &[f32], max: f32, z: f64) -> f32 {
    let weighted = block_sum(logits, |l| {
        let d = l - max;
        if d == f32::NEG_INFINITY {
            0.0
        } else {
            d.exp() * d
        }
    });
    (z.ln() - weighted / z).max(0.0) as f32
}

/// Values per f32 partial sum before it is flushed to f64: 1024 terms of at most 1 keep the f32
/// sum's rounding error near 1e-4 relative at worst, far below sampling noise, while the inner
/// loop stays vectorised.
const SUM_BLOCK: usize = 1024;

/// `Σ exp((l - max) / T)`, in vectorised f32 blocks accumulated in f64.
fn sum_weights(logits: &[f32], scale: Scale) -> f64 {
    block_sum(logits, |l| scale.weight(l))
}

/// Sum of non-negative f32 values, in vectorised f32 blocks accumulated in f64.
/// Sets the logits of tokens `mask` does not allow to -inf (bit `i % 32` of word `i / 32`;
/// tokens past the mask's end are not allowed).
fn apply_mask(logits: &mut [f32], mask: &[u32]) {
    for (chunk, i) in logits.chunks_mut(32).zip(0..) {
        let word = mask.get(i).copied().unwrap_or(0);
        if word == u32::MAX {
            continue;
        }
        for (j, l) in chunk.iter_mut().enumerate() {
            if word >> j & 1 == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

fn sum_f64(values: &[f32]) -> f64 {
    block_sum(values, |v| v)
}

#[inline]
fn block_sum(values: &[f32], f: impl Fn(f32) -> f32 + Copy) -> f64 {
    let mut total = 0.0f64;
    for block in values.chunks(SUM_BLOCK) {
        let mut lanes = [0.0f32; SCAN_LANES];
        let chunks = block.chunks_exact(SCAN_LANES);
        let rest = chunks.remainder();
        for chunk in chunks.filter_map(|c| <&[f32; SCAN_LANES]>::try_from(c).ok()) {
            for (acc, &v) in lanes.iter_mut().zip(chunk) {
                *acc += f(v);
            }
        }
        total += lanes.iter().map(|&w| f64::from(w)).sum::<f64>();
        total += rest.iter().map(|&v| f64::from(f(v))).sum::<f64>();
    }
    total
}

/// Index of the first logit equal to `max` (so ties go to the lowest id).
fn argmax(logits: &[f32], max: f32) -> u32 {
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    fn ln(ps: &[f64]) -> Vec<f32> {
        ps.iter().map(|p| p.ln() as f32).collect()
    }

    fn ids(c: &[(u32, f64)]) -> Vec<u32> {
        c.iter().map(|&(id, _)| id).collect()
    }

    #[test]
    fn fast_exp_matches_libm() {
        let mut x = 0.0f32;
        while x > -100.0 {
            let want = x.exp();
            let got = exp_nonpositive(x);
            if want < 1e-37 {
                assert!(got < 1e-37, "e^{x}: {got} vs {want}");
            } else {
                assert!(((got - want) / want).abs() < 3e-7, "e^{x}: {got} vs {want}");
            }
            x -= 0.001_37;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(f32::NAN), 0.0);
    }

    #[test]
    fn validation_names_the_field() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (params(|p| p.temperature = -0.1), "temperature"),
            (params(|p| p.temperature = f32::NAN), "temperature"),
            (params(|p| p.temperature = 2.5), "temperature"),
            (params(|p| p.top_p = 0.0), "top_p"),
            (params(|p| p.top_p = 1.5), "top_p"),
            (params(|p| p.min_p = -0.5), "min_p"),
            (params(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
            (params(|p| p.frequency_penalty = 2.5), "frequency_penalty"),
            (params(|p| p.presence_penalty = -3.0), "presence_penalty"),
            (params(|p| p.logprobs = Some(21)), "top_logprobs"),
        ];
        for (p, field) in cases {
            let err = Sampler::new(p).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{err}");
        }
        assert!(SamplingParams::default().validate().is_ok());
        assert!(params(|p| p.top_k = Some(0)).validate().is_ok());
    }

    #[test]
    fn greedy_takes_argmax_with_ties_to_lowest_id() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0], &[]).unwrap().id, 1);
        assert_eq!(s.sample(&[2.0, 2.0], &[]).unwrap().id, 0);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, -5.0], &[]).unwrap().id, 1);
    }

    /// Draws `n` samples and checks each token's frequency against `expected` within 5 standard
    /// deviations of a binomial proportion.
    fn check_frequencies(p: SamplingParams, logits: &[f32], expected: &[f64], n: usize) {
        check_draft_frequencies(p, logits, None, expected, n)
    }

    /// [`check_frequencies`] for [`Sampler::sample_draft`] when `draft` is given.
    fn check_draft_frequencies(
        p: SamplingParams,
        logits: &[f32],
        draft: Option<u32>,
        expected: &[f64],
        n: usize,
    ) {
        let mut s = Sampler::new(p).unwrap();
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            let t = match draft {
                Some(d) => s.sample_draft(logits, &[], d),
                None => s.sample(logits, &[]),
            };
            counts[t.unwrap().id as usize] += 1;
        }
        for (i, (&c, &e)) in counts.iter().zip(expected).enumerate() {
            let freq = c as f64 / n as f64;
            let sigma = (e * (1.0 - e) / n as f64).sqrt();
            assert!(
                (freq - e).abs() <= 5.0 * sigma + 1e-9,
                "token {i}: frequency {freq} vs expected {e} (counts {counts:?})"
            );
        }
    }

    #[test]
    fn samples_follow_the_softmax_at_temperature_one() {
        let probs = [0.5, 0.25, 0.15, 0.1];
        check_frequencies(params(|_| {}), &ln(&probs), &probs, 20_000);
    }

    #[test]
    fn temperature_sharpens_the_distribution() {
        // At T = 0.5 probabilities become p² / Σp².
        let probs = [0.5, 0.25, 0.15, 0.1];
        let sq: Vec<f64> = probs.iter().map(|p| p * p).collect();
        let z: f64 = sq.iter().sum();
        let expected: Vec<f64> = sq.iter().map(|q| q / z).collect();
        check_frequencies(
            params(|p| p.temperature = 0.5),
            &ln(&probs),
            &expected,
            20_000,
        );
    }

    #[test]
    fn truncated_samples_follow_the_renormalised_distribution() {
        let probs = [0.5, 0.25, 0.15, 0.1];
        // top-k 2 keeps 0.5 and 0.25 → 2/3, 1/3.
        check_frequencies(
            params(|p| p.top_k = Some(2)),
            &ln(&probs),
            &[2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0],
            20_000,
        );
    }

    #[test]
    fn drafts_do_not_change_the_sampled_distribution() {
        // Whatever the draft (likely, unlikely, truncated away, outside the vocabulary), the
        // accept-or-redraw rule must give exactly the distribution of a plain draw.
        let probs = [0.5, 0.25, 0.15, 0.1];
        for draft in [0, 1, 3, 7] {
            check_draft_frequencies(params(|_| {}), &ln(&probs), Some(draft), &probs, 20_000);
        }
        let sq: Vec<f64> = probs.iter().map(|p| p * p).collect();
        let z: f64 = sq.iter().sum();
        let sharp: Vec<f64> = sq.iter().map(|q| q / z).collect();
        check_draft_frequencies(
            params(|p| p.temperature = 0.5),
            &ln(&probs),
            Some(2),
            &sharp,
            20_000,
        );
        // Truncated: a draft outside the top-k is never returned.
        for draft in [1, 2] {
            check_draft_frequencies(
                params(|p| p.top_k = Some(2)),
                &ln(&probs),
                Some(draft),
                &[2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0],
                20_000,
            );
        }
        // A draft holding all the mass is always kept; greedy ignores the draft.
        let mut s = Sampler::new(params(|p| p.top_k = Some(1))).unwrap();
        assert_eq!(s.sample_draft(&ln(&probs), &[], 0).unwrap().id, 0);
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample_draft(&ln(&probs), &[], 2).unwrap().id, 0);
    }

    #[test]
    fn masked_sampling_only_returns_allowed_tokens_in_proportion() {
        let probs = [0.5, 0.25, 0.15, 0.1];
        // Tokens 1 and 3 allowed: 0.25 / 0.35 and 0.1 / 0.35, drafts or not.
        let mask = [0b1010u32];
        let expected = [0.0, 0.25 / 0.35, 0.0, 0.1 / 0.35];
        for draft in [None, Some(0), Some(1), Some(3)] {
            let mut s = Sampler::new(params(|_| {})).unwrap();
            let mut counts = [0usize; 4];
            let n = 20_000;
            for _ in 0..n {
                let t = s.sample_with(&ln(&probs), &[], draft, Some(&mask)).unwrap();
                counts[t.id as usize] += 1;
            }
            for (i, (&c, &e)) in counts.iter().zip(&expected).enumerate() {
                let f = c as f64 / n as f64;
                let sigma = (e * (1.0 - e) / n as f64).sqrt();
                assert!(
                    (f - e).abs() <= 5.0 * sigma + 1e-9,
                    "draft {draft:?} token {i}: {f} vs {e}"
                );
            }
        }
        // Greedy takes the best allowed token; logprobs describe the unmasked distribution.
        let mut s = Sampler::new(params(|p| {
            p.temperature = 0.0;
            p.logprobs = Some(1);
        }))
        .unwrap();
        let t = s.sample_with(&ln(&probs), &[], None, Some(&mask)).unwrap();
        assert_eq!(t.id, 1);
        assert!((t.logprob.unwrap() - 0.25f32.ln()).abs() < 1e-5);
        assert_eq!(t.top_logprobs[0].id, 0);
        // Nothing allowed is an error, not a panic or a silent pick.
        let mut s = Sampler::new(params(|_| {})).unwrap();
        assert!(matches!(
            s.sample_with(&ln(&probs), &[], None, Some(&[0])),
            Err(SamplingError::NoCandidates)
        ));
    }

    #[test]
    fn logit_bias_moves_the_distribution_but_not_the_logprobs() {
        let probs = [0.5, 0.25, 0.15, 0.1];
        // -100 bans the argmax; greedy takes the next one, its logprob stays ln 0.25.
        let mut s = Sampler::new(params(|p| {
            p.temperature = 0.0;
            p.logprobs = Some(0);
            p.logit_bias = vec![(0, -100.0)];
        }))
        .unwrap();
        let t = s.sample(&ln(&probs), &[]).unwrap();
        assert_eq!(t.id, 1);
        assert!((t.logprob.unwrap() - 0.25f32.ln()).abs() < 1e-5);
        // +ln 2 on token 2 doubles its weight: 0.5, 0.25, 0.3, 0.1 renormalised.
        let z = 1.15;
        check_frequencies(
            params(|p| p.logit_bias = vec![(2, 2f32.ln())]),
            &ln(&probs),
            &[0.5 / z, 0.25 / z, 0.3 / z, 0.1 / z],
            20_000,
        );
        let e = Sampler::new(params(|p| p.logit_bias = vec![(1, 101.0)])).unwrap_err();
        assert!(e.to_string().contains("logit_bias"), "{e}");
        // Ids past the vocabulary change nothing here (the engine refuses them earlier).
        let mut s = Sampler::new(params(|p| {
            p.temperature = 0.0;
            p.logit_bias = vec![(99, 100.0)];
        }))
        .unwrap();
        assert_eq!(s.sample(&ln(&probs), &[]).unwrap().id, 0);
    }

    #[test]
    fn top_k_mask() {
        let mut s = Sampler::new(params(|p| p.top_k = Some(2))).unwrap();
        let c = s.candidate_probs(&[1.0, 5.0, 3.0, 4.0, 2.0]);
        assert_eq!(ids(&c), vec![1, 3]);
        let e = (1.0f64).exp();
        assert!((c[0].1 - e / (e + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn top_p_mask() {
        let probs = [0.5, 0.25, 0.15, 0.1];
        // Keep while the mass before a token is below top_p.
        for (top_p, expected) in [
            (0.3, vec![0]),
            (0.7, vec![0, 1]),
            (0.8, vec![0, 1, 2]),
            (1.0, vec![0, 1, 2, 3]),
        ] {
            let mut s = Sampler::new(params(|p| {
                p.top_p = top_p;
                p.min_p = if top_p == 1.0 { 0.01 } else { 0.0 };
            }))
            .unwrap();
            assert_eq!(
                ids(&s.candidate_probs(&ln(&probs))),
                expected,
                "top_p {top_p}"
            );
        }
        // Probabilities are renormalised over what is kept.
        let mut s = Sampler::new(params(|p| p.top_p = 0.7)).unwrap();
        let c = s.candidate_probs(&ln(&probs));
        assert!((c[0].1 - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn top_p_applies_after_top_k() {
        // top-k 3 renormalises to 0.5/0.9, 0.25/0.9, 0.15/0.9; the mass before the third token is
        // 0.833 ≥ 0.8, so top-p 0.8 keeps two tokens (without top-k it keeps three).
        let probs = [0.5, 0.25, 0.15, 0.1];
        let mut s = Sampler::new(params(|p| {
            p.top_k = Some(3);
            p.top_p = 0.8;
        }))
        .unwrap();
        assert_eq!(ids(&s.candidate_probs(&ln(&probs))), vec![0, 1]);
    }

    #[test]
    fn min_p_mask() {
        let probs = [0.1, 0.5, 0.25, 0.15];
        // threshold 0.35 × 0.5 = 0.175 keeps 0.5 and 0.25.
        let mut s = Sampler::new(params(|p| p.min_p = 0.35)).unwrap();
        let mut got = ids(&s.candidate_probs(&ln(&probs)));
        got.sort_unstable();
        assert_eq!(got, vec![1, 2]);
        // Combined with top-p the order of the head is kept.
        let mut s = Sampler::new(params(|p| {
            p.min_p = 0.35;
            p.top_p = 0.95;
        }))
        .unwrap();
        assert_eq!(ids(&s.candidate_probs(&ln(&probs))), vec![1, 2]);
    }

    #[test]
    fn top_p_grows_its_head_over_a_flat_vocabulary() {
        // 5000 equal logits: top_p 0.9001 keeps ids 0..=4500 (mass before id j is j/5000).
        let logits = vec![0.0f32; 5000];
        let mut s = Sampler::new(params(|p| p.top_p = 0.9001)).unwrap();
        let c = s.candidate_probs(&logits);
        assert_eq!(c.len(), 4501);
        assert_eq!(ids(&c), (0..4501).collect::<Vec<u32>>());
    }

    #[test]
    fn penalties_match_their_definitions() {
        let logits = [2.0f32, -1.0, 0.5, 3.0];
        let generated = [0u32, 0, 1];
        let counts: HashMap<u32, u32> = [(0, 2), (1, 1)].into_iter().collect();

        let mut l = logits;
        penalize(
            &mut l,
            &counts,
            &HashSet::new(),
            &params(|p| p.frequency_penalty = 0.5),
        );
        assert_eq!(l, [1.0, -1.5, 0.5, 3.0]);

        let mut l = logits;
        penalize(
            &mut l,
            &counts,
            &HashSet::new(),
            &params(|p| p.presence_penalty = 0.3),
        );
        assert_eq!(l, [1.7, -1.3, 0.5, 3.0]);

        let mut l = logits;
        let prompt: HashSet<u32> = [3].into_iter().collect();
        penalize(
            &mut l,
            &counts,
            &prompt,
            &params(|p| p.repetition_penalty = 2.0),
        );
        assert_eq!(l, [1.0, -2.0, 0.5, 1.5]);

        // Through the sampler: a strong frequency penalty moves greedy off the repeated token.
        let mut s = Sampler::new(params(|p| {
            p.temperature = 0.0;
            p.frequency_penalty = 2.0;
        }))
        .unwrap();
        assert_eq!(s.sample(&[3.0, 2.5, 0.0], &[]).unwrap().id, 0);
        assert_eq!(s.sample(&[3.0, 2.5, 0.0], &generated[..1]).unwrap().id, 1);
        // The prompt counts for repetition but not for frequency.
        let mut s = Sampler::with_prompt(
            params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 2.0;
            }),
            &[0],
        )
        .unwrap();
        assert_eq!(s.sample(&[3.0, 2.0, 0.0], &[]).unwrap().id, 1);
    }

    #[test]
    fn extreme_temperatures_and_penalties_still_sample() {
        // Found by server/tests/http_fuzz.rs: temperature 1e-45 overflowed 1/T and a
        // repetition penalty of 1e-45 turned a positive logit into +inf; both left no
        // candidate and failed the request mid-stream.
        let logits = [0.5f32, 2.0, -1.0, 1.0];
        for t in [1e-45f32, 1e-39, 1e-30] {
            let mut s = Sampler::new(params(|p| p.temperature = t)).unwrap();
            assert_eq!(s.sample(&logits, &[]).unwrap().id, 1, "temperature {t}");
            let mut s = Sampler::new(params(|p| {
                p.temperature = t;
                p.top_p = 0.9;
            }))
            .unwrap();
            assert_eq!(
                s.sample(&logits, &[]).unwrap().id,
                1,
                "temperature {t}, top_p"
            );
        }
        for rep in [1e-45f32, 1e-30, 1e30, f32::MAX] {
            let mut s = Sampler::with_prompt(params(|p| p.repetition_penalty = rep), &[0, 1, 2, 3])
                .unwrap();
            let mut out = vec![];
            for _ in 0..4 {
                out.push(s.sample(&logits, &out).unwrap().id);
            }
        }
    }

    #[test]
    fn penalty_counts_follow_a_growing_output() {
        let mut s = Sampler::new(params(|p| {
            p.temperature = 0.0;
            p.presence_penalty = 1.0;
        }))
        .unwrap();
        let logits = [1.0f32, 0.9, 0.8];
        let mut out = Vec::new();
        for _ in 0..3 {
            let id = s.sample(&logits, &out).unwrap().id;
            out.push(id);
        }
        assert_eq!(out, vec![0, 1, 2]);
        // A different output list (a new sequence) is recounted, not appended.
        assert_eq!(s.sample(&logits, &[1]).unwrap().id, 0);
    }

    #[test]
    fn the_same_seed_reproduces_the_same_tokens() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| {
                p.seed = Some(seed);
                p.top_p = 0.9;
                p.top_k = Some(50);
            }))
            .unwrap();
            (0..100)
                .map(|_| s.sample(&logits, &[]).unwrap().id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn logprobs_describe_the_raw_distribution() {
        let logits = [0.0f32, 3.0f32.ln(), f32::NEG_INFINITY];
        let mut s = Sampler::new(params(|p| {
            p.temperature = 0.0;
            p.logprobs = Some(2);
            p.presence_penalty = 2.0;
        }))
        .unwrap();
        let out = s.sample(&logits, &[1]).unwrap();
        // The penalty moved the choice to token 0, but logprobs are the model's.
        assert_eq!(out.id, 0);
        assert!((out.logprob.unwrap() - 0.25f32.ln()).abs() < 1e-6);
        assert_eq!(out.top_logprobs.len(), 2);
        assert_eq!(out.top_logprobs[0].id, 1);
        assert!((out.top_logprobs[0].logprob - 0.75f32.ln()).abs() < 1e-6);
        assert_eq!(out.top_logprobs[1].id, 0);
        // Entropy of (1/4, 3/4, 0), the masked token adding nothing.
        let h = -(0.25f64 * 0.25f64.ln() + 0.75 * 0.75f64.ln());
        assert!((f64::from(out.entropy.unwrap()) - h).abs() < 1e-6);
        let mut s = Sampler::new(params(|_| {})).unwrap();
        let out = s.sample(&logits, &[]).unwrap();
        assert!(out.logprob.is_none() && out.top_logprobs.is_empty() && out.entropy.is_none());
    }

    #[test]
    fn entropy_matches_a_direct_sum_on_a_large_vocabulary() {
        let logits: Vec<f32> = (0..50_000)
            .map(|i| ((i * 7919) % 1000) as f32 / 97.0)
            .collect();
        let mut s = Sampler::new(params(|p| {
            p.temperature = 0.0;
            p.logprobs = Some(0);
        }))
        .unwrap();
        let out = s.sample(&logits, &[]).unwrap();
        let m = logits
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, |a, b| a.max(f64::from(b)));
        let z: f64 = logits.iter().map(|&l| (f64::from(l) - m).exp()).sum();
        let h: f64 = logits
            .iter()
            .map(|&l| {
                let p = (f64::from(l) - m).exp() / z;
                -p * p.ln()
            })
            .sum();
        assert!(
            (f64::from(out.entropy.unwrap()) - h).abs() < 1e-4 * h,
            "{:?} vs {h}",
            out.entropy
        );
        // A one-hot distribution has no entropy.
        let mut onehot = vec![f32::NEG_INFINITY; 10];
        onehot[3] = 1.0;
        assert_eq!(s.sample(&onehot, &[]).unwrap().entropy, Some(0.0));
    }

    #[test]
    fn broken_logits_are_errors() {
        let mut s = Sampler::new(params(|_| {})).unwrap();
        assert!(matches!(
            s.sample(&[], &[]),
            Err(SamplingError::EmptyLogits)
        ));
        assert!(matches!(
            s.sample(&[0.0, f32::NAN], &[]),
            Err(SamplingError::NanLogits(1))
        ));
        assert!(matches!(
            s.sample(&[f32::INFINITY], &[]),
            Err(SamplingError::InfiniteLogit(0))
        ));
        assert!(matches!(
            s.sample(&[f32::NEG_INFINITY; 3], &[]),
            Err(SamplingError::NoCandidates)
        ));
        assert!(
            s.sample(&[1.0, 2.0], &[99]).is_ok(),
            "out-of-range history is ignored"
        );
    }

    #[test]
    fn tensor_input() {
        let dev = candle_core::Device::Cpu;
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        let t = Tensor::new(&[[0.5f32, 2.0, 1.0]], &dev).unwrap();
        assert_eq!(s.sample_tensor(&t, &[]).unwrap().id, 1);
        let t = t.to_dtype(DType::BF16).unwrap().squeeze(0).unwrap();
        assert_eq!(s.sample_tensor(&t, &[]).unwrap().id, 1);
        let t = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        assert!(matches!(
            s.sample_tensor(&t, &[]),
            Err(SamplingError::Shape(_))
        ));
    }

    /// Timing over a Hy3-sized vocabulary; run with `--ignored --nocapture` on a quiet machine.
    #[test]
    #[ignore]
    fn timing_120k_vocab() {
        let vocab = 120_832;
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let logits: Vec<f32> = (0..vocab)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 10_000) as f32 / 500.0
            })
            .collect();
        let start = std::time::Instant::now();
        let mut sink = 0.0;
        for _ in 0..200 {
            sink += max_of(std::hint::black_box(&logits));
        }
        println!("reference max pass: {:?} ({sink})", start.elapsed() / 200);
        for (name, p) in [
            ("greedy", SamplingParams::greedy()),
            ("plain", params(|_| {})),
            ("top_k=50", params(|p| p.top_k = Some(50))),
            ("top_p=0.9", params(|p| p.top_p = 0.9)),
            (
                "top_k=50,top_p=0.9",
                params(|p| {
                    p.top_k = Some(50);
                    p.top_p = 0.9;
                }),
            ),
            ("min_p=0.1", params(|p| p.min_p = 0.1)),
            ("logprobs=5", params(|p| p.logprobs = Some(5))),
        ] {
            let mut s = Sampler::new(p).unwrap();
            let n = 200;
            let start = std::time::Instant::now();
            for _ in 0..n {
                s.sample(&logits, &[]).unwrap();
            }
            println!("{name}: {:?} per token", start.elapsed() / n);
        }
        // A chat model's distribution is peaked: a few dozen tokens hold nearly all the mass.
        let peaked: Vec<f32> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                if i & 4095 == 0 {
                    28.0 + (i / 4096) as f32 * 0.1
                } else {
                    l
                }
            })
            .collect();
        let mut s = Sampler::new(params(|p| p.top_p = 0.9)).unwrap();
        let start = std::time::Instant::now();
        for _ in 0..200 {
            s.sample(&peaked, &[]).unwrap();
        }
        println!("top_p=0.9 peaked: {:?} per token", start.elapsed() / 200);
    }
}
