//! Withdraw: cash out of an account, within the day's withdrawal limit and the cash available.
//! At once (the default), or with settlement PENDING: the amount is held (and counted against
//! the day's limit) until SettleWithdrawal lets it leave or ReturnWithdrawal gives it back, each
//! exactly once.

use crate::core::account::{Account, HOLDS_PER_ACCOUNT_MAX, PendingWithdrawal};
use crate::core::decision::{Decision, Rejection, WithdrawalEffect};
use crate::core::ids::{Memo, UserId, WithdrawalId};
use crate::core::limits::Limits;
use crate::core::money::{Usd, UsdDelta};
use crate::core::principal::Principal;
use crate::core::records::{EntryKind, Withdrawal, WithdrawalStatus};
use crate::core::time::Millis;

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

/// The names of a withdrawal made with settlement PENDING and of its two endings.
pub const PENDING_NAME: &str = "WITHDRAWAL_PENDING";
pub const SETTLE_NAME: &str = "SETTLE";
pub const RETURN_NAME: &str = "RETURN";

/// A validated Withdraw with settlement PENDING. `withdrawal_id` and `placed_by` are given when
/// the call arrives (a retry with the same request id gets the first call's from its record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRequest {
    pub amount: Usd,
    pub withdrawal_id: WithdrawalId,
    pub placed_by: Principal,
}

/// A validated SettleWithdrawal of the user's withdrawal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleRequest {
    pub withdrawal_id: WithdrawalId,
}

/// A validated ReturnWithdrawal of the user's withdrawal, with why the bank returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnRequest {
    pub withdrawal_id: WithdrawalId,
    pub reason: Memo,
}

impl PendingRequest {
    /// `WITHDRAWAL 10.00 pending`: a retry with the same request id must match it.
    pub fn fingerprint(&self) -> String {
        format!("{NAME} {} pending", self.amount)
    }
}

impl SettleRequest {
    pub fn fingerprint(&self) -> String {
        format!("{SETTLE_NAME} {}", self.withdrawal_id)
    }
}

impl ReturnRequest {
    pub fn fingerprint(&self) -> String {
        format!("{RETURN_NAME} {} reason {:?}", self.withdrawal_id, self.reason.as_str())
    }
}

/// A withdrawal that waits to settle: counted against the day's limit at once and held out of
/// the cash `available`, as an immediate one would be; nothing leaves yet.
pub fn decide_pending(
    account: &Account,
    request: &PendingRequest,
    available: Usd,
    now: Millis,
    limits: &Limits,
    unchanged: Decision,
) -> Result<Decision, Rejection> {
    let used = super::count_against_daily_limit(
        "withdrawal",
        limits.daily_withdrawal,
        unchanged.withdrawn_today,
        request.amount,
    )?;
    if available < request.amount {
        return Err(Rejection::InsufficientBalance {
            current: available,
            required: request.amount,
        });
    }
    if account.open_holds(now) >= HOLDS_PER_ACCOUNT_MAX {
        return Err(Rejection::TooManyHolds {
            maximum: HOLDS_PER_ACCOUNT_MAX,
        });
    }
    let pending = PendingWithdrawal {
        amount: request.amount,
        day: unchanged.limit_day,
        created_at_ms: now,
        principal: request.placed_by.clone(),
    };
    let mut withdrawals = account.withdrawals.clone();
    withdrawals.insert(request.withdrawal_id.clone(), pending.clone());
    Ok(Decision {
        withdrawn_today: used,
        withdrawal: Some(WithdrawalEffect {
            withdrawals,
            withdrawal_id: request.withdrawal_id.clone(),
            pending,
            status: WithdrawalStatus::Pending,
            reason: None,
            held_delta: request.amount.decimal(),
            fresh: true,
        }),
        ..unchanged
    })
}

/// The pending withdrawal `id` of `account`, or why it is not pending (`closed`: its record's
/// status, read by the service when the account does not hold it).
fn pending<'a>(
    account: &'a Account,
    id: &WithdrawalId,
    closed: Option<WithdrawalStatus>,
) -> Result<&'a PendingWithdrawal, Rejection> {
    account
        .withdrawals
        .get(id)
        .ok_or_else(|| Rejection::WithdrawalNotPending {
            withdrawal_id: id.clone(),
            // The service reads every withdrawal it does not find pending before deciding.
            status: closed.unwrap_or(WithdrawalStatus::Settled),
        })
}

/// How withdrawal `id` of `account` ends in `status`: no longer pending, its hold released.
/// Refused if it is not pending (`closed`: its record's status).
fn ended(
    account: &Account,
    id: &WithdrawalId,
    closed: Option<WithdrawalStatus>,
    status: WithdrawalStatus,
    reason: Option<String>,
) -> Result<WithdrawalEffect, Rejection> {
    let pending = pending(account, id, closed)?.clone();
    let mut withdrawals = account.withdrawals.clone();
    withdrawals.remove(id);
    Ok(WithdrawalEffect {
        withdrawals,
        withdrawal_id: id.clone(),
        held_delta: -pending.amount.decimal(),
        pending,
        status,
        reason,
        fresh: false,
    })
}

/// SettleWithdrawal: the held cash leaves (a WITHDRAWAL entry). The day's total already counts it.
pub fn decide_settle(
    account: &Account,
    request: &SettleRequest,
    closed: Option<WithdrawalStatus>,
    unchanged: Decision,
) -> Result<Decision, Rejection> {
    let effect = ended(account, &request.withdrawal_id, closed, WithdrawalStatus::Settled, None)?;
    let amount = effect.pending.amount;
    Ok(Decision {
        cash: account.cash.checked_sub(amount).ok_or(Rejection::OutOfRange)?,
        cash_delta: UsdDelta::debit(amount),
        withdrawal: Some(effect),
        ..unchanged
    })
}

/// ReturnWithdrawal: nothing leaves; the hold is released and, on the day it was counted, the
/// day's withdrawal total is given back.
pub fn decide_return(
    account: &Account,
    request: &ReturnRequest,
    closed: Option<WithdrawalStatus>,
    unchanged: Decision,
) -> Result<Decision, Rejection> {
    let reason = Some(request.reason.as_str().to_owned());
    let effect = ended(
        account,
        &request.withdrawal_id,
        closed,
        WithdrawalStatus::Returned,
        reason,
    )?;
    let withdrawn_today = if effect.pending.day == unchanged.limit_day {
        unchanged
            .withdrawn_today
            .checked_sub(effect.pending.amount)
            .unwrap_or(Usd::from_decimal(rust_decimal::Decimal::ZERO))
    } else {
        unchanged.withdrawn_today
    };
    Ok(Decision {
        withdrawn_today,
        withdrawal: Some(effect),
        ..unchanged
    })
}

/// The record of `user`'s withdrawal as `effect` leaves it.
pub fn record(user: &UserId, effect: &WithdrawalEffect) -> Withdrawal {
    Withdrawal {
        withdrawal_id: effect.withdrawal_id.clone(),
        user_id: user.clone(),
        amount: effect.pending.amount,
        status: effect.status,
        reason: effect.reason.clone(),
        day: effect.pending.day,
        created_at_ms: effect.pending.created_at_ms,
        principal: effect.pending.principal.clone(),
    }
}

/// The entry kind of a withdrawal decision: HOLD when it starts, WITHDRAWAL when it settles,
/// RELEASE when it is returned.
pub fn entry_kind(status: WithdrawalStatus) -> EntryKind {
    match status {
        WithdrawalStatus::Pending => EntryKind::Hold,
        WithdrawalStatus::Settled => EntryKind::Withdrawal,
        WithdrawalStatus::Returned => EntryKind::Release,
    }
}
