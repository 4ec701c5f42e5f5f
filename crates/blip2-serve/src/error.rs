//! Errors as OpenAI writes them: `{"error": {"message", "type", "param", "code"}}` with
//! the status code that fits.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use blip2_runtime::error::RuntimeError;
use blip2_runtime::generation::{ConfigError, Names, Setting};
use serde_json::{json, Value};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    /// Seconds a client should wait before retrying (503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, retry_after: None }
    }

    /// 400: the request is at fault.
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the parameter at fault.
    pub fn bad_param(message: impl Into<String>, param: &str) -> Self {
        let mut e = Self::bad(message);
        e.param = (!param.is_empty()).then(|| param.to_string());
        e
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong API key (send Authorization: Bearer KEY)",
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    /// 503 with a Retry-After: the queue is full or the server is stopping.
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e =
            Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable_error", message);
        e.retry_after = Some(1);
        e
    }

    /// 500: a fault of the server (an ONNX Runtime failure), never the request's.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// A 5xx's message with what failed in front (`generation failed: ...`); a request's
    /// own fault keeps its message.
    pub fn during(mut self, what: &str) -> Self {
        if self.status.is_server_error() {
            self.message = format!("{what} failed: {}", self.message);
        }
        self
    }

    /// The same error naming another parameter.
    pub fn for_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn body(&self) -> serde_json::Value {
        let code = match self.status {
            StatusCode::UNAUTHORIZED => json!("invalid_api_key"),
            StatusCode::NOT_FOUND if self.param.as_deref() == Some("model") => {
                json!("model_not_found")
            }
            _ => Value::Null,
        };
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// The settings in the words of the request's parameters.
pub struct RequestNames;

impl Names for RequestNames {
    fn setting(&self, s: Setting) -> String {
        match s {
            Setting::DoSample => "a temperature above 0".into(),
            other => param(other).into(),
        }
    }
    fn greedy(&self) -> String {
        "temperature 0 or unset, num_beams 1".into()
    }
}

/// The request parameter behind a setting.
pub fn param(s: Setting) -> &'static str {
    match s {
        Setting::MaxNewTokens => "max_tokens",
        Setting::MinNewTokens => "min_tokens",
        Setting::NumBeams => "num_beams",
        Setting::NumReturnSequences => "n",
        Setting::RepetitionPenalty => "repetition_penalty",
        Setting::LengthPenalty => "length_penalty",
        Setting::Temperature | Setting::DoSample => "temperature",
        Setting::TopP => "top_p",
        Setting::EarlyStopping => "early_stopping",
    }
}

impl From<&ConfigError> for ApiError {
    fn from(e: &ConfigError) -> Self {
        ApiError::bad_param(e.in_words(&RequestNames), param(e.setting))
    }
}

/// A runtime error as the API reports it: settings and prompts that do not fit are the
/// request's fault (400, the parameter named in the request's words), anything else the
/// server's (500 with the reason).
impl From<&RuntimeError> for ApiError {
    fn from(e: &RuntimeError) -> Self {
        match e {
            RuntimeError::Generation(c) => c.into(),
            RuntimeError::Room(m) => {
                ApiError::bad_param(m.in_words(&RequestNames), param(Setting::MaxNewTokens))
            }
            RuntimeError::Input(m) => ApiError::bad(m.clone()),
            RuntimeError::Shared(inner) => Self::from(&**inner),
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        Self::from(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blip2_runtime::generation::{validate, GenerationConfig};
    use std::sync::Arc;

    #[test]
    fn runtime_errors_name_the_request_parameters_and_who_is_at_fault() {
        // A setting the checks refuse: 400 naming the parameter, in its words.
        let cfg = GenerationConfig { max_new_tokens: 4, min_new_tokens: 9, ..Default::default() };
        let e = ApiError::from(&RuntimeError::Generation(validate(&cfg).unwrap_err()));
        assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some("min_tokens")));
        assert!(
            e.message.starts_with("min_tokens: 9 is more than max_tokens (4)"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("--"), "{}", e.message);
        let cfg = GenerationConfig { num_return_sequences: 2, ..Default::default() };
        let e = ApiError::from(&validate(&cfg).unwrap_err());
        assert_eq!(e.param.as_deref(), Some("n"));
        assert!(
            e.message.contains("greedy search (temperature 0 or unset, num_beams 1)")
                && e.message.contains("use num_beams or a temperature above 0 for more"),
            "{}",
            e.message
        );
        // A prompt with no room, shared by the requests of a batch: still the request's.
        let room = blip2_runtime::generation::Message::default()
            .text("the prompt (40 tokens) plus ")
            .name(Setting::MaxNewTokens)
            .text(" 500 exceeds the language model's 512 positions");
        let e = ApiError::from(&RuntimeError::Shared(Arc::new(RuntimeError::Room(room))))
            .during("generation");
        assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some("max_tokens")));
        assert_eq!(
            e.message,
            "the prompt (40 tokens) plus max_tokens 500 exceeds the language model's 512 positions"
        );
        // The server's own fault: 500 with the reason, and what failed.
        let e =
            ApiError::from(&RuntimeError::Search("a search failed".into())).during("generation");
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.message, "generation failed: a search failed");
    }
}
