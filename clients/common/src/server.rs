//! Serving: what `user-service` and `order-service` do alike around their routes. [`run`] serves
//! a service's routes (with `GET /health` and the request context) until shutdown, then drains
//! in-flight requests; the tests call it on port 0. [`run_binary`] is the whole of each `main`
//! after parsing settings, and calls [`run`] the same way. Logging and the shutdown signal are
//! [`lockstep::process`], the same as the coordinator's.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use axum::Router;
use tokio::net::TcpListener;

use crate::coordinator::CoordinatorConnection;
use crate::http::service_router;
use crate::settings::CoordinatorSettings;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("coordinator URL: {0}")]
    CoordinatorUrl(#[from] tonic::transport::Error),
    #[error("serve: {0}")]
    Serve(#[from] std::io::Error),
}

/// Serves `router` until `shutdown` resolves, then stops accepting and waits for in-flight
/// requests (each bounded by its deadline) to finish.
async fn serve(
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

/// Connects to the coordinator (lazily) and serves `routes`, with `GET /health` and the request
/// context around them, until `shutdown` resolves; then drains in-flight requests.
pub async fn run(
    listener: TcpListener,
    settings: &CoordinatorSettings,
    routes: Router<CoordinatorConnection>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let coordinator = CoordinatorConnection::connect_lazy(settings)?;
    serve(listener, service_router(routes, coordinator), shutdown).await
}

/// A service binary's `main` once its settings are parsed: starts logging, binds `listen`, and
/// serves `routes` through [`run`] until SIGINT/SIGTERM. Failures go to stderr, prefixed with the
/// binary's `name`.
pub async fn run_binary(
    name: &str,
    listen: SocketAddr,
    settings: &CoordinatorSettings,
    routes: Router<CoordinatorConnection>,
) -> ExitCode {
    lockstep::process::init_tracing();
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("{name}: cannot listen on {listen}: {error}");
            return ExitCode::FAILURE;
        }
    };
    match run(listener, settings, routes, lockstep::process::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name}: {error}");
            ExitCode::FAILURE
        }
    }
}
