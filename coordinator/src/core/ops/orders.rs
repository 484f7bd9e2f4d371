//! ReserveOrder, FillOrder and CancelOrder: an order routed to an exchange, filled there later,
//! in parts, or cancelled, or left to expire (TigerBeetle's pending transfers: post, void,
//! timeout; Stripe's authorize then capture).
//!
//! A reserve sets aside what the whole order may need: a buy holds `quantity x limit` of cash
//! (rounded up to the cent), a sell holds `quantity` of the asset. The hold lives on the
//! account item ([`Hold`]), so every decision on the account sees it under the same version
//! condition as the balance, and every check of a balance uses what is available
//! (total - on hold). A fill moves cash and the asset at its own price (which respects the
//! limit) and shrinks the hold to what the rest needs at the limit; a cancel releases the rest;
//! from `expires_at` on the hold counts for nothing, swept or not.
//!
//! Rounding is done once per order, not per fill: the cash an order has moved is its exact
//! filled value rounded against the customer (a buy's cost up, a sell's proceeds down), and a
//! fill moves the difference. So no split of an order into fills gains or loses a cent, a buy
//! never pays more than it held, and the hold after a fill is
//! `ceil(filled_value + remaining x limit) - moved`, which always covers what the fill moved
//! out of it (checked, always on).

use std::time::Duration;

use rust_decimal::Decimal;

use super::unchanged;
use crate::core::account::{Account, HOLDS_PER_ACCOUNT_MAX, Hold};
use crate::core::decision::{Decision, HoldEffect, Rejection, TradeEffect};
use crate::core::ids::{AssetSymbol, FieldError, OrderId, UserId};
use crate::core::limits::Limits;
use crate::core::money::{ORDER_VALUE_USD_MAX, Price, Quantity, Usd, UsdDelta};
use crate::core::principal::Principal;
use crate::core::records::{EntryKind, LedgerHold, LedgerTrade, Order, OrderStatus, TradeSide};
use crate::core::time::{Millis, rfc3339};

/// The names in leases, logs, metrics and request records.
pub const RESERVE: &str = "RESERVE";
pub const FILL: &str = "FILL";
pub const CANCEL: &str = "CANCEL";

/// Expiry of a reserved order: at least 1 s, 86,400 s (a day) unless given, at most 30 days.
pub const EXPIRES_IN_MIN: Duration = Duration::from_secs(1);
pub const EXPIRES_IN_DEFAULT: Duration = Duration::from_secs(86_400);
pub const EXPIRES_IN_MAX: Duration = Duration::from_secs(30 * 86_400);

/// Longest fill id: an exchange's execution id.
pub const FILL_ID_LENGTH_MAX: usize = 64;

/// A validated ReserveOrder. `order_id` and `placed_by` are given when the call arrives (a
/// retry with the same request id gets the first call's order from its record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    pub side: TradeSide,
    pub asset: AssetSymbol,
    pub quantity: Quantity,
    pub limit: Price,
    pub expires_in: Duration,
    pub order_id: OrderId,
    pub placed_by: Principal,
}

/// A validated FillOrder of `user`'s order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillRequest {
    pub order_id: OrderId,
    pub fill_id: String,
    pub quantity: Quantity,
    pub price: Price,
}

/// A validated CancelOrder of `user`'s order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    pub order_id: OrderId,
}

/// `expires_in_seconds` of a ReserveOrder: 0 means the default.
pub fn parse_expires_in(field: &'static str, seconds: u64) -> Result<Duration, FieldError> {
    if seconds == 0 {
        return Ok(EXPIRES_IN_DEFAULT);
    }
    let expires_in = Duration::from_secs(seconds);
    if expires_in < EXPIRES_IN_MIN || expires_in > EXPIRES_IN_MAX {
        return Err(FieldError::new(
            field,
            format!(
                "must be from {} to {} seconds (0 means {})",
                EXPIRES_IN_MIN.as_secs(),
                EXPIRES_IN_MAX.as_secs(),
                EXPIRES_IN_DEFAULT.as_secs()
            ),
        ));
    }
    Ok(expires_in)
}

/// A fill id: 1-64 characters from `[A-Za-z0-9._:-]`.
pub fn parse_fill_id(field: &'static str, raw: &str) -> Result<String, FieldError> {
    if raw.is_empty()
        || raw.len() > FILL_ID_LENGTH_MAX
        || !raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
    {
        return Err(FieldError::new(
            field,
            format!("is required: 1-{FILL_ID_LENGTH_MAX} characters from A-Z a-z 0-9 . _ : -"),
        ));
    }
    Ok(raw.to_owned())
}

impl ReserveRequest {
    pub fn name(&self) -> &'static str {
        RESERVE
    }

    /// `RESERVE BUY 0.5 SOL limit 140 for 86400s`: a retry with the same request id must match.
    pub fn fingerprint(&self) -> String {
        format!(
            "{RESERVE} {} {} {} limit {} for {}s",
            self.side.as_str(),
            self.quantity,
            self.asset,
            self.limit,
            self.expires_in.as_secs()
        )
    }
}

impl FillRequest {
    /// `FILL 0.2 at 139.5 of <order>`: a repeat of the same fill id must match it.
    pub fn fingerprint(&self) -> String {
        format!("{FILL} {} at {} of {}", self.quantity, self.price, self.order_id)
    }

    /// The request record key of the fill: a fill id applies once per order, whoever sends it
    /// and whatever request id comes with it. At most 5 + 36 + 1 + 64 = 106 characters, within
    /// a request id's 128.
    pub fn key(&self) -> crate::core::RequestId {
        crate::core::RequestId::for_fill(&self.order_id, &self.fill_id)
    }
}

impl CancelRequest {
    pub fn fingerprint(&self) -> String {
        format!("{CANCEL} {}", self.order_id)
    }
}

/// An order that no longer holds, as the decision needs it: why it cannot be filled or
/// cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosedOrder {
    pub status: OrderStatus,
    pub expires_at_ms: Option<Millis>,
}

impl ClosedOrder {
    pub fn of(order: &Order) -> Self {
        Self {
            status: order.status,
            expires_at_ms: order.expires_at_ms,
        }
    }
}

/// Most holds an account keeps, live or expired: an expired hold stays (counting for nothing)
/// until the sweeper releases it in storage with its RELEASE entry and its order EXPIRED, so
/// that every hold ends in the ledger exactly once. Twice the live bound leaves room for one
/// sweep interval of expiries.
pub const HOLDS_KEPT_MAX: usize = 2 * HOLDS_PER_ACCOUNT_MAX;

/// Decides a reserve on `account` at `now`: the asset must be active (`active`), the account
/// must have room for another hold, and what the order may need must be available.
pub fn decide_reserve(
    account: &Account,
    request: &ReserveRequest,
    active: bool,
    now: Millis,
    limits: &Limits,
) -> Result<Decision, Rejection> {
    if !active {
        return Err(Rejection::AssetInactive(request.asset.clone()));
    }
    let mut holds = account.holds.clone();
    if account.open_holds(now) >= HOLDS_PER_ACCOUNT_MAX || holds.len() >= HOLDS_KEPT_MAX {
        return Err(Rejection::TooManyHolds {
            maximum: HOLDS_PER_ACCOUNT_MAX,
        });
    }
    let value = request.limit.cost_of(request.quantity).ok_or(Rejection::OutOfRange)?;
    let maximum = Usd::from_decimal(ORDER_VALUE_USD_MAX);
    if value > maximum {
        return Err(Rejection::OrderValueTooLarge { total: value, maximum });
    }
    let minimum = limits.order_value_min.max(Usd::CENT);
    let proceeds = request
        .limit
        .proceeds_of(request.quantity)
        .ok_or(Rejection::OutOfRange)?;
    let smallest = match request.side {
        TradeSide::Buy => value,
        TradeSide::Sell => proceeds,
    };
    if smallest < minimum {
        return Err(Rejection::OrderValueTooSmall {
            total: smallest,
            minimum,
        });
    }
    let (held_asset, held_delta) = match request.side {
        TradeSide::Buy => {
            let available = account.available_cash(now);
            if available < value {
                return Err(Rejection::InsufficientBalance {
                    current: available,
                    required: value,
                });
            }
            (None, value.decimal())
        }
        TradeSide::Sell => {
            let available = account.available_holding(&request.asset, now);
            if available < request.quantity {
                return Err(Rejection::InsufficientHoldings {
                    asset: request.asset.clone(),
                    current: available,
                    required: request.quantity,
                });
            }
            (Some(request.asset.clone()), request.quantity.decimal())
        }
    };
    let hold = Hold {
        side: request.side,
        asset: request.asset.clone(),
        quantity: request.quantity,
        limit: request.limit,
        filled: Quantity::ZERO,
        filled_value: Decimal::ZERO,
        moved: Usd::from_decimal(Decimal::ZERO),
        expires_at_ms: now.saturating_add(request.expires_in.as_millis() as u64),
        created_at_ms: now,
        principal: request.placed_by.clone(),
    };
    holds.insert(request.order_id.clone(), hold.clone());
    Ok(Decision {
        hold: Some(HoldEffect {
            order_id: request.order_id.clone(),
            holds,
            hold,
            status: OrderStatus::Open,
            fill_id: None,
            held_asset,
            held_delta,
            fresh: true,
            holding: account.holding(&request.asset),
        }),
        ..unchanged(account, crate::core::UtcDay::of(now))
    })
}

/// The open hold of `order_id` on `account` at `now`, or why there is none: the order closed
/// (`closed`, as read from storage or closed earlier in this batch) or expired.
fn open_hold<'a>(
    account: &'a Account,
    order_id: &OrderId,
    closed: Option<ClosedOrder>,
    now: Millis,
) -> Result<&'a Hold, Rejection> {
    let expired = |at: Millis| Rejection::OrderExpired {
        order_id: order_id.clone(),
        at: rfc3339(at),
    };
    match account.holds.get(order_id) {
        Some(hold) if hold.is_live(now) => Ok(hold),
        Some(hold) => Err(expired(hold.expires_at_ms)),
        None => match closed {
            Some(ClosedOrder {
                status,
                expires_at_ms: Some(at),
            }) if status.is_open() || status == OrderStatus::Expired => Err(expired(at)),
            Some(ClosedOrder { status, .. }) => Err(Rejection::OrderNotOpen {
                order_id: order_id.clone(),
                status,
            }),
            // The service reads every order it does not find open before deciding.
            None => Err(Rejection::OrderNotOpen {
                order_id: order_id.clone(),
                status: OrderStatus::Failed,
            }),
        },
    }
}

/// Decides a fill on `account` at `now`.
pub fn decide_fill(
    account: &Account,
    request: &FillRequest,
    closed: Option<ClosedOrder>,
    now: Millis,
) -> Result<Decision, Rejection> {
    let before = open_hold(account, &request.order_id, closed, now)?;
    let remaining = before.remaining();
    if request.quantity > remaining {
        return Err(Rejection::FillTooLarge {
            remaining,
            requested: request.quantity,
        });
    }
    match before.side {
        TradeSide::Buy if request.price > before.limit => {
            return Err(Rejection::PriceAboveLimit {
                price: request.price,
                limit: before.limit,
            });
        }
        TradeSide::Sell if request.price < before.limit => {
            return Err(Rejection::PriceBelowLimit {
                price: request.price,
                limit: before.limit,
            });
        }
        _ => {}
    }
    let value = request
        .price
        .exact_value(request.quantity)
        .ok_or(Rejection::OutOfRange)?;
    let mut after = before.clone();
    after.filled = before
        .filled
        .checked_add(request.quantity)
        .ok_or(Rejection::OutOfRange)?;
    after.filled_value = before.filled_value.checked_add(value).ok_or(Rejection::OutOfRange)?;
    after.moved = match before.side {
        TradeSide::Buy => Usd::ceil(after.filled_value),
        TradeSide::Sell => Usd::floor(after.filled_value),
    };
    // An order's fills are bounded as any order is: a sell's limit is only a floor, so a fill at
    // a wild price would otherwise credit any amount.
    let maximum = Usd::from_decimal(ORDER_VALUE_USD_MAX);
    if after.moved > maximum {
        return Err(Rejection::OrderValueTooLarge {
            total: after.moved,
            maximum,
        });
    }
    let moved = after
        .moved
        .checked_sub(before.moved)
        .expect("an order's cash moved only grows");
    let holding_before = account.holding(&before.asset);
    let (cash, cash_delta, holding, quantity_delta, held_asset, held_delta) = match before.side {
        TradeSide::Buy => {
            let (held_before, held_after) = (before.cash_held(), after.cash_held());
            // Always on: the fill is paid out of its own hold, so available never shrinks.
            assert!(
                held_before.decimal() - held_after.decimal() >= moved.decimal(),
                "a buy's fill is covered by its hold: held {held_before} -> {held_after}, paid {moved}"
            );
            (
                account.cash.checked_sub(moved),
                UsdDelta::debit(moved),
                holding_before.checked_add(request.quantity),
                request.quantity.decimal(),
                None,
                held_after.decimal() - held_before.decimal(),
            )
        }
        TradeSide::Sell => (
            account.cash.checked_add(moved),
            UsdDelta::credit(moved),
            holding_before.checked_sub(request.quantity),
            -request.quantity.decimal(),
            Some(before.asset.clone()),
            -request.quantity.decimal(),
        ),
    };
    let filled = after.remaining().is_zero();
    let mut holds = account.holds.clone();
    if filled {
        holds.remove(&request.order_id);
    } else {
        holds.insert(request.order_id.clone(), after.clone());
    }
    let holding = holding.ok_or(Rejection::OutOfRange)?;
    Ok(Decision {
        cash: cash.ok_or(Rejection::OutOfRange)?,
        cash_delta,
        trade: Some(TradeEffect {
            asset: before.asset.clone(),
            holding,
            quantity_delta,
            price: request.price,
            total: moved,
        }),
        hold: Some(HoldEffect {
            order_id: request.order_id.clone(),
            holds,
            hold: after,
            status: if filled {
                OrderStatus::Filled
            } else {
                OrderStatus::PartiallyFilled
            },
            fill_id: Some(request.fill_id.clone()),
            held_asset,
            held_delta,
            fresh: false,
            holding,
        }),
        ..unchanged(account, crate::core::UtcDay::of(now))
    })
}

/// Decides a cancel on `account` at `now`: releases what the order still holds.
pub fn decide_cancel(
    account: &Account,
    request: &CancelRequest,
    closed: Option<ClosedOrder>,
    now: Millis,
) -> Result<Decision, Rejection> {
    let hold = open_hold(account, &request.order_id, closed, now).map_err(|rejection| match rejection {
        // Cancelling an expired order names its status, as for any other closed one.
        Rejection::OrderExpired { order_id, .. } => Rejection::OrderNotOpen {
            order_id,
            status: OrderStatus::Expired,
        },
        other => other,
    })?;
    let (held_asset, held_delta) = match hold.side {
        TradeSide::Buy => (None, -hold.cash_held().decimal()),
        TradeSide::Sell => (Some(hold.asset.clone()), -hold.quantity_held().decimal()),
    };
    let mut holds = account.holds.clone();
    holds.remove(&request.order_id);
    Ok(Decision {
        hold: Some(HoldEffect {
            order_id: request.order_id.clone(),
            holds,
            hold: hold.clone(),
            status: OrderStatus::Cancelled,
            fill_id: None,
            held_asset,
            held_delta,
            fresh: false,
            holding: account.holding(&hold.asset),
        }),
        ..unchanged(account, crate::core::UtcDay::of(now))
    })
}

/// Releases, in storage, at most `max` holds of `account` that expired by `now`: one decision
/// each, in order of order id, each on the state the previous one left (the sweeper commits
/// them together). Nothing changes what is available: an expired hold already counted for
/// nothing.
pub fn decide_expiries(account: &Account, now: Millis, max: usize) -> Vec<Decision> {
    let mut running = account.clone();
    let expired: Vec<(OrderId, Hold)> = account
        .holds
        .iter()
        .filter(|(_, hold)| !hold.is_live(now))
        .take(max)
        .map(|(id, hold)| (id.clone(), hold.clone()))
        .collect();
    expired
        .into_iter()
        .map(|(order_id, hold)| {
            let mut holds = running.holds.clone();
            holds.remove(&order_id);
            let (held_asset, held_delta) = match hold.side {
                TradeSide::Buy => (None, -hold.cash_held().decimal()),
                TradeSide::Sell => (Some(hold.asset.clone()), -hold.quantity_held().decimal()),
            };
            let decision = Decision {
                hold: Some(HoldEffect {
                    order_id,
                    holds,
                    holding: running.holding(&hold.asset),
                    hold,
                    status: OrderStatus::Expired,
                    fill_id: None,
                    held_asset,
                    held_delta,
                    fresh: false,
                }),
                ..unchanged(&running, crate::core::UtcDay::of(now))
            };
            running.apply(&decision);
            decision
        })
        .collect()
}

/// The ledger entry kind of a hold decision.
pub fn entry_kind(effect: &HoldEffect) -> EntryKind {
    match (effect.fresh, effect.status) {
        (true, _) => EntryKind::Hold,
        (false, OrderStatus::Cancelled | OrderStatus::Expired) => EntryKind::Release,
        _ => EntryKind::Fill,
    }
}

/// The order of `user` as a hold decision leaves it.
pub fn order(user: &UserId, effect: &HoldEffect) -> Order {
    let hold = &effect.hold;
    Order {
        order_id: effect.order_id.clone(),
        user_id: user.clone(),
        side: hold.side,
        asset: hold.asset.clone(),
        quantity: hold.quantity,
        limit_price: Some(hold.limit),
        status: effect.status,
        price: hold.limit,
        total: hold.moved,
        failure_reason: None,
        created_at_ms: hold.created_at_ms,
        principal: hold.principal.clone(),
        filled_quantity: hold.filled,
        expires_at_ms: Some(hold.expires_at_ms),
    }
}

/// The hold part of the entry, and for a fill its trade part.
pub fn ledger_parts(decision: &Decision, effect: &HoldEffect) -> (LedgerHold, Option<LedgerTrade>) {
    let hold = LedgerHold {
        order_id: Some(effect.order_id.clone()),
        withdrawal_id: None,
        fill_id: effect.fill_id.clone(),
        asset: effect.held_asset.clone(),
        held_delta: effect.held_delta,
    };
    let trade = decision.trade.as_ref().map(|trade| LedgerTrade {
        asset: trade.asset.clone(),
        quantity_delta: trade.quantity_delta,
        order_id: effect.order_id.clone(),
        holding_after: Some(trade.holding),
    });
    (hold, trade)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::core::account::AccountState;
    use crate::core::ops::{Inputs, Operation, Quote, decide};

    const T0: Millis = 1_795_000_000_000;

    fn usd(raw: &str) -> Usd {
        Usd::parse_amount("amount", raw).unwrap()
    }

    fn quantity(raw: &str) -> Quantity {
        Quantity::parse_trade("quantity", raw).unwrap()
    }

    fn price(raw: &str) -> Price {
        Price::parse("price", raw).unwrap()
    }

    fn sol() -> AssetSymbol {
        AssetSymbol::parse("asset", "SOL").unwrap()
    }

    fn open(cash: &str, sol_held: &str) -> Account {
        let mut account = Account {
            state: AccountState::Open,
            cash: Usd::from_decimal(cash.parse().unwrap()),
            ..Account::default()
        };
        account
            .holdings
            .insert(sol(), Quantity::from_decimal(sol_held.parse().unwrap()));
        account
    }

    fn reserve(side: TradeSide, qty: &str, limit: &str, seconds: u64) -> Operation {
        Operation::Reserve(ReserveRequest {
            side,
            asset: sol(),
            quantity: quantity(qty),
            limit: price(limit),
            expires_in: Duration::from_secs(seconds),
            order_id: OrderId::new(),
            placed_by: Principal::local(),
        })
    }

    fn fill(order: &OrderId, id: &str, qty: &str, at: &str) -> Operation {
        Operation::Fill(FillRequest {
            order_id: order.clone(),
            fill_id: id.to_owned(),
            quantity: quantity(qty),
            price: price(at),
        })
    }

    fn cancel(order: &OrderId) -> Operation {
        Operation::Cancel(CancelRequest {
            order_id: order.clone(),
        })
    }

    fn quote() -> Quote {
        Quote {
            price: price("1"),
            active: true,
        }
    }

    fn run(account: &mut Account, operation: &Operation, now: Millis) -> Result<Decision, Rejection> {
        let quote = quote();
        let inputs = Inputs {
            quote: Some(&quote),
            ..Inputs::default()
        };
        let decision = decide(account, operation, inputs, now, &Limits::default())?;
        account.apply(&decision);
        Ok(decision)
    }

    fn order_of(operation: &Operation) -> OrderId {
        match operation {
            Operation::Reserve(reserve) => reserve.order_id.clone(),
            _ => unreachable!(),
        }
    }

    /// A buy holds quantity x limit rounded up; two fills below the limit pay their price and
    /// give the difference back to available; the hold is gone once filled.
    #[test]
    fn a_buy_is_held_then_filled_in_two_parts() {
        let mut account = open("1000", "0");
        let order = reserve(TradeSide::Buy, "3", "100.005", 60);
        let id = order_of(&order);
        let held = run(&mut account, &order, T0).unwrap();
        assert_eq!(held.cash_delta.decimal(), Decimal::ZERO);
        assert_eq!(account.cash_on_hold(T0), usd("300.02"));
        assert_eq!(account.available_cash(T0), usd("699.98"));
        let first = run(&mut account, &fill(&id, "f1", "1", "99.50"), T0 + 1).unwrap();
        assert_eq!(first.cash_delta.decimal(), Decimal::new(-9950, 2));
        assert_eq!(first.hold.as_ref().unwrap().status, OrderStatus::PartiallyFilled);
        // ceil(99.50 + 2 x 100.005) - 99.50 = 200.01
        assert_eq!(account.cash_on_hold(T0 + 1), usd("200.01"));
        assert_eq!(account.cash, usd("900.50"));
        let second = run(&mut account, &fill(&id, "f2", "2", "100.005"), T0 + 2).unwrap();
        assert_eq!(second.cash_delta.decimal(), Decimal::new(-20001, 2));
        assert_eq!(second.hold.as_ref().unwrap().status, OrderStatus::Filled);
        assert!(account.holds.is_empty());
        assert_eq!(account.holding(&sol()), quantity("3"));
        assert_eq!(account.cash, usd("700.49"));
        assert_eq!(account.cash_on_hold(T0 + 2), Usd::ZERO);
    }

    /// What is held cannot be spent twice: a withdrawal, a market buy and a second reserve all
    /// see only what is available; a sell's hold blocks selling the same units.
    #[test]
    fn held_money_cannot_be_spent_twice() {
        let mut account = open("100", "5");
        run(&mut account, &reserve(TradeSide::Buy, "1", "80", 60), T0).unwrap();
        let withdraw = run(&mut account, &Operation::Withdraw(usd("20.01")), T0);
        assert_eq!(
            withdraw.unwrap_err(),
            Rejection::InsufficientBalance {
                current: usd("20"),
                required: usd("20.01")
            }
        );
        let again = run(&mut account, &reserve(TradeSide::Buy, "1", "20.01", 60), T0);
        assert!(matches!(again, Err(Rejection::InsufficientBalance { .. })), "{again:?}");
        run(&mut account, &reserve(TradeSide::Sell, "4", "10", 60), T0).unwrap();
        let sell = run(&mut account, &reserve(TradeSide::Sell, "1.001", "10", 60), T0);
        assert_eq!(
            sell.unwrap_err(),
            Rejection::InsufficientHoldings {
                asset: sol(),
                current: quantity("1"),
                required: quantity("1.001")
            }
        );
    }

    /// The limit binds each fill, a fill cannot exceed what remains, and from expires_at on a
    /// fill is refused and the hold counts for nothing, swept or not; a cancel of a closed or
    /// expired order names its status.
    #[test]
    fn limits_remaining_and_expiry_are_exact() {
        let mut account = open("100", "5");
        let buy = reserve(TradeSide::Buy, "2", "10", 60);
        let buy_id = order_of(&buy);
        run(&mut account, &buy, T0).unwrap();
        let above = run(&mut account, &fill(&buy_id, "a", "1", "10.01"), T0);
        assert!(matches!(above, Err(Rejection::PriceAboveLimit { .. })), "{above:?}");
        let large = run(&mut account, &fill(&buy_id, "b", "2.001", "9"), T0);
        assert!(matches!(large, Err(Rejection::FillTooLarge { .. })), "{large:?}");
        let sell = reserve(TradeSide::Sell, "1", "10", 60);
        let sell_id = order_of(&sell);
        run(&mut account, &sell, T0).unwrap();
        let below = run(&mut account, &fill(&sell_id, "c", "1", "9.99"), T0);
        assert!(matches!(below, Err(Rejection::PriceBelowLimit { .. })), "{below:?}");
        let expiry = T0 + 60_000;
        assert_eq!(account.cash_on_hold(expiry - 1), usd("20"));
        assert_eq!(account.cash_on_hold(expiry), Usd::ZERO);
        assert_eq!(account.available_holding(&sol(), expiry), quantity("5"));
        let late = run(&mut account, &fill(&buy_id, "d", "1", "9"), expiry);
        assert!(
            matches!(&late, Err(Rejection::OrderExpired { at, .. }) if at == &crate::core::time::rfc3339(expiry)),
            "{late:?}"
        );
        let cancel_expired = run(&mut account, &cancel(&sell_id), expiry);
        assert!(
            matches!(
                cancel_expired,
                Err(Rejection::OrderNotOpen {
                    status: OrderStatus::Expired,
                    ..
                })
            ),
            "{cancel_expired:?}"
        );
        // A cancel releases; a second cancel names the status it was given.
        let other = reserve(TradeSide::Buy, "1", "10", 600);
        let other_id = order_of(&other);
        run(&mut account, &other, expiry).unwrap();
        let released = run(&mut account, &cancel(&other_id), expiry).unwrap();
        assert_eq!(released.hold.unwrap().held_delta, Decimal::new(-10, 0));
        let closed = Some(ClosedOrder {
            status: OrderStatus::Cancelled,
            expires_at_ms: Some(expiry + 600_000),
        });
        let twice = decide_cancel(&account, &CancelRequest { order_id: other_id }, closed, expiry);
        assert_eq!(twice.unwrap_err().to_string().rsplit(' ').next(), Some("CANCELLED"));
    }

    /// A hold decision drops the account's expired holds; a later call of the same batch that
    /// names one of them is still told it expired (not that it is some other status).
    #[test]
    fn an_expired_hold_dropped_earlier_in_a_batch_is_still_expired() {
        let mut account = open("1000", "0");
        let expired = reserve(TradeSide::Buy, "1", "10", 1);
        let live = reserve(TradeSide::Buy, "1", "10", 600);
        let (expired_id, live_id) = (order_of(&expired), order_of(&live));
        run(&mut account, &expired, T0).unwrap();
        run(&mut account, &live, T0).unwrap();
        let later = T0 + 5_000;
        let cancel_live = cancel(&live_id);
        let fill_expired = fill(&expired_id, "x", "1", "9");
        let quote = quote();
        let outcome = crate::core::batch::decide_batch(
            &account,
            &[(&cancel_live, Some(quote)), (&fill_expired, Some(quote))],
            &crate::core::batch::Closed::default(),
            later,
            &Limits::default(),
        );
        assert!(outcome.decisions[0].is_ok());
        assert!(
            matches!(&outcome.decisions[1], Err(Rejection::OrderExpired { order_id, .. }) if *order_id == expired_id),
            "{:?}",
            outcome.decisions[1]
        );
    }

    /// Clocks differ within CLOCK_SKEW_MAX: a coordinator just past a hold's expiry lets its
    /// cash be spent, and one just before it still counts the hold. There nothing is available,
    /// every spend is refused, a fill finds no cash to move, and nothing panics or goes negative.
    #[test]
    fn a_clock_behind_another_sees_nothing_available_and_fails_nothing() {
        let mut account = open("100", "0");
        let held = reserve(TradeSide::Buy, "1", "100", 10);
        let id = order_of(&held);
        run(&mut account, &held, T0).unwrap();
        let expiry = T0 + 10_000;
        // Ahead: the hold expired, its cash is spent.
        run(&mut account, &Operation::Withdraw(usd("100")), expiry + 1_000).unwrap();
        // Behind: the hold still counts.
        let behind = expiry - 1_000;
        assert_eq!(account.available_cash(behind), Usd::from_decimal(Decimal::ZERO));
        let spend = run(&mut account.clone(), &Operation::Withdraw(usd("0.01")), behind);
        assert!(matches!(spend, Err(Rejection::InsufficientBalance { .. })), "{spend:?}");
        let filled = run(&mut account.clone(), &fill(&id, "late", "1", "99"), behind);
        assert_eq!(filled.unwrap_err(), Rejection::OutOfRange);
        run(&mut account, &Operation::Deposit(usd("5")), behind).unwrap();
        assert_eq!(account.cash, usd("5"));
    }

    /// Bad figures are refused before anything is held: an inactive asset, a value above the
    /// maximum, more open orders than an account keeps.
    #[test]
    fn reserves_are_bounded() {
        let mut account = open("1000000", "0");
        let inactive = decide_reserve(
            &account,
            &match reserve(TradeSide::Buy, "1", "10", 60) {
                Operation::Reserve(request) => request,
                _ => unreachable!(),
            },
            false,
            T0,
            &Limits::default(),
        );
        assert!(matches!(inactive, Err(Rejection::AssetInactive(_))));
        let huge = run(&mut account, &reserve(TradeSide::Buy, "1000", "10000.01", 60), T0);
        assert!(matches!(huge, Err(Rejection::OrderValueTooLarge { .. })), "{huge:?}");
        for _ in 0..HOLDS_PER_ACCOUNT_MAX {
            run(&mut account, &reserve(TradeSide::Buy, "1", "1", 60), T0).unwrap();
        }
        let full = run(&mut account, &reserve(TradeSide::Buy, "1", "1", 60), T0);
        assert_eq!(
            full.unwrap_err(),
            Rejection::TooManyHolds {
                maximum: HOLDS_PER_ACCOUNT_MAX
            }
        );
        // Expired holds make room again; they stay on the account (counting for nothing) until
        // the sweeper releases them, up to HOLDS_KEPT_MAX.
        run(&mut account, &reserve(TradeSide::Buy, "1", "1", 60), T0 + 60_000).unwrap();
        assert_eq!(account.live_holds(T0 + 60_000).count(), 1);
        assert_eq!(account.holds.len(), HOLDS_PER_ACCOUNT_MAX + 1);
        for _ in 1..HOLDS_PER_ACCOUNT_MAX - 1 {
            run(&mut account, &reserve(TradeSide::Buy, "1", "1", 1), T0 + 60_000).unwrap();
        }
        assert_eq!(account.holds.len(), HOLDS_KEPT_MAX - 1);
        run(&mut account, &reserve(TradeSide::Buy, "1", "1", 1), T0 + 60_000).unwrap();
        let kept_full = run(&mut account, &reserve(TradeSide::Buy, "1", "1", 1), T0 + 120_000);
        assert!(
            matches!(kept_full, Err(Rejection::TooManyHolds { .. })),
            "{kept_full:?}"
        );
    }

    #[derive(Debug, Clone)]
    enum Step {
        Deposit(u32),
        Withdraw(u32),
        Reserve {
            buy: bool,
            thousandths: u32,
            limit_cents: u32,
            seconds: u64,
        },
        Fill {
            order: usize,
            thousandths: u32,
            price_cents: u32,
            fill: u8,
        },
        Cancel {
            order: usize,
        },
        Wait(u64),
        PendingWithdraw(u32),
        Settle(usize),
        Return(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1u32..500).prop_map(Step::Deposit),
            (1u32..300).prop_map(Step::Withdraw),
            (any::<bool>(), 1u32..5_000, 1u32..20_000, 1u64..120).prop_map(
                |(buy, thousandths, limit_cents, seconds)| Step::Reserve {
                    buy,
                    thousandths,
                    limit_cents,
                    seconds
                }
            ),
            (0usize..8, 1u32..5_000, 1u32..20_000, 0u8..4).prop_map(|(order, thousandths, price_cents, fill)| {
                Step::Fill {
                    order,
                    thousandths,
                    price_cents,
                    fill,
                }
            }),
            (0usize..8).prop_map(|order| Step::Cancel { order }),
            (1u64..60).prop_map(Step::Wait),
            (1u32..300).prop_map(Step::PendingWithdraw),
            (0usize..4).prop_map(Step::Settle),
            (0usize..4).prop_map(Step::Return),
        ]
    }

    proptest! {
        /// For any sequence of deposits, withdrawals, reserves, fills, cancels and expiries: cash
        /// and the holding equal the sums of the ledger's deltas, what is on hold equals the sum
        /// of the open holds and the sum of their entries' held deltas, nothing is negative and
        /// available never is either, and no buy ever pays more than its limit allowed.
        #[test]
        fn holds_conserve_money(steps in proptest::collection::vec(step(), 1..80)) {
            let mut account = open("0", "0");
            account.holdings.clear();
            let mut now = T0;
            let (mut cash_sum, mut holding_sum) = (Decimal::ZERO, Decimal::ZERO);
            let mut orders: Vec<OrderId> = Vec::new();
            let mut held_sums: BTreeMap<OrderId, Decimal> = BTreeMap::new();
            let mut closed: BTreeMap<OrderId, ClosedOrder> = BTreeMap::new();
            let mut withdrawals: Vec<crate::core::WithdrawalId> = Vec::new();
            let mut withdrawal_held: Decimal = Decimal::ZERO;
            let mut ended: BTreeMap<crate::core::WithdrawalId, crate::core::records::WithdrawalStatus> = BTreeMap::new();
            for step in steps {
                let operation = match step {
                    Step::Deposit(dollars) => Operation::Deposit(Usd::from_decimal(dollars.into())),
                    Step::Withdraw(dollars) => Operation::Withdraw(Usd::from_decimal(dollars.into())),
                    Step::Reserve { buy, thousandths, limit_cents, seconds } => Operation::Reserve(ReserveRequest {
                        side: if buy { TradeSide::Buy } else { TradeSide::Sell },
                        asset: sol(),
                        quantity: Quantity::from_decimal(Decimal::new(thousandths.into(), 3)),
                        limit: Price::from_stored(&Decimal::new(limit_cents.into(), 2).to_string()).unwrap(),
                        expires_in: Duration::from_secs(seconds),
                        order_id: OrderId::new(),
                        placed_by: Principal::local(),
                    }),
                    Step::Fill { order, thousandths, price_cents, fill } => {
                        let Some(order_id) = orders.get(order) else { continue };
                        Operation::Fill(FillRequest {
                            order_id: order_id.clone(),
                            fill_id: format!("f{fill}"),
                            quantity: Quantity::from_decimal(Decimal::new(thousandths.into(), 3)),
                            price: Price::from_stored(&Decimal::new(price_cents.into(), 2).to_string()).unwrap(),
                        })
                    }
                    Step::Cancel { order } => {
                        let Some(order_id) = orders.get(order) else { continue };
                        Operation::Cancel(CancelRequest { order_id: order_id.clone() })
                    }
                    Step::Wait(seconds) => {
                        now += seconds * 1000;
                        continue;
                    }
                    Step::PendingWithdraw(dollars) => Operation::WithdrawPending(crate::core::ops::PendingRequest {
                        amount: Usd::from_decimal(dollars.into()),
                        withdrawal_id: crate::core::WithdrawalId::new(),
                        placed_by: Principal::local(),
                    }),
                    Step::Settle(index) => {
                        let Some(id) = withdrawals.get(index) else { continue };
                        Operation::Settle(crate::core::ops::SettleRequest { withdrawal_id: id.clone() })
                    }
                    Step::Return(index) => {
                        let Some(id) = withdrawals.get(index) else { continue };
                        Operation::Return(crate::core::ops::ReturnRequest {
                            withdrawal_id: id.clone(),
                            reason: crate::core::Memo::parse("reason", "bounced").unwrap(),
                        })
                    }
                };
                let quote = quote();
                let inputs = Inputs {
                    quote: Some(&quote),
                    closed: operation.named_order().and_then(|order| closed.get(order).copied()),
                    closed_withdrawal: operation.named_withdrawal().and_then(|id| ended.get(id).copied()),
                };
                let Ok(decision) = decide(&account, &operation, inputs, now, &Limits::default()) else { continue };
                if let Some(effect) = &decision.withdrawal {
                    withdrawal_held += effect.held_delta;
                    if effect.fresh {
                        withdrawals.push(effect.withdrawal_id.clone());
                    } else {
                        prop_assert!(!ended.contains_key(&effect.withdrawal_id), "a withdrawal ends once");
                        ended.insert(effect.withdrawal_id.clone(), effect.status);
                    }
                }
                cash_sum += decision.cash_delta.decimal();
                if let Some(trade) = &decision.trade {
                    holding_sum += trade.quantity_delta;
                }
                if let Some(effect) = &decision.hold {
                    *held_sums.entry(effect.order_id.clone()).or_default() += effect.held_delta;
                    if effect.fresh {
                        orders.push(effect.order_id.clone());
                    }
                    if !effect.status.is_open() {
                        closed.insert(effect.order_id.clone(), ClosedOrder { status: effect.status, expires_at_ms: Some(effect.hold.expires_at_ms) });
                    }
                    if effect.hold.side == TradeSide::Buy {
                        let most = Usd::ceil(effect.hold.filled.decimal() * effect.hold.limit.decimal());
                        prop_assert!(effect.hold.moved <= most, "paid {} for fills worth at most {}", effect.hold.moved, most);
                    }
                }
                account.apply(&decision);
                prop_assert_eq!(account.cash.decimal(), cash_sum);
                prop_assert_eq!(account.holding(&sol()).decimal(), holding_sum);
                let live: Decimal = account.live_holds(now).map(|(id, _)| held_sums[id]).sum::<Decimal>() + withdrawal_held;
                let on_hold = account.cash_on_hold(now).decimal() + account.holding_on_hold(&sol(), now).decimal();
                prop_assert_eq!(on_hold, live, "on hold equals the open holds' entries");
                prop_assert!(account.available_cash(now) >= Usd::ZERO);
                prop_assert!(account.available_holding(&sol(), now) >= Quantity::ZERO);
                for (id, hold) in &account.holds {
                    if !hold.is_live(now) {
                        closed.entry(id.clone()).or_insert(ClosedOrder { status: OrderStatus::Expired, expires_at_ms: Some(hold.expires_at_ms) });
                    }
                }
            }
        }
    }
}
