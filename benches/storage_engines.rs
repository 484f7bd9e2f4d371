//! The two ways to run the embedded DynamoDB engine (dynoxide), measured through the real
//! coordinator (service API, no gRPC):
//!
//! - `library`: `EmbeddedEngine`, dynoxide called in-process on tokio's blocking pool;
//! - `http`: the same file-backed dynoxide database served by dynoxide's HTTP server on this
//!   runtime, reached through aws-sdk-dynamodb (`DynamoDbEngine`), as the tests' second engine.
//!
//! Run: `cargo bench --bench storage_engines`. Environment:
//! - `LOCKSTEP_BENCH_OPS` (default 2000): sequential deposits; the mixed run does twice as many.
//! - `LOCKSTEP_BENCH_ENGINE` (default `library,http`): the engines to run, in that order; one
//!   alone to read its own peak RSS, `http,library` to check the order does not matter.
//! - `LOCKSTEP_BENCH_DIR`: where the temporary database directories go (default: the system
//!   temp dir). Both engines write with SQLite synchronous=FULL, so the disk matters.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use lockstep_bank::dynoxide_server::DynoxideServer;
use lockstep_coordinator::core::{AssetSymbol, Principal, Quantity, SystemClock, TradeSide, Usd, UserId};
use lockstep_coordinator::server::build_coordinator;
use lockstep_coordinator::service::{ServiceError, TradeRequest, TransactionCoordinator};
use lockstep_coordinator::settings::Cli;
use lockstep_coordinator::storage::dynamodb::DynamoDbEngine;
use lockstep_coordinator::storage::embedded::EmbeddedEngine;
use lockstep_coordinator::storage::{Engine, Storage};

const TABLE: &str = "lockstep";
const OPS_DEFAULT: usize = 2000;
const MIXED_TASKS: usize = 16;
/// Operations run before each measurement and not counted: create the account, warm caches.
const WARMUP_OPS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Library,
    Http,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Library => "library",
            Kind::Http => "http",
        }
    }
}

/// What one measured run produced.
struct Run {
    workload: &'static str,
    attempted: usize,
    ok: usize,
    errors: Vec<String>,
    elapsed: Duration,
    /// Latency of every call, successful or not, sorted.
    latencies: Vec<Duration>,
    requests: u64,
}

impl Run {
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1]
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(raw) => raw
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a positive integer, got {raw:?}")),
        Err(_) => default,
    }
}

fn usd(raw: &str) -> Usd {
    Usd::parse_amount("amount", raw).expect("valid amount")
}

fn user(raw: &str) -> UserId {
    UserId::parse("user_id", raw).expect("valid user id")
}

fn trade(side: TradeSide) -> TradeRequest {
    TradeRequest {
        side,
        asset: AssetSymbol::parse("asset", "ADA").expect("valid symbol"),
        quantity: Quantity::parse_trade("quantity", "10").expect("valid quantity"),
        limit_price: None,
    }
}

fn describe(error: &ServiceError) -> String {
    match error {
        ServiceError::Rejected(rejection) => format!("Rejected({rejection})"),
        ServiceError::Unavailable(detail) => format!("Unavailable({detail})"),
        ServiceError::Internal(detail) => format!("Internal({detail})"),
        other => format!("{other:?}"),
    }
}

/// Peak and current resident set size of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// A coordinator exactly as production builds one, on `engine`.
async fn coordinator_on(engine: Arc<dyn Engine>) -> Arc<TransactionCoordinator> {
    let storage = Storage::new(engine, TABLE);
    storage.ensure_table().await.expect("table");
    let settings = Cli::parse_from(["coordinator"]).settings;
    build_coordinator(storage, Arc::new(SystemClock), &settings, None)
        .await
        .expect("coordinator")
}

/// (1) Deposits one after another on one user.
async fn sequential_deposits(coordinator: &Arc<TransactionCoordinator>, ops: usize) -> Run {
    let account = user("bench-sequential");
    // 0.01 per deposit keeps a long run far below the default daily deposit limit.
    let amount = usd("0.01");
    for _ in 0..WARMUP_OPS {
        coordinator
            .deposit(&Principal::local(), &account, amount, None, None)
            .await
            .expect("warm-up deposit");
    }
    let requests_before = coordinator.storage().requests();
    let mut latencies = Vec::with_capacity(ops);
    let mut errors = Vec::new();
    let started = Instant::now();
    for _ in 0..ops {
        let call = Instant::now();
        let result = coordinator
            .deposit(&Principal::local(), &account, amount, None, None)
            .await;
        latencies.push(call.elapsed());
        if let Err(error) = result {
            errors.push(describe(&error));
        }
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Run {
        workload: "sequential deposit",
        attempted: ops,
        ok: ops - errors.len(),
        errors,
        elapsed,
        latencies,
        requests: coordinator.storage().requests() - requests_before,
    }
}

/// One mixed operation: deposit, buy, sell, withdraw in turn, so every sell has a holding and
/// every buy has cash.
async fn mixed_op(
    coordinator: &Arc<TransactionCoordinator>,
    account: &UserId,
    step: usize,
) -> Result<(), ServiceError> {
    let amount = usd("0.01");
    match step % 4 {
        0 => coordinator
            .deposit(&Principal::local(), account, amount, None, None)
            .await
            .map(drop),
        1 => coordinator
            .trade(&Principal::local(), account, trade(TradeSide::Buy), None, None)
            .await
            .map(drop),
        2 => coordinator
            .trade(&Principal::local(), account, trade(TradeSide::Sell), None, None)
            .await
            .map(drop),
        _ => coordinator
            .withdraw(&Principal::local(), account, amount, None, None)
            .await
            .map(drop),
    }
}

/// (2) `MIXED_TASKS` tasks at once, each on its own user, `ops` operations in all.
async fn mixed_concurrent(coordinator: &Arc<TransactionCoordinator>, ops: usize) -> Run {
    let per_task = ops / MIXED_TASKS;
    let accounts: Vec<UserId> = (0..MIXED_TASKS).map(|i| user(&format!("bench-mixed-{i:02}"))).collect();
    for account in &accounts {
        coordinator
            .deposit(&Principal::local(), account, usd("100.00"), None, None)
            .await
            .expect("funding deposit");
        for step in 0..WARMUP_OPS {
            mixed_op(coordinator, account, step).await.expect("warm-up operation");
        }
    }
    let requests_before = coordinator.storage().requests();
    let started = Instant::now();
    let tasks: Vec<_> = accounts
        .into_iter()
        .map(|account| {
            let coordinator = Arc::clone(coordinator);
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_task);
                let mut errors = Vec::new();
                for step in 0..per_task {
                    let call = Instant::now();
                    let result = mixed_op(&coordinator, &account, step).await;
                    latencies.push(call.elapsed());
                    if let Err(error) = result {
                        errors.push(describe(&error));
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(per_task * MIXED_TASKS);
    let mut errors = Vec::new();
    for task in tasks {
        let (task_latencies, task_errors) = task.await.expect("bench task panicked");
        latencies.extend(task_latencies);
        errors.extend(task_errors);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let attempted = per_task * MIXED_TASKS;
    Run {
        workload: "16 tasks mixed",
        attempted,
        ok: attempted - errors.len(),
        errors,
        elapsed,
        latencies,
        requests: coordinator.storage().requests() - requests_before,
    }
}

async fn measure(coordinator: &Arc<TransactionCoordinator>, ops: usize) -> Vec<Run> {
    vec![
        sequential_deposits(coordinator, ops).await,
        mixed_concurrent(coordinator, ops * 2).await,
    ]
}

async fn bench_library(dir: &Path, ops: usize) -> Vec<Run> {
    let engine = EmbeddedEngine::open(dir).expect("open embedded engine");
    let coordinator = coordinator_on(Arc::new(engine)).await;
    measure(&coordinator, ops).await
}

async fn bench_http(dir: &Path, ops: usize) -> Vec<Run> {
    let database = EmbeddedEngine::open(dir).expect("open embedded engine").database();
    let server = DynoxideServer::start(database)
        .await
        .expect("start dynoxide's HTTP server");
    let engine = DynamoDbEngine::local(server.endpoint());
    let coordinator = coordinator_on(Arc::new(engine)).await;
    let runs = measure(&coordinator, ops).await;
    drop(coordinator);
    server.stop().await.expect("server");
    runs
}

fn print_table(rows: &[(Kind, Run)]) {
    println!(
        "{:<8} {:<19} {:>6} {:>6} {:>9} {:>8} {:>8} {:>8} {:>9}",
        "engine", "workload", "ops", "errors", "ops/s", "p50 ms", "p99 ms", "max ms", "req/ok-op"
    );
    for (kind, run) in rows {
        let ops_per_second = run.attempted as f64 / run.elapsed.as_secs_f64();
        let requests_per_ok = if run.ok == 0 {
            f64::NAN
        } else {
            run.requests as f64 / run.ok as f64
        };
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<8} {:<19} {:>6} {:>6} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>9.2}",
            kind.name(),
            run.workload,
            run.attempted,
            run.errors.len(),
            ops_per_second,
            ms(run.percentile(50.0)),
            ms(run.percentile(99.0)),
            ms(run.latencies.last().copied().unwrap_or_default()),
            requests_per_ok,
        );
    }
}

#[tokio::main]
async fn main() {
    let ops = env_usize("LOCKSTEP_BENCH_OPS", OPS_DEFAULT).max(MIXED_TASKS);
    let engines: Vec<Kind> = std::env::var("LOCKSTEP_BENCH_ENGINE")
        .unwrap_or_else(|_| "library,http".to_owned())
        .split(',')
        .map(|name| match name.trim() {
            "library" => Kind::Library,
            "http" => Kind::Http,
            other => panic!("LOCKSTEP_BENCH_ENGINE takes library and/or http, comma-separated; got {other:?}"),
        })
        .collect();
    let parent = std::env::var_os("LOCKSTEP_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    println!(
        "storage_engines: {ops} sequential deposits, {} mixed ops on {MIXED_TASKS} users, {} CPUs, data under {}",
        ops * 2 / MIXED_TASKS * MIXED_TASKS,
        std::thread::available_parallelism().map_or(0, usize::from),
        parent.display()
    );
    // Other processes competing for the CPUs skew every figure; say so next to them.
    println!("load average before: {}", load_average());
    let mut rows = Vec::new();
    let mut peaks = Vec::new();
    for kind in engines {
        let dir = tempfile::Builder::new()
            .prefix("lockstep-bench-")
            .tempdir_in(&parent)
            .expect("temp dir");
        let runs = match kind {
            Kind::Library => bench_library(dir.path(), ops).await,
            Kind::Http => bench_http(dir.path(), ops).await,
        };
        for run in &runs {
            let mut seen: Vec<&String> = run.errors.iter().collect();
            seen.sort();
            seen.dedup();
            for error in seen {
                let count = run.errors.iter().filter(|e| *e == error).count();
                println!("  {} / {}: {count} x {error}", kind.name(), run.workload);
            }
        }
        rows.extend(runs.into_iter().map(|run| (kind, run)));
        peaks.push((kind, memory_kib().0));
    }
    println!();
    print_table(&rows);
    println!();
    for (kind, peak) in &peaks {
        println!("peak RSS (VmHWM) after {:<7}: {:>7} KiB", kind.name(), peak);
    }
    println!("load average after: {}", load_average());
    let (peak, current) = memory_kib();
    println!("peak RSS (VmHWM) at end      : {peak:>7} KiB (VmRSS now {current} KiB)");
}
