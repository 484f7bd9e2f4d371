//! The clients: random deposits, withdrawals, buys and sells, each with its own request id,
//! retried with that same id on UNAVAILABLE, ABORTED and deadline errors. Every operation ends
//! in the history as ok, failed (definitely not applied) or unknown (may have applied).

use std::time::Duration;

use backon::BackoffBuilder;

use lockstep::coordinator::v1 as pb;
use lockstep::coordinator::v1::coordinator_client::CoordinatorClient;
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The coordinator acknowledged it: applied exactly once, with this ledger entry.
    Ok { transaction_id: String },
    /// Definitely not applied (a business refusal, or every attempt refused before any effect).
    Failed { code: Code, message: String },
    /// Some attempt's fate is unknown and no later attempt settled it: may or may not have applied.
    Unknown { last: String },
}

#[derive(Debug, Clone)]
pub struct Operation {
    pub request_id: String,
    pub user: String,
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
}

/// Lazily connected channels, one per coordinator; an attempt goes to a random one, as behind
/// a load balancer. Reconnects by itself after a coordinator restarts.
pub fn channels(endpoints: &[String]) -> Vec<CoordinatorClient<Channel>> {
    endpoints
        .iter()
        .map(|endpoint| {
            let channel = Endpoint::from_shared(endpoint.clone())
                .expect("coordinator endpoint")
                .connect_timeout(Duration::from_secs(1))
                .timeout(RPC_TIMEOUT)
                .connect_lazy();
            CoordinatorClient::new(channel)
        })
        .collect()
}

fn random_request(random: &mut fastrand::Rng, user: &str, request_id: &str) -> (Request, String) {
    let cents = |random: &mut fastrand::Rng, whole: std::ops::Range<u32>| {
        format!("{}.{:02}", random.u32(whole), random.u32(0..100))
    };
    let asset = ASSETS[random.usize(..ASSETS.len())];
    let quantity = match asset {
        // Worth 1.45 to 85.70.
        "SOL" => format!("0.{:02}", random.u32(1..60)),
        // Worth about 1.35 to 89.96.
        "ADA" => format!("{}.{}", random.u32(3..200), random.u32(0..10)),
        // Worth about 1.11 to 98.76.
        _ => format!("{}.{}", random.u32(9..800), random.u32(0..10)),
    };
    let order = |quantity: &str| pb::PlaceOrderRequest {
        user_id: user.to_owned(),
        asset: asset.to_owned(),
        quantity: quantity.to_owned(),
        limit_price: None,
        request_id: request_id.to_owned(),
    };
    match random.u32(0..4) {
        0 => {
            let amount = cents(random, 1..200);
            let description = format!("DEPOSIT {amount}");
            let request = pb::DepositRequest {
                user_id: user.to_owned(),
                amount,
                request_id: request_id.to_owned(),
            };
            (Request::Deposit(request), description)
        }
        1 => {
            let amount = cents(random, 1..150);
            let description = format!("WITHDRAW {amount}");
            let request = pb::WithdrawRequest {
                user_id: user.to_owned(),
                amount,
                request_id: request_id.to_owned(),
            };
            (Request::Withdraw(request), description)
        }
        2 => (Request::Buy(order(&quantity)), format!("BUY {quantity} {asset}")),
        _ => (Request::Sell(order(&quantity)), format!("SELL {quantity} {asset}")),
    }
}

/// The bearer token of the bank's clients: the coordinators run with authentication on, and
/// their auth file gives this token the `trader` role, as user-service's and order-service's.
pub const CLIENT_TOKEN: &str = "bank-client-token-0123456789abcdef";
/// The principal the auth file names for [`CLIENT_TOKEN`].
pub const CLIENT_PRINCIPAL: &str = "bank-client";

/// The auth file line of the bank's clients.
pub fn auth_file() -> String {
    format!(
        "{CLIENT_PRINCIPAL} trader {}\n",
        lockstep_coordinator::auth::hash_token(CLIENT_TOKEN)
    )
}

/// `message` with the clients' bearer token.
fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {CLIENT_TOKEN}").parse().expect("a valid header value");
    request.metadata_mut().insert("authorization", value);
    request
}

async fn send(client: &mut CoordinatorClient<Channel>, request: &Request) -> Result<String, tonic::Status> {
    Ok(match request.clone() {
        Request::Deposit(request) => client.deposit(authorized(request)).await?.into_inner().transaction_id,
        Request::Withdraw(request) => client.withdraw(authorized(request)).await?.into_inner().transaction_id,
        Request::Buy(request) => client.place_buy(authorized(request)).await?.into_inner().transaction_id,
        Request::Sell(request) => {
            client
                .place_sell(authorized(request))
                .await?
                .into_inner()
                .transaction_id
        }
    })
}

/// Runs one operation to its end: ok, failed, or unknown after `ATTEMPTS_MAX` attempts.
async fn run_operation(
    clients: &mut [CoordinatorClient<Channel>],
    random: &mut fastrand::Rng,
    user: &str,
    request: Request,
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
            Ok(transaction_id) => break Outcome::Ok { transaction_id },
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
            request_id,
            "DEPOSIT 1000.00".into(),
        )
        .await;
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
        let (request, description) = random_request(&mut random, &user, &request_id);
        history.push(run_operation(&mut clients, &mut random, &user, request, request_id, description).await);
    }
    history
}
