//! Transfer: cash from one account to another, both read under their leases (or as this
//! coordinator last wrote them), decided here and committed in one transaction with the two
//! ledger entries (TRANSFER_OUT on the sender, TRANSFER_IN on the receiver, one transfer id) and
//! the sender's request record. The request id is the sender's; the receiver must have an
//! account (money never goes to a typo).
//!
//! The assertions here are always on (TigerBeetle's paired assertions): a transfer that could
//! create or destroy a cent is a programmer error, never an expected refusal.

use super::unchanged;
use crate::core::account::Account;
use crate::core::decision::{Decision, Rejection};
use crate::core::ids::{EntryId, Memo, RequestId, TransferId, UserId};
use crate::core::limits::Limits;
use crate::core::money::{Usd, UsdDelta};
use crate::core::principal::Principal;
use crate::core::records::{EntryKind, LedgerEntry, LedgerTransfer};
use crate::core::time::{Millis, UtcDay};

/// The name in leases, logs, metrics and request records.
pub const NAME: &str = "TRANSFER";

/// A validated transfer request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRequest {
    /// The sender, whose request id keys the call.
    pub from: UserId,
    /// The receiver: another user, who must have an account.
    pub to: UserId,
    pub amount: Usd,
    pub memo: Memo,
}

impl TransferRequest {
    /// `TRANSFER 10.00 to bob memo "rent"`: a retry with the same request id must match it.
    pub fn fingerprint(&self) -> String {
        let memo = if self.memo.is_empty() {
            String::new()
        } else {
            format!(" memo {:?}", self.memo.as_str())
        };
        format!("{NAME} {} to {}{memo}", self.amount, self.to)
    }
}

/// Which side of a transfer a ledger entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Sender,
    Receiver,
}

/// The ledger entry of one side of a committed transfer. `sequence` is its place in that
/// account's ledger; only the sender's entry carries the request id (it keys the call).
#[allow(clippy::too_many_arguments)]
pub fn entry(
    request: &TransferRequest,
    transfer_id: &TransferId,
    side: Side,
    decision: &Decision,
    sequence: u64,
    principal: &Principal,
    request_id: Option<&RequestId>,
    now: Millis,
) -> LedgerEntry {
    let (user, counterparty, kind) = match side {
        Side::Sender => (&request.from, &request.to, EntryKind::TransferOut),
        Side::Receiver => (&request.to, &request.from, EntryKind::TransferIn),
    };
    LedgerEntry {
        entry_id: EntryId::new(),
        user_id: user.clone(),
        kind,
        cash_delta: decision.cash_delta,
        cash_after: decision.cash,
        trade: None,
        hold: None,
        transfer: Some(LedgerTransfer {
            transfer_id: transfer_id.clone(),
            counterparty: counterparty.clone(),
            memo: request.memo.clone(),
        }),
        created_at_ms: now,
        request_id: request_id
            .filter(|_| side == Side::Sender)
            .map(|id| id.as_str().to_owned()),
        sequence,
        principal: principal.clone(),
    }
}

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
pub fn above_daily_limit(amount: Usd, limits: &Limits) -> Option<Rejection> {
    super::above_whole_daily_limit("transfer", limits.daily_transfer, amount)
}

/// Decides moving `amount` from `sender` to `receiver` as of the UTC day `today`.
pub fn decide(
    sender: &Account,
    receiver: &Account,
    amount: Usd,
    now: Millis,
    limits: &Limits,
) -> Result<TransferDecision, TransferRefusal> {
    let today = UtcDay::of(now);
    if !sender.exists() {
        return Err(TransferRefusal::SenderMissing);
    }
    if !receiver.exists() {
        return Err(TransferRefusal::ReceiverMissing);
    }
    let reject = TransferRefusal::Rejected;
    let sender_unchanged = unchanged(sender, today);
    let used = super::count_against_daily_limit(
        "transfer",
        limits.daily_transfer,
        sender_unchanged.transferred_today,
        amount,
    )
    .map_err(reject)?;
    let available = sender.available_cash(now);
    if available < amount {
        return Err(reject(Rejection::InsufficientBalance {
            current: available,
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
        let decision = decide(
            &open("100"),
            &open("5"),
            usd("30.25"),
            today().noon(),
            &Limits::default(),
        )
        .unwrap();
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
            decide(&missing, &open("1"), usd("1"), today().noon(), &limits),
            Err(TransferRefusal::SenderMissing)
        );
        assert_eq!(
            decide(&open("10"), &missing, usd("1"), today().noon(), &limits),
            Err(TransferRefusal::ReceiverMissing)
        );
        let short = decide(&open("10"), &open("0"), usd("10.01"), today().noon(), &limits);
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
        let refused = decide(&sender, &open("0"), usd("20"), today().noon(), &limits);
        match refused {
            Err(TransferRefusal::Rejected(rejection)) => assert_eq!(
                rejection.to_string(),
                "Daily transfer limit exceeded. Limit: $5000.00, Used today: $4990.00, Requested: $20.00"
            ),
            other => panic!("{other:?}"),
        }
        let tomorrow = today().next();
        let decision = decide(&sender, &open("0"), usd("20"), tomorrow.noon(), &limits).unwrap();
        assert_eq!(decision.sender.transferred_today, usd("20"));
        assert!(above_daily_limit(usd("5000"), &limits).is_none());
        assert_eq!(
            above_daily_limit(usd("5000.01"), &limits).unwrap().to_string(),
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
                    let Ok(decision) = decide(&accounts[from], &accounts[to], amount, today().noon(), &Limits::default()) else { continue };
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
