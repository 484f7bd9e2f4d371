//! Health that probes can trust: liveness and readiness are separate names.
//!
//! - `""` (the whole server, liveness) is SERVING while the process runs and accepts calls;
//! - `lockstep.coordinator.v1.Coordinator` (readiness) is SERVING only while storage answers.
//!
//! Both go NOT_SERVING when a graceful shutdown starts, before the drain.
//!
//! Whether storage answers is read from the outcomes of the real requests the coordinator sends
//! anyway ([`Activity`], fed by `Storage`): an answer in the last `ANSWERED_WITHIN` proves it.
//! Only when the coordinator is idle (nothing sent lately) does it ask storage itself, at most
//! once per `IDLE_PROBE_INTERVAL`; while requests fail, once per `CHECK_INTERVAL` to notice the
//! recovery. On AWS the probe is a DescribeTable (no capacity units, but a control-plane call):
//! 8,640 a day per idle coordinator instead of 86,400 (docs/operations.md).

use std::time::{Duration, Instant};

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::storage::Storage;

/// How often the reported status is brought up to date.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A real answer from storage this recent proves that it answers.
pub const ANSWERED_WITHIN: Duration = Duration::from_secs(3);
/// How often an idle coordinator asks storage itself.
pub const IDLE_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// A probe that takes longer counts as storage not answering.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

const _: () = assert!(CHECK_INTERVAL.as_millis() < ANSWERED_WITHIN.as_millis());
const _: () = assert!(ANSWERED_WITHIN.as_millis() < IDLE_PROBE_INTERVAL.as_millis());

/// The name readiness is reported under; "" is liveness.
pub const READINESS_SERVICE: &str = "lockstep.coordinator.v1.Coordinator";

pub use crate::storage::Activity;

/// Marks the process live, and ready if storage answers a probe now; returns whether it did
/// (what [`follow_storage`] starts from).
pub async fn starting(health: &HealthReporter, storage: &Storage) -> bool {
    health.set_service_status("", ServingStatus::Serving).await;
    let up = probe(storage).await;
    let status = if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status(READINESS_SERVICE, status).await;
    super::metrics::storage_up(up);
    up
}

/// One probe, bounded by `PROBE_TIMEOUT`.
async fn probe(storage: &Storage) -> bool {
    match tokio::time::timeout(PROBE_TIMEOUT, storage.probe()).await {
        Ok(Ok(())) => true,
        Ok(Err(error)) => {
            tracing::warn!(%error, "health probe: storage does not answer");
            false
        }
        Err(_) => {
            tracing::warn!(
                timeout_ms = PROBE_TIMEOUT.as_millis() as u64,
                "health probe: storage did not answer in time"
            );
            false
        }
    }
}

/// Marks both names NOT_SERVING: a shutdown has begun.
pub async fn shutting_down(health: &HealthReporter) {
    health.set_service_status("", ServingStatus::NotServing).await;
    health
        .set_service_status(READINESS_SERVICE, ServingStatus::NotServing)
        .await;
}

/// Keeps readiness in step with storage, for as long as it runs, from what `starting` reported.
pub async fn follow_storage(storage: Storage, health: HealthReporter, initially_up: bool) {
    let mut reported = Some(initially_up);
    let mut last_probe = Some(Instant::now());
    loop {
        tokio::time::sleep(CHECK_INTERVAL).await;
        let up = match storage.activity().verdict(ANSWERED_WITHIN) {
            Some(true) => true,
            recent => {
                let probe_due = recent == Some(false)
                    || reported != Some(true)
                    || last_probe.is_none_or(|at| at.elapsed() >= IDLE_PROBE_INTERVAL);
                if probe_due {
                    last_probe = Some(Instant::now());
                    probe(&storage).await
                } else {
                    true
                }
            }
        };
        if reported != Some(up) {
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            tracing::info!(ready = up, "readiness changed");
            health.set_service_status(READINESS_SERVICE, status).await;
            super::metrics::storage_up(up);
            reported = Some(up);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recent answer wins over a recent failure; with neither, the verdict is "ask".
    #[test]
    fn the_verdict_reads_recent_outcomes() {
        let activity = Activity::default();
        assert_eq!(activity.verdict(ANSWERED_WITHIN), None);
        activity.observe(false);
        assert_eq!(activity.verdict(ANSWERED_WITHIN), Some(false));
        activity.observe(true);
        assert_eq!(activity.verdict(ANSWERED_WITHIN), Some(true));
        assert_eq!(activity.verdict(Duration::ZERO), None);
    }
}
