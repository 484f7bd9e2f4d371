//! `lockstep-bench`: load for any Lockstep coordinator over gRPC (what ghz is for gRPC), and the
//! design document's own lock-read-write-release flow run directly against a DynamoDB endpoint as
//! a baseline, so that one command compares both on the same server.
//!
//! # Layout
//! - [`settings`]: the command line (clap), the one place flags and their defaults live.
//! - [`workload`]: pure choices: which user, which operation (a transfer's payer and payee:
//!   random pairs, or everyone paying one hot receiver), the amounts, the intended send times of
//!   the open loop (fixed rate or a ramp).
//! - [`load`]: the closed and open loops, the latency histogram, outcome counts, the progress bar.
//! - [`lockstep_target`]: one call per operation through the generated gRPC client, each with a
//!   unique `request_id`.
//! - [`orders`]: the orders workload: PlaceBuy, then cycles of a reserved order and its two
//!   fills, each step timed on its own.
//! - [`baseline`]: the design's flow on a DynamoDB endpoint, counting its own storage requests.
//! - [`metrics`]: the coordinator's `lockstep_storage_requests_total` from its Prometheus text.
//! - [`report`]: text, JSON and the SVG percentile plot.
//!
//! [`run`] (and [`orders::run`] for the orders workload) is what the binary calls and what the
//! smoke test exercises through the binary.

pub mod baseline;
pub mod feed;
pub mod latency_proxy;
pub mod load;
pub mod lockstep_target;
pub mod metrics;
pub mod orders;
pub mod report;
pub mod settings;
pub mod streams_cost;
pub mod workload;

use std::sync::Arc;
use std::time::Duration;

use crate::baseline::Baseline;
use crate::load::Plan;
use crate::lockstep_target::LockstepTarget;
use crate::report::{StorageRequests, SystemReport};
use crate::settings::{Settings, SystemKind, WorkloadKind};
use crate::workload::{
    Arrivals, Call, DESIGN_RATE_END_PER_SECOND, DESIGN_RATE_START_PER_SECOND, Mix, Operation, Payees, Users,
};

/// Funding calls in flight at once during setup.
const SETUP_CONCURRENCY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid settings: {0}")]
    Settings(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("setup (funding the accounts) failed: {0}")]
    Setup(String),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("cannot write {path}: {error}")]
    Write { path: String, error: std::io::Error },
}

/// A system under load: a coordinator, or the design's flow on an endpoint.
#[derive(Debug, Clone)]
pub enum System {
    Lockstep(LockstepTarget),
    Baseline(Arc<Baseline>),
}

impl System {
    pub async fn call(&self, call: &Call) -> &'static str {
        match self {
            System::Lockstep(target) => target.call(call).await,
            System::Baseline(baseline) => baseline.call(&call.user, call.operation).await,
        }
    }
}

/// What the settings ask for, checked.
pub fn plan(settings: &Settings) -> Result<Plan, BenchError> {
    let weighted = || {
        Mix::new(
            settings.deposit_weight,
            settings.withdraw_weight,
            settings.buy_weight,
            settings.sell_weight,
        )
        .ok_or_else(|| BenchError::Settings("every operation weight is 0".to_owned()))
    };
    let (mix, payees) = match settings.workload {
        WorkloadKind::Transfer => (Mix::only(Operation::Transfer), Payees::Uniform),
        WorkloadKind::HotReceiver => (Mix::only(Operation::Transfer), Payees::Hot),
        WorkloadKind::Uniform | WorkloadKind::Hot | WorkloadKind::Design => (weighted()?, Payees::Uniform),
        // The mix is PlaceBuy's phase; the cycles' phase is orders::run's own loop.
        WorkloadKind::Orders => {
            orders::check(settings)?;
            (Mix::only(Operation::Buy), Payees::Uniform)
        }
    };
    if mix.weight(Operation::Transfer) > 0 {
        if settings.systems.contains(&SystemKind::Baseline) {
            return Err(BenchError::Settings(
                "the design's flow has no transfer: run the transfer workloads with --systems lockstep".into(),
            ));
        }
        if settings.users < 2 {
            return Err(BenchError::Settings("transfers need --users 2 or more".into()));
        }
    }
    let (user_count, arrivals) = match settings.workload {
        WorkloadKind::Uniform | WorkloadKind::Transfer | WorkloadKind::HotReceiver | WorkloadKind::Orders => {
            (settings.users, None)
        }
        WorkloadKind::Hot => (1, None),
        WorkloadKind::Design => (
            1,
            Some(Arrivals::Open {
                start: settings.rate.unwrap_or(DESIGN_RATE_START_PER_SECOND),
                end: settings
                    .rate_end
                    .or(settings.rate)
                    .unwrap_or(DESIGN_RATE_END_PER_SECOND),
            }),
        ),
    };
    let arrivals = arrivals.unwrap_or(match settings.rate {
        Some(rate) => Arrivals::Open {
            start: rate,
            end: settings.rate_end.unwrap_or(rate),
        },
        None => Arrivals::Closed {
            callers: settings.callers,
        },
    });
    match arrivals {
        Arrivals::Closed { callers: 0 } => return Err(BenchError::Settings("--callers must be at least 1".into())),
        Arrivals::Open { start, end } if !(start > 0.0 && end > 0.0 && start.is_finite() && end.is_finite()) => {
            return Err(BenchError::Settings("--rate and --rate-end must be positive".into()));
        }
        _ => {}
    }
    if user_count == 0 {
        return Err(BenchError::Settings("--users must be at least 1".into()));
    }
    if !(settings.duration > 0.0 && settings.duration.is_finite()) {
        return Err(BenchError::Settings("--duration must be positive".into()));
    }
    if settings.in_flight_max == 0 {
        return Err(BenchError::Settings("--in-flight-max must be at least 1".into()));
    }
    let seed = settings.seed.unwrap_or_else(|| fastrand::u64(..));
    let prefix = settings
        .user_prefix
        .clone()
        .unwrap_or_else(|| format!("bench-{}-", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    Ok(Plan {
        arrivals,
        duration: Duration::from_secs_f64(settings.duration),
        calls_max: settings.calls,
        users: Users {
            prefix,
            count: user_count,
        },
        mix,
        payees,
        seed,
        in_flight_max: settings.in_flight_max,
        progress: !settings.quiet,
    })
}

/// Funds every user through `fund`, at most [`SETUP_CONCURRENCY`] at once.
pub(crate) async fn fund_all<F, Fut>(users: &Users, fund: F) -> Result<(), BenchError>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), BenchError>> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for user in users.all() {
        if tasks.len() >= SETUP_CONCURRENCY
            && let Some(joined) = tasks.join_next().await
        {
            joined.map_err(|error| BenchError::Setup(error.to_string()))??;
        }
        tasks.spawn(fund(user));
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|error| BenchError::Setup(error.to_string()))??;
    }
    Ok(())
}

/// A positive plain decimal as an integer count of `10^-scale` units (cents for scale 2,
/// thousandths for 3), for the baseline's integer arithmetic; `None` if it is not exactly one.
fn fixed_point(amount: &str, scale: usize) -> Option<i64> {
    let (whole, fraction) = amount.split_once('.').unwrap_or((amount, ""));
    let digits = |text: &str| text.bytes().all(|byte| byte.is_ascii_digit());
    if whole.is_empty() || amount.ends_with('.') || !digits(whole) || !digits(fraction) || fraction.len() > scale {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let fraction: i64 = if scale == 0 {
        0
    } else {
        format!("{fraction:0<scale$}").parse().ok()?
    };
    whole
        .checked_mul(10i64.checked_pow(scale as u32)?)?
        .checked_add(fraction)
        .filter(|&units| units > 0)
}

/// Runs the load on each system the settings name, one after the other, and returns the reports.
pub async fn run(settings: &Settings) -> Result<Vec<SystemReport>, BenchError> {
    if settings.workload == WorkloadKind::Orders {
        return Err(BenchError::Settings(
            "the orders workload reports each call of its cycle: run it through orders::run".to_owned(),
        ));
    }
    let plan = plan(settings)?;
    let timeout = Duration::from_millis(settings.timeout_ms);
    let sells = plan.mix.weight(Operation::Sell) > 0;
    let mut reports = Vec::new();
    for kind in &settings.systems {
        let report = match kind {
            SystemKind::Lockstep => {
                let target = LockstepTarget::connect(&settings.addresses(), timeout).await?;
                // A wrong --metrics-url fails now, not after funding every account.
                if let Some(url) = &settings.metrics_url {
                    metrics::storage_requests(url).await?;
                }
                let fund_quantity = sells.then(|| settings.fund_quantity.clone());
                fund_all(&plan.users, |user| {
                    let target = target.clone();
                    let cash = settings.fund_usd();
                    let quantity = fund_quantity.clone();
                    async move { target.fund(&user, &cash, quantity.as_deref()).await }
                })
                .await?;
                let before = match &settings.metrics_url {
                    Some(url) => Some(metrics::storage_requests(url).await?),
                    None => None,
                };
                let feed = match settings.watchers {
                    0 => None,
                    watchers => {
                        let users: Vec<String> = plan.users.all().collect();
                        let kind = settings.watch;
                        Some(feed::Feed::open(target.first_client(), &users, watchers, kind).await?)
                    }
                };
                let tally = load::run(System::Lockstep(target), &plan, "lockstep").await;
                let feed = match feed {
                    // Entries committed at the end of the run still arrive.
                    Some(feed) => Some(feed.close(Duration::from_secs(1)).await),
                    None => None,
                };
                let storage_requests = match (&settings.metrics_url, before) {
                    (Some(url), Some(before)) => StorageRequests::Counted {
                        total: metrics::storage_requests(url).await? - before,
                        source: "the coordinator's lockstep_storage_requests_total",
                    },
                    _ => StorageRequests::NotCounted {
                        reason: "no --metrics-url".to_owned(),
                    },
                };
                SystemReport {
                    system: "lockstep",
                    address: settings.addresses().join(","),
                    tally,
                    storage_requests,
                    feed,
                }
            }
            SystemKind::Baseline => {
                let endpoint = settings.dynamodb_endpoint.clone().ok_or_else(|| {
                    BenchError::Settings("the baseline needs --dynamodb-endpoint (see serve-dynoxide)".to_owned())
                })?;
                let baseline = Arc::new(Baseline::local(&endpoint, &settings.baseline_table));
                baseline.ensure_table().await?;
                let cash = fixed_point(&settings.fund_usd(), 2).ok_or_else(|| {
                    BenchError::Settings(format!(
                        "--fund-usd {}: a plain amount such as 5000.00",
                        settings.fund_usd()
                    ))
                })?;
                let quantity = match sells {
                    true => fixed_point(&settings.fund_quantity, 3).ok_or_else(|| {
                        BenchError::Settings(format!(
                            "--fund-quantity {}: a plain quantity with at most 3 decimals",
                            settings.fund_quantity
                        ))
                    })?,
                    false => 0,
                };
                fund_all(&plan.users, |user| {
                    let baseline = baseline.clone();
                    async move { baseline.fund(&user, cash, quantity).await }
                })
                .await?;
                let before = baseline.requests();
                let tally = load::run(System::Baseline(baseline.clone()), &plan, "baseline").await;
                SystemReport {
                    system: "baseline",
                    address: endpoint,
                    tally,
                    storage_requests: StorageRequests::Counted {
                        total: (baseline.requests() - before) as f64,
                        source: "counted by the baseline client",
                    },
                    feed: None,
                }
            }
        };
        reports.push(report);
    }
    if let Some(path) = &settings.svg {
        let title = format!("lockstep-bench: {}", describe(&plan, settings));
        std::fs::write(path, report::svg(&reports, &title)).map_err(|error| BenchError::Write {
            path: path.display().to_string(),
            error,
        })?;
    }
    Ok(reports)
}

/// One line saying what was run.
pub fn describe(plan: &Plan, settings: &Settings) -> String {
    let arrivals = match plan.arrivals {
        Arrivals::Closed { callers } => format!("closed loop, {callers} callers"),
        Arrivals::Open { start, end } if start == end => format!("open loop, {start}/s"),
        Arrivals::Open { start, end } => format!("open loop, {start} → {end}/s"),
    };
    let phases = match settings.workload {
        WorkloadKind::Orders => " per phase (PlaceBuy, then order cycles)",
        _ => "",
    };
    format!(
        "{} workload, {} user(s), {arrivals}, {} s{phases}",
        workload_name(settings.workload),
        plan.users.count,
        settings.duration
    )
}

/// The workload as its flag spells it (`hot-receiver`).
pub(crate) fn workload_name(workload: WorkloadKind) -> String {
    clap::ValueEnum::to_possible_value(&workload).map_or_else(
        || format!("{workload:?}").to_lowercase(),
        |value| value.get_name().to_owned(),
    )
}

/// The JSON object `--json` prints.
pub fn json(settings: &Settings, reports: &[SystemReport]) -> serde_json::Value {
    let plan = plan(settings).ok();
    serde_json::json!({
        "run": plan.as_ref().map(|plan| describe(plan, settings)),
        "workload": workload_name(settings.workload),
        "duration_seconds": settings.duration,
        "systems": reports.iter().map(SystemReport::json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(arguments: &[&str]) -> Settings {
        let all = std::iter::once("lockstep-bench").chain(arguments.iter().copied());
        <settings::Cli as clap::Parser>::parse_from(all).settings
    }

    /// The transfer workloads send transfers only, between at least two users, and never to the
    /// baseline, whose flow has no transfer.
    #[test]
    fn transfer_workloads_plan_transfers_only() {
        for (workload, payees) in [("transfer", Payees::Uniform), ("hot-receiver", Payees::Hot)] {
            let plan = plan(&settings(&["--workload", workload, "--users", "100"])).expect("a plan");
            assert_eq!(
                (plan.mix, plan.payees, plan.users.count),
                (Mix::only(Operation::Transfer), payees, 100)
            );
            let refused = plan_error(&["--workload", workload, "--systems", "lockstep,baseline"]);
            assert!(refused.contains("no transfer"), "{refused}");
            assert!(plan_error(&["--workload", workload, "--users", "1"]).contains("--users 2"));
        }
        assert_eq!(plan(&settings(&[])).expect("a plan").mix.weight(Operation::Transfer), 0);
    }

    fn plan_error(arguments: &[&str]) -> String {
        plan(&settings(arguments)).expect_err("refused").to_string()
    }

    /// Funding amounts become integer units exactly; anything else is refused.
    #[test]
    fn fixed_point_is_exact() {
        assert_eq!(fixed_point("5000.00", 2), Some(500_000));
        assert_eq!(fixed_point("12.5", 2), Some(1_250));
        assert_eq!(fixed_point("7", 2), Some(700));
        assert_eq!(fixed_point("10", 3), Some(10_000));
        assert_eq!(fixed_point("0.035", 3), Some(35));
        for refused in ["1.234", "0", "-5", "+5", "", ".5", "1e3", "5.", "99999999999999999999"] {
            assert_eq!(fixed_point(refused, 2), None, "{refused}");
        }
    }
}
