//! Health follows storage: SERVING while it answers, NOT_SERVING and UNAVAILABLE when it does not.

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
    for _ in 0..100 {
        reported = status(app.address, "").await;
        if reported == ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reported, ServingStatus::NotServing, "health must follow storage");
    let refused = app.deposit("healthy", "1.00").await.expect_err("storage is down");
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(refused.message(), "Service temporarily unavailable");
}
