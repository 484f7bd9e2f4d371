//! A user's account as read under the lease: the only state a decision looks at.

use std::collections::BTreeMap;

use super::decision::Decision;
use super::ids::AssetSymbol;
use super::money::{Quantity, Usd};
use super::time::UtcDay;

/// Asset holdings, ordered by symbol. A missing symbol holds zero.
pub type Holdings = BTreeMap<AssetSymbol, Quantity>;

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
}

impl Account {
    /// Whether the account is open (the first deposit committed).
    pub fn exists(&self) -> bool {
        self.state == AccountState::Open
    }

    pub fn holding(&self, asset: &AssetSymbol) -> Quantity {
        self.holdings.get(asset).copied().unwrap_or(Quantity::ZERO)
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
