//! Incremental detokenisation and stop strings: turns generated token ids into text deltas that
//! are safe to stream.
//!
//! Two problems, two pieces:
//!
//! * [`IncrementalDecoder`] — a token is not always a whole character: byte-level BPE splits a
//!   multi-byte UTF-8 character over several tokens, and SentencePiece tokenizers decode a word's
//!   leading space differently depending on what precedes it. Following TGI/vLLM, the decoder
//!   keeps a `prefix_offset` and a `read_offset` into the ids: it decodes `ids[prefix..read]` and
//!   `ids[prefix..]` and emits the difference only when the longer text does not end in an
//!   incomplete character (U+FFFD). Then `prefix = read, read = len`. Each step decodes a window of
//!   a few tokens, never the whole output.
//! * [`StopMatcher`] — a stop string can span tokens, so text that could be the start of a stop
//!   string is held back until the next delta shows whether it is one. On a match the output is
//!   cut just before the stop string, which is not emitted (OpenAI semantics; vLLM's
//!   `include_stop_str_in_output` keeps it), and the finish reason is [`FinishReason::Stop`].
//!   With vLLM's `min_tokens`, stop strings are looked for only once that many tokens exist.
//!
//! [`TextStream`] puts the two together with stop token ids (eos) for one sequence.

use crate::tokenizer::{Tokenizer, TokenizerError};

/// Prompt tokens that seed the decoder window ([`IncrementalDecoder::with_prompt`]), so the first
/// generated token decodes with real left context (a SentencePiece word after the prompt keeps its
/// leading space). vLLM uses the same number (`INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET`).
pub const PROMPT_CONTEXT_TOKENS: usize = 5;

/// Errors from streaming text out of token ids.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// A stop string was empty; it would match everywhere.
    #[error("stop strings must not be empty (stop[{index}] is \"\")")]
    EmptyStop {
        /// Its position in the request's `stop` list.
        index: usize,
    },
    /// A token arrived after the stream finished (a bug in the caller's loop).
    #[error("the text stream already finished ({0}); no more tokens can be added")]
    Finished(FinishReason),
    /// Decoding failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// Why a sequence ended, as OpenAI reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// The token limit (`max_tokens` or the context length).
    Length,
}

impl FinishReason {
    /// The wire spelling: `"stop"` or `"length"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What ended a sequence with [`FinishReason::Stop`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopMatch {
    /// A stop token id (eos or a requested stop token).
    Token(u32),
    /// A stop string, as given in the request.
    String(String),
}

/// Decodes a growing list of token ids into complete-character text deltas.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    /// Ids from `prefix_offset` on; earlier ids are dropped as the window moves.
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    /// A decoder with no left context. `skip_special_tokens` drops special tokens from the text
    /// (the OpenAI-compatible default).
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special_tokens,
        }
    }

    /// A decoder whose window starts with the last [`PROMPT_CONTEXT_TOKENS`] prompt tokens, so
    /// the first generated token decodes as it would inside the full text. The prompt itself is
    /// never emitted.
    pub fn with_prompt(prompt_ids: &[u32], skip_special_tokens: bool) -> Self {
        let start = prompt_ids.len().saturating_sub(PROMPT_CONTEXT_TOKENS);
        let ids = prompt_ids[start..].to_vec();
        Self {
            read_offset: ids.len(),
            ids,
            prefix_offset: 0,
            skip_special_tokens,
        }
    }

    /// Adds one token and returns the text that is now complete (often empty while a character is
    /// still split).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, StopError> {
        self.ids.push(id);
        let prefix_text = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let new_text =
            tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if new_text.len() <= prefix_text.len() || new_text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        // Normally `new_text` extends `prefix_text`; when a decoder rewrites the earlier text
        // (cleanup rules), wait for a later token rather than emit a broken delta.
        let Some(delta) = new_text
            .strip_prefix(prefix_text.as_str())
            .map(str::to_owned)
        else {
            return Ok(String::new());
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Keep the window small: everything before `prefix_offset` is done with.
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        Ok(delta)
    }

    /// Returns whatever is still held (an incomplete character decodes to U+FFFD) and empties the
    /// window; call it when the sequence ends.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, StopError> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let prefix_text = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let new_text =
            tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        Ok(match new_text.strip_prefix(prefix_text.as_str()) {
            Some(delta) => delta.to_owned(),
            None => new_text
                .get(prefix_text.len()..)
                .unwrap_or_default()
                .to_owned(),
        })
    }
}

/// Result of feeding text to a [`StopMatcher`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopStep {
    /// Text that is safe to emit now.
    pub text: String,
    /// Index into the stop list of the string that matched; the stream is over.
    pub matched: Option<usize>,
}

/// Finds stop strings in streamed text, holding back any tail that could start one.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Longest stop string in bytes; at most this minus one byte is ever held back.
    max_stop_len: usize,
    pending: String,
    matched: Option<usize>,
    /// Keep the matched stop string in the output (vLLM's `include_stop_str_in_output`).
    include_stop: bool,
    /// Whether matches are looked for yet (text is still held back while not).
    armed: bool,
}

impl StopMatcher {
    /// A matcher for `stops`; an empty string is an error that names its position.
    pub fn new(stops: Vec<String>) -> Result<Self, StopError> {
        if let Some(index) = stops.iter().position(String::is_empty) {
            return Err(StopError::EmptyStop { index });
        }
        let max_stop_len = stops.iter().map(String::len).max().unwrap_or(0);
        Ok(Self {
            stops,
            max_stop_len,
            pending: String::new(),
            matched: None,
            include_stop: false,
            armed: true,
        })
    }

    /// Keeps the matched stop string in the emitted text instead of cutting before it.
    pub fn including_stop(mut self, include: bool) -> Self {
        self.include_stop = include;
        self
    }

    /// Turns matching on or off. While off, text that could start a stop string is still held
    /// back, so a string that completes after matching turns on is found whole.
    pub fn set_armed(&mut self, armed: bool) {
        self.armed = armed;
    }

    /// The stop strings.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// Whether a stop string has matched.
    pub fn is_stopped(&self) -> bool {
        self.matched.is_some()
    }

    /// Feeds a text delta. Returns what can be emitted: everything up to a matched stop string
    /// (earliest start wins; at the same start the longer string), or, without a match,
    /// everything except the longest tail that is a proper prefix of some stop string.
    pub fn push(&mut self, delta: &str) -> StopStep {
        if self.matched.is_some() {
            return StopStep {
                text: String::new(),
                matched: self.matched,
            };
        }
        if self.stops.is_empty() {
            return StopStep {
                text: delta.to_owned(),
                matched: None,
            };
        }
        self.pending.push_str(delta);
        let found = self
            .stops
            .iter()
            .enumerate()
            .filter(|_| self.armed)
            .filter_map(|(i, stop)| self.pending.find(stop.as_str()).map(|pos| (pos, i)))
            .min_by_key(|&(pos, i)| (pos, std::cmp::Reverse(self.stops[i].len())));
        if let Some((pos, index)) = found {
            self.matched = Some(index);
            let mut text = std::mem::take(&mut self.pending);
            let cut = if self.include_stop {
                pos + self.stops[index].len()
            } else {
                pos
            };
            text.truncate(cut);
            return StopStep {
                text,
                matched: Some(index),
            };
        }
        let hold_from = self.hold_back_start();
        let text = self.pending[..hold_from].to_owned();
        self.pending.drain(..hold_from);
        StopStep {
            text,
            matched: None,
        }
    }

    /// Byte index where the held-back tail starts: the longest suffix of `pending` (shorter than
    /// the longest stop string) that some stop string starts with.
    fn hold_back_start(&self) -> usize {
        let earliest = self
            .pending
            .len()
            .saturating_sub(self.max_stop_len.saturating_sub(1));
        self.pending
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= earliest)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len())
    }

    /// Ends the stream without a match: returns the held-back text.
    pub fn finish(&mut self) -> String {
        if self.matched.is_some() {
            self.pending.clear();
        }
        std::mem::take(&mut self.pending)
    }
}

/// Stop conditions for one sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopConfig {
    /// Stop strings (OpenAI `stop`); the output ends before the first one found.
    pub stop: Vec<String>,
    /// Token ids that end the sequence (eos ids plus any requested stop tokens); they are not
    /// decoded into the output.
    pub stop_token_ids: Vec<u32>,
    /// Drop special tokens from the text (default in OpenAI-compatible servers).
    pub skip_special_tokens: bool,
    /// Keep a matched stop string at the end of the output (vLLM's `include_stop_str_in_output`).
    pub include_stop_str_in_output: bool,
    /// Stop strings complete only after this many tokens (vLLM's `min_tokens`; the engine keeps
    /// stop token ids out of the sample until then).
    pub min_tokens: usize,
}

/// One step of a [`TextStream`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamDelta {
    /// New text to send (may be empty while a character or a possible stop string is held).
    pub text: String,
    /// Set when the stream just ended.
    pub finish_reason: Option<FinishReason>,
    /// What stopped it, for [`FinishReason::Stop`].
    pub stop: Option<StopMatch>,
}

/// Token ids in, safe text deltas out, for one sequence: incremental decoding, stop token ids and
/// stop strings.
#[derive(Debug, Clone)]
pub struct TextStream {
    decoder: IncrementalDecoder,
    matcher: StopMatcher,
    stop_token_ids: Vec<u32>,
    finished: Option<FinishReason>,
    /// Tokens pushed so far, and how many must exist before stop strings count.
    pushed: usize,
    min_tokens: usize,
}

impl TextStream {
    /// A stream for generated tokens with no left context.
    pub fn new(config: StopConfig) -> Result<Self, StopError> {
        Self::with_prompt(config, &[])
    }

    /// A stream whose decoder is seeded with the end of the prompt
    /// ([`IncrementalDecoder::with_prompt`]).
    pub fn with_prompt(config: StopConfig, prompt_ids: &[u32]) -> Result<Self, StopError> {
        Ok(Self {
            decoder: IncrementalDecoder::with_prompt(prompt_ids, config.skip_special_tokens),
            matcher: StopMatcher::new(config.stop)?
                .including_stop(config.include_stop_str_in_output),
            stop_token_ids: config.stop_token_ids,
            finished: None,
            pushed: 0,
            min_tokens: config.min_tokens,
        })
    }

    /// Whether the stream has ended.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Adds a generated token. A stop token id ends the stream (its text is not emitted); a stop
    /// string ends it with the text cut before the string.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<StreamDelta, StopError> {
        if let Some(reason) = self.finished {
            return Err(StopError::Finished(reason));
        }
        self.pushed += 1;
        // As vLLM: a stop string counts only when it completes after the first `min_tokens`
        // tokens, so those tokens' text is always in the output.
        self.matcher.set_armed(self.pushed > self.min_tokens);
        if self.stop_token_ids.contains(&id) {
            let mut delta = self.finish(tokenizer, FinishReason::Stop)?;
            if delta.stop.is_none() {
                delta.stop = Some(StopMatch::Token(id));
            }
            return Ok(delta);
        }
        let text = self.decoder.push(tokenizer, id)?;
        Ok(self.through_matcher(&text))
    }

    /// Ends the stream (for example at the token limit): releases held text, still checking it for
    /// stop strings. Returns the final delta; the finish reason is `reason` unless a stop string
    /// matched in the released text. Call it only while [`TextStream::finish_reason`] is `None`;
    /// a stream that already ended answers [`StopError::Finished`].
    pub fn finish(
        &mut self,
        tokenizer: &Tokenizer,
        reason: FinishReason,
    ) -> Result<StreamDelta, StopError> {
        if let Some(reason) = self.finished {
            return Err(StopError::Finished(reason));
        }
        let tail = self.decoder.flush(tokenizer)?;
        let mut delta = self.through_matcher(&tail);
        if delta.finish_reason.is_none() {
            delta.text.push_str(&self.matcher.finish());
            delta.finish_reason = Some(reason);
            self.finished = Some(reason);
        }
        Ok(delta)
    }

    fn through_matcher(&mut self, text: &str) -> StreamDelta {
        let step = self.matcher.push(text);
        match step.matched {
            Some(index) => {
                self.finished = Some(FinishReason::Stop);
                StreamDelta {
                    text: step.text,
                    finish_reason: Some(FinishReason::Stop),
                    stop: Some(StopMatch::String(self.matcher.stops()[index].clone())),
                }
            }
            None => StreamDelta {
                text: step.text,
                ..StreamDelta::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::build_byte_level_bpe;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    const EOS: &str = "<|endoftext|>";

    fn tokenizer() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| Tokenizer::from_tokenizer(build_byte_level_bpe(512, &[EOS]).unwrap()))
    }

    fn ids(text: &str) -> Vec<u32> {
        tokenizer().encode(text, false).unwrap()
    }

    /// Streams `text` token by token; returns the deltas and the final delta.
    fn stream(text: &str, stop: &[&str]) -> (Vec<String>, StreamDelta) {
        let tok = tokenizer();
        let mut s = TextStream::new(StopConfig {
            stop: stop.iter().map(|s| s.to_string()).collect(),
            stop_token_ids: tok.eos_token_ids().to_vec(),
            skip_special_tokens: true,
            ..StopConfig::default()
        })
        .unwrap();
        let mut deltas = Vec::new();
        for id in ids(text) {
            let d = s.push(tok, id).unwrap();
            if d.finish_reason.is_some() {
                return (deltas, d);
            }
            deltas.push(d.text);
        }
        let last = s.finish(tok, FinishReason::Length).unwrap();
        (deltas, last)
    }

    fn joined(deltas: &[String], last: &StreamDelta) -> String {
        deltas.concat() + &last.text
    }

    #[test]
    fn emoji_split_across_tokens_is_emitted_whole() {
        let text = "ok 🦀 crab 👩‍👩‍👧 family";
        assert!(
            ids("🦀").len() > 1,
            "the crab must span tokens for this test"
        );
        let (deltas, last) = stream(text, &[]);
        assert_eq!(joined(&deltas, &last), text);
        assert!(deltas.iter().any(String::is_empty), "some bytes were held");
        for d in &deltas {
            assert!(!d.contains(char::REPLACEMENT_CHARACTER), "{d:?}");
        }
        assert_eq!(last.finish_reason, Some(FinishReason::Length));
    }

    #[test]
    fn stop_string_spanning_tokens_cuts_before_it() {
        let text = "Hello there. STOP and more";
        let stop_ids = ids(" STOP");
        assert!(stop_ids.len() > 1, "STOP must span tokens: {stop_ids:?}");
        let (deltas, last) = stream(text, &["STOP"]);
        assert_eq!(joined(&deltas, &last), "Hello there. ");
        assert_eq!(last.finish_reason, Some(FinishReason::Stop));
        assert_eq!(last.stop, Some(StopMatch::String("STOP".into())));
        // Nothing that could start "STOP" was emitted before the match was certain.
        assert!(!deltas.concat().contains('S'));
    }

    #[test]
    fn stop_at_the_start_emits_nothing() {
        let (deltas, last) = stream("STOP right away", &["STOP"]);
        assert_eq!(joined(&deltas, &last), "");
        assert_eq!(last.finish_reason, Some(FinishReason::Stop));
    }

    #[test]
    fn first_of_several_stop_strings_wins() {
        let (deltas, last) = stream("one\ntwo END three\n\nfour", &["\n\n", "END"]);
        assert_eq!(joined(&deltas, &last), "one\ntwo ");
        assert_eq!(last.stop, Some(StopMatch::String("END".into())));
        let (deltas, last) = stream("a b\n\nc END", &["END", "\n\n"]);
        assert_eq!(joined(&deltas, &last), "a b");
        assert_eq!(last.stop, Some(StopMatch::String("\n\n".into())));
    }

    #[test]
    fn near_miss_is_released() {
        let (deltas, last) = stream("STOmp and ST", &["STOP"]);
        assert_eq!(joined(&deltas, &last), "STOmp and ST");
        assert_eq!(last.finish_reason, Some(FinishReason::Length));
        assert_eq!(
            last.text, "ST",
            "the possible stop prefix was held to the end"
        );
    }

    /// The whole text a stream emits for `text` under `config`, and how it ended.
    fn emitted(text: &str, config: StopConfig) -> (String, StreamDelta) {
        let tok = tokenizer();
        let mut s = TextStream::new(config).unwrap();
        let mut out = String::new();
        for id in ids(text) {
            let d = s.push(tok, id).unwrap();
            out += &d.text;
            if d.finish_reason.is_some() {
                return (out, d);
            }
        }
        let last = s.finish(tok, FinishReason::Length).unwrap();
        out += &last.text;
        (out, last)
    }

    #[test]
    fn include_stop_str_keeps_the_stop_string_and_nothing_after_it() {
        let config = |include| StopConfig {
            stop: vec!["STOP".into(), "XY".into()],
            include_stop_str_in_output: include,
            ..StopConfig::default()
        };
        let text = "one two STOP three";
        let (cut, d) = emitted(text, config(false));
        assert_eq!(cut, "one two ");
        assert_eq!(d.stop, Some(StopMatch::String("STOP".into())));
        let (kept, d) = emitted(text, config(true));
        // Independent reference: the text up to the end of the first (longest) match.
        let end = text.find("STOP").unwrap() + "STOP".len();
        assert_eq!(kept, &text[..end]);
        assert_eq!(d.finish_reason, Some(FinishReason::Stop));
    }

    #[test]
    fn min_tokens_lets_stop_strings_count_only_after_that_many_tokens() {
        let text = "ab ab ab cd ab ef";
        let stream_ids = ids(text);
        let tok = tokenizer();
        for min_tokens in 0..=stream_ids.len() + 1 {
            let (out, d) = emitted(
                text,
                StopConfig {
                    stop: vec!["ab".into()],
                    min_tokens,
                    ..StopConfig::default()
                },
            );
            // Reference: the first "ab" that ends in the text of a token past the first
            // `min_tokens` (decoded prefix lengths give where each token's text ends).
            let ends: Vec<usize> = (1..=stream_ids.len())
                .map(|n| tok.decode(&stream_ids[..n], true).unwrap().len())
                .collect();
            let first_allowed_end = if min_tokens == 0 {
                0
            } else {
                ends.get(min_tokens - 1).copied().unwrap_or(usize::MAX)
            };
            let hit = text
                .match_indices("ab")
                .map(|(i, _)| i)
                .find(|&i| i + 2 > first_allowed_end);
            match hit {
                Some(i) => {
                    assert_eq!(out, &text[..i], "min_tokens {min_tokens}");
                    assert_eq!(d.stop, Some(StopMatch::String("ab".into())));
                }
                None => {
                    assert_eq!(out, text, "min_tokens {min_tokens}");
                    assert_eq!(d.finish_reason, Some(FinishReason::Length));
                }
            }
        }
    }

    #[test]
    fn eos_token_ends_the_stream_without_its_text() {
        let tok = tokenizer();
        let eos = tok.token_to_id(EOS).unwrap();
        let mut s = TextStream::new(StopConfig {
            stop_token_ids: vec![eos],
            ..StopConfig::default()
        })
        .unwrap();
        let mut out = String::new();
        for id in ids("done") {
            out += &s.push(tok, id).unwrap().text;
        }
        let last = s.push(tok, eos).unwrap();
        out += &last.text;
        assert_eq!(out, "done");
        assert_eq!(last.finish_reason, Some(FinishReason::Stop));
        assert_eq!(last.stop, Some(StopMatch::Token(eos)));
        assert!(matches!(s.push(tok, 5), Err(StopError::Finished(_))));
    }

    #[test]
    fn special_tokens_are_skipped_or_kept() {
        let tok = tokenizer();
        for (skip, expected) in [(true, "ab"), (false, "a<|endoftext|>b")] {
            let mut d = IncrementalDecoder::new(skip);
            let mut out = String::new();
            for id in ids("a<|endoftext|>b") {
                out += &d.push(tok, id).unwrap();
            }
            out += &d.flush(tok).unwrap();
            assert_eq!(out, expected);
        }
    }

    #[test]
    fn prompt_context_is_not_emitted() {
        let tok = tokenizer();
        let prompt = ids("The prompt says hello");
        let mut d = IncrementalDecoder::with_prompt(&prompt, true);
        let mut out = String::new();
        for id in ids(" and the answer 🦀") {
            out += &d.push(tok, id).unwrap();
        }
        assert_eq!(out, " and the answer 🦀");
    }

    #[test]
    fn incomplete_character_at_the_end_is_flushed_lossily() {
        let tok = tokenizer();
        let crab = ids("🦀");
        let mut d = IncrementalDecoder::new(true);
        assert_eq!(d.push(tok, crab[0]).unwrap(), "");
        assert_eq!(d.flush(tok).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn empty_stop_string_is_rejected() {
        let err = StopMatcher::new(vec!["a".into(), String::new()]).unwrap_err();
        assert!(err.to_string().contains("stop[1]"), "{err}");
    }

    #[test]
    fn matcher_holds_multibyte_prefixes() {
        let mut m = StopMatcher::new(vec!["é!".into()]).unwrap();
        assert_eq!(m.push("caf").text, "caf");
        assert_eq!(m.push("é").text, "");
        let step = m.push("!x");
        assert_eq!(step.text, "");
        assert_eq!(step.matched, Some(0));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Streaming then joining equals decoding all at once, and a stop string cuts exactly
        /// where `str::find` says it first occurs.
        #[test]
        fn streaming_matches_whole_text(
            text in "[a-c é🦀\\n]{0,40}",
            stop in "[a-c é🦀]{1,3}",
        ) {
            let (deltas, last) = stream(&text, &[]);
            prop_assert_eq!(joined(&deltas, &last), text.clone());
            let (deltas, last) = stream(&text, &[stop.as_str()]);
            let expected = match text.find(stop.as_str()) {
                Some(pos) => &text[..pos],
                None => text.as_str(),
            };
            prop_assert_eq!(joined(&deltas, &last), expected);
        }
    }
}
