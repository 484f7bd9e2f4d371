//! Bounded work: past `--max-inflight` mutations in flight, or `--max-queued-per-user` calls
//! queued for one user, a call is answered RESOURCE_EXHAUSTED at once with retry advice, and
//! nothing of it is written.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use tonic::Code;
use tonic_types::StatusExt;

use lockstep::coordinator::v1 as pb;

use crate::helpers::{AppOptions, EngineKind, TestApp, spawn_app_with};
use lockstep_coordinator::service::CommitHook;

/// A deposit sent on its own connection, in the background.
async fn deposit_in_background(
    app: &TestApp,
    user: &str,
    amount: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::CashReply>, tonic::Status>> {
    let mut client = app.client().await;
    let request = pb::DepositRequest {
        user_id: user.to_owned(),
        amount: amount.to_owned(),
        ..Default::default()
    };
    tokio::spawn(async move { client.deposit(request).await })
}

/// The refusal carries google.rpc.RetryInfo.
fn assert_exhausted_with_advice(status: &tonic::Status) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let details = status.get_error_details();
    assert!(details.retry_info().is_some(), "RetryInfo on {status:?}");
}

/// A coordinator whose commits park until released, with the given bounds.
async fn parked_app(engine: EngineKind, flags: &[(&str, &str)]) -> (TestApp, Arc<Notify>, Arc<Notify>) {
    let (hook, parked, go) = CommitHook::parking();
    let mut options = AppOptions::default().before_commit(hook).flag("--lock-wait-ms", "5000");
    for (flag, value) in flags {
        options = options.flag(flag, value);
    }
    (spawn_app_with(engine, options).await, parked, go)
}

async fn bounds_refuse_at_once_and_write_nothing(engine: EngineKind) {
    // --max-inflight 2: one call parked in its commit, one queued behind it, the third refused.
    let (app, parked, go) = parked_app(engine, &[("--max-inflight", "2")]).await;
    let first = deposit_in_background(&app, "bounded", "10.00").await;
    parked.notified().await;
    let second = deposit_in_background(&app, "bounded", "1.00").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let refused = app
        .deposit("another-user", "5.00")
        .await
        .expect_err("over --max-inflight");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once");
    assert_exhausted_with_advice(&refused);
    go.notify_one();
    first.await.unwrap().expect("first");
    parked.notified().await;
    go.notify_one();
    second.await.unwrap().expect("second");
    assert_eq!(app.cash("bounded").await, "11.00");
    let missing = app.account("another-user").await.expect_err("nothing written");
    assert_eq!(missing.code(), Code::NotFound);

    // --max-queued-per-user 1: one call parked (taken), one queued, the third refused; other
    // users are not affected.
    let (app, parked, go) = parked_app(engine, &[("--max-queued-per-user", "1")]).await;
    let first = deposit_in_background(&app, "hot", "10.00").await;
    parked.notified().await;
    let second = deposit_in_background(&app, "hot", "1.00").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = app
        .deposit("hot", "2.00")
        .await
        .expect_err("over --max-queued-per-user");
    assert_exhausted_with_advice(&refused);
    go.notify_one();
    first.await.unwrap().expect("first");
    parked.notified().await;
    go.notify_one();
    second.await.unwrap().expect("second");
    assert_eq!(app.cash("hot").await, "11.00", "the refused 2.00 was never applied");
}

crate::on_every_engine!(bounds_refuse_at_once_and_write_nothing);
