//! Span export over OTLP/HTTP (protobuf), with the `otlp` feature and `--otlp-endpoint URL`.
//!
//! The exporter posts to `URL/v1/traces` through hyper (already in the tree for tonic), from a
//! batch processor on the tokio runtime; the gRPC exporter is not used because it would bring its
//! own tonic. A call's span takes the caller's W3C `traceparent` as its parent ([`continue_trace`]),
//! so the coordinator's spans join the caller's trace.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::codegen::http;

/// How long one export may take before it is dropped.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The tracer provider exporting to `endpoint` (a collector's base URL, e.g.
/// `http://127.0.0.1:4318`) and the layer that feeds it every span. Keep the provider and call
/// `shutdown` on it before the process exits, to flush the last batch.
pub fn pipeline<S>(
    endpoint: &str,
    service_name: &str,
) -> Result<
    (
        SdkTracerProvider,
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
    ),
    String,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(opentelemetry_http::hyper::HyperClient::with_default_connector(
            EXPORT_TIMEOUT,
            None,
        ))
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|error| format!("--otlp-endpoint {endpoint}: {error}"))?;
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("lockstep-coordinator");
    Ok((provider, tracing_opentelemetry::layer().with_tracer(tracer)))
}

/// Makes `span` a child of the caller's trace, when its metadata carries a valid `traceparent`.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let propagator = opentelemetry_sdk::propagation::TraceContextPropagator::new();
    let context = propagator.extract(&opentelemetry_http::HeaderExtractor(headers));
    // Without an OpenTelemetry layer (no --otlp-endpoint) there is nothing to attach to.
    let _ = span.set_parent(context);
}
