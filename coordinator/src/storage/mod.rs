//! Storage: one DynamoDB data model, two engines.
//!
//! `model` builds every request Lockstep sends (keys, condition and update expressions) in one
//! place, as engine-neutral values. An engine only translates them: `embedded` calls dynoxide
//! (DynamoDB on SQLite) in-process, `dynamodb` sends them through aws-sdk-dynamodb to AWS or any
//! compatible endpoint. `Storage` wraps the engine and counts requests, which is how tests hold
//! the money path to its budget of two requests per successful mutation.

pub mod dynamodb;
pub mod embedded;
pub mod faults;
pub mod model;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
    async fn transact(&self, table: &str, items: Vec<TransactItem>, token: Option<String>) -> StorageResult<()>;
}

/// The table and engine the coordinator uses, with a count of every request sent.
#[derive(Debug, Clone)]
pub struct Storage {
    engine: Arc<dyn Engine>,
    table: Arc<str>,
    requests: Arc<AtomicU64>,
}

impl Storage {
    pub fn new(engine: Arc<dyn Engine>, table: impl Into<Arc<str>>) -> Self {
        Self {
            engine,
            table: table.into(),
            requests: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
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
        self.count();
        self.engine.create_table(&self.table).await?;
        self.count();
        self.engine.enable_ttl(&self.table, model::TTL_ATTRIBUTE).await
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
        match self.engine.table_exists(&self.table).await? {
            true => Ok(()),
            false => Err(StorageError::Other(format!("table {} does not exist", self.table))),
        }
    }

    pub async fn table_exists(&self) -> StorageResult<bool> {
        self.count();
        self.engine.table_exists(&self.table).await
    }

    pub async fn get(&self, key: Key) -> StorageResult<Option<Item>> {
        self.count();
        self.engine.get(&self.table, key).await
    }

    pub async fn update(&self, update: Update) -> StorageResult<Option<Item>> {
        self.count();
        self.engine.update(&self.table, update).await
    }

    pub async fn put(&self, put: Put) -> StorageResult<()> {
        self.count();
        self.engine.put(&self.table, put).await
    }

    pub async fn delete(&self, delete: Delete) -> StorageResult<()> {
        self.count();
        self.engine.delete(&self.table, delete).await
    }

    pub async fn query(&self, query: Query) -> StorageResult<Page> {
        self.count();
        self.engine.query(&self.table, query).await
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

    pub async fn scan(&self, limit: u32, start_after: Option<Key>) -> StorageResult<Page> {
        self.count();
        self.engine.scan(&self.table, limit, start_after).await
    }

    pub async fn transact(&self, items: Vec<TransactItem>, token: Option<String>) -> StorageResult<()> {
        self.count();
        self.engine.transact(&self.table, items, token).await
    }
}
