//! Structured outputs: generation constrained to a JSON schema, any JSON object, a regular
//! expression, one of a fixed list of strings, or a Lark grammar (OpenAI's `response_format`,
//! vLLM's `structured_outputs`, Anthropic's `output_format`).
//!
//! The grammar engine is llguidance (the one mistral.rs and vLLM use): a grammar is compiled
//! once per request into a [`Constraint`], which gives before each sampled token the set of
//! vocabulary tokens that keep the output inside the language, and is advanced with the token
//! that was chosen. The sampler drops every other token, so the output is in the language by
//! construction whatever the model would have preferred; the model only chooses among the
//! allowed continuations. End-of-sequence is allowed exactly where the grammar can end.
//!
//! JSON is generated compact (no free whitespace between tokens): grammars that allow any
//! whitespace let small models loop on newlines and spaces until `max_tokens`.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::tokenizer::Tokenizer;

/// Longest list of choices or grammar text accepted, a bound on compile time and memory for
/// what arrives over HTTP.
pub const MAX_GRAMMAR_BYTES: usize = 256 * 1024;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputConstraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid under this JSON Schema.
    JsonSchema(Value),
    /// The whole output matches this regular expression.
    Regex(String),
    /// The output is exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect; `start` is the top rule).
    Grammar(String),
}

impl OutputConstraint {
    /// The constraint for output that starts inside an open reasoning block (Hy3's template
    /// opens `<think>`): free thoughts up to the first `</think>` (and the newline the model
    /// writes after it), then this constraint's answer. A Lark grammar describes the whole
    /// output already and is returned unchanged.
    pub fn after_reasoning(&self) -> OutputConstraint {
        let answer = match self {
            Self::Grammar(_) => return self.clone(),
            Self::JsonObject => format!("%json {}", json_schema_text(json!({"type": "object"}))),
            Self::JsonSchema(s) => format!("%json {}", json_schema_text(s.clone())),
            Self::Regex(r) => format!("/{}/", llguidance::regex_to_lark(r, "")),
            Self::Choice(list) => list
                .iter()
                .map(|s| Value::from(s.as_str()).to_string())
                .collect::<Vec<_>>()
                .join(" | "),
        };
        Self::Grammar(grammar_after_reasoning(&format!("start: {answer}\n")))
    }
}

/// A Lark grammar (whose top rule is `start`) preceded by free thoughts up to `</think>` and
/// the newline after it: see [`OutputConstraint::after_reasoning`].
pub fn grammar_after_reasoning(lark: &str) -> String {
    let body = lark.trim_start();
    let body = body.strip_prefix("start:").map_or_else(
        || format!("answer: {body}"),
        |rest| format!("answer:{rest}"),
    );
    format!("start: think \"\\n\"? answer\nthink[suffix=\"</think>\"]: /(.|\\n)*/\n{body}")
}

/// A JSON schema as text, compact unless it sets llguidance's own options.
fn json_schema_text(mut schema: Value) -> String {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_flexible": false}));
    }
    schema.to_string()
}

/// Why a constraint could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StructuredError {
    /// The constraint is malformed or uses what the grammar engine does not support.
    #[error("{0}")]
    Invalid(String),
    /// The tokenizer could not be indexed for constrained decoding.
    #[error("structured outputs are unavailable for this tokenizer: {0}")]
    Tokenizer(String),
    /// The grammar engine failed while generating.
    #[error("structured output failed: {0}")]
    Runtime(String),
}

/// Compiles constraints against one vocabulary; built once per engine.
pub struct ConstraintCompiler {
    factory: Arc<ParserFactory>,
    eos: Arc<[u32]>,
}

impl std::fmt::Debug for ConstraintCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintCompiler").finish_non_exhaustive()
    }
}

impl ConstraintCompiler {
    /// Indexes `tok`'s vocabulary (token ids `0..vocab_size`, the model's logit rows; ids the
    /// tokenizer does not have are never allowed). Special tokens are never allowed as text;
    /// the first EOS id is what the grammar allows where it can end.
    pub fn new(tok: &Tokenizer, vocab_size: usize) -> Result<Self, StructuredError> {
        let err = |e: &dyn std::fmt::Display| StructuredError::Tokenizer(e.to_string());
        let text = tok.inner().to_string(false).map_err(|e| err(&e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| err(&e))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| err(&e))?;
        words.resize(vocab_size, Vec::new());
        let eos_ids: Vec<u32> = tok
            .eos_token_ids()
            .iter()
            .copied()
            .filter(|&e| (e as usize) < vocab_size)
            .collect();
        let eos = *eos_ids
            .first()
            .ok_or_else(|| err(&"the tokenizer has no end-of-sequence token in the vocabulary"))?;
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| err(&e))?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            eos: eos_ids.into(),
        })
    }

    /// Compiles `c`; errors say what is wrong with it.
    pub fn compile(&self, c: &OutputConstraint) -> Result<Constraint, StructuredError> {
        let bad = |m: String| Err(StructuredError::Invalid(m));
        let grammar = match c {
            OutputConstraint::JsonObject => json_grammar(json!({"type": "object"})),
            OutputConstraint::JsonSchema(s) => {
                if !(s.is_object() || s.is_boolean()) {
                    return bad(format!("a JSON schema must be an object, got {s}"));
                }
                if s.to_string().len() > MAX_GRAMMAR_BYTES {
                    return bad(format!("the schema is over {MAX_GRAMMAR_BYTES} bytes"));
                }
                json_grammar(s.clone())
            }
            OutputConstraint::Regex(r) => {
                if r.len() > MAX_GRAMMAR_BYTES {
                    return bad(format!("the regex is over {MAX_GRAMMAR_BYTES} bytes"));
                }
                // Checked here for a clear message; llguidance's own error names lark internals.
                if let Err(e) = regex_syntax::Parser::new().parse(r) {
                    return bad(format!("invalid regex: {e}"));
                }
                TopLevelGrammar::from_regex(r)
            }
            OutputConstraint::Choice(list) => {
                if list.is_empty() {
                    return bad("the list of choices is empty".into());
                }
                if list.iter().map(String::len).sum::<usize>() > MAX_GRAMMAR_BYTES {
                    return bad(format!("the choices are over {MAX_GRAMMAR_BYTES} bytes"));
                }
                if list.iter().any(String::is_empty) {
                    return bad("a choice is the empty string".into());
                }
                // Lark string literals take JSON's escapes.
                let alts: Vec<String> = list
                    .iter()
                    .map(|s| Value::from(s.as_str()).to_string())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            OutputConstraint::Grammar(g) => {
                if g.trim().is_empty() {
                    return bad("the grammar is empty".into());
                }
                if g.len() > MAX_GRAMMAR_BYTES {
                    return bad(format!("the grammar is over {MAX_GRAMMAR_BYTES} bytes"));
                }
                TopLevelGrammar::from_lark(g.clone())
            }
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| StructuredError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return bad(e);
        }
        Ok(Constraint {
            matcher,
            eos: self.eos.clone(),
        })
    }
}

/// The JSON grammar for `schema`, compact unless the schema sets llguidance's own options.
fn json_grammar(mut schema: Value) -> TopLevelGrammar {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_flexible": false}));
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// One request's compiled constraint and where generation stands in it.
pub struct Constraint {
    matcher: Matcher,
    /// Every end-of-sequence id: all are allowed where the grammar can end.
    eos: Arc<[u32]>,
}

impl Clone for Constraint {
    /// An independent copy (each of a request's `n` choices advances its own).
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            eos: self.eos.clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// The tokens allowed next, as bit words (bit `i % 32` of word `i / 32` for token `i`).
    pub fn allowed(&mut self) -> Result<Vec<u32>, StructuredError> {
        let m = self.matcher.compute_mask_or_eos().map_err(runtime)?;
        let mut words = m.as_slice().to_vec();
        if mask_allows(&words, self.eos[0]) {
            for &e in &self.eos[1..] {
                if let Some(w) = words.get_mut(e as usize / 32) {
                    *w |= 1 << (e % 32);
                }
            }
        }
        Ok(words)
    }

    /// Tokens the grammar forces next (a JSON key, the rest of a choice), tokenised by `tok`,
    /// for the engine to propose as speculative drafts: the model checks them in one step
    /// instead of one step each ("jump-forward" decoding). The last token is left out, as
    /// the text after the forced part may merge with it. Empty when nothing is forced.
    pub fn forced_tokens(&mut self, tok: &Tokenizer) -> Vec<u32> {
        let bytes = self.matcher.compute_ff_bytes();
        let text = match std::str::from_utf8(&bytes) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        };
        if text.is_empty() {
            return Vec::new();
        }
        let mut ids = tok.encode(text, false).unwrap_or_default();
        ids.pop();
        ids
    }

    /// Whether `token` ends the sequence (an end-of-sequence id).
    pub fn is_eos(&self, token: u32) -> bool {
        self.eos.contains(&token)
    }

    /// Advances past `token`.
    pub fn advance(&mut self, token: u32) -> Result<(), StructuredError> {
        self.matcher.consume_token(token).map_err(runtime)
    }

    /// Whether the output is complete: the grammar allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether the output so far is a complete sentence of the grammar (it may still go on).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

fn runtime(e: impl std::fmt::Display) -> StructuredError {
    StructuredError::Runtime(e.to_string())
}

/// Whether `mask` (as from [`Constraint::allowed`]) allows `token`.
pub fn mask_allows(mask: &[u32], token: u32) -> bool {
    mask.get(token as usize / 32)
        .is_some_and(|w| w >> (token % 32) & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiler() -> (ConstraintCompiler, Tokenizer) {
        let inner = crate::tokenizer::build_byte_level_bpe(600, &["<|endoftext|>"]).unwrap();
        let tok = Tokenizer::from_tokenizer(inner);
        (ConstraintCompiler::new(&tok, 640).unwrap(), tok)
    }

    /// A deterministic walk through the allowed tokens; returns the decoded text.
    fn walk(c: &mut Constraint, tok: &Tokenizer, max: usize) -> String {
        let eos = tok.eos_token_ids()[0];
        let mut ids = vec![];
        for _ in 0..max {
            if c.is_finished() {
                break;
            }
            let mask = c.allowed().unwrap();
            let allowed: Vec<u32> = (0..640u32).filter(|&t| mask_allows(&mask, t)).collect();
            // End where allowed, close an object, a string or a tag where allowed, else the
            // lowest id.
            // End where allowed, close an object where allowed, else the lowest id.
            let close = tok.encode("}", false).unwrap()[0];
            let pick = [eos, close]
                .into_iter()
                .find(|t| allowed.contains(t))
                .unwrap_or(allowed[0]);
            if pick == eos {
                break;
            }
            c.advance(pick).unwrap();
            ids.push(pick);
        }
        tok.decode(&ids, true).unwrap()
    }

    #[test]
    fn every_constraint_kind_only_allows_its_language() {
        let (cc, tok) = compiler();
        let mut c = cc
            .compile(&OutputConstraint::Choice(vec!["yes".into(), "no".into()]))
            .unwrap();
        let s = walk(&mut c, &tok, 20);
        assert!(s == "yes" || s == "no", "{s:?}");
        let mut c = cc
            .compile(&OutputConstraint::Regex("[a-c]{3}-[0-9]{2}".into()))
            .unwrap();
        let s = walk(&mut c, &tok, 20);
        let re = regex::Regex::new("^[a-c]{3}-[0-9]{2}$").unwrap();
        assert!(re.is_match(&s), "{s:?}");
        let mut c = cc.compile(&OutputConstraint::JsonObject).unwrap();
        let s = walk(&mut c, &tok, 50);
        let v: Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        assert!(v.is_object(), "{s}");
        let schema = json!({
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["n"],
            "additionalProperties": false
        });
        let mut c = cc.compile(&OutputConstraint::JsonSchema(schema)).unwrap();
        let s = walk(&mut c, &tok, 50);
        let v: Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        let n = v["n"].as_i64().unwrap();
        assert!(
            (1..=9).contains(&n) && v.as_object().unwrap().len() == 1,
            "{s}"
        );
    }

    /// Whether `c` accepts `text` token by token and then allows the end.
    fn accepts(c: &Constraint, tok: &Tokenizer, text: &str) -> bool {
        let mut c = c.clone();
        for id in tok.encode(text, false).unwrap() {
            if !mask_allows(&c.allowed().unwrap(), id) {
                return false;
            }
            c.advance(id).unwrap();
        }
        c.is_finished() || mask_allows(&c.allowed().unwrap(), tok.eos_token_ids()[0])
    }

    #[test]
    fn forced_tool_call_grammars_accept_exactly_valid_calls() {
        use crate::tool_calls::ToolCallFormat;
        let (cc, tok) = compiler();
        let tools = vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"]}}}),
            json!({"type": "function", "function": {"name": "noop"}}),
        ];
        let cases = [
            (
                ToolCallFormat::Hermes,
                r#"<tool_call>{"name":"get_weather","arguments":{"city":"Paris","days":2}}</tool_call>"#,
                vec![
                    r#"<tool_call>{"name":"noop","arguments":{}}</tool_call>"#,
                    r#"<tool_call>{"name":"get_weather","arguments":{"days":2}}</tool_call>"#,
                    r#"<tool_call>{"name":"get_weather","arguments":{"city":3}}</tool_call>"#,
                    r#"{"name":"get_weather","arguments":{"city":"Paris"}}"#,
                ],
            ),
            (
                ToolCallFormat::Hy3,
                "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
                vec![
                    "<tool_call>noop\n</tool_call>",
                    "<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
                    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>two</arg_value>\n</tool_call>",
                ],
            ),
        ];
        for (f, good, bad) in cases {
            let g = f.forced_call_grammar(&tools, Some("get_weather")).unwrap();
            let c = cc
                .compile(&OutputConstraint::Grammar(g.clone()))
                .unwrap_or_else(|e| panic!("{f:?}: {e}\n{g}"));
            assert!(accepts(&c, &tok, good), "{f:?} refuses {good:?}\n{g}");
            let p = f.parse(good, &tools);
            assert_eq!(p.calls.len(), 1, "{f:?}");
            assert_eq!(p.calls[0].arguments["city"], "Paris");
            assert_eq!(p.calls[0].arguments["days"], 2);
            for b in bad {
                assert!(!accepts(&c, &tok, b), "{f:?} accepts {b:?}");
            }
            // Any tool when none is named: the other tool is accepted too.
            let any = f.forced_call_grammar(&tools, None).unwrap();
            let c = cc.compile(&OutputConstraint::Grammar(any)).unwrap();
            let noop = match f {
                ToolCallFormat::Hermes => {
                    r#"<tool_call>{"name":"noop","arguments":{}}</tool_call>"#
                }
                ToolCallFormat::Hy3 => "<tool_call>noop\n</tool_call>",
            };
            assert!(accepts(&c, &tok, noop), "{f:?} refuses {noop:?}");
            assert!(accepts(&c, &tok, good), "{f:?} refuses {good:?}");
        }
    }

    /// Hy3 calls write string values raw; the schema's length bounds, `enum` and `const` still
    /// hold for them.
    #[test]
    fn hy3_forced_calls_keep_string_schemas() {
        use crate::tool_calls::ToolCallFormat;
        let (cc, tok) = compiler();
        let call = |city: &str, unit: &str| {
            format!(
                "<tool_call>w\n<arg_key>city</arg_key>\n<arg_value>{city}</arg_value>\n\
                 <arg_key>unit</arg_key>\n<arg_value>{unit}</arg_value>\n\
                 <arg_key>v</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"
            )
        };
        let tools = vec![
            json!({"type": "function", "function": {"name": "w", "parameters": {
            "type": "object", "properties": {
                "city": {"type": "string", "minLength": 2, "maxLength": 6},
                "unit": {"type": "string", "enum": ["C", "F"]},
                "v": {"type": "string", "const": "2"}},
            "required": ["city", "unit", "v"]}}}),
        ];
        let g = ToolCallFormat::Hy3
            .forced_call_grammar(&tools, None)
            .unwrap();
        let c = cc
            .compile(&OutputConstraint::Grammar(g.clone()))
            .unwrap_or_else(|e| panic!("{e}\n{g}"));
        for good in [call("Paris", "C"), call("Oslo 1", "F"), call("NY", "C")] {
            assert!(accepts(&c, &tok, &good), "refuses {good:?}\n{g}");
            let p = ToolCallFormat::Hy3.parse(&good, &tools);
            assert_eq!(p.calls.len(), 1, "{good:?}");
        }
        for bad in [call("Barcelona", "C"), call("X", "C"), call("Rome", "K")] {
            assert!(!accepts(&c, &tok, &bad), "accepts {bad:?}\n{g}");
        }
        let wrong_const = call("Rome", "C").replace(">2<", ">3<");
        assert!(!accepts(&c, &tok, &wrong_const));
    }

    #[test]
    fn after_reasoning_constraints_allow_free_thoughts_then_the_answer() {
        let (cc, tok) = compiler();
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}},
                            "required": ["n"], "additionalProperties": false});
        let cases = [
            (OutputConstraint::JsonSchema(schema), "{\"n\":4}", "4"),
            (OutputConstraint::JsonObject, "{}", "[]"),
            (OutputConstraint::Regex("[0-9]+".into()), "42", "x"),
            (
                OutputConstraint::Choice(vec!["yes".into(), "no".into()]),
                "no",
                "maybe",
            ),
        ];
        for (c, good, bad) in cases {
            let g = c.after_reasoning();
            let k = cc.compile(&g).unwrap_or_else(|e| panic!("{g:?}: {e}"));
            for thought in ["", "Let me think: < > { } 2+2 is 4.\nYes.\n"] {
                let ok = format!("{thought}</think>\n{good}");
                assert!(accepts(&k, &tok, &ok), "{c:?} refuses {ok:?}");
                assert!(accepts(&k, &tok, &format!("{thought}</think>{good}")));
                assert!(
                    !accepts(&k, &tok, &format!("{thought}</think>\n{bad}")),
                    "{c:?}"
                );
            }
            // The answer format alone (no closed thoughts) is not the output's language.
            assert!(
                !accepts(&k, &tok, good),
                "{c:?} accepts {good:?} without thoughts"
            );
        }
        let g = OutputConstraint::Grammar("start: \"a\"".into());
        assert_eq!(g.after_reasoning(), g);
        // A forced tool call after thoughts.
        let tools = vec![json!({"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": false}}})];
        let call = crate::tool_calls::ToolCallFormat::Hy3
            .forced_call_grammar(&tools, None)
            .unwrap();
        let k = cc
            .compile(&OutputConstraint::Grammar(grammar_after_reasoning(&call)))
            .unwrap();
        assert!(accepts(
            &k,
            &tok,
            "hmm\n</think>\n<tool_call>f\n</tool_call>"
        ));
        assert!(!accepts(&k, &tok, "<tool_call>f\n</tool_call>"));
    }

    #[test]
    fn eos_is_allowed_only_where_the_grammar_can_end() {
        let (cc, tok) = compiler();
        let eos = tok.eos_token_ids()[0];
        let mut c = cc
            .compile(&OutputConstraint::Choice(vec!["ab".into()]))
            .unwrap();
        assert!(!mask_allows(&c.allowed().unwrap(), eos));
        for id in tok.encode("ab", false).unwrap() {
            c.advance(id).unwrap();
        }
        assert!(c.is_accepting());
        assert!(mask_allows(&c.allowed().unwrap(), eos));
    }

    #[test]
    fn bad_constraints_are_named() {
        let (cc, _) = compiler();
        let msg = |c: OutputConstraint| cc.compile(&c).unwrap_err().to_string();
        assert!(msg(OutputConstraint::Regex("(".into())).contains("regex"));
        assert!(msg(OutputConstraint::Choice(vec![])).contains("empty"));
        assert!(msg(OutputConstraint::JsonSchema(json!([1]))).contains("schema"));
        let e = msg(OutputConstraint::JsonSchema(
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
        ));
        assert!(e.contains("missing"), "{e}");
        let e = msg(OutputConstraint::JsonSchema(json!({"type": "frobnicate"})));
        assert!(e.contains("frobnicate"), "{e}");
        assert!(msg(OutputConstraint::Grammar("start: foo".into())).contains("foo"));
        assert!(msg(OutputConstraint::Grammar("  ".into())).contains("empty"));
    }
}
