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

use std::sync::Arc;

use crate::auth::{EndUserAuth, EndUserSettings, check_listen};
use crate::coordinator::CoordinatorConnection;
use crate::http::service_router;
use crate::settings::CoordinatorSettings;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("coordinator connection: {0}")]
    Coordinator(#[from] crate::coordinator::ConnectError),
    #[error("settings: {0}")]
    Settings(String),
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
    run_with_auth(listener, settings, EndUserAuth::Off, routes, shutdown).await
}

/// `run` with end users authenticated as `end_users` says.
pub async fn run_with_auth(
    listener: TcpListener,
    settings: &CoordinatorSettings,
    end_users: EndUserAuth,
    routes: Router<CoordinatorConnection>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let coordinator = CoordinatorConnection::connect_lazy(settings)?;
    if !end_users.is_on() {
        tracing::info!("local mode: end users are not authenticated; serving on a loopback address only");
    }
    serve(
        listener,
        service_router(routes, coordinator, Arc::new(end_users)),
        shutdown,
    )
    .await
}

/// A service binary's `main` once its settings are parsed: survives SIGHUP (it has nothing to
/// reload, and a fleet-wide SIGHUP meant for coordinators must not stop it), starts logging, binds
/// `listen`, and serves `routes` through [`run`] until SIGINT/SIGTERM. Failures go to stderr,
/// prefixed with the binary's `name`.
pub async fn run_binary(
    name: &str,
    listen: SocketAddr,
    settings: &CoordinatorSettings,
    end_user_settings: &EndUserSettings,
    routes: Router<CoordinatorConnection>,
) -> ExitCode {
    if let Err(error) = lockstep::process::ignore_hangups() {
        eprintln!("{name}: cannot catch SIGHUP, which would then stop this process: {error}");
        return ExitCode::from(2);
    }
    lockstep::process::init_tracing();
    let end_users = match EndUserAuth::from_settings(end_user_settings)
        .and_then(|auth| check_listen(listen, &auth, end_user_settings.insecure).map(|()| auth))
    {
        Ok(auth) => auth,
        Err(error) => {
            eprintln!("{name}: settings: {error}");
            return ExitCode::FAILURE;
        }
    };
    if end_user_settings.insecure {
        tracing::warn!(%listen, "--insecure: serving without requiring end-user authentication on this address; never do this in production");
    }
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("{name}: cannot listen on {listen}: {error}");
            return ExitCode::FAILURE;
        }
    };
    match run_with_auth(
        listener,
        settings,
        end_users,
        routes,
        lockstep::process::shutdown_signal(),
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name}: {error}");
            ExitCode::FAILURE
        }
    }
}
