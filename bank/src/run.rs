//! One bank run: storage, coordinators, clients, faults and kills; then the verdict.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lockstep_coordinator::audit::{AuditReport, audit};
use lockstep_coordinator::core::records::{EntryKind, LedgerEntry};
use lockstep_coordinator::core::{Clock, SystemClock};
use lockstep_coordinator::storage::dynamodb::DynamoDbEngine;
use lockstep_coordinator::storage::embedded::EmbeddedEngine;
use lockstep_coordinator::storage::model::{self, StoredItem};
use lockstep_coordinator::storage::{Storage, StorageError};
use rust_decimal::Decimal;

use crate::cluster::Node;
use crate::dynoxide_server::DynoxideServer;
use crate::fault_proxy::{FaultConfig, FaultProxy};
use crate::workload::{self, Action, Operation, Outcome};

/// Grace after expiry before the audit calls an unreleased lease stale: a killed coordinator's
/// leases expire within the longest lease (25 s).
const AUDIT_LEASE_MARGIN: Duration = Duration::from_secs(60);
const TABLE: &str = "lockstep";
/// Accounts followed with WatchLedger through the run.
const WATCHED_ACCOUNTS: usize = 3;
/// How long a watcher may take, after the load, to reach its account's last entry.
const WATCH_CATCH_UP: Duration = Duration::from_secs(30);

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
    /// Accounts followed with WatchLedger: the user, the last sequence seen (every one before it
    /// in order), the streams reopened and the entries received twice.
    pub watched: Vec<(String, u64, u64, u64)>,
    /// The feed consumer (WatchFeed, every account): accounts, entries received in order,
    /// streams reopened, entries received again.
    pub fed: (usize, u64, u64, u64),
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
        for (user, seen, reconnects, repeated) in &self.watched {
            writeln!(
                f,
                "watched {user}: sequences 1 to {seen} in order, no gap; {reconnects} reconnects, {repeated} received twice"
            )?;
        }
        let (accounts, entries, reconnects, repeated) = self.fed;
        writeln!(
            f,
            "feed: {entries} entries of {accounts} accounts, each account's in order; {reconnects} reconnects, {repeated} received again"
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
        "--daily-transfer-limit",
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
            // Account affinity on, as deploy/ runs several coordinators: each user's calls meet
            // at one owner, forwarded there by the others; kills re-home the owner's users.
            let peer_token_file = work.path().join("peer-token");
            std::fs::write(&peer_token_file, workload::PEER_TOKEN)?;
            for index in 0..config.coordinators {
                let mut flags = common_flags(&auth_file);
                flags.extend(["--dynamodb-endpoint".to_owned(), started.endpoint()]);
                let mut node = Node::new(index, flags, test_credentials(), work.path());
                node.advertise(&peer_token_file);
                nodes.push(node);
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

    // The workload, with kills spread over it, and watchers following a few accounts through
    // them (WatchLedger, reconnecting with their last sequence).
    let watchers: Vec<(String, Arc<workload::Watched>, tokio::task::JoinHandle<()>)> = users
        .iter()
        .take(WATCHED_ACCOUNTS)
        .map(|user| {
            let watched = Arc::new(workload::Watched::default());
            let task = tokio::spawn(workload::watch_account(
                user.clone(),
                endpoints.clone(),
                Arc::clone(&watched),
            ));
            (user.clone(), watched, task)
        })
        .collect();
    // And a feed consumer following every account (WatchFeed, reconnecting with its cursor).
    let fed = Arc::new(workload::Fed::default());
    let feed_task = tokio::spawn(workload::follow_feed(endpoints.clone(), Arc::clone(&fed)));
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
    // Each watcher reaches its account's last entry while the coordinators still run.
    let mut watch_problems = Vec::new();
    let mut followed = Vec::new();
    for (user, watched, task) in &watchers {
        let Some(last) = workload::last_sequence(&endpoints, user).await else {
            watch_problems.push(format!("watch of {user}: no coordinator answered ListLedger"));
            continue;
        };
        let deadline = tokio::time::Instant::now() + WATCH_CATCH_UP;
        while watched.last.load(std::sync::atomic::Ordering::SeqCst) < last && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
        let seen = watched.last.load(std::sync::atomic::Ordering::SeqCst);
        if seen != last {
            watch_problems.push(format!(
                "watch of {user}: reached sequence {seen}, the ledger ends at {last}"
            ));
        }
        watch_problems.extend(watched.gaps.lock().expect("gaps").iter().cloned());
        followed.push((
            user.clone(),
            seen,
            watched.reconnects.load(std::sync::atomic::Ordering::SeqCst),
            watched.repeated.load(std::sync::atomic::Ordering::SeqCst),
        ));
    }

    // The feed consumer reaches every account's last entry while the coordinators still run.
    let mut last_by_user = BTreeMap::new();
    for user in &users {
        match workload::last_sequence(&endpoints, user).await {
            Some(last) => {
                last_by_user.insert(user.clone(), last);
            }
            None => watch_problems.push(format!("feed: no coordinator answered ListLedger for {user}")),
        }
    }
    let deadline = tokio::time::Instant::now() + WATCH_CATCH_UP;
    while !fed.reached(&last_by_user) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    feed_task.abort();
    let fed_newest = fed.newest.lock().expect("newest").clone();
    watch_problems.extend(fed.out_of_order.lock().expect("out of order").iter().cloned());

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
    let books = read_books(&storage).await.map_err(std::io::Error::other)?;
    let (discrepancies, unknown_applied) = check_history(&history, &books);
    // The watchers saw every entry the table holds for their accounts.
    for (user, seen, _, _) in &followed {
        let stored = books
            .ledger
            .iter()
            .filter(|entry| entry.user_id.as_str() == user)
            .count() as u64;
        if stored != *seen {
            watch_problems.push(format!("watch of {user}: saw {seen} entries, the table holds {stored}"));
        }
    }
    // The feed consumer saw every entry the table holds, of every account, and nothing else.
    let mut stored_by_user: BTreeMap<&str, u64> = BTreeMap::new();
    for entry in &books.ledger {
        *stored_by_user.entry(entry.user_id.as_str()).or_insert(0) += 1;
    }
    for (user, stored) in &stored_by_user {
        let seen = fed_newest.get(*user).copied().unwrap_or(0);
        if seen != *stored {
            watch_problems.push(format!(
                "feed: {user} received through #{seen}, the table holds {stored} entries"
            ));
        }
    }
    for (user, seen) in &fed_newest {
        if !stored_by_user.contains_key(user.as_str()) {
            watch_problems.push(format!("feed: {user} received through #{seen}, the table holds none"));
        }
    }
    let feed_summary = (
        stored_by_user.len(),
        fed_newest.values().sum::<u64>(),
        fed.reconnects.load(std::sync::atomic::Ordering::SeqCst),
        fed.repeated.load(std::sync::atomic::Ordering::SeqCst),
    );
    drop(dynoxide_server);

    let count = |matches: fn(&Outcome) -> bool| history.iter().filter(|operation| matches(&operation.outcome)).count();
    let mut all_discrepancies = audit_report.discrepancies.clone();
    all_discrepancies.extend(discrepancies);
    all_discrepancies.extend(watch_problems);
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
        watched: followed,
        fed: feed_summary,
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

/// What the table holds at the end: every ledger entry, and each open account's cash.
#[derive(Debug, Default)]
pub struct Books {
    pub ledger: Vec<LedgerEntry>,
    pub cash: BTreeMap<String, Decimal>,
}

async fn read_books(storage: &Storage) -> Result<Books, StorageError> {
    let mut books = Books::default();
    let malformed = |error: model::MalformedItem| StorageError::Other(error.to_string());
    let mut scan = storage.scan_table();
    while let Some(page) = scan.next_page().await? {
        for item in &page {
            match model::classify(item) {
                StoredItem::LedgerEntry { entry, .. } => books.ledger.push(entry.map_err(malformed)?),
                StoredItem::Account { user, account, .. } => {
                    let account = account.map_err(malformed)?;
                    if account.exists() {
                        books.cash.insert(user, account.cash.decimal());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(books)
}

/// One ledger entry an operation should have written: on whose account, of which kind, moving
/// how much cash (None for a trade, whose cash the coordinator decides).
struct Expected<'a> {
    user: &'a str,
    kind: EntryKind,
    cash: Option<Decimal>,
}

/// The entries `operation` writes if it applies: one on its user, and for a transfer a
/// TRANSFER_OUT on the sender and a TRANSFER_IN on the receiver.
fn expected_entries(operation: &Operation) -> Vec<Expected<'_>> {
    let on_user = |kind, cash| Expected {
        user: &operation.user,
        kind,
        cash,
    };
    match &operation.action {
        Action::Deposit { amount } => vec![on_user(EntryKind::Deposit, Some(*amount))],
        Action::Withdraw { amount } => vec![on_user(EntryKind::Withdrawal, Some(-*amount))],
        Action::Buy => vec![on_user(EntryKind::Buy, None)],
        Action::Sell => vec![on_user(EntryKind::Sell, None)],
        Action::Transfer { to, amount } => vec![
            on_user(EntryKind::TransferOut, Some(-*amount)),
            Expected {
                user: to,
                kind: EntryKind::TransferIn,
                cash: Some(*amount),
            },
        ],
    }
}

/// Whether `entries` are exactly what `operation` writes when it applies (and, for a transfer,
/// one transfer naming both parties).
fn entries_match(operation: &Operation, entries: &[&LedgerEntry]) -> bool {
    let expected = expected_entries(operation);
    let one_transfer = entries
        .iter()
        .map(|entry| entry.transfer.as_ref().map(|transfer| transfer.transfer_id.as_str()))
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        == 1;
    entries.len() == expected.len()
        && one_transfer
        && expected.iter().all(|wanted| {
            entries.iter().any(|entry| {
                let counterparty_ok = match (&operation.action, &entry.transfer) {
                    (Action::Transfer { to, .. }, Some(transfer)) => {
                        let other = if entry.kind == EntryKind::TransferOut {
                            to
                        } else {
                            &operation.user
                        };
                        transfer.counterparty.as_str() == other
                    }
                    (Action::Transfer { .. }, None) => false,
                    (_, transfer) => transfer.is_none(),
                };
                entry.user_id.as_str() == wanted.user
                    && entry.kind == wanted.kind
                    && wanted.cash.is_none_or(|cash| entry.cash_delta.decimal() == cash)
                    && counterparty_ok
            })
        })
}

/// Money in and out of the bank by applied operations: deposits − withdrawals − buys + sells.
#[derive(Debug, Default)]
struct Flows {
    deposits: Decimal,
    withdrawals: Decimal,
    buys: Decimal,
    sells: Decimal,
}

/// The final state must be explained by the acknowledged operations plus a subset of the
/// unknown ones. The subset is what the ledger shows, and it must be whole: every entry belongs
/// to an ok or unknown operation, at most once; an ok operation has all its entries (a transfer
/// both, on the sender and on the receiver), a failed one none, an unknown one all or none. Then
/// the books are added up from what the clients asked for: each account's cash is its opening
/// deposit plus the amounts of the operations on it that applied, and all accounts together hold
/// the acknowledged (and applied unknown) deposits − withdrawals − buys + sells, transfers moving
/// money without making any. With the audit (cash and holdings equal the ledger, transfers
/// whole, nothing negative) this is the whole bank invariant. Returns the discrepancies and how
/// many unknown operations applied.
pub fn check_history(history: &[Operation], books: &Books) -> (Vec<String>, usize) {
    let mut discrepancies = Vec::new();
    let operations: BTreeMap<&str, &Operation> = history
        .iter()
        .map(|operation| (operation.request_id.as_str(), operation))
        .collect();
    // A TRANSFER_IN carries no request id (the id is the sender's): it belongs to the request of
    // the TRANSFER_OUT with its transfer id.
    let mut request_of_transfer: BTreeMap<&str, &str> = BTreeMap::new();
    for entry in &books.ledger {
        if let (EntryKind::TransferOut, Some(transfer), Some(request_id)) =
            (entry.kind, &entry.transfer, entry.request_id.as_deref())
        {
            request_of_transfer.insert(transfer.transfer_id.as_str(), request_id);
        }
    }
    let mut entries_per_request: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
    for entry in &books.ledger {
        if entry.principal.as_str() != workload::CLIENT_PRINCIPAL {
            discrepancies.push(format!(
                "ledger entry {} was moved by {}, not by the bank's clients",
                entry.entry_id, entry.principal
            ));
        }
        let request_id = match (entry.kind, &entry.transfer) {
            (EntryKind::TransferIn, Some(transfer)) => request_of_transfer.get(transfer.transfer_id.as_str()).copied(),
            _ => entry.request_id.as_deref(),
        };
        match request_id {
            Some(request_id) => entries_per_request.entry(request_id).or_default().push(entry),
            None => discrepancies.push(format!(
                "ledger entry {} ({} of {}) belongs to no request",
                entry.entry_id,
                entry.kind.as_str(),
                entry.user_id
            )),
        }
    }
    for request_id in entries_per_request.keys() {
        if !operations.contains_key(request_id) {
            discrepancies.push(format!("ledger entries for request {request_id}, which no client sent"));
        }
    }

    let mut unknown_applied = 0;
    let mut expected_cash: BTreeMap<&str, Decimal> = BTreeMap::new();
    let mut flows = Flows::default();
    for operation in history {
        let request_id = operation.request_id.as_str();
        let entries = entries_per_request
            .get(request_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let described = format!("request {request_id} ({} by {})", operation.description, operation.user);
        let applied = match (&operation.outcome, entries) {
            (Outcome::Failed { .. } | Outcome::Unknown { .. }, []) => false,
            (Outcome::Failed { code, message }, _) => {
                discrepancies.push(format!(
                    "{described} was reported failed ({code:?}: {message}) but applied {} entries",
                    entries.len()
                ));
                continue;
            }
            (Outcome::Ok { transaction_id, .. }, []) => {
                discrepancies.push(format!(
                    "{described} was acknowledged as {transaction_id} but is not in the ledger"
                ));
                continue;
            }
            (outcome, entries) => {
                if !entries_match(operation, entries) {
                    let found: Vec<String> = entries
                        .iter()
                        .map(|entry| format!("{} {} of {}", entry.kind.as_str(), entry.cash_delta, entry.user_id))
                        .collect();
                    discrepancies.push(format!(
                        "{described} applied as [{}], not as its {} whole entries (applied twice, or half)",
                        found.join(", "),
                        expected_entries(operation).len()
                    ));
                    continue;
                }
                if let Outcome::Ok {
                    transaction_id,
                    transfer_id,
                    ..
                } = outcome
                {
                    let own = entries
                        .iter()
                        .find(|entry| entry.user_id.as_str() == operation.user)
                        .expect("a matching set has an entry on the operation's user");
                    let own_transfer = own.transfer.as_ref().map(|transfer| transfer.transfer_id.to_string());
                    if own.entry_id.as_str() != transaction_id || own_transfer != *transfer_id {
                        discrepancies.push(format!(
                            "{described}: acknowledged entry {transaction_id} (transfer {transfer_id:?}) is not the one applied ({}, transfer {own_transfer:?})",
                            own.entry_id
                        ));
                    }
                } else {
                    unknown_applied += 1;
                }
                true
            }
        };
        if !applied {
            continue;
        }
        add_effects(operation, entries, &mut expected_cash, &mut flows);
    }

    for (user, cash) in &books.cash {
        let expected = expected_cash.get(user.as_str()).copied().unwrap_or_default();
        if *cash != expected {
            discrepancies.push(format!(
                "account {user} holds {cash}, but the operations on it that applied explain {expected}"
            ));
        }
    }
    for user in expected_cash.keys() {
        if !books.cash.contains_key(*user) {
            discrepancies.push(format!("operations applied on {user}, which has no account"));
        }
    }
    let total: Decimal = books.cash.values().sum();
    let explained = flows.deposits - flows.withdrawals - flows.buys + flows.sells;
    if total != explained {
        discrepancies.push(format!(
            "the accounts hold {total} in all, but the deposits {} − withdrawals {} − buys {} + sells {} that applied explain {explained}",
            flows.deposits, flows.withdrawals, flows.buys, flows.sells
        ));
    }
    (discrepancies, unknown_applied)
}

/// Adds what an applied operation did to each account's expected cash and to the bank's flows:
/// amounts as the client asked for them; a trade's cash from its reply when acknowledged, else
/// from its entry (the audit checks the entry against the order).
fn add_effects<'a>(
    operation: &'a Operation,
    entries: &[&LedgerEntry],
    expected_cash: &mut BTreeMap<&'a str, Decimal>,
    flows: &mut Flows,
) {
    let mut credit = |user: &'a str, cash: Decimal| *expected_cash.entry(user).or_default() += cash;
    let trade_cash = || match &operation.outcome {
        Outcome::Ok {
            trade_cash: Some(cash), ..
        } => *cash,
        _ => entries
            .first()
            .map(|entry| entry.cash_delta.decimal())
            .unwrap_or_default(),
    };
    match &operation.action {
        Action::Deposit { amount } => {
            credit(&operation.user, *amount);
            flows.deposits += amount;
        }
        Action::Withdraw { amount } => {
            credit(&operation.user, -*amount);
            flows.withdrawals += amount;
        }
        Action::Buy => {
            let cash = trade_cash();
            credit(&operation.user, cash);
            flows.buys -= cash;
        }
        Action::Sell => {
            let cash = trade_cash();
            credit(&operation.user, cash);
            flows.sells += cash;
        }
        Action::Transfer { to, amount } => {
            credit(&operation.user, -*amount);
            credit(to, *amount);
        }
    }
}

#[cfg(test)]
mod tests {
    use lockstep_coordinator::core::records::LedgerTransfer;
    use lockstep_coordinator::core::{EntryId, Memo, Principal, TransferId, Usd, UsdDelta, UserId};
    use tonic::Code;

    use super::*;

    fn decimal(raw: &str) -> Decimal {
        raw.parse().unwrap()
    }

    fn entry(owner: &str, kind: EntryKind, delta: &str, request_id: Option<&str>) -> LedgerEntry {
        LedgerEntry {
            hold: None,
            entry_id: EntryId::new(),
            user_id: UserId::parse("user_id", owner).unwrap(),
            kind,
            cash_delta: UsdDelta::from_stored(delta).unwrap(),
            cash_after: Usd::ZERO,
            trade: None,
            transfer: None,
            created_at_ms: 1,
            request_id: request_id.map(str::to_owned),
            sequence: 1,
            principal: Principal::parse("principal", workload::CLIENT_PRINCIPAL).unwrap(),
        }
    }

    fn operation(request_id: &str, user: &str, action: Action, outcome: Outcome) -> Operation {
        Operation {
            request_id: request_id.to_owned(),
            user: user.to_owned(),
            action,
            description: request_id.to_owned(),
            outcome,
            attempts: 1,
        }
    }

    /// Both accounts opened with 100.00 (their deposits acknowledged).
    fn opened() -> (Vec<Operation>, Books) {
        let mut history = Vec::new();
        let mut books = Books::default();
        for user in ["ann", "bob"] {
            let request_id = format!("open-{user}");
            let deposit = entry(user, EntryKind::Deposit, "100.00", Some(&request_id));
            let ok = Outcome::Ok {
                transaction_id: deposit.entry_id.to_string(),
                transfer_id: None,
                trade_cash: None,
            };
            let amount = decimal("100.00");
            history.push(operation(&request_id, user, Action::Deposit { amount }, ok));
            books.ledger.push(deposit);
            books.cash.insert(user.to_owned(), amount);
        }
        (history, books)
    }

    /// A transfer of 30.00 from ann to bob with request `t-1`: its two entries, and the books
    /// after it.
    fn transfer_entries(books: &mut Books) -> (String, String) {
        let transfer_id = TransferId::new();
        let transfer = |counterparty: &str| LedgerTransfer {
            transfer_id: transfer_id.clone(),
            counterparty: UserId::parse("counterparty", counterparty).unwrap(),
            memo: Memo::from_stored(workload::TRANSFER_MEMO),
        };
        let mut out = entry("ann", EntryKind::TransferOut, "-30.00", Some("t-1"));
        out.transfer = Some(transfer("bob"));
        let mut into = entry("bob", EntryKind::TransferIn, "30.00", None);
        into.transfer = Some(transfer("ann"));
        let ids = (out.entry_id.to_string(), transfer_id.to_string());
        books.ledger.extend([out, into]);
        books.cash.insert("ann".to_owned(), decimal("70.00"));
        books.cash.insert("bob".to_owned(), decimal("130.00"));
        ids
    }

    fn transfer_action() -> Action {
        Action::Transfer {
            to: "bob".to_owned(),
            amount: decimal("30.00"),
        }
    }

    fn unknown() -> Outcome {
        Outcome::Unknown {
            last: "Unavailable".to_owned(),
        }
    }

    /// An acknowledged transfer is on both ledgers and explains both balances.
    #[test]
    fn an_acknowledged_transfer_is_on_both_accounts() {
        let (mut history, mut books) = opened();
        let (transaction_id, transfer_id) = transfer_entries(&mut books);
        let ok = Outcome::Ok {
            transaction_id,
            transfer_id: Some(transfer_id),
            trade_cash: None,
        };
        history.push(operation("t-1", "ann", transfer_action(), ok.clone()));
        assert_eq!(check_history(&history, &books), (vec![], 0));

        // Its receiver's half lost: the transfer is half applied, the sender's cash is
        // unexplained, and money vanished from the bank.
        let mut half = Books {
            ledger: books.ledger[..3].to_vec(),
            cash: books.cash.clone(),
        };
        half.cash.insert("bob".to_owned(), decimal("100.00"));
        let (found, _) = check_history(&history, &half);
        assert!(
            found.len() == 3 && found[0].contains("request t-1") && found[0].contains("not as its 2 whole entries"),
            "{found:?}"
        );
        assert!(found[1].starts_with("account ann holds 70.00"), "{found:?}");
        assert!(found[2].starts_with("the accounts hold 170.00 in all"), "{found:?}");
    }

    /// A failed transfer is on neither account; an unknown one on both (applied) or neither.
    #[test]
    fn failed_is_on_neither_and_unknown_on_both_or_neither() {
        let failed = Outcome::Failed {
            code: Code::FailedPrecondition,
            message: "Insufficient balance".to_owned(),
        };
        let (mut history, books) = opened();
        history.push(operation("t-1", "ann", transfer_action(), failed.clone()));
        assert_eq!(check_history(&history, &books), (vec![], 0));
        let (mut history, mut applied) = opened();
        transfer_entries(&mut applied);
        history.push(operation("t-1", "ann", transfer_action(), failed));
        let (found, _) = check_history(&history, &applied);
        assert!(
            found.len() == 3 && found[0].contains("was reported failed"),
            "{found:?}"
        );
        assert!(found[1].starts_with("account ann holds 70.00"), "{found:?}");

        let (mut history, books) = opened();
        history.push(operation("t-1", "ann", transfer_action(), unknown()));
        assert_eq!(check_history(&history, &books), (vec![], 0));
        let mut applied = Books {
            ledger: books.ledger.clone(),
            cash: books.cash.clone(),
        };
        transfer_entries(&mut applied);
        assert_eq!(check_history(&history, &applied), (vec![], 1));
        let mut only_in = Books {
            ledger: applied.ledger.clone(),
            cash: books.cash.clone(),
        };
        only_in.ledger.retain(|entry| entry.kind != EntryKind::TransferOut);
        only_in.cash.insert("bob".to_owned(), decimal("130.00"));
        let (found, _) = check_history(&history, &only_in);
        assert!(found[0].contains("belongs to no request"), "{found:?}");
        assert!(
            found.iter().any(|line| line.starts_with("account bob holds 130.00")),
            "{found:?}"
        );
    }

    /// Balances are added up from the amounts the clients asked for, not from the ledger's deltas.
    #[test]
    fn a_wrong_amount_is_found() {
        let (mut history, mut books) = opened();
        let (transaction_id, transfer_id) = transfer_entries(&mut books);
        let ok = Outcome::Ok {
            transaction_id,
            transfer_id: Some(transfer_id),
            trade_cash: None,
        };
        let asked = Action::Transfer {
            to: "bob".to_owned(),
            amount: decimal("3.00"),
        };
        history.push(operation("t-1", "ann", asked, ok));
        let (found, _) = check_history(&history, &books);
        assert!(
            found.len() == 3 && found[0].contains("not as its 2 whole entries"),
            "{found:?}"
        );
    }
}
