//! gRPC in and out: parses every field of each request into validated types (bad input never
//! reaches the service), calls the service, and maps its result to a reply or to exactly one
//! status code.

use std::sync::Arc;
use std::time::Duration;

use lockstep::coordinator::v1 as pb;
use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::affinity::forward::{Forwarder, Origin, Routed, TRACE_HEADERS};
use crate::core::WithdrawalId;
use crate::core::asset_change::AssetChange;
use crate::core::ops::orders;
use crate::core::ops::{ReturnRequest, SettleRequest};
use crate::core::records::{Asset, EntryKind, LedgerEntry, Order, OrderStatus};
use crate::core::time::rfc3339;
use crate::core::{
    AssetSymbol, FieldError, Memo, OrderId, Price, Principal, Quantity, RequestId, TradeSide, Usd, UserId,
};
use crate::service::feed::{FeedCursor, FeedEvent, FeedFilter, FeedStart};
use crate::service::{CancelRequest, FillRequest, Operation, ReserveRequest};
use crate::service::{
    PageRequest, Receipt, ServiceError, TradeRequest, TransactionCoordinator, TransferRequest, WatchEnd, WatchEvent,
};

#[derive(Debug, Clone)]
pub struct CoordinatorService {
    coordinator: Arc<TransactionCoordinator>,
    /// Account affinity (`--advertise-address`): mutations for accounts another coordinator
    /// owns go there. None: every call is served here.
    forwarder: Option<Arc<Forwarder>>,
}

impl CoordinatorService {
    pub fn new(coordinator: Arc<TransactionCoordinator>) -> Self {
        Self {
            coordinator,
            forwarder: None,
        }
    }

    pub fn with_forwarder(mut self, forwarder: Option<Arc<Forwarder>>) -> Self {
        self.forwarder = forwarder;
        self
    }

    /// The `Peer` service (forwarded calls) over the same coordinator.
    pub fn peer_server(&self) -> pb::peer_server::PeerServer<PeerService> {
        pb::peer_server::PeerServer::new(PeerService(self.clone()))
    }
}

/// Retry advice (google.rpc.RetryInfo) on ABORTED: the lease is usually free again within a
/// commit's time; a retry with the same request id is always safe.
pub const RETRY_AFTER_BUSY: Duration = Duration::from_millis(250);
/// Retry advice on RESOURCE_EXHAUSTED (a bound on queued work): queues drain in milliseconds.
pub const RETRY_AFTER_OVERLOADED: Duration = Duration::from_millis(100);
/// The deadline of a call that sets none (no `grpc-timeout`): no mutation waits or runs longer.
pub const REQUEST_DEADLINE_DEFAULT: Duration = Duration::from_secs(30);
/// Retry advice on UNAVAILABLE: storage blips (throttling, a lost connection) pass in about a
/// second; the SDK already retried for up to 5 s.
pub const RETRY_AFTER_UNAVAILABLE: Duration = Duration::from_secs(1);

/// A WatchLedger stream as tonic sends it.
pub type WatchStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<pb::LedgerEvent, Status>> + Send + 'static>>;

/// A WatchFeed stream as tonic sends it.
pub type FeedStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<pb::FeedEvent, Status>> + Send + 'static>>;

/// How a drain ends a watch stream: UNAVAILABLE, retry at once elsewhere, after `cursor`.
fn shutting_down(cursor: u64) -> Status {
    ended_status(WatchEnd::Draining, &format!("after_sequence={cursor}"))
}

/// A stream relayed from the account's owner, unchanged, except that this coordinator's drain
/// ends it too (UNAVAILABLE naming the last sequence relayed), as it ends its own streams.
fn relayed(
    stream: tonic::Streaming<pb::LedgerEvent>,
    draining: tokio::sync::watch::Receiver<bool>,
    after_sequence: u64,
) -> WatchStream {
    Box::pin(futures_util::stream::unfold(
        Some((stream, draining, after_sequence)),
        |state| async move {
            let (mut stream, mut draining, last) = state?;
            loop {
                let is_draining = *draining.borrow_and_update();
                if is_draining {
                    return Some((Err(shutting_down(last)), None));
                }
                tokio::select! {
                    message = stream.message() => {
                        return match message {
                            Ok(Some(event)) => {
                                let last = match &event.event {
                                    Some(pb::ledger_event::Event::Entry(entry)) => entry.sequence,
                                    _ => last,
                                };
                                Some((Ok(event), Some((stream, draining, last))))
                            }
                            Ok(None) => None,
                            Err(status) => Some((Err(status), None)),
                        };
                    }
                    changed = draining.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                    }
                }
            }
        },
    ))
}

/// The service's watch events as messages; an ending becomes the stream's last status, naming
/// the cursor to resume from.
fn watch_stream(events: tokio::sync::mpsc::Receiver<WatchEvent>) -> WatchStream {
    Box::pin(futures_util::stream::unfold(Some(events), |events| async move {
        let mut events = events?;
        let event = events.recv().await?;
        let (item, more) = match event {
            WatchEvent::Entry(entry) => (
                Ok(pb::LedgerEvent {
                    event: Some(pb::ledger_event::Event::Entry(ledger_message(*entry))),
                }),
                true,
            ),
            WatchEvent::Progress { latest_sequence, at } => (
                Ok(pb::LedgerEvent {
                    event: Some(pb::ledger_event::Event::Progress(pb::LedgerProgress {
                        latest_sequence,
                        at: rfc3339(at),
                    })),
                }),
                true,
            ),
            WatchEvent::Ended { reason, cursor } => {
                (Err(ended_status(reason, &format!("after_sequence={cursor}"))), false)
            }
        };
        Some((item, more.then_some(events)))
    }))
}

/// The status that ends a watch stream for `reason`, naming how to resume (`resume_with`).
fn ended_status(reason: WatchEnd, resume_with: &str) -> Status {
    let resume = format!("resume with {resume_with}");
    match reason {
        WatchEnd::Draining => Status::with_error_details(
            Code::Unavailable,
            format!("The coordinator is shutting down; {resume} (any coordinator of the table)"),
            ErrorDetails::with_retry_info(Some(Duration::ZERO)),
        ),
        WatchEnd::Behind => Status::with_error_details(
            Code::ResourceExhausted,
            format!("The stream's reader fell behind for too long; {resume}"),
            ErrorDetails::with_retry_info(Some(Duration::ZERO)),
        ),
        WatchEnd::Unavailable(detail) => {
            tracing::warn!(%detail, "a watch stream ended: storage unavailable");
            Status::with_error_details(
                Code::Unavailable,
                format!("Service temporarily unavailable; {resume}"),
                ErrorDetails::with_retry_info(Some(RETRY_AFTER_UNAVAILABLE)),
            )
        }
        WatchEnd::Internal(detail) => {
            tracing::error!(%detail, "a watch stream ended: internal error");
            Status::internal(format!("Internal error; {resume}"))
        }
    }
}

/// The service's feed events as messages; an ending becomes the stream's last status, naming
/// the cursor to resume from.
fn feed_stream(events: tokio::sync::mpsc::Receiver<FeedEvent>) -> FeedStream {
    Box::pin(futures_util::stream::unfold(Some(events), |events| async move {
        let mut events = events?;
        let event = events.recv().await?;
        let (item, more) = match event {
            FeedEvent::Entry { entry, cursor } => (
                Ok(pb::FeedEvent {
                    event: Some(pb::feed_event::Event::Entry(pb::FeedEntry {
                        entry: Some(ledger_message(*entry)),
                        cursor,
                    })),
                }),
                true,
            ),
            FeedEvent::Progress {
                cursor,
                complete_through,
            } => (
                Ok(pb::FeedEvent {
                    event: Some(pb::feed_event::Event::Progress(pb::FeedProgress {
                        cursor,
                        complete_through: rfc3339(complete_through),
                    })),
                }),
                true,
            ),
            FeedEvent::Ended { reason, cursor } => (Err(ended_status(reason, &format!("cursor={cursor}"))), false),
        };
        Some((item, more.then_some(events)))
    }))
}

/// A WatchFeed request as the service takes it: where to start and what to send.
fn feed_request(message: pb::WatchFeedRequest) -> Result<(FeedStart, FeedFilter), Status> {
    let start = match (message.cursor.is_empty(), message.from_now) {
        (true, false) => FeedStart::Oldest,
        (true, true) => FeedStart::Now,
        (false, false) => FeedStart::After(FeedCursor::decode("cursor", &message.cursor).map_err(invalid)?),
        (false, true) => {
            return Err(invalid(FieldError::new(
                "from_now",
                "cannot be set with a cursor: resume from the cursor, or start from now without one",
            )));
        }
    };
    let mut kinds = std::collections::BTreeSet::new();
    for raw in message.kinds {
        let kind = match pb::EntryKind::try_from(raw) {
            Ok(pb::EntryKind::Deposit) => EntryKind::Deposit,
            Ok(pb::EntryKind::Withdrawal) => EntryKind::Withdrawal,
            Ok(pb::EntryKind::Buy) => EntryKind::Buy,
            Ok(pb::EntryKind::Sell) => EntryKind::Sell,
            Ok(pb::EntryKind::TransferOut) => EntryKind::TransferOut,
            Ok(pb::EntryKind::TransferIn) => EntryKind::TransferIn,
            Ok(pb::EntryKind::Hold) => EntryKind::Hold,
            Ok(pb::EntryKind::Fill) => EntryKind::Fill,
            Ok(pb::EntryKind::Release) => EntryKind::Release,
            Ok(pb::EntryKind::Unspecified) | Err(_) => {
                return Err(invalid(FieldError::new(
                    "kinds",
                    format!("holds {raw}, which is not an entry kind (ENTRY_KIND_DEPOSIT .. ENTRY_KIND_RELEASE)"),
                )));
            }
        };
        kinds.insert(kind);
    }
    let user_prefix = message.user_id_prefix;
    if !user_prefix.is_empty() {
        UserId::parse("user_id_prefix", &user_prefix).map_err(invalid)?;
    }
    Ok((start, FeedFilter { kinds, user_prefix }))
}

/// The one place a service error becomes a gRPC status.
pub fn status_of(error: ServiceError) -> Status {
    match error {
        ServiceError::InvalidArgument(field) => Status::with_error_details(
            Code::InvalidArgument,
            format!("{}: {}", field.field, field.reason),
            ErrorDetails::with_bad_request_violation(field.field, field.reason),
        ),
        ServiceError::NotFound(missing) => Status::not_found(missing.to_string()),
        ServiceError::Rejected(rejection) => Status::failed_precondition(rejection.to_string()),
        ServiceError::RefusedEarlier(message) => Status::failed_precondition(message),
        error @ (ServiceError::Busy | ServiceError::LeaseLost | ServiceError::NotApplied) => {
            Status::with_error_details(
                Code::Aborted,
                error.to_string(),
                ErrorDetails::with_retry_info(Some(RETRY_AFTER_BUSY)),
            )
        }
        error @ ServiceError::CatalogFull(_) => Status::resource_exhausted(error.to_string()),
        error @ ServiceError::Overloaded(_) => Status::with_error_details(
            Code::ResourceExhausted,
            error.to_string(),
            ErrorDetails::with_retry_info(Some(RETRY_AFTER_OVERLOADED)),
        ),
        error @ ServiceError::PriceChangeTooLarge(_) => Status::failed_precondition(error.to_string()),
        error @ ServiceError::DeadlineExceeded => Status::deadline_exceeded(error.to_string()),
        ServiceError::OutOfRange(message) => Status::out_of_range(message),
        error @ ServiceError::Unavailable(_) => {
            tracing::warn!(%error, detail = ?error, "storage unavailable");
            Status::with_error_details(
                Code::Unavailable,
                error.to_string(),
                ErrorDetails::with_retry_info(Some(RETRY_AFTER_UNAVAILABLE)),
            )
        }
        ServiceError::Internal(detail) => {
            tracing::error!(%detail, "internal error");
            Status::internal("Internal error")
        }
    }
}

fn invalid(error: FieldError) -> Status {
    status_of(ServiceError::InvalidArgument(error))
}

/// The caller's deadline, from the `grpc-timeout` header (`<digits><unit>`, unit one of
/// H M S m u n), else `REQUEST_DEADLINE_DEFAULT` from now. A malformed header is ignored, as
/// gRPC servers do.
pub fn deadline_of<T>(request: &Request<T>) -> Option<Instant> {
    caller_deadline(request).or_else(|| Instant::now().checked_add(REQUEST_DEADLINE_DEFAULT))
}

fn caller_deadline<T>(request: &Request<T>) -> Option<Instant> {
    let raw = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
}

/// Where a call came from: its deadline, principal and trace context, as received.
fn origin_of<T>(request: &Request<T>) -> Origin {
    Origin {
        deadline: deadline_of(request),
        principal: crate::auth::principal_of(request),
        trace: TRACE_HEADERS
            .into_iter()
            .filter_map(|name| Some((name, request.metadata().get(name)?.clone())))
            .collect(),
        forwarded: false,
    }
}

fn cash_reply(user: &UserId, amount: Usd, receipt: Receipt) -> pb::CashReply {
    let withdrawal_id = receipt
        .entry
        .hold
        .as_ref()
        .and_then(|hold| hold.withdrawal_id.as_ref())
        .map(ToString::to_string)
        .unwrap_or_default();
    pb::CashReply {
        transaction_id: receipt.entry.entry_id.to_string(),
        user_id: user.to_string(),
        amount: amount.to_string(),
        cash_balance: receipt.entry.cash_after.to_string(),
        withdrawal_id,
    }
}

/// The reply to a settlement or return: the amount is the withdrawal's (what its hold moved).
fn withdrawal_reply(user: &UserId, receipt: Receipt) -> pb::CashReply {
    let amount = receipt
        .entry
        .hold
        .as_ref()
        .map(|hold| Usd::from_decimal(hold.held_delta.abs()))
        .unwrap_or_default();
    cash_reply(user, amount, receipt)
}

fn order_message(order: Order) -> pb::Order {
    pb::Order {
        order_id: order.order_id.to_string(),
        user_id: order.user_id.to_string(),
        side: match order.side {
            TradeSide::Buy => pb::OrderSide::Buy,
            TradeSide::Sell => pb::OrderSide::Sell,
        } as i32,
        asset: order.asset.to_string(),
        quantity: order.quantity.to_string(),
        limit_price: order.limit_price.map(|price| price.to_string()),
        status: order_status(order.status) as i32,
        price: order.price.to_string(),
        total: order.total.to_string(),
        failure_reason: order.failure_reason.unwrap_or_default(),
        created_at: rfc3339(order.created_at_ms),
        principal: order.principal.to_string(),
        filled_quantity: order.filled_quantity.to_string(),
        expires_at: order.expires_at_ms.map(rfc3339).unwrap_or_default(),
    }
}

fn order_status(status: OrderStatus) -> pb::OrderStatus {
    match status {
        OrderStatus::Confirmed => pb::OrderStatus::Confirmed,
        OrderStatus::Failed => pb::OrderStatus::Failed,
        OrderStatus::Open => pb::OrderStatus::Open,
        OrderStatus::PartiallyFilled => pb::OrderStatus::PartiallyFilled,
        OrderStatus::Filled => pb::OrderStatus::Filled,
        OrderStatus::Cancelled => pb::OrderStatus::Cancelled,
        OrderStatus::Expired => pb::OrderStatus::Expired,
    }
}

/// A ListOrders status filter: unspecified is every status.
fn status_filter(raw: i32) -> Result<Option<OrderStatus>, Status> {
    Ok(Some(match pb::OrderStatus::try_from(raw) {
        Ok(pb::OrderStatus::Unspecified) => return Ok(None),
        Ok(pb::OrderStatus::Confirmed) => OrderStatus::Confirmed,
        Ok(pb::OrderStatus::Failed) => OrderStatus::Failed,
        Ok(pb::OrderStatus::Open) => OrderStatus::Open,
        Ok(pb::OrderStatus::PartiallyFilled) => OrderStatus::PartiallyFilled,
        Ok(pb::OrderStatus::Filled) => OrderStatus::Filled,
        Ok(pb::OrderStatus::Cancelled) => OrderStatus::Cancelled,
        Ok(pb::OrderStatus::Expired) => OrderStatus::Expired,
        Err(_) => {
            return Err(invalid(FieldError::new(
                "status",
                format!("holds {raw}, which is not an order status (ORDER_STATUS_CONFIRMED .. ORDER_STATUS_EXPIRED)"),
            )));
        }
    }))
}

fn ledger_message(entry: LedgerEntry) -> pb::LedgerEntry {
    let (transfer_id, counterparty_user_id, memo) = match entry.transfer {
        Some(transfer) => (
            transfer.transfer_id.to_string(),
            transfer.counterparty.to_string(),
            transfer.memo.to_string(),
        ),
        None => (String::new(), String::new(), String::new()),
    };
    let (fill_id, held_asset, held_delta, hold_order) = match &entry.hold {
        Some(hold) => (
            hold.fill_id.clone().unwrap_or_default(),
            hold.asset.as_ref().map(ToString::to_string).unwrap_or_default(),
            hold.held_delta.to_string(),
            hold.order_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        ),
        None => Default::default(),
    };
    let (asset, quantity_delta, order_id, holding_balance) = match entry.trade {
        Some(trade) => (
            trade.asset.to_string(),
            trade.quantity_delta.to_string(),
            trade.order_id.to_string(),
            trade
                .holding_after
                .map(|holding| holding.to_string())
                .unwrap_or_default(),
        ),
        None => (String::new(), String::new(), hold_order, String::new()),
    };
    pb::LedgerEntry {
        withdrawal_id: entry
            .hold
            .as_ref()
            .and_then(|hold| hold.withdrawal_id.as_ref())
            .map(ToString::to_string)
            .unwrap_or_default(),
        fill_id,
        held_asset,
        held_delta,
        transaction_id: entry.entry_id.to_string(),
        user_id: entry.user_id.to_string(),
        kind: match entry.kind {
            EntryKind::Deposit => pb::EntryKind::Deposit,
            EntryKind::Withdrawal => pb::EntryKind::Withdrawal,
            EntryKind::Buy => pb::EntryKind::Buy,
            EntryKind::Sell => pb::EntryKind::Sell,
            EntryKind::TransferOut => pb::EntryKind::TransferOut,
            EntryKind::TransferIn => pb::EntryKind::TransferIn,
            EntryKind::Hold => pb::EntryKind::Hold,
            EntryKind::Fill => pb::EntryKind::Fill,
            EntryKind::Release => pb::EntryKind::Release,
        } as i32,
        cash_delta: entry.cash_delta.to_string(),
        asset,
        quantity_delta,
        order_id,
        cash_balance: entry.cash_after.to_string(),
        created_at: rfc3339(entry.created_at_ms),
        principal: entry.principal.to_string(),
        transfer_id,
        counterparty_user_id,
        memo,
        sequence: entry.sequence,
        holding_balance,
    }
}

/// The reply to an order call, from its entry and its order (also when replayed).
fn order_reply(receipt: Receipt) -> Result<pb::OrderReply, Status> {
    let (order, holding) = receipt.trade.ok_or_else(|| {
        status_of(ServiceError::Internal(
            "a committed order call without its order".to_owned(),
        ))
    })?;
    Ok(pb::OrderReply {
        cash_balance: receipt.entry.cash_after.to_string(),
        holding: holding.to_string(),
        transaction_id: receipt.entry.entry_id.to_string(),
        order: Some(order_message(order)),
    })
}

/// The reply to a transfer, from the sender's ledger entry (also when replayed).
fn transfer_reply(receipt: Receipt) -> Result<pb::TransferReply, Status> {
    let entry = receipt.entry;
    let transfer = entry.transfer.ok_or_else(|| {
        status_of(ServiceError::Internal(
            "a committed transfer without its transfer id".to_owned(),
        ))
    })?;
    Ok(pb::TransferReply {
        transfer_id: transfer.transfer_id.to_string(),
        from_user_id: entry.user_id.to_string(),
        to_user_id: transfer.counterparty.to_string(),
        amount: entry.cash_delta.debited().to_string(),
        memo: transfer.memo.to_string(),
        cash_balance: entry.cash_after.to_string(),
        transaction_id: entry.entry_id.to_string(),
    })
}

fn asset_change_message(change: AssetChange) -> pb::AssetChange {
    pb::AssetChange {
        change_id: change.change_id,
        symbol: change.symbol.to_string(),
        principal: change.principal.to_string(),
        changed_at: rfc3339(change.changed_at_ms),
        old: change.old.map(asset_message),
        new: Some(asset_message(change.new)),
        forced: change.forced,
    }
}

fn asset_message(asset: Asset) -> pb::Asset {
    pb::Asset {
        symbol: asset.symbol.to_string(),
        price: asset.price.to_string(),
        active: asset.active,
    }
}

/// A forwarded call's reply of the wrong kind: the owner and this coordinator disagree on the
/// protocol (a version mismatch during a rollout).
fn mismatched_reply() -> Status {
    Status::internal("the owner coordinator answered with another kind of reply")
}

fn cash_of(reply: pb::forward_reply::Reply) -> Option<pb::CashReply> {
    match reply {
        pb::forward_reply::Reply::Cash(reply) => Some(reply),
        _ => None,
    }
}

fn order_of(reply: pb::forward_reply::Reply) -> Option<pb::OrderReply> {
    match reply {
        pb::forward_reply::Reply::Order(reply) => Some(reply),
        _ => None,
    }
}

fn transfer_of(reply: pb::forward_reply::Reply) -> Option<pb::TransferReply> {
    match reply {
        pb::forward_reply::Reply::Transfer(reply) => Some(reply),
        _ => None,
    }
}

impl CoordinatorService {
    /// A WatchLedger stream served by this coordinator.
    async fn watch_here(&self, user: UserId, after_sequence: u64) -> Result<Response<WatchStream>, Status> {
        let events = self
            .coordinator
            .watch_ledger(user, after_sequence)
            .await
            .map_err(status_of)?;
        Ok(Response::new(watch_stream(events)))
    }

    /// The owner's answer when another coordinator owns `account` (its reply as `pick` takes
    /// it), or None: the call is served here.
    async fn forwarded<T>(
        &self,
        origin: &Origin,
        account: &UserId,
        request_id: &Option<RequestId>,
        call: impl FnOnce() -> pb::forward_request::Call,
        pick: fn(pb::forward_reply::Reply) -> Option<T>,
    ) -> Option<Result<T, Status>> {
        let forwarder = self.forwarder.as_ref()?;
        match forwarder.route(origin, account, request_id.is_some(), call).await {
            Routed::Here => None,
            Routed::There(reply) => Some((*reply).and_then(|reply| pick(reply).ok_or_else(mismatched_reply))),
        }
    }

    async fn deposit_from(&self, origin: Origin, message: pb::DepositRequest) -> Result<pb::CashReply, Status> {
        let user = UserId::parse("user_id", &message.user_id).map_err(invalid)?;
        let amount = Usd::parse_amount("amount", &message.amount).map_err(invalid)?;
        let request_id = RequestId::parse_optional("request_id", &message.request_id).map_err(invalid)?;
        let call = || pb::forward_request::Call::Deposit(message.clone());
        if let Some(reply) = self.forwarded(&origin, &user, &request_id, call, cash_of).await {
            return reply;
        }
        let receipt = self
            .coordinator
            .deposit(&origin.principal, &user, amount, request_id, origin.deadline)
            .await
            .map_err(status_of)?;
        Ok(cash_reply(&user, amount, receipt))
    }

    async fn withdraw_from(&self, origin: Origin, message: pb::WithdrawRequest) -> Result<pb::CashReply, Status> {
        let user = UserId::parse("user_id", &message.user_id).map_err(invalid)?;
        let amount = Usd::parse_amount("amount", &message.amount).map_err(invalid)?;
        let request_id = RequestId::parse_optional("request_id", &message.request_id).map_err(invalid)?;
        let pending = match pb::Settlement::try_from(message.settlement) {
            Ok(pb::Settlement::Immediate) => false,
            Ok(pb::Settlement::Pending) => true,
            Err(_) => {
                return Err(invalid(FieldError::new(
                    "settlement",
                    format!(
                        "holds {}, which is not SETTLEMENT_IMMEDIATE or SETTLEMENT_PENDING",
                        message.settlement
                    ),
                )));
            }
        };
        let call = || pb::forward_request::Call::Withdraw(message.clone());
        if let Some(reply) = self.forwarded(&origin, &user, &request_id, call, cash_of).await {
            return reply;
        }
        let receipt = if pending {
            self.coordinator
                .withdraw_pending(&origin.principal, &user, amount, request_id, origin.deadline)
                .await
        } else {
            self.coordinator
                .withdraw(&origin.principal, &user, amount, request_id, origin.deadline)
                .await
        }
        .map_err(status_of)?;
        Ok(cash_reply(&user, amount, receipt))
    }

    async fn transfer_from(&self, origin: Origin, message: pb::TransferRequest) -> Result<pb::TransferReply, Status> {
        let transfer = TransferRequest {
            from: UserId::parse("from_user_id", &message.from_user_id).map_err(invalid)?,
            to: UserId::parse("to_user_id", &message.to_user_id).map_err(invalid)?,
            amount: Usd::parse_amount("amount", &message.amount).map_err(invalid)?,
            memo: Memo::parse("memo", &message.memo).map_err(invalid)?,
        };
        let request_id = RequestId::parse_optional("request_id", &message.request_id).map_err(invalid)?;
        // The sender's owner runs it (the request record is the sender's), taking the
        // receiver's lease through the lease path when another coordinator owns the receiver.
        let call = || pb::forward_request::Call::Transfer(message.clone());
        if let Some(reply) = self
            .forwarded(&origin, &transfer.from, &request_id, call, transfer_of)
            .await
        {
            return reply;
        }
        let receipt = self
            .coordinator
            .transfer(&origin.principal, transfer, request_id, origin.deadline)
            .await
            .map_err(status_of)?;
        transfer_reply(receipt)
    }

    async fn settle_from(&self, origin: Origin, message: pb::SettleWithdrawalRequest) -> Result<pb::CashReply, Status> {
        let user = UserId::parse("user_id", &message.user_id).map_err(invalid)?;
        let settle = SettleRequest {
            withdrawal_id: WithdrawalId::parse("withdrawal_id", &message.withdrawal_id).map_err(invalid)?,
        };
        let request_id = RequestId::parse_optional("request_id", &message.request_id).map_err(invalid)?;
        let call = || pb::forward_request::Call::SettleWithdrawal(message.clone());
        if let Some(reply) = self.forwarded(&origin, &user, &request_id, call, cash_of).await {
            return reply;
        }
        let receipt = self
            .coordinator
            .settle_withdrawal(&origin.principal, &user, settle, request_id, origin.deadline)
            .await
            .map_err(status_of)?;
        Ok(withdrawal_reply(&user, receipt))
    }

    async fn return_from(&self, origin: Origin, message: pb::ReturnWithdrawalRequest) -> Result<pb::CashReply, Status> {
        let user = UserId::parse("user_id", &message.user_id).map_err(invalid)?;
        let back = ReturnRequest {
            withdrawal_id: WithdrawalId::parse("withdrawal_id", &message.withdrawal_id).map_err(invalid)?,
            reason: Memo::parse("reason", &message.reason).map_err(invalid)?,
        };
        let request_id = RequestId::parse_optional("request_id", &message.request_id).map_err(invalid)?;
        let call = || pb::forward_request::Call::ReturnWithdrawal(message.clone());
        if let Some(reply) = self.forwarded(&origin, &user, &request_id, call, cash_of).await {
            return reply;
        }
        let receipt = self
            .coordinator
            .return_withdrawal(&origin.principal, &user, back, request_id, origin.deadline)
            .await
            .map_err(status_of)?;
        Ok(withdrawal_reply(&user, receipt))
    }

    async fn reserve_from(&self, origin: Origin, message: pb::ReserveOrderRequest) -> Result<pb::OrderReply, Status> {
        let user = UserId::parse("user_id", &message.user_id).map_err(invalid)?;
        let side = match pb::OrderSide::try_from(message.side) {
            Ok(pb::OrderSide::Buy) => TradeSide::Buy,
            Ok(pb::OrderSide::Sell) => TradeSide::Sell,
            _ => {
                return Err(invalid(FieldError::new(
                    "side",
                    "is required: ORDER_SIDE_BUY or ORDER_SIDE_SELL",
                )));
            }
        };
        if message.limit_price.is_empty() {
            return Err(invalid(FieldError::new(
                "limit_price",
                "is required: the hold is quantity x limit_price",
            )));
        }
        let reserve = ReserveRequest {
            side,
            asset: AssetSymbol::parse("asset", &message.asset).map_err(invalid)?,
            quantity: Quantity::parse_trade("quantity", &message.quantity).map_err(invalid)?,
            limit: Price::parse("limit_price", &message.limit_price).map_err(invalid)?,
            expires_in: orders::parse_expires_in("expires_in_seconds", message.expires_in_seconds).map_err(invalid)?,
            order_id: OrderId::new(),
            placed_by: origin.principal.clone(),
        };
        let request_id = RequestId::parse_optional("request_id", &message.request_id).map_err(invalid)?;
        let call = || pb::forward_request::Call::ReserveOrder(message.clone());
        if let Some(reply) = self.forwarded(&origin, &user, &request_id, call, order_of).await {
            return reply;
        }
        let receipt = self
            .coordinator
            .mutate_as(
                &origin.principal,
                &user,
                Operation::Reserve(reserve),
                request_id,
                origin.deadline,
            )
            .await
            .map_err(status_of)?;
        order_reply(receipt)
    }

    async fn fill_from(&self, origin: Origin, message: pb::FillOrderRequest) -> Result<pb::OrderReply, Status> {
        let user = UserId::parse("user_id", &message.user_id).map_err(invalid)?;
        let fill = FillRequest {
            order_id: OrderId::parse("order_id", &message.order_id).map_err(invalid)?,
            fill_id: orders::parse_fill_id("fill_id", &message.fill_id).map_err(invalid)?,
            quantity: Quantity::parse_trade("quantity", &message.quantity).map_err(invalid)?,
            price: Price::parse("price", &message.price).map_err(invalid)?,
        };
        let call = || pb::forward_request::Call::FillOrder(message.clone());
        if let Some(reply) = self.forwarded(&origin, &user, &Some(fill.key()), call, order_of).await {
            return reply;
        }
        let receipt = self
            .coordinator
            .fill(&origin.principal, &user, fill, origin.deadline)
            .await
            .map_err(status_of)?;
        order_reply(receipt)
    }

    async fn cancel_from(&self, origin: Origin, message: pb::CancelOrderRequest) -> Result<pb::OrderReply, Status> {
        let user = UserId::parse("user_id", &message.user_id).map_err(invalid)?;
        let cancel = CancelRequest {
            order_id: OrderId::parse("order_id", &message.order_id).map_err(invalid)?,
        };
        let request_id = RequestId::parse_optional("request_id", &message.request_id).map_err(invalid)?;
        let call = || pb::forward_request::Call::CancelOrder(message.clone());
        if let Some(reply) = self.forwarded(&origin, &user, &request_id, call, order_of).await {
            return reply;
        }
        let receipt = self
            .coordinator
            .cancel(&origin.principal, &user, cancel, request_id, origin.deadline)
            .await
            .map_err(status_of)?;
        order_reply(receipt)
    }

    async fn place_from(
        &self,
        origin: Origin,
        message: pb::PlaceOrderRequest,
        side: TradeSide,
    ) -> Result<pb::OrderReply, Status> {
        let user = UserId::parse("user_id", &message.user_id).map_err(invalid)?;
        let trade = TradeRequest {
            side,
            asset: AssetSymbol::parse("asset", &message.asset).map_err(invalid)?,
            quantity: Quantity::parse_trade("quantity", &message.quantity).map_err(invalid)?,
            limit_price: message
                .limit_price
                .as_deref()
                .map(|raw| Price::parse("limit_price", raw))
                .transpose()
                .map_err(invalid)?,
        };
        let request_id = RequestId::parse_optional("request_id", &message.request_id).map_err(invalid)?;
        let call = || match side {
            TradeSide::Buy => pb::forward_request::Call::PlaceBuy(message.clone()),
            TradeSide::Sell => pb::forward_request::Call::PlaceSell(message.clone()),
        };
        if let Some(reply) = self.forwarded(&origin, &user, &request_id, call, order_of).await {
            return reply;
        }
        let receipt = self
            .coordinator
            .trade(&origin.principal, &user, trade, request_id, origin.deadline)
            .await
            .map_err(status_of)?;
        let (order, holding) = receipt
            .trade
            .ok_or_else(|| status_of(ServiceError::Internal("a committed trade without its order".to_owned())))?;
        Ok(pb::OrderReply {
            cash_balance: receipt.entry.cash_after.to_string(),
            holding: holding.to_string(),
            transaction_id: receipt.entry.entry_id.to_string(),
            order: Some(order_message(order)),
        })
    }
}

/// `Peer/Forward`: a mutation another coordinator sent to this one, the account's owner. The
/// auth layer let only a `peer` through, so the principal it names is believed. Served here
/// whatever this coordinator's own view of the owner: one hop at most.
#[derive(Debug, Clone)]
pub struct PeerService(CoordinatorService);

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    type ForwardWatchStream = WatchStream;

    async fn forward_watch(
        &self,
        request: Request<pb::WatchLedgerRequest>,
    ) -> Result<Response<Self::ForwardWatchStream>, Status> {
        let message = request.into_inner();
        let user = UserId::parse("user_id", &message.user_id).map_err(invalid)?;
        self.0.watch_here(user, message.after_sequence).await
    }

    async fn forward(&self, request: Request<pb::ForwardRequest>) -> Result<Response<pb::ForwardReply>, Status> {
        let mut origin = origin_of(&request);
        let message = request.into_inner();
        origin.principal = Principal::parse("principal", &message.principal).map_err(invalid)?;
        origin.forwarded = true;
        // The call's log lines name who made it, not the coordinator that forwarded it.
        tracing::Span::current().record("principal", tracing::field::display(&origin.principal));
        use pb::forward_reply::Reply;
        use pb::forward_request::Call;
        let service = &self.0;
        let reply = match message.call {
            Some(Call::Deposit(call)) => Reply::Cash(service.deposit_from(origin, call).await?),
            Some(Call::Withdraw(call)) => Reply::Cash(service.withdraw_from(origin, call).await?),
            Some(Call::PlaceBuy(call)) => Reply::Order(service.place_from(origin, call, TradeSide::Buy).await?),
            Some(Call::PlaceSell(call)) => Reply::Order(service.place_from(origin, call, TradeSide::Sell).await?),
            Some(Call::Transfer(call)) => Reply::Transfer(service.transfer_from(origin, call).await?),
            Some(Call::ReserveOrder(call)) => Reply::Order(service.reserve_from(origin, call).await?),
            Some(Call::FillOrder(call)) => Reply::Order(service.fill_from(origin, call).await?),
            Some(Call::CancelOrder(call)) => Reply::Order(service.cancel_from(origin, call).await?),
            Some(Call::SettleWithdrawal(call)) => Reply::Cash(service.settle_from(origin, call).await?),
            Some(Call::ReturnWithdrawal(call)) => Reply::Cash(service.return_from(origin, call).await?),
            None => return Err(invalid(FieldError::new("call", "is required"))),
        };
        Ok(Response::new(pb::ForwardReply { reply: Some(reply) }))
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn deposit(&self, request: Request<pb::DepositRequest>) -> Result<Response<pb::CashReply>, Status> {
        let origin = origin_of(&request);
        self.deposit_from(origin, request.into_inner()).await.map(Response::new)
    }

    async fn withdraw(&self, request: Request<pb::WithdrawRequest>) -> Result<Response<pb::CashReply>, Status> {
        let origin = origin_of(&request);
        self.withdraw_from(origin, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn place_buy(&self, request: Request<pb::PlaceOrderRequest>) -> Result<Response<pb::OrderReply>, Status> {
        let origin = origin_of(&request);
        self.place_from(origin, request.into_inner(), TradeSide::Buy)
            .await
            .map(Response::new)
    }

    async fn place_sell(&self, request: Request<pb::PlaceOrderRequest>) -> Result<Response<pb::OrderReply>, Status> {
        let origin = origin_of(&request);
        self.place_from(origin, request.into_inner(), TradeSide::Sell)
            .await
            .map(Response::new)
    }

    async fn settle_withdrawal(
        &self,
        request: Request<pb::SettleWithdrawalRequest>,
    ) -> Result<Response<pb::CashReply>, Status> {
        let origin = origin_of(&request);
        self.settle_from(origin, request.into_inner()).await.map(Response::new)
    }

    async fn return_withdrawal(
        &self,
        request: Request<pb::ReturnWithdrawalRequest>,
    ) -> Result<Response<pb::CashReply>, Status> {
        let origin = origin_of(&request);
        self.return_from(origin, request.into_inner()).await.map(Response::new)
    }

    async fn reserve_order(
        &self,
        request: Request<pb::ReserveOrderRequest>,
    ) -> Result<Response<pb::OrderReply>, Status> {
        let origin = origin_of(&request);
        self.reserve_from(origin, request.into_inner()).await.map(Response::new)
    }

    async fn fill_order(&self, request: Request<pb::FillOrderRequest>) -> Result<Response<pb::OrderReply>, Status> {
        let origin = origin_of(&request);
        self.fill_from(origin, request.into_inner()).await.map(Response::new)
    }

    async fn cancel_order(&self, request: Request<pb::CancelOrderRequest>) -> Result<Response<pb::OrderReply>, Status> {
        let origin = origin_of(&request);
        self.cancel_from(origin, request.into_inner()).await.map(Response::new)
    }

    async fn transfer(&self, request: Request<pb::TransferRequest>) -> Result<Response<pb::TransferReply>, Status> {
        let origin = origin_of(&request);
        self.transfer_from(origin, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_account(&self, request: Request<pb::GetAccountRequest>) -> Result<Response<pb::Account>, Status> {
        let user = UserId::parse("user_id", &request.get_ref().user_id).map_err(invalid)?;
        let account = self.coordinator.account(&user).await.map_err(status_of)?;
        let (deposited_today, withdrawn_today) = account.daily_totals(self.coordinator.today());
        let now = self.coordinator.now();
        Ok(Response::new(pb::Account {
            user_id: user.to_string(),
            cash_balance: account.cash.to_string(),
            cash_on_hold: account.cash_on_hold(now).to_string(),
            cash_available: account.available_cash(now).to_string(),
            holdings: account
                .holdings
                .iter()
                .filter(|(_, quantity)| !quantity.is_zero())
                .map(|(asset, quantity)| pb::Holding {
                    asset: asset.to_string(),
                    quantity: quantity.to_string(),
                    on_hold: account.holding_on_hold(asset, now).to_string(),
                    available: account.available_holding(asset, now).to_string(),
                })
                .collect(),
            deposited_today: deposited_today.to_string(),
            withdrawn_today: withdrawn_today.to_string(),
            transferred_today: account.transferred_on(self.coordinator.today()).to_string(),
        }))
    }

    async fn get_order(&self, request: Request<pb::GetOrderRequest>) -> Result<Response<pb::Order>, Status> {
        let order_id = OrderId::parse("order_id", &request.get_ref().order_id).map_err(invalid)?;
        let order = self.coordinator.order(&order_id).await.map_err(status_of)?;
        Ok(Response::new(order_message(order)))
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersReply>, Status> {
        let message = request.into_inner();
        let user = UserId::parse("user_id", &message.user_id).map_err(invalid)?;
        let page = PageRequest::parse(message.page_size, &message.page_token).map_err(invalid)?;
        let status = status_filter(message.status)?;
        let page = self.coordinator.orders(&user, page).await.map_err(status_of)?;
        Ok(Response::new(pb::ListOrdersReply {
            orders: page
                .items
                .into_iter()
                .filter(|order| status.is_none_or(|status| order.status == status))
                .map(order_message)
                .collect(),
            next_page_token: page.next_cursor.unwrap_or_default(),
        }))
    }

    async fn list_ledger(
        &self,
        request: Request<pb::ListLedgerRequest>,
    ) -> Result<Response<pb::ListLedgerReply>, Status> {
        let message = request.into_inner();
        let user = UserId::parse("user_id", &message.user_id).map_err(invalid)?;
        let page = PageRequest::parse(message.page_size, &message.page_token).map_err(invalid)?;
        if let Some(after) = message.after_sequence {
            if !message.page_token.is_empty() {
                return Err(invalid(FieldError::new(
                    "page_token",
                    "must be empty with after_sequence: continue with the last entry's sequence",
                )));
            }
            let entries = self
                .coordinator
                .ledger_after(&user, after, page.size())
                .await
                .map_err(status_of)?;
            return Ok(Response::new(pb::ListLedgerReply {
                entries: entries.into_iter().map(ledger_message).collect(),
                next_page_token: String::new(),
            }));
        }
        let page = self.coordinator.ledger(&user, page).await.map_err(status_of)?;
        Ok(Response::new(pb::ListLedgerReply {
            entries: page.items.into_iter().map(ledger_message).collect(),
            next_page_token: page.next_cursor.unwrap_or_default(),
        }))
    }

    type WatchLedgerStream = WatchStream;

    async fn watch_ledger(
        &self,
        request: Request<pb::WatchLedgerRequest>,
    ) -> Result<Response<Self::WatchLedgerStream>, Status> {
        let origin = origin_of(&request);
        let message = request.into_inner();
        let user = UserId::parse("user_id", &message.user_id).map_err(invalid)?;
        if let Some(forwarder) = &self.forwarder
            && let Some(opened) = forwarder.watch(&origin, &user, message.clone()).await
        {
            // The owner's stream, relayed: its commits reach the stream at once there.
            return Ok(Response::new(relayed(
                opened?,
                self.coordinator.draining(),
                message.after_sequence,
            )));
        }
        self.watch_here(user, message.after_sequence).await
    }

    type WatchFeedStream = FeedStream;

    async fn watch_feed(
        &self,
        request: Request<pb::WatchFeedRequest>,
    ) -> Result<Response<Self::WatchFeedStream>, Status> {
        let (start, filter) = feed_request(request.into_inner())?;
        let events = self.coordinator.watch_feed(start, filter).map_err(status_of)?;
        Ok(Response::new(feed_stream(events)))
    }

    async fn list_assets(
        &self,
        _request: Request<pb::ListAssetsRequest>,
    ) -> Result<Response<pb::ListAssetsReply>, Status> {
        let assets = self.coordinator.assets().await.map_err(status_of)?;
        Ok(Response::new(pb::ListAssetsReply {
            assets: assets.into_iter().map(asset_message).collect(),
        }))
    }

    async fn upsert_asset(&self, request: Request<pb::UpsertAssetRequest>) -> Result<Response<pb::Asset>, Status> {
        let principal = crate::auth::principal_of(&request);
        let message = request.into_inner();
        let force = message.force;
        let asset = message
            .asset
            .ok_or_else(|| invalid(FieldError::new("asset", "is required")))?;
        let asset = Asset {
            symbol: AssetSymbol::parse("asset.symbol", &asset.symbol).map_err(invalid)?,
            price: Price::parse("asset.price", &asset.price).map_err(invalid)?,
            active: asset.active,
        };
        let asset = self
            .coordinator
            .upsert_asset(&principal, asset, force)
            .await
            .map_err(status_of)?;
        Ok(Response::new(asset_message(asset)))
    }

    async fn list_asset_changes(
        &self,
        request: Request<pb::ListAssetChangesRequest>,
    ) -> Result<Response<pb::ListAssetChangesReply>, Status> {
        let message = request.into_inner();
        let symbol = AssetSymbol::parse("symbol", &message.symbol).map_err(invalid)?;
        let page = PageRequest::parse(message.page_size, &message.page_token).map_err(invalid)?;
        let page = self.coordinator.asset_changes(&symbol, page).await.map_err(status_of)?;
        Ok(Response::new(pb::ListAssetChangesReply {
            changes: page.items.into_iter().map(asset_change_message).collect(),
            next_page_token: page.next_cursor.unwrap_or_default(),
        }))
    }
}
