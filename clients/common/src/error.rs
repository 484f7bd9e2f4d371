//! [`ApiError`]: the one place a gRPC status becomes an HTTP status and the envelope's `error`.
//!
//! | gRPC | HTTP |
//! |---|---|
//! | INVALID_ARGUMENT | 400, with `field` and `reason` from `google.rpc.BadRequest` |
//! | NOT_FOUND | 404 |
//! | FAILED_PRECONDITION | 422, with the coordinator's message (the rule and the figures) |
//! | ABORTED | 409, with `Retry-After` |
//! | UNAVAILABLE | 503 |
//! | DEADLINE_EXCEEDED | 504 |
//! | anything else | 500, details logged, never sent |

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::http::Envelope;

/// Seconds a client should wait after a 409 (the account's lease was busy): leases of deposits
/// and withdrawals usually end within milliseconds, so one second is ample and not wasteful.
pub const RETRY_AFTER_BUSY_SECONDS: u32 = 1;

/// An error answer: its HTTP status, and the `error` object of the envelope.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    /// The gRPC code's name, e.g. `FailedPrecondition`, so clients can branch without parsing text.
    pub code: String,
    pub message: String,
    /// For 400: the request field at fault and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ApiError {
    /// A request the HTTP layer itself cannot read (malformed JSON, a bad header): 400.
    pub fn bad_request(field: Option<&str>, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Self {
            status: StatusCode::BAD_REQUEST,
            code: format!("{:?}", Code::InvalidArgument),
            message: match field {
                Some(field) => format!("{field}: {reason}"),
                None => reason.clone(),
            },
            field: field.map(str::to_owned),
            reason: Some(reason),
        }
    }

    pub fn deadline_exceeded() -> Self {
        Self::from(Status::deadline_exceeded("Deadline exceeded"))
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::from(Status::unavailable(message))
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::from(Status::not_found(message))
    }
}

/// The HTTP status of a gRPC code.
pub fn http_status_of(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::FailedPrecondition => StatusCode::UNPROCESSABLE_ENTITY,
        Code::Aborted => StatusCode::CONFLICT,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        let http_status = http_status_of(status.code());
        let violation = match status.code() {
            Code::InvalidArgument => status
                .get_details_bad_request()
                .and_then(|details| details.field_violations.into_iter().next()),
            _ => None,
        };
        // The coordinator's own UNAVAILABLE and INTERNAL messages are already generic, but the
        // same codes also come from the transport (e.g. "tcp connect error"): log, do not send.
        let message = match http_status {
            StatusCode::SERVICE_UNAVAILABLE => {
                tracing::warn!(code = ?status.code(), message = status.message(), "coordinator unavailable");
                "Service temporarily unavailable".to_owned()
            }
            StatusCode::INTERNAL_SERVER_ERROR => {
                tracing::error!(code = ?status.code(), message = status.message(), "coordinator call failed");
                "Internal error".to_owned()
            }
            _ => status.message().to_owned(),
        };
        Self {
            status: http_status,
            code: format!("{:?}", status.code()),
            message,
            field: violation.as_ref().map(|violation| violation.field.clone()),
            reason: violation.map(|violation| violation.description),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = (status, axum::Json(Envelope::<()>::failure(self))).into_response();
        if status == StatusCode::CONFLICT {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_BUSY_SECONDS));
        }
        response
    }
}
