//! Health that probes can trust: "" (liveness) is SERVING while the process serves; the
//! Coordinator name (readiness) follows storage; both go NOT_SERVING when a shutdown starts,
//! before the drain ends.

use std::sync::Arc;
use std::time::Duration;

use lockstep_bank::dynoxide_server::DynoxideServer;
use lockstep_coordinator::storage::Storage;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{AppOptions, sdk_engine, spawn_on};

async fn status(address: std::net::SocketAddr, service: &str) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect health");
    let mut client = HealthClient::new(channel);
    let reply = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health check");
    reply.into_inner().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_errors_follow_storage() {
    let storage_server = DynoxideServer::start(dynoxide::Database::memory().expect("db"))
        .await
        .expect("start dynoxide's HTTP server");
    let storage = Storage::new(Arc::new(sdk_engine(storage_server.endpoint())), "lockstep");
    storage.ensure_table().await.expect("table");
    let app = spawn_on(storage, AppOptions::default()).await;
    for service in ["", "lockstep.coordinator.v1.Coordinator"] {
        assert_eq!(
            status(app.address, service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    app.deposit("healthy", "1.00")
        .await
        .expect("deposit while storage answers");

    drop(storage_server);
    let mut reported = ServingStatus::Serving;
    for _ in 0..200 {
        reported = status(app.address, "lockstep.coordinator.v1.Coordinator").await;
        if reported == ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reported, ServingStatus::NotServing, "readiness must follow storage");
    assert_eq!(
        status(app.address, "").await,
        ServingStatus::Serving,
        "liveness does not depend on storage"
    );
    let refused = app.deposit("healthy", "1.00").await.expect_err("storage is down");
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(refused.message(), "Service temporarily unavailable");
}

/// A shutdown turns both names NOT_SERVING before the drain ends: a mutation parked in its
/// commit is still running when the watchers see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_is_announced_before_the_drain() {
    use tokio_stream_like::next_status;
    let parked = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(tokio::sync::Notify::new());
    let hook = {
        let (parked, go) = (Arc::clone(&parked), Arc::clone(&go));
        lockstep_coordinator::service::CommitHook(Arc::new(move |_user: &lockstep_coordinator::core::UserId| {
            let (parked, go) = (Arc::clone(&parked), Arc::clone(&go));
            Box::pin(async move {
                parked.notify_one();
                go.notified().await;
            })
        }))
    };
    let mut app = crate::helpers::spawn_app_with(
        crate::helpers::EngineKind::Embedded,
        AppOptions::default().flag("--drain-ms", "10000").before_commit(hook),
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.address))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut watchers = Vec::new();
    for service in ["", "lockstep.coordinator.v1.Coordinator"] {
        let mut stream = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("watch")
            .into_inner();
        assert_eq!(next_status(&mut stream).await, ServingStatus::Serving, "{service:?}");
        watchers.push((service, stream));
    }
    let mut client = app.client().await;
    let mutation = tokio::spawn(async move {
        client
            .deposit(lockstep::coordinator::v1::DepositRequest {
                user_id: "draining".into(),
                amount: "1.00".into(),
                request_id: String::new(),
            })
            .await
    });
    parked.notified().await;
    let shutdown = tokio::spawn(async move { app.shut_down().await });
    for (service, stream) in &mut watchers {
        assert_eq!(
            next_status(stream).await,
            ServingStatus::NotServing,
            "{service:?} must go NOT_SERVING at the start of the shutdown"
        );
    }
    assert!(
        !mutation.is_finished(),
        "the drain has not ended: the mutation is still parked"
    );
    go.notify_one();
    drop(watchers);
    drop(channel);
    mutation
        .await
        .expect("task")
        .expect("the in-flight deposit completes during the drain");
    shutdown.await.expect("shutdown");
}

mod tokio_stream_like {
    use tonic_health::pb::HealthCheckResponse;
    use tonic_health::pb::health_check_response::ServingStatus;

    /// The next status a health watch reports (skipping repeats of the same one is the server's
    /// job; a status is sent at the start and on every change).
    pub async fn next_status(stream: &mut tonic::Streaming<HealthCheckResponse>) -> ServingStatus {
        let reply = tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
            .await
            .expect("a health status within 10 s")
            .expect("health watch")
            .expect("an open watch");
        reply.status()
    }
}

/// `--health-listen`: health alone, in plain text and open, on its own port, for probes that
/// speak neither TLS nor tokens; nothing else is served there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_listen_serves_health_alone() {
    use lockstep::coordinator::v1::coordinator_client::CoordinatorClient;
    let (storage, _guard) = crate::helpers::fresh_storage(crate::helpers::EngineKind::Embedded).await;
    let config = lockstep_coordinator::service::CoordinatorConfig::default();
    let clock: Arc<dyn lockstep_coordinator::core::Clock> = Arc::new(lockstep_coordinator::core::SystemClock);
    let coordinator = lockstep_coordinator::server::build_coordinator_with(storage, clock, config, None)
        .await
        .expect("coordinator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let health_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind health");
    let health_address = health_listener.local_addr().expect("health address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(lockstep_coordinator::server::run_secured(
        listener,
        Some(health_listener),
        coordinator,
        Duration::from_millis(100),
        async {
            stopped.await.ok();
        },
        lockstep_coordinator::auth::Security::local(),
    ));
    for service in ["", "lockstep.coordinator.v1.Coordinator"] {
        assert_eq!(
            status(health_address, service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let mut coordinator = CoordinatorClient::connect(format!("http://{health_address}"))
        .await
        .expect("connect");
    let refused = coordinator
        .get_account(lockstep::coordinator::v1::GetAccountRequest {
            user_id: "nobody".to_owned(),
        })
        .await
        .expect_err("only health is served there");
    assert_eq!(refused.code(), Code::Unimplemented);
    stop.send(()).ok();
    server.await.expect("task").expect("server");
}
