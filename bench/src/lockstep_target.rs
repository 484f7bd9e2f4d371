//! A Lockstep coordinator over gRPC, through the generated client: one call per operation, each
//! with its own `request_id` and a deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lockstep::coordinator::v1 as pb;
use lockstep::coordinator::v1::coordinator_client::CoordinatorClient;
use tonic::transport::{Channel, Endpoint};

use crate::BenchError;
use crate::workload::{
    Call, DEPOSIT_AMOUNT_USD, Fill, ORDER_LIMIT_USD, ORDER_QUANTITY, Operation, TRADE_ASSET, TRADE_QUANTITY,
    TRANSFER_AMOUNT_USD, WITHDRAW_AMOUNT_USD,
};

/// The outcome counted when a reply is OK but carries no order: the coordinator broke its contract,
/// and the cycle cannot go on without the order's id.
pub const NO_ORDER: &str = "OK_WITHOUT_ORDER";

/// A connection must be up within this, or the coordinator is not running.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP/2 connection to each coordinator, shared by every caller (as ghz does by default);
/// with several coordinators, each call goes to the next one in turn.
#[derive(Debug, Clone)]
pub struct LockstepTarget {
    clients: Arc<[CoordinatorClient<Channel>]>,
    next: Arc<AtomicUsize>,
    timeout: Duration,
}

impl LockstepTarget {
    pub async fn connect(urls: &[String], timeout: Duration) -> Result<LockstepTarget, BenchError> {
        let mut clients = Vec::with_capacity(urls.len());
        for url in urls {
            let endpoint = Endpoint::from_shared(url.to_owned())
                .map_err(|error| BenchError::Connect(format!("{url}: {error}")))?
                .connect_timeout(CONNECT_TIMEOUT);
            let channel = endpoint
                .connect()
                .await
                .map_err(|error| BenchError::Connect(format!("{url}: {error} (is the coordinator running?)")))?;
            clients.push(CoordinatorClient::new(channel));
        }
        if clients.is_empty() {
            return Err(BenchError::Settings("no coordinator to call".to_owned()));
        }
        Ok(LockstepTarget {
            clients: clients.into(),
            next: Arc::new(AtomicUsize::new(0)),
            timeout,
        })
    }

    /// The first coordinator's client (the watchers of `--watchers` use it).
    pub fn first_client(&self) -> CoordinatorClient<Channel> {
        self.clients[0].clone()
    }

    /// The client of the coordinator whose turn it is.
    fn client(&self) -> CoordinatorClient<Channel> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        self.clients[turn % self.clients.len()].clone()
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// Funds `user` before the run: `cash` dollars, and `quantity` of the traded asset when sells
    /// are in the mix. Not counted.
    pub async fn fund(&self, user: &str, cash: &str, quantity: Option<&str>) -> Result<(), BenchError> {
        let mut client = self.client();
        let deposit = pb::DepositRequest {
            user_id: user.to_owned(),
            amount: cash.to_owned(),
            request_id: unique_request_id(),
        };
        client
            .deposit(self.request(deposit))
            .await
            .map_err(|status| BenchError::Setup(format!("deposit {cash} for {user}: {}", status.message())))?;
        if let Some(quantity) = quantity {
            client
                .place_buy(self.request(order(user, quantity)))
                .await
                .map_err(|status| BenchError::Setup(format!("buy {quantity} for {user}: {}", status.message())))?;
        }
        Ok(())
    }

    /// Sends one call and returns its gRPC code name (`OK`, `ABORTED`, ...).
    pub async fn call(&self, call: &Call) -> &'static str {
        let mut client = self.client();
        let user = call.user.as_str();
        let result = match call.operation {
            Operation::Deposit => client
                .deposit(self.request(pb::DepositRequest {
                    user_id: user.to_owned(),
                    amount: DEPOSIT_AMOUNT_USD.to_owned(),
                    request_id: unique_request_id(),
                }))
                .await
                .map(drop),
            Operation::Withdraw => client
                .withdraw(self.request(pb::WithdrawRequest {
                    settlement: 0,
                    user_id: user.to_owned(),
                    amount: WITHDRAW_AMOUNT_USD.to_owned(),
                    request_id: unique_request_id(),
                }))
                .await
                .map(drop),
            Operation::Buy => client
                .place_buy(self.request(order(user, TRADE_QUANTITY)))
                .await
                .map(drop),
            Operation::Sell => client
                .place_sell(self.request(order(user, TRADE_QUANTITY)))
                .await
                .map(drop),
            Operation::Transfer => client
                .transfer(self.request(pb::TransferRequest {
                    from_user_id: user.to_owned(),
                    to_user_id: call.receiver.clone().expect("a transfer names its payee"),
                    amount: TRANSFER_AMOUNT_USD.to_owned(),
                    memo: String::new(),
                    request_id: unique_request_id(),
                }))
                .await
                .map(drop),
        };
        match result {
            Ok(()) => "OK",
            Err(status) => code_name(status.code()),
        }
    }

    // The order cycle's calls (the orders workload): each its own call with its own deadline,
    // returning the order of the reply or the code name of the failure.

    /// Reserves the cycle's buy for `user`: [`ORDER_QUANTITY`] SOL at a limit of
    /// [`ORDER_LIMIT_USD`], holding their product in cash.
    pub async fn reserve_order(&self, user: &str) -> Result<pb::Order, &'static str> {
        let request = pb::ReserveOrderRequest {
            user_id: user.to_owned(),
            side: pb::OrderSide::Buy as i32,
            asset: TRADE_ASSET.to_owned(),
            quantity: ORDER_QUANTITY.to_owned(),
            limit_price: ORDER_LIMIT_USD.to_owned(),
            // The default, a day: a cycle fills or cancels its order within its own few calls.
            expires_in_seconds: 0,
            request_id: unique_request_id(),
        };
        order_of(self.client().reserve_order(self.request(request)).await)
    }

    /// Applies `fill` to `user`'s order `order_id`. No request id: the fill's id is the key.
    pub async fn fill_order(&self, user: &str, order_id: &str, fill: Fill) -> Result<pb::Order, &'static str> {
        let request = pb::FillOrderRequest {
            user_id: user.to_owned(),
            order_id: order_id.to_owned(),
            fill_id: fill.id.to_owned(),
            quantity: fill.quantity.to_owned(),
            price: fill.price.to_owned(),
        };
        order_of(self.client().fill_order(self.request(request)).await)
    }

    /// Cancels `user`'s order `order_id`, releasing what it still holds.
    pub async fn cancel_order(&self, user: &str, order_id: &str) -> Result<pb::Order, &'static str> {
        let request = pb::CancelOrderRequest {
            user_id: user.to_owned(),
            order_id: order_id.to_owned(),
            request_id: unique_request_id(),
        };
        order_of(self.client().cancel_order(self.request(request)).await)
    }
}

/// The order of an OK reply, or the code name of the failure.
fn order_of(result: Result<tonic::Response<pb::OrderReply>, tonic::Status>) -> Result<pb::Order, &'static str> {
    match result {
        Ok(reply) => reply.into_inner().order.ok_or(NO_ORDER),
        Err(status) => Err(code_name(status.code())),
    }
}

fn order(user: &str, quantity: &str) -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        user_id: user.to_owned(),
        asset: TRADE_ASSET.to_owned(),
        quantity: quantity.to_owned(),
        limit_price: None,
        request_id: unique_request_id(),
    }
}

/// A fresh key per call: the bench measures first attempts, never replays.
fn unique_request_id() -> String {
    format!("bench-{}", uuid::Uuid::new_v4().simple())
}

/// The canonical name of a gRPC status code, as the gRPC specification spells it.
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
