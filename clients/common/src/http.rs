//! The HTTP edge shared by the services: the request context (request id and deadline), the
//! extractors that answer 400 in the envelope, the envelope, and `GET /health`.

use std::time::{Duration, Instant};

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic_health::pb::health_check_response::ServingStatus;
use tracing::Instrument;

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

/// One HTTP request as the coordinator sees it: its request id and its deadline.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The `Idempotency-Key` header, or a fresh UUID.
    pub request_id: String,
    /// When the request arrived: the deadline counts from here, not from the first RPC.
    pub received_at: Instant,
    /// From `X-Request-Timeout`, if the caller gave one.
    pub timeout: Option<Duration>,
}

impl RequestContext {
    fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        let request_id = match headers.get(&IDEMPOTENCY_KEY) {
            Some(value) if !value.is_empty() => value
                .to_str()
                .map_err(|_| ApiError::bad_request(Some("Idempotency-Key"), "must be printable ASCII"))?
                .to_owned(),
            _ => uuid::Uuid::new_v4().to_string(),
        };
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
        Ok(Self {
            request_id,
            received_at: Instant::now(),
            timeout,
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
        let mut request = tonic::Request::new(message);
        request.set_timeout(remaining);
        if let Ok(value) = self.request_id.parse() {
            request.metadata_mut().insert(REQUEST_ID_METADATA, value);
        }
        Ok(request)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<RequestContext>().cloned().ok_or_else(|| {
            tracing::error!("RequestContext used without the with_request_context layer");
            ApiError::from(tonic::Status::internal("no request context"))
        })
    }
}

/// Adds what every service needs around its routes: the request context and its tracing span,
/// the `Idempotency-Key` response header, and an enveloped 404 for unknown paths.
pub fn with_request_context(routes: Router) -> Router {
    routes
        .fallback(|| async { ApiError::not_found("No such route") })
        .layer(axum::middleware::from_fn(request_context))
}

async fn request_context(mut request: Request, next: Next) -> Response {
    let context = match RequestContext::from_headers(request.headers()) {
        Ok(context) => context,
        Err(error) => return error.into_response(),
    };
    let span = tracing::info_span!(
        "http",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %context.request_id,
    );
    let key = HeaderValue::from_str(&context.request_id).ok();
    request.extensions_mut().insert(context);
    async move {
        let started = Instant::now();
        let mut response = next.run(request).await;
        tracing::info!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "answered"
        );
        if let Some(key) = key {
            response.headers_mut().insert(IDEMPOTENCY_KEY.clone(), key);
        }
        response
    }
    .instrument(span)
    .await
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
