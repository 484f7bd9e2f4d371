//! The one shared client module of Lockstep's thin HTTP services (`user-service`,
//! `order-service`): everything about talking to the coordinator that is not a route.
//!
//! A platform team wiring its own service to Lockstep copies this crate and one of the services.
//!
//! # Layout
//! - [`settings`]: where the coordinator is and how long to wait for it (clap flags with
//!   environment fallbacks), flattened into each service's own settings.
//! - [`coordinator`]: [`CoordinatorConnection`], one lazily connected gRPC channel, and its
//!   [`call`](CoordinatorConnection::call), which gives every RPC the HTTP request's deadline,
//!   carries its request id as `x-request-id` metadata, and retries UNAVAILABLE with the same
//!   message (so the same `request_id`) after a jittered backoff.
//! - [`http`]: the HTTP edge: [`service_router`](http::service_router) around a service's
//!   routes (tower-http's request-id layers on `Idempotency-Key` and its trace layer for the
//!   per-request span and access log), [`RequestContext`] (request id from `Idempotency-Key`,
//!   deadline from `X-Request-Timeout`), JSON and query extractors that answer 400 in the
//!   envelope, the envelope itself, and `GET /health` (the coordinator's grpc.health.v1 status).
//! - [`auth`]: end users' JWTs on the services' routes (`sub` must own the user in the path
//!   or body; 401 / 403), and the listen-address rule; the coordinator credentials (TLS, client
//!   certificate, bearer token) are in [`coordinator`] and [`settings`].
//! - [`jwt_ring`]: jsonwebtoken's HS256, RS256 and ES256 on *ring*, installed by [`auth`].
//! - [`error`]: [`ApiError`], the one place a gRPC status becomes an HTTP status and JSON error.
//! - [`server`]: what every service binary does alike: [`run`](server::run) serves a service's
//!   routes until shutdown and drains in-flight requests; [`run_binary`](server::run_binary) is
//!   the rest of `main` (logging, bind, SIGINT/SIGTERM).
//!
//! # Contract at the edge
//! - `Idempotency-Key: <key>` becomes the coordinator's `request_id`: retrying a POST with the
//!   same key returns the original reply and applies once. Without one (or with an empty one) the
//!   service makes a UUID.
//!   Every response carries the request's key back in `Idempotency-Key`, so a client can retry.
//!   After a 503 or 504 a mutation may have applied; the retry with the same key tells.
//! - `X-Request-Timeout: <milliseconds>` shortens the request's deadline (never beyond
//!   `--request-timeout-ms`); it reaches the coordinator as the gRPC deadline (`grpc-timeout`).
//! - Every body is `{"success": bool, "data": ..., "error": ...}`; money and quantities are
//!   decimal strings, as on the wire, so nothing is ever rounded through floating point.

pub mod auth;
pub mod coordinator;
pub mod error;
pub mod http;
pub mod jwt_ring;
pub mod server;
pub mod settings;

pub use auth::{EndUser, EndUserSettings};
pub use coordinator::CoordinatorConnection;
pub use error::ApiError;
pub use http::{ApiResult, JsonBody, PageParams, QueryParams, RequestContext, ok};
pub use settings::CoordinatorSettings;
