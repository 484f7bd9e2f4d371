//! Drives a system with calls: closed loop (callers wait for their reply) or open loop (calls at
//! intended times, latency measured from the intended time, so that a stall of the system shows
//! up in the latencies instead of silently slowing the sender: no coordinated omission).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::System;
use crate::workload::{Arrivals, Mix, Operation, Payees, Users, intended_offset};

/// The histogram's range: 1 µs to 10 minutes, 3 significant digits.
const LATENCY_MICROSECONDS_MAX: u64 = 600_000_000;
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;
/// How often the progress bar is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// What to send and when.
#[derive(Debug, Clone)]
pub struct Plan {
    pub arrivals: Arrivals,
    pub duration: Duration,
    /// Stop after this many calls even if the duration is not over.
    pub calls_max: Option<u64>,
    pub users: Users,
    pub mix: Mix,
    /// Whom transfers pay.
    pub payees: Payees,
    pub seed: u64,
    /// Open loop: calls in flight at most; past it the sender waits, and the wait counts in the
    /// latency of the calls it delays.
    pub in_flight_max: usize,
    pub progress: bool,
}

/// Every reply of a run.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Latency of every reply, microseconds.
    pub latency: Histogram<u64>,
    /// Replies by outcome (a gRPC code name, or the baseline's outcome).
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Calls sent by operation.
    pub operations: BTreeMap<&'static str, u64>,
    /// From the first send to the last reply.
    pub elapsed: Duration,
}

impl Tally {
    pub(crate) fn new() -> Tally {
        Tally {
            latency: Histogram::new_with_bounds(1, LATENCY_MICROSECONDS_MAX, LATENCY_SIGNIFICANT_DIGITS)
                .expect("valid histogram bounds"),
            outcomes: BTreeMap::new(),
            operations: BTreeMap::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// Counts one reply of `operation` (an [`Operation`]'s or an order step's name).
    pub(crate) fn record(&mut self, operation: &'static str, latency: Duration, outcome: &'static str) {
        let microseconds = (latency.as_micros() as u64).clamp(1, LATENCY_MICROSECONDS_MAX);
        self.latency
            .record(microseconds)
            .expect("clamped into the histogram's range");
        *self.outcomes.entry(outcome).or_default() += 1;
        *self.operations.entry(operation).or_default() += 1;
    }

    pub fn calls(&self) -> u64 {
        self.outcomes.values().sum()
    }

    pub fn ok(&self) -> u64 {
        self.outcomes.get("OK").copied().unwrap_or(0)
    }

    /// Replies with status OK per second of the run.
    pub fn ok_per_second(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 { self.ok() as f64 / seconds } else { 0.0 }
    }

    /// The latency at `percentile` (0 to 100), milliseconds.
    pub fn percentile_ms(&self, percentile: f64) -> f64 {
        self.latency.value_at_percentile(percentile) as f64 / 1000.0
    }
}

/// The shared record of a run and the count the progress bar reads.
struct Recorder {
    tally: Mutex<Tally>,
    completed: Arc<AtomicU64>,
}

impl Recorder {
    fn record(&self, operation: Operation, latency: Duration, outcome: &'static str) {
        self.tally
            .lock()
            .expect("a recorder is never poisoned: recording does not panic")
            .record(operation.name(), latency, outcome);
        self.completed.fetch_add(1, Ordering::Relaxed);
    }
}

fn progress_bar(plan: &Plan, label: &str) -> ProgressBar {
    if !plan.progress || !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(plan.duration.as_millis() as u64);
    let style = ProgressStyle::with_template("{prefix} [{bar:40}] {elapsed}/{duration} {msg}")
        .expect("valid template")
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.to_owned());
    bar
}

/// The progress bar of a run and the task redrawing it from a count of replies (shared with the
/// order cycles' loop, which records its steps elsewhere).
pub(crate) struct Progress {
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub(crate) fn start(plan: &Plan, label: &str, start: Instant, completed: Arc<AtomicU64>) -> Progress {
        let bar = progress_bar(plan, label);
        let ticker = {
            let bar = bar.clone();
            let duration = plan.duration;
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(PROGRESS_INTERVAL);
                loop {
                    interval.tick().await;
                    bar.set_position(start.elapsed().min(duration).as_millis() as u64);
                    bar.set_message(format!("{} replies", completed.load(Ordering::Relaxed)));
                }
            })
        };
        Progress { bar, ticker }
    }

    pub(crate) fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// Runs `plan` against `system` and returns every reply.
pub async fn run(system: System, plan: &Plan, label: &str) -> Tally {
    let recorder = Arc::new(Recorder {
        tally: Mutex::new(Tally::new()),
        completed: Arc::new(AtomicU64::new(0)),
    });
    let start = Instant::now();
    let progress = Progress::start(plan, label, start, recorder.completed.clone());
    match plan.arrivals {
        Arrivals::Closed { callers } => closed_loop(system, plan, callers, start, &recorder).await,
        Arrivals::Open { start: rate_start, end } => open_loop(system, plan, rate_start, end, start, &recorder).await,
    }
    let elapsed = start.elapsed();
    progress.finish();
    let mut tally = recorder
        .tally
        .lock()
        .expect("a recorder is never poisoned: recording does not panic")
        .clone();
    tally.elapsed = elapsed;
    tally
}

async fn closed_loop(system: System, plan: &Plan, callers: usize, start: Instant, recorder: &Arc<Recorder>) {
    let end = start + plan.duration;
    let claimed = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for caller in 0..callers {
        let system = system.clone();
        let recorder = recorder.clone();
        let claimed = claimed.clone();
        let users = plan.users.clone();
        let mix = plan.mix;
        let payees = plan.payees;
        let calls_max = plan.calls_max.unwrap_or(u64::MAX);
        let mut random = fastrand::Rng::with_seed(plan.seed.wrapping_add(caller as u64));
        tasks.spawn(async move {
            while Instant::now() < end && claimed.fetch_add(1, Ordering::Relaxed) < calls_max {
                let call = users.call(&mix, payees, &mut random);
                let sent = Instant::now();
                let outcome = system.call(&call).await;
                recorder.record(call.operation, sent.elapsed(), outcome);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("a caller does not panic");
    }
}

async fn open_loop(
    system: System,
    plan: &Plan,
    rate_start: f64,
    rate_end: f64,
    start: Instant,
    recorder: &Arc<Recorder>,
) {
    let in_flight = Arc::new(Semaphore::new(plan.in_flight_max));
    let mut random = fastrand::Rng::with_seed(plan.seed);
    let mut tasks = JoinSet::new();
    let calls_max = plan.calls_max.unwrap_or(u64::MAX);
    let mut index = 0;
    while index < calls_max {
        let Some(offset) = intended_offset(index, rate_start, rate_end, plan.duration) else {
            break;
        };
        let intended = start + offset;
        tokio::time::sleep_until(intended.into()).await;
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let call = plan.users.call(&plan.mix, plan.payees, &mut random);
        let system = system.clone();
        let recorder = recorder.clone();
        tasks.spawn(async move {
            let outcome = system.call(&call).await;
            // From the intended send time: a late send is the system's delay too.
            recorder.record(call.operation, intended.elapsed(), outcome);
            drop(permit);
        });
        while let Some(joined) = tasks.try_join_next() {
            joined.expect("a call does not panic");
        }
        index += 1;
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("a call does not panic");
    }
}
