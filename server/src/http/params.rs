//! Request-body parsing and the range checks shared by the wire formats. Bodies are read as
//! bytes (so an oversized body is our 413, not axum's), parsed as JSON (malformed → 400), and
//! deserialised with the failing field's path (wrong type → 400 naming the field); ranges are
//! then checked here, each error naming its field.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use switchyard_engine::sampling::{
    MAX_ABS_PENALTY, MAX_LOGIT_BIAS, MAX_TEMPERATURE, MAX_TOP_LOGPROBS,
};
use switchyard_engine::scheduler::SchedulingPolicy;
use switchyard_engine::structured::OutputConstraint;

use super::error::ApiError;
use super::route::NormalizedRequest;

/// Most choices per prompt (`n`): each is a sequence in the engine, so a large `n` is a large
/// batch; 16 matches the most any public API allows for chat.
pub const MAX_N: usize = 16;
/// Most stop strings per request (OpenAI allows 4; stop matching cost grows with the count).
pub const MAX_STOP: usize = 16;
/// Most prompts in one completions request.
pub const MAX_PROMPTS: usize = 64;

/// Parses a JSON object body into `T` and also returns the JSON itself (what the router reads
/// and what a remote tier is sent), mapping every failure to an [`ApiError`].
pub fn parse_body_json<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<(T, Value), ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge { limit }
        } else {
            ApiError::MalformedJson(format!("the body could not be read: {r}"))
        }
    })?;
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    if !v.is_object() {
        return Err(ApiError::NotAnObject);
    }
    Ok((from_json(&v)?, v))
}

/// Deserialises `T` from a parsed body; a type error names the failing field's path, a missing
/// field is [`ApiError::MissingField`].
pub fn from_json<T: DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        if let Some(field) = missing_field(&msg) {
            let p = if path == "." || path.is_empty() {
                field.to_string()
            } else {
                format!("{path}.{field}")
            };
            ApiError::MissingField(p)
        } else {
            ApiError::field(path, msg)
        }
    })
}

/// The field of serde's "missing field `x`" message.
fn missing_field(msg: &str) -> Option<&str> {
    let rest = msg.strip_prefix("missing field `")?;
    rest.split('`').next()
}

/// Checks what both chat formats require of a conversation: at least one message.
pub fn check_conversation(n_messages: usize) -> Result<(), ApiError> {
    if n_messages == 0 {
        return Err(ApiError::field(
            "messages",
            "must contain at least one message",
        ));
    }
    Ok(())
}

/// Most `logit_bias` entries (OpenAI's documented limit is 300; a few thousand still costs
/// nothing per step, a vocabulary-sized map would).
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 1024;

/// OpenAI's `logit_bias`: token id strings to biases in `[-100, 100]`.
pub fn logit_bias(v: Option<serde_json::Map<String, Value>>) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(m) = v else { return Ok(vec![]) };
    if m.len() > MAX_LOGIT_BIAS_ENTRIES {
        return Err(ApiError::field(
            "logit_bias",
            format!("at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {}", m.len()),
        ));
    }
    m.into_iter()
        .map(|(k, v)| {
            let id: u32 = k.parse().map_err(|_| {
                ApiError::field("logit_bias", format!("keys must be token ids, got {k:?}"))
            })?;
            let b = v
                .as_f64()
                .filter(|b| b.abs() <= f64::from(MAX_LOGIT_BIAS))
                .ok_or_else(|| {
                    ApiError::field(
                        "logit_bias",
                        format!(
                            "token {id}: the bias must be a number between -100 and 100, got {v}"
                        ),
                    )
                })?;
            Ok((id, b as f32))
        })
        .collect()
}

/// `temperature` in `[0, max]`.
pub fn temperature(v: Option<f64>, max: f64, default: f32) -> Result<f32, ApiError> {
    let Some(t) = v else { return Ok(default) };
    if !(t.is_finite() && (0.0..=max).contains(&t)) {
        return Err(ApiError::field(
            "temperature",
            format!("must be between 0 and {max}, got {t}"),
        ));
    }
    Ok(t as f32)
}

/// The OpenAI temperature bound.
pub const OPENAI_MAX_TEMPERATURE: f64 = MAX_TEMPERATURE as f64;

/// `top_p` in `(0, 1]` (checked as the engine's f32: a positive value below f32's range is 0).
pub fn top_p(v: Option<f64>) -> Result<f32, ApiError> {
    let Some(p) = v else { return Ok(1.0) };
    if !(p.is_finite() && p as f32 > 0.0 && p <= 1.0) {
        return Err(ApiError::field(
            "top_p",
            format!("must be greater than 0 and at most 1, got {p}"),
        ));
    }
    Ok(p as f32)
}

/// `top_k`: `None`, 0 or -1 disable (vLLM's convention); otherwise positive.
pub fn top_k(v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        None | Some(0) | Some(-1) => Ok(None),
        Some(k) if k > 0 => Ok(Some(k as usize)),
        Some(k) => Err(ApiError::field(
            "top_k",
            format!("must be positive (0 or -1 disables it), got {k}"),
        )),
    }
}

/// `min_p` in `[0, 1]`.
pub fn min_p(v: Option<f64>) -> Result<f32, ApiError> {
    let Some(p) = v else { return Ok(0.0) };
    if !(p.is_finite() && (0.0..=1.0).contains(&p)) {
        return Err(ApiError::field(
            "min_p",
            format!("must be between 0 and 1, got {p}"),
        ));
    }
    Ok(p as f32)
}

/// `repetition_penalty` > 0, checked as the engine's f32 (outside f32's range a value becomes
/// 0 or infinite, which the engine refuses).
pub fn repetition_penalty(v: Option<f64>) -> Result<f32, ApiError> {
    let Some(p) = v else { return Ok(1.0) };
    if !((p as f32).is_finite() && p as f32 > 0.0) {
        return Err(ApiError::field(
            "repetition_penalty",
            format!("must be greater than 0 (1 disables it), got {p}"),
        ));
    }
    Ok(p as f32)
}

/// A presence or frequency penalty in `[-2, 2]`.
pub fn penalty(field: &str, v: Option<f64>) -> Result<f32, ApiError> {
    let Some(p) = v else { return Ok(0.0) };
    let max = MAX_ABS_PENALTY as f64;
    if !(p.is_finite() && p.abs() <= max) {
        return Err(ApiError::field(
            field,
            format!("must be between -{max} and {max}, got {p}"),
        ));
    }
    Ok(p as f32)
}

/// `n` in `1..=MAX_N`.
pub fn n(v: Option<i64>) -> Result<usize, ApiError> {
    let Some(n) = v else { return Ok(1) };
    if !(1..=MAX_N as i64).contains(&n) {
        return Err(ApiError::field(
            "n",
            format!("must be between 1 and {MAX_N}, got {n}"),
        ));
    }
    Ok(n as usize)
}

/// A token limit: at least 1.
pub fn max_tokens(field: &str, v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(m) if m >= 1 => Ok(Some(m as usize)),
        Some(m) => Err(ApiError::field(
            field,
            format!("must be at least 1, got {m}"),
        )),
    }
}

/// Alternatives per position in `0..=20`.
pub fn top_logprobs(field: &str, v: i64) -> Result<usize, ApiError> {
    if !(0..=MAX_TOP_LOGPROBS as i64).contains(&v) {
        return Err(ApiError::field(
            field,
            format!("must be between 0 and {MAX_TOP_LOGPROBS}, got {v}"),
        ));
    }
    Ok(v as usize)
}

/// `stop`: absent, null, a string, or a list of strings.
pub fn stop(field: &str, v: Option<Value>) -> Result<Vec<String>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::field(format!("{field}[{i}]"), "must be a string")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::field(
                field,
                "must be a string or a list of strings",
            ))
        }
    };
    if list.len() > MAX_STOP {
        return Err(ApiError::field(
            field,
            format!("at most {MAX_STOP} stop sequences, got {}", list.len()),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::field(field, "stop sequences must not be empty"));
    }
    Ok(list)
}

/// A structured-output request: what the output must match, and the request field that
/// asked for it (named in errors).
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSpec {
    /// The constraint.
    pub constraint: OutputConstraint,
    /// Field path, e.g. `response_format.json_schema.schema`.
    pub param: String,
}

/// OpenAI's `response_format`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// `response_format.json_schema` (`name`, `description` and `strict` are accepted; the schema is
/// always enforced strictly).
#[derive(Debug, Deserialize)]
struct JsonSchemaFormat {
    #[serde(default)]
    schema: Option<Value>,
}

/// vLLM's `structured_outputs` (exactly one member).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StructuredOutputs {
    json: Option<Value>,
    regex: Option<String>,
    choice: Option<Vec<String>>,
    grammar: Option<String>,
    json_object: Option<bool>,
    /// Accepted for compatibility; whitespace is always compact.
    #[allow(dead_code)]
    disable_any_whitespace: Option<bool>,
}

/// Anthropic's `output_format` (structured outputs).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutputFormat {
    JsonSchema { schema: Value },
}

/// Every structured-output field of the three dialects, read in a second pass over the body
/// (as the sampling fields are) so a type error names its path.
#[derive(Debug, Default, Deserialize)]
pub struct StructuredFields {
    response_format: Option<ResponseFormat>,
    structured_outputs: Option<StructuredOutputs>,
    guided_json: Option<Value>,
    guided_regex: Option<String>,
    guided_choice: Option<Vec<String>>,
    guided_grammar: Option<String>,
    output_format: Option<OutputFormat>,
}

/// A JSON schema given as an object or as a string holding one (vLLM takes both).
fn schema_value(v: Value, param: &str) -> Result<OutputConstraint, ApiError> {
    let v = match v {
        Value::String(s) => serde_json::from_str(&s)
            .map_err(|e| ApiError::field(param, format!("is not a JSON schema: {e}")))?,
        v => v,
    };
    if !(v.is_object() || v.is_boolean()) {
        return Err(ApiError::field(param, "must be a JSON schema object"));
    }
    Ok(OutputConstraint::JsonSchema(v))
}

impl StructuredFields {
    /// The one constraint asked for, if any; asking for two is an error naming both.
    pub fn into_spec(self) -> Result<Option<OutputSpec>, ApiError> {
        let mut found: Vec<OutputSpec> = Vec::new();
        let mut put = |param: &str, constraint: OutputConstraint| {
            found.push(OutputSpec {
                constraint,
                param: param.to_string(),
            })
        };
        match self.response_format {
            None | Some(ResponseFormat::Text) => {}
            Some(ResponseFormat::JsonObject) => {
                put("response_format", OutputConstraint::JsonObject)
            }
            Some(ResponseFormat::JsonSchema { json_schema }) => {
                let p = "response_format.json_schema.schema";
                let schema = json_schema
                    .schema
                    .ok_or_else(|| ApiError::MissingField(p.into()))?;
                put(p, schema_value(schema, p)?);
            }
        }
        if let Some(so) = self.structured_outputs {
            if let Some(j) = so.json {
                put(
                    "structured_outputs.json",
                    schema_value(j, "structured_outputs.json")?,
                );
            }
            if let Some(r) = so.regex {
                put("structured_outputs.regex", OutputConstraint::Regex(r));
            }
            if let Some(c) = so.choice {
                put("structured_outputs.choice", OutputConstraint::Choice(c));
            }
            if let Some(g) = so.grammar {
                put("structured_outputs.grammar", OutputConstraint::Grammar(g));
            }
            if so.json_object == Some(true) {
                put(
                    "structured_outputs.json_object",
                    OutputConstraint::JsonObject,
                );
            }
        }
        if let Some(j) = self.guided_json {
            put("guided_json", schema_value(j, "guided_json")?);
        }
        if let Some(r) = self.guided_regex {
            put("guided_regex", OutputConstraint::Regex(r));
        }
        if let Some(c) = self.guided_choice {
            put("guided_choice", OutputConstraint::Choice(c));
        }
        if let Some(g) = self.guided_grammar {
            put("guided_grammar", OutputConstraint::Grammar(g));
        }
        if let Some(OutputFormat::JsonSchema { schema }) = self.output_format {
            put(
                "output_format.schema",
                schema_value(schema, "output_format.schema")?,
            );
        }
        if found.len() > 1 {
            return Err(ApiError::field(
                found[1].param.clone(),
                format!(
                    "cannot be combined with {}: ask for one structured output",
                    found[0].param
                ),
            ));
        }
        Ok(found.pop())
    }
}

/// vLLM's generation controls as sent (both OpenAI endpoints).
#[derive(Debug, Default, Deserialize)]
struct ControlFields {
    prompt_logprobs: Option<i64>,
    return_tokens_as_token_ids: Option<bool>,
    cache_salt: Option<String>,
    truncate_prompt_tokens: Option<i64>,
    min_tokens: Option<i64>,
    stop_token_ids: Option<Vec<i64>>,
    include_stop_str_in_output: Option<bool>,
    skip_special_tokens: Option<bool>,
    priority: Option<i64>,
    return_token_ids: Option<bool>,
}

/// vLLM's extra generation controls, checked (token ids against the vocabulary and the
/// truncation against the context later, by the local tier, which knows them).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationControls {
    /// Report each prompt token's logprob, rank and this many alternatives (`prompt_logprobs`;
    /// not in streams).
    pub prompt_logprobs: Option<usize>,
    /// Name tokens in logprobs as `token_id:<id>` instead of their text
    /// (`return_tokens_as_token_ids`), so a client can recover ids that do not decode alone.
    pub return_tokens_as_token_ids: bool,
    /// Mixed into the prefix cache's block hashes (vLLM's `cache_salt`): requests with
    /// different salts never share cached KV, so one tenant cannot time another's prompts.
    /// 0: no salt.
    pub cache_salt: u64,
    /// Keep only the last this-many prompt tokens (`truncate_prompt_tokens`; `Some(None)`: as
    /// many as the context holds, vLLM's `-1`).
    pub truncate_prompt_tokens: Option<Option<usize>>,
    /// Tokens generated before an end-of-sequence or stop token may be, or a stop string
    /// count (`min_tokens`).
    pub min_tokens: usize,
    /// More token ids that end the output (`stop_token_ids`).
    pub stop_token_ids: Vec<u32>,
    /// Keep a matched stop string in the text (`include_stop_str_in_output`).
    pub include_stop_str_in_output: bool,
    /// Leave special tokens out of the text (`skip_special_tokens`, on by default).
    pub skip_special_tokens: bool,
    /// Scheduling priority (`priority`; lower is served first). Only the priority scheduling
    /// policy accepts a value other than 0 ([`check_priority`]).
    pub priority: i64,
    /// Return the prompt's token ids and each choice's generated ids (`return_token_ids`).
    pub return_token_ids: bool,
}

impl Default for GenerationControls {
    fn default() -> Self {
        Self {
            prompt_logprobs: None,
            return_tokens_as_token_ids: false,
            cache_salt: 0,
            truncate_prompt_tokens: None,
            min_tokens: 0,
            stop_token_ids: vec![],
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            priority: 0,
            return_token_ids: false,
        }
    }
}

impl ControlFields {
    fn into_controls(
        self,
        max_tokens: Option<usize>,
        stream: bool,
    ) -> Result<GenerationControls, ApiError> {
        let prompt_logprobs = match self.prompt_logprobs {
            None => None,
            Some(_) if stream => {
                return Err(ApiError::field(
                    "prompt_logprobs",
                    "is not returned in streamed responses; ask without stream",
                ))
            }
            Some(n) => Some(top_logprobs("prompt_logprobs", n)?),
        };
        let min_tokens = match self.min_tokens {
            None => 0,
            Some(m) if m < 0 => {
                return Err(ApiError::field(
                    "min_tokens",
                    format!("must be at least 0, got {m}"),
                ))
            }
            Some(m) => m as usize,
        };
        if let Some(max) = max_tokens.filter(|&max| min_tokens > max) {
            return Err(ApiError::field(
                "min_tokens",
                format!("must not exceed max_tokens ({max}), got {min_tokens}"),
            ));
        }
        let stop_token_ids = self
            .stop_token_ids
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, id)| {
                u32::try_from(id).map_err(|_| {
                    ApiError::field(
                        format!("stop_token_ids[{i}]"),
                        format!("must be a token id (0 or more), got {id}"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let truncate_prompt_tokens = match self.truncate_prompt_tokens {
            None => None,
            Some(-1) => Some(None),
            Some(k) if k >= 1 => Some(Some(k as usize)),
            Some(k) => {
                return Err(ApiError::field(
                    "truncate_prompt_tokens",
                    format!("must be at least 1, or -1 for the model's context length; got {k}"),
                ))
            }
        };
        let cache_salt = match self.cache_salt {
            None => 0,
            Some(s) if s.is_empty() => {
                return Err(ApiError::field(
                    "cache_salt",
                    "must not be empty (leave it out for no salt)",
                ))
            }
            Some(s) => salt_hash(&s),
        };
        Ok(GenerationControls {
            prompt_logprobs,
            return_tokens_as_token_ids: self.return_tokens_as_token_ids.unwrap_or(false),
            cache_salt,
            truncate_prompt_tokens,
            min_tokens,
            stop_token_ids,
            include_stop_str_in_output: self.include_stop_str_in_output.unwrap_or(false),
            skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
            priority: self.priority.unwrap_or(0),
            return_token_ids: self.return_token_ids.unwrap_or(false),
        })
    }
}

/// vLLM's rule for `priority`: any integer under the priority scheduling policy, only 0 (the
/// default) under FCFS.
pub fn check_priority(priority: i64, policy: SchedulingPolicy) -> Result<(), ApiError> {
    if priority != 0 && policy != SchedulingPolicy::Priority {
        return Err(ApiError::field(
            "priority",
            format!(
                "got {priority}, but priority scheduling is not enabled: this server schedules \
                 {policy} (start it with --scheduling-policy priority, or leave priority out)"
            ),
        ));
    }
    Ok(())
}

/// A salt's 64-bit value for the block hashes: SipHash with fixed keys (stable for the process,
/// which is as long as the cache lives), never 0, which means "no salt".
fn salt_hash(salt: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    salt.hash(&mut h);
    h.finish().max(1)
}

/// Reads the fields both OpenAI endpoints take in a second pass over `json` into `r`: the
/// structured-output fields and vLLM's generation controls.
pub fn with_output(mut r: NormalizedRequest, json: &Value) -> Result<NormalizedRequest, ApiError> {
    r.output = from_json::<StructuredFields>(json)?.into_spec()?;
    r.controls = from_json::<ControlFields>(json)?.into_controls(r.max_tokens, r.stream)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct T {
        model: String,
        temperature: Option<f64>,
    }

    fn parse(s: &'static str) -> Result<T, ApiError> {
        parse_body_json(Ok(Bytes::from_static(s.as_bytes())), 100).map(|(t, _)| t)
    }

    #[test]
    fn body_errors_name_fields() {
        assert!(matches!(parse("{"), Err(ApiError::MalformedJson(_))));
        assert!(matches!(parse("[1]"), Err(ApiError::NotAnObject)));
        match parse(r#"{"temperature": 1}"#) {
            Err(ApiError::MissingField(f)) => assert_eq!(f, "model"),
            o => panic!("{o:?}"),
        }
        match parse(r#"{"model": "m", "temperature": "hot"}"#) {
            Err(ApiError::InvalidField { param, .. }) => assert_eq!(param, "temperature"),
            o => panic!("{o:?}"),
        }
        assert!(parse(r#"{"model": "m", "extra": 1}"#).is_ok());
    }

    #[test]
    fn ranges() {
        assert!(temperature(Some(2.5), 2.0, 1.0).is_err());
        assert!(temperature(Some(-0.1), 2.0, 1.0).is_err());
        assert!(top_p(Some(0.0)).is_err());
        assert!(top_p(Some(1.0)).is_ok());
        assert!(top_p(Some(1e-308)).is_err());
        assert!(repetition_penalty(Some(1e-308)).is_err());
        assert!(repetition_penalty(Some(1e308)).is_err());
        assert!(n(Some(0)).is_err());
        assert!(n(Some(17)).is_err());
        assert!(max_tokens("max_tokens", Some(0)).is_err());
        assert_eq!(
            stop("stop", Some(Value::String("x".into()))).ok(),
            Some(vec!["x".to_string()])
        );
        assert!(stop("stop", Some(serde_json::json!([1]))).is_err());
        assert_eq!(top_k(Some(-1)).ok(), Some(None));
    }
}
