//! What a decision produces: the account's next state (`Decision`), or why the operation is
//! refused (`Rejection`). Every operation of `ops` decides into these; `Account::apply` and
//! `storage::model` consume them.

use rust_decimal::Decimal;

use super::account::{Hold, Holds, PendingWithdrawal, PendingWithdrawals};
use super::ids::{AssetSymbol, OrderId, WithdrawalId};
use super::money::{Price, Quantity, Usd, UsdDelta};
use super::records::OrderStatus;
use super::records::WithdrawalStatus;
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
    /// For trades and fills: the traded asset, its new holding, the signed change and the cash
    /// total.
    pub trade: Option<TradeEffect>,
    /// For reserves, fills and cancels: the account's holds after, and what changed.
    pub hold: Option<HoldEffect>,
    /// For pending withdrawals, settlements and returns: the pending withdrawals after, and the
    /// withdrawal as it now stands.
    pub withdrawal: Option<WithdrawalEffect>,
}

/// What a withdrawal decision changes besides cash and the daily totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithdrawalEffect {
    pub withdrawals: PendingWithdrawals,
    /// The withdrawal, its figures, and its status after the decision.
    pub withdrawal_id: WithdrawalId,
    pub pending: PendingWithdrawal,
    pub status: WithdrawalStatus,
    /// Why it was returned.
    pub reason: Option<String>,
    /// The signed change of cash on hold.
    pub held_delta: Decimal,
    /// A new withdrawal (its record is written fresh).
    pub fresh: bool,
}

/// What a hold decision changes besides cash and holdings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldEffect {
    pub order_id: OrderId,
    /// Every open hold of the account after the decision (expired ones dropped).
    pub holds: Holds,
    /// The order's hold after the decision; for one that closed, its last state.
    pub hold: Hold,
    /// The order's status after the decision.
    pub status: OrderStatus,
    pub fill_id: Option<String>,
    /// Which amount on hold moved (None: cash) and by how much (signed).
    pub held_asset: Option<AssetSymbol>,
    pub held_delta: Decimal,
    /// A new order (a reserve): its items are written fresh.
    pub fresh: bool,
    /// The account's holding of the order's asset after the decision.
    pub holding: Quantity,
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
    /// A fill or cancel of a reserved order that no longer holds.
    #[error("Order {order_id} is {}", status.as_str())]
    OrderNotOpen { order_id: OrderId, status: OrderStatus },
    #[error("Order {order_id} expired at {at}")]
    OrderExpired { order_id: OrderId, at: String },
    #[error("Fill quantity {requested} exceeds the {remaining} that remains of the order")]
    FillTooLarge { remaining: Quantity, requested: Quantity },
    #[error(
        "Too many open holds on the account (at most {maximum}): orders to fill, cancel or let expire (the sweeper releases expired ones), withdrawals to settle or return"
    )]
    TooManyHolds { maximum: usize },
    /// A settlement or return of a withdrawal that already ended.
    #[error("Withdrawal {withdrawal_id} is {}", status.as_str())]
    WithdrawalNotPending {
        withdrawal_id: super::ids::WithdrawalId,
        status: super::records::WithdrawalStatus,
    },
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
            Rejection::OrderNotOpen { .. } => "order_not_open",
            Rejection::OrderExpired { .. } => "order_expired",
            Rejection::FillTooLarge { .. } => "fill_too_large",
            Rejection::TooManyHolds { .. } => "too_many_holds",
            Rejection::WithdrawalNotPending { .. } => "withdrawal_not_pending",
        }
    }
}
