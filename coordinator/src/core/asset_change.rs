//! UpsertAsset's guard and history: a price cannot move by more than a bound in one call
//! without `force`, and every change is kept (who, when, old, new).

use std::fmt;

use rust_decimal::Decimal;

use super::ids::AssetSymbol;
use super::money::Price;
use super::principal::Principal;
use super::records::Asset;
use super::time::Millis;

/// Default of --price-change-max-percent: a fat-fingered price (an extra or a missing digit) is
/// a 90 % or 900 % move; real moves within one admin call stay well under half.
pub const PRICE_CHANGE_MAX_PERCENT_DEFAULT: u32 = 50;

/// One kept change of the catalog, written in the same transaction as the asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetChange {
    /// UUID v7: the history of a symbol reads newest first by key.
    pub change_id: String,
    pub symbol: AssetSymbol,
    pub principal: Principal,
    pub changed_at_ms: Millis,
    /// The asset before the change; None when the call created it.
    pub old: Option<Asset>,
    pub new: Asset,
    /// Whether the call set `force` (needed for a move beyond the bound).
    pub forced: bool,
}

/// A price move beyond the bound, refused without `force` (FAILED_PRECONDITION).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceChangeTooLarge {
    pub symbol: AssetSymbol,
    pub old: Price,
    pub new: Price,
    /// The move in percent of the old price, rounded to 2 decimals.
    pub percent: Decimal,
    pub max_percent: u32,
}

impl fmt::Display for PriceChangeTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Price change of {} from ${} to ${} is {}%, above the maximum of {}% in one call (--price-change-max-percent); set force to apply it",
            self.symbol, self.old, self.new, self.percent, self.max_percent
        )
    }
}

/// Whether moving `old` to `new` stays within `max_percent` of `old`, or `force` allows it.
pub fn check_price_change(
    symbol: &AssetSymbol,
    old: Price,
    new: Price,
    max_percent: u32,
    force: bool,
) -> Result<(), PriceChangeTooLarge> {
    let (old_price, new_price) = (old.decimal(), new.decimal());
    let moved = (new_price - old_price).abs();
    // Compared without dividing: |new - old| * 100 <= old * max; prices are positive and at
    // most 24 characters, far from Decimal's 28 digits times 100.
    let within = moved * Decimal::ONE_HUNDRED <= old_price * Decimal::from(max_percent);
    if within || force {
        return Ok(());
    }
    let percent = (moved * Decimal::ONE_HUNDRED / old_price).round_dp(2).normalize();
    Err(PriceChangeTooLarge {
        symbol: symbol.clone(),
        old,
        new,
        percent,
        max_percent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(raw: &str) -> Price {
        Price::parse("price", raw).unwrap()
    }

    /// Exactly the bound passes; beyond it is refused with the figures unless forced.
    #[test]
    fn moves_beyond_the_bound_need_force() {
        let btc = AssetSymbol::parse("asset", "BTC").unwrap();
        assert!(check_price_change(&btc, price("100"), price("150"), 50, false).is_ok());
        assert!(check_price_change(&btc, price("100"), price("50"), 50, false).is_ok());
        let refused = check_price_change(&btc, price("100"), price("150.01"), 50, false).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "Price change of BTC from $100 to $150.01 is 50.01%, above the maximum of 50% in one call (--price-change-max-percent); set force to apply it"
        );
        assert!(check_price_change(&btc, price("100"), price("1000"), 50, true).is_ok());
        assert!(check_price_change(&btc, price("100"), price("10"), 50, false).is_err());
    }
}
