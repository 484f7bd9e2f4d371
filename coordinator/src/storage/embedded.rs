//! The embedded engine: dynoxide (DynamoDB on SQLite) in-process, file-backed, through its
//! library API.
//!
//! dynoxide serves every call synchronously behind one global mutex, so each call runs on
//! tokio's blocking pool and never stalls an async worker. Its TransactWriteItems is one SQLite
//! transaction; dynoxide opens the file in WAL mode and leaves SQLite's default synchronous=FULL
//! (Lockstep never calls its bulk-loading mode, which turns syncing off), so an acknowledged
//! commit survives `kill -9` (tests/end_to_end/durability.rs).
//!
//! One process at a time opens a data dir: the engine holds an exclusive lock on
//! `<data-dir>/LOCK` for its life ([`LOCK_FILE`]), so a second coordinator or an offline operator
//! command (`restore` above all) on a live data dir is refused instead of writing beside it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use dynoxide::Database;
use dynoxide::actions::{
    create_table::CreateTableRequest,
    delete_item::DeleteItemRequest,
    describe_table::DescribeTableRequest,
    get_item::GetItemRequest,
    put_item::PutItemRequest,
    query::QueryRequest,
    scan::ScanRequest,
    transact_write_items::{
        TransactConditionCheck, TransactDelete, TransactPut, TransactUpdate, TransactWriteItem,
        TransactWriteItemsRequest,
    },
    update_item::UpdateItemRequest,
    update_time_to_live::UpdateTimeToLiveRequest,
};
use dynoxide::errors::DynoxideError;
use dynoxide::types::AttributeValue;

use super::translate::{Conditional, decode_item, decode_key, encode_bindings, encode_item, encode_key, engine_value};
use super::{
    Bindings, CancellationReason, Delete, Engine, Item, Key, Page, Put, Query, StorageError, StorageResult,
    TransactItem, Update,
};

/// The SQLite file inside the data directory.
pub const DATABASE_FILE: &str = "lockstep.sqlite3";
/// The lock file inside the data directory: whoever opened the store holds an exclusive `flock`
/// on it until it exits (the OS drops the lock of a process that dies, even by `kill -9`).
pub const LOCK_FILE: &str = "LOCK";

#[derive(Clone)]
pub struct EmbeddedEngine {
    database: Database,
    /// The data directory's lock, held as long as any clone of the engine lives; None in memory.
    _lock: Option<Arc<DataDirLock>>,
}

/// The exclusive lock on a data directory. SQLite alone lets two processes open the same file,
/// so without it a second coordinator would serve the same accounts beside the first (each
/// trusting its own known-account versions and group commits), and `coordinator restore` would
/// replace the store under a running coordinator, rolling the live service back.
#[derive(Debug)]
struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    /// Takes the lock on `data_dir` without waiting, and writes this process's id into the file
    /// for whoever is refused next. The error names the directory and the holder.
    fn acquire(data_dir: &Path) -> StorageResult<Self> {
        use std::io::{Read, Seek, Write};
        let path = data_dir.join(LOCK_FILE);
        let mut file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|error| StorageError::Other(format!("cannot open {}: {error}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                file.read_to_string(&mut holder).ok();
                let holder = match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (process {pid})"),
                };
                return Err(StorageError::Other(format!(
                    "data dir {} is in use: another coordinator{holder} holds its lock {}; stop it first, or give \
                     operator commands --server to reach it",
                    data_dir.display(),
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(StorageError::Other(format!("cannot lock {}: {error}", path.display())));
            }
        }
        // Only informative: the lock is the flock, not these bytes.
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "cannot write the process id into the lock file");
        }
        Ok(Self { _file: file })
    }
}

impl std::fmt::Debug for EmbeddedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedEngine").finish_non_exhaustive()
    }
}

impl EmbeddedEngine {
    /// Opens (or creates) the database file under `data_dir`, and holds the directory's lock for
    /// as long as the engine (any clone of it) lives: refused while another process, or another
    /// engine of this one, has it open.
    pub fn open(data_dir: &Path) -> StorageResult<Self> {
        std::fs::create_dir_all(data_dir)
            .map_err(|error| StorageError::Other(format!("cannot create data dir {}: {error}", data_dir.display())))?;
        let lock = DataDirLock::acquire(data_dir)?;
        let path = data_dir.join(DATABASE_FILE);
        let path = path
            .to_str()
            .ok_or_else(|| StorageError::Other(format!("data dir is not UTF-8: {}", path.display())))?;
        let database = Database::new(path).map_err(map_error)?;
        Ok(Self {
            database,
            _lock: Some(Arc::new(lock)),
        })
    }

    /// An in-memory database, for tests that need no durability.
    pub fn in_memory() -> StorageResult<Self> {
        Ok(Self {
            database: Database::memory().map_err(map_error)?,
            _lock: None,
        })
    }

    /// The dynoxide handle, to serve the same database over HTTP.
    pub fn database(&self) -> Database {
        self.database.clone()
    }

    async fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> dynoxide::Result<T> + Send + 'static,
    ) -> StorageResult<T> {
        let database = self.database.clone();
        tokio::task::spawn_blocking(move || work(&database))
            .await
            .map_err(|error| StorageError::Unavailable(format!("embedded storage task failed: {error}")))?
            .map_err(map_error)
    }
}

fn map_error(error: DynoxideError) -> StorageError {
    match error {
        DynoxideError::ConditionalCheckFailedException(_, item) => StorageError::ConditionFailed {
            current: item.map(|item| decode_item(&item)),
        },
        DynoxideError::TransactionCanceledException(_, reasons) => StorageError::TransactionCanceled {
            reasons: reasons
                .into_iter()
                .map(|reason| CancellationReason { code: reason.code })
                .collect(),
        },
        DynoxideError::ProvisionedThroughputExceededException(message)
        | DynoxideError::InternalServerError(message) => StorageError::Unavailable(message),
        DynoxideError::SqliteError(error) => StorageError::Unavailable(error.to_string()),
        DynoxideError::ResourceNotFoundException(message) => {
            StorageError::Other(format!("{TABLE_NOT_FOUND}: {message}"))
        }
        other => StorageError::Other(other.to_string()),
    }
}

const TABLE_NOT_FOUND: &str = "ResourceNotFoundException";

engine_value!(AttributeValue, BOOL);

/// dynoxide's conditional requests: structs whose condition and binding fields share names.
macro_rules! conditional_requests {
    ($condition:ty => $($request:ty),* $(,)?) => {$(
        impl Conditional<$condition> for $request {
            fn conditional(mut self, table: &str, condition: $condition, bindings: &Bindings) -> Self {
                let (names, values) = encode_bindings(bindings);
                self.table_name = table.to_owned();
                self.condition_expression = condition;
                self.expression_attribute_names = names;
                self.expression_attribute_values = values;
                self
            }
        }
    )*};
}

conditional_requests!(Option<String> => PutItemRequest, UpdateItemRequest, DeleteItemRequest, TransactPut, TransactUpdate, TransactDelete);
conditional_requests!(String => TransactConditionCheck);

fn transact_item(table: &str, item: &TransactItem) -> TransactWriteItem {
    match item {
        TransactItem::Put(put) => TransactWriteItem {
            put: Some(
                TransactPut {
                    item: encode_item(&put.item),
                    ..Default::default()
                }
                .conditional(table, put.condition.clone(), &put.bindings),
            ),
            ..Default::default()
        },
        TransactItem::Update(update) => TransactWriteItem {
            update: Some(
                TransactUpdate {
                    key: encode_key(&update.key),
                    update_expression: update.update.clone(),
                    ..Default::default()
                }
                .conditional(table, update.condition.clone(), &update.bindings),
            ),
            ..Default::default()
        },
        TransactItem::Delete(delete) => TransactWriteItem {
            delete: Some(
                TransactDelete {
                    key: encode_key(&delete.key),
                    ..Default::default()
                }
                .conditional(table, delete.condition.clone(), &delete.bindings),
            ),
            ..Default::default()
        },
        TransactItem::ConditionCheck(check) => TransactWriteItem {
            condition_check: Some(
                TransactConditionCheck {
                    key: encode_key(&check.key),
                    ..Default::default()
                }
                .conditional(table, check.condition.clone(), &check.bindings),
            ),
            ..Default::default()
        },
    }
}

#[async_trait::async_trait]
impl Engine for EmbeddedEngine {
    async fn create_table(&self, table: &str) -> StorageResult<()> {
        let request: CreateTableRequest = serde_json::from_value(serde_json::json!({
            "TableName": table,
            "KeySchema": [
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"}
            ],
            "AttributeDefinitions": [
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"}
            ],
            "BillingMode": "PAY_PER_REQUEST"
        }))
        .map_err(|error| StorageError::Other(error.to_string()))?;
        self.call(move |database| database.create_table(request).map(drop))
            .await
    }

    async fn table_exists(&self, table: &str) -> StorageResult<bool> {
        let request = DescribeTableRequest {
            table_name: table.to_owned(),
        };
        match self.call(move |database| database.describe_table(request)).await {
            Ok(_) => Ok(true),
            Err(StorageError::Other(message)) if message.starts_with(TABLE_NOT_FOUND) => Ok(false),
            Err(error) => Err(error),
        }
    }

    async fn get(&self, table: &str, key: Key) -> StorageResult<Option<Item>> {
        let request = GetItemRequest {
            table_name: table.to_owned(),
            key: encode_key(&key),
            consistent_read: Some(true),
            ..Default::default()
        };
        let response = self.call(move |database| database.get_item(request)).await?;
        Ok(response.item.as_ref().map(decode_item))
    }

    async fn update(&self, table: &str, update: Update) -> StorageResult<Option<Item>> {
        let request = UpdateItemRequest {
            key: encode_key(&update.key),
            update_expression: Some(update.update),
            return_values: update.return_new.then(|| "ALL_NEW".to_owned()),
            return_values_on_condition_check_failure: update
                .return_old_on_condition_failure
                .then(|| "ALL_OLD".to_owned()),
            ..Default::default()
        }
        .conditional(table, update.condition, &update.bindings);
        let response = self.call(move |database| database.update_item(request)).await?;
        Ok(response.attributes.as_ref().map(decode_item))
    }

    async fn put(&self, table: &str, put: Put) -> StorageResult<()> {
        let request = PutItemRequest {
            item: encode_item(&put.item),
            ..Default::default()
        }
        .conditional(table, put.condition, &put.bindings);
        self.call(move |database| database.put_item(request).map(drop)).await
    }

    async fn delete(&self, table: &str, delete: Delete) -> StorageResult<()> {
        let request = DeleteItemRequest {
            key: encode_key(&delete.key),
            ..Default::default()
        }
        .conditional(table, delete.condition, &delete.bindings);
        self.call(move |database| database.delete_item(request).map(drop)).await
    }

    async fn query(&self, table: &str, query: Query) -> StorageResult<Page> {
        let mut values = HashMap::from([(":pk".to_owned(), AttributeValue::S(query.pk.clone()))]);
        let mut condition = "pk = :pk".to_owned();
        if !query.sk_prefix.is_empty() {
            condition.push_str(" AND begins_with(sk, :prefix)");
            values.insert(":prefix".to_owned(), AttributeValue::S(query.sk_prefix.clone()));
        }
        let request = QueryRequest {
            table_name: table.to_owned(),
            key_condition_expression: Some(condition),
            expression_attribute_values: Some(values),
            scan_index_forward: !query.newest_first,
            limit: Some(query.limit as usize),
            exclusive_start_key: query.start_after.as_ref().map(encode_key),
            consistent_read: Some(true),
            ..Default::default()
        };
        let response = self.call(move |database| database.query(request)).await?;
        Ok(Page {
            items: response.items.unwrap_or_default().iter().map(decode_item).collect(),
            last_key: response.last_evaluated_key.as_ref().and_then(decode_key),
        })
    }

    async fn scan(&self, table: &str, limit: u32, start_after: Option<Key>) -> StorageResult<Page> {
        let request = ScanRequest {
            table_name: table.to_owned(),
            limit: Some(limit as usize),
            exclusive_start_key: start_after.as_ref().map(encode_key),
            consistent_read: Some(true),
            ..Default::default()
        };
        let response = self.call(move |database| database.scan(request)).await?;
        Ok(Page {
            items: response.items.unwrap_or_default().iter().map(decode_item).collect(),
            last_key: response.last_evaluated_key.as_ref().and_then(decode_key),
        })
    }

    /// dynoxide stores the TTL setting but never deletes expired items by itself; Lockstep's
    /// sweeper deletes expired request records on every engine (service::sweep).
    async fn enable_ttl(&self, table: &str, attribute: &str) -> StorageResult<()> {
        let request: UpdateTimeToLiveRequest = serde_json::from_value(serde_json::json!({
            "TableName": table,
            "TimeToLiveSpecification": {"AttributeName": attribute, "Enabled": true}
        }))
        .map_err(|error| StorageError::Other(error.to_string()))?;
        self.call(move |database| database.update_time_to_live(request).map(drop))
            .await
    }

    /// The idempotency token is not passed on: dynoxide keeps tokens in memory only (lost with
    /// the process) and scans its whole cache on every call that carries one, so each commit
    /// would cost O(commits in the last 10 minutes) and the cache would grow without bound under
    /// load. Lockstep's correctness never rests on it (see docs/recovery.md).
    async fn transact(&self, table: &str, items: &[TransactItem], _token: Option<String>) -> StorageResult<()> {
        let request = TransactWriteItemsRequest {
            transact_items: items.iter().map(|item| transact_item(table, item)).collect(),
            client_request_token: None,
            ..Default::default()
        };
        self.call(move |database| database.transact_write_items(request).map(drop))
            .await
    }

    /// SQLite's `VACUUM INTO` through dynoxide: one read transaction, so the copy is consistent
    /// as of one instant (every commit acknowledged before it, none after). It runs under
    /// dynoxide's mutex, so writes wait for it: about a second per 100 MB on this machine.
    async fn backup(&self, path: &Path) -> StorageResult<()> {
        let path = path
            .to_str()
            .ok_or_else(|| StorageError::Other(format!("backup path is not UTF-8: {}", path.display())))?
            .to_owned();
        if Path::new(&path).exists() {
            return Err(StorageError::Other(format!(
                "{path} exists already; a backup never overwrites"
            )));
        }
        self.call(move |database| database.vacuum_into(&path)).await
    }
}

impl EmbeddedEngine {
    /// Replaces this database's contents with the backup at `path` (SQLite's backup API through
    /// dynoxide). For `coordinator restore`, with the coordinator stopped.
    pub async fn restore_from(&self, path: &Path) -> StorageResult<()> {
        let path = path
            .to_str()
            .ok_or_else(|| StorageError::Other(format!("backup path is not UTF-8: {}", path.display())))?
            .to_owned();
        self.call(move |database| database.restore_from(&path)).await
    }
}
