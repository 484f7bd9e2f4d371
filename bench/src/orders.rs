//! The orders workload (issue 16's figure): a reserved order and its two fills against PlaceBuy,
//! on the same coordinator, the same users and the same callers.
//!
//! Two phases of `--duration` each, one after the other, after one funding of every user:
//! PlaceBuy (the existing buy, a market order of 0.035 SOL) first, then the order cycles
//! (ReserveOrder, FillOrder "a", FillOrder "b"). PlaceBuy goes first so that whatever the first
//! phase leaves behind (a larger store, more ledger entries) weighs on the fills and not on the bar
//! they are held to: the bound is a fill's p99 no worse than PlaceBuy's.
//!
//! Each call of a cycle is timed and counted on its own, as the other workloads time a call; the
//! cycle is a closed loop only (its next call waits for the previous reply by nature).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockstep::coordinator::v1 as pb;
use serde_json::Value;
use tokio::task::JoinSet;

use crate::load::{Plan, Progress, Tally};
use crate::lockstep_target::LockstepTarget;
use crate::report::OrdersReport;
use crate::settings::{Settings, SystemKind};
use crate::workload::{Arrivals, ORDER_FILLS, Step};
use crate::{BenchError, System};

/// The outcome counted when a call answers OK but leaves the order in another status than the
/// step should (OPEN after the reserve, PARTIALLY_FILLED after the first fill, FILLED after the
/// last): a wrong answer is not an OK one.
pub const UNEXPECTED_STATUS: &str = "OK_UNEXPECTED_STATUS";

/// What the orders workload does not measure, refused rather than ignored.
pub(crate) fn check(settings: &Settings) -> Result<(), BenchError> {
    let refuse = |reason: &str| Err(BenchError::Settings(format!("the orders workload: {reason}")));
    if settings.systems.iter().any(|&system| system != SystemKind::Lockstep) {
        return refuse("the design's flow has no reserved orders, run it with --systems lockstep");
    }
    if settings.rate.is_some() {
        return refuse("a cycle waits for each reply before its next call, a closed loop: drop --rate");
    }
    if settings.watchers > 0 || settings.metrics_url.is_some() || settings.svg.is_some() {
        return refuse("--watchers, --metrics-url and --svg are not measured by it");
    }
    Ok(())
}

/// The replies of the cycles' phase, one tally per step, each with the phase's elapsed time (so
/// that each step's ok/s is over the same seconds).
#[derive(Debug, Clone)]
pub struct StepTallies {
    pub reserve: Tally,
    /// Both fills of every cycle.
    pub fill: Tally,
    /// Cancels after a failed fill; none in a run where every fill answered OK.
    pub cancel: Tally,
    /// Cycles whose three calls all answered OK: the order FILLED, nothing left on hold.
    pub completed: u64,
}

impl StepTallies {
    fn new() -> StepTallies {
        StepTallies {
            reserve: Tally::new(),
            fill: Tally::new(),
            cancel: Tally::new(),
            completed: 0,
        }
    }

    fn step(&mut self, step: Step) -> &mut Tally {
        match step {
            Step::Reserve => &mut self.reserve,
            Step::Fill => &mut self.fill,
            Step::Cancel => &mut self.cancel,
        }
    }

    /// Completed cycles per second of the phase.
    pub fn completed_per_second(&self) -> f64 {
        let seconds = self.reserve.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.completed as f64 / seconds
        } else {
            0.0
        }
    }
}

/// The shared record of the cycles' phase and the count the progress bar reads.
struct StepRecorder {
    tallies: Mutex<StepTallies>,
    completed: Arc<AtomicU64>,
}

impl StepRecorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, StepTallies> {
        self.tallies
            .lock()
            .expect("a recorder is never poisoned: recording does not panic")
    }

    fn record(&self, step: Step, latency: Duration, outcome: &'static str) {
        self.lock().step(step).record(step.name(), latency, outcome);
        self.completed.fetch_add(1, Ordering::Relaxed);
    }

    fn cycle_completed(&self) {
        self.lock().completed += 1;
    }
}

/// Funds the users, runs PlaceBuy's phase and then the cycles' phase, and returns both.
pub async fn run(settings: &Settings) -> Result<OrdersReport, BenchError> {
    let plan = crate::plan(settings)?;
    let timeout = Duration::from_millis(settings.timeout_ms);
    let target = LockstepTarget::connect(&settings.addresses(), timeout).await?;
    let cash = settings.fund_usd();
    crate::fund_all(&plan.users, |user| {
        let target = target.clone();
        let cash = cash.clone();
        async move { target.fund(&user, &cash, None).await }
    })
    .await?;
    let place_buy = crate::load::run(System::Lockstep(target.clone()), &plan, "place-buy").await;
    let cycles = cycles(&target, &plan).await;
    Ok(OrdersReport {
        address: settings.addresses().join(","),
        place_buy,
        cycles,
    })
}

/// The cycles' phase: `plan`'s callers in a closed loop, each running one cycle after another on
/// a uniform user (the same seeds, so the same users in the same order, as PlaceBuy's phase) until
/// the duration is over or `--calls` cycles have started.
async fn cycles(target: &LockstepTarget, plan: &Plan) -> StepTallies {
    let Arrivals::Closed { callers } = plan.arrivals else {
        unreachable!("check() refuses --rate for the orders workload")
    };
    let recorder = Arc::new(StepRecorder {
        tallies: Mutex::new(StepTallies::new()),
        completed: Arc::new(AtomicU64::new(0)),
    });
    let start = Instant::now();
    let progress = Progress::start(plan, "orders", start, recorder.completed.clone());
    let end = start + plan.duration;
    let claimed = Arc::new(AtomicU64::new(0));
    let calls_max = plan.calls_max.unwrap_or(u64::MAX);
    let mut tasks = JoinSet::new();
    for caller in 0..callers {
        let target = target.clone();
        let recorder = recorder.clone();
        let claimed = claimed.clone();
        let users = plan.users.clone();
        let mut random = fastrand::Rng::with_seed(plan.seed.wrapping_add(caller as u64));
        tasks.spawn(async move {
            while Instant::now() < end && claimed.fetch_add(1, Ordering::Relaxed) < calls_max {
                let user = users.random(&mut random);
                cycle(&target, &user, &recorder).await;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("a caller does not panic");
    }
    let elapsed = start.elapsed();
    progress.finish();
    let mut tallies = recorder.lock().clone();
    for tally in [&mut tallies.reserve, &mut tallies.fill, &mut tallies.cancel] {
        tally.elapsed = elapsed;
    }
    tallies
}

/// One cycle on `user`: the reserve, then each fill while every call before it answered OK. A
/// failed fill (its order may still hold cash) is followed by a cancel, and the cycle ends.
async fn cycle(target: &LockstepTarget, user: &str, recorder: &StepRecorder) {
    let sent = Instant::now();
    let reserved = target.reserve_order(user).await;
    let code = step_outcome(&reserved, pb::OrderStatus::Open);
    recorder.record(Step::Reserve, sent.elapsed(), code);
    let Ok(order) = reserved else { return };
    if code != "OK" {
        cancel(target, user, &order.order_id, recorder).await;
        return;
    }
    for (index, fill) in ORDER_FILLS.into_iter().enumerate() {
        let expected = if index + 1 == ORDER_FILLS.len() {
            pb::OrderStatus::Filled
        } else {
            pb::OrderStatus::PartiallyFilled
        };
        let sent = Instant::now();
        let filled = target.fill_order(user, &order.order_id, fill).await;
        let code = step_outcome(&filled, expected);
        recorder.record(Step::Fill, sent.elapsed(), code);
        if code != "OK" {
            cancel(target, user, &order.order_id, recorder).await;
            return;
        }
    }
    recorder.cycle_completed();
}

/// Releases what a cycle's order still holds after a failed step.
async fn cancel(target: &LockstepTarget, user: &str, order_id: &str, recorder: &StepRecorder) {
    let sent = Instant::now();
    let cancelled = target.cancel_order(user, order_id).await;
    recorder.record(
        Step::Cancel,
        sent.elapsed(),
        step_outcome(&cancelled, pb::OrderStatus::Cancelled),
    );
}

/// A step's outcome: the failure's code name, OK when the order is in the `expected` status, or
/// [`UNEXPECTED_STATUS`].
fn step_outcome(reply: &Result<pb::Order, &'static str>, expected: pb::OrderStatus) -> &'static str {
    match reply {
        Ok(order) if order.status == expected as i32 => "OK",
        Ok(_) => UNEXPECTED_STATUS,
        Err(code) => code,
    }
}

/// The JSON object `--json` prints for the orders workload.
pub fn json(settings: &Settings, report: &OrdersReport) -> Value {
    let plan = crate::plan(settings).ok();
    let mut object = serde_json::json!({
        "run": plan.as_ref().map(|plan| crate::describe(plan, settings)),
        "workload": crate::workload_name(settings.workload),
        "duration_seconds": settings.duration,
    });
    if let (Value::Object(object), Value::Object(figures)) = (&mut object, report.json()) {
        object.extend(figures);
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{ORDER_LIMIT_USD, ORDER_QUANTITY};

    /// The cycle's fills add up to the reserved quantity, each at or below the limit (or the
    /// coordinator refuses it), and the cycle's cost is what the funding default is sized on.
    #[test]
    fn fills_cover_the_order_within_its_limit() {
        let thousandths = |text| crate::fixed_point(text, 3).expect("a plain quantity");
        let cents = |text| crate::fixed_point(text, 2).expect("a plain amount");
        let filled: i64 = ORDER_FILLS.iter().map(|fill| thousandths(fill.quantity)).sum();
        assert_eq!(filled, thousandths(ORDER_QUANTITY));
        assert!(
            ORDER_FILLS
                .iter()
                .all(|fill| cents(fill.price) <= cents(ORDER_LIMIT_USD))
        );
        let cost: i64 = ORDER_FILLS
            .iter()
            .map(|fill| thousandths(fill.quantity) * cents(fill.price) / 1000)
            .sum();
        assert_eq!(cost, 29_950);
        let ids: std::collections::BTreeSet<_> = ORDER_FILLS.iter().map(|fill| fill.id).collect();
        assert_eq!(ids.len(), ORDER_FILLS.len(), "a fill id applies once per order");
    }

    /// A step is OK only when the order is where the step should leave it.
    #[test]
    fn outcome_checks_the_status() {
        let order = |status: pb::OrderStatus| {
            Ok(pb::Order {
                status: status as i32,
                ..pb::Order::default()
            })
        };
        assert_eq!(step_outcome(&order(pb::OrderStatus::Open), pb::OrderStatus::Open), "OK");
        assert_eq!(
            step_outcome(&order(pb::OrderStatus::Filled), pb::OrderStatus::PartiallyFilled),
            UNEXPECTED_STATUS
        );
        assert_eq!(step_outcome(&Err("ABORTED"), pb::OrderStatus::Filled), "ABORTED");
    }

    fn settings(arguments: &[&str]) -> Settings {
        let all = std::iter::once("lockstep-bench").chain(arguments.iter().copied());
        <crate::settings::Cli as clap::Parser>::parse_from(all).settings
    }

    /// The orders workload plans PlaceBuy's phase over --users, funds enough for its cycles, and
    /// refuses what it would not measure.
    #[test]
    fn orders_plan_and_refusals() {
        let orders = settings(&["--workload", "orders"]);
        let plan = crate::plan(&orders).expect("a plan");
        assert_eq!(plan.mix, crate::workload::Mix::only(crate::workload::Operation::Buy));
        assert_eq!(
            (plan.users.count, plan.arrivals),
            (100, Arrivals::Closed { callers: 16 })
        );
        assert_eq!(orders.fund_usd(), "100000.00");
        assert_eq!(settings(&[]).fund_usd(), "5000.00");
        assert_eq!(
            settings(&["--workload", "orders", "--fund-usd", "1000.00"]).fund_usd(),
            "1000.00"
        );
        for refused in [
            &["--systems", "lockstep,baseline"][..],
            &["--rate", "10"],
            &["--watchers", "1"],
            &["--svg", "plot.svg"],
        ] {
            let arguments: Vec<&str> = ["--workload", "orders"].iter().chain(refused).copied().collect();
            let error = crate::plan(&settings(&arguments)).expect_err("refused").to_string();
            assert!(error.contains("the orders workload"), "{refused:?}: {error}");
        }
    }
}
