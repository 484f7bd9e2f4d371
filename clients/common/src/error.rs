//! [`ApiError`]: the one place a gRPC status becomes an HTTP status and the envelope's `error`.
//!
//! | gRPC | HTTP |
//! |---|---|
//! | INVALID_ARGUMENT | 400, with `field` and `reason` from `google.rpc.BadRequest` |
//! | NOT_FOUND | 404 |
//! | FAILED_PRECONDITION | 422, with the coordinator's message (the rule and the figures) |
//! | ABORTED | 409, with `Retry-After` |
//! | RESOURCE_EXHAUSTED | 429, with `Retry-After` (the coordinator's queues are full) |
//! | UNAVAILABLE | 503, with `Retry-After` when the coordinator advises one |
//! | DEADLINE_EXCEEDED | 504 |
//! | anything else | 500, details logged, never sent |

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::http::Envelope;

/// `Retry-After` of a 409 (the account's lease was busy) when the coordinator sends no
/// google.rpc.RetryInfo: leases usually end within milliseconds, so the shortest HTTP allows.
pub const RETRY_AFTER_BUSY_SECONDS: u64 = 1;

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
    /// The coordinator's advice (google.rpc.RetryInfo), sent as `Retry-After` in whole seconds.
    #[serde(skip)]
    pub retry_after: Option<Duration>,
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
            retry_after: None,
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
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// How long the coordinator advises to wait before retrying (google.rpc.RetryInfo), if it says.
pub fn retry_advice(status: &Status) -> Option<Duration> {
    status.get_details_retry_info().and_then(|info| info.retry_delay)
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
            retry_after: retry_advice(&status),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        // HTTP counts in whole seconds: round the advice up, so a client never retries early.
        let retry_after = match (status, self.retry_after) {
            (_, Some(delay)) => Some(delay.as_secs() + u64::from(delay.subsec_nanos() > 0)),
            (StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS, None) => Some(RETRY_AFTER_BUSY_SECONDS),
            _ => None,
        };
        let mut response = (status, axum::Json(Envelope::<()>::failure(self))).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::ErrorDetails;

    use super::*;

    /// Each gRPC code lands on its HTTP status, and 400s carry the BadRequest field and reason.
    #[test]
    fn statuses_map_to_http() {
        let bad = Status::with_error_details(
            Code::InvalidArgument,
            "amount: must be greater than 0",
            ErrorDetails::with_bad_request_violation("amount", "must be greater than 0"),
        );
        let error = ApiError::from(bad);
        assert_eq!(
            (error.status, error.field.as_deref()),
            (StatusCode::BAD_REQUEST, Some("amount"))
        );
        assert_eq!(error.reason.as_deref(), Some("must be greater than 0"));
        for (code, http) in [
            (Code::NotFound, 404),
            (Code::FailedPrecondition, 422),
            (Code::Aborted, 409),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Internal, 500),
            (Code::Unknown, 500),
        ] {
            assert_eq!(http_status_of(code).as_u16(), http, "{code:?}");
        }
        assert_eq!(
            ApiError::from(Status::internal("secret detail")).message,
            "Internal error"
        );
    }

    /// Retry-After is the coordinator's RetryInfo rounded up to whole seconds, 1 for a bare 409.
    #[test]
    fn retry_after_rounds_the_advice_up() {
        let retry_after = |status: Status| {
            ApiError::from(status)
                .into_response()
                .headers()
                .get(header::RETRY_AFTER)
                .map(|value| value.to_str().unwrap().to_owned())
        };
        let advised =
            |code, delay| Status::with_error_details(code, "busy", ErrorDetails::with_retry_info(Some(delay)));
        assert_eq!(
            retry_after(advised(Code::Aborted, Duration::from_millis(250))).as_deref(),
            Some("1")
        );
        assert_eq!(
            retry_after(advised(Code::Unavailable, Duration::from_millis(1500))).as_deref(),
            Some("2")
        );
        assert_eq!(retry_after(Status::aborted("busy")).as_deref(), Some("1"));
        assert_eq!(retry_after(Status::unavailable("down")), None);
        assert_eq!(retry_after(Status::not_found("nobody")), None);
    }
}
