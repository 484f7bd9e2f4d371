//! Operator commands: inspect a user, release a stuck lease, audit, back up and restore the
//! embedded store, and the most contended users.
//!
//! # Layout
//! - this file: each command once, as a function of the coordinator that returns the admin
//!   service's reply message, so the gRPC service and the offline subcommand print the same;
//! - [`grpc`]: the `lockstep.coordinator.v1.Admin` service over these functions (served beside
//!   `Coordinator`; the admin role is required once authentication exists);
//! - [`cli`]: the `coordinator inspect | release-lease | audit | backup | restore` subcommands,
//!   through a running server (`--server URL`) or directly on storage.

pub mod cli;
pub mod grpc;

use std::path::Path;
use std::time::Duration;

use lockstep::coordinator::v1 as pb;

use crate::core::records::Lease;
use crate::core::time::rfc3339;
use crate::core::{LeaseId, UserId};
use crate::service::{PageRequest, ServiceError, TransactionCoordinator};
use crate::storage::{StorageError, model};
use crate::telemetry::{contention, metrics};

pub use crate::settings::{CONTENDED_USERS_DEFAULT, INSPECT_ENTRIES_DEFAULT};
/// Ledger entries `inspect` shows at most.
pub const INSPECT_ENTRIES_MAX: u32 = 100;

fn lease_message(lease: &Lease, now: u64) -> pb::InspectedLease {
    pb::InspectedLease {
        lock_id: lease.lock_id.to_string(),
        owner: lease.owner.clone(),
        operation: lease.operation.clone(),
        expires_at: rfc3339(lease.expires_at_ms),
        live: lease.is_live(now),
    }
}

/// The account item of `user` as stored: the account and the lease it carries.
async fn account_item(
    coordinator: &TransactionCoordinator,
    user: &UserId,
) -> Result<(crate::core::Account, Option<Lease>), ServiceError> {
    let item = coordinator.storage().get(model::account_key(user)).await?;
    let Some(item) = item else {
        return Ok((crate::core::Account::default(), None));
    };
    Ok((model::account_from_item(&item)?, model::lease_from_item(&item)))
}

/// `inspect USER`: account, holdings, today's limits, the lease and the last ledger entries.
pub async fn inspect(
    coordinator: &TransactionCoordinator,
    user: &UserId,
    entries: u32,
) -> Result<pb::InspectReply, ServiceError> {
    let now = coordinator.now();
    let (account, lease) = account_item(coordinator, user).await?;
    let today = coordinator.today();
    let (deposited, withdrawn) = account.daily_totals(today);
    let limits = &coordinator.config().limits;
    let entries = if entries == 0 {
        INSPECT_ENTRIES_DEFAULT
    } else {
        entries.min(INSPECT_ENTRIES_MAX)
    };
    let last_entries = if account.exists() {
        coordinator.ledger(user, PageRequest::first(entries)).await?.items
    } else {
        Vec::new()
    };
    let members = crate::affinity::live_members(coordinator.storage(), now).await?;
    let owner = crate::affinity::rendezvous_owner(&members, user.as_str())
        .map(|owner| owner.name.to_string())
        .unwrap_or_default();
    Ok(pb::InspectReply {
        user_id: user.to_string(),
        account_exists: account.exists(),
        cash: account.cash.to_string(),
        holdings: account
            .holdings
            .iter()
            .map(|(asset, quantity)| (asset.to_string(), quantity.to_string()))
            .collect(),
        today: today.to_string(),
        deposited_today: deposited.to_string(),
        withdrawn_today: withdrawn.to_string(),
        daily_deposit_limit: limits.daily_deposit.to_string(),
        daily_withdrawal_limit: limits.daily_withdrawal.to_string(),
        transferred_today: account.transferred_on(today).to_string(),
        daily_transfer_limit: limits.daily_transfer.to_string(),
        version: account.version,
        ledger_entries: account.entries,
        numbering_pending: account.exists() && account.needs_numbering,
        cash_on_hold: account.cash_on_hold(now).to_string(),
        cash_available: account.available_cash(now).to_string(),
        holdings_on_hold: account
            .holdings
            .keys()
            .map(|asset| (asset, account.holding_on_hold(asset, now)))
            .filter(|(_, held)| !held.is_zero())
            .map(|(asset, held)| (asset.to_string(), held.to_string()))
            .collect(),
        holds: account
            .holds
            .iter()
            .map(|(order_id, hold)| pb::InspectedHold {
                order_id: order_id.to_string(),
                side: hold.side.as_str().to_owned(),
                asset: hold.asset.to_string(),
                quantity: hold.quantity.to_string(),
                limit_price: hold.limit.to_string(),
                filled_quantity: hold.filled.to_string(),
                held: match hold.side {
                    crate::core::TradeSide::Buy => hold.cash_held().to_string(),
                    crate::core::TradeSide::Sell => hold.quantity_held().to_string(),
                },
                expires_at: rfc3339(hold.expires_at_ms),
                live: hold.is_live(now),
            })
            .collect(),
        lease: lease.as_ref().map(|lease| lease_message(lease, now)),
        owner,
        last_entries: last_entries
            .into_iter()
            .map(|entry| pb::InspectedEntry {
                entry_id: entry.entry_id.to_string(),
                kind: entry.kind.as_str().to_owned(),
                cash_delta: entry.cash_delta.to_string(),
                cash_after: entry.cash_after.to_string(),
                created_at: rfc3339(entry.created_at_ms),
                request_id: entry.request_id.unwrap_or_default(),
                sequence: entry.sequence,
            })
            .collect(),
    })
}

/// `release-lease USER`: releases the user's lease (only `expected` if given) by its lock id,
/// bumping the version, so no commit decided under it can apply afterwards. `confirm` must be
/// true. Logged and counted.
pub async fn release_lease(
    coordinator: &TransactionCoordinator,
    user: &UserId,
    expected: Option<&str>,
    confirm: bool,
) -> Result<pb::ReleaseLeaseReply, ServiceError> {
    if !confirm {
        return Err(ServiceError::InvalidArgument(crate::core::FieldError::new(
            "confirm",
            "releasing a lease fences its holder's commit; confirm it (--yes)",
        )));
    }
    let now = coordinator.now();
    let (_, lease) = account_item(coordinator, user).await?;
    let Some(lease) = lease.filter(|lease| expected.is_none_or(|expected| lease.lock_id.as_str() == expected)) else {
        return Ok(pb::ReleaseLeaseReply { released: None });
    };
    let release = model::release_lease(user, &LeaseId::from_stored(lease.lock_id.to_string()), None);
    match coordinator.storage().write(release).await {
        Ok(()) => {
            metrics::admin_released_lease();
            tracing::warn!(
                lock_state = "RELEASED",
                %user,
                lock_id = %lease.lock_id,
                holder = %lease.owner,
                live = lease.is_live(now),
                "lease released by an operator"
            );
            Ok(pb::ReleaseLeaseReply {
                released: Some(lease_message(&lease, now)),
            })
        }
        // Released (or re-taken) between the read and the write: nothing of this lease is left.
        Err(StorageError::ConditionFailed { .. }) => Ok(pb::ReleaseLeaseReply { released: None }),
        Err(error) => Err(error.into()),
    }
}

/// `audit`, run by the serving process.
pub async fn audit(
    coordinator: &TransactionCoordinator,
    lease_margin: Duration,
) -> Result<pb::AuditReply, ServiceError> {
    match crate::audit::audit(coordinator.storage(), coordinator.now(), lease_margin).await {
        Ok(report) => {
            metrics::audited(Some(report.discrepancies.len()));
            Ok(pb::AuditReply {
                clean: report.is_clean(),
                report: report.to_string(),
                discrepancies: report.discrepancies,
            })
        }
        Err(error) => {
            metrics::audited(None);
            Err(error.into())
        }
    }
}

/// `backup PATH`: a consistent online copy of the embedded store.
pub async fn backup(coordinator: &TransactionCoordinator, path: &Path) -> Result<pb::BackupReply, ServiceError> {
    match coordinator.storage().backup(path).await {
        Ok(()) => {
            let bytes = std::fs::metadata(path).map(|metadata| metadata.len()).unwrap_or(0);
            tracing::info!(path = %path.display(), bytes, "backup written");
            Ok(pb::BackupReply {
                path: path.display().to_string(),
                bytes,
            })
        }
        Err(StorageError::Other(detail)) => Err(ServiceError::InvalidArgument(crate::core::FieldError::new(
            "path", detail,
        ))),
        Err(error) => Err(error.into()),
    }
}

/// The most contended users of this process.
pub fn contended_users(limit: u32) -> pb::ContendedUsersReply {
    let limit = if limit == 0 { CONTENDED_USERS_DEFAULT } else { limit };
    pb::ContendedUsersReply {
        users: contention::top(limit as usize)
            .into_iter()
            .map(|contended| pb::ContendedUser {
                user_id: contended.user,
                count: contended.count,
                error: contended.error,
            })
            .collect(),
    }
}
