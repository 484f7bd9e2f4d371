//! The sweeper: releases leases that expired without being released (their holder died) and
//! deletes request records past their retention. Every write is conditioned on what it found,
//! so several coordinators can sweep at once and a sweep never races a live lease.
//!
//! DynamoDB deletes expired request records by itself (TTL, up to ~48 h late); dynoxide never
//! does, so on the embedded engine this sweep is what keeps them bounded.

use crate::audit::{SCAN_PAGE_SIZE, SCAN_PAGES_MAX};
use crate::core::Millis;
use crate::storage::{Storage, StorageError, Value, model};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub released_leases: usize,
    pub deleted_records: usize,
}

/// One pass over the table as of `now`.
pub async fn sweep(storage: &Storage, now: Millis) -> Result<SweepReport, StorageError> {
    let mut report = SweepReport::default();
    let mut start_after = None;
    for _ in 0..SCAN_PAGES_MAX {
        let page = storage.scan(SCAN_PAGE_SIZE, start_after).await?;
        for item in &page.items {
            let Some(Value::S(sk)) = item.get("sk") else { continue };
            let Some(Value::S(pk)) = item.get("pk") else { continue };
            let write = if sk == "ACCOUNT" {
                model::lease_from_item(item)
                    .filter(|lease| !lease.is_live(now))
                    .map(|lease| model::release_expired_lease(pk, &lease.lock_id, now))
            } else if sk.starts_with("REQUEST#") {
                model::request_record_from_item(item)
                    .ok()
                    .filter(|record| record.expires_at_seconds < now / 1000)
                    .map(|_| model::delete_expired_record(pk, sk, now))
            } else {
                None
            };
            let Some(write) = write else { continue };
            let is_lease = sk == "ACCOUNT";
            match storage.write(write).await {
                Ok(()) if is_lease => report.released_leases += 1,
                Ok(()) => report.deleted_records += 1,
                // Someone took the lease or rewrote the record meanwhile: nothing to sweep.
                Err(StorageError::ConditionFailed { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        start_after = page.last_key;
        if start_after.is_none() {
            break;
        }
    }
    Ok(report)
}
