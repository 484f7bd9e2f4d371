//! The thin services end to end: the real coordinator (embedded engine) and user-service and
//! order-service on port 0, driven over HTTP like curl would.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use lockstep_coordinator::core::records::Lease;
use lockstep_coordinator::core::{Clock, LeaseId, SystemClock, UserId};
use lockstep_coordinator::storage::model;
use rust_decimal::Decimal;
use serde_json::Value;

use lockstep::coordinator::v1::coordinator_server::CoordinatorServer;
use lockstep_coordinator::server;
use lockstep_coordinator::settings::Cli;
use lockstep_coordinator::transport::CoordinatorService;
use tonic::codegen::http;

use crate::helpers::{AppOptions, EngineKind, TestApp, fresh_storage, spawn_app, spawn_app_with};
use crate::services::{Http, Reply, dead_address, spawn_services};

fn decimal(value: &Value) -> Decimal {
    Decimal::from_str(
        value
            .as_str()
            .unwrap_or_else(|| panic!("not a decimal string: {value}")),
    )
    .expect("decimal")
}

/// Every page of a paged list (`key` is "transactions" or "orders"), following `next_cursor`.
/// A full page may be followed by an empty one: DynamoDB cannot tell that nothing follows.
async fn all_pages(http: &Http, address: std::net::SocketAddr, path: &str, key: &str, limit: u32) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut cursor = String::new();
    loop {
        let reply = http
            .get(address, &format!("{path}?limit={limit}&cursor={cursor}"))
            .await;
        let data = reply.data();
        pages.push(data[key].as_array().expect("a list").clone());
        match data["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => return pages,
        }
        assert_eq!(
            pages.last().map(Vec::len),
            Some(limit as usize),
            "only the last page is short: {pages:?}"
        );
        assert!(pages.len() < 1000, "paging does not end");
    }
}

/// Takes `user`'s lease directly in storage, as another coordinator in the middle of an
/// operation would; returns what releases it.
pub(crate) async fn hold_lease(app: &TestApp, user: &str) -> impl Future<Output = ()> {
    let user = UserId::parse("user_id", user).expect("user id");
    let lease = Lease {
        lock_id: LeaseId::new_random(),
        owner: "another-coordinator".to_owned(),
        incarnation: "a-run-that-died".to_owned(),
        operation: "WITHDRAWAL".to_owned(),
        expires_at_ms: SystemClock.now() + 60_000,
    };
    app.storage
        .update(model::acquire_lease(&user, &lease, SystemClock.now(), true))
        .await
        .expect("take the lease");
    let storage = app.storage.clone();
    async move {
        storage
            .write(model::release_lease(&user, &lease.lock_id, None))
            .await
            .expect("release the lease");
    }
}

/// A client deposits, buys, sells and withdraws through the two services, reads its orders and
/// its ledger page by page, and sees exactly what the coordinator committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_deposits_trades_withdraws_and_pages_through_both_services() {
    let app = spawn_app(EngineKind::Embedded).await;
    let services = spawn_services(app.address).await;
    let http = Http::default();
    for service in [services.user, services.order] {
        assert_eq!(http.get(service, "/health").await.data()["coordinator"], "SERVING");
    }

    let deposit = http
        .post(services.user, "/users/carol/deposit", r#"{"amount": "1000.00"}"#)
        .await;
    assert_eq!(deposit.data()["cash_balance"], "1000.00");
    assert_eq!(deposit.data()["amount"], "1000.00");
    assert_eq!(deposit.data()["user_id"], "carol");
    let generated_key = deposit.header("idempotency-key").expect("a generated Idempotency-Key");
    uuid::Uuid::parse_str(generated_key).expect("the generated key is a UUID");

    let assets = http.get(services.order, "/assets").await;
    let sol = assets.data()["assets"]
        .as_array()
        .expect("assets")
        .iter()
        .find(|asset| asset["symbol"] == "SOL")
        .expect("SOL is listed")
        .clone();
    assert_eq!(
        (sol["price"].as_str(), sol["active"].as_bool()),
        (Some("145.25"), Some(true))
    );

    let buy = http
        .post(
            services.order,
            "/orders",
            r#"{"user_id": "carol", "side": "buy", "asset": "SOL", "quantity": "2"}"#,
        )
        .await;
    let bought = buy.data();
    assert_eq!(bought["order"]["status"], "confirmed");
    assert_eq!(bought["order"]["side"], "buy");
    assert_eq!(bought["order"]["total"], "290.50");
    assert_eq!(
        (bought["cash_balance"].as_str(), bought["holding"].as_str()),
        (Some("709.50"), Some("2"))
    );

    let sell = http
        .post(
            services.order,
            "/orders",
            r#"{"user_id": "carol", "side": "sell", "asset": "SOL", "quantity": "0.5", "limit_price": "140"}"#,
        )
        .await;
    let sold = sell.data();
    assert_eq!(sold["order"]["side"], "sell");
    assert_eq!(sold["order"]["limit_price"], "140");
    assert_eq!(
        (sold["cash_balance"].as_str(), sold["holding"].as_str()),
        (Some("782.12"), Some("1.5"))
    );

    let withdraw = http
        .post(services.user, "/users/carol/withdraw", r#"{"amount": "100.00"}"#)
        .await;
    assert_eq!(withdraw.data()["cash_balance"], "682.12");

    let balance = http.get(services.user, "/users/carol/balance").await;
    assert_eq!(balance.data()["cash_balance"], "682.12");
    assert_eq!(
        balance.data()["holdings"],
        serde_json::json!([{"asset": "SOL", "quantity": "1.5", "on_hold": "0", "available": "1.5"}])
    );
    assert_eq!(
        (
            balance.data()["cash_on_hold"].as_str(),
            balance.data()["cash_available"].as_str()
        ),
        (Some("0.00"), Some("682.12"))
    );
    assert_eq!(balance.data()["withdrawn_today"], "100.00");

    let order_id = bought["order"]["order_id"].as_str().expect("order id");
    let order = http.get(services.order, &format!("/orders/{order_id}")).await;
    assert_eq!(order.data(), &bought["order"]);

    let order_pages = all_pages(&http, services.order, "/users/carol/orders", "orders", 1).await;
    let order_ids: Vec<&Value> = order_pages.iter().flatten().map(|order| &order["order_id"]).collect();
    assert_eq!(
        order_ids,
        [&sold["order"]["order_id"], &bought["order"]["order_id"]],
        "newest first"
    );

    let ledger_pages = all_pages(&http, services.user, "/users/carol/transactions", "transactions", 3).await;
    assert_eq!(
        ledger_pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [3, 1],
        "pages of 3"
    );
    let kinds: Vec<&str> = ledger_pages
        .iter()
        .flatten()
        .map(|entry| entry["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["withdrawal", "sell", "buy", "deposit"], "newest first");
    let first = &ledger_pages[0][0];
    assert_eq!(first["transaction_id"], withdraw.data()["transaction_id"]);
    assert_eq!(
        (first["cash_delta"].as_str(), first["cash_balance"].as_str()),
        (Some("-100.00"), Some("682.12"))
    );
    let sell_entry = &ledger_pages[0][1];
    assert_eq!(sell_entry["asset"], "SOL");
    assert_eq!(sell_entry["quantity_delta"], "-0.5");
    assert_eq!(sell_entry["order_id"], sold["order"]["order_id"]);
}

/// Every gRPC status a client can meet arrives as its HTTP status in the envelope: 400 with the
/// field, 404, 422 with the rule, 409 with Retry-After, 504, 503; and HTTP-level mistakes are 400s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_coordinator_error_maps_to_its_http_status() {
    let app = spawn_app_with(
        EngineKind::Embedded,
        AppOptions::default().flag("--lock-wait-ms", "300"),
    )
    .await;
    let services = spawn_services(app.address).await;
    let http = Http::default();
    http.post(services.user, "/users/dave/deposit", r#"{"amount": "50.00"}"#)
        .await
        .data();

    // 400: the coordinator's google.rpc.BadRequest names the field and the reason.
    let bad = http
        .post(services.user, "/users/dave/deposit", r#"{"amount": "12.345"}"#)
        .await;
    let error = bad.error(StatusCode::BAD_REQUEST);
    assert_eq!(error["code"], "InvalidArgument");
    assert_eq!(error["field"], "amount");
    assert_eq!(error["reason"], "must have at most 2 decimal places");
    let bad = http
        .post(
            services.order,
            "/orders",
            r#"{"user_id": "dave", "side": "buy", "asset": "sol", "quantity": "1"}"#,
        )
        .await;
    assert_eq!(bad.error(StatusCode::BAD_REQUEST)["field"], "asset");
    let bad = http.get(services.user, "/users/dave/transactions?limit=1000").await;
    assert_eq!(bad.error(StatusCode::BAD_REQUEST)["field"], "page_size");

    // 400 from HTTP itself: JSON that does not parse or has the wrong shape, a bad header.
    for (service, path, body) in [
        (services.user, "/users/dave/deposit", "not json"),
        (services.user, "/users/dave/deposit", r#"{"amount": 12.5}"#),
        (
            services.order,
            "/orders",
            r#"{"user_id": "dave", "side": "hold", "asset": "SOL", "quantity": "1"}"#,
        ),
    ] {
        let reply = http.post(service, path, body).await;
        assert_eq!(
            reply.error(StatusCode::BAD_REQUEST)["code"],
            "InvalidArgument",
            "{body}"
        );
    }
    let bad_timeout = http
        .send(
            Method::GET,
            services.user,
            "/users/dave/balance",
            &[("X-Request-Timeout", "soon")],
            None,
        )
        .await;
    assert_eq!(bad_timeout.error(StatusCode::BAD_REQUEST)["field"], "X-Request-Timeout");

    // 404: no account, no order, no route.
    let missing = http.get(services.user, "/users/nobody/balance").await;
    assert_eq!(
        missing.error(StatusCode::NOT_FOUND)["message"],
        "Account nobody not found"
    );
    let unknown_order = format!("/orders/{}", uuid::Uuid::now_v7());
    http.get(services.order, &unknown_order)
        .await
        .error(StatusCode::NOT_FOUND);
    http.get(services.order, "/no/such/route")
        .await
        .error(StatusCode::NOT_FOUND);

    // 422: a business rule, with the figures.
    let refused = http
        .post(services.user, "/users/dave/withdraw", r#"{"amount": "80.00"}"#)
        .await;
    let error = refused.error(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error["code"], "FailedPrecondition");
    assert_eq!(
        error["message"],
        "Insufficient balance. Current: $50.00, Required: $80.00"
    );

    // 409 with Retry-After: another coordinator holds the lease past --lock-wait-ms.
    let release = hold_lease(&app, "dave").await;
    let busy = http
        .post(services.user, "/users/dave/deposit", r#"{"amount": "1.00"}"#)
        .await;
    assert_eq!(busy.error(StatusCode::CONFLICT)["code"], "Aborted");
    assert_eq!(busy.header("retry-after"), Some("1"));

    // 504: the caller's deadline, shorter than the lease wait, reaches the coordinator.
    let started = Instant::now();
    let late = http
        .send(
            Method::POST,
            services.order,
            "/orders",
            &[("X-Request-Timeout", "100")],
            Some(r#"{"user_id": "dave", "side": "buy", "asset": "ADA", "quantity": "10"}"#),
        )
        .await;
    late.error(StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_millis(290),
        "{:?}",
        started.elapsed()
    );
    release.await;
    http.post(services.user, "/users/dave/deposit", r#"{"amount": "1.00"}"#)
        .await
        .data();
    assert_eq!(
        app.cash("dave").await,
        "51.00",
        "neither the busy nor the late request applied"
    );

    // 503: a coordinator that is not there, after a few quick retries.
    let orphans = spawn_services(dead_address().await).await;
    let started = Instant::now();
    let down = http
        .post(orphans.user, "/users/dave/deposit", r#"{"amount": "1.00"}"#)
        .await;
    assert_eq!(
        down.error(StatusCode::SERVICE_UNAVAILABLE)["message"],
        "Service temporarily unavailable"
    );
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    http.get(orphans.order, "/health")
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
    http.get(orphans.order, "/assets")
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
}

/// Cash and trades on one user through both services at once: no balance or holding goes
/// negative, and cash and every holding equal the sums of the ledger, one entry per 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_through_both_services_keep_the_ledger_consistent() {
    const CLIENTS_PER_SERVICE: usize = 4;
    const REQUESTS_PER_CLIENT: usize = 15;
    let app = spawn_app(EngineKind::Embedded).await;
    let services = spawn_services(app.address).await;
    let http = Http::default();
    let first = http
        .post(services.user, "/users/erin/deposit", r#"{"amount": "500.00"}"#)
        .await;
    let first_id = first.data()["transaction_id"].as_str().unwrap().to_owned();

    let mut clients = Vec::new();
    for client in 0..CLIENTS_PER_SERVICE * 2 {
        let http = http.clone();
        let (user_service, order_service) = (services.user, services.order);
        clients.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for _ in 0..REQUESTS_PER_CLIENT {
                let reply: Reply = if client % 2 == 0 {
                    let action = if fastrand::bool() { "deposit" } else { "withdraw" };
                    let body = format!(
                        r#"{{"amount": "{}.{:02}"}}"#,
                        fastrand::u32(1..150),
                        fastrand::u32(0..100)
                    );
                    http.post(user_service, &format!("/users/erin/{action}"), &body).await
                } else {
                    let side = if fastrand::bool() { "buy" } else { "sell" };
                    let (asset, quantity) = if fastrand::bool() {
                        ("SOL", "0.5")
                    } else {
                        ("ADA", "100")
                    };
                    let body = format!(
                        r#"{{"user_id": "erin", "side": "{side}", "asset": "{asset}", "quantity": "{quantity}"}}"#
                    );
                    http.post(order_service, "/orders", &body).await
                };
                match reply.status {
                    StatusCode::OK => committed.push(reply.data()["transaction_id"].as_str().unwrap().to_owned()),
                    // Refused for lack of cash or holding, or the lease stayed busy: nothing applied.
                    StatusCode::UNPROCESSABLE_ENTITY | StatusCode::CONFLICT => {}
                    _ => panic!("unexpected reply {reply:?}"),
                }
            }
            committed
        }));
    }
    let mut committed = BTreeSet::from([first_id]);
    for client in clients {
        committed.extend(client.await.expect("client task"));
    }

    let balance = http.get(services.user, "/users/erin/balance").await;
    let cash = decimal(&balance.data()["cash_balance"]);
    let holdings: BTreeMap<String, Decimal> = balance.data()["holdings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|holding| {
            (
                holding["asset"].as_str().unwrap().to_owned(),
                decimal(&holding["quantity"]),
            )
        })
        .collect();
    assert!(cash >= Decimal::ZERO, "negative cash {cash}");
    assert!(
        holdings.values().all(|quantity| *quantity > Decimal::ZERO),
        "{holdings:?}"
    );

    let ledger: Vec<Value> = all_pages(&http, services.user, "/users/erin/transactions", "transactions", 7)
        .await
        .into_iter()
        .flatten()
        .collect();
    let mut ledger_cash = Decimal::ZERO;
    let mut ledger_holdings: BTreeMap<String, Decimal> = BTreeMap::new();
    for entry in &ledger {
        ledger_cash += decimal(&entry["cash_delta"]);
        if let Some(asset) = entry["asset"].as_str() {
            *ledger_holdings.entry(asset.to_owned()).or_default() += decimal(&entry["quantity_delta"]);
        }
    }
    ledger_holdings.retain(|_, quantity| !quantity.is_zero());
    assert_eq!(ledger_cash, cash, "cash is the sum of the ledger's cash deltas");
    assert_eq!(
        ledger_holdings, holdings,
        "holdings are the sums of the ledger's quantity deltas"
    );
    let ledger_ids: BTreeSet<String> = ledger
        .iter()
        .map(|entry| entry["transaction_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ledger.len(), ledger_ids.len(), "no entry twice across pages");
    assert_eq!(ledger_ids, committed, "one ledger entry per 200, and no other");
    assert!(
        committed.len() > 10,
        "too few operations committed: {}",
        committed.len()
    );
}

/// Retrying a POST with the same Idempotency-Key returns the same reply and applies once, on
/// both services; a key the service generated works the same; a key reused for other
/// parameters is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retrying_a_post_with_the_same_idempotency_key_applies_it_once() {
    let app = spawn_app(EngineKind::Embedded).await;
    let services = spawn_services(app.address).await;
    let http = Http::default();
    let deposit = |key: &'static str, amount: &'static str| {
        let http = http.clone();
        async move {
            let body = format!(r#"{{"amount": "{amount}"}}"#);
            http.send(
                Method::POST,
                services.user,
                "/users/frank/deposit",
                &[("Idempotency-Key", key)],
                Some(&body),
            )
            .await
        }
    };
    let first = deposit("frank-deposit-1", "300.00").await;
    let again = deposit("frank-deposit-1", "300.00").await;
    assert_eq!(first.data(), again.data());
    assert_eq!(again.header("idempotency-key"), Some("frank-deposit-1"));
    assert_eq!(app.cash("frank").await, "300.00", "applied once");

    let order = r#"{"user_id": "frank", "side": "buy", "asset": "SOL", "quantity": "1"}"#;
    let place = || {
        let http = http.clone();
        async move {
            http.send(
                Method::POST,
                services.order,
                "/orders",
                &[("Idempotency-Key", "frank-buy-1")],
                Some(order),
            )
            .await
        }
    };
    let bought = place().await;
    let bought_again = place().await;
    assert_eq!(bought.data(), bought_again.data());
    assert_eq!(app.cash("frank").await, "154.75", "one SOL bought once");

    // Without a key the service makes one and returns it; retrying with it is just as safe.
    let withdraw = http
        .post(services.user, "/users/frank/withdraw", r#"{"amount": "4.75"}"#)
        .await;
    let key = withdraw.header("idempotency-key").expect("generated key").to_owned();
    let retried = http
        .send(
            Method::POST,
            services.user,
            "/users/frank/withdraw",
            &[("Idempotency-Key", &key)],
            Some(r#"{"amount": "4.75"}"#),
        )
        .await;
    assert_eq!(withdraw.data(), retried.data());
    assert_eq!(app.cash("frank").await, "150.00");
    assert_eq!(
        app.full_ledger("frank").await.len(),
        3,
        "three operations, three entries"
    );

    let reused = deposit("frank-deposit-1", "1.00").await;
    assert_eq!(reused.error(StatusCode::BAD_REQUEST)["field"], "request_id");
    assert_eq!(app.cash("frank").await, "150.00");
}

/// In front of the coordinator: answers UNAVAILABLE in place of the first `lost` Deposit replies,
/// after the coordinator committed them, as when a reply is lost on the wire. Records the
/// `x-request-id` of every Deposit attempt.
#[derive(Clone)]
struct LoseDepositReplies {
    inner: tonic::service::Routes,
    lost: Arc<AtomicUsize>,
    request_ids: Arc<Mutex<Vec<String>>>,
}

impl tower::Service<http::Request<tonic::body::Body>> for LoseDepositReplies {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.inner, context)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let deposit = request.uri().path().ends_with("/Deposit");
        if deposit && let Some(id) = request.headers().get("x-request-id") {
            self.request_ids.lock().unwrap().push(id.to_str().unwrap().to_owned());
        }
        let lose = deposit
            && self
                .lost
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        let reply = self.inner.call(request);
        Box::pin(async move {
            let response = reply.await?;
            if !lose {
                return Ok(response);
            }
            // A unary reply's body is complete once the handler has committed; read, then drop it.
            http_body_util::BodyExt::collect(response.into_body()).await.ok();
            Ok(tonic::Status::unavailable("reply lost on the way").into_http())
        })
    }
}

/// A Deposit whose replies are lost twice after it committed is retried by the service with the
/// same request id and the same `x-request-id`, and the coordinator applies it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unavailable_is_retried_with_the_same_request_id_and_applies_once() {
    let (storage, _guard) = fresh_storage(EngineKind::Embedded).await;
    let settings = <Cli as clap::Parser>::parse_from(["coordinator"]).settings;
    let coordinator = server::build_coordinator(storage, Arc::new(SystemClock), &settings, None)
        .await
        .expect("build coordinator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (lost, request_ids) = (Arc::new(AtomicUsize::new(2)), Arc::new(Mutex::new(Vec::new())));
    let layer = {
        let (lost, request_ids) = (Arc::clone(&lost), Arc::clone(&request_ids));
        tower::layer::layer_fn(move |inner| LoseDepositReplies {
            inner,
            lost: Arc::clone(&lost),
            request_ids: Arc::clone(&request_ids),
        })
    };
    let service = CoordinatorServer::new(CoordinatorService::new(Arc::clone(&coordinator)));
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let services = spawn_services(address).await;
    let http = Http::default();

    let reply = http
        .send(
            Method::POST,
            services.user,
            "/users/gina/deposit",
            &[("Idempotency-Key", "gina-deposit-1")],
            Some(r#"{"amount": "10.00"}"#),
        )
        .await;
    assert_eq!(reply.data()["cash_balance"], "10.00", "applied once, reported once");
    assert_eq!(lost.load(Ordering::SeqCst), 0, "both replies were lost");
    assert_eq!(
        *request_ids.lock().unwrap(),
        ["gina-deposit-1"; 3],
        "three attempts, one request id"
    );
    let balance = http.get(services.user, "/users/gina/balance").await;
    assert_eq!(balance.data()["cash_balance"], "10.00");
    let ledger = http.get(services.user, "/users/gina/transactions").await;
    assert_eq!(ledger.data()["transactions"].as_array().map(Vec::len), Some(1));
}

/// `POST /users/{id}/transfers` sends the path's user's cash to `to_user_id`: the reply is the
/// sender's side, the balance shows `transferred_today`, both ledgers show the transfer with its
/// id, counterparty and memo (optional); a retry with the same Idempotency-Key applies once, and
/// the same key with other parameters is a 400 on request_id; each refusal maps to its HTTP
/// status (422 short of cash or over the daily limit, 404 for a receiver with no account, 400
/// naming the field for oneself or a bad memo) and moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_transfers_through_user_service() {
    let app = spawn_app_with(
        EngineKind::Embedded,
        AppOptions::default().flag("--daily-transfer-limit", "100.00"),
    )
    .await;
    let services = spawn_services(app.address).await;
    let http = Http::default();
    http.post(services.user, "/users/hana/deposit", r#"{"amount": "200.00"}"#)
        .await
        .data();
    http.post(services.user, "/users/ivan/deposit", r#"{"amount": "5.00"}"#)
        .await
        .data();
    let send = |key: &'static str, body: &'static str| {
        let http = http.clone();
        async move {
            http.send(
                Method::POST,
                services.user,
                "/users/hana/transfers",
                &[("Idempotency-Key", key)],
                Some(body),
            )
            .await
        }
    };

    let body = r#"{"to_user_id": "ivan", "amount": "30.00", "memo": "rent"}"#;
    let first = send("hana-transfer-1", body).await;
    let sent = first.data();
    assert_eq!(
        (
            sent["from_user_id"].as_str(),
            sent["to_user_id"].as_str(),
            sent["amount"].as_str(),
            sent["memo"].as_str(),
            sent["cash_balance"].as_str()
        ),
        (Some("hana"), Some("ivan"), Some("30.00"), Some("rent"), Some("170.00"))
    );
    uuid::Uuid::parse_str(sent["transfer_id"].as_str().expect("transfer id")).expect("a UUID");
    let again = send("hana-transfer-1", body).await;
    assert_eq!(again.data(), sent, "same Idempotency-Key, same reply");
    assert_eq!(again.header("idempotency-key"), Some("hana-transfer-1"));
    let reused = send(
        "hana-transfer-1",
        r#"{"to_user_id": "ivan", "amount": "31.00", "memo": "rent"}"#,
    )
    .await;
    assert_eq!(reused.error(StatusCode::BAD_REQUEST)["field"], "request_id");

    // The memo is optional.
    let plain = http
        .post(
            services.user,
            "/users/hana/transfers",
            r#"{"to_user_id": "ivan", "amount": "20.00"}"#,
        )
        .await;
    assert_eq!(plain.data()["memo"], "");
    assert!(
        plain.header("idempotency-key").is_some(),
        "a generated key to retry with"
    );

    let balance = http.get(services.user, "/users/hana/balance").await;
    assert_eq!(balance.data()["cash_balance"], "150.00", "applied once, twice sent");
    assert_eq!(balance.data()["transferred_today"], "50.00");
    let received = http.get(services.user, "/users/ivan/balance").await;
    assert_eq!(received.data()["cash_balance"], "55.00");
    let ivan = http.get(services.user, "/users/ivan/transactions").await;
    let entries = ivan.data()["transactions"].as_array().expect("transactions").clone();
    assert_eq!(entries.len(), 3, "deposit and two transfers in: {entries:?}");
    let older_in = &entries[1];
    assert_eq!(older_in["kind"], "transfer_in");
    assert_eq!(older_in["transfer_id"], sent["transfer_id"]);
    assert_eq!(older_in["counterparty_user_id"], "hana");
    assert_eq!(older_in["memo"], "rent");
    assert_eq!(older_in["cash_delta"], "30.00");
    let hana = http.get(services.user, "/users/hana/transactions?limit=1").await;
    let newest_out = &hana.data()["transactions"][0];
    assert_eq!(newest_out["kind"], "transfer_out");
    assert_eq!(newest_out["cash_delta"], "-20.00");
    assert_eq!(newest_out["counterparty_user_id"], "ivan");
    assert_eq!(newest_out["memo"], Value::Null, "no memo");

    let refusals = [
        (
            r#"{"to_user_id": "ivan", "amount": "150.01"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "message",
            "Daily transfer limit exceeded. Limit: $100.00, Requested: $150.01",
        ),
        (
            r#"{"to_user_id": "ivan", "amount": "60.00"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "message",
            "Daily transfer limit exceeded. Limit: $100.00, Used today: $50.00, Requested: $60.00",
        ),
        (
            r#"{"to_user_id": "ivann", "amount": "1.00"}"#,
            StatusCode::NOT_FOUND,
            "message",
            "Account ivann not found",
        ),
        (
            r#"{"to_user_id": "hana", "amount": "1.00"}"#,
            StatusCode::BAD_REQUEST,
            "field",
            "to_user_id",
        ),
        (
            r#"{"to_user_id": "ivan", "amount": "1.00", "memo": "two\nlines"}"#,
            StatusCode::BAD_REQUEST,
            "field",
            "memo",
        ),
        (
            r#"{"to_user_id": "ivan", "amount": 1.5}"#,
            StatusCode::BAD_REQUEST,
            "code",
            "InvalidArgument",
        ),
    ];
    for (body, status, key, expected) in refusals {
        let reply = http.post(services.user, "/users/hana/transfers", body).await;
        assert_eq!(reply.error(status)[key], expected, "{body}");
    }
    // Short of cash: ivan has 55.00.
    let short = http
        .post(
            services.user,
            "/users/ivan/transfers",
            r#"{"to_user_id": "hana", "amount": "55.01"}"#,
        )
        .await;
    assert_eq!(
        short.error(StatusCode::UNPROCESSABLE_ENTITY)["message"],
        "Insufficient balance. Current: $55.00, Required: $55.01"
    );
    assert_eq!(app.cash("hana").await, "150.00", "no refusal moved anything");
    assert_eq!(app.cash("ivan").await, "55.00");
    http.get(services.user, "/users/ivann/balance")
        .await
        .error(StatusCode::NOT_FOUND);
}
