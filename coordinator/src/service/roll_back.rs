//! Roll back: the decision refused the operation under the lease. Nothing changes on the
//! account; a trade leaves a FAILED order, a request id leaves its refusal record, and the lease
//! is given back in the same transaction.

use crate::core::decide::Rejection;
use crate::core::records::{Order, OrderStatus, RecordedOutcome};
use crate::core::{Operation, RequestId, Usd};
use crate::storage::StorageError;
use crate::storage::model::{self, TransactionPart};
use crate::telemetry::metrics;

use super::commit::order_of;
use super::{HeldLease, Intent, Missing, Receipt, ServiceError, TransactionCoordinator};

impl TransactionCoordinator {
    /// Records the refusal and releases the lease in one write; `sent` are the commits sent
    /// earlier under this lease, one of which may still land (then it, not the refusal, is the
    /// answer).
    pub(super) async fn roll_back(
        &self,
        held: &HeldLease,
        intent: &Intent,
        operation: &Operation,
        rejection: Rejection,
        request_id: Option<&RequestId>,
        sent: Vec<Receipt>,
    ) -> Result<Receipt, ServiceError> {
        tracing::info!(reason = %rejection, "refused under the lease");
        metrics::rolled_back(intent.name());
        let now = self.clock.now();
        let order = failed_order(held, operation, &rejection, now);
        let message = rejection.to_string();
        let record = request_id.map(|id| (id, self.record(intent, RecordedOutcome::Refused { message }, now)));
        let refused = refusal_error(held, rejection);
        if order.is_none() && record.is_none() && sent.is_empty() {
            self.release(held).await;
            return Err(refused);
        }
        self.held_leases.remove(&held.lock_id);
        let mut transaction = model::record_refusal(
            &held.user,
            &held.lock_id,
            order.as_ref(),
            record.as_ref().map(|(request_id, record)| (*request_id, record)),
            now,
        );
        let outcome = self
            .storage
            .transact(std::mem::take(&mut transaction.items), None)
            .await;
        match outcome {
            // The key was used before (or a commit sent earlier under this lease landed with
            // its record): the record says what happened.
            Err(StorageError::TransactionCanceled { ref reasons })
                if transaction.refused_part(reasons) == Some(TransactionPart::RequestRecord) =>
            {
                self.replay(held, request_id.expect("a request record implies a request id"), intent)
                    .await
            }
            // A commit sent earlier under this lease may have landed late: settle it first. If
            // none did, the refusal stands (without a request id) or, with one, the answer
            // must be definite and the lease is gone: LeaseLost.
            _ if !sent.is_empty() => {
                let if_none = match (&outcome, request_id) {
                    (Ok(()), _) | (Err(_), None) => refused,
                    (Err(_), Some(_)) => ServiceError::LeaseLost,
                };
                self.settle(held, sent, if_none).await
            }
            Ok(()) => Err(refused),
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
                Err(refused)
            }
        }
    }
}

/// For a refused trade, the FAILED order that records it; nothing for cash operations.
fn failed_order(held: &HeldLease, operation: &Operation, rejection: &Rejection, now: u64) -> Option<Order> {
    let Operation::Trade(trade) = operation else {
        return None;
    };
    let total = trade.price.total(trade.quantity).unwrap_or(Usd::ZERO);
    let mut order = order_of(held, trade, OrderStatus::Failed, trade.price, total, now);
    order.failure_reason = Some(rejection.to_string());
    Some(order)
}

/// The error a refusal answers with.
fn refusal_error(held: &HeldLease, rejection: Rejection) -> ServiceError {
    match rejection {
        Rejection::AccountNotFound => ServiceError::NotFound(Missing::Account(held.user.clone())),
        other => ServiceError::Rejected(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::time::ManualClock;
    use crate::core::{AssetSymbol, TradeSide};
    use crate::service::testing::{LEASE, coordinator, quantity, usd, user};
    use crate::service::{PageRequest, TradeRequest};

    /// A refusal with a request id records it and frees the lease; the retry replays it.
    #[tokio::test]
    async fn a_refusal_is_recorded_and_the_lease_freed() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        coordinator
            .mutate(&user("a"), Intent::Deposit(usd("10")), None, None)
            .await
            .unwrap();
        let request_id = RequestId::parse_optional("request_id", "w-1").unwrap();
        let refused = coordinator
            .mutate(&user("a"), Intent::Withdraw(usd("20")), request_id.clone(), None)
            .await
            .unwrap_err();
        assert!(matches!(
            refused,
            ServiceError::Rejected(Rejection::InsufficientBalance { .. })
        ));
        assert!(
            coordinator
                .acquire(&user("a"), "WITHDRAWAL", LEASE, true, None)
                .await
                .is_ok()
        );
        clock.advance(LEASE);
        let replayed = coordinator
            .mutate(&user("a"), Intent::Withdraw(usd("20")), request_id, None)
            .await
            .unwrap_err();
        assert_eq!(replayed, ServiceError::RefusedEarlier(refused.to_string()));
        assert_eq!(coordinator.account(&user("a")).await.unwrap().cash, usd("10"));
    }

    /// A refused trade leaves one FAILED order with its reason, and no ledger entry.
    #[tokio::test]
    async fn a_refused_trade_leaves_a_failed_order() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        coordinator
            .mutate(&user("b"), Intent::Deposit(usd("10")), None, None)
            .await
            .unwrap();
        let trade = TradeRequest {
            side: TradeSide::Sell,
            asset: AssetSymbol::parse("asset", "SOL").unwrap(),
            quantity: quantity("1"),
            limit_price: None,
        };
        let refused = coordinator
            .mutate(&user("b"), Intent::Trade(trade), None, None)
            .await
            .unwrap_err();
        assert!(matches!(
            refused,
            ServiceError::Rejected(Rejection::InsufficientHoldings { .. })
        ));
        let orders = coordinator.orders(&user("b"), PageRequest::first(10)).await.unwrap();
        assert_eq!(orders.items.len(), 1);
        assert_eq!(orders.items[0].status, OrderStatus::Failed);
        assert_eq!(
            orders.items[0].failure_reason.as_deref(),
            Some(refused.to_string().as_str())
        );
        let ledger = coordinator.ledger(&user("b"), PageRequest::first(10)).await.unwrap();
        assert_eq!(ledger.items.len(), 1, "only the deposit");
    }
}
