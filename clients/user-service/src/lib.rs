//! user-service: HTTP/JSON for end users' cash, in front of the coordinator's gRPC API.
//!
//! | route | RPC |
//! |---|---|
//! | `POST /users/{id}/deposit` `{"amount": "100.00"}` | Deposit |
//! | `POST /users/{id}/withdraw` `{"amount": "25.50", "settlement": "pending"}` (settlement optional) | Withdraw |
//! | `POST /users/{id}/transfers` `{"to_user_id": "bob", "amount": "25.00", "memo": "rent"}` (memo optional) | Transfer from `{id}` |
//! | `GET /users/{id}/balance` | GetAccount (cash, holdings and today's totals) |
//! | `GET /users/{id}/transactions?cursor=&limit=` | ListLedger (newest first) |
//! | `GET /users/{id}/events` (Server-Sent Events; `Last-Event-ID` resumes) | WatchLedger |
//! | `GET /health` | grpc.health.v1 Check |
//!
//! SettleWithdrawal and ReturnWithdrawal are not here on purpose: they are the bank's word on a
//! pending withdrawal, sent by the payments back office over gRPC with its own trader credential,
//! never by the end user (who could otherwise return a withdrawal the bank already paid).
//!
//! No business rule lives here: amounts travel as the strings the caller sent, and the
//! coordinator validates and decides. Idempotency, deadlines, retries and error mapping are in
//! [`lockstep_client_common`].
//!
//! # Layout
//! - [`Settings`]: `--listen` and the shared coordinator flags, with environment fallbacks.
//! - [`routes`]: one handler per route, each one RPC: HTTP request in, JSON envelope out.
//!
//! Serving them is the same for every service: [`lockstep_client_common::server::run`] on a
//! listener until shutdown, which `main.rs` (through `run_binary`) and the tests call alike.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use lockstep::coordinator::v1 as pb;
use lockstep_client_common::auth::TokenExpiry;
use lockstep_client_common::{
    ApiError, ApiResult, CoordinatorConnection, CoordinatorSettings, EndUserSettings, JsonBody, PageParams,
    QueryParams, RequestContext, ok,
};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "user-service",
    version,
    about = "Lockstep user-service: deposits, withdrawals, transfers, balances over HTTP"
)]
pub struct Settings {
    /// Address to serve HTTP on.
    #[arg(long, env = "LOCKSTEP_USER_SERVICE_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub coordinator: CoordinatorSettings,
    #[command(flatten)]
    pub end_users: EndUserSettings,
}

/// This service's routes; [`lockstep_client_common::server::run`] serves them with `GET /health`
/// and the request context.
pub fn routes() -> Router<CoordinatorConnection> {
    Router::new()
        .route("/users/{id}/deposit", post(deposit))
        .route("/users/{id}/withdraw", post(withdraw))
        .route("/users/{id}/transfers", post(transfer))
        .route("/users/{id}/balance", get(balance))
        .route("/users/{id}/transactions", get(transactions))
        .route("/users/{id}/events", get(events))
}

/// The account's ledger as Server-Sent Events, for a browser's `EventSource`: each entry is an
/// `entry` event whose id is its sequence (so `Last-Event-ID` resumes after it), an idle stream
/// gets `progress` events, and an end (a drain, storage) is an `end` event with the code and the
/// message naming the cursor; `EventSource` then reconnects with the last id.
async fn events(
    State(coordinator): State<CoordinatorConnection>,
    context: RequestContext,
    Path(user_id): Path<String>,
    expiry: Option<axum::Extension<TokenExpiry>>,
    headers: axum::http::HeaderMap,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError> {
    let after = match headers.get("last-event-id") {
        None => 0,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .ok_or_else(|| ApiError::bad_request(Some("Last-Event-ID"), "must be an entry's sequence"))?,
    };
    let stream = coordinator.watch_ledger(&context, user_id, after).await?;
    // The stream ends when the token that opened it expires: the browser reconnects with a
    // fresh one (and `Last-Event-ID`).
    let expires = expiry.map(|axum::Extension(TokenExpiry(at))| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        tokio::time::Instant::now() + std::time::Duration::from_secs(at.saturating_sub(now))
    });
    let events = futures_util::stream::unfold(Some(stream), move |stream| async move {
        let mut stream = stream?;
        let message = match expires {
            Some(at) => tokio::select! {
                message = stream.message() => message,
                () = tokio::time::sleep_until(at) => {
                    let end = json!({"code": "Unauthenticated", "message": "the token expired: reconnect with a fresh one and Last-Event-ID"});
                    return Some((Ok(Event::default().event("end").data(end.to_string())), None));
                }
            },
            None => stream.message().await,
        };
        let event = match message {
            Ok(Some(pb::LedgerEvent {
                event: Some(pb::ledger_event::Event::Entry(entry)),
            })) => Event::default()
                .id(entry.sequence.to_string())
                .event("entry")
                .data(entry_json(&entry).to_string()),
            Ok(Some(pb::LedgerEvent {
                event: Some(pb::ledger_event::Event::Progress(progress)),
            })) => Event::default()
                .event("progress")
                .data(json!({"latest_sequence": progress.latest_sequence, "at": progress.at}).to_string()),
            Ok(Some(pb::LedgerEvent { event: None })) => Event::default().comment(""),
            Ok(None) => return None,
            Err(status) => {
                let end = json!({"code": format!("{:?}", status.code()), "message": status.message()});
                return Some((Ok(Event::default().event("end").data(end.to_string())), None));
            }
        };
        Some((Ok(event), Some(stream)))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[derive(Deserialize)]
struct AmountBody {
    /// USD as a decimal string, e.g. "100.00": JSON numbers are floating point.
    amount: String,
}

/// A withdrawal: an amount, and `"settlement": "pending"` for one that settles later.
#[derive(Deserialize)]
struct WithdrawBody {
    amount: String,
    #[serde(default)]
    settlement: Settlement,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Settlement {
    #[default]
    Immediate,
    Pending,
}

async fn deposit(
    State(coordinator): State<CoordinatorConnection>,
    context: RequestContext,
    Path(user_id): Path<String>,
    JsonBody(body): JsonBody<AmountBody>,
) -> ApiResult<Value> {
    let request = pb::DepositRequest {
        user_id,
        amount: body.amount,
        request_id: context.request_id.clone(),
    };
    let reply = coordinator
        .call(&context, request, |mut client, request| async move {
            client.deposit(request).await
        })
        .await?;
    ok(cash_json(reply))
}

async fn withdraw(
    State(coordinator): State<CoordinatorConnection>,
    context: RequestContext,
    Path(user_id): Path<String>,
    JsonBody(body): JsonBody<WithdrawBody>,
) -> ApiResult<Value> {
    let settlement = match body.settlement {
        Settlement::Immediate => pb::Settlement::Immediate,
        Settlement::Pending => pb::Settlement::Pending,
    };
    let request = pb::WithdrawRequest {
        user_id,
        amount: body.amount,
        request_id: context.request_id.clone(),
        settlement: settlement as i32,
    };
    let reply = coordinator
        .call(&context, request, |mut client, request| async move {
            client.withdraw(request).await
        })
        .await?;
    ok(cash_json(reply))
}

/// A transfer from the user in the path; the end user's token must be the sender's, as for
/// every `/users/{id}` route.
#[derive(Deserialize)]
struct TransferBody {
    to_user_id: String,
    /// USD as a decimal string, e.g. "25.00".
    amount: String,
    /// Optional note for both parties; absent, null and "" are all no memo.
    #[serde(default)]
    memo: Option<String>,
}

async fn transfer(
    State(coordinator): State<CoordinatorConnection>,
    context: RequestContext,
    Path(user_id): Path<String>,
    JsonBody(body): JsonBody<TransferBody>,
) -> ApiResult<Value> {
    let request = pb::TransferRequest {
        from_user_id: user_id,
        to_user_id: body.to_user_id,
        amount: body.amount,
        memo: body.memo.unwrap_or_default(),
        request_id: context.request_id.clone(),
    };
    let reply = coordinator
        .call(&context, request, |mut client, request| async move {
            client.transfer(request).await
        })
        .await?;
    ok(json!({
        "transfer_id": reply.transfer_id,
        "transaction_id": reply.transaction_id,
        "from_user_id": reply.from_user_id,
        "to_user_id": reply.to_user_id,
        "amount": reply.amount,
        "memo": reply.memo,
        "cash_balance": reply.cash_balance,
    }))
}

async fn balance(
    State(coordinator): State<CoordinatorConnection>,
    context: RequestContext,
    Path(user_id): Path<String>,
) -> ApiResult<Value> {
    let request = pb::GetAccountRequest { user_id };
    let account = coordinator
        .call(&context, request, |mut client, request| async move {
            client.get_account(request).await
        })
        .await?;
    let holdings: Vec<Value> = account
        .holdings
        .iter()
        .map(|holding| {
            json!({
                "asset": holding.asset,
                "quantity": holding.quantity,
                "on_hold": holding.on_hold,
                "available": holding.available,
            })
        })
        .collect();
    ok(json!({
        "user_id": account.user_id,
        "cash_balance": account.cash_balance,
        "cash_on_hold": account.cash_on_hold,
        "cash_available": account.cash_available,
        "holdings": holdings,
        "deposited_today": account.deposited_today,
        "withdrawn_today": account.withdrawn_today,
        "transferred_today": account.transferred_today,
    }))
}

async fn transactions(
    State(coordinator): State<CoordinatorConnection>,
    context: RequestContext,
    Path(user_id): Path<String>,
    QueryParams(page): QueryParams<PageParams>,
) -> ApiResult<Value> {
    let request = pb::ListLedgerRequest {
        user_id,
        page_size: page.limit,
        page_token: page.cursor,
        after_sequence: None,
    };
    let reply = coordinator
        .call(&context, request, |mut client, request| async move {
            client.list_ledger(request).await
        })
        .await?;
    let entries: Vec<Value> = reply.entries.iter().map(entry_json).collect();
    ok(json!({
        "transactions": entries,
        "next_cursor": Some(reply.next_page_token).filter(|token| !token.is_empty()),
    }))
}

fn cash_json(reply: pb::CashReply) -> Value {
    json!({
        "transaction_id": reply.transaction_id,
        "user_id": reply.user_id,
        "amount": reply.amount,
        "cash_balance": reply.cash_balance,
        "withdrawal_id": Some(&reply.withdrawal_id).filter(|id| !id.is_empty()),
    })
}

fn entry_json(entry: &pb::LedgerEntry) -> Value {
    json!({
        "transaction_id": entry.transaction_id,
        "kind": entry.kind().as_str_name().trim_start_matches("ENTRY_KIND_").to_lowercase(),
        "cash_delta": entry.cash_delta,
        "asset": Some(&entry.asset).filter(|asset| !asset.is_empty()),
        "quantity_delta": Some(&entry.quantity_delta).filter(|quantity| !quantity.is_empty()),
        "order_id": Some(&entry.order_id).filter(|order| !order.is_empty()),
        "transfer_id": Some(&entry.transfer_id).filter(|transfer| !transfer.is_empty()),
        "counterparty_user_id": Some(&entry.counterparty_user_id).filter(|user| !user.is_empty()),
        "memo": Some(&entry.memo).filter(|memo| !memo.is_empty()),
        "cash_balance": entry.cash_balance,
        "holding_balance": Some(&entry.holding_balance).filter(|holding| !holding.is_empty()),
        "sequence": entry.sequence,
        "created_at": entry.created_at,
    })
}
