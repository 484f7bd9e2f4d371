//! What a decision produces: the account's next state (`Decision`), or why the operation is
//! refused (`Rejection`). Every operation of `ops` decides into these; `Account::apply` and
//! `storage::model` consume them.

use rust_decimal::Decimal;

use super::ids::AssetSymbol;
use super::money::{Price, Quantity, Usd, UsdDelta};
use super::time::UtcDay;

/// What a committed operation changes. Every field is the new absolute value, so the commit
/// writes exactly what was decided on the account version it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub cash: Usd,
    /// Signed change of cash: the ledger entry's amount.
    pub cash_delta: UsdDelta,
    pub limit_day: UtcDay,
    pub deposited_today: Usd,
    pub withdrawn_today: Usd,
    pub transferred_today: Usd,
    /// For trades: the traded asset, its new holding, the signed change and the cash total.
    pub trade: Option<TradeEffect>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TradeEffect {
    pub asset: AssetSymbol,
    pub holding: Quantity,
    pub quantity_delta: Decimal,
    pub price: Price,
    pub total: Usd,
}

/// Why a well-formed operation is refused. Each is FAILED_PRECONDITION on the wire, except
/// `AccountNotFound`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("Account not found")]
    AccountNotFound,
    #[error("Insufficient balance. Current: ${current}, Required: ${required}")]
    InsufficientBalance { current: Usd, required: Usd },
    #[error("Insufficient holdings of {asset}. Current: {current}, Required: {required}")]
    InsufficientHoldings {
        asset: AssetSymbol,
        current: Quantity,
        required: Quantity,
    },
    #[error("Daily {kind} limit exceeded. Limit: ${limit}, Used today: ${used}, Requested: ${requested}")]
    DailyLimitExceeded {
        kind: &'static str,
        limit: Usd,
        used: Usd,
        requested: Usd,
    },
    /// One amount above the whole daily limit: refused before the lease, whatever the account.
    #[error("Daily {kind} limit exceeded. Limit: ${limit}, Requested: ${requested}")]
    AboveDailyLimit {
        kind: &'static str,
        limit: Usd,
        requested: Usd,
    },
    #[error("Asset {0} is not active")]
    AssetInactive(AssetSymbol),
    #[error("Price ${price} is above the limit price ${limit}")]
    PriceAboveLimit { price: Price, limit: Price },
    #[error("Price ${price} is below the limit price ${limit}")]
    PriceBelowLimit { price: Price, limit: Price },
    #[error("Order total ${total} exceeds the maximum of ${maximum}")]
    OrderValueTooLarge { total: Usd, maximum: Usd },
    #[error("Order total ${total} is below the minimum of ${minimum}")]
    OrderValueTooSmall { total: Usd, minimum: Usd },
    #[error("Resulting balance is out of range")]
    OutOfRange,
}

impl Rejection {
    /// Whether the refusal rests on the asset's price or active flag, which a cached catalog
    /// may have stale.
    pub fn depends_on_catalog(&self) -> bool {
        matches!(
            self,
            Rejection::AssetInactive(_)
                | Rejection::PriceAboveLimit { .. }
                | Rejection::PriceBelowLimit { .. }
                | Rejection::OrderValueTooLarge { .. }
                | Rejection::OrderValueTooSmall { .. }
                | Rejection::InsufficientBalance { .. }
        )
    }

    /// The refusal's rule, as the `rule` label of `lockstep_refusals_total`.
    pub fn rule(&self) -> &'static str {
        match self {
            Rejection::AccountNotFound => "account_not_found",
            Rejection::InsufficientBalance { .. } => "insufficient_balance",
            Rejection::InsufficientHoldings { .. } => "insufficient_holdings",
            Rejection::DailyLimitExceeded { .. } => "daily_limit_exceeded",
            Rejection::AssetInactive(_) => "asset_inactive",
            Rejection::PriceAboveLimit { .. } => "price_above_limit",
            Rejection::PriceBelowLimit { .. } => "price_below_limit",
            Rejection::OrderValueTooLarge { .. } => "order_value_too_large",
            Rejection::OrderValueTooSmall { .. } => "order_value_too_small",
            Rejection::AboveDailyLimit { .. } => "above_daily_limit",
            Rejection::OutOfRange => "out_of_range",
        }
    }
}
