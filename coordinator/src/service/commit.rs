//! Decide and commit a batch under a held lease. Each round decides the batch's calls in order
//! on the account (`core::batch`) and sends one fenced transaction with every call's writes:
//! ledger entries, orders (CONFIRMED, or FAILED for refused trades), request records, and the
//! lease released or, while more calls wait, extended. Rounds repeat only while nothing was
//! written (a transaction conflict, a catalog price that moved, a request id used before), and
//! end in exactly one [`Ending`], which `commit_batch` turns into every call's answer and the
//! one way the lease is given back or kept.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::core::batch::{BatchOutcome, Closed, decide_batch};
use crate::core::ops::{self, ClosedOrder, Quote};
use crate::core::records::{LedgerEntry, Order, RecordedOutcome};
use crate::core::{Decision, Millis, Operation, Price, Rejection, RequestId};
use crate::storage::model::{self, TransactionPart};
use crate::storage::{CancellationReason, StorageError};
use crate::telemetry::metrics;

use super::queue::{Call, Waiter};
use super::roll_back::refused_writes;
use super::{
    COMMIT_ATTEMPTS_MAX, COMMIT_LEASE_MARGIN, CommitHook, HeldLease, Missing, Receipt, ServiceError,
    TransactionCoordinator,
};

/// What a round decided for one call.
#[derive(Debug, Clone)]
pub(super) enum Answer {
    Commit(Box<Receipt>),
    Refuse {
        error: ServiceError,
        /// A refusal record was written with it (the call has a request id).
        recorded: bool,
        /// A refused trade's FAILED order when no record goes with it: if the round is found not
        /// applied, the refusal still stands, and settle writes this order on its own.
        unrecorded_order: Option<Box<Order>>,
    },
}

/// A round that was sent: its answers, and the item whose presence proves it applied.
#[derive(Debug)]
pub(super) struct SentRound {
    pub answers: Vec<(usize, Answer)>,
    pub marker: Option<crate::storage::model::Marker>,
    /// Its feed records and their time, written again if it is found applied late.
    pub feed: Vec<crate::storage::Item>,
    pub at: Millis,
}

/// How the rounds of one batch ended.
#[derive(Debug)]
enum Ending {
    /// The round applied: the account is now `after`, and the lease was released with it or
    /// extended until the instant given.
    Committed {
        answers: Vec<(usize, Answer)>,
        after: Box<crate::core::Account>,
        extend_until: Option<Millis>,
    },
    /// Stopped with `error` before a known outcome: any round sent must be settled.
    Stopped(ServiceError),
}

/// How one decision and commit of a batch ended.
enum BatchEnd {
    /// Every call answered; the lease if it is still held.
    Done(Option<HeldLease>),
    /// A known account's batch found not applied, to decide again under this lease.
    DecideAgain(HeldLease, Vec<Call>),
}

/// One decided round, before it is sent.
struct Round {
    answers: Vec<(usize, Answer)>,
    transaction: model::NamedItems,
    /// The account after the round, at its next version.
    after: crate::core::Account,
    extend_until: Option<Millis>,
}

impl TransactionCoordinator {
    /// Decides and commits `calls` under `held`; answers every call. Returns the lease if it
    /// is still held (extended for the calls that wait), None once it was given back.
    pub(super) async fn commit_batch(&self, held: HeldLease, calls: Vec<Call>) -> Option<HeldLease> {
        let (mut held, mut calls) = (held, calls);
        // At most twice: a batch on a known account that must be decided again is decided under
        // the lease, and a batch under a lease is never decided again here.
        loop {
            let again = held.lock_id.is_none();
            match self.commit_batch_once(held, calls).await {
                BatchEnd::Done(lease) => return lease,
                BatchEnd::DecideAgain(lease, returned) => {
                    assert!(
                        again && lease.is_stored(),
                        "only a known account's batch is decided again, under the lease"
                    );
                    (held, calls) = (lease, returned);
                }
            }
        }
    }

    /// One decision and commit of `calls` under `held`.
    async fn commit_batch_once(&self, held: HeldLease, mut calls: Vec<Call>) -> BatchEnd {
        if let Some(lock_id) = &held.lock_id {
            calls.iter().for_each(|(_, waiter)| waiter.state.decided_under(lock_id));
        }
        let mut sent: Vec<SentRound> = Vec::new();
        let ending = self.attempt_rounds(&held, &mut calls, &mut sent).await;
        BatchEnd::Done(match ending {
            Ending::Committed {
                answers,
                after,
                extend_until,
            } => {
                count_answers(&calls, &answers);
                let lock_state = match (held.is_stored(), extend_until) {
                    (false, _) => "NONE",
                    (true, Some(_)) => "EXTENDED",
                    (true, None) => "RELEASED",
                };
                if !held.is_stored() {
                    metrics::known_account_commit(metrics::KnownCommit::Applied);
                }
                tracing::info!(lock_state, calls = answers.len(), cash = %after.cash, "batch committed");
                answer_all(calls, &answers);
                self.after_commit(held, *after, extend_until)
            }
            Ending::Stopped(error) if sent.is_empty() => {
                self.release(&held).await;
                answer_each(calls, &error);
                None
            }
            Ending::Stopped(error) => match &held.lock_id {
                None => return self.recover_known(held, calls, sent, error).await,
                Some(lock_id) => {
                    self.known.forget(&held.user);
                    self.settle(&held.user, lock_id, calls, sent, error).await;
                    None
                }
            },
        })
    }

    /// The lease after a committed round: kept with the state the round wrote, or given back
    /// (or never taken), the state then remembered as this coordinator left it.
    fn after_commit(
        &self,
        mut held: HeldLease,
        after: crate::core::Account,
        extend_until: Option<Millis>,
    ) -> Option<HeldLease> {
        match extend_until {
            Some(until) => {
                held.expires_at = until;
                held.account = after;
                Some(held)
            }
            None => {
                if let Some(lock_id) = &held.lock_id {
                    self.held_leases.remove(lock_id);
                }
                self.known.remember(&held.user, after);
                None
            }
        }
    }

    /// A batch decided on a known account whose round the account's condition refused
    /// (another writer came first) or whose outcome is unknown. The lease is taken as usual:
    /// under it no copy of the round can apply any more (it needs the item lease-free at the
    /// old version, and the lease's release moves the version). Then a round found applied
    /// answers its calls; if none did, the calls are decided again under the lease, as if they
    /// had just arrived. Returns the lease if it is still held.
    async fn recover_known(
        &self,
        known: HeldLease,
        calls: Vec<Call>,
        sent: Vec<SentRound>,
        error: ServiceError,
    ) -> BatchEnd {
        let refused = matches!(error, ServiceError::LeaseLost);
        if refused {
            self.known.contended(&known.user);
            metrics::known_account_commit(metrics::KnownCommit::Stale);
            tracing::info!("known account changed by another writer; taking the lease");
        } else {
            self.known.forget(&known.user);
            metrics::known_account_commit(metrics::KnownCommit::Unknown);
            tracing::warn!(%error, "commit on a known account unclear; settling it under the lease");
        }
        let lease = match self.acquire_for(&known.user, &calls).await {
            Ok(lease) => lease,
            Err(acquire_error) => {
                // A round that applied still answers. One that did not: refused, it can never
                // apply (the version moved on), so the acquire's error stands; unknown, it may
                // still apply until the version moves, so the outcome stays unknown.
                match self.landed_round(&sent).await {
                    Ok(Some(round)) => answer_from_round(calls, round),
                    Ok(None) if refused => super::queue::answer_unleased(calls, &acquire_error),
                    Ok(None) => answer_each(calls, &error),
                    Err(read_error) => answer_each(calls, &read_error),
                }
                return BatchEnd::Done(None);
            }
        };
        match self.landed_round(&sent).await {
            Ok(Some(round)) => {
                metrics::unclear_commit(metrics::Settled::Applied);
                answer_from_round(calls, round);
                BatchEnd::Done(Some(lease))
            }
            Ok(None) => {
                if !refused {
                    metrics::unclear_commit(metrics::Settled::NotApplied);
                }
                BatchEnd::DecideAgain(lease, calls)
            }
            Err(read_error) => {
                self.release(&lease).await;
                answer_each(calls, &read_error);
                BatchEnd::Done(None)
            }
        }
    }

    /// Up to `COMMIT_ATTEMPTS_MAX` rounds; each round sent is pushed on `sent` before it goes
    /// out. A call whose request id turns out used before is answered from its record and
    /// leaves the batch.
    async fn attempt_rounds(&self, held: &HeldLease, calls: &mut Vec<Call>, sent: &mut Vec<SentRound>) -> Ending {
        let mut last_error = ServiceError::Internal("no commit attempted".to_owned());
        let mut catalog_checked = false;
        let mut attempt = 0;
        while attempt < COMMIT_ATTEMPTS_MAX {
            attempt += 1;
            let now = self.clock.now();
            if now + COMMIT_LEASE_MARGIN.as_millis() as u64 >= held.expires_at {
                return Ending::Stopped(ServiceError::LeaseLost);
            }
            self.answer_unknown_assets(calls);
            let closed = match self.closed_orders(held, calls).await {
                Ok(closed) => closed,
                Err(error) => return Ending::Stopped(error),
            };
            let round = match self.decide_round(held, calls, now, &closed, &mut catalog_checked).await {
                Ok(Some(round)) => round,
                Ok(None) => continue,
                Err(error) => return Ending::Stopped(error),
            };
            // Every round is sent, refusals alone too: its condition (the lease id, or the known
            // version) confirms that the state it was decided on is still the stored one, so no
            // refusal rests on this coordinator's clock (issue 18).
            if let Some(CommitHook(pause)) = &self.config.before_commit {
                pause(&held.user).await;
            }
            let Round {
                answers,
                mut transaction,
                after,
                extend_until,
                ..
            } = round;
            sent.push(SentRound {
                answers: answers.clone(),
                marker: transaction.marker().cloned(),
                feed: transaction.feed.clone(),
                at: now,
            });
            self.feed_sent(&held.user, &transaction.feed);
            let reasons = match self
                .storage
                .transact_batch(std::mem::take(&mut transaction.items))
                .await
            {
                Ok(()) => {
                    if self.journal_again_if_late(now, &transaction.feed).await {
                        self.feed_confirmed(&held.user);
                    }
                    self.watchers.committed(&held.user, || {
                        answers
                            .iter()
                            .filter_map(|(_, answer)| match answer {
                                Answer::Commit(receipt) => Some(receipt.entry.clone()),
                                Answer::Refuse { .. } => None,
                            })
                            .collect()
                    });
                    return Ending::Committed {
                        answers,
                        after: Box::new(after),
                        extend_until,
                    };
                }
                Err(StorageError::TransactionCanceled { reasons }) => reasons,
                Err(error) => {
                    tracing::warn!(%error, "commit outcome unknown; settling it");
                    return Ending::Stopped(error.into());
                }
            };
            match self.after_cancellation(held, calls, &transaction, &reasons).await {
                AfterCancellation::Ended(ending) => return ending,
                // Calls whose request ids were used before left the batch, answered from their
                // records: the round says nothing about the others, so it does not count as an
                // attempt (each such round removes at least one call, so this ends).
                AfterCancellation::Replayed => attempt -= 1,
                AfterCancellation::Retry => {}
            }
            last_error = ServiceError::Unavailable(format!("transaction cancelled: {reasons:?}"));
        }
        Ending::Stopped(last_error)
    }

    /// Decides every call of the batch and builds the round's transaction. None: the catalog
    /// was re-read before refusing on a cached price; decide again.
    async fn decide_round(
        &self,
        held: &HeldLease,
        calls: &[Call],
        now: Millis,
        closed: &Closed,
        catalog_checked: &mut bool,
    ) -> Result<Option<Round>, ServiceError> {
        let operations = calls
            .iter()
            .map(|(_, waiter)| Ok((&waiter.operation, self.quote(&waiter.operation)?)))
            .collect::<Result<Vec<_>, ServiceError>>()?;
        let outcome = decide_batch(&held.account, &operations, closed, now, &self.config.limits);
        let stale_refusal = operations.iter().zip(&outcome.decisions).any(|((_, quote), decision)| {
            quote.is_some() && decision.as_ref().is_err_and(Rejection::depends_on_catalog)
        });
        // Before refusing on a cached price, read the stored catalog once (a load that started
        // after this decision, shared with other batches deciding now): another coordinator may
        // have changed it a moment ago, and a refusal is final. (An accepted trade is checked by
        // its commit's condition instead.)
        if stale_refusal && !*catalog_checked {
            *catalog_checked = true;
            self.catalog
                .refresh_since(&self.storage, tokio::time::Instant::now())
                .await?;
            return Ok(None);
        }
        let extend_until = (held.is_stored() && self.queues.has_waiters(&held.user))
            .then(|| now + self.config.lease_trade.as_millis() as u64);
        let writing = Writing {
            extend_until,
            now,
            retention: self.config.request_retention,
            spread_price_checks: !self.storage.groups_commits(),
        };
        Ok(Some(build_round(
            held,
            calls,
            &operations,
            outcome,
            writing,
            self.incarnation(),
        )))
    }

    /// The orders named by the batch's fills and cancels, and the withdrawals named by its
    /// settlements and returns, that the account does not hold, as stored: closed (filled,
    /// cancelled, settled, returned) or expired, which their refusals name. An order or
    /// withdrawal the account holds is its own (nothing else is read: a fill of an open order
    /// costs no read); one it does not hold is read, and if it is not a reserved order of this
    /// user (another user's, guessed or replayed, or none) the call leaves the batch at once
    /// with NOT_FOUND, recording nothing. An item is written in the same transaction as its
    /// account, and a closed one never changes, so reading it under the account's lease (or
    /// version) is exact.
    async fn closed_orders(&self, held: &HeldLease, calls: &mut Vec<Call>) -> Result<Closed, ServiceError> {
        let mut closed = Closed::default();
        let mut not_found = Vec::new();
        for (position, (_, waiter)) in calls.iter().enumerate() {
            if let Some(withdrawal_id) = waiter.operation.named_withdrawal() {
                if held.account.withdrawals.contains_key(withdrawal_id)
                    || closed.withdrawals.contains_key(withdrawal_id)
                {
                    continue;
                }
                let key = model::withdrawal_key(&held.user, withdrawal_id);
                match super::retry_safe(|| self.storage.get(key.clone())).await? {
                    Some(item) => {
                        closed
                            .withdrawals
                            .insert(withdrawal_id.clone(), model::withdrawal_from_item(&item)?.status);
                    }
                    None => not_found.push((position, Missing::Withdrawal(withdrawal_id.to_string()))),
                }
                continue;
            }
            let Some(order_id) = waiter.operation.named_order() else {
                continue;
            };
            if held.account.holds.contains_key(order_id) || closed.orders.contains_key(order_id) {
                continue;
            }
            let key = model::order_key(order_id.as_str());
            let order = super::retry_safe(|| self.storage.get(key.clone()))
                .await?
                .map(|item| model::order_from_item(&item))
                .transpose()?;
            match order {
                Some(order) if order.user_id == held.user && order.expires_at_ms.is_some() => {
                    closed.orders.insert(order_id.clone(), ClosedOrder::of(&order));
                }
                _ => not_found.push((position, Missing::Order(order_id.to_string()))),
            }
        }
        for (position, missing) in not_found.into_iter().rev() {
            let (_, waiter) = calls.remove(position);
            waiter.answer(Err(ServiceError::NotFound(missing)));
        }
        Ok(closed)
    }

    /// Answers, at once, the calls whose asset left the catalog since they were queued.
    fn answer_unknown_assets(&self, calls: &mut Vec<Call>) {
        let (unknown, known): (Vec<Call>, Vec<Call>) = std::mem::take(calls)
            .into_iter()
            .partition(|(_, waiter)| self.quote(&waiter.operation).is_err());
        *calls = known;
        for (_, waiter) in unknown {
            let error = self.quote(&waiter.operation).expect_err("partitioned on it");
            waiter.answer(Err(error));
        }
    }

    /// What a cancelled round's reasons say: an ending, or None to try again (nothing was
    /// written; a call whose request id was used before is answered from its record and leaves,
    /// or the catalog is re-read if a price check failed).
    async fn after_cancellation(
        &self,
        held: &HeldLease,
        calls: &mut Vec<Call>,
        transaction: &model::NamedItems,
        reasons: &[CancellationReason],
    ) -> AfterCancellation {
        let Some(part) = transaction.refused_part(reasons) else {
            return AfterCancellation::Retry;
        };
        match part {
            TransactionPart::RequestRecord { .. } => {
                // Every call whose record was refused leaves at once, from the last position
                // down so that the positions stay valid.
                let mut replayed = transaction.refused_records(reasons);
                replayed.sort_unstable_by(|a, b| b.cmp(a));
                replayed.dedup();
                for position in replayed {
                    let (_, waiter) = calls.remove(position);
                    let request_id = waiter
                        .request_id
                        .clone()
                        .expect("a request record implies a request id");
                    let recorded = self.recorded_outcome(&held.user, &request_id, &waiter.operation).await;
                    metrics::replayed(waiter.operation.name());
                    waiter.answer(recorded);
                }
                AfterCancellation::Replayed
            }
            // Fenced, or a round of ours already landed and a retry of it was refused.
            TransactionPart::Account | TransactionPart::Counterparty => {
                AfterCancellation::Ended(Ending::Stopped(ServiceError::LeaseLost))
            }
            TransactionPart::CatalogCheck => {
                tracing::info!("catalog changed since it was cached; re-reading it");
                match self.catalog.refresh(&self.storage).await {
                    Ok(()) => AfterCancellation::Retry,
                    Err(error) => AfterCancellation::Ended(Ending::Stopped(error)),
                }
            }
        }
    }

    /// The quote a trade is decided at: the catalog entry as cached now. None for the other
    /// operations.
    pub(super) fn quote(&self, operation: &Operation) -> Result<Option<Quote>, ServiceError> {
        let symbol = match operation {
            Operation::Trade(request) => &request.asset,
            Operation::Reserve(request) => &request.asset,
            Operation::Fill(_) | Operation::Cancel(_) => return Ok(None),
            Operation::Transfer(_) => {
                return Err(ServiceError::Internal(
                    "a transfer is committed on its own, never in a batch".to_owned(),
                ));
            }
            Operation::Deposit(_)
            | Operation::Withdraw(_)
            | Operation::WithdrawPending(_)
            | Operation::Settle(_)
            | Operation::Return(_) => return Ok(None),
        };
        let asset = self
            .catalog
            .cached(symbol)
            .ok_or_else(|| ServiceError::NotFound(Missing::Asset(symbol.clone())))?;
        Ok(Some(Quote {
            price: asset.price,
            active: asset.active,
        }))
    }
}

/// How a round is written, beside its calls and decisions.
#[derive(Debug, Clone, Copy)]
struct Writing {
    /// Keep the lease until then (more calls wait), instead of releasing it.
    extend_until: Option<Millis>,
    now: Millis,
    /// How long the request records are kept.
    retention: Duration,
    /// Trades check the user's own copy of each price (`model::BatchCommit`).
    spread_price_checks: bool,
}

/// Every call's records and answer, and the one transaction that writes them: a step with
/// explicit inputs (the lease held, the calls and their decisions, how the round is written),
/// no coordinator state.
fn build_round(
    held: &HeldLease,
    calls: &[Call],
    operations: &[(&Operation, Option<Quote>)],
    outcome: BatchOutcome,
    writing: Writing,
    writer: &str,
) -> Round {
    let Writing {
        extend_until,
        now,
        retention,
        spread_price_checks,
    } = writing;
    let mut state = held.account.clone();
    let mut writes = Vec::with_capacity(calls.len());
    let mut prices: BTreeMap<_, Price> = BTreeMap::new();
    for (((_, waiter), (_, quote)), decision) in calls.iter().zip(operations).zip(&outcome.decisions) {
        writes.push(match decision {
            Ok(decision) => {
                state.entries += 1;
                let sequence = state.entries;
                state.apply(decision);
                // Only a trade executes at the catalog's price; a fill is at the exchange's.
                if let (Some(effect), Operation::Trade(_)) = (&decision.trade, &waiter.operation) {
                    prices.insert(effect.asset.clone(), effect.price);
                }
                accepted_writes(held, waiter, decision, sequence, now, retention)
            }
            Err(rejection) => refused_writes(held, waiter, quote.as_ref(), rejection, now, retention),
        });
    }
    assert_eq!(
        state.cash, outcome.after.cash,
        "the batch's state is its decisions applied in order"
    );
    let accepted = outcome.accepted();
    let mut after = outcome.after;
    after.version = held.account.version + accepted.max(1) as u64;
    after.entries = state.entries;
    assert_eq!(
        after.entries,
        held.account.entries + accepted as u64,
        "each accepted call's entry takes the account's next sequence"
    );
    let operation_writes: Vec<_> = writes.iter().map(CallWrites::as_model).collect();
    let transaction = model::commit_batch(&model::BatchCommit {
        user: &held.user,
        lock_id: held.lock_id.as_ref(),
        read: &held.account,
        after: &after,
        cash_floor: outcome.cash_floor,
        holding_floors: &outcome.holding_floors,
        prices: &prices,
        operations: &operation_writes,
        extend_until,
        spread_price_checks,
        now,
        writer,
    });
    // Always on: each call's `items_max` bounds what it writes, so `take_batch`'s count bounds
    // the transaction (the account item and the feed record are the two `BATCH_ITEMS_MAX`
    // leaves out).
    let counted: usize = calls.iter().map(|(_, waiter)| waiter.items_max()).sum();
    assert!(
        transaction.items.len() <= counted + 2,
        "a batch wrote {} items, more than the {counted} its calls count, the account and its feed record",
        transaction.items.len()
    );
    let answers = calls
        .iter()
        .zip(writes)
        .map(|((id, _), writes)| (*id, writes.answer))
        .collect();
    Round {
        answers,
        transaction,
        after,
        extend_until,
    }
}

/// An accepted call's ledger entry, order and request record.
fn accepted_writes(
    held: &HeldLease,
    waiter: &Waiter,
    decision: &Decision,
    sequence: u64,
    now: Millis,
    retention: Duration,
) -> CallWrites {
    let (operation, request_id) = (&waiter.operation, waiter.request_id.as_ref());
    let (entry, order) = ops::records(operation, decision, waiter.origin(&held.user, now), sequence);
    let holding = decision
        .trade
        .as_ref()
        .map(|effect| effect.holding)
        .or(decision.hold.as_ref().map(|effect| effect.holding));
    // A fill's key must outlive its order: an exchange may send a fill again on any day the
    // order can still be filled, and it must replay, not apply twice.
    let retention = match (&decision.hold, operation) {
        (Some(effect), Operation::Fill(_)) => {
            retention + Duration::from_millis(effect.hold.expires_at_ms.saturating_sub(now))
        }
        _ => retention,
    };
    let record = request_id.map(|request_id| {
        let outcome = RecordedOutcome::Committed {
            entry_id: entry.entry_id.clone(),
            entry_sequence: Some(entry.sequence),
            order_id: order.as_ref().map(|order| order.order_id.clone()),
            holding,
        };
        (
            request_id.clone(),
            ops::request_record(operation, outcome, now, retention),
        )
    });
    let receipt = Receipt {
        trade: order.clone().zip(holding),
        entry: entry.clone(),
        replayed: false,
    };
    CallWrites {
        entry: Some(entry),
        order,
        order_rewritten: operation.rewrites_order(),
        withdrawal: decision
            .withdrawal
            .as_ref()
            .map(|effect| ops::withdraw::record(&held.user, effect)),
        record,
        answer: Answer::Commit(Box::new(receipt)),
    }
}

/// What a cancelled round leads to.
enum AfterCancellation {
    /// The batch ends so.
    Ended(Ending),
    /// Calls with used request ids left the batch, answered from their records: try the rest.
    Replayed,
    /// Nothing was written and nothing changed in the batch (a catalog re-read): try again.
    Retry,
}

/// What one call of a round writes, and its answer if the round applies.
pub(super) struct CallWrites {
    pub entry: Option<LedgerEntry>,
    pub order: Option<Order>,
    pub order_rewritten: bool,
    pub withdrawal: Option<crate::core::records::Withdrawal>,
    pub record: Option<(RequestId, crate::core::records::RequestRecord)>,
    pub answer: Answer,
}

impl CallWrites {
    fn as_model(&self) -> model::OperationWrites<'_> {
        model::OperationWrites {
            entry: self.entry.as_ref(),
            order: self.order.as_ref(),
            order_rewritten: self.order_rewritten,
            withdrawal: self.withdrawal.as_ref(),
            record: self.record.as_ref().map(|(request_id, record)| (request_id, record)),
        }
    }
}

impl Answer {
    pub(super) fn into_result(self) -> Result<Receipt, ServiceError> {
        match self {
            Answer::Commit(receipt) => Ok(*receipt),
            Answer::Refuse { error, .. } => Err(error),
        }
    }
}

/// Counts what a round that applied did, call by call: commits, and refusals by rule.
fn count_answers(calls: &[Call], answers: &[(usize, Answer)]) {
    for (id, waiter) in calls {
        let name = waiter.operation.name();
        match answer_to(answers, *id) {
            Some(Answer::Commit(receipt)) => {
                metrics::committed(name);
                count_hold(&waiter.operation, receipt);
            }
            Some(Answer::Refuse {
                error: ServiceError::Rejected(rejection),
                ..
            }) => {
                metrics::refused(name, rejection);
                metrics::rolled_back(name);
            }
            Some(Answer::Refuse { .. }) => metrics::rolled_back(name),
            None => {}
        }
    }
}

/// A committed reserve, fill or cancel, in `lockstep_holds_total`.
fn count_hold(operation: &Operation, receipt: &Receipt) {
    let status = receipt.trade.as_ref().map(|(order, _)| order.status);
    match (operation, status) {
        (Operation::Reserve(_), _) => metrics::hold_event("opened", 1),
        (Operation::Fill(_), Some(status)) => {
            metrics::hold_event("fill", 1);
            if status == crate::core::records::OrderStatus::Filled {
                metrics::hold_event("filled", 1);
            }
        }
        (Operation::Cancel(_), _) => metrics::hold_event("cancelled", 1),
        _ => {}
    }
}

/// The answer a round decided for the call at position `id` of the batch, if it decided one.
pub(super) fn answer_to(answers: &[(usize, Answer)], id: usize) -> Option<&Answer> {
    answers
        .iter()
        .find(|(answered, _)| *answered == id)
        .map(|(_, answer)| answer)
}

/// Answers every call from the round that applied (a call it did not decide did not apply).
fn answer_from_round(calls: Vec<Call>, round: &SentRound) {
    for (id, waiter) in calls {
        let answer =
            answer_to(&round.answers, id).map_or(Err(ServiceError::NotApplied), |answer| answer.clone().into_result());
        waiter.answer(answer);
    }
}

/// Answers every call with the same error.
pub(super) fn answer_each(calls: Vec<Call>, error: &ServiceError) {
    for (_, waiter) in calls {
        waiter.answer(Err(error.clone()));
    }
}

/// Answers every call from `answers` (by position in the batch).
fn answer_all(calls: Vec<Call>, answers: &[(usize, Answer)]) {
    for (id, waiter) in calls {
        if let Some(answer) = answer_to(answers, id) {
            waiter.answer(answer.clone().into_result());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::sync::Notify;

    use super::*;
    use crate::core::time::ManualClock;
    use crate::core::{AssetSymbol, Clock, Principal, TradeSide};
    use crate::service::testing::{LEASE, coordinator, coordinator_on, quantity, usd, user};
    use crate::service::{CoordinatorConfig, TradeRequest};
    use crate::storage::embedded::EmbeddedEngine;

    /// A hook that parks the first commit until `go` is notified, and lets later ones pass.
    fn park_first_commit() -> (CommitHook, Arc<Notify>, Arc<Notify>) {
        let (parked, go) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let first = Arc::new(AtomicBool::new(true));
        let hook = {
            let (parked, go) = (Arc::clone(&parked), Arc::clone(&go));
            CommitHook(Arc::new(move |_user: &crate::core::UserId| {
                let (parked, go, first) = (Arc::clone(&parked), Arc::clone(&go), Arc::clone(&first));
                Box::pin(async move {
                    if first.swap(false, Ordering::SeqCst) {
                        parked.notify_one();
                        go.notified().await;
                    }
                })
            }))
        };
        (hook, parked, go)
    }

    /// A coordinator whose first commit parks; it takes the lease for every batch (no known
    /// accounts), so the tests of lease extension see it.
    async fn parked_coordinator() -> (Arc<TransactionCoordinator>, Arc<Notify>, Arc<Notify>) {
        let (hook, parked, go) = park_first_commit();
        let config = CoordinatorConfig {
            before_commit: Some(hook),
            known_accounts: false,
            ..CoordinatorConfig::default()
        };
        let engine = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let coordinator = coordinator_on(engine, &ManualClock::starting_at(1_000_000), config).await;
        (coordinator, parked, go)
    }

    /// `operation` for `who` on `coordinator`, in a task of its own (so that it can queue).
    fn spawn_call(
        coordinator: &Arc<TransactionCoordinator>,
        who: &str,
        operation: Operation,
        request_id: Option<&str>,
    ) -> tokio::task::JoinHandle<Result<Receipt, ServiceError>> {
        let coordinator = Arc::clone(coordinator);
        let (who, request_id) = (
            user(who),
            request_id.map(|id| RequestId::parse_optional("request_id", id).unwrap().unwrap()),
        );
        tokio::spawn(async move { coordinator.mutate(&who, operation, request_id, None).await })
    }

    /// After a commit that gave the lease back, the next call on that account is one
    /// transaction, conditioned on the version the commit left, with no lease taken.
    #[tokio::test]
    async fn a_call_on_a_known_account_costs_one_request() {
        let coordinator = coordinator(&ManualClock::starting_at(1_000_000)).await;
        coordinator
            .mutate(&user("k"), Operation::Deposit(usd("100")), None, None)
            .await
            .unwrap();
        for (operation, cash) in [
            (Operation::Withdraw(usd("30")), "70"),
            (Operation::Deposit(usd("5")), "75"),
        ] {
            let before = coordinator.storage().requests();
            let receipt = coordinator.mutate(&user("k"), operation, None, None).await.unwrap();
            assert_eq!(receipt.entry.cash_after, usd(cash));
            assert_eq!(coordinator.storage().requests() - before, 1, "one transaction");
        }
        let item = coordinator
            .storage()
            .get(model::account_key(&user("k")))
            .await
            .unwrap()
            .unwrap();
        assert!(model::lease_from_item(&item).is_none(), "no lease left behind");
        assert_eq!(coordinator.account(&user("k")).await.unwrap().version, 3);
    }

    /// Two coordinators on one table: a writes, b writes the same account, then a's known
    /// state is stale. a's commit on it is refused (nothing applies), a takes the lease, and
    /// decides again on what b left; the user is then contended for a while (lease path).
    #[tokio::test]
    async fn a_stale_known_account_falls_back_to_the_lease() {
        let engine: Arc<EmbeddedEngine> = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let clock = ManualClock::starting_at(1_000_000);
        let a = coordinator_on(engine.clone(), &clock, CoordinatorConfig::default()).await;
        let b = coordinator_on(engine, &clock, CoordinatorConfig::default()).await;
        a.mutate(&user("s"), Operation::Deposit(usd("10")), None, None)
            .await
            .unwrap();
        b.mutate(&user("s"), Operation::Deposit(usd("5")), None, None)
            .await
            .unwrap();
        let before = a.storage().requests();
        let receipt = a
            .mutate(&user("s"), Operation::Withdraw(usd("12")), None, None)
            .await
            .expect("decided again on b's deposit");
        assert_eq!(receipt.entry.cash_after, usd("3"));
        assert_eq!(
            a.storage().requests() - before,
            3,
            "the refused commit, the acquire, the commit"
        );
        let before = a.storage().requests();
        a.mutate(&user("s"), Operation::Deposit(usd("1")), None, None)
            .await
            .unwrap();
        assert_eq!(a.storage().requests() - before, 2, "contended: the lease path");
        assert_eq!(a.account(&user("s")).await.unwrap().cash, usd("4"));
    }

    /// A commit on a known account parked while another coordinator writes the account: the
    /// stale commit never applies, and each call is decided once on the real state.
    #[tokio::test]
    async fn a_paused_commit_on_a_known_account_cannot_apply_after_another_write() {
        let engine: Arc<EmbeddedEngine> = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let clock = ManualClock::starting_at(1_000_000);
        let plain = coordinator_on(engine.clone(), &clock, CoordinatorConfig::default()).await;
        plain
            .mutate(&user("p"), Operation::Deposit(usd("10")), None, None)
            .await
            .unwrap();
        let (hook, parked, go) = park_first_commit();
        let armed = Arc::new(AtomicBool::new(false));
        let when_armed = {
            let armed = Arc::clone(&armed);
            CommitHook(Arc::new(move |user: &crate::core::UserId| {
                let pause = armed.load(Ordering::SeqCst).then(|| (hook.0)(user));
                Box::pin(async move {
                    if let Some(pause) = pause {
                        pause.await;
                    }
                })
            }))
        };
        let config = CoordinatorConfig {
            before_commit: Some(when_armed),
            ..CoordinatorConfig::default()
        };
        let paused = coordinator_on(engine, &clock, config).await;
        // paused learns the account with a commit of its own; then its next commit parks.
        let learned = paused
            .mutate(&user("p"), Operation::Deposit(usd("1")), None, None)
            .await;
        assert_eq!(learned.unwrap().entry.cash_after, usd("11"));
        armed.store(true, Ordering::SeqCst);
        let withdrawal = {
            let paused = Arc::clone(&paused);
            tokio::spawn(async move {
                paused
                    .mutate(&user("p"), Operation::Withdraw(usd("11")), None, None)
                    .await
            })
        };
        parked.notified().await;
        plain
            .mutate(&user("p"), Operation::Withdraw(usd("5")), None, None)
            .await
            .unwrap();
        go.notify_one();
        let refused = withdrawal.await.unwrap();
        assert!(
            matches!(
                refused,
                Err(ServiceError::Rejected(Rejection::InsufficientBalance { .. }))
            ),
            "decided again on 6.00: {refused:?}"
        );
        assert_eq!(plain.account(&user("p")).await.unwrap().cash, usd("6"));
    }

    /// A lone call: one acquire, then one transaction that commits and releases.
    #[tokio::test]
    async fn a_lone_call_costs_two_requests() {
        let coordinator = coordinator(&ManualClock::starting_at(1_000_000)).await;
        let before = coordinator.storage().requests();
        let receipt = coordinator
            .mutate(&user("a"), Operation::Deposit(usd("100")), None, None)
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

    /// Calls that queue behind a commit are decided in order on the running balance and
    /// committed together, as many as `BATCH_ITEMS_MAX` items allow (49 such calls) in a
    /// transaction; a refusal in the middle is that
    /// call's answer alone; while more calls wait, a commit extends the lease instead of
    /// releasing it, so the next batch needs no acquire.
    #[tokio::test]
    async fn queued_calls_commit_together_with_a_refusal_in_the_middle() {
        let (coordinator, parked, go) = parked_coordinator().await;
        let call = |operation: Operation, id: String| spawn_call(&coordinator, "b", operation, Some(&id));
        let first = call(Operation::Deposit(usd("10")), "b-0".to_owned());
        parked.notified().await;
        let mut queued = vec![
            call(Operation::Withdraw(usd("4")), "b-1".to_owned()),
            call(Operation::Withdraw(usd("50")), "b-2".to_owned()),
            call(Operation::Deposit(usd("1")), "b-3".to_owned()),
        ];
        // Each call with a request id counts two items (entry, record): one full batch, and one more.
        let per_batch = super::super::BATCH_ITEMS_MAX / 2;
        for index in 4..=per_batch + 1 {
            queued.push(call(Operation::Deposit(usd("1")), format!("b-{index}")));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let before = coordinator.storage().requests();
        go.notify_one();
        assert_eq!(first.await.unwrap().unwrap().entry.cash_after, usd("10"));
        let mut results = Vec::new();
        for call in queued {
            results.push(call.await.unwrap());
        }
        assert_eq!(results[0].as_ref().unwrap().entry.cash_after, usd("6"));
        assert!(matches!(
            results[1],
            Err(ServiceError::Rejected(Rejection::InsufficientBalance { .. }))
        ));
        assert_eq!(results[2].as_ref().unwrap().entry.cash_after, usd("7"));
        let last = results.last().unwrap().as_ref().unwrap();
        assert_eq!(last.entry.cash_after, usd(&(per_batch + 5).to_string()));
        assert_eq!(
            coordinator.storage().requests() - before,
            4,
            "the parked commit, one acquire, a commit of {per_batch} calls that extends the lease, and a commit of the last call"
        );
        let sequences: Vec<u64> = results
            .iter()
            .filter_map(|result| result.as_ref().ok())
            .map(|receipt| receipt.entry.sequence)
            .collect();
        assert!(
            sequences.windows(2).all(|pair| pair[0] < pair[1]),
            "entries keep their order: {sequences:?}"
        );
        let request_id = RequestId::parse_optional("request_id", "b-2").unwrap();
        let replayed = coordinator
            .mutate(&user("b"), Operation::Withdraw(usd("50")), request_id, None)
            .await;
        assert!(matches!(replayed, Err(ServiceError::RefusedEarlier(_))), "{replayed:?}");
    }

    /// A full batch at DynamoDB's limit reaches storage and applies: 98 deposits without request
    /// ids (an entry each), the account and its feed record, 100 items in one transaction.
    #[tokio::test]
    async fn a_batch_of_exactly_one_hundred_items_commits() {
        let (coordinator, parked, go) = parked_coordinator().await;
        let first = spawn_call(&coordinator, "h", Operation::Deposit(usd("1")), None);
        parked.notified().await;
        let deposits: Vec<_> = (0..super::super::BATCH_ITEMS_MAX)
            .map(|_| spawn_call(&coordinator, "h", Operation::Deposit(usd("1")), None))
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let before = coordinator.storage().requests();
        go.notify_one();
        first.await.unwrap().unwrap();
        let mut sequences = Vec::new();
        for deposit in deposits {
            sequences.push(deposit.await.unwrap().unwrap().entry.sequence);
        }
        assert_eq!(
            coordinator.storage().requests() - before,
            3,
            "the parked commit, the acquire, one commit of 98 deposits (100 items)"
        );
        sequences.sort_unstable();
        assert_eq!(sequences, (2..=99).collect::<Vec<u64>>());
        let account = coordinator.account(&user("h")).await.unwrap();
        assert_eq!(account.cash, usd("99"));
    }

    /// Issue 18: a round of refusals that write nothing, while more calls wait, is still sent
    /// (the account's conditioned update alone): storage, not this coordinator's clock, confirms
    /// the state the refusals were decided on. 99 refusals behind a parked deposit: the parked
    /// commit (which released the lease: nothing waited when it was decided), one acquire, a
    /// round of 98 refusals that extends the lease, and a round of the last one. (Answered on the
    /// clock, the round of 98 sent nothing: 3.)
    #[tokio::test]
    async fn a_round_of_refusals_while_calls_wait_is_confirmed_by_storage() {
        let (coordinator, parked, go) = parked_coordinator().await;
        let first = spawn_call(&coordinator, "r", Operation::Deposit(usd("10")), None);
        parked.notified().await;
        // Without a request id a withdrawal counts one item: one full batch, and one more.
        let refused: Vec<_> = (0..=super::super::BATCH_ITEMS_MAX)
            .map(|_| spawn_call(&coordinator, "r", Operation::Withdraw(usd("50")), None))
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let before = coordinator.storage().requests();
        go.notify_one();
        first.await.unwrap().unwrap();
        for call in refused {
            assert!(matches!(
                call.await.unwrap(),
                Err(ServiceError::Rejected(Rejection::InsufficientBalance { .. }))
            ));
        }
        assert_eq!(
            coordinator.storage().requests() - before,
            4,
            "the parked commit, the acquire, a round of 98 refusals (sent, not answered on the clock), the last refusal's round"
        );
    }

    /// A refusal decided under a lease that a peer (its clock ahead) took over before the round
    /// reached storage is not final: the peer may have changed the account since the read. The
    /// round is fenced, and the call is answered ABORTED, to be decided again on the real state.
    #[tokio::test]
    async fn a_refusal_under_a_lease_taken_over_is_not_final() {
        let engine: Arc<EmbeddedEngine> = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let clock = ManualClock::starting_at(1_000_000);
        let (hook, parked, go) = park_first_commit();
        let config = CoordinatorConfig {
            before_commit: Some(hook),
            known_accounts: false,
            ..CoordinatorConfig::default()
        };
        let slow = coordinator_on(engine.clone(), &clock, config).await;
        let ahead = ManualClock::starting_at(1_000_000 + 60_000);
        let peer = coordinator_on(engine, &ahead, CoordinatorConfig::default()).await;
        peer.mutate(&user("t"), Operation::Deposit(usd("10")), None, None)
            .await
            .unwrap();
        let refused = {
            let slow = Arc::clone(&slow);
            tokio::spawn(async move {
                slow.mutate(&user("t"), Operation::Withdraw(usd("50")), None, None)
                    .await
            })
        };
        parked.notified().await;
        // The peer's clock is past the slow coordinator's lease: it takes over and deposits.
        peer.mutate(&user("t"), Operation::Deposit(usd("100")), None, None)
            .await
            .unwrap();
        go.notify_one();
        let answer = refused.await.unwrap().unwrap_err();
        assert_eq!(
            answer,
            ServiceError::LeaseLost,
            "not 'Insufficient balance. Current: $10.00' after a deposit of 100 was acknowledged"
        );
        let retried = slow
            .mutate(&user("t"), Operation::Withdraw(usd("50")), None, None)
            .await;
        assert_eq!(retried.unwrap().entry.cash_after, usd("60"));
    }

    /// Issue 18: a trade is never refused on a price (or active flag) that another coordinator
    /// changed a moment ago, however recently this coordinator's cache was loaded: the catalog
    /// is read again before such a refusal.
    #[tokio::test]
    async fn a_trade_is_never_refused_on_a_catalog_another_coordinator_just_changed() {
        let engine: Arc<EmbeddedEngine> = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let clock = ManualClock::starting_at(1_000_000);
        let trader = coordinator_on(engine.clone(), &clock, CoordinatorConfig::default()).await;
        let admin = coordinator_on(engine, &clock, CoordinatorConfig::default()).await;
        trader
            .deposit(&Principal::local(), &user("q"), usd("1000"), None, None)
            .await
            .unwrap();
        let symbol = |raw: &str| AssetSymbol::parse("asset", raw).unwrap();
        let asset = |raw: &str, price: &str, active| crate::core::records::Asset {
            symbol: symbol(raw),
            price: Price::parse("price", price).unwrap(),
            active,
        };
        // SOL moves from 145.25 to 130.00; the trader's cache (loaded just now) still says 145.25.
        admin
            .upsert_asset(&Principal::local(), asset("SOL", "130.00", true), false)
            .await
            .unwrap();
        let buy = |asset_symbol: &str, limit: Option<&str>| TradeRequest {
            side: TradeSide::Buy,
            asset: symbol(asset_symbol),
            quantity: quantity("1"),
            limit_price: limit.map(|raw| Price::parse("limit_price", raw).unwrap()),
        };
        let receipt = trader
            .trade(&Principal::local(), &user("q"), buy("SOL", Some("140")), None, None)
            .await
            .expect("bought at the stored 130.00, not refused on the cached 145.25");
        assert_eq!(receipt.trade.unwrap().0.price, Price::parse("price", "130").unwrap());
        // LUNA is activated by the other coordinator: not refused as inactive from the cache.
        admin
            .upsert_asset(&Principal::local(), asset("LUNA", "0.0001", true), false)
            .await
            .unwrap();
        let luna = TradeRequest {
            quantity: quantity("20000"),
            ..buy("LUNA", None)
        };
        trader
            .trade(&Principal::local(), &user("q"), luna, None, None)
            .await
            .expect("LUNA is active in storage");
    }

    /// Retries of calls that committed earlier (their request ids used), queued in one batch with
    /// new calls: each retry replays its record and the new calls commit. Rounds that only send
    /// retries away do not count against `COMMIT_ATTEMPTS_MAX` (before, the fifth retry in a
    /// batch made the whole batch fail).
    #[tokio::test]
    async fn many_retries_in_one_batch_replay_and_the_rest_commits() {
        let engine = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let clock = ManualClock::starting_at(1_000_000);
        let earlier = coordinator_on(engine.clone(), &clock, CoordinatorConfig::default()).await;
        let deposit = |coordinator: &Arc<TransactionCoordinator>, id: String| {
            spawn_call(coordinator, "m", Operation::Deposit(usd("1")), Some(&id))
        };
        let mut originals = Vec::new();
        for index in 0..6 {
            originals.push(deposit(&earlier, format!("r-{index}")).await.unwrap().unwrap());
        }
        let (hook, parked, go) = park_first_commit();
        let config = CoordinatorConfig {
            before_commit: Some(hook),
            known_accounts: false,
            ..CoordinatorConfig::default()
        };
        let coordinator = coordinator_on(engine, &clock, config).await;
        let first = deposit(&coordinator, "w".to_owned());
        parked.notified().await;
        let retries: Vec<_> = (0..6)
            .map(|index| deposit(&coordinator, format!("r-{index}")))
            .collect();
        let fresh: Vec<_> = (0..4)
            .map(|index| deposit(&coordinator, format!("n-{index}")))
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        go.notify_one();
        first.await.unwrap().unwrap();
        for (retry, original) in retries.into_iter().zip(&originals) {
            let replayed = retry.await.unwrap().unwrap();
            assert!(replayed.replayed);
            assert_eq!(replayed.entry.entry_id, original.entry.entry_id);
        }
        for call in fresh {
            assert!(!call.await.unwrap().unwrap().replayed);
        }
        assert_eq!(coordinator.account(&user("m")).await.unwrap().cash, usd("11"));
    }

    /// Two calls with the same request id queued together: the second replays the first.
    #[tokio::test]
    async fn a_duplicate_request_id_in_the_queue_replays() {
        let (coordinator, parked, go) = parked_coordinator().await;
        let call = |id: &str| spawn_call(&coordinator, "c", Operation::Deposit(usd("7")), Some(id));
        let first = call("warm-up");
        parked.notified().await;
        let (once, twice) = (call("dup"), call("dup"));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        go.notify_one();
        first.await.unwrap().unwrap();
        let (once, twice) = (once.await.unwrap().unwrap(), twice.await.unwrap().unwrap());
        assert_eq!(once.entry.entry_id, twice.entry.entry_id);
        assert!(twice.replayed && !once.replayed);
        assert_eq!(coordinator.account(&user("c")).await.unwrap().cash, usd("14"));
    }

    /// A call cancelled, or whose deadline passes, while it waits in the queue leaves it: no
    /// storage request is made for it, and nothing of it is applied.
    #[tokio::test]
    async fn calls_that_leave_the_queue_cost_nothing_and_apply_nothing() {
        let (coordinator, parked, go) = parked_coordinator().await;
        let first = {
            let coordinator = Arc::clone(&coordinator);
            tokio::spawn(async move {
                coordinator
                    .deposit(&Principal::local(), &user("d"), usd("10"), None, None)
                    .await
            })
        };
        parked.notified().await;
        let cancelled = {
            let coordinator = Arc::clone(&coordinator);
            tokio::spawn(async move {
                coordinator
                    .deposit(&Principal::local(), &user("d"), usd("1"), None, None)
                    .await
            })
        };
        let deadline = Some(tokio::time::Instant::now() + std::time::Duration::from_millis(30));
        let timed_out = coordinator
            .deposit(&Principal::local(), &user("d"), usd("2"), None, deadline)
            .await;
        assert_eq!(timed_out.unwrap_err(), ServiceError::DeadlineExceeded);
        cancelled.abort();
        assert!(cancelled.await.unwrap_err().is_cancelled());
        let before = coordinator.storage().requests();
        go.notify_one();
        first.await.unwrap().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(coordinator.account(&user("d")).await.unwrap().cash, usd("10"));
        assert!(
            coordinator.storage().requests() - before <= 3,
            "the parked commit, then at most a release and this read"
        );
    }

    /// Too little lease left for a commit: nothing is sent, the lease is given back, and the
    /// call is told it was not applied.
    #[tokio::test]
    async fn no_commit_is_sent_within_the_lease_margin() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        let held = coordinator
            .acquire(&user("e"), "DEPOSIT", LEASE, false, None)
            .await
            .unwrap();
        clock.advance(LEASE - COMMIT_LEASE_MARGIN);
        let (reply, answer) = tokio::sync::oneshot::channel();
        let waiter = Waiter {
            principal: Principal::local(),
            operation: Operation::Deposit(usd("5")),
            request_id: None,
            state: Default::default(),
            reply,
            wait_until: tokio::time::Instant::now() + LEASE,
            on_timeout: ServiceError::Busy,
        };
        let before = coordinator.storage().requests();
        assert!(coordinator.commit_batch(held, vec![(0, waiter)]).await.is_none());
        assert_eq!(answer.await.unwrap().unwrap_err(), ServiceError::LeaseLost);
        assert_eq!(coordinator.storage().requests() - before, 1, "the release alone");
        assert!(matches!(
            coordinator.account(&user("e")).await,
            Err(ServiceError::NotFound(_))
        ));
        assert!(
            coordinator
                .acquire(&user("e"), "DEPOSIT", LEASE, false, None)
                .await
                .is_ok()
        );
    }

    /// A price changed behind the cache fails the commit's catalog check; the catalog is re-read
    /// and the trade commits at the stored price.
    #[tokio::test]
    async fn a_stale_cached_price_is_re_read_before_committing() {
        let coordinator = coordinator(&ManualClock::starting_at(1_000_000)).await;
        coordinator
            .deposit(&Principal::local(), &user("f"), usd("1000"), None, None)
            .await
            .unwrap();
        let mut sol = coordinator
            .catalog
            .cached(&AssetSymbol::parse("asset", "SOL").unwrap())
            .unwrap();
        sol.price = Price::parse("price", "150").unwrap();
        let old = coordinator.catalog.cached(&sol.symbol);
        let everywhere = model::put_asset_everywhere(&sol, old.as_ref());
        coordinator.storage().transact(&everywhere, None).await.unwrap();
        let trade = TradeRequest {
            side: TradeSide::Buy,
            asset: sol.symbol.clone(),
            quantity: quantity("2"),
            limit_price: None,
        };
        let receipt = coordinator
            .trade(&Principal::local(), &user("f"), trade, None, None)
            .await
            .unwrap();
        let (order, holding) = receipt.trade.unwrap();
        assert_eq!(order.price, sol.price);
        assert_eq!(holding, quantity("2"));
        assert_eq!(receipt.entry.cash_after, usd("700"));
    }

    /// A deposit above the whole daily limit is refused before the lease: no request, and no
    /// item left for a user who has no account.
    #[tokio::test]
    async fn an_amount_above_the_daily_limit_takes_no_lease_and_leaves_nothing() {
        let coordinator = coordinator(&ManualClock::starting_at(1_000_000)).await;
        let before = coordinator.storage().requests();
        let error = coordinator
            .deposit(&Principal::local(), &user("g"), usd("10000.01"), None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(error, ServiceError::Rejected(Rejection::AboveDailyLimit { .. })),
            "{error:?}"
        );
        assert_eq!(coordinator.storage().requests(), before, "no storage request");
        let item = coordinator.storage().get(model::account_key(&user("g"))).await.unwrap();
        assert!(item.is_none(), "no item: {item:?}");
    }

    /// A coordinator whose clock runs a day ahead cannot do lasting damage: the lease it leaves
    /// does not block the user until its far expiry, and the day it stamped does not freeze
    /// the daily totals.
    #[tokio::test]
    async fn a_clock_far_ahead_does_no_lasting_damage() {
        const DAY_MS: u64 = 86_400_000;
        let engine: Arc<EmbeddedEngine> = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let local = ManualClock::starting_at(1_795_752_000_000);
        let ahead = ManualClock::starting_at(1_795_752_000_000 + 2 * DAY_MS);
        let fast = coordinator_on(engine.clone(), &ahead, CoordinatorConfig::default()).await;
        let config = CoordinatorConfig {
            lease_wait_max: std::time::Duration::from_millis(30),
            ..CoordinatorConfig::default()
        };
        let honest = coordinator_on(engine, &local, config).await;
        fast.withdraw(&Principal::local(), &user("h"), usd("1"), None, None)
            .await
            .unwrap_err();
        fast.deposit(&Principal::local(), &user("h"), usd("100"), None, None)
            .await
            .unwrap();
        fast.withdraw(&Principal::local(), &user("h"), usd("40"), None, None)
            .await
            .unwrap();
        let abandoned = fast.acquire(&user("h"), "WITHDRAWAL", LEASE, true, None).await.unwrap();
        assert!(abandoned.expires_at > local.now() + 2 * DAY_MS - 1);
        let receipt = honest
            .withdraw(&Principal::local(), &user("h"), usd("20"), None, None)
            .await
            .unwrap();
        assert_eq!(receipt.entry.cash_after, usd("40"));
        let account = honest.account(&user("h")).await.unwrap();
        assert_eq!(
            account.limit_day,
            Some(honest.today()),
            "the local day, not the far one"
        );
        assert_eq!(account.withdrawn_today, usd("20"), "counted from zero on the local day");
    }
}
