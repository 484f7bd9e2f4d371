//! Smoke test of the `lockstep-bench` binary: against a real coordinator (in this process, on the
//! embedded engine) and the baseline on dynoxide's HTTP server, briefly, with small counts. It
//! asserts that each mode runs and reports coherent JSON (counts add up); figures never.

use std::sync::Arc;
use std::time::Duration;

use lockstep_bank::dynoxide_server::DynoxideServer;
use lockstep_coordinator::core::SystemClock;
use lockstep_coordinator::server;
use lockstep_coordinator::settings::Cli;
use lockstep_coordinator::storage::Storage;
use lockstep_coordinator::storage::embedded::EmbeddedEngine;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

/// A coordinator serving gRPC on a loopback port until the returned sender is dropped.
async fn spawn_coordinator(data_dir: &std::path::Path) -> (String, oneshot::Sender<()>) {
    let engine = EmbeddedEngine::open(data_dir).expect("open embedded engine");
    let storage = Storage::new(Arc::new(engine), "lockstep");
    storage.ensure_table().await.expect("create table");
    let settings = <Cli as clap::Parser>::parse_from(["coordinator"]).settings;
    let coordinator = server::build_coordinator(storage, Arc::new(SystemClock), &settings, None)
        .await
        .expect("build coordinator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("address"));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        server::run(listener, coordinator, Duration::from_secs(1), async {
            stopped.await.ok();
        })
        .await
        .expect("coordinator server");
    });
    (address, stop)
}

/// A Prometheus text endpoint whose storage counter never moves: enough to exercise the scrape.
async fn spawn_fixed_metrics() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut request).await;
                let body = "# TYPE lockstep_storage_requests_total counter\nlockstep_storage_requests_total{operation=\"get\"} 5\nlockstep_storage_requests_total{operation=\"transact_write\"} 7\n";
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    format!("http://{address}/metrics")
}

/// Runs the binary with `arguments` and returns its JSON object.
async fn bench(arguments: &[&str]) -> Value {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockstep-bench"))
        .args(arguments)
        .args(["--json", "--quiet", "--fund-usd", "1000.00", "--fund-quantity", "1"])
        .output()
        .await
        .expect("run lockstep-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "lockstep-bench {arguments:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("not one JSON object ({error}): {stdout}"))
}

/// The counts of one system's report add up: outcomes and operations both sum to the calls.
fn assert_coherent(report: &Value, system: &str) {
    assert_eq!(report["system"], system);
    let calls = report["calls"].as_u64().expect("calls");
    assert!(calls > 0, "no calls: {report}");
    let sum = |field: &str| -> u64 {
        report[field]
            .as_object()
            .unwrap_or_else(|| panic!("{field} is an object: {report}"))
            .values()
            .map(|count| count.as_u64().expect("count"))
            .sum()
    };
    assert_eq!(sum("outcomes"), calls, "{report}");
    assert_eq!(sum("operations"), calls, "{report}");
    assert_eq!(
        report["ok"].as_u64(),
        Some(report["outcomes"]["OK"].as_u64().unwrap_or(0))
    );
    for percentile in ["p50", "p90", "p99", "p99_9", "max"] {
        assert!(
            report["latency_ms"][percentile].as_f64().is_some(),
            "{percentile}: {report}"
        );
    }
}

/// Closed loop, open loop, the orders workload and the baseline each run and report;
/// --metrics-url is scraped, and without it storage requests are "not counted"; --svg writes a
/// plot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_runs_and_reports() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let (target, _stop) = spawn_coordinator(data_dir.path()).await;
    let dynoxide = DynoxideServer::start(dynoxide::Database::memory().expect("memory database"))
        .await
        .expect("dynoxide server");
    let metrics_url = spawn_fixed_metrics().await;
    let svg = data_dir.path().join("latency.svg");

    let closed = bench(&[
        "--target",
        &target,
        "--users",
        "4",
        "--callers",
        "4",
        // The call cap ends this run long before the duration: the count is then not a figure.
        "--duration",
        "60",
        "--calls",
        "60",
        "--sell-weight",
        "1",
        "--metrics-url",
        &metrics_url,
        "--svg",
        svg.to_str().expect("utf-8 path"),
    ])
    .await;
    let report = &closed["systems"][0];
    assert_coherent(report, "lockstep");
    assert_eq!(report["calls"].as_u64(), Some(60));
    assert_eq!(report["storage_requests"]["total"].as_f64(), Some(0.0), "{report}");
    let plot = std::fs::read_to_string(&svg).expect("svg written");
    assert!(plot.starts_with("<svg") && plot.contains("<polyline"), "{plot}");

    let open = bench(&[
        "--target",
        &target,
        "--workload",
        "hot",
        "--rate",
        "40",
        "--duration",
        "1",
    ])
    .await;
    let report = &open["systems"][0];
    assert_coherent(report, "lockstep");
    assert!(report["storage_requests"]["not_counted"].is_string(), "{report}");

    // Transfers, between random pairs and to one hot receiver: each call is a transfer, and the
    // accounts funded above have the cash for every one.
    for workload in ["transfer", "hot-receiver"] {
        let transfers = bench(&[
            "--target",
            &target,
            "--workload",
            workload,
            "--users",
            "4",
            "--callers",
            "4",
            "--duration",
            "60",
            "--calls",
            "40",
        ])
        .await;
        let report = &transfers["systems"][0];
        assert_coherent(report, "lockstep");
        assert_eq!(transfers["workload"], workload);
        assert_eq!(report["operations"]["transfer"].as_u64(), Some(40), "{report}");
        assert_eq!(report["ok"].as_u64(), Some(40), "{report}");
    }

    // Orders: PlaceBuy's phase, then cycles of a reserve and two fills, 3 of each: the funding
    // covers them even if all land on one user (3 x $299.50 + 3 x about $5.09).
    let orders = bench(&[
        "--target",
        &target,
        "--workload",
        "orders",
        "--users",
        "4",
        "--callers",
        "2",
        "--duration",
        "60",
        "--calls",
        "3",
    ])
    .await;
    assert_eq!(orders["workload"], "orders");
    let by_call = &orders["by_call"];
    for (call, count) in [("place_buy", 3), ("reserve", 3), ("fill", 6), ("cancel", 0)] {
        assert_eq!(by_call[call]["calls"].as_u64(), Some(count), "{call}: {orders}");
        assert_eq!(by_call[call]["ok"].as_u64(), Some(count), "{call}: {orders}");
        assert!(
            by_call[call]["latency_ms"]["p99"].as_f64().is_some(),
            "{call}: {orders}"
        );
    }
    assert_eq!(orders["cycles_completed"].as_u64(), Some(3), "{orders}");
    let bound = &orders["fill_p99_vs_place_buy_p99"];
    assert!(
        bound["ratio"].as_f64().is_some() && bound["bound_met"].is_boolean(),
        "{orders}"
    );

    let compared = bench(&[
        "--target",
        &target,
        "--systems",
        "lockstep,baseline",
        "--dynamodb-endpoint",
        dynoxide.endpoint(),
        "--workload",
        "design",
        "--rate",
        "20",
        "--rate-end",
        "40",
        "--duration",
        "1",
    ])
    .await;
    assert_coherent(&compared["systems"][0], "lockstep");
    let baseline = &compared["systems"][1];
    assert_coherent(baseline, "baseline");
    assert!(baseline["storage_requests"]["total"].as_f64().expect("counted") > 0.0);
}
