//! Holds end to end, on every engine: ReserveOrder sets money aside so it cannot be spent twice,
//! FillOrder applies fills in parts at the exchange's price within the limit (each fill id
//! once), CancelOrder releases what is left, and expiry is exact. Every bad input is refused
//! with its field or its rule and writes nothing; racing fills and cancels through two
//! coordinators end once each, and the audit finds the books in order.

use std::time::Duration;

use lockstep::coordinator::v1 as pb;
use lockstep_coordinator::core::{Clock, SystemClock};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{AppOptions, EngineKind, TestApp, spawn_app, spawn_app_with, spawn_peer};

fn field_of(status: &tonic::Status) -> String {
    status
        .get_details_bad_request()
        .and_then(|bad| bad.field_violations.first().map(|violation| violation.field.clone()))
        .unwrap_or_default()
}

pub fn reserve_request(
    user: &str,
    side: pb::OrderSide,
    quantity: &str,
    limit: &str,
    seconds: u64,
) -> pb::ReserveOrderRequest {
    pb::ReserveOrderRequest {
        user_id: user.to_owned(),
        side: side as i32,
        asset: "SOL".to_owned(),
        quantity: quantity.to_owned(),
        limit_price: limit.to_owned(),
        expires_in_seconds: seconds,
        request_id: String::new(),
    }
}

pub fn fill_request(user: &str, order_id: &str, fill_id: &str, quantity: &str, price: &str) -> pb::FillOrderRequest {
    pb::FillOrderRequest {
        user_id: user.to_owned(),
        order_id: order_id.to_owned(),
        fill_id: fill_id.to_owned(),
        quantity: quantity.to_owned(),
        price: price.to_owned(),
    }
}

async fn reserve(app: &TestApp, request: pb::ReserveOrderRequest) -> Result<pb::OrderReply, tonic::Status> {
    app.client()
        .await
        .reserve_order(request)
        .await
        .map(tonic::Response::into_inner)
}

async fn fill(app: &TestApp, request: pb::FillOrderRequest) -> Result<pb::OrderReply, tonic::Status> {
    app.client()
        .await
        .fill_order(request)
        .await
        .map(tonic::Response::into_inner)
}

async fn cancel(app: &TestApp, user: &str, order_id: &str) -> Result<pb::OrderReply, tonic::Status> {
    app.client()
        .await
        .cancel_order(pb::CancelOrderRequest {
            user_id: user.to_owned(),
            order_id: order_id.to_owned(),
            request_id: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn orders_in(app: &TestApp, user: &str, status: pb::OrderStatus) -> Vec<pb::Order> {
    app.client()
        .await
        .list_orders(pb::ListOrdersRequest {
            user_id: user.to_owned(),
            page_size: 100,
            page_token: String::new(),
            status: status as i32,
        })
        .await
        .expect("orders")
        .into_inner()
        .orders
}

async fn assert_audit_clean(app: &TestApp) {
    let report = lockstep_coordinator::audit::audit(&app.storage, SystemClock.now(), Duration::from_secs(60))
        .await
        .expect("audit");
    assert!(report.is_clean(), "{report}");
}

fn order_of(reply: &pb::OrderReply) -> &pb::Order {
    reply.order.as_ref().expect("an order")
}

/// A buy reserved for 4 SOL at 140 holds 560.00; two fills below the limit move the cash at
/// their price, give the difference back to available, and end the order FILLED; the ledger
/// reads HOLD, FILL, FILL with the hold's movements; GetAccount shows total, on hold and
/// available; ListOrders filters by status; a sell's hold is released by a cancel.
async fn a_reserved_order_fills_in_parts(engine: EngineKind) {
    let app = spawn_app(engine).await;
    app.deposit("holder", "1000.00").await.expect("deposit");
    let reserved = reserve(&app, reserve_request("holder", pb::OrderSide::Buy, "4", "140", 0))
        .await
        .expect("reserve");
    let order = order_of(&reserved).clone();
    assert_eq!(order.status, pb::OrderStatus::Open as i32);
    assert_eq!((order.filled_quantity.as_str(), order.total.as_str()), ("0", "0.00"));
    assert!(!order.expires_at.is_empty());
    let account = app.account("holder").await.expect("account");
    assert_eq!(
        (
            account.cash_balance.as_str(),
            account.cash_on_hold.as_str(),
            account.cash_available.as_str()
        ),
        ("1000.00", "560.00", "440.00")
    );
    let spend = app
        .withdraw("holder", "440.01")
        .await
        .expect_err("held cash is not spendable");
    assert_eq!(spend.code(), Code::FailedPrecondition);

    let first = fill(&app, fill_request("holder", &order.order_id, "ex-1", "1.5", "139"))
        .await
        .expect("first fill");
    assert_eq!(order_of(&first).status, pb::OrderStatus::PartiallyFilled as i32);
    assert_eq!((first.cash_balance.as_str(), first.holding.as_str()), ("791.50", "1.5"));
    let second = fill(&app, fill_request("holder", &order.order_id, "ex-2", "2.5", "140"))
        .await
        .expect("second fill");
    let done = order_of(&second);
    assert_eq!(done.status, pb::OrderStatus::Filled as i32);
    assert_eq!((done.filled_quantity.as_str(), done.total.as_str()), ("4", "558.50"));
    let account = app.account("holder").await.expect("account");
    assert_eq!(
        (
            account.cash_balance.as_str(),
            account.cash_on_hold.as_str(),
            account.cash_available.as_str()
        ),
        ("441.50", "0.00", "441.50")
    );
    let ledger = app.full_ledger("holder").await;
    let kinds: Vec<i32> = ledger.iter().take(3).map(|entry| entry.kind).collect();
    assert_eq!(
        kinds,
        [pb::EntryKind::Fill, pb::EntryKind::Fill, pb::EntryKind::Hold].map(|kind| kind as i32)
    );
    assert_eq!(
        (
            ledger[2].held_delta.as_str(),
            ledger[2].order_id.as_str(),
            ledger[2].cash_delta.as_str()
        ),
        ("560.00", order.order_id.as_str(), "0.00")
    );
    assert_eq!(
        (ledger[1].fill_id.as_str(), ledger[1].cash_delta.as_str()),
        ("ex-1", "-208.50")
    );
    assert_eq!(ledger[0].quantity_delta, "2.5");

    // A sell holds the asset; a cancel gives it back.
    let sell = reserve(&app, reserve_request("holder", pb::OrderSide::Sell, "3", "150", 600))
        .await
        .expect("reserve a sell");
    let account = app.account("holder").await.expect("account");
    assert_eq!(
        (
            account.holdings[0].on_hold.as_str(),
            account.holdings[0].available.as_str()
        ),
        ("3", "1")
    );
    assert_eq!(
        app.sell("holder", "SOL", "1.001").await.expect_err("held").code(),
        Code::FailedPrecondition
    );
    let open = orders_in(&app, "holder", pb::OrderStatus::Open).await;
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].order_id, order_of(&sell).order_id);
    assert_eq!(orders_in(&app, "holder", pb::OrderStatus::Filled).await.len(), 1);
    let cancelled = cancel(&app, "holder", &order_of(&sell).order_id).await.expect("cancel");
    assert_eq!(order_of(&cancelled).status, pb::OrderStatus::Cancelled as i32);
    let account = app.account("holder").await.expect("account");
    assert_eq!(account.holdings[0].available, "4");
    let again = cancel(&app, "holder", &order_of(&sell).order_id)
        .await
        .expect_err("twice");
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert!(again.message().ends_with("is CANCELLED"), "{}", again.message());
    let filled = cancel(&app, "holder", &order.order_id)
        .await
        .expect_err("a filled order");
    assert!(filled.message().ends_with("is FILLED"), "{}", filled.message());
    assert_audit_clean(&app).await;
}

/// Every bad input names its field or rule and writes nothing: a missing limit or side, an
/// expiry out of range, a zero quantity, a missing fill id, a price beyond the limit, a fill
/// larger than what remains, another user's order, an id that is not one. A fill id applies
/// once: the same figures replay the first reply, other figures are INVALID_ARGUMENT.
async fn bad_input_writes_nothing(engine: EngineKind) {
    let app = spawn_app(engine).await;
    app.deposit("owner", "500.00").await.expect("deposit");
    app.deposit("intruder", "500.00").await.expect("deposit");
    let order = order_of(
        &reserve(&app, reserve_request("owner", pb::OrderSide::Buy, "2", "100", 0))
            .await
            .expect("reserve"),
    )
    .order_id
    .clone();
    let entries = app.full_ledger("owner").await.len();

    let mut no_limit = reserve_request("owner", pb::OrderSide::Buy, "1", "", 0);
    let refused = reserve(&app, no_limit.clone()).await.expect_err("no limit");
    assert_eq!(
        (refused.code(), field_of(&refused).as_str()),
        (Code::InvalidArgument, "limit_price")
    );
    no_limit.limit_price = "10".to_owned();
    no_limit.side = pb::OrderSide::Unspecified as i32;
    let refused = reserve(&app, no_limit).await.expect_err("no side");
    assert_eq!(field_of(&refused), "side");
    let refused = reserve(&app, reserve_request("owner", pb::OrderSide::Buy, "1", "10", 2_592_001))
        .await
        .expect_err("expiry");
    assert_eq!(field_of(&refused), "expires_in_seconds");
    let refused = reserve(&app, reserve_request("owner", pb::OrderSide::Buy, "3.01", "100", 0))
        .await
        .expect_err("more than available");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("Current: $300.00"), "{}", refused.message());

    for (request, field) in [
        (fill_request("owner", &order, "f", "0", "99"), "quantity"),
        (fill_request("owner", &order, "", "1", "99"), "fill_id"),
        (fill_request("owner", &order, "f", "1", "-1"), "price"),
        (fill_request("owner", "not-an-id", "f", "1", "99"), "order_id"),
    ] {
        let refused = fill(&app, request).await.expect_err(field);
        assert_eq!(
            (refused.code(), field_of(&refused).as_str()),
            (Code::InvalidArgument, field)
        );
    }
    let above = fill(&app, fill_request("owner", &order, "f1", "1", "100.01"))
        .await
        .expect_err("above");
    assert_eq!(above.code(), Code::FailedPrecondition);
    assert!(above.message().contains("above the limit"), "{}", above.message());
    let large = fill(&app, fill_request("owner", &order, "f2", "2.001", "99"))
        .await
        .expect_err("large");
    assert_eq!(large.code(), Code::FailedPrecondition);
    let stolen = fill(&app, fill_request("intruder", &order, "f3", "1", "99"))
        .await
        .expect_err("stolen");
    assert_eq!(stolen.code(), Code::NotFound);
    let stolen = cancel(&app, "intruder", &order).await.expect_err("stolen cancel");
    assert_eq!(stolen.code(), Code::NotFound);
    let made_up = fill(
        &app,
        fill_request("owner", "0190a0d1-0000-7000-8000-000000000000", "f4", "1", "99"),
    )
    .await
    .expect_err("made up");
    assert_eq!(made_up.code(), Code::NotFound);
    // Refusals under the lease are recorded under their fill id (f1, f2): nothing else.
    assert_eq!(app.full_ledger("owner").await.len(), entries, "refusals move nothing");
    assert_eq!(app.full_ledger("intruder").await.len(), 1);

    let first = fill(&app, fill_request("owner", &order, "once", "1", "99.5"))
        .await
        .expect("fill");
    let again = fill(&app, fill_request("owner", &order, "once", "1", "99.5"))
        .await
        .expect("repeat");
    assert_eq!(again.transaction_id, first.transaction_id, "the original fill");
    assert_eq!(again.cash_balance, first.cash_balance);
    let other = fill(&app, fill_request("owner", &order, "once", "1", "99"))
        .await
        .expect_err("other figures");
    assert_eq!(
        (other.code(), field_of(&other).as_str()),
        (Code::InvalidArgument, "fill_id")
    );
    assert_eq!(app.cash("owner").await, "400.50", "applied once");
    assert_audit_clean(&app).await;
}

/// From expires_at on the hold counts for nothing and a fill is refused naming the instant;
/// the order reads EXPIRED and cannot be cancelled; nothing has to sweep it first.
async fn expiry_is_exact(engine: EngineKind) {
    let app = spawn_app(engine).await;
    app.deposit("late", "100.00").await.expect("deposit");
    let order = order_of(
        &reserve(&app, reserve_request("late", pb::OrderSide::Buy, "1", "100", 1))
            .await
            .expect("reserve"),
    )
    .clone();
    assert_eq!(app.account("late").await.expect("account").cash_available, "0.00");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let refused = fill(&app, fill_request("late", &order.order_id, "x", "1", "99"))
        .await
        .expect_err("expired");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(
        refused.message(),
        format!("Order {} expired at {}", order.order_id, order.expires_at)
    );
    let stored = app
        .client()
        .await
        .get_order(pb::GetOrderRequest {
            order_id: order.order_id.clone(),
        })
        .await
        .expect("order")
        .into_inner();
    assert_eq!(stored.status, pb::OrderStatus::Expired as i32);
    assert_eq!(app.account("late").await.expect("account").cash_available, "100.00");
    let refused = cancel(&app, "late", &order.order_id).await.expect_err("expired cancel");
    assert!(refused.message().ends_with("is EXPIRED"), "{}", refused.message());
    app.withdraw("late", "100.00")
        .await
        .expect("the released cash is spendable");
    assert_audit_clean(&app).await;
}

/// Fills racing for the last units and a cancel racing them, through two coordinators on one
/// table with account affinity (so the non-owner forwards ReserveOrder, FillOrder and
/// CancelOrder to the owner), repeated: each call ends once (OK, or FAILED_PRECONDITION), the
/// order never fills beyond its quantity, and the audit finds holds, orders and ledger in
/// agreement.
async fn racing_fills_and_cancels_end_once(engine: EngineKind) {
    let options = AppOptions::default().flag("--lock-wait-ms", "20000").affinity();
    let app = spawn_app_with(engine, options.clone()).await;
    let peer = spawn_peer(&app, options).await;
    for each in [&app, &peer] {
        let membership = &each.affinity.as_ref().expect("affinity on").membership;
        for _ in 0..200 {
            if membership.live().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(membership.live().len(), 2, "membership settled");
    }
    app.deposit("racer", "5000.00").await.expect("deposit");
    let rounds = engine.scale(12, 4);
    for round in 0..rounds {
        let order = order_of(
            &reserve(&app, reserve_request("racer", pb::OrderSide::Buy, "3", "100", 0))
                .await
                .expect("reserve"),
        )
        .order_id
        .clone();
        let mut calls = Vec::new();
        for caller in 0..6usize {
            let mut client = if caller % 2 == 0 {
                app.client().await
            } else {
                peer.client().await
            };
            let order = order.clone();
            calls.push(tokio::spawn(async move {
                if caller == 5 && round % 2 == 0 {
                    client
                        .cancel_order(pb::CancelOrderRequest {
                            user_id: "racer".to_owned(),
                            order_id: order,
                            request_id: String::new(),
                        })
                        .await
                        .map(|_| false)
                } else {
                    client
                        .fill_order(fill_request("racer", &order, &format!("r{caller}"), "1", "99.99"))
                        .await
                        .map(|_| true)
                }
            }));
        }
        let mut fills = 0;
        for call in calls {
            match call.await.expect("task") {
                Ok(true) => fills += 1,
                Ok(false) => {}
                Err(status) if status.code() == Code::FailedPrecondition => {}
                Err(status) => panic!("round {round}: {status:?}"),
            }
        }
        assert!(fills <= 3, "round {round}: {fills} fills of 3 units");
        let stored = app
            .client()
            .await
            .get_order(pb::GetOrderRequest { order_id: order })
            .await
            .expect("order")
            .into_inner();
        assert_eq!(stored.filled_quantity, fills.to_string(), "round {round}");
    }
    let account = app.account("racer").await.expect("account");
    assert_eq!(account.cash_on_hold, "0.00", "every order ended: filled or cancelled");
    assert_audit_clean(&app).await;
}

fn pending_withdraw(user: &str, amount: &str, request_id: &str) -> pb::WithdrawRequest {
    pb::WithdrawRequest {
        user_id: user.to_owned(),
        amount: amount.to_owned(),
        request_id: request_id.to_owned(),
        settlement: pb::Settlement::Pending as i32,
    }
}

fn settle_request(user: &str, withdrawal_id: &str, request_id: &str) -> pb::SettleWithdrawalRequest {
    pb::SettleWithdrawalRequest {
        user_id: user.to_owned(),
        withdrawal_id: withdrawal_id.to_owned(),
        request_id: request_id.to_owned(),
    }
}

fn return_request(user: &str, withdrawal_id: &str, reason: &str) -> pb::ReturnWithdrawalRequest {
    pb::ReturnWithdrawalRequest {
        user_id: user.to_owned(),
        withdrawal_id: withdrawal_id.to_owned(),
        reason: reason.to_owned(),
        request_id: String::new(),
    }
}

/// A withdrawal with settlement PENDING holds its amount (counted against today's limit at
/// once, the cash balance unchanged, available down); SettleWithdrawal lets it leave once (a
/// retry with its request id replays); ReturnWithdrawal gives it back and today's total with
/// it; each ends once, naming the status; another user's id is NOT_FOUND; bad fields are named.
async fn a_pending_withdrawal_settles_or_returns_once(engine: EngineKind) {
    let app = spawn_app(engine).await;
    app.deposit("payee", "500.00").await.expect("deposit");
    app.deposit("other", "1.00").await.expect("deposit");
    let mut client = app.client().await;
    let pending = client
        .withdraw(pending_withdraw("payee", "200.00", "w-1"))
        .await
        .expect("pending")
        .into_inner();
    assert_eq!(
        (pending.amount.as_str(), pending.cash_balance.as_str()),
        ("200.00", "500.00")
    );
    assert!(!pending.withdrawal_id.is_empty());
    let account = app.account("payee").await.expect("account");
    assert_eq!(
        (
            account.cash_on_hold.as_str(),
            account.cash_available.as_str(),
            account.withdrawn_today.as_str()
        ),
        ("200.00", "300.00", "200.00")
    );
    let short = app.withdraw("payee", "300.01").await.expect_err("held cash");
    assert_eq!(short.code(), Code::FailedPrecondition);

    let stolen = client
        .settle_withdrawal(settle_request("other", &pending.withdrawal_id, ""))
        .await
        .expect_err("another user's");
    assert_eq!(stolen.code(), Code::NotFound);
    let settled = client
        .settle_withdrawal(settle_request("payee", &pending.withdrawal_id, "s-1"))
        .await
        .expect("settle")
        .into_inner();
    assert_eq!(
        (
            settled.amount.as_str(),
            settled.cash_balance.as_str(),
            settled.withdrawal_id.as_str()
        ),
        ("200.00", "300.00", pending.withdrawal_id.as_str())
    );
    let replayed = client
        .settle_withdrawal(settle_request("payee", &pending.withdrawal_id, "s-1"))
        .await
        .expect("replayed")
        .into_inner();
    assert_eq!(replayed, settled, "the original reply");
    let twice = client
        .settle_withdrawal(settle_request("payee", &pending.withdrawal_id, ""))
        .await
        .expect_err("twice");
    assert_eq!(twice.code(), Code::FailedPrecondition);
    assert!(twice.message().ends_with("is SETTLED"), "{}", twice.message());
    let late = client
        .return_withdrawal(return_request("payee", &pending.withdrawal_id, "late"))
        .await
        .expect_err("returned after settling");
    assert!(late.message().ends_with("is SETTLED"), "{}", late.message());

    let second = client
        .withdraw(pending_withdraw("payee", "100.00", ""))
        .await
        .expect("second pending")
        .into_inner();
    let returned = client
        .return_withdrawal(return_request("payee", &second.withdrawal_id, "account closed"))
        .await
        .expect("return")
        .into_inner();
    assert_eq!(
        (returned.amount.as_str(), returned.cash_balance.as_str()),
        ("100.00", "300.00")
    );
    let account = app.account("payee").await.expect("account");
    assert_eq!(
        (
            account.cash_balance.as_str(),
            account.cash_on_hold.as_str(),
            account.withdrawn_today.as_str()
        ),
        ("300.00", "0.00", "200.00")
    );
    let kinds: Vec<i32> = app
        .full_ledger("payee")
        .await
        .iter()
        .take(4)
        .map(|entry| entry.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            pb::EntryKind::Release,
            pb::EntryKind::Hold,
            pb::EntryKind::Withdrawal,
            pb::EntryKind::Hold
        ]
        .map(|kind| kind as i32)
    );

    let entries = app.full_ledger("payee").await.len();
    let mut bad = pending_withdraw("payee", "1.00", "");
    bad.settlement = 7;
    let refused = client.withdraw(bad).await.expect_err("settlement");
    assert_eq!(
        (refused.code(), field_of(&refused).as_str()),
        (Code::InvalidArgument, "settlement")
    );
    let refused = client
        .settle_withdrawal(settle_request("payee", "not-an-id", ""))
        .await
        .expect_err("id");
    assert_eq!(field_of(&refused), "withdrawal_id");
    let refused = client
        .return_withdrawal(return_request("payee", &second.withdrawal_id, &"x".repeat(141)))
        .await
        .expect_err("reason");
    assert_eq!(field_of(&refused), "reason");
    let refused = client
        .withdraw(pending_withdraw("payee", "5000.01", ""))
        .await
        .expect_err("above the daily limit");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(app.full_ledger("payee").await.len(), entries, "refusals write nothing");
    assert_audit_clean(&app).await;
}

crate::on_every_engine!(
    a_pending_withdrawal_settles_or_returns_once,
    a_reserved_order_fills_in_parts,
    bad_input_writes_nothing,
    expiry_is_exact,
    racing_fills_and_cancels_end_once,
);
