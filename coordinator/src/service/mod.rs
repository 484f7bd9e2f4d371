//! The money path, one file per step of its state machine (after TiKV's `txn/actions/`).
//! Deposit, Withdraw, PlaceBuy and PlaceSell are one flow: take the lease (reading the account
//! in the same write), decide with `core`, then commit every write and the release in one
//! fenced transaction, or on refusal roll back.
//!
//! # Layout
//! - this file: bounds, [`CoordinatorConfig`], [`ServiceError`], [`Operation`] and the entry
//!   point [`TransactionCoordinator::mutate`];
//! - [`lease`]: taking, releasing and tracking the per-user lease;
//! - [`known`]: accounts as this coordinator last wrote them, committed on without a lease
//!   (conditioned on their version);
//! - [`commit`]: deciding under the lease and committing, retried while nothing was written,
//!   ending in exactly one [`commit::Ending`];
//! - [`roll_back`]: a refusal under the lease (FAILED order, refusal record, release);
//! - [`settle`]: unclear endings (fence, then look for what landed), replays of a request id
//!   and recorded outcomes;
//! - [`reads`]: accounts, orders and ledger pages (newest first, or after a sequence);
//! - [`numbering`]: numbering the ledger entries written before sequences (the upgrade);
//! - [`watch`]: WatchLedger streams, fed by storage reads and by the commits made here;
//! - [`catalog`]: the cached asset catalog and its admin writes;
//! - [`asset_changes`]: UpsertAsset's price-move bound and the kept history of changes.

mod asset_changes;
mod catalog;
mod commit;
pub mod feed;
mod instance;
mod known;
mod lease;
mod numbering;
mod orders;
mod queue;
mod reads;
mod roll_back;
mod settle;
#[cfg(test)]
mod testing;
mod transfer;
mod watch;
mod withdrawals;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

pub use catalog::{CATALOG_ASSETS_MAX, CATALOG_REFRESH_INTERVAL, Catalog, DEFAULT_CATALOG, parse_catalog};
pub use instance::{HEARTBEAT_INTERVAL, HEARTBEAT_TTL, InstanceError};
pub use lease::HeldLease;
pub use reads::{PAGE_TOKEN_LENGTH_MAX, PageRequest};
pub use watch::{
    WATCH_POLL_DEFAULT, WATCH_PROGRESS_DEFAULT, WATCH_SEND_STALL_MAX, WATCHERS_MAX_DEFAULT, WatchEnd, WatchEvent,
};

pub use crate::core::ops::{CancelRequest, FillRequest, Operation, ReserveRequest, TradeRequest, TransferRequest};

use crate::core::ops::LeaseKind;
use crate::core::records::{LedgerEntry, Order};
use crate::core::{
    AssetSymbol, Clock, FieldError, Limits, Millis, Principal, Quantity, Rejection, RequestId, Usd, UserId, UtcDay,
};
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
/// Items of one user's calls decided and committed together in one transaction: DynamoDB's 100
/// items less the account's own and its feed record. Each call counts the items it may write
/// (`Operation::items_max`): 49 deposits or withdrawals with request ids, 98 without, 19 trades.
pub const BATCH_ITEMS_MAX: usize = crate::storage::model::TRANSACTION_ITEMS_MAX - 2;
/// Default bound on mutations in flight (queued or being decided) in one coordinator.
pub const INFLIGHT_MAX_DEFAULT: usize = 4096;
/// Default bound on calls queued for one user in one coordinator.
pub const QUEUED_PER_USER_MAX_DEFAULT: usize = 512;
/// Default and largest page of ListOrders / ListLedger.
pub const PAGE_SIZE_DEFAULT: u32 = 20;
pub const PAGE_SIZE_MAX: u32 = 100;

const _: () = assert!(LEASE_DEPOSIT.as_millis() <= LEASE_WITHDRAW.as_millis());
const _: () = assert!(LEASE_WITHDRAW.as_millis() <= LEASE_TRADE.as_millis());
const _: () = assert!(COMMIT_LEASE_MARGIN.as_millis() < LEASE_DEPOSIT.as_millis());
const _: () = assert!(PAGE_SIZE_DEFAULT <= PAGE_SIZE_MAX);
const _: () = assert!(SAFE_RETRY_ATTEMPTS >= 1);
const _: () = assert!(
    crate::core::ops::CALL_ITEMS_MAX <= BATCH_ITEMS_MAX,
    "the largest call fits in a batch"
);

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
    /// Mutations in flight (queued or being decided) past which calls get RESOURCE_EXHAUSTED.
    pub max_inflight: usize,
    /// Calls queued for one user past which its next calls get RESOURCE_EXHAUSTED.
    pub max_queued_per_user: usize,
    /// Largest price move of one UpsertAsset without `force`, in percent of the old price.
    pub price_change_max_percent: u32,
    /// Commit straight away, without a lease, on an account as this coordinator last left it
    /// (`known`); off, every batch takes the lease first.
    pub known_accounts: bool,
    /// Open WatchLedger streams past which new ones get RESOURCE_EXHAUSTED.
    pub max_watchers: usize,
    /// How often a watcher reads storage for commits made by other coordinators.
    pub watch_poll: Duration,
    /// Longest silence on a watch stream before a progress message.
    pub watch_progress: Duration,
    /// A consumer that leaves its full buffer untouched this long is ended (`WATCH_SEND_STALL_MAX`).
    pub watch_send_stall: Duration,
    /// WatchFeed reads commits at least this old; a commit acknowledged later than half of it
    /// after its time is recorded in the feed again (`feed::FEED_HORIZON_DEFAULT`).
    pub feed_horizon: Duration,
    /// How often a caught-up WatchFeed stream reads the journal again.
    pub feed_poll: Duration,
}

/// A pause between decision and commit, injected by fencing tests to hold a decided commit
/// past its lease.
#[derive(Clone)]
pub struct CommitHook(pub Arc<PauseBeforeCommit>);

/// The hook's function: given the user, the pause to await.
pub type PauseBeforeCommit = dyn Fn(&UserId) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync;

impl CommitHook {
    /// A hook that parks every commit until `go` is notified, and notifies `parked` when one
    /// is parked: (hook, parked, go).
    pub fn parking() -> (Self, Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>) {
        let parked = Arc::new(tokio::sync::Notify::new());
        let go = Arc::new(tokio::sync::Notify::new());
        let hook = {
            let (parked, go) = (Arc::clone(&parked), Arc::clone(&go));
            CommitHook(Arc::new(move |_user: &UserId| {
                let (parked, go) = (Arc::clone(&parked), Arc::clone(&go));
                Box::pin(async move {
                    parked.notify_one();
                    go.notified().await;
                })
            }))
        };
        (hook, parked, go)
    }
}

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
            max_inflight: INFLIGHT_MAX_DEFAULT,
            max_queued_per_user: QUEUED_PER_USER_MAX_DEFAULT,
            price_change_max_percent: crate::core::asset_change::PRICE_CHANGE_MAX_PERCENT_DEFAULT,
            known_accounts: true,
            max_watchers: WATCHERS_MAX_DEFAULT,
            watch_poll: WATCH_POLL_DEFAULT,
            watch_progress: WATCH_PROGRESS_DEFAULT,
            watch_send_stall: watch::WATCH_SEND_STALL_MAX,
            feed_horizon: feed::FEED_HORIZON_DEFAULT,
            feed_poll: feed::FEED_POLL_DEFAULT,
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
    #[error("Withdrawal {0} not found")]
    Withdrawal(String),
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
    /// UpsertAsset moved a price beyond `--price-change-max-percent` without `force`.
    #[error("{0}")]
    PriceChangeTooLarge(crate::core::asset_change::PriceChangeTooLarge),
    /// A bound on queued work was reached (which one): nothing was written; retry later.
    #[error("Too many {0}; please retry shortly")]
    Overloaded(&'static str),
    /// UpsertAsset of a new symbol when the catalog already holds its maximum.
    #[error("The asset catalog is full ({0} assets); deactivate or reuse a symbol")]
    CatalogFull(usize),
    /// A position older than what storage still keeps (the message names the oldest kept).
    #[error("{0}")]
    OutOfRange(String),
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

impl CoordinatorConfig {
    /// The lease an operation of `kind` takes.
    fn lease(&self, kind: LeaseKind) -> Duration {
        match kind {
            LeaseKind::Deposit => self.lease_deposit,
            LeaseKind::Withdraw => self.lease_withdraw,
            LeaseKind::Trade => self.lease_trade,
        }
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
    /// Each user's calls, waiting for that user's driver.
    queues: queue::AccountQueues,
    /// This run of the instance: see `Lease::incarnation`.
    incarnation: String,
    /// Whether this run may reclaim leases of its instance name's dead runs.
    instance: instance::InstanceHold,
    /// The queues' drivers, which outlive the calls that started them, awaited at shutdown.
    mutations: TaskTracker,
    /// Accounts as this coordinator last left them, committed on without a lease.
    known: known::KnownAccounts,
    /// Open WatchLedger streams.
    watchers: Arc<watch::Watchers>,
    /// The one reader of the feed's tail, shared by caught-up WatchFeed streams.
    feed_tail: feed::FeedTail,
    /// Accounts whose last commit by this process was sent and not confirmed (acknowledged, or
    /// found applied and recorded in the feed again): their next lease here records that commit
    /// in the feed again, as for a commit taken over from another writer.
    feed_unconfirmed: std::sync::Mutex<std::collections::HashSet<UserId>>,
}

impl TransactionCoordinator {
    pub fn new(storage: Storage, clock: Arc<dyn Clock>, config: CoordinatorConfig) -> Self {
        let instance = instance::InstanceHold::new(config.named_instance);
        let known = known::KnownAccounts::new(config.known_accounts);
        let watchers = Arc::new(watch::Watchers::new(
            config.max_watchers,
            config.watch_poll,
            config.watch_progress,
            config.watch_send_stall,
        ));
        Self {
            storage,
            clock,
            config,
            catalog: Catalog::default(),
            held_leases: lease::HeldLeases::default(),
            queues: queue::AccountQueues::default(),
            incarnation: uuid::Uuid::new_v4().to_string(),
            instance,
            mutations: TaskTracker::new(),
            known,
            watchers,
            feed_tail: feed::FeedTail::default(),
            feed_unconfirmed: std::sync::Mutex::default(),
        }
    }

    /// This run of the coordinator: a fresh random id at every start.
    /// Ends every watch stream with its cursor and refuses new ones (the drain).
    pub fn drain_watchers(&self) {
        self.watchers.drain();
    }

    /// Turns true at the drain: streams relayed from another coordinator end on it too.
    pub fn draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.watchers.draining()
    }

    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// This coordinator's clock.
    pub fn clock(&self) -> Arc<dyn Clock> {
        Arc::clone(&self.clock)
    }

    /// Now, by this coordinator's clock.
    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    /// The UTC day the daily limits count, by this coordinator's clock.
    pub fn today(&self) -> UtcDay {
        UtcDay::of(self.clock.now())
    }

    // -----------------------------------------------------------------------------------------
    // Mutations

    pub async fn deposit(
        self: &Arc<Self>,
        principal: &Principal,
        user: &UserId,
        amount: Usd,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        self.mutate_as(principal, user, Operation::Deposit(amount), request_id, deadline)
            .await
    }

    pub async fn withdraw(
        self: &Arc<Self>,
        principal: &Principal,
        user: &UserId,
        amount: Usd,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        self.mutate_as(principal, user, Operation::Withdraw(amount), request_id, deadline)
            .await
    }

    pub async fn trade(
        self: &Arc<Self>,
        principal: &Principal,
        user: &UserId,
        request: TradeRequest,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        self.mutate_as(principal, user, Operation::Trade(request), request_id, deadline)
            .await
    }

    /// Moves `request.amount` from `request.from` to `request.to`: both accounts and both
    /// ledger entries in one fenced transaction (`transfer`). The request id is keyed on the
    /// sender.
    pub async fn transfer(
        self: &Arc<Self>,
        principal: &Principal,
        request: TransferRequest,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        if request.from == request.to {
            return Err(FieldError::new(
                "to_user_id",
                "must differ from from_user_id: a transfer needs two accounts",
            )
            .into());
        }
        let from = request.from.clone();
        self.mutate_as(principal, &from, Operation::Transfer(request), request_id, deadline)
            .await
    }

    /// `mutate_as` the local principal: the service's own tests, which run without a transport.
    #[cfg(test)]
    pub(crate) async fn mutate(
        self: &Arc<Self>,
        user: &UserId,
        operation: Operation,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        self.mutate_as(&Principal::local(), user, operation, request_id, deadline)
            .await
    }

    /// Queue, then (by the user's driver) lease, decide in a batch, commit-and-release or
    /// extend, on behalf of `principal`, who is recorded on what the commit writes; a refusal is
    /// rolled back in the same commit. With a request id, a retry of a request that already
    /// ended returns its recorded outcome instead of running again.
    #[tracing::instrument(name = "mutate", skip_all, fields(user = %user, operation = operation.name(), intent = %operation.fingerprint(), request_id = request_id.as_ref().map(RequestId::as_str), lock_id = tracing::field::Empty, outcome = tracing::field::Empty))]
    pub async fn mutate_as(
        self: &Arc<Self>,
        principal: &Principal,
        user: &UserId,
        operation: Operation,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        let _in_flight = crate::telemetry::metrics::InFlight::enter();
        let started = Instant::now();
        let name = operation.name();
        let result = match self.check_before_queueing(&operation).await {
            Ok(()) => {
                self.queue_and_wait(principal, user, operation, request_id, deadline)
                    .await
            }
            Err(error) => Err(error),
        };
        let outcome = match &result {
            Ok(receipt) if receipt.replayed => "REPLAYED".to_owned(),
            Ok(_) => "COMMITTED".to_owned(),
            Err(error) => format!("{error:?}"),
        };
        tracing::Span::current().record("outcome", outcome.as_str());
        // Recorded fields reach only later lines: this last one carries the outcome.
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            operation = name,
            outcome = outcome.as_str(),
            duration_ms,
            "mutation done"
        );
        result
    }

    /// Refusals that need no lease: an unknown or inactive asset, an amount above the whole
    /// daily limit. Nothing to write, no wait.
    async fn check_before_queueing(&self, operation: &Operation) -> Result<(), ServiceError> {
        let traded = match operation {
            Operation::Trade(request) => Some(&request.asset),
            Operation::Reserve(request) => Some(&request.asset),
            _ => None,
        };
        if let Some(symbol) = traded {
            let asset = self.catalog.asset(&self.storage, symbol).await?;
            if !asset.active {
                let rejection = Rejection::AssetInactive(asset.symbol);
                crate::telemetry::metrics::refused(operation.name(), &rejection);
                return Err(ServiceError::Rejected(rejection));
            }
        }
        if let Some(rejection) = operation.refused_before_lease(&self.config.limits) {
            crate::telemetry::metrics::refused(operation.name(), &rejection);
            return Err(ServiceError::Rejected(rejection));
        }
        Ok(())
    }

    /// Stops tracking new mutations and waits up to `timeout` for the detached ones; false if
    /// some were still running then.
    pub async fn wait_for_mutations(&self, timeout: Duration) -> bool {
        self.mutations.close();
        tokio::time::timeout(timeout, self.mutations.wait()).await.is_ok()
    }
}
