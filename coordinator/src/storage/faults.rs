//! Fault injection for resilience tests (`--inject-faults RATE`): an engine wrapper that, at the
//! given rate, loses a request before storage sees it, loses the reply after storage applied it,
//! or answers slowly. Off unless asked for; never used by the money path's own tests of success.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Delete, Engine, Item, Key, Page, Put, Query, StorageError, StorageResult, TransactItem, Update};

/// The slow fault's pause: long enough to reorder requests, short of any lease.
const SLOW_FAULT_DELAY_MAX: Duration = Duration::from_millis(800);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The request never reached storage: nothing applied, the caller sees an error.
    LostRequest,
    /// Storage applied the request, the reply was lost: the caller sees an error.
    LostReply,
    /// The reply arrives late.
    Slow,
}

#[derive(Debug)]
pub struct FaultyEngine {
    inner: std::sync::Arc<dyn Engine>,
    rate: f64,
    random: Mutex<fastrand::Rng>,
    injected: AtomicU64,
}

impl FaultyEngine {
    pub fn new(inner: std::sync::Arc<dyn Engine>, rate: f64, seed: u64) -> Self {
        Self {
            inner,
            rate: rate.clamp(0.0, 1.0),
            random: Mutex::new(fastrand::Rng::with_seed(seed)),
            injected: AtomicU64::new(0),
        }
    }

    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn draw(&self) -> (Option<Fault>, Duration) {
        let mut random = self.random.lock().expect("fault rng poisoned");
        if random.f64() >= self.rate {
            return (None, Duration::ZERO);
        }
        let fault = match random.u8(0..3) {
            0 => Fault::LostRequest,
            1 => Fault::LostReply,
            _ => Fault::Slow,
        };
        (Some(fault), SLOW_FAULT_DELAY_MAX.mul_f64(random.f64()))
    }

    async fn around<T: Send>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = StorageResult<T>> + Send,
    ) -> StorageResult<T> {
        let (fault, delay) = self.draw();
        let Some(fault) = fault else { return call.await };
        self.injected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(?fault, operation, "injected storage fault");
        match fault {
            Fault::LostRequest => Err(StorageError::Unavailable(format!("injected: {operation} request lost"))),
            Fault::LostReply => {
                let _applied = call.await;
                Err(StorageError::Unavailable(format!("injected: {operation} reply lost")))
            }
            Fault::Slow => {
                tokio::time::sleep(delay).await;
                call.await
            }
        }
    }
}

#[async_trait::async_trait]
impl Engine for FaultyEngine {
    async fn create_table(&self, table: &str) -> StorageResult<()> {
        self.inner.create_table(table).await
    }

    async fn table_exists(&self, table: &str) -> StorageResult<bool> {
        self.inner.table_exists(table).await
    }

    async fn get(&self, table: &str, key: Key) -> StorageResult<Option<Item>> {
        self.around("GetItem", self.inner.get(table, key)).await
    }

    async fn update(&self, table: &str, update: Update) -> StorageResult<Option<Item>> {
        self.around("UpdateItem", self.inner.update(table, update)).await
    }

    async fn put(&self, table: &str, put: Put) -> StorageResult<()> {
        self.around("PutItem", self.inner.put(table, put)).await
    }

    async fn delete(&self, table: &str, delete: Delete) -> StorageResult<()> {
        self.around("DeleteItem", self.inner.delete(table, delete)).await
    }

    async fn query(&self, table: &str, query: Query) -> StorageResult<Page> {
        self.around("Query", self.inner.query(table, query)).await
    }

    async fn scan(&self, table: &str, limit: u32, start_after: Option<Key>) -> StorageResult<Page> {
        self.around("Scan", self.inner.scan(table, limit, start_after)).await
    }

    async fn enable_ttl(&self, table: &str, attribute: &str) -> StorageResult<()> {
        self.inner.enable_ttl(table, attribute).await
    }

    async fn backup(&self, path: &std::path::Path) -> StorageResult<()> {
        self.inner.backup(path).await
    }

    async fn transact(&self, table: &str, items: &[TransactItem], token: Option<String>) -> StorageResult<()> {
        self.around("TransactWriteItems", self.inner.transact(table, items, token))
            .await
    }
}
