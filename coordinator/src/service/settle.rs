//! Settle what is not known: a commit whose reply was lost or refused after a try of it may have
//! landed, and a request id whose outcome was recorded by an earlier execution.

use crate::core::records::{Order, RecordedOutcome, RefusalCode};
use crate::core::{FieldError, LeaseId, RequestId, UserId};
use crate::storage::{StorageError, model};
use crate::telemetry::metrics::{self, Settled};

use super::commit::{Answer, SentRound, answer_each, answer_to};
use super::queue::Call;
use super::{Missing, Operation, Receipt, ServiceError, TransactionCoordinator, retry_safe};

/// The calls of a round decided on the account as stored: those before its first accepted call
/// (every later one was decided on the state the accepted calls would have left).
fn decided_on_stored_state(answers: &[(usize, Answer)]) -> Vec<usize> {
    answers
        .iter()
        .take_while(|(_, answer)| !matches!(answer, Answer::Commit(_)))
        .map(|(id, _)| *id)
        .collect()
}

impl TransactionCoordinator {
    /// Settles a batch whose last round's outcome is not known to be "applied": after a refusal
    /// by the account's condition (the lease was lost, or an earlier try of a round landed and a
    /// retry of it was refused) or an unknown outcome (timeout, connection lost after sending).
    ///
    /// First it fences: releasing the lease by its id bumps the version, so no round sent under
    /// this lease can apply from then on (and if the lease is no longer ours, none can anyway,
    /// since every commit is conditioned on its id). Then the marker of each round sent (a
    /// fresh item only that round writes) says whether it applied: that round's answers stand.
    /// None applied: the outcome is known (not applied), so each call is answered `if_none`
    /// (an unknown ending becoming `NotApplied`, ABORTED and safe to retry), except a refusal
    /// that wrote nothing, which stands.
    pub(super) async fn settle(
        &self,
        user: &UserId,
        lock_id: &LeaseId,
        calls: Vec<Call>,
        sent: Vec<SentRound>,
        if_none: ServiceError,
    ) {
        self.held_leases.remove(lock_id);
        let release = model::release_lease(user, lock_id, None);
        // Whether the lease was still ours at the fence: then nobody else wrote the account since
        // it was read, and a refusal decided on that state stands. Not ours (another holder took
        // it over, or a round of ours landed and released it): the read state may be gone.
        let still_ours = match retry_safe(|| self.storage.write(release.clone())).await {
            Ok(()) => true,
            Err(StorageError::ConditionFailed { .. }) => false,
            Err(error) => {
                tracing::error!(%error, "commit outcome still unknown; the lease will expire by itself");
                metrics::unclear_commit(Settled::Unknown);
                let unknown = ServiceError::Unavailable(format!("commit outcome unknown: {error}"));
                answer_each(calls, &unknown);
                return;
            }
        };
        let landed = match self.landed_round(&sent).await {
            Ok(landed) => landed,
            Err(error) => {
                answer_each(calls, &error);
                return;
            }
        };
        metrics::unclear_commit(if landed.is_some() {
            Settled::Applied
        } else {
            Settled::NotApplied
        });
        let not_applied = match if_none {
            ServiceError::LeaseLost => {
                metrics::fenced();
                tracing::warn!(lock_state = "EXPIRED", "commit fenced: the lease was no longer ours");
                ServiceError::LeaseLost
            }
            ServiceError::Unavailable(detail) => {
                tracing::warn!(%detail, "commit fenced after an unknown outcome: it did not apply");
                ServiceError::NotApplied
            }
            other => other,
        };
        let last = sent.last().map(|round| round.answers.as_slice()).unwrap_or_default();
        let decided_on_stored_state = if still_ours {
            decided_on_stored_state(last)
        } else {
            Vec::new()
        };
        for (id, waiter) in calls {
            let answer_in = |answers: &[(usize, Answer)]| answer_to(answers, id).cloned();
            let result = match (landed.map(|round| answer_in(&round.answers)), answer_in(last)) {
                (Some(Some(answer)), _) => answer.into_result(),
                // Not applied: a refusal without a record stands (a trade's FAILED order is
                // written now, on its own) when it was decided on the state as stored, before
                // any accepted call of the round, under a lease still ours at the fence; one
                // decided after an accepted call rested on a state that never existed, and one
                // under a lease taken over on a state that may have changed since, so neither
                // is an answer. Anything else did not happen.
                (
                    _,
                    Some(Answer::Refuse {
                        error,
                        recorded: false,
                        unrecorded_order,
                    }),
                ) if decided_on_stored_state.contains(&id) => {
                    if let Some(order) = unrecorded_order {
                        self.record_failed_order(&order).await;
                    }
                    Err(error)
                }
                (_, Some(Answer::Refuse { recorded: true, .. })) => Err(ServiceError::LeaseLost),
                _ => Err(not_applied.clone()),
            };
            waiter.answer(result);
        }
    }

    /// Writes the FAILED order of a refusal whose round did not apply (after the fence, so the
    /// round can no longer write it). Both copies are fresh items, so a try that landed makes a
    /// retry fail its condition, which means written. If storage keeps failing, the refusal is
    /// still the answer, and the missing order is logged.
    async fn record_failed_order(&self, order: &Order) {
        let items = model::order_puts(order);
        let written = retry_safe(|| self.storage.transact(&items, None)).await;
        match written {
            Ok(()) => {}
            Err(StorageError::TransactionCanceled { reasons })
                if reasons.iter().any(|reason| reason.condition_failed()) => {}
            Err(error) => {
                tracing::error!(order_id = %order.order_id, %error, "the FAILED order of a refused trade could not be recorded");
            }
        }
    }

    /// The newest round sent whose marker is in storage, if any.
    pub(super) async fn landed_round<'a>(&self, sent: &'a [SentRound]) -> Result<Option<&'a SentRound>, ServiceError> {
        for round in sent.iter().rev() {
            let Some(marker) = &round.marker else { continue };
            let found = retry_safe(|| self.storage.get(marker.key.clone())).await?;
            if found.is_some_and(|item| marker.proves(&item)) {
                // Found applied after an unclear answer: when it landed is known only to have
                // been before now.
                self.journal_again_if_late(round.at, &round.feed).await;
                return Ok(Some(round));
            }
        }
        Ok(None)
    }

    /// The recorded outcome of `request_id`, if its parameters match `operation`.
    pub(super) async fn recorded_outcome(
        &self,
        user: &UserId,
        request_id: &RequestId,
        operation: &Operation,
    ) -> Result<Receipt, ServiceError> {
        let record_key = model::request_key(user, request_id);
        let Some(item) = retry_safe(|| self.storage.get(record_key.clone())).await? else {
            // Expired and swept between the refused write and this read: the caller may retry.
            return Err(ServiceError::Unavailable(format!(
                "request record {request_id} vanished"
            )));
        };
        self.answer_from_record(user, request_id, operation, &item).await
    }

    /// The answer that the stored request record `item` of `request_id` gives a call of
    /// `operation`: its original outcome, or INVALID_ARGUMENT if its parameters differ.
    pub(super) async fn answer_from_record(
        &self,
        user: &UserId,
        request_id: &RequestId,
        operation: &Operation,
        item: &crate::storage::Item,
    ) -> Result<Receipt, ServiceError> {
        let record = model::request_record_from_item(item)?;
        if record.fingerprint != operation.fingerprint() {
            let reason = format!(
                "was already used for {}; this request is {}",
                record.fingerprint,
                operation.fingerprint()
            );
            return Err(FieldError::new(operation.idempotency_field(), reason).into());
        }
        tracing::info!(%request_id, "replaying the recorded outcome");
        match record.outcome {
            // The same code and message as the first execution answered.
            RecordedOutcome::Refused {
                code: RefusalCode::NotFound,
                ..
            } => Err(ServiceError::NotFound(Missing::Account(user.clone()))),
            RecordedOutcome::Refused {
                message,
                code: RefusalCode::FailedPrecondition,
            } => Err(ServiceError::RefusedEarlier(message)),
            RecordedOutcome::Committed {
                entry_id,
                entry_sequence,
                order_id,
                holding,
            } => {
                let entry_key = match entry_sequence {
                    Some(sequence) => model::entry_key(user, sequence),
                    // Recorded before sequences: the entry is keyed by its id.
                    None => model::ledger_key(user, entry_id.as_str()),
                };
                let entry = retry_safe(|| self.storage.get(entry_key.clone()))
                    .await?
                    .ok_or_else(|| ServiceError::Internal(format!("recorded ledger entry {entry_id} is missing")))?;
                let trade = match (order_id, holding) {
                    (Some(order_id), Some(holding)) => {
                        let order_key = model::order_key(order_id.as_str());
                        let order = retry_safe(|| self.storage.get(order_key.clone()))
                            .await?
                            .ok_or_else(|| ServiceError::Internal(format!("recorded order {order_id} is missing")))?;
                        // The order as it stands now (an open order past its expiry is EXPIRED).
                        let mut order = model::order_from_item(&order)?;
                        order.status = order.status_at(self.clock.now());
                        Some((order, holding))
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
    use std::sync::Arc;

    use super::*;
    use crate::core::Principal;
    use crate::core::Rejection;
    use crate::core::time::ManualClock;
    use crate::service::testing::{
        FlakyEngine, LEASE, NextTransaction, coordinator, coordinator_on, refused_sell_leaves_one_failed_order, usd,
        user,
    };
    use crate::service::{CoordinatorConfig, Operation};

    async fn flaky() -> (Arc<TransactionCoordinator>, Arc<FlakyEngine>) {
        flaky_with(CoordinatorConfig::default()).await
    }

    /// Without known accounts: every batch takes the lease, so a lost commit is settled by the
    /// fence and the markers.
    async fn flaky_on_the_lease() -> (Arc<TransactionCoordinator>, Arc<FlakyEngine>) {
        flaky_with(CoordinatorConfig {
            known_accounts: false,
            ..CoordinatorConfig::default()
        })
        .await
    }

    async fn flaky_with(config: CoordinatorConfig) -> (Arc<TransactionCoordinator>, Arc<FlakyEngine>) {
        let engine = Arc::new(FlakyEngine::new());
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator_on(engine.clone(), &clock, config).await;
        (coordinator, engine)
    }

    /// A commit that applied but whose reply was lost is found after the fence and answered
    /// as committed, once.
    #[tokio::test]
    async fn a_landed_commit_is_found() {
        let (coordinator, engine) = flaky().await;
        engine.arm(NextTransaction::LoseReply);
        let receipt = coordinator
            .deposit(&Principal::local(), &user("a"), usd("30"), None, None)
            .await
            .unwrap();
        assert_eq!(receipt.entry.cash_after, usd("30"));
        assert_eq!(coordinator.account(&user("a")).await.unwrap().cash, usd("30"));
        let next = coordinator.acquire(&user("a"), "DEPOSIT", LEASE, true, None).await;
        assert!(next.is_ok(), "the fence released the lease: {next:?}");
    }

    /// A commit that never reached storage: after the fence the outcome is known, so the answer
    /// is ABORTED (not "may have applied"), and no late copy of it can apply.
    #[tokio::test]
    async fn a_lost_commit_is_known_not_applied() {
        let (coordinator, engine) = flaky_on_the_lease().await;
        coordinator
            .deposit(&Principal::local(), &user("b"), usd("1"), None, None)
            .await
            .unwrap();
        let version = coordinator.account(&user("b")).await.unwrap().version;
        engine.arm(NextTransaction::LoseRequest);
        let answer = coordinator
            .deposit(&Principal::local(), &user("b"), usd("2"), None, None)
            .await
            .unwrap_err();
        assert_eq!(answer, ServiceError::NotApplied);
        let account = coordinator.account(&user("b")).await.unwrap();
        assert_eq!(account.cash, usd("1"));
        assert_eq!(account.version, version + 1, "the fence bumped the version");
    }

    /// On a known account (no lease) a commit that never reached storage is settled under the
    /// lease, which then fences any late copy: found not applied, the call is decided again and
    /// applies once.
    #[tokio::test]
    async fn a_lost_commit_on_a_known_account_is_decided_again_under_the_lease() {
        let (coordinator, engine) = flaky().await;
        coordinator
            .deposit(&Principal::local(), &user("b"), usd("1"), None, None)
            .await
            .unwrap();
        engine.arm(NextTransaction::LoseRequest);
        let receipt = coordinator
            .deposit(&Principal::local(), &user("b"), usd("2"), None, None)
            .await
            .expect("applied once, under the lease");
        assert_eq!(receipt.entry.cash_after, usd("3"));
        assert_eq!(coordinator.account(&user("b")).await.unwrap().cash, usd("3"));
    }

    /// On a known account a commit whose reply was lost is found applied under the lease, and
    /// answered once.
    #[tokio::test]
    async fn a_landed_commit_on_a_known_account_is_answered_once() {
        let (coordinator, engine) = flaky().await;
        coordinator
            .deposit(&Principal::local(), &user("e"), usd("1"), None, None)
            .await
            .unwrap();
        engine.arm(NextTransaction::LoseReply);
        let receipt = coordinator
            .deposit(&Principal::local(), &user("e"), usd("2"), None, None)
            .await
            .expect("found applied");
        assert_eq!(receipt.entry.cash_after, usd("3"));
        assert_eq!(coordinator.account(&user("e")).await.unwrap().cash, usd("3"));
    }

    /// A refused trade without a request id whose round never reached storage: the refusal
    /// stands, and its FAILED order is written after the fence, once.
    #[tokio::test]
    async fn a_refused_trade_in_a_lost_round_still_leaves_its_failed_order() {
        let (coordinator, engine) = flaky_on_the_lease().await;
        coordinator
            .deposit(&Principal::local(), &user("f"), usd("10"), None, None)
            .await
            .unwrap();
        engine.arm(NextTransaction::LoseRequest);
        refused_sell_leaves_one_failed_order(&coordinator, &user("f")).await;
        assert_eq!(coordinator.account(&user("f")).await.unwrap().cash, usd("10"));
    }

    /// A batch whose reply was lost is settled per call: each gets its own answer from the
    /// round that landed, refusals included.
    #[tokio::test]
    async fn an_unclear_batch_is_settled_per_call() {
        let (coordinator, engine) = flaky().await;
        coordinator
            .deposit(&Principal::local(), &user("c"), usd("10"), None, None)
            .await
            .unwrap();
        engine.arm(NextTransaction::LoseReply);
        let calls = [
            Operation::Withdraw(usd("3")),
            Operation::Withdraw(usd("100")),
            Operation::Deposit(usd("5")),
        ];
        let mut handles = Vec::new();
        for (index, operation) in calls.into_iter().enumerate() {
            let coordinator = Arc::clone(&coordinator);
            let request_id = RequestId::parse_optional("request_id", &format!("c-{index}")).unwrap();
            handles.push(tokio::spawn(async move {
                coordinator.mutate(&user("c"), operation, request_id, None).await
            }));
        }
        let mut answers = Vec::new();
        for handle in handles {
            answers.push(handle.await.unwrap());
        }
        assert!(answers[0].is_ok(), "{:?}", answers[0]);
        assert!(matches!(
            answers[1],
            Err(ServiceError::Rejected(Rejection::InsufficientBalance { .. }))
        ));
        assert!(answers[2].is_ok(), "{:?}", answers[2]);
        assert_eq!(coordinator.account(&user("c")).await.unwrap().cash, usd("12"));
    }

    /// Issue 15's hostile test: a round [Withdraw 80 accepted, Withdraw 50 refused "Current:
    /// $20.00"] that never reached storage. The refusal was decided on a balance that never
    /// existed, so it is not final: both calls are told the round did not apply (ABORTED, safe
    /// to retry), and a retry of the second is decided on the real balance.
    #[tokio::test]
    async fn a_refusal_decided_after_an_accepted_call_of_a_lost_round_is_not_final() {
        let (coordinator, engine) = flaky_on_the_lease().await;
        coordinator
            .deposit(&Principal::local(), &user("g"), usd("100"), None, None)
            .await
            .unwrap();
        let held = coordinator
            .acquire(&user("g"), "WITHDRAWAL", LEASE, true, None)
            .await
            .unwrap();
        let call = |id: usize, amount: &str| {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let waiter = crate::service::queue::Waiter {
                principal: Principal::local(),
                operation: Operation::Withdraw(usd(amount)),
                request_id: None,
                state: Default::default(),
                reply,
                wait_until: tokio::time::Instant::now() + LEASE,
                on_timeout: ServiceError::Busy,
            };
            ((id, waiter), answer)
        };
        let (first, first_answer) = call(0, "80");
        let (second, second_answer) = call(1, "50");
        engine.arm(NextTransaction::LoseRequest);
        assert!(coordinator.commit_batch(held, vec![first, second]).await.is_none());
        assert_eq!(first_answer.await.unwrap().unwrap_err(), ServiceError::NotApplied);
        assert_eq!(
            second_answer.await.unwrap().unwrap_err(),
            ServiceError::NotApplied,
            "a refusal quoting $20.00, a balance that never existed, is not an answer"
        );
        assert_eq!(coordinator.account(&user("g")).await.unwrap().cash, usd("100"));
        let retried = coordinator
            .withdraw(&Principal::local(), &user("g"), usd("50"), None, None)
            .await
            .unwrap();
        assert_eq!(retried.entry.cash_after, usd("50"));
    }

    /// A request id reused with other parameters is refused, naming the field.
    #[tokio::test]
    async fn a_reused_request_id_with_other_parameters_is_refused() {
        let coordinator = coordinator(&ManualClock::starting_at(1_000_000)).await;
        let request_id = RequestId::parse_optional("request_id", "r-1").unwrap();
        coordinator
            .mutate(&user("d"), Operation::Deposit(usd("5")), request_id.clone(), None)
            .await
            .unwrap();
        let error = coordinator
            .mutate(&user("d"), Operation::Deposit(usd("6")), request_id, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ServiceError::InvalidArgument(field) if field.field == "request_id"),
            "{error:?}"
        );
    }
}
