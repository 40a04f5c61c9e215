//! Tool calling on the local engine, for both wire formats: the request's tool definitions
//! and `tool_choice` (OpenAI's, or Anthropic's translated to them), the template they render
//! with, the grammar a forced call is generated under, and the calls parsed out of the answer
//! ([`switchyard_engine::tool_calls`]).
//!
//! `tool_choice`:
//! - `none`: the tools are not shown to the model and nothing is parsed;
//! - `auto` (the default with tools): the model decides; calls it writes are parsed;
//! - `required` / a named function (Anthropic `any` / `tool`): the output is constrained to
//!   exactly one call (of that function), with arguments valid under its schema.

use serde_json::{json, Map, Value};
use switchyard_engine::chat::ChatTemplate;
use switchyard_engine::structured::OutputConstraint;
use switchyard_engine::tool_calls::{ToolCall, ToolCallEvent, ToolCallFormat, ToolCallStream};

use super::error::ApiError;
use super::AppState;

/// Most tools one request may define (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// What the model may or must do with the tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Never call.
    None,
    /// Call or answer, as the model decides.
    Auto,
    /// Call some tool.
    Required,
    /// Call this one.
    Function(String),
}

/// A request's tools, in OpenAI's `{"type": "function", "function": {...}}` form.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    /// Definitions.
    pub tools: Vec<Value>,
    /// `tool_choice`.
    pub choice: ToolChoice,
    /// At most one call per answer (OpenAI `parallel_tool_calls: false`; Anthropic
    /// `disable_parallel_tool_use`): later calls are dropped.
    pub single_call: bool,
}

impl ToolRequest {
    /// Whether the tools are shown to the model and its calls parsed.
    pub fn active(&self) -> bool {
        !self.tools.is_empty() && self.choice != ToolChoice::None
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.tools
            .iter()
            .filter_map(|t| t["function"]["name"].as_str())
    }

    /// The request from checked definitions: `None` without tools (unless the choice demands
    /// a call: an error), and a named choice must name one of them (`name_param` is its field).
    fn build(
        tools: Vec<Value>,
        choice: ToolChoice,
        single_call: bool,
        name_param: &str,
    ) -> Result<Option<Self>, ApiError> {
        if tools.is_empty() {
            return match choice {
                ToolChoice::Required | ToolChoice::Function(_) => Err(ApiError::field(
                    "tool_choice",
                    "asks for a tool call but the request defines no tools",
                )),
                _ => Ok(None),
            };
        }
        let r = Self {
            tools,
            choice,
            single_call,
        };
        if let ToolChoice::Function(n) = &r.choice {
            if !r.names().any(|m| m == n) {
                return Err(ApiError::field(
                    name_param,
                    format!("names the function {n:?}, which is not among the tools"),
                ));
            }
        }
        Ok(Some(r))
    }
}

/// A function name as OpenAI allows them.
fn check_name(name: &str, at: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::field(
            at,
            format!("must be 1-64 letters, digits, underscores or dashes, got {name:?}"),
        ))
    }
}

/// A parameters / input schema: an object schema (absent means no arguments at all).
fn check_schema(v: Option<&Value>, at: &str) -> Result<Value, ApiError> {
    match v {
        None | Some(Value::Null) => {
            Ok(json!({"type": "object", "properties": {}, "additionalProperties": false}))
        }
        Some(s @ Value::Object(_)) => Ok(s.clone()),
        Some(_) => Err(ApiError::field(at, "must be a JSON schema object")),
    }
}

/// The request's tool definitions, each checked and converted by `one(tool, "tools[i]")` into
/// OpenAI's `{"type": "function", "function": {...}}` form.
fn definitions(
    tools: Option<Vec<Value>>,
    one: impl Fn(&Value, &str) -> Result<Value, ApiError>,
) -> Result<Vec<Value>, ApiError> {
    let tools = tools.unwrap_or_default();
    if tools.len() > MAX_TOOLS {
        return Err(ApiError::field(
            "tools",
            format!(
                "at most {MAX_TOOLS} tools are accepted, got {}",
                tools.len()
            ),
        ));
    }
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| one(t, &format!("tools[{i}]")))
        .collect()
}

/// OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`.
pub fn openai(
    tools: Option<Vec<Value>>,
    choice: Option<Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolRequest>, ApiError> {
    let defs = definitions(tools, |t, at| {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::field(
                format!("{at}.type"),
                "must be \"function\"",
            ));
        }
        let f = t
            .get("function")
            .filter(|f| f.is_object())
            .ok_or_else(|| ApiError::MissingField(format!("{at}.function")))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::MissingField(format!("{at}.function.name")))?;
        check_name(name, &format!("{at}.function.name"))?;
        let mut f = f.clone();
        f["parameters"] = check_schema(f.get("parameters"), &format!("{at}.function.parameters"))?;
        Ok(json!({"type": "function", "function": f}))
    })?;
    let choice = match choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            o => {
                return Err(ApiError::field(
                    "tool_choice",
                    format!("must be \"none\", \"auto\", \"required\" or a function, got {o:?}"),
                ))
            }
        },
        Some(v) => {
            match v["function"]["name"].as_str() {
                Some(n) if v["type"] == "function" => ToolChoice::Function(n.to_string()),
                _ => return Err(ApiError::field(
                    "tool_choice",
                    "must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                )),
            }
        }
    };
    ToolRequest::build(
        defs,
        choice,
        parallel == Some(false),
        "tool_choice.function.name",
    )
}

/// Anthropic's `tools` (`name`, `description`, `input_schema`) and `tool_choice`
/// (`auto`, `any`, `tool`, `none`), as OpenAI definitions.
pub fn anthropic(
    tools: Option<Vec<Value>>,
    choice: Option<Value>,
) -> Result<Option<ToolRequest>, ApiError> {
    let defs = definitions(tools, |t, at| {
        if let Some(kind) = t.get("type").and_then(Value::as_str) {
            if kind != "custom" {
                return Err(ApiError::Unsupported {
                    param: format!("{at}.type"),
                    message: format!(
                        "server tools ({kind:?}) are not available on the local model; define client tools with name and input_schema"
                    ),
                });
            }
        }
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::MissingField(format!("{at}.name")))?;
        check_name(name, &format!("{at}.name"))?;
        let mut f = Map::new();
        f.insert("name".into(), Value::from(name));
        if let Some(d) = t.get("description") {
            f.insert("description".into(), d.clone());
        }
        f.insert(
            "parameters".into(),
            check_schema(t.get("input_schema"), &format!("{at}.input_schema"))?,
        );
        Ok(json!({"type": "function", "function": f}))
    })?;
    let single_call = choice
        .as_ref()
        .and_then(|c| c.get("disable_parallel_tool_use"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let choice = match choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(v) => match v.get("type").and_then(Value::as_str) {
            Some("auto") => ToolChoice::Auto,
            Some("any") => ToolChoice::Required,
            Some("none") => ToolChoice::None,
            Some("tool") => match v.get("name").and_then(Value::as_str) {
                Some(n) => ToolChoice::Function(n.to_string()),
                None => return Err(ApiError::MissingField("tool_choice.name".into())),
            },
            _ => {
                return Err(ApiError::field(
                    "tool_choice.type",
                    "must be \"auto\", \"any\", \"tool\" or \"none\"",
                ))
            }
        },
    };
    ToolRequest::build(defs, choice, single_call, "tool_choice.name")
}

/// The template requests with active tools render with.
pub fn template(state: &AppState) -> &ChatTemplate {
    state.tools_template.as_ref().unwrap_or(&state.template)
}

/// How the model writes calls: what `--tool-call-parser` forces, else the format of
/// [`template`].
pub fn format(state: &AppState) -> ToolCallFormat {
    state
        .tool_call_format
        .or_else(|| template(state).tool_call_format())
        .unwrap_or(ToolCallFormat::Hermes)
}

/// The constraint a forced call is generated under, if the choice forces one.
pub fn forced(state: &AppState, t: &ToolRequest) -> Result<Option<OutputConstraint>, ApiError> {
    let only = match &t.choice {
        ToolChoice::Required => None,
        ToolChoice::Function(n) => Some(n.as_str()),
        _ => return Ok(None),
    };
    format(state)
        .forced_call_grammar(&t.tools, only)
        .map(|g| Some(OutputConstraint::Grammar(g)))
        .map_err(|e| ApiError::field("tool_choice", e))
}

/// The arguments of a call as the JSON string OpenAI sends.
pub fn arguments_json(c: &ToolCall) -> String {
    Value::Object(c.arguments.clone()).to_string()
}

/// A request whose answers are searched for calls: its tools and the model's call format.
pub struct ActiveTools {
    format: ToolCallFormat,
    tools: Vec<Value>,
    single_call: bool,
}

/// The request's tools when calls are parsed (tools given, `tool_choice` not `none`, a chat
/// API).
pub fn active(state: &AppState, req: &super::route::NormalizedRequest) -> Option<ActiveTools> {
    let t = req.tools.as_ref().filter(|t| t.active())?;
    Some(ActiveTools {
        format: format(state),
        tools: t.tools.clone(),
        single_call: t.single_call,
    })
}

impl ActiveTools {
    /// A finished answer as content and calls; without calls the content is `text` unchanged.
    pub fn split(&self, text: &str) -> (String, Vec<ToolCall>) {
        let p = self.format.parse(text, &self.tools);
        if p.calls.is_empty() {
            (text.to_string(), vec![])
        } else {
            (p.content, self.limit(p.calls))
        }
    }

    /// A parser for a streamed answer: calls as they are written, the first only with
    /// `single_call`.
    pub fn stream(&self) -> ToolCallStream {
        let s = ToolCallStream::new(self.format, self.tools.clone());
        if self.single_call {
            s.max_calls(1)
        } else {
            s
        }
    }

    fn limit(&self, mut calls: Vec<ToolCall>) -> Vec<ToolCall> {
        if self.single_call {
            calls.truncate(1);
        }
        calls
    }
}

/// OpenAI `tool_calls` entries.
pub fn openai_calls(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .map(|c| {
            json!({
                "id": super::new_id("call_"),
                "type": "function",
                "function": {"name": c.name, "arguments": arguments_json(c)},
            })
        })
        .collect()
}

/// A streamed call's `delta.tool_calls` entries (OpenAI's and vLLM's shape): the first
/// carries the id, type and name with empty arguments, the next ones argument pieces.
/// Neighbouring pieces of one call are sent as one entry.
pub fn openai_deltas(events: &[ToolCallEvent]) -> Vec<Value> {
    let mut out: Vec<Value> = vec![];
    for e in events {
        match e {
            ToolCallEvent::CallStart { index, name } => out.push(json!({
                "index": index,
                "id": super::new_id("call_"),
                "type": "function",
                "function": {"name": name, "arguments": ""},
            })),
            ToolCallEvent::Args { index, piece } => match out.last_mut() {
                Some(last) if last["index"] == *index && last.get("id").is_none() => {
                    let joined = format!(
                        "{}{piece}",
                        last["function"]["arguments"].as_str().unwrap_or("")
                    );
                    last["function"]["arguments"] = json!(joined);
                }
                _ => out.push(json!({"index": index, "function": {"arguments": piece}})),
            },
            ToolCallEvent::Content(_) | ToolCallEvent::CallEnd { .. } => {}
        }
    }
    out
}

/// Anthropic `tool_use` content blocks.
pub fn anthropic_blocks(calls: &[ToolCall]) -> Vec<Value> {
    calls
        .iter()
        .map(|c| {
            json!({"type": "tool_use", "id": super::new_id("toolu_"), "name": c.name,
                   "input": Value::Object(c.arguments.clone())})
        })
        .collect()
}
