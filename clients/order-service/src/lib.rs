//! order-service: HTTP/JSON for placing and reading orders, in front of the coordinator's gRPC API.
//!
//! | route | RPC |
//! |---|---|
//! | `POST /orders` `{"user_id", "side": "buy"\|"sell", "asset", "quantity", "limit_price"?}` | PlaceBuy / PlaceSell |
//! | `POST /orders/reserve` `{"user_id", "side", "asset", "quantity", "limit_price", "expires_in_seconds"?}` | ReserveOrder |
//! | `POST /orders/{id}/cancel` `{"user_id"}` | CancelOrder |
//! | `GET /orders/{id}` | GetOrder |
//! | `GET /users/{id}/orders?cursor=&limit=&status=` | ListOrders (newest first; `status` e.g. `open`) |
//! | `GET /assets` | ListAssets |
//! | `GET /health` | grpc.health.v1 Check |
//!
//! FillOrder is not here on purpose: a fill is the exchange's word on an order, sent by the
//! exchange connector over gRPC with its own trader credential, never by the end user whose
//! order it is (who could otherwise fill their own sell at any price).
//!
//! No business rule lives here: quantities and prices travel as the strings the caller sent, and
//! the coordinator validates and decides. `side` only chooses the RPC. Idempotency, deadlines,
//! retries and error mapping are in [`lockstep_client_common`].
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
use axum::routing::{get, post};
use lockstep::coordinator::v1 as pb;
use lockstep_client_common::{
    ApiResult, CoordinatorConnection, CoordinatorSettings, EndUser, EndUserSettings, JsonBody, QueryParams,
    RequestContext, ok,
};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "order-service",
    version,
    about = "Lockstep order-service: buy and sell orders over HTTP"
)]
pub struct Settings {
    /// Address to serve HTTP on.
    #[arg(long, env = "LOCKSTEP_ORDER_SERVICE_LISTEN", default_value = "127.0.0.1:8082")]
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
        .route("/orders", post(place_order))
        .route("/orders/reserve", post(reserve_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .route("/orders/{id}", get(order))
        .route("/users/{id}/orders", get(orders))
        .route("/assets", get(assets))
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Side {
    Buy,
    Sell,
}

/// Quantities and prices are decimal strings, e.g. "0.5": JSON numbers are floating point.
#[derive(Deserialize)]
struct PlaceOrderBody {
    user_id: String,
    side: Side,
    asset: String,
    quantity: String,
    limit_price: Option<String>,
}

async fn place_order(
    State(coordinator): State<CoordinatorConnection>,
    context: RequestContext,
    end_user: EndUser,
    JsonBody(body): JsonBody<PlaceOrderBody>,
) -> ApiResult<Value> {
    end_user.require(&body.user_id)?;
    let request = pb::PlaceOrderRequest {
        user_id: body.user_id,
        asset: body.asset,
        quantity: body.quantity,
        limit_price: body.limit_price,
        request_id: context.request_id.clone(),
    };
    let reply = match body.side {
        Side::Buy => {
            coordinator
                .call(&context, request, |mut client, request| async move {
                    client.place_buy(request).await
                })
                .await?
        }
        Side::Sell => {
            coordinator
                .call(&context, request, |mut client, request| async move {
                    client.place_sell(request).await
                })
                .await?
        }
    };
    ok(order_reply_json(&reply))
}

#[derive(Deserialize)]
struct ReserveOrderBody {
    user_id: String,
    side: Side,
    asset: String,
    quantity: String,
    limit_price: String,
    #[serde(default)]
    expires_in_seconds: u64,
}

async fn reserve_order(
    State(coordinator): State<CoordinatorConnection>,
    context: RequestContext,
    end_user: EndUser,
    JsonBody(body): JsonBody<ReserveOrderBody>,
) -> ApiResult<Value> {
    end_user.require(&body.user_id)?;
    let side = match body.side {
        Side::Buy => pb::OrderSide::Buy,
        Side::Sell => pb::OrderSide::Sell,
    };
    let request = pb::ReserveOrderRequest {
        user_id: body.user_id,
        side: side as i32,
        asset: body.asset,
        quantity: body.quantity,
        limit_price: body.limit_price,
        expires_in_seconds: body.expires_in_seconds,
        request_id: context.request_id.clone(),
    };
    let reply = coordinator
        .call(&context, request, |mut client, request| async move {
            client.reserve_order(request).await
        })
        .await?;
    ok(order_reply_json(&reply))
}

#[derive(Deserialize)]
struct CancelOrderBody {
    user_id: String,
}

async fn cancel_order(
    State(coordinator): State<CoordinatorConnection>,
    context: RequestContext,
    end_user: EndUser,
    Path(order_id): Path<String>,
    JsonBody(body): JsonBody<CancelOrderBody>,
) -> ApiResult<Value> {
    end_user.require(&body.user_id)?;
    let request = pb::CancelOrderRequest {
        user_id: body.user_id,
        order_id,
        request_id: context.request_id.clone(),
    };
    let reply = coordinator
        .call(&context, request, |mut client, request| async move {
            client.cancel_order(request).await
        })
        .await?;
    ok(order_reply_json(&reply))
}

fn order_reply_json(reply: &pb::OrderReply) -> Value {
    json!({
        "order": reply.order.as_ref().map(order_json),
        "cash_balance": reply.cash_balance,
        "holding": reply.holding,
        "transaction_id": reply.transaction_id,
    })
}

async fn order(
    State(coordinator): State<CoordinatorConnection>,
    context: RequestContext,
    end_user: EndUser,
    Path(order_id): Path<String>,
) -> ApiResult<Value> {
    let order = coordinator
        .call(
            &context,
            pb::GetOrderRequest { order_id },
            |mut client, request| async move { client.get_order(request).await },
        )
        .await?;
    // An order is its owner's: another user's token learns nothing more than a 403.
    end_user.require(&order.user_id)?;
    ok(order_json(&order))
}

async fn orders(
    State(coordinator): State<CoordinatorConnection>,
    context: RequestContext,
    Path(user_id): Path<String>,
    QueryParams(params): QueryParams<OrdersParams>,
) -> ApiResult<Value> {
    let status = match params.status.as_deref() {
        None | Some("") => pb::OrderStatus::Unspecified,
        Some(raw) => pb::OrderStatus::from_str_name(&format!("ORDER_STATUS_{}", raw.to_uppercase()))
            .filter(|status| *status != pb::OrderStatus::Unspecified)
            .ok_or_else(|| {
                lockstep_client_common::ApiError::bad_request(
                    Some("status"),
                    "must be one of confirmed, failed, open, partially_filled, filled, cancelled, expired",
                )
            })?,
    };
    let request = pb::ListOrdersRequest {
        user_id,
        page_size: params.limit,
        page_token: params.cursor,
        status: status as i32,
    };
    let reply = coordinator
        .call(&context, request, |mut client, request| async move {
            client.list_orders(request).await
        })
        .await?;
    let orders: Vec<Value> = reply.orders.iter().map(order_json).collect();
    ok(json!({
        "orders": orders,
        "next_cursor": Some(reply.next_page_token).filter(|token| !token.is_empty()),
    }))
}

async fn assets(State(coordinator): State<CoordinatorConnection>, context: RequestContext) -> ApiResult<Value> {
    let reply = coordinator
        .call(&context, pb::ListAssetsRequest {}, |mut client, request| async move {
            client.list_assets(request).await
        })
        .await?;
    let assets: Vec<Value> = reply
        .assets
        .iter()
        .map(|asset| json!({ "symbol": asset.symbol, "price": asset.price, "active": asset.active }))
        .collect();
    ok(json!({ "assets": assets }))
}

/// ListOrders' query: the page, and an optional status (`open`, `filled`, ...).
/// (`PageParams`' fields spelled out: a flattened struct in a query string would take every
/// value as text, and `limit` would not parse.)
#[derive(Deserialize)]
struct OrdersParams {
    #[serde(default)]
    cursor: String,
    #[serde(default)]
    limit: u32,
    #[serde(default)]
    status: Option<String>,
}

fn order_json(order: &pb::Order) -> Value {
    json!({
        "order_id": order.order_id,
        "user_id": order.user_id,
        "side": order.side().as_str_name().trim_start_matches("ORDER_SIDE_").to_lowercase(),
        "asset": order.asset,
        "quantity": order.quantity,
        "limit_price": order.limit_price,
        "status": order.status().as_str_name().trim_start_matches("ORDER_STATUS_").to_lowercase(),
        "price": order.price,
        "total": order.total,
        "failure_reason": Some(&order.failure_reason).filter(|reason| !reason.is_empty()),
        "created_at": order.created_at,
        "filled_quantity": order.filled_quantity,
        "expires_at": Some(&order.expires_at).filter(|at| !at.is_empty()),
    })
}
