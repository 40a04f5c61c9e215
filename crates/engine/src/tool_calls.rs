//! Tool calls in generated text: finding them (OpenAI `tool_calls`, Anthropic `tool_use`), and
//! the grammar that forces one (`tool_choice: "required"` or a named function).
//!
//! The chat template decides how a model writes a call; two formats are known:
//! - **Hermes** (the ChatML templates, Qwen, SmolLM, Hermes): one JSON object per call,
//!   `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`;
//! - **Hy3** (Hunyuan 3): XML-like key/value pairs,
//!   `<tool_call>f\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>\n</tool_call>`, string
//!   values written raw and other values as JSON.
//!
//! Text before the first `<tool_call>` is the answer's content. A call that does not parse
//! (bad JSON, no name) leaves the whole output as content, as vLLM's parsers do: the client
//! sees what the model wrote instead of a call it never made.
//!
//! [`ToolCallFormat::parse`] reads a finished answer; [`ToolCallStream`] reads one while it is
//! generated and tells its calls as [`ToolCallEvent`]s (a call starts once its name is known,
//! its arguments follow piece by piece), which the OpenAI and Anthropic streams translate.

use serde_json::{json, Map, Value};

/// Opens a call in both formats.
pub const CALL_START: &str = "<tool_call>";
/// Closes a call in both formats.
pub const CALL_END: &str = "</tool_call>";

/// How the template's model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
    Hermes,
    /// `<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n</tool_call>`.
    Hy3,
}

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// Function name.
    pub name: String,
    /// Arguments (a JSON object).
    pub arguments: Map<String, Value>,
}

/// Generated text split into content and calls.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedOutput {
    /// Text outside the calls (trimmed); empty when the output is only calls.
    pub content: String,
    /// The calls, in order.
    pub calls: Vec<ToolCall>,
}

const ARG_KEY: &str = "<arg_key>";
const ARG_KEY_END: &str = "</arg_key>";
const ARG_VALUE: &str = "<arg_value>";
const ARG_VALUE_END: &str = "</arg_value>";

/// The next argument of a Hy3 call body (`<arg_key>K</arg_key>\n<arg_value>V</arg_value>`).
enum Hy3Arg<'a> {
    /// No further `<arg_key>`.
    End,
    /// A key without its closing tag or without a following `<arg_value>`.
    Broken,
    /// The value has begun but not ended: its text so far.
    Open { key: &'a str, raw: &'a str },
    /// A whole argument and the text after it.
    Done {
        key: &'a str,
        raw: &'a str,
        next: &'a str,
    },
}

fn hy3_arg(rest: &str) -> Hy3Arg<'_> {
    let Some(k0) = rest.find(ARG_KEY).map(|i| i + ARG_KEY.len()) else {
        return Hy3Arg::End;
    };
    let Some(k1) = rest[k0..].find(ARG_KEY_END).map(|i| k0 + i) else {
        return Hy3Arg::Broken;
    };
    let key = rest[k0..k1].trim();
    let after = &rest[k1 + ARG_KEY_END.len()..];
    let Some(v0) = after.find(ARG_VALUE).map(|i| i + ARG_VALUE.len()) else {
        return Hy3Arg::Broken;
    };
    match after[v0..].find(ARG_VALUE_END) {
        Some(v1) => Hy3Arg::Done {
            key,
            raw: &after[v0..v0 + v1],
            next: &after[v0 + v1 + ARG_VALUE_END.len()..],
        },
        None => Hy3Arg::Open {
            key,
            raw: &after[v0..],
        },
    }
}

/// A Hy3 call's name: one word.
fn hy3_name_ok(name: &str) -> bool {
    !name.is_empty() && !name.contains(char::is_whitespace)
}

/// A Hy3 value: string parameters are the raw text, others JSON (a string when it is not).
fn hy3_value(raw: &str, is_string: bool) -> Value {
    if is_string {
        Value::String(raw.to_string())
    } else {
        serde_json::from_str(raw.trim()).unwrap_or_else(|_| Value::String(raw.to_string()))
    }
}

/// The parameters schema of the tool named `name`, if the request defines it.
fn schema_of(tools: &[Value], name: &str) -> Option<Value> {
    tools
        .iter()
        .find(|t| name_of(t) == Some(name))
        .map(parameters_of)
}

/// Whether the schema declares `key` a string.
fn is_string_param(schema: Option<&Value>, key: &str) -> bool {
    schema
        .and_then(|s| s.get("properties")?.get(key)?.get("type")?.as_str())
        .is_some_and(|t| t == "string")
}

/// A function the request offers, in OpenAI's `{"type": "function", "function": {...}}` form.
fn function_of(tool: &Value) -> Option<&Value> {
    tool.get("function").or(Some(tool))
}

fn name_of(tool: &Value) -> Option<&str> {
    function_of(tool)?.get("name")?.as_str()
}

fn parameters_of(tool: &Value) -> Value {
    function_of(tool)
        .and_then(|f| f.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({"type": "object"}))
}

impl ToolCallFormat {
    /// The format a chat template's source writes calls in, if it writes any.
    pub fn detect(template_source: &str) -> Option<Self> {
        if template_source.contains("<arg_key>") {
            Some(Self::Hy3)
        } else if template_source.contains(CALL_START) {
            Some(Self::Hermes)
        } else {
            None
        }
    }

    /// Splits `text` into content and calls. `tools` (the request's definitions) tell the Hy3
    /// parser which values are strings.
    pub fn parse(&self, text: &str, tools: &[Value]) -> ParsedOutput {
        let Some(first) = text.find(CALL_START) else {
            return ParsedOutput {
                content: text.trim().to_string(),
                calls: vec![],
            };
        };
        let mut calls = Vec::new();
        let mut rest = &text[first..];
        let mut tail = String::new();
        while let Some(start) = rest.find(CALL_START) {
            tail.push_str(&rest[..start]);
            let body_start = start + CALL_START.len();
            // An unclosed last call (the model ran out of tokens) is parsed up to the end.
            let (body, next) = match rest[body_start..].find(CALL_END) {
                Some(end) => (
                    &rest[body_start..body_start + end],
                    &rest[body_start + end + CALL_END.len()..],
                ),
                None => (&rest[body_start..], ""),
            };
            match self.parse_call(body, tools) {
                Some(c) => calls.push(c),
                None => {
                    return ParsedOutput {
                        content: text.trim().to_string(),
                        calls: vec![],
                    }
                }
            }
            rest = next;
        }
        tail.push_str(rest);
        let mut content = text[..first].trim().to_string();
        let tail = tail.trim();
        if !tail.is_empty() {
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(tail);
        }
        ParsedOutput { content, calls }
    }

    fn parse_call(&self, body: &str, tools: &[Value]) -> Option<ToolCall> {
        match self {
            Self::Hermes => {
                let v: Value = serde_json::from_str(body.trim()).ok()?;
                let name = v.get("name")?.as_str()?.to_string();
                let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
                    None | Some(Value::Null) => Map::new(),
                    Some(Value::Object(m)) => m.clone(),
                    // Some models write the arguments as a JSON string.
                    Some(Value::String(s)) => match serde_json::from_str(s).ok()? {
                        Value::Object(m) => m,
                        _ => return None,
                    },
                    Some(_) => return None,
                };
                Some(ToolCall { name, arguments })
            }
            Self::Hy3 => {
                let (name, mut rest) = match body.find(ARG_KEY) {
                    Some(i) => (body[..i].trim(), &body[i..]),
                    None => (body.trim(), ""),
                };
                if !hy3_name_ok(name) {
                    return None;
                }
                let schema = schema_of(tools, name);
                let mut arguments = Map::new();
                loop {
                    match hy3_arg(rest) {
                        Hy3Arg::End => break,
                        Hy3Arg::Done { key, raw, next } => {
                            let value = hy3_value(raw, is_string_param(schema.as_ref(), key));
                            arguments.insert(key.to_string(), value);
                            rest = next;
                        }
                        Hy3Arg::Broken | Hy3Arg::Open { .. } => return None,
                    }
                }
                Some(ToolCall {
                    name: name.to_string(),
                    arguments,
                })
            }
        }
    }

    /// A Lark grammar (llguidance's dialect) for output that is exactly one call to one of
    /// `tools`, or to the one named `only`: what `tool_choice: "required"` or a named function
    /// asks for. Arguments follow each function's `parameters` schema.
    pub fn forced_call_grammar(
        &self,
        tools: &[Value],
        only: Option<&str>,
    ) -> Result<String, String> {
        let chosen: Vec<&Value> = tools
            .iter()
            .filter(|t| only.is_none() || name_of(t) == only)
            .collect();
        if chosen.is_empty() {
            return Err(match only {
                Some(n) => format!("no tool named {n:?} is defined"),
                None => "no tools are defined".into(),
            });
        }
        let mut rules = Vec::new();
        let mut alts = Vec::new();
        for (i, t) in chosen.iter().enumerate() {
            let name = name_of(t).ok_or_else(|| format!("tool {i} has no name"))?;
            let params = parameters_of(t);
            let rule = format!("call_{i}");
            match self {
                Self::Hermes => {
                    let schema = json!({
                        "type": "object",
                        "properties": {"name": {"const": name}, "arguments": params},
                        "required": ["name", "arguments"],
                        "additionalProperties": false,
                        "x-guidance": {"whitespace_flexible": false}
                    });
                    rules.push(format!("{rule}: %json {schema}"));
                }
                Self::Hy3 => {
                    // Each declared argument once, in schema order, required ones at least.
                    let props = params
                        .get("properties")
                        .and_then(Value::as_object)
                        .cloned()
                        .unwrap_or_default();
                    let required: Vec<&str> = params
                        .get("required")
                        .and_then(Value::as_array)
                        .map(|r| r.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    let mut parts = Vec::new();
                    for (j, (key, schema)) in props.iter().enumerate() {
                        let arg = format!("{rule}_arg_{j}");
                        let value = if schema.get("type").and_then(Value::as_str) == Some("string")
                        {
                            hy3_raw_string(schema)
                        } else {
                            format!("%json {schema}")
                        };
                        let head = lark_str(&format!("<arg_key>{key}</arg_key>\n<arg_value>"));
                        rules.push(format!("{arg}: {head} {value} \"</arg_value>\\n\""));
                        parts.push(if required.contains(&key.as_str()) {
                            arg
                        } else {
                            format!("{arg}?")
                        });
                    }
                    rules.push(format!(
                        "{rule}: {} {}",
                        lark_str(&format!("{name}\n")),
                        parts.join(" ")
                    ));
                }
            }
            alts.push(rule);
        }
        let mut g = format!(
            "start: {} ({}) {}\n",
            lark_str(CALL_START),
            alts.join(" | "),
            lark_str(CALL_END)
        );
        for r in rules {
            g.push_str(&r);
            g.push('\n');
        }
        Ok(g)
    }
}

/// Longest `maxLength` written into a Hy3 string value's grammar as a bounded repetition;
/// above it the value is unbounded (a repetition bound is that many automaton states).
const HY3_MAX_BOUNDED_STRING: u64 = 1024;

/// The grammar of a string argument's raw text in a Hy3 call (written unquoted, so it cannot
/// hold `<`, which would open the closing tag): the schema's `const` or string `enum` as
/// literals, otherwise any text within `minLength`..`maxLength` characters. `pattern` and
/// `format` are not applied.
fn hy3_raw_string(schema: &Value) -> String {
    if let Some(c) = schema.get("const").and_then(Value::as_str) {
        return lark_str(c);
    }
    let choices: Vec<String> = schema
        .get("enum")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(lark_str).collect())
        .unwrap_or_default();
    if !choices.is_empty() {
        return format!("({})", choices.join(" | "));
    }
    let min = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0);
    match schema.get("maxLength").and_then(Value::as_u64) {
        Some(max) if max <= HY3_MAX_BOUNDED_STRING => format!("/[^<]{{{min},{}}}/", max.max(min)),
        _ if min > 0 => format!("/[^<]{{{min},}}/", min = min.min(HY3_MAX_BOUNDED_STRING)),
        _ => "/[^<]*/".into(),
    }
}

/// A Lark string literal (JSON's quoting).
fn lark_str(s: &str) -> String {
    Value::from(s).to_string()
}

/// What a [`ToolCallStream`] found in the text pushed to it, in order.
///
/// The pieces of one call's [`Args`](Self::Args) joined are the JSON text of its arguments
/// object (as OpenAI's `function.arguments` pieces and Anthropic's `input_json_delta`s are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolCallEvent {
    /// Answer text outside the calls.
    Content(String),
    /// A call begins; its function's name is known. Calls are numbered from 0 in order.
    CallStart {
        /// The call's number.
        index: usize,
        /// Function name.
        name: String,
    },
    /// The next piece of the call's arguments (JSON text).
    Args {
        /// The call's number.
        index: usize,
        /// Text to append.
        piece: String,
    },
    /// The call is complete.
    CallEnd {
        /// The call's number.
        index: usize,
    },
}

/// Parses a tool-calling answer while it is generated (vLLM's streaming tool parsers, for
/// Hermes and Hy3 calls), so that calls reach the client as they are written.
///
/// - Text before a `<tool_call>` is content, released as it arrives except a tail that might
///   be the start of the marker.
/// - A call starts ([`ToolCallEvent::CallStart`]) once its name is known and names one of the
///   request's tools (any name when none are given): Hermes when the wrapper object's `"name"`
///   string is complete in a valid JSON prefix, Hy3 at the first `<arg_key>`. From then on
///   its arguments stream: Hermes the raw text of the `"arguments"` object as the model writes
///   it (a string value is decoded as it arrives), holding back only what could be the start
///   of `</tool_call>`; Hy3 builds the JSON object, string parameters (by the tool's schema,
///   as [`ToolCallFormat::parse`] decides) character by character, other values once their
///   `</arg_value>` arrives.
/// - At `</tool_call>` (or the end of the output) the call ends. A call that has not started
///   by then (its name is not among the tools, a Hy3 call without arguments) is sent whole if
///   it parses; so are arguments that cannot stream (Hermes `"arguments"` written before
///   `"name"`, or under `"parameters"`, or `null`).
/// - A call that fails before it started (bad JSON, no name) leaves the rest of the output as
///   content, as [`ToolCallFormat::parse`] does. Once a call has started it is committed, as in
///   vLLM: if the model then breaks the format or runs out of tokens, the call still ends, and
///   its argument text may not be valid JSON (Hy3's always is: open values are closed).
///   Non-streamed parsing of the same text would return it as content instead.
/// - After a call, whitespace between calls is dropped; other text is content.
#[derive(Debug)]
pub struct ToolCallStream {
    format: ToolCallFormat,
    tools: Vec<Value>,
    max_calls: usize,
    text: String,
    /// Bytes of `text` dealt with: released as content, or consumed by finished calls. In a
    /// call, where its `<tool_call>` begins.
    done: usize,
    state: StreamState,
    /// Calls started (the next call's index).
    calls: usize,
    /// Since the last call ended no content has been released (leading whitespace is
    /// dropped).
    after_call: bool,
}

#[derive(Debug)]
enum StreamState {
    /// Looking for `<tool_call>`.
    Text,
    /// In a call.
    Call(OpenCall),
    /// A call failed before it started: the rest is content.
    Plain,
}

#[derive(Debug)]
struct OpenCall {
    /// Where the body (after `<tool_call>`) begins in the text.
    body: usize,
    /// The call's index once it has started.
    index: Option<usize>,
    /// Argument text sent so far.
    sent: String,
}

/// What a call's body so far says.
enum Progress {
    /// Keep reading.
    Going,
    /// It cannot become a call.
    Failed,
}

impl ToolCallStream {
    /// A stream for calls in `format` to the request's `tools` (the Hy3 parser reads string
    /// parameters off their schemas).
    pub fn new(format: ToolCallFormat, tools: Vec<Value>) -> Self {
        Self {
            format,
            tools,
            max_calls: usize::MAX,
            text: String::new(),
            done: 0,
            state: StreamState::Text,
            calls: 0,
            after_call: false,
        }
    }

    /// Keeps only the first `n` calls (OpenAI `parallel_tool_calls: false`, Anthropic
    /// `disable_parallel_tool_use`): later ones are parsed but neither sent nor content.
    pub fn max_calls(mut self, n: usize) -> Self {
        self.max_calls = n;
        self
    }

    /// Adds generated text; returns what can be told now.
    pub fn push(&mut self, delta: &str) -> Vec<ToolCallEvent> {
        self.text.push_str(delta);
        let mut out = vec![];
        self.advance(false, &mut out);
        out
    }

    /// The end of the output: the held content, and the open call ended.
    pub fn finish(mut self) -> Vec<ToolCallEvent> {
        let mut out = vec![];
        self.advance(true, &mut out);
        out
    }

    /// Whether any call was made (started or sent), counting calls past the limit.
    pub fn made_calls(&self) -> bool {
        self.calls > 0
    }

    fn content(&mut self, upto: usize, out: &mut Vec<ToolCallEvent>) {
        let mut text = &self.text[self.done..upto];
        if self.after_call {
            text = text.trim_start();
            self.after_call = text.is_empty();
        }
        if !text.is_empty() {
            out.push(ToolCallEvent::Content(text.to_string()));
        }
        self.done = upto;
    }

    fn call_event(&self, index: usize, e: ToolCallEvent, out: &mut Vec<ToolCallEvent>) {
        if index < self.max_calls {
            out.push(e);
        }
    }

    fn advance(&mut self, at_end: bool, out: &mut Vec<ToolCallEvent>) {
        loop {
            // Each arm leaves the state it ends in (`Text` unless it says otherwise).
            match std::mem::replace(&mut self.state, StreamState::Text) {
                StreamState::Plain => {
                    let rest = &self.text[self.done..];
                    if !rest.is_empty() {
                        out.push(ToolCallEvent::Content(rest.to_string()));
                    }
                    self.done = self.text.len();
                    self.state = StreamState::Plain;
                    return;
                }
                StreamState::Text => {
                    if let Some(i) = self.text[self.done..].find(CALL_START) {
                        self.content(self.done + i, out);
                        self.state = StreamState::Call(OpenCall {
                            body: self.done + CALL_START.len(),
                            index: None,
                            sent: String::new(),
                        });
                        continue;
                    }
                    let keep = if at_end {
                        0
                    } else {
                        partial_tag_len(&self.text[self.done..], &[CALL_START])
                    };
                    self.content(self.text.len() - keep, out);
                    return;
                }
                StreamState::Call(mut call) => {
                    let rest = &self.text[call.body..];
                    let end = rest.find(CALL_END);
                    if end.is_none() && !at_end {
                        let held = partial_tag_len(rest, self.hold_tags());
                        let visible = rest[..rest.len() - held].to_string();
                        if let Progress::Failed = self.progress(&visible, &mut call, out) {
                            self.state = StreamState::Plain;
                            continue;
                        }
                        self.state = StreamState::Call(call);
                        return;
                    }
                    let body = rest[..end.unwrap_or(rest.len())].to_string();
                    if !self.complete(&body, call, out) {
                        self.state = StreamState::Plain;
                        continue;
                    }
                    self.done += CALL_START.len() + body.len() + end.map_or(0, |_| CALL_END.len());
                    self.after_call = true;
                    if end.is_none() {
                        return;
                    }
                }
            }
        }
    }

    /// Closing tags whose beginning must not be sent as argument text.
    fn hold_tags(&self) -> &'static [&'static str] {
        match self.format {
            ToolCallFormat::Hermes => &[CALL_END],
            ToolCallFormat::Hy3 => &[CALL_END, ARG_VALUE_END],
        }
    }

    fn tool_known(&self, name: &str) -> bool {
        self.tools.is_empty() || self.tools.iter().any(|t| name_of(t) == Some(name))
    }

    /// Reads an open call's body so far: starts the call when its name is known, sends the
    /// new argument text.
    fn progress(
        &mut self,
        body: &str,
        call: &mut OpenCall,
        out: &mut Vec<ToolCallEvent>,
    ) -> Progress {
        let name = match self.format {
            ToolCallFormat::Hermes => {
                let t = body.trim_start();
                if t.is_empty() {
                    return Progress::Going;
                }
                if !t.starts_with('{') || !json_prefix_ok(body) {
                    return match call.index {
                        None => Progress::Failed,
                        // Committed: the arguments stop where the JSON broke.
                        Some(_) => Progress::Going,
                    };
                }
                object_members(body)
                    .iter()
                    .find(|m| m.key == "name")
                    .and_then(|m| serde_json::from_str::<String>(&body[m.start..m.end?]).ok())
            }
            ToolCallFormat::Hy3 => match body.find(ARG_KEY) {
                None => None,
                Some(i) => {
                    let name = body[..i].trim();
                    if !hy3_name_ok(name) {
                        return match call.index {
                            None => Progress::Failed,
                            Some(_) => Progress::Going,
                        };
                    }
                    Some(name.to_string())
                }
            },
        };
        if call.index.is_none() {
            match name {
                Some(n) if self.tool_known(&n) => {
                    let index = self.calls;
                    self.calls += 1;
                    call.index = Some(index);
                    self.call_event(index, ToolCallEvent::CallStart { index, name: n }, out);
                }
                _ => return Progress::Going,
            }
        }
        if let Some(text) = self.arguments_text(body, false) {
            self.send_args(call, &text, out);
        }
        Progress::Going
    }

    /// Sends what `text` (the arguments so far) adds to what was sent.
    fn send_args(&self, call: &mut OpenCall, text: &str, out: &mut Vec<ToolCallEvent>) {
        let Some(index) = call.index else { return };
        if text.len() > call.sent.len() && text.starts_with(call.sent.as_str()) {
            let piece = text[call.sent.len()..].to_string();
            call.sent.push_str(&piece);
            self.call_event(index, ToolCallEvent::Args { index, piece }, out);
        }
    }

    /// The arguments text a body shows: all of it when `whole` (the body is complete), else
    /// what can be sent without taking back anything. `None`: nothing to say yet (Hermes
    /// arguments that are not an object or a string, or absent).
    fn arguments_text(&self, body: &str, whole: bool) -> Option<String> {
        match self.format {
            ToolCallFormat::Hermes => {
                if !json_prefix_ok(body) {
                    return None;
                }
                let m = object_members(body)
                    .into_iter()
                    .find(|m| m.key == "arguments")?;
                let end = m.end.unwrap_or(body.len());
                match body[m.start..].chars().next()? {
                    '{' => Some(body[m.start..end].to_string()),
                    '"' => {
                        let inner = &body[m.start + 1..m.end.map_or(end, |e| e - 1)];
                        Some(decode_json_string_prefix(inner))
                    }
                    _ => None,
                }
            }
            ToolCallFormat::Hy3 => Some(self.hy3_arguments(body, whole)),
        }
    }

    /// A Hy3 body's arguments as JSON text: whole, or up to what is known.
    fn hy3_arguments(&self, body: &str, whole: bool) -> String {
        let Some(k0) = body.find(ARG_KEY) else {
            return if whole { "{}".into() } else { String::new() };
        };
        let schema = schema_of(&self.tools, body[..k0].trim());
        let mut rest = &body[k0..];
        let mut s = String::new();
        loop {
            let (key, raw, next) = match hy3_arg(rest) {
                Hy3Arg::End | Hy3Arg::Broken => break,
                Hy3Arg::Open { key, raw } => (key, raw, None),
                Hy3Arg::Done { key, raw, next } => (key, raw, Some(next)),
            };
            s.push_str(if s.is_empty() { "{" } else { ", " });
            s.push_str(&Value::from(key).to_string());
            s.push_str(": ");
            let closed = next.is_some() || whole;
            if is_string_param(schema.as_ref(), key) {
                let quoted = Value::from(raw).to_string();
                s.push_str(&quoted[..quoted.len() - 1]);
                if closed {
                    s.push('"');
                }
            } else if closed {
                s.push_str(&hy3_value(raw, false).to_string());
            }
            match next {
                Some(n) => rest = n,
                None => break,
            }
        }
        if whole {
            s.push_str(if s.is_empty() { "{}" } else { "}" });
        }
        s
    }

    /// Ends a call at `</tool_call>` or the end of the output. False when it never started
    /// and does not parse: its text is content.
    fn complete(&mut self, body: &str, mut call: OpenCall, out: &mut Vec<ToolCallEvent>) -> bool {
        if call.index.is_none() {
            // Not seen starting (or its name came late): it may still start now.
            if let Progress::Failed = self.progress(body, &mut call, out) {
                return false;
            }
        }
        let parsed = self.format.parse_call(body, &self.tools);
        let index = match (call.index, &parsed) {
            (Some(i), _) => i,
            (None, None) => return false,
            (None, Some(c)) => {
                let index = self.calls;
                self.calls += 1;
                let name = c.name.clone();
                self.call_event(index, ToolCallEvent::CallStart { index, name }, out);
                call.index = Some(index);
                index
            }
        };
        match self.arguments_text(body, true) {
            Some(text) if !text.is_empty() && text.starts_with(call.sent.as_str()) => {
                self.send_args(&mut call, &text, out)
            }
            _ if call.sent.is_empty() => {
                let text = parsed.map_or_else(
                    || "{}".to_string(),
                    |c| Value::Object(c.arguments).to_string(),
                );
                self.send_args(&mut call, &text, out);
            }
            _ => {}
        }
        self.call_event(index, ToolCallEvent::CallEnd { index }, out);
        true
    }
}

/// The length of the longest tail of `text` that is a proper beginning of one of `tags`.
fn partial_tag_len(text: &str, tags: &[&str]) -> usize {
    let longest = tags.iter().map(|t| t.len()).max().unwrap_or(0);
    (1..longest)
        .rev()
        .find(|&n| {
            n <= text.len()
                && text.is_char_boundary(text.len() - n)
                && tags
                    .iter()
                    .any(|t| n < t.len() && t.starts_with(&text[text.len() - n..]))
        })
        .unwrap_or(0)
}

/// Whether `text` is JSON or the beginning of some JSON (serde_json stops at its end, not at
/// a syntax error).
fn json_prefix_ok(text: &str) -> bool {
    let ok = |t: &str| match serde_json::from_str::<serde::de::IgnoredAny>(t) {
        Ok(_) => true,
        Err(e) => e.is_eof(),
    };
    // serde_json calls a number cut after its sign, point or exponent invalid.
    ok(text) || (text.ends_with(['-', '+', '.', 'e', 'E']) && ok(&format!("{text}0")))
}

/// A member of a JSON object: its key and where its value's text lies (`end` when complete).
struct Member {
    key: String,
    start: usize,
    end: Option<usize>,
}

/// The members of the (possibly unfinished) JSON object `text`, as far as they go. Lenient:
/// callers check validity with [`json_prefix_ok`]; every offset is a char boundary.
fn object_members(text: &str) -> Vec<Member> {
    let b = text.as_bytes();
    let ws = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let mut out = vec![];
    let mut i = ws(0);
    if b.get(i) != Some(&b'{') {
        return out;
    }
    i += 1;
    loop {
        i = ws(i);
        if b.get(i) != Some(&b'"') {
            return out;
        }
        let Some(k) = string_end(b, i) else {
            return out;
        };
        let key = serde_json::from_str(&text[i..k]).unwrap_or_default();
        i = ws(k);
        if b.get(i) != Some(&b':') {
            return out;
        }
        i = ws(i + 1);
        if i >= b.len() {
            return out;
        }
        let end = value_end(b, i);
        out.push(Member { key, start: i, end });
        let Some(e) = end else {
            return out;
        };
        i = ws(e);
        if b.get(i) != Some(&b',') {
            return out;
        }
        i += 1;
    }
}

/// After the closing quote of the string that opens at `b[i]`.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// After the JSON value that begins at `b[i]`, if it is complete.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b[i] {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        // A number or literal ends at what follows it (at the end it may still grow).
        _ => b[i..]
            .iter()
            .position(|c| matches!(c, b',' | b'}' | b']') || c.is_ascii_whitespace())
            .map(|n| i + n),
    }
}

/// The text of the JSON string whose (unquoted, possibly cut) contents are `inner`, as far as
/// its escapes are complete.
fn decode_json_string_prefix(inner: &str) -> String {
    // An escape is at most 12 bytes (a surrogate pair); back off over one that is cut.
    for back in 0..=12.min(inner.len()) {
        let cut = inner.len() - back;
        if !inner.is_char_boundary(cut) {
            continue;
        }
        if let Ok(s) = serde_json::from_str::<String>(&format!("\"{}\"", &inner[..cut])) {
            return s;
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"]}}}),
        ]
    }

    #[test]
    fn hermes_calls_parse_with_content_before() {
        let f = ToolCallFormat::Hermes;
        let p = f.parse(
            "Let me check.\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>\n<tool_call>{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\", \\\"days\\\": 2}\"}</tool_call>",
            &weather(),
        );
        assert_eq!(p.content, "Let me check.");
        assert_eq!(p.calls.len(), 2);
        assert_eq!(p.calls[0].name, "get_weather");
        assert_eq!(p.calls[0].arguments["city"], "Paris");
        assert_eq!(p.calls[1].arguments["days"], 2);
        // Broken JSON: no calls, the text stays content.
        let p = f.parse("<tool_call>{\"name\": \"x\", </tool_call>", &[]);
        assert!(p.calls.is_empty());
        assert_eq!(p.content, "<tool_call>{\"name\": \"x\", </tool_call>");
        // No marker: all content.
        assert_eq!(f.parse("  hi  ", &[]).content, "hi");
    }

    #[test]
    fn hy3_calls_use_the_schema_for_string_values() {
        let f = ToolCallFormat::Hy3;
        let p = f.parse(
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>42</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
            &weather(),
        );
        assert_eq!(p.content, "");
        assert_eq!(
            p.calls[0].arguments["city"], "42",
            "a string stays a string"
        );
        assert_eq!(p.calls[0].arguments["days"], 3);
        assert!(f
            .parse("<tool_call>two words\n</tool_call>", &[])
            .calls
            .is_empty());
        assert_eq!(
            ToolCallFormat::detect("{{ '<arg_key>' }}"),
            Some(ToolCallFormat::Hy3)
        );
        assert_eq!(
            ToolCallFormat::detect("<tool_call>{{ x }}"),
            Some(ToolCallFormat::Hermes)
        );
        assert_eq!(ToolCallFormat::detect("{{ messages }}"), None);
    }

    fn tools() -> Vec<Value> {
        let mut t = weather();
        t.push(json!({"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}));
        t
    }

    /// Joins what splitting may cut differently: neighbouring content, and neighbouring
    /// argument pieces of one call.
    fn joined(events: Vec<ToolCallEvent>) -> Vec<ToolCallEvent> {
        let mut out: Vec<ToolCallEvent> = vec![];
        for e in events {
            match (out.last_mut(), e) {
                (Some(ToolCallEvent::Content(a)), ToolCallEvent::Content(b)) => a.push_str(&b),
                (
                    Some(ToolCallEvent::Args { index: i, piece: a }),
                    ToolCallEvent::Args { index: j, piece: b },
                ) if *i == j => a.push_str(&b),
                (_, e) => out.push(e),
            }
        }
        out
    }

    fn stream(f: ToolCallFormat, pieces: &[&str]) -> Vec<ToolCallEvent> {
        let mut s = ToolCallStream::new(f, tools());
        let mut out = vec![];
        for p in pieces {
            out.extend(s.push(p));
        }
        out.extend(s.finish());
        out
    }

    /// Content (whitespace-normalized) and calls, with each call's argument pieces parsed.
    fn outcome(events: &[ToolCallEvent]) -> (String, Vec<ToolCall>) {
        let mut content = String::new();
        let mut calls: Vec<(String, String)> = vec![];
        for e in events {
            match e {
                ToolCallEvent::Content(c) => content.push_str(c),
                ToolCallEvent::CallStart { index, name } => {
                    assert_eq!(*index, calls.len(), "{events:?}");
                    calls.push((name.clone(), String::new()));
                }
                ToolCallEvent::Args { index, piece } => calls[*index].1.push_str(piece),
                ToolCallEvent::CallEnd { index } => assert_eq!(*index + 1, calls.len()),
            }
        }
        let calls = calls
            .into_iter()
            .map(|(name, args)| ToolCall {
                name,
                arguments: serde_json::from_str(&args)
                    .unwrap_or_else(|e| panic!("arguments {args:?}: {e}")),
            })
            .collect();
        (
            content.split_whitespace().collect::<Vec<_>>().join(" "),
            calls,
        )
    }

    fn char_bounds(text: &str) -> Vec<usize> {
        (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect()
    }

    /// Streams `text` whole, split at every char boundary, and one char at a time: the same
    /// events every way, and the same calls as parsing the whole text.
    fn check_stream(f: ToolCallFormat, text: &str) -> Vec<ToolCallEvent> {
        let whole = joined(stream(f, &[text]));
        for i in char_bounds(text) {
            let split = joined(stream(f, &[&text[..i], &text[i..]]));
            assert_eq!(split, whole, "split at {i} of {text:?}");
        }
        let bounds = char_bounds(text);
        let chars: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();
        assert_eq!(joined(stream(f, &chars)), whole, "char by char: {text:?}");
        let (content, calls) = outcome(&whole);
        let want = f.parse(text, &tools());
        assert_eq!(calls, want.calls, "{text:?}");
        if want.calls.is_empty() {
            assert_eq!(whole, vec![ToolCallEvent::Content(text.into())]);
        } else {
            let want: Vec<&str> = want.content.split_whitespace().collect();
            assert_eq!(content, want.join(" "), "{text:?}");
        }
        whole
    }

    const HERMES: &[&str] = &[
        "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris </tool\", \"days\": 3, \"x\": {\"a\": [1, -2.5e3, null, true, \"\\u00e9\\\"\"]}}}\n</tool_call>",
        r#"<tool_call>{"arguments": {"city": "Rome"}, "name": "get_weather"}</tool_call>"#,
        r#"<tool_call>{"name": "get_weather", "arguments": "{\"city\": \"Z\u00fcrich \\\" \ud83d\ude00 ü\", \"days\": 2}"}</tool_call>"#,
        "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"a\"}}</tool_call>\n<tool_call>{\"name\": \"noop\", \"arguments\": {}}</tool_call>\nDone.",
        r#"Sure <tool_call>{"name": "not_a_tool", "arguments": {"q": 1}}</tool_call>"#,
        "<tool_call>  {  \"name\" :\"noop\" ,\"arguments\":{ } }  </tool_call>  ",
        r#"<tool_call>{"name": "get_weather", "parameters": {"city": "Oslo"}}</tool_call>"#,
        r#"<tool_call>{"name": "noop", "arguments": null}</tool_call>"#,
        r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Lima", "days": 12}}"#,
    ];

    const HY3: &[&str] = &[
        "Sure.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Pa\"ris\\ <b> 42 é</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
        "<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_value>three</arg_value>\n<arg_key>city</arg_key>\n<arg_value></arg_value>\n</tool_call>",
        "<tool_call>noop\n</tool_call>",
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>a</arg_value>\n</tool_call>\n<tool_call>noop\n<arg_key>deep</arg_key>\n<arg_value>{\"a\": [1, \"</b>\"]}</arg_value>\n</tool_call> then text",
        "<tool_call>other\n<arg_key>city</arg_key>\n<arg_value>42</arg_value>\n</tool_call>",
    ];

    const MALFORMED: &[(ToolCallFormat, &str)] = &[
        (
            ToolCallFormat::Hermes,
            "<tool_call>{\"name\": get_weather}</tool_call> after",
        ),
        (
            ToolCallFormat::Hermes,
            "I use <tool_call> tags: <tool_call>not json</tool_call>",
        ),
        (
            ToolCallFormat::Hermes,
            "a <tool_call>{\"name\": \"x\", </tool_call>",
        ),
        (
            ToolCallFormat::Hermes,
            "<tool_call>{\"name\": \"x\", \"arguments\": 3}</tool_call>",
        ),
        (ToolCallFormat::Hermes, "Hello <b>world</b> <tool"),
        (
            ToolCallFormat::Hy3,
            "<tool_call>two words\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
        ),
        (ToolCallFormat::Hy3, "<tool_call>\n</tool_call>"),
        (
            ToolCallFormat::Hy3,
            "<tool_call>x\n</arg_key><arg_key>k</arg_key></arg_value><arg_value>1</tool_call>",
        ),
    ];

    #[test]
    fn streamed_calls_equal_parsed_calls_however_the_text_is_split() {
        for text in HERMES {
            check_stream(ToolCallFormat::Hermes, text);
        }
        for text in HY3 {
            check_stream(ToolCallFormat::Hy3, text);
        }
        for (f, text) in MALFORMED {
            let events = check_stream(*f, text);
            assert_eq!(events, vec![ToolCallEvent::Content(text.to_string())]);
        }
    }

    #[test]
    fn arguments_stream_piece_by_piece() {
        for (f, text, pieces) in [
            (ToolCallFormat::Hermes, HERMES[0], 5),
            (ToolCallFormat::Hermes, HERMES[2], 5),
            (ToolCallFormat::Hy3, HY3[0], 5),
        ] {
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
            let events = stream(f, &chars);
            let n = events
                .iter()
                .filter(|e| matches!(e, ToolCallEvent::Args { .. }))
                .count();
            assert!(n >= pieces, "{n} pieces: {events:?}");
        }
        // The name and the first argument text arrive before the call is closed.
        let mut s = ToolCallStream::new(ToolCallFormat::Hermes, tools());
        assert_eq!(
            s.push("Hi <tool_c"),
            vec![ToolCallEvent::Content("Hi ".into())]
        );
        assert_eq!(s.push("all>{\"name\": \"get_wea"), vec![]);
        assert_eq!(
            s.push("ther\", \"arguments\": {\"ci"),
            vec![
                ToolCallEvent::CallStart {
                    index: 0,
                    name: "get_weather".into()
                },
                ToolCallEvent::Args {
                    index: 0,
                    piece: "{\"ci".into()
                },
            ]
        );
        // `</tool` might close the call: held until it cannot.
        assert_eq!(
            s.push("ty\": \"</tool"),
            vec![ToolCallEvent::Args {
                index: 0,
                piece: "ty\": \"".into()
            }]
        );
        assert_eq!(
            s.push("s\"}}</tool_call>"),
            vec![
                ToolCallEvent::Args {
                    index: 0,
                    piece: "</tools\"}".into()
                },
                ToolCallEvent::CallEnd { index: 0 },
            ]
        );
        assert_eq!(s.finish(), vec![]);
        // Hy3: string values character by character, others once closed.
        let mut s = ToolCallStream::new(ToolCallFormat::Hy3, tools());
        assert_eq!(
            s.push("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Pa"),
            vec![
                ToolCallEvent::CallStart {
                    index: 0,
                    name: "get_weather".into()
                },
                ToolCallEvent::Args {
                    index: 0,
                    piece: "{\"city\": \"Pa".into()
                },
            ]
        );
        assert_eq!(
            s.push("\"</arg_value><arg_key>days</arg_key><arg_value>1"),
            vec![ToolCallEvent::Args {
                index: 0,
                piece: "\\\"\", \"days\": ".into()
            },]
        );
        assert_eq!(
            s.push("2</arg_value></tool_call>"),
            vec![
                ToolCallEvent::Args {
                    index: 0,
                    piece: "12}".into()
                },
                ToolCallEvent::CallEnd { index: 0 },
            ]
        );
    }

    #[test]
    fn a_started_call_is_committed() {
        // The name is known, then the model breaks the format: the call stays a call and its
        // arguments are sent as far as they were valid.
        let mut s = ToolCallStream::new(ToolCallFormat::Hermes, tools());
        let mut events = s.push("<tool_call>{\"name\": \"noop\", \"arguments\": {\"a\": 1");
        events.extend(s.push(" oops"));
        events.extend(s.finish());
        assert_eq!(
            joined(events),
            vec![
                ToolCallEvent::CallStart {
                    index: 0,
                    name: "noop".into()
                },
                ToolCallEvent::Args {
                    index: 0,
                    piece: "{\"a\": 1".into()
                },
                ToolCallEvent::CallEnd { index: 0 },
            ]
        );
        // Hy3 closes what is open: its arguments stay valid JSON.
        let mut s = ToolCallStream::new(ToolCallFormat::Hy3, tools());
        let mut events = s.push("<tool_call>get_weather\n<arg_key>city</arg_key><arg_value>Par");
        events.extend(s.finish());
        let (_, calls) = outcome(&events);
        assert_eq!(calls[0].arguments["city"], "Par");
    }

    #[test]
    fn parallel_calls_are_numbered_and_can_be_limited() {
        let text = HERMES[3];
        let events = joined(stream(ToolCallFormat::Hermes, &[text]));
        let starts: Vec<usize> = events
            .iter()
            .filter_map(|e| match e {
                ToolCallEvent::CallStart { index, .. } => Some(*index),
                _ => None,
            })
            .collect();
        assert_eq!(starts, vec![0, 1]);
        assert_eq!(events.last(), Some(&ToolCallEvent::Content("Done.".into())));
        let mut s = ToolCallStream::new(ToolCallFormat::Hermes, tools()).max_calls(1);
        let mut events = s.push(text);
        assert!(s.made_calls());
        events.extend(s.finish());
        let (content, calls) = outcome(&events);
        assert_eq!((content.as_str(), calls.len()), ("Done.", 1));
        assert_eq!(calls[0].name, "get_weather");
    }

    #[test]
    fn json_prefixes_are_told_from_json_errors() {
        let texts = [
            r#"{"a": [1, -2.5e+3, 0.1E2, true, false, null, "x\"\\\u00e9\ud83d\ude00"], "b": {}}"#,
            "  [ {} , [] ]  ",
        ];
        for t in texts {
            for i in char_bounds(t) {
                assert!(json_prefix_ok(&t[..i]), "{:?}", &t[..i]);
            }
        }
        for bad in [
            "{\"a\" 1",
            "{1",
            "[1,]",
            "{\"a\": tru ",
            "{} x",
            "{\"a\": 01",
        ] {
            assert!(!json_prefix_ok(bad), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn random_splits_stream_the_same(
            which in 0..HERMES.len() + HY3.len() + MALFORMED.len(),
            cuts in proptest::collection::vec(0usize..400, 0..12),
        ) {
            let (f, text) = if which < HERMES.len() {
                (ToolCallFormat::Hermes, HERMES[which])
            } else if which < HERMES.len() + HY3.len() {
                (ToolCallFormat::Hy3, HY3[which - HERMES.len()])
            } else {
                MALFORMED[which - HERMES.len() - HY3.len()]
            };
            let mut cuts: Vec<usize> = cuts
                .into_iter()
                .map(|c| c % (text.len() + 1))
                .filter(|&c| text.is_char_boundary(c))
                .collect();
            cuts.sort_unstable();
            cuts.push(text.len());
            let mut pieces = vec![];
            let mut at = 0;
            for c in cuts {
                pieces.push(&text[at..c]);
                at = c;
            }
            proptest::prop_assert_eq!(joined(stream(f, &pieces)), joined(stream(f, &[text])));
        }
    }

    #[test]
    fn forced_grammars_name_missing_tools() {
        let f = ToolCallFormat::Hermes;
        assert!(f
            .forced_call_grammar(&weather(), Some("nope"))
            .unwrap_err()
            .contains("nope"));
        assert!(f.forced_call_grammar(&[], None).is_err());
        let g = f.forced_call_grammar(&weather(), None).unwrap();
        assert!(g.starts_with("start: \"<tool_call>\""), "{g}");
        let g = ToolCallFormat::Hy3
            .forced_call_grammar(&weather(), Some("get_weather"))
            .unwrap();
        assert!(g.contains("<arg_key>city</arg_key>"), "{g}");
    }
}
