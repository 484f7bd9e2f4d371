//! Taking a user's lease: one conditional write, retried with jittered backoff while another
//! caller holds it, bounded by the configured wait and the caller's deadline.

use std::time::Duration;

use backon::BackoffBuilder;
use tokio::time::Instant;

use super::{Coordinator, ServiceError, retry_safe};
use crate::core::records::Lease;
use crate::core::{Account, LockId, UserId};
use crate::storage::{StorageError, model};

/// First pause after finding the lease busy. A commit takes a few milliseconds, so the first
/// retries come quickly; later ones spread out so waiters do not hammer storage.
pub const LOCK_RETRY_DELAY_MIN: Duration = Duration::from_millis(2);
/// Longest pause between two attempts.
pub const LOCK_RETRY_DELAY_MAX: Duration = Duration::from_millis(50);
/// Attempts are bounded by time (the wait limit) and, should the clock misbehave, by count.
pub const LOCK_ATTEMPTS_MAX: usize = 10_000;

const _: () = assert!(LOCK_RETRY_DELAY_MIN.as_millis() < LOCK_RETRY_DELAY_MAX.as_millis());

/// A lease this coordinator holds, with the account state read in the same write.
#[derive(Debug, Clone)]
pub struct HeldLease {
    pub user: UserId,
    pub lock_id: LockId,
    pub expires_at: crate::core::Millis,
    pub account: Account,
}

impl Coordinator {
    /// Takes `user`'s lease for `operation`, waiting while someone else holds it.
    pub(super) async fn acquire(
        &self,
        user: &UserId,
        operation: &str,
        lease_duration: Duration,
        require_account: bool,
        deadline: Option<Instant>,
    ) -> Result<HeldLease, ServiceError> {
        let lock_id = LockId::new_random();
        let started = Instant::now();
        let wait_limit = Instant::now() + self.config.lock_wait_max;
        let wait_until = deadline.map_or(wait_limit, |deadline| deadline.min(wait_limit));
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(LOCK_RETRY_DELAY_MIN)
            .with_max_delay(LOCK_RETRY_DELAY_MAX)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(LOCK_ATTEMPTS_MAX)
            .build();
        let mut waited_on: Option<Lease> = None;
        // A live lease of this instance's previous run (it died holding it), to take over.
        let mut orphan: Option<LockId> = None;
        // Set while the latest attempt found storage unavailable.
        let mut unavailable: Option<String> = None;
        loop {
            let now = self.clock.now();
            let lease = Lease {
                lock_id: lock_id.clone(),
                owner: self.config.owner.clone(),
                incarnation: self.incarnation.clone(),
                operation: operation.to_owned(),
                expires_at_ms: now + lease_duration.as_millis() as u64,
            };
            let request = match &orphan {
                Some(orphan) => model::reclaim_lease(user, &lease, now, require_account, orphan),
                None => model::acquire_lease(user, &lease, now, require_account),
            };
            let current = match self.storage.update(request).await {
                Ok(Some(item)) => {
                    if let Some(orphan) = &orphan {
                        tracing::info!(lock_state = "EXPIRED", previous_lock_id = %orphan, "reclaimed a lease of this instance's previous run");
                    }
                    if let Some(previous) = waited_on.filter(|previous| !previous.is_live(now)) {
                        tracing::info!(lock_state = "EXPIRED", previous_lock_id = %previous.lock_id, previous_owner = %previous.owner, "took over an expired lease");
                    }
                    return self.held(user, lease, &item);
                }
                Ok(None) => return Err(ServiceError::Internal("lease write returned no item".to_owned())),
                // DynamoDB: the account is inside another caller's commit right now. Busy.
                Err(StorageError::Conflict(_)) => None,
                // Storage did not answer (the SDK's own retries included). Trying again with the
                // same lock id is safe: if this attempt did land, the next one finds the lease
                // already ours (see above).
                Err(StorageError::Unavailable(detail)) => {
                    unavailable = Some(detail);
                    None
                }
                Err(StorageError::ConditionFailed { current: None }) => {
                    // Only operations that need an account have a condition a missing item fails.
                    return Err(ServiceError::NotFound(format!("Account {user} not found")));
                }
                Err(StorageError::ConditionFailed { current: Some(item) }) => {
                    unavailable = None;
                    Some(item)
                }
                Err(error) => return Err(error.into()),
            };
            if let Some(item) = current {
                let account_exists = model::account_from_item(&item)
                    .map(|account| account.exists)
                    .unwrap_or(false);
                match model::lease_from_item(&item).filter(|holder| holder.is_live(now)) {
                    // Our own earlier attempt did land (its reply was lost and the write retried).
                    Some(holder) if holder.lock_id == lock_id => return self.held(user, holder, &item),
                    Some(holder) if holder.owner == self.config.owner && holder.incarnation != self.incarnation => {
                        orphan = Some(holder.lock_id);
                    }
                    Some(holder) => {
                        if waited_on.is_none() {
                            tracing::info!(lock_state = "WAITING", holder_lock_id = %holder.lock_id, holder_owner = %holder.owner, holder_operation = %holder.operation, "lease busy");
                        }
                        waited_on = Some(holder);
                    }
                    None if require_account && !account_exists => {
                        return Err(ServiceError::NotFound(format!("Account {user} not found")));
                    }
                    // Released or expired between the condition and now: try again after the
                    // shortest pause (every pass of this loop pauses, so it can never spin).
                    None => {}
                }
            }
            let delay = delays.next().filter(|delay| Instant::now() + *delay <= wait_until);
            let Some(delay) = delay else {
                tracing::warn!(
                    lock_state = "TIMEOUT",
                    waited_ms = started.elapsed().as_millis() as u64,
                    "gave up waiting for the lease"
                );
                return Err(match (unavailable, deadline) {
                    (Some(detail), _) => ServiceError::Unavailable(detail),
                    (None, Some(deadline)) if deadline <= wait_limit => ServiceError::DeadlineExceeded,
                    (None, _) => ServiceError::Busy,
                });
            };
            tokio::time::sleep(delay).await;
        }
    }

    fn held(&self, user: &UserId, lease: Lease, item: &crate::storage::Item) -> Result<HeldLease, ServiceError> {
        let account = model::account_from_item(item).map_err(|error| ServiceError::Internal(error.to_string()))?;
        tracing::Span::current().record("lock_id", tracing::field::display(&lease.lock_id));
        tracing::info!(
            lock_state = "ACQUIRED",
            expires_at = lease.expires_at_ms,
            "lease acquired"
        );
        let held = HeldLease {
            user: user.clone(),
            lock_id: lease.lock_id,
            expires_at: lease.expires_at_ms,
            account,
        };
        self.held_leases.insert(&held);
        Ok(held)
    }

    /// Gives the lease back without writing anything else. Failure is logged, not returned:
    /// the lease expires by itself, and every later write checks the expiry.
    pub(super) async fn release(&self, held: &HeldLease) {
        self.held_leases.remove(&held.lock_id);
        let release = model::release_lease(&held.user, &held.lock_id);
        match retry_safe(|| self.storage.write(release.clone())).await {
            Ok(()) => tracing::debug!(lock_state = "RELEASED", "lease released"),
            Err(StorageError::ConditionFailed { .. }) => {
                tracing::warn!(lock_state = "EXPIRED", "lease was no longer ours at release")
            }
            Err(error) => tracing::warn!(%error, "lease release failed; it will expire by itself"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::core::time::ManualClock;
    use crate::service::CoordinatorConfig;
    use crate::storage::Storage;
    use crate::storage::embedded::EmbeddedEngine;

    const LEASE: Duration = Duration::from_secs(10);

    async fn coordinator(clock: &ManualClock) -> Coordinator {
        let storage = Storage::new(Arc::new(EmbeddedEngine::in_memory().unwrap()), "lockstep");
        storage.ensure_table().await.unwrap();
        let config = CoordinatorConfig {
            lock_wait_max: Duration::from_millis(30),
            ..CoordinatorConfig::default()
        };
        Coordinator::new(storage, Arc::new(clock.clone()), config)
    }

    fn user(raw: &str) -> UserId {
        UserId::parse("user_id", raw).unwrap()
    }

    /// Acquire, then a second caller is refused as busy until the first releases.
    #[tokio::test]
    async fn acquire_excludes_until_release() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        let first = coordinator
            .acquire(&user("a"), "DEPOSIT", LEASE, false, None)
            .await
            .unwrap();
        assert!(!first.account.exists, "no account before the first deposit");
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
        let deadline = Some(Instant::now() + Duration::from_millis(5));
        let error = coordinator
            .acquire(&user("d"), "DEPOSIT", LEASE, false, deadline)
            .await
            .unwrap_err();
        assert_eq!(error, ServiceError::DeadlineExceeded);
    }
}
