//! The layer around every gRPC call (server.rs adds it to the tonic server): one span per call
//! with the method, the caller's `x-request-id`, the W3C trace context from `traceparent`, and an
//! empty `principal` that authentication fills in; one final log line with the gRPC code and
//! the duration (recorded fields never reach a log line written before them, so the end of a
//! call is its own event); and the RPC metrics.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tracing::Instrument;

use super::metrics;

/// The metadata key of the caller's request id.
pub const REQUEST_ID_METADATA: &str = "x-request-id";
/// The W3C trace context header, carried as gRPC metadata.
pub const TRACEPARENT_METADATA: &str = "traceparent";
/// Longest request id kept on the span: ids are short; a longer value is cut, not refused.
pub const REQUEST_ID_LOGGED_MAX: usize = 128;

/// A parsed W3C `traceparent`: version 00, 32 hex digits of trace id, 16 of parent span id,
/// 2 of flags, neither id all zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_id: String,
    pub flags: String,
}

impl TraceParent {
    pub fn parse(header: &str) -> Option<TraceParent> {
        let mut parts = header.trim().split('-');
        let (version, trace_id, parent_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |text: &str, length: usize| {
            text.len() == length && text.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
        };
        let valid = version == "00"
            && parts.next().is_none()
            && hex(trace_id, 32)
            && hex(parent_id, 16)
            && hex(flags, 2)
            && trace_id.bytes().any(|byte| byte != b'0')
            && parent_id.bytes().any(|byte| byte != b'0');
        valid.then(|| TraceParent {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: flags.to_owned(),
        })
    }

    /// A fresh trace for a call that came without one, sampled.
    pub fn new_root() -> TraceParent {
        let random_hex = |bytes: usize| -> String { (0..bytes).map(|_| format!("{:02x}", fastrand::u8(..))).collect() };
        TraceParent {
            trace_id: random_hex(16),
            parent_id: String::new(),
            flags: "01".to_owned(),
        }
    }
}

/// The `code` label and log field of a reply: tonic sends a handler's error as a trailers-only
/// reply, so its `grpc-status` is in the headers; a reply without one there is OK (Lockstep's
/// RPCs are unary, so no error can follow in the trailers).
pub fn code_of(headers: &http::HeaderMap) -> &'static str {
    let code = headers
        .get("grpc-status")
        .map(|value| tonic::Code::from_bytes(value.as_bytes()))
        .unwrap_or(tonic::Code::Ok);
    code_name(code)
}

pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Adds [`RpcService`] around each service of the server.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcLayer;

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
}

/// The span of one call, with its fields from the request's metadata.
fn span_of<B>(request: &http::Request<B>) -> tracing::Span {
    let headers = request.headers();
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let request_id = text(REQUEST_ID_METADATA).map(|id| id.chars().take(REQUEST_ID_LOGGED_MAX).collect::<String>());
    let trace = text(TRACEPARENT_METADATA)
        .and_then(TraceParent::parse)
        .unwrap_or_else(TraceParent::new_root);
    let parent_id = (!trace.parent_id.is_empty()).then_some(trace.parent_id.as_str());
    let span = tracing::info_span!(
        "rpc",
        method = request.uri().path(),
        request_id = request_id.as_deref(),
        trace_id = trace.trace_id.as_str(),
        parent_span_id = parent_id,
        principal = tracing::field::Empty,
    );
    #[cfg(feature = "otlp")]
    super::otlp::continue_trace(&span, headers);
    span
}

impl<S, B, ResponseBody> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResponseBody>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let span = span_of(&request);
        let started = Instant::now();
        let call = span.in_scope(|| self.inner.call(request));
        Box::pin(async move {
            let result = call.instrument(span.clone()).await;
            let elapsed = started.elapsed();
            let code = match &result {
                Ok(response) => code_of(response.headers()),
                Err(_) => "UNKNOWN",
            };
            metrics::rpc_served(&method, code, elapsed);
            let duration_ms = elapsed.as_secs_f64() * 1000.0;
            // Probes call health every few seconds: their lines are debug, the rest info.
            if method.starts_with("/lockstep.") {
                span.in_scope(|| tracing::info!(code, duration_ms, "rpc done"));
            } else {
                span.in_scope(|| tracing::debug!(code, duration_ms, "rpc done"));
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed traceparent is kept; malformed ones (version, lengths, all-zero ids,
    /// upper case) are refused, and the call then starts its own trace.
    #[test]
    fn traceparent_parsing_follows_w3c() {
        let parsed = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(parsed.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.parent_id, "00f067aa0ba902b7");
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        assert_eq!(TraceParent::new_root().trace_id.len(), 32);
    }
}
