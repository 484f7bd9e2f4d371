//! One bank run: storage, coordinators, clients, faults and kills; then the verdict.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lockstep_coordinator::audit::{AuditReport, audit};
use lockstep_coordinator::core::records::{EntryKind, LedgerEntry, LedgerHold, Order, TradeSide};
use lockstep_coordinator::core::{Account, AssetSymbol, Clock, Millis, SystemClock};
use lockstep_coordinator::storage::dynamodb::DynamoDbEngine;
use lockstep_coordinator::storage::embedded::EmbeddedEngine;
use lockstep_coordinator::storage::model::{self, StoredItem};
use lockstep_coordinator::storage::{Storage, StorageError};
use lockstep_coordinator::sweeper::SWEEPER_PRINCIPAL;
use rust_decimal::{Decimal, RoundingStrategy};

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
    /// How often the coordinators sweep (one at a time, under the sweeper lease), releasing the
    /// holds of reserved orders that expired (RELEASE entries in the sweeper's name) and the
    /// leases of killed coordinators; zero turns the sweeper off. With it off, expired holds
    /// stay on their accounts counting for nothing, and their orders read as EXPIRED.
    pub sweep_interval: Duration,
}

impl BankConfig {
    /// The configuration CI runs (`bank/tests/bank.rs`), and the defaults of the `bank` binary's
    /// flags: 32 clients, 16 users, 60 s, 10 % faults, 5 kills; three coordinators on the
    /// endpoint, one on the embedded engine (its data directory is one process's). The sweeper
    /// runs every 5 s, so expired holds are released in storage while clients fill and cancel
    /// (`LOCKSTEP_BANK_SWEEP_SECS=0` turns it off). It was off while its RELEASE entries were
    /// stamped with the start of its pass and not recorded again when they landed late: WatchFeed
    /// consumers missed them and the bank's feed check failed now and then (fixed: the sweeper
    /// stamps each release when it sends it and records it in the feed again after the
    /// acknowledgement).
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
            sweep_interval: Duration::from_secs(5),
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
    /// Operations by kind ("RESERVE", "FILL", "CANCEL" …): ok, failed, unknown.
    pub by_kind: BTreeMap<&'static str, (usize, usize, usize)>,
    /// Reserved orders at the end: holds the sweeper released (RELEASE entries in its name),
    /// holds still live on the accounts, and the cash and the assets those set aside.
    pub holds: HoldsSummary,
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

/// What the reserved orders left at the end.
#[derive(Debug, Clone, Default)]
pub struct HoldsSummary {
    pub swept: usize,
    pub live: usize,
    pub cash_on_hold: Decimal,
    pub assets_on_hold: BTreeMap<String, Decimal>,
}

impl fmt::Display for BankReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "bank ({}): {}", self.engine, self.config)?;
        writeln!(
            f,
            "operations: {} ok, {} failed, {} unknown ({} of them applied), {} attempts",
            self.ok, self.failed, self.unknown, self.unknown_applied, self.attempts
        )?;
        for (kind, (ok, failed, unknown)) in &self.by_kind {
            writeln!(f, "  {kind}: {ok} ok, {failed} failed, {unknown} unknown")?;
        }
        for (reason, count) in &self.failed_by_reason {
            writeln!(f, "  failed: {count} x {reason}")?;
        }
        let assets: Vec<String> = self
            .holds
            .assets_on_hold
            .iter()
            .map(|(asset, quantity)| format!("{quantity} {asset}"))
            .collect();
        writeln!(
            f,
            "holds: {} released by the sweeper; {} live at the end, {} cash and [{}] on hold",
            self.holds.swept,
            self.holds.live,
            self.holds.cash_on_hold,
            assets.join(", ")
        )?;
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

fn common_flags(auth_file: &Path, sweep_interval: Duration) -> Vec<String> {
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
        &sweep_interval.as_secs().to_string(),
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
            let mut flags = common_flags(&auth_file, config.sweep_interval);
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
                let mut flags = common_flags(&auth_file, config.sweep_interval);
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
    let now = SystemClock.now();
    let audit_report = audit(&storage, now, AUDIT_LEASE_MARGIN)
        .await
        .map_err(std::io::Error::other)?;
    let books = read_books(&storage, now).await.map_err(std::io::Error::other)?;
    let (discrepancies, unknown_applied) = check_history(&history, &books);
    // The watchers saw every entry the table holds for their accounts.
    for (user, seen, _, _) in &followed {
        let stored = books
            .ledger
            .iter()
            .filter(|entry| entry.user_id.as_str() == user)
            .count() as u64;
        // A watcher stopped where the ledger ended when it was looked at (checked above).
        if stored != *seen && !only_swept_after(&books, user, *seen) {
            watch_problems.push(format!(
                "watch of {user}: saw {seen} entries, the table holds {stored} ({})",
                unseen(&books, user, *seen)
            ));
        }
    }
    // The feed consumer saw every entry the table holds, of every account, and nothing else.
    let mut stored_by_user: BTreeMap<&str, u64> = BTreeMap::new();
    for entry in &books.ledger {
        *stored_by_user.entry(entry.user_id.as_str()).or_insert(0) += 1;
    }
    for (user, stored) in &stored_by_user {
        let seen = fed_newest.get(*user).copied().unwrap_or(0);
        let reached = last_by_user.get(*user).is_some_and(|last| seen >= *last);
        if seen != *stored && !(reached && only_swept_after(&books, user, seen)) {
            watch_problems.push(format!(
                "feed: {user} received through #{seen}, the table holds {stored} entries ({})",
                unseen(&books, user, seen)
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
            "{} s, {} clients, {} users, {} coordinator(s), fault rate {}%, seed {}, sweep interval {} s",
            config.duration.as_secs(),
            config.clients,
            config.users,
            config.coordinators,
            config.fault_rate * 100.0,
            config.seed,
            config.sweep_interval.as_secs()
        ),
        ok: count(|outcome| matches!(outcome, Outcome::Ok { .. })),
        failed: count(|outcome| matches!(outcome, Outcome::Failed { .. })),
        unknown: count(|outcome| matches!(outcome, Outcome::Unknown { .. })),
        unknown_applied,
        failed_by_reason: failed_by_reason(&history),
        by_kind: by_kind(&history),
        holds: holds_summary(&books),
        attempts: history.iter().map(|operation| u64::from(operation.attempts)).sum(),
        faults_injected,
        kills,
        audit: audit_report,
        discrepancies: all_discrepancies,
        watched: followed,
        fed: feed_summary,
    })
}

/// Whether every entry of `user` after sequence `seen` is a release the sweeper wrote. The
/// sweeper goes on releasing expired holds until the coordinators stop, after the watchers and
/// the feed consumer stopped where each account's ledger ended when they were last looked at:
/// those entries need not have been seen (any other must).
fn only_swept_after(books: &Books, user: &str, seen: u64) -> bool {
    books
        .ledger
        .iter()
        .filter(|entry| entry.user_id.as_str() == user && entry.sequence > seen)
        .all(swept)
}

/// The first few entries of `user` after sequence `seen`, for a discrepancy.
fn unseen(books: &Books, user: &str, seen: u64) -> String {
    let mut after: Vec<&LedgerEntry> = books
        .ledger
        .iter()
        .filter(|entry| entry.user_id.as_str() == user && entry.sequence > seen)
        .collect();
    after.sort_by_key(|entry| entry.sequence);
    let described: Vec<String> = after
        .iter()
        .take(3)
        .map(|entry| {
            format!(
                "#{} {} by {} at {} ms",
                entry.sequence,
                entry.kind.as_str(),
                entry.principal,
                entry.created_at_ms
            )
        })
        .collect();
    format!("after #{seen}: {}", described.join(", "))
}

fn failed_by_reason(history: &[Operation]) -> BTreeMap<String, usize> {
    let mut reasons = BTreeMap::new();
    for operation in history {
        if let Outcome::Failed { code, message } = &operation.outcome {
            // Ids, amounts and times left out: "Order … expired at …".
            let first = message.split(['.', '$']).next().unwrap_or_default();
            let words: Vec<&str> = first
                .split(' ')
                .map(|word| {
                    if word.chars().any(|c| c.is_ascii_digit()) {
                        "…"
                    } else {
                        word
                    }
                })
                .collect();
            let gist: String = words.join(" ").chars().take(40).collect();
            *reasons.entry(format!("{code:?}: {}", gist.trim())).or_insert(0) += 1;
        }
    }
    reasons
}

fn by_kind(history: &[Operation]) -> BTreeMap<&'static str, (usize, usize, usize)> {
    let mut kinds: BTreeMap<&'static str, (usize, usize, usize)> = BTreeMap::new();
    for operation in history {
        let counts = kinds.entry(operation.action.kind()).or_default();
        match operation.outcome {
            Outcome::Ok { .. } => counts.0 += 1,
            Outcome::Failed { .. } => counts.1 += 1,
            Outcome::Unknown { .. } => counts.2 += 1,
        }
    }
    kinds
}

fn holds_summary(books: &Books) -> HoldsSummary {
    let mut summary = HoldsSummary {
        swept: books.ledger.iter().filter(|entry| swept(entry)).count(),
        ..HoldsSummary::default()
    };
    for account in books.accounts.values() {
        summary.live += account.live_holds(books.now).count();
        summary.cash_on_hold += account.cash_on_hold(books.now).decimal();
        for (_, hold) in account.live_holds(books.now) {
            *summary.assets_on_hold.entry(hold.asset.to_string()).or_default() += hold.quantity_held().decimal();
        }
    }
    summary.assets_on_hold.retain(|_, quantity| !quantity.is_zero());
    summary
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

/// What the table holds at the end: every ledger entry, each open account's cash and holds, and
/// each order, as of `now` (the audit's).
#[derive(Debug, Default)]
pub struct Books {
    pub ledger: Vec<LedgerEntry>,
    pub cash: BTreeMap<String, Decimal>,
    /// The open accounts, for what they hold on hold at `now`.
    pub accounts: BTreeMap<String, Account>,
    /// Orders by id, for when the reserved ones expire.
    pub orders: BTreeMap<String, Order>,
    pub now: Millis,
}

async fn read_books(storage: &Storage, now: Millis) -> Result<Books, StorageError> {
    let mut books = Books {
        now,
        ..Books::default()
    };
    let malformed = |error: model::MalformedItem| StorageError::Other(error.to_string());
    let mut scan = storage.scan_table();
    while let Some(page) = scan.next_page().await? {
        for item in &page {
            match model::classify(item) {
                StoredItem::LedgerEntry { entry, .. } => books.ledger.push(entry.map_err(malformed)?),
                StoredItem::Account { user, account, .. } => {
                    let account = account.map_err(malformed)?;
                    if account.exists() {
                        books.cash.insert(user.clone(), account.cash.decimal());
                        books.accounts.insert(user, account);
                    }
                }
                StoredItem::OrderById { order, .. } => {
                    let order = order.map_err(malformed)?;
                    books.orders.insert(order.order_id.to_string(), order);
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
/// TRANSFER_OUT on the sender and a TRANSFER_IN on the receiver. A fill's cash is what the replay
/// of its order says it moves (`orders`).
fn expected_entries<'a>(operation: &'a Operation, orders: &Orders<'_>) -> Vec<Expected<'a>> {
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
        Action::Reserve { .. } => vec![on_user(EntryKind::Hold, Some(Decimal::ZERO))],
        // Not replayed: the entry is no FILL of an order that applied, which `hold_matches` finds.
        Action::Fill { .. } => vec![on_user(
            EntryKind::Fill,
            orders
                .expected
                .get(operation.request_id.as_str())
                .map(|replayed| replayed.cash),
        )],
        Action::Cancel { .. } => vec![on_user(EntryKind::Release, Some(Decimal::ZERO))],
    }
}

/// Whether `entries` are exactly what `operation` writes when it applies (and, for a transfer,
/// one transfer naming both parties; for a reserve, fill or cancel, the hold it asked for).
fn entries_match(operation: &Operation, entries: &[&LedgerEntry], orders: &Orders<'_>) -> bool {
    let expected = expected_entries(operation, orders);
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
                    && hold_matches(operation, entry, orders)
            })
        })
}

/// Whether the hold part of `entry` (and a fill's trade part) is what `operation` asked for: a
/// reserve holds `quantity` x `limit` of cash rounded up (a buy) or `quantity` of its asset (a
/// sell), for the order its reply named; a fill moves its quantity of the order's asset under its
/// fill id and changes the hold as the replay of its order says; a cancel gives back what the
/// replay says the order still held. Other operations carry no hold.
fn hold_matches(operation: &Operation, entry: &LedgerEntry, orders: &Orders<'_>) -> bool {
    let hold = entry.hold.as_ref();
    fn held_asset(hold: &LedgerHold) -> Option<&str> {
        hold.asset.as_ref().map(AssetSymbol::as_str)
    }
    match &operation.action {
        Action::Reserve {
            side,
            asset,
            quantity,
            limit,
        } => {
            let (asset, held) = match side {
                TradeSide::Buy => (None, cents_up(quantity * limit)),
                TradeSide::Sell => (Some(asset.as_str()), *quantity),
            };
            let replied = match &operation.outcome {
                Outcome::Ok { order_id, .. } => order_id.as_deref(),
                _ => None,
            };
            entry.trade.is_none()
                && hold.is_some_and(|hold| {
                    hold.fill_id.is_none()
                        && held_asset(hold) == asset
                        && hold.held_delta == held
                        && replied
                            .is_none_or(|order_id| hold.order_id.as_ref().map_or("", |id| id.as_str()) == order_id)
                })
        }
        Action::Fill {
            order_id,
            fill_id,
            side,
            asset,
            quantity,
            ..
        } => {
            let quantity_delta = match side {
                TradeSide::Buy => *quantity,
                TradeSide::Sell => -*quantity,
            };
            let replayed = orders.expected.get(operation.request_id.as_str());
            entry.trade.as_ref().is_some_and(|trade| {
                trade.asset.as_str() == asset
                    && trade.quantity_delta == quantity_delta
                    && trade.order_id.as_str() == order_id
            }) && hold.is_some_and(|hold| {
                hold.order_id.as_ref().map_or("", |id| id.as_str()) == order_id
                    && hold.fill_id.as_deref() == Some(fill_id.as_str())
                    && replayed.is_some_and(|replayed| hold.held_delta == replayed.held_delta)
            })
        }
        Action::Cancel { order_id } => {
            let replayed = orders.expected.get(operation.request_id.as_str());
            entry.trade.is_none()
                && hold.is_some_and(|hold| {
                    hold.order_id.as_ref().map_or("", |id| id.as_str()) == order_id
                        && hold.fill_id.is_none()
                        && replayed.is_some_and(|replayed| hold.held_delta == replayed.held_delta)
                })
        }
        Action::Deposit { .. } | Action::Withdraw { .. } | Action::Buy | Action::Sell | Action::Transfer { .. } => {
            hold.is_none()
        }
    }
}

/// `value` rounded up to the cent (a buy's hold and cost), and down (a sell's proceeds).
fn cents_up(value: Decimal) -> Decimal {
    value.round_dp_with_strategy(2, RoundingStrategy::ToPositiveInfinity)
}

fn cents_down(value: Decimal) -> Decimal {
    value.round_dp_with_strategy(2, RoundingStrategy::ToNegativeInfinity)
}

/// Whether `entry` is the sweeper's release of an expired hold: a RELEASE with no request id, in
/// the sweeper's name.
fn swept(entry: &LedgerEntry) -> bool {
    entry.kind == EntryKind::Release && entry.request_id.is_none() && entry.principal.as_str() == SWEEPER_PRINCIPAL
}

/// What a fill or cancel's entry must say, by the replay of its order.
#[derive(Debug, Clone, Copy)]
struct Replayed {
    cash: Decimal,
    held_delta: Decimal,
    /// The cash the order moved in all, after this entry.
    moved: Decimal,
}

/// What the reserved orders that applied must have done, replayed from the amounts the clients
/// asked for in the order their entries applied (by sequence): each fill's cash and hold change,
/// each release's, and what the orders still open hold at the end.
#[derive(Debug, Default)]
struct Orders<'a> {
    /// By the request id of a fill (its key) or a cancel that applied.
    expected: BTreeMap<&'a str, Replayed>,
    /// By user: the cash and each asset that its orders still open, and live at the books' time,
    /// hold.
    cash_on_hold: BTreeMap<&'a str, Decimal>,
    assets_on_hold: BTreeMap<(&'a str, String), Decimal>,
}

/// One reserved order as its entries leave it: filled so far (quantity, exact value, cash moved
/// rounded once against the customer), and whether it closed (filled, cancelled or swept).
struct Replay {
    side: TradeSide,
    quantity: Decimal,
    limit: Decimal,
    filled: Decimal,
    filled_value: Decimal,
    moved: Decimal,
    closed: bool,
}

impl Replay {
    /// What it holds: a buy the rest at the limit on top of its fills, rounded up once, less what
    /// the fills moved; a sell the quantity not sold.
    fn held(&self) -> Decimal {
        match self.side {
            TradeSide::Buy => cents_up(self.filled_value + (self.quantity - self.filled) * self.limit) - self.moved,
            TradeSide::Sell => self.quantity - self.filled,
        }
    }

    /// A fill of `quantity` at `price`: its cash (out for a buy) and the change of what is held.
    fn fill(&mut self, quantity: Decimal, price: Decimal) -> (Decimal, Decimal) {
        let before = self.held();
        self.filled += quantity;
        self.filled_value += quantity * price;
        let moved = match self.side {
            TradeSide::Buy => cents_up(self.filled_value),
            TradeSide::Sell => cents_down(self.filled_value),
        };
        let delta = moved - self.moved;
        self.moved = moved;
        self.closed = self.filled >= self.quantity;
        let cash = match self.side {
            TradeSide::Buy => -delta,
            TradeSide::Sell => delta,
        };
        (cash, self.held() - before)
    }
}

/// One step of a reserved order, as applied.
enum Step<'a> {
    Fill(&'a Operation, &'a LedgerEntry),
    Cancel(&'a Operation, &'a LedgerEntry),
    Swept(&'a LedgerEntry),
}

/// Replays every reserved order that applied (its reserve has its one HOLD entry): its fills,
/// its cancel and the sweeper's release of it, in the order of their entries. Steps applied to a
/// closed order, fills past the order's quantity or at or after its expiry, cancels after its
/// expiry, sweeps before it, and sweeps of orders no client reserved are discrepancies. Entries
/// that are not what their operation asked for are left to the matching.
fn replay_orders<'a>(
    history: &'a [Operation],
    entries_per_request: &BTreeMap<&str, Vec<&'a LedgerEntry>>,
    swept_entries: &[&'a LedgerEntry],
    books: &Books,
    discrepancies: &mut Vec<String>,
) -> Orders<'a> {
    let mut orders = Orders::default();
    let mut steps: BTreeMap<&str, Vec<(u64, Step<'a>)>> = BTreeMap::new();
    let entries_of = |operation: &Operation, kind: EntryKind| -> Vec<&'a LedgerEntry> {
        entries_per_request
            .get(operation.request_id.as_str())
            .into_iter()
            .flatten()
            .copied()
            .filter(|entry| entry.kind == kind)
            .collect()
    };
    for operation in history {
        match &operation.action {
            Action::Fill { order_id, .. } => {
                for entry in entries_of(operation, EntryKind::Fill) {
                    steps
                        .entry(order_id.as_str())
                        .or_default()
                        .push((entry.sequence, Step::Fill(operation, entry)));
                }
            }
            Action::Cancel { order_id } => {
                for entry in entries_of(operation, EntryKind::Release) {
                    steps
                        .entry(order_id.as_str())
                        .or_default()
                        .push((entry.sequence, Step::Cancel(operation, entry)));
                }
            }
            _ => {}
        }
    }
    for entry in swept_entries {
        match &entry.hold {
            Some(hold) => steps
                .entry(hold.order_id.as_ref().map_or("", |id| id.as_str()))
                .or_default()
                .push((entry.sequence, Step::Swept(entry))),
            None => discrepancies.push(format!(
                "the sweeper's RELEASE {} of {} names no order",
                entry.entry_id, entry.user_id
            )),
        }
    }

    for operation in history {
        let Action::Reserve {
            side,
            asset,
            quantity,
            limit,
        } = &operation.action
        else {
            continue;
        };
        let held = entries_of(operation, EntryKind::Hold);
        let [reserved] = held.as_slice() else {
            // Not applied, or applied other than as one HOLD: the matching says which.
            continue;
        };
        let Some(hold) = &reserved.hold else { continue };
        let order_id = hold.order_id.as_ref().map_or("", |id| id.as_str());
        let described = format!("order {order_id} ({} by {})", operation.description, operation.user);
        let Some(order) = books.orders.get(order_id) else {
            discrepancies.push(format!("{described} has a HOLD entry but no order"));
            continue;
        };
        let expires_at = order.expires_at_ms.unwrap_or(Millis::MAX);
        let mut replay = Replay {
            side: *side,
            quantity: *quantity,
            limit: *limit,
            filled: Decimal::ZERO,
            filled_value: Decimal::ZERO,
            moved: Decimal::ZERO,
            closed: false,
        };
        let mut order_steps = steps.remove(order_id).unwrap_or_default();
        order_steps.sort_by_key(|(sequence, _)| *sequence);
        for (_, step) in order_steps {
            let (entry, what) = match &step {
                Step::Fill(fill, entry) => (*entry, fill.description.clone()),
                Step::Cancel(cancel, entry) => (*entry, cancel.description.clone()),
                Step::Swept(entry) => (*entry, "the sweeper's release".to_owned()),
            };
            if replay.closed {
                discrepancies.push(format!(
                    "{described}: {what} applied (entry {}) after the order closed",
                    entry.entry_id
                ));
            }
            let in_time = match &step {
                Step::Swept(_) => entry.created_at_ms >= expires_at,
                _ => entry.created_at_ms < expires_at,
            };
            if !in_time {
                discrepancies.push(format!(
                    "{described}: {what} applied at {} ms (entry {}), the order expires at {expires_at} ms",
                    entry.created_at_ms, entry.entry_id
                ));
            }
            match step {
                Step::Fill(fill, _) => {
                    let Action::Fill {
                        quantity: filled,
                        price,
                        ..
                    } = &fill.action
                    else {
                        continue;
                    };
                    if replay.filled + filled > replay.quantity {
                        discrepancies.push(format!(
                            "{described}: {what} fills past the order's quantity ({} filled before it)",
                            replay.filled
                        ));
                    }
                    let (cash, held_delta) = replay.fill(*filled, *price);
                    let replayed = Replayed {
                        cash,
                        held_delta,
                        moved: replay.moved,
                    };
                    orders.expected.insert(fill.request_id.as_str(), replayed);
                }
                Step::Cancel(cancel, _) => {
                    let replayed = Replayed {
                        cash: Decimal::ZERO,
                        held_delta: -replay.held(),
                        moved: replay.moved,
                    };
                    orders.expected.insert(cancel.request_id.as_str(), replayed);
                    replay.closed = true;
                }
                Step::Swept(entry) => {
                    let held_delta = entry.hold.as_ref().map(|hold| hold.held_delta);
                    if !entry.cash_delta.decimal().is_zero() || held_delta != Some(-replay.held()) {
                        discrepancies.push(format!(
                            "{described}: the sweeper's release {} moved {} and {held_delta:?} on hold, not 0 and -{}",
                            entry.entry_id,
                            entry.cash_delta,
                            replay.held()
                        ));
                    }
                    replay.closed = true;
                }
            }
        }
        if !replay.closed && books.now < expires_at {
            let user = operation.user.as_str();
            match side {
                TradeSide::Buy => *orders.cash_on_hold.entry(user).or_default() += replay.held(),
                TradeSide::Sell => *orders.assets_on_hold.entry((user, asset.clone())).or_default() += replay.held(),
            }
        }
    }
    for (order_id, order_steps) in steps {
        for (_, step) in order_steps {
            if let Step::Swept(entry) = step {
                discrepancies.push(format!(
                    "the sweeper released order {order_id} (entry {} of {}), which no reserve of the bank's clients applied",
                    entry.entry_id, entry.user_id
                ));
            }
        }
    }
    orders
}

/// The on-hold invariant at the end: on every account nothing is on hold beyond its total (cash
/// on hold at most the cash, each asset on hold at most its holding), and what is on hold is what
/// the replayed orders still open and live hold, cash and each asset.
fn check_on_hold(books: &Books, orders: &Orders<'_>, discrepancies: &mut Vec<String>) {
    for (user, account) in &books.accounts {
        let cash_on_hold = account.cash_on_hold(books.now).decimal();
        if cash_on_hold > account.cash.decimal() {
            discrepancies.push(format!(
                "account {user} has {cash_on_hold} cash on hold, more than its cash {}",
                account.cash
            ));
        }
        let expected = orders.cash_on_hold.get(user.as_str()).copied().unwrap_or_default();
        if cash_on_hold != expected {
            discrepancies.push(format!(
                "account {user} has {cash_on_hold} cash on hold, but its open orders hold {expected}"
            ));
        }
        let mut assets: std::collections::BTreeSet<String> = account
            .live_holds(books.now)
            .map(|(_, hold)| hold.asset.to_string())
            .collect();
        assets.extend(
            orders
                .assets_on_hold
                .keys()
                .filter(|(holder, _)| holder == user)
                .map(|(_, asset)| asset.clone()),
        );
        for asset in assets {
            let symbol = AssetSymbol::parse("asset", &asset).expect("a stored or workload asset symbol");
            let on_hold = account.holding_on_hold(&symbol, books.now).decimal();
            let holding = account.holding(&symbol).decimal();
            if on_hold > holding {
                discrepancies.push(format!(
                    "account {user} has {on_hold} {asset} on hold, more than its holding {holding}"
                ));
            }
            let expected = orders
                .assets_on_hold
                .get(&(user.as_str(), asset.clone()))
                .copied()
                .unwrap_or_default();
            if on_hold != expected {
                discrepancies.push(format!(
                    "account {user} has {on_hold} {asset} on hold, but its open orders hold {expected}"
                ));
            }
        }
    }
    for user in orders
        .cash_on_hold
        .keys()
        .chain(orders.assets_on_hold.keys().map(|(user, _)| user))
    {
        if !books.accounts.contains_key(*user) {
            discrepancies.push(format!("orders of {user} hold, but it has no account"));
        }
    }
}

/// Money in and out of the bank by applied operations: deposits − withdrawals − buys + sells
/// (fills of reserved orders among the buys and sells).
#[derive(Debug, Default)]
struct Flows {
    deposits: Decimal,
    withdrawals: Decimal,
    buys: Decimal,
    sells: Decimal,
}

/// The final state must be explained by the acknowledged operations plus a subset of the
/// unknown ones. The subset is what the ledger shows, and it must be whole: every entry belongs
/// to an ok or unknown operation, at most once, or is the sweeper's release of an expired hold;
/// an ok operation has all its entries (a transfer both, on the sender and on the receiver), a
/// failed one none, an unknown one all or none. Then the books are added up from what the
/// clients asked for: each account's cash is its opening deposit plus the amounts of the
/// operations on it that applied (a fill's replayed over its order's fills before it), and all
/// accounts together hold the acknowledged (and applied unknown) deposits − withdrawals − buys +
/// sells, transfers moving money without making any; what each account has on hold is what its
/// reserved orders still open hold, never more than its totals. With the audit (cash and
/// holdings equal the ledger, transfers whole, holds equal the open orders, nothing negative)
/// this is the whole bank invariant. Returns the discrepancies and how many unknown operations
/// applied.
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
    // The sweeper's releases of expired holds belong to no request: the replay of their orders
    // accounts for them.
    let mut swept_entries = Vec::new();
    for entry in &books.ledger {
        if swept(entry) {
            swept_entries.push(entry);
            continue;
        }
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
    let orders = replay_orders(history, &entries_per_request, &swept_entries, books, &mut discrepancies);

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
                if !entries_match(operation, entries, &orders) {
                    let found: Vec<String> = entries
                        .iter()
                        .map(|entry| {
                            let held = entry
                                .hold
                                .as_ref()
                                .map(|hold| format!(" (held {:+})", hold.held_delta))
                                .unwrap_or_default();
                            format!(
                                "{} {}{held} of {}",
                                entry.kind.as_str(),
                                entry.cash_delta,
                                entry.user_id
                            )
                        })
                        .collect();
                    discrepancies.push(format!(
                        "{described} applied as [{}], not as its {} whole entries (applied twice, or half)",
                        found.join(", "),
                        expected_entries(operation, &orders).len()
                    ));
                    continue;
                }
                if let Outcome::Ok {
                    transaction_id,
                    transfer_id,
                    order_total,
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
                    // A fill's reply tells what its order moved in all so far.
                    if let (Action::Fill { .. }, Some(replayed)) = (&operation.action, orders.expected.get(request_id))
                        && *order_total != Some(replayed.moved)
                    {
                        discrepancies.push(format!(
                            "{described}: the reply says its order moved {order_total:?} in all, its fills so far {}",
                            replayed.moved
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
        add_effects(operation, entries, &orders, &mut expected_cash, &mut flows);
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
    check_on_hold(books, &orders, &mut discrepancies);
    (discrepancies, unknown_applied)
}

/// Adds what an applied operation did to each account's expected cash and to the bank's flows:
/// amounts as the client asked for them; a trade's cash from its reply when acknowledged, else
/// from its entry (the audit checks the entry against the order); a fill's from the replay of its
/// order. Reserves and cancels move nothing.
fn add_effects<'a>(
    operation: &'a Operation,
    entries: &[&LedgerEntry],
    orders: &Orders<'_>,
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
        Action::Fill { side, .. } => {
            let cash = orders
                .expected
                .get(operation.request_id.as_str())
                .map_or(Decimal::ZERO, |replayed| replayed.cash);
            credit(&operation.user, cash);
            match side {
                TradeSide::Buy => flows.buys -= cash,
                TradeSide::Sell => flows.sells += cash,
            }
        }
        Action::Reserve { .. } | Action::Cancel { .. } => credit(&operation.user, Decimal::ZERO),
    }
}

#[cfg(test)]
mod tests {
    use lockstep_coordinator::core::account::{AccountState, Hold};
    use lockstep_coordinator::core::records::{LedgerTrade, LedgerTransfer, OrderStatus};
    use lockstep_coordinator::core::{
        EntryId, Memo, OrderId, Price, Principal, Quantity, TransferId, Usd, UsdDelta, UserId,
    };
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
                order_id: None,
                order_total: None,
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
            order_id: None,
            order_total: None,
        };
        history.push(operation("t-1", "ann", transfer_action(), ok.clone()));
        assert_eq!(check_history(&history, &books), (vec![], 0));

        // Its receiver's half lost: the transfer is half applied, the sender's cash is
        // unexplained, and money vanished from the bank.
        let mut half = Books {
            ledger: books.ledger[..3].to_vec(),
            cash: books.cash.clone(),
            ..Books::default()
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
            ..Books::default()
        };
        transfer_entries(&mut applied);
        assert_eq!(check_history(&history, &applied), (vec![], 1));
        let mut only_in = Books {
            ledger: applied.ledger.clone(),
            cash: books.cash.clone(),
            ..Books::default()
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
            order_id: None,
            order_total: None,
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

    /// When the order of the order flow expires.
    const EXPIRES_AT: Millis = 10_000;

    fn doge() -> AssetSymbol {
        AssetSymbol::parse("asset", "DOGE").unwrap()
    }

    /// ann's order flow after her opening deposit: a reserved buy of 100 DOGE at limit 0.126
    /// (12.60 held), filled for 33.3 at 0.12345678 (4.111110774: 4.12 moved, and the hold down to
    /// ceil(4.111110774 + 66.7 x 0.126) - 4.12 = 8.40), then cancelled (8.40 released), each call
    /// acknowledged; and the books after it. Returns the order's id.
    fn order_flow(history: &mut Vec<Operation>, books: &mut Books) -> OrderId {
        let order_id = OrderId::new();
        let hold = |fill_id: Option<&str>, held: &str| LedgerHold {
            order_id: Some(order_id.clone()),
            withdrawal_id: None,
            fill_id: fill_id.map(str::to_owned),
            asset: None,
            held_delta: decimal(held),
        };
        let mut reserve = entry("ann", EntryKind::Hold, "0", Some("r-1"));
        reserve.hold = Some(hold(None, "12.60"));
        reserve.sequence = 2;
        let key = format!("fill:{order_id}:exec-0");
        let mut fill = entry("ann", EntryKind::Fill, "-4.12", Some(&key));
        fill.hold = Some(hold(Some("exec-0"), "-4.20"));
        fill.trade = Some(LedgerTrade {
            asset: doge(),
            quantity_delta: decimal("33.3"),
            order_id: order_id.clone(),
            holding_after: None,
        });
        fill.sequence = 3;
        let mut release = entry("ann", EntryKind::Release, "0", Some("r-1-cancel"));
        release.hold = Some(hold(None, "-8.40"));
        release.sequence = 4;
        let ok = |entry: &LedgerEntry, total: &str| Outcome::Ok {
            transaction_id: entry.entry_id.to_string(),
            transfer_id: None,
            trade_cash: None,
            order_id: Some(order_id.to_string()),
            order_total: Some(decimal(total)),
        };
        let reserve_action = Action::Reserve {
            side: TradeSide::Buy,
            asset: "DOGE".to_owned(),
            quantity: decimal("100"),
            limit: decimal("0.126"),
        };
        let fill_action = Action::Fill {
            order_id: order_id.to_string(),
            fill_id: "exec-0".to_owned(),
            side: TradeSide::Buy,
            asset: "DOGE".to_owned(),
            quantity: decimal("33.3"),
            price: decimal("0.12345678"),
        };
        let cancel_action = Action::Cancel {
            order_id: order_id.to_string(),
        };
        history.extend([
            operation("r-1", "ann", reserve_action, ok(&reserve, "0")),
            operation(&key, "ann", fill_action, ok(&fill, "4.12")),
            operation("r-1-cancel", "ann", cancel_action, ok(&release, "4.12")),
        ]);
        books.ledger.extend([reserve, fill, release]);
        books.cash.insert("ann".to_owned(), decimal("95.88"));
        let ann = Account {
            state: AccountState::Open,
            cash: Usd::from_decimal(decimal("95.88")),
            ..Account::default()
        };
        books.accounts.insert("ann".to_owned(), ann);
        let order = Order {
            order_id: order_id.clone(),
            user_id: UserId::parse("user_id", "ann").unwrap(),
            side: TradeSide::Buy,
            asset: doge(),
            quantity: Quantity::from_decimal(decimal("100")),
            limit_price: Some(Price::parse("limit_price", "0.126").unwrap()),
            status: OrderStatus::Cancelled,
            price: Price::parse("price", "0.126").unwrap(),
            total: Usd::from_decimal(decimal("4.12")),
            failure_reason: None,
            created_at_ms: 1,
            principal: Principal::parse("principal", workload::CLIENT_PRINCIPAL).unwrap(),
            filled_quantity: Quantity::from_decimal(decimal("33.3")),
            expires_at_ms: Some(EXPIRES_AT),
        };
        books.orders.insert(order_id.to_string(), order);
        order_id
    }

    /// A reserve, a fill and a cancel are explained: the fill's cash and each hold change are
    /// replayed from the figures the client asked for, rounded once per order.
    #[test]
    fn an_order_flow_is_explained() {
        let (mut history, mut books) = opened();
        order_flow(&mut history, &mut books);
        assert_eq!(check_history(&history, &books), (vec![], 0));

        // A fill that moved a cent more than its order's rounding allows.
        let (mut history, mut books) = opened();
        order_flow(&mut history, &mut books);
        books.ledger[3].cash_delta = UsdDelta::from_stored("-4.13").unwrap();
        books.cash.insert("ann".to_owned(), decimal("95.87"));
        let (found, _) = check_history(&history, &books);
        assert!(found[0].contains("not as its 1 whole entries"), "{found:?}");
        assert!(
            found.iter().any(|line| line.starts_with("account ann holds 95.87")),
            "{found:?}"
        );

        // A cancel that released less than the order held.
        let (mut history, mut books) = opened();
        order_flow(&mut history, &mut books);
        books.ledger[4].hold.as_mut().unwrap().held_delta = decimal("-8.39");
        let (found, _) = check_history(&history, &books);
        assert!(
            found.len() == 1 && found[0].starts_with("request r-1-cancel") && found[0].contains("held -8.39"),
            "{found:?}"
        );

        // A fill applied twice under two ids, or reported failed.
        let (mut history, mut books) = opened();
        order_flow(&mut history, &mut books);
        history[3].outcome = Outcome::Failed {
            code: Code::FailedPrecondition,
            message: "expired".to_owned(),
        };
        let (found, _) = check_history(&history, &books);
        assert!(found[0].contains("was reported failed"), "{found:?}");
    }

    /// What an account has on hold is what its open, live orders hold: 8.40 for the order flow
    /// without its cancel, nothing once the order expired.
    #[test]
    fn what_is_on_hold_is_what_the_open_orders_hold() {
        let (mut history, mut books) = opened();
        let order_id = order_flow(&mut history, &mut books);
        history.pop();
        books.ledger.pop();
        let (found, _) = check_history(&history, &books);
        assert_eq!(
            found,
            vec!["account ann has 0.00 cash on hold, but its open orders hold 8.40".to_owned()]
        );

        let hold = Hold {
            side: TradeSide::Buy,
            asset: doge(),
            quantity: Quantity::from_decimal(decimal("100")),
            limit: Price::parse("limit", "0.126").unwrap(),
            filled: Quantity::from_decimal(decimal("33.3")),
            filled_value: decimal("4.111110774"),
            moved: Usd::from_decimal(decimal("4.12")),
            expires_at_ms: EXPIRES_AT,
            created_at_ms: 1,
            principal: Principal::parse("principal", workload::CLIENT_PRINCIPAL).unwrap(),
        };
        let ann = books.accounts.get_mut("ann").unwrap();
        ann.holds.insert(order_id, hold);
        assert_eq!(check_history(&history, &books), (vec![], 0));
        books.now = EXPIRES_AT;
        assert_eq!(check_history(&history, &books), (vec![], 0));

        // More on hold than the cash.
        books.now = 0;
        let ann = books.accounts.get_mut("ann").unwrap();
        ann.cash = Usd::from_decimal(decimal("8.00"));
        let (found, _) = check_history(&history, &books);
        assert!(
            found.contains(&"account ann has 8.40 cash on hold, more than its cash 8.00".to_owned()),
            "{found:?}"
        );
    }

    /// The sweeper's release of an expired order is accounted for by the order's replay; one
    /// before the expiry, or a fill at or after it, is found.
    #[test]
    fn the_sweeper_releases_only_expired_orders() {
        let (mut history, mut books) = opened();
        order_flow(&mut history, &mut books);
        history.pop();
        let swept = books.ledger.last_mut().unwrap();
        swept.request_id = None;
        swept.principal = Principal::parse("principal", SWEEPER_PRINCIPAL).unwrap();
        swept.created_at_ms = EXPIRES_AT;
        assert_eq!(check_history(&history, &books), (vec![], 0));

        books.ledger.last_mut().unwrap().created_at_ms = EXPIRES_AT - 1;
        let (found, _) = check_history(&history, &books);
        assert!(
            found.len() == 1 && found[0].contains("the sweeper's release applied at 9999 ms"),
            "{found:?}"
        );

        books.ledger.last_mut().unwrap().created_at_ms = EXPIRES_AT;
        books.ledger[3].created_at_ms = EXPIRES_AT;
        let (found, _) = check_history(&history, &books);
        assert!(
            found.len() == 1 && found[0].contains(":exec-0 applied at 10000 ms"),
            "{found:?}"
        );
    }
}
