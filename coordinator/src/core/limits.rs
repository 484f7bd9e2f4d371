//! Per-user daily limits, checked under the lease on the account read with it.

use super::money::Usd;
use rust_decimal::Decimal;

/// Default total of deposits per user per UTC day, in USD.
pub const DAILY_DEPOSIT_USD_DEFAULT: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 2);
/// Default total of withdrawals per user per UTC day, in USD.
pub const DAILY_WITHDRAWAL_USD_DEFAULT: Decimal = Decimal::from_parts(500_000, 0, 0, false, 2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub daily_deposit: Usd,
    pub daily_withdrawal: Usd,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            daily_deposit: Usd::from_decimal(DAILY_DEPOSIT_USD_DEFAULT),
            daily_withdrawal: Usd::from_decimal(DAILY_WITHDRAWAL_USD_DEFAULT),
        }
    }
}
