//! Per-user daily limits, checked under the lease on the account read with it, and the smallest
//! order value, checked with the order.

use super::money::{ORDER_VALUE_USD_MIN, Usd};
use rust_decimal::Decimal;

/// Default total of deposits per user per UTC day, in USD.
pub const DAILY_DEPOSIT_USD_DEFAULT: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 2);
/// Default total of withdrawals per user per UTC day, in USD.
pub const DAILY_WITHDRAWAL_USD_DEFAULT: Decimal = Decimal::from_parts(500_000, 0, 0, false, 2);
/// Default total of transfers a user sends per UTC day, in USD: as much as may leave by
/// withdrawal, so paying another account is no way around the withdrawal limit's size.
pub const DAILY_TRANSFER_USD_DEFAULT: Decimal = Decimal::from_parts(500_000, 0, 0, false, 2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub daily_deposit: Usd,
    pub daily_withdrawal: Usd,
    /// Total a user may send by Transfer per UTC day (`--daily-transfer-limit`).
    pub daily_transfer: Usd,
    /// The smallest total a buy or sell may have, after rounding (`--min-order-value`); at least
    /// 0.01, so no order ever executes for nothing.
    pub order_value_min: Usd,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            daily_deposit: Usd::from_decimal(DAILY_DEPOSIT_USD_DEFAULT),
            daily_withdrawal: Usd::from_decimal(DAILY_WITHDRAWAL_USD_DEFAULT),
            daily_transfer: Usd::from_decimal(DAILY_TRANSFER_USD_DEFAULT),
            order_value_min: Usd::from_decimal(ORDER_VALUE_USD_MIN),
        }
    }
}
