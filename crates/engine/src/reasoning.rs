//! Reasoning ("thinking") text apart from the answer: Hy3 and other reasoning models write
//! their thoughts between `<think>` and `</think>` before the answer. Hy3's chat template opens
//! the block itself at the end of the prompt (`<think>\n`; `reasoning_effort: no_think` closes
//! it there, empty), so the output starts inside the thoughts; other models write `<think>`
//! themselves. What vLLM's reasoning parsers return as `reasoning_content`, and Anthropic as
//! `thinking` blocks.

/// Opens a reasoning block.
pub const THINK_START: &str = "<think>";
/// Closes it.
pub const THINK_END: &str = "</think>";

/// Whether a rendered prompt leaves the model inside an open reasoning block.
pub fn prompt_opens_reasoning(prompt: &str) -> bool {
    match prompt.rfind(THINK_START) {
        Some(open) => prompt[open..].find(THINK_END).is_none(),
        None => false,
    }
}

/// Splits a finished output into (reasoning, answer). `opened`: the prompt left the model
/// inside a reasoning block. Without a closing tag the whole output is reasoning (the model
/// ran out of tokens while thinking).
pub fn split(text: &str, opened: bool) -> (Option<String>, String) {
    let mut s = ReasoningStream::new(opened);
    let mut parts = s.push(text);
    parts.extend(s.finish());
    let (mut reasoning, mut answer) = (None::<String>, String::new());
    for p in parts {
        match p {
            Part::Reasoning(t) => reasoning.get_or_insert_with(String::new).push_str(&t),
            Part::Answer(t) => answer.push_str(&t),
        }
    }
    (reasoning, answer)
}

/// Caps a request's reasoning: after `max` generated tokens still inside the block, the
/// closing tag is forced one token at a time (Anthropic's `thinking.budget_tokens`).
#[derive(Debug, Clone)]
pub struct ReasoningBudget {
    max: usize,
    used: usize,
    /// Recent output text, to notice the closing tag.
    tail: String,
    /// The block is closed: nothing more to count or force.
    done: bool,
    /// The budget ran out and the closing tag's tokens were queued.
    started: bool,
    /// The closing tag's tokens still to force.
    forcing: std::collections::VecDeque<u32>,
}

impl ReasoningBudget {
    /// A budget of `max` reasoning tokens for output that starts inside the block.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            used: 0,
            tail: String::new(),
            done: false,
            started: false,
            forcing: Default::default(),
        }
    }

    /// The token the budget forces next, if any; `close` tokenises the closing text when the
    /// budget has just run out.
    pub fn forced(&mut self, close: impl FnOnce() -> Vec<u32>) -> Option<u32> {
        if self.done {
            return None;
        }
        if self.forcing.is_empty() {
            if self.started {
                self.done = true;
                return None;
            }
            if self.used >= self.max {
                self.started = true;
                self.forcing = close().into();
            }
        }
        self.forcing.front().copied()
    }

    /// Records a generated token and its text.
    pub fn push(&mut self, token: u32, text: &str) {
        if self.done {
            return;
        }
        if self.forcing.front() == Some(&token) {
            self.forcing.pop_front();
        } else if !self.started {
            self.used += 1;
        }
        self.tail.push_str(text);
        if self.tail.contains(THINK_END) {
            self.done = true;
            self.forcing.clear();
            return;
        }
        let keep = self.tail.len().saturating_sub(THINK_END.len());
        let cut = (0..=keep)
            .rev()
            .find(|&i| self.tail.is_char_boundary(i))
            .unwrap_or(0);
        self.tail.drain(..cut);
    }
}

/// A piece of streamed output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Thoughts.
    Reasoning(String),
    /// The answer.
    Answer(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before anything but whitespace: an opening tag may still come.
    Start,
    /// Inside the thoughts.
    Reasoning,
    /// Just after the closing tag: one newline there belongs to the tag.
    AfterEnd,
    /// The answer.
    Answer,
}

/// Splits streamed output as it arrives, holding back only what might be part of a tag.
#[derive(Debug, Clone)]
pub struct ReasoningStream {
    state: State,
    held: String,
}

impl ReasoningStream {
    /// A stream for output that starts inside a reasoning block (`opened`) or before one.
    pub fn new(opened: bool) -> Self {
        Self {
            state: if opened {
                State::Reasoning
            } else {
                State::Start
            },
            held: String::new(),
        }
    }

    /// The parts `delta` completes.
    pub fn push(&mut self, delta: &str) -> Vec<Part> {
        self.held.push_str(delta);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Start => {
                    let t = self.held.trim_start();
                    if let Some(rest) = t.strip_prefix(THINK_START) {
                        self.held = rest.to_string();
                        self.state = State::Reasoning;
                    } else if t.is_empty() || THINK_START.starts_with(t) {
                        return out; // may still become the tag
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::Reasoning => match self.held.find(THINK_END) {
                    Some(i) => {
                        // The newline before the tag belongs to the tag (templates write
                        // "REASONING\n</think>\n" back).
                        let body = &self.held[..i];
                        let body = body.strip_suffix('\n').unwrap_or(body);
                        if !body.is_empty() {
                            out.push(Part::Reasoning(body.to_string()));
                        }
                        self.held = self.held[i + THINK_END.len()..].to_string();
                        self.state = State::AfterEnd;
                    }
                    None => {
                        let mut keep = partial_suffix(&self.held, THINK_END);
                        if self.held[..self.held.len() - keep].ends_with('\n') {
                            keep += 1;
                        }
                        let cut = self.held.len() - keep;
                        if cut > 0 {
                            out.push(Part::Reasoning(self.held[..cut].to_string()));
                            self.held.drain(..cut);
                        }
                        return out;
                    }
                },
                State::AfterEnd => {
                    if self.held.is_empty() {
                        return out;
                    }
                    if let Some(rest) = self.held.strip_prefix('\n') {
                        self.held = rest.to_string();
                    }
                    self.state = State::Answer;
                }
                State::Answer => {
                    if !self.held.is_empty() {
                        out.push(Part::Answer(std::mem::take(&mut self.held)));
                    }
                    return out;
                }
            }
        }
    }

    /// What is still held at the end of the output.
    pub fn finish(mut self) -> Vec<Part> {
        let held = std::mem::take(&mut self.held);
        if held.is_empty() {
            return vec![];
        }
        match self.state {
            State::Reasoning => vec![Part::Reasoning(held)],
            _ => vec![Part::Answer(held)],
        }
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag`.
fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| {
            s.len() >= n && s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_force_the_closing_tag_then_stop() {
        let mut b = ReasoningBudget::new(2);
        let close = || vec![90, 91];
        assert_eq!(b.forced(close), None);
        b.push(1, "a");
        assert_eq!(b.forced(close), None);
        b.push(2, "b");
        assert_eq!(b.forced(close), Some(90));
        b.push(90, "\n</thi");
        assert_eq!(b.forced(close), Some(91));
        b.push(91, "nk>\n");
        assert_eq!(b.forced(close), None, "closed: nothing more forced");
        // A model that closes the block itself is never forced.
        let mut b = ReasoningBudget::new(3);
        b.push(5, "ok</think>");
        b.push(6, "x");
        b.push(7, "y");
        b.push(8, "z");
        assert_eq!(b.forced(close), None);
    }

    #[test]
    fn prompts_that_open_a_block() {
        assert!(prompt_opens_reasoning("<|User|>hi<|Assistant|><think>\n"));
        assert!(!prompt_opens_reasoning(
            "<|Assistant|><think>\n\n</think>\n"
        ));
        assert!(!prompt_opens_reasoning("plain"));
        assert!(prompt_opens_reasoning("<think>a</think> x <think>"));
    }

    #[test]
    fn finished_outputs_split() {
        assert_eq!(
            split("I should add.\n</think>\n4", true),
            (Some("I should add.".into()), "4".into())
        );
        assert_eq!(
            split("  <think>hm</think>ok", false),
            (Some("hm".into()), "ok".into())
        );
        assert_eq!(split("no thoughts", false), (None, "no thoughts".into()));
        assert_eq!(
            split("ran out", true),
            (Some("ran out".into()), String::new())
        );
        assert_eq!(split("</think>\n\nanswer", true), (None, "\nanswer".into()));
    }

    #[test]
    fn streams_hold_back_only_possible_tags() {
        let mut s = ReasoningStream::new(true);
        assert_eq!(s.push("think"), vec![Part::Reasoning("think".into())]);
        assert_eq!(s.push("ing\n"), vec![Part::Reasoning("ing".into())]);
        assert_eq!(s.push("more\n</th"), vec![Part::Reasoning("\nmore".into())]);
        assert_eq!(s.push("ink>"), vec![]);
        assert_eq!(s.push("\nAns"), vec![Part::Answer("Ans".into())]);
        assert_eq!(s.push("wer"), vec![Part::Answer("wer".into())]);
        assert!(s.finish().is_empty());
        // Not opened: "<thi" could be the tag, "<thx" cannot.
        let mut s = ReasoningStream::new(false);
        assert_eq!(s.push("<thi"), vec![]);
        assert_eq!(s.push("x"), vec![Part::Answer("<thix".into())]);
        let mut s = ReasoningStream::new(false);
        assert_eq!(s.push("\n<think>"), vec![]);
        assert_eq!(
            s.push("a</think>b"),
            vec![Part::Reasoning("a".into()), Part::Answer("b".into())]
        );
        // A partial tag at the very end is reasoning after all.
        let mut s = ReasoningStream::new(true);
        assert_eq!(s.push("x</thi"), vec![Part::Reasoning("x".into())]);
        assert_eq!(s.finish(), vec![Part::Reasoning("</thi".into())]);
    }
}
