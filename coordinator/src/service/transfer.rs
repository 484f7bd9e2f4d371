//! Transfer: cash from one account to another, both accounts and both ledger entries in one
//! fenced transaction.
//!
//! A transfer holds two accounts, always taken in one global order (sorted user ids, as TiKV's
//! latches sort their keys): it waits in the queue of the first and is run by that queue's
//! driver, which holds the first account (its carried lease, the account as this coordinator
//! last wrote it, or a lease it takes), then borrows the second from its own queue (a
//! [`LendRequest`] that waits there like a call, so a hot receiver serves its payers in FIFO
//! order) and holds it the same way. Every wait, in this process and at the DynamoDB lease, is
//! for an account later in the order than any held, so no two transfers, here or on other
//! coordinators, can wait on each other in a circle.
//!
//! The commit releases both leases and remembers both accounts as written. A refusal is
//! committed too (both accounts at their next version, unchanged, and the refusal record): it
//! stands only once the state it was decided on is confirmed. Nothing is written when the
//! receiver has no account: money never goes to a typo.

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::core::ops;
use crate::core::ops::transfer::{self, Side, TransferRefusal};
use crate::core::records::RecordedOutcome;
use crate::core::{Account, Decision, TransferId, UserId};
use crate::storage::StorageError;
use crate::storage::model::{self, TransactionPart};
use crate::telemetry::metrics;

use super::queue::{Enqueued, LendRequest, Lent, Queued, Waiter, WaiterState};
use super::{
    COMMIT_ATTEMPTS_MAX, COMMIT_LEASE_MARGIN, HeldLease, Missing, Operation, Receipt, ServiceError,
    TransactionCoordinator, TransferRequest, retry_safe,
};

/// The latest a transfer's holds may be waited for, and the error if that passes.
#[derive(Debug, Clone)]
struct Bound {
    until: Instant,
    on_timeout: ServiceError,
}

/// One of a transfer's two accounts while the transfer runs.
#[derive(Debug)]
struct Party {
    user: UserId,
    /// What is held on it: a lease, or the account as this coordinator last wrote it.
    hold: Option<HeldLease>,
    /// For the borrowed account: where its hold goes back to the account's driver.
    back: Option<oneshot::Sender<Option<HeldLease>>>,
}

impl Party {
    fn stored_lease(&self) -> bool {
        self.hold.as_ref().is_some_and(HeldLease::is_stored)
    }

    /// Hands the borrowed account back to its driver, with the lease still held (if any).
    fn give_back(self) -> Option<HeldLease> {
        let held = self.hold.filter(HeldLease::is_stored);
        match self.back {
            Some(back) => {
                // A driver that went away (it cannot: drivers are never cancelled) leaves the
                // lease to expire.
                back.send(held).ok();
                None
            }
            None => held,
        }
    }
}

/// What one attempt sent, to tell later whether it applied.
struct Attempt {
    marker: Option<model::Marker>,
    /// Its feed records and their time, written again if it is found applied late.
    feed: Vec<crate::storage::Item>,
    at: crate::core::Millis,
    answer: Result<Receipt, ServiceError>,
    afters: [Account; 2],
}

impl TransactionCoordinator {
    /// Runs the transfer `waiter` from the driver of `user`, the first of its two accounts,
    /// holding `held` (the lease the driver carries, if any). Answers the call, and returns the
    /// lease still held on `user`, if any.
    pub(super) async fn run_transfer(
        self: &Arc<Self>,
        user: &UserId,
        held: Option<HeldLease>,
        waiter: Waiter,
    ) -> Option<HeldLease> {
        let Operation::Transfer(request) = waiter.operation.clone() else {
            waiter.answer(Err(ServiceError::Internal(
                "only a transfer runs on its own".to_owned(),
            )));
            return held;
        };
        // The accounts in the one global order: the call waits in the first one's queue, and the
        // others are borrowed after it, in order (two for a transfer: sender and receiver are
        // never the same, which `transport` refuses).
        let accounts = waiter.operation.accounts(user);
        assert_eq!(
            accounts.first(),
            user,
            "an operation runs in the queue of its first account"
        );
        assert_eq!(accounts.len(), 2, "a transfer touches two accounts");
        let second_user = accounts.iter().nth(1).expect("two accounts").clone();
        let bound = Bound {
            until: waiter.wait_until,
            on_timeout: waiter.on_timeout.clone(),
        };
        let mut first = Party {
            user: user.clone(),
            hold: held,
            back: None,
        };
        if let Err(error) = self.hold(&mut first, &bound).await {
            waiter.answer(Err(error));
            return first.give_back();
        }
        let mut second = match self.borrow(&second_user, &bound).await {
            Ok(lent) => Party {
                user: second_user,
                hold: lent.held,
                back: Some(lent.back),
            },
            Err(error) => {
                waiter.answer(Err(error));
                return first.give_back();
            }
        };
        let result = match self
            .transfer_attempts(&mut first, &mut second, &waiter, &request, &bound)
            .await
        {
            // A missing party writes nothing, so a request id used before answers from its
            // record first: with other parameters (a retry that now names a receiver who has no
            // account) that is INVALID_ARGUMENT on the request id, as for every other reuse.
            Err(ServiceError::NotFound(missing)) => {
                self.recorded_or(&request.from, &waiter, ServiceError::NotFound(missing))
                    .await
            }
            other => other,
        };
        match &result {
            Ok(receipt) if receipt.replayed => metrics::replayed(transfer::NAME),
            Ok(_) => metrics::committed(transfer::NAME),
            Err(ServiceError::Rejected(rejection)) => {
                metrics::refused(transfer::NAME, rejection);
                metrics::rolled_back(transfer::NAME);
            }
            Err(_) => {}
        }
        waiter.answer(result);
        second.give_back();
        first.give_back()
    }

    /// The recorded outcome of the call's request id on `sender`, if it was used before;
    /// otherwise `error`.
    async fn recorded_or(
        &self,
        sender: &UserId,
        waiter: &Waiter,
        error: ServiceError,
    ) -> Result<Receipt, ServiceError> {
        let Some(request_id) = &waiter.request_id else {
            return Err(error);
        };
        let record_key = model::request_key(sender, request_id);
        match retry_safe(|| self.storage.get(record_key.clone())).await? {
            Some(record) => {
                self.answer_from_record(sender, request_id, &waiter.operation, &record)
                    .await
            }
            None => Err(error),
        }
    }

    /// Holds `party`'s account if nothing holds it yet: as this coordinator last wrote it, or
    /// under a lease taken now (the account must exist).
    async fn hold(&self, party: &mut Party, bound: &Bound) -> Result<(), ServiceError> {
        if party.hold.is_some() {
            return Ok(());
        }
        if let Some(known) = self.known_hold(&party.user) {
            party.hold = Some(known);
            return Ok(());
        }
        party.hold = Some(self.acquire_for_transfer(&party.user, bound).await?);
        Ok(())
    }

    /// Takes `user`'s lease for a transfer: the account must exist; no longer than `bound`.
    async fn acquire_for_transfer(&self, user: &UserId, bound: &Bound) -> Result<HeldLease, ServiceError> {
        self.acquire(
            user,
            transfer::NAME,
            self.config.lease_withdraw,
            true,
            Some((bound.until, bound.on_timeout.clone())),
        )
        .await
    }

    /// Borrows `user`'s account from its queue: waits behind the calls queued there (starting
    /// its driver if none runs) until the driver lends it, no longer than `bound`.
    async fn borrow(self: &Arc<Self>, user: &UserId, bound: &Bound) -> Result<Lent, ServiceError> {
        let (lent, mut lending) = oneshot::channel();
        let state = WaiterState::default();
        let request = Queued::Lend(LendRequest {
            state: state.clone(),
            lent,
        });
        match self.queues.enqueue(user, request, self.config.max_queued_per_user) {
            Err(_) => return Err(ServiceError::Overloaded("calls queued for this user")),
            Ok(Enqueued::Queued) => {}
            Ok(Enqueued::StartDriver) => self.start_driver(user.clone()),
        }
        let stopped = || ServiceError::Internal("the account's driver stopped without lending it".to_owned());
        match tokio::time::timeout_at(bound.until, &mut lending).await {
            Ok(lent) => lent.map_err(|_| stopped()),
            // Still queued: the request leaves, and the driver will never lend.
            Err(_) if state.leave() => Err(bound.on_timeout.clone()),
            // Taken just now: the loan is on its way and must be taken (and given back).
            Err(_) => lending.await.map_err(|_| stopped()),
        }
    }

    /// Decides and commits the transfer on the two held accounts, retried while nothing was
    /// written (a stale known account, a transaction conflict).
    async fn transfer_attempts(
        self: &Arc<Self>,
        first: &mut Party,
        second: &mut Party,
        waiter: &Waiter,
        request: &TransferRequest,
        bound: &Bound,
    ) -> Result<Receipt, ServiceError> {
        let mut last_error = ServiceError::Internal("no commit attempted".to_owned());
        for _attempt in 0..COMMIT_ATTEMPTS_MAX {
            self.hold(first, bound).await?;
            if second.back.is_none() {
                // Given back below while the first account's lease was taken: borrow it again,
                // now after the first, in the global order.
                let lent = self.borrow(&second.user, bound).await?;
                (second.hold, second.back) = (lent.held, Some(lent.back));
            }
            self.hold(second, bound).await?;
            let now = self.clock.now();
            let (first_hold, second_hold) = (hold_of(first)?, hold_of(second)?);
            if [first_hold, second_hold]
                .iter()
                .any(|hold| now + COMMIT_LEASE_MARGIN.as_millis() as u64 >= hold.expires_at)
            {
                return Err(ServiceError::LeaseLost);
            }
            let sender_is_first = request.from == first.user;
            let (sender, receiver) = if sender_is_first {
                (first_hold, second_hold)
            } else {
                (second_hold, first_hold)
            };
            let decided = transfer::decide(
                &sender.account,
                &receiver.account,
                request.amount,
                now,
                &self.config.limits,
            );
            let (sender_decision, receiver_decision, refusal) = match decided {
                Ok(decision) => (Some(decision.sender), Some(decision.receiver), None),
                Err(TransferRefusal::SenderMissing) => {
                    return Err(ServiceError::NotFound(Missing::Account(request.from.clone())));
                }
                Err(TransferRefusal::ReceiverMissing) => {
                    return Err(ServiceError::NotFound(Missing::Account(request.to.clone())));
                }
                Err(TransferRefusal::Rejected(rejection)) => {
                    tracing::info!(reason = %rejection, operation = transfer::NAME, "refused under the lease");
                    (None, None, Some(rejection))
                }
            };
            let transfer_id = TransferId::new();
            let entry = |side, hold: &HeldLease, decision: &Option<Decision>| {
                decision.as_ref().map(|decision| {
                    transfer::entry(
                        request,
                        &transfer_id,
                        side,
                        decision,
                        hold.account.entries + 1,
                        &waiter.principal,
                        waiter.request_id.as_ref(),
                        now,
                    )
                })
            };
            let out_entry = entry(Side::Sender, sender, &sender_decision);
            let in_entry = entry(Side::Receiver, receiver, &receiver_decision);
            let after = |hold: &HeldLease, decision: &Option<Decision>| {
                let mut after = hold.account.clone();
                if let Some(decision) = decision {
                    after.apply(decision);
                    after.entries += 1;
                }
                after.version = hold.account.version + 1;
                after
            };
            let (sender_after, receiver_after) = (after(sender, &sender_decision), after(receiver, &receiver_decision));
            let outcome = match (&out_entry, &refusal) {
                (Some(out_entry), _) => RecordedOutcome::Committed {
                    entry_id: out_entry.entry_id.clone(),
                    entry_sequence: Some(out_entry.sequence),
                    order_id: None,
                    holding: None,
                },
                (None, refusal) => RecordedOutcome::Refused {
                    message: refusal.as_ref().map(ToString::to_string).unwrap_or_default(),
                    code: crate::core::records::RefusalCode::FailedPrecondition,
                },
            };
            let record = waiter.request_id.as_ref().map(|id| {
                (
                    id.clone(),
                    ops::request_record(&waiter.operation, outcome, now, self.config.request_retention),
                )
            });
            let sender_party = model::TransferParty {
                user: &request.from,
                lock_id: sender.lock_id.as_ref(),
                read: &sender.account,
                after: &sender_after,
                cash_floor: sender_decision
                    .as_ref()
                    .map_or(crate::core::Usd::ZERO, |decision| decision.cash_delta.debited()),
                entry: out_entry.as_ref(),
            };
            let receiver_party = model::TransferParty {
                user: &request.to,
                lock_id: receiver.lock_id.as_ref(),
                read: &receiver.account,
                after: &receiver_after,
                cash_floor: crate::core::Usd::ZERO,
                entry: in_entry.as_ref(),
            };
            let (first_party, second_party) = if sender_is_first {
                (sender_party, receiver_party)
            } else {
                (receiver_party, sender_party)
            };
            let transaction = model::commit_transfer(&model::TransferCommit {
                first: first_party,
                second: second_party,
                record: record.as_ref().map(|(id, record)| (id, record)),
                sender_is_first,
                now,
                writer: self.incarnation(),
            });
            let answer = match (out_entry, refusal) {
                (Some(entry), _) => Ok(Receipt {
                    entry,
                    trade: None,
                    replayed: false,
                }),
                (None, Some(rejection)) => Err(ServiceError::Rejected(rejection)),
                (None, None) => Err(ServiceError::Internal(
                    "a transfer neither decided nor refused".to_owned(),
                )),
            };
            let afters = if sender_is_first {
                [sender_after, receiver_after]
            } else {
                [receiver_after, sender_after]
            };
            let attempt = Attempt {
                marker: transaction.marker().cloned(),
                feed: transaction.feed.clone(),
                at: now,
                answer,
                afters,
            };
            if let Some(crate::service::CommitHook(pause)) = &self.config.before_commit {
                pause(&request.from).await;
            }
            for party in [&request.from, &request.to] {
                self.feed_sent(party, &attempt.feed);
            }
            let reasons = match self.storage.transact_batch(transaction.items.clone()).await {
                Ok(()) => {
                    if self.journal_again_if_late(attempt.at, &attempt.feed).await {
                        for party in [&request.from, &request.to] {
                            self.feed_confirmed(party);
                        }
                    }
                    return self.after_transfer(first, second, attempt);
                }
                Err(StorageError::TransactionCanceled { reasons }) => reasons,
                Err(error) => {
                    tracing::warn!(%error, "transfer commit outcome unknown; settling it");
                    return self.settle_transfer(first, second, attempt, bound).await;
                }
            };
            match transaction.refused_part(&reasons) {
                Some(TransactionPart::RequestRecord { .. }) => {
                    let request_id = waiter
                        .request_id
                        .as_ref()
                        .expect("a request record implies a request id");
                    return self
                        .recorded_outcome(&request.from, request_id, &waiter.operation)
                        .await;
                }
                Some(part @ (TransactionPart::Account | TransactionPart::Counterparty)) => {
                    // A try of this very attempt may have landed (its reply lost, the retry
                    // refused): its marker says so.
                    if self.marker_stored(&attempt.marker).await? {
                        self.journal_again_if_late(attempt.at, &attempt.feed).await;
                        return self.after_transfer(first, second, attempt);
                    }
                    let (refused, other) = match part {
                        TransactionPart::Account => (&mut *first, &mut *second),
                        _ => (&mut *second, &mut *first),
                    };
                    if refused.stored_lease() {
                        // Our lease was taken over after it expired: nothing applied.
                        if let Some(lock_id) = refused.hold.take().and_then(|hold| hold.lock_id) {
                            self.held_leases.remove(&lock_id);
                        }
                        metrics::fenced();
                        return Err(ServiceError::LeaseLost);
                    }
                    // A known account another writer changed: take its lease from now on. The
                    // first account's lease is taken before the second's again, so a lease held
                    // on the second is given back first.
                    metrics::known_account_commit(metrics::KnownCommit::Stale);
                    self.known.contended(&refused.user);
                    refused.hold = None;
                    // The first account's lease may be waited for: nothing of the second may be
                    // held meanwhile, neither its lease nor the loan from its queue, or two
                    // transfers could wait on each other across coordinators.
                    if part == TransactionPart::Account {
                        if let Some(held) = other.hold.take() {
                            self.release(&held).await;
                        }
                        if let Some(back) = other.back.take() {
                            back.send(None).ok();
                        }
                    }
                    last_error = ServiceError::Unavailable("transfer accounts kept changing".to_owned());
                }
                _ => {
                    last_error = ServiceError::Unavailable(format!("transaction cancelled: {reasons:?}"));
                }
            }
        }
        Err(last_error)
    }

    /// The attempt applied: both leases were released with it, and both accounts are now as
    /// it wrote them.
    fn after_transfer(&self, first: &mut Party, second: &mut Party, attempt: Attempt) -> Result<Receipt, ServiceError> {
        let [first_after, second_after] = attempt.afters;
        for (party, after) in [(first, first_after), (second, second_after)] {
            if let Some(lock_id) = party.hold.take().and_then(|hold| hold.lock_id) {
                self.held_leases.remove(&lock_id);
            }
            self.known.remember(&party.user, after);
            // Woken only: the receiver's entry is not in the answer; the watcher reads it.
            self.watchers.committed(&party.user, Vec::new);
        }
        attempt.answer
    }

    /// A transfer whose commit outcome is unknown. Fences both accounts first: a lease is
    /// released by its id (which moves the version), and a known account has its lease taken
    /// and released (the attempt needed it lease-free at the old version). Then the attempt's
    /// marker says whether it applied. A refusal (which has no marker) or a transfer that did
    /// not apply answers ABORTED: nothing of it happened, and a retry is safe.
    async fn settle_transfer(
        &self,
        first: &mut Party,
        second: &mut Party,
        attempt: Attempt,
        bound: &Bound,
    ) -> Result<Receipt, ServiceError> {
        for party in [&mut *first, &mut *second] {
            let hold = match party.hold.take() {
                Some(hold) if hold.is_stored() => hold,
                _ => {
                    self.known.forget(&party.user);
                    match self.acquire_for_transfer(&party.user, bound).await {
                        Ok(lease) => lease,
                        // Someone else holds the lease: the attempt cannot apply while it is
                        // there, and its release moves the version. Fenced as well.
                        Err(ServiceError::Busy | ServiceError::DeadlineExceeded) => continue,
                        Err(error) => {
                            metrics::unclear_commit(metrics::Settled::Unknown);
                            return Err(ServiceError::Unavailable(format!("transfer outcome unknown: {error}")));
                        }
                    }
                }
            };
            let lock_id = hold.lock_id.clone().expect("a stored lease");
            self.held_leases.remove(&lock_id);
            self.known.forget(&party.user);
            let release = model::release_lease(&party.user, &lock_id, None);
            let released = retry_safe(|| self.storage.write(release.clone())).await;
            if let Err(error) = released.or_else(|error| match error {
                StorageError::ConditionFailed { .. } => Ok(()),
                error => Err(error),
            }) {
                tracing::error!(%error, "transfer outcome still unknown; the lease will expire by itself");
                metrics::unclear_commit(metrics::Settled::Unknown);
                return Err(ServiceError::Unavailable(format!("transfer outcome unknown: {error}")));
            }
        }
        if self.marker_stored(&attempt.marker).await? {
            metrics::unclear_commit(metrics::Settled::Applied);
            self.journal_again_if_late(attempt.at, &attempt.feed).await;
            return attempt.answer;
        }
        metrics::unclear_commit(metrics::Settled::NotApplied);
        tracing::warn!("transfer fenced after an unknown outcome: it did not apply");
        Err(ServiceError::NotApplied)
    }

    /// Whether the fresh item that proves an attempt applied is in storage.
    async fn marker_stored(&self, marker: &Option<model::Marker>) -> Result<bool, ServiceError> {
        let Some(marker) = marker else { return Ok(false) };
        let found = retry_safe(|| self.storage.get(marker.key.clone())).await?;
        Ok(found.is_some_and(|item| marker.proves(&item)))
    }
}

/// The hold of a party that `hold` just made sure of.
fn hold_of(party: &Party) -> Result<&HeldLease, ServiceError> {
    party
        .hold
        .as_ref()
        .ok_or_else(|| ServiceError::Internal("a transfer account without a hold".to_owned()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::core::Rejection;
    use crate::core::records::EntryKind;
    use crate::core::time::ManualClock;
    use crate::core::{Memo, Principal, RequestId, Usd};
    use crate::service::testing::{FlakyEngine, NextTransaction, coordinator, coordinator_on, usd, user};
    use crate::service::{CoordinatorConfig, PageRequest};
    use crate::storage::embedded::EmbeddedEngine;

    fn request(from: &str, to: &str, amount: &str, memo: &str) -> TransferRequest {
        TransferRequest {
            from: user(from),
            to: user(to),
            amount: usd(amount),
            memo: Memo::parse("memo", memo).unwrap(),
        }
    }

    async fn send(
        coordinator: &Arc<TransactionCoordinator>,
        transfer: TransferRequest,
        request_id: Option<&str>,
    ) -> Result<Receipt, ServiceError> {
        let request_id = request_id.map(|raw| RequestId::parse_optional("request_id", raw).unwrap().unwrap());
        coordinator
            .transfer(&Principal::local(), transfer, request_id, None)
            .await
    }

    async fn fund(coordinator: &Arc<TransactionCoordinator>, who: &str, amount: &str) {
        coordinator
            .deposit(&Principal::local(), &user(who), usd(amount), None, None)
            .await
            .unwrap();
    }

    async fn cash(coordinator: &Arc<TransactionCoordinator>, who: &str) -> Usd {
        coordinator.account(&user(who)).await.unwrap().cash
    }

    /// A transfer moves the money both ways in one commit: the sender's TRANSFER_OUT and the
    /// receiver's TRANSFER_IN share one transfer id, name each other and carry the memo, and
    /// each is the next entry of its account. Both directions (sender first and second in the
    /// global order) work.
    #[tokio::test]
    async fn a_transfer_moves_cash_and_writes_both_entries() {
        let coordinator = coordinator(&ManualClock::starting_at(1_000_000)).await;
        fund(&coordinator, "ann", "100").await;
        fund(&coordinator, "bob", "10").await;
        let receipt = send(&coordinator, request("bob", "ann", "4.50", "lunch"), None)
            .await
            .unwrap();
        assert_eq!(receipt.entry.cash_after, usd("5.50"));
        assert_eq!(receipt.entry.kind, EntryKind::TransferOut);
        let receipt = send(&coordinator, request("ann", "bob", "30", ""), None).await.unwrap();
        assert_eq!(receipt.entry.cash_after, usd("74.50"));
        assert_eq!(cash(&coordinator, "ann").await, usd("74.50"));
        assert_eq!(cash(&coordinator, "bob").await, usd("35.50"));
        assert_eq!(
            coordinator.account(&user("ann")).await.unwrap().transferred_today,
            usd("30")
        );

        let newest = |who: &'static str| {
            let coordinator = Arc::clone(&coordinator);
            async move {
                coordinator
                    .ledger(&user(who), PageRequest::parse(1, "").unwrap())
                    .await
                    .unwrap()
                    .items
                    .remove(0)
            }
        };
        let (out, into) = (newest("ann").await, newest("bob").await);
        assert_eq!((out.kind, into.kind), (EntryKind::TransferOut, EntryKind::TransferIn));
        let (out_transfer, in_transfer) = (out.transfer.clone().unwrap(), into.transfer.clone().unwrap());
        assert_eq!(out_transfer.transfer_id, in_transfer.transfer_id);
        assert_eq!(
            (out_transfer.counterparty, in_transfer.counterparty),
            (user("bob"), user("ann"))
        );
        assert_eq!(out.cash_delta.decimal(), -into.cash_delta.decimal());
        assert_eq!(out.sequence, coordinator.account(&user("ann")).await.unwrap().entries);
        assert_eq!(into.sequence, coordinator.account(&user("bob")).await.unwrap().entries);
    }

    /// The refusals, each writing nothing that moves money: no receiver account (NOT_FOUND,
    /// and no item is made for the typo), the sender short of cash (with the figures), the
    /// sender and receiver the same (INVALID_ARGUMENT), over the daily limit.
    #[tokio::test]
    async fn refusals_write_nothing() {
        let coordinator = coordinator(&ManualClock::starting_at(1_000_000)).await;
        fund(&coordinator, "ann", "100").await;
        fund(&coordinator, "bob", "1").await;
        let missing = send(&coordinator, request("ann", "bobb", "5", ""), None).await;
        assert_eq!(missing.unwrap_err().to_string(), "Account bobb not found");
        let item = coordinator
            .storage()
            .get(model::account_key(&user("bobb")))
            .await
            .unwrap();
        assert!(item.is_none(), "nothing written for the typo: {item:?}");
        let no_sender = send(&coordinator, request("zed", "ann", "5", ""), None).await;
        assert_eq!(no_sender.unwrap_err().to_string(), "Account zed not found");
        let short = send(&coordinator, request("bob", "ann", "1.01", ""), None).await;
        assert_eq!(
            short.unwrap_err().to_string(),
            "Insufficient balance. Current: $1.00, Required: $1.01"
        );
        let same = send(&coordinator, request("ann", "ann", "1", ""), None)
            .await
            .unwrap_err();
        assert!(
            matches!(&same, ServiceError::InvalidArgument(field) if field.field == "to_user_id"),
            "{same:?}"
        );
        let above = send(&coordinator, request("ann", "bob", "5000.01", ""), None).await;
        assert!(matches!(
            above,
            Err(ServiceError::Rejected(Rejection::AboveDailyLimit {
                kind: "transfer",
                ..
            }))
        ));
        assert_eq!(cash(&coordinator, "ann").await, usd("100"));
        assert_eq!(cash(&coordinator, "bob").await, usd("1"));
    }

    /// Exactly once, keyed on the sender: a retry returns the original reply (the same
    /// transfer), applies nothing twice; a refusal replays as a refusal; the key with other
    /// parameters is INVALID_ARGUMENT.
    #[tokio::test]
    async fn a_retried_transfer_applies_once() {
        let coordinator = coordinator(&ManualClock::starting_at(1_000_000)).await;
        fund(&coordinator, "ann", "100").await;
        fund(&coordinator, "bob", "1").await;
        let first = send(&coordinator, request("ann", "bob", "10", "rent"), Some("t-1"))
            .await
            .unwrap();
        let again = send(&coordinator, request("ann", "bob", "10", "rent"), Some("t-1"))
            .await
            .unwrap();
        assert!(again.replayed);
        assert_eq!(first.entry.entry_id, again.entry.entry_id);
        assert_eq!(first.entry.transfer, again.entry.transfer);
        assert_eq!(cash(&coordinator, "bob").await, usd("11"));
        let other = send(&coordinator, request("ann", "bob", "10", "other"), Some("t-1")).await;
        assert!(matches!(other, Err(ServiceError::InvalidArgument(field)) if field.field == "request_id"));
        // The used key naming a receiver who has no account: still the key's reuse.
        let typo = send(&coordinator, request("ann", "bobb", "10", "rent"), Some("t-1")).await;
        assert!(
            matches!(&typo, Err(ServiceError::InvalidArgument(field)) if field.field == "request_id"),
            "{typo:?}"
        );
        let refused = send(&coordinator, request("bob", "ann", "50", ""), Some("t-2")).await;
        assert!(matches!(refused, Err(ServiceError::Rejected(_))), "{refused:?}");
        fund(&coordinator, "bob", "100").await;
        let replayed = send(&coordinator, request("bob", "ann", "50", ""), Some("t-2")).await;
        assert!(matches!(replayed, Err(ServiceError::RefusedEarlier(_))), "{replayed:?}");
        assert_eq!(cash(&coordinator, "ann").await, usd("90"));
    }

    /// A transfer whose commit reply was lost is found applied after the fence and answered
    /// once; one whose request never arrived is known not applied (ABORTED), and moved nothing.
    #[tokio::test]
    async fn an_unclear_transfer_is_settled() {
        let engine = Arc::new(FlakyEngine::new());
        let coordinator = coordinator_on(
            engine.clone(),
            &ManualClock::starting_at(1_000_000),
            CoordinatorConfig::default(),
        )
        .await;
        fund(&coordinator, "ann", "100").await;
        fund(&coordinator, "bob", "0.01").await;
        engine.arm(NextTransaction::LoseReply);
        let landed = send(&coordinator, request("ann", "bob", "10", ""), None).await.unwrap();
        assert_eq!(landed.entry.cash_after, usd("90"));
        engine.arm(NextTransaction::LoseRequest);
        let lost = send(&coordinator, request("ann", "bob", "10", ""), None).await;
        assert_eq!(lost.unwrap_err(), ServiceError::NotApplied);
        assert_eq!(cash(&coordinator, "ann").await, usd("90"));
        assert_eq!(cash(&coordinator, "bob").await, usd("10.01"));
        let after = send(&coordinator, request("bob", "ann", "10.01", ""), None)
            .await
            .unwrap();
        assert_eq!(
            after.entry.cash_after,
            Usd::ZERO,
            "the fences left both accounts usable"
        );
    }

    /// Many callers transferring between the same few accounts in both directions at once, on
    /// two coordinators sharing one table: every call ends well inside its deadline (OK or a
    /// refusal, never a wait that lasts until the deadline), and the money is conserved.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn opposite_transfers_never_deadlock() {
        let engine: Arc<EmbeddedEngine> = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let clock = ManualClock::starting_at(1_000_000);
        // Two instances (each config has its own instance name).
        let config = || CoordinatorConfig {
            lease_wait_max: Duration::from_secs(5),
            ..CoordinatorConfig::default()
        };
        let coordinators = [
            coordinator_on(engine.clone(), &clock, config()).await,
            coordinator_on(engine, &clock, config()).await,
        ];
        let users = ["a", "b", "c"];
        for who in users {
            fund(&coordinators[0], who, "1000").await;
        }
        let mut calls = Vec::new();
        for caller in 0..24usize {
            let coordinator = Arc::clone(&coordinators[caller % 2]);
            calls.push(tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                for round in 0..15usize {
                    let from = users[(caller + round) % 3];
                    let to = users[(caller + round + 1 + caller % 2) % 3];
                    let started = Instant::now();
                    let result = send(&coordinator, request(from, to, "1.25", ""), None).await;
                    slowest = slowest.max(started.elapsed());
                    match result {
                        Ok(_) | Err(ServiceError::Rejected(_)) => {}
                        Err(error) => panic!("caller {caller} round {round}: {error:?}"),
                    }
                }
                slowest
            }));
        }
        for call in calls {
            let slowest = call.await.unwrap();
            assert!(slowest < Duration::from_secs(4), "a transfer waited {slowest:?}");
        }
        let mut total = Usd::ZERO;
        for who in users {
            total = total.checked_add(cash(&coordinators[0], who).await).unwrap();
        }
        assert_eq!(total, usd("3000"), "transfers conserve money");
    }

    /// Sixteen payers and one receiver: every transfer applies (the receiver's queue serves its
    /// payers in turn), and the receiver holds exactly what was paid.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hot_receiver_serves_every_payer() {
        let coordinator = coordinator_on(
            Arc::new(EmbeddedEngine::in_memory().unwrap()),
            &ManualClock::starting_at(1_000_000),
            CoordinatorConfig::default(),
        )
        .await;
        fund(&coordinator, "m-hot", "1").await;
        let mut payers = Vec::new();
        for payer in 0..16 {
            let coordinator = Arc::clone(&coordinator);
            payers.push(tokio::spawn(async move {
                let name = format!("payer-{payer:02}");
                fund(&coordinator, &name, "100").await;
                for _ in 0..10 {
                    send(&coordinator, request(&name, "m-hot", "1", ""), None)
                        .await
                        .unwrap();
                }
            }));
        }
        for payer in payers {
            payer.await.unwrap();
        }
        assert_eq!(cash(&coordinator, "m-hot").await, usd("161"));
    }
}
