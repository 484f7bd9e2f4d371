//! Deciding a transfer: cash from one account to another, both read under their leases (or as
//! this coordinator last wrote them). Pure, like `decide`: the caller commits both accounts'
//! new states, the two ledger entries and the sender's request record in one transaction.
//!
//! The assertions here are always on (TigerBeetle's paired assertions): a transfer that could
//! create or destroy a cent is a programmer error, never an expected refusal.

use super::account::Account;
use super::decide::{Decision, Rejection, unchanged};
use super::limits::Limits;
use super::money::{Usd, UsdDelta};
use super::time::UtcDay;

/// What a transfer decides: the sender's and the receiver's next state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferDecision {
    pub sender: Decision,
    pub receiver: Decision,
}

/// Why a well-formed transfer is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferRefusal {
    /// The sender has no account (NOT_FOUND naming the sender).
    SenderMissing,
    /// The receiver has no account (NOT_FOUND naming the receiver): money never goes to a typo.
    ReceiverMissing,
    /// A business rule (FAILED_PRECONDITION): the sender's balance or daily transfer limit.
    Rejected(Rejection),
}

/// The refusal of a transfer whose amount alone is above the whole daily transfer limit: it
/// holds whatever the accounts, so it is answered before any lease.
pub fn above_daily_transfer_limit(amount: Usd, limits: &Limits) -> Option<Rejection> {
    (amount > limits.daily_transfer).then_some(Rejection::AboveDailyLimit {
        kind: "transfer",
        limit: limits.daily_transfer,
        requested: amount,
    })
}

/// Decides moving `amount` from `sender` to `receiver` as of the UTC day `today`.
pub fn decide_transfer(
    sender: &Account,
    receiver: &Account,
    amount: Usd,
    today: UtcDay,
    limits: &Limits,
) -> Result<TransferDecision, TransferRefusal> {
    if !sender.exists() {
        return Err(TransferRefusal::SenderMissing);
    }
    if !receiver.exists() {
        return Err(TransferRefusal::ReceiverMissing);
    }
    let reject = TransferRefusal::Rejected;
    let sender_unchanged = unchanged(sender, today);
    let used = sender_unchanged
        .transferred_today
        .checked_add(amount)
        .ok_or(reject(Rejection::OutOfRange))?;
    if used > limits.daily_transfer {
        return Err(reject(Rejection::DailyLimitExceeded {
            kind: "transfer",
            limit: limits.daily_transfer,
            used: sender_unchanged.transferred_today,
            requested: amount,
        }));
    }
    if sender.cash < amount {
        return Err(reject(Rejection::InsufficientBalance {
            current: sender.cash,
            required: amount,
        }));
    }
    let receiver_unchanged = unchanged(receiver, today);
    let decision = TransferDecision {
        sender: Decision {
            cash: sender.cash.checked_sub(amount).ok_or(reject(Rejection::OutOfRange))?,
            cash_delta: UsdDelta::debit(amount),
            transferred_today: used,
            ..sender_unchanged
        },
        receiver: Decision {
            cash: receiver.cash.checked_add(amount).ok_or(reject(Rejection::OutOfRange))?,
            cash_delta: UsdDelta::credit(amount),
            ..receiver_unchanged
        },
    };
    assert_transfer_conserves(sender, receiver, &decision);
    Ok(decision)
}

/// Paired assertions on a decided transfer, always on: each side moves by exactly its delta,
/// the deltas cancel, nothing goes negative, and no holding or other daily total moves.
pub fn assert_transfer_conserves(sender: &Account, receiver: &Account, decision: &TransferDecision) {
    let (out, into) = (&decision.sender, &decision.receiver);
    assert_eq!(
        out.cash.decimal(),
        sender.cash.decimal() + out.cash_delta.decimal(),
        "sender: cash after = cash before + delta"
    );
    assert_eq!(
        into.cash.decimal(),
        receiver.cash.decimal() + into.cash_delta.decimal(),
        "receiver: cash after = cash before + delta"
    );
    assert_eq!(
        out.cash_delta.decimal() + into.cash_delta.decimal(),
        rust_decimal::Decimal::ZERO,
        "a transfer creates and destroys nothing"
    );
    assert!(
        out.cash_delta.decimal().is_sign_negative(),
        "the sender pays a positive amount"
    );
    assert!(out.cash >= Usd::ZERO && into.cash >= Usd::ZERO, "no cash goes negative");
    assert!(
        out.trade.is_none() && into.trade.is_none(),
        "a transfer moves no holding"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::AccountState;

    fn today() -> UtcDay {
        UtcDay::from_stored("2026-12-02").unwrap()
    }

    fn usd(raw: &str) -> Usd {
        Usd::parse_amount("amount", raw).unwrap()
    }

    fn open(cash: &str) -> Account {
        Account {
            state: AccountState::Open,
            cash: Usd::from_decimal(cash.parse().expect("a decimal")),
            limit_day: Some(today()),
            ..Account::default()
        }
    }

    /// The sender's cash goes down and the receiver's up by the amount; the sender's daily
    /// transfer total counts it; nothing else moves.
    #[test]
    fn a_transfer_moves_the_amount_and_counts_it_on_the_sender() {
        let decision = decide_transfer(&open("100"), &open("5"), usd("30.25"), today(), &Limits::default()).unwrap();
        assert_eq!(decision.sender.cash, usd("69.75"));
        assert_eq!(decision.receiver.cash, usd("35.25"));
        assert_eq!(decision.sender.transferred_today, usd("30.25"));
        assert_eq!(decision.receiver.transferred_today, Usd::ZERO);
        assert_eq!(
            decision.sender.cash_delta.decimal(),
            -decision.receiver.cash_delta.decimal()
        );
    }

    #[test]
    fn refusals_name_the_missing_party_or_the_rule() {
        let limits = Limits::default();
        let missing = Account::default();
        assert_eq!(
            decide_transfer(&missing, &open("1"), usd("1"), today(), &limits),
            Err(TransferRefusal::SenderMissing)
        );
        assert_eq!(
            decide_transfer(&open("10"), &missing, usd("1"), today(), &limits),
            Err(TransferRefusal::ReceiverMissing)
        );
        let short = decide_transfer(&open("10"), &open("0"), usd("10.01"), today(), &limits);
        match short {
            Err(TransferRefusal::Rejected(rejection)) => assert_eq!(
                rejection.to_string(),
                "Insufficient balance. Current: $10.00, Required: $10.01"
            ),
            other => panic!("{other:?}"),
        }
    }

    /// The daily limit counts what was sent today, resets the next day, and refuses with the
    /// figures; an amount above the whole limit is refused before any lease.
    #[test]
    fn the_daily_transfer_limit_counts_per_day() {
        let limits = Limits::default();
        let mut sender = open("20000");
        sender.transferred_today = usd("4990");
        let refused = decide_transfer(&sender, &open("0"), usd("20"), today(), &limits);
        match refused {
            Err(TransferRefusal::Rejected(rejection)) => assert_eq!(
                rejection.to_string(),
                "Daily transfer limit exceeded. Limit: $5000.00, Used today: $4990.00, Requested: $20.00"
            ),
            other => panic!("{other:?}"),
        }
        let tomorrow = today().next();
        let decision = decide_transfer(&sender, &open("0"), usd("20"), tomorrow, &limits).unwrap();
        assert_eq!(decision.sender.transferred_today, usd("20"));
        assert!(above_daily_transfer_limit(usd("5000"), &limits).is_none());
        assert_eq!(
            above_daily_transfer_limit(usd("5000.01"), &limits).unwrap().to_string(),
            "Daily transfer limit exceeded. Limit: $5000.00, Requested: $5000.01"
        );
    }

    mod properties {
        use proptest::prelude::*;
        use rust_decimal::Decimal;

        use super::*;

        proptest! {
            /// Any sequence of transfers among three accounts conserves the total, never makes a
            /// balance negative, and keeps each account equal to the sum of its deltas.
            #[test]
            fn transfers_conserve_money(moves in proptest::collection::vec((0usize..3, 0usize..3, 1i64..20_000), 1..80)) {
                let mut accounts = [open("100"), open("50"), open("0")];
                let total: Decimal = accounts.iter().map(|account| account.cash.decimal()).sum();
                let mut sums = [Decimal::new(100, 0), Decimal::new(50, 0), Decimal::ZERO];
                for (from, to, cents) in moves {
                    if from == to {
                        continue;
                    }
                    let amount = Usd::from_decimal(Decimal::new(cents, 2));
                    let Ok(decision) = decide_transfer(&accounts[from], &accounts[to], amount, today(), &Limits::default()) else { continue };
                    sums[from] += decision.sender.cash_delta.decimal();
                    sums[to] += decision.receiver.cash_delta.decimal();
                    accounts[from].apply(&decision.sender);
                    accounts[to].apply(&decision.receiver);
                    prop_assert_eq!(accounts.iter().map(|account| account.cash.decimal()).sum::<Decimal>(), total);
                    for (account, sum) in accounts.iter().zip(&sums) {
                        prop_assert!(account.cash >= Usd::ZERO);
                        prop_assert_eq!(account.cash.decimal(), *sum);
                        prop_assert!(account.transferred_today <= Limits::default().daily_transfer);
                    }
                }
            }
        }
    }
}
