//! Speculative decoding: cheap guesses of a sequence's next tokens ("drafts") that the model
//! checks all at once in its next step.
//!
//! A decoding sequence normally computes one token per step, and at batch 1 that step costs
//! the bytes of the weights whatever the number of tokens in it. With a draft of `k` tokens the
//! step computes `1 + k` positions; the engine samples each position in order and keeps the
//! drafted tokens while they agree with what it samples, so one step yields between 1 and
//! `k + 1` tokens. Greedy output is the same as without drafts (up to floating-point ties);
//! sampled output has the same distribution (the sampler's rejection rule,
//! [`crate::sampling::Sampler::sample_draft`]).
//!
//! Two proposers:
//! - prompt lookup (vLLM's `ngram` method, transformers' prompt-lookup decoding): find the
//!   sequence's last few tokens earlier in the sequence and propose what followed them there.
//!   It needs no second model and pays off where outputs repeat their input (editing,
//!   extraction, summaries quoting the source, code);
//! - the model's own MTP layer (vLLM's `mtp` method; Hy3 ships one): after each step the
//!   engine runs the MTP layer over the step's positions, and its prediction of the token
//!   after next is the next step's draft, continued for `num_speculative_tokens` > 1 by
//!   feeding the layer its own output and draft (see `Loop::mtp_step` in the engine).

use serde::Deserialize;

/// Largest draft accepted in a step. vLLM's ngram default is 5 and the gain flattens beyond a
/// few tokens because acceptance decays geometrically; 16 bounds the extra work a step can be
/// asked to do.
pub const MAX_SPECULATIVE_TOKENS: usize = 16;

/// Longest n-gram a lookup may match (a bound on the per-step search cost).
pub const MAX_PROMPT_LOOKUP: usize = 16;

/// How drafts are proposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SpeculativeMethod {
    /// Prompt lookup: continue the latest earlier occurrence of the sequence's suffix.
    Ngram,
    /// The checkpoint's MTP layer (`num_nextn_predict_layers`): its prediction of the token
    /// after next, and with `num_speculative_tokens` > 1 further ones from the same layer fed
    /// its own output (as vLLM chains one MTP layer).
    Mtp,
}

/// `--speculative-config`: the JSON object vLLM takes, with the fields that apply here.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeConfig {
    /// The proposer.
    pub method: SpeculativeMethod,
    /// Most drafted tokens per sequence and step.
    pub num_speculative_tokens: usize,
    /// Shortest suffix that counts as a match (vLLM's default 1 would draft after any repeated
    /// token; 2 keeps drafts to real repeats).
    #[serde(default = "default_lookup_min")]
    pub prompt_lookup_min: usize,
    /// Longest suffix tried first (longer matches predict better).
    #[serde(default = "default_lookup_max")]
    pub prompt_lookup_max: usize,
    /// Draft nothing while at least this many sequences are running: a large batch already
    /// keeps the hardware busy, and rejected drafts then cost real compute (vLLM's field).
    #[serde(default)]
    pub disable_by_batch_size: Option<usize>,
}

fn default_lookup_min() -> usize {
    2
}

fn default_lookup_max() -> usize {
    4
}

/// A bad `--speculative-config`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--speculative-config: {0}")]
pub struct SpeculativeConfigError(String);

impl SpeculativeConfig {
    /// Parses and checks the JSON form (`{"method": "ngram", "num_speculative_tokens": 4}`).
    pub fn parse_json(s: &str) -> Result<Self, SpeculativeConfigError> {
        let c: Self = serde_json::from_str(s).map_err(|e| SpeculativeConfigError(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks the numbers.
    pub fn validate(&self) -> Result<(), SpeculativeConfigError> {
        let bad = |m: String| Err(SpeculativeConfigError(m));
        if !(1..=MAX_SPECULATIVE_TOKENS).contains(&self.num_speculative_tokens) {
            return bad(format!(
                "num_speculative_tokens must be in 1..={MAX_SPECULATIVE_TOKENS}, got {}",
                self.num_speculative_tokens
            ));
        }
        if self.prompt_lookup_min == 0 || self.prompt_lookup_min > self.prompt_lookup_max {
            return bad(format!(
                "prompt_lookup_min ({}) must be at least 1 and at most prompt_lookup_max ({})",
                self.prompt_lookup_min, self.prompt_lookup_max
            ));
        }
        if self.disable_by_batch_size == Some(0) {
            return bad(
                "disable_by_batch_size must be at least 1 (leave it out to always draft)".into(),
            );
        }
        if self.prompt_lookup_max > MAX_PROMPT_LOOKUP {
            return bad(format!(
                "prompt_lookup_max must be at most {MAX_PROMPT_LOOKUP}, got {}",
                self.prompt_lookup_max
            ));
        }
        Ok(())
    }

    /// Whether drafts come from the model's MTP layer.
    pub fn uses_mtp(&self) -> bool {
        self.method == SpeculativeMethod::Mtp
    }

    /// Whether to draft in a step that starts with `running` sequences.
    pub fn drafts_at(&self, running: usize) -> bool {
        self.disable_by_batch_size.is_none_or(|n| running < n)
    }

    /// Up to `max` draft tokens to follow `tokens` (empty when nothing matches).
    pub fn propose(&self, tokens: &[u32], max: usize) -> Vec<u32> {
        let k = self.num_speculative_tokens.min(max);
        if k == 0 {
            return Vec::new();
        }
        match self.method {
            SpeculativeMethod::Ngram => {
                prompt_lookup(tokens, self.prompt_lookup_min, self.prompt_lookup_max, k)
            }
            // The engine holds MTP drafts per sequence; there is nothing to look up here.
            SpeculativeMethod::Mtp => Vec::new(),
        }
    }
}

/// The tokens that followed the latest earlier occurrence of `tokens`' longest suffix of
/// `min..=max` tokens, at most `k` of them. The occurrence starts before the suffix does, so
/// at least one token follows it.
pub fn prompt_lookup(tokens: &[u32], min: usize, max: usize, k: usize) -> Vec<u32> {
    let len = tokens.len();
    for n in (min.max(1)..=max).rev() {
        if n >= len {
            continue;
        }
        let suffix = &tokens[len - n..];
        // Candidate starts, latest first; the match must leave at least one token after it
        // inside `tokens[..len]` and must not be the suffix itself.
        for start in (0..len - n).rev() {
            if &tokens[start..start + n] == suffix {
                let from = start + n;
                let to = (from + k).min(len);
                return tokens[from..to].to_vec();
            }
        }
    }
    Vec::new()
}

/// Draft tokens per step taken from a request's prediction when the server has no
/// `--speculative-config`: a prediction is usually right for long runs, so drafts are longer
/// than prompt lookup's.
pub const PREDICTION_DRAFT_TOKENS: usize = 8;

/// Longest generated suffix looked for in a prediction.
const PREDICTION_MATCH: usize = 8;

/// A request's predicted output (OpenAI's Predicted Outputs: `prediction: {"type": "content"}`),
/// used as the draft source for that request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prediction {
    tokens: Vec<u32>,
}

impl Prediction {
    /// The predicted output's token ids.
    pub fn new(tokens: Vec<u32>) -> Self {
        Self { tokens }
    }

    /// Up to `k` tokens to follow `generated`: the prediction's start before anything was
    /// generated; else what follows the occurrence of `generated`'s longest suffix (up to 8
    /// tokens) that ends closest to where `generated` would end if it followed the prediction
    /// token for token (edits shift it; repeated phrases have several occurrences).
    pub fn propose(&self, generated: &[u32], k: usize) -> Vec<u32> {
        let p = &self.tokens;
        if generated.is_empty() {
            return p[..k.min(p.len())].to_vec();
        }
        let aligned = generated.len();
        for n in (1..=PREDICTION_MATCH.min(generated.len())).rev() {
            let suffix = &generated[generated.len() - n..];
            let best = p
                .windows(n)
                .enumerate()
                .filter(|(_, w)| *w == suffix)
                .map(|(i, _)| i + n)
                .filter(|&end| end < p.len())
                .min_by_key(|&end| end.abs_diff(aligned));
            if let Some(end) = best {
                return p[end..(end + k).min(p.len())].to_vec();
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_continues_the_latest_longest_match() {
        // "a b c d | a b x | a b" → the longest suffix that occurs earlier is "a b" (n = 2);
        // the latest earlier occurrence is at 4, followed by "x a b".
        let t = [1, 2, 3, 4, 1, 2, 9, 1, 2];
        assert_eq!(prompt_lookup(&t, 2, 4, 3), vec![9, 1, 2]);
        // With n = 3 tried first: "9 1 2" occurs nowhere earlier, "1 2" does.
        assert_eq!(prompt_lookup(&t, 1, 3, 1), vec![9]);
        // A longer match wins over a later shorter one: suffix "3 1 2" matches at 2.
        let t = [5, 3, 1, 2, 7, 8, 1, 2, 6, 3, 1, 2];
        assert_eq!(prompt_lookup(&t, 2, 3, 2), vec![7, 8]);
        assert_eq!(prompt_lookup(&t, 2, 2, 2), vec![6, 3]);
    }

    #[test]
    fn lookup_stops_at_the_end_and_needs_a_real_match() {
        let t = [1, 2, 1, 2];
        // Match at 0 ("1 2"), followed by "1 2": the proposal may run into the suffix itself.
        assert_eq!(prompt_lookup(&t, 2, 2, 5), vec![1, 2]);
        assert!(prompt_lookup(&[1, 2, 3, 4], 1, 3, 4).is_empty());
        assert!(prompt_lookup(&[7], 1, 3, 4).is_empty());
        assert!(prompt_lookup(&[], 1, 3, 4).is_empty());
        // Repeated single token: suffix "7 7" first occurs at 1 (latest before the suffix).
        assert_eq!(prompt_lookup(&[7, 7, 7, 7], 2, 2, 3), vec![7]);
    }

    #[test]
    fn predictions_follow_the_generated_text() {
        let p = Prediction::new(vec![1, 2, 3, 4, 1, 2, 5, 6]);
        assert_eq!(p.propose(&[], 3), vec![1, 2, 3]);
        // On track: continue from where the output stands.
        assert_eq!(p.propose(&[1, 2, 3], 2), vec![4, 1]);
        // "1 2" occurs twice; the one ending nearest position 6 wins.
        assert_eq!(p.propose(&[1, 2, 3, 4, 1, 2], 5), vec![5, 6]);
        assert_eq!(p.propose(&[9, 1, 2], 1), vec![3]);
        // An edit: the output diverged, then rejoins at "5".
        assert_eq!(p.propose(&[1, 2, 7, 7, 7, 5], 4), vec![6]);
        assert!(p.propose(&[9, 9], 4).is_empty());
        // The end of the prediction: nothing to propose.
        assert!(p.propose(&[5, 6], 4).is_empty());
    }

    #[test]
    fn config_parses_vllm_json_and_names_bad_fields() {
        let c = SpeculativeConfig::parse_json(r#"{"method":"ngram","num_speculative_tokens":4}"#)
            .unwrap();
        assert_eq!(c.method, SpeculativeMethod::Ngram);
        assert_eq!((c.prompt_lookup_min, c.prompt_lookup_max), (2, 4));
        let e = SpeculativeConfig::parse_json(r#"{"method":"eagle","num_speculative_tokens":4}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("eagle") && e.contains("ngram"), "{e}");
        let e = SpeculativeConfig::parse_json(r#"{"method":"ngram","num_speculative_tokens":0}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_speculative_tokens"), "{e}");
        let e = SpeculativeConfig::parse_json(
            r#"{"method":"ngram","num_speculative_tokens":2,"prompt_lookup_min":5}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("prompt_lookup_min"), "{e}");
        let e = SpeculativeConfig::parse_json(
            r#"{"method":"ngram","num_speculative_tokens":2,"draft_model":"x"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("draft_model"), "{e}");
        let c = SpeculativeConfig::parse_json(
            r#"{"method":"ngram","num_speculative_tokens":3,"prompt_lookup_min":1,"prompt_lookup_max":2}"#,
        )
        .unwrap();
        assert_eq!(c.propose(&[4, 5, 6, 4, 5], 10), vec![6, 4, 5]);
        assert!(c.drafts_at(1000));
        let c2 = SpeculativeConfig::parse_json(
            r#"{"method":"ngram","num_speculative_tokens":3,"disable_by_batch_size":4}"#,
        )
        .unwrap();
        assert!(c2.drafts_at(3) && !c2.drafts_at(4));
        let e = SpeculativeConfig::parse_json(
            r#"{"method":"ngram","num_speculative_tokens":3,"disable_by_batch_size":0}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("disable_by_batch_size"), "{e}");
        assert_eq!(c.propose(&[4, 5, 6, 4, 5], 1), vec![6]);
        assert!(c.propose(&[4, 5, 6, 4, 5], 0).is_empty());
    }
}
