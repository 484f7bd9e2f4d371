//! Settle what is not known: a commit whose reply was lost or refused after a try of it may have
//! landed, and a request id whose outcome was recorded by an earlier execution.

use crate::core::records::RecordedOutcome;
use crate::core::{FieldError, RequestId, UserId};
use crate::storage::{StorageError, model};
use crate::telemetry::metrics::{self, Settled};

use super::{HeldLease, Intent, Receipt, ServiceError, TransactionCoordinator, retry_safe};

impl TransactionCoordinator {
    /// Settles commits whose outcome is not known to be "applied": after a refusal by the
    /// account's condition (the lease was lost, or an earlier try of a commit landed and a retry
    /// of it was refused) or an unknown outcome (timeout, connection lost after sending).
    ///
    /// First it fences: releasing the lease by its id bumps the version, so no commit sent under
    /// this lease can apply from then on (and if the lease is no longer ours, none can anyway,
    /// since every commit is conditioned on its id). Then the ledger entry of each commit sent
    /// under the lease says whether it applied. None found: the outcome is known (not applied),
    /// so an unknown ending becomes `NotApplied` (ABORTED, safe to retry) and any other
    /// `if_none` stands.
    pub(super) async fn settle(
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
                metrics::unclear_commit(Settled::Unknown);
                tracing::error!(%error, "commit outcome still unknown; the lease will expire by itself");
                return Err(ServiceError::Unavailable(format!("commit outcome unknown: {error}")));
            }
        }
        for receipt in sent.into_iter().rev() {
            let entry_key = model::ledger_key(&held.user, &receipt.entry.entry_id);
            if retry_safe(|| self.storage.get(entry_key.clone())).await?.is_some() {
                metrics::unclear_commit(Settled::Applied);
                return Ok(receipt);
            }
        }
        Err(match if_none {
            ServiceError::LeaseLost => {
                metrics::fenced();
                tracing::warn!(lock_state = "EXPIRED", "commit fenced: the lease was no longer ours");
                ServiceError::LeaseLost
            }
            ServiceError::Unavailable(detail) => {
                metrics::unclear_commit(Settled::NotApplied);
                tracing::warn!(%detail, "commit fenced after an unknown outcome: it did not apply");
                ServiceError::NotApplied
            }
            other => other,
        })
    }

    /// The request id was used before: give the lease back (nothing of ours was written) and
    /// answer with what the first execution recorded.
    pub(super) async fn replay(
        &self,
        held: &HeldLease,
        request_id: &RequestId,
        intent: &Intent,
    ) -> Result<Receipt, ServiceError> {
        metrics::replayed(intent.name());
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
        let record_key = model::request_key(user, request_id);
        let Some(item) = retry_safe(|| self.storage.get(record_key.clone())).await? else {
            // Expired and swept between the refused write and this read: the caller may retry.
            return Err(ServiceError::Unavailable(format!(
                "request record {request_id} vanished"
            )));
        };
        let record = model::request_record_from_item(&item)?;
        if record.fingerprint != intent.fingerprint() {
            let reason = format!(
                "was already used for {}; this request is {}",
                record.fingerprint,
                intent.fingerprint()
            );
            return Err(FieldError::new("request_id", reason).into());
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
                let trade = match (order_id, holding) {
                    (Some(order_id), Some(holding)) => {
                        let order_key = model::order_key(&order_id);
                        let order = retry_safe(|| self.storage.get(order_key.clone()))
                            .await?
                            .ok_or_else(|| ServiceError::Internal(format!("recorded order {order_id} is missing")))?;
                        Some((model::order_from_item(&order)?, holding))
                    }
                    _ => None,
                };
                Ok(Receipt {
                    entry: model::ledger_from_item(&entry)?,
                    trade,
                    replayed: true,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::time::ManualClock;
    use crate::core::{Clock, Limits, Operation, decide::decide, time::utc_day};
    use crate::service::testing::{LEASE, coordinator, usd, user};

    /// A commit whose reply was lost but which landed is found and answered as committed.
    #[tokio::test]
    async fn a_landed_commit_is_found() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        let intent = Intent::Deposit(usd("30"));
        let held = coordinator
            .acquire(&user("a"), "DEPOSIT", LEASE, false, None)
            .await
            .unwrap();
        let now = clock.now();
        let operation = Operation::Deposit(usd("30"));
        let decision = decide(&held.account, &operation, &utc_day(now), &Limits::default()).unwrap();
        let (receipt, transaction) = coordinator.prepare_commit(&held, &intent, &operation, &decision, None, now);
        coordinator.storage().transact(transaction.items, None).await.unwrap();
        let settled = coordinator
            .settle(
                &held,
                vec![receipt.clone()],
                ServiceError::Unavailable("lost".to_owned()),
            )
            .await
            .unwrap();
        assert_eq!(settled.entry.entry_id, receipt.entry.entry_id);
        assert_eq!(coordinator.account(&user("a")).await.unwrap().cash, usd("30"));
    }

    /// Nothing landed: the answer says so (ABORTED, not "may have applied"), and the fence (a release by lock id) bumped the
    /// version so no late copy of the commit can apply.
    #[tokio::test]
    async fn nothing_landed_answers_if_none_and_fences() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        coordinator
            .mutate(&user("b"), Intent::Deposit(usd("1")), None, None)
            .await
            .unwrap();
        let intent = Intent::Deposit(usd("2"));
        let held = coordinator
            .acquire(&user("b"), "DEPOSIT", LEASE, true, None)
            .await
            .unwrap();
        let now = clock.now();
        let operation = Operation::Deposit(usd("2"));
        let decision = decide(&held.account, &operation, &utc_day(now), &Limits::default()).unwrap();
        let (receipt, transaction) = coordinator.prepare_commit(&held, &intent, &operation, &decision, None, now);
        let answer = coordinator
            .settle(&held, vec![receipt], ServiceError::Unavailable("timed out".to_owned()))
            .await
            .unwrap_err();
        assert_eq!(
            answer,
            ServiceError::NotApplied,
            "fenced and not found: known not applied"
        );
        let late = coordinator.storage().transact(transaction.items, None).await;
        assert!(late.is_err(), "a late copy of the commit is fenced: {late:?}");
        let account = coordinator.account(&user("b")).await.unwrap();
        assert_eq!((account.cash, account.version), (usd("1"), held.account.version + 1));
    }

    /// A request id reused with other parameters is refused, naming the field.
    #[tokio::test]
    async fn a_reused_request_id_with_other_parameters_is_refused() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        let request_id = RequestId::parse_optional("request_id", "r-1").unwrap();
        coordinator
            .mutate(&user("c"), Intent::Deposit(usd("5")), request_id.clone(), None)
            .await
            .unwrap();
        let error = coordinator
            .mutate(&user("c"), Intent::Deposit(usd("6")), request_id, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ServiceError::InvalidArgument(field) if field.field == "request_id"),
            "{error:?}"
        );
    }
}
