//! One function per RPC. A mutation is: take the lease (reading the account in the same write),
//! decide with `core`, then commit every write and the release in one fenced transaction, or on
//! refusal roll back (release, and record a FAILED order for trades).

mod catalog;
mod lease;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::time::Instant;

pub use catalog::Catalog;
pub use lease::HeldLease;

use crate::core::decide::{Rejection, decide};
use crate::core::records::{
    Asset, EntryKind, LedgerEntry, LedgerTrade, Order, OrderStatus, RecordedOutcome, RequestRecord,
};
use crate::core::time::utc_day;
use crate::core::{
    Account, AssetSymbol, Clock, Decision, FieldError, Limits, LockId, Operation, Price, Quantity, RequestId, Trade,
    TradeSide, Usd, UserId,
};
use crate::storage::model::{self, UserCollection};
use crate::storage::{Storage, StorageError};

/// Lease of a deposit, from the design: a single balance update.
pub const LOCK_LEASE_DEPOSIT: Duration = Duration::from_secs(10);
/// Lease of a withdrawal: includes balance and limit validation.
pub const LOCK_LEASE_WITHDRAW: Duration = Duration::from_secs(15);
/// Lease of a buy or sell: catalog check, order and ledger writes.
pub const LOCK_LEASE_TRADE: Duration = Duration::from_secs(25);
/// Longest a request waits for a busy lease before ABORTED. Under the original system's load
/// test most requests on one user failed "busy" at once; waiting a few seconds serialises them.
pub const LOCK_WAIT_MAX: Duration = Duration::from_secs(5);
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

/// Runs `call` again while storage is unavailable, up to `SAFE_RETRY_ATTEMPTS` times. Only for
/// requests whose repetition cannot apply anything twice.
pub(crate) async fn retry_safe<T, F, Fut>(mut call: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StorageError>>,
{
    let mut delay = SAFE_RETRY_DELAY;
    let mut attempt = 1;
    loop {
        match call().await {
            Err(StorageError::Unavailable(detail)) if attempt < SAFE_RETRY_ATTEMPTS => {
                tracing::debug!(%detail, attempt, "storage unavailable; retrying a safe request");
                tokio::time::sleep(delay).await;
                delay *= 4;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Default and largest page of ListOrders / ListLedger.
pub const PAGE_SIZE_DEFAULT: u32 = 20;
pub const PAGE_SIZE_MAX: u32 = 100;

const _: () = assert!(LOCK_LEASE_DEPOSIT.as_millis() <= LOCK_LEASE_WITHDRAW.as_millis());
const _: () = assert!(LOCK_LEASE_WITHDRAW.as_millis() <= LOCK_LEASE_TRADE.as_millis());
const _: () = assert!(COMMIT_LEASE_MARGIN.as_millis() < LOCK_LEASE_DEPOSIT.as_millis());
const _: () = assert!(PAGE_SIZE_DEFAULT <= PAGE_SIZE_MAX);

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// This coordinator instance, recorded on every lease it takes.
    pub owner: String,
    pub lease_deposit: Duration,
    pub lease_withdraw: Duration,
    pub lease_trade: Duration,
    pub lock_wait_max: Duration,
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
            lease_deposit: LOCK_LEASE_DEPOSIT,
            lease_withdraw: LOCK_LEASE_WITHDRAW,
            lease_trade: LOCK_LEASE_TRADE,
            lock_wait_max: LOCK_WAIT_MAX,
            limits: Limits::default(),
            request_retention: REQUEST_RETENTION,
            before_commit: None,
            sweep_interval: None,
        }
    }
}

/// Every way an RPC can fail; `transport` maps each to one gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidArgument(FieldError),
    #[error("{0}")]
    NotFound(String),
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
}

/// A page of results and the cursor of the next one (None on the last page).
#[derive(Debug, Clone)]
pub struct PageOf<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Leases this process holds right now, released on graceful shutdown.
#[derive(Debug, Default)]
struct HeldLeases(Mutex<HashMap<LockId, UserId>>);

impl HeldLeases {
    fn insert(&self, held: &HeldLease) {
        self.0
            .lock()
            .expect("held-lease registry poisoned")
            .insert(held.lock_id.clone(), held.user.clone());
    }

    fn remove(&self, lock_id: &LockId) {
        self.0.lock().expect("held-lease registry poisoned").remove(lock_id);
    }

    fn drain(&self) -> Vec<(LockId, UserId)> {
        self.0.lock().expect("held-lease registry poisoned").drain().collect()
    }
}

#[derive(Debug)]
pub struct Coordinator {
    storage: Storage,
    clock: Arc<dyn Clock>,
    config: CoordinatorConfig,
    catalog: Catalog,
    held_leases: HeldLeases,
    /// This run of the instance: see `Lease::incarnation`.
    incarnation: String,
}

impl Coordinator {
    pub fn new(storage: Storage, clock: Arc<dyn Clock>, config: CoordinatorConfig) -> Self {
        Self {
            storage,
            clock,
            config,
            catalog: Catalog::default(),
            held_leases: HeldLeases::default(),
            incarnation: uuid::Uuid::new_v4().to_string(),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// Now, by this coordinator's clock.
    pub fn now(&self) -> crate::core::Millis {
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
        let result = self.mutate_inner(user, &intent, request_id.as_ref(), deadline).await;
        let outcome = match &result {
            Ok(receipt) if receipt.replayed => "REPLAYED".to_owned(),
            Ok(_) => "COMMITTED".to_owned(),
            Err(error) => format!("{error:?}"),
        };
        tracing::Span::current().record("outcome", outcome.as_str());
        result
    }

    async fn mutate_inner(
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
                return Err(ServiceError::Rejected(Rejection::AssetInactive(asset.symbol)));
            }
        }
        let requires_account = !matches!(intent, Intent::Deposit(_));
        let held = self
            .acquire(
                user,
                intent.name(),
                intent.lease(&self.config),
                requires_account,
                deadline,
            )
            .await?;
        self.decide_and_commit(&held, intent, request_id).await
    }

    /// The operation to decide: for trades, with the catalog entry as cached now.
    fn operation(&self, intent: &Intent) -> Result<Operation, ServiceError> {
        Ok(match intent {
            Intent::Deposit(amount) => Operation::Deposit(*amount),
            Intent::Withdraw(amount) => Operation::Withdraw(*amount),
            Intent::Trade(request) => {
                let asset = self
                    .catalog
                    .cached(&request.asset)
                    .ok_or_else(|| ServiceError::NotFound(format!("Asset {} not found", request.asset)))?;
                Operation::Trade(Trade {
                    side: request.side,
                    asset: request.asset.clone(),
                    quantity: request.quantity,
                    limit_price: request.limit_price,
                    price: asset.price,
                    active: asset.active,
                })
            }
        })
    }

    fn record(&self, intent: &Intent, outcome: RecordedOutcome, now: u64) -> RequestRecord {
        RequestRecord {
            fingerprint: intent.fingerprint(),
            outcome,
            expires_at_seconds: (now / 1000).saturating_add(self.config.request_retention.as_secs()),
        }
    }

    /// Decides on the account read with the lease and commits, retrying under the same lease
    /// while nothing was written; on refusal rolls back. The lease is always given back.
    async fn decide_and_commit(
        &self,
        held: &HeldLease,
        intent: &Intent,
        request_id: Option<&RequestId>,
    ) -> Result<Receipt, ServiceError> {
        let mut last_error = ServiceError::Internal("no commit attempted".to_owned());
        let mut catalog_checked = false;
        // Every commit sent under this lease: a late try of an earlier one may still land, so an
        // unclear ending looks for all of them (see `settle`).
        let mut sent: Vec<Receipt> = Vec::new();
        for _attempt in 0..COMMIT_ATTEMPTS_MAX {
            let now = self.clock.now();
            if now + COMMIT_LEASE_MARGIN.as_millis() as u64 >= held.expires_at {
                if !sent.is_empty() {
                    return self.settle(held, sent, ServiceError::LeaseLost).await;
                }
                self.release(held).await;
                return Err(ServiceError::LeaseLost);
            }
            let operation = match self.operation(intent) {
                Ok(operation) => operation,
                Err(error) => {
                    self.release(held).await;
                    return Err(error);
                }
            };
            let decision = match decide(&held.account, &operation, &utc_day(now), &self.config.limits) {
                Ok(decision) => decision,
                // Before refusing on a cached price, check it against the stored catalog once:
                // another coordinator may have changed it. (A refused trade costs one request
                // more; an accepted one is checked by its commit's condition instead.)
                Err(rejection)
                    if matches!(operation, Operation::Trade(_))
                        && rejection.depends_on_catalog()
                        && !catalog_checked =>
                {
                    catalog_checked = true;
                    if let Err(error) = self.catalog.refresh(&self.storage).await {
                        self.release(held).await;
                        return Err(error);
                    }
                    continue;
                }
                Err(rejection) => {
                    return self
                        .roll_back(held, intent, &operation, rejection, request_id, sent)
                        .await;
                }
            };
            let (entry, order) = records_of(held, &operation, &decision, request_id, now);
            let holding = decision.trade.as_ref().map(|effect| effect.holding);
            let record = request_id.map(|request_id| {
                let outcome = RecordedOutcome::Committed {
                    entry_id: entry.entry_id.clone(),
                    order_id: order.as_ref().map(|order| order.order_id.clone()),
                    holding,
                };
                (request_id, self.record(intent, outcome, now))
            });
            let items = model::commit(&model::Commit {
                user: &held.user,
                lock_id: &held.lock_id,
                read: &held.account,
                decision: &decision,
                entry: &entry,
                order: order.as_ref(),
                record: record.as_ref().map(|(request_id, record)| (*request_id, record)),
                now,
            });
            let item_count = items.len();
            let account_index = model::commit_account_index(&decision);
            let receipt = Receipt {
                trade: order.zip(holding),
                entry,
                replayed: false,
            };
            if let Some(CommitHook(pause)) = &self.config.before_commit {
                pause(&held.user).await;
            }
            // The ledger entry's id doubles as the idempotency token where the engine honours
            // one; correctness never depends on it (see `settle`).
            sent.push(receipt.clone());
            match self.storage.transact(items, Some(receipt.entry.entry_id.clone())).await {
                Ok(()) => {
                    self.held_leases.remove(&held.lock_id);
                    tracing::info!(lock_state = "RELEASED", transaction_id = %receipt.entry.entry_id, cash = %receipt.entry.cash_after, "committed");
                    return Ok(receipt);
                }
                Err(StorageError::TransactionCanceled { reasons }) => {
                    if let Some(request_id) = request_id
                        && model::request_record_refused(item_count, true, &reasons)
                    {
                        // The key was used before (or this very commit landed and its retry
                        // was refused): the record says what happened.
                        return self.replay(held, request_id, intent).await;
                    }
                    if reasons
                        .get(account_index)
                        .is_some_and(|reason| reason.condition_failed())
                    {
                        // Fenced, or our own commit already landed and a retry of it was refused.
                        return self.settle(held, sent, ServiceError::LeaseLost).await;
                    }
                    if account_index == 1 && reasons.first().is_some_and(|reason| reason.condition_failed()) {
                        tracing::info!(asset = ?receipt.trade.as_ref().map(|(order, _)| &order.asset), "catalog changed since it was cached; re-reading it");
                        if let Err(error) = self.catalog.refresh(&self.storage).await {
                            self.release(held).await;
                            return Err(error);
                        }
                    }
                    last_error = ServiceError::Unavailable(format!("transaction cancelled: {reasons:?}"));
                }
                Err(StorageError::Unavailable(detail)) => {
                    tracing::warn!(%detail, "commit outcome unknown; settling it");
                    return self.settle(held, sent, ServiceError::Unavailable(detail)).await;
                }
                Err(other) => {
                    self.release(held).await;
                    return Err(other.into());
                }
            }
        }
        self.settle(held, sent, last_error).await
    }

    /// The request id was used before: give the lease back (nothing of ours was written) and
    /// answer with what the first execution recorded.
    async fn replay(&self, held: &HeldLease, request_id: &RequestId, intent: &Intent) -> Result<Receipt, ServiceError> {
        self.release(held).await;
        self.recorded_outcome(&held.user, request_id, intent).await
    }

    /// The recorded outcome of `request_id`, if its parameters match `intent`.
    async fn recorded_outcome(
        &self,
        user: &UserId,
        request_id: &RequestId,
        intent: &Intent,
    ) -> Result<Receipt, ServiceError> {
        let internal = |error: model::MalformedItem| ServiceError::Internal(error.to_string());
        let record_key = model::request_key(user, request_id);
        let Some(item) = retry_safe(|| self.storage.get(record_key.clone())).await? else {
            // Expired and swept between the refused write and this read: the caller may retry.
            return Err(ServiceError::Unavailable(format!(
                "request record {request_id} vanished"
            )));
        };
        let record = model::request_record_from_item(&item).map_err(internal)?;
        if record.fingerprint != intent.fingerprint() {
            return Err(FieldError::new(
                "request_id",
                format!(
                    "was already used for {}; this request is {}",
                    record.fingerprint,
                    intent.fingerprint()
                ),
            )
            .into());
        }
        tracing::info!(%request_id, "replaying the recorded outcome");
        match record.outcome {
            RecordedOutcome::Refused { message } => Err(ServiceError::RefusedEarlier(message)),
            RecordedOutcome::Committed {
                entry_id,
                order_id,
                holding,
            } => {
                let entry_key = model::ledger_key(user, &entry_id);
                let entry = retry_safe(|| self.storage.get(entry_key.clone()))
                    .await?
                    .ok_or_else(|| ServiceError::Internal(format!("recorded ledger entry {entry_id} is missing")))?;
                let entry = model::ledger_from_item(&entry).map_err(internal)?;
                let trade = match (order_id, holding) {
                    (Some(order_id), Some(holding)) => {
                        let order =
                            self.storage.get(model::order_key(&order_id)).await?.ok_or_else(|| {
                                ServiceError::Internal(format!("recorded order {order_id} is missing"))
                            })?;
                        Some((model::order_from_item(&order).map_err(internal)?, holding))
                    }
                    _ => None,
                };
                Ok(Receipt {
                    entry,
                    trade,
                    replayed: true,
                })
            }
        }
    }

    /// Settles commits whose outcome is not known to be "applied": after a refusal by the
    /// account's condition (the lease was lost, or an earlier try of a commit landed and a retry
    /// of it was refused) or an unknown outcome (timeout, connection lost after sending).
    ///
    /// First it fences: releasing the lease by its id bumps the version, so no commit sent under
    /// this lease can apply from then on (and if the lease is no longer ours, none can anyway,
    /// since every commit is conditioned on its id). Then the ledger entry of each commit sent
    /// under the lease says whether it applied. None found: `if_none`.
    async fn settle(
        &self,
        held: &HeldLease,
        sent: Vec<Receipt>,
        if_none: ServiceError,
    ) -> Result<Receipt, ServiceError> {
        self.held_leases.remove(&held.lock_id);
        let release = model::release_lease(&held.user, &held.lock_id);
        match retry_safe(|| self.storage.write(release.clone())).await {
            Ok(()) | Err(StorageError::ConditionFailed { .. }) => {}
            Err(error) => {
                tracing::error!(%error, "commit outcome still unknown; the lease will expire by itself");
                return Err(ServiceError::Unavailable(format!("commit outcome unknown: {error}")));
            }
        }
        for receipt in sent.into_iter().rev() {
            let entry_key = model::ledger_key(&held.user, &receipt.entry.entry_id);
            if retry_safe(|| self.storage.get(entry_key.clone())).await?.is_some() {
                return Ok(receipt);
            }
        }
        if if_none == ServiceError::LeaseLost {
            tracing::warn!(lock_state = "EXPIRED", "commit fenced: the lease was no longer ours");
        }
        Err(if_none)
    }

    /// A refusal under the lease: nothing changes except a FAILED order for trades and the
    /// request record; the lease is given back in the same write.
    async fn roll_back(
        &self,
        held: &HeldLease,
        intent: &Intent,
        operation: &Operation,
        rejection: Rejection,
        request_id: Option<&RequestId>,
        sent: Vec<Receipt>,
    ) -> Result<Receipt, ServiceError> {
        tracing::info!(reason = %rejection, "refused under the lease");
        let now = self.clock.now();
        let order = match operation {
            Operation::Trade(trade) => {
                let total = trade.total().unwrap_or(Usd::ZERO);
                let mut order = order_of(held, trade, OrderStatus::Failed, trade.price, total, now);
                order.failure_reason = Some(rejection.to_string());
                Some(order)
            }
            _ => None,
        };
        let record = request_id.map(|request_id| {
            let outcome = RecordedOutcome::Refused {
                message: rejection.to_string(),
            };
            (request_id, self.record(intent, outcome, now))
        });
        if order.is_none() && record.is_none() && sent.is_empty() {
            self.release(held).await;
            return Err(rejection_error(rejection));
        }
        self.held_leases.remove(&held.lock_id);
        let items = model::record_refusal(
            &held.user,
            &held.lock_id,
            order.as_ref(),
            record.as_ref().map(|(request_id, record)| (*request_id, record)),
            now,
        );
        let item_count = items.len();
        match self.storage.transact(items, None).await {
            Ok(()) => Err(rejection_error(rejection)),
            Err(StorageError::TransactionCanceled { reasons })
                if request_id.is_some() && model::request_record_refused(item_count, true, &reasons) =>
            {
                self.replay(held, request_id.expect("checked above"), intent).await
            }
            // A commit sent earlier under this lease may have landed late: settle it first.
            Err(_) if !sent.is_empty() => {
                let if_none = if request_id.is_some() {
                    ServiceError::LeaseLost
                } else {
                    rejection_error(rejection)
                };
                self.settle(held, sent, if_none).await
            }
            // With a request id the answer must be definite: another attempt of this id may be
            // committing (the lease was lost), or storage may have applied the refusal record.
            Err(StorageError::TransactionCanceled { .. }) if request_id.is_some() => {
                self.release(held).await;
                Err(ServiceError::LeaseLost)
            }
            Err(StorageError::Unavailable(detail)) if request_id.is_some() => {
                self.release(held).await;
                Err(ServiceError::Unavailable(detail))
            }
            Err(error) => {
                tracing::warn!(%error, "could not record the refusal; releasing the lease alone");
                self.release(held).await;
                Err(rejection_error(rejection))
            }
        }
    }

    /// Releases every lease this process still holds; called on shutdown after draining.
    pub async fn release_held_leases(&self) -> usize {
        let leases = self.held_leases.drain();
        let count = leases.len();
        for (lock_id, user) in leases {
            if let Err(error) = self.storage.write(model::release_lease(&user, &lock_id)).await {
                tracing::warn!(%error, %user, %lock_id, "could not release a lease at shutdown; it will expire");
            }
        }
        count
    }

    // -----------------------------------------------------------------------------------------
    // Reads

    pub async fn account(&self, user: &UserId) -> Result<Account, ServiceError> {
        let item = self.storage.get(model::account_key(user)).await?;
        let account = item
            .as_ref()
            .map(model::account_from_item)
            .transpose()
            .map_err(|error| ServiceError::Internal(error.to_string()))?
            .filter(|account| account.exists);
        account.ok_or_else(|| ServiceError::NotFound(format!("Account {user} not found")))
    }

    pub async fn order(&self, order_id: &str) -> Result<Order, ServiceError> {
        let Ok(order_id) = uuid::Uuid::try_parse(order_id) else {
            return Err(FieldError::new("order_id", "must be a UUID").into());
        };
        let order_id = order_id.hyphenated().to_string();
        let item = self.storage.get(model::order_key(&order_id)).await?;
        let item = item.ok_or_else(|| ServiceError::NotFound(format!("Order {order_id} not found")))?;
        model::order_from_item(&item).map_err(|error| ServiceError::Internal(error.to_string()))
    }

    pub async fn orders(&self, user: &UserId, page_size: u32, cursor: &str) -> Result<PageOf<Order>, ServiceError> {
        self.user_page(user, UserCollection::Orders, page_size, cursor, model::order_from_item)
            .await
    }

    pub async fn ledger(
        &self,
        user: &UserId,
        page_size: u32,
        cursor: &str,
    ) -> Result<PageOf<LedgerEntry>, ServiceError> {
        self.user_page(user, UserCollection::Ledger, page_size, cursor, model::ledger_from_item)
            .await
    }

    async fn user_page<T>(
        &self,
        user: &UserId,
        collection: UserCollection,
        page_size: u32,
        cursor: &str,
        parse: fn(&crate::storage::Item) -> Result<T, model::MalformedItem>,
    ) -> Result<PageOf<T>, ServiceError> {
        let limit = match page_size {
            0 => PAGE_SIZE_DEFAULT,
            1..=PAGE_SIZE_MAX => page_size,
            _ => return Err(FieldError::new("page_size", format!("must be at most {PAGE_SIZE_MAX}")).into()),
        };
        let invalid_cursor =
            || ServiceError::from(FieldError::new("page_token", "is not a cursor this service issued"));
        let after = match cursor {
            "" => None,
            cursor => Some(
                URL_SAFE_NO_PAD
                    .decode(cursor)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .ok_or_else(invalid_cursor)?,
            ),
        };
        // One item more than the page: its presence says whether there is a next page, so the
        // last page never ends in a cursor to an empty one.
        let query = model::user_page_query(user, collection, limit + 1, after).ok_or_else(invalid_cursor)?;
        self.account(user).await?;
        let page = self.storage.query(query).await?;
        let more = page.items.len() > limit as usize;
        let items = page
            .items
            .iter()
            .take(limit as usize)
            .map(|item| {
                let sort_key = match item.get("sk") {
                    Some(crate::storage::Value::S(sort_key)) => sort_key.clone(),
                    _ => String::new(),
                };
                parse(item).map(|parsed| (parsed, sort_key))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| ServiceError::Internal(error.to_string()))?;
        let next_cursor = more
            .then(|| {
                items
                    .last()
                    .map(|(_, sort_key)| URL_SAFE_NO_PAD.encode(sort_key.as_bytes()))
            })
            .flatten();
        let items = items.into_iter().map(|(parsed, _)| parsed).collect();
        Ok(PageOf { items, next_cursor })
    }

    // -----------------------------------------------------------------------------------------
    // Asset catalog

    pub async fn assets(&self) -> Result<Vec<Asset>, ServiceError> {
        self.catalog.refresh(&self.storage).await?;
        Ok(self.catalog.all())
    }

    pub async fn upsert_asset(&self, asset: Asset) -> Result<Asset, ServiceError> {
        self.storage.put(model::put_asset(&asset, false)).await?;
        self.catalog.remember(asset.clone());
        Ok(asset)
    }

    /// Writes each asset that does not exist yet, then loads the catalog.
    pub async fn seed_catalog(&self, assets: &[Asset]) -> Result<(), ServiceError> {
        for asset in assets {
            match retry_safe(|| self.storage.put(model::put_asset(asset, true))).await {
                Ok(()) | Err(StorageError::ConditionFailed { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        let mut attempts = SAFE_RETRY_ATTEMPTS;
        loop {
            match self.catalog.refresh(&self.storage).await {
                Err(ServiceError::Unavailable(_)) if attempts > 1 => attempts -= 1,
                result => return result,
            }
            tokio::time::sleep(SAFE_RETRY_DELAY).await;
        }
    }
}

fn rejection_error(rejection: Rejection) -> ServiceError {
    match rejection {
        Rejection::AccountNotFound => ServiceError::NotFound("Account not found".to_owned()),
        other => ServiceError::Rejected(other),
    }
}

/// A new order for `trade` under `held`'s user, with a fresh time-ordered id.
fn order_of(held: &HeldLease, trade: &Trade, status: OrderStatus, price: Price, total: Usd, now: u64) -> Order {
    Order {
        order_id: uuid::Uuid::now_v7().to_string(),
        user_id: held.user.clone(),
        side: trade.side,
        asset: trade.asset.clone(),
        quantity: trade.quantity,
        limit_price: trade.limit_price,
        status,
        price,
        total,
        failure_reason: None,
        created_at: now,
    }
}

/// The ledger entry, and for trades the CONFIRMED order, that a decision commits.
fn records_of(
    held: &HeldLease,
    operation: &Operation,
    decision: &Decision,
    request_id: Option<&RequestId>,
    now: u64,
) -> (LedgerEntry, Option<Order>) {
    let entry_id = uuid::Uuid::now_v7().to_string();
    let (kind, trade_records) = match (operation, &decision.trade) {
        (Operation::Deposit(_), _) => (EntryKind::Deposit, None),
        (Operation::Withdraw(_), _) => (EntryKind::Withdrawal, None),
        (Operation::Trade(trade), Some(effect)) => {
            let order = order_of(held, trade, OrderStatus::Confirmed, effect.price, effect.total, now);
            let ledger_trade = LedgerTrade {
                asset: effect.asset.clone(),
                quantity_delta: effect.quantity_delta,
                order_id: order.order_id.clone(),
            };
            let kind = match trade.side {
                TradeSide::Buy => EntryKind::Buy,
                TradeSide::Sell => EntryKind::Sell,
            };
            (kind, Some((order, ledger_trade)))
        }
        (Operation::Trade(_), None) => unreachable!("a trade decision always carries its effect"),
    };
    let (order, ledger_trade) = trade_records.unzip();
    let entry = LedgerEntry {
        entry_id,
        user_id: held.user.clone(),
        kind,
        cash_delta: decision.cash_delta,
        cash_after: decision.cash,
        trade: ledger_trade,
        created_at: now,
        request_id: request_id.map(|request_id| request_id.as_str().to_owned()),
        sequence: held.account.version + 1,
    };
    (entry, order)
}
