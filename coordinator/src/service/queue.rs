//! A queue per account, in process. Calls for one user wait here in FIFO order, in memory; only
//! the queue's driver (one task per busy user) touches storage, so waiters never poll it. A call
//! that is cancelled, or whose deadline or wait limit passes while it is still queued, leaves
//! without a storage request and with nothing applied. Several coordinators still meet at the
//! DynamoDB lease, which the driver takes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::{BATCH_ITEMS_MAX, HeldLease, Operation, Receipt, ServiceError, TransactionCoordinator};
use crate::core::ops::Origin;
use crate::core::{LeaseId, Millis, Principal, RequestId, UserId};

/// After a commit, a driver waits at most this fraction of the commit's time (1/20: 5 %) for the
/// callers it answered to call again before it takes the next batch (`AccountQueues::gather`).
const GATHER_SHARE_OF_COMMIT: u32 = 20;
/// ... unless this account's answered callers are known to come back together a little later
/// (closed-loop callers behind a forwarding coordinator: two more hops), well within the commit:
/// then the driver waits for them, up to this fraction (1/4) of the commit's time. Callers who do
/// not come back together (an open loop: arrivals spread over the whole commit) never teach it a
/// return time that short, and keep the 5 % bound.
const GATHER_LEARNED_SHARE_OF_COMMIT: u32 = 4;
/// The share of a batch's answered callers whose return is timed: three in four.
const RETURN_SHARE: (usize, usize) = (3, 4);

/// Queued: the driver has not taken it yet; it may still leave.
const QUEUED: u8 = 0;
/// Taken into a batch by the driver: its answer comes from the batch's ending.
const TAKEN: u8 = 1;
/// Left the queue (cancelled, deadline, wait limit) before the driver took it.
const LEFT: u8 = 2;

/// Whether a waiter is still queued, taken, or gone, and the lease its call was decided under;
/// shared by the waiter and the driver.
#[derive(Debug, Clone, Default)]
pub(super) struct WaiterState(Arc<AtomicU8>, Arc<std::sync::OnceLock<LeaseId>>);

impl WaiterState {
    /// The driver takes the waiter, unless it left first.
    fn take(&self) -> bool {
        self.0
            .compare_exchange(QUEUED, TAKEN, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Notes the lease the call is decided under, for its log lines.
    pub(super) fn decided_under(&self, lease: &LeaseId) {
        self.1.set(lease.clone()).ok();
    }

    /// The waiter leaves, unless the driver took it first.
    pub(super) fn leave(&self) -> bool {
        self.0
            .compare_exchange(QUEUED, LEFT, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// One call waiting for its user's driver.
#[derive(Debug)]
pub(super) struct Waiter {
    /// Who asked: recorded on the ledger entry and order the call's commit writes.
    pub principal: Principal,
    pub operation: Operation,
    pub request_id: Option<RequestId>,
    pub state: WaiterState,
    pub reply: oneshot::Sender<Result<Receipt, ServiceError>>,
    /// The earlier of the caller's deadline and its lease wait limit, and the error it gets if
    /// that passes before its call is decided.
    pub wait_until: Instant,
    pub on_timeout: ServiceError,
}

impl Waiter {
    /// Sends the call's answer; a caller that went away meanwhile does not hear it.
    pub fn answer(self, result: Result<Receipt, ServiceError>) {
        self.reply.send(result).ok();
    }

    /// The most items the call adds to its batch's transaction.
    pub fn items_max(&self) -> usize {
        self.operation.items_max(self.request_id.is_some())
    }

    /// Who, why and when, for the records of the call's commit on `user`'s account.
    pub fn origin<'a>(&'a self, user: &'a UserId, now: Millis) -> Origin<'a> {
        Origin {
            user,
            principal: &self.principal,
            request_id: self.request_id.as_ref(),
            now,
        }
    }
}

/// A call of a batch, with its position in the batch as taken from the queue.
pub(super) type Call = (usize, Waiter);

/// A request to lend an account to the driver of a transfer that needs it, waiting in the
/// account's queue like a call: when it reaches the front, the account's driver hands over its
/// hold (a lease it carries, if any) and pauses until the transfer gives a hold back.
#[derive(Debug)]
pub(super) struct LendRequest {
    pub state: WaiterState,
    pub lent: oneshot::Sender<Lent>,
}

/// An account lent to a transfer: the lease its driver carried (None if it carried none), and
/// where the transfer gives back what it leaves held (None once released with the commit).
#[derive(Debug)]
pub(super) struct Lent {
    pub held: Option<HeldLease>,
    pub back: oneshot::Sender<Option<HeldLease>>,
}

/// What waits in an account's queue.
#[derive(Debug)]
pub(super) enum Queued {
    Call(Box<Waiter>),
    Lend(LendRequest),
}

impl Queued {
    fn state(&self) -> &WaiterState {
        match self {
            Queued::Call(waiter) => &waiter.state,
            Queued::Lend(request) => &request.state,
        }
    }

    /// Whether it is served on its own: a loan, or a call that is never batched (a transfer).
    fn is_solo(&self) -> bool {
        match self {
            Queued::Call(waiter) => waiter.operation.is_solo(),
            Queued::Lend(_) => true,
        }
    }
}

/// What the driver takes from the front of a queue next.
#[derive(Debug)]
pub(super) enum Taken {
    /// Nothing waits: the driver stops (the queue's entry is gone).
    Nothing,
    /// Calls to decide and commit together.
    Batch(Vec<Waiter>),
    /// A call committed on its own (a transfer).
    Solo(Box<Waiter>),
    /// A transfer driven from another queue borrows this account.
    Lend(LendRequest),
}

#[derive(Debug, Default)]
struct UserQueue {
    waiters: VecDeque<Queued>,
    /// Told of every call queued, for a driver gathering its next batch (`gather`).
    arrived: Arc<Notify>,
    /// When the driver last answered a batch of several calls, and how many calls must arrive
    /// since for `RETURN_SHARE` of them to have come back.
    answered: Option<(Instant, usize)>,
    /// Calls queued since `answered`.
    arrivals_since: usize,
    /// How long after an answer `RETURN_SHARE` of the answered callers have called again,
    /// smoothed over batches (an exponential average, 1/8 weight to each new one).
    return_time: Option<Duration>,
}

impl UserQueue {
    /// Counts an arrival towards the return time of the last answered batch.
    fn time_return(&mut self) {
        let Some((at, needed)) = self.answered else {
            return;
        };
        self.arrivals_since += 1;
        if self.arrivals_since >= needed {
            let sample = at.elapsed();
            self.return_time = Some(match self.return_time {
                Some(before) => (before * 7 + sample) / 8,
                None => sample,
            });
            self.answered = None;
        }
    }
}

/// Where a new call goes.
pub(super) enum Enqueued {
    /// Queued behind a running driver.
    Queued,
    /// Queued, and nobody drives this user's queue: the caller must start a driver.
    StartDriver,
}

/// Every user's queue. A user has an entry exactly while a driver runs for it.
#[derive(Debug, Default)]
pub(super) struct AccountQueues {
    queues: Mutex<HashMap<UserId, UserQueue>>,
    /// Calls queued or being decided, across users: bounded by `--max-inflight`.
    inflight: AtomicUsize,
}

impl AccountQueues {
    /// Queues `waiter` for `user`, unless `per_user_max` calls already wait there.
    pub fn enqueue(&self, user: &UserId, waiter: Queued, per_user_max: usize) -> Result<Enqueued, Box<Queued>> {
        let mut queues = self.queues.lock().expect("account queues poisoned");
        match queues.get_mut(user) {
            Some(queue) if queue.waiters.len() >= per_user_max => Err(Box::new(waiter)),
            Some(queue) => {
                queue.waiters.push_back(waiter);
                queue.time_return();
                queue.arrived.notify_one();
                Ok(Enqueued::Queued)
            }
            None => {
                let mut queue = UserQueue::default();
                queue.waiters.push_back(waiter);
                queues.insert(user.clone(), queue);
                Ok(Enqueued::StartDriver)
            }
        }
    }

    /// Takes queued calls from the front while their items fit in `items_max`, skipping the ones that left, and
    /// stopping before a request id already in the batch (two records of one id cannot share a
    /// transaction; the later one replays the earlier's outcome in the next batch) and before a
    /// solo entry (a transfer or a loan), which is taken alone when it is at the front.
    /// `Nothing` means the queue is empty, and the driver must stop: its entry is removed under
    /// the same lock, so the next call starts a new driver.
    pub fn take_batch(&self, user: &UserId, items_max: usize) -> Taken {
        let mut queues = self.queues.lock().expect("account queues poisoned");
        let Some(queue) = queues.get_mut(user) else {
            return Taken::Nothing;
        };
        let mut batch: Vec<Waiter> = Vec::new();
        let mut items = 0;
        while let Some(front) = queue.waiters.front() {
            if front.is_solo() {
                if !batch.is_empty() {
                    break;
                }
                let solo = queue.waiters.pop_front().expect("front exists");
                if !solo.state().take() {
                    continue;
                }
                return match solo {
                    Queued::Call(waiter) => Taken::Solo(waiter),
                    Queued::Lend(request) => Taken::Lend(request),
                };
            }
            let duplicate = match front {
                Queued::Call(front) => front
                    .request_id
                    .as_ref()
                    .is_some_and(|id| batch.iter().any(|taken| taken.request_id.as_ref() == Some(id))),
                Queued::Lend(_) => false,
            };
            // A call alone always fits (`CALL_ITEMS_MAX` <= `BATCH_ITEMS_MAX`, and `build_round`
            // asserts the count), so a non-empty queue never gives an empty batch.
            let fits = match front {
                Queued::Call(front) => batch.is_empty() || items + front.items_max() <= items_max,
                Queued::Lend(_) => true,
            };
            if duplicate || !fits {
                break;
            }
            if let Queued::Call(waiter) = queue.waiters.pop_front().expect("front exists")
                && waiter.state.take()
            {
                items += waiter.items_max();
                batch.push(*waiter);
            }
        }
        if batch.is_empty() && queue.waiters.is_empty() {
            queues.remove(user);
            return Taken::Nothing;
        }
        Taken::Batch(batch)
    }

    /// Notes that the driver of `user` just answered `count` calls: the arrivals from now on time
    /// how long its callers take to come back.
    pub fn answered(&self, user: &UserId, count: usize) {
        let mut queues = self.queues.lock().expect("account queues poisoned");
        if let Some(queue) = queues.get_mut(user) {
            let needed = (count * RETURN_SHARE.0).div_ceil(RETURN_SHARE.1).max(1);
            queue.answered = Some((Instant::now(), needed));
            queue.arrivals_since = 0;
        }
    }

    /// How long the driver of `user` waits for its answered callers after a commit that took
    /// `commit`: a twentieth of it, or the callers' learned return time when that is longer and
    /// within a quarter of the commit (they come back together, just after a twentieth).
    pub fn linger(&self, user: &UserId, commit: Duration) -> Duration {
        let bound = commit / GATHER_SHARE_OF_COMMIT;
        let learned = self
            .queues
            .lock()
            .expect("account queues poisoned")
            .get(user)
            .and_then(|queue| queue.return_time);
        match learned {
            Some(learned) if learned <= commit / GATHER_LEARNED_SHARE_OF_COMMIT => learned.max(bound),
            _ => bound,
        }
    }

    /// Waits until `user`'s queue holds `more` calls beyond those queued now, or as many as one
    /// batch takes, and no longer than `until`: the callers a commit just answered, if they call
    /// again at once (closed loop), join the calls that queued during the commit in one full
    /// batch instead of waiting for the next commit.
    pub async fn gather(&self, user: &UserId, more: usize, until: Instant) {
        let Some((mut calls, mut items, arrived)) = self.queued(user) else {
            return;
        };
        let target = calls + more;
        while calls < target && items < BATCH_ITEMS_MAX {
            if tokio::time::timeout_at(until, arrived.notified()).await.is_err() {
                return;
            }
            let Some((now_calls, now_items, _)) = self.queued(user) else {
                return;
            };
            (calls, items) = (now_calls, now_items);
        }
    }

    /// The calls queued for `user` (still waiting), their items and the queue's arrival signal.
    fn queued(&self, user: &UserId) -> Option<(usize, usize, Arc<Notify>)> {
        let queues = self.queues.lock().expect("account queues poisoned");
        let queue = queues.get(user)?;
        let waiting = || {
            queue
                .waiters
                .iter()
                .filter(|waiter| waiter.state().0.load(Ordering::SeqCst) == QUEUED)
        };
        let items = waiting()
            .map(|waiter| match waiter {
                Queued::Call(call) => call.items_max(),
                Queued::Lend(_) => 0,
            })
            .sum();
        Some((waiting().count(), items, Arc::clone(&queue.arrived)))
    }

    /// Whether calls for `user` are waiting behind the batch being committed: then the commit
    /// extends the lease instead of releasing it.
    pub fn has_waiters(&self, user: &UserId) -> bool {
        let queues = self.queues.lock().expect("account queues poisoned");
        queues.get(user).is_some_and(|queue| {
            queue
                .waiters
                .iter()
                .any(|waiter| waiter.state().0.load(Ordering::SeqCst) == QUEUED)
        })
    }

    /// Counts a call in, unless `max` are already in flight.
    pub fn admit(&self, max: usize) -> Option<InflightPermit<'_>> {
        self.inflight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |current| {
                (current < max).then_some(current + 1)
            })
            .ok()
            .map(|_| InflightPermit(&self.inflight))
    }
}

/// One call in flight; counted out when dropped.
#[derive(Debug)]
pub(super) struct InflightPermit<'a>(&'a AtomicUsize);

impl Drop for InflightPermit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Leaves the queue when the waiting call is dropped (cancelled) before the driver took it.
#[derive(Debug)]
pub(super) struct LeaveOnDrop(pub WaiterState);

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// The earlier of the caller's deadline and the lease wait limit, and which of the two it is.
pub(super) fn wait_bound(deadline: Option<Instant>, wait_limit: Instant) -> (Instant, ServiceError) {
    match deadline {
        Some(deadline) if deadline <= wait_limit => (deadline, ServiceError::DeadlineExceeded),
        _ => (wait_limit, ServiceError::Busy),
    }
}

impl TransactionCoordinator {
    /// Queues the call behind `user`'s others and waits for its answer: from the batch that
    /// decides it, or the wait bound's error if it is still queued when that passes (it then
    /// leaves, nothing applied). Past `--max-inflight` calls, or `--max-queued-per-user` for
    /// this user, RESOURCE_EXHAUSTED at once.
    pub(super) async fn queue_and_wait(
        self: &Arc<Self>,
        principal: &Principal,
        user: &UserId,
        operation: Operation,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        let _permit = self
            .queues
            .admit(self.config.max_inflight)
            .ok_or(ServiceError::Overloaded("mutations in flight"))?;
        let (wait_until, on_timeout) = wait_bound(deadline, Instant::now() + self.config.lease_wait_max);
        let (reply, mut answer) = oneshot::channel();
        let state = WaiterState::default();
        let waiter = Waiter {
            principal: principal.clone(),
            operation,
            request_id,
            state: state.clone(),
            reply,
            wait_until,
            on_timeout: on_timeout.clone(),
        };
        let queue_user = waiter.operation.accounts(user).first().clone();
        match self.queues.enqueue(
            &queue_user,
            Queued::Call(Box::new(waiter)),
            self.config.max_queued_per_user,
        ) {
            Err(_) => return Err(ServiceError::Overloaded("calls queued for this user")),
            Ok(Enqueued::Queued) => {}
            Ok(Enqueued::StartDriver) => self.start_driver(queue_user),
        }
        let _leave_if_dropped = LeaveOnDrop(state.clone());
        let _waiting = crate::telemetry::metrics::Waiter::enter();
        let dropped = || ServiceError::Internal("the account's driver stopped without an answer".to_owned());
        let answer = match tokio::time::timeout_at(wait_until, &mut answer).await {
            Ok(answered) => answered.unwrap_or_else(|_| Err(dropped())),
            // Still queued: it leaves, and nothing of it was or will be applied.
            Err(_) if state.leave() => {
                tracing::warn!(lock_state = "TIMEOUT", "gave up waiting for the account");
                Err(on_timeout)
            }
            // Taken into a batch just now: that batch's ending answers.
            Err(_) => answer.await.unwrap_or_else(|_| Err(dropped())),
        };
        if let Some(lease) = state.1.get() {
            tracing::Span::current().record("lock_id", tracing::field::display(lease));
        }
        answer
    }

    /// Starts the driver of `user`'s queue, which runs until the queue is empty.
    pub(super) fn start_driver(self: &Arc<Self>, user: UserId) {
        let coordinator = Arc::clone(self);
        self.mutations.spawn(async move { coordinator.drive(user).await });
    }

    /// Drives `user`'s queue until it is empty: takes the next calls, holds the lease while
    /// more wait (each commit extends it), and gives it back with the last commit. On an
    /// account this coordinator wrote last (`known`) it takes no lease at all. A transfer is
    /// run on its own, and a loan hands the account (and any lease carried) to the transfer
    /// that borrows it until that transfer gives it back.
    async fn drive(self: Arc<Self>, user: UserId) {
        let mut held = None;
        loop {
            let batch: Vec<Call> = match self.queues.take_batch(&user, BATCH_ITEMS_MAX) {
                Taken::Nothing => {
                    if let Some(held) = held.filter(super::HeldLease::is_stored) {
                        self.release(&held).await;
                        crate::telemetry::metrics::lease_held("BATCH", held.acquired.elapsed());
                    }
                    return;
                }
                Taken::Lend(request) => {
                    held = lend(request, held).await;
                    continue;
                }
                Taken::Solo(waiter) => {
                    held = self.run_transfer(&user, held, *waiter).await;
                    continue;
                }
                Taken::Batch(batch) => batch.into_iter().enumerate().collect(),
            };
            let lease = match held.take().or_else(|| self.known_hold(&user)) {
                Some(lease) => lease,
                None => match self.acquire_for(&user, &batch).await {
                    Ok(lease) => lease,
                    Err(error) => {
                        answer_unleased(batch, &error);
                        continue;
                    }
                },
            };
            let (acquired, stored) = (lease.acquired, lease.is_stored());
            let (answered, committing) = (batch.len(), Instant::now());
            held = self.commit_batch(lease, batch).await;
            if held.is_none() && stored {
                crate::telemetry::metrics::lease_held("BATCH", acquired.elapsed());
            }
            // Full batches: on a hot account (more than one call in the batch just committed),
            // wait a moment (a twentieth of that commit's time, or up to a quarter when this
            // account's callers are known to come back together just after that) for the
            // callers just answered to call again, so they share the next commit with the calls that queued
            // during this one instead of taking turns with them. A batch of one is the common
            // case of many quiet accounts, whose callers move on to other accounts: no wait.
            if answered > 1 {
                self.queues.answered(&user, answered);
                let linger = self.queues.linger(&user, committing.elapsed());
                self.queues.gather(&user, answered, Instant::now() + linger).await;
            }
        }
    }

    /// Takes `user`'s lease for `batch`: long enough for its longest operation, requiring an
    /// account unless a deposit may create it, waiting no longer than its most urgent call.
    pub(super) async fn acquire_for(&self, user: &UserId, batch: &[Call]) -> Result<super::HeldLease, ServiceError> {
        let operations = || batch.iter().map(|(_, waiter)| &waiter.operation);
        let lease = operations()
            .map(|operation| self.config.lease(operation.lease_kind()))
            .max()
            .unwrap_or_default();
        let require_account = operations().all(Operation::requires_account);
        let first = operations().next().map(Operation::name).unwrap_or("BATCH");
        let operation = if operations().all(|operation| operation.name() == first) {
            first
        } else {
            "BATCH"
        };
        // Waiting no longer than the most urgent call, and failing as it would.
        let bound = batch
            .iter()
            .map(|(_, waiter)| (waiter.wait_until, waiter.on_timeout.clone()))
            .min_by_key(|(until, _)| *until);
        self.acquire(user, operation, lease, require_account, bound).await
    }
}

/// Hands `held` to the transfer that asked for the account, and waits for what it gives back.
/// A borrower that went away before taking it leaves the hold as it was.
async fn lend(request: LendRequest, held: Option<HeldLease>) -> Option<HeldLease> {
    let (back, given_back) = oneshot::channel();
    if let Err(lent) = request.lent.send(Lent { held, back }) {
        return lent.held;
    }
    // A borrower always answers (it runs in a driver, which nothing cancels); should it fail,
    // any lease it held expires by itself.
    given_back.await.unwrap_or(None)
}

/// Answers a batch whose lease could not be taken: a call whose wait ran out gets its own
/// timeout error (busy, or its deadline), the others the acquire's error.
pub(super) fn answer_unleased(batch: Vec<Call>, error: &ServiceError) {
    for (_, waiter) in batch {
        let answer = match error {
            ServiceError::Busy | ServiceError::DeadlineExceeded => waiter.on_timeout.clone(),
            other => other.clone(),
        };
        waiter.answer(Err(answer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Usd;

    fn call() -> Queued {
        let (reply, _) = oneshot::channel();
        Queued::Call(Box::new(Waiter {
            principal: Principal::local(),
            operation: Operation::Deposit(Usd::parse_amount("amount", "1.00").unwrap()),
            request_id: None,
            state: WaiterState::default(),
            reply,
            wait_until: Instant::now() + Duration::from_secs(60),
            on_timeout: ServiceError::Busy,
        }))
    }

    /// Answers 8 calls, then lets `gaps` pass between the arrivals that follow, and takes them.
    async fn one_round(queues: &AccountQueues, user: &UserId, gaps: &[Duration]) {
        queues.answered(user, 8);
        for gap in gaps {
            tokio::time::sleep(*gap).await;
            queues.enqueue(user, call(), 1_000).ok();
        }
        // The driver takes them all and goes on (its queue's entry, and what it learned, stay).
        assert!(matches!(queues.take_batch(user, BATCH_ITEMS_MAX), Taken::Batch(_)));
    }

    /// Callers who come back together 30 ms after their answer (closed loop behind a forwarder,
    /// scaled up tenfold so that timer jitter does not matter) teach the driver to wait about
    /// that long after a 400 ms commit instead of 20 ms; arrivals spread over the whole commit
    /// (an open loop) keep the wait at a twentieth of the commit.
    #[tokio::test]
    async fn the_wait_learns_callers_that_come_back_together_and_only_them() {
        let commit = Duration::from_millis(400);
        let closed = AccountQueues::default();
        let user = UserId::parse("user_id", "hot").unwrap();
        closed.enqueue(&user, call(), 1_000).ok();
        assert_eq!(closed.linger(&user, commit), commit / 20, "nothing learned yet");
        for _ in 0..10 {
            let mut gaps = vec![Duration::from_millis(30)];
            gaps.extend([Duration::ZERO; 7]);
            one_round(&closed, &user, &gaps).await;
        }
        let learned = closed.linger(&user, commit);
        assert!(learned > commit / 20 && learned <= commit / 4, "{learned:?}");

        let open = AccountQueues::default();
        open.enqueue(&user, call(), 1_000).ok();
        for _ in 0..5 {
            one_round(&open, &user, &[Duration::from_millis(50); 8]).await;
        }
        assert_eq!(
            open.linger(&user, commit),
            commit / 20,
            "arrivals spread over the commit"
        );
    }
}
