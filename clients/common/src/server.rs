//! Serving: a router on a listener until shutdown, then draining in-flight requests. Logging and
//! the shutdown signal are [`lockstep::process`], the same as the coordinator's.

use std::future::Future;

use axum::Router;
use tokio::net::TcpListener;

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
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            shutdown.await;
            tracing::info!("draining in-flight requests");
        })
        .await?;
    tracing::info!("stopped");
    Ok(())
}
