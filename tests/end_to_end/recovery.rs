//! Recovery: a holder paused past its lease is fenced, a restarted instance reclaims the leases
//! its previous run died holding, and graceful shutdown releases held leases; on every engine.

use std::time::Duration;

use lockstep_coordinator::core::records::Lease;
use lockstep_coordinator::core::time::ManualClock;
use lockstep_coordinator::core::{Clock, LeaseId, SystemClock, UserId};
use lockstep_coordinator::service::CommitHook;
use lockstep_coordinator::storage::model;
use tonic::Code;

use crate::helpers::{AppOptions, EngineKind, TestApp, spawn_app_with, spawn_peer};

/// A holder decides, pauses past its lease, a second caller takes over and commits; the first
/// one's commit is then refused and the state is the serial execution of the second alone.
async fn holder_paused_past_its_lease_is_fenced(engine: EngineKind) {
    let clock = ManualClock::starting_at(1_795_000_000_000);
    let (hook, parked, go) = CommitHook::parking();
    let paused = spawn_app_with(engine, AppOptions::default().clock(clock.clone()).before_commit(hook)).await;
    let successor = spawn_peer(&paused, AppOptions::default().clock(clock.clone())).await;
    successor.deposit("paused", "100.00").await.expect("deposit");

    let mut client = paused.client().await;
    let stale = tokio::spawn(async move {
        let request = lockstep::coordinator::v1::WithdrawRequest {
            settlement: 0,
            user_id: "paused".into(),
            amount: "100.00".into(),
            request_id: "stale-withdrawal".into(),
        };
        client.withdraw(request).await
    });
    parked.notified().await;
    clock.advance(Duration::from_secs(16));
    let reply = successor
        .deposit("paused", "50.00")
        .await
        .expect("successor takes over and commits");
    assert_eq!(reply.cash_balance, "150.00");

    go.notify_one();
    let refused = stale.await.expect("task").expect_err("the stale commit is fenced");
    assert_eq!(refused.code(), Code::Aborted, "{}", refused.message());
    assert_eq!(successor.cash("paused").await, "150.00");
    assert_eq!(
        successor.full_ledger("paused").await.len(),
        2,
        "the stale withdrawal left no trace"
    );
}

/// A coordinator restarted under the same --instance takes over, at once, a live lease its
/// previous run died holding; another instance has to wait for the expiry.
async fn restarted_instance_reclaims_its_dead_lease(engine: EngineKind) {
    let options = |instance: &str| {
        AppOptions::default()
            .flag("--instance", instance)
            .flag("--lock-wait-ms", "300")
    };
    let app = spawn_app_with(engine, options("coordinator-a")).await;
    app.deposit("reclaimed", "10.00").await.expect("deposit");
    let dead_run = Lease {
        lock_id: LeaseId::new_random(),
        owner: "coordinator-a".to_owned(),
        incarnation: "a-run-that-died".to_owned(),
        operation: "DEPOSIT".to_owned(),
        expires_at_ms: SystemClock.now() + 60_000,
    };
    let user = UserId::parse("user_id", "reclaimed").unwrap();
    app.storage
        .update(model::acquire_lease(&user, &dead_run, SystemClock.now(), true))
        .await
        .expect("lease of the dead run");

    let other = spawn_peer(&app, options("coordinator-b")).await;
    assert_eq!(
        other.deposit("reclaimed", "1.00").await.expect_err("busy").code(),
        Code::Aborted
    );
    let reply = app
        .deposit("reclaimed", "1.00")
        .await
        .expect("reclaimed without waiting 60 s");
    assert_eq!(reply.cash_balance, "11.00");
}

/// Two live processes never share an --instance name: the second refuses to start with a clear
/// message instead of treating the first one's leases as orphans to reclaim.
async fn a_live_twin_of_an_instance_refuses_to_start(engine: EngineKind) {
    let options = AppOptions::default().flag("--instance", "twin");
    let app = spawn_app_with(engine, options.clone()).await;
    app.deposit("twin-user", "10.00").await.expect("deposit");
    let arguments = ["coordinator", "--instance", "twin"];
    let settings = <lockstep_coordinator::settings::Cli as clap::Parser>::parse_from(arguments).settings;
    let config = settings.coordinator_config().expect("settings");
    let error = lockstep_coordinator::server::build_coordinator_with(
        app.storage.clone(),
        std::sync::Arc::new(SystemClock),
        config,
        None,
    )
    .await
    .expect_err("a live twin must not start");
    let message = error.to_string();
    assert!(
        message.contains("--instance twin") && message.contains("another live coordinator"),
        "{message}"
    );
    assert_eq!(app.cash("twin-user").await, "10.00", "the first process is untouched");
}

/// Graceful shutdown releases the leases of RPCs still in flight when the drain time is up, so
/// another coordinator does not wait for them to expire; the interrupted commit is fenced.
async fn graceful_shutdown_releases_held_leases(engine: EngineKind) {
    let (hook, parked, go) = CommitHook::parking();
    let mut stopping: TestApp = spawn_app_with(
        engine,
        AppOptions::default()
            .before_commit(hook)
            .flag("--drain-ms", "200")
            .flag("--lease-deposit-ms", "60000"),
    )
    .await;
    let other = spawn_peer(&stopping, AppOptions::default().flag("--lock-wait-ms", "1000")).await;
    other.deposit("shutdown", "10.00").await.expect("deposit");
    let mut client = stopping.client().await;
    let interrupted = tokio::spawn(async move {
        let request = lockstep::coordinator::v1::DepositRequest {
            user_id: "shutdown".into(),
            amount: "5.00".into(),
            ..Default::default()
        };
        client.deposit(request).await
    });
    parked.notified().await;
    stopping.shut_down().await;
    let reply = other
        .deposit("shutdown", "1.00")
        .await
        .expect("the lease was released at shutdown");
    assert_eq!(reply.cash_balance, "11.00");
    go.notify_one();
    interrupted.await.expect("task").expect_err("its server is gone");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        other.cash("shutdown").await,
        "11.00",
        "the interrupted commit never applied"
    );
}

crate::on_every_engine!(
    holder_paused_past_its_lease_is_fenced,
    restarted_instance_reclaims_its_dead_lease,
    a_live_twin_of_an_instance_refuses_to_start,
    graceful_shutdown_releases_held_leases,
);
