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
                let (name, mut rest) = match body.find("<arg_key>") {
                    Some(i) => (body[..i].trim(), &body[i..]),
                    None => (body.trim(), ""),
                };
                if name.is_empty() || name.contains(char::is_whitespace) {
                    return None;
                }
                let schema = tools
                    .iter()
                    .find(|t| name_of(t) == Some(name))
                    .map(parameters_of);
                let mut arguments = Map::new();
                while let Some(k0) = rest.find("<arg_key>") {
                    let k1 = rest.find("</arg_key>")?;
                    let key = rest[k0 + "<arg_key>".len()..k1].trim().to_string();
                    let after = &rest[k1 + "</arg_key>".len()..];
                    let v0 = after.find("<arg_value>")?;
                    let v1 = after.find("</arg_value>")?;
                    let raw = &after[v0 + "<arg_value>".len()..v1];
                    let is_string = schema
                        .as_ref()
                        .and_then(|s| s.get("properties")?.get(&key)?.get("type")?.as_str())
                        .is_some_and(|t| t == "string");
                    let value = if is_string {
                        Value::String(raw.to_string())
                    } else {
                        serde_json::from_str(raw.trim())
                            .unwrap_or_else(|_| Value::String(raw.to_string()))
                    };
                    arguments.insert(key, value);
                    rest = &after[v1 + "</arg_value>".len()..];
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
                            "/[^<]*/".to_string()
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

/// A Lark string literal (JSON's quoting).
fn lark_str(s: &str) -> String {
    Value::from(s).to_string()
}

/// Streams a tool-calling answer: text before the first `<tool_call>` is released as it
/// arrives (except a tail that might be the start of the marker), the rest is held until the
/// end and parsed there.
#[derive(Debug, Default)]
pub struct ToolCallStream {
    released: usize,
    text: String,
    in_calls: bool,
}

impl ToolCallStream {
    /// Adds generated text; returns the part that is safe to send as content now.
    pub fn push(&mut self, delta: &str) -> String {
        self.text.push_str(delta);
        if self.in_calls {
            return String::new();
        }
        let pending = &self.text[self.released..];
        if let Some(i) = pending.find(CALL_START) {
            self.in_calls = true;
            let out = pending[..i].to_string();
            self.released += i;
            return out;
        }
        // Hold back a suffix that could still grow into the marker.
        let mut keep = 0;
        for n in (1..CALL_START.len()).rev() {
            if pending.len() >= n
                && pending.is_char_boundary(pending.len() - n)
                && CALL_START.starts_with(&pending[pending.len() - n..])
            {
                keep = n;
                break;
            }
        }
        let out = pending[..pending.len() - keep].to_string();
        self.released += out.len();
        out
    }

    /// The end: content not yet released and the calls. When the calls do not parse, the
    /// held text is released as content instead.
    pub fn finish(self, format: ToolCallFormat, tools: &[Value]) -> (String, Vec<ToolCall>) {
        let held = &self.text[self.released..];
        let parsed = format.parse(held, tools);
        if parsed.calls.is_empty() {
            return (held.to_string(), vec![]);
        }
        (parsed.content, parsed.calls)
    }
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

    #[test]
    fn the_stream_holds_back_a_partial_marker_and_the_calls() {
        let mut s = ToolCallStream::default();
        assert_eq!(s.push("Sure"), "Sure");
        assert_eq!(s.push(", <tool"), ", ");
        assert_eq!(s.push("_c"), "");
        assert_eq!(
            s.push("all>{\"name\": \"get_weather\", \"arguments\": {}}"),
            ""
        );
        assert_eq!(s.push("</tool_call>"), "");
        let (content, calls) = s.finish(ToolCallFormat::Hermes, &weather());
        assert_eq!(content, "");
        assert_eq!(calls[0].name, "get_weather");
        // A `<` that is not a marker is released once it cannot be one.
        let mut s = ToolCallStream::default();
        assert_eq!(s.push("a <"), "a ");
        assert_eq!(s.push("b"), "<b");
        let (content, calls) = s.finish(ToolCallFormat::Hermes, &[]);
        assert_eq!((content.as_str(), calls.len()), ("", 0));
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
