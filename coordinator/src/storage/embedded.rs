//! The embedded engine: dynoxide (DynamoDB on SQLite) in-process, file-backed, through its
//! library API.
//!
//! dynoxide serves every call synchronously behind one global mutex, so each call runs on
//! tokio's blocking pool and never stalls an async worker. Its TransactWriteItems is one SQLite
//! transaction; dynoxide opens the file in WAL mode and leaves SQLite's default synchronous=FULL
//! (Lockstep never calls its bulk-loading mode, which turns syncing off), so an acknowledged
//! commit survives `kill -9` (tests/end_to_end/durability.rs).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

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

use super::{
    Bindings, CancellationReason, Delete, Engine, Item, Key, Page, Put, Query, StorageError, StorageResult,
    TransactItem, Update, Value,
};

/// The SQLite file inside the data directory.
pub const DATABASE_FILE: &str = "lockstep.sqlite3";

#[derive(Clone)]
pub struct EmbeddedEngine {
    database: Database,
}

impl std::fmt::Debug for EmbeddedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedEngine").finish_non_exhaustive()
    }
}

impl EmbeddedEngine {
    /// Opens (or creates) the database file under `data_dir`.
    pub fn open(data_dir: &Path) -> StorageResult<Self> {
        std::fs::create_dir_all(data_dir)
            .map_err(|error| StorageError::Other(format!("cannot create data dir {}: {error}", data_dir.display())))?;
        let path = data_dir.join(DATABASE_FILE);
        let path = path
            .to_str()
            .ok_or_else(|| StorageError::Other(format!("data dir is not UTF-8: {}", path.display())))?;
        let database = Database::new(path).map_err(map_error)?;
        Ok(Self { database })
    }

    /// An in-memory database, for tests that need no durability.
    pub fn in_memory() -> StorageResult<Self> {
        Ok(Self {
            database: Database::memory().map_err(map_error)?,
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
            current: item.map(|item| from_item(&item)),
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

fn to_value(value: &Value) -> AttributeValue {
    match value {
        Value::S(text) => AttributeValue::S(text.clone()),
        Value::N(number) => AttributeValue::N(number.clone()),
        Value::Bool(flag) => AttributeValue::BOOL(*flag),
        Value::M(map) => AttributeValue::M(map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect()),
    }
}

/// Attribute types Lockstep never writes are dropped: they cannot be part of its items.
fn from_value(value: &AttributeValue) -> Option<Value> {
    Some(match value {
        AttributeValue::S(text) => Value::S(text.clone()),
        AttributeValue::N(number) => Value::N(number.clone()),
        AttributeValue::BOOL(flag) => Value::Bool(*flag),
        AttributeValue::M(map) => Value::M(
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), from_value(v)?)))
                .collect(),
        ),
        _ => return None,
    })
}

fn to_item(item: &Item) -> HashMap<String, AttributeValue> {
    item.iter().map(|(k, v)| (k.clone(), to_value(v))).collect()
}

fn from_item(item: &HashMap<String, AttributeValue>) -> Item {
    item.iter()
        .filter_map(|(k, v)| Some((k.clone(), from_value(v)?)))
        .collect::<BTreeMap<_, _>>()
}

fn to_key(key: &Key) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("pk".to_owned(), AttributeValue::S(key.pk.clone())),
        ("sk".to_owned(), AttributeValue::S(key.sk.clone())),
    ])
}

fn from_key(item: &HashMap<String, AttributeValue>) -> Option<Key> {
    match (item.get("pk"), item.get("sk")) {
        (Some(AttributeValue::S(pk)), Some(AttributeValue::S(sk))) => Some(Key {
            pk: pk.clone(),
            sk: sk.clone(),
        }),
        _ => None,
    }
}

type Names = Option<HashMap<String, String>>;
type Values = Option<HashMap<String, AttributeValue>>;

fn to_bindings(bindings: &Bindings) -> (Names, Values) {
    let names = (!bindings.names.is_empty()).then(|| bindings.names.clone().into_iter().collect());
    let values =
        (!bindings.values.is_empty()).then(|| bindings.values.iter().map(|(k, v)| (k.clone(), to_value(v))).collect());
    (names, values)
}

fn transact_item(table: &str, item: TransactItem) -> TransactWriteItem {
    match item {
        TransactItem::Put(put) => {
            let (names, values) = to_bindings(&put.bindings);
            TransactWriteItem {
                put: Some(TransactPut {
                    table_name: table.to_owned(),
                    item: to_item(&put.item),
                    condition_expression: put.condition,
                    expression_attribute_names: names,
                    expression_attribute_values: values,
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
        TransactItem::Update(update) => {
            let (names, values) = to_bindings(&update.bindings);
            TransactWriteItem {
                update: Some(TransactUpdate {
                    table_name: table.to_owned(),
                    key: to_key(&update.key),
                    update_expression: update.update,
                    condition_expression: update.condition,
                    expression_attribute_names: names,
                    expression_attribute_values: values,
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
        TransactItem::Delete(delete) => {
            let (names, values) = to_bindings(&delete.bindings);
            TransactWriteItem {
                delete: Some(TransactDelete {
                    table_name: table.to_owned(),
                    key: to_key(&delete.key),
                    condition_expression: delete.condition,
                    expression_attribute_names: names,
                    expression_attribute_values: values,
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
        TransactItem::ConditionCheck(check) => {
            let (names, values) = to_bindings(&check.bindings);
            TransactWriteItem {
                condition_check: Some(TransactConditionCheck {
                    table_name: table.to_owned(),
                    key: to_key(&check.key),
                    condition_expression: check.condition,
                    expression_attribute_names: names,
                    expression_attribute_values: values,
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
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
            key: to_key(&key),
            consistent_read: Some(true),
            ..Default::default()
        };
        let response = self.call(move |database| database.get_item(request)).await?;
        Ok(response.item.as_ref().map(from_item))
    }

    async fn update(&self, table: &str, update: Update) -> StorageResult<Option<Item>> {
        let (names, values) = to_bindings(&update.bindings);
        let request = UpdateItemRequest {
            table_name: table.to_owned(),
            key: to_key(&update.key),
            update_expression: Some(update.update),
            condition_expression: update.condition,
            expression_attribute_names: names,
            expression_attribute_values: values,
            return_values: update.return_new.then(|| "ALL_NEW".to_owned()),
            return_values_on_condition_check_failure: update
                .return_old_on_condition_failure
                .then(|| "ALL_OLD".to_owned()),
            ..Default::default()
        };
        let response = self.call(move |database| database.update_item(request)).await?;
        Ok(response.attributes.as_ref().map(from_item))
    }

    async fn put(&self, table: &str, put: Put) -> StorageResult<()> {
        let (names, values) = to_bindings(&put.bindings);
        let request = PutItemRequest {
            table_name: table.to_owned(),
            item: to_item(&put.item),
            condition_expression: put.condition,
            expression_attribute_names: names,
            expression_attribute_values: values,
            ..Default::default()
        };
        self.call(move |database| database.put_item(request).map(drop)).await
    }

    async fn delete(&self, table: &str, delete: Delete) -> StorageResult<()> {
        let (names, values) = to_bindings(&delete.bindings);
        let request = DeleteItemRequest {
            table_name: table.to_owned(),
            key: to_key(&delete.key),
            condition_expression: delete.condition,
            expression_attribute_names: names,
            expression_attribute_values: values,
            ..Default::default()
        };
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
            exclusive_start_key: query.start_after.as_ref().map(to_key),
            consistent_read: Some(true),
            ..Default::default()
        };
        let response = self.call(move |database| database.query(request)).await?;
        Ok(Page {
            items: response.items.unwrap_or_default().iter().map(from_item).collect(),
            last_key: response.last_evaluated_key.as_ref().and_then(from_key),
        })
    }

    async fn scan(&self, table: &str, limit: u32, start_after: Option<Key>) -> StorageResult<Page> {
        let request = ScanRequest {
            table_name: table.to_owned(),
            limit: Some(limit as usize),
            exclusive_start_key: start_after.as_ref().map(to_key),
            consistent_read: Some(true),
            ..Default::default()
        };
        let response = self.call(move |database| database.scan(request)).await?;
        Ok(Page {
            items: response.items.unwrap_or_default().iter().map(from_item).collect(),
            last_key: response.last_evaluated_key.as_ref().and_then(from_key),
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
    async fn transact(&self, table: &str, items: Vec<TransactItem>, _token: Option<String>) -> StorageResult<()> {
        let request = TransactWriteItemsRequest {
            transact_items: items.into_iter().map(|item| transact_item(table, item)).collect(),
            client_request_token: None,
            ..Default::default()
        };
        self.call(move |database| database.transact_write_items(request).map(drop))
            .await
    }
}
