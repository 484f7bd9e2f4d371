//! The operations, one file each: its request type, name, fingerprint, lease, the accounts it
//! touches, its pure decision, the records it writes and its pre-lease refusals.
//!
//! | operation | file | accounts | committed |
//! |---|---|---|---|
//! | Deposit | `deposit.rs` | the user's | in a batch of the user's queue |
//! | Withdraw (at once, or PENDING), SettleWithdrawal, ReturnWithdrawal | `withdraw.rs` | the user's | in a batch of the user's queue |
//! | PlaceBuy, PlaceSell | `trade.rs` | the user's | in a batch, conditioned on the quote's price |
//! | Transfer | `transfer.rs` | sender's and receiver's | alone, both leases, one transaction |
//! | ReserveOrder, FillOrder, CancelOrder | `orders.rs` | the user's | in a batch; a fill or cancel of an order the account no longer holds reads it first |
//!
//! Adding an operation is one new file here, one arm of `Operation` (the compiler then names
//! every `match` to extend), the proto message and its tests (docs/flow.md, "Adding an
//! operation"). Nothing here does I/O: `service` feeds the decision what storage returned.

pub mod deposit;
pub mod orders;
pub mod trade;
pub mod transfer;
pub mod withdraw;

use std::time::Duration;

use super::account::Account;
use super::decision::{Decision, Rejection};
use super::ids::{EntryId, RequestId, UserId};
use super::limits::Limits;
use super::money::Usd;
use super::principal::Principal;
use super::records::{LedgerEntry, Order, RecordedOutcome, RequestRecord};
use super::time::{Millis, UtcDay};

pub use orders::{CancelRequest, ClosedOrder, FillRequest, ReserveRequest};
pub use trade::{Quote, TradeRequest, TradeSide};
pub use transfer::TransferRequest;
pub use withdraw::{PendingRequest, ReturnRequest, SettleRequest};

/// Every operation's name: the bounded values of the `operation` label of the metrics.
pub const NAMES: [&str; 11] = [
    withdraw::PENDING_NAME,
    withdraw::SETTLE_NAME,
    withdraw::RETURN_NAME,
    deposit::NAME,
    withdraw::NAME,
    trade::BUY,
    trade::SELL,
    transfer::NAME,
    orders::RESERVE,
    orders::FILL,
    orders::CANCEL,
];

/// A mutation as the caller asked for it, validated before any lease: the one type the queue,
/// the batch, request records, metrics and roll back all work with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Deposit(Usd),
    Withdraw(Usd),
    Trade(TradeRequest),
    Transfer(TransferRequest),
    Reserve(ReserveRequest),
    Fill(FillRequest),
    Cancel(CancelRequest),
    /// Withdraw with settlement PENDING.
    WithdrawPending(PendingRequest),
    Settle(SettleRequest),
    Return(ReturnRequest),
}

/// The most items one call counts (`Operation::items_max`): a trade with its request record.
pub const CALL_ITEMS_MAX: usize = 5;

/// Which configured lease duration an operation takes (`--lease-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    Deposit,
    Withdraw,
    Trade,
}

/// The accounts an operation touches, sorted and without duplicates: the one global order in
/// which every coordinator takes their leases (TiKV's latches sort their keys the same way), so
/// two operations that need the same accounts never wait on each other in a circle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSet(Vec<UserId>);

impl AccountSet {
    pub fn new(mut accounts: Vec<UserId>) -> Self {
        accounts.sort();
        accounts.dedup();
        assert!(!accounts.is_empty(), "an operation touches at least one account");
        AccountSet(accounts)
    }

    /// The first account in the global order: whose queue the operation waits in.
    pub fn first(&self) -> &UserId {
        &self.0[0]
    }

    /// Every account, in the global order.
    pub fn iter(&self) -> impl Iterator<Item = &UserId> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Operation {
    /// The name used in leases, logs, metrics and ledger entries.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Deposit(_) => deposit::NAME,
            Operation::Withdraw(_) => withdraw::NAME,
            Operation::Trade(trade) => trade.name(),
            Operation::Transfer(_) => transfer::NAME,
            Operation::Reserve(_) => orders::RESERVE,
            Operation::Fill(_) => orders::FILL,
            Operation::Cancel(_) => orders::CANCEL,
            Operation::WithdrawPending(_) => withdraw::PENDING_NAME,
            Operation::Settle(_) => withdraw::SETTLE_NAME,
            Operation::Return(_) => withdraw::RETURN_NAME,
        }
    }

    /// The pending withdrawal a settlement or return names.
    pub fn named_withdrawal(&self) -> Option<&super::ids::WithdrawalId> {
        match self {
            Operation::Settle(settle) => Some(&settle.withdrawal_id),
            Operation::Return(back) => Some(&back.withdrawal_id),
            _ => None,
        }
    }

    /// The field a reused idempotency key is named by: a fill is keyed on its fill id.
    pub fn idempotency_field(&self) -> &'static str {
        match self {
            Operation::Fill(_) => "fill_id",
            _ => "request_id",
        }
    }

    /// The reserved order a fill or cancel names.
    pub fn named_order(&self) -> Option<&super::ids::OrderId> {
        match self {
            Operation::Fill(fill) => Some(&fill.order_id),
            Operation::Cancel(cancel) => Some(&cancel.order_id),
            _ => None,
        }
    }

    /// Whether the order it writes already exists (a fill or cancel rewrites its order).
    pub fn rewrites_order(&self) -> bool {
        matches!(self, Operation::Fill(_) | Operation::Cancel(_))
    }

    /// The operation and every parameter, e.g. `BUY 0.5 SOL limit 140`: a retry with the same
    /// request id must match it exactly.
    pub fn fingerprint(&self) -> String {
        match self {
            Operation::Deposit(amount) => deposit::fingerprint(*amount),
            Operation::Withdraw(amount) => withdraw::fingerprint(*amount),
            Operation::Trade(trade) => trade.fingerprint(),
            Operation::Transfer(transfer) => transfer.fingerprint(),
            Operation::Reserve(reserve) => reserve.fingerprint(),
            Operation::Fill(fill) => fill.fingerprint(),
            Operation::Cancel(cancel) => cancel.fingerprint(),
            Operation::WithdrawPending(pending) => pending.fingerprint(),
            Operation::Settle(settle) => settle.fingerprint(),
            Operation::Return(back) => back.fingerprint(),
        }
    }

    /// The lease it takes. A transfer is a withdrawal on one side and a deposit on the other.
    pub fn lease_kind(&self) -> LeaseKind {
        match self {
            Operation::Deposit(_) => LeaseKind::Deposit,
            Operation::Withdraw(_)
            | Operation::Transfer(_)
            | Operation::WithdrawPending(_)
            | Operation::Settle(_)
            | Operation::Return(_) => LeaseKind::Withdraw,
            Operation::Trade(_) | Operation::Reserve(_) | Operation::Fill(_) | Operation::Cancel(_) => LeaseKind::Trade,
        }
    }

    /// The accounts it touches, for a call made for `user`.
    pub fn accounts(&self, user: &UserId) -> AccountSet {
        match self {
            Operation::Transfer(transfer) => AccountSet::new(vec![transfer.from.clone(), transfer.to.clone()]),
            _ => AccountSet::new(vec![user.clone()]),
        }
    }

    /// Whether it is committed on its own, never in a batch with others: an operation whose
    /// transaction spans more than one account.
    pub fn is_solo(&self) -> bool {
        matches!(self, Operation::Transfer(_))
    }

    /// The most items one call of it adds to its batch's transaction, accepted or refused, with
    /// (`recorded`) or without a request record: a ledger entry; for a trade its order (two
    /// items: by user and by id) and the catalog check of its asset. The batch's account item is
    /// counted once per batch (`service::BATCH_ITEMS_MAX`). A transfer is never batched; its own
    /// transaction holds seven items at most (with its two feed records).
    pub fn items_max(&self, recorded: bool) -> usize {
        let own = match self {
            Operation::Deposit(_) | Operation::Withdraw(_) => 1,
            Operation::Trade(_) => 4,
            Operation::Transfer(_) => 4,
            // The entry and the order's two items.
            Operation::Reserve(_) | Operation::Fill(_) | Operation::Cancel(_) => 3,
            // The entry and the withdrawal's record.
            Operation::WithdrawPending(_) | Operation::Settle(_) | Operation::Return(_) => 2,
        };
        own + usize::from(recorded)
    }

    /// Only a deposit may create an account; everything else needs one.
    pub fn requires_account(&self) -> bool {
        !matches!(self, Operation::Deposit(_))
    }

    /// The refusal that holds whatever the accounts (an amount above the whole daily limit):
    /// answered before any lease, with nothing written.
    pub fn refused_before_lease(&self, limits: &Limits) -> Option<Rejection> {
        match self {
            Operation::Deposit(amount) => deposit::above_daily_limit(*amount, limits),
            Operation::Withdraw(amount) => withdraw::above_daily_limit(*amount, limits),
            Operation::WithdrawPending(pending) => withdraw::above_daily_limit(pending.amount, limits),
            Operation::Trade(_)
            | Operation::Reserve(_)
            | Operation::Fill(_)
            | Operation::Cancel(_)
            | Operation::Settle(_)
            | Operation::Return(_) => None,
            Operation::Transfer(transfer) => transfer::above_daily_limit(transfer.amount, limits),
        }
    }
}

/// `amount` more against a daily limit (named `kind` in messages) of which `used` is already
/// counted today: the new total, or why not.
fn count_against_daily_limit(kind: &'static str, limit: Usd, used: Usd, amount: Usd) -> Result<Usd, Rejection> {
    let total = used.checked_add(amount).ok_or(Rejection::OutOfRange)?;
    if total > limit {
        return Err(Rejection::DailyLimitExceeded {
            kind,
            limit,
            used,
            requested: amount,
        });
    }
    Ok(total)
}

/// An amount above a whole daily limit: refused before any lease, whatever the account.
fn above_whole_daily_limit(kind: &'static str, limit: Usd, amount: Usd) -> Option<Rejection> {
    (amount > limit).then_some(Rejection::AboveDailyLimit {
        kind,
        limit,
        requested: amount,
    })
}

/// What a decision reads besides the account and the operation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inputs<'a> {
    /// For a trade or a reserve: the catalog entry (a trade's commit is conditioned on it).
    pub quote: Option<&'a Quote>,
    /// For a fill or cancel of an order the account no longer holds: the order as stored.
    pub closed: Option<ClosedOrder>,
    /// For a settlement or return of a withdrawal the account no longer holds: its status.
    pub closed_withdrawal: Option<crate::core::records::WithdrawalStatus>,
}

/// Decides `operation` on `account` at `now` (the daily limits count the UTC day of `now`).
///
/// # Panics
/// On a transfer (decided on its two accounts by `transfer::decide`) or a trade or reserve
/// without its quote: both are programmer errors of the caller.
pub fn decide(
    account: &Account,
    operation: &Operation,
    inputs: Inputs<'_>,
    now: Millis,
    limits: &Limits,
) -> Result<Decision, Rejection> {
    if !account.exists() && operation.requires_account() {
        return Err(Rejection::AccountNotFound);
    }
    let unchanged = unchanged(account, UtcDay::of(now));
    let decision = match operation {
        Operation::Deposit(amount) => deposit::decide(*amount, limits, unchanged),
        Operation::Withdraw(amount) => withdraw::decide(*amount, account.available_cash(now), limits, unchanged),
        Operation::Trade(request) => {
            let quote = inputs.quote.expect("a trade is decided at its quote");
            trade::decide(account, request, quote, now, limits, unchanged)
        }
        Operation::Reserve(request) => {
            let quote = inputs.quote.expect("a reserve is decided at its quote");
            orders::decide_reserve(account, request, quote.active, now, limits)
        }
        Operation::Fill(request) => orders::decide_fill(account, request, inputs.closed, now),
        Operation::Cancel(request) => orders::decide_cancel(account, request, inputs.closed, now),
        Operation::WithdrawPending(request) => {
            withdraw::decide_pending(account, request, account.available_cash(now), now, limits, unchanged)
        }
        Operation::Settle(request) => withdraw::decide_settle(account, request, inputs.closed_withdrawal, unchanged),
        Operation::Return(request) => withdraw::decide_return(account, request, inputs.closed_withdrawal, unchanged),
        Operation::Transfer(_) => unreachable!("a transfer is decided on both its accounts by transfer::decide"),
    }?;
    assert_postconditions(account, &decision, now);
    Ok(decision)
}

/// The decision that changes nothing: the account's cash, and its daily totals as they count on
/// the day the limits use.
pub fn unchanged(account: &Account, today: UtcDay) -> Decision {
    // Days only move forward: a coordinator whose clock is behind another's (around midnight)
    // keeps counting on the later day already stored, instead of resetting its totals. But a
    // stored day more than one day ahead was written by a clock far ahead: it is not allowed
    // to freeze the totals until then, and this clock's day is used instead.
    let today = match account.limit_day {
        Some(stored) if stored > today && stored <= today.next() => stored,
        _ => today,
    };
    let (deposited_today, withdrawn_today) = account.daily_totals(today);
    Decision {
        cash: account.cash,
        cash_delta: super::money::UsdDelta::ZERO,
        limit_day: today,
        deposited_today,
        withdrawn_today,
        transferred_today: account.transferred_on(today),
        trade: None,
        hold: None,
        withdrawal: None,
    }
}

/// A decision's postconditions, checked where the state changes: cash moves by exactly the
/// delta, nothing goes negative, and the holding moves by exactly the traded quantity.
/// Always on (TigerBeetle's paired assertions): a decision that breaks one is a programmer error
/// that must never reach storage. `storage::model` checks the same where an account is encoded
/// and decoded.
pub fn assert_postconditions(before: &Account, decision: &Decision, now: Millis) {
    assert_eq!(
        decision.cash.decimal(),
        before.cash.decimal() + decision.cash_delta.decimal(),
        "cash after = cash before + delta"
    );
    assert!(decision.cash >= Usd::ZERO, "cash never goes negative");
    if let Some(effect) = &decision.trade {
        assert_eq!(
            effect.holding.decimal(),
            before.holding(&effect.asset).decimal() + effect.quantity_delta,
            "holding after = holding before + quantity delta"
        );
        assert!(
            !effect.holding.decimal().is_sign_negative(),
            "holdings never go negative"
        );
    }
    let mut after = before.clone();
    after.apply(decision);
    Account::assert_holds_kept_within_totals(before, &after, now);
}

/// Who, why and when: what every record of a committed call carries besides the decision.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub user: &'a UserId,
    pub principal: &'a Principal,
    pub request_id: Option<&'a RequestId>,
    pub now: Millis,
}

/// The ledger entry, and for a trade the CONFIRMED order, that an accepted single-account
/// `decision` commits; `sequence` is its place in the account's ledger.
///
/// # Panics
/// On a transfer, whose two entries `transfer::entry` writes.
pub fn records(
    operation: &Operation,
    decision: &Decision,
    origin: Origin<'_>,
    sequence: u64,
) -> (LedgerEntry, Option<Order>) {
    if let Some(records) = hold_records(decision, origin, sequence) {
        return records;
    }
    let (kind, trade_records) = match operation {
        Operation::Deposit(_) => (deposit::ENTRY_KIND, None),
        Operation::Withdraw(_) => (withdraw::ENTRY_KIND, None),
        Operation::Trade(request) => {
            let effect = decision.trade.as_ref().expect("a trade decision carries its effect");
            let executed = trade::executed(origin.user, origin.principal, request, effect, origin.now);
            (request.entry_kind(), Some(executed))
        }
        Operation::Transfer(_) => unreachable!("a transfer's entries are written by transfer::entry"),
        Operation::Reserve(_)
        | Operation::Fill(_)
        | Operation::Cancel(_)
        | Operation::WithdrawPending(_)
        | Operation::Settle(_)
        | Operation::Return(_) => {
            unreachable!("an accepted hold operation decides a hold or withdrawal effect")
        }
    };
    let (order, ledger_trade) = trade_records.unzip();
    let entry = LedgerEntry {
        entry_id: EntryId::new(),
        user_id: origin.user.clone(),
        kind,
        cash_delta: decision.cash_delta,
        cash_after: decision.cash,
        trade: ledger_trade,
        created_at_ms: origin.now,
        request_id: origin.request_id.map(|request_id| request_id.as_str().to_owned()),
        transfer: None,
        hold: None,
        sequence,
        principal: origin.principal.clone(),
    };
    (entry, order)
}

/// The ledger entry and the order that an accepted hold decision (a reserve, fill, cancel or
/// expiry) commits; None for any other decision.
pub fn hold_records(decision: &Decision, origin: Origin<'_>, sequence: u64) -> Option<(LedgerEntry, Option<Order>)> {
    if let Some(effect) = &decision.withdrawal {
        let entry = LedgerEntry {
            entry_id: EntryId::new(),
            user_id: origin.user.clone(),
            kind: withdraw::entry_kind(effect.status),
            cash_delta: decision.cash_delta,
            cash_after: decision.cash,
            trade: None,
            transfer: None,
            hold: Some(crate::core::records::LedgerHold {
                order_id: None,
                withdrawal_id: Some(effect.withdrawal_id.clone()),
                fill_id: None,
                asset: None,
                held_delta: effect.held_delta,
            }),
            created_at_ms: origin.now,
            request_id: origin.request_id.map(|request_id| request_id.as_str().to_owned()),
            sequence,
            principal: origin.principal.clone(),
        };
        return Some((entry, None));
    }
    let effect = decision.hold.as_ref()?;
    let (hold, trade) = orders::ledger_parts(decision, effect);
    let entry = LedgerEntry {
        entry_id: EntryId::new(),
        user_id: origin.user.clone(),
        kind: orders::entry_kind(effect),
        cash_delta: decision.cash_delta,
        cash_after: decision.cash,
        trade,
        transfer: None,
        hold: Some(hold),
        created_at_ms: origin.now,
        request_id: origin.request_id.map(|request_id| request_id.as_str().to_owned()),
        sequence,
        principal: origin.principal.clone(),
    };
    Some((entry, Some(orders::order(origin.user, effect))))
}

/// The request record of `operation` with `outcome`, kept for `retention` from `now`: what a
/// retry with the same request id is answered from.
pub fn request_record(
    operation: &Operation,
    outcome: RecordedOutcome,
    now: Millis,
    retention: Duration,
) -> RequestRecord {
    RequestRecord {
        fingerprint: operation.fingerprint(),
        outcome,
        expires_at_seconds: (now / 1000).saturating_add(retention.as_secs()),
    }
}

/// For a refused trade, the FAILED order that records it; nothing for cash operations.
pub fn failed_order(
    operation: &Operation,
    quote: Option<&Quote>,
    rejection: &Rejection,
    origin: Origin<'_>,
) -> Option<Order> {
    let (Operation::Trade(request), Some(quote)) = (operation, quote) else {
        return None;
    };
    Some(trade::failed(
        origin.user,
        origin.principal,
        request,
        quote,
        rejection,
        origin.now,
    ))
}

#[cfg(test)]
mod tests;
