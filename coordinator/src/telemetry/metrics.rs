//! Every metric the coordinator exports, and the one typed call per event that records it.
//!
//! The service code calls one-liners (`metrics::committed("DEPOSIT")`); this module alone knows
//! metric names, label names and buckets, so a dashboard or alert rule has one file to read.
//! Names follow Prometheus conventions: `lockstep_` prefix, counters end in `_total`, durations
//! are histograms in `_seconds`. Labels are bounded sets (operation, outcome, rule, gRPC code,
//! storage operation); a user id is never a label: the most contended users are kept in a
//! bounded top-k instead ([`super::contention`]).
//!
//! The registry is process-wide, like a `tracing` subscriber: one coordinator per process in
//! production; tests that assert on values start the coordinator binary as its own process.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::core::Rejection;
use crate::core::UserId;

/// Distinct gRPC method names kept as label values; any further one is counted as "other", so
/// a client calling made-up method names cannot grow the series without bound.
pub const RPC_METHODS_MAX: usize = 64;

/// Every metric name, as scraped (counters with their `_total`).
pub mod names {
    pub const RPC_REQUESTS: &str = "lockstep_rpc_requests_total";
    pub const RPC_DURATION: &str = "lockstep_rpc_duration_seconds";
    pub const LEASE_ACQUISITIONS: &str = "lockstep_lease_acquisitions_total";
    pub const LEASE_WAIT: &str = "lockstep_lease_wait_seconds";
    pub const LEASE_HOLD: &str = "lockstep_lease_hold_seconds";
    pub const COMMITS: &str = "lockstep_commits_total";
    pub const REFUSALS: &str = "lockstep_refusals_total";
    pub const ROLLBACKS: &str = "lockstep_rollbacks_total";
    pub const FENCED_COMMITS: &str = "lockstep_fenced_commits_total";
    pub const LEASE_EXPIRIES: &str = "lockstep_lease_expiries_total";
    pub const CLOCK_SKEW: &str = "lockstep_clock_skew_detected_total";
    pub const UNCLEAR_COMMITS: &str = "lockstep_unclear_commits_total";
    pub const REPLAYS: &str = "lockstep_replays_total";
    pub const KNOWN_ACCOUNT_COMMITS: &str = "lockstep_known_account_commits_total";
    pub const FORWARDS: &str = "lockstep_forwards_total";
    pub const LIVE_COORDINATORS: &str = "lockstep_live_coordinators";
    pub const ENTRIES_NUMBERED: &str = "lockstep_entries_numbered_total";
    pub const FEED_RECORDED_AGAIN: &str = "lockstep_feed_recorded_again_total";
    pub const FEED_GAP_FILLED: &str = "lockstep_feed_gap_filled_entries_total";
    pub const WATCHERS: &str = "lockstep_watchers";
    pub const WATCH_EVENTS: &str = "lockstep_watch_events_total";
    pub const WATCH_LAG: &str = "lockstep_watch_lag_seconds";
    pub const WATCHERS_ENDED: &str = "lockstep_watchers_ended_total";
    pub const STORAGE_REQUESTS: &str = "lockstep_storage_requests_total";
    pub const STORAGE_DURATION: &str = "lockstep_storage_request_duration_seconds";
    pub const STORAGE_RETRIES: &str = "lockstep_storage_retries_total";
    pub const MUTATIONS_IN_FLIGHT: &str = "lockstep_mutations_in_flight";
    pub const LEASE_WAITERS: &str = "lockstep_lease_waiters";
    pub const STORAGE_UP: &str = "lockstep_storage_up";
    pub const SWEEPS: &str = "lockstep_sweeps_total";
    pub const SWEPT_LEASES: &str = "lockstep_sweep_released_leases_total";
    pub const SWEPT_RECORDS: &str = "lockstep_sweep_deleted_records_total";
    pub const HOLDS: &str = "lockstep_holds_total";
    pub const CASH_ON_HOLD: &str = "lockstep_cash_on_hold_cents";
    pub const AUDITS: &str = "lockstep_audits_total";
    pub const AUDIT_DISCREPANCIES: &str = "lockstep_audit_discrepancies";
    pub const ADMIN_LEASE_RELEASES: &str = "lockstep_admin_lease_releases_total";
}

/// How a lease acquisition ended (the `outcome` label of `lockstep_lease_acquisitions_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The first write took it.
    Acquired,
    /// Taken after finding it busy (or storage unavailable) at least once.
    AcquiredAfterWait,
    /// Still busy when the wait limit came: ABORTED.
    Busy,
    /// The caller's deadline came first: DEADLINE_EXCEEDED.
    Deadline,
    /// Storage did not answer: UNAVAILABLE.
    Unavailable,
}

impl LeaseOutcome {
    /// A lease taken: at once, or after finding it busy at least once.
    pub fn taken(after_wait: bool) -> LeaseOutcome {
        if after_wait {
            LeaseOutcome::AcquiredAfterWait
        } else {
            LeaseOutcome::Acquired
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LeaseOutcome::Acquired => "acquired",
            LeaseOutcome::AcquiredAfterWait => "acquired_after_wait",
            LeaseOutcome::Busy => "busy",
            LeaseOutcome::Deadline => "deadline",
            LeaseOutcome::Unavailable => "unavailable",
        }
    }
}

/// How an unclear commit (reply lost, or refused after a try may have landed) was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// A try landed: answered as committed.
    Applied,
    /// Fenced and found absent: known not applied.
    NotApplied,
    /// The fence itself failed: the outcome stays unknown until the lease expires.
    Unknown,
}

impl Settled {
    pub fn as_str(self) -> &'static str {
        match self {
            Settled::Applied => "applied",
            Settled::NotApplied => "not_applied",
            Settled::Unknown => "unknown",
        }
    }
}

type Labels<const N: usize> = [(&'static str, &'static str); N];
type HistogramFamily<const N: usize> = Family<Labels<N>, Histogram, fn() -> Histogram>;

fn latency_buckets() -> Histogram {
    // 1 ms to about 33 s: a SQLite commit to a lease wait at its limit and an SDK retry chain.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 16,
    ))
}

fn hold_buckets() -> Histogram {
    // 1 ms to about 33 s: a lease lives at most `LEASE_TRADE` (25 s).
    latency_buckets()
}

struct Metrics {
    registry: Registry,
    rpc_methods: Mutex<HashSet<&'static str>>,
    rpc_requests: Family<Labels<2>, Counter>,
    rpc_duration: HistogramFamily<1>,
    lease_acquisitions: Family<Labels<2>, Counter>,
    lease_wait: HistogramFamily<1>,
    lease_hold: HistogramFamily<1>,
    commits: Family<Labels<1>, Counter>,
    refusals: Family<Labels<2>, Counter>,
    rollbacks: Family<Labels<1>, Counter>,
    fenced_commits: Counter,
    lease_expiries: Counter,
    clock_skew: Counter,
    entries_numbered: Counter,
    feed_recorded_again: Family<Labels<1>, Counter>,
    feed_gap_filled: Counter,
    watchers: Family<Labels<1>, Gauge>,
    watch_events: Family<Labels<1>, Counter>,
    watch_lag: HistogramFamily<1>,
    watchers_ended: Family<Labels<1>, Counter>,
    unclear_commits: Family<Labels<1>, Counter>,
    replays: Family<Labels<1>, Counter>,
    known_account_commits: Family<Labels<1>, Counter>,
    forwards: Family<Labels<1>, Counter>,
    live_coordinators: Gauge,
    storage_requests: Family<Labels<2>, Counter>,
    storage_duration: HistogramFamily<1>,
    storage_retries: Counter,
    mutations_in_flight: Gauge,
    lease_waiters: Gauge,
    storage_up: Gauge,
    sweeps: Family<Labels<1>, Counter>,
    swept_leases: Counter,
    swept_records: Counter,
    holds: Family<Labels<1>, Counter>,
    cash_on_hold: Gauge,
    audits: Family<Labels<1>, Counter>,
    audit_discrepancies: Gauge,
    admin_lease_releases: Counter,
}

/// Registers `metric` under its scraped name: prometheus-client appends `_total` to counters
/// itself, so the registered name is the scraped one without it.
fn register<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: &M,
) {
    let name = name.strip_suffix("_total").unwrap_or(name);
    registry.register(name, help, metric.clone());
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let metrics = Metrics {
        registry: Registry::default(),
        rpc_methods: Mutex::new(HashSet::new()),
        rpc_requests: Family::default(),
        rpc_duration: Family::new_with_constructor(latency_buckets),
        lease_acquisitions: Family::default(),
        lease_wait: Family::new_with_constructor(latency_buckets),
        lease_hold: Family::new_with_constructor(hold_buckets),
        commits: Family::default(),
        refusals: Family::default(),
        rollbacks: Family::default(),
        fenced_commits: Counter::default(),
        lease_expiries: Counter::default(),
        clock_skew: Counter::default(),
        entries_numbered: Counter::default(),
        feed_recorded_again: Family::default(),
        feed_gap_filled: Counter::default(),
        watchers: Family::default(),
        watch_events: Family::default(),
        watch_lag: Family::new_with_constructor(latency_buckets),
        watchers_ended: Family::default(),
        unclear_commits: Family::default(),
        replays: Family::default(),
        known_account_commits: Family::default(),
        forwards: Family::default(),
        live_coordinators: Gauge::default(),
        storage_requests: Family::default(),
        storage_duration: Family::new_with_constructor(latency_buckets),
        storage_retries: Counter::default(),
        mutations_in_flight: Gauge::default(),
        lease_waiters: Gauge::default(),
        storage_up: Gauge::default(),
        sweeps: Family::default(),
        swept_leases: Counter::default(),
        swept_records: Counter::default(),
        holds: Family::default(),
        cash_on_hold: Gauge::default(),
        audits: Family::default(),
        audit_discrepancies: Gauge::default(),
        admin_lease_releases: Counter::default(),
    };
    use names::*;
    let r = &mut registry;
    register(
        r,
        RPC_REQUESTS,
        "gRPC calls served, by method and status code.",
        &metrics.rpc_requests,
    );
    register(
        r,
        RPC_DURATION,
        "gRPC call latency until the reply, by method.",
        &metrics.rpc_duration,
    );
    register(
        r,
        LEASE_ACQUISITIONS,
        "Lease acquisitions by operation and outcome.",
        &metrics.lease_acquisitions,
    );
    register(
        r,
        LEASE_WAIT,
        "Time from the first lease write to holding it (or giving up), by operation.",
        &metrics.lease_wait,
    );
    register(
        r,
        LEASE_HOLD,
        "Time a lease was held, from acquisition to its commit, roll-back or release, by operation.",
        &metrics.lease_hold,
    );
    register(r, COMMITS, "Mutations committed, by operation.", &metrics.commits);
    register(
        r,
        REFUSALS,
        "Mutations refused by a business rule, by operation and rule.",
        &metrics.refusals,
    );
    register(
        r,
        ROLLBACKS,
        "Refusals rolled back under the lease (FAILED order or refusal record written), by operation.",
        &metrics.rollbacks,
    );
    register(
        r,
        FENCED_COMMITS,
        "Commits refused by the fence: the lease was no longer the committer's.",
        &metrics.fenced_commits,
    );
    register(
        r,
        LEASE_EXPIRIES,
        "Leases found expired: taken over from a dead holder, or lost before the committer's release.",
        &metrics.lease_expiries,
    );
    register(
        r,
        CLOCK_SKEW,
        "Stored instants found further ahead of this coordinator's clock than the tolerated skew: its clock is behind, or a writer's is far ahead.",
        &metrics.clock_skew,
    );
    register(
        r,
        ENTRIES_NUMBERED,
        "Ledger entries written before sequences that were given their place (the upgrade).",
        &metrics.entries_numbered,
    );
    register(
        r,
        FEED_RECORDED_AGAIN,
        "Feed records written again at a later time: their commit was acknowledged late, its outcome was unknown, or another writer took the account (outcome: written; late, acknowledged late again: raise --feed-horizon-ms; failed: missing from WatchFeed).",
        &metrics.feed_recorded_again,
    );
    register(
        r,
        FEED_GAP_FILLED,
        "Entries a WatchFeed stream read from the ledger to fill a gap before a later record of the account.",
        &metrics.feed_gap_filled,
    );
    register(
        r,
        WATCHERS,
        "Open WatchLedger streams (kind=ledger).",
        &metrics.watchers,
    );
    register(
        r,
        WATCH_EVENTS,
        "Events sent to watchers, by type (entry, progress).",
        &metrics.watch_events,
    );
    register(
        r,
        WATCH_LAG,
        "Time from an entry's commit (its created time) to its send to a live watcher, by kind.",
        &metrics.watch_lag,
    );
    register(
        r,
        WATCHERS_ENDED,
        "Watch streams this coordinator ended, by reason (limit: --max-watchers reached; drain).",
        &metrics.watchers_ended,
    );
    register(
        r,
        UNCLEAR_COMMITS,
        "Commits whose outcome was unclear, by how they were settled.",
        &metrics.unclear_commits,
    );
    register(
        r,
        REPLAYS,
        "Retries of a request id answered with the recorded outcome, by operation.",
        &metrics.replays,
    );
    register(
        r,
        KNOWN_ACCOUNT_COMMITS,
        "Batches committed without a lease on the account as this coordinator last left it, by outcome: applied, stale (another writer came first; the batch took the lease), unknown (settled under the lease).",
        &metrics.known_account_commits,
    );
    register(
        r,
        FORWARDS,
        "Mutations for an account another coordinator owns, by outcome: forwarded (the owner answered), served_here (served through the lease path here: the owner could not be reached, refused this coordinator's peer credentials, or was lost mid-call on a call with a request id), failed (the owner was lost mid-call and the call had no request id: UNAVAILABLE).",
        &metrics.forwards,
    );
    register(
        r,
        LIVE_COORDINATORS,
        "Account affinity: the live coordinators of the table this one sees, itself included (0 with affinity off). Every coordinator of a table should show the same number.",
        &metrics.live_coordinators,
    );
    register(
        r,
        STORAGE_REQUESTS,
        "DynamoDB requests sent, by operation and outcome.",
        &metrics.storage_requests,
    );
    register(
        r,
        STORAGE_DURATION,
        "DynamoDB request latency (the SDK's own retries included), by operation.",
        &metrics.storage_duration,
    );
    register(
        r,
        STORAGE_RETRIES,
        "Storage requests repeated by the coordinator after UNAVAILABLE (on top of the SDK's retries).",
        &metrics.storage_retries,
    );
    register(
        r,
        MUTATIONS_IN_FLIGHT,
        "Mutations running now.",
        &metrics.mutations_in_flight,
    );
    register(
        r,
        LEASE_WAITERS,
        "Mutations waiting for a busy lease now.",
        &metrics.lease_waiters,
    );
    register(
        r,
        STORAGE_UP,
        "1 while storage answers (recent requests, or the idle probe), else 0.",
        &metrics.storage_up,
    );
    register(
        r,
        SWEEPS,
        "Sweeper runs, by outcome (done, failed, skipped: another coordinator holds the sweeper lease).",
        &metrics.sweeps,
    );
    register(
        r,
        SWEPT_LEASES,
        "Leases of dead holders released by the sweeper.",
        &metrics.swept_leases,
    );
    register(
        r,
        SWEPT_RECORDS,
        "Expired request records deleted by the sweeper.",
        &metrics.swept_records,
    );
    register(
        r,
        HOLDS,
        "Holds of reserved orders, by event: opened (ReserveOrder), fill (a fill applied), filled (the last fill), cancelled, expired (released by the sweeper).",
        &metrics.holds,
    );
    register(
        r,
        CASH_ON_HOLD,
        "Cash set aside by live holds and pending withdrawals in all accounts of the table, in cents, as of this process's last sweep (only the coordinator holding the sweeper lease sweeps: read the freshest, not the sum).",
        &metrics.cash_on_hold,
    );
    register(
        r,
        AUDITS,
        "Audits run by this process, by outcome (clean, discrepancies, failed).",
        &metrics.audits,
    );
    register(
        r,
        AUDIT_DISCREPANCIES,
        "Discrepancies the latest audit of this process found.",
        &metrics.audit_discrepancies,
    );
    register(
        r,
        ADMIN_LEASE_RELEASES,
        "Leases released by an operator (release-lease).",
        &metrics.admin_lease_releases,
    );
    // Every series of a known, bounded label set starts at zero: a rate() or an alert on it
    // works before the first event, and the scrape declares every family.
    const OPERATIONS: [&str; 5] = ["DEPOSIT", "WITHDRAWAL", "BUY", "SELL", "TRANSFER"];
    for operation in OPERATIONS {
        for outcome in ["acquired", "acquired_after_wait", "busy", "deadline", "unavailable"] {
            let _ = metrics
                .lease_acquisitions
                .get_or_create(&[("operation", operation), ("outcome", outcome)]);
        }
        let _ = metrics.commits.get_or_create(&[("operation", operation)]);
        let _ = metrics.rollbacks.get_or_create(&[("operation", operation)]);
        let _ = metrics.replays.get_or_create(&[("operation", operation)]);
    }
    for settled_as in [Settled::Applied, Settled::NotApplied, Settled::Unknown] {
        let _ = metrics
            .unclear_commits
            .get_or_create(&[("settled_as", settled_as.as_str())]);
    }
    for outcome in ["done", "failed", "skipped"] {
        let _ = metrics.sweeps.get_or_create(&[("outcome", outcome)]);
    }
    for outcome in ["clean", "discrepancies", "failed"] {
        let _ = metrics.audits.get_or_create(&[("outcome", outcome)]);
    }
    for outcome in FORWARD_OUTCOMES {
        let _ = metrics.forwards.get_or_create(&[("outcome", outcome)]);
    }
    Metrics { registry, ..metrics }
});

/// The scrape: every metric in the Prometheus text format (OpenMetrics flavour).
pub fn render() -> String {
    let mut text = String::new();
    encode(&mut text, &METRICS.registry).expect("encoding into a String cannot fail");
    text
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// One served gRPC call: `method` is the request path (`/package.Service/Method`).
pub fn rpc_served(method: &str, code: &'static str, elapsed: Duration) {
    let method = rpc_method_label(method);
    METRICS
        .rpc_requests
        .get_or_create(&[("method", method), ("code", code)])
        .inc();
    METRICS
        .rpc_duration
        .get_or_create(&[("method", method)])
        .observe(seconds(elapsed));
}

fn rpc_method_label(path: &str) -> &'static str {
    let mut known = METRICS.rpc_methods.lock().expect("rpc method set poisoned");
    if let Some(name) = known.get(path) {
        return name;
    }
    if known.len() >= RPC_METHODS_MAX {
        return "other";
    }
    // Leaked once per distinct method, at most RPC_METHODS_MAX strings for the process's life.
    let name: &'static str = Box::leak(path.to_owned().into_boxed_str());
    known.insert(name);
    name
}

/// A lease acquisition ended with `outcome` after waiting `wait` since its first write.
pub fn lease_acquired(outcome: LeaseOutcome, wait: Duration, operation: &str) {
    METRICS
        .lease_acquisitions
        .get_or_create(&[("operation", operation_label(operation)), ("outcome", outcome.as_str())])
        .inc();
    METRICS
        .lease_wait
        .get_or_create(&[("operation", operation_label(operation))])
        .observe(seconds(wait));
}

/// A lease was taken, at once or (`after_wait`) after finding it busy at least once.
pub fn lease_taken(after_wait: bool, wait: Duration, operation: &str) {
    lease_acquired(LeaseOutcome::taken(after_wait), wait, operation);
}

/// A lease held for `held` was given back (by a commit, a roll-back or a release).
pub fn lease_held(operation: &str, held: Duration) {
    METRICS
        .lease_hold
        .get_or_create(&[("operation", operation_label(operation))])
        .observe(seconds(held));
}

pub fn committed(operation: &str) {
    METRICS
        .commits
        .get_or_create(&[("operation", operation_label(operation))])
        .inc();
}

pub fn refused(operation: &str, rule: &Rejection) {
    METRICS
        .refusals
        .get_or_create(&[("operation", operation_label(operation)), ("rule", rule.rule())])
        .inc();
}

pub fn rolled_back(operation: &str) {
    METRICS
        .rollbacks
        .get_or_create(&[("operation", operation_label(operation))])
        .inc();
}

pub fn fenced() {
    METRICS.fenced_commits.inc();
}

pub fn entries_numbered(count: usize) {
    METRICS.entries_numbered.inc_by(count as u64);
}

/// A late commit's feed record written again: `written`, `late` (landed, acknowledged late
/// again), or `failed` (given up on).
pub fn feed_recorded_again(outcome: &'static str) {
    METRICS.feed_recorded_again.get_or_create(&[("outcome", outcome)]).inc();
}

/// Entries a feed stream read from the ledger to fill a gap.
pub fn feed_gap_filled(count: usize) {
    METRICS.feed_gap_filled.inc_by(count as u64);
}

/// A watch stream of `kind` opened (+1) or closed (-1).
pub fn watchers(kind: &'static str, delta: i64) {
    METRICS.watchers.get_or_create(&[("kind", kind)]).inc_by(delta);
}

/// An event of `kind` (entry, progress) sent to a watcher.
pub fn watch_event(kind: &'static str) {
    METRICS.watch_events.get_or_create(&[("type", kind)]).inc();
}

/// An entry sent to a live watcher `lag` after its commit.
pub fn watch_lag(kind: &'static str, lag: std::time::Duration) {
    METRICS
        .watch_lag
        .get_or_create(&[("kind", kind)])
        .observe(lag.as_secs_f64());
}

/// A watch stream ended by this coordinator for `reason`.
pub fn watcher_ended(reason: &'static str) {
    METRICS.watchers_ended.get_or_create(&[("reason", reason)]).inc();
}

pub fn lease_expired() {
    METRICS.lease_expiries.inc();
}

/// A stored instant lay further ahead of this clock than `CLOCK_SKEW_MAX` allows.
pub fn clock_skew_detected() {
    METRICS.clock_skew.inc();
}

pub fn unclear_commit(settled_as: Settled) {
    METRICS
        .unclear_commits
        .get_or_create(&[("settled_as", settled_as.as_str())])
        .inc();
}

/// How a batch decided on a known account (no lease) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownCommit {
    Applied,
    /// Another writer moved the version or held a lease: nothing applied, the lease path took over.
    Stale,
    /// The reply was lost: settled under the lease.
    Unknown,
}

pub fn known_account_commit(outcome: KnownCommit) {
    let label = match outcome {
        KnownCommit::Applied => "applied",
        KnownCommit::Stale => "stale",
        KnownCommit::Unknown => "unknown",
    };
    METRICS.known_account_commits.get_or_create(&[("outcome", label)]).inc();
}

/// The outcomes of `lockstep_forwards_total`, each exported from the start (at 0).
pub const FORWARD_OUTCOMES: [&str; 3] = ["forwarded", "served_here", "failed"];

/// A mutation for another coordinator's account: `outcome` as [`names::FORWARDS`] says.
pub fn forwarded(outcome: &'static str) {
    METRICS.forwards.get_or_create(&[("outcome", outcome)]).inc();
}

/// `count` holds had `event` (opened, fill, filled, cancelled, expired).
pub fn hold_event(event: &'static str, count: u64) {
    METRICS.holds.get_or_create(&[("event", event)]).inc_by(count);
}

/// The cash on hold in all accounts, as the last sweep summed it.
pub fn cash_on_hold(total: crate::core::Usd) {
    use rust_decimal::prelude::ToPrimitive;
    let cents = (total.decimal() * rust_decimal::Decimal::ONE_HUNDRED).trunc();
    METRICS.cash_on_hold.set(cents.to_i64().unwrap_or(i64::MAX));
}

/// Account affinity: how many coordinators this one sees live, itself included.
pub fn live_coordinators(count: usize) {
    METRICS.live_coordinators.set(count as i64);
}

pub fn replayed(operation: &str) {
    METRICS
        .replays
        .get_or_create(&[("operation", operation_label(operation))])
        .inc();
}

/// One storage request: `operation` is DynamoDB's action name, `outcome` from
/// [`crate::storage::outcome_label`].
pub fn storage_request(operation: &'static str, outcome: &'static str, elapsed: Duration) {
    METRICS
        .storage_requests
        .get_or_create(&[("operation", operation), ("outcome", outcome)])
        .inc();
    METRICS
        .storage_duration
        .get_or_create(&[("operation", operation)])
        .observe(seconds(elapsed));
}

pub fn storage_retried() {
    METRICS.storage_retries.inc();
}

pub fn storage_up(up: bool) {
    METRICS.storage_up.set(i64::from(up));
}

pub fn mutations_in_flight(delta: i64) {
    METRICS.mutations_in_flight.inc_by(delta);
}

pub fn waiters(delta: i64) {
    METRICS.lease_waiters.inc_by(delta);
}

/// `user` found its lease busy: counted in the bounded top-k, never as a label.
pub fn contended(user: &UserId) {
    super::contention::record(user.as_str());
}

/// A sweeper run ended: "done" with its counts, "failed", or "skipped".
pub fn swept(outcome: &'static str, released_leases: u64, deleted_records: u64) {
    METRICS.sweeps.get_or_create(&[("outcome", outcome)]).inc();
    METRICS.swept_leases.inc_by(released_leases);
    METRICS.swept_records.inc_by(deleted_records);
}

/// An audit ran in this process: `discrepancies` found, or None if it could not run.
pub fn audited(discrepancies: Option<usize>) {
    let outcome = match discrepancies {
        Some(0) => "clean",
        Some(_) => "discrepancies",
        None => "failed",
    };
    METRICS.audits.get_or_create(&[("outcome", outcome)]).inc();
    if let Some(count) = discrepancies {
        METRICS.audit_discrepancies.set(count as i64);
    }
}

pub fn admin_released_lease() {
    METRICS.admin_lease_releases.inc();
}

/// The `operation` label: the service's operation names (`Operation::name`), anything else "other".
pub fn operation_label(operation: &str) -> &'static str {
    crate::core::ops::NAMES
        .iter()
        .chain(&["BATCH"])
        .find(|name| **name == operation)
        .copied()
        .unwrap_or("other")
}

/// A lease acquisition gave up (`outcome`: busy, deadline or unavailable).
pub fn lease_gave_up(outcome: LeaseOutcome, wait: Duration, operation: &str) {
    lease_acquired(outcome, wait, operation);
}

/// Counts one running mutation while it lives (`lockstep_mutations_in_flight`).
#[derive(Debug)]
pub struct InFlight(());

impl InFlight {
    pub fn enter() -> InFlight {
        mutations_in_flight(1);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        mutations_in_flight(-1);
    }
}

/// Counts one waiter for a busy lease while it lives (`lockstep_lease_waiters`).
#[derive(Debug)]
pub struct Waiter(());

impl Waiter {
    pub fn enter() -> Waiter {
        waiters(1);
        Waiter(())
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        waiters(-1);
    }
}

/// The observer that exports every storage request as metrics (`Storage::observed_by`).
pub fn storage_observer() -> crate::storage::RequestObserver {
    storage_request
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name in `names` is in the scrape once something was recorded under it, with help
    /// and type lines, and counters keep their `_total`.
    #[test]
    fn the_scrape_names_every_metric() {
        committed("DEPOSIT");
        fenced();
        storage_request("GetItem", "ok", Duration::from_millis(3));
        let text = render();
        assert!(text.contains("lockstep_commits_total{operation=\"DEPOSIT\"}"), "{text}");
        assert!(text.contains("lockstep_fenced_commits_total "), "{text}");
        assert!(
            text.contains("lockstep_storage_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("# TYPE lockstep_lease_waiters gauge"), "{text}");
    }

    /// Method names beyond the bound fold into "other".
    #[test]
    fn rpc_method_labels_are_bounded() {
        for index in 0..RPC_METHODS_MAX + 5 {
            rpc_served(&format!("/made.up/Method{index}"), "12", Duration::ZERO);
        }
        assert!(METRICS.rpc_methods.lock().unwrap().len() <= RPC_METHODS_MAX);
        assert!(render().contains("method=\"other\""));
    }
}
