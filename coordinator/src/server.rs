//! Wiring: open storage, seed the catalog, and serve gRPC (coordinator, health, reflection) on a
//! listener until shutdown. `run` is what the binary and the tests both call.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lockstep::coordinator::v1::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::affinity::Affinity;
use crate::affinity::forward::Forwarder;
use crate::auth::layer::AuthLayer;
use crate::auth::{Mode, Security};
use crate::core::Clock;
use crate::core::records::Asset;
use crate::service::TransactionCoordinator;
use crate::settings::{Settings, StorageKind};
use crate::storage::dynamodb::DynamoDbEngine;
use crate::storage::embedded::EmbeddedEngine;
use crate::storage::{Engine, Storage, StorageError};
use crate::transport::CoordinatorService;

pub use crate::service::DEFAULT_CATALOG;
/// Concurrent calls on one HTTP/2 connection; past it the client queues them itself. Together
/// with `--max-inflight` (across connections) it bounds the work one coordinator accepts.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// The name readiness is reported under; "" (the whole server) is liveness.
pub const SERVICE_NAME: &str = crate::telemetry::health::READINESS_SERVICE;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("settings: {0}")]
    Settings(String),
    #[error("catalog: {0}")]
    Catalog(String),
    #[error("serve: {0}")]
    Serve(String),
    #[error("{0}")]
    Instance(#[from] crate::service::InstanceError),
}

/// Parses a catalog file: a JSON list of `{"symbol", "price", "active"}`.
pub fn parse_catalog(json: &str) -> Result<Vec<Asset>, StartError> {
    crate::service::parse_catalog(json).map_err(StartError::Catalog)
}

/// Opens the configured storage. The embedded engine creates its table on first start; on an
/// endpoint the table must exist (`coordinator create-tables`).
pub async fn open_storage(settings: &Settings) -> Result<Storage, StartError> {
    let storage = connect_storage(settings).await?;
    match settings.storage_kind() {
        StorageKind::Embedded => storage.ensure_table().await?,
        StorageKind::Dynamodb => {
            if !storage.table_exists().await? {
                return Err(StartError::Settings(format!(
                    "table {} does not exist; create it with `coordinator create-tables`",
                    settings.table
                )));
            }
        }
    }
    Ok(if settings.group_commit_enabled() {
        tracing::info!("group commit on: batch commits of several users may share one transaction");
        storage.with_group_commit()
    } else {
        storage
    })
}

/// Storage as configured, without checking or creating the table.
pub async fn connect_storage(settings: &Settings) -> Result<Storage, StartError> {
    let engine: Arc<dyn Engine> = match settings.storage_kind() {
        StorageKind::Embedded => Arc::new(EmbeddedEngine::open(&settings.data_dir)?),
        StorageKind::Dynamodb => Arc::new(
            DynamoDbEngine::from_environment(settings.dynamodb_endpoint.as_deref(), settings.region.as_deref()).await,
        ),
    };
    #[cfg(feature = "fault-injection")]
    let engine: Arc<dyn Engine> = if settings.inject_faults > 0.0 {
        tracing::warn!(rate = settings.inject_faults, "injecting storage faults (testing only)");
        Arc::new(crate::storage::faults::FaultyEngine::new(
            engine,
            settings.inject_faults,
            settings.inject_faults_seed,
        ))
    } else {
        engine
    };
    Ok(Storage::new(engine, settings.table.as_str()).observed_by(crate::telemetry::metrics::storage_observer()))
}

/// Creates the table on the configured storage (the `create-tables` command).
pub async fn create_tables(settings: &Settings) -> Result<(), StartError> {
    connect_storage(settings).await?.ensure_table().await?;
    Ok(())
}

/// A coordinator on `storage` with its catalog seeded from `catalog_file` (or the default).
pub async fn build_coordinator(
    storage: Storage,
    clock: Arc<dyn Clock>,
    settings: &Settings,
    catalog_file: Option<&Path>,
) -> Result<Arc<TransactionCoordinator>, StartError> {
    let config = settings
        .coordinator_config()
        .map_err(|error| StartError::Settings(error.to_string()))?;
    build_coordinator_with(storage, clock, config, catalog_file).await
}

/// `build_coordinator` with an explicit service configuration (tests inject hooks here).
pub async fn build_coordinator_with(
    storage: Storage,
    clock: Arc<dyn Clock>,
    config: crate::service::CoordinatorConfig,
    catalog_file: Option<&Path>,
) -> Result<Arc<TransactionCoordinator>, StartError> {
    let catalog = match catalog_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|error| StartError::Catalog(format!("{}: {error}", path.display())))?,
        None => DEFAULT_CATALOG.to_owned(),
    };
    let coordinator = Arc::new(TransactionCoordinator::new(storage, clock, config));
    coordinator.claim_instance().await?;
    coordinator
        .seed_catalog(&parse_catalog(&catalog)?)
        .await
        .map_err(|error| StartError::Catalog(format!("seeding failed: {error}")))?;
    Ok(coordinator)
}

/// Serves until `shutdown` resolves, then stops accepting, waits up to `drain_timeout` for
/// in-flight RPCs, and releases any lease still held. Without TLS or authentication: the local
/// mode (`run_secured` with `Security::local()`).
pub async fn run(
    listener: TcpListener,
    coordinator: Arc<TransactionCoordinator>,
    drain_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    run_secured(listener, None, coordinator, drain_timeout, shutdown, Security::local()).await
}

/// `run` with TLS and authentication as `security` says: every call passes the auth layer
/// (credentials, then the role table) before any service sees it, and the auth file is reloaded
/// on SIGHUP while serving. Without account affinity (`run_clustered`).
pub async fn run_secured(
    listener: TcpListener,
    health_listener: Option<TcpListener>,
    coordinator: Arc<TransactionCoordinator>,
    drain_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
    security: Security,
) -> Result<(), StartError> {
    run_clustered(
        listener,
        health_listener,
        coordinator,
        drain_timeout,
        shutdown,
        security,
        None,
    )
    .await
}

/// `run_secured` with account affinity when `affinity` is given: this coordinator announces
/// itself to the others of its table, forwards the mutations of accounts it does not own to
/// their owners, and leaves the membership first thing on shutdown.
pub async fn run_clustered(
    listener: TcpListener,
    health_listener: Option<TcpListener>,
    coordinator: Arc<TransactionCoordinator>,
    drain_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
    security: Security,
    affinity: Option<Affinity>,
) -> Result<(), StartError> {
    let address = listener.local_addr().map_err(serve_error)?;
    let health_only = match health_listener {
        Some(listener) => Some((listener.local_addr().map_err(serve_error)?, listener)),
        None => None,
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    let (stop_accepting, stopped) = tokio::sync::oneshot::channel::<()>();
    let forwarder = affinity.as_ref().map(|affinity| Arc::clone(&affinity.forwarder));
    let server = grpc_server(
        listener,
        &coordinator,
        forwarder,
        health_service.clone(),
        &security,
        async {
            stopped.await.ok();
        },
    )?;
    // Nothing fails from here on: the tasks beside the server start.
    let ready = crate::telemetry::health::starting(&health, coordinator.storage()).await;
    let probe = tokio::spawn(crate::telemetry::health::follow_storage(
        coordinator.storage().clone(),
        health.clone(),
        ready,
    ));
    let mut beside = Beside::start(&coordinator, &security, affinity.as_ref());
    beside.0.push(probe.abort_handle());
    announce(address, &security);
    if let Some((address, listener)) = health_only {
        beside.0.push(serve_health_only(address, listener, health_service));
    }
    let mut server = std::pin::pin!(server);
    tokio::select! {
        result = &mut server => {
            beside.stop();
            return result.map_err(serve_error);
        }
        () = shutdown => {}
    }
    // Probes learn of the shutdown before anything stops: both names NOT_SERVING first.
    probe.abort();
    crate::telemetry::health::shutting_down(&health).await;
    if let Some(affinity) = &affinity {
        // Peers stop forwarding here within one listing; what they send meanwhile is served.
        beside.stop_announcing();
        crate::affinity::leave(coordinator.storage(), &affinity.membership, coordinator.incarnation()).await;
    }
    tracing::info!(
        drain_ms = drain_timeout.as_millis() as u64,
        "shutting down: no new connections, draining in-flight RPCs"
    );
    stop_accepting.send(()).ok();
    // Watch streams never finish by themselves: they end now, each with its cursor.
    coordinator.drain_watchers();
    drain(&coordinator, server, tokio::time::Instant::now() + drain_timeout).await;
    beside.stop();
    let released = coordinator.release_held_leases().await;
    tracing::info!(released, "stopped");
    Ok(())
}

fn serve_error(error: impl std::fmt::Display) -> StartError {
    StartError::Serve(error.to_string())
}

/// The tasks that run beside the gRPC server (storage probe, instance heartbeat, catalog refresh, membership, sweeper, token
/// reload, the plain health listener), stopped together.
struct Beside(Vec<tokio::task::AbortHandle>, Option<tokio::task::AbortHandle>);

impl Beside {
    fn start(coordinator: &Arc<TransactionCoordinator>, security: &Security, affinity: Option<&Affinity>) -> Self {
        let heartbeat = tokio::spawn({
            let coordinator = Arc::clone(coordinator);
            async move { coordinator.renew_instance_periodically().await }
        });
        let catalog = tokio::spawn({
            let coordinator = Arc::clone(coordinator);
            async move { coordinator.keep_catalog_fresh().await }
        });
        let mut tasks = vec![heartbeat.abort_handle(), catalog.abort_handle()];
        let mut membership_task = None;
        if let Some(affinity) = affinity {
            let membership = crate::affinity::keep_membership(
                coordinator.storage().clone(),
                coordinator.clock(),
                Arc::clone(&affinity.membership),
                coordinator.incarnation().to_owned(),
            );
            membership_task = Some(tokio::spawn(membership).abort_handle());
        }
        if let Some(interval) = coordinator.config().sweep_interval {
            let sweeper = crate::sweeper::sweep_periodically(
                coordinator.storage().clone(),
                coordinator.config().owner.clone(),
                coordinator.clock(),
                interval,
            );
            tasks.push(tokio::spawn(sweeper).abort_handle());
        }
        tasks.push(tokio::spawn(answer_hangups(security.tokens.clone())).abort_handle());
        Self(tasks, membership_task)
    }

    /// Stops announcing this coordinator (before it leaves the membership on shutdown: a renewal
    /// after the leave would announce it again).
    fn stop_announcing(&self) {
        if let Some(membership) = &self.1 {
            membership.abort();
        }
    }

    fn stop(&self) {
        self.stop_announcing();
        self.0.iter().for_each(tokio::task::AbortHandle::abort);
    }
}

/// Answers every SIGHUP while serving: the auth file is reloaded, or, without one, the log says
/// there is nothing to reload. The process survives SIGHUP either way (`main` caught it first
/// thing); a rotation that happened while the coordinator was starting, after the file was first
/// read and before this listener existed, is taken up at once.
async fn answer_hangups(tokens: Option<Arc<crate::auth::TokenStore>>) {
    let mut hangups = match lockstep::process::catch_hangups() {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP; the auth file will not be reloaded");
            return;
        }
    };
    if let Some(tokens) = &tokens {
        tokens.reload_if_changed();
    }
    while hangups.recv().await.is_some() {
        match &tokens {
            Some(tokens) => {
                tokens.reload().ok();
            }
            None => tracing::info!("SIGHUP received: no --auth-file, nothing to reload"),
        }
    }
}

/// The gRPC server on `listener`: coordinator, peer, admin, health and reflection (v1 and v1alpha),
/// behind the RPC telemetry and authentication layers, with TLS when configured; it stops
/// accepting when `stop_accepting` completes.
fn grpc_server(
    listener: TcpListener,
    coordinator: &Arc<TransactionCoordinator>,
    forwarder: Option<Arc<Forwarder>>,
    health_service: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    security: &Security,
    stop_accepting: impl Future<Output = ()> + Send + 'static,
) -> Result<impl Future<Output = Result<(), tonic::transport::Error>>, StartError> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(lockstep::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(serve_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(serve_error)?;
    // The Peer service only with affinity on: nothing else may name a principal.
    let peer_service = forwarder
        .is_some()
        .then(|| CoordinatorService::new(Arc::clone(coordinator)).peer_server());
    let coordinator_service = CoordinatorService::new(Arc::clone(coordinator)).with_forwarder(forwarder);
    let mut builder = tonic::transport::Server::builder().max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    if let Some(tls) = security.tls.clone() {
        builder = builder
            .tls_config(tls)
            .map_err(|error| StartError::Serve(format!("TLS: {error}")))?;
    }
    Ok(builder
        .layer(crate::telemetry::rpc::RpcLayer)
        .layer(AuthLayer::new(Arc::clone(&security.authenticator)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(CoordinatorServer::new(coordinator_service.clone()))
        .add_optional_service(peer_service)
        .add_service(crate::admin::grpc::AdminService::server(Arc::clone(coordinator)))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), stop_accepting))
}

/// Logs how the server is reached: its mode, TLS, and the address.
fn announce(address: std::net::SocketAddr, security: &Security) {
    let tls = security.tls.is_some();
    match security.mode {
        Mode::Local => tracing::info!(
            %address,
            tls,
            "local mode: no authentication, every caller is `local`; serving on a loopback address only"
        ),
        Mode::Authenticated => tracing::info!(%address, tls, "authentication on"),
        Mode::Insecure => {}
    }
    // `address` stays the last field of this line: tests and scripts read the port from it.
    tracing::info!(%address, "serving gRPC");
}

/// Health alone, in plain text and open, for probes that can speak neither TLS nor tokens
/// (Kubernetes' gRPC probe): `--health-listen`.
fn serve_health_only(
    address: std::net::SocketAddr,
    listener: TcpListener,
    health_service: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) -> tokio::task::AbortHandle {
    tracing::info!(%address, "serving health checks");
    let health_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(health_server).abort_handle()
}

/// Waits, until `until`, for in-flight RPCs to finish (the server stopped accepting), then for
/// mutations whose callers went away: they still run, and their leases are released by their
/// own commits or roll-backs, so they finish before what is left is released.
async fn drain(
    coordinator: &TransactionCoordinator,
    server: std::pin::Pin<&mut impl Future<Output = Result<(), tonic::transport::Error>>>,
    until: tokio::time::Instant,
) {
    if tokio::time::timeout_at(until, server).await.is_err() {
        tracing::warn!("in-flight RPCs did not finish within the drain timeout");
    }
    let remaining = until.saturating_duration_since(tokio::time::Instant::now());
    if !coordinator.wait_for_mutations(remaining).await {
        tracing::warn!("detached mutations did not finish within the drain timeout");
    }
}

/// Resolves on SIGINT or SIGTERM; shared with the services in `clients/`.
pub use lockstep::process::shutdown_signal;
