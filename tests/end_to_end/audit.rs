//! The audit finds what is wrong with the books, and the sweeper clears leases left by dead
//! holders and expired request records; `coordinator audit` exits non-zero on a discrepancy.

use std::collections::BTreeMap;
use std::time::Duration;

use lockstep_coordinator::audit::audit;
use lockstep_coordinator::core::records::Lease;
use lockstep_coordinator::core::{Clock, LeaseId, SystemClock, UserId};
use lockstep_coordinator::storage::{Put, Storage, Value, model};
use lockstep_coordinator::sweeper::sweep;

use crate::durability::coordinator_binary;
use crate::helpers::{EngineKind, spawn_app, spawn_app_with};

const MARGIN: Duration = Duration::from_secs(60);

/// A ledger entry written behind the coordinator's back: the books no longer balance.
async fn forge_ledger_entry(storage: &Storage, user: &str) {
    let entry_id = uuid::Uuid::now_v7().to_string();
    let key = model::ledger_key(&UserId::parse("user_id", user).expect("user id"), &entry_id);
    let s = |text: &str| Value::S(text.to_owned());
    let item = BTreeMap::from([
        ("pk".to_owned(), s(&key.pk)),
        ("sk".to_owned(), s(&key.sk)),
        ("entry_id".to_owned(), s(&entry_id)),
        ("user_id".to_owned(), s(user)),
        ("kind".to_owned(), s("DEPOSIT")),
        ("cash_delta".to_owned(), Value::N("5".to_owned())),
        ("cash_after".to_owned(), Value::N("1000005".to_owned())),
        ("created_at_ms".to_owned(), Value::N("1".to_owned())),
    ]);
    storage
        .put(Put {
            item,
            condition: None,
            bindings: Default::default(),
        })
        .await
        .expect("forge");
}

async fn audit_finds_forgery_and_stale_leases(engine: EngineKind) {
    let app = spawn_app(engine).await;
    app.set_asset("AAA", "10", true).await;
    app.deposit("audited", "100.00").await.expect("deposit");
    app.buy("audited", "AAA", "3").await.expect("buy");
    app.sell("audited", "AAA", "1").await.expect("sell");
    app.sell("audited", "AAA", "9")
        .await
        .expect_err("refused: a FAILED order");
    let report = audit(&app.storage, SystemClock.now(), MARGIN).await.expect("audit");
    assert!(report.is_clean(), "{report}");
    assert_eq!(
        (report.accounts, report.ledger_entries, report.orders),
        (1, 3, 3),
        "{report}"
    );

    // A holder that died 10 minutes ago, never released.
    let user = UserId::parse("user_id", "audited").unwrap();
    let ten_minutes_ago = SystemClock.now() - 600_000;
    let dead = Lease {
        lock_id: LeaseId::new_random(),
        owner: "gone".into(),
        incarnation: "gone".into(),
        operation: "DEPOSIT".into(),
        expires_at_ms: ten_minutes_ago + 10_000,
    };
    app.storage
        .update(model::acquire_lease(&user, &dead, ten_minutes_ago, true))
        .await
        .expect("dead lease");
    forge_ledger_entry(&app.storage, "audited").await;
    let report = audit(&app.storage, SystemClock.now(), MARGIN).await.expect("audit");
    let text = report.to_string();
    assert!(text.contains("differs from the ledger's sum"), "{text}");
    assert!(text.contains("never released"), "{text}");

    let swept = sweep(&app.storage, SystemClock.now()).await.expect("sweep");
    assert_eq!(swept.released_leases, 1);
    let report = audit(&app.storage, SystemClock.now(), MARGIN).await.expect("audit");
    assert!(!report.to_string().contains("never released"), "{report}");
    assert!(!report.is_clean(), "the forgery is still there");
}

/// Expired request records and feed records are deleted by the sweeper; live ones stay.
async fn sweeper_deletes_expired_request_records(engine: EngineKind) {
    // A commit acknowledged later than half the feed's horizon is recorded in the feed a second
    // time (docs/feed.md); on a loaded machine moto can take that long, so the horizon is long
    // here and the deposit has exactly one feed record.
    let app = spawn_app_with(
        engine,
        crate::helpers::AppOptions::default().flag("--feed-horizon-ms", 20_000),
    )
    .await;
    let mut client = app.client().await;
    let request = |key: &str| lockstep::coordinator::v1::DepositRequest {
        user_id: "swept".into(),
        amount: "1.00".into(),
        request_id: key.into(),
    };
    client.deposit(request("kept")).await.expect("deposit");
    let now = SystemClock.now();
    let kept = sweep(&app.storage, now).await.expect("sweep");
    assert_eq!((kept.deleted_records, kept.deleted_feed_records), (0, 0));
    // A day later the request record and the feed record (WatchFeed's copy of the entry) go.
    let a_day_and_a_bit_later = now + 25 * 3600 * 1000;
    let swept = sweep(&app.storage, a_day_and_a_bit_later).await.expect("sweep");
    assert_eq!((swept.deleted_records, swept.deleted_feed_records), (1, 1));
    let report = audit(&app.storage, now, MARGIN).await.expect("audit");
    assert_eq!(report.request_records, 0, "{report}");
    assert!(report.is_clean(), "{report}");
}

crate::on_every_engine!(
    audit_finds_forgery_and_stale_leases,
    sweeper_deletes_expired_request_records
);

/// `coordinator audit` prints a readable report and exits 0 on clean books, 1 otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_command_exit_codes() {
    let data_dir = tempfile::tempdir().expect("data dir");
    let (mut child, endpoint) = crate::durability::start_coordinator_process(data_dir.path());
    let mut client = lockstep::coordinator::v1::coordinator_client::CoordinatorClient::connect(endpoint)
        .await
        .expect("connect");
    let request = lockstep::coordinator::v1::DepositRequest {
        user_id: "cli".into(),
        amount: "10.00".into(),
        ..Default::default()
    };
    client.deposit(request).await.expect("deposit");
    child.kill().ok();
    child.wait().ok();
    let run_audit = || {
        std::process::Command::new(coordinator_binary())
            .args(["audit", "--data-dir"])
            .arg(data_dir.path())
            .output()
            .expect("run audit")
    };
    let clean = run_audit();
    let stdout = String::from_utf8_lossy(&clean.stdout);
    assert!(clean.status.success(), "{stdout}");
    assert!(stdout.contains("audit: OK, 0 discrepancies"), "{stdout}");

    let storage = lockstep_coordinator::storage::Storage::new(
        std::sync::Arc::new(
            lockstep_coordinator::storage::embedded::EmbeddedEngine::open(data_dir.path()).expect("open"),
        ),
        "lockstep",
    );
    forge_ledger_entry(&storage, "cli").await;
    drop(storage);
    let dirty = run_audit();
    let stdout = String::from_utf8_lossy(&dirty.stdout);
    assert_eq!(dirty.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("DISCREPANCIES") && stdout.contains("user cli"),
        "{stdout}"
    );
}
