//! API errors: one enum whose messages are written for the API user (TGI's `ValidationError`
//! habit), rendered in the OpenAI shape `{"error": {"message", "type", "param", "code"}}` on
//! `/v1/chat/completions`, `/v1/completions` and `/v1/models`, and in the Anthropic shape
//! `{"type": "error", "error": {"type", "message"}}` on `/v1/messages`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use switchyard_engine::engine::SubmitError;
use switchyard_engine::scheduler::AdmissionError;

use super::route::Api;

/// Seconds a client is told to wait after a queue-full refusal: one engine step on a loaded
/// server is tens of milliseconds, so a second is enough for the queue to move.
const RETRY_AFTER_SECS: u64 = 1;

/// Everything a request can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON.
    #[error("We could not parse the JSON body of your request ({0}). The body must be a JSON object; check for a trailing comma or an unquoted key.")]
    MalformedJson(String),
    /// The body is JSON but not an object.
    #[error("The request body must be a JSON object.")]
    NotAnObject,
    /// A required field is absent.
    #[error("Missing required parameter: '{0}'.")]
    MissingField(String),
    /// A field has the wrong type or an out-of-range value.
    #[error("Invalid value for '{param}': {message}")]
    InvalidField {
        /// The field, as a path (`messages[0].role`).
        param: String,
        /// What was expected and what was given.
        message: String,
    },
    /// A feature this server does not implement.
    #[error("'{param}' is not supported by this server: {message}")]
    Unsupported {
        /// The field.
        param: String,
        /// What to do instead.
        message: String,
    },
    /// The model name is not served here.
    #[error("The model '{model}' does not exist. This server serves '{served}' (also reachable as 'local', 'auto' and the router's tier names).")]
    ModelNotFound {
        /// The name asked for.
        model: String,
        /// The served model id.
        served: String,
    },
    /// The body is over `--max-body-bytes`.
    #[error("The request body is larger than this server accepts ({limit} bytes).")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// Prompt plus completion does not fit the context.
    #[error("{message}")]
    ContextLength {
        /// The field holding the prompt (`messages` or `prompt`).
        param: String,
        /// The engine's explanation with the numbers.
        message: String,
    },
    /// The scheduler's queue is full.
    #[error("The server is at capacity ({waiting} requests waiting). Retry after {RETRY_AFTER_SECS} second(s).")]
    QueueFull {
        /// Requests waiting.
        waiting: usize,
    },
    /// No API key was given.
    #[error("Missing API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")]
    MissingApiKey,
    /// The API key is wrong.
    #[error("Incorrect API key provided.")]
    InvalidApiKey,
    /// The router refused the request: a `block` decision (400 `blocked_by_policy`) or a spent
    /// budget (429 `budget_exhausted`).
    #[error("{message}")]
    Refused {
        /// The HTTP status the policy asks for.
        status: u16,
        /// The machine-readable code.
        code: String,
        /// The reason, for the API user.
        message: String,
    },
    /// A remote tier failed and nothing could serve the request instead, or the tier rejected
    /// the request itself (its 400/413/422 is passed on).
    #[error("{message}")]
    Upstream {
        /// The HTTP status to answer with.
        status: u16,
        /// What failed (never a credential).
        message: String,
    },
    /// No such route.
    #[error("There is no endpoint {method} {path}.")]
    NotFound {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
    },
    /// No stored response has this id (Responses API).
    #[error("No response with id '{0}' is stored here (responses are kept in memory until the server restarts, and not at all with store: false).")]
    ResponseNotFound(String),
    /// The engine has stopped (shutting down).
    #[error("The inference engine is not running; the server may be shutting down.")]
    EngineStopped,
    /// Something failed inside the server.
    #[error("The server failed while handling the request: {0}")]
    Internal(String),
}

impl ApiError {
    /// A field error.
    pub fn field(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidField {
            param: param.into(),
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            MalformedJson(_)
            | NotAnObject
            | MissingField(_)
            | InvalidField { .. }
            | Unsupported { .. }
            | ContextLength { .. } => StatusCode::BAD_REQUEST,
            ModelNotFound { .. } | NotFound { .. } | ResponseNotFound(_) => StatusCode::NOT_FOUND,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            MissingApiKey | InvalidApiKey => StatusCode::UNAUTHORIZED,
            Refused { status, .. } | Upstream { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST)
            }
            EngineStopped => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    pub fn openai_type(&self) -> &'static str {
        use ApiError::*;
        match self {
            MissingApiKey | InvalidApiKey => "authentication_error",
            QueueFull { .. } => "rate_limit_error",
            ModelNotFound { .. } | NotFound { .. } | ResponseNotFound(_) => "not_found_error",
            Refused { status: 429, .. } | Upstream { status: 429, .. } => "rate_limit_error",
            Upstream { status, .. } if *status >= 500 => "server_error",
            EngineStopped | Internal(_) => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// Anthropic's `error.type`.
    pub fn anthropic_type(&self) -> &'static str {
        use ApiError::*;
        match self {
            MissingApiKey | InvalidApiKey => "authentication_error",
            QueueFull { .. } => "rate_limit_error",
            ModelNotFound { .. } | NotFound { .. } | ResponseNotFound(_) => "not_found_error",
            BodyTooLarge { .. } => "request_too_large",
            Refused { status: 429, .. } | Upstream { status: 429, .. } => "rate_limit_error",
            Upstream { status, .. } if *status >= 500 => "api_error",
            EngineStopped => "overloaded_error",
            Internal(_) => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI's `error.code`.
    pub fn code(&self) -> Option<&str> {
        use ApiError::*;
        Some(match self {
            MalformedJson(_) | NotAnObject => "invalid_json",
            MissingField(_) => "missing_required_parameter",
            InvalidField { .. } => "invalid_value",
            Unsupported { .. } => "unsupported_parameter",
            ModelNotFound { .. } => "model_not_found",
            BodyTooLarge { .. } => "request_too_large",
            ContextLength { .. } => "context_length_exceeded",
            QueueFull { .. } => "rate_limit_exceeded",
            MissingApiKey | InvalidApiKey => "invalid_api_key",
            Refused { code, .. } => code,
            Upstream { .. } => "upstream_error",
            NotFound { .. } => "unknown_url",
            ResponseNotFound(_) => "not_found",
            EngineStopped => "engine_stopped",
            Internal(_) => return None,
        })
    }

    /// OpenAI's `error.param`: the field at fault.
    pub fn param(&self) -> Option<&str> {
        use ApiError::*;
        match self {
            MissingField(p) | InvalidField { param: p, .. } | Unsupported { param: p, .. } => {
                Some(p)
            }
            ContextLength { param, .. } => Some(param),
            ModelNotFound { .. } => Some("model"),
            _ => None,
        }
    }

    /// The OpenAI-shaped error object (also sent as an SSE event when a stream fails).
    pub fn openai_body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.to_string(),
            "type": self.openai_type(),
            "param": self.param(),
            "code": self.code(),
        }})
    }

    /// The Anthropic-shaped error object.
    pub fn anthropic_body(&self) -> serde_json::Value {
        json!({"type": "error", "error": {"type": self.anthropic_type(), "message": self.to_string()}})
    }

    fn respond(&self, body: serde_json::Value) -> Response {
        let mut r = (self.status(), axum::Json(body)).into_response();
        if matches!(self, ApiError::QueueFull { .. }) {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if matches!(self, ApiError::MissingApiKey | ApiError::InvalidApiKey) {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.body_unread() {
            // The request body was not (fully) read, so the connection cannot carry another
            // request; say so, or a keep-alive client reuses it and gets a reset.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }

    /// Errors raised before the request body was read to its end.
    fn body_unread(&self) -> bool {
        matches!(
            self,
            ApiError::BodyTooLarge { .. }
                | ApiError::MissingApiKey
                | ApiError::InvalidApiKey
                | ApiError::NotFound { .. }
        )
    }

    /// Maps an engine refusal of a request in format `api`; `max_tokens_param` names the field
    /// holding the token limit.
    pub fn from_submit(e: SubmitError, api: Api, max_tokens_param: &str) -> Self {
        let prompt_param = api.prompt_param();
        match e {
            SubmitError::Admission(a) => match a {
                AdmissionError::QueueFull { waiting } => ApiError::QueueFull { waiting },
                AdmissionError::EmptyPrompt => ApiError::field(prompt_param, "the prompt is empty"),
                a @ (AdmissionError::ContextLength { .. }
                | AdmissionError::CacheTooSmall { .. }
                | AdmissionError::PromptOverBudget { .. }) => ApiError::ContextLength {
                    param: prompt_param.to_string(),
                    message: format!(
                        "{a}. Shorten the prompt ({}) or lower {max_tokens_param}.",
                        api.prompt_fields()
                    ),
                },
            },
            SubmitError::InvalidToken { id, vocab } => ApiError::field(
                prompt_param,
                format!(
                    "token id {id} is out of range for this model's vocabulary of {vocab} tokens"
                ),
            ),
            SubmitError::InvalidParams(m) => ApiError::field("sampling", m),
            SubmitError::Stopped => ApiError::EngineStopped,
        }
    }
}

/// An [`ApiError`] rendered in the OpenAI shape.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        self.0.respond(self.0.openai_body())
    }
}

/// An [`ApiError`] rendered in the Anthropic shape.
#[derive(Debug)]
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(e)
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        self.0.respond(self.0.anthropic_body())
    }
}

/// Which wire format a path speaks, for errors raised before a handler runs (auth, 404, 413).
pub fn is_anthropic_path(path: &str) -> bool {
    path.starts_with("/v1/messages")
}

/// Renders `e` in the shape the path speaks.
pub fn for_path(path: &str, e: ApiError) -> Response {
    if is_anthropic_path(path) {
        AnthropicError(e).into_response()
    } else {
        OpenAiError(e).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let e = ApiError::field("temperature", "must be between 0 and 2, got 3");
        let o = e.openai_body();
        assert_eq!(o["error"]["param"], "temperature");
        assert_eq!(o["error"]["type"], "invalid_request_error");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let a = e.anthropic_body();
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "invalid_request_error");
        let b = ApiError::Refused {
            status: 400,
            code: "blocked_by_policy".into(),
            message: "request blocked by the router policy: injection".into(),
        };
        assert_eq!(b.status(), StatusCode::BAD_REQUEST);
        assert_eq!(b.openai_body()["error"]["code"], "blocked_by_policy");
        assert_eq!(b.anthropic_body()["error"]["type"], "invalid_request_error");
        let q = ApiError::QueueFull { waiting: 3 };
        let r = OpenAiError(q).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn context_length_maps() {
        let e = ApiError::from_submit(
            SubmitError::Admission(AdmissionError::ContextLength {
                prompt: 10,
                max_tokens: 600,
                needed: 610,
                limit: 512,
            }),
            Api::OpenAiChat,
            "max_completion_tokens",
        );
        assert_eq!(e.code(), Some("context_length_exceeded"));
        assert!(
            e.to_string().ends_with("lower max_completion_tokens."),
            "{e}"
        );
        assert_eq!(e.param(), Some("messages"));
    }
}
