//! Bad input is answered with the right code, names the field and the reason, and writes
//! nothing; on every engine.

use lockstep::coordinator::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{EngineKind, TestApp, spawn_app};

enum Call {
    Deposit(&'static str, &'static str),
    Withdraw(&'static str, &'static str),
    Buy(&'static str, &'static str, &'static str, Option<&'static str>),
    Sell(&'static str, &'static str, &'static str, Option<&'static str>),
    GetOrder(&'static str),
    Ledger(&'static str, u32, &'static str),
    UpsertAsset(&'static str, &'static str),
}

/// (call, expected code, for INVALID_ARGUMENT the field named in the BadRequest details).
fn cases() -> Vec<(Call, Code, &'static str)> {
    use Call::*;
    let long_user: &'static str = Box::leak("u".repeat(65).into_boxed_str());
    vec![
        (Deposit("victim", "-5.00"), Code::InvalidArgument, "amount"),
        (Deposit("victim", "0"), Code::InvalidArgument, "amount"),
        (Deposit("victim", "0.00"), Code::InvalidArgument, "amount"),
        (Deposit("victim", "NaN"), Code::InvalidArgument, "amount"),
        (Deposit("victim", "inf"), Code::InvalidArgument, "amount"),
        (Deposit("victim", "1e3"), Code::InvalidArgument, "amount"),
        (Deposit("victim", "0.001"), Code::InvalidArgument, "amount"),
        (Deposit("victim", "10.123"), Code::InvalidArgument, "amount"),
        (Deposit("victim", "1000000.01"), Code::InvalidArgument, "amount"),
        (Deposit("victim", ""), Code::InvalidArgument, "amount"),
        (Deposit("victim", " 10"), Code::InvalidArgument, "amount"),
        (Deposit("victim", "10 "), Code::InvalidArgument, "amount"),
        (Deposit("victim", "+5"), Code::InvalidArgument, "amount"),
        (Deposit("victim", "1,000"), Code::InvalidArgument, "amount"),
        (Deposit("victim", "0x10"), Code::InvalidArgument, "amount"),
        (Deposit("victim", "١٠٠"), Code::InvalidArgument, "amount"),
        (Deposit("victim", "１００"), Code::InvalidArgument, "amount"),
        (Deposit("", "10.00"), Code::InvalidArgument, "user_id"),
        (Deposit(long_user, "10.00"), Code::InvalidArgument, "user_id"),
        (Deposit("al ice", "10.00"), Code::InvalidArgument, "user_id"),
        (Deposit("ålice", "10.00"), Code::InvalidArgument, "user_id"),
        (Deposit("bob/1", "10.00"), Code::InvalidArgument, "user_id"),
        (Withdraw("victim", "-1"), Code::InvalidArgument, "amount"),
        (Withdraw("victim", "1e2"), Code::InvalidArgument, "amount"),
        (Withdraw("nobody", "1.00"), Code::NotFound, ""),
        (Buy("victim", "AAA", "0", None), Code::InvalidArgument, "quantity"),
        (Buy("victim", "AAA", "0.0009", None), Code::InvalidArgument, "quantity"),
        (
            Buy("victim", "AAA", "1.123456789", None),
            Code::InvalidArgument,
            "quantity",
        ),
        (Buy("victim", "AAA", "-1", None), Code::InvalidArgument, "quantity"),
        (Buy("victim", "AAA", "abc", None), Code::InvalidArgument, "quantity"),
        (Buy("victim", "aaa", "1", None), Code::InvalidArgument, "asset"),
        (Buy("victim", "", "1", None), Code::InvalidArgument, "asset"),
        (Buy("victim", "ABCDEFGHIJK", "1", None), Code::InvalidArgument, "asset"),
        (
            Buy("victim", "AAA", "1", Some("0")),
            Code::InvalidArgument,
            "limit_price",
        ),
        (
            Buy("victim", "AAA", "1", Some("-1")),
            Code::InvalidArgument,
            "limit_price",
        ),
        (
            Buy("victim", "AAA", "1", Some("1e2")),
            Code::InvalidArgument,
            "limit_price",
        ),
        (Buy("victim", "ZZZ", "1", None), Code::NotFound, ""),
        (Buy("victim", "LUNA", "1", None), Code::FailedPrecondition, ""),
        (Buy("nobody", "AAA", "1", None), Code::NotFound, ""),
        (
            Sell("victim", "AAA", "0.00000001", None),
            Code::InvalidArgument,
            "quantity",
        ),
        (Sell("victim", "ZZZ", "1", None), Code::NotFound, ""),
        (
            Sell("victim", "AAA", "1", Some("NaN")),
            Code::InvalidArgument,
            "limit_price",
        ),
        (GetOrder("not-a-uuid"), Code::InvalidArgument, "order_id"),
        (Ledger("victim", 101, ""), Code::InvalidArgument, "page_size"),
        (
            Ledger("victim", 10, "not a cursor!"),
            Code::InvalidArgument,
            "page_token",
        ),
        (Ledger("victim", 10, "T1JERVIjeA"), Code::InvalidArgument, "page_token"),
        (UpsertAsset("AAA", "abc"), Code::InvalidArgument, "asset.price"),
        (UpsertAsset("aaa", "1"), Code::InvalidArgument, "asset.symbol"),
    ]
}

async fn send(app: &TestApp, call: &Call) -> Result<(), tonic::Status> {
    let mut client = app.client().await;
    let order = |user: &str, asset: &str, quantity: &str, limit: &Option<&str>| pb::PlaceOrderRequest {
        user_id: user.to_owned(),
        asset: asset.to_owned(),
        quantity: quantity.to_owned(),
        limit_price: limit.map(str::to_owned),
        ..Default::default()
    };
    match call {
        Call::Deposit(user, amount) => app.deposit(user, amount).await.map(drop),
        Call::Withdraw(user, amount) => app.withdraw(user, amount).await.map(drop),
        Call::Buy(user, asset, quantity, limit) => {
            client.place_buy(order(user, asset, quantity, limit)).await.map(drop)
        }
        Call::Sell(user, asset, quantity, limit) => {
            client.place_sell(order(user, asset, quantity, limit)).await.map(drop)
        }
        Call::GetOrder(order_id) => client
            .get_order(pb::GetOrderRequest {
                order_id: (*order_id).to_owned(),
            })
            .await
            .map(drop),
        Call::Ledger(user, page_size, page_token) => client
            .list_ledger(pb::ListLedgerRequest {
                user_id: (*user).to_owned(),
                page_size: *page_size,
                page_token: (*page_token).to_owned(),
                after_sequence: None,
            })
            .await
            .map(drop),
        Call::UpsertAsset(symbol, price) => client
            .upsert_asset(pb::UpsertAssetRequest {
                asset: Some(pb::Asset {
                    symbol: (*symbol).to_owned(),
                    price: (*price).to_owned(),
                    active: true,
                }),
                force: false,
            })
            .await
            .map(drop),
    }
}

/// Everything a bad request could have touched.
async fn snapshot(app: &TestApp) -> (pb::Account, usize, usize, Vec<pb::Asset>) {
    let orders = app
        .client()
        .await
        .list_orders(pb::ListOrdersRequest {
            user_id: "victim".into(),
            page_size: 100,
            page_token: String::new(),
            status: 0,
        })
        .await
        .expect("orders")
        .into_inner()
        .orders
        .len();
    let assets = app
        .client()
        .await
        .list_assets(pb::ListAssetsRequest {})
        .await
        .expect("assets")
        .into_inner()
        .assets;
    (
        app.account("victim").await.expect("account"),
        app.full_ledger("victim").await.len(),
        orders,
        assets,
    )
}

/// At least 30 kinds of bad input, each refused with its code and field, none writing anything.
async fn bad_inputs_are_refused_without_writing(engine: EngineKind) {
    let app = spawn_app(engine).await;
    app.set_asset("AAA", "10", true).await;
    app.deposit("victim", "100.00").await.expect("deposit");
    app.buy("victim", "AAA", "1").await.expect("buy");
    let before = snapshot(&app).await;
    let cases = cases();
    assert!(cases.len() >= 30);
    for (call, code, field) in &cases {
        let requests_before = app.storage.requests();
        let status = send(&app, call).await.expect_err("bad input must be refused");
        let label = format!("{:?} {:?}", status.code(), status.message());
        assert_eq!(status.code(), *code, "{label}");
        if *code == Code::InvalidArgument {
            let details = status
                .get_details_bad_request()
                .unwrap_or_else(|| panic!("BadRequest details missing: {label}"));
            assert_eq!(details.field_violations.len(), 1, "{label}");
            assert_eq!(details.field_violations[0].field, *field, "{label}");
            assert!(!details.field_violations[0].description.is_empty(), "{label}");
            assert!(status.message().starts_with(field), "{label}");
            assert_eq!(
                app.storage.requests(),
                requests_before,
                "validation touches no storage: {label}"
            );
        }
    }
    assert_eq!(snapshot(&app).await, before, "nothing was written");
}

crate::on_every_engine!(bad_inputs_are_refused_without_writing);
