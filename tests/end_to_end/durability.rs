//! Acknowledged operations survive `kill -9` of the coordinator process on the embedded engine.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::coordinator::v1 as pb;
use lockstep::coordinator::v1::coordinator_client::CoordinatorClient;
use rust_decimal::Decimal;

use crate::helpers::full_ledger;

pub use lockstep_bank::cluster::coordinator_binary;

/// A coordinator process on `data_dir`; returns it and the address it serves on.
pub fn start_coordinator_process(data_dir: &Path) -> (Child, String) {
    let mut child = Command::new(coordinator_binary())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start coordinator");
    let stderr = child.stderr.take().expect("piped stderr");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sender = Some(sender);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(address) = line.split("address=").nth(1).filter(|_| line.contains("serving gRPC"))
                && let Some(sender) = sender.take()
            {
                sender.send(address.trim().to_owned()).ok();
            }
        }
    });
    let address = receiver
        .recv_timeout(Duration::from_secs(30))
        .expect("coordinator did not start within 30 s");
    (child, format!("http://{address}"))
}

/// Three times: deposits from 8 concurrent clients, `kill -9` mid-stream, restart on the same
/// data dir. Every acknowledged deposit is there, and cash equals the ledger (nothing partial).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_deposits_survive_kill_9() {
    let data_dir = tempfile::tempdir().expect("data dir");
    let acknowledged: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    for trial in 0..3 {
        let (mut child, endpoint) = start_coordinator_process(data_dir.path());
        let mut clients = Vec::new();
        for client_index in 0..8 {
            let endpoint = endpoint.clone();
            let acknowledged = Arc::clone(&acknowledged);
            clients.push(tokio::spawn(async move {
                let Ok(mut client) = CoordinatorClient::connect(endpoint).await else {
                    return;
                };
                for _ in 0..10_000 {
                    let request = pb::DepositRequest {
                        user_id: format!("durable-{client_index}"),
                        amount: "1.00".into(),
                        ..Default::default()
                    };
                    match client.deposit(request).await {
                        Ok(reply) => {
                            acknowledged.lock().unwrap().insert(reply.into_inner().transaction_id);
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(400 + 200 * trial)).await;
        child.kill().expect("kill -9");
        child.wait().expect("reap");
        for client in clients {
            client.await.ok();
        }
    }
    let (mut child, endpoint) = start_coordinator_process(data_dir.path());
    let mut client = CoordinatorClient::connect(endpoint)
        .await
        .expect("connect after restart");
    let mut found = BTreeSet::new();
    for client_index in 0..8 {
        let user = format!("durable-{client_index}");
        let entries = full_ledger(&mut client, &user).await;
        let cash = client
            .get_account(pb::GetAccountRequest { user_id: user })
            .await
            .expect("account")
            .into_inner()
            .cash_balance;
        assert_eq!(
            Decimal::from_str(&cash).unwrap(),
            Decimal::from(entries.len()),
            "cash equals the ledger"
        );
        found.extend(entries.into_iter().map(|entry| entry.transaction_id));
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= 30,
        "the test acknowledged too few deposits to mean anything: {}",
        acknowledged.len()
    );
    let missing: Vec<_> = acknowledged.difference(&found).collect();
    assert!(
        missing.is_empty(),
        "acknowledged deposits lost after kill -9: {missing:?}"
    );
    println!(
        "{} acknowledged deposits, {} present after 3 x kill -9",
        acknowledged.len(),
        found.len()
    );
    child.kill().ok();
    child.wait().ok();
}
