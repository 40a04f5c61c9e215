//! The provider-neutral view of a request that the router decides on.
//!
//! The server builds a [`RouteRequest`] from whichever wire format arrived (OpenAI chat
//! completions or Anthropic Messages); `switchyard route --request FILE.json` builds one from a
//! file in either format with [`RouteRequest::from_json`]. Only text matters to routing: images
//! and other binary parts are skipped, while tool-call arguments and tool results count as text
//! because they would be sent upstream too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// A header that picks a tier explicitly, like `model`.
pub const ROUTE_HEADER: &str = "x-switchyard-route";

/// Request header that turns the cascade on or off for one request (`on` / `off`).
pub const CASCADE_HEADER: &str = "x-switchyard-cascade";

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Operator instructions (OpenAI `system`/`developer`, Anthropic top-level `system`).
    System,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// A tool result fed back to the model.
    Tool,
}

/// One message, reduced to its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// All text parts joined by newlines.
    pub text: String,
}

/// The wire format a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WireFormat {
    /// OpenAI chat completions.
    #[default]
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
}

/// A request as the router sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RouteRequest {
    /// The HTTP path it arrived on, e.g. `/v1/chat/completions`.
    pub endpoint: String,
    /// The wire format it arrived in.
    pub format: WireFormat,
    /// The `model` field: `auto`, `local`, a tier name, or a client's own model name.
    pub model: Option<String>,
    /// System / developer text (Anthropic's top-level `system`, OpenAI's system messages).
    pub system: String,
    /// The conversation, system messages excluded.
    pub messages: Vec<Message>,
    /// Whether tool definitions were sent.
    pub tools: bool,
    /// The requested output limit.
    pub max_tokens: Option<u64>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Request headers, names lower-cased. Never put the caller's credential here; use
    /// `api_key_id`.
    pub headers: BTreeMap<String, String>,
    /// String metadata (OpenAI `metadata`, Anthropic `metadata`).
    pub metadata: BTreeMap<String, String>,
    /// The end-user id (OpenAI `user`, Anthropic `metadata.user_id`).
    pub user: Option<String>,
    /// The id (not the value) of the API key the caller authenticated with.
    pub api_key_id: Option<String>,
}

/// Why a request body could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// The body is not a JSON object.
    #[error("the request body must be a JSON object")]
    NotAnObject,
    /// `messages` is missing or not an array.
    #[error("`messages` must be an array of messages")]
    NoMessages,
    /// A message is malformed.
    #[error("messages[{index}]: {problem}")]
    BadMessage {
        /// Position in `messages`.
        index: usize,
        /// What is wrong, for the API user.
        problem: String,
    },
}

fn text_of_openai_content(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| match p {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o
                    .get("text")
                    .and_then(Value::as_str)
                    .or_else(|| o.get("refusal").and_then(Value::as_str))
                    .map(str::to_string),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn text_of_anthropic_blocks(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => b.get("text").and_then(Value::as_str).map(str::to_string),
                Some("tool_use") => b.get("input").map(Value::to_string),
                Some("tool_result") => b.get("content").map(text_of_anthropic_blocks),
                Some("document") => b
                    .get("source")
                    .and_then(|s| s.get("data"))
                    .and_then(Value::as_str)
                    .filter(|_| b.pointer("/source/type").and_then(Value::as_str) == Some("text"))
                    .map(str::to_string),
                Some("thinking") => b
                    .get("thinking")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(Value::Object(o)) = v {
        for (k, v) in o {
            let s = match v {
                Value::String(s) => s.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            out.insert(k.clone(), s);
        }
    }
    out
}

fn role_of(index: usize, msg: &Value) -> Result<&str, RequestError> {
    msg.get("role")
        .and_then(Value::as_str)
        .ok_or(RequestError::BadMessage {
            index,
            problem: "`role` must be a string".into(),
        })
}

impl RouteRequest {
    /// A single user prompt (`switchyard route --prompt TEXT`).
    pub fn from_prompt(prompt: &str) -> Self {
        RouteRequest {
            endpoint: "/v1/chat/completions".into(),
            model: Some("auto".into()),
            messages: vec![Message {
                role: Role::User,
                text: prompt.to_string(),
            }],
            ..Default::default()
        }
    }

    /// From an OpenAI chat-completions body.
    pub fn from_openai_chat(body: &Value) -> Result<Self, RequestError> {
        let obj = body.as_object().ok_or(RequestError::NotAnObject)?;
        let msgs = obj
            .get("messages")
            .and_then(Value::as_array)
            .ok_or(RequestError::NoMessages)?;
        let mut req = RouteRequest {
            endpoint: "/v1/chat/completions".into(),
            format: WireFormat::OpenAi,
            ..Default::default()
        };
        let mut system = Vec::new();
        for (index, m) in msgs.iter().enumerate() {
            let role = role_of(index, m)?;
            let mut text = m
                .get("content")
                .map(text_of_openai_content)
                .unwrap_or_default();
            if let Some(Value::Array(calls)) = m.get("tool_calls") {
                for c in calls {
                    if let Some(args) = c.pointer("/function/arguments").and_then(Value::as_str) {
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(args);
                    }
                }
            }
            let role = match role {
                "system" | "developer" => {
                    system.push(text);
                    continue;
                }
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" | "function" => Role::Tool,
                other => {
                    return Err(RequestError::BadMessage {
                        index,
                        problem: format!(
                            "unknown role `{other}` (expected system, developer, user, assistant or tool)"
                        ),
                    })
                }
            };
            req.messages.push(Message { role, text });
        }
        req.system = system.join("\n");
        req.model = obj.get("model").and_then(Value::as_str).map(str::to_string);
        req.tools = obj
            .get("tools")
            .or_else(|| obj.get("functions"))
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty());
        req.max_tokens = obj
            .get("max_completion_tokens")
            .or_else(|| obj.get("max_tokens"))
            .and_then(Value::as_u64);
        req.stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
        req.metadata = string_map(obj.get("metadata"));
        req.user = obj.get("user").and_then(Value::as_str).map(str::to_string);
        Ok(req)
    }

    /// From an Anthropic Messages body.
    pub fn from_anthropic_messages(body: &Value) -> Result<Self, RequestError> {
        let obj = body.as_object().ok_or(RequestError::NotAnObject)?;
        let msgs = obj
            .get("messages")
            .and_then(Value::as_array)
            .ok_or(RequestError::NoMessages)?;
        let mut req = RouteRequest {
            endpoint: "/v1/messages".into(),
            format: WireFormat::Anthropic,
            ..Default::default()
        };
        for (index, m) in msgs.iter().enumerate() {
            let role = match role_of(index, m)? {
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(RequestError::BadMessage {
                        index,
                        problem: format!("unknown role `{other}` (expected user or assistant)"),
                    })
                }
            };
            let blocks = m.get("content").unwrap_or(&Value::Null);
            // A user turn made only of tool results is a tool message for detection purposes.
            let only_tool_results = blocks.as_array().is_some_and(|b| {
                !b.is_empty()
                    && b.iter()
                        .all(|x| x.get("type").and_then(Value::as_str) == Some("tool_result"))
            });
            let role = if role == Role::User && only_tool_results {
                Role::Tool
            } else {
                role
            };
            req.messages.push(Message {
                role,
                text: text_of_anthropic_blocks(blocks),
            });
        }
        req.system = obj
            .get("system")
            .map(text_of_anthropic_blocks)
            .unwrap_or_default();
        req.model = obj.get("model").and_then(Value::as_str).map(str::to_string);
        req.tools = obj
            .get("tools")
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty());
        req.max_tokens = obj.get("max_tokens").and_then(Value::as_u64);
        req.stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
        req.metadata = string_map(obj.get("metadata"));
        req.user = req.metadata.get("user_id").cloned();
        Ok(req)
    }

    /// From a body in either format: Anthropic when it has a top-level `system`, Anthropic
    /// content blocks (`tool_use`, `tool_result`, `image` with a `source`) or `stop_sequences`;
    /// OpenAI otherwise.
    pub fn from_json(body: &Value) -> Result<Self, RequestError> {
        if looks_anthropic(body) {
            Self::from_anthropic_messages(body)
        } else {
            Self::from_openai_chat(body)
        }
    }

    /// Sets the endpoint.
    pub fn with_endpoint(mut self, endpoint: &str) -> Self {
        self.endpoint = endpoint.to_string();
        self
    }

    /// Adds a header (name lower-cased).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .insert(name.to_ascii_lowercase(), value.to_string());
        self
    }

    /// Sets the caller's API key id.
    pub fn with_api_key_id(mut self, id: &str) -> Self {
        self.api_key_id = Some(id.to_string());
        self
    }

    /// Sets the `model` field.
    pub fn with_model(mut self, model: &str) -> Self {
        self.model = Some(model.to_string());
        self
    }

    /// The text of the latest user message (the task being asked), or "" if none.
    pub fn last_user_text(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map_or("", |m| m.text.as_str())
    }

    /// The texts written by `roles`, in order (system first when asked for).
    pub fn texts<'a>(&'a self, roles: &'a [Role]) -> impl Iterator<Item = &'a str> + 'a {
        let system = roles
            .contains(&Role::System)
            .then_some(self.system.as_str())
            .filter(|s| !s.is_empty());
        system.into_iter().chain(
            self.messages
                .iter()
                .filter(move |m| roles.contains(&m.role))
                .map(|m| m.text.as_str()),
        )
    }

    /// Characters of all text that would be sent upstream.
    pub fn total_chars(&self) -> usize {
        self.system.chars().count()
            + self
                .messages
                .iter()
                .map(|m| m.text.chars().count())
                .sum::<usize>()
    }

    /// A tokenizer-free estimate of the prompt tokens: one token per four characters, the usual
    /// rule of thumb for English BPE vocabularies.
    pub fn estimated_tokens(&self) -> usize {
        self.total_chars().div_ceil(4)
    }
}

fn looks_anthropic(body: &Value) -> bool {
    if body.get("system").is_some() || body.get("stop_sequences").is_some() {
        return true;
    }
    let Some(msgs) = body.get("messages").and_then(Value::as_array) else {
        return false;
    };
    msgs.iter().any(|m| {
        m.get("content")
            .and_then(Value::as_array)
            .is_some_and(|blocks| {
                blocks.iter().any(|b| {
                    matches!(
                        b.get("type").and_then(Value::as_str),
                        Some("tool_use" | "tool_result" | "document" | "thinking")
                    ) || (b.get("type").and_then(Value::as_str) == Some("image")
                        && b.get("source").is_some())
                })
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn openai_body() {
        let body = json!({
            "model": "auto",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "data:"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"q\":1}"}}]},
                {"role": "tool", "tool_call_id": "1", "content": "result"}
            ],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "max_completion_tokens": 64, "stream": true, "user": "u1",
            "metadata": {"team": "search"}
        });
        let r = RouteRequest::from_json(&body).unwrap();
        assert_eq!(r.format, WireFormat::OpenAi);
        assert_eq!(r.system, "Be brief.");
        assert_eq!(r.messages.len(), 3);
        assert_eq!(r.messages[0].text, "hello");
        assert_eq!(r.messages[1].text, "{\"q\":1}");
        assert_eq!(r.messages[2].role, Role::Tool);
        assert!(r.tools && r.stream);
        assert_eq!(r.max_tokens, Some(64));
        assert_eq!(r.user.as_deref(), Some("u1"));
        assert_eq!(r.metadata["team"], "search");
        assert_eq!(r.last_user_text(), "hello");
    }

    #[test]
    fn anthropic_body() {
        let body = json!({
            "model": "claude", "max_tokens": 100,
            "system": [{"type": "text", "text": "You are terse."}],
            "messages": [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "calc", "input": {"expr": "2+2"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "4"}]}
            ],
            "metadata": {"user_id": "alice"}
        });
        let r = RouteRequest::from_json(&body).unwrap();
        assert_eq!(r.format, WireFormat::Anthropic);
        assert_eq!(r.endpoint, "/v1/messages");
        assert_eq!(r.system, "You are terse.");
        assert_eq!(r.messages[2].role, Role::Tool);
        assert_eq!(r.messages[2].text, "4");
        assert!(r.messages[1].text.contains("2+2"));
        assert_eq!(r.last_user_text(), "What is 2+2?");
        assert_eq!(r.user.as_deref(), Some("alice"));
        assert_eq!(r.max_tokens, Some(100));
    }

    #[test]
    fn bad_bodies_are_errors_not_panics() {
        assert_eq!(
            RouteRequest::from_json(&json!([1])),
            Err(RequestError::NotAnObject)
        );
        assert_eq!(
            RouteRequest::from_json(&json!({"model": "x"})),
            Err(RequestError::NoMessages)
        );
        assert!(matches!(
            RouteRequest::from_openai_chat(&json!({"messages": [{"content": "hi"}]})),
            Err(RequestError::BadMessage { index: 0, .. })
        ));
        assert!(matches!(
            RouteRequest::from_anthropic_messages(
                &json!({"messages": [{"role": "system", "content": "x"}]})
            ),
            Err(RequestError::BadMessage { index: 0, .. })
        ));
    }
}
