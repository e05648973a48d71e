//! Every error a client can get, and the one place it becomes an HTTP response:
//! `{"error": {"code", "message", "fields": [{"field", "reason"}]}}`.
//!
//! 500s carry a generic message and an error id that is also in the log; nothing else (no
//! paths, no runtime messages, no secrets) reaches the client.

pub use crate::wire::{ErrorBody, ErrorDetail, FieldProblem};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401; `challenge` is the auth plugin's `WWW-Authenticate` value.
    #[error("{reason}")]
    Unauthorized {
        reason: String,
        challenge: Option<String>,
    },
    #[error("{0}")]
    Forbidden(String),
    #[error("no such job")]
    NotFound,
    #[error("no such slot (the slots are auth, validate and postprocess)")]
    NoSuchSlot,
    #[error("{message}")]
    Invalid {
        message: String,
        fields: Vec<FieldProblem>,
    },
    #[error("{0}")]
    MalformedJson(String),
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the queue is full ({queued} jobs waiting); retry in {retry_after} s")]
    QueueFull { queued: u64, retry_after: u64 },
    /// 429 from admission (the validate plugin): this caller has enough going already.
    #[error("{reason}; retry in {retry_after} s")]
    CallerBusy { reason: String, retry_after: u64 },
    #[error("{0}")]
    Conflict(String),
    /// A policy plugin failed closed.
    #[error("the {slot} policy is unavailable; the request was refused (try again)")]
    PluginUnavailable { slot: crate::plugins::Slot },
    #[error("{0}")]
    NotReady(String),
    /// Past `--max-connections`: this connection is answered and closed.
    #[error("the server has too many connections open; retry in 1 s")]
    Overloaded,
    /// The body did not arrive within `--body-timeout-ms` of the headers.
    #[error("the request body did not arrive within {seconds} s")]
    BodyTimeout { seconds: u64 },
    /// Logged with its id where it happened; the client sees only the id.
    #[error("internal error (error id {error_id})")]
    Internal { error_id: String },
}

/// The default challenge when a plugin supplies none or an unusable one.
const DEFAULT_CHALLENGE: &str = "Bearer realm=\"wanserve\"";

impl ApiError {
    /// A plugin on the request path failed (trap, deadline, bad output): the request is
    /// refused (fail closed) and the failure logged, never shown.
    pub fn plugin_failed(slot: crate::plugins::Slot, error: &crate::plugins::PluginError) -> Self {
        tracing::warn!(slot = %slot, error = %error, "refusing the request: plugin failed closed");
        Self::PluginUnavailable { slot }
    }

    /// Logs `cause` at error level with a fresh id and returns the 500 that names the id.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        let error_id = crate::ids::new_error_id();
        tracing::error!(error_id, error = %cause, "internal error");
        ApiError::Internal { error_id }
    }

    pub fn invalid(fields: Vec<FieldProblem>) -> Self {
        let names: Vec<&str> = fields.iter().map(|f| f.field.as_str()).collect();
        ApiError::Invalid {
            message: format!("invalid request: {}", names.join(", ")),
            fields,
        }
    }

    pub fn field(field: &str, reason: impl Into<String>) -> Self {
        Self::invalid(vec![FieldProblem {
            field: field.into(),
            reason: reason.into(),
        }])
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound | ApiError::NoSuchSlot => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "queue_full"),
            ApiError::CallerBusy { .. } => (StatusCode::TOO_MANY_REQUESTS, "caller_busy"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::PluginUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "plugin_unavailable")
            }
            ApiError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            ApiError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::Internal { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// A plugin-supplied header value, if it is a safe single-line header (no CR/LF, no control
/// characters, bounded).
pub fn safe_header_value(value: &str) -> Option<HeaderValue> {
    if value.is_empty()
        || value.len() > 1024
        || value.bytes().any(|b| b.is_ascii_control() || !b.is_ascii())
    {
        return None;
    }
    HeaderValue::from_str(value).ok()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let fields = match &self {
            ApiError::Invalid { fields, .. } => fields.clone(),
            _ => Vec::new(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
                fields,
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthorized { challenge, .. } => {
                let value = challenge
                    .as_deref()
                    .and_then(safe_header_value)
                    .filter(|v| {
                        // The challenge must name the Bearer scheme the API uses.
                        v.to_str()
                            .map(|s| s.len() >= 6 && s[..6].eq_ignore_ascii_case("bearer"))
                            .unwrap_or(false)
                    })
                    .unwrap_or_else(|| HeaderValue::from_static(DEFAULT_CHALLENGE));
                headers.insert(header::WWW_AUTHENTICATE, value);
            }
            ApiError::QueueFull { retry_after, .. } | ApiError::CallerBusy { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            ApiError::BodyTimeout { .. } => {
                // The rest of the body may still come: nothing else is read on this connection.
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ApiError::PluginUnavailable { .. } | ApiError::NotReady(_) | ApiError::Overloaded => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// One documented error answer: `ErrorBody` with `description`.
fn documented_error(
    description: &str,
) -> utoipa::openapi::RefOr<utoipa::openapi::response::Response> {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into()
}

type DocumentedResponses =
    std::collections::BTreeMap<String, utoipa::openapi::RefOr<utoipa::openapi::response::Response>>;

/// The answers every keyed `/video` endpoint with a JSON body may give besides its own,
/// declared once for the OpenAPI document (`responses(…, JsonCallErrors)`): 400, 401, 413, 500.
pub struct JsonCallErrors;

impl utoipa::IntoResponses for JsonCallErrors {
    fn responses() -> DocumentedResponses {
        [
            ("400", "Malformed JSON"),
            ("401", "Authentication failed"),
            ("413", "Body too large"),
            (
                "500",
                "Server error (the body names an error id the log has)",
            ),
        ]
        .into_iter()
        .map(|(status, description)| (status.to_string(), documented_error(description)))
        .collect()
    }
}

/// [`JsonCallErrors`] and what an endpoint addressing one job by `requestId` adds: 404, 422,
/// and 503 when the auth plugin fails.
pub struct JobRefErrors;

impl utoipa::IntoResponses for JobRefErrors {
    fn responses() -> DocumentedResponses {
        let mut responses = JsonCallErrors::responses();
        for (status, description) in [
            ("404", "No such job for this caller"),
            ("422", "requestId missing or not a string"),
            ("503", "The auth plugin failed (refused)"),
        ] {
            responses.insert(status.to_string(), documented_error(description));
        }
        responses
    }
}
