//! Withdrawals that settle later, on the service side: Withdraw with settlement PENDING holds
//! the amount, SettleWithdrawal lets it leave, ReturnWithdrawal gives it back. They run through
//! the queue, the lease and the batch commit like every single-account operation
//! (`core::ops::withdraw` decides them). What this file adds: a settlement or return names a
//! withdrawal by id, so it is looked up under its user before anything queues (NOT_FOUND for an
//! id that is not one of the user's withdrawals).

use std::sync::Arc;

use tokio::time::Instant;

use super::{Missing, Operation, Receipt, ServiceError, TransactionCoordinator, retry_safe};
use crate::core::ops::{PendingRequest, ReturnRequest, SettleRequest};
use crate::core::{Principal, RequestId, Usd, UserId, WithdrawalId};
use crate::storage::model;

impl TransactionCoordinator {
    /// A withdrawal that settles later: `amount` is held and counted against today's limit.
    pub async fn withdraw_pending(
        self: &Arc<Self>,
        principal: &Principal,
        user: &UserId,
        amount: Usd,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        let request = PendingRequest {
            amount,
            withdrawal_id: WithdrawalId::new(),
            placed_by: principal.clone(),
        };
        self.mutate_as(
            principal,
            user,
            Operation::WithdrawPending(request),
            request_id,
            deadline,
        )
        .await
    }

    /// Completes `user`'s pending withdrawal: its cash leaves.
    pub async fn settle_withdrawal(
        self: &Arc<Self>,
        principal: &Principal,
        user: &UserId,
        request: SettleRequest,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        self.check_withdrawal_of(user, &request.withdrawal_id).await?;
        self.mutate_as(principal, user, Operation::Settle(request), request_id, deadline)
            .await
    }

    /// Gives back `user`'s pending withdrawal: nothing leaves.
    pub async fn return_withdrawal(
        self: &Arc<Self>,
        principal: &Principal,
        user: &UserId,
        request: ReturnRequest,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        self.check_withdrawal_of(user, &request.withdrawal_id).await?;
        self.mutate_as(principal, user, Operation::Return(request), request_id, deadline)
            .await
    }

    /// NOT_FOUND unless `withdrawal_id` is one of `user`'s withdrawals (its record is kept
    /// under the user, so another user's id is simply not there).
    async fn check_withdrawal_of(&self, user: &UserId, withdrawal_id: &WithdrawalId) -> Result<(), ServiceError> {
        let key = model::withdrawal_key(user, withdrawal_id);
        match retry_safe(|| self.storage.get(key.clone())).await? {
            Some(_) => Ok(()),
            None => Err(ServiceError::NotFound(Missing::Withdrawal(withdrawal_id.to_string()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::core::records::{EntryKind, WithdrawalStatus};
    use crate::core::time::ManualClock;
    use crate::core::{Clock, Memo, Rejection};
    use crate::service::PageRequest;
    use crate::service::testing::{coordinator, usd, user};

    fn local() -> Principal {
        Principal::local()
    }

    fn id_of(receipt: &Receipt) -> WithdrawalId {
        receipt
            .entry
            .hold
            .as_ref()
            .and_then(|hold| hold.withdrawal_id.clone())
            .expect("a withdrawal's entry names it")
    }

    /// Pending: held and counted against the day at once, nothing leaves; settled: the cash
    /// leaves once; returned: nothing leaves and the day's total comes back. Each ends once,
    /// another user's id is NOT_FOUND, and the audit finds the books in order.
    #[tokio::test]
    async fn a_pending_withdrawal_settles_or_returns_once() {
        let clock = ManualClock::starting_at(1_795_000_000_000);
        let coordinator = coordinator(&clock).await;
        let ann = user("ann");
        coordinator
            .deposit(&local(), &ann, usd("500"), None, None)
            .await
            .unwrap();
        let pending = coordinator
            .withdraw_pending(&local(), &ann, usd("200"), None, None)
            .await
            .unwrap();
        assert_eq!(pending.entry.kind, EntryKind::Hold);
        let id = id_of(&pending);
        let account = coordinator.account(&ann).await.unwrap();
        assert_eq!(
            (
                account.cash,
                account.available_cash(clock.now()),
                account.withdrawn_today
            ),
            (usd("500"), usd("300"), usd("200"))
        );
        let spend = coordinator.withdraw(&local(), &ann, usd("300.01"), None, None).await;
        assert!(matches!(
            spend,
            Err(ServiceError::Rejected(Rejection::InsufficientBalance { .. }))
        ));
        let settled = coordinator
            .settle_withdrawal(
                &local(),
                &ann,
                SettleRequest {
                    withdrawal_id: id.clone(),
                },
                None,
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            (settled.entry.kind, settled.entry.cash_after),
            (EntryKind::Withdrawal, usd("300"))
        );
        let twice = coordinator
            .settle_withdrawal(
                &local(),
                &ann,
                SettleRequest {
                    withdrawal_id: id.clone(),
                },
                None,
                None,
            )
            .await
            .unwrap_err();
        assert_eq!(twice.to_string(), format!("Withdrawal {id} is SETTLED"));
        let back = ReturnRequest {
            withdrawal_id: id.clone(),
            reason: Memo::parse("reason", "account closed").unwrap(),
        };
        let late = coordinator
            .return_withdrawal(&local(), &ann, back, None, None)
            .await
            .unwrap_err();
        assert!(matches!(
            late,
            ServiceError::Rejected(Rejection::WithdrawalNotPending {
                status: WithdrawalStatus::Settled,
                ..
            })
        ));

        let second = coordinator
            .withdraw_pending(
                &local(),
                &ann,
                usd("100"),
                Some(RequestId::parse_optional("r", "w-2").unwrap().unwrap()),
                None,
            )
            .await
            .unwrap();
        let second_id = id_of(&second);
        let stolen = coordinator
            .settle_withdrawal(
                &local(),
                &user("bob"),
                SettleRequest {
                    withdrawal_id: second_id.clone(),
                },
                None,
                None,
            )
            .await
            .unwrap_err();
        assert_eq!(
            stolen,
            ServiceError::NotFound(Missing::Withdrawal(second_id.to_string()))
        );
        let back = ReturnRequest {
            withdrawal_id: second_id.clone(),
            reason: Memo::parse("reason", "bounced").unwrap(),
        };
        let returned = coordinator
            .return_withdrawal(&local(), &ann, back, None, None)
            .await
            .unwrap();
        assert_eq!(
            (returned.entry.kind, returned.entry.cash_after),
            (EntryKind::Release, usd("300"))
        );
        let account = coordinator.account(&ann).await.unwrap();
        assert_eq!(
            (
                account.cash,
                account.available_cash(clock.now()),
                account.withdrawn_today
            ),
            (usd("300"), usd("300"), usd("200")),
            "the returned 100 no longer counts today"
        );
        let kinds: Vec<EntryKind> = coordinator
            .ledger(&ann, PageRequest::parse(10, "").unwrap())
            .await
            .unwrap()
            .items
            .iter()
            .map(|entry| entry.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                EntryKind::Release,
                EntryKind::Hold,
                EntryKind::Withdrawal,
                EntryKind::Hold,
                EntryKind::Deposit
            ]
        );
        let report = crate::audit::audit(coordinator.storage(), clock.now(), Duration::from_secs(600))
            .await
            .unwrap();
        assert!(report.is_clean(), "{report}");
    }
}
