//! A user's account as read under the lease: the only state a decision looks at.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::decision::Decision;
use super::ids::{AssetSymbol, OrderId, WithdrawalId};
use super::money::{Price, Quantity, Usd};
use super::principal::Principal;
use super::records::TradeSide;
use super::time::{Millis, UtcDay};

/// Asset holdings, ordered by symbol. A missing symbol holds zero.
pub type Holdings = BTreeMap<AssetSymbol, Quantity>;

/// The open holds of an account, by the id of the reserved order each covers.
pub type Holds = BTreeMap<OrderId, Hold>;

/// Pending withdrawals of an account, by id: each holds its amount of cash until it is settled
/// or returned (they do not expire: a bank answers days later).
pub type PendingWithdrawals = BTreeMap<WithdrawalId, PendingWithdrawal>;

/// A withdrawal made with settlement PENDING, as the account keeps it until it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWithdrawal {
    pub amount: Usd,
    /// The UTC day its amount counted against the daily withdrawal limit (given back on that
    /// day if it is returned).
    pub day: UtcDay,
    pub created_at_ms: Millis,
    pub principal: Principal,
}

/// Most open holds one account keeps (reserved orders and pending withdrawals together): they live on the account item (so every decision sees
/// them under the same version condition as the balance), whose size DynamoDB bounds.
pub const HOLDS_PER_ACCOUNT_MAX: usize = 100;

/// A reserved order's hold, kept on the account until the order is filled, cancelled or
/// expired: everything a fill or a cancel decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub side: TradeSide,
    pub asset: AssetSymbol,
    pub quantity: Quantity,
    pub limit: Price,
    /// Filled so far, and the exact value of those fills (sum of quantity x price, unrounded).
    pub filled: Quantity,
    pub filled_value: Decimal,
    /// Cash moved by the fills so far: the filled value rounded once against the customer (a
    /// buy's cost up, a sell's proceeds down), so splitting an order into fills never gains or
    /// loses a cent against one fill of the whole.
    pub moved: Usd,
    pub expires_at_ms: Millis,
    pub created_at_ms: Millis,
    /// Who reserved it: its order carries it.
    pub principal: Principal,
}

impl Hold {
    /// Still held at `now`: from `expires_at` on it no longer counts, swept or not.
    pub fn is_live(&self, now: Millis) -> bool {
        now < self.expires_at_ms
    }

    pub fn remaining(&self) -> Quantity {
        self.quantity
            .checked_sub(self.filled)
            .expect("a hold never fills more than its quantity")
    }

    /// The cash a buy holds: what the rest would cost at the limit, on top of the fills so far,
    /// rounded up once: `ceil(filled_value + remaining x limit) - moved`. Zero for a sell.
    pub fn cash_held(&self) -> Usd {
        match self.side {
            TradeSide::Sell => Usd::ZERO,
            TradeSide::Buy => {
                let rest = self.limit.decimal() * self.remaining().decimal();
                let whole = Usd::ceil(self.filled_value + rest);
                whole
                    .checked_sub(self.moved)
                    .expect("a buy's hold covers at least what its fills moved")
            }
        }
    }

    /// The quantity of `asset` a sell holds: what remains to sell. Zero for a buy.
    pub fn quantity_held(&self) -> Quantity {
        match self.side {
            TradeSide::Buy => Quantity::ZERO,
            TradeSide::Sell => self.remaining(),
        }
    }
}

/// Whether a user has an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccountState {
    /// No account: no item, or an item that holds only a lease (a first deposit in flight).
    #[default]
    Missing,
    /// Opened by the first committed deposit.
    Open,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Account {
    pub state: AccountState,
    pub cash: Usd,
    pub holdings: Holdings,
    /// The UTC day that `deposited_today` and `withdrawn_today` count; None before any count.
    pub limit_day: Option<UtcDay>,
    pub deposited_today: Usd,
    pub withdrawn_today: Usd,
    /// Sent by Transfer on `limit_day`.
    pub transferred_today: Usd,
    /// Bumped by every commit; a commit is conditioned on the version it decided on.
    pub version: u64,
    /// The sequence of the account's last ledger entry: its entries are numbered 1, 2, 3 …
    /// with no gaps, each in the transaction that moves its money.
    pub entries: u64,
    /// True when the stored item was last written by a coordinator that did not number its
    /// entries (a version before sequences, or during a rolling upgrade): `entries` may not
    /// count them all, so they are numbered under the lease before anything else commits
    /// (`service::numbering`).
    pub needs_numbering: bool,
    /// The highest place given to an entry written before sequences (0: none): those entries
    /// stay under their id keys, so a read after a cursor below it merges them in.
    pub legacy_through: u64,
    /// Open holds of reserved orders (expired ones stay until a hold decision or the sweeper
    /// drops them, and count for nothing meanwhile).
    pub holds: Holds,
    /// Withdrawals waiting to settle: their amounts are on hold.
    pub withdrawals: PendingWithdrawals,
}

impl Account {
    /// Whether the account is open (the first deposit committed).
    pub fn exists(&self) -> bool {
        self.state == AccountState::Open
    }

    pub fn holding(&self, asset: &AssetSymbol) -> Quantity {
        self.holdings.get(asset).copied().unwrap_or(Quantity::ZERO)
    }

    /// The holds that count at `now`.
    pub fn live_holds(&self, now: Millis) -> impl Iterator<Item = (&OrderId, &Hold)> {
        self.holds.iter().filter(move |(_, hold)| hold.is_live(now))
    }

    /// Cash on hold at `now`: the live holds of buys and the pending withdrawals.
    pub fn cash_on_hold(&self, now: Millis) -> Usd {
        let orders: Decimal = self.live_holds(now).map(|(_, hold)| hold.cash_held().decimal()).sum();
        let withdrawals: Decimal = self.withdrawals.values().map(|pending| pending.amount.decimal()).sum();
        Usd::from_decimal(orders + withdrawals)
    }

    /// Open holds at `now`, orders and withdrawals: bounded by `HOLDS_PER_ACCOUNT_MAX`.
    pub fn open_holds(&self, now: Millis) -> usize {
        self.live_holds(now).count() + self.withdrawals.len()
    }

    /// `asset` on hold at `now`: the sum of the live holds of sells of it.
    pub fn holding_on_hold(&self, asset: &AssetSymbol, now: Millis) -> Quantity {
        Quantity::from_decimal(
            self.live_holds(now)
                .filter(|(_, hold)| hold.asset == *asset)
                .map(|(_, hold)| hold.quantity_held().decimal())
                .sum(),
        )
    }

    /// Cash that may be spent at `now`: total less what is on hold, never below zero.
    ///
    /// On hold never exceeds the total by this coordinator's clock, but clocks differ (within
    /// `CLOCK_SKEW_MAX`): a coordinator ahead may have let an expired hold's cash be spent while
    /// one behind still counts the hold. Then nothing is available here, and nothing fails.
    pub fn available_cash(&self, now: Millis) -> Usd {
        self.cash
            .checked_sub(self.cash_on_hold(now))
            .unwrap_or_else(|| Usd::from_decimal(Decimal::ZERO))
    }

    /// `asset` that may be sold or held at `now`: the holding less what is on hold, never
    /// below zero (see `available_cash`).
    pub fn available_holding(&self, asset: &AssetSymbol, now: Millis) -> Quantity {
        self.holding(asset)
            .checked_sub(self.holding_on_hold(asset, now))
            .unwrap_or(Quantity::ZERO)
    }

    /// Whether nothing is on hold beyond its total, at `now`.
    pub fn holds_within_totals(&self, now: Millis) -> bool {
        self.cash_on_hold(now) <= self.cash
            && self
                .live_holds(now)
                .all(|(_, hold)| self.holding_on_hold(&hold.asset, now) <= self.holding(&hold.asset))
    }

    /// Always on (TigerBeetle's paired assertions), after every decision and where an account
    /// is encoded: a change keeps what is on hold within the totals at `now`, if it was before
    /// (by a clock behind another coordinator's it may not have been: see `available_cash`).
    pub fn assert_holds_kept_within_totals(before: &Account, after: &Account, now: Millis) {
        if before.holds_within_totals(now) {
            assert!(
                after.holds_within_totals(now),
                "a change put more on hold than the totals: cash {} on hold {}",
                after.cash,
                after.cash_on_hold(now)
            );
        }
    }

    /// The account after a committed `decision`: every field the commit writes.
    pub fn apply(&mut self, decision: &Decision) {
        self.state = AccountState::Open;
        self.cash = decision.cash;
        self.limit_day = Some(decision.limit_day);
        self.deposited_today = decision.deposited_today;
        self.withdrawn_today = decision.withdrawn_today;
        self.transferred_today = decision.transferred_today;
        if let Some(effect) = &decision.trade {
            self.holdings.insert(effect.asset.clone(), effect.holding);
        }
        if let Some(effect) = &decision.hold {
            self.holds = effect.holds.clone();
        }
        if let Some(effect) = &decision.withdrawal {
            self.withdrawals = effect.withdrawals.clone();
        }
    }

    /// Deposited and withdrawn totals as they count on `day`: zero when the stored day is older.
    pub fn daily_totals(&self, day: UtcDay) -> (Usd, Usd) {
        if self.limit_day == Some(day) {
            (self.deposited_today, self.withdrawn_today)
        } else {
            (Usd::ZERO, Usd::ZERO)
        }
    }

    /// The total sent by Transfer as it counts on `day`: zero when the stored day is older.
    pub fn transferred_on(&self, day: UtcDay) -> Usd {
        if self.limit_day == Some(day) {
            self.transferred_today
        } else {
            Usd::ZERO
        }
    }
}
