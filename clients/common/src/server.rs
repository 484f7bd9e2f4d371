//! Serving: a router on a listener until shutdown, then draining in-flight requests; and logs.

use std::future::Future;

use axum::Router;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("coordinator URL: {0}")]
    CoordinatorUrl(#[from] tonic::transport::Error),
    #[error("serve: {0}")]
    Serve(#[from] std::io::Error),
}

/// Serves `router` until `shutdown` resolves, then stops accepting and waits for in-flight
/// requests (each bounded by its deadline) to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    tracing::info!(address = %listener.local_addr()?, "serving HTTP");
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Logs to stderr, `info` unless `RUST_LOG` says otherwise.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves on SIGINT or SIGTERM.
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
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal: draining in-flight requests");
}
