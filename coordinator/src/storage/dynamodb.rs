//! The endpoint engine: aws-sdk-dynamodb against AWS DynamoDB or any compatible server
//! (dynoxide's HTTP server, moto, DynamoDB Local), configured from the usual AWS_* environment.

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::SharedHttpClient;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::delete_item::builders::DeleteItemFluentBuilder;
use aws_sdk_dynamodb::operation::put_item::builders::PutItemFluentBuilder;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::builders::{ConditionCheckBuilder, DeleteBuilder, PutBuilder, UpdateBuilder};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableStatus, TransactWriteItem,
};
use aws_smithy_http_client::tls;

use super::translate::{Conditional, decode_item, decode_key, encode_bindings, encode_item, encode_key, engine_value};
use super::{
    Bindings, CancellationReason, Delete, Engine, Item, Key, Page, Put, Query, StorageError, StorageResult,
    TransactItem, Update,
};

/// One attempt of one request may take this long before it counts as failed; DynamoDB answers
/// in milliseconds, and the default leases are 10-25 s, so a stuck attempt gives up well before.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// All attempts of one request together, SDK retries included.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The SDK retries throttling and transient errors itself; conditional writes stay safe under
/// retry because every condition names the lease id (see docs/flow.md).
pub const SDK_ATTEMPTS_MAX: u32 = 3;

/// How long `create-tables` waits for a new table to become ACTIVE: 60 polls, 1 s apart.
const TABLE_ACTIVE_POLLS_MAX: usize = 60;
const TABLE_ACTIVE_POLL_INTERVAL: Duration = Duration::from_secs(1);

const _: () = assert!(ATTEMPT_TIMEOUT.as_millis() * SDK_ATTEMPTS_MAX as u128 >= OPERATION_TIMEOUT.as_millis());

#[derive(Debug, Clone)]
pub struct DynamoDbEngine {
    client: Client,
}

impl DynamoDbEngine {
    /// An engine from the usual AWS configuration chain (AWS_* environment, profile, instance
    /// role), with an optional endpoint and region override.
    pub async fn from_environment(endpoint: Option<&str>, region: Option<&str>) -> Self {
        // The credential providers (STS, SSO, IMDS, the container endpoint) use it too.
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(https_client());
        if let Some(endpoint) = endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region.to_owned()));
        }
        let shared = loader.load().await;
        Self::from_config(aws_sdk_dynamodb::config::Builder::from(&shared))
    }

    /// An engine for a local DynamoDB-compatible server (dynoxide, moto, DynamoDB Local) that
    /// checks no credentials: static dummy credentials, region us-east-1.
    pub fn local(endpoint: &str) -> Self {
        Self::from_config(
            aws_sdk_dynamodb::config::Builder::new()
                .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
                .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
                .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                    "local",
                    "local",
                    None,
                    None,
                    "lockstep-local",
                ))
                .http_client(https_client())
                .endpoint_url(endpoint),
        )
    }

    /// An engine from an explicit SDK configuration; Lockstep's timeouts and retries are applied.
    pub fn from_config(builder: aws_sdk_dynamodb::config::Builder) -> Self {
        let config = builder
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(SDK_ATTEMPTS_MAX))
            .build();
        Self {
            client: Client::from_conf(config),
        }
    }
}

/// The HTTP client of every AWS request (DynamoDB and the credential providers): HTTPS through
/// rustls on *ring*, certificates from the platform's roots, plain HTTP for local endpoints. The
/// SDK's default client (its `default-https-client` feature) would be the same rustls on aws-lc-rs,
/// a large C library to build; a FIPS deployment switches back (docs/deploy.md, Build time).
pub fn https_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https()
}

/// Error codes that mean "not now" rather than "no": throttling and server-side failures.
const TRANSIENT_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionInProgressException",
];

fn map_error<E, R>(error: SdkError<E, R>, old_item: impl FnOnce(&E) -> Option<Item>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match &error {
        SdkError::ServiceError(service) => {
            let inner = service.err();
            match inner.code() {
                Some("ConditionalCheckFailedException") => StorageError::ConditionFailed {
                    current: old_item(inner),
                },
                Some("TransactionConflictException") => {
                    StorageError::Conflict(inner.message().unwrap_or_default().to_owned())
                }
                Some(code) if TRANSIENT_CODES.contains(&code) => {
                    StorageError::Unavailable(format!("{code}: {}", inner.message().unwrap_or_default()))
                }
                Some(code) => StorageError::Other(format!("{code}: {}", inner.message().unwrap_or_default())),
                None => StorageError::Unavailable(format!("unrecognised error response: {:?}", service.raw())),
            }
        }
        SdkError::ConstructionFailure(_) => {
            StorageError::Other(format!("{}", aws_sdk_dynamodb::error::DisplayErrorContext(&error)))
        }
        _ => StorageError::Unavailable(format!("{}", aws_sdk_dynamodb::error::DisplayErrorContext(&error))),
    }
}

engine_value!(AttributeValue, Bool);

/// The SDK's builders of conditional requests: the same setters on each.
macro_rules! conditional_builders {
    ($($builder:ty),* $(,)?) => {$(
        impl Conditional<Option<String>> for $builder {
            fn conditional(self, table: &str, condition: Option<String>, bindings: &Bindings) -> Self {
                let (names, values) = encode_bindings(bindings);
                self.table_name(table)
                    .set_condition_expression(condition)
                    .set_expression_attribute_names(names)
                    .set_expression_attribute_values(values)
            }
        }
    )*};
}

conditional_builders!(
    PutBuilder,
    UpdateBuilder,
    DeleteBuilder,
    ConditionCheckBuilder,
    PutItemFluentBuilder,
    UpdateItemFluentBuilder,
    DeleteItemFluentBuilder,
);

fn transact_item(table: &str, item: &TransactItem) -> StorageResult<TransactWriteItem> {
    let invalid = |error: aws_sdk_dynamodb::error::BuildError| StorageError::Other(error.to_string());
    let builder = TransactWriteItem::builder();
    let builder = match item {
        TransactItem::Put(put) => builder.put(
            aws_sdk_dynamodb::types::Put::builder()
                .set_item(Some(encode_item(&put.item)))
                .conditional(table, put.condition.clone(), &put.bindings)
                .build()
                .map_err(invalid)?,
        ),
        TransactItem::Update(update) => builder.update(
            aws_sdk_dynamodb::types::Update::builder()
                .set_key(Some(encode_key(&update.key)))
                .update_expression(&update.update)
                .conditional(table, update.condition.clone(), &update.bindings)
                .build()
                .map_err(invalid)?,
        ),
        TransactItem::Delete(delete) => builder.delete(
            aws_sdk_dynamodb::types::Delete::builder()
                .set_key(Some(encode_key(&delete.key)))
                .conditional(table, delete.condition.clone(), &delete.bindings)
                .build()
                .map_err(invalid)?,
        ),
        TransactItem::ConditionCheck(check) => builder.condition_check(
            aws_sdk_dynamodb::types::ConditionCheck::builder()
                .set_key(Some(encode_key(&check.key)))
                .conditional(table, Some(check.condition.clone()), &check.bindings)
                .build()
                .map_err(invalid)?,
        ),
    };
    Ok(builder.build())
}

#[async_trait::async_trait]
impl Engine for DynamoDbEngine {
    async fn create_table(&self, table: &str) -> StorageResult<()> {
        let invalid = |error: aws_sdk_dynamodb::error::BuildError| StorageError::Other(error.to_string());
        let mut request = self
            .client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest);
        for (name, key_type) in [("pk", KeyType::Hash), ("sk", KeyType::Range)] {
            request = request
                .key_schema(
                    KeySchemaElement::builder()
                        .attribute_name(name)
                        .key_type(key_type)
                        .build()
                        .map_err(invalid)?,
                )
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(name)
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                        .map_err(invalid)?,
                );
        }
        request.send().await.map_err(|error| map_error(error, |_| None))?;
        // AWS creates tables asynchronously: wait until it is ACTIVE, so `serve` can follow.
        for _ in 0..TABLE_ACTIVE_POLLS_MAX {
            let description = self
                .client
                .describe_table()
                .table_name(table)
                .send()
                .await
                .map_err(|error| map_error(error, |_| None))?;
            if description.table().and_then(|table| table.table_status()) == Some(&TableStatus::Active) {
                return Ok(());
            }
            tokio::time::sleep(TABLE_ACTIVE_POLL_INTERVAL).await;
        }
        Err(StorageError::Unavailable(format!(
            "table {table} did not become ACTIVE"
        )))
    }

    async fn table_exists(&self, table: &str) -> StorageResult<bool> {
        match self.client.describe_table().table_name(table).send().await {
            Ok(_) => Ok(true),
            Err(error) => match map_error(error, |_| None) {
                StorageError::Other(message) if message.starts_with("ResourceNotFoundException") => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn get(&self, table: &str, key: Key) -> StorageResult<Option<Item>> {
        let response = self
            .client
            .get_item()
            .table_name(table)
            .set_key(Some(encode_key(&key)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|error| map_error(error, |_| None))?;
        Ok(response.item().map(decode_item))
    }

    async fn update(&self, table: &str, update: Update) -> StorageResult<Option<Item>> {
        let response = self
            .client
            .update_item()
            .set_key(Some(encode_key(&update.key)))
            .update_expression(update.update)
            .conditional(table, update.condition, &update.bindings)
            .set_return_values(update.return_new.then_some(ReturnValue::AllNew))
            .set_return_values_on_condition_check_failure(
                update
                    .return_old_on_condition_failure
                    .then_some(ReturnValuesOnConditionCheckFailure::AllOld),
            )
            .send()
            .await
            .map_err(|error| {
                map_error(error, |inner| match inner {
                    aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(
                        failed,
                    ) => failed.item().map(decode_item),
                    _ => None,
                })
            })?;
        Ok(response.attributes().map(decode_item))
    }

    async fn put(&self, table: &str, put: Put) -> StorageResult<()> {
        self.client
            .put_item()
            .set_item(Some(encode_item(&put.item)))
            .conditional(table, put.condition, &put.bindings)
            .send()
            .await
            .map_err(|error| map_error(error, |_| None))?;
        Ok(())
    }

    async fn delete(&self, table: &str, delete: Delete) -> StorageResult<()> {
        self.client
            .delete_item()
            .set_key(Some(encode_key(&delete.key)))
            .conditional(table, delete.condition, &delete.bindings)
            .send()
            .await
            .map_err(|error| map_error(error, |_| None))?;
        Ok(())
    }

    async fn query(&self, table: &str, query: Query) -> StorageResult<Page> {
        let mut request = self
            .client
            .query()
            .table_name(table)
            .expression_attribute_values(":pk", AttributeValue::S(query.pk.clone()))
            .scan_index_forward(!query.newest_first)
            .limit(query.limit as i32)
            .consistent_read(true)
            .set_exclusive_start_key(query.start_after.as_ref().map(encode_key));
        request = if query.sk_prefix.is_empty() {
            request.key_condition_expression("pk = :pk")
        } else {
            request
                .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                .expression_attribute_values(":prefix", AttributeValue::S(query.sk_prefix.clone()))
        };
        let response = request.send().await.map_err(|error| map_error(error, |_| None))?;
        Ok(Page {
            items: response.items().iter().map(decode_item).collect(),
            last_key: response.last_evaluated_key().and_then(decode_key),
        })
    }

    async fn scan(&self, table: &str, limit: u32, start_after: Option<Key>) -> StorageResult<Page> {
        let response = self
            .client
            .scan()
            .table_name(table)
            .limit(limit as i32)
            .consistent_read(true)
            .set_exclusive_start_key(start_after.as_ref().map(encode_key))
            .send()
            .await
            .map_err(|error| map_error(error, |_| None))?;
        Ok(Page {
            items: response.items().iter().map(decode_item).collect(),
            last_key: response.last_evaluated_key().and_then(decode_key),
        })
    }

    async fn enable_ttl(&self, table: &str, attribute: &str) -> StorageResult<()> {
        let specification = aws_sdk_dynamodb::types::TimeToLiveSpecification::builder()
            .attribute_name(attribute)
            .enabled(true)
            .build()
            .map_err(|error| StorageError::Other(error.to_string()))?;
        self.client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(specification)
            .send()
            .await
            .map_err(|error| map_error(error, |_| None))?;
        Ok(())
    }

    async fn transact(&self, table: &str, items: &[TransactItem], token: Option<String>) -> StorageResult<()> {
        let items = items
            .iter()
            .map(|item| transact_item(table, item))
            .collect::<StorageResult<Vec<_>>>()?;
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .set_client_request_token(token)
            .send()
            .await;
        let error = match result {
            Ok(_) => return Ok(()),
            Err(error) => error,
        };
        if let SdkError::ServiceError(service) = &error
            && let TransactWriteItemsError::TransactionCanceledException(canceled) = service.err()
        {
            return Err(StorageError::TransactionCanceled {
                reasons: canceled
                    .cancellation_reasons()
                    .iter()
                    .map(|reason| CancellationReason {
                        code: reason.code().unwrap_or("None").to_owned(),
                    })
                    .collect(),
            });
        }
        Err(map_error(error, |_| None))
    }
}
