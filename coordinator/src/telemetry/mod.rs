//! What an operator sees of a running coordinator: metrics, per-call logs, trace context and
//! health.
//!
//! # Layout
//! - [`metrics`]: every metric name and the typed one-liners the service calls; the scrape.
//! - [`contention`]: the bounded top-k of the most contended users (never a metric label).
//! - [`rpc`]: the tower layer around every gRPC call: its span (method, request id, W3C trace
//!   id, principal), its final log line with code and duration, and its metrics.
//! - [`health`]: readiness from the outcomes of real storage requests, with a slow probe only
//!   when idle.
//! - [`otlp`] (feature `otlp`): span export over OTLP/HTTP, `--otlp-endpoint`.
//! - this file: the `/metrics` HTTP listener (`--metrics-listen`).

pub mod contention;
pub mod health;
pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod rpc;

use tokio::net::TcpListener;

/// Serves `GET /metrics` on `listener` until the process ends.
pub async fn serve_metrics(listener: TcpListener) -> std::io::Result<()> {
    use axum::routing::get;
    let router = axum::Router::new().route(
        "/metrics",
        get(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
                metrics::render(),
            )
        }),
    );
    tracing::info!(address = %listener.local_addr()?, "serving metrics on /metrics");
    axum::serve(listener, router).await
}
