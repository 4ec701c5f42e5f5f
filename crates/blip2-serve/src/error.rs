//! Errors as OpenAI writes them: `{"error": {"message", "type", "param", "code"}}` with
//! the status code that fits.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
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
