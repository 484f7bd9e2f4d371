//! Leases with controlled time: a dead holder's lease is taken over once it expires, and a
//! holder whose lease lapsed can never commit (fencing), on every engine.

use std::time::Duration;

use lockstep_coordinator::core::ops::decide;
use lockstep_coordinator::core::records::{EntryKind, Lease, LedgerEntry};
use lockstep_coordinator::core::time::ManualClock;
use lockstep_coordinator::core::{Clock, LeaseId, Limits, Operation, SystemClock, Usd, UserId};
use lockstep_coordinator::storage::{StorageError, model};
use tonic::Code;

use crate::helpers::{AppOptions, EngineKind, TestApp, spawn_app_with};

const START: u64 = 1_795_000_000_000;

async fn app_with_clock(engine: EngineKind) -> (TestApp, ManualClock) {
    let clock = ManualClock::starting_at(START);
    let app = spawn_app_with(
        engine,
        AppOptions::default().clock(clock.clone()).flag("--lock-wait-ms", "300"),
    )
    .await;
    (app, clock)
}

/// Takes `user`'s lease directly in storage, as a coordinator that then dies would.
async fn take_lease_as_another_coordinator(
    app: &TestApp,
    user: &UserId,
    now: u64,
    lease_ms: u64,
) -> (Lease, lockstep_coordinator::core::Account) {
    let lease = Lease {
        lock_id: LeaseId::new_random(),
        owner: "coordinator-that-died".to_owned(),
        incarnation: "a-run-that-died".to_owned(),
        operation: "WITHDRAWAL".to_owned(),
        expires_at_ms: now + lease_ms,
    };
    let item = app
        .storage
        .update(model::acquire_lease(user, &lease, now, true))
        .await
        .expect("take the lease")
        .expect("item");
    (lease, model::account_from_item(&item).expect("account"))
}

/// A lease whose holder died blocks the user until it expires, then is taken over.
async fn dead_holders_lease_is_taken_over_after_expiry(engine: EngineKind) {
    let (app, clock) = app_with_clock(engine).await;
    let user = UserId::parse("user_id", "orphaned").unwrap();
    app.deposit("orphaned", "100.00").await.expect("deposit");
    take_lease_as_another_coordinator(&app, &user, clock.now(), 15_000).await;

    let busy = app.deposit("orphaned", "1.00").await.expect_err("lease is held");
    assert_eq!(busy.code(), Code::Aborted);
    assert_eq!(busy.message(), "Operation in progress, please try again");

    clock.advance(Duration::from_millis(14_999));
    assert_eq!(
        app.deposit("orphaned", "1.00").await.expect_err("still held").code(),
        Code::Aborted
    );

    clock.advance(Duration::from_millis(1));
    let reply = app.deposit("orphaned", "1.00").await.expect("expired lease taken over");
    assert_eq!(reply.cash_balance, "101.00");
    assert_eq!(app.full_ledger("orphaned").await.len(), 2);
}

/// A holder whose lease lapsed and was taken over cannot commit what it decided: the fence
/// refuses it, and the final state is the serial execution of the successor alone.
async fn stale_holders_commit_is_refused(engine: EngineKind) {
    let (app, clock) = app_with_clock(engine).await;
    let user = UserId::parse("user_id", "fenced").unwrap();
    app.deposit("fenced", "100.00").await.expect("deposit");

    // The stale holder takes the lease and decides a withdrawal of everything ...
    let decided_at = clock.now();
    let (stale, read) = take_lease_as_another_coordinator(&app, &user, decided_at, 15_000).await;
    let withdrawal = Operation::Withdraw(Usd::parse_amount("amount", "100.00").unwrap());
    let decision = decide(&read, &withdrawal, Default::default(), decided_at, &Limits::default()).expect("decided");
    let entry = LedgerEntry {
        hold: None,
        entry_id: lockstep_coordinator::core::EntryId::new(),
        user_id: user.clone(),
        kind: EntryKind::Withdrawal,
        cash_delta: decision.cash_delta,
        cash_after: decision.cash,
        trade: None,
        transfer: None,
        created_at_ms: decided_at,
        request_id: None,
        sequence: read.version + 1,
        principal: lockstep_coordinator::core::Principal::local(),
    };
    let stale_commit_at = |now| model::Commit {
        user: &user,
        lock_id: &stale.lock_id,
        read: &read,
        decision: &decision,
        entry: &entry,
        order: None,
        record: None,
        now,
    };
    let stale_commit = model::commit(&stale_commit_at(decided_at)).items;

    // ... then pauses past its expiry. Its lease alone, unclaimed, no longer lets it commit:
    clock.advance(Duration::from_secs(16));
    let refused = app
        .storage
        .transact(&model::commit(&stale_commit_at(clock.now())).items, None)
        .await;
    assert!(
        matches!(refused, Err(StorageError::TransactionCanceled { .. })),
        "{refused:?}"
    );

    // A successor takes the expired lease over and commits.
    let reply = app.deposit("fenced", "50.00").await.expect("successor commits");
    assert_eq!(reply.cash_balance, "150.00");

    // The stale holder wakes up still believing it is before its expiry: refused all the same.
    let refused = app.storage.transact(&stale_commit, None).await;
    assert!(
        matches!(refused, Err(StorageError::TransactionCanceled { .. })),
        "{refused:?}"
    );

    assert_eq!(app.cash("fenced").await, "150.00", "as if only the successor ran");
    assert_eq!(app.full_ledger("fenced").await.len(), 2);
}

/// A request waits for a busy lease that is released in time, instead of failing at once.
async fn busy_lease_is_waited_for(engine: EngineKind) {
    let app = spawn_app_with(engine, AppOptions::default().flag("--lock-wait-ms", "10000")).await;
    let user = UserId::parse("user_id", "patient").unwrap();
    app.deposit("patient", "10.00").await.expect("deposit");
    let now = SystemClock.now();
    let (lease, _) = take_lease_as_another_coordinator(&app, &user, now, 15_000).await;
    let storage = app.storage.clone();
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        storage
            .write(model::release_lease(&user, &lease.lock_id, None))
            .await
            .expect("release");
    });
    let reply = app.deposit("patient", "5.00").await.expect("waited for the lease");
    assert_eq!(reply.cash_balance, "15.00");
    releaser.await.expect("releaser");
}

crate::on_every_engine!(
    dead_holders_lease_is_taken_over_after_expiry,
    stale_holders_commit_is_refused,
    busy_lease_is_waited_for,
);
