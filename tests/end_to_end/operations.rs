//! The operator commands of the real binary against a running coordinator on the embedded
//! engine (whose file belongs to the running process): inspect, release-lease, the online
//! audit, and a backup taken under load that restores with every acknowledged operation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lockstep_coordinator::core::records::Lease;
use lockstep_coordinator::core::{Clock, LeaseId, SystemClock, UserId};
use lockstep_coordinator::storage::embedded::EmbeddedEngine;
use lockstep_coordinator::storage::{Storage, model};

use crate::helpers::{EngineKind, TestApp, spawn_app};

/// Runs the coordinator binary with `arguments`: (exit code, stdout, stderr).
async fn coordinator(arguments: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(lockstep_bank::cluster::coordinator_binary())
        .args(arguments)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run the coordinator binary");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn server_of(app: &TestApp) -> String {
    format!("http://{}", app.address)
}

/// inspect shows the account and a stuck lease; release-lease refuses without --yes, then
/// releases it (the user can deposit at once); the audit runs through the live server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inspect_release_and_audit_through_the_running_server() {
    let app = spawn_app(EngineKind::Embedded).await;
    let server = server_of(&app);
    app.deposit("olivia", "100.00").await.expect("deposit");
    app.deposit("olivia", "25.50").await.expect("deposit");

    let (code, out, err) = coordinator(&["inspect", "olivia", "--server", &server]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cash: 125.50"), "{out}");
    assert!(out.contains("lease: free"), "{out}");
    assert!(out.contains("last ledger entries: 2"), "{out}");
    assert!(out.contains("deposited 125.50 of 10000.00"), "{out}");
    assert!(out.contains("ledger: 2 entries\n"), "the last sequence: {out}");
    assert!(
        out.contains("  #2 ") && out.contains("  #1 "),
        "each entry's sequence: {out}"
    );

    // A holder that died without releasing: its lease outlives it.
    let user = UserId::parse("user_id", "olivia").unwrap();
    let dead = Lease {
        lock_id: LeaseId::new_random(),
        owner: "gone-coordinator".to_owned(),
        incarnation: "gone".to_owned(),
        operation: "WITHDRAWAL".to_owned(),
        expires_at_ms: SystemClock.now() + 120_000,
    };
    app.storage
        .update(model::acquire_lease(&user, &dead, SystemClock.now(), true))
        .await
        .expect("plant a dead holder's lease");
    let (code, out, _) = coordinator(&["inspect", "olivia", "--server", &server]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("lease: {} held by gone-coordinator", dead.lock_id)),
        "{out}"
    );

    let (code, _, err) = coordinator(&["release-lease", "olivia", "--server", &server]).await;
    assert_eq!(code, 1, "refused without --yes: {err}");
    assert!(err.contains("--yes"), "{err}");
    let (code, out, err) = coordinator(&["release-lease", "olivia", "--yes", "--server", &server]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("released lease {}", dead.lock_id)), "{out}");
    let started = std::time::Instant::now();
    app.deposit("olivia", "1.00").await.expect("the lease is free again");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no wait for the released lease"
    );

    let (code, out, err) = coordinator(&["audit", "--server", &server]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("audit: OK, 0 discrepancies"), "{out}");
    let (code, out, _) = coordinator(&["contended-users", "--server", &server]).await;
    assert_eq!(code, 0, "{out}");
}

/// A backup taken online while deposits run restores into a fresh data dir that passes the
/// audit and holds every deposit acknowledged before the backup started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_load_restores_every_acknowledged_operation() {
    let app = spawn_app(EngineKind::Embedded).await;
    let server = server_of(&app);
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::<(String, String, std::time::Instant)>::new()));
    let mut clients = Vec::new();
    for client_index in 0..4 {
        let (stop, acknowledged) = (Arc::clone(&stop), Arc::clone(&acknowledged));
        let mut client = app.client().await;
        clients.push(tokio::spawn(async move {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                let user = format!("backup-{}", client_index % 2);
                let request = lockstep::coordinator::v1::DepositRequest {
                    user_id: user.clone(),
                    amount: "1.00".into(),
                    request_id: format!("backup-{client_index}-{round}"),
                };
                if let Ok(reply) = client.deposit(request).await {
                    let reply = reply.into_inner();
                    acknowledged
                        .lock()
                        .unwrap()
                        .push((user, reply.transaction_id, std::time::Instant::now()));
                }
                round += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let directory = tempfile::tempdir().expect("temp dir");
    let backup = directory.path().join("lockstep-backup.sqlite3");
    let backup_started = std::time::Instant::now();
    let (code, out, err) = coordinator(&["backup", backup.to_str().unwrap(), "--server", &server]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("bytes"), "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    let (code, _, err) = coordinator(&["backup", backup.to_str().unwrap(), "--server", &server]).await;
    assert_eq!(code, 1, "a backup never overwrites: {err}");

    let restored = directory.path().join("restored");
    let table = app.storage.table().to_owned();
    let data_dir = restored.to_str().unwrap();
    let (code, out, err) = coordinator(&["restore", backup.to_str().unwrap(), "--data-dir", data_dir]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = coordinator(&["audit", "--data-dir", data_dir, "--table", &table]).await;
    assert_eq!(code, 0, "the restored store passes the audit: {out}{err}");

    let storage = Storage::new(Arc::new(EmbeddedEngine::open(&restored).expect("open restored")), table);
    let before: Vec<_> = acknowledged
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, _, at)| *at < backup_started)
        .cloned()
        .collect();
    assert!(before.len() >= 5, "load ran before the backup: {}", before.len());
    let mut restored_ids = std::collections::BTreeSet::new();
    for user in ["backup-0", "backup-1"] {
        let user_id = UserId::parse("user_id", user).unwrap();
        let mut after = None;
        loop {
            let query = model::user_page_query(&user_id, model::UserCollection::Ledger, 500, after).expect("query");
            let page = storage.query(query).await.expect("read");
            for item in &page.items {
                restored_ids.insert(model::ledger_from_item(item).expect("entry").entry_id.to_string());
            }
            match page.last_key {
                Some(last) => after = Some(last.sk),
                None => break,
            }
        }
    }
    let mut missing = BTreeMap::new();
    for (user, entry_id, _) in &before {
        if !restored_ids.contains(entry_id) {
            missing.insert(entry_id.clone(), user.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "acknowledged before the backup, missing after restore: {missing:?}"
    );
}
