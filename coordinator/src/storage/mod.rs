//! Storage: one DynamoDB data model, two engines.
//!
//! `model` builds every request Lockstep sends (keys, condition and update expressions) in one
//! place, as engine-neutral values. An engine only translates them: `embedded` calls dynoxide
//! (DynamoDB on SQLite) in-process, `dynamodb` sends them through aws-sdk-dynamodb to AWS or any
//! compatible endpoint, and `translate` holds what the two translate alike (items, keys,
//! bindings, and the condition every conditional request carries). `Storage` wraps the engine and counts requests, which is how tests hold
//! the money path to its budget of two requests per successful mutation (one on a known account). Whole-table reads (the
//! audit, the sweeper, the tests) go through one bounded scan, `Storage::scan_table`, and name
//! what they read with `model::classify`.

pub mod capacity;
pub mod dynamodb;
pub mod embedded;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod group;
pub mod model;
mod translate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Called with every request's DynamoDB action name, outcome label ([`outcome_label`]) and
/// duration: how telemetry learns of storage without storage knowing telemetry.
pub type RequestObserver = fn(&'static str, &'static str, std::time::Duration);

/// When storage last answered a request, and when a request last found it unavailable: what
/// readiness (`telemetry::health`) is read from.
#[derive(Debug, Default)]
pub struct Activity {
    last_answer: AtomicU64,
    last_failure: AtomicU64,
}

/// The process's epoch for `Activity`'s stamps.
static EPOCH: std::sync::LazyLock<std::time::Instant> = std::sync::LazyLock::new(std::time::Instant::now);

impl Activity {
    /// One request's outcome: `answered` unless storage was unavailable.
    pub fn observe(&self, answered: bool) {
        let slot = if answered {
            &self.last_answer
        } else {
            &self.last_failure
        };
        // Milliseconds since the process's epoch, plus one (0 means "never").
        slot.store(EPOCH.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
    }

    /// Some(true) if storage answered within `window`, Some(false) if requests only failed in
    /// it, None if nothing was sent in it.
    pub fn verdict(&self, window: std::time::Duration) -> Option<bool> {
        let now = EPOCH.elapsed().as_millis() as u64 + 1;
        let recent = |slot: &AtomicU64| {
            let stamp = slot.load(Ordering::Relaxed);
            stamp > 0 && std::time::Duration::from_millis(now.saturating_sub(stamp)) < window
        };
        if recent(&self.last_answer) {
            Some(true)
        } else if recent(&self.last_failure) {
            Some(false)
        } else {
            None
        }
    }
}

/// The `outcome` label of a storage request.
pub fn outcome_label<T>(result: &StorageResult<T>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(StorageError::ConditionFailed { .. }) => "condition_failed",
        Err(StorageError::TransactionCanceled { .. }) => "transaction_canceled",
        Err(StorageError::Unavailable(_)) => "unavailable",
        Err(StorageError::Conflict(_)) => "conflict",
        Err(StorageError::ScanBoundReached { .. }) | Err(StorageError::Other(_)) => "error",
    }
}

/// Items read per page of a whole-table scan: DynamoDB stops a page at 1 MB anyway, and 500 of
/// Lockstep's items (well under 1 KB each, a few holdings included) stay below it.
pub const SCAN_PAGE_SIZE: u32 = 500;
/// Pages one whole-table scan reads at most: a table of up to 50 million items. A larger table
/// fails the scan with `StorageError::ScanBoundReached` rather than being read in part.
pub const SCAN_PAGES_MAX: usize = 100_000;

const _: () = assert!(SCAN_PAGE_SIZE as usize * SCAN_PAGES_MAX >= 50_000_000);

/// An attribute value, in the subset of DynamoDB's types Lockstep uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    S(String),
    /// A number in DynamoDB's decimal text form; never a float.
    N(String),
    Bool(bool),
    M(BTreeMap<String, Value>),
}

pub type Item = BTreeMap<String, Value>;

/// Expression attribute names (`#n`) and values (`:v`) of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bindings {
    pub names: BTreeMap<String, String>,
    pub values: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub pk: String,
    pub sk: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub key: Key,
    pub update: String,
    pub condition: Option<String>,
    pub bindings: Bindings,
    /// Ask for the whole item as written (ReturnValues = ALL_NEW).
    pub return_new: bool,
    /// Ask for the whole item as it was when the condition failed
    /// (ReturnValuesOnConditionCheckFailure = ALL_OLD).
    pub return_old_on_condition_failure: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub item: Item,
    pub condition: Option<String>,
    pub bindings: Bindings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub key: Key,
    pub condition: Option<String>,
    pub bindings: Bindings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionCheck {
    pub key: Key,
    pub condition: String,
    pub bindings: Bindings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransactItem {
    Put(Put),
    Update(Update),
    Delete(Delete),
    ConditionCheck(ConditionCheck),
}

/// A consistent Query of one partition, optionally restricted to a sort-key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub pk: String,
    pub sk_prefix: String,
    pub newest_first: bool,
    pub limit: u32,
    pub start_after: Option<Key>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    pub items: Vec<Item>,
    pub last_key: Option<Key>,
}

/// Why one item of a cancelled transaction failed: DynamoDB's cancellation reason code
/// ("None" for items that were fine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancellationReason {
    pub code: String,
}

impl CancellationReason {
    pub fn condition_failed(&self) -> bool {
        self.code == "ConditionalCheckFailed"
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// A single-item write's condition was false; `current` is the item as it was, when asked for.
    #[error("the conditional request failed")]
    ConditionFailed { current: Option<Item> },
    /// A transaction was cancelled; nothing in it was written. One reason per item, in order.
    #[error("transaction cancelled: {reasons:?}")]
    TransactionCanceled { reasons: Vec<CancellationReason> },
    /// Storage could not be reached or refused for now (throttling, 5xx, timeout, connection
    /// lost). For a write, the outcome is unknown: it may or may not have been applied.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The item is part of another transaction in flight (DynamoDB's TransactionConflict):
    /// nothing was written; trying again shortly is safe.
    #[error("transaction conflict: {0}")]
    Conflict(String),
    /// A whole-table scan read `pages` pages of `page_size` items and the table went on: the
    /// table outgrew `SCAN_PAGES_MAX`. Nothing that needs the whole table may go on with part.
    #[error("the table scan read SCAN_PAGES_MAX = {pages} pages of {page_size} items and the table goes on")]
    ScanBoundReached { pages: usize, page_size: u32 },
    /// Anything else: a bug or a misconfiguration (missing table, validation error).
    #[error("storage error: {0}")]
    Other(String),
}

pub type StorageResult<T> = Result<T, StorageError>;

/// A DynamoDB engine: sends the requests `model` builds, to one table.
#[async_trait::async_trait]
pub trait Engine: Send + Sync + std::fmt::Debug {
    async fn create_table(&self, table: &str) -> StorageResult<()>;
    async fn table_exists(&self, table: &str) -> StorageResult<bool>;
    async fn get(&self, table: &str, key: Key) -> StorageResult<Option<Item>>;
    async fn update(&self, table: &str, update: Update) -> StorageResult<Option<Item>>;
    async fn put(&self, table: &str, put: Put) -> StorageResult<()>;
    async fn delete(&self, table: &str, delete: Delete) -> StorageResult<()>;
    async fn query(&self, table: &str, query: Query) -> StorageResult<Page>;
    /// One consistent page of the whole table, for the audit and the sweeper.
    async fn scan(&self, table: &str, limit: u32, start_after: Option<Key>) -> StorageResult<Page>;
    /// Lets storage delete expired request records by itself where it can (DynamoDB TTL).
    async fn enable_ttl(&self, table: &str, attribute: &str) -> StorageResult<()>;
    /// All items or none. `token` is the idempotency token (ClientRequestToken) where the
    /// engine honours one; Lockstep never relies on it for correctness.
    async fn transact(&self, table: &str, items: &[TransactItem], token: Option<String>) -> StorageResult<()>;
    /// A consistent copy of the whole store, taken while it serves, into a new file at `path`.
    /// Only the embedded engine has one; DynamoDB has its own backups (PITR, on-demand).
    async fn backup(&self, path: &std::path::Path) -> StorageResult<()> {
        Err(StorageError::Other(format!(
            "this engine cannot back up to {}: use DynamoDB's own backups",
            path.display()
        )))
    }
}

/// The table and engine the coordinator uses, with a count of every request sent.
#[derive(Debug, Clone)]
pub struct Storage {
    engine: Arc<dyn Engine>,
    table: Arc<str>,
    requests: Arc<AtomicU64>,
    /// Outcomes of recent requests, which readiness is read from.
    activity: Arc<Activity>,
    /// Where batch commits go when group commit is on (`with_group_commit`).
    group: Option<group::GroupCommit>,
    /// Told of every request (`observed_by`): the metrics, in a serving coordinator.
    observer: Option<RequestObserver>,
}

impl Storage {
    pub fn new(engine: Arc<dyn Engine>, table: impl Into<Arc<str>>) -> Self {
        Self {
            engine,
            table: table.into(),
            requests: Arc::new(AtomicU64::new(0)),
            activity: Arc::new(Activity::default()),
            group: None,
            observer: None,
        }
    }

    /// Tells `observer` of every request from now on (set it before `with_group_commit`, whose
    /// committer sends through a clone).
    pub fn observed_by(mut self, observer: RequestObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Sends batch commits (`transact_batch`) of several users in one transaction where they
    /// arrive together. Starts the committer task, which sends through this storage as it is
    /// (counted and observed like any request): call inside the runtime.
    pub fn with_group_commit(mut self) -> Self {
        self.group = Some(group::GroupCommit::start(self.clone()));
        self
    }

    /// When storage last answered and last failed to (for health).
    /// Whether batch commits go through group commit (`with_group_commit`).
    pub fn groups_commits(&self) -> bool {
        self.group.is_some()
    }

    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Sends one request through the engine: counted, timed, its outcome told to the observer
    /// (the metrics `lockstep_storage_requests_total`, `lockstep_storage_request_duration_seconds`)
    /// and remembered for health.
    async fn send<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = StorageResult<T>>,
    ) -> StorageResult<T> {
        self.count();
        self.observe(operation, call).await
    }

    /// `send` without the count of money-path requests.
    async fn observe<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = StorageResult<T>>,
    ) -> StorageResult<T> {
        let started = std::time::Instant::now();
        let result = call.await;
        if let Some(observer) = &self.observer {
            observer(operation, outcome_label(&result), started.elapsed());
        }
        self.activity
            .observe(!matches!(result, Err(StorageError::Unavailable(_))));
        result
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// A clone whose requests are counted apart from this one's `requests()`: for work beside
    /// the calls (the catalog refresh), so that the count stays the calls' own.
    pub fn counted_apart(&self) -> Self {
        Self {
            requests: Arc::new(AtomicU64::new(0)),
            ..self.clone()
        }
    }

    /// Storage requests sent so far, through every clone of this `Storage`.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Creates the table and turns on TTL for request records.
    pub async fn create_table(&self) -> StorageResult<()> {
        self.send("CreateTable", self.engine.create_table(&self.table)).await?;
        self.send(
            "UpdateTimeToLive",
            self.engine.enable_ttl(&self.table, model::TTL_ATTRIBUTE),
        )
        .await
    }

    /// Creates the table unless it exists already.
    pub async fn ensure_table(&self) -> StorageResult<()> {
        if self.table_exists().await? {
            return Ok(());
        }
        self.create_table().await
    }

    /// Whether storage answers and has the table. Not counted: the health probe runs beside
    /// the money path, whose requests are what the counter measures.
    pub async fn probe(&self) -> StorageResult<()> {
        match self
            .observe("DescribeTable", self.engine.table_exists(&self.table))
            .await?
        {
            true => Ok(()),
            false => Err(StorageError::Other(format!("table {} does not exist", self.table))),
        }
    }

    pub async fn table_exists(&self) -> StorageResult<bool> {
        self.send("DescribeTable", self.engine.table_exists(&self.table)).await
    }

    pub async fn get(&self, key: Key) -> StorageResult<Option<Item>> {
        self.send("GetItem", self.engine.get(&self.table, key)).await
    }

    pub async fn update(&self, update: Update) -> StorageResult<Option<Item>> {
        self.send("UpdateItem", self.engine.update(&self.table, update)).await
    }

    pub async fn put(&self, put: Put) -> StorageResult<()> {
        self.send("PutItem", self.engine.put(&self.table, put)).await
    }

    pub async fn delete(&self, delete: Delete) -> StorageResult<()> {
        self.send("DeleteItem", self.engine.delete(&self.table, delete)).await
    }

    pub async fn query(&self, query: Query) -> StorageResult<Page> {
        self.send("Query", self.engine.query(&self.table, query)).await
    }

    /// Sends one write on its own (not in a transaction).
    pub async fn write(&self, item: TransactItem) -> StorageResult<()> {
        match item {
            TransactItem::Put(put) => self.put(put).await,
            TransactItem::Update(update) => self.update(update).await.map(drop),
            TransactItem::Delete(delete) => self.delete(delete).await,
            TransactItem::ConditionCheck(_) => Err(StorageError::Other("a condition check is not a write".to_owned())),
        }
    }

    /// Reads the whole table, a page at a time, at most `SCAN_PAGES_MAX` pages.
    pub fn scan_table(&self) -> TableScan<'_> {
        TableScan::new(self, SCAN_PAGE_SIZE, SCAN_PAGES_MAX)
    }

    async fn scan(&self, limit: u32, start_after: Option<Key>) -> StorageResult<Page> {
        self.send("Scan", self.engine.scan(&self.table, limit, start_after))
            .await
    }

    /// A consistent online copy of the store into a new file (embedded engine only). Not
    /// counted among the money path's requests.
    pub async fn backup(&self, path: &std::path::Path) -> StorageResult<()> {
        self.observe("Backup", self.engine.backup(path)).await
    }

    pub async fn transact(&self, items: &[TransactItem], token: Option<String>) -> StorageResult<()> {
        self.send("TransactWriteItems", self.engine.transact(&self.table, items, token))
            .await
    }

    /// A user's batch commit: with group commit on, it may share one transaction with other
    /// users' (and is answered as if it had been sent alone); otherwise `transact`.
    pub async fn transact_batch(&self, items: Vec<TransactItem>) -> StorageResult<()> {
        match &self.group {
            Some(group) => group.transact(items).await,
            None => self.transact(&items, None).await,
        }
    }
}

/// A bounded, consistent scan of the whole table, page by page; the only one Lockstep has.
#[derive(Debug)]
pub struct TableScan<'a> {
    storage: &'a Storage,
    page_size: u32,
    pages_max: usize,
    pages_read: usize,
    /// Where the next page starts; `None` with `pages_read > 0` means the table has ended.
    start_after: Option<Key>,
}

impl<'a> TableScan<'a> {
    fn new(storage: &'a Storage, page_size: u32, pages_max: usize) -> Self {
        Self {
            storage,
            page_size,
            pages_max,
            pages_read: 0,
            start_after: None,
        }
    }

    /// The next page of items, or `None` once the table has been read to its end. A page whose
    /// read failed can be asked for again: the scan resumes where it stopped. Once `pages_max`
    /// pages have been read and the table goes on, every call fails with `ScanBoundReached`:
    /// a scan that is bounded ends loudly, never as if the table had ended.
    pub async fn next_page(&mut self) -> StorageResult<Option<Vec<Item>>> {
        if self.pages_read > 0 && self.start_after.is_none() {
            return Ok(None);
        }
        if self.pages_read == self.pages_max {
            return Err(StorageError::ScanBoundReached {
                pages: self.pages_max,
                page_size: self.page_size,
            });
        }
        let page = self.storage.scan(self.page_size, self.start_after.clone()).await?;
        self.pages_read += 1;
        self.start_after = page.last_key;
        Ok(Some(page.items))
    }

    /// Pages read so far.
    pub fn pages_read(&self) -> usize {
        self.pages_read
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A storage of `count` items in an in-memory embedded table.
    async fn storage_with_items(count: usize) -> Storage {
        let storage = Storage::new(Arc::new(embedded::EmbeddedEngine::in_memory().unwrap()), "scan");
        storage.create_table().await.unwrap();
        for index in 0..count {
            let item = BTreeMap::from([
                ("pk".to_owned(), Value::S(format!("FOREIGN#{index:03}"))),
                ("sk".to_owned(), Value::S("x".to_owned())),
            ]);
            storage
                .put(Put {
                    item,
                    condition: None,
                    bindings: Bindings::default(),
                })
                .await
                .unwrap();
        }
        storage
    }

    async fn read_all(mut scan: TableScan<'_>) -> StorageResult<usize> {
        let mut items = 0;
        while let Some(page) = scan.next_page().await? {
            items += page.len();
        }
        Ok(items)
    }

    /// A scan within its bound reads every item once, and an empty table is one empty page.
    #[tokio::test]
    async fn a_scan_within_its_bound_reads_every_item() {
        let storage = storage_with_items(5).await;
        assert_eq!(read_all(TableScan::new(&storage, 2, 3)).await, Ok(5));
        assert_eq!(read_all(storage.scan_table()).await, Ok(5));
        let empty = storage_with_items(0).await;
        assert_eq!(read_all(empty.scan_table()).await, Ok(0));
    }

    /// A table larger than the bound fails the scan, naming the bound, instead of ending early.
    #[tokio::test]
    async fn a_scan_past_its_bound_fails_loudly() {
        let storage = storage_with_items(5).await;
        let error = read_all(TableScan::new(&storage, 2, 2)).await.unwrap_err();
        assert_eq!(error, StorageError::ScanBoundReached { pages: 2, page_size: 2 });
        assert!(error.to_string().contains("SCAN_PAGES_MAX"), "{error}");
    }
}
