//! Withdraw: cash out of an account, within the day's withdrawal limit and the balance.

use crate::core::decision::{Decision, Rejection};
use crate::core::limits::Limits;
use crate::core::money::{Usd, UsdDelta};
use crate::core::records::EntryKind;

/// The name in leases, logs, metrics and request records.
pub const NAME: &str = "WITHDRAWAL";

/// The ledger entry a committed withdrawal writes.
pub const ENTRY_KIND: EntryKind = EntryKind::Withdrawal;

/// `WITHDRAWAL 10.00`: a retry with the same request id must match it exactly.
pub fn fingerprint(amount: Usd) -> String {
    format!("{NAME} {amount}")
}

/// An amount above the whole daily withdrawal limit: refused before any lease.
pub fn above_daily_limit(amount: Usd, limits: &Limits) -> Option<Rejection> {
    (amount > limits.daily_withdrawal).then_some(Rejection::AboveDailyLimit {
        kind: "withdrawal",
        limit: limits.daily_withdrawal,
        requested: amount,
    })
}

/// A withdrawal on the account as `unchanged` describes it: within the day's withdrawal limit
/// and the balance.
pub fn decide(amount: Usd, limits: &Limits, unchanged: Decision) -> Result<Decision, Rejection> {
    let used = unchanged
        .withdrawn_today
        .checked_add(amount)
        .ok_or(Rejection::OutOfRange)?;
    if used > limits.daily_withdrawal {
        return Err(Rejection::DailyLimitExceeded {
            kind: "withdrawal",
            limit: limits.daily_withdrawal,
            used: unchanged.withdrawn_today,
            requested: amount,
        });
    }
    if unchanged.cash < amount {
        return Err(Rejection::InsufficientBalance {
            current: unchanged.cash,
            required: amount,
        });
    }
    Ok(Decision {
        cash: unchanged.cash.checked_sub(amount).ok_or(Rejection::OutOfRange)?,
        cash_delta: UsdDelta::debit(amount),
        withdrawn_today: used,
        ..unchanged
    })
}
