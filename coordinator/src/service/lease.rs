//! The per-user lease: taking it (one conditional write, retried with jittered backoff while
//! another caller holds it, bounded by the configured wait and the caller's deadline), giving it
//! back, and the registry of leases this process holds, released at shutdown.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::time::Instant;

use super::{Missing, ServiceError, TransactionCoordinator, retry_safe};
use crate::core::records::Lease;
use crate::core::{Account, LeaseId, Millis, UserId};
use crate::storage::{StorageError, model};
use crate::telemetry::metrics;

/// First pause after finding the lease busy. A commit takes a few milliseconds, so the first
/// retries come quickly; later ones spread out so waiters do not hammer storage.
pub const LEASE_RETRY_DELAY_MIN: Duration = Duration::from_millis(2);
/// Longest pause between two attempts.
pub const LEASE_RETRY_DELAY_MAX: Duration = Duration::from_millis(50);
/// Attempts are bounded by time (the wait limit) and, should the clock misbehave, by count.
pub const LEASE_ATTEMPTS_MAX: usize = 10_000;

const _: () = assert!(LEASE_RETRY_DELAY_MIN.as_millis() < LEASE_RETRY_DELAY_MAX.as_millis());

/// Leases this process holds right now, released on graceful shutdown.
#[derive(Debug, Default)]
pub(super) struct HeldLeases(Mutex<HashMap<LeaseId, UserId>>);

impl HeldLeases {
    fn insert(&self, lock_id: &LeaseId, user: &UserId) {
        self.0
            .lock()
            .expect("held-lease registry poisoned")
            .insert(lock_id.clone(), user.clone());
    }

    pub(super) fn remove(&self, lock_id: &LeaseId) {
        self.0.lock().expect("held-lease registry poisoned").remove(lock_id);
    }

    fn drain(&self) -> Vec<(LeaseId, UserId)> {
        self.0.lock().expect("held-lease registry poisoned").drain().collect()
    }
}

/// What the attempts of one acquire found so far.
#[derive(Debug, Default)]
struct Waiting {
    /// The live lease of someone else that the latest attempt found.
    holder: Option<Lease>,
    /// A live lease of this instance's previous run (it died holding it), to take over.
    orphan: Option<LeaseId>,
    /// Set while the latest attempt found storage unavailable.
    unavailable: Option<String>,
}

/// A lease this coordinator holds, with the account state read in the same write.
#[derive(Debug, Clone)]
pub struct HeldLease {
    pub user: UserId,
    /// The lease's id in storage. None for a hold on a known account (`known`): no lease was
    /// taken, the commit is conditioned on the account's version and on no lease being on it,
    /// and there is nothing to give back.
    pub lock_id: Option<LeaseId>,
    pub expires_at: Millis,
    pub account: Account,
    /// When this process took it (for `lockstep_lease_hold_seconds`).
    pub acquired: Instant,
    /// The account's last commit's feed record, as the lease found it (None on a known hold).
    pub feed_mark: Option<model::FeedMark>,
}

impl HeldLease {
    /// Whether a lease is in storage (not a hold on a known account).
    pub fn is_stored(&self) -> bool {
        self.lock_id.is_some()
    }
}

impl TransactionCoordinator {
    /// A hold on `user`'s account as this coordinator last left it, if it knows it: no lease
    /// is taken, and the commit is conditioned on the account being unchanged since.
    pub(super) fn known_hold(&self, user: &UserId) -> Option<HeldLease> {
        let account = self.known.get(user)?;
        Some(HeldLease {
            user: user.clone(),
            lock_id: None,
            expires_at: Millis::MAX,
            account,
            acquired: Instant::now(),
            feed_mark: None,
        })
    }

    /// Takes `user`'s lease for `operation`, waiting while someone else holds it.
    pub(super) async fn acquire(
        &self,
        user: &UserId,
        operation: &str,
        lease_duration: Duration,
        require_account: bool,
        bound: Option<(Instant, ServiceError)>,
    ) -> Result<HeldLease, ServiceError> {
        let lock_id = LeaseId::new_random();
        let started = Instant::now();
        let wait_limit = started + self.config.lease_wait_max;
        let wait_until = bound.as_ref().map_or(wait_limit, |(until, _)| (*until).min(wait_limit));
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(LEASE_RETRY_DELAY_MIN)
            .with_max_delay(LEASE_RETRY_DELAY_MAX)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(LEASE_ATTEMPTS_MAX)
            .build();
        let mut waiting = Waiting::default();
        let mut waiter: Option<metrics::Waiter> = None;
        loop {
            let now = self.clock.now();
            let lease = Lease {
                lock_id: lock_id.clone(),
                owner: self.config.owner.clone(),
                incarnation: self.incarnation.clone(),
                operation: operation.to_owned(),
                expires_at_ms: now + lease_duration.as_millis() as u64,
            };
            if let Some(mut held) = self
                .try_acquire(user, lease, now, require_account, &mut waiting)
                .await?
            {
                metrics::lease_taken(waiter.is_some(), started.elapsed(), operation);
                // An account last written by a coordinator that does not number its entries
                // gets them numbered before anything commits on it (`numbering`).
                if let Err(error) = self.number_entries(&mut held).await {
                    self.release(&held).await;
                    return Err(error);
                }
                // Another process's last commit may have landed past the feed's horizon
                // unnoticed (that process gone, or not yet done): recorded again before this
                // lease writes anything after it.
                // If it cannot be written now (storage failing), the account stays marked and the
                // next lease here tries again; the money path does not wait on the feed.
                self.journal_taken_over(&held).await;
                return Ok(held);
            }
            let delay = delays.next().filter(|delay| Instant::now() + *delay <= wait_until);
            let Some(delay) = delay else {
                tracing::warn!(
                    lock_state = "TIMEOUT",
                    waited_ms = started.elapsed().as_millis() as u64,
                    "gave up waiting for the lease"
                );
                let error = match (waiting.unavailable, bound) {
                    (Some(detail), _) => {
                        // An attempt whose reply was lost may have landed: give that lease back
                        // now instead of leaving the user blocked until it expires.
                        self.release_if_landed(user, &lock_id).await;
                        ServiceError::Unavailable(detail)
                    }
                    (None, Some((until, on_timeout))) if until <= wait_limit => on_timeout,
                    (None, _) => ServiceError::Busy,
                };
                let outcome = match &error {
                    ServiceError::Unavailable(_) => metrics::LeaseOutcome::Unavailable,
                    ServiceError::DeadlineExceeded => metrics::LeaseOutcome::Deadline,
                    _ => metrics::LeaseOutcome::Busy,
                };
                metrics::lease_gave_up(outcome, started.elapsed(), operation);
                return Err(error);
            };
            waiter.get_or_insert_with(metrics::Waiter::enter);
            tokio::time::sleep(delay).await;
        }
    }

    /// One conditional write of `lease`: the lease if it landed (or an earlier try of it did),
    /// None to wait and try again.
    async fn try_acquire(
        &self,
        user: &UserId,
        lease: Lease,
        now: Millis,
        require_account: bool,
        waiting: &mut Waiting,
    ) -> Result<Option<HeldLease>, ServiceError> {
        let request = match &waiting.orphan {
            Some(orphan) => model::reclaim_lease(user, &lease, now, require_account, orphan),
            None => model::acquire_lease(user, &lease, now, require_account),
        };
        let current = match self.storage.update(request).await {
            Ok(Some(item)) => {
                if let Some(orphan) = &waiting.orphan {
                    metrics::lease_expired();
                    tracing::info!(lock_state = "EXPIRED", previous_lock_id = %orphan, "reclaimed a lease of this instance's previous run");
                }
                if let Some(previous) = waiting.holder.take().filter(|previous| !previous.is_live(now)) {
                    metrics::lease_expired();
                    tracing::info!(lock_state = "EXPIRED", previous_lock_id = %previous.lock_id, previous_owner = %previous.owner, "took over an expired lease");
                }
                return self.held(user, lease, &item).map(Some);
            }
            Ok(None) => return Err(ServiceError::Internal("lease write returned no item".to_owned())),
            // DynamoDB: the account is inside another caller's commit right now. Busy.
            Err(StorageError::Conflict(_)) => return Ok(None),
            // Storage did not answer (the SDK's own retries included). Trying again with the
            // same lock id is safe: if this attempt did land, the next one finds the lease
            // already ours (below).
            Err(StorageError::Unavailable(detail)) => {
                waiting.unavailable = Some(detail);
                return Ok(None);
            }
            // Only operations that need an account have a condition a missing item fails.
            Err(StorageError::ConditionFailed { current: None }) => {
                return Err(ServiceError::NotFound(Missing::Account(user.clone())));
            }
            Err(StorageError::ConditionFailed { current: Some(item) }) => item,
            Err(error) => return Err(error.into()),
        };
        waiting.unavailable = None;
        self.read_refusal(user, &lease, &current, now, require_account, waiting)
    }

    /// What the item returned with a refused acquire says: the lease is already ours (an
    /// earlier try landed), an orphan of this instance to reclaim, someone else's to wait for,
    /// no account, or free again (try at once).
    fn read_refusal(
        &self,
        user: &UserId,
        lease: &Lease,
        current: &crate::storage::Item,
        now: Millis,
        require_account: bool,
        waiting: &mut Waiting,
    ) -> Result<Option<HeldLease>, ServiceError> {
        let account_exists = model::account_from_item(current)
            .map(|account| account.exists())
            .unwrap_or(false);
        let holder = model::lease_from_item(current);
        if let Some(far_ahead) = holder.as_ref().filter(|holder| holder.is_implausible(now)) {
            metrics::clock_skew_detected();
            tracing::warn!(
                holder_owner = %far_ahead.owner,
                expires_at_ms = far_ahead.expires_at_ms,
                now_ms = now,
                "a stored lease expires further ahead than any lease could: this coordinator's clock is behind the holder's by more than the tolerated skew (or the holder's is far ahead); treating the lease as expired"
            );
        }
        match holder.filter(|holder| holder.is_live(now)) {
            // Our own earlier attempt did land (its reply was lost and the write retried).
            Some(holder) if holder.lock_id == lease.lock_id => return self.held(user, holder, current).map(Some),
            // A previous run of this instance died holding it; taken over at once only while
            // this run holds the instance name's heartbeat (no live twin can be the holder).
            Some(holder)
                if holder.owner == self.config.owner
                    && holder.incarnation != self.incarnation
                    && self.instance.may_reclaim(now) =>
            {
                waiting.orphan = Some(holder.lock_id);
            }
            Some(holder) => {
                if waiting.holder.is_none() {
                    metrics::contended(user);
                    tracing::info!(lock_state = "WAITING", holder_lock_id = %holder.lock_id, holder_owner = %holder.owner, holder_operation = %holder.operation, "lease busy");
                }
                waiting.holder = Some(holder);
            }
            None if require_account && !account_exists => {
                return Err(ServiceError::NotFound(Missing::Account(user.clone())));
            }
            // Released or expired between the condition and now: try again after the shortest
            // pause (every pass of the caller's loop pauses, so it can never spin).
            None => {}
        }
        Ok(None)
    }

    fn held(&self, user: &UserId, lease: Lease, item: &crate::storage::Item) -> Result<HeldLease, ServiceError> {
        let account = model::account_from_item(item).map_err(|error| ServiceError::Internal(error.to_string()))?;
        tracing::Span::current().record("lock_id", tracing::field::display(&lease.lock_id));
        tracing::info!(
            lock_state = "ACQUIRED",
            expires_at = lease.expires_at_ms,
            "lease acquired"
        );
        self.held_leases.insert(&lease.lock_id, user);
        Ok(HeldLease {
            user: user.clone(),
            lock_id: Some(lease.lock_id),
            expires_at: lease.expires_at_ms,
            account,
            acquired: Instant::now(),
            feed_mark: model::feed_mark_from_item(item),
        })
    }

    /// Gives the lease back without writing anything else (an item the acquire itself created
    /// is deleted instead: a call that committed nothing leaves nothing). Failure is logged, not returned:
    /// the lease expires by itself, and every later write checks the expiry.
    pub(super) async fn release(&self, held: &HeldLease) {
        let Some(lock_id) = &held.lock_id else { return };
        // The release moves the version: what this process knew of the account is stale.
        self.known.forget(&held.user);
        self.held_leases.remove(lock_id);
        let release = if model::created_by_this_lease(&held.account) {
            model::release_created_item(&held.user, lock_id)
        } else {
            model::release_lease(
                &held.user,
                lock_id,
                (!held.account.needs_numbering).then_some(held.account.version),
            )
        };
        match retry_safe(|| self.storage.write(release.clone())).await {
            Ok(()) => tracing::debug!(lock_state = "RELEASED", "lease released"),
            Err(StorageError::ConditionFailed { .. }) => {
                metrics::lease_expired();
                tracing::warn!(lock_state = "EXPIRED", "lease was no longer ours at release")
            }
            Err(error) => tracing::warn!(%error, "lease release failed; it will expire by itself"),
        }
    }

    /// Releases the lease `lock_id` if an attempt whose reply was lost did take it; a no-op
    /// otherwise (the release is conditioned on the lock id).
    async fn release_if_landed(&self, user: &UserId, lock_id: &LeaseId) {
        let release = model::release_lease(user, lock_id, None);
        match retry_safe(|| self.storage.write(release.clone())).await {
            Ok(()) => tracing::info!(lock_state = "RELEASED", "released a lease whose acquire reply was lost"),
            Err(StorageError::ConditionFailed { .. }) => {}
            Err(error) => tracing::warn!(%error, "could not release a possibly taken lease; it will expire"),
        }
    }

    /// Releases every lease this process still holds; called on shutdown after draining.
    pub async fn release_held_leases(&self) -> usize {
        let leases = self.held_leases.drain();
        let count = leases.len();
        for (lock_id, user) in leases {
            if let Err(error) = self.storage.write(model::release_lease(&user, &lock_id, None)).await {
                tracing::warn!(%error, %user, %lock_id, "could not release a lease at shutdown; it will expire");
            }
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::time::ManualClock;
    use std::sync::Arc;

    use crate::service::testing::{LEASE, coordinator, user};

    /// Acquire, then a second caller is refused as busy until the first releases.
    #[tokio::test]
    async fn acquire_excludes_until_release() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        let first = coordinator
            .acquire(&user("a"), "DEPOSIT", LEASE, false, None)
            .await
            .unwrap();
        assert!(!first.account.exists(), "no account before the first deposit");
        let busy = coordinator
            .acquire(&user("a"), "DEPOSIT", LEASE, false, None)
            .await
            .unwrap_err();
        assert_eq!(busy, ServiceError::Busy);
        coordinator.release(&first).await;
        let second = coordinator
            .acquire(&user("a"), "DEPOSIT", LEASE, false, None)
            .await
            .unwrap();
        assert_ne!(first.lock_id, second.lock_id);
    }

    /// An unreleased lease blocks until its expiry instant and is taken over from then on.
    #[tokio::test]
    async fn expired_lease_is_taken_over() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        let abandoned = coordinator
            .acquire(&user("b"), "DEPOSIT", LEASE, false, None)
            .await
            .unwrap();
        clock.advance(LEASE - Duration::from_millis(1));
        assert_eq!(
            coordinator
                .acquire(&user("b"), "DEPOSIT", LEASE, false, None)
                .await
                .unwrap_err(),
            ServiceError::Busy
        );
        clock.advance(Duration::from_millis(1));
        let successor = coordinator
            .acquire(&user("b"), "DEPOSIT", LEASE, false, None)
            .await
            .unwrap();
        assert_eq!(successor.expires_at, abandoned.expires_at + LEASE.as_millis() as u64);
        // The abandoned holder's release no longer touches the successor's lease.
        coordinator.release(&abandoned).await;
        assert_eq!(
            coordinator
                .acquire(&user("b"), "DEPOSIT", LEASE, false, None)
                .await
                .unwrap_err(),
            ServiceError::Busy
        );
    }

    /// Operations other than deposit need an account: a missing one is NOT_FOUND, not busy.
    #[tokio::test]
    async fn missing_account_is_not_found() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        let error = coordinator
            .acquire(&user("c"), "WITHDRAWAL", LEASE, true, None)
            .await
            .unwrap_err();
        assert!(matches!(error, ServiceError::NotFound(_)), "{error:?}");
        // A first deposit in flight holds a lease on an item that is not an account yet.
        let deposit = coordinator
            .acquire(&user("c"), "DEPOSIT", LEASE, false, None)
            .await
            .unwrap();
        assert_eq!(
            coordinator
                .acquire(&user("c"), "WITHDRAWAL", LEASE, true, None)
                .await
                .unwrap_err(),
            ServiceError::Busy
        );
        coordinator.release(&deposit).await;
        let error = coordinator
            .acquire(&user("c"), "WITHDRAWAL", LEASE, true, None)
            .await
            .unwrap_err();
        assert!(
            matches!(error, ServiceError::NotFound(_)),
            "a refused first deposit leaves nothing: {error:?}"
        );
    }

    /// A caller's deadline shorter than the wait limit ends the wait with DEADLINE_EXCEEDED.
    #[tokio::test]
    async fn deadline_bounds_the_wait() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        let _held = coordinator
            .acquire(&user("d"), "DEPOSIT", LEASE, false, None)
            .await
            .unwrap();
        let deadline = Some((
            Instant::now() + Duration::from_millis(5),
            ServiceError::DeadlineExceeded,
        ));
        let error = coordinator
            .acquire(&user("d"), "DEPOSIT", LEASE, false, deadline)
            .await
            .unwrap_err();
        assert_eq!(error, ServiceError::DeadlineExceeded);
    }

    /// Storage takes an acquire, loses its reply, then stops answering: the acquire gives up
    /// UNAVAILABLE, and first gives back the lease that may have landed, so the user is not
    /// blocked until it expires.
    #[tokio::test]
    async fn giving_up_on_unavailable_storage_releases_a_lease_that_landed() {
        use crate::service::testing::{FlakyEngine, coordinator_on};
        let clock = ManualClock::starting_at(1_000_000);
        let engine = Arc::new(FlakyEngine::new());
        let config = crate::service::CoordinatorConfig {
            lease_wait_max: Duration::from_millis(30),
            ..crate::service::CoordinatorConfig::default()
        };
        let coordinator = coordinator_on(engine.clone(), &clock, config).await;
        engine.lose_acquires(true);
        let error = coordinator
            .acquire(&user("e"), "DEPOSIT", LEASE, false, None)
            .await
            .unwrap_err();
        assert!(matches!(error, ServiceError::Unavailable(_)), "{error:?}");
        engine.lose_acquires(false);
        let next = coordinator.acquire(&user("e"), "DEPOSIT", LEASE, false, None).await;
        assert!(next.is_ok(), "the landed lease was given back at once: {next:?}");
    }
}
