//! The HTTP edge shared by the services: the router around their routes (request id and access
//! log through tower-http), the request context (request id and deadline), the extractors that
//! answer 400 in the envelope, the envelope, and `GET /health`.

use std::time::{Duration, Instant};

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic_health::pb::health_check_response::ServingStatus;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

use std::sync::Arc;

use crate::auth::EndUserAuth;
use crate::coordinator::{CoordinatorConnection, REQUEST_ID_METADATA};
use crate::error::ApiError;

/// Request header whose value becomes the coordinator's `request_id`; echoed on every response.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Request header: the caller's deadline for this request, in milliseconds, e.g. `250`.
pub static REQUEST_TIMEOUT: HeaderName = HeaderName::from_static("x-request-timeout");

/// The standard response: `{"success": bool, "data": ..., "error": ...}`.
#[derive(Debug, Serialize)]
pub struct Envelope<T> {
    pub success: bool,
    pub data: Option<T>,
    pub error: Option<ApiError>,
}

impl Envelope<()> {
    pub fn failure(error: ApiError) -> Self {
        Self {
            success: false,
            data: None,
            error: Some(error),
        }
    }
}

/// What every handler returns.
pub type ApiResult<T> = Result<Json<Envelope<T>>, ApiError>;

/// A 200 with `data`.
pub fn ok<T>(data: T) -> ApiResult<T> {
    Ok(Json(Envelope {
        success: true,
        data: Some(data),
        error: None,
    }))
}

/// The W3C trace context header, passed through as gRPC metadata of the same name.
pub const TRACEPARENT: &str = "traceparent";

/// One HTTP request as the coordinator sees it: its request id and its deadline.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The `Idempotency-Key` header, or the UUID [`service_router`] made when there was none.
    pub request_id: String,
    /// When the request arrived: the deadline counts from here, not from the first RPC.
    pub received_at: Instant,
    /// From `X-Request-Timeout`, if the caller gave one.
    pub timeout: Option<Duration>,
    /// The caller's W3C `traceparent`, passed on to the coordinator so its spans continue the
    /// caller's trace.
    pub traceparent: Option<String>,
}

impl RequestContext {
    fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        let request_id = headers
            .get(&IDEMPOTENCY_KEY)
            .ok_or_else(|| {
                tracing::error!("RequestContext used outside service_router, which sets Idempotency-Key");
                ApiError::from(tonic::Status::internal("no request id"))
            })?
            .to_str()
            .map_err(|_| ApiError::bad_request(Some("Idempotency-Key"), "must be printable ASCII"))?
            .to_owned();
        let timeout = headers
            .get(&REQUEST_TIMEOUT)
            .map(|value| {
                value
                    .to_str()
                    .ok()
                    .and_then(|text| text.parse::<u64>().ok())
                    .filter(|milliseconds| *milliseconds > 0)
                    .map(Duration::from_millis)
                    .ok_or_else(|| {
                        ApiError::bad_request(Some("X-Request-Timeout"), "must be a positive number of milliseconds")
                    })
            })
            .transpose()?;
        let traceparent = headers
            .get(TRACEPARENT)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        Ok(Self {
            request_id,
            received_at: Instant::now(),
            timeout,
            traceparent,
        })
    }

    /// The request's deadline: its `X-Request-Timeout`, at most `limit`, from its arrival.
    pub fn deadline(&self, limit: Duration) -> Instant {
        self.received_at + self.timeout.map_or(limit, |timeout| timeout.min(limit))
    }

    /// `message` as a gRPC request carrying the time left until `deadline` and the request id.
    pub fn grpc_request<M>(&self, message: M, deadline: Instant) -> Result<tonic::Request<M>, ApiError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ApiError::deadline_exceeded());
        }
        let mut request = self.stream_request(message);
        request.set_timeout(remaining);
        Ok(request)
    }

    /// The request of a stream that lasts as long as its HTTP client stays (no deadline), with
    /// the request id and trace context.
    pub fn stream_request<M>(&self, message: M) -> tonic::Request<M> {
        let mut request = tonic::Request::new(message);
        if let Ok(value) = self.request_id.parse() {
            request.metadata_mut().insert(REQUEST_ID_METADATA, value);
        }
        if let Some(value) = self.traceparent.as_deref().and_then(|text| text.parse().ok()) {
            request.metadata_mut().insert(TRACEPARENT, value);
        }
        request
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = ApiError;

    /// Runs before the body is read (every handler takes the context before its body), so
    /// `received_at` is the request's arrival, give or take routing.
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        RequestContext::from_headers(&parts.headers)
    }
}

/// The router of a service: its `routes`, `GET /health`, an enveloped 404 for unknown paths,
/// and around them the request id (`Idempotency-Key`, made when absent and echoed on every
/// response) and one tracing span and access-log line per request.
/// With end-user authentication on, every route but `/health` first passes
/// [`crate::auth::authenticate`], inside the request's span.
pub fn service_router(
    routes: Router<CoordinatorConnection>,
    coordinator: CoordinatorConnection,
    end_users: Arc<EndUserAuth>,
) -> Router {
    routes
        .route("/health", get(health))
        .fallback(|| async { ApiError::not_found("No such route") })
        .with_state(coordinator)
        .layer(axum::middleware::from_fn_with_state(
            end_users,
            crate::auth::authenticate,
        ))
        .layer(
            ServiceBuilder::new()
                .layer(axum::middleware::map_request(empty_key_is_no_key))
                .layer(SetRequestIdLayer::new(IDEMPOTENCY_KEY.clone(), MakeRequestUuid))
                .layer(PropagateRequestIdLayer::new(IDEMPOTENCY_KEY.clone()))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(request_span)
                        .on_request(())
                        .on_response(log_answer)
                        // The access-log line already carries every status; one line a request.
                        .on_failure(()),
                ),
        )
}

/// An empty `Idempotency-Key` is no key: the request gets a fresh one, as one without the header
/// does, so that the caller can still retry it safely.
async fn empty_key_is_no_key(mut request: Request) -> Request {
    if request
        .headers()
        .get(&IDEMPOTENCY_KEY)
        .is_some_and(HeaderValue::is_empty)
    {
        request.headers_mut().remove(&IDEMPOTENCY_KEY);
    }
    request
}

/// Every log line of a request carries its method, path and request id.
fn request_span(request: &Request) -> Span {
    let request_id = request
        .headers()
        .get(&IDEMPOTENCY_KEY)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!(
        "http",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %request_id,
        end_user = tracing::field::Empty,
    )
}

/// The access log: one line when the response is ready.
fn log_answer(response: &Response, elapsed: Duration, _span: &Span) {
    tracing::info!(
        status = response.status().as_u16(),
        elapsed_ms = elapsed.as_millis() as u64,
        "answered"
    );
}

/// A JSON body; a body that is not valid JSON of the expected shape is a 400 in the envelope.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(ApiError::bad_request(None, rejection.body_text())),
        }
    }
}

/// Query parameters; ones that do not parse are a 400 in the envelope.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(QueryParams(value)),
            Err(rejection) => Err(ApiError::bad_request(None, rejection.body_text())),
        }
    }
}

/// `?cursor=&limit=` of a paged list: the coordinator's `page_token` and `page_size`.
#[derive(Debug, Default, Deserialize)]
pub struct PageParams {
    /// `next_cursor` of the previous page; empty for the first page.
    #[serde(default)]
    pub cursor: String,
    /// Page size; 0 or absent means the coordinator's default.
    #[serde(default)]
    pub limit: u32,
}

/// `GET /health`: 200 while the coordinator reports SERVING on grpc.health.v1, else 503.
pub async fn health(
    State(coordinator): State<CoordinatorConnection>,
    context: RequestContext,
) -> ApiResult<serde_json::Value> {
    match coordinator.health(&context).await? {
        ServingStatus::Serving => ok(serde_json::json!({ "coordinator": "SERVING" })),
        status => Err(ApiError::unavailable(format!(
            "Coordinator reports {}",
            status.as_str_name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::StatusCode;
    use tower::ServiceExt;

    use super::*;
    use crate::settings::CoordinatorSettings;

    /// The caller's `traceparent` rides on every gRPC request to the coordinator, beside the
    /// request id.
    #[test]
    fn the_trace_context_is_passed_on() {
        let mut headers = HeaderMap::new();
        headers.insert(&IDEMPOTENCY_KEY, HeaderValue::from_static("key-1"));
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert(TRACEPARENT, HeaderValue::from_static(traceparent));
        let context = RequestContext::from_headers(&headers).unwrap();
        let request = context
            .grpc_request((), Instant::now() + Duration::from_secs(1))
            .unwrap();
        assert_eq!(request.metadata().get(TRACEPARENT).unwrap(), traceparent);
        assert_eq!(request.metadata().get(REQUEST_ID_METADATA).unwrap(), "key-1");
    }

    /// The status, the `Idempotency-Key` response header, and the body of one request to a
    /// service whose only route answers with the request id its handler saw.
    async fn answer(path: &str, headers: &[(&str, &str)]) -> (StatusCode, Option<String>, String) {
        let routes = Router::new().route(
            "/request-id",
            get(|context: RequestContext| async move { context.request_id }),
        );
        // Lazy: nothing listens there, and nothing here calls the coordinator.
        let coordinator = CoordinatorConnection::connect_lazy(&CoordinatorSettings::new("http://127.0.0.1:1"))
            .expect("coordinator URL");
        let mut request = Request::builder().uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = service_router(routes, coordinator, Arc::new(EndUserAuth::Off))
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        let key = response
            .headers()
            .get(&IDEMPOTENCY_KEY)
            .map(|value| value.to_str().expect("ASCII key").to_owned());
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.expect("body");
        (status, key, String::from_utf8(body.to_vec()).expect("UTF-8 body"))
    }

    /// A request without a key, or with an empty one, gets a fresh UUID: the handler sees it and
    /// the response carries it back, so the caller can retry with it.
    #[tokio::test]
    async fn a_missing_or_empty_key_becomes_a_fresh_uuid_on_both_sides() {
        let mut keys = Vec::new();
        for headers in [&[][..], &[("Idempotency-Key", "")][..]] {
            let (status, key, seen) = answer("/request-id", headers).await;
            assert_eq!(status, StatusCode::OK, "{headers:?}");
            let key = key.expect("a generated Idempotency-Key");
            uuid::Uuid::parse_str(&key).expect("the generated key is a UUID");
            assert_eq!(seen, key, "the handler sees the key the response carries");
            keys.push(key);
        }
        assert_ne!(keys[0], keys[1], "each request gets its own key");
    }

    /// The caller's key is the request id, and is echoed unchanged.
    #[tokio::test]
    async fn the_callers_key_is_the_request_id_and_is_echoed() {
        let (status, key, seen) = answer("/request-id", &[("Idempotency-Key", "order-7")]).await;
        assert_eq!(
            (status, key.as_deref(), seen.as_str()),
            (StatusCode::OK, Some("order-7"), "order-7")
        );
    }

    /// A bad `X-Request-Timeout` is a 400 naming the header, and the key still comes back; an
    /// unknown path is an enveloped 404.
    #[tokio::test]
    async fn bad_headers_and_unknown_paths_answer_in_the_envelope() {
        let (status, key, body) = answer(
            "/request-id",
            &[("Idempotency-Key", "order-8"), ("X-Request-Timeout", "soon")],
        )
        .await;
        assert_eq!((status, key.as_deref()), (StatusCode::BAD_REQUEST, Some("order-8")));
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON envelope");
        assert_eq!(body["error"]["field"], "X-Request-Timeout", "{body}");

        let (status, key, body) = answer("/no/such/route", &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(key.is_some(), "every response carries a key");
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON envelope");
        assert_eq!(body["success"], false, "{body}");
    }
}
