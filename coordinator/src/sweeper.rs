//! The sweeper: releases leases that expired without being released (their holder died),
//! releases in storage the holds of reserved orders that expired (their orders become EXPIRED,
//! with a RELEASE entry each) and deletes request records past their retention. Every write is conditioned on what it found,
//! so several coordinators can sweep at once and a sweep never races a live lease.
//!
//! DynamoDB deletes expired request records by itself (TTL, up to ~48 h late); dynoxide never
//! does, so on the embedded engine this sweep is what keeps them bounded.
//!
//! A sweep is meant to finish on a large or busy table: a write that fails is counted and the
//! sweep goes on to the next item (the next sweep finds that item again), and a page whose read
//! failed for now is read again from where the scan stopped. Only storage that keeps failing,
//! or a table past the scan's bound, stops a sweep early.

use std::time::Duration;

use crate::core::{Clock, Millis};
use crate::storage::model::{self, StoredItem};
use crate::storage::{Key, Storage, StorageError, TransactItem};

/// Reads of one page tried at most this many times in a row: storage that fails five times
/// running is down, not busy, and the next sweep starts over anyway.
pub const SWEEP_PAGE_ATTEMPTS_MAX: u32 = 5;
/// Pause before a failed page read is tried again, times the attempts so far: throttling and
/// lost connections pass within seconds, and 0.5 + 1 + 1.5 + 2 s stays far below the sweep
/// interval (300 s by default).
pub const SWEEP_PAGE_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Failures kept word for word in a report; any beyond are only counted.
pub const SWEEP_FAILURES_KEPT_MAX: usize = 20;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub released_leases: usize,
    pub deleted_records: usize,
    /// Feed records (WatchFeed's journal) past the feed's retention.
    pub deleted_feed_records: usize,
    /// Holds of reserved orders past their expiry, released in storage (their orders EXPIRED).
    pub expired_holds: usize,
    /// Cash on hold in all accounts as of the sweep (what live holds set aside).
    pub cash_on_hold: crate::core::Usd,
    /// Releases and deletions that failed other than by the item having changed meanwhile;
    /// their items stay as they were until a later sweep.
    pub failed_writes: usize,
    /// Page reads that failed and were tried again.
    pub failed_page_reads: usize,
    /// The first `SWEEP_FAILURES_KEPT_MAX` failures, in order, for the log.
    pub failures: Vec<String>,
}

impl SweepReport {
    fn failed(&mut self, what: String) {
        tracing::warn!(failure = %what, "sweep: a step failed; going on");
        if self.failures.len() < SWEEP_FAILURES_KEPT_MAX {
            self.failures.push(what);
        }
    }
}

/// What one swept write does, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sweeping {
    ReleaseLease,
    DeleteRecord,
    DeleteFeedRecord,
}

impl Sweeping {
    fn describe(self) -> &'static str {
        match self {
            Sweeping::ReleaseLease => "releasing the expired lease",
            Sweeping::DeleteRecord => "deleting the expired request record",
            Sweeping::DeleteFeedRecord => "deleting the expired feed record",
        }
    }
}

/// Whether `owner` may sweep now: takes or renews the sweeper lease until `now + hold` by one
/// conditional write. Only one coordinator of those sharing a table sweeps at a time; if it
/// dies, another takes over once the lease runs out.
pub async fn take_sweeper_lease(
    storage: &Storage,
    owner: &str,
    now: Millis,
    hold: Duration,
) -> Result<bool, StorageError> {
    let request = model::take_sweeper_lease(owner, now + hold.as_millis() as u64, now);
    match storage.update(request).await {
        Ok(_) => Ok(true),
        Err(StorageError::ConditionFailed { .. }) => Ok(false),
        Err(error) => Err(error),
    }
}

/// One pass over the table as of `now`.
pub async fn sweep(storage: &Storage, now: Millis) -> Result<SweepReport, StorageError> {
    sweep_pausing(storage, now, SWEEP_PAGE_RETRY_PAUSE).await
}

/// The write that sweeps `item` as of `now`, if it needs one, with the key it goes to.
fn sweep_write(item: StoredItem, now: Millis) -> Option<(Sweeping, Key, TransactItem)> {
    match item {
        StoredItem::Account {
            key,
            lease: Some(lease),
            ..
        } if !lease.is_live(now) => {
            let write = model::release_expired_lease(&key, &lease.lock_id, now);
            Some((Sweeping::ReleaseLease, key, write))
        }
        StoredItem::RequestRecord {
            key,
            record: Ok(record),
            ..
        } if model::request_record_expired(&record, now) => {
            let write = model::delete_expired_record(&key, now);
            Some((Sweeping::DeleteRecord, key, write))
        }
        StoredItem::FeedRecord {
            key,
            expires_at_seconds: Some(expires),
            ..
        } if expires < model::epoch_seconds(now) => {
            let write = model::delete_expired_record(&key, now);
            Some((Sweeping::DeleteFeedRecord, key, write))
        }
        _ => None,
    }
}

async fn sweep_pausing(storage: &Storage, now: Millis, retry_pause: Duration) -> Result<SweepReport, StorageError> {
    let mut report = SweepReport::default();
    let mut scan = storage.scan_table();
    let mut attempt = 1;
    // Bounded: the scan reads at most SCAN_PAGES_MAX pages, each at most SWEEP_PAGE_ATTEMPTS_MAX times.
    loop {
        let page = match scan.next_page().await {
            Ok(Some(page)) => page,
            Ok(None) => break,
            Err(error @ (StorageError::Unavailable(_) | StorageError::Conflict(_)))
                if attempt < SWEEP_PAGE_ATTEMPTS_MAX =>
            {
                report.failed_page_reads += 1;
                report.failed(format!(
                    "reading page {} (attempt {attempt}): {error}",
                    scan.pages_read() + 1
                ));
                tokio::time::sleep(retry_pause * attempt).await;
                attempt += 1;
                continue;
            }
            Err(error) => {
                tracing::warn!(?report, "sweep stopped before the end of the table");
                return Err(error);
            }
        };
        attempt = 1;
        for item in &page {
            let classified = model::classify(item);
            if let StoredItem::Account {
                user,
                account: Ok(account),
                lease,
                ..
            } = &classified
            {
                report.cash_on_hold = report
                    .cash_on_hold
                    .checked_add(account.cash_on_hold(now))
                    .unwrap_or(report.cash_on_hold);
                // An account under a lease (live, or expired and released just below) is left
                // to the next sweep: its holder may be writing it.
                if lease.is_none() {
                    expire_holds(storage, user, account, now, &mut report).await;
                }
            }
            let Some((sweeping, key, write)) = sweep_write(classified, now) else {
                continue;
            };
            match storage.write(write).await {
                Ok(()) => match sweeping {
                    Sweeping::ReleaseLease => report.released_leases += 1,
                    Sweeping::DeleteRecord => report.deleted_records += 1,
                    Sweeping::DeleteFeedRecord => report.deleted_feed_records += 1,
                },
                // Someone took the lease or rewrote the record meanwhile: nothing to sweep.
                Err(StorageError::ConditionFailed { .. }) => {}
                Err(error) => {
                    report.failed_writes += 1;
                    report.failed(format!("{} at {} {}: {error}", sweeping.describe(), key.pk, key.sk));
                }
            }
        }
    }
    Ok(report)
}

/// Most holds one sweep transaction releases: each writes its order twice and an entry, within
/// DynamoDB's 100 items with the account and the feed record. More wait for the next sweep.
pub const EXPIRED_HOLDS_PER_SWEEP_MAX: usize = 30;
const _: () = assert!(EXPIRED_HOLDS_PER_SWEEP_MAX * 3 + 2 <= model::TRANSACTION_ITEMS_MAX);

/// Releases the expired holds of `account` (of `user`, as the scan read it) in one transaction
/// conditioned on the version read and no lease: orders EXPIRED, a RELEASE entry each. A writer
/// that came first wins, and the next sweep looks again.
async fn expire_holds(
    storage: &Storage,
    user: &str,
    account: &crate::core::Account,
    now: Millis,
    report: &mut SweepReport,
) {
    if account.needs_numbering || account.holds.values().all(|hold| hold.is_live(now)) {
        return;
    }
    let Ok(user) = crate::core::UserId::parse("user_id", user) else {
        return;
    };
    let decisions = crate::core::ops::orders::decide_expiries(account, now, EXPIRED_HOLDS_PER_SWEEP_MAX);
    // The pass's `now` says which holds expired; the commit is stamped when it is sent (a pass
    // may run for seconds), so that its feed record is where WatchFeed readers look for it.
    let now = now.max(crate::core::SystemClock.now());
    let principal = crate::core::Principal::parse("principal", SWEEPER_PRINCIPAL).expect("a valid principal");
    let origin = crate::core::ops::Origin {
        user: &user,
        principal: &principal,
        request_id: None,
        now,
    };
    let mut after = account.clone();
    let mut writes = Vec::with_capacity(decisions.len());
    for decision in &decisions {
        after.entries += 1;
        after.apply(decision);
        let records =
            crate::core::ops::hold_records(decision, origin, after.entries).expect("an expiry is a hold decision");
        writes.push(records);
    }
    after.version = account.version + 1;
    let operations: Vec<model::OperationWrites<'_>> = writes
        .iter()
        .map(|(entry, order)| model::OperationWrites {
            entry: Some(entry),
            order: order.as_ref(),
            order_rewritten: true,
            withdrawal: None,
            record: None,
        })
        .collect();
    let transaction = model::commit_batch(&model::BatchCommit {
        user: &user,
        lock_id: None,
        read: account,
        after: &after,
        cash_floor: crate::core::Usd::ZERO,
        holding_floors: &std::collections::BTreeMap::new(),
        prices: &std::collections::BTreeMap::new(),
        operations: &operations,
        extend_until: None,
        spread_price_checks: false,
        now,
        writer: SWEEPER_PRINCIPAL,
    });
    match storage.transact_batch(transaction.items).await {
        Ok(()) => {
            report.expired_holds += decisions.len();
            crate::telemetry::metrics::hold_event("expired", decisions.len() as u64);
            record_in_feed_again(storage, &transaction.feed, now).await;
        }
        Err(StorageError::TransactionCanceled { .. } | StorageError::ConditionFailed { .. }) => {}
        Err(error) => {
            report.failed_writes += 1;
            report.failed(format!("releasing the expired holds of {user}: {error}"));
        }
    }
}

/// The sweeper's commit may have landed past the feed's horizon (a slow transaction) and it
/// keeps no process that would notice: its feed record is always written once more, stamped
/// after the acknowledgement, where every reader still looks (a feed is at least once: readers
/// drop the copy by account and sequence). A failure is logged; the next commit on the account
/// by a coordinator records it again (`journal_taken_over`).
async fn record_in_feed_again(storage: &Storage, feed: &[crate::storage::Item], at: Millis) {
    for item in feed {
        // Never at the first record's own instant: the same key would overwrite it.
        let later = (at + 1).max(crate::core::SystemClock.now());
        let Some(again) = model::feed_item_again(item, later) else {
            continue;
        };
        let put = crate::storage::Put {
            item: again,
            condition: None,
            bindings: crate::storage::Bindings::default(),
        };
        if let Err(error) = storage.put(put).await {
            tracing::warn!(%error, "sweep: the feed record of released holds could not be written again");
        }
    }
}

/// Who the sweeper's RELEASE entries name as having moved the money.
pub const SWEEPER_PRINCIPAL: &str = "lockstep-sweeper";

/// Runs the sweeper every `interval`, first after one interval, while this coordinator holds
/// the sweeper lease (held for two intervals, renewed at each). Also logs the most contended
/// users at each interval.
pub async fn sweep_periodically(storage: Storage, owner: String, clock: std::sync::Arc<dyn Clock>, interval: Duration) {
    use crate::telemetry::metrics;
    loop {
        tokio::time::sleep(interval).await;
        log_contended_users();
        match take_sweeper_lease(&storage, &owner, clock.now(), interval * 2).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!("another coordinator holds the sweeper lease; not sweeping");
                metrics::swept("skipped", 0, 0);
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "could not take the sweeper lease; retrying at the next interval");
                metrics::swept("failed", 0, 0);
                continue;
            }
        }
        match sweep(&storage, clock.now()).await {
            Ok(report) => {
                metrics::swept("done", report.released_leases as u64, report.deleted_records as u64);
                metrics::cash_on_hold(report.cash_on_hold);
                tracing::info!(
                    released_leases = report.released_leases,
                    deleted_records = report.deleted_records,
                    deleted_feed_records = report.deleted_feed_records,
                    expired_holds = report.expired_holds,
                    cash_on_hold = %report.cash_on_hold,
                    "sweep done"
                )
            }
            Err(error) => {
                metrics::swept("failed", 0, 0);
                tracing::warn!(%error, "sweep failed; retrying at the next interval")
            }
        }
    }
}

/// Users whose lease was most often found busy, logged beside each sweep.
fn log_contended_users() {
    let top = crate::telemetry::contention::top(CONTENDED_USERS_LOGGED);
    if !top.is_empty() {
        let users: Vec<String> = top
            .iter()
            .map(|contended| format!("{}={}", contended.user, contended.count))
            .collect();
        tracing::info!(contended_users = %users.join(","), "most contended users so far");
    }
}

/// How many of the most contended users each periodic log line names.
pub const CONTENDED_USERS_LOGGED: usize = 5;

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::core::records::Lease;
    use crate::core::{LeaseId, UserId};
    use crate::storage::embedded::EmbeddedEngine;
    use crate::storage::{Delete, Engine, Item, Page, Put, Query, StorageResult, Update};

    /// One coordinator at a time holds the sweeper lease; it renews its own, and another takes
    /// it only after it expired.
    #[tokio::test]
    async fn one_sweeper_at_a_time() {
        let storage = Storage::new(Arc::new(EmbeddedEngine::in_memory().unwrap()), "sweeper-lease");
        storage.create_table().await.unwrap();
        let hold = Duration::from_secs(600);
        assert_eq!(take_sweeper_lease(&storage, "a", NOW, hold).await, Ok(true));
        assert_eq!(take_sweeper_lease(&storage, "b", NOW + 1, hold).await, Ok(false));
        assert_eq!(
            take_sweeper_lease(&storage, "a", NOW + 300_000, hold).await,
            Ok(true),
            "renewed"
        );
        assert_eq!(
            take_sweeper_lease(&storage, "b", NOW + 600_000, hold).await,
            Ok(false),
            "still a's"
        );
        assert_eq!(
            take_sweeper_lease(&storage, "b", NOW + 900_000, hold).await,
            Ok(true),
            "a's expired"
        );
        assert_eq!(take_sweeper_lease(&storage, "a", NOW + 900_001, hold).await, Ok(false));
    }

    /// Pages of this many items, so a handful of leases spans several pages.
    const PAGE: u32 = 2;
    const NOW: Millis = 1_000_000;

    /// An in-memory engine whose scan calls and update calls fail where told (by call number,
    /// from 0), with short pages.
    #[derive(Debug)]
    struct FlakyEngine {
        inner: EmbeddedEngine,
        failing_scans: BTreeSet<usize>,
        failing_updates: BTreeSet<usize>,
        scans: AtomicUsize,
        updates: AtomicUsize,
    }

    fn unavailable<T>() -> StorageResult<T> {
        Err(StorageError::Unavailable("flaky".to_owned()))
    }

    #[async_trait::async_trait]
    impl Engine for FlakyEngine {
        async fn create_table(&self, table: &str) -> StorageResult<()> {
            self.inner.create_table(table).await
        }
        async fn table_exists(&self, table: &str) -> StorageResult<bool> {
            self.inner.table_exists(table).await
        }
        async fn get(&self, table: &str, key: Key) -> StorageResult<Option<Item>> {
            self.inner.get(table, key).await
        }
        async fn update(&self, table: &str, update: Update) -> StorageResult<Option<Item>> {
            if self
                .failing_updates
                .contains(&self.updates.fetch_add(1, Ordering::SeqCst))
            {
                return unavailable();
            }
            self.inner.update(table, update).await
        }
        async fn put(&self, table: &str, put: Put) -> StorageResult<()> {
            self.inner.put(table, put).await
        }
        async fn delete(&self, table: &str, delete: Delete) -> StorageResult<()> {
            self.inner.delete(table, delete).await
        }
        async fn query(&self, table: &str, query: Query) -> StorageResult<Page> {
            self.inner.query(table, query).await
        }
        async fn scan(&self, table: &str, limit: u32, start_after: Option<Key>) -> StorageResult<Page> {
            if self.failing_scans.contains(&self.scans.fetch_add(1, Ordering::SeqCst)) {
                return unavailable();
            }
            self.inner.scan(table, limit.min(PAGE), start_after).await
        }
        async fn enable_ttl(&self, table: &str, attribute: &str) -> StorageResult<()> {
            self.inner.enable_ttl(table, attribute).await
        }
        async fn transact(&self, table: &str, items: &[TransactItem], token: Option<String>) -> StorageResult<()> {
            self.inner.transact(table, items, token).await
        }
    }

    /// A table holding `count` leases that expired unreleased; the engine fails the scan and
    /// update calls named (updates counted from after the setup).
    async fn expired_leases(count: usize, failing_scans: &[usize], failing_updates: &[usize]) -> Storage {
        let engine = Arc::new(FlakyEngine {
            inner: EmbeddedEngine::in_memory().unwrap(),
            failing_scans: failing_scans.iter().copied().collect(),
            failing_updates: failing_updates.iter().map(|call| call + count).collect(),
            scans: AtomicUsize::new(0),
            updates: AtomicUsize::new(0),
        });
        let storage = Storage::new(engine, "sweep");
        storage.create_table().await.unwrap();
        for index in 0..count {
            let user = UserId::parse("user_id", &format!("dead{index}")).unwrap();
            let lease = Lease {
                lock_id: LeaseId::new_random(),
                owner: "gone".to_owned(),
                incarnation: "gone".to_owned(),
                operation: "DEPOSIT".to_owned(),
                expires_at_ms: NOW - 1,
            };
            storage
                .update(model::acquire_lease(&user, &lease, NOW - 10_000, false))
                .await
                .unwrap();
        }
        storage
    }

    /// A failed page read is read again from where the scan stopped, and a failed release is
    /// counted while the sweep goes on: every other lease is released in the same pass, and the
    /// next pass releases the one left.
    #[tokio::test]
    async fn a_sweep_goes_on_past_failed_reads_and_writes() {
        // Scan call 1 is the first read of page 2; update 2 is the third release.
        let storage = expired_leases(5, &[1], &[2]).await;
        let report = sweep_pausing(&storage, NOW, Duration::ZERO).await.unwrap();
        assert_eq!(
            (report.released_leases, report.failed_writes, report.failed_page_reads),
            (4, 1, 1),
            "{report:?}"
        );
        assert_eq!(report.failures.len(), 2, "{report:?}");
        assert!(report.failures[0].contains("page 2"), "{report:?}");
        assert!(
            report.failures[1].starts_with("releasing the expired lease at USER#"),
            "{report:?}"
        );
        let again = sweep_pausing(&storage, NOW, Duration::ZERO).await.unwrap();
        assert_eq!(again.released_leases, 1, "{again:?}");
        assert_eq!(again.failures, Vec::<String>::new());
    }

    /// Storage that keeps failing stops the sweep after `SWEEP_PAGE_ATTEMPTS_MAX` reads of one
    /// page, with the error.
    #[tokio::test]
    async fn a_sweep_stops_when_storage_keeps_failing() {
        let attempts = SWEEP_PAGE_ATTEMPTS_MAX as usize;
        let storage = expired_leases(1, &(0..attempts).collect::<Vec<_>>(), &[]).await;
        let error = sweep_pausing(&storage, NOW, Duration::ZERO).await.unwrap_err();
        assert_eq!(error, StorageError::Unavailable("flaky".to_owned()));
        let storage = expired_leases(1, &(0..attempts - 1).collect::<Vec<_>>(), &[]).await;
        let report = sweep_pausing(&storage, NOW, Duration::ZERO).await.unwrap();
        assert_eq!((report.released_leases, report.failed_page_reads), (1, attempts - 1));
    }
}
