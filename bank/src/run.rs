//! One bank run: storage, coordinators, clients, faults and kills; then the verdict.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lockstep_coordinator::audit::{AuditReport, audit};
use lockstep_coordinator::core::records::LedgerEntry;
use lockstep_coordinator::core::{Clock, SystemClock};
use lockstep_coordinator::storage::dynamodb::DynamoDbEngine;
use lockstep_coordinator::storage::embedded::EmbeddedEngine;
use lockstep_coordinator::storage::model::{self, StoredItem};
use lockstep_coordinator::storage::{Storage, StorageError};

use crate::cluster::Node;
use crate::dynoxide_server::DynoxideServer;
use crate::fault_proxy::{FaultConfig, FaultProxy};
use crate::workload::{self, Operation, Outcome};

/// Grace after expiry before the audit calls an unreleased lease stale: a killed coordinator's
/// leases expire within the longest lease (25 s).
const AUDIT_LEASE_MARGIN: Duration = Duration::from_secs(60);
const TABLE: &str = "lockstep";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BankEngine {
    /// One coordinator process on the embedded engine, faults injected inside it.
    Embedded,
    /// Coordinator processes sharing dynoxide's HTTP server through the fault-injecting proxy.
    Endpoint,
}

#[derive(Debug, Clone)]
pub struct BankConfig {
    pub engine: BankEngine,
    pub clients: usize,
    pub users: usize,
    pub duration: Duration,
    pub fault_rate: f64,
    pub kills: usize,
    pub coordinators: usize,
    pub seed: u64,
}

impl BankConfig {
    /// The configuration CI runs (`bank/tests/bank.rs`), and the defaults of the `bank` binary's
    /// flags: 32 clients, 16 users, 60 s, 10 % faults, 5 kills; three coordinators on the
    /// endpoint, one on the embedded engine (its data directory is one process's).
    pub const fn ci(engine: BankEngine) -> BankConfig {
        BankConfig {
            engine,
            clients: 32,
            users: 16,
            duration: Duration::from_secs(60),
            fault_rate: 0.10,
            kills: 5,
            coordinators: match engine {
                BankEngine::Endpoint => 3,
                BankEngine::Embedded => 1,
            },
            seed: 1,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct BankReport {
    pub engine: String,
    pub config: String,
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
    pub unknown_applied: usize,
    /// Failed operations by code and the start of the message ("FailedPrecondition: Insufficient balance").
    pub failed_by_reason: BTreeMap<String, usize>,
    pub attempts: u64,
    pub faults_injected: u64,
    pub kills: usize,
    pub audit: AuditReport,
    pub discrepancies: Vec<String>,
}

impl fmt::Display for BankReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "bank ({}): {}", self.engine, self.config)?;
        writeln!(
            f,
            "operations: {} ok, {} failed, {} unknown ({} of them applied), {} attempts",
            self.ok, self.failed, self.unknown, self.unknown_applied, self.attempts
        )?;
        for (reason, count) in &self.failed_by_reason {
            writeln!(f, "  failed: {count} x {reason}")?;
        }
        writeln!(
            f,
            "faults injected: {}; coordinator kills: {}",
            self.faults_injected, self.kills
        )?;
        write!(f, "{}", self.audit)?;
        writeln!(f, "discrepancies: {}", self.discrepancies.len())?;
        for discrepancy in self.discrepancies.iter().take(50) {
            writeln!(f, "  - {discrepancy}")?;
        }
        Ok(())
    }
}

fn common_flags(auth_file: &Path) -> Vec<String> {
    let mut flags = [
        "--daily-deposit-limit",
        "1000000",
        "--daily-withdrawal-limit",
        "1000000",
        "--lock-wait-ms",
        "3000",
        "--drain-ms",
        "2000",
        "--sweep-interval-secs",
        "0",
    ]
    .map(str::to_owned)
    .to_vec();
    // Authentication on, as in production: the clients send a trader token.
    flags.extend(["--auth-file".to_owned(), auth_file.display().to_string()]);
    flags
}

fn test_credentials() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "bank"),
        ("AWS_SECRET_ACCESS_KEY", "bank"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .to_vec()
}

/// The flags a (re)start of the embedded coordinator gets: faults with a fresh seed each start.
fn fault_flags(config: &BankConfig, start: usize) -> Vec<String> {
    match config.engine {
        BankEngine::Embedded => vec![
            "--inject-faults".to_owned(),
            config.fault_rate.to_string(),
            "--inject-faults-seed".to_owned(),
            config.seed.wrapping_add(start as u64).to_string(),
        ],
        BankEngine::Endpoint => Vec::new(),
    }
}

/// Runs the bank test and returns its figures and verdict.
pub async fn run(config: BankConfig) -> std::io::Result<BankReport> {
    let work = tempfile::tempdir()?;
    let data_dir = work.path().join("data");
    let users: Vec<String> = (0..config.users).map(|index| format!("bank-user-{index}")).collect();
    let auth_file = work.path().join("auth");
    std::fs::write(&auth_file, workload::auth_file())?;

    // Storage, and the coordinators' view of it.
    let mut proxy = None;
    let mut dynoxide_server = None;
    let mut nodes: Vec<Node> = Vec::new();
    let audit_storage = match config.engine {
        BankEngine::Embedded => {
            let mut flags = common_flags(&auth_file);
            flags.extend(["--data-dir".to_owned(), data_dir.display().to_string()]);
            nodes.push(Node::new(0, flags, Vec::new(), work.path()));
            None
        }
        BankEngine::Endpoint => {
            std::fs::create_dir_all(&data_dir)?;
            let database = dynoxide::Database::new(&data_dir.join("dynamo.sqlite3").display().to_string())
                .map_err(|error| std::io::Error::other(error.to_string()))?;
            let server = DynoxideServer::start(database).await?;
            let upstream = server.endpoint().to_owned();
            dynoxide_server = Some(server);
            let storage = Storage::new(Arc::new(DynamoDbEngine::local(&upstream)), TABLE);
            storage.ensure_table().await.map_err(std::io::Error::other)?;
            let fault_config = FaultConfig {
                rate: 0.0,
                seed: config.seed,
                ..FaultConfig::default()
            };
            let started = FaultProxy::start(upstream, fault_config).await?;
            for index in 0..config.coordinators {
                let mut flags = common_flags(&auth_file);
                flags.extend(["--dynamodb-endpoint".to_owned(), started.endpoint()]);
                nodes.push(Node::new(index, flags, test_credentials(), work.path()));
            }
            proxy = Some(started);
            Some(storage)
        }
    };
    for node in &mut nodes {
        let flags = fault_flags(&config, node.starts);
        node.start(&flags).await?;
    }
    let endpoints: Vec<String> = nodes.iter().map(Node::endpoint).collect();
    if let Some(proxy) = &proxy {
        proxy.set_rate(config.fault_rate);
    }

    // The workload, with kills spread over it.
    let mut history = workload::open_accounts(&endpoints, &users, config.seed).await;
    let started = tokio::time::Instant::now();
    let until = started + config.duration;
    let clients: Vec<_> = (0..config.clients)
        .map(|index| {
            tokio::spawn(workload::client(
                index,
                endpoints.clone(),
                users.clone(),
                config.seed,
                until,
            ))
        })
        .collect();
    let mut kills = 0;
    for kill in 0..config.kills {
        let at = started + config.duration.mul_f64((kill + 1) as f64 / (config.kills + 1) as f64);
        tokio::time::sleep_until(at).await;
        let node = &mut nodes[kill % config.coordinators.max(1)];
        node.kill_9();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let flags = fault_flags(&config, node.starts);
        node.start(&flags).await?;
    }
    for client in clients {
        history.extend(client.await.map_err(std::io::Error::other)?);
    }

    // Quiesce: no more faults, coordinators stopped gracefully.
    let faults_injected = match &proxy {
        Some(proxy) => {
            proxy.set_rate(0.0);
            proxy.counts().injected()
        }
        None => 0,
    };
    for node in &mut nodes {
        node.terminate();
    }
    let faults_injected = faults_injected + count_injected_in_logs(&nodes)?;

    // The verdict.
    let storage = match audit_storage {
        Some(storage) => storage,
        None => Storage::new(
            Arc::new(EmbeddedEngine::open(&data_dir).map_err(std::io::Error::other)?),
            TABLE,
        ),
    };
    let audit_report = audit(&storage, SystemClock.now(), AUDIT_LEASE_MARGIN)
        .await
        .map_err(std::io::Error::other)?;
    let ledger = all_ledger_entries(&storage).await.map_err(std::io::Error::other)?;
    let (discrepancies, unknown_applied) = check_history(&history, &ledger);
    drop(dynoxide_server);

    let count = |matches: fn(&Outcome) -> bool| history.iter().filter(|operation| matches(&operation.outcome)).count();
    let mut all_discrepancies = audit_report.discrepancies.clone();
    all_discrepancies.extend(discrepancies);
    Ok(BankReport {
        engine: format!("{:?}", config.engine).to_lowercase(),
        config: format!(
            "{} s, {} clients, {} users, {} coordinator(s), fault rate {}%, seed {}",
            config.duration.as_secs(),
            config.clients,
            config.users,
            config.coordinators,
            config.fault_rate * 100.0,
            config.seed
        ),
        ok: count(|outcome| matches!(outcome, Outcome::Ok { .. })),
        failed: count(|outcome| matches!(outcome, Outcome::Failed { .. })),
        unknown: count(|outcome| matches!(outcome, Outcome::Unknown { .. })),
        unknown_applied,
        failed_by_reason: failed_by_reason(&history),
        attempts: history.iter().map(|operation| u64::from(operation.attempts)).sum(),
        faults_injected,
        kills,
        audit: audit_report,
        discrepancies: all_discrepancies,
    })
}

fn failed_by_reason(history: &[Operation]) -> BTreeMap<String, usize> {
    let mut reasons = BTreeMap::new();
    for operation in history {
        if let Outcome::Failed { code, message } = &operation.outcome {
            let gist: String = message
                .split(['.', '$'])
                .next()
                .unwrap_or_default()
                .chars()
                .take(40)
                .collect();
            *reasons.entry(format!("{code:?}: {}", gist.trim())).or_insert(0) += 1;
        }
    }
    reasons
}

/// Faults the embedded coordinator injected, from its logs.
fn count_injected_in_logs(nodes: &[Node]) -> std::io::Result<u64> {
    let mut injected = 0;
    for node in nodes {
        if Path::new(node.log_path()).exists() {
            let log = std::fs::read_to_string(node.log_path())?;
            injected += log
                .lines()
                .filter(|line| line.contains("injected storage fault"))
                .count() as u64;
        }
    }
    Ok(injected)
}

async fn all_ledger_entries(storage: &Storage) -> Result<Vec<LedgerEntry>, StorageError> {
    let mut entries = Vec::new();
    let mut scan = storage.scan_table();
    while let Some(page) = scan.next_page().await? {
        for item in &page {
            if let StoredItem::LedgerEntry { entry, .. } = model::classify(item) {
                entries.push(entry.map_err(|error| StorageError::Other(error.to_string()))?);
            }
        }
    }
    Ok(entries)
}

/// The final state must be explained by the acknowledged operations plus a subset of the
/// unknown ones: every ledger entry belongs to an ok or unknown operation, at most once; every
/// ok operation has exactly its entry; no failed operation left one. With the audit (cash and
/// holdings equal the ledger, nothing negative) this is the whole bank invariant.
pub fn check_history(history: &[Operation], ledger: &[LedgerEntry]) -> (Vec<String>, usize) {
    let mut discrepancies = Vec::new();
    let operations: BTreeMap<&str, &Operation> = history
        .iter()
        .map(|operation| (operation.request_id.as_str(), operation))
        .collect();
    let mut entries_per_request: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
    for entry in ledger {
        if entry.principal.as_str() != workload::CLIENT_PRINCIPAL {
            discrepancies.push(format!(
                "ledger entry {} was moved by {}, not by the bank's clients",
                entry.entry_id, entry.principal
            ));
        }
        match entry.request_id.as_deref() {
            Some(request_id) => entries_per_request.entry(request_id).or_default().push(entry),
            None => discrepancies.push(format!("ledger entry {} has no request id", entry.entry_id)),
        }
    }
    let mut unknown_applied = 0;
    for (request_id, entries) in &entries_per_request {
        let Some(operation) = operations.get(request_id) else {
            discrepancies.push(format!("ledger entries for request {request_id}, which no client sent"));
            continue;
        };
        if entries.len() > 1 {
            discrepancies.push(format!(
                "request {request_id} ({}) applied {} times",
                operation.description,
                entries.len()
            ));
        }
        match &operation.outcome {
            Outcome::Ok { transaction_id } => {
                if !entries.iter().any(|entry| entry.entry_id.as_str() == transaction_id) {
                    discrepancies.push(format!(
                        "request {request_id}: acknowledged entry {transaction_id} is not the one applied"
                    ));
                }
            }
            Outcome::Failed { code, message } => discrepancies.push(format!(
                "request {request_id} ({}) was reported failed ({code:?}: {message}) but applied",
                operation.description
            )),
            Outcome::Unknown { .. } => unknown_applied += 1,
        }
    }
    for operation in history {
        if let Outcome::Ok { transaction_id } = &operation.outcome
            && !entries_per_request.contains_key(operation.request_id.as_str())
        {
            discrepancies.push(format!(
                "request {} ({}) was acknowledged as {transaction_id} but is not in the ledger",
                operation.request_id, operation.description
            ));
        }
    }
    (discrepancies, unknown_applied)
}
