//! The ledger as a sequence, end to end on every engine: every entry of an account has its
//! place 1, 2, 3 … with no gap whatever wrote it (batches of concurrent callers, refusals,
//! trades, transfers both ways); ListLedger reads after a cursor; WatchLedger replays from a
//! cursor and then follows commits made on any coordinator of the table, resumes elsewhere,
//! sends progress on an idle stream, is bounded, and ends at a drain with its cursor.

use std::time::Duration;

use lockstep::coordinator::v1 as pb;
use lockstep::coordinator::v1::coordinator_client::CoordinatorClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::helpers::{AppOptions, EngineKind, TestApp, spawn_app, spawn_app_with, spawn_peer};

const WAIT: Duration = Duration::from_secs(20);

async fn after(
    client: &mut CoordinatorClient<Channel>,
    user: &str,
    after_sequence: u64,
    page_size: u32,
) -> Result<Vec<pb::LedgerEntry>, tonic::Status> {
    client
        .list_ledger(pb::ListLedgerRequest {
            user_id: user.to_owned(),
            page_size,
            page_token: String::new(),
            after_sequence: Some(after_sequence),
        })
        .await
        .map(|reply| reply.into_inner().entries)
}

fn sequences(entries: &[pb::LedgerEntry]) -> Vec<u64> {
    entries.iter().map(|entry| entry.sequence).collect()
}

fn field_of(status: &tonic::Status) -> String {
    status
        .get_details_bad_request()
        .and_then(|bad| bad.field_violations.first().map(|violation| violation.field.clone()))
        .unwrap_or_default()
}

/// Concurrent deposits (committed in batches), a refusal, a buy and transfers both ways: the
/// user's entries are exactly 1..n; each reads after any cursor; bad cursors are refused
/// naming the field.
async fn sequences_have_no_gaps(engine: EngineKind) {
    let app = spawn_app(engine).await;
    app.deposit("seq-peer", "100.00").await.expect("peer");
    let mut callers = Vec::new();
    for caller in 0..6 {
        let mut client = app.client().await;
        callers.push(tokio::spawn(async move {
            for call in 0..5 {
                client
                    .deposit(pb::DepositRequest {
                        user_id: "seq".to_owned(),
                        amount: "10.00".to_owned(),
                        request_id: format!("seq-{caller}-{call}"),
                    })
                    .await
                    .expect("deposit");
            }
        }));
    }
    for caller in callers {
        caller.await.expect("caller");
    }
    let refused = app.withdraw("seq", "100000.00").await.expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    app.buy("seq", "SOL", "0.1").await.expect("buy");
    let mut client = app.client().await;
    for (from, to) in [("seq", "seq-peer"), ("seq-peer", "seq")] {
        client
            .transfer(pb::TransferRequest {
                from_user_id: from.to_owned(),
                to_user_id: to.to_owned(),
                amount: "1.00".to_owned(),
                ..Default::default()
            })
            .await
            .expect("transfer");
    }
    // 30 deposits, one buy, two transfers; the refusal took no place.
    let all = after(&mut client, "seq", 0, 100).await.expect("after 0");
    assert_eq!(sequences(&all), (1..=33).collect::<Vec<u64>>());
    let last = all.last().expect("entries");
    assert_eq!(last.kind(), pb::EntryKind::TransferIn);
    let buy = all
        .iter()
        .find(|entry| entry.kind() == pb::EntryKind::Buy)
        .expect("the buy");
    assert_eq!(
        buy.holding_balance, "0.1",
        "a trade's entry carries the holding after it"
    );
    assert_eq!(
        sequences(&after(&mut client, "seq", 30, 2).await.expect("page")),
        vec![31, 32]
    );
    assert!(after(&mut client, "seq", 33, 10).await.expect("at the end").is_empty());
    let newest_first = app.full_ledger("seq").await;
    assert_eq!(sequences(&newest_first), (1..=33).rev().collect::<Vec<u64>>());

    let past = after(&mut client, "seq", 34, 10).await.expect_err("past the end");
    assert_eq!(
        (past.code(), field_of(&past).as_str()),
        (Code::InvalidArgument, "after_sequence")
    );
    let both = client
        .list_ledger(pb::ListLedgerRequest {
            user_id: "seq".to_owned(),
            page_size: 1,
            page_token: "TEVER0VS".to_owned(),
            after_sequence: Some(1),
        })
        .await
        .expect_err("a token and a cursor");
    assert_eq!(
        (both.code(), field_of(&both).as_str()),
        (Code::InvalidArgument, "page_token")
    );
    let nobody = after(&mut client, "seq-nobody", 0, 10).await.expect_err("no account");
    assert_eq!(nobody.code(), Code::NotFound);
}

async fn watch(
    app: &TestApp,
    user: &str,
    after_sequence: u64,
) -> Result<tonic::Streaming<pb::LedgerEvent>, tonic::Status> {
    app.client()
        .await
        .watch_ledger(pb::WatchLedgerRequest {
            user_id: user.to_owned(),
            after_sequence,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The next entry's sequence (skipping progress), within `WAIT`.
async fn next_entry(stream: &mut tonic::Streaming<pb::LedgerEvent>) -> u64 {
    loop {
        let event = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("an event in time")
            .expect("the stream is healthy")
            .expect("the stream is open");
        match event.event {
            Some(pb::ledger_event::Event::Entry(entry)) => return entry.sequence,
            Some(pb::ledger_event::Event::Progress(_)) => continue,
            None => panic!("an empty event"),
        }
    }
}

/// A watch on one coordinator replays, then sees the entries committed through it and through
/// another coordinator on the same table while both write at once, in order with no gap; a
/// stream resumed on the other coordinator from the last sequence seen goes on from there; an
/// idle stream sends progress naming its cursor.
async fn a_watch_follows_every_coordinator(engine: EngineKind) {
    let quick = || {
        AppOptions::default()
            .flag("--watch-poll-ms", 50)
            .flag("--watch-progress-ms", 500)
    };
    let app = spawn_app_with(engine, quick()).await;
    let peer = spawn_peer(&app, quick()).await;
    app.deposit("feed", "1.00").await.expect("first");
    app.deposit("feed", "1.00").await.expect("second");
    let mut stream = watch(&peer, "feed", 0).await.expect("watch");
    assert_eq!(next_entry(&mut stream).await, 1);
    assert_eq!(next_entry(&mut stream).await, 2);
    let mut writers = Vec::new();
    for target in [&app, &peer] {
        let mut client = target.client().await;
        writers.push(tokio::spawn(async move {
            for _ in 0..10 {
                client
                    .deposit(pb::DepositRequest {
                        user_id: "feed".to_owned(),
                        amount: "1.00".to_owned(),
                        request_id: String::new(),
                    })
                    .await
                    .expect("deposit");
            }
        }));
    }
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.push(next_entry(&mut stream).await);
    }
    assert_eq!(seen, (3..=12).collect::<Vec<u64>>());
    drop(stream);
    for writer in writers {
        writer.await.expect("writer");
    }
    // Resumed on the other coordinator from the last sequence seen.
    let mut resumed = watch(&app, "feed", 12).await.expect("resume");
    let mut rest = Vec::new();
    while rest.len() < 10 {
        rest.push(next_entry(&mut resumed).await);
    }
    assert_eq!(rest, (13..=22).collect::<Vec<u64>>());
    let progress = loop {
        let event = tokio::time::timeout(WAIT, resumed.message())
            .await
            .expect("progress in time")
            .expect("healthy")
            .expect("open");
        if let Some(pb::ledger_event::Event::Progress(progress)) = event.event {
            break progress;
        }
    };
    assert_eq!(progress.latest_sequence, 22);
    assert!(progress.at.ends_with('Z'), "{}", progress.at);
}

crate::on_every_engine!(sequences_have_no_gaps, a_watch_follows_every_coordinator);

/// Bad watches are refused before any stream: no account (NOT_FOUND), a cursor past the last
/// entry (INVALID_ARGUMENT naming after_sequence), a bad user id; past --max-watchers,
/// RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_watches_are_refused_and_watchers_are_bounded() {
    let app = spawn_app_with(EngineKind::Embedded, AppOptions::default().flag("--max-watchers", 1)).await;
    app.deposit("bounded", "1.00").await.expect("deposit");
    let missing = watch(&app, "nobody", 0).await.expect_err("no account");
    assert_eq!(missing.code(), Code::NotFound);
    let past = watch(&app, "bounded", 2).await.expect_err("past the end");
    assert_eq!(
        (past.code(), field_of(&past).as_str()),
        (Code::InvalidArgument, "after_sequence")
    );
    let bad = watch(&app, "no spaces", 0).await.expect_err("bad id");
    assert_eq!(
        (bad.code(), field_of(&bad).as_str()),
        (Code::InvalidArgument, "user_id")
    );
    let _open = watch(&app, "bounded", 0).await.expect("the one watcher");
    let second = watch(&app, "bounded", 0).await.expect_err("one too many");
    assert_eq!(second.code(), Code::ResourceExhausted, "{second:?}");
}

/// A coordinator that drains ends its streams with UNAVAILABLE naming the cursor to resume
/// from, instead of holding the drain until its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_ends_streams_with_their_cursor() {
    let app = spawn_app(EngineKind::Embedded).await;
    let draining = spawn_peer(&app, AppOptions::default()).await;
    app.deposit("drained", "1.00").await.expect("deposit");
    let mut stream = watch(&draining, "drained", 0).await.expect("watch");
    assert_eq!(next_entry(&mut stream).await, 1);
    drop(draining);
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream ends at the drain");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("after_sequence=1"), "{}", ended.message());
}
