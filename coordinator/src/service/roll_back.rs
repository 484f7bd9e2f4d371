//! Roll back: the decision refused a call under the lease. Nothing of it changes the account; a
//! refused trade leaves a FAILED order, a call with a request id leaves its refusal record, both
//! in the batch's one transaction (which also gives the lease back or keeps it for the next
//! calls), and the call's answer is the refusal.

use std::time::Duration;

use crate::core::ops::{self, Quote};
use crate::core::records::{RecordedOutcome, RefusalCode};
use crate::core::{Millis, Rejection};

use super::commit::{Answer, CallWrites};
use super::queue::Waiter;
use super::{HeldLease, Missing, ServiceError};

/// A refused call's FAILED order (trades), refusal record (with a request id, kept for
/// `retention`) and answer.
pub(super) fn refused_writes(
    held: &HeldLease,
    waiter: &Waiter,
    quote: Option<&Quote>,
    rejection: &Rejection,
    now: Millis,
    retention: Duration,
) -> CallWrites {
    let (operation, request_id) = (&waiter.operation, waiter.request_id.as_ref());
    tracing::info!(reason = %rejection, operation = operation.name(), "refused under the lease");
    let message = rejection.to_string();
    let code = match rejection {
        Rejection::AccountNotFound => RefusalCode::NotFound,
        _ => RefusalCode::FailedPrecondition,
    };
    let record = request_id.map(|id| {
        (
            id.clone(),
            ops::request_record(operation, RecordedOutcome::Refused { message, code }, now, retention),
        )
    });
    let order = ops::failed_order(operation, quote, rejection, waiter.origin(&held.user, now));
    CallWrites {
        entry: None,
        answer: Answer::Refuse {
            error: refusal_error(held, rejection.clone()),
            recorded: record.is_some(),
            unrecorded_order: order.clone().filter(|_| record.is_none()).map(Box::new),
        },
        order,
        order_rewritten: false,
        withdrawal: None,
        record,
    }
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
    use crate::core::RequestId;
    use crate::core::time::ManualClock;
    use crate::service::testing::{LEASE, coordinator, refused_sell_leaves_one_failed_order, usd, user};
    use crate::service::{Operation, PageRequest};

    /// A refusal with a request id records it and frees the lease; the retry replays it.
    #[tokio::test]
    async fn a_refusal_is_recorded_and_the_lease_freed() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        coordinator
            .mutate(&user("a"), Operation::Deposit(usd("10")), None, None)
            .await
            .unwrap();
        let request_id = RequestId::parse_optional("request_id", "w-1").unwrap();
        let refused = coordinator
            .mutate(&user("a"), Operation::Withdraw(usd("20")), request_id.clone(), None)
            .await
            .unwrap_err();
        assert!(matches!(
            refused,
            ServiceError::Rejected(Rejection::InsufficientBalance { .. })
        ));
        let held = coordinator.acquire(&user("a"), "WITHDRAWAL", LEASE, true, None).await;
        assert!(held.is_ok(), "the refusal released the lease: {held:?}");
        coordinator.release(&held.unwrap()).await;
        let replayed = coordinator
            .mutate(&user("a"), Operation::Withdraw(usd("20")), request_id, None)
            .await
            .unwrap_err();
        assert_eq!(replayed, ServiceError::RefusedEarlier(refused.to_string()));
        assert_eq!(coordinator.account(&user("a")).await.unwrap().cash, usd("10"));
    }

    /// Issue 18: a refusal recorded as NOT_FOUND replays as NOT_FOUND with the same message, not
    /// FAILED_PRECONDITION. A withdrawal with a request id decided before a deposit that opens
    /// the account, in one batch, is refused "Account … not found" and recorded so.
    #[tokio::test]
    async fn a_replayed_not_found_keeps_its_code() {
        let coordinator = coordinator(&ManualClock::starting_at(1_000_000)).await;
        let held = coordinator
            .acquire(&user("nf"), "BATCH", LEASE, false, None)
            .await
            .unwrap();
        let request_id = RequestId::parse_optional("request_id", "nf-1").unwrap();
        let call = |id: usize, operation: Operation, request_id: Option<RequestId>| {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let waiter = crate::service::queue::Waiter {
                principal: crate::core::Principal::local(),
                operation,
                request_id,
                state: Default::default(),
                reply,
                wait_until: tokio::time::Instant::now() + LEASE,
                on_timeout: ServiceError::Busy,
            };
            ((id, waiter), answer)
        };
        let (withdrawal, refused) = call(0, Operation::Withdraw(usd("5")), request_id.clone());
        let (deposit, deposited) = call(1, Operation::Deposit(usd("10")), None);
        coordinator.commit_batch(held, vec![withdrawal, deposit]).await;
        let first = refused.await.unwrap().unwrap_err();
        assert_eq!(first, ServiceError::NotFound(Missing::Account(user("nf"))));
        deposited.await.unwrap().unwrap();
        let replayed = coordinator
            .mutate(&user("nf"), Operation::Withdraw(usd("5")), request_id, None)
            .await
            .unwrap_err();
        assert_eq!(replayed, first, "the same code and message");
        assert_eq!(replayed.to_string(), "Account nf not found");
    }

    /// A refused trade leaves one FAILED order with its reason, and no ledger entry.
    #[tokio::test]
    async fn a_refused_trade_leaves_a_failed_order() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        coordinator
            .mutate(&user("b"), Operation::Deposit(usd("10")), None, None)
            .await
            .unwrap();
        refused_sell_leaves_one_failed_order(&coordinator, &user("b")).await;
        let ledger = coordinator.ledger(&user("b"), PageRequest::first(10)).await.unwrap();
        assert_eq!(ledger.items.len(), 1, "only the deposit");
    }
}
