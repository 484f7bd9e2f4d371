//! Fixtures for the step files' unit tests: a coordinator on an in-memory embedded engine with
//! a controlled clock and the default catalog, and an engine that loses one transaction's reply.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use super::{CoordinatorConfig, Operation, PageRequest, ServiceError, TradeRequest, TransactionCoordinator};
use crate::core::Rejection;
use crate::core::records::OrderStatus;
use crate::core::time::ManualClock;
use crate::core::{AssetSymbol, Quantity, TradeSide, Usd, UserId};
use crate::storage::embedded::EmbeddedEngine;
use crate::storage::{
    Delete, Engine, Item, Key, Page, Put, Query, Storage, StorageError, StorageResult, TransactItem, Update,
};

/// A lease long enough for any step under test.
pub const LEASE: Duration = Duration::from_secs(10);

/// A coordinator whose clock starts at `clock`, waiting at most 30 ms for a busy lease.
pub async fn coordinator(clock: &ManualClock) -> Arc<TransactionCoordinator> {
    let config = CoordinatorConfig {
        lease_wait_max: Duration::from_millis(30),
        ..CoordinatorConfig::default()
    };
    coordinator_on(Arc::new(EmbeddedEngine::in_memory().unwrap()), clock, config).await
}

/// A coordinator on `engine`, with `config`.
pub async fn coordinator_on(
    engine: Arc<dyn Engine>,
    clock: &ManualClock,
    config: CoordinatorConfig,
) -> Arc<TransactionCoordinator> {
    let storage = Storage::new(engine, "lockstep");
    storage.ensure_table().await.unwrap();
    let coordinator = TransactionCoordinator::new(storage, Arc::new(clock.clone()), config);
    let catalog = super::parse_catalog(super::DEFAULT_CATALOG).unwrap();
    coordinator.seed_catalog(&catalog).await.unwrap();
    Arc::new(coordinator)
}

pub fn user(raw: &str) -> UserId {
    UserId::parse("user_id", raw).unwrap()
}

pub fn usd(raw: &str) -> Usd {
    Usd::parse_amount("amount", raw).unwrap()
}

pub fn quantity(raw: &str) -> Quantity {
    Quantity::parse_trade("quantity", raw).unwrap()
}

/// A market sell of `raw_quantity` of `asset`.
pub fn sell(asset: &str, raw_quantity: &str) -> Operation {
    Operation::Trade(TradeRequest {
        side: TradeSide::Sell,
        asset: AssetSymbol::parse("asset", asset).unwrap(),
        quantity: quantity(raw_quantity),
        limit_price: None,
    })
}

/// Sells 1 SOL for `user`, who holds none: the refusal (insufficient holdings), after checking
/// that it left exactly one order, FAILED with the refusal's message, found by user and by id.
pub async fn refused_sell_leaves_one_failed_order(
    coordinator: &Arc<TransactionCoordinator>,
    user: &UserId,
) -> ServiceError {
    let refused = coordinator
        .mutate(user, sell("SOL", "1"), None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, ServiceError::Rejected(Rejection::InsufficientHoldings { .. })),
        "{refused:?}"
    );
    let orders = coordinator.orders(user, PageRequest::first(10)).await.unwrap();
    assert_eq!(orders.items.len(), 1, "{:?}", orders.items);
    let order = &orders.items[0];
    assert_eq!(order.status, OrderStatus::Failed);
    assert_eq!(order.failure_reason.as_deref(), Some(refused.to_string().as_str()));
    assert_eq!(
        coordinator.order(&order.order_id).await.unwrap(),
        *order,
        "the copy by id"
    );
    refused
}

/// What the next transaction sent through a `FlakyEngine` suffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NextTransaction {
    Fine = 0,
    /// Applied, but the reply is lost: the caller sees UNAVAILABLE.
    LoseReply = 1,
    /// Never reaches storage: the caller sees UNAVAILABLE.
    LoseRequest = 2,
}

/// The embedded engine, but the next transaction can be made to lose its request or reply.
#[derive(Debug)]
pub struct FlakyEngine {
    inner: EmbeddedEngine,
    next: AtomicU8,
    /// While set, lease acquires (updates asking for the item back) reach storage once, with
    /// the reply lost, and then not at all: storage "goes away" mid-acquire.
    lose_acquires: std::sync::atomic::AtomicBool,
    acquires_landed: std::sync::atomic::AtomicU32,
}

impl FlakyEngine {
    pub fn new() -> Self {
        Self {
            inner: EmbeddedEngine::in_memory().unwrap(),
            next: AtomicU8::new(NextTransaction::Fine as u8),
            lose_acquires: Default::default(),
            acquires_landed: Default::default(),
        }
    }

    pub fn lose_acquires(&self, lose: bool) {
        self.lose_acquires.store(lose, Ordering::SeqCst);
    }

    pub fn arm(&self, fault: NextTransaction) {
        self.next.store(fault as u8, Ordering::SeqCst);
    }
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
        if update.return_new && self.lose_acquires.load(Ordering::SeqCst) {
            if self.acquires_landed.fetch_add(1, Ordering::SeqCst) == 0 {
                self.inner.update(table, update).await?;
            }
            return Err(StorageError::Unavailable("injected: storage went away".to_owned()));
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
        self.inner.scan(table, limit, start_after).await
    }
    async fn enable_ttl(&self, table: &str, attribute: &str) -> StorageResult<()> {
        self.inner.enable_ttl(table, attribute).await
    }
    async fn transact(&self, table: &str, items: &[TransactItem], token: Option<String>) -> StorageResult<()> {
        let lost = || Err(StorageError::Unavailable("injected: connection lost".to_owned()));
        match self.next.swap(NextTransaction::Fine as u8, Ordering::SeqCst) {
            1 => {
                self.inner.transact(table, items, token).await?;
                lost()
            }
            2 => lost(),
            _ => self.inner.transact(table, items, token).await,
        }
    }
}
