//! Decide and commit under a held lease. Each attempt decides on the account read with the
//! lease and sends one fenced transaction that writes the account, the ledger entry, the
//! orders and the request record and releases the lease. Attempts repeat only while nothing
//! was written (a transaction conflict, a catalog price that moved), and the attempts end in
//! exactly one [`Ending`], which `decide_and_commit` turns into the reply and the one way the
//! lease is given back.

use crate::core::decide::{Rejection, decide};
use crate::core::records::{EntryKind, LedgerEntry, LedgerTrade, Order, OrderStatus, RecordedOutcome};
use crate::core::time::utc_day;
use crate::core::{Decision, Millis, Operation, Price, RequestId, Trade, TradeSide, Usd};
use crate::storage::model::{self, TransactionPart};
use crate::storage::{CancellationReason, StorageError};
use crate::telemetry::metrics;

use super::{
    COMMIT_ATTEMPTS_MAX, COMMIT_LEASE_MARGIN, CommitHook, HeldLease, Intent, Missing, Receipt, ServiceError,
    TransactionCoordinator,
};

/// How the commit attempts under one lease ended.
#[derive(Debug)]
pub(super) enum Ending {
    /// The commit applied, and released the lease with it.
    Committed(Box<Receipt>),
    /// The decision refused the operation: roll back.
    Refused { operation: Operation, rejection: Rejection },
    /// The request id's record exists: an earlier execution (or a landed try of this one)
    /// recorded the outcome to answer with.
    Duplicate(RequestId),
    /// Stopped with `error` before a known outcome: any commit sent meanwhile must be settled.
    Stopped(ServiceError),
}

impl TransactionCoordinator {
    /// Decides on the account read with the lease and commits, or rolls back. Every ending
    /// gives the lease back exactly once, here.
    pub(super) async fn decide_and_commit(
        &self,
        held: &HeldLease,
        intent: &Intent,
        request_id: Option<&RequestId>,
    ) -> Result<Receipt, ServiceError> {
        // Every commit sent under this lease: a late try of an earlier one may still land, so an
        // unclear ending looks for all of them (see `settle`).
        let mut sent: Vec<Receipt> = Vec::new();
        let result = match self.attempt_commits(held, intent, request_id, &mut sent).await {
            Ending::Committed(receipt) => {
                let receipt = *receipt;
                self.held_leases.remove(&held.lock_id);
                tracing::info!(lock_state = "RELEASED", transaction_id = %receipt.entry.entry_id, cash = %receipt.entry.cash_after, "committed");
                metrics::committed(intent.name());
                Ok(receipt)
            }
            Ending::Refused { operation, rejection } => {
                metrics::refused(intent.name(), &rejection);
                self.roll_back(held, intent, &operation, rejection, request_id, sent)
                    .await
            }
            Ending::Duplicate(request_id) => self.replay(held, &request_id, intent).await,
            Ending::Stopped(error) if sent.is_empty() => {
                self.release(held).await;
                Err(error)
            }
            Ending::Stopped(error) => self.settle(held, sent, error).await,
        };
        metrics::lease_held(intent.name(), held.acquired.elapsed());
        result
    }

    /// Up to `COMMIT_ATTEMPTS_MAX` decide-and-commit rounds; each commit sent is pushed on
    /// `sent` before it goes out.
    async fn attempt_commits(
        &self,
        held: &HeldLease,
        intent: &Intent,
        request_id: Option<&RequestId>,
        sent: &mut Vec<Receipt>,
    ) -> Ending {
        let mut last_error = ServiceError::Internal("no commit attempted".to_owned());
        let mut catalog_checked = false;
        for _attempt in 0..COMMIT_ATTEMPTS_MAX {
            let now = self.clock.now();
            if now + COMMIT_LEASE_MARGIN.as_millis() as u64 >= held.expires_at {
                return Ending::Stopped(ServiceError::LeaseLost);
            }
            let operation = match self.operation(intent) {
                Ok(operation) => operation,
                Err(error) => return Ending::Stopped(error),
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
                    let refresh = self
                        .catalog
                        .refresh_if_older_than(&self.storage, super::CATALOG_REFRESH_INTERVAL);
                    if let Err(error) = refresh.await {
                        return Ending::Stopped(error);
                    }
                    continue;
                }
                Err(rejection) => return Ending::Refused { operation, rejection },
            };
            let (receipt, mut transaction) = self.prepare_commit(held, intent, &operation, &decision, request_id, now);
            if let Some(CommitHook(pause)) = &self.config.before_commit {
                pause(&held.user).await;
            }
            sent.push(receipt.clone());
            // The ledger entry's id doubles as the idempotency token where the engine honours
            // one; correctness never depends on it (see `settle`).
            let token = Some(receipt.entry.entry_id.clone());
            let reasons = match self
                .storage
                .transact(std::mem::take(&mut transaction.items), token)
                .await
            {
                Ok(()) => return Ending::Committed(Box::new(receipt)),
                Err(StorageError::TransactionCanceled { reasons }) => reasons,
                Err(error) => {
                    tracing::warn!(%error, "commit outcome unknown; settling it");
                    return Ending::Stopped(error.into());
                }
            };
            if let Some(ending) = self.after_cancellation(&transaction, &reasons, request_id).await {
                return ending;
            }
            last_error = ServiceError::Unavailable(format!("transaction cancelled: {reasons:?}"));
        }
        Ending::Stopped(last_error)
    }

    /// What a cancelled commit's reasons say: an ending, or None to try again (nothing was
    /// written; the catalog is re-read first if the price check failed).
    async fn after_cancellation(
        &self,
        transaction: &model::NamedItems,
        reasons: &[CancellationReason],
        request_id: Option<&RequestId>,
    ) -> Option<Ending> {
        match transaction.refused_part(reasons)? {
            // The key was used before (or this very commit landed and its retry was refused):
            // the record says what happened.
            TransactionPart::RequestRecord => Some(Ending::Duplicate(
                request_id.expect("a request record implies a request id").clone(),
            )),
            // Fenced, or our own commit already landed and a retry of it was refused.
            TransactionPart::Account => Some(Ending::Stopped(ServiceError::LeaseLost)),
            TransactionPart::CatalogCheck => {
                tracing::info!("catalog changed since it was cached; re-reading it");
                self.catalog.refresh(&self.storage).await.err().map(Ending::Stopped)
            }
        }
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
                    .ok_or_else(|| ServiceError::NotFound(Missing::Asset(request.asset.clone())))?;
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

    /// The reply a commit of `decision` will give, and the transaction that writes it.
    pub(super) fn prepare_commit(
        &self,
        held: &HeldLease,
        intent: &Intent,
        operation: &Operation,
        decision: &Decision,
        request_id: Option<&RequestId>,
        now: Millis,
    ) -> (Receipt, model::NamedItems) {
        assert_postconditions(held, decision);
        let (entry, order) = records_of(held, operation, decision, request_id, now);
        let holding = decision.trade.as_ref().map(|effect| effect.holding);
        let record = request_id.map(|request_id| {
            let outcome = RecordedOutcome::Committed {
                entry_id: entry.entry_id.clone(),
                order_id: order.as_ref().map(|order| order.order_id.clone()),
                holding,
            };
            (request_id, self.record(intent, outcome, now))
        });
        let transaction = model::commit(&model::Commit {
            user: &held.user,
            lock_id: &held.lock_id,
            read: &held.account,
            decision,
            entry: &entry,
            order: order.as_ref(),
            record: record.as_ref().map(|(request_id, record)| (*request_id, record)),
            now,
        });
        let receipt = Receipt {
            trade: order.zip(holding),
            entry,
            replayed: false,
        };
        (receipt, transaction)
    }
}

/// The decision's postconditions, checked where the state changes: cash moves by exactly the
/// delta, nothing goes negative, and the holding moves by exactly the traded quantity.
fn assert_postconditions(held: &HeldLease, decision: &Decision) {
    debug_assert_eq!(
        decision.cash.decimal(),
        held.account.cash.decimal() + decision.cash_delta,
        "cash after = cash before + delta"
    );
    debug_assert!(decision.cash >= Usd::ZERO, "cash never goes negative");
    if let Some(effect) = &decision.trade {
        debug_assert_eq!(
            effect.holding.decimal(),
            held.account.holding(&effect.asset).decimal() + effect.quantity_delta,
            "holding after = holding before + quantity delta"
        );
        debug_assert!(
            !effect.holding.decimal().is_sign_negative(),
            "holdings never go negative"
        );
    }
}

/// A new order for `trade` under `held`'s user, with a fresh time-ordered id.
pub(super) fn order_of(
    held: &HeldLease,
    trade: &Trade,
    status: OrderStatus,
    price: Price,
    total: Usd,
    now: Millis,
) -> Order {
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
        created_at_ms: now,
    }
}

/// The ledger entry, and for trades the CONFIRMED order, that a decision commits.
fn records_of(
    held: &HeldLease,
    operation: &Operation,
    decision: &Decision,
    request_id: Option<&RequestId>,
    now: Millis,
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
        created_at_ms: now,
        request_id: request_id.map(|request_id| request_id.as_str().to_owned()),
        sequence: held.account.version + 1,
    };
    (entry, order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::AssetSymbol;
    use crate::core::time::ManualClock;
    use crate::service::TradeRequest;
    use crate::service::testing::{LEASE, coordinator, quantity, usd, user};

    /// A commit writes the account and releases the lease in one request: two in all.
    #[tokio::test]
    async fn a_commit_writes_and_releases_in_one_request() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        let before = coordinator.storage().requests();
        let receipt = coordinator
            .mutate(&user("a"), Intent::Deposit(usd("100")), None, None)
            .await
            .unwrap();
        assert_eq!(receipt.entry.cash_after, usd("100"));
        assert_eq!(
            coordinator.storage().requests() - before,
            2,
            "acquire, then commit-and-release"
        );
        let next = coordinator.acquire(&user("a"), "DEPOSIT", LEASE, true, None).await;
        assert!(next.is_ok(), "the commit released the lease: {next:?}");
    }

    /// Too little lease left for a commit: nothing is sent, the lease is given back.
    #[tokio::test]
    async fn no_commit_is_sent_within_the_lease_margin() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        let held = coordinator
            .acquire(&user("b"), "DEPOSIT", LEASE, false, None)
            .await
            .unwrap();
        clock.advance(LEASE - COMMIT_LEASE_MARGIN);
        let error = coordinator
            .decide_and_commit(&held, &Intent::Deposit(usd("5")), None)
            .await
            .unwrap_err();
        assert_eq!(error, ServiceError::LeaseLost);
        assert!(
            matches!(coordinator.account(&user("b")).await, Err(ServiceError::NotFound(_))),
            "nothing was written"
        );
        assert!(
            coordinator
                .acquire(&user("b"), "DEPOSIT", LEASE, false, None)
                .await
                .is_ok()
        );
    }

    /// The same request id twice: the second call replays the first's receipt.
    #[tokio::test]
    async fn a_duplicate_request_id_replays_the_commit() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        let request_id = RequestId::parse_optional("request_id", "dup-1").unwrap();
        let first = coordinator
            .mutate(&user("c"), Intent::Deposit(usd("7")), request_id.clone(), None)
            .await
            .unwrap();
        let second = coordinator
            .mutate(&user("c"), Intent::Deposit(usd("7")), request_id, None)
            .await
            .unwrap();
        assert!(second.replayed && !first.replayed);
        assert_eq!(second.entry.entry_id, first.entry.entry_id);
        assert_eq!(coordinator.account(&user("c")).await.unwrap().cash, usd("7"));
    }

    /// A price changed behind the cache fails the commit's catalog check; the catalog is re-read
    /// and the trade commits at the stored price.
    #[tokio::test]
    async fn a_stale_cached_price_is_re_read_before_committing() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        coordinator
            .mutate(&user("d"), Intent::Deposit(usd("1000")), None, None)
            .await
            .unwrap();
        let mut sol = coordinator
            .catalog
            .cached(&AssetSymbol::parse("asset", "SOL").unwrap())
            .unwrap();
        sol.price = Price::parse("price", "150").unwrap();
        coordinator.storage().put(model::put_asset(&sol, false)).await.unwrap();
        let trade = TradeRequest {
            side: TradeSide::Buy,
            asset: sol.symbol.clone(),
            quantity: quantity("2"),
            limit_price: None,
        };
        let receipt = coordinator
            .mutate(&user("d"), Intent::Trade(trade), None, None)
            .await
            .unwrap();
        let (order, holding) = receipt.trade.unwrap();
        assert_eq!(order.price, sol.price);
        assert_eq!(holding, quantity("2"));
        assert_eq!(receipt.entry.cash_after, usd("700"));
    }
}
