//! Transfer end to end, on every engine: the money moves with both ledger entries, each refusal
//! has its code and field and moves nothing, a request id makes it exactly-once, and many callers
//! transferring both ways between a few accounts through several coordinators on one table never
//! deadlock and conserve the money.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use lockstep::coordinator::v1 as pb;
use lockstep::coordinator::v1::coordinator_client::CoordinatorClient;
use lockstep_coordinator::core::{Clock, SystemClock};
use rust_decimal::Decimal;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::helpers::{AppOptions, EngineKind, TestApp, spawn_app, spawn_app_with, spawn_peer};

/// The deadline of every call of the concurrent test: far beyond any wait the coordinator
/// allows itself (--lock-wait-ms below), so a call that reaches it is a deadlock, not a refusal.
const CALL_DEADLINE: Duration = Duration::from_secs(40);
/// The longest a call of the concurrent test may take: well inside its deadline.
const CALL_TAKES_MAX: Duration = Duration::from_secs(20);
const _: () = assert!(CALL_TAKES_MAX.as_secs() * 2 <= CALL_DEADLINE.as_secs());

fn decimal(raw: &str) -> Decimal {
    Decimal::from_str(raw).unwrap_or_else(|_| panic!("not a decimal: {raw:?}"))
}

fn transfer_request(from: &str, to: &str, amount: &str, memo: &str, request_id: &str) -> pb::TransferRequest {
    pb::TransferRequest {
        from_user_id: from.to_owned(),
        to_user_id: to.to_owned(),
        amount: amount.to_owned(),
        memo: memo.to_owned(),
        request_id: request_id.to_owned(),
    }
}

async fn transfer(app: &TestApp, request: pb::TransferRequest) -> Result<pb::TransferReply, tonic::Status> {
    app.client()
        .await
        .transfer(request)
        .await
        .map(tonic::Response::into_inner)
}

/// The audit finds the books in order: cash equals the sum of the ledger everywhere.
async fn assert_audit_clean(app: &TestApp) {
    let report = lockstep_coordinator::audit::audit(&app.storage, SystemClock.now(), Duration::from_secs(60))
        .await
        .expect("audit");
    assert!(report.is_clean(), "{report}");
}

/// A transfer moves the money: the sender's cash down and the receiver's up, a TRANSFER_OUT and
/// a TRANSFER_IN entry sharing the reply's transfer id, each naming the other party and carrying
/// the memo; the sender's daily total counts it. Both directions of the accounts' global order.
async fn a_transfer_moves_the_money(engine: EngineKind) {
    let app = spawn_app(engine).await;
    app.deposit("alice", "100.00").await.expect("deposit alice");
    app.deposit("bob", "10.00").await.expect("deposit bob");

    let memo = "rent — März";
    let reply = transfer(&app, transfer_request("alice", "bob", "25.00", memo, ""))
        .await
        .expect("transfer");
    uuid::Uuid::parse_str(&reply.transfer_id).expect("the transfer id is a UUID");
    assert_eq!(
        (
            reply.from_user_id.as_str(),
            reply.to_user_id.as_str(),
            reply.amount.as_str(),
            reply.memo.as_str(),
            reply.cash_balance.as_str()
        ),
        ("alice", "bob", "25.00", memo, "75.00")
    );

    let alice = app.account("alice").await.expect("alice");
    let bob = app.account("bob").await.expect("bob");
    assert_eq!(alice.cash_balance, "75.00");
    assert_eq!(bob.cash_balance, "35.00");
    assert_eq!(
        decimal(&alice.transferred_today),
        decimal("25.00"),
        "counted on the sender"
    );
    assert_eq!(decimal(&bob.transferred_today), Decimal::ZERO, "not on the receiver");
    assert_eq!(
        (alice.deposited_today.as_str(), bob.deposited_today.as_str()),
        ("100.00", "10.00"),
        "a transfer is not a deposit"
    );

    let (alice_ledger, bob_ledger) = (app.full_ledger("alice").await, app.full_ledger("bob").await);
    assert_eq!((alice_ledger.len(), bob_ledger.len()), (2, 2));
    let (out, into) = (&alice_ledger[0], &bob_ledger[0]);
    assert_eq!(out.transaction_id, reply.transaction_id);
    assert_eq!(out.kind, pb::EntryKind::TransferOut as i32);
    assert_eq!(into.kind, pb::EntryKind::TransferIn as i32);
    assert_eq!(
        (out.cash_delta.as_str(), out.cash_balance.as_str()),
        ("-25.00", "75.00")
    );
    assert_eq!(
        (into.cash_delta.as_str(), into.cash_balance.as_str()),
        ("25.00", "35.00")
    );
    assert_eq!(out.transfer_id, reply.transfer_id);
    assert_eq!(into.transfer_id, reply.transfer_id, "one transfer id on both entries");
    assert_eq!(
        (out.counterparty_user_id.as_str(), into.counterparty_user_id.as_str()),
        ("bob", "alice")
    );
    assert_eq!((out.memo.as_str(), into.memo.as_str()), (memo, memo));
    assert_eq!((out.user_id.as_str(), into.user_id.as_str()), ("alice", "bob"));
    assert!(out.asset.is_empty() && into.asset.is_empty(), "no holding moves");
    assert_ne!(out.transaction_id, into.transaction_id, "two entries");
    for earlier in [&alice_ledger[1], &bob_ledger[1]] {
        assert!(earlier.transfer_id.is_empty(), "a deposit has no transfer: {earlier:?}");
    }

    // The other way: the sender second in the accounts' order, and no memo.
    let back = transfer(&app, transfer_request("bob", "alice", "35.00", "", ""))
        .await
        .expect("transfer back, bob's whole balance");
    assert_eq!((back.cash_balance.as_str(), back.memo.as_str()), ("0.00", ""));
    assert_ne!(back.transfer_id, reply.transfer_id, "each transfer has its own id");
    assert_eq!(app.cash("alice").await, "110.00");
    assert_eq!(app.cash("bob").await, "0.00");
    let (alice_ledger, bob_ledger) = (app.full_ledger("alice").await, app.full_ledger("bob").await);
    assert_eq!(alice_ledger[0].kind, pb::EntryKind::TransferIn as i32);
    assert_eq!(bob_ledger[0].kind, pb::EntryKind::TransferOut as i32);
    assert_eq!(alice_ledger[0].transfer_id, back.transfer_id);
    assert_eq!(bob_ledger[0].transfer_id, back.transfer_id);
    assert_eq!(alice_ledger[0].counterparty_user_id, "bob");
    assert_eq!(alice_ledger[0].memo, "");
    assert_eq!(
        decimal(&app.account("bob").await.expect("bob").transferred_today),
        decimal("35.00")
    );
    assert_audit_clean(&app).await;
}

/// What a refused transfer could have touched: each account as GetAccount shows it (or its
/// status) and its whole ledger.
async fn books(app: &TestApp, users: &[&str]) -> Vec<(Result<pb::Account, Code>, Vec<pb::LedgerEntry>)> {
    let mut books = Vec::new();
    for user in users {
        let account = app.account(user).await.map_err(|status| status.code());
        let ledger = if account.is_ok() {
            app.full_ledger(user).await
        } else {
            Vec::new()
        };
        books.push((account, ledger));
    }
    books
}

/// Every item in the table, each as text, to look for a user's name in it.
async fn table_items(app: &TestApp) -> Vec<String> {
    let mut scan = app.storage.scan_table();
    let mut items = Vec::new();
    while let Some(page) = scan.next_page().await.expect("scan") {
        items.extend(page.iter().map(|item| format!("{item:?}")));
    }
    items
}

/// Every refusal of Transfer, each with its code (and field for bad input) and message, none
/// moving money: balances, daily totals and ledgers are as before, and the receiver that does
/// not exist still does not (no item of the table names it).
async fn every_refusal_writes_nothing(engine: EngineKind) {
    let app = spawn_app_with(engine, AppOptions::default().flag("--daily-transfer-limit", "30.00")).await;
    app.deposit("alice", "100.00").await.expect("deposit alice");
    app.deposit("bob", "10.00").await.expect("deposit bob");
    app.deposit("carol", "3.00").await.expect("deposit carol");
    transfer(&app, transfer_request("alice", "bob", "25.00", "", ""))
        .await
        .expect("a transfer that uses most of alice's daily limit");
    let users = ["alice", "bob", "carol", "bobb", "nobody"];
    let before = books(&app, &users).await;
    let items_before = table_items(&app).await;
    assert!(!items_before.iter().any(|item| item.contains("bobb")));

    let long_memo = "m".repeat(141);
    let bad_input = [
        (transfer_request("alice", "alice", "1.00", "", ""), "to_user_id"),
        (transfer_request("alice", "bob", "1.00", &long_memo, ""), "memo"),
        (transfer_request("alice", "bob", "1.00", "line\nbreak", ""), "memo"),
        (transfer_request("alice", "bob", "1.00", "tab\there", ""), "memo"),
        (transfer_request("alice", "bob", "1.00", "nul\0", ""), "memo"),
        (transfer_request("alice", "bob", "0.00", "", ""), "amount"),
        (transfer_request("alice", "bob", "-1.00", "", ""), "amount"),
        (transfer_request("alice", "bob", "1.001", "", ""), "amount"),
        (transfer_request("alice", "bob", "", "", ""), "amount"),
        (transfer_request("alice", "", "1.00", "", ""), "to_user_id"),
        (transfer_request("alice", "bob/1", "1.00", "", ""), "to_user_id"),
        (transfer_request("", "bob", "1.00", "", ""), "from_user_id"),
        (transfer_request("al ice", "bob", "1.00", "", ""), "from_user_id"),
    ];
    for (request, field) in bad_input {
        let requests_before = app.storage.requests();
        let status = transfer(&app, request.clone()).await.expect_err("bad input");
        let label = format!("{request:?}: {:?} {:?}", status.code(), status.message());
        assert_eq!(status.code(), Code::InvalidArgument, "{label}");
        let details = status
            .get_details_bad_request()
            .unwrap_or_else(|| panic!("BadRequest details missing: {label}"));
        assert_eq!(details.field_violations.len(), 1, "{label}");
        assert_eq!(details.field_violations[0].field, field, "{label}");
        assert!(status.message().starts_with(field), "{label}");
        assert_eq!(
            app.storage.requests(),
            requests_before,
            "validation touches no storage: {label}"
        );
    }
    let memo = transfer(&app, transfer_request("alice", "bob", "1.00", &long_memo, ""))
        .await
        .expect_err("long memo");
    assert_eq!(memo.message(), "memo: must be at most 140 characters");
    let same = transfer(&app, transfer_request("alice", "alice", "1.00", "", ""))
        .await
        .expect_err("to oneself");
    assert_eq!(
        same.message(),
        "to_user_id: must differ from from_user_id: a transfer needs two accounts"
    );

    let refusals = [
        (
            transfer_request("carol", "bob", "4.00", "", ""),
            Code::FailedPrecondition,
            "Insufficient balance. Current: $3.00, Required: $4.00",
        ),
        (
            transfer_request("alice", "bobb", "1.00", "a typo", ""),
            Code::NotFound,
            "Account bobb not found",
        ),
        (
            transfer_request("nobody", "bob", "1.00", "", ""),
            Code::NotFound,
            "Account nobody not found",
        ),
        (
            transfer_request("alice", "bob", "10.00", "", ""),
            Code::FailedPrecondition,
            "Daily transfer limit exceeded. Limit: $30.00, Used today: $25.00, Requested: $10.00",
        ),
        (
            transfer_request("bob", "carol", "30.01", "", ""),
            Code::FailedPrecondition,
            "Daily transfer limit exceeded. Limit: $30.00, Requested: $30.01",
        ),
    ];
    for (request, code, message) in refusals {
        let status = transfer(&app, request.clone()).await.expect_err("refused");
        assert_eq!((status.code(), status.message()), (code, message), "{request:?}");
    }
    let bobb = app.account("bobb").await.expect_err("no account for the typo");
    assert_eq!(bobb.code(), Code::NotFound);
    assert!(
        !table_items(&app).await.iter().any(|item| item.contains("bobb")),
        "the typo'd receiver has no item"
    );
    assert_eq!(books(&app, &users).await, before, "no refusal moved anything");
    // What the refusals left is still usable: the last of alice's daily limit goes through.
    transfer(&app, transfer_request("alice", "bob", "5.00", "", ""))
        .await
        .expect("within the limit");
    assert_eq!(app.cash("bob").await, "40.00");
    assert_audit_clean(&app).await;
}

/// A request id makes a transfer exactly-once, keyed on the sender: a retry returns the original
/// reply (the same transfer id, the balance as it was then) and applies nothing twice; a refused
/// transfer replays its refusal; the key with other parameters, or already used by another
/// operation of the sender, is INVALID_ARGUMENT on request_id; another sender's key is its own.
/// Duplicates racing through two coordinators apply once.
async fn a_retried_transfer_applies_once(engine: EngineKind) {
    let options = AppOptions::default().flag("--lock-wait-ms", "20000");
    let app = spawn_app_with(engine, options.clone()).await;
    let peer = spawn_peer(&app, options).await;
    app.deposit("alice", "100.00").await.expect("deposit alice");
    app.deposit("bob", "10.00").await.expect("deposit bob");
    app.deposit("carol", "1.00").await.expect("deposit carol");

    let request = transfer_request("alice", "bob", "25.00", "once", "transfer-1");
    let first = transfer(&app, request.clone()).await.expect("transfer");
    app.deposit("alice", "5.00").await.expect("an unrelated deposit");
    let retried = transfer(&app, request.clone()).await.expect("retry");
    assert_eq!(retried, first, "the original reply, balance as it was then");
    let through_peer = transfer(&peer, request.clone()).await.expect("retry elsewhere");
    assert_eq!(through_peer, first, "any coordinator answers the same");
    assert_eq!(app.cash("alice").await, "80.00", "applied once");
    assert_eq!(app.cash("bob").await, "35.00", "received once");
    assert_eq!(app.full_ledger("alice").await.len(), 3, "deposit, transfer, deposit");
    assert_eq!(app.full_ledger("bob").await.len(), 2, "deposit, transfer");

    for other in [
        transfer_request("alice", "bob", "26.00", "once", "transfer-1"),
        transfer_request("alice", "carol", "25.00", "once", "transfer-1"),
        transfer_request("alice", "bob", "25.00", "other memo", "transfer-1"),
    ] {
        let mismatch = transfer(&app, other.clone()).await.expect_err("other parameters");
        assert_eq!(mismatch.code(), Code::InvalidArgument, "{other:?}");
        let details = mismatch.get_details_bad_request().expect("details");
        assert_eq!(details.field_violations[0].field, "request_id", "{other:?}");
    }
    let deposit = pb::DepositRequest {
        user_id: "alice".to_owned(),
        amount: "1.00".to_owned(),
        request_id: "deposit-1".to_owned(),
    };
    app.client().await.deposit(deposit).await.expect("a keyed deposit");
    let other_operation = transfer(&app, transfer_request("alice", "bob", "1.00", "", "deposit-1"))
        .await
        .expect_err("the key of a deposit");
    assert_eq!(other_operation.code(), Code::InvalidArgument);
    assert_eq!(
        other_operation
            .get_details_bad_request()
            .expect("details")
            .field_violations[0]
            .field,
        "request_id"
    );
    let bobs = transfer(&app, transfer_request("bob", "alice", "1.00", "", "transfer-1"))
        .await
        .expect("keys are the sender's: bob's transfer-1 is another request");
    assert_ne!(bobs.transfer_id, first.transfer_id);
    assert_eq!(app.cash("alice").await, "82.00");

    let refused = transfer(&app, transfer_request("bob", "alice", "500.00", "", "transfer-2"))
        .await
        .expect_err("insufficient");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    app.deposit("bob", "1000.00").await.expect("now there would be enough");
    let refused_again = transfer(&app, transfer_request("bob", "alice", "500.00", "", "transfer-2"))
        .await
        .expect_err("the refusal replayed");
    assert_eq!(
        (refused_again.code(), refused_again.message()),
        (refused.code(), refused.message())
    );
    assert_eq!(app.cash("bob").await, "1034.00");

    // Duplicates racing through two coordinators: one executes, every copy gets its reply.
    let rounds = engine.scale(8, 3);
    for round in 0..rounds {
        let request = transfer_request("alice", "bob", "1.00", "", &format!("race-{round}"));
        let mut calls = Vec::new();
        for index in 0..6 {
            let mut client = if index % 2 == 0 {
                app.client().await
            } else {
                peer.client().await
            };
            let request = request.clone();
            calls.push(tokio::spawn(async move { client.transfer(request).await }));
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
    assert_eq!(
        decimal(&app.cash("alice").await),
        decimal("82.00") - Decimal::from(rounds)
    );
    assert_audit_clean(&app).await;
}

/// One call of the concurrent test: what it asked and how it ended.
struct Outcome {
    amount: Decimal,
    transfer_id: Option<String>,
}

/// Many callers transferring between the same four accounts in both directions at once, through
/// three coordinators sharing one table (two on moto), with the default `--known-accounts true`.
async fn concurrent_opposite_transfers_never_deadlock(engine: EngineKind) {
    opposite_transfers_through_several_coordinators(engine, true, false).await;
}

/// The same with `--known-accounts false`: every account is taken under its lease.
async fn concurrent_opposite_transfers_under_leases_never_deadlock(engine: EngineKind) {
    opposite_transfers_through_several_coordinators(engine, false, false).await;
}

/// The same with account affinity: each transfer runs at its sender's owner, which takes the
/// receiver's lease through the lease path when another coordinator owns the receiver.
async fn concurrent_opposite_transfers_with_affinity_never_deadlock(engine: EngineKind) {
    opposite_transfers_through_several_coordinators(engine, true, true).await;
}

/// Round after round, every call ends OK or refused for lack of cash (FAILED_PRECONDITION) well
/// inside its deadline, never ABORTED or at its deadline; the total of all cash is conserved;
/// each OK is one TRANSFER_OUT and one TRANSFER_IN of its amount, and nothing else is in the
/// ledgers.
async fn opposite_transfers_through_several_coordinators(engine: EngineKind, known_accounts: bool, affinity: bool) {
    const ACCOUNTS: [&str; 4] = ["ring-a", "ring-b", "ring-c", "ring-d"];
    const FUNDING: &str = "40.00";
    let (coordinators, callers, rounds) = match engine {
        EngineKind::Moto => (2, 4, 3),
        _ => (3, 18, 12),
    };
    let mut options = AppOptions::default()
        .flag("--lock-wait-ms", "20000")
        .flag("--known-accounts", known_accounts);
    if affinity {
        options = options.affinity();
    }
    let app = spawn_app_with(engine, options.clone()).await;
    let mut peers = Vec::new();
    for _ in 1..coordinators {
        peers.push(spawn_peer(&app, options.clone()).await);
    }
    if affinity {
        // Every coordinator sees all the others before the calls start.
        for each in std::iter::once(&app).chain(&peers) {
            let membership = &each.affinity.as_ref().expect("affinity on").membership;
            for _ in 0..200 {
                if membership.live().len() == coordinators {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(membership.live().len(), coordinators, "membership settled");
        }
    }
    for account in ACCOUNTS {
        app.deposit(account, FUNDING).await.expect("funding");
    }
    let mut clients: Vec<CoordinatorClient<Channel>> = vec![app.client().await];
    for peer in &peers {
        clients.push(peer.client().await);
    }
    let seed = fastrand::u64(..);
    println!("concurrent transfers seed {seed}");
    let mut tasks = Vec::new();
    for caller in 0..callers {
        let mut client = clients[caller % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut random = fastrand::Rng::with_seed(seed.wrapping_add(caller as u64));
            let mut outcomes = Vec::new();
            for round in 0..rounds {
                // Neighbours both ways round the ring and across it: every pair, both directions.
                let from = (caller + round) % ACCOUNTS.len();
                let to = (from + 1 + random.usize(0..ACCOUNTS.len() - 1)) % ACCOUNTS.len();
                let amount = format!("{}.{:02}", random.u32(1..15), random.u32(0..100));
                let mut request = tonic::Request::new(transfer_request(ACCOUNTS[from], ACCOUNTS[to], &amount, "", ""));
                request.set_timeout(CALL_DEADLINE);
                let started = Instant::now();
                let result = client.transfer(request).await;
                let took = started.elapsed();
                let label = format!(
                    "caller {caller} round {round}: {} -> {} {amount} took {took:?}",
                    ACCOUNTS[from], ACCOUNTS[to]
                );
                assert!(took < CALL_TAKES_MAX, "{label}: too close to its deadline");
                let transfer_id = match result {
                    Ok(reply) => {
                        let reply = reply.into_inner();
                        assert_eq!(decimal(&reply.amount), decimal(&amount), "{label}");
                        Some(reply.transfer_id)
                    }
                    Err(status) => {
                        assert_eq!(status.code(), Code::FailedPrecondition, "{label}: {status:?}");
                        assert!(
                            status.message().starts_with("Insufficient balance. Current: $"),
                            "{label}: {}",
                            status.message()
                        );
                        None
                    }
                };
                outcomes.push(Outcome {
                    amount: decimal(&amount),
                    transfer_id,
                });
            }
            outcomes
        }));
    }
    let mut applied: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut refused = 0;
    for task in tasks {
        for outcome in task.await.expect("caller task") {
            match outcome.transfer_id {
                Some(transfer_id) => {
                    assert!(
                        applied.insert(transfer_id, outcome.amount).is_none(),
                        "one transfer id per transfer"
                    );
                }
                None => refused += 1,
            }
        }
    }
    println!(
        "{} transfers applied, {refused} refused, on {coordinators} coordinators",
        applied.len()
    );
    assert!(!applied.is_empty(), "some transfers must apply");

    let mut total = Decimal::ZERO;
    let mut outs: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut ins: BTreeMap<String, Decimal> = BTreeMap::new();
    for account in ACCOUNTS {
        let cash = decimal(&app.cash(account).await);
        assert!(cash >= Decimal::ZERO, "{account}: negative cash {cash}");
        total += cash;
        let ledger = app.full_ledger(account).await;
        let transfers = ledger.iter().filter(|entry| !entry.transfer_id.is_empty());
        for entry in transfers {
            let side = if entry.kind == pb::EntryKind::TransferOut as i32 {
                &mut outs
            } else {
                assert_eq!(entry.kind, pb::EntryKind::TransferIn as i32, "{entry:?}");
                &mut ins
            };
            assert!(
                side.insert(entry.transfer_id.clone(), decimal(&entry.cash_delta).abs())
                    .is_none(),
                "one entry per side: {entry:?}"
            );
        }
    }
    assert_eq!(
        total,
        decimal(FUNDING) * Decimal::from(ACCOUNTS.len()),
        "transfers conserve the money"
    );
    assert_eq!(
        outs, applied,
        "one TRANSFER_OUT per acknowledged transfer, and no other"
    );
    assert_eq!(ins, applied, "one TRANSFER_IN per acknowledged transfer, and no other");
    if affinity {
        let forwarded: u64 = std::iter::once(&app)
            .chain(&peers)
            .map(|each| {
                each.affinity
                    .as_ref()
                    .expect("affinity on")
                    .forwarder
                    .counts()
                    .forwarded
            })
            .sum();
        assert!(
            forwarded > 0,
            "transfers reached their senders' owners through the others"
        );
    }
    assert_audit_clean(&app).await;
}

/// A transfer waits for its accounts in one order: while it waits for its sender (first in the
/// order), it holds nothing of its receiver, so a deposit to the receiver is not held up. Here the
/// sender's account is one this coordinator wrote last (known) while another coordinator holds
/// its lease: the transfer's first commit is refused, and it must take the sender's lease with
/// the receiver free. (With `--known-accounts false` the transfer waits for the sender's lease
/// before it borrows the receiver, and this passes; with the default it fails: the receiver stays
/// lent to the transfer while it waits, which is how opposite transfers through three
/// coordinators end in a cycle broken only by a lease's expiry.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transfer_waiting_for_its_sender_does_not_hold_its_receiver() {
    let app = spawn_app_with(
        EngineKind::Embedded,
        AppOptions::default().flag("--lock-wait-ms", "3000"),
    )
    .await;
    app.deposit("order-a", "100.00").await.expect("deposit order-a");
    app.deposit("order-b", "100.00").await.expect("deposit order-b");
    let release = crate::clients::hold_lease(&app, "order-a").await;
    let waiting = {
        let mut client = app.client().await;
        tokio::spawn(async move {
            client
                .transfer(transfer_request("order-a", "order-b", "1.00", "", ""))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    app.deposit("order-b", "1.00").await.expect("a deposit to the receiver");
    let took = started.elapsed();
    release.await;
    let transfer = waiting.await.expect("transfer task");
    assert!(
        took < Duration::from_millis(1000),
        "a deposit to the receiver waited {took:?} behind a transfer waiting for its sender ({:?})",
        transfer.map(|reply| reply.into_inner().cash_balance)
    );
}

crate::on_every_engine!(
    a_transfer_moves_the_money,
    every_refusal_writes_nothing,
    a_retried_transfer_applies_once,
    concurrent_opposite_transfers_never_deadlock,
    concurrent_opposite_transfers_under_leases_never_deadlock,
    concurrent_opposite_transfers_with_affinity_never_deadlock,
);
