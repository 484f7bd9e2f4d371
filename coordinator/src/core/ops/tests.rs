//! The decisions of the single-account operations.

use rust_decimal::Decimal;

use super::*;
use crate::core::ids::AssetSymbol;
use crate::core::money::{Price, Quantity};

fn today() -> UtcDay {
    day("2026-11-26")
}

fn day(raw: &str) -> UtcDay {
    UtcDay::from_stored(raw).unwrap()
}

fn usd(raw: &str) -> Usd {
    Usd::parse_amount("amount", raw).unwrap()
}

fn account_with(cash: &str, holdings: &[(&str, &str)]) -> Account {
    Account {
        state: crate::core::AccountState::Open,
        cash: usd(cash),
        holdings: holdings
            .iter()
            .map(|(asset, quantity)| {
                (
                    AssetSymbol::parse("asset", asset).unwrap(),
                    Quantity::parse_trade("q", quantity).unwrap(),
                )
            })
            .collect(),
        limit_day: Some(today()),
        ..Account::default()
    }
}

fn trade(side: TradeSide, quantity: &str, price: &str, limit: Option<&str>) -> (Operation, Quote) {
    trade_at(
        side,
        Quantity::parse_trade("quantity", quantity).unwrap(),
        Price::parse("price", price).unwrap(),
        limit,
        "BTC",
    )
}

fn trade_at(side: TradeSide, quantity: Quantity, price: Price, limit: Option<&str>, asset: &str) -> (Operation, Quote) {
    let request = TradeRequest {
        side,
        asset: AssetSymbol::parse("asset", asset).unwrap(),
        quantity,
        limit_price: limit.map(|raw| Price::parse("limit_price", raw).unwrap()),
    };
    (Operation::Trade(request), Quote { price, active: true })
}

/// An operation as the tests decide it: a cash operation alone, a trade with its quote.
trait Quoted {
    fn parts(&self) -> (&Operation, Option<&Quote>);
}

impl Quoted for Operation {
    fn parts(&self) -> (&Operation, Option<&Quote>) {
        (self, None)
    }
}

impl Quoted for (Operation, Quote) {
    fn parts(&self) -> (&Operation, Option<&Quote>) {
        (&self.0, Some(&self.1))
    }
}

impl Quoted for (Operation, Option<Quote>) {
    fn parts(&self) -> (&Operation, Option<&Quote>) {
        (&self.0, self.1.as_ref())
    }
}

fn decide(account: &Account, operation: &impl Quoted, today: UtcDay, limits: &Limits) -> Result<Decision, Rejection> {
    let (operation, quote) = operation.parts();
    let inputs = super::Inputs {
        quote,
        ..super::Inputs::default()
    };
    super::decide(account, operation, inputs, today.noon(), limits)
}

fn above_daily_limit(operation: &Operation, limits: &Limits) -> Option<Rejection> {
    operation.refused_before_lease(limits)
}

/// One operation of every kind (both trade sides).
fn one_of_each() -> Vec<Operation> {
    let (buy, _) = trade(TradeSide::Buy, "1", "1", None);
    let (sell, _) = trade(TradeSide::Sell, "1", "1", None);
    let transfer = Operation::Transfer(TransferRequest {
        from: crate::core::UserId::parse("from_user_id", "a").unwrap(),
        to: crate::core::UserId::parse("to_user_id", "b").unwrap(),
        amount: usd("1"),
        memo: crate::core::Memo::default(),
    });
    vec![
        Operation::Deposit(usd("1")),
        Operation::Withdraw(usd("1")),
        buy,
        sell,
        transfer,
    ]
}

/// Every operation's name is one of the bounded metric labels, and a side's name is the one its
/// orders store.
#[test]
fn every_name_is_a_metric_label() {
    for operation in one_of_each() {
        assert!(NAMES.contains(&operation.name()), "{}", operation.name());
    }
    assert_eq!(TradeSide::Buy.as_str(), trade::BUY);
    assert_eq!(TradeSide::Sell.as_str(), trade::SELL);
}

/// No operation counts more items than `CALL_ITEMS_MAX`, which a batch always has room for.
#[test]
fn every_call_fits_in_a_batch() {
    for operation in one_of_each() {
        for recorded in [false, true] {
            assert!(operation.items_max(recorded) <= CALL_ITEMS_MAX);
        }
    }
}

#[test]
fn first_deposit_creates_the_account() {
    let decision = decide(
        &Account::default(),
        &Operation::Deposit(usd("100")),
        today(),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(decision.cash, usd("100"));
    assert_eq!(decision.deposited_today, usd("100"));
}

#[test]
fn other_operations_need_an_account() {
    let result = decide(
        &Account::default(),
        &Operation::Withdraw(usd("1")),
        today(),
        &Limits::default(),
    );
    assert_eq!(result, Err(Rejection::AccountNotFound));
}

#[test]
fn withdraw_checks_balance_with_the_designs_message() {
    let error = decide(
        &account_with("50", &[]),
        &Operation::Withdraw(usd("100")),
        today(),
        &Limits::default(),
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "Insufficient balance. Current: $50.00, Required: $100.00"
    );
}

#[test]
fn an_amount_above_the_whole_daily_limit_is_refused_before_the_lease() {
    let limits = Limits::default();
    assert!(above_daily_limit(&Operation::Deposit(usd("10000")), &limits).is_none());
    assert_eq!(
        above_daily_limit(&Operation::Deposit(usd("10000.01")), &limits)
            .unwrap()
            .to_string(),
        "Daily deposit limit exceeded. Limit: $10000.00, Requested: $10000.01"
    );
    assert!(matches!(
        above_daily_limit(&Operation::Withdraw(usd("5000.01")), &limits),
        Some(Rejection::AboveDailyLimit { kind: "withdrawal", .. })
    ));
}

#[test]
fn daily_limits_count_per_utc_day() {
    let mut account = account_with("20000", &[]);
    account.withdrawn_today = usd("4990");
    let limits = Limits::default();
    assert!(matches!(
        decide(&account, &Operation::Withdraw(usd("20")), today(), &limits),
        Err(Rejection::DailyLimitExceeded { kind: "withdrawal", .. })
    ));
    let tomorrow = decide(&account, &Operation::Withdraw(usd("20")), day("2026-11-27"), &limits).unwrap();
    assert_eq!(tomorrow.withdrawn_today, usd("20"));
    // A stored day far ahead (a clock that ran ahead) does not freeze the totals.
    let mut far_ahead = account.clone();
    far_ahead.limit_day = Some(day("2026-12-25"));
    let decision = decide(&far_ahead, &Operation::Withdraw(usd("20")), today(), &limits).unwrap();
    assert_eq!((decision.limit_day, decision.withdrawn_today), (today(), usd("20")));
    // A coordinator whose clock still says yesterday does not reset today's totals.
    let mut counted_tomorrow = account.clone();
    counted_tomorrow.limit_day = Some(day("2026-11-27"));
    assert!(matches!(
        decide(&counted_tomorrow, &Operation::Withdraw(usd("20")), today(), &limits),
        Err(Rejection::DailyLimitExceeded { .. })
    ));
    account.deposited_today = usd("9999.99");
    assert!(decide(&account, &Operation::Deposit(usd("0.01")), today(), &limits).is_ok());
    assert!(decide(&account, &Operation::Deposit(usd("0.02")), today(), &limits).is_err());
}

#[test]
fn buy_moves_cash_into_the_holding() {
    let decision = decide(
        &account_with("100", &[]),
        &trade(TradeSide::Buy, "2", "45", None),
        today(),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(decision.cash, usd("10"));
    let effect = decision.trade.unwrap();
    assert_eq!(effect.total, usd("90"));
    assert_eq!(effect.holding.to_string(), "2");
}

#[test]
fn sell_needs_the_holding() {
    let account = account_with("0.01", &[("BTC", "1")]);
    let error = decide(
        &account,
        &trade(TradeSide::Sell, "1.5", "10", None),
        today(),
        &Limits::default(),
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "Insufficient holdings of BTC. Current: 1, Required: 1.5"
    );
    let decision = decide(
        &account,
        &trade(TradeSide::Sell, "1", "10", None),
        today(),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(decision.cash, usd("10.01"));
    assert!(decision.trade.unwrap().holding.is_zero());
}

#[test]
fn limit_prices_and_order_value_bounds() {
    let account = account_with("100000", &[("BTC", "10")]);
    let limits = Limits::default();
    assert!(matches!(
        decide(
            &account,
            &trade(TradeSide::Buy, "1", "10", Some("9.99")),
            today(),
            &limits
        ),
        Err(Rejection::PriceAboveLimit { .. })
    ));
    assert!(
        decide(
            &account,
            &trade(TradeSide::Buy, "1", "10", Some("10")),
            today(),
            &limits
        )
        .is_ok()
    );
    assert!(matches!(
        decide(
            &account,
            &trade(TradeSide::Sell, "1", "10", Some("10.01")),
            today(),
            &limits
        ),
        Err(Rejection::PriceBelowLimit { .. })
    ));
    assert!(matches!(
        decide(&account, &trade(TradeSide::Buy, "2", "5000.01", None), today(), &limits),
        Err(Rejection::OrderValueTooLarge { .. })
    ));
    assert!(decide(&account, &trade(TradeSide::Buy, "2", "5000", None), today(), &limits).is_ok());
}

fn limits_with_minimum(minimum: &str) -> Limits {
    Limits {
        order_value_min: usd(minimum),
        ..Limits::default()
    }
}

#[test]
fn orders_below_the_minimum_value_are_refused() {
    let account = account_with("100000", &[("BTC", "10")]);
    let limits = Limits::default();
    assert_eq!(limits.order_value_min, usd("1.00"));
    // Exactly the minimum passes; a cent under it does not, on either side.
    assert!(decide(&account, &trade(TradeSide::Buy, "0.1", "10", None), today(), &limits).is_ok());
    assert!(decide(&account, &trade(TradeSide::Sell, "0.1", "10", None), today(), &limits).is_ok());
    let error = decide(&account, &trade(TradeSide::Buy, "0.099", "10", None), today(), &limits).unwrap_err();
    assert_eq!(
        error,
        Rejection::OrderValueTooSmall {
            total: usd("0.99"),
            minimum: usd("1.00")
        }
    );
    assert_eq!(error.to_string(), "Order total $0.99 is below the minimum of $1.00");
    // The minimum applies to the rounded total: 0.0999 × 10 = 0.999 costs 1.00 but pays 0.99.
    assert!(decide(&account, &trade(TradeSide::Buy, "0.0999", "10", None), today(), &limits).is_ok());
    assert_eq!(
        decide(
            &account,
            &trade(TradeSide::Sell, "0.0999", "10", None),
            today(),
            &limits
        ),
        Err(Rejection::OrderValueTooSmall {
            total: usd("0.99"),
            minimum: usd("1.00")
        })
    );
    // A buy never rounds to 0.00 (its cost rounds up)...
    let tiny = limits_with_minimum("0.01");
    let bought = decide(&account, &trade(TradeSide::Buy, "0.001", "1", None), today(), &tiny).unwrap();
    assert_eq!(bought.trade.unwrap().total, usd("0.01"));
    // ...and a sell that would pay 0.00 is refused, never executed for nothing.
    let error = decide(&account, &trade(TradeSide::Sell, "0.001", "1", None), today(), &tiny).unwrap_err();
    assert_eq!(error.to_string(), "Order total $0.00 is below the minimum of $0.01");
    // Even when a caller builds limits without a minimum.
    let none = Limits {
        order_value_min: Usd::ZERO,
        ..Limits::default()
    };
    assert!(matches!(
        decide(&account, &trade(TradeSide::Sell, "0.001", "1", None), today(), &none),
        Err(Rejection::OrderValueTooSmall { total, .. }) if total == Usd::ZERO
    ));
}

/// Issue 8's measurement: deposit 10.00, buy 0.996 ADA at 0.45 (0.4482, which half-even
/// charged as 0.45), sell it in 83 lots of 0.012 (0.0054 each, which half-even paid as 0.01):
/// cash ended at 10.38 with no ADA left. Now a lot that would pay 0.00 is refused, and the
/// whole quantity sells for 0.44: the round trip costs a cent instead of paying 38.
#[test]
fn splitting_a_sell_into_lots_that_round_up_gains_nothing() {
    let limits = limits_with_minimum("0.01");
    let ada = |side, quantity| {
        trade_at(
            side,
            Quantity::parse_trade("quantity", quantity).unwrap(),
            Price::parse("price", "0.45").unwrap(),
            None,
            "ADA",
        )
    };
    let apply = |account: &mut Account, decision: Decision| {
        account.state = crate::core::AccountState::Open;
        account.cash = decision.cash;
        account.limit_day = Some(decision.limit_day);
        account.deposited_today = decision.deposited_today;
        if let Some(effect) = decision.trade {
            account.holdings.insert(effect.asset, effect.holding);
        }
    };
    let mut account = Account::default();
    let deposit = decide(&account, &Operation::Deposit(usd("10.00")), today(), &limits).unwrap();
    apply(&mut account, deposit);

    let buy = decide(&account, &ada(TradeSide::Buy, "0.996"), today(), &limits).unwrap();
    assert_eq!(buy.trade.as_ref().unwrap().total, usd("0.45"), "0.4482 rounds up");
    apply(&mut account, buy);
    assert_eq!(account.cash, usd("9.55"));

    for lot in 0..83 {
        let refused = decide(&account, &ada(TradeSide::Sell, "0.012"), today(), &limits);
        assert_eq!(
            refused,
            Err(Rejection::OrderValueTooSmall {
                total: Usd::ZERO,
                minimum: usd("0.01")
            }),
            "lot {lot}: 0.0054 rounds down to 0.00"
        );
    }
    assert_eq!(account.cash, usd("9.55"));
    let ada_symbol = AssetSymbol::parse("asset", "ADA").unwrap();
    assert_eq!(account.holding(&ada_symbol).to_string(), "0.996");

    let sell = decide(&account, &ada(TradeSide::Sell, "0.996"), today(), &limits).unwrap();
    assert_eq!(sell.trade.as_ref().unwrap().total, usd("0.44"), "0.4482 rounds down");
    apply(&mut account, sell);
    assert_eq!(account.cash, usd("9.99"));
    assert!(account.holding(&ada_symbol).is_zero());

    // With the default minimum the first buy is refused outright.
    let error = decide(
        &account_with("10", &[]),
        &ada(TradeSide::Buy, "0.996"),
        today(),
        &Limits::default(),
    )
    .unwrap_err();
    assert_eq!(error.to_string(), "Order total $0.45 is below the minimum of $1.00");
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    fn operation() -> impl Strategy<Value = (Operation, Option<Quote>)> {
        let cents = (1u64..50_000).prop_map(|cents| Usd::from_decimal(Decimal::new(cents as i64, 2)));
        let quantity = (1u64..2_000).prop_map(|thousandths| {
            Quantity::parse_trade("q", &Decimal::new(thousandths as i64, 3).to_string()).unwrap()
        });
        let price =
            prop_oneof![Just("0.5"), Just("10"), Just("33.33333333")].prop_map(|raw| Price::parse("p", raw).unwrap());
        prop_oneof![
            cents.clone().prop_map(|amount| (Operation::Deposit(amount), None)),
            cents.prop_map(|amount| (Operation::Withdraw(amount), None)),
            (any::<bool>(), quantity, price).prop_map(|(buy, quantity, price)| {
                let side = if buy { TradeSide::Buy } else { TradeSide::Sell };
                let (operation, quote) = super::trade_at(side, quantity, price, None, "AAA");
                (operation, Some(quote))
            }),
        ]
    }

    /// Limits that let tiny orders through, so rounding is exercised on every order size.
    fn tiny_orders_allowed() -> Limits {
        Limits {
            order_value_min: Usd::CENT,
            ..Limits::default()
        }
    }

    /// A positive price with up to 8 decimals, under 50 (so 200 units stay under the maximum
    /// order value): mostly sub-dollar, some whole cents, some anywhere.
    fn price() -> impl Strategy<Value = Price> {
        prop_oneof![
            1i64..100_000_000,
            (1i64..5_000).prop_map(|cents| cents * 1_000_000),
            1i64..5_000_000_000,
        ]
        .prop_map(|units| Price::parse("price", &Decimal::new(units, 8).to_string()).unwrap())
    }

    /// A trade quantity (at least 0.001, up to 8 decimals): mostly small lots, up to 10.
    fn lot() -> impl Strategy<Value = Quantity> {
        prop_oneof![100_000i64..=10_000_000, 100_000i64..=1_000_000_000]
            .prop_map(|units| Quantity::parse_trade("quantity", &Decimal::new(units, 8).to_string()).unwrap())
    }

    fn trade_at(side: TradeSide, quantity: Quantity, price: Price) -> (Operation, Quote) {
        super::trade_at(side, quantity, price, None, "AAA")
    }

    proptest! {
        /// Buying a quantity and selling it in any split at the same price never makes the
        /// customer richer: cash + holding × price (exact) never grows, at any step. No fill
        /// executes for 0.00: a lot whose proceeds round down to nothing is refused.
        #[test]
        fn trading_at_one_price_never_makes_money(price in price(), lots in proptest::collection::vec(lot(), 1..20)) {
            let limits = tiny_orders_allowed();
            let asset = AssetSymbol::parse("asset", "AAA").unwrap();
            let mut account = Account { state: crate::core::AccountState::Open, cash: Usd::from_decimal(Decimal::new(20_000, 0)), limit_day: Some(today()), ..Account::default() };
            let wealth = |account: &Account| account.cash.decimal() + account.holding(&asset).decimal() * price.decimal();
            let bought = lots.iter().try_fold(Quantity::ZERO, |sum, lot| sum.checked_add(*lot)).unwrap();
            let mut steps = vec![(TradeSide::Buy, bought)];
            steps.extend(lots.iter().map(|lot| (TradeSide::Sell, *lot)));
            let (mut paid, mut received) = (Decimal::ZERO, Decimal::ZERO);
            for (side, quantity) in steps {
                let before = wealth(&account);
                let exact = price.exact_value(quantity).unwrap();
                match decide(&account, &trade_at(side, quantity, price), today(), &limits) {
                    Ok(decision) => {
                        let effect = decision.trade.clone().unwrap();
                        prop_assert!(effect.total > Usd::ZERO, "{:?} {} executed for 0.00", side, quantity);
                        match side {
                            TradeSide::Buy => {
                                prop_assert!(effect.total.decimal() >= exact && effect.total.decimal() - exact < Decimal::new(1, 2));
                                prop_assert_eq!(decision.cash_delta.decimal(), -effect.total.decimal());
                                paid += effect.total.decimal();
                            }
                            TradeSide::Sell => {
                                prop_assert!(effect.total.decimal() <= exact && exact - effect.total.decimal() < Decimal::new(1, 2));
                                prop_assert_eq!(decision.cash_delta.decimal(), effect.total.decimal());
                                received += effect.total.decimal();
                            }
                        }
                        account.cash = decision.cash;
                        account.holdings.insert(effect.asset, effect.holding);
                    }
                    Err(rejection) => {
                        // Only a sell worth less than a cent is refused here; it changes nothing.
                        prop_assert_eq!(side, TradeSide::Sell);
                        prop_assert!(exact < Decimal::new(1, 2));
                        prop_assert_eq!(rejection, Rejection::OrderValueTooSmall { total: Usd::ZERO, minimum: Usd::CENT });
                    }
                }
                prop_assert!(wealth(&account) <= before, "{:?} {} at {} made money", side, quantity, price);
            }
            prop_assert!(received <= paid, "sold for {} what was bought for {}", received, paid);
        }

        /// Any sequence of decisions keeps cash and holdings non-negative, and equal to the
        /// sums of the deltas that a ledger would record.
        #[test]
        fn decisions_conserve_money_and_never_go_negative(operations in proptest::collection::vec(operation(), 1..60)) {
            let mut account = Account::default();
            let (mut cash_sum, mut holding_sum) = (Decimal::ZERO, Decimal::ZERO);
            let asset = AssetSymbol::parse("asset", "AAA").unwrap();
            for operation in &operations {
                let Ok(decision) = decide(&account, operation, today(), &tiny_orders_allowed()) else { continue };
                cash_sum += decision.cash_delta.decimal();
                account.state = crate::core::AccountState::Open;
                account.cash = decision.cash;
                account.limit_day = Some(decision.limit_day);
                account.deposited_today = decision.deposited_today;
                account.withdrawn_today = decision.withdrawn_today;
                account.transferred_today = decision.transferred_today;
                if let Some(effect) = &decision.trade {
                    holding_sum += effect.quantity_delta;
                    account.holdings.insert(effect.asset.clone(), effect.holding);
                }
                prop_assert!(account.cash >= Usd::ZERO);
                prop_assert!(account.holding(&asset) >= Quantity::ZERO);
                prop_assert_eq!(account.cash.decimal(), cash_sum);
                prop_assert_eq!(account.holding(&asset).decimal(), holding_sum);
                prop_assert!(account.deposited_today <= Limits::default().daily_deposit);
                prop_assert!(account.withdrawn_today <= Limits::default().daily_withdrawal);
            }
        }
    }
}
