//! The sweeper: releases leases that expired without being released (their holder died) and
//! deletes request records past their retention. Every write is conditioned on what it found,
//! so several coordinators can sweep at once and a sweep never races a live lease.
//!
//! DynamoDB deletes expired request records by itself (TTL, up to ~48 h late); dynoxide never
//! does, so on the embedded engine this sweep is what keeps them bounded.

use crate::core::Millis;
use crate::storage::model::{self, StoredItem};
use crate::storage::{Storage, StorageError};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub released_leases: usize,
    pub deleted_records: usize,
}

/// One pass over the table as of `now`.
pub async fn sweep(storage: &Storage, now: Millis) -> Result<SweepReport, StorageError> {
    let mut report = SweepReport::default();
    let mut scan = storage.scan_table();
    while let Some(page) = scan.next_page().await? {
        for item in &page {
            let (write, is_lease) = match model::classify(item) {
                StoredItem::Account {
                    key,
                    lease: Some(lease),
                    ..
                } if !lease.is_live(now) => (model::release_expired_lease(&key, &lease.lock_id, now), true),
                StoredItem::RequestRecord {
                    key,
                    record: Ok(record),
                    ..
                } if record.expires_at_seconds < now / 1000 => (model::delete_expired_record(&key, now), false),
                _ => continue,
            };
            match storage.write(write).await {
                Ok(()) if is_lease => report.released_leases += 1,
                Ok(()) => report.deleted_records += 1,
                // Someone took the lease or rewrote the record meanwhile: nothing to sweep.
                Err(StorageError::ConditionFailed { .. }) => {}
                Err(error) => return Err(error),
            }
        }
    }
    Ok(report)
}
