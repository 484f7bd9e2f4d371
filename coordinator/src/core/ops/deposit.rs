//! Deposit: cash into an account, within the day's deposit limit. The only operation that may
//! open an account (the first committed deposit does).

use crate::core::decision::{Decision, Rejection};
use crate::core::limits::Limits;
use crate::core::money::{Usd, UsdDelta};
use crate::core::records::EntryKind;

/// The name in leases, logs, metrics and request records.
pub const NAME: &str = "DEPOSIT";

/// The ledger entry a committed deposit writes.
pub const ENTRY_KIND: EntryKind = EntryKind::Deposit;

/// `DEPOSIT 10.00`: a retry with the same request id must match it exactly.
pub fn fingerprint(amount: Usd) -> String {
    format!("{NAME} {amount}")
}

/// An amount above the whole daily deposit limit: refused before any lease, whatever the account.
pub fn above_daily_limit(amount: Usd, limits: &Limits) -> Option<Rejection> {
    super::above_whole_daily_limit("deposit", limits.daily_deposit, amount)
}

/// A deposit on the account as `unchanged` describes it: within the day's deposit limit.
pub fn decide(amount: Usd, limits: &Limits, unchanged: Decision) -> Result<Decision, Rejection> {
    let used = super::count_against_daily_limit("deposit", limits.daily_deposit, unchanged.deposited_today, amount)?;
    Ok(Decision {
        cash: unchanged.cash.checked_add(amount).ok_or(Rejection::OutOfRange)?,
        cash_delta: UsdDelta::credit(amount),
        deposited_today: used,
        ..unchanged
    })
}
