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

crate::on_every_engine!(
    sequences_have_no_gaps,
    a_watch_follows_every_coordinator,
    a_drain_ends_streams_with_their_cursor,
    user_service_streams_an_account_as_server_sent_events
);

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
async fn a_drain_ends_streams_with_their_cursor(engine: EngineKind) {
    let app = spawn_app(engine).await;
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

/// `coordinator watch` prints one JSON object per line: the entries so far, then a deposit's
/// entry as it commits; an account that does not exist ends it at once, exit 1, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_watch_prints_one_json_line_per_entry() {
    use tokio::io::AsyncBufReadExt;
    let app = spawn_app(EngineKind::Embedded).await;
    let server = format!("http://{}", app.address);
    app.deposit("cli-watch", "7.00").await.expect("deposit");
    let mut watching = tokio::process::Command::new(lockstep_bank::cluster::coordinator_binary())
        .args(["watch", "--user", "cli-watch", "--from", "0", "--server", &server])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start coordinator watch");
    let mut lines = tokio::io::BufReader::new(watching.stdout.take().expect("stdout")).lines();
    let mut next_line = async || -> serde_json::Value {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("a line in time")
            .expect("read")
            .expect("the watch is running");
        serde_json::from_str(&line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"))
    };
    let first = next_line().await;
    assert_eq!(
        (&first["sequence"], &first["kind"], &first["cash_balance"]),
        (&1.into(), &"DEPOSIT".into(), &"7.00".into()),
        "{first}"
    );
    app.withdraw("cli-watch", "2.00").await.expect("withdraw");
    let second = next_line().await;
    assert_eq!(
        (&second["sequence"], &second["kind"], &second["cash_delta"]),
        (&2.into(), &"WITHDRAWAL".into(), &"-2.00".into()),
        "{second}"
    );
    watching.kill().await.ok();

    let output = tokio::process::Command::new(lockstep_bank::cluster::coordinator_binary())
        .args(["watch", "--user", "cli-nobody", "--server", &server])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run coordinator watch");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("NotFound") && stderr.contains("cli-nobody"), "{stderr}");
}

/// One raw HTTP/1.1 GET on `address` with `headers`, read until `until` appears (or the
/// connection closes): SSE arrives in chunks, each event whole in one.
async fn http_stream(address: std::net::SocketAddr, path: &str, headers: &[(&str, &str)], until: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut connection = tokio::net::TcpStream::connect(address).await.expect("connect");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    connection.write_all(request.as_bytes()).await.expect("send");
    let mut seen = String::new();
    let mut buffer = [0_u8; 4096];
    tokio::time::timeout(WAIT, async {
        while !seen.contains(until) {
            let read = connection.read(&mut buffer).await.expect("read");
            if read == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buffer[..read]));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {until:?} in time: {seen}"));
    seen
}

/// user-service's `GET /users/{id}/events`: Server-Sent Events of the account's ledger behind
/// the end user's JWT (`sub` must be the path's user), resumed after `Last-Event-ID`, new
/// entries arriving as they commit; another user's token is 403, a bad Last-Event-ID 400.
async fn user_service_streams_an_account_as_server_sent_events(engine: EngineKind) {
    use lockstep_client_common::CoordinatorSettings;
    use lockstep_client_common::auth::{EndUserAuth, EndUserSettings};

    use crate::auth::{JWT_SECRET, jwt};
    let app = spawn_app(engine).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let secret_file = dir.path().join("jwt-secret");
    std::fs::write(&secret_file, JWT_SECRET).expect("write secret");
    let end_users = EndUserAuth::from_settings(&EndUserSettings {
        jwt_hs256_secret_file: Some(secret_file),
        ..EndUserSettings::default()
    })
    .expect("JWT settings");
    let services =
        crate::services::spawn_services_with(CoordinatorSettings::new(format!("http://{}", app.address)), end_users)
            .await;
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes());
    let bearer = |user: &str| format!("Bearer {}", jwt(user, 600, &key, jsonwebtoken::Algorithm::HS256));
    app.deposit("sse", "10.00").await.expect("first");
    app.deposit("sse", "20.00").await.expect("second");

    let alice = bearer("sse");
    let path = "/users/sse/events";
    let streaming = {
        let alice = alice.clone();
        let address = services.user;
        tokio::spawn(async move {
            http_stream(
                address,
                path,
                &[("authorization", &alice), ("last-event-id", "1")],
                "id: 3",
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.deposit("sse", "5.00").await.expect("third");
    let seen = streaming.await.expect("stream");
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(seen.contains("text/event-stream"), "{seen}");
    assert!(!seen.contains("id: 1\n"), "resumed after Last-Event-ID: {seen}");
    assert!(seen.contains("event: entry"), "{seen}");
    assert!(seen.contains(r#""cash_balance":"30.00""#), "the second entry: {seen}");
    assert!(seen.contains(r#""cash_balance":"35.00""#), "the live one: {seen}");

    // A stream ends when the token that opened it expires, saying so.
    let short = format!("Bearer {}", jwt("sse", 2, &key, jsonwebtoken::Algorithm::HS256));
    let expired = http_stream(services.user, path, &[("authorization", &short)], "event: end").await;
    assert!(expired.contains("the token expired"), "{expired}");

    let other = http_stream(
        services.user,
        path,
        &[("authorization", &bearer("someone-else"))],
        "\r\n\r\n",
    )
    .await;
    assert!(other.starts_with("HTTP/1.1 403"), "{other}");
    let bad = http_stream(
        services.user,
        path,
        &[("authorization", &alice), ("last-event-id", "yesterday")],
        "\r\n\r\n",
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
}
