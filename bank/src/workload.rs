//! The clients: random deposits, withdrawals, buys, sells, transfers between the bank's users and
//! order flows (a reserved order, then fills of it by fill id, a cancel, or neither until it
//! expires), each call with its own request id (a fill: its fill id), retried with that same id on
//! UNAVAILABLE, ABORTED and deadline errors. Every call ends in the history as ok, failed
//! (definitely not applied) or unknown (may have applied), with what it asked for, so the verdict
//! can add up what it should have done.

use std::collections::BTreeMap;
use std::time::Duration;

use backon::BackoffBuilder;
use rust_decimal::Decimal;

use lockstep::coordinator::v1 as pb;
use lockstep::coordinator::v1::coordinator_client::CoordinatorClient;
use lockstep_coordinator::core::records::TradeSide;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// Attempts per operation, all with the same request id.
pub const ATTEMPTS_MAX: u32 = 8;
/// First pause before a retry; doubles up to `RETRY_DELAY_MAX`, and each pause is lengthened by
/// a random share of itself (up to double).
pub const RETRY_DELAY_MIN: Duration = Duration::from_millis(50);
pub const RETRY_DELAY_MAX: Duration = Duration::from_secs(1);
/// Each RPC's deadline (sent as grpc-timeout).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// The assets the workload trades: cheap, so quantities stay small and orders under the limit.
/// Quantities are drawn so that every order is worth at least the default minimum order value
/// (1.00) at the built-in catalog's prices (ADA 0.45, DOGE 0.12345678, SOL 145.25).
pub const ASSETS: [&str; 3] = ["ADA", "DOGE", "SOL"];

/// Prices of the reserved orders, by asset: the built-in catalog's, which fills are given as the
/// exchange's price, and the limits a buy and a sell reserve with, a little beyond it so that a
/// fill at the catalog price respects them (a buy's above, a sell's below). Fills go at the
/// catalog price or at the limit itself.
pub const ORDER_PRICES: [(&str, OrderPrices); 3] = [
    (
        "ADA",
        OrderPrices {
            catalog: "0.45",
            buy_limit: "0.46",
            sell_limit: "0.44",
        },
    ),
    (
        "DOGE",
        OrderPrices {
            catalog: "0.12345678",
            buy_limit: "0.126",
            sell_limit: "0.12",
        },
    ),
    (
        "SOL",
        OrderPrices {
            catalog: "145.25",
            buy_limit: "148",
            sell_limit: "142.5",
        },
    ),
];

#[derive(Debug, Clone, Copy)]
pub struct OrderPrices {
    pub catalog: &'static str,
    pub buy_limit: &'static str,
    pub sell_limit: &'static str,
}

/// A client's next step is an order flow one time in this many; otherwise one of the five
/// single calls. A flow makes two to five calls.
pub const ORDER_FLOW_ONE_IN: u32 = 6;
/// Short expiries of reserved orders, in seconds (a third of them); the rest take the default
/// (a day), and stay on hold to the end unless filled or cancelled.
pub const SHORT_EXPIRY_SECONDS: std::ops::RangeInclusive<u64> = 1..=3;
/// How far past its expiry a flow that waits for it sleeps before its next step.
pub const PAST_EXPIRY: Duration = Duration::from_millis(300);

/// The memo of the workload's transfers.
pub const TRANSFER_MEMO: &str = "bank transfer";

/// What an operation asked for: the amounts a client knows before the coordinator decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Deposit {
        amount: Decimal,
    },
    Withdraw {
        amount: Decimal,
    },
    /// A market buy or sell: its cash is decided by the coordinator from the catalog price.
    Buy,
    Sell,
    /// Cash from the operation's user to `to`.
    Transfer {
        to: String,
        amount: Decimal,
    },
    /// ReserveOrder: a buy holds `quantity` x `limit` of cash (rounded up to the cent), a sell
    /// `quantity` of `asset`; nothing moves.
    Reserve {
        side: TradeSide,
        asset: String,
        quantity: Decimal,
        limit: Decimal,
    },
    /// FillOrder of the reserved order `order_id` (of the operation's user, acknowledged): the
    /// operation's request id is the fill's key, `fill:{order_id}:{fill_id}`, which its FILL
    /// entry carries. Its cash is decided by the order's fills before it (rounded once per
    /// order), which the verdict replays.
    Fill {
        order_id: String,
        fill_id: String,
        side: TradeSide,
        asset: String,
        quantity: Decimal,
        price: Decimal,
    },
    /// CancelOrder of the reserved order `order_id`: releases what it still holds.
    Cancel {
        order_id: String,
    },
}

impl Action {
    /// The call, for the report's counts.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Deposit { .. } => "DEPOSIT",
            Action::Withdraw { .. } => "WITHDRAW",
            Action::Buy => "BUY",
            Action::Sell => "SELL",
            Action::Transfer { .. } => "TRANSFER",
            Action::Reserve { .. } => "RESERVE",
            Action::Fill { .. } => "FILL",
            Action::Cancel { .. } => "CANCEL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The coordinator acknowledged it: applied exactly once, with this ledger entry (the sender's
    /// TRANSFER_OUT for a transfer). `transfer_id` is a transfer's; `trade_cash` the cash a trade
    /// moved by its reply's order total (negative for a buy); `order_id` and `order_total` an
    /// order call's order as replied (for a fill, the total is the cash its order moved so far).
    Ok {
        transaction_id: String,
        transfer_id: Option<String>,
        trade_cash: Option<Decimal>,
        order_id: Option<String>,
        order_total: Option<Decimal>,
    },
    /// Definitely not applied (a business refusal, or every attempt refused before any effect).
    Failed { code: Code, message: String },
    /// Some attempt's fate is unknown and no later attempt settled it: may or may not have applied.
    Unknown { last: String },
}

#[derive(Debug, Clone)]
pub struct Operation {
    pub request_id: String,
    /// The account the request id is keyed on: the sender of a transfer.
    pub user: String,
    pub action: Action,
    pub description: String,
    pub outcome: Outcome,
    pub attempts: u32,
}

#[derive(Debug, Clone)]
enum Request {
    Deposit(pb::DepositRequest),
    Withdraw(pb::WithdrawRequest),
    Buy(pb::PlaceOrderRequest),
    Sell(pb::PlaceOrderRequest),
    Transfer(pb::TransferRequest),
    Reserve(pb::ReserveOrderRequest),
    Fill(pb::FillOrderRequest),
    Cancel(pb::CancelOrderRequest),
}

/// What an acknowledged call answered.
#[derive(Debug, Clone, Default)]
struct Acknowledged {
    transaction_id: String,
    transfer_id: Option<String>,
    trade_cash: Option<Decimal>,
    order_id: Option<String>,
    order_total: Option<Decimal>,
}

/// Lazily connected channels, one per coordinator; an attempt goes to a random one, as behind
/// a load balancer. Reconnects by itself after a coordinator restarts.
pub fn channels(endpoints: &[String]) -> Vec<CoordinatorClient<Channel>> {
    channels_with(endpoints, Some(RPC_TIMEOUT))
}

/// As [`channels`], each call bounded by `timeout` (None for streams, which last as long as the
/// test).
fn channels_with(endpoints: &[String], timeout: Option<Duration>) -> Vec<CoordinatorClient<Channel>> {
    endpoints
        .iter()
        .map(|endpoint| {
            let mut endpoint = Endpoint::from_shared(endpoint.clone())
                .expect("coordinator endpoint")
                .connect_timeout(Duration::from_secs(1));
            if let Some(timeout) = timeout {
                endpoint = endpoint.timeout(timeout);
            }
            CoordinatorClient::new(endpoint.connect_lazy())
        })
        .collect()
}

/// A random asset, and a quantity of it worth at least the minimum order value at the catalog
/// price, and at a reserved sell's limit.
fn random_quantity(random: &mut fastrand::Rng) -> (&'static str, String) {
    let asset = ASSETS[random.usize(..ASSETS.len())];
    let quantity = match asset {
        // Worth 1.45 to 85.70 (1.42 and up at the sell limit).
        "SOL" => format!("0.{:02}", random.u32(1..60)),
        // Worth about 1.35 to 89.96 (1.32 and up at the sell limit).
        "ADA" => format!("{}.{}", random.u32(3..200), random.u32(0..10)),
        // Worth about 1.11 to 98.76 (1.08 and up at the sell limit).
        _ => format!("{}.{}", random.u32(9..800), random.u32(0..10)),
    };
    (asset, quantity)
}

/// A random operation for `user`, with `request_id`; a transfer goes to another of `users`.
fn random_request(
    random: &mut fastrand::Rng,
    user: &str,
    users: &[String],
    request_id: &str,
) -> (Request, Action, String) {
    let cents = |random: &mut fastrand::Rng, whole: std::ops::Range<u32>| {
        format!("{}.{:02}", random.u32(whole), random.u32(0..100))
    };
    let decimal = |amount: &str| amount.parse::<Decimal>().expect("a plain amount");
    let (asset, quantity) = random_quantity(random);
    let order = |quantity: &str| pb::PlaceOrderRequest {
        user_id: user.to_owned(),
        asset: asset.to_owned(),
        quantity: quantity.to_owned(),
        limit_price: None,
        request_id: request_id.to_owned(),
    };
    let others: Vec<&String> = users.iter().filter(|other| *other != user).collect();
    let kinds = if others.is_empty() { 4 } else { 5 };
    match random.u32(0..kinds) {
        0 => {
            let amount = cents(random, 1..200);
            let description = format!("DEPOSIT {amount}");
            let action = Action::Deposit {
                amount: decimal(&amount),
            };
            let request = pb::DepositRequest {
                user_id: user.to_owned(),
                amount,
                request_id: request_id.to_owned(),
            };
            (Request::Deposit(request), action, description)
        }
        1 => {
            let amount = cents(random, 1..150);
            let description = format!("WITHDRAW {amount}");
            let action = Action::Withdraw {
                amount: decimal(&amount),
            };
            let request = pb::WithdrawRequest {
                settlement: 0,
                user_id: user.to_owned(),
                amount,
                request_id: request_id.to_owned(),
            };
            (Request::Withdraw(request), action, description)
        }
        2 => (
            Request::Buy(order(&quantity)),
            Action::Buy,
            format!("BUY {quantity} {asset}"),
        ),
        3 => (
            Request::Sell(order(&quantity)),
            Action::Sell,
            format!("SELL {quantity} {asset}"),
        ),
        _ => {
            let to = others[random.usize(..others.len())].clone();
            let amount = cents(random, 1..150);
            let description = format!("TRANSFER {amount} to {to}");
            let action = Action::Transfer {
                to: to.clone(),
                amount: decimal(&amount),
            };
            let request = pb::TransferRequest {
                from_user_id: user.to_owned(),
                to_user_id: to,
                amount,
                memo: TRANSFER_MEMO.to_owned(),
                request_id: request_id.to_owned(),
            };
            (Request::Transfer(request), action, description)
        }
    }
}

/// The bearer token of the bank's clients: the coordinators run with authentication on, and
/// their auth file gives this token the `trader` role, as user-service's and order-service's.
pub const CLIENT_TOKEN: &str = "bank-client-token-0123456789abcdef";
/// The principal the auth file names for [`CLIENT_TOKEN`].
pub const CLIENT_PRINCIPAL: &str = "bank-client";

/// The token the coordinators send each other when forwarding (account affinity).
pub const PEER_TOKEN: &str = "bank-peer-token-0123456789abcdef";

/// The auth file lines of the bank's clients and of the coordinators as each other's peers.
pub fn auth_file() -> String {
    format!(
        "{CLIENT_PRINCIPAL} trader {}\nbank-peer peer {}\n",
        lockstep_coordinator::auth::hash_token(CLIENT_TOKEN),
        lockstep_coordinator::auth::hash_token(PEER_TOKEN)
    )
}

/// `message` with the clients' bearer token.
fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {CLIENT_TOKEN}").parse().expect("a valid header value");
    request.metadata_mut().insert("authorization", value);
    request
}

async fn send(client: &mut CoordinatorClient<Channel>, request: &Request) -> Result<Acknowledged, tonic::Status> {
    let cash = |reply: pb::CashReply| Acknowledged {
        transaction_id: reply.transaction_id,
        ..Acknowledged::default()
    };
    // A trade's cash is its order's total, out for a buy and in for a sell; a total that does not
    // parse is left to the verdict, which then finds the trade unexplained.
    let order = |reply: pb::OrderReply| {
        let total = reply
            .order
            .as_ref()
            .and_then(|order| order.total.parse::<Decimal>().ok());
        Acknowledged {
            transaction_id: reply.transaction_id,
            order_id: reply.order.map(|order| order.order_id),
            order_total: total,
            ..Acknowledged::default()
        }
    };
    let trade = |reply: pb::OrderReply, sign: Decimal| {
        let acknowledged = order(reply);
        Acknowledged {
            trade_cash: acknowledged.order_total.map(|total| total * sign),
            ..acknowledged
        }
    };
    Ok(match request.clone() {
        Request::Deposit(request) => cash(client.deposit(authorized(request)).await?.into_inner()),
        Request::Withdraw(request) => cash(client.withdraw(authorized(request)).await?.into_inner()),
        Request::Buy(request) => trade(
            client.place_buy(authorized(request)).await?.into_inner(),
            Decimal::NEGATIVE_ONE,
        ),
        Request::Sell(request) => trade(client.place_sell(authorized(request)).await?.into_inner(), Decimal::ONE),
        Request::Transfer(request) => {
            let reply = client.transfer(authorized(request)).await?.into_inner();
            Acknowledged {
                transaction_id: reply.transaction_id,
                transfer_id: Some(reply.transfer_id),
                ..Acknowledged::default()
            }
        }
        Request::Reserve(request) => order(client.reserve_order(authorized(request)).await?.into_inner()),
        Request::Fill(request) => order(client.fill_order(authorized(request)).await?.into_inner()),
        Request::Cancel(request) => order(client.cancel_order(authorized(request)).await?.into_inner()),
    })
}

/// Runs one operation to its end: ok, failed, or unknown after `ATTEMPTS_MAX` attempts.
async fn run_operation(
    clients: &mut [CoordinatorClient<Channel>],
    random: &mut fastrand::Rng,
    user: &str,
    request: Request,
    action: Action,
    request_id: String,
    description: String,
) -> Operation {
    let mut indeterminate: Option<String> = None;
    let mut last_refusal = None;
    // Seeded from the client's generator, so that clients do not retry in step.
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(RETRY_DELAY_MIN)
        .with_max_delay(RETRY_DELAY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .with_jitter_seed(random.u64(..))
        .with_max_times(ATTEMPTS_MAX as usize - 1)
        .build();
    let mut attempts = 0;
    let outcome = loop {
        attempts += 1;
        let node = random.usize(..clients.len());
        match send(&mut clients[node], &request).await {
            Ok(acknowledged) => {
                break Outcome::Ok {
                    transaction_id: acknowledged.transaction_id,
                    transfer_id: acknowledged.transfer_id,
                    trade_cash: acknowledged.trade_cash,
                    order_id: acknowledged.order_id,
                    order_total: acknowledged.order_total,
                };
            }
            Err(status) => match status.code() {
                Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument => {
                    break Outcome::Failed {
                        code: status.code(),
                        message: status.message().to_owned(),
                    };
                }
                // ABORTED: this attempt applied nothing (busy lease, or fenced before commit).
                Code::Aborted => last_refusal = Some(status),
                // Anything else may have applied: storage or connection trouble, a deadline, a
                // coordinator killed mid-request.
                _ => indeterminate = Some(format!("{:?}: {}", status.code(), status.message())),
            },
        }
        let Some(delay) = delays.next() else {
            break match (indeterminate, last_refusal) {
                (Some(last), _) => Outcome::Unknown { last },
                (None, Some(status)) => Outcome::Failed {
                    code: status.code(),
                    message: status.message().to_owned(),
                },
                (None, None) => unreachable!("every failed attempt sets one of the two"),
            };
        };
        tokio::time::sleep(delay).await;
    };
    Operation {
        request_id,
        user: user.to_owned(),
        action,
        description,
        outcome,
        attempts,
    }
}

/// Opening deposits, one per user, retried until acknowledged (or recorded as unknown).
pub async fn open_accounts(endpoints: &[String], users: &[String], seed: u64) -> Vec<Operation> {
    let mut clients = channels(endpoints);
    let mut random = fastrand::Rng::with_seed(seed);
    let mut history = Vec::new();
    for user in users {
        let request_id = format!("open-{user}");
        let request = pb::DepositRequest {
            user_id: user.clone(),
            amount: "1000.00".into(),
            request_id: request_id.clone(),
        };
        let operation = run_operation(
            &mut clients,
            &mut random,
            user,
            Request::Deposit(request),
            Action::Deposit {
                amount: Decimal::new(100_000, 2),
            },
            request_id,
            "DEPOSIT 1000.00".into(),
        )
        .await;
        history.push(operation);
    }
    history
}

/// Smallest quantity a fill may have (the coordinator's trade minimum): fills are split in
/// thousandths.
const FILL_QUANTITY_MIN: Decimal = Decimal::from_parts(1, 0, 0, false, 3);

/// One order flow of `user`: a reserved buy or sell (with `request_id`), then, if it was
/// acknowledged, one to three fills (each with its own fill id) of all of the order or a part,
/// and a cancel after a part or instead of any fill, or nothing more (the order holds until it
/// expires, or to the end). A third of the orders expire in 1-3 s; half of those wait past their
/// expiry before one of their steps, which must then be refused. Each call is an operation of
/// its own; a fill or cancel whose reserve did not end ok is not sent (its order is unknown).
async fn order_flow(
    clients: &mut [CoordinatorClient<Channel>],
    random: &mut fastrand::Rng,
    user: &str,
    request_id: &str,
) -> Vec<Operation> {
    let decimal = |raw: &str| raw.parse::<Decimal>().expect("a plain amount");
    let side = if random.bool() { TradeSide::Buy } else { TradeSide::Sell };
    let (asset, quantity) = random_quantity(random);
    let prices = ORDER_PRICES
        .iter()
        .find(|(symbol, _)| *symbol == asset)
        .map(|(_, prices)| *prices)
        .expect("every asset the workload trades has order prices");
    let limit = match side {
        TradeSide::Buy => prices.buy_limit,
        TradeSide::Sell => prices.sell_limit,
    };
    let short = random.u32(..3) == 0;
    let expires_in_seconds = if short { random.u64(SHORT_EXPIRY_SECONDS) } else { 0 };
    let request = pb::ReserveOrderRequest {
        user_id: user.to_owned(),
        side: match side {
            TradeSide::Buy => pb::OrderSide::Buy,
            TradeSide::Sell => pb::OrderSide::Sell,
        } as i32,
        asset: asset.to_owned(),
        quantity: quantity.clone(),
        limit_price: limit.to_owned(),
        expires_in_seconds,
        request_id: request_id.to_owned(),
    };
    let expiry = if short {
        format!(" for {expires_in_seconds}s")
    } else {
        String::new()
    };
    let description = format!("RESERVE {} {quantity} {asset} limit {limit}{expiry}", side.as_str());
    let action = Action::Reserve {
        side,
        asset: asset.to_owned(),
        quantity: decimal(&quantity),
        limit: decimal(limit),
    };
    let reserve = run_operation(
        clients,
        random,
        user,
        Request::Reserve(request),
        action,
        request_id.to_owned(),
        description,
    )
    .await;
    // The order expires at most this long after now: it was decided before its reply.
    let expired_by = tokio::time::Instant::now() + Duration::from_secs(expires_in_seconds) + PAST_EXPIRY;
    let order_id = match &reserve.outcome {
        Outcome::Ok {
            order_id: Some(order_id),
            ..
        } => order_id.clone(),
        _ => return vec![reserve],
    };
    let mut history = vec![reserve];

    // The plan: fills of all or a part, then a cancel, or neither.
    let fills = if random.u32(..6) == 0 { 0 } else { random.usize(1..=3) };
    let whole = fills > 0 && random.u32(..3) != 0;
    let cancel = !whole && (fills == 0 || random.bool());
    let steps = fills + usize::from(cancel);
    let late_at = (short && random.bool()).then(|| random.usize(..steps));
    let mut remaining = decimal(&quantity);
    for step in 0..steps {
        if late_at == Some(step) {
            tokio::time::sleep_until(expired_by).await;
        }
        let operation = if step < fills {
            if remaining.is_zero() {
                continue;
            }
            // A share of what remains, in thousandths, leaving at least the smallest fill.
            let share = (remaining * Decimal::new(random.i64(20..=60), 2))
                .round_dp_with_strategy(3, rust_decimal::RoundingStrategy::ToZero)
                .max(FILL_QUANTITY_MIN);
            let part = if (whole && step + 1 == fills) || remaining - share < FILL_QUANTITY_MIN {
                remaining
            } else {
                share
            };
            remaining -= part;
            let price = if random.bool() { prices.catalog } else { limit };
            let fill_id = format!("exec-{step}");
            let description = format!("FILL {part} {asset} at {price} of {order_id} ({fill_id})");
            let request = pb::FillOrderRequest {
                user_id: user.to_owned(),
                order_id: order_id.clone(),
                fill_id: fill_id.clone(),
                quantity: part.to_string(),
                price: price.to_owned(),
            };
            let action = Action::Fill {
                order_id: order_id.clone(),
                fill_id: fill_id.clone(),
                side,
                asset: asset.to_owned(),
                quantity: part,
                price: decimal(price),
            };
            let key = format!("fill:{order_id}:{fill_id}");
            run_operation(clients, random, user, Request::Fill(request), action, key, description).await
        } else {
            let cancel_id = format!("{request_id}-cancel");
            let request = pb::CancelOrderRequest {
                user_id: user.to_owned(),
                order_id: order_id.clone(),
                request_id: cancel_id.clone(),
            };
            let action = Action::Cancel {
                order_id: order_id.clone(),
            };
            let description = format!("CANCEL {order_id}");
            run_operation(
                clients,
                random,
                user,
                Request::Cancel(request),
                action,
                cancel_id,
                description,
            )
            .await
        };
        history.push(operation);
    }
    history
}

/// One client: random operations on random users until `until`.
pub async fn client(
    index: usize,
    endpoints: Vec<String>,
    users: Vec<String>,
    seed: u64,
    until: tokio::time::Instant,
) -> Vec<Operation> {
    let mut clients = channels(&endpoints);
    let mut random = fastrand::Rng::with_seed(seed.wrapping_add(index as u64 * 7919));
    let mut history = Vec::new();
    let mut sequence = 0;
    while tokio::time::Instant::now() < until {
        let user = users[random.usize(..users.len())].clone();
        let request_id = format!("c{index}-{sequence}-{seed}");
        sequence += 1;
        if random.u32(..ORDER_FLOW_ONE_IN) == 0 {
            history.extend(order_flow(&mut clients, &mut random, &user, &request_id).await);
            continue;
        }
        let (request, action, description) = random_request(&mut random, &user, &users, &request_id);
        let operation = run_operation(
            &mut clients,
            &mut random,
            &user,
            request,
            action,
            request_id,
            description,
        );
        history.push(operation.await);
    }
    history
}

/// What a watcher of one account saw through kills and faults.
#[derive(Debug, Default)]
pub struct Watched {
    /// The last sequence received in order.
    pub last: std::sync::atomic::AtomicU64,
    /// Entries out of order (a gap): none may happen.
    pub gaps: std::sync::Mutex<Vec<String>>,
    /// Entries received again after a reconnect (none, when resuming from the last sequence).
    pub repeated: std::sync::atomic::AtomicU64,
    /// Streams that ended (a kill, a drain, an injected fault) and were opened again.
    pub reconnects: std::sync::atomic::AtomicU64,
}

/// Follows `user`'s ledger with WatchLedger until aborted, through kills and faults: whenever
/// the stream ends it reconnects to the next coordinator with the last sequence it received,
/// checking that each entry is the one after it.
pub async fn watch_account(user: String, endpoints: Vec<String>, watched: std::sync::Arc<Watched>) {
    use std::sync::atomic::Ordering;
    let clients = channels_with(&endpoints, None);
    for turn in 0.. {
        let mut client = clients[turn % clients.len()].clone();
        let after_sequence = watched.last.load(Ordering::SeqCst);
        let request = authorized(pb::WatchLedgerRequest {
            user_id: user.clone(),
            after_sequence,
        });
        if let Ok(response) = client.watch_ledger(request).await {
            let mut stream = response.into_inner();
            while let Ok(Some(event)) = stream.message().await {
                let Some(pb::ledger_event::Event::Entry(entry)) = event.event else {
                    continue;
                };
                let last = watched.last.load(Ordering::SeqCst);
                if entry.sequence <= last {
                    watched.repeated.fetch_add(1, Ordering::SeqCst);
                } else if entry.sequence == last + 1 {
                    watched.last.store(entry.sequence, Ordering::SeqCst);
                } else {
                    watched.gaps.lock().expect("gaps").push(format!(
                        "{user}: after sequence {last} the watch sent {}",
                        entry.sequence
                    ));
                    watched.last.store(entry.sequence, Ordering::SeqCst);
                }
            }
        }
        watched.reconnects.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sequence of `user`'s last ledger entry, asked of any coordinator that answers (ten
/// rounds: faults are injected into reads too).
pub async fn last_sequence(endpoints: &[String], user: &str) -> Option<u64> {
    for _ in 0..10 {
        for mut client in channels(endpoints) {
            let request = authorized(pb::ListLedgerRequest {
                user_id: user.to_owned(),
                page_size: 1,
                ..Default::default()
            });
            if let Ok(reply) = client.list_ledger(request).await {
                return Some(reply.into_inner().entries.first().map_or(0, |entry| entry.sequence));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// What the feed consumer saw through kills and faults.
#[derive(Debug, Default)]
pub struct Fed {
    /// Per account, the newest sequence received in order.
    pub newest: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Entries that arrived before the one ahead of them: none may happen.
    pub out_of_order: std::sync::Mutex<Vec<String>>,
    /// Entries received again (re-deliveries after a reconnect, or of a late commit's record).
    pub repeated: std::sync::atomic::AtomicU64,
    /// Each entry received, by account and sequence: its id, so that a re-delivery is checked
    /// to be the same entry.
    ids: std::sync::Mutex<BTreeMap<(String, u64), String>>,
    /// Streams that ended and were opened again with the last cursor.
    pub reconnects: std::sync::atomic::AtomicU64,
    cursor: std::sync::Mutex<String>,
}

impl Fed {
    /// Whether every account of `last` (its last sequence) was received up to it.
    pub fn reached(&self, last: &BTreeMap<String, u64>) -> bool {
        let newest = self.newest.lock().expect("newest");
        last.iter()
            .all(|(user, last)| newest.get(user).copied().unwrap_or(0) >= *last)
    }
}

/// Follows every account's ledger with WatchFeed until aborted, through kills and faults:
/// whenever the stream ends it reconnects to the next coordinator with the last cursor it
/// received, checking that each new entry of an account is the one after the last.
pub async fn follow_feed(endpoints: Vec<String>, fed: std::sync::Arc<Fed>) {
    use std::sync::atomic::Ordering;
    let clients = channels_with(&endpoints, None);
    for turn in 0.. {
        let mut client = clients[turn % clients.len()].clone();
        let cursor = fed.cursor.lock().expect("cursor").clone();
        let request = authorized(pb::WatchFeedRequest {
            cursor,
            ..Default::default()
        });
        if let Ok(response) = client.watch_feed(request).await {
            let mut stream = response.into_inner();
            while let Ok(Some(event)) = stream.message().await {
                match event.event {
                    Some(pb::feed_event::Event::Entry(pb::FeedEntry {
                        entry: Some(entry),
                        cursor,
                    })) => {
                        let key = (entry.user_id.clone(), entry.sequence);
                        let first_id = fed
                            .ids
                            .lock()
                            .expect("ids")
                            .entry(key)
                            .or_insert_with(|| entry.transaction_id.clone())
                            .clone();
                        if first_id != entry.transaction_id {
                            fed.out_of_order.lock().expect("out of order").push(format!(
                                "feed: {} #{} arrived as {} and again as {}",
                                entry.user_id, entry.sequence, first_id, entry.transaction_id
                            ));
                        }
                        let mut newest = fed.newest.lock().expect("newest");
                        let last = newest.entry(entry.user_id.clone()).or_insert(0);
                        if entry.sequence <= *last {
                            fed.repeated.fetch_add(1, Ordering::SeqCst);
                        } else {
                            if entry.sequence != *last + 1 {
                                fed.out_of_order.lock().expect("out of order").push(format!(
                                    "feed: {} #{} arrived after #{last}",
                                    entry.user_id, entry.sequence
                                ));
                            }
                            *last = entry.sequence;
                        }
                        *fed.cursor.lock().expect("cursor") = cursor;
                    }
                    Some(pb::feed_event::Event::Progress(progress)) => {
                        *fed.cursor.lock().expect("cursor") = progress.cursor;
                    }
                    _ => {}
                }
            }
        }
        fed.reconnects.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
