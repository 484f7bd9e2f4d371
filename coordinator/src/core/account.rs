//! A user's account as read under the lease: the only state a decision looks at.

use std::collections::BTreeMap;

use super::decide::Decision;
use super::ids::AssetSymbol;
use super::money::{Quantity, Usd};

/// Asset holdings, ordered by symbol. A missing symbol holds zero.
pub type Holdings = BTreeMap<AssetSymbol, Quantity>;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Account {
    /// False until the first committed deposit: the item may exist only because a lease was taken.
    pub exists: bool,
    pub cash: Usd,
    pub holdings: Holdings,
    /// The UTC day (`YYYY-MM-DD`) that `deposited_today` and `withdrawn_today` count.
    pub limit_day: String,
    pub deposited_today: Usd,
    pub withdrawn_today: Usd,
    /// Bumped by every commit; a commit is conditioned on the version it decided on.
    pub version: u64,
}

impl Account {
    pub fn holding(&self, asset: &AssetSymbol) -> Quantity {
        self.holdings.get(asset).copied().unwrap_or(Quantity::ZERO)
    }

    /// The account after a committed `decision`: every field the commit writes.
    pub fn apply(&mut self, decision: &Decision) {
        self.exists = true;
        self.cash = decision.cash;
        self.limit_day = decision.limit_day.clone();
        self.deposited_today = decision.deposited_today;
        self.withdrawn_today = decision.withdrawn_today;
        if let Some(effect) = &decision.trade {
            self.holdings.insert(effect.asset.clone(), effect.holding);
        }
    }

    /// Deposited and withdrawn totals as they count on `day`: zero when the stored day is older.
    pub fn daily_totals(&self, day: &str) -> (Usd, Usd) {
        if self.limit_day == day {
            (self.deposited_today, self.withdrawn_today)
        } else {
            (Usd::ZERO, Usd::ZERO)
        }
    }
}
