//! Chat templates: renders a conversation into the prompt text a model was trained on, with the
//! Jinja template the model ships, evaluated by minijinja the way transformers' `apply_chat_template`
//! evaluates it under Jinja2.
//!
//! Where the template comes from ([`ChatTemplate::from_model_dir`]): `chat_template.jinja` in the
//! model folder, else `chat_template.json`'s `chat_template`, else `tokenizer_config.json`'s
//! `chat_template` (a string, or a list of `{name, template}` from which `default` is used, and
//! `tool_use` when the request has tools), else the built-in ChatML template.
//!
//! What the environment provides, matching transformers: `trim_blocks` and `lstrip_blocks`,
//! loop controls (`break`/`continue`), `raise_exception(msg)`, `strftime_now(format)`, a
//! `tojson` filter that writes JSON like Python's `json.dumps` (`indent`, `separators`,
//! `sort_keys`, `ensure_ascii`; no HTML escaping), Python string/dict methods (`.strip()`,
//! `.split()`, `.items()`, … via minijinja-contrib's pycompat), and the `{% generation %}` block
//! (rendered as its plain body). The context holds `messages`, `add_generation_prompt`, `tools`
//! (`none` when absent), `bos_token`/`eos_token` from `tokenizer_config.json`, and any extra
//! keyword arguments (e.g. Hy3's `reasoning_effort`).
//!
//! Message content may be a string or a list of `{"type": "text", "text": ...}` parts. Like vLLM,
//! a template that loops over `content` gets the list; any other template gets the text parts
//! joined with `\n`, so templates written for string content keep working.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value as JinjaValue};
use minijinja::{AutoEscape, Environment, Error as JinjaError, ErrorKind};
use serde_json::{Map, Value};

use crate::tool_calls::ToolCallFormat;

/// The ChatML template, used when a model folder has no template of its own.
pub const CHATML_TEMPLATE: &str = include_str!("../../../models/templates/chatml.jinja");
/// The Hy3 template (format documented at the top of the file).
pub const HY3_TEMPLATE: &str = include_str!("../../../models/templates/hy3.jinja");

/// ChatML's special tokens (`<|im_end|>` ends a turn).
pub const CHATML_SPECIAL_TOKENS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Hy3's BOS token.
pub const HY3_BOS_TOKEN: &str = "<｜hy_begin▁of▁sentence｜>";
/// Hy3's end-of-turn token: the eos generation stops on.
pub const HY3_EOS_TOKEN: &str = "<｜hy_place▁holder▁no▁2｜>";
/// The special tokens the Hy3 template uses, for building a test tokenizer that matches it.
pub const HY3_SPECIAL_TOKENS: &[&str] = &[
    HY3_BOS_TOKEN,
    "<｜hy_end▁of▁sentence｜>",
    "<｜hy_User｜>",
    "<｜hy_Assistant｜>",
    HY3_EOS_TOKEN,
    "<｜hy_place▁holder▁no▁3｜>",
];

/// Template file a model folder may hold.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// JSON file some processors write, `{"chat_template": "..."}`.
pub const CHAT_TEMPLATE_JSON_FILE: &str = "chat_template.json";
const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// Name of the template used when the request has no tools (or there is no `tool_use` one).
const DEFAULT_TEMPLATE: &str = "default";
/// Name of the template transformers picks when the request has tools.
const TOOL_USE_TEMPLATE: &str = "tool_use";

/// Errors from loading or rendering a chat template; each says which template or file.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A config file is malformed.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The template does not parse.
    #[error("the chat template {template} does not parse: {message}")]
    Syntax {
        /// Where the template came from.
        template: String,
        /// minijinja's message, with the line.
        message: String,
    },
    /// Rendering failed: the template called `raise_exception`, or used a value wrongly.
    #[error("the chat template {template} rejected the conversation: {message}")]
    Render {
        /// Where the template came from.
        template: String,
        /// The template's own message (for `raise_exception`) or minijinja's.
        message: String,
    },
    /// `continue_final_message` was asked for, but the conversation cannot be continued.
    #[error("cannot continue the final message: {0}")]
    ContinueFinal(String),
    /// A message has content this text-only path cannot render.
    #[error(
        "message {message} has a content part of type \"{kind}\"; only text parts are supported"
    )]
    UnsupportedContent {
        /// Index of the message.
        message: usize,
        /// The part's `type`.
        kind: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, ChatTemplateError>;

/// One chat message. Fields other than `role` and `content` (`tool_calls`, `tool_call_id`,
/// `name`, `reasoning_content`, ...) are passed to the template unchanged.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// The text, as a string or a list of parts; `None` for e.g. an assistant turn that only
    /// calls tools.
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Everything else in the message object.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    /// A message with string content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Some(MessageContent::Text(content.into())),
            extra: Map::new(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }

    /// Adds an extra field (`tool_calls`, `reasoning_content`, ...).
    pub fn with_field(mut self, key: impl Into<String>, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }
}

/// Message content: a string, or OpenAI-style parts.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": ...}, ...]`.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContentPart {
    /// `text`, `image_url`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Other fields of the part.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ContentPart {
    /// A text part.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            kind: "text".into(),
            text: Some(text.into()),
            extra: Map::new(),
        }
    }
}

/// Cuts `rendered` right after the final message's text, so generation continues it: the last
/// occurrence of its text (or of the text trimmed, for templates that trim), as transformers'
/// `continue_final_message` does.
fn continue_final(mut rendered: String, messages: &[ChatMessage]) -> Result<String> {
    let Some(last) = messages.last() else {
        return Err(ChatTemplateError::ContinueFinal(
            "there are no messages".into(),
        ));
    };
    if last.role != "assistant" {
        return Err(ChatTemplateError::ContinueFinal(format!(
            "the final message is from {:?}; only an assistant message can be continued",
            last.role
        )));
    }
    let text = match &last.content {
        Some(MessageContent::Text(t)) => t.clone(),
        Some(MessageContent::Parts(ps)) => {
            ps.last().and_then(|p| p.text.clone()).unwrap_or_default()
        }
        None => String::new(),
    };
    if text.trim().is_empty() {
        return Err(ChatTemplateError::ContinueFinal(
            "the final assistant message has no text to continue".into(),
        ));
    }
    for needle in [text.as_str(), text.trim()] {
        if let Some(at) = rendered.rfind(needle) {
            rendered.truncate(at + needle.len());
            return Ok(rendered);
        }
    }
    Err(ChatTemplateError::ContinueFinal(
        "the chat template does not reproduce the final message's text".into(),
    ))
}

/// Per-request rendering options.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenderOptions {
    /// End with the header of an assistant turn, so the model writes the reply.
    pub add_generation_prompt: bool,
    /// End inside the final (assistant) message, so the model continues its text (Anthropic's
    /// prefill, vLLM's `continue_final_message`): rendered without the generation prompt and
    /// cut right after that message's text, as transformers does.
    pub continue_final_message: bool,
    /// Tool definitions (OpenAI `tools`), passed as `tools`.
    pub tools: Option<Vec<Value>>,
    /// Extra template variables (vLLM's `chat_template_kwargs`), e.g. `reasoning_effort`.
    pub kwargs: Map<String, Value>,
}

impl RenderOptions {
    /// Options with the generation prompt on.
    pub fn generation() -> Self {
        Self {
            add_generation_prompt: true,
            ..Self::default()
        }
    }

    /// Sets one template variable.
    pub fn with_kwarg(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.kwargs.insert(key.into(), value.into());
        self
    }

    /// Sets the tool definitions.
    pub fn with_tools(mut self, tools: Vec<Value>) -> Self {
        self.tools = Some(tools);
        self
    }
}

/// A compiled chat template (one, or a named set from `tokenizer_config.json`).
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where it came from, for error messages.
    origin: String,
    /// Names of the compiled templates, with whether each loops over message content parts.
    names: BTreeMap<String, bool>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Whether any of the templates reads `tools`.
    renders_tools: bool,
    /// How the templates write tool calls, when they do.
    tool_format: Option<ToolCallFormat>,
}

impl ChatTemplate {
    /// Compiles one template; `origin` says where it came from in error messages.
    pub fn new(source: &str, origin: impl Into<String>) -> Result<Self> {
        Self::from_named(
            vec![(DEFAULT_TEMPLATE.to_string(), source.to_string())],
            origin.into(),
        )
    }

    /// The built-in ChatML template.
    pub fn chatml() -> Result<Self> {
        Self::new(CHATML_TEMPLATE, "chatml (built in)")
    }

    /// The built-in Hy3 template, with Hy3's BOS and end-of-turn tokens.
    pub fn hy3() -> Result<Self> {
        Ok(Self::new(HY3_TEMPLATE, "hy3 (built in)")?
            .with_special_tokens(Some(HY3_BOS_TOKEN.into()), Some(HY3_EOS_TOKEN.into())))
    }

    /// The template a model folder asks for, or ChatML when it has none (see the module docs for
    /// the search order). `bos_token`/`eos_token` come from `tokenizer_config.json`.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        match Self::find_in_model_dir(dir.as_ref())? {
            Some(template) => Ok(template),
            None => {
                tracing::info!(
                    dir = %dir.as_ref().display(),
                    "the model has no chat template; using ChatML"
                );
                let (bos, eos) = special_tokens_of(dir.as_ref())?;
                Ok(Self::chatml()?.with_special_tokens(bos, eos))
            }
        }
    }

    /// The template a model folder holds, if any.
    pub fn find_in_model_dir(dir: &Path) -> Result<Option<Self>> {
        let (bos, eos) = special_tokens_of(dir)?;
        let jinja = dir.join(CHAT_TEMPLATE_FILE);
        if let Some(source) = read_if_exists(&jinja)? {
            let origin = jinja.display().to_string();
            return Ok(Some(
                Self::new(&source, origin)?.with_special_tokens(bos, eos),
            ));
        }
        let json_path = dir.join(CHAT_TEMPLATE_JSON_FILE);
        if let Some(text) = read_if_exists(&json_path)? {
            let config = parse_json(&json_path, &text)?;
            if let Some(named) = templates_of(&config, &json_path)? {
                let origin = json_path.display().to_string();
                return Ok(Some(
                    Self::from_named(named, origin)?.with_special_tokens(bos, eos),
                ));
            }
        }
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        if let Some(text) = read_if_exists(&config_path)? {
            let config = parse_json(&config_path, &text)?;
            if let Some(named) = templates_of(&config, &config_path)? {
                let origin = format!("chat_template in {}", config_path.display());
                return Ok(Some(
                    Self::from_named(named, origin)?.with_special_tokens(bos, eos),
                ));
            }
        }
        Ok(None)
    }

    /// Sets the `bos_token` / `eos_token` variables.
    pub fn with_special_tokens(mut self, bos: Option<String>, eos: Option<String>) -> Self {
        self.bos_token = bos;
        self.eos_token = eos;
        self
    }

    /// The tool-call format the template asks for, when it renders tools and writes calls in a
    /// known format ([`ToolCallFormat`]); `None` means requests with tools need another
    /// template (the built-in ChatML one).
    pub fn tool_call_format(&self) -> Option<ToolCallFormat> {
        self.tool_format.filter(|_| self.renders_tools)
    }

    /// The template to render requests with tools when this one cannot (it ignores `tools` or
    /// writes calls in no known format): the built-in ChatML one, whose calls are Hermes-style,
    /// with this template's special tokens. `None` when this template handles tools itself.
    pub fn tools_fallback(&self) -> Result<Option<Self>> {
        if self.tool_call_format().is_some() {
            return Ok(None);
        }
        Ok(Some(Self::chatml()?.with_special_tokens(
            self.bos_token.clone(),
            self.eos_token.clone(),
        )))
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders `messages` into prompt text.
    pub fn render(&self, messages: &[ChatMessage], options: &RenderOptions) -> Result<String> {
        let has_tools = options.tools.as_ref().is_some_and(|t| !t.is_empty());
        let name = if has_tools && self.names.contains_key(TOOL_USE_TEMPLATE) {
            TOOL_USE_TEMPLATE
        } else if self.names.contains_key(DEFAULT_TEMPLATE) {
            DEFAULT_TEMPLATE
        } else {
            // A named set without `default`: transformers refuses; take the first instead of
            // failing a request over a naming quirk.
            self.names
                .keys()
                .next()
                .map(String::as_str)
                .unwrap_or(DEFAULT_TEMPLATE)
        };
        let parts_aware = self.names.get(name).copied().unwrap_or(false);

        let mut context = Map::new();
        if let Some(bos) = &self.bos_token {
            context.insert("bos_token".into(), Value::String(bos.clone()));
        }
        if let Some(eos) = &self.eos_token {
            context.insert("eos_token".into(), Value::String(eos.clone()));
        }
        for (key, value) in &options.kwargs {
            context.insert(key.clone(), value.clone());
        }
        let messages_in = messages;
        let messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| message_value(i, m, parts_aware))
            .collect::<Result<Vec<_>>>()?;
        context.insert("messages".into(), Value::Array(messages));
        context.insert(
            "add_generation_prompt".into(),
            Value::Bool(options.add_generation_prompt && !options.continue_final_message),
        );
        context.insert(
            "tools".into(),
            options
                .tools
                .clone()
                .map(Value::Array)
                .unwrap_or(Value::Null),
        );

        let template = self
            .env
            .get_template(name)
            .map_err(|e| self.render_error(&e))?;
        let text = template
            .render(JinjaValue::from_serialize(&context))
            .map_err(|e| self.render_error(&e))?;
        if options.continue_final_message {
            return continue_final(text, messages_in);
        }
        Ok(text)
    }

    fn from_named(templates: Vec<(String, String)>, origin: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        let mut names = BTreeMap::new();
        let all: String = templates.iter().map(|(_, s)| s.as_str()).collect();
        let renders_tools = all.contains("tools");
        let tool_format = ToolCallFormat::detect(&all);
        for (name, source) in templates {
            let parts_aware = loops_over_content(&source);
            let source = rewrite_generation_blocks(&source);
            env.add_template_owned(name.clone(), source).map_err(|e| {
                ChatTemplateError::Syntax {
                    template: if name == DEFAULT_TEMPLATE {
                        origin.clone()
                    } else {
                        format!("{origin} ({name})")
                    },
                    message: describe(&e),
                }
            })?;
            names.insert(name, parts_aware);
        }
        Ok(Self {
            env,
            origin,
            names,
            bos_token: None,
            eos_token: None,
            renders_tools,
            tool_format,
        })
    }

    fn render_error(&self, e: &JinjaError) -> ChatTemplateError {
        ChatTemplateError::Render {
            template: self.origin.clone(),
            message: describe(e),
        }
    }
}

/// minijinja's message without its kind prefix for template-raised errors, plus the line.
fn describe(e: &JinjaError) -> String {
    let mut message = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        if !message.contains("line") {
            message.push_str(&format!(" (line {line})"));
        }
    }
    message
}

/// The JSON a template sees for one message.
fn message_value(index: usize, message: &ChatMessage, parts_aware: bool) -> Result<Value> {
    let mut object = Map::new();
    object.insert("role".into(), Value::String(message.role.clone()));
    let content = match &message.content {
        None => Value::Null,
        Some(MessageContent::Text(text)) => Value::String(text.clone()),
        Some(MessageContent::Parts(parts)) => {
            if let Some(part) = parts.iter().find(|p| p.kind != "text") {
                return Err(ChatTemplateError::UnsupportedContent {
                    message: index,
                    kind: part.kind.clone(),
                });
            }
            if parts_aware {
                serde_json::to_value(parts).unwrap_or(Value::Null)
            } else {
                let texts: Vec<&str> = parts.iter().filter_map(|p| p.text.as_deref()).collect();
                Value::String(texts.join("\n"))
            }
        }
    };
    object.insert("content".into(), content);
    for (key, value) in &message.extra {
        object.insert(key.clone(), value.clone());
    }
    Ok(Value::Object(object))
}

/// Whether a template loops over a message's content (`{% for part in message['content'] %}`):
/// such templates get content parts as a list, others a joined string (vLLM's detection idea).
fn loops_over_content(source: &str) -> bool {
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("%}") else { break };
        let tag = after[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if let Some(header) = tag.strip_prefix("for ") {
            if let Some(pos) = header.rfind(" in ") {
                if header[pos + 4..].contains("content") {
                    return true;
                }
            }
        }
        rest = &after[end + 2..];
    }
    false
}

/// Turns transformers' `{% generation %}…{% endgeneration %}` (which marks assistant text for
/// training masks) into `{% if true %}…{% endif %}`, keeping whitespace-control markers.
fn rewrite_generation_blocks(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("%}") else { break };
        let inner = &after[..end];
        let word = inner.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start + 2]);
        match word {
            "generation" => out.push_str(&inner.replacen("generation", "if true", 1)),
            "endgeneration" => out.push_str(&inner.replacen("endgeneration", "endif", 1)),
            _ => out.push_str(inner),
        }
        out.push_str("%}");
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

fn read_if_exists(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ChatTemplateError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn parse_json(path: &Path, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| ChatTemplateError::Config {
        path: path.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })
}

/// `chat_template` as a string, or a list of `{name, template}`.
fn templates_of(config: &Value, path: &Path) -> Result<Option<Vec<(String, String)>>> {
    let bad = |message: String| ChatTemplateError::Config {
        path: path.to_path_buf(),
        message,
    };
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(source)) => Ok(Some(vec![(DEFAULT_TEMPLATE.into(), source.clone())])),
        Some(Value::Array(items)) => {
            let mut named = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match (
                    item.get("name").and_then(Value::as_str),
                    item.get("template").and_then(Value::as_str),
                ) {
                    (Some(name), Some(template)) => {
                        named.push((name.to_string(), template.to_string()))
                    }
                    _ => {
                        return Err(bad(format!(
                            "chat_template[{i}] must be {{\"name\": string, \"template\": string}}"
                        )))
                    }
                }
            }
            Ok((!named.is_empty()).then_some(named))
        }
        Some(other) => Err(bad(format!(
            "chat_template must be a string or a list of {{name, template}}, not {other}"
        ))),
    }
}

/// `bos_token` / `eos_token` from `tokenizer_config.json` (string or `{content}`).
fn special_tokens_of(dir: &Path) -> Result<(Option<String>, Option<String>)> {
    let path = dir.join(TOKENIZER_CONFIG_FILE);
    let Some(text) = read_if_exists(&path)? else {
        return Ok((None, None));
    };
    let config = parse_json(&path, &text)?;
    let token = |field: &str| match config.get(field) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    };
    Ok((token("bos_token"), token("eos_token")))
}

// ---------------------------------------------------------------------------------------------
// Functions and filters transformers defines for chat templates.
// ---------------------------------------------------------------------------------------------

/// `raise_exception(message)`: fails the render with the template's own message.
fn raise_exception(message: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current time (UTC) formatted like Python's `strftime`.
fn strftime_now(format: String) -> std::result::Result<String, JinjaError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(strftime(&format, now))
}

const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Formats a Unix time (UTC) with Python `strftime` directives: `%Y %y %m %B %b %d %e %j %H %I
/// %M %S %p %A %a %w %u %Z %z %F %T %D %%`, and glibc's `%-d`-style no-padding flag. Unknown
/// directives are copied as written.
fn strftime(format: &str, unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |v: i64, width: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(month, 2)),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('d') => out.push_str(&num(day, 2)),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('w') => out.push_str(&((weekday + 1) % 7).to_string()),
            Some('u') => out.push_str(&(weekday + 1).to_string()),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('F') => out.push_str(&format!("{year:04}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('D') => out.push_str(&format!("{month:02}/{day:02}/{:02}", year.rem_euclid(100))),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month 1–12, day 1–31), proleptic Gregorian calendar
/// (Howard Hinnant's era-based algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) → days since 1970-01-01; inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `tojson`, as transformers defines it: Python's `json.dumps(value, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)`, keyword arguments as in Python. Unlike
/// Jinja's own filter it does not HTML-escape, so `<`, `>` and `&` reach the prompt unchanged.
fn tojson(value: &JinjaValue, kwargs: Kwargs) -> std::result::Result<String, JinjaError> {
    let indent: Option<JinjaValue> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<JinjaValue> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (None, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .unwrap_or_default();
            match parts.as_slice() {
                [item, key] => (item.clone(), key.clone()),
                _ => {
                    return Err(JinjaError::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        // Python's defaults: ", " without indent, "," with it (the newline does the spacing).
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let json = serde_json::to_value(value).map_err(|e| {
        JinjaError::new(
            ErrorKind::BadSerialization,
            format!("tojson: value cannot be written as JSON: {e}"),
        )
    })?;
    let style = PyJson {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(out)
}

/// Python `json.dumps` output style.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson {
    fn write(&self, value: &Value, depth: usize, out: &mut String) {
        match value {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => out.push_str(&py_number(n)),
            Value::String(s) => self.write_str(s, out),
            Value::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separator(i, depth + 1, out);
                    self.write(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push(']');
            }
            Value::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    self.separator(i, depth + 1, out);
                    self.write_str(key, out);
                    out.push_str(&self.key_sep);
                    self.write(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push('}');
            }
        }
    }

    fn separator(&self, index: usize, depth: usize, out: &mut String) {
        if index > 0 {
            out.push_str(&self.item_sep);
        }
        self.newline(depth, out);
    }

    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A JSON number as Python's `repr` writes it: integers plainly, floats with a `.0` when whole
/// and with `e-05` / `e+16` style exponents.
fn py_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let Some(f) = n.as_f64() else {
        return n.to_string();
    };
    // Rust's `{:?}` is the shortest round-trip form and switches to exponents at the same
    // magnitudes as Python's repr (below 1e-4, at or above 1e16); only the exponent's spelling
    // differs ("1e-5" vs "1e-05").
    let text = format!("{f:?}");
    match text.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::system("You are terse."),
            ChatMessage::user("Hi"),
            ChatMessage::assistant("Hello."),
            ChatMessage::user("2+2?"),
        ]
    }

    fn render(t: &ChatTemplate, messages: &[ChatMessage], options: &RenderOptions) -> String {
        t.render(messages, options).unwrap()
    }

    #[test]
    fn chatml_multi_turn() {
        let t = ChatTemplate::chatml().unwrap();
        let body = "<|im_start|>system\nYou are terse.<|im_end|>\n\
                    <|im_start|>user\nHi<|im_end|>\n\
                    <|im_start|>assistant\nHello.<|im_end|>\n\
                    <|im_start|>user\n2+2?<|im_end|>\n";
        assert_eq!(render(&t, &conversation(), &RenderOptions::default()), body);
        assert_eq!(
            render(&t, &conversation(), &RenderOptions::generation()),
            format!("{body}<|im_start|>assistant\n")
        );
    }

    #[test]
    fn continue_final_message_ends_inside_the_assistant_text() {
        let t = ChatTemplate::chatml().unwrap();
        let mut msgs = conversation();
        msgs.push(ChatMessage::assistant("It is"));
        let opts = RenderOptions {
            continue_final_message: true,
            ..RenderOptions::generation()
        };
        // Transformers' rule: the whole render without the generation prompt, cut after the
        // final message's text (here: drop its `<|im_end|>\n`).
        let whole = render(&t, &msgs, &RenderOptions::default());
        let want = whole.strip_suffix("<|im_end|>\n").unwrap();
        assert_eq!(render(&t, &msgs, &opts), want);
        assert!(want.ends_with("<|im_start|>assistant\nIt is"));
        // Only an assistant message with text can be continued.
        for bad in [conversation(), vec![ChatMessage::assistant("")]] {
            let e = t.render(&bad, &opts).unwrap_err();
            assert!(matches!(e, ChatTemplateError::ContinueFinal(_)), "{e}");
        }
    }

    #[test]
    fn chatml_with_tools_and_tool_calls() {
        let t = ChatTemplate::chatml().unwrap();
        let tools =
            vec![json!({"type": "function", "function": {"name": "add", "parameters": {}}})];
        let messages = vec![
            ChatMessage::user("add 1 and 2"),
            ChatMessage {
                role: "assistant".into(),
                content: None,
                extra: Map::new(),
            }
            .with_field(
                "tool_calls",
                json!([{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]),
            ),
            ChatMessage::new("tool", "3"),
        ];
        let out = render(
            &t,
            &messages,
            &RenderOptions::generation().with_tools(tools),
        );
        assert!(out.starts_with("<|im_start|>system\n# Tools"), "{out}");
        assert!(
            out.contains(r#"{"type": "function", "function": {"name": "add", "parameters": {}}}"#)
        );
        assert!(out.contains(
            "<|im_start|>assistant\n<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}</tool_call><|im_end|>\n"
        ), "{out}");
        assert!(out.contains("<|im_start|>tool\n3<|im_end|>\n"));
    }

    const B: &str = "<｜hy_begin▁of▁sentence｜>";
    const U: &str = "<｜hy_User｜>";
    const A: &str = "<｜hy_Assistant｜>";
    const E: &str = "<｜hy_place▁holder▁no▁2｜>";
    const S: &str = "<｜hy_place▁holder▁no▁3｜>";

    #[test]
    fn hy3_multi_turn_and_generation_prompt() {
        let t = ChatTemplate::hy3().unwrap();
        let body = format!("{B}You are terse.{S}{U}Hi{A}Hello.{E}{U}2+2?");
        assert_eq!(render(&t, &conversation(), &RenderOptions::default()), body);
        assert_eq!(
            render(&t, &conversation(), &RenderOptions::generation()),
            format!("{body}{A}<think>\n")
        );
        // Without a system message there is no system block.
        let out = render(&t, &[ChatMessage::user("Hi")], &RenderOptions::generation());
        assert_eq!(out, format!("{B}{U}Hi{A}<think>\n"));
    }

    #[test]
    fn hy3_reasoning_effort() {
        let t = ChatTemplate::hy3().unwrap();
        let msgs = [ChatMessage::user("Hi")];
        let with = |effort: &str| {
            t.render(
                &msgs,
                &RenderOptions::generation().with_kwarg("reasoning_effort", effort),
            )
        };
        assert_eq!(with("high").unwrap(), format!("{B}{U}Hi{A}<think>\n"));
        assert_eq!(
            with("no_think").unwrap(),
            format!("{B}{U}Hi{A}<think>\n\n</think>\n")
        );
        assert_eq!(
            with("low").unwrap(),
            format!("{B}<reasoning_effort>low</reasoning_effort>\n{S}{U}Hi{A}<think>\n")
        );
        let err = with("medium").unwrap_err().to_string();
        assert!(err.contains("reasoning_effort must be"), "{err}");
        assert!(err.contains("medium"), "{err}");
    }

    #[test]
    fn hy3_keeps_reasoning_only_after_the_last_user_turn() {
        let t = ChatTemplate::hy3().unwrap();
        let msgs = vec![
            ChatMessage::user("q1"),
            ChatMessage::assistant("a1").with_field("reasoning_content", json!("old thought")),
            ChatMessage::user("q2"),
            ChatMessage::assistant("")
                .with_field("reasoning_content", json!("need a tool"))
                .with_field(
                    "tool_calls",
                    json!([{"function": {"name": "search", "arguments": {"q": "rust", "n": 3}}}]),
                ),
            ChatMessage::new("tool", "r1"),
            ChatMessage::new("tool", "r2"),
        ];
        let tools = vec![json!({"name": "search"})];
        let out = render(&t, &msgs, &RenderOptions::generation().with_tools(tools));
        let expected_tail = format!(
            "{U}q1{A}a1{E}{U}q2{A}<think>\nneed a tool\n</think>\n<tool_call>search\n\
             <arg_key>q</arg_key>\n<arg_value>rust</arg_value>\n\
             <arg_key>n</arg_key>\n<arg_value>3</arg_value>\n</tool_call>{E}\
             {U}<tool_response>\nr1\n</tool_response><tool_response>\nr2\n</tool_response>\
             {A}<think>\n"
        );
        assert!(out.ends_with(&expected_tail), "{out}");
        assert!(out.starts_with(&format!("{B}# Tools")), "{out}");
        assert!(!out.contains("old thought"));
    }

    #[test]
    fn raise_exception_becomes_an_error_with_the_message() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}",
            "test",
        )
        .unwrap();
        let err = t
            .render(&[ChatMessage::system("x")], &RenderOptions::default())
            .unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render { .. }));
        let text = err.to_string();
        assert!(
            text.contains("Conversations must start with a user message"),
            "{text}"
        );
        assert!(text.contains("test"), "{text}");
        let err = ChatTemplate::hy3()
            .unwrap()
            .render(&[ChatMessage::new("robot", "x")], &RenderOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown message role \"robot\""), "{err}");
    }

    #[test]
    fn syntax_errors_are_reported() {
        let err = ChatTemplate::new("{% for m in messages %}", "broken").unwrap_err();
        assert!(matches!(err, ChatTemplateError::Syntax { .. }), "{err}");
    }

    #[test]
    fn content_parts_are_joined_or_passed_as_a_list() {
        let parts = ChatMessage {
            role: "user".into(),
            content: Some(MessageContent::Parts(vec![
                ContentPart::text("first"),
                ContentPart::text("second"),
            ])),
            extra: Map::new(),
        };
        let t = ChatTemplate::chatml().unwrap();
        assert_eq!(
            render(&t, std::slice::from_ref(&parts), &RenderOptions::default()),
            "<|im_start|>user\nfirst\nsecond<|im_end|>\n"
        );
        let hy3 = ChatTemplate::hy3().unwrap();
        assert!(render(
            &hy3,
            std::slice::from_ref(&parts),
            &RenderOptions::default()
        )
        .ends_with(&format!("{U}first\nsecond")));
        // A template that loops over content gets the parts themselves.
        let looping = ChatTemplate::new(
            "{% for m in messages %}{% for p in m['content'] %}[{{ p.type }}:{{ p.text }}]{% endfor %}{% endfor %}",
            "looping",
        )
        .unwrap();
        assert_eq!(
            render(
                &looping,
                std::slice::from_ref(&parts),
                &RenderOptions::default()
            ),
            "[text:first][text:second]"
        );
        // Deserialised from the OpenAI wire format.
        let wire: ChatMessage = serde_json::from_value(json!({
            "role": "user", "content": [{"type": "text", "text": "hi"}], "name": "bob"
        }))
        .unwrap();
        assert_eq!(wire.extra.get("name"), Some(&json!("bob")));
        let image: ChatMessage = serde_json::from_value(json!({
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]
        }))
        .unwrap();
        let err = t.render(&[image], &RenderOptions::default()).unwrap_err();
        assert!(err.to_string().contains("image_url"), "{err}");
    }

    #[test]
    fn environment_matches_transformers() {
        let run = |src: &str, kwargs: Value| {
            let t = ChatTemplate::new(src, "t").unwrap();
            let mut options = RenderOptions::default();
            if let Value::Object(map) = kwargs {
                options.kwargs = map;
            }
            t.render(&[], &options).unwrap()
        };
        // trim_blocks + lstrip_blocks
        assert_eq!(
            run("  {% if true %}\nX\n  {% endif %}\nY", json!({})),
            "X\nY"
        );
        // loop controls
        assert_eq!(
            run("{% for x in [1,2,3,4] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %}", json!({})),
            "13"
        );
        // Python string and dict methods
        assert_eq!(
            run("{{ '  Hi  '.strip() }}|{{ 'a,b'.split(',') | length }}|{{ 'x'.upper() }}|{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|{{ 'abc'.startswith('ab') }}", json!({"d": {"z": 1, "a": 2}})),
            "Hi|2|X|z=1;a=2;|True"
        );
        // tools is none when absent; extra kwargs arrive; bos/eos undefined unless configured;
        // booleans print as Jinja2 prints Python's
        assert_eq!(
            run(
                "{{ tools is none }}|{{ reasoning_effort }}|{{ bos_token is defined }}",
                json!({"reasoning_effort": "low"})
            ),
            "True|low|False"
        );
        // generation blocks render their body
        assert_eq!(
            run("a{% generation %}b{% endgeneration %}c", json!({})),
            "abc"
        );
        assert_eq!(
            run("a {%- generation -%} b {%- endgeneration -%} c", json!({})),
            "abc"
        );
        // strftime_now gives the current year
        let year = run("{{ strftime_now('%Y') }}", json!({}));
        assert_eq!(year.len(), 4);
        assert!(year.starts_with("20"), "{year}");
    }

    #[test]
    fn tojson_writes_like_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ v | tojson }}\n{{ v | tojson(indent=2) }}\n{{ v | tojson(sort_keys=true, separators=[',', ':']) }}\n{{ s | tojson }}|{{ s | tojson(ensure_ascii=true) }}",
            "t",
        )
        .unwrap();
        let options = RenderOptions::default()
            .with_kwarg(
                "v",
                json!({"b": [1, 2.5, "x<y>&z", null, true], "a": {}, "c": 1e-5, "d": 1.0, "e": []}),
            )
            .with_kwarg("s", "é🦀\"\n");
        let out = t.render(&[], &options).unwrap();
        let expected = concat!(
            r#"{"b": [1, 2.5, "x<y>&z", null, true], "a": {}, "c": 1e-05, "d": 1.0, "e": []}"#,
            "\n{\n  \"b\": [\n    1,\n    2.5,\n    \"x<y>&z\",\n    null,\n    true\n  ],\n  \"a\": {},\n  \"c\": 1e-05,\n  \"d\": 1.0,\n  \"e\": []\n}\n",
            r#"{"a":{},"b":[1,2.5,"x<y>&z",null,true],"c":1e-05,"d":1.0,"e":[]}"#,
            "\n",
            r#""é🦀\"\n"|"\u00e9\ud83e\udd80\"\n""#
        );
        assert_eq!(out, expected);
        assert_eq!(
            py_number(&serde_json::Number::from_f64(1e16).unwrap()),
            "1e+16"
        );
        assert_eq!(
            py_number(&serde_json::Number::from_f64(1e15).unwrap()),
            "1000000000000000.0"
        );
        assert_eq!(
            py_number(&serde_json::Number::from_f64(0.0001).unwrap()),
            "0.0001"
        );
    }

    #[test]
    fn strftime_matches_python() {
        // 2024-02-29 13:05:09 UTC, a Thursday: Python gives these strings.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(
            strftime("%A %B %-d, %I %p (%j) %a %y %%", t),
            "Thursday February 29, 01 PM (060) Thu 24 %"
        );
        assert_eq!(strftime("%F %T %Z %q", 0), "1970-01-01 00:00:00 UTC %q");
        assert_eq!(strftime("%A", -86_400), "Wednesday");
        for days in [-800_000i64, -1, 0, 59, 365, 11_016, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn finds_the_template_in_a_model_folder() {
        let dir = tempfile::tempdir().unwrap();
        let msgs = [ChatMessage::user("hi")];
        let opts = RenderOptions::default();
        // Nothing: ChatML.
        let t = ChatTemplate::from_model_dir(dir.path()).unwrap();
        assert!(t.origin().contains("chatml"));
        assert!(ChatTemplate::find_in_model_dir(dir.path())
            .unwrap()
            .is_none());
        // tokenizer_config.json string, with bos/eos as string and as {content}.
        write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            r#"{"chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}", "bos_token": "<s>", "eos_token": {"content": "</s>"}}"#,
        );
        let t = ChatTemplate::from_model_dir(dir.path()).unwrap();
        assert_eq!(render(&t, &msgs, &opts), "<s>hi</s>");
        // A named list: default, and tool_use when tools are given.
        write(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            r#"{"chat_template": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T{{ tools | length }}"}]}"#,
        );
        let t = ChatTemplate::from_model_dir(dir.path()).unwrap();
        assert_eq!(render(&t, &msgs, &opts), "D");
        assert_eq!(
            render(
                &t,
                &msgs,
                &RenderOptions::default().with_tools(vec![json!({})])
            ),
            "T1"
        );
        // chat_template.jinja wins over the config.
        write(dir.path(), CHAT_TEMPLATE_FILE, "J{{ messages | length }}");
        let t = ChatTemplate::from_model_dir(dir.path()).unwrap();
        assert_eq!(render(&t, &msgs, &opts), "J1");
        assert!(t.origin().ends_with(CHAT_TEMPLATE_FILE));
    }

    #[test]
    fn malformed_configs_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), TOKENIZER_CONFIG_FILE, "{oops");
        let err = ChatTemplate::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer_config.json"), "{err}");
        write(dir.path(), TOKENIZER_CONFIG_FILE, r#"{"chat_template": 7}"#);
        let err = ChatTemplate::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("chat_template"),
            "{err}"
        );
        write(dir.path(), TOKENIZER_CONFIG_FILE, "{}");
        write(dir.path(), CHAT_TEMPLATE_FILE, "{% if %}");
        let err = ChatTemplate::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains(CHAT_TEMPLATE_FILE), "{err}");
    }

    #[test]
    fn hy3_prompt_encodes_with_a_tiny_test_tokenizer() {
        // The `tiny` test preset: 512 ids including Hy3's special tokens.
        let tok = crate::tokenizer::Tokenizer::from_tokenizer(
            crate::tokenizer::build_byte_level_bpe(512, HY3_SPECIAL_TOKENS).unwrap(),
        );
        let prompt = render(
            &ChatTemplate::hy3().unwrap(),
            &conversation(),
            &RenderOptions::generation(),
        );
        let ids = tok.encode(&prompt, false).unwrap();
        let id = |t: &str| tok.token_to_id(t).unwrap();
        assert_eq!(ids[0], id(HY3_BOS_TOKEN));
        for special in [U, A, E, S] {
            assert!(ids.contains(&id(special)), "{special} is one id in {ids:?}");
        }
        assert_eq!(tok.decode(&ids, false).unwrap(), prompt);
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            "You are terse.HiHello.2+2?<think>\n"
        );
        // Without config files the known Hunyuan spellings end generation.
        assert!(tok.is_eos(id(HY3_EOS_TOKEN)) && tok.is_eos(id("<｜hy_end▁of▁sentence｜>")));
    }

    #[test]
    fn detects_templates_that_loop_over_content() {
        assert!(loops_over_content(
            "{% for part in message['content'] %}{% endfor %}"
        ));
        assert!(loops_over_content("{%- for c in m.content -%}"));
        assert!(!loops_over_content(
            "{% for m in messages %}{{ m.content }}{% endfor %}"
        ));
        assert!(!loops_over_content(CHATML_TEMPLATE));
        assert!(!loops_over_content(HY3_TEMPLATE));
    }
}
