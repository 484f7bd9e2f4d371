//! What Lockstep stores besides the account: leases, ledger entries, orders and assets.

use rust_decimal::Decimal;

use super::ids::{AssetSymbol, EntryId, LeaseId, Memo, OrderId, TransferId, UserId, WithdrawalId};
use super::money::{Price, Quantity, Usd, UsdDelta};
use super::principal::Principal;
use super::time::Millis;
use super::time::UtcDay;

/// A user's lease as stored on the account item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub lock_id: LeaseId,
    /// The coordinator instance that took it (`--instance`).
    pub owner: String,
    /// Which run of that instance: a fresh id at every start. A live lease with this
    /// instance's name but another incarnation belongs to a run that died.
    pub incarnation: String,
    pub operation: String,
    pub expires_at_ms: Millis,
}

/// The longest lease any operation may take (settings refuse longer ones).
pub const LEASE_DURATION_MAX: std::time::Duration = std::time::Duration::from_secs(300);
/// The largest clock difference between coordinators that is tolerated: a stored instant
/// further ahead of the local clock than any legitimate writer could have set was written by a
/// clock far ahead, and is treated as the local clock's instead of lasting that long.
/// How long the feed's journal keeps a commit's record (`WatchFeed`): as long as DynamoDB
/// Streams keeps its records. A cursor older than this is OUT_OF_RANGE.
pub const FEED_RETENTION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
pub const CLOCK_SKEW_MAX: std::time::Duration = std::time::Duration::from_secs(60);

impl Lease {
    /// A lease is live until its expiry instant, exclusive, unless that expiry lies further
    /// ahead than any lease taken by a clock within `CLOCK_SKEW_MAX` of this one could
    /// (see `implausible_after`): such a lease is treated as expired.
    pub fn is_live(&self, now: Millis) -> bool {
        now < self.expires_at_ms && !self.is_implausible(now)
    }

    /// Whether the expiry was set by a clock far ahead of `now`'s.
    pub fn is_implausible(&self, now: Millis) -> bool {
        self.expires_at_ms > implausible_after(now)
    }
}

/// Lease expiries after this instant were set by a clock far ahead of `now`'s.
pub fn implausible_after(now: Millis) -> Millis {
    now.saturating_add((LEASE_DURATION_MAX + CLOCK_SKEW_MAX).as_millis() as u64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryKind {
    Deposit,
    Withdrawal,
    Buy,
    Sell,
    /// Cash sent to another account by Transfer.
    TransferOut,
    /// Cash received from another account by Transfer.
    TransferIn,
    /// Cash or an asset set aside for a reserved order (`ReserveOrder`): nothing moves, the
    /// amount on hold grows (`LedgerHold::held_delta`).
    Hold,
    /// A fill of a reserved order: cash and the asset move at the fill's price, and the hold
    /// that covered it shrinks.
    Fill,
    /// A hold given back (`CancelOrder`): nothing moves, the amount on hold shrinks.
    Release,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Deposit => "DEPOSIT",
            EntryKind::Withdrawal => "WITHDRAWAL",
            EntryKind::Buy => "BUY",
            EntryKind::Sell => "SELL",
            EntryKind::TransferOut => "TRANSFER_OUT",
            EntryKind::TransferIn => "TRANSFER_IN",
            EntryKind::Hold => "HOLD",
            EntryKind::Fill => "FILL",
            EntryKind::Release => "RELEASE",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "DEPOSIT" => EntryKind::Deposit,
            "WITHDRAWAL" => EntryKind::Withdrawal,
            "BUY" => EntryKind::Buy,
            "SELL" => EntryKind::Sell,
            "TRANSFER_OUT" => EntryKind::TransferOut,
            "TRANSFER_IN" => EntryKind::TransferIn,
            "HOLD" => EntryKind::Hold,
            "FILL" => EntryKind::Fill,
            "RELEASE" => EntryKind::Release,
            _ => return None,
        })
    }
}

/// One committed mutation. Cash equals the sum of `cash_delta`; each holding the sum of its
/// `quantity_delta`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// UUID v7: sorts by creation time, so the newest-first page is a reverse key scan.
    pub entry_id: EntryId,
    pub user_id: UserId,
    pub kind: EntryKind,
    pub cash_delta: UsdDelta,
    pub cash_after: Usd,
    pub trade: Option<LedgerTrade>,
    /// For transfers: the transfer's id, the other party and the memo.
    pub transfer: Option<LedgerTransfer>,
    /// For holds (HOLD, FILL, RELEASE): which hold, which fill, and how the amount on hold moved.
    pub hold: Option<LedgerHold>,
    pub created_at_ms: Millis,
    /// The caller's idempotency key, when it gave one.
    pub request_id: Option<String>,
    /// The entry's place in its account's ledger: 1, 2, 3 … with no gaps, assigned in the
    /// transaction that moves the money, so it orders a user's entries without trusting the
    /// clocks of the coordinators that wrote them (and is what a watcher resumes from).
    pub sequence: u64,
    /// Who moved the money: the authenticated caller (`local` without authentication).
    pub principal: Principal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerTrade {
    pub asset: AssetSymbol,
    pub quantity_delta: Decimal,
    pub order_id: OrderId,
    /// The holding of `asset` after this entry; None on entries written before it was kept.
    pub holding_after: Option<Quantity>,
}

/// What a transfer's ledger entry adds: both parties' entries carry the same `transfer_id`,
/// and each names the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerTransfer {
    pub transfer_id: TransferId,
    pub counterparty: UserId,
    pub memo: Memo,
}

/// What a HOLD, FILL or RELEASE entry (and a settled WITHDRAWAL) adds: the hold (a reserved
/// order's id, or a pending withdrawal's), the fill, and the signed change of the amount on
/// hold, of cash (`asset` None) or of `asset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerHold {
    /// The reserved order held for; None for a pending withdrawal's hold.
    pub order_id: Option<OrderId>,
    /// The pending withdrawal held for; None for an order's hold.
    pub withdrawal_id: Option<WithdrawalId>,
    pub fill_id: Option<String>,
    pub asset: Option<AssetSymbol>,
    pub held_delta: Decimal,
}

/// Which way a trade goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TradeSide {
    Buy,
    Sell,
}

impl TradeSide {
    pub fn as_str(self) -> &'static str {
        match self {
            TradeSide::Buy => "BUY",
            TradeSide::Sell => "SELL",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    Confirmed,
    Failed,
    /// Reserved (`ReserveOrder`): its hold is set aside, nothing filled yet.
    Open,
    /// Filled in part; the rest is still held.
    PartiallyFilled,
    Filled,
    /// Cancelled (`CancelOrder`): the rest was released; `filled_quantity` stays.
    Cancelled,
    /// Past `expires_at` before it was filled or cancelled: its hold no longer counts.
    Expired,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Confirmed => "CONFIRMED",
            OrderStatus::Failed => "FAILED",
            OrderStatus::Open => "OPEN",
            OrderStatus::PartiallyFilled => "PARTIALLY_FILLED",
            OrderStatus::Filled => "FILLED",
            OrderStatus::Cancelled => "CANCELLED",
            OrderStatus::Expired => "EXPIRED",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "CONFIRMED" => OrderStatus::Confirmed,
            "FAILED" => OrderStatus::Failed,
            "OPEN" => OrderStatus::Open,
            "PARTIALLY_FILLED" => OrderStatus::PartiallyFilled,
            "FILLED" => OrderStatus::Filled,
            "CANCELLED" => OrderStatus::Cancelled,
            "EXPIRED" => OrderStatus::Expired,
            _ => return None,
        })
    }

    /// Whether a reserved order in this status still holds (and may be filled or cancelled).
    pub fn is_open(self) -> bool {
        matches!(self, OrderStatus::Open | OrderStatus::PartiallyFilled)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// UUID v7.
    pub order_id: OrderId,
    pub user_id: UserId,
    pub side: TradeSide,
    pub asset: AssetSymbol,
    pub quantity: Quantity,
    pub limit_price: Option<Price>,
    pub status: OrderStatus,
    /// The catalog price used (or seen, for a refused order).
    pub price: Price,
    /// quantity x price in USD, rounded to the cent against the customer (a buy up, a sell
    /// down).
    pub total: Usd,
    pub failure_reason: Option<String>,
    pub created_at_ms: Millis,
    /// Who placed it: the authenticated caller (`local` without authentication).
    pub principal: Principal,
    /// For reserved orders: how much was filled, and when the hold expires.
    pub filled_quantity: Quantity,
    pub expires_at_ms: Option<Millis>,
}

impl Order {
    /// The status as it stands at `now`: an open reserved order past its expiry is EXPIRED,
    /// whether or not the sweeper has written that yet.
    pub fn status_at(&self, now: Millis) -> OrderStatus {
        match self.expires_at_ms {
            Some(expires_at) if self.status.is_open() && now >= expires_at => OrderStatus::Expired,
            _ => self.status,
        }
    }
}

/// How a withdrawal made with settlement PENDING stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithdrawalStatus {
    /// Its amount is on hold: counted against the day's limit, not yet gone.
    Pending,
    /// SettleWithdrawal: the cash left.
    Settled,
    /// ReturnWithdrawal: nothing left; the day's total was given back.
    Returned,
}

impl WithdrawalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WithdrawalStatus::Pending => "PENDING",
            WithdrawalStatus::Settled => "SETTLED",
            WithdrawalStatus::Returned => "RETURNED",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "PENDING" => WithdrawalStatus::Pending,
            "SETTLED" => WithdrawalStatus::Settled,
            "RETURNED" => WithdrawalStatus::Returned,
            _ => return None,
        })
    }
}

/// A withdrawal made with settlement PENDING, as its record keeps it (under its user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withdrawal {
    pub withdrawal_id: WithdrawalId,
    pub user_id: UserId,
    pub amount: Usd,
    pub status: WithdrawalStatus,
    /// Why it was returned (ReturnWithdrawal's reason); None otherwise.
    pub reason: Option<String>,
    /// The UTC day its amount counted against the daily withdrawal limit.
    pub day: UtcDay,
    pub created_at_ms: Millis,
    /// Who asked for it.
    pub principal: Principal,
}

/// What an idempotency key's first execution ended in, written in the same transaction as its
/// effects (or its rollback), so a retry finds either both or neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The operation and its parameters, e.g. `DEPOSIT 100.00`: a retry must match it.
    pub fingerprint: String,
    pub outcome: RecordedOutcome,
    /// Seconds since the epoch after which the record may be deleted (DynamoDB TTL).
    pub expires_at_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedOutcome {
    /// Committed: the ledger entry, and for trades the order and the holding after.
    Committed {
        entry_id: EntryId,
        /// The entry's sequence, which keys it; None in records written before sequences
        /// (their entry is keyed by its id).
        entry_sequence: Option<u64>,
        order_id: Option<OrderId>,
        holding: Option<Quantity>,
    },
    /// Refused under the lease with this message and code; nothing else written except, for
    /// trades, the FAILED order. A retry gets the same code and message.
    Refused { message: String, code: RefusalCode },
}

/// The status a recorded refusal answered with, and answers again on replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    /// A business rule (FAILED_PRECONDITION).
    FailedPrecondition,
    /// The account does not exist (NOT_FOUND).
    NotFound,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asset {
    pub symbol: AssetSymbol,
    pub price: Price,
    pub active: bool,
}
