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
    super::above_whole_daily_limit("withdrawal", limits.daily_withdrawal, amount)
}

/// A withdrawal on the account as `unchanged` describes it: within the day's withdrawal limit
/// and the cash `available` (not on hold).
pub fn decide(amount: Usd, available: Usd, limits: &Limits, unchanged: Decision) -> Result<Decision, Rejection> {
    let used =
        super::count_against_daily_limit("withdrawal", limits.daily_withdrawal, unchanged.withdrawn_today, amount)?;
    if available < amount {
        return Err(Rejection::InsufficientBalance {
            current: available,
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
