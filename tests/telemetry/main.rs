//! Telemetry end to end: the metrics a scripted workload leaves in `/metrics` (scraped over HTTP
//! and read with a Prometheus text parser), the names the dashboard and alert rules use, and the
//! JSON log lines of the real binary with the caller's trace context.
//!
//! Its own test binary: the metric registry is process-wide, so the one test that asserts exact
//! counter values must not share its process with other tests' traffic.

#[allow(dead_code, unused_imports, unused_macros)]
#[path = "../end_to_end/helpers.rs"]
mod helpers;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use lockstep::coordinator::v1 as pb;
use lockstep_coordinator::core::records::Lease;
use lockstep_coordinator::core::time::ManualClock;
use lockstep_coordinator::core::{Clock, LeaseId, UserId};
use lockstep_coordinator::service::CommitHook;
use lockstep_coordinator::storage::model;
use serde_json::Value;
use tonic::Code;

use helpers::{AppOptions, EngineKind, repo_root, spawn_app_with, spawn_peer};

/// GET `url` over plain HTTP/1, the body as text.
async fn http_get(url: &str) -> String {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
    let response = client.get(url.parse().expect("url")).await.expect("GET");
    assert!(response.status().is_success(), "{url}: {}", response.status());
    let body = response.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("UTF-8 body")
}

/// Every sample of a scrape as `name{sorted labels}` -> value (histograms as their count).
fn samples(text: &str) -> HashMap<String, f64> {
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("a Prometheus text scrape");
    let mut values = HashMap::new();
    for sample in scrape.samples {
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        labels.sort();
        let value = match sample.value {
            prometheus_parse::Value::Counter(value)
            | prometheus_parse::Value::Gauge(value)
            | prometheus_parse::Value::Untyped(value) => value,
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |bucket| bucket.count),
            prometheus_parse::Value::Summary(_) => continue,
        };
        values.insert(format!("{}{{{}}}", sample.metric, labels.join(",")), value);
    }
    values
}

/// The metric families a scrape declares (`# TYPE name ...`).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Every `lockstep_*` name in `text`, reduced to its family (no `_total`, `_bucket`, ...).
fn referenced_families(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("lockstep_") {
        let name: String = rest[start..]
            .chars()
            .take_while(|character| character.is_ascii_alphanumeric() || *character == '_')
            .collect();
        rest = &rest[start + name.len()..];
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name)
            .to_owned();
        names.insert(family);
    }
    names
}

/// Deposits, a refusal, a busy lease and a fenced commit leave exactly their counts in
/// `/metrics`; and every metric the dashboard and the alert rules name is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_a_scripted_workload() {
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let metrics_address = metrics_listener.local_addr().expect("metrics address");
    tokio::spawn(lockstep_coordinator::telemetry::serve_metrics(metrics_listener));

    let clock = ManualClock::starting_at(1_795_000_000_000);
    let plain = spawn_app_with(
        EngineKind::Embedded,
        AppOptions::default().clock(clock.clone()).flag("--lock-wait-ms", "300"),
    )
    .await;
    let (hook, parked, go) = CommitHook::parking();
    let paused = spawn_peer(&plain, AppOptions::default().clock(clock.clone()).before_commit(hook)).await;

    // Two deposits and a refusal.
    plain.deposit("alice", "100.00").await.expect("deposit");
    plain.deposit("alice", "50.00").await.expect("deposit");
    let refused = plain.withdraw("alice", "1000.00").await.expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // A busy lease: someone else holds it past the wait.
    let busy_user = UserId::parse("user_id", "busy").unwrap();
    let holder = Lease {
        lock_id: LeaseId::new_random(),
        owner: "someone-else".to_owned(),
        incarnation: "elsewhere".to_owned(),
        operation: "DEPOSIT".to_owned(),
        expires_at_ms: clock.now() + 60_000,
    };
    plain
        .storage
        .update(model::acquire_lease(&busy_user, &holder, clock.now(), false))
        .await
        .expect("foreign lease");
    let busy = plain.deposit("busy", "1.00").await.expect_err("busy");
    assert_eq!(busy.code(), Code::Aborted);

    // A fenced commit: decided, paused past the lease, taken over, then refused.
    plain.deposit("fenced", "100.00").await.expect("deposit");
    let mut client = paused.client().await;
    let stale = tokio::spawn(async move {
        let request = pb::WithdrawRequest {
            settlement: 0,
            user_id: "fenced".into(),
            amount: "100.00".into(),
            request_id: "stale".into(),
        };
        client.withdraw(request).await
    });
    parked.notified().await;
    clock.advance(Duration::from_secs(16));
    plain.deposit("fenced", "50.00").await.expect("successor commits");
    go.notify_one();
    let fenced = stale.await.expect("task").expect_err("fenced");
    assert_eq!(fenced.code(), Code::Aborted, "{}", fenced.message());

    let text = http_get(&format!("http://{metrics_address}/metrics")).await;
    let values = samples(&text);
    let value = |key: &str| {
        values
            .get(key)
            .copied()
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
    };
    assert_eq!(value("lockstep_commits_total{operation=DEPOSIT}"), 4.0);
    assert_eq!(
        value("lockstep_refusals_total{operation=WITHDRAWAL,rule=insufficient_balance}"),
        1.0
    );
    assert_eq!(value("lockstep_rollbacks_total{operation=WITHDRAWAL}"), 1.0);
    assert_eq!(
        value("lockstep_lease_acquisitions_total{operation=DEPOSIT,outcome=busy}"),
        1.0
    );
    assert_eq!(value("lockstep_fenced_commits_total{}"), 1.0);
    assert_eq!(
        value("lockstep_rpc_requests_total{code=OK,method=/lockstep.coordinator.v1.Coordinator/Deposit}"),
        4.0
    );
    assert_eq!(
        value("lockstep_rpc_requests_total{code=ABORTED,method=/lockstep.coordinator.v1.Coordinator/Deposit}"),
        1.0
    );
    assert_eq!(
        value("lockstep_rpc_requests_total{code=ABORTED,method=/lockstep.coordinator.v1.Coordinator/Withdraw}"),
        1.0
    );
    assert_eq!(
        value("lockstep_rpc_duration_seconds{method=/lockstep.coordinator.v1.Coordinator/Withdraw}"),
        2.0
    );
    assert_eq!(value("lockstep_mutations_in_flight{}"), 0.0);
    assert_eq!(value("lockstep_lease_waiters{}"), 0.0);
    let storage_requests: f64 = values
        .iter()
        .filter(|(key, _)| key.starts_with("lockstep_storage_requests_total{"))
        .map(|(_, value)| value)
        .sum();
    assert!(storage_requests >= 12.0, "{storage_requests} storage requests");
    assert!(
        values.contains_key("lockstep_storage_requests_total{operation=TransactWriteItems,outcome=ok}"),
        "{text}"
    );
    let contended = lockstep_coordinator::telemetry::contention::top(1);
    assert_eq!(contended[0].user, "busy");

    // Every metric the dashboard and the alert rules use is exported.
    let exported = families(&text);
    for file in ["deploy/grafana/lockstep.json", "deploy/prometheus/alerts.yaml"] {
        let content = std::fs::read_to_string(repo_root().join(file)).expect(file);
        let referenced = referenced_families(&content);
        assert!(!referenced.is_empty(), "{file} names no metric");
        let missing: Vec<_> = referenced.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics the coordinator does not export: {missing:?}"
        );
    }
}

/// With `--log-format json` every line is one JSON object; a deposit's last line carries its
/// user, operation, lock id, request id, the caller's W3C trace id, outcome and duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_and_its_trace() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let port = lockstep_bank::cluster::free_port();
    let mut child = Command::new(lockstep_bank::cluster::coordinator_binary())
        .args([
            "--log-format",
            "json",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(data_dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start coordinator");
    let stderr = child.stderr.take().expect("stderr");
    let (lines_sender, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_sender.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let next_line = |seen: &mut Vec<Value>| {
        let line = lines.recv_timeout(Duration::from_secs(30)).expect("a log line");
        let object: Value = serde_json::from_str(&line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        seen.push(object.clone());
        object
    };
    while next_line(&mut seen)["message"] != "serving gRPC" {}

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut client =
        lockstep::coordinator::v1::coordinator_client::CoordinatorClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .expect("connect");
    let mut request = tonic::Request::new(pb::DepositRequest {
        user_id: "carol".into(),
        amount: "5.00".into(),
        request_id: "json-log-1".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    request
        .metadata_mut()
        .insert("x-request-id", "json-log-1".parse().unwrap());
    client.deposit(request).await.expect("deposit");

    let done = loop {
        let object = next_line(&mut seen);
        if object["message"] == "mutation done" {
            break object;
        }
    };
    assert_eq!(done["outcome"], "COMMITTED", "{done}");
    assert!(done["duration_ms"].as_f64().is_some(), "{done}");
    let spans = done["spans"].as_array().expect("spans");
    let rpc = spans.iter().find(|span| span["name"] == "rpc").expect("the rpc span");
    assert_eq!(rpc["trace_id"], trace_id, "{done}");
    assert_eq!(rpc["request_id"], "json-log-1");
    assert_eq!(rpc["method"], "/lockstep.coordinator.v1.Coordinator/Deposit");
    let mutate = spans
        .iter()
        .find(|span| span["name"] == "mutate")
        .expect("the mutate span");
    assert_eq!(mutate["user"], "carol");
    assert_eq!(mutate["operation"], "DEPOSIT");
    assert_eq!(mutate["request_id"], "json-log-1");
    assert!(mutate["lock_id"].as_str().is_some_and(|id| !id.is_empty()), "{done}");
    let rpc_done = loop {
        let object = next_line(&mut seen);
        if object["message"] == "rpc done" {
            break object;
        }
    };
    assert_eq!(rpc_done["code"], "OK");
    assert_eq!(rpc_done["span"]["trace_id"], trace_id);
    child.kill().ok();
    child.wait().ok();
}

/// With `--otlp-endpoint` the coordinator exports its spans over OTLP/HTTP, and the spans of a
/// call that came with a `traceparent` belong to the caller's trace, as children of its span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_in_the_callers_trace() {
    let received = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let collector = {
        let received = Arc::clone(&received);
        axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let received = Arc::clone(&received);
                async move {
                    received.lock().unwrap().extend_from_slice(&body);
                    [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")]
                }
            }),
        )
    };
    let collector_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind collector");
    let collector_address = collector_listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(collector_listener, collector).await });

    let data_dir = tempfile::tempdir().expect("temp dir");
    let port = lockstep_bank::cluster::free_port();
    let mut child = Command::new(lockstep_bank::cluster::coordinator_binary())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data_dir.path())
        .args(["--otlp-endpoint", &format!("http://{collector_address}")])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start coordinator");
    let stderr = child.stderr.take().expect("stderr");
    let (serving_sender, serving) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("serving gRPC") {
                serving_sender.send(()).ok();
            }
        }
    });
    serving
        .recv_timeout(Duration::from_secs(30))
        .expect("the coordinator serves");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut client =
        lockstep::coordinator::v1::coordinator_client::CoordinatorClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .expect("connect");
    let mut request = tonic::Request::new(pb::DepositRequest {
        user_id: "dora".into(),
        amount: "5.00".into(),
        request_id: String::new(),
    });
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{trace_id}-{parent_id}-01").parse().unwrap());
    client.deposit(request).await.expect("deposit");
    drop(client);

    // SIGTERM: the coordinator drains, and flushes its last spans on the way out.
    let terminated = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(terminated.success());
    let exited = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("wait task");
    assert!(exited.expect("exit status").success());

    let bytes_of = |hex: &str| -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|index| u8::from_str_radix(&hex[index..index + 2], 16).unwrap())
            .collect()
    };
    let body = received.lock().unwrap().clone();
    let contains = |needle: &[u8]| body.windows(needle.len()).any(|window| window == needle);
    assert!(!body.is_empty(), "the collector received no spans");
    assert!(contains(&bytes_of(trace_id)), "no span in the caller's trace");
    assert!(contains(&bytes_of(parent_id)), "no span under the caller's span");
    assert!(
        contains(b"mutate") && contains(b"rpc"),
        "the rpc and mutate spans are exported"
    );
}
