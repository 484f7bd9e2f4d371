//! Deciding a batch: the operations queued on one account, each decided against the state the
//! previous one left, committed together. Pure, like `decide`: the caller turns the outcome into
//! one transaction whose conditions restate the floors computed here.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::account::Account;
use super::decision::{Decision, Rejection};
use super::ids::{AssetSymbol, OrderId, WithdrawalId};
use super::limits::Limits;
use super::money::{Quantity, Usd};
use super::ops::{ClosedOrder, Inputs, Operation, Quote, decide};
use super::records::WithdrawalStatus;
use super::time::Millis;

/// What a batch decides: one answer per operation, in order, and the account after all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    pub decisions: Vec<Result<Decision, Rejection>>,
    /// The account after every accepted operation (the read account if none was accepted).
    pub after: Account,
    /// The largest cash debit, counted from the read balance, that any prefix of the batch
    /// needs: the commit restates `cash >= cash_floor` so no interleaving can go negative.
    pub cash_floor: Usd,
    /// The same per traded asset: the largest quantity any prefix sells beyond what it bought.
    pub holding_floors: BTreeMap<AssetSymbol, Quantity>,
}

impl BatchOutcome {
    pub fn accepted(&self) -> usize {
        self.decisions.iter().filter(|decision| decision.is_ok()).count()
    }
}

/// The orders and withdrawals named by the batch's calls that the account did not hold when
/// read, as stored (closed, or expired).
#[derive(Debug, Clone, Default)]
pub struct Closed {
    pub orders: BTreeMap<OrderId, ClosedOrder>,
    pub withdrawals: BTreeMap<WithdrawalId, WithdrawalStatus>,
}

/// Decides `operations` in order on `account` at `now`. `closed` holds what the account did not
/// hold when read; an order or withdrawal closed by an earlier operation of the batch joins it.
pub fn decide_batch(
    account: &Account,
    operations: &[(&Operation, Option<Quote>)],
    closed: &Closed,
    now: Millis,
    limits: &Limits,
) -> BatchOutcome {
    let mut closed = closed.clone();
    let mut after = account.clone();
    let mut cash_change = Decimal::ZERO;
    let mut cash_floor = Decimal::ZERO;
    let mut holding_changes: BTreeMap<AssetSymbol, Decimal> = BTreeMap::new();
    let mut holding_floors: BTreeMap<AssetSymbol, Decimal> = BTreeMap::new();
    let decisions = operations
        .iter()
        .map(|(operation, quote)| {
            let inputs = Inputs {
                quote: quote.as_ref(),
                closed: operation
                    .named_order()
                    .and_then(|order| closed.orders.get(order).copied()),
                closed_withdrawal: operation
                    .named_withdrawal()
                    .and_then(|withdrawal| closed.withdrawals.get(withdrawal).copied()),
            };
            let decision = decide(&after, operation, inputs, now, limits)?;
            if let Some(effect) = &decision.hold {
                // A hold decision drops the account's expired holds: a later call of the batch
                // naming one of them must still be told it expired.
                for (order_id, hold) in after.holds.iter().filter(|(id, _)| !effect.holds.contains_key(*id)) {
                    if *order_id != effect.order_id {
                        closed.orders.insert(
                            order_id.clone(),
                            ClosedOrder {
                                status: crate::core::records::OrderStatus::Expired,
                                expires_at_ms: Some(hold.expires_at_ms),
                            },
                        );
                    }
                }
            }
            if let Some(effect) = &decision.withdrawal {
                closed.withdrawals.insert(effect.withdrawal_id.clone(), effect.status);
            }
            if let Some(effect) = decision.hold.as_ref().filter(|effect| !effect.status.is_open()) {
                closed.orders.insert(
                    effect.order_id.clone(),
                    ClosedOrder {
                        status: effect.status,
                        expires_at_ms: Some(effect.hold.expires_at_ms),
                    },
                );
            }
            after.apply(&decision);
            cash_change += decision.cash_delta.decimal();
            cash_floor = cash_floor.max(-cash_change);
            if let Some(effect) = &decision.trade {
                let change = holding_changes.entry(effect.asset.clone()).or_default();
                *change += effect.quantity_delta;
                let floor = holding_floors.entry(effect.asset.clone()).or_default();
                *floor = (*floor).max(-*change);
            }
            Ok(decision)
        })
        .collect();
    BatchOutcome {
        decisions,
        after,
        cash_floor: Usd::from_decimal(cash_floor),
        holding_floors: holding_floors
            .into_iter()
            .map(|(asset, floor)| (asset, Quantity::from_decimal(floor)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Price, TradeRequest, TradeSide, UtcDay};

    fn today() -> UtcDay {
        UtcDay::from_stored("2026-11-27").unwrap()
    }

    fn usd(raw: &str) -> Usd {
        Usd::parse_amount("amount", raw).unwrap()
    }

    fn trade(side: TradeSide, quantity: &str) -> Operation {
        Operation::Trade(TradeRequest {
            side,
            asset: AssetSymbol::parse("asset", "SOL").unwrap(),
            quantity: Quantity::parse_trade("quantity", quantity).unwrap(),
            limit_price: None,
        })
    }

    /// Each operation with its quote: every trade at 10.
    fn quoted(operations: &[Operation]) -> Vec<(&Operation, Option<Quote>)> {
        let quote = Quote {
            price: Price::parse("price", "10").unwrap(),
            active: true,
        };
        operations
            .iter()
            .map(|operation| (operation, matches!(operation, Operation::Trade(_)).then_some(quote)))
            .collect()
    }

    /// Each operation sees the state the previous one left; a refusal changes nothing.
    #[test]
    fn operations_are_decided_in_order_on_the_running_state() {
        let operations = [
            Operation::Deposit(usd("100")),
            Operation::Withdraw(usd("150")),
            trade(TradeSide::Buy, "5"),
            Operation::Withdraw(usd("50")),
            trade(TradeSide::Sell, "2"),
        ];
        let outcome = decide_batch(
            &Account::default(),
            &quoted(&operations),
            &Closed::default(),
            today().noon(),
            &Limits::default(),
        );
        let accepted: Vec<bool> = outcome.decisions.iter().map(Result::is_ok).collect();
        assert_eq!(accepted, [true, false, true, true, true]);
        assert_eq!(outcome.after.cash, usd("20"));
        let sol = AssetSymbol::parse("asset", "SOL").unwrap();
        assert_eq!(outcome.after.holding(&sol).to_string(), "3");
        assert_eq!(outcome.accepted(), 4);
    }

    /// The floors are the deepest point any prefix reaches below the read state.
    #[test]
    fn floors_restate_the_deepest_prefix() {
        let mut account = Account {
            state: crate::core::AccountState::Open,
            cash: usd("100"),
            limit_day: Some(today()),
            ..Account::default()
        };
        let sol = AssetSymbol::parse("asset", "SOL").unwrap();
        account
            .holdings
            .insert(sol.clone(), Quantity::parse_trade("q", "4").unwrap());
        let operations = [
            Operation::Withdraw(usd("30")),
            trade(TradeSide::Sell, "3"),
            Operation::Withdraw(usd("50")),
            Operation::Deposit(usd("500")),
            trade(TradeSide::Buy, "1"),
        ];
        let outcome = decide_batch(
            &account,
            &quoted(&operations),
            &Closed::default(),
            today().noon(),
            &Limits::default(),
        );
        assert!(outcome.decisions.iter().all(Result::is_ok));
        // -30, then +30 from the sale, then -50: the deepest prefix is -50.
        assert_eq!(outcome.cash_floor, usd("50"));
        assert_eq!(outcome.holding_floors[&sol].to_string(), "3");
    }
}
