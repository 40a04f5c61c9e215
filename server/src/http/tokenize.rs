//! vLLM's tokenizer endpoints: `POST /tokenize` (a prompt, or a chat conversation through the
//! chat template exactly as `/v1/chat/completions` would render it) and `POST /detokenize`.
//! Clients use them to count and budget tokens, and to check a prompt's template, without
//! generating. Errors are in the OpenAI shape; `model` is optional, as in vLLM, and when given
//! must name this server's model. Both need the API key when one is configured.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, OpenAiError};
use super::{local, openai, params, AppState};

/// The completion form of `/tokenize`.
#[derive(Debug, Deserialize)]
struct PromptForm {
    prompt: String,
    add_special_tokens: Option<bool>,
}

/// `/detokenize`'s body.
#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<i64>,
}

/// Fields both `/tokenize` forms share.
#[derive(Debug, Deserialize)]
struct Common {
    model: Option<String>,
    return_token_strs: Option<bool>,
}

/// `POST /tokenize`: `{"count", "max_model_len", "tokens", "token_strs"}`.
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(tokenize_body(&state, body))
}

fn tokenize_body(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let (common, mut json) = params::parse_body_json::<Common>(body, state.max_body_bytes)?;
    if let Some(m) = &common.model {
        state.check_model(m)?;
    }
    let ids = if json.get("messages").is_some() {
        // The chat form: rendered as a chat completion would be, special tokens off unless asked.
        if common.model.is_none() {
            json["model"] = json!(state.model_id);
        }
        let special = json
            .get("add_special_tokens")
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    ApiError::field("add_special_tokens", format!("must be a boolean, got {v}"))
                })
            })
            .transpose()?
            .unwrap_or(false);
        let req = openai::chat_request(&json)?;
        let text = local::render(state, &req)?;
        encode(state, &text, special, "messages")?
    } else {
        let form: PromptForm = params::from_json(&json)?;
        encode(
            state,
            &form.prompt,
            form.add_special_tokens.unwrap_or(true),
            "prompt",
        )?
    };
    let token_strs = common.return_token_strs.unwrap_or(false).then(|| {
        ids.iter()
            .map(|&id| state.tokenizer.id_to_token(id).unwrap_or_default())
            .collect::<Vec<_>>()
    });
    Ok(json!({
        "count": ids.len(),
        "max_model_len": state.engine.info().scheduler.max_model_len,
        "tokens": ids,
        "token_strs": token_strs,
    }))
}

fn encode(state: &AppState, text: &str, special: bool, param: &str) -> Result<Vec<u32>, ApiError> {
    state
        .tokenizer
        .encode(text, special)
        .map_err(|e| ApiError::field(param, format!("the text could not be tokenised: {e}")))
}

/// `POST /detokenize`: `{"prompt"}`, the text of `tokens` (special tokens kept, as vLLM).
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond((|| {
        let (req, _) = params::parse_body_json::<DetokenizeRequest>(body, state.max_body_bytes)?;
        if let Some(m) = &req.model {
            state.check_model(m)?;
        }
        let vocab = state.tokenizer.vocab_size();
        let ids = req
            .tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                u32::try_from(t)
                    .ok()
                    .filter(|&id| (id as usize) < vocab)
                    .ok_or_else(|| {
                        ApiError::field(
                            format!("tokens[{i}]"),
                            format!("{t} is not a token id of this model (0 to {})", vocab - 1),
                        )
                    })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let text = state
            .tokenizer
            .decode(&ids, false)
            .map_err(|e| ApiError::field("tokens", format!("could not be decoded: {e}")))?;
        Ok(json!({"prompt": text}))
    })())
}

fn respond(r: Result<Value, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => OpenAiError(e).into_response(),
    }
}
