//! The money path, one file per step of its state machine (after TiKV's `txn/actions/`).
//! Deposit, Withdraw, PlaceBuy and PlaceSell are one flow: take the lease (reading the account
//! in the same write), decide with `core`, then commit every write and the release in one
//! fenced transaction, or on refusal roll back.
//!
//! # Layout
//! - this file: bounds, [`CoordinatorConfig`], [`ServiceError`], [`Intent`] and the entry
//!   point [`TransactionCoordinator::mutate`];
//! - [`lease`]: taking, releasing and tracking the per-user lease;
//! - [`commit`]: deciding under the lease and committing, retried while nothing was written,
//!   ending in exactly one [`commit::Ending`];
//! - [`roll_back`]: a refusal under the lease (FAILED order, refusal record, release);
//! - [`settle`]: unclear endings (fence, then look for what landed), replays of a request id
//!   and recorded outcomes;
//! - [`reads`]: accounts, orders and ledger pages;
//! - [`catalog`]: the cached asset catalog and its admin writes.

mod catalog;
mod commit;
mod instance;
mod lease;
mod reads;
mod roll_back;
mod settle;
#[cfg(test)]
mod testing;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

pub use catalog::{CATALOG_ASSETS_MAX, CATALOG_REFRESH_INTERVAL, Catalog};
pub use instance::{HEARTBEAT_INTERVAL, HEARTBEAT_TTL, InstanceError};
pub use lease::HeldLease;
pub use reads::{PAGE_TOKEN_LENGTH_MAX, PageRequest};

use crate::core::decide::Rejection;
use crate::core::records::{LedgerEntry, Order, RecordedOutcome, RequestRecord};
use crate::core::time::utc_day;
use crate::core::{AssetSymbol, Clock, FieldError, Limits, Millis, Price, Quantity, RequestId, TradeSide, Usd, UserId};
use crate::storage::{Storage, StorageError};

/// Lease of a deposit, from the design: a single balance update.
pub const LEASE_DEPOSIT: Duration = Duration::from_secs(10);
/// Lease of a withdrawal: includes balance and limit validation.
pub const LEASE_WITHDRAW: Duration = Duration::from_secs(15);
/// Lease of a buy or sell: catalog check, order and ledger writes.
pub const LEASE_TRADE: Duration = Duration::from_secs(25);
/// Longest a request waits for a busy lease before ABORTED. Under the original system's load
/// test most requests on one user failed "busy" at once; waiting a few seconds serialises them.
pub const LEASE_WAIT_MAX: Duration = Duration::from_secs(5);
/// A commit is not started with less than this left on the lease: the fence would refuse it.
pub const COMMIT_LEASE_MARGIN: Duration = Duration::from_millis(250);
/// Commits retried under one lease when nothing was written (the catalog price moved, or a
/// transaction conflict): bounded so a flapping price cannot hold the lease forever.
pub const COMMIT_ATTEMPTS_MAX: usize = 4;
/// How long a request id's outcome is kept: retries of a payments client come within minutes;
/// a day covers a client that retries after an outage.
pub const REQUEST_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Attempts of a storage request that is safe to repeat (a read, or a write conditioned on this
/// caller's own lock id) while storage is unavailable, on top of the SDK's own retries.
pub const SAFE_RETRY_ATTEMPTS: usize = 4;
/// First pause between such attempts; it grows fourfold each time (20, 80, 320 ms).
pub const SAFE_RETRY_DELAY: Duration = Duration::from_millis(20);
/// Default and largest page of ListOrders / ListLedger.
pub const PAGE_SIZE_DEFAULT: u32 = 20;
pub const PAGE_SIZE_MAX: u32 = 100;

const _: () = assert!(LEASE_DEPOSIT.as_millis() <= LEASE_WITHDRAW.as_millis());
const _: () = assert!(LEASE_WITHDRAW.as_millis() <= LEASE_TRADE.as_millis());
const _: () = assert!(COMMIT_LEASE_MARGIN.as_millis() < LEASE_DEPOSIT.as_millis());
const _: () = assert!(PAGE_SIZE_DEFAULT <= PAGE_SIZE_MAX);
const _: () = assert!(SAFE_RETRY_ATTEMPTS >= 1);

/// Runs `call` again while storage is unavailable, up to `SAFE_RETRY_ATTEMPTS` times in all.
/// Only for requests whose repetition cannot apply anything twice.
pub(crate) async fn retry_safe<T, F, Fut>(call: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StorageError>>,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(SAFE_RETRY_DELAY)
        .with_factor(4.0)
        .with_max_times(SAFE_RETRY_ATTEMPTS - 1);
    call.retry(backoff)
        .sleep(tokio::time::sleep)
        .when(|error| matches!(error, StorageError::Unavailable(_)))
        .notify(|error, delay| {
            crate::telemetry::metrics::storage_retried();
            tracing::debug!(%error, ?delay, "storage unavailable; retrying a safe request")
        })
        .await
}

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// This coordinator instance, recorded on every lease it takes.
    pub owner: String,
    /// Whether `owner` was given (`--instance`): then the process proves with a heartbeat that
    /// it is the only live one of that name before reclaiming the name's leases.
    pub named_instance: bool,
    pub lease_deposit: Duration,
    pub lease_withdraw: Duration,
    pub lease_trade: Duration,
    pub lease_wait_max: Duration,
    pub limits: Limits,
    /// How long a request id's outcome is kept for retries.
    pub request_retention: Duration,
    /// Fault injection for tests: awaited after deciding and before sending the commit.
    pub before_commit: Option<CommitHook>,
    /// How often the sweeper runs; None turns it off.
    pub sweep_interval: Option<Duration>,
}

/// A pause between decision and commit, injected by fencing tests to hold a decided commit
/// past its lease.
#[derive(Clone)]
pub struct CommitHook(pub Arc<PauseBeforeCommit>);

/// The hook's function: given the user, the pause to await.
pub type PauseBeforeCommit = dyn Fn(&UserId) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync;

impl std::fmt::Debug for CommitHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitHook")
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            owner: format!("coordinator-{}", uuid::Uuid::new_v4()),
            named_instance: false,
            lease_deposit: LEASE_DEPOSIT,
            lease_withdraw: LEASE_WITHDRAW,
            lease_trade: LEASE_TRADE,
            lease_wait_max: LEASE_WAIT_MAX,
            limits: Limits::default(),
            request_retention: REQUEST_RETENTION,
            before_commit: None,
            sweep_interval: None,
        }
    }
}

/// What a NOT_FOUND names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Missing {
    #[error("Account {0} not found")]
    Account(UserId),
    #[error("Order {0} not found")]
    Order(String),
    #[error("Asset {0} not found")]
    Asset(AssetSymbol),
}

/// Every way an RPC can fail; `transport` maps each to one gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidArgument(FieldError),
    #[error("{0}")]
    NotFound(Missing),
    #[error("{0}")]
    Rejected(Rejection),
    /// The request id's first execution was refused with this message; replayed as it was.
    #[error("{0}")]
    RefusedEarlier(String),
    #[error("Operation in progress, please try again")]
    Busy,
    #[error("Deadline exceeded while waiting for the account lease")]
    DeadlineExceeded,
    /// The lease expired before the commit, which the fence refused: nothing was written.
    #[error("The operation took longer than its lease and was not applied; please try again")]
    LeaseLost,
    /// Storage did not confirm the commit, and the fence then proved it did not apply.
    #[error("The operation was not applied (storage did not answer in time); please try again")]
    NotApplied,
    /// UpsertAsset of a new symbol when the catalog already holds its maximum.
    #[error("The asset catalog is full ({0} assets); deactivate or reuse a symbol")]
    CatalogFull(usize),
    #[error("Service temporarily unavailable")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StorageError> for ServiceError {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::Unavailable(detail) | StorageError::Conflict(detail) => ServiceError::Unavailable(detail),
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

impl From<FieldError> for ServiceError {
    fn from(error: FieldError) -> Self {
        ServiceError::InvalidArgument(error)
    }
}

impl From<crate::storage::model::MalformedItem> for ServiceError {
    fn from(error: crate::storage::model::MalformedItem) -> Self {
        ServiceError::Internal(error.to_string())
    }
}

/// What a committed mutation did: everything its reply carries.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// The ledger entry; its `cash_after` is the new cash balance.
    pub entry: LedgerEntry,
    /// For trades: the CONFIRMED order and the holding of its asset after the trade.
    pub trade: Option<(Order, Quantity)>,
    /// True when this is the recorded outcome of an earlier execution of the same request id.
    pub replayed: bool,
}

/// A validated trade request, before the catalog price is known.
#[derive(Debug, Clone)]
pub struct TradeRequest {
    pub side: TradeSide,
    pub asset: AssetSymbol,
    pub quantity: Quantity,
    pub limit_price: Option<Price>,
}

/// A mutation as the caller asked for it, validated, before the lease.
#[derive(Debug, Clone)]
pub enum Intent {
    Deposit(Usd),
    Withdraw(Usd),
    Trade(TradeRequest),
}

impl Intent {
    /// The name used in leases, logs and ledger entries.
    pub fn name(&self) -> &'static str {
        match self {
            Intent::Deposit(_) => "DEPOSIT",
            Intent::Withdraw(_) => "WITHDRAWAL",
            Intent::Trade(trade) => trade.side.as_str(),
        }
    }

    /// The operation and every parameter, e.g. `BUY 0.5 SOL limit 140`: a retry with the same
    /// request id must match it exactly.
    pub fn fingerprint(&self) -> String {
        match self {
            Intent::Deposit(amount) | Intent::Withdraw(amount) => format!("{} {amount}", self.name()),
            Intent::Trade(trade) => {
                let limit = trade
                    .limit_price
                    .map(|limit| format!(" limit {limit}"))
                    .unwrap_or_default();
                format!("{} {} {}{limit}", self.name(), trade.quantity, trade.asset)
            }
        }
    }

    fn lease(&self, config: &CoordinatorConfig) -> Duration {
        match self {
            Intent::Deposit(_) => config.lease_deposit,
            Intent::Withdraw(_) => config.lease_withdraw,
            Intent::Trade(_) => config.lease_trade,
        }
    }

    /// Only a deposit may create an account; everything else needs one.
    fn requires_account(&self) -> bool {
        !matches!(self, Intent::Deposit(_))
    }
}

/// A page of results and the cursor of the next one (None on the last page).
#[derive(Debug, Clone)]
pub struct PageOf<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// The service behind the gRPC transport: the money path and the reads. (The generated gRPC
/// trait is `Coordinator`; `transport::CoordinatorService` implements it over this.)
#[derive(Debug)]
pub struct TransactionCoordinator {
    storage: Storage,
    clock: Arc<dyn Clock>,
    config: CoordinatorConfig,
    catalog: Catalog,
    held_leases: lease::HeldLeases,
    /// This run of the instance: see `Lease::incarnation`.
    incarnation: String,
    /// Whether this run may reclaim leases of its instance name's dead runs.
    instance: instance::InstanceHold,
    /// Mutations detached from their RPC (see `spawn_mutation`), awaited at shutdown.
    mutations: TaskTracker,
}

impl TransactionCoordinator {
    pub fn new(storage: Storage, clock: Arc<dyn Clock>, config: CoordinatorConfig) -> Self {
        let instance = instance::InstanceHold::new(config.named_instance);
        Self {
            storage,
            clock,
            config,
            catalog: Catalog::default(),
            held_leases: lease::HeldLeases::default(),
            incarnation: uuid::Uuid::new_v4().to_string(),
            instance,
            mutations: TaskTracker::new(),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// Now, by this coordinator's clock.
    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    /// The UTC day the daily limits count, by this coordinator's clock.
    pub fn today(&self) -> String {
        utc_day(self.clock.now())
    }

    // -----------------------------------------------------------------------------------------
    // Mutations

    pub async fn deposit(
        &self,
        user: &UserId,
        amount: Usd,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        self.mutate(user, Intent::Deposit(amount), request_id, deadline).await
    }

    pub async fn withdraw(
        &self,
        user: &UserId,
        amount: Usd,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        self.mutate(user, Intent::Withdraw(amount), request_id, deadline).await
    }

    pub async fn trade(
        &self,
        user: &UserId,
        request: TradeRequest,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        self.mutate(user, Intent::Trade(request), request_id, deadline).await
    }

    /// Lease, decide, commit-and-release; or roll back. With a request id, a retry of a request
    /// that already ended returns its recorded outcome instead of running again.
    #[tracing::instrument(skip_all, fields(user = %user, operation = intent.name(), intent = %intent.fingerprint(), request_id = request_id.as_ref().map(RequestId::as_str), lock_id = tracing::field::Empty, outcome = tracing::field::Empty))]
    pub async fn mutate(
        &self,
        user: &UserId,
        intent: Intent,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        let _in_flight = crate::telemetry::metrics::InFlight::enter();
        let started = Instant::now();
        let result = self
            .lease_and_commit(user, &intent, request_id.as_ref(), deadline)
            .await;
        let outcome = match &result {
            Ok(receipt) if receipt.replayed => "REPLAYED".to_owned(),
            Ok(_) => "COMMITTED".to_owned(),
            Err(error) => format!("{error:?}"),
        };
        tracing::Span::current().record("outcome", outcome.as_str());
        // Recorded fields reach only later lines: this last one carries the outcome.
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(outcome = outcome.as_str(), duration_ms, "mutation done");
        result
    }

    async fn lease_and_commit(
        &self,
        user: &UserId,
        intent: &Intent,
        request_id: Option<&RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        if let Intent::Trade(request) = intent {
            // Unknown and inactive assets are refused before the lease: nothing to write, no wait.
            let asset = self.catalog.asset(&self.storage, &request.asset).await?;
            if !asset.active {
                crate::telemetry::metrics::refused(intent.name(), &Rejection::AssetInactive(asset.symbol.clone()));
                return Err(ServiceError::Rejected(Rejection::AssetInactive(asset.symbol)));
            }
        }
        let held = self
            .acquire(
                user,
                intent.name(),
                intent.lease(&self.config),
                intent.requires_account(),
                deadline,
            )
            .await?;
        self.decide_and_commit(&held, intent, request_id).await
    }

    /// Runs a mutation to its end on its own tracked task. tonic drops a handler's future when
    /// the caller cancels or its grpc-timeout passes; a mutation dropped between lease and
    /// commit would leave the lease held until expiry and its commit's outcome unresolved.
    /// Detached, it always ends in a commit or a release, whoever is still listening; tracked,
    /// a graceful shutdown waits for it (`wait_for_mutations`) before releasing leases.
    pub fn spawn_mutation<T: Send + 'static>(
        &self,
        mutation: impl Future<Output = Result<T, ServiceError>> + Send + 'static,
    ) -> impl Future<Output = Result<T, ServiceError>> + Send + 'static {
        // In the caller's span, so the mutation's log lines carry the call's request and trace.
        let task = self.mutations.spawn(tracing::Instrument::in_current_span(mutation));
        async move {
            task.await
                .unwrap_or_else(|error| Err(ServiceError::Internal(format!("mutation task failed: {error}"))))
        }
    }

    /// Stops tracking new mutations and waits up to `timeout` for the detached ones; false if
    /// some were still running then.
    pub async fn wait_for_mutations(&self, timeout: Duration) -> bool {
        self.mutations.close();
        tokio::time::timeout(timeout, self.mutations.wait()).await.is_ok()
    }

    /// A request record of `intent` with `outcome`, kept for the configured retention.
    fn record(&self, intent: &Intent, outcome: RecordedOutcome, now: Millis) -> RequestRecord {
        RequestRecord {
            fingerprint: intent.fingerprint(),
            outcome,
            expires_at_seconds: (now / 1000).saturating_add(self.config.request_retention.as_secs()),
        }
    }
}
