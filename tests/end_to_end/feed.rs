//! WatchFeed end to end on every engine: every account's entries, written through two
//! coordinators of one table at once, reach one stream at least once and in per-account order;
//! a consumer resumes with its last cursor on the other coordinator and misses nothing; filters
//! send only what was asked; bad requests name their field; a cursor older than the feed keeps
//! is OUT_OF_RANGE naming the oldest position kept; a drain ends the stream with its cursor. On
//! the embedded engine: `coordinator watch` without --user follows the feed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lockstep::coordinator::v1 as pb;
use lockstep_coordinator::service::feed::FeedCursor;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{AppOptions, EngineKind, TestApp, spawn_app, spawn_app_with, spawn_peer};

const WAIT: Duration = Duration::from_secs(20);

fn quick() -> AppOptions {
    AppOptions::default()
        .flag("--feed-poll-ms", 20)
        .flag("--watch-progress-ms", 500)
}

async fn feed(app: &TestApp, request: pb::WatchFeedRequest) -> Result<tonic::Streaming<pb::FeedEvent>, tonic::Status> {
    app.client()
        .await
        .watch_feed(request)
        .await
        .map(tonic::Response::into_inner)
}

fn from(cursor: &str) -> pb::WatchFeedRequest {
    pb::WatchFeedRequest {
        cursor: cursor.to_owned(),
        ..pb::WatchFeedRequest::default()
    }
}

/// The next entry and its cursor (skipping progress), within `WAIT`.
async fn next_entry(stream: &mut tonic::Streaming<pb::FeedEvent>) -> (pb::LedgerEntry, String) {
    loop {
        let event = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("an event in time")
            .expect("the stream is healthy")
            .expect("the stream is open");
        match event.event {
            Some(pb::feed_event::Event::Entry(pb::FeedEntry {
                entry: Some(entry),
                cursor,
            })) => return (entry, cursor),
            Some(pb::feed_event::Event::Progress(_)) => continue,
            other => panic!("an unexpected event: {other:?}"),
        }
    }
}

fn field_of(status: &tonic::Status) -> String {
    status
        .get_details_bad_request()
        .and_then(|bad| bad.field_violations.first().map(|violation| violation.field.clone()))
        .unwrap_or_default()
}

/// What a consumer saw: per account, the sequences in the order received.
#[derive(Default)]
struct Seen(BTreeMap<String, Vec<u64>>);

impl Seen {
    /// Records an entry: it is the account's next one, or a re-delivery of one already seen.
    fn record(&mut self, entry: &pb::LedgerEntry) {
        let sequences = self.0.entry(entry.user_id.clone()).or_default();
        let newest = sequences.iter().copied().max().unwrap_or(0);
        assert!(
            entry.sequence <= newest + 1,
            "{} #{} arrived after #{newest}: a gap",
            entry.user_id,
            entry.sequence
        );
        sequences.push(entry.sequence);
    }

    fn distinct(&self, user: &str) -> BTreeSet<u64> {
        self.0
            .get(user)
            .map(|sequences| sequences.iter().copied().collect())
            .unwrap_or_default()
    }

    fn complete(&self, expected: &BTreeMap<String, u64>) -> bool {
        expected
            .iter()
            .all(|(user, last)| self.distinct(user) == (1..=*last).collect())
    }
}

/// Each account's last sequence, from ListLedger.
async fn last_sequences(app: &TestApp, users: &[&str]) -> BTreeMap<String, u64> {
    let mut client = app.client().await;
    let mut last = BTreeMap::new();
    for user in users {
        let newest = client
            .list_ledger(pb::ListLedgerRequest {
                user_id: (*user).to_owned(),
                page_size: 1,
                page_token: String::new(),
                after_sequence: None,
            })
            .await
            .expect("ledger")
            .into_inner()
            .entries;
        last.insert((*user).to_owned(), newest.first().map_or(0, |entry| entry.sequence));
    }
    last
}

async fn write_concurrently(targets: [&TestApp; 2], users: &'static [&'static str], rounds: usize) {
    let mut writers = Vec::new();
    for target in targets {
        for user in users {
            let mut client = target.client().await;
            writers.push(tokio::spawn(async move {
                for _ in 0..rounds {
                    client
                        .deposit(pb::DepositRequest {
                            user_id: (*user).to_owned(),
                            amount: "2.00".to_owned(),
                            request_id: String::new(),
                        })
                        .await
                        .expect("deposit");
                }
            }));
        }
    }
    for writer in writers {
        writer.await.expect("writer");
    }
}

/// Two coordinators write several accounts at once (deposits in batches, a withdrawal, a
/// transfer): one feed stream gets every entry, in per-account order; resumed with its last
/// cursor on the other coordinator while writes go on, it misses nothing.
async fn the_feed_carries_every_account_from_every_coordinator(engine: EngineKind) {
    const USERS: &[&str] = &["feed-a", "feed-b", "feed-c", "feed-d"];
    let app = spawn_app_with(engine, quick()).await;
    let peer = spawn_peer(&app, quick()).await;
    write_concurrently([&app, &peer], USERS, 4).await;
    app.withdraw("feed-a", "1.00").await.expect("withdraw");
    app.client()
        .await
        .transfer(pb::TransferRequest {
            from_user_id: "feed-b".to_owned(),
            to_user_id: "feed-c".to_owned(),
            amount: "3.00".to_owned(),
            memo: "rent".to_owned(),
            request_id: String::new(),
        })
        .await
        .expect("transfer");
    let expected = last_sequences(&app, USERS).await;
    let mut stream = feed(&peer, from("")).await.expect("feed");
    let mut seen = Seen::default();
    let mut cursor = String::new();
    let mut transfer_memo = String::new();
    while !seen.complete(&expected) {
        let (entry, at) = next_entry(&mut stream).await;
        if entry.kind() == pb::EntryKind::TransferIn {
            transfer_memo.clone_from(&entry.memo);
        }
        seen.record(&entry);
        cursor = at;
    }
    assert_eq!(transfer_memo, "rent", "entries carry every field");
    drop(stream);

    // Writes go on while no stream is open, and after the consumer resumed on the other
    // coordinator.
    write_concurrently([&app, &peer], USERS, 2).await;
    let mut resumed = feed(&app, from(&cursor)).await.expect("resume");
    write_concurrently([&app, &peer], USERS, 2).await;
    let expected = last_sequences(&app, USERS).await;
    while !seen.complete(&expected) {
        let (entry, _) = next_entry(&mut resumed).await;
        seen.record(&entry);
    }
    // A re-delivery repeats an entry already sent; nothing beyond the ledger arrives.
    for user in USERS {
        assert_eq!(seen.distinct(user), (1..=expected[*user]).collect(), "{user}");
    }
    let progress = loop {
        let event = tokio::time::timeout(WAIT, resumed.message())
            .await
            .expect("progress in time")
            .expect("healthy")
            .expect("open");
        match event.event {
            Some(pb::feed_event::Event::Progress(progress)) => break progress,
            Some(pb::feed_event::Event::Entry(pb::FeedEntry { entry: Some(entry), .. })) => seen.record(&entry),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(progress.cursor.starts_with("f1."), "{progress:?}");
    assert!(progress.complete_through.ends_with('Z'), "{progress:?}");
}

/// Filters send only the kinds and accounts asked for; from_now skips what came before; bad
/// requests are INVALID_ARGUMENT naming the field; a cursor older than the feed keeps is
/// OUT_OF_RANGE naming the oldest position kept, which then works.
async fn filters_and_bad_requests(engine: EngineKind) {
    let app = spawn_app_with(engine, quick()).await;
    for user in ["desk.1", "desk.2", "retail.1"] {
        app.deposit(user, "5.00").await.expect("deposit");
        app.withdraw(user, "1.00").await.expect("withdraw");
    }
    let mut filtered = feed(
        &app,
        pb::WatchFeedRequest {
            kinds: vec![pb::EntryKind::Withdrawal as i32],
            user_id_prefix: "desk.".to_owned(),
            ..pb::WatchFeedRequest::default()
        },
    )
    .await
    .expect("filtered feed");
    let mut now = feed(
        &app,
        pb::WatchFeedRequest {
            from_now: true,
            ..pb::WatchFeedRequest::default()
        },
    )
    .await
    .expect("feed from now");
    let mut got = BTreeSet::new();
    while got.len() < 2 {
        let (entry, _) = next_entry(&mut filtered).await;
        assert_eq!(entry.kind(), pb::EntryKind::Withdrawal, "{entry:?}");
        got.insert(entry.user_id);
    }
    assert_eq!(got, BTreeSet::from(["desk.1".to_owned(), "desk.2".to_owned()]));
    app.deposit("retail.1", "1.00").await.expect("a new deposit");
    let (entry, _) = next_entry(&mut now).await;
    assert_eq!(
        (entry.user_id.as_str(), entry.sequence),
        ("retail.1", 3),
        "only what came after"
    );

    let refused = async |request| feed(&app, request).await.expect_err("refused");
    let bad_cursor = refused(from("not-a-cursor")).await;
    assert_eq!(
        (bad_cursor.code(), field_of(&bad_cursor).as_str()),
        (Code::InvalidArgument, "cursor")
    );
    let both = refused(pb::WatchFeedRequest {
        cursor: FeedCursor::at(1).encode(),
        from_now: true,
        ..pb::WatchFeedRequest::default()
    })
    .await;
    assert_eq!(
        (both.code(), field_of(&both).as_str()),
        (Code::InvalidArgument, "from_now")
    );
    let bad_kind = refused(pb::WatchFeedRequest {
        kinds: vec![0],
        ..pb::WatchFeedRequest::default()
    })
    .await;
    assert_eq!(
        (bad_kind.code(), field_of(&bad_kind).as_str()),
        (Code::InvalidArgument, "kinds")
    );
    let bad_prefix = refused(pb::WatchFeedRequest {
        user_id_prefix: "no spaces".to_owned(),
        ..pb::WatchFeedRequest::default()
    })
    .await;
    assert_eq!(
        (bad_prefix.code(), field_of(&bad_prefix).as_str()),
        (Code::InvalidArgument, "user_id_prefix")
    );
    let two_days_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
        - 48 * 3600 * 1000;
    let old = refused(from(&FeedCursor::at(two_days_ago).encode())).await;
    assert_eq!(old.code(), Code::OutOfRange, "{old:?}");
    assert!(old.message().contains("ListLedger"), "{}", old.message());
    let oldest = old
        .message()
        .split("cursor=")
        .nth(1)
        .expect("names the oldest position kept");
    let mut from_oldest = feed(&app, from(oldest)).await.expect("the oldest position kept works");
    let (entry, _) = next_entry(&mut from_oldest).await;
    assert_eq!(entry.sequence, 1, "everything kept, from the start");
}

crate::on_every_engine!(
    the_feed_carries_every_account_from_every_coordinator,
    filters_and_bad_requests,
    a_drain_ends_the_feed_with_its_cursor
);

/// A drain ends a feed stream with UNAVAILABLE naming the cursor to resume from.
async fn a_drain_ends_the_feed_with_its_cursor(engine: EngineKind) {
    let app = spawn_app_with(engine, quick()).await;
    let draining = spawn_peer(&app, quick()).await;
    app.deposit("drained-feed", "1.00").await.expect("deposit");
    let mut stream = feed(&draining, from("")).await.expect("feed");
    let (_, cursor) = next_entry(&mut stream).await;
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
    // The cursor named is at or past the last entry's: resumed with it, the stream goes on
    // with what comes next.
    let named = ended
        .message()
        .split("cursor=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no cursor named: {}", ended.message()));
    assert!(named.starts_with("f1.") && !cursor.is_empty(), "{}", ended.message());
    let mut resumed = feed(&app, from(named)).await.expect("resume");
    app.deposit("drained-feed", "1.00").await.expect("deposit");
    let (entry, _) = next_entry(&mut resumed).await;
    assert_eq!((entry.user_id.as_str(), entry.sequence), ("drained-feed", 2));
}

/// `coordinator watch` without --user follows the feed: one JSON object per line, each entry
/// with its cursor; --kind filters; a bad --kind is refused before connecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_watch_without_a_user_follows_the_feed() {
    use tokio::io::AsyncBufReadExt;
    let app = spawn_app(EngineKind::Embedded).await;
    let server = format!("http://{}", app.address);
    app.deposit("cli-feed", "7.00").await.expect("deposit");
    let mut watching = tokio::process::Command::new(lockstep_bank::cluster::coordinator_binary())
        .args([
            "watch",
            "--kind",
            "withdrawal",
            "--kind",
            "DEPOSIT",
            "--server",
            &server,
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start coordinator watch");
    let mut lines = tokio::io::BufReader::new(watching.stdout.take().expect("stdout")).lines();
    let mut next_line = async || -> serde_json::Value {
        loop {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("a line in time")
                .expect("read")
                .expect("the watch is running");
            let value: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
            if value.get("progress").is_none() {
                return value;
            }
        }
    };
    let first = next_line().await;
    assert_eq!(
        (&first["user_id"], &first["sequence"], &first["kind"]),
        (&"cli-feed".into(), &1.into(), &"DEPOSIT".into()),
        "{first}"
    );
    assert!(
        first["cursor"].as_str().is_some_and(|cursor| cursor.starts_with("f1.")),
        "{first}"
    );
    app.withdraw("cli-feed", "2.00").await.expect("withdraw");
    let second = next_line().await;
    assert_eq!(
        (&second["sequence"], &second["kind"]),
        (&2.into(), &"WITHDRAWAL".into()),
        "{second}"
    );
    watching.kill().await.ok();

    let output = tokio::process::Command::new(lockstep_bank::cluster::coordinator_binary())
        .args(["watch", "--kind", "REFUND", "--server", &server])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run coordinator watch");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("--kind REFUND"), "{stderr}");
}
