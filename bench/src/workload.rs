//! What each call does: which user, which operation, which amounts. Pure: no I/O.

use std::time::Duration;

/// Deposit amount of the default mix.
pub const DEPOSIT_AMOUNT_USD: &str = "50.00";
/// Withdrawal amount of the default mix.
pub const WITHDRAW_AMOUNT_USD: &str = "31.00";
/// The traded asset: SOL at $145.25 in the default catalog (coordinator/catalog.json).
pub const TRADE_ASSET: &str = "SOL";
/// Its catalog price in cents, for the baseline (which has no catalog of its own).
pub const TRADE_PRICE_CENTS: i64 = 14_525;
/// 0.035 SOL is about $5.08: above the $1.00 minimum order value, small enough that the funded
/// cash lasts a long run.
pub const TRADE_QUANTITY: &str = "0.035";
/// The same quantity in thousandths, the baseline's unit for holdings.
pub const TRADE_QUANTITY_THOUSANDTHS: i64 = 35;
const _: () = assert!(TRADE_PRICE_CENTS * TRADE_QUANTITY_THOUSANDTHS / 1000 >= 100);
/// Amount of a transfer: small, so that a payer's funding and the default daily transfer limit
/// ($5,000.00 per sender) both last thousands of transfers.
pub const TRANSFER_AMOUNT_USD: &str = "1.00";

/// The orders workload's cycle (issue 16): a reserved buy of [`ORDER_QUANTITY`] SOL holding
/// quantity x [`ORDER_LIMIT_USD`], then [`ORDER_FILLS`] in turn. A cycle nets $299.50 of cash out
/// of the account, so the workload funds more than the others do (see `Settings::fund_usd`).
pub const ORDER_QUANTITY: &str = "2";
/// The reserved buy's limit: the hold is $300.00.
pub const ORDER_LIMIT_USD: &str = "150.00";
/// The two fills of a cycle: one below the limit, one at it (a buy may fill at its limit), so the
/// second leaves the order FILLED and nothing on hold.
pub const ORDER_FILLS: [Fill; 2] = [
    Fill {
        id: "a",
        quantity: "1",
        price: "149.50",
    },
    Fill {
        id: "b",
        quantity: "1",
        price: "150.00",
    },
];

/// One fill of a reserved order, as an exchange would report it. The id is the fill's
/// idempotency key within its order, so every cycle reuses the same two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    pub id: &'static str,
    pub quantity: &'static str,
    pub price: &'static str,
}

/// A step of an order cycle, timed and counted on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Reserve,
    Fill,
    /// Only after a failed fill: releases what the order still holds, so that failed cycles do not
    /// pile up holds (an account keeps at most 100) or tie up cash until they expire.
    Cancel,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Reserve => "reserve",
            Step::Fill => "fill",
            Step::Cancel => "cancel",
        }
    }
}

/// The design document's load test: one user, arrivals ramping from 30 to 50 per second.
pub const DESIGN_RATE_START_PER_SECOND: f64 = 30.0;
pub const DESIGN_RATE_END_PER_SECOND: f64 = 50.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    Deposit,
    Withdraw,
    Buy,
    Sell,
    /// Cash from the call's user to another (see [`Payees`]).
    Transfer,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Operation::Deposit,
        Operation::Withdraw,
        Operation::Buy,
        Operation::Sell,
        Operation::Transfer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::Deposit => "deposit",
            Operation::Withdraw => "withdraw",
            Operation::Buy => "buy",
            Operation::Sell => "sell",
            Operation::Transfer => "transfer",
        }
    }
}

/// Relative weights of the mutations; at least one is positive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    weights: [u32; 5],
}

impl Mix {
    /// Weights of the four single-account mutations, in the order of [`Operation::ALL`], and no
    /// transfers; `None` when all are zero.
    pub fn new(deposit: u32, withdraw: u32, buy: u32, sell: u32) -> Option<Mix> {
        let weights = [deposit, withdraw, buy, sell, 0];
        (weights.iter().map(|&weight| u64::from(weight)).sum::<u64>() > 0).then_some(Mix { weights })
    }

    /// Every call is `operation`.
    pub fn only(operation: Operation) -> Mix {
        let mut weights = [0; 5];
        weights[operation as usize] = 1;
        Mix { weights }
    }

    pub fn weight(&self, operation: Operation) -> u32 {
        self.weights[operation as usize]
    }

    /// Picks an operation for `draw`, a uniform number in `0..total weight`.
    pub fn pick(&self, mut draw: u64) -> Operation {
        for operation in Operation::ALL {
            let weight = u64::from(self.weight(operation));
            if draw < weight {
                return operation;
            }
            draw -= weight;
        }
        unreachable!("draw is below the total weight")
    }

    pub fn total(&self) -> u64 {
        self.weights.iter().map(|&weight| u64::from(weight)).sum()
    }

    pub fn random(&self, random: &mut fastrand::Rng) -> Operation {
        self.pick(random.u64(0..self.total()))
    }
}

/// Who is called.
#[derive(Debug, Clone, PartialEq)]
pub struct Users {
    /// Every user id starts with this, unique per run, so that daily limits and balances of
    /// earlier runs on the same storage do not leak into this one.
    pub prefix: String,
    pub count: usize,
}

impl Users {
    pub fn id(&self, index: usize) -> String {
        format!("{}{index}", self.prefix)
    }

    pub fn all(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.count).map(|index| self.id(index))
    }

    pub fn random(&self, random: &mut fastrand::Rng) -> String {
        self.id(random.usize(0..self.count))
    }

    /// The next call: its operation drawn from `mix`, its user uniform; a transfer's payer and
    /// payee as `payees` says (two distinct users, so at least two users for transfers).
    pub fn call(&self, mix: &Mix, payees: Payees, random: &mut fastrand::Rng) -> Call {
        let operation = mix.random(random);
        if operation != Operation::Transfer {
            return Call {
                user: self.random(random),
                operation,
                receiver: None,
            };
        }
        assert!(self.count >= 2, "a transfer needs two users (checked by the plan)");
        let (payer, payee) = match payees {
            Payees::Uniform => {
                let payer = random.usize(0..self.count);
                // Uniform over the others: skip the payer's own index.
                let other = random.usize(0..self.count - 1);
                (payer, if other >= payer { other + 1 } else { other })
            }
            Payees::Hot => (random.usize(1..self.count), HOT_RECEIVER),
        };
        Call {
            user: self.id(payer),
            operation,
            receiver: Some(self.id(payee)),
        }
    }
}

/// The user every transfer of the hot-receiver workload pays.
pub const HOT_RECEIVER: usize = 0;

/// Whom a transfer pays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payees {
    /// Another user, uniform: random pairs.
    Uniform,
    /// Always user [`HOT_RECEIVER`]; every other user pays it.
    Hot,
}

/// One call: on whose account, which operation, and the payee of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub user: String,
    pub operation: Operation,
    pub receiver: Option<String>,
}

/// When calls are sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// `callers` loops, each sending its next call when the previous reply is in.
    Closed { callers: usize },
    /// Calls at intended times: a rate ramping linearly from `start` to `end` per second over the
    /// run (equal for a fixed rate), whatever the replies do.
    Open { start: f64, end: f64 },
}

/// The intended send time of arrival number `index` (0-based) for a rate ramping linearly from
/// `start` to `end` per second over `duration`, or `None` when it falls after the run. With
/// `N(t) = start t + (end - start) t² / 2D` arrivals by time `t`, arrival `i` is at `N(t) = i`.
pub fn intended_offset(index: u64, start: f64, end: f64, duration: Duration) -> Option<Duration> {
    let seconds = duration.as_secs_f64();
    let target = index as f64;
    let slope = (end - start) / seconds;
    let offset = if slope.abs() < 1e-12 {
        target / start
    } else {
        // a t² + b t - i = 0 with a = slope / 2, b = start; the positive root.
        let a = slope / 2.0;
        let discriminant = start * start + 4.0 * a * target;
        if discriminant < 0.0 {
            return None;
        }
        (-start + discriminant.sqrt()) / (2.0 * a)
    };
    (offset.is_finite() && offset >= 0.0 && offset < seconds).then(|| Duration::from_secs_f64(offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Picking walks the weights in order, and a zero weight is never picked.
    #[test]
    fn pick_follows_the_weights() {
        let mix = Mix::new(2, 0, 1, 1).expect("positive");
        assert_eq!(mix.total(), 4);
        let picked: Vec<Operation> = (0..4).map(|draw| mix.pick(draw)).collect();
        assert_eq!(
            picked,
            [Operation::Deposit, Operation::Deposit, Operation::Buy, Operation::Sell]
        );
        assert_eq!(Mix::new(0, 0, 0, 0), None);
    }

    /// A transfer pays another user: uniform pairs are distinct and reach everyone; the hot
    /// receiver is paid by everyone else and never pays.
    #[test]
    fn transfers_pay_another_user() {
        let users = Users {
            prefix: "u".to_owned(),
            count: 3,
        };
        let mix = Mix::only(Operation::Transfer);
        let mut random = fastrand::Rng::with_seed(7);
        let mut pairs = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let call = users.call(&mix, Payees::Uniform, &mut random);
            let receiver = call.receiver.expect("a payee");
            assert_ne!(call.user, receiver);
            pairs.insert((call.user, receiver));
        }
        assert_eq!(pairs.len(), 6, "every ordered pair of 3 users: {pairs:?}");
        let mut payers = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let call = users.call(&mix, Payees::Hot, &mut random);
            assert_eq!(call.receiver.as_deref(), Some("u0"));
            payers.insert(call.user);
        }
        assert_eq!(payers.into_iter().collect::<Vec<_>>(), ["u1", "u2"]);
        let deposit = users.call(&Mix::only(Operation::Deposit), Payees::Hot, &mut random);
        assert_eq!((deposit.operation, deposit.receiver), (Operation::Deposit, None));
    }

    /// A fixed rate spaces arrivals evenly and stops at the end of the run.
    #[test]
    fn fixed_rate_is_even() {
        let duration = Duration::from_secs(2);
        assert_eq!(intended_offset(0, 10.0, 10.0, duration), Some(Duration::ZERO));
        assert_eq!(
            intended_offset(5, 10.0, 10.0, duration),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            intended_offset(19, 10.0, 10.0, duration),
            Some(Duration::from_millis(1900))
        );
        assert_eq!(intended_offset(20, 10.0, 10.0, duration), None);
    }

    /// The design ramp (30 → 50 per second over 10 s) sends 400 calls, the area under the ramp.
    #[test]
    fn ramp_sends_the_area_under_it() {
        let duration = Duration::from_secs(10);
        let count = (0..)
            .take_while(|&index| intended_offset(index, 30.0, 50.0, duration).is_some())
            .count();
        assert_eq!(count, 400);
        // Arrivals come closer together as the rate grows.
        let gap = |index| {
            intended_offset(index + 1, 30.0, 50.0, duration).unwrap()
                - intended_offset(index, 30.0, 50.0, duration).unwrap()
        };
        assert!(gap(0) > gap(390));
    }
}
