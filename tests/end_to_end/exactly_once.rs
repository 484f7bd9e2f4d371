//! Request ids make mutations exactly-once under retries, on every engine: a retry returns the
//! original reply (success or refusal) and applies nothing twice, even when duplicates race.

use lockstep::coordinator::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{AppOptions, EngineKind, spawn_app, spawn_peer};

fn deposit(user: &str, amount: &str, request_id: &str) -> pb::DepositRequest {
    pb::DepositRequest {
        user_id: user.to_owned(),
        amount: amount.to_owned(),
        request_id: request_id.to_owned(),
    }
}

fn withdraw(user: &str, amount: &str, request_id: &str) -> pb::WithdrawRequest {
    pb::WithdrawRequest {
        settlement: 0,
        user_id: user.to_owned(),
        amount: amount.to_owned(),
        request_id: request_id.to_owned(),
    }
}

fn buy(user: &str, asset: &str, quantity: &str, request_id: &str) -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        user_id: user.to_owned(),
        asset: asset.to_owned(),
        quantity: quantity.to_owned(),
        limit_price: None,
        request_id: request_id.to_owned(),
    }
}

/// A retried success, refusal or trade returns the original reply; nothing applies twice; a
/// key reused with other parameters is INVALID_ARGUMENT naming the mismatch.
async fn retries_return_the_original_reply(engine: EngineKind) {
    let app = spawn_app(engine).await;
    app.set_asset("AAA", "10", true).await;
    let mut client = app.client().await;

    let before = app.storage.requests();
    let first = client
        .deposit(deposit("once", "100.00", "dep-1"))
        .await
        .expect("deposit")
        .into_inner();
    assert_eq!(
        app.storage.requests() - before,
        2,
        "a request id costs no extra storage request"
    );
    app.withdraw("once", "30.00").await.expect("an unrelated withdrawal");
    let retried = client
        .deposit(deposit("once", "100.00", "dep-1"))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(retried, first, "the original reply, balance as it was then");
    assert_eq!(app.cash("once").await, "70.00", "applied once");

    let mismatch = client
        .deposit(deposit("once", "101.00", "dep-1"))
        .await
        .expect_err("other parameters");
    assert_eq!(mismatch.code(), Code::InvalidArgument);
    let violation = &mismatch.get_details_bad_request().expect("details").field_violations[0];
    assert_eq!(violation.field, "request_id");
    assert!(
        violation.description.contains("DEPOSIT 100.00") && violation.description.contains("DEPOSIT 101.00"),
        "{}",
        violation.description
    );
    let other_operation = client
        .withdraw(withdraw("once", "100.00", "dep-1"))
        .await
        .expect_err("other operation");
    assert_eq!(other_operation.code(), Code::InvalidArgument);

    let refused = client
        .withdraw(withdraw("once", "500.00", "wd-1"))
        .await
        .expect_err("insufficient");
    app.deposit("once", "1000.00").await.expect("now there would be enough");
    let refused_again = client
        .withdraw(withdraw("once", "500.00", "wd-1"))
        .await
        .expect_err("replayed refusal");
    assert_eq!(
        (refused_again.code(), refused_again.message()),
        (refused.code(), refused.message())
    );
    assert_eq!(app.cash("once").await, "1070.00");

    let bought = client
        .place_buy(buy("once", "AAA", "2", "buy-1"))
        .await
        .expect("buy")
        .into_inner();
    let bought_again = client
        .place_buy(buy("once", "AAA", "2", "buy-1"))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(bought_again, bought);
    let account = app.account("once").await.expect("account");
    assert_eq!(
        (account.cash_balance.as_str(), account.holdings[0].quantity.as_str()),
        ("1050.00", "2")
    );
    assert_eq!(
        app.full_ledger("once").await.len(),
        4,
        "deposit, withdrawal, deposit, buy"
    );

    let same_key_other_user = client
        .deposit(deposit("twice", "5.00", "dep-1"))
        .await
        .expect("keys are per user");
    assert_eq!(same_key_other_user.into_inner().cash_balance, "5.00");
}

/// Duplicates racing through two coordinators: one executes, every other gets its reply.
async fn concurrent_duplicates_execute_once(engine: EngineKind) {
    let app = spawn_app_with_wait(engine).await;
    let peer = spawn_peer(&app, AppOptions::default().flag("--lock-wait-ms", "20000")).await;
    app.deposit("racer", "100.00").await.expect("deposit");
    for round in 0..engine.scale(10, 4) {
        let key = format!("race-{round}");
        let mut calls = Vec::new();
        for index in 0..6 {
            let mut client = if index % 2 == 0 {
                app.client().await
            } else {
                peer.client().await
            };
            let request = withdraw("racer", "1.00", &key);
            calls.push(tokio::spawn(async move { client.withdraw(request).await }));
        }
        let mut replies = Vec::new();
        for call in calls {
            replies.push(
                call.await
                    .expect("task")
                    .expect("every duplicate succeeds")
                    .into_inner(),
            );
        }
        assert!(
            replies.windows(2).all(|pair| pair[0] == pair[1]),
            "round {round}: one reply for all: {replies:?}"
        );
    }
    assert_eq!(app.cash("racer").await, format!("{}.00", 100 - engine.scale(10, 4)));
}

async fn spawn_app_with_wait(engine: EngineKind) -> crate::helpers::TestApp {
    crate::helpers::spawn_app_with(engine, AppOptions::default().flag("--lock-wait-ms", "20000")).await
}

crate::on_every_engine!(retries_return_the_original_reply, concurrent_duplicates_execute_once);
