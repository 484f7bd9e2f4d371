//! The design's own flow (docs/design-baseline.md), as a simple client
//! talking DIRECTLY to a DynamoDB endpoint, for comparison with Lockstep on the same server:
//!
//! 1. acquire the user's lock: a conditional put of `LOCK#<user>` (absent, or expired);
//! 2. read the balance (and the holding, for a trade);
//! 3. write: for a trade, the order PENDING, then cash and holding, a transaction record, the
//!    order CONFIRMED; for cash, the balance and a transaction record;
//! 4. release the lock: a delete conditional on the lock id.
//!
//! As the design says, a lock that exists is refused at once ("Operation in progress, please try
//! again", reported here as `BUSY`) and not retried: the design leaves retries to the user. Only
//! network errors are retried, with the SDK's exponential backoff. Each step is its own request
//! with no fencing and no atomicity between them; that is the design's, not a shortcut here.
//!
//! Requests per operation (counted by this client, SDK retries aside): a deposit or withdrawal is
//! 5 (lock, read, balance, record, release), a buy or sell 9 (lock, two reads, order, cash,
//! holding, record, confirm, release); a refusal for funds is 3 or 4; a busy refusal is 1.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};

use crate::BenchError;
use crate::workload::{Operation, TRADE_PRICE_CENTS, TRADE_QUANTITY_THOUSANDTHS};

/// The design's lock timeouts (LOCK_TIMEOUTS), seconds.
const LOCK_TIMEOUT_DEPOSIT_SECONDS: u64 = 10;
const LOCK_TIMEOUT_WITHDRAW_SECONDS: u64 = 15;
const LOCK_TIMEOUT_TRADE_SECONDS: u64 = 25;

/// Amounts of the default mix in cents (workload's DEPOSIT_AMOUNT_USD and WITHDRAW_AMOUNT_USD).
const DEPOSIT_CENTS: i64 = 5_000;
const WITHDRAW_CENTS: i64 = 3_100;
/// A trade's value, rounded down to the cent.
const TRADE_CENTS: i64 = TRADE_PRICE_CENTS * TRADE_QUANTITY_THOUSANDTHS / 1000;

/// The SDK's attempts per request: the design retries network errors with exponential backoff.
const SDK_ATTEMPTS_MAX: u32 = 3;
const SDK_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// How an operation of the design's flow ended.
pub mod outcome {
    pub const OK: &str = "OK";
    /// The lock was held: "Operation in progress, please try again".
    pub const BUSY: &str = "BUSY";
    /// Insufficient balance or holding.
    pub const FAILED_PRECONDITION: &str = "FAILED_PRECONDITION";
    /// A storage error: "Service temporarily unavailable".
    pub const UNAVAILABLE: &str = "UNAVAILABLE";
}

#[derive(Debug)]
pub struct Baseline {
    client: Client,
    table: String,
    requests: AtomicU64,
}

type Item = HashMap<String, AttributeValue>;

fn string(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn number(value: i64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn read_number(item: Option<&Item>, name: &str) -> i64 {
    item.and_then(|item| item.get(name))
        .and_then(|value| value.as_n().ok())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// A storage step failed: the flow stops, releases what it holds and reports UNAVAILABLE.
#[derive(Debug)]
struct StepFailed;

impl Baseline {
    /// A client for a local DynamoDB-compatible endpoint (dummy credentials, us-east-1).
    pub fn local(endpoint: &str, table: &str) -> Baseline {
        let config = aws_sdk_dynamodb::config::Builder::new()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "local",
                "local",
                None,
                None,
                "lockstep-bench",
            ))
            // The SDK's default client is off (Cargo.toml): rustls on *ring*, as the coordinator's.
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(Provider::Rustls(CryptoMode::Ring))
                    .build_https(),
            )
            .endpoint_url(endpoint)
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(SDK_OPERATION_TIMEOUT)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(SDK_ATTEMPTS_MAX))
            .build();
        Baseline {
            client: Client::from_conf(config),
            table: table.to_owned(),
            requests: AtomicU64::new(0),
        }
    }

    /// Requests this client has sent to storage since it was made.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Creates the baseline's own table (key `pk`, on demand) unless it exists.
    pub async fn ensure_table(&self) -> Result<(), BenchError> {
        let definition = AttributeDefinition::builder()
            .attribute_name("pk")
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(|error| BenchError::Setup(error.to_string()))?;
        let key = KeySchemaElement::builder()
            .attribute_name("pk")
            .key_type(KeyType::Hash)
            .build()
            .map_err(|error| BenchError::Setup(error.to_string()))?;
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(definition)
            .key_schema(key)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|error| error.is_resource_in_use_exception()) =>
            {
                Ok(())
            }
            Err(error) => Err(BenchError::Setup(format!(
                "create table {}: {}",
                self.table,
                aws_sdk_dynamodb::error::DisplayErrorContext(&error)
            ))),
        }
    }

    /// Funds `user`: cash in cents and a holding in thousandths. Not counted.
    pub async fn fund(&self, user: &str, cash_cents: i64, quantity_thousandths: i64) -> Result<(), BenchError> {
        let writes = [
            (format!("BALANCE#{user}"), "cash_cents", cash_cents),
            (format!("HOLDING#{user}"), "quantity_thousandths", quantity_thousandths),
        ];
        for (key, name, value) in writes {
            self.client
                .put_item()
                .table_name(&self.table)
                .item("pk", string(key))
                .item(name, number(value))
                .send()
                .await
                .map_err(|error| {
                    BenchError::Setup(format!(
                        "fund {user}: {}",
                        aws_sdk_dynamodb::error::DisplayErrorContext(&error)
                    ))
                })?;
        }
        Ok(())
    }

    /// Runs one operation of the design's flow and returns how it ended (see [`outcome`]).
    pub async fn call(&self, user: &str, operation: Operation) -> &'static str {
        let lock_id = uuid::Uuid::new_v4().simple().to_string();
        let timeout = match operation {
            Operation::Deposit => LOCK_TIMEOUT_DEPOSIT_SECONDS,
            Operation::Withdraw => LOCK_TIMEOUT_WITHDRAW_SECONDS,
            Operation::Buy | Operation::Sell => LOCK_TIMEOUT_TRADE_SECONDS,
            Operation::Transfer => unreachable!("the plan refuses the baseline with transfers"),
        };
        match self.acquire(user, &lock_id, operation, timeout).await {
            Ok(true) => {}
            Ok(false) => return outcome::BUSY,
            Err(StepFailed) => return outcome::UNAVAILABLE,
        }
        let ended = self.execute(user, operation).await;
        let released = self.release(user, &lock_id).await;
        match (ended, released) {
            (Ok(outcome), Ok(())) => outcome,
            _ => outcome::UNAVAILABLE,
        }
    }

    /// `true` when the lock is ours, `false` when another holds it and it has not expired.
    async fn acquire(
        &self,
        user: &str,
        lock_id: &str,
        operation: Operation,
        timeout_seconds: u64,
    ) -> Result<bool, StepFailed> {
        self.count();
        let now = now_seconds();
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", string(format!("LOCK#{user}")))
            .item("lock_id", string(lock_id))
            .item("operation", string(operation.name()))
            .item("expires_at", number((now + timeout_seconds) as i64))
            .condition_expression("attribute_not_exists(pk) OR expires_at < :now")
            .expression_attribute_values(":now", number(now as i64))
            .send()
            .await;
        match put {
            Ok(_) => Ok(true),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|error| error.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(_) => Err(StepFailed),
        }
    }

    async fn release(&self, user: &str, lock_id: &str) -> Result<(), StepFailed> {
        self.count();
        self.client
            .delete_item()
            .table_name(&self.table)
            .key("pk", string(format!("LOCK#{user}")))
            .condition_expression("lock_id = :lock_id")
            .expression_attribute_values(":lock_id", string(lock_id))
            .send()
            .await
            .map(drop)
            .map_err(|_| StepFailed)
    }

    async fn get(&self, key: String) -> Result<Option<Item>, StepFailed> {
        self.count();
        self.client
            .get_item()
            .table_name(&self.table)
            .key("pk", string(key))
            .consistent_read(true)
            .send()
            .await
            .map(|output| output.item)
            .map_err(|_| StepFailed)
    }

    async fn put(&self, item: Item) -> Result<(), StepFailed> {
        self.count();
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map(drop)
            .map_err(|_| StepFailed)
    }

    async fn record(&self, user: &str, kind: &str, cash_delta: i64) -> Result<(), StepFailed> {
        let transaction = uuid::Uuid::new_v4().simple();
        self.put(Item::from([
            ("pk".to_owned(), string(format!("TRANSACTION#{transaction}"))),
            ("user_id".to_owned(), string(user)),
            ("kind".to_owned(), string(kind)),
            ("cash_delta_cents".to_owned(), number(cash_delta)),
        ]))
        .await
    }

    async fn set_number(&self, key: String, name: &str, value: i64) -> Result<(), StepFailed> {
        self.put(Item::from([
            ("pk".to_owned(), string(key)),
            (name.to_owned(), number(value)),
        ]))
        .await
    }

    /// Validate, then write, under the lock.
    async fn execute(&self, user: &str, operation: Operation) -> Result<&'static str, StepFailed> {
        let balance_key = format!("BALANCE#{user}");
        let cash = read_number(self.get(balance_key.clone()).await?.as_ref(), "cash_cents");
        let cash_delta = match operation {
            Operation::Deposit => DEPOSIT_CENTS,
            Operation::Withdraw => -WITHDRAW_CENTS,
            Operation::Buy => -TRADE_CENTS,
            Operation::Sell => TRADE_CENTS,
            Operation::Transfer => unreachable!("the plan refuses the baseline with transfers"),
        };
        if let Operation::Deposit | Operation::Withdraw = operation {
            if cash + cash_delta < 0 {
                return Ok(outcome::FAILED_PRECONDITION);
            }
            self.set_number(balance_key, "cash_cents", cash + cash_delta).await?;
            self.record(user, operation.name(), cash_delta).await?;
            return Ok(outcome::OK);
        }
        let holding_key = format!("HOLDING#{user}");
        let holding = read_number(self.get(holding_key.clone()).await?.as_ref(), "quantity_thousandths");
        let quantity_delta = if operation == Operation::Buy {
            TRADE_QUANTITY_THOUSANDTHS
        } else {
            -TRADE_QUANTITY_THOUSANDTHS
        };
        if cash + cash_delta < 0 || holding + quantity_delta < 0 {
            return Ok(outcome::FAILED_PRECONDITION);
        }
        let order_key = format!("ORDER#{}", uuid::Uuid::new_v4().simple());
        self.put(Item::from([
            ("pk".to_owned(), string(order_key.clone())),
            ("user_id".to_owned(), string(user)),
            ("side".to_owned(), string(operation.name())),
            ("status".to_owned(), string("PENDING")),
        ]))
        .await?;
        self.set_number(balance_key, "cash_cents", cash + cash_delta).await?;
        self.set_number(holding_key, "quantity_thousandths", holding + quantity_delta)
            .await?;
        self.record(user, operation.name(), cash_delta).await?;
        self.count();
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", string(order_key))
            .update_expression("SET #status = :confirmed")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":confirmed", string("CONFIRMED"))
            .send()
            .await
            .map_err(|_| StepFailed)?;
        Ok(outcome::OK)
    }
}
