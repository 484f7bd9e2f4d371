//! What every Lockstep binary does the same way around its server: logging to stderr, stopping
//! on SIGINT or SIGTERM, and surviving SIGHUP. The coordinator and the services in `clients/`
//! use these.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// For people: one line per event, the span's fields before it.
    #[default]
    Text,
    /// For log pipelines: one JSON object per line, with the event's fields, the current span's
    /// fields (`span`) and every enclosing span's (`spans`): user, operation, lock id, request
    /// id, trace id, principal, outcome and duration where the request has them.
    Json,
}

/// Logs to stderr, `info` unless `RUST_LOG` says otherwise; colours only on a terminal.
pub fn init_tracing() {
    init_tracing_as(LogFormat::Text);
}

/// `init_tracing` in the given format, with `extra` (e.g. an OpenTelemetry exporter layer)
/// seeing every span and event the filter lets through.
pub fn init_tracing_with(format: LogFormat, extra: Box<dyn tracing_subscriber::Layer<Registry> + Send + Sync>) {
    let filter = crate::log_filter::from_env();
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match format {
        LogFormat::Text => lines
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => lines
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .flatten_event(true)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(extra)
        .with(filter)
        .with(lines)
        .init();
}

/// `init_tracing` in the given format.
pub fn init_tracing_as(format: LogFormat) {
    init_tracing_with(format, Box::new(tracing_subscriber::layer::Identity::new()));
}

/// Resolves on SIGINT or SIGTERM, whichever comes first.
pub async fn shutdown_signal() {
    let interrupt = async {
        tokio::signal::ctrl_c().await.ok();
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    let signal = tokio::select! {
        () = interrupt => "SIGINT",
        () = terminate => "SIGTERM",
    };
    tracing::info!(signal, "shutdown signal received");
}

/// Listens for SIGHUP, and so takes it away from its default action (terminating the process)
/// for the rest of the process's life: tokio never restores the default, even when every
/// listener is dropped. The coordinator calls this first thing in `main`, because operators send
/// SIGHUP to a whole fleet to reload auth files (README, Rotation), and a coordinator started
/// without one, or still starting, must not die of it. Each call gives a listener of its own that
/// sees every SIGHUP from then on. Fails only when the OS refuses the handler.
#[cfg(unix)]
pub fn catch_hangups() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// For a process with nothing to reload (the services in `clients/`): SIGHUP is caught, so a
/// fleet-wide one does not stop it, and each is logged as such.
#[cfg(unix)]
pub fn ignore_hangups() -> std::io::Result<()> {
    let mut hangups = catch_hangups()?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP received: nothing to reload");
        }
    });
    Ok(())
}
