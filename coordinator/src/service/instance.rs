//! A named instance (`--instance`) proves it is the only live process with its name before it
//! takes over "its own" leases at once: it holds a heartbeat item, renewed while it runs. A
//! second live process with the same name cannot claim the heartbeat and refuses to start; a
//! process that lost its heartbeat (paused past it while another took over) stops reclaiming.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{ServiceError, TransactionCoordinator, retry_safe};
use crate::core::Millis;
use crate::storage::{StorageError, model};

/// How long a heartbeat holds the name without renewal: a restart after a crash waits at most
/// this long (plus `HEARTBEAT_SETTLE`) for the dead run's heartbeat to show it is gone.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(2);
/// How often a live process renews its heartbeat: several renewals fit in one TTL, so a slow
/// storage request does not lose the name.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Extra wait past the TTL before concluding that an unrenewed heartbeat's holder is gone.
pub const HEARTBEAT_SETTLE: Duration = Duration::from_millis(500);

const _: () = assert!(HEARTBEAT_INTERVAL.as_millis() * 3 <= HEARTBEAT_TTL.as_millis());

/// Until when (coordinator clock, ms) this process may treat live leases of its instance name
/// with another incarnation as orphans of a dead run. `u64::MAX` for an unnamed instance, whose
/// random name no other process uses.
#[derive(Debug)]
pub(super) struct InstanceHold(AtomicU64);

impl InstanceHold {
    pub(super) fn new(named: bool) -> Self {
        Self(AtomicU64::new(if named { 0 } else { u64::MAX }))
    }

    pub(super) fn may_reclaim(&self, now: Millis) -> bool {
        now < self.0.load(Ordering::SeqCst)
    }

    fn hold_until(&self, until: Millis) {
        self.0.store(until, Ordering::SeqCst);
    }
}

/// Why a named instance cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "another live coordinator process runs as --instance {instance} (incarnation {incarnation}, heartbeat renewed); stop it or choose another --instance"
    )]
    NameInUse { instance: String, incarnation: String },
    #[error("could not claim --instance {instance}: {error}")]
    Storage { instance: String, error: ServiceError },
}

impl TransactionCoordinator {
    /// Claims the heartbeat of this named instance, waiting out a dead run's heartbeat. Does
    /// nothing for an unnamed instance.
    pub async fn claim_instance(&self) -> Result<(), InstanceError> {
        if !self.config.named_instance {
            return Ok(());
        }
        let instance = self.config.owner.as_str();
        let storage_error = |error: StorageError| InstanceError::Storage {
            instance: instance.to_owned(),
            error: error.into(),
        };
        let mut seen = None;
        for _ in 0..2 {
            let now = self.clock.now();
            let expires_at = now + HEARTBEAT_TTL.as_millis() as u64;
            let claim = model::claim_heartbeat(instance, &self.incarnation, expires_at, now, seen.as_ref());
            match retry_safe(|| self.storage.update(claim.clone())).await {
                Ok(_) => {
                    self.instance.hold_until(expires_at);
                    tracing::info!(%instance, "instance name claimed");
                    return Ok(());
                }
                Err(StorageError::ConditionFailed { current }) => {
                    let holder = current.as_ref().and_then(model::heartbeat_from_item);
                    // An earlier try of this very claim landed (its reply lost or late, and the
                    // retry then met it): the name is ours.
                    if let Some(ours) = holder.as_ref().filter(|holder| holder.incarnation == self.incarnation) {
                        self.instance.hold_until(ours.expires_at);
                        tracing::info!(%instance, "instance name claimed (an earlier try landed)");
                        return Ok(());
                    }
                    if seen.is_some() || holder.is_none() {
                        let incarnation = holder.map(|holder| holder.incarnation).unwrap_or_default();
                        return Err(InstanceError::NameInUse {
                            instance: instance.to_owned(),
                            incarnation,
                        });
                    }
                    tracing::info!(%instance, "the instance name's heartbeat is live; waiting to see whether its holder renews it");
                    seen = holder;
                    tokio::time::sleep(HEARTBEAT_TTL + HEARTBEAT_SETTLE).await;
                }
                Err(error) => return Err(storage_error(error)),
            }
        }
        unreachable!("the loop returns on its second pass")
    }

    /// Renews the heartbeat every `HEARTBEAT_INTERVAL` until another process takes the name.
    pub async fn renew_instance_periodically(&self) {
        if !self.config.named_instance {
            return;
        }
        let instance = self.config.owner.as_str();
        loop {
            tokio::time::sleep(HEARTBEAT_INTERVAL).await;
            let expires_at = self.clock.now() + HEARTBEAT_TTL.as_millis() as u64;
            let renew = model::renew_heartbeat(instance, &self.incarnation, expires_at);
            match self.storage.update(renew).await {
                Ok(_) => self.instance.hold_until(expires_at),
                Err(StorageError::ConditionFailed { .. }) => {
                    self.instance.hold_until(0);
                    tracing::error!(%instance, "another process took over this instance name; no longer reclaiming its leases");
                    return;
                }
                // The hold runs out by itself if storage stays away.
                Err(error) => tracing::warn!(%instance, %error, "could not renew the instance heartbeat"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::core::Clock;
    use crate::core::time::ManualClock;
    use crate::service::CoordinatorConfig;
    use crate::storage::Storage;
    use crate::storage::embedded::EmbeddedEngine;

    fn named(storage: &Storage, clock: &ManualClock) -> TransactionCoordinator {
        let config = CoordinatorConfig {
            owner: "twin".to_owned(),
            named_instance: true,
            ..CoordinatorConfig::default()
        };
        TransactionCoordinator::new(storage.clone(), Arc::new(clock.clone()), config)
    }

    /// A second live process with the same name refuses to start; once the first stops
    /// renewing, a new run takes the name over after the TTL.
    #[tokio::test]
    async fn a_live_twin_refuses_to_start_and_a_dead_ones_name_is_taken_over() {
        let storage = Storage::new(Arc::new(EmbeddedEngine::in_memory().unwrap()), "lockstep");
        storage.ensure_table().await.unwrap();
        let clock = ManualClock::starting_at(1_000_000);
        let first = Arc::new(named(&storage, &clock));
        first.claim_instance().await.unwrap();
        assert!(first.instance.may_reclaim(clock.now()));
        let renewing = tokio::spawn({
            let first = Arc::clone(&first);
            async move { first.renew_instance_periodically().await }
        });
        let twin = named(&storage, &clock);
        let error = twin.claim_instance().await.unwrap_err();
        assert!(matches!(error, InstanceError::NameInUse { .. }), "{error}");
        assert!(!twin.instance.may_reclaim(clock.now()));

        renewing.abort();
        let restarted = named(&storage, &clock);
        restarted.claim_instance().await.unwrap();
        assert!(restarted.instance.may_reclaim(clock.now()));
    }

    /// A try of the second claim that landed late (after the SDK gave up on it and sent it
    /// again) makes the retry fail against the claim itself: the name is still ours.
    #[tokio::test]
    async fn a_claim_that_landed_before_its_retry_is_ours() {
        let storage = Storage::new(Arc::new(EmbeddedEngine::in_memory().unwrap()), "lockstep");
        storage.ensure_table().await.unwrap();
        let clock = ManualClock::starting_at(1_000_000);
        let dead = named(&storage, &clock);
        dead.claim_instance().await.unwrap();
        let restarted = Arc::new(named(&storage, &clock));
        let claim = tokio::spawn({
            let restarted = Arc::clone(&restarted);
            async move { restarted.claim_instance().await }
        });
        tokio::time::sleep(HEARTBEAT_TTL / 2).await;
        // The restarted run's own claim, as a delayed try of it would write it.
        let item = storage.get(model::heartbeat_key("twin")).await.unwrap().unwrap();
        let seen = model::heartbeat_from_item(&item).unwrap();
        let now = clock.now();
        let early = model::claim_heartbeat("twin", &restarted.incarnation, now + 60_000, now, Some(&seen));
        storage.update(early).await.unwrap();
        claim
            .await
            .unwrap()
            .expect("the heartbeat holds this run's own incarnation");
        assert!(restarted.instance.may_reclaim(clock.now()));
    }

    /// The dead run's last renewal, delayed in the network, lands while the new run waits: it
    /// changes the beat, but it had expired when it landed, so the name is still taken over.
    #[tokio::test]
    async fn a_renewal_landing_late_from_a_dead_run_does_not_block_the_restart() {
        let storage = Storage::new(Arc::new(EmbeddedEngine::in_memory().unwrap()), "lockstep");
        storage.ensure_table().await.unwrap();
        let clock = ManualClock::starting_at(1_000_000);
        let dead = named(&storage, &clock);
        dead.claim_instance().await.unwrap();
        let late_renewal = model::renew_heartbeat(
            "twin",
            &dead.incarnation,
            clock.now() + HEARTBEAT_TTL.as_millis() as u64,
        );
        let restarted = Arc::new(named(&storage, &clock));
        let claim = tokio::spawn({
            let restarted = Arc::clone(&restarted);
            async move { restarted.claim_instance().await }
        });
        tokio::time::sleep(HEARTBEAT_TTL / 2).await;
        storage.update(late_renewal).await.unwrap();
        clock.advance(HEARTBEAT_TTL + HEARTBEAT_SETTLE);
        claim.await.unwrap().expect("the late renewal had expired");
        assert!(restarted.instance.may_reclaim(clock.now()));
    }
}
