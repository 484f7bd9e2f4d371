//! PlaceBuy and PlaceSell: a trade at the catalog price, executed at once. The request is
//! validated before the lease; the catalog's quote (price and active flag) is an explicit input of
//! the decision, and the commit is conditioned on that price still being the catalog's.

use rust_decimal::Decimal;

use crate::core::account::Account;
use crate::core::decision::{Decision, Rejection, TradeEffect};
use crate::core::ids::{AssetSymbol, OrderId, UserId};
use crate::core::limits::Limits;
use crate::core::money::{ORDER_VALUE_USD_MAX, Price, Quantity, Usd, UsdDelta};
use crate::core::principal::Principal;
pub use crate::core::records::TradeSide;
use crate::core::records::{EntryKind, LedgerTrade, Order, OrderStatus};
use crate::core::time::Millis;

/// The names of the two sides in leases, logs, metrics and request records.
pub const BUY: &str = "BUY";
pub const SELL: &str = "SELL";

/// A validated trade request, before the catalog price is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TradeRequest {
    pub side: TradeSide,
    pub asset: AssetSymbol,
    pub quantity: Quantity,
    pub limit_price: Option<Price>,
}

/// The catalog entry a trade is decided at: the price its commit is conditioned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quote {
    pub price: Price,
    pub active: bool,
}

impl TradeRequest {
    /// `BUY` or `SELL`: the name in leases, logs, metrics and request records.
    pub fn name(&self) -> &'static str {
        match self.side {
            TradeSide::Buy => BUY,
            TradeSide::Sell => SELL,
        }
    }

    /// `BUY 0.5 SOL limit 140`: a retry with the same request id must match it exactly.
    pub fn fingerprint(&self) -> String {
        let limit = self
            .limit_price
            .map(|limit| format!(" limit {limit}"))
            .unwrap_or_default();
        format!("{} {} {}{limit}", self.name(), self.quantity, self.asset)
    }

    /// The ledger entry a committed trade writes.
    pub fn entry_kind(&self) -> EntryKind {
        match self.side {
            TradeSide::Buy => EntryKind::Buy,
            TradeSide::Sell => EntryKind::Sell,
        }
    }
}

/// The cash a trade of `quantity` moves at `price`, rounded to the cent against the customer: a
/// buy's cost rounds up (`Price::cost_of`), a sell's proceeds round down (`Price::proceeds_of`).
/// None when the product overflows.
pub fn total(side: TradeSide, quantity: Quantity, price: Price) -> Option<Usd> {
    match side {
        TradeSide::Buy => price.cost_of(quantity),
        TradeSide::Sell => price.proceeds_of(quantity),
    }
}

/// Decides `trade` at `quote` on `account` (as `unchanged` describes its cash and daily totals).
pub fn decide(
    account: &Account,
    trade: &TradeRequest,
    quote: &Quote,
    now: Millis,
    limits: &Limits,
    unchanged: Decision,
) -> Result<Decision, Rejection> {
    let effect = effect(account, trade, quote, now, limits)?;
    let (cash, cash_delta) = match trade.side {
        TradeSide::Buy => (account.cash.checked_sub(effect.total), UsdDelta::debit(effect.total)),
        TradeSide::Sell => (account.cash.checked_add(effect.total), UsdDelta::credit(effect.total)),
    };
    Ok(Decision {
        cash: cash.ok_or(Rejection::OutOfRange)?,
        cash_delta,
        trade: Some(effect),
        hold: None,
        ..unchanged
    })
}

fn effect(
    account: &Account,
    trade: &TradeRequest,
    quote: &Quote,
    now: Millis,
    limits: &Limits,
) -> Result<TradeEffect, Rejection> {
    if !quote.active {
        return Err(Rejection::AssetInactive(trade.asset.clone()));
    }
    match (trade.side, trade.limit_price) {
        (TradeSide::Buy, Some(limit)) if quote.price > limit => {
            return Err(Rejection::PriceAboveLimit {
                price: quote.price,
                limit,
            });
        }
        (TradeSide::Sell, Some(limit)) if quote.price < limit => {
            return Err(Rejection::PriceBelowLimit {
                price: quote.price,
                limit,
            });
        }
        _ => {}
    }
    let total = total(trade.side, trade.quantity, quote.price).ok_or(Rejection::OutOfRange)?;
    let maximum = Usd::from_decimal(ORDER_VALUE_USD_MAX);
    if total > maximum {
        return Err(Rejection::OrderValueTooLarge { total, maximum });
    }
    // Never below one cent, whatever the configured minimum: a sell whose proceeds round down
    // to 0.00 is refused, never executed for nothing.
    let minimum = limits.order_value_min.max(Usd::CENT);
    if total < minimum {
        return Err(Rejection::OrderValueTooSmall { total, minimum });
    }
    let current = account.holding(&trade.asset);
    let (holding, quantity_delta): (Option<Quantity>, Decimal) = match trade.side {
        TradeSide::Buy => {
            let available = account.available_cash(now);
            if available < total {
                return Err(Rejection::InsufficientBalance {
                    current: available,
                    required: total,
                });
            }
            (current.checked_add(trade.quantity), trade.quantity.decimal())
        }
        TradeSide::Sell => {
            let available = account.available_holding(&trade.asset, now);
            if available < trade.quantity {
                return Err(Rejection::InsufficientHoldings {
                    asset: trade.asset.clone(),
                    current: available,
                    required: trade.quantity,
                });
            }
            (current.checked_sub(trade.quantity), -trade.quantity.decimal())
        }
    };
    Ok(TradeEffect {
        asset: trade.asset.clone(),
        holding: holding.ok_or(Rejection::OutOfRange)?,
        quantity_delta,
        price: quote.price,
        total,
    })
}

/// A new order for `trade` of `user`, placed by `principal`, with a fresh time-ordered id.
pub fn order(
    user: &UserId,
    principal: &Principal,
    trade: &TradeRequest,
    status: OrderStatus,
    price: Price,
    total: Usd,
    now: Millis,
) -> Order {
    Order {
        order_id: OrderId::new(),
        user_id: user.clone(),
        side: trade.side,
        asset: trade.asset.clone(),
        quantity: trade.quantity,
        limit_price: trade.limit_price,
        status,
        price,
        total,
        failure_reason: None,
        created_at_ms: now,
        principal: principal.clone(),
        filled_quantity: match status {
            OrderStatus::Confirmed => trade.quantity,
            _ => Quantity::ZERO,
        },
        expires_at_ms: None,
    }
}

/// The CONFIRMED order of an executed trade and the trade part of its ledger entry.
pub fn executed(
    user: &UserId,
    principal: &Principal,
    trade: &TradeRequest,
    effect: &TradeEffect,
    now: Millis,
) -> (Order, LedgerTrade) {
    let order = order(
        user,
        principal,
        trade,
        OrderStatus::Confirmed,
        effect.price,
        effect.total,
        now,
    );
    let ledger_trade = LedgerTrade {
        asset: effect.asset.clone(),
        quantity_delta: effect.quantity_delta,
        order_id: order.order_id.clone(),
        holding_after: Some(effect.holding),
    };
    (order, ledger_trade)
}

/// The FAILED order that records a refused trade, at the quote it was refused at.
pub fn failed(
    user: &UserId,
    principal: &Principal,
    trade: &TradeRequest,
    quote: &Quote,
    rejection: &Rejection,
    now: Millis,
) -> Order {
    let total = total(trade.side, trade.quantity, quote.price).unwrap_or(Usd::ZERO);
    let mut order = order(user, principal, trade, OrderStatus::Failed, quote.price, total, now);
    order.failure_reason = Some(rejection.to_string());
    order
}
