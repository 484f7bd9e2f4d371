//! The figures of a run: for people (text), for machines (one JSON object), and as an SVG plot of
//! the latency percentiles.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::load::Tally;
use crate::orders::StepTallies;

/// The percentiles printed for every run.
pub const PERCENTILES: [(&str, f64); 4] = [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9)];

/// Storage requests, when they could be counted.
#[derive(Debug, Clone, PartialEq)]
pub enum StorageRequests {
    Counted { total: f64, source: &'static str },
    NotCounted { reason: String },
}

/// One system's run.
#[derive(Debug, Clone)]
pub struct SystemReport {
    /// `lockstep` or `baseline`.
    pub system: &'static str,
    /// The coordinator's URL or the DynamoDB endpoint.
    pub address: String,
    pub tally: Tally,
    pub storage_requests: StorageRequests,
    /// With `--watchers`: what the WatchLedger streams received during the run.
    pub feed: Option<crate::feed::FeedFigures>,
}

fn milliseconds(microseconds: u64) -> f64 {
    microseconds as f64 / 1000.0
}

impl SystemReport {
    pub fn ok_per_second(&self) -> f64 {
        self.tally.ok_per_second()
    }

    pub fn percentile_ms(&self, percentile: f64) -> f64 {
        self.tally.percentile_ms(percentile)
    }

    /// Storage requests per call and per successful call.
    pub fn storage_per_operation(&self) -> Option<(f64, f64)> {
        match self.storage_requests {
            StorageRequests::Counted { total, .. } => {
                let per = |count: u64| if count > 0 { total / count as f64 } else { 0.0 };
                Some((per(self.tally.calls()), per(self.tally.ok())))
            }
            StorageRequests::NotCounted { .. } => None,
        }
    }

    pub fn text(&self) -> String {
        let mut text = String::new();
        let tally = &self.tally;
        let _ = writeln!(text, "{} ({})", self.system, self.address);
        let _ = writeln!(
            text,
            "  calls: {} in {:.2} s, ok: {}, ok/s: {:.1}",
            tally.calls(),
            tally.elapsed.as_secs_f64(),
            tally.ok(),
            self.ok_per_second()
        );
        let outcomes: Vec<String> = tally
            .outcomes
            .iter()
            .map(|(code, count)| format!("{code} {count}"))
            .collect();
        let _ = writeln!(text, "  outcomes: {}", outcomes.join(", "));
        let operations: Vec<String> = tally
            .operations
            .iter()
            .map(|(name, count)| format!("{name} {count}"))
            .collect();
        let _ = writeln!(text, "  operations sent: {}", operations.join(", "));
        let latencies: Vec<String> = PERCENTILES
            .iter()
            .map(|(name, percentile)| format!("{} {:.2}", name.replace('_', "."), self.percentile_ms(*percentile)))
            .collect();
        let _ = writeln!(
            text,
            "  latency ms: {}, max {:.2}",
            latencies.join(", "),
            milliseconds(tally.latency.max())
        );
        match &self.storage_requests {
            StorageRequests::Counted { total, source } => {
                let (per_call, per_ok) = self.storage_per_operation().unwrap_or_default();
                let _ = writeln!(
                    text,
                    "  storage requests per op: {per_call:.2} ({per_ok:.2} per ok op; {total} in all, {source})"
                );
            }
            StorageRequests::NotCounted { reason } => {
                let _ = writeln!(text, "  storage requests per op: n/a ({reason})");
            }
        }
        if let Some(feed) = &self.feed {
            let _ = writeln!(
                text,
                "  feed: {} watchers, {} entries received, lag ms: p50 {:.1}, p99 {:.1}, max {:.1}; {} streams failed",
                feed.watchers,
                feed.entries,
                milliseconds(feed.lag.value_at_percentile(50.0)),
                milliseconds(feed.lag.value_at_percentile(99.0)),
                milliseconds(feed.lag.max()),
                feed.failed
            );
        }
        text
    }

    pub fn json(&self) -> Value {
        let tally = &self.tally;
        let latency = latency_json(tally);
        let storage = match (&self.storage_requests, self.storage_per_operation()) {
            (StorageRequests::Counted { total, source }, Some((per_call, per_ok))) => json!({
                "total": total,
                "per_operation": per_call,
                "per_ok_operation": per_ok,
                "source": source,
            }),
            (StorageRequests::NotCounted { reason }, _) => json!({ "not_counted": reason }),
            (StorageRequests::Counted { .. }, None) => Value::Null,
        };
        json!({
            "system": self.system,
            "address": self.address,
            "calls": tally.calls(),
            "ok": tally.ok(),
            "elapsed_seconds": tally.elapsed.as_secs_f64(),
            "ok_per_second": self.ok_per_second(),
            "outcomes": tally.outcomes,
            "operations": tally.operations,
            "latency_ms": latency,
            "storage_requests": storage,
            "feed": self.feed.as_ref().map(|feed| json!({
                "watchers": feed.watchers,
                "entries": feed.entries,
                "lag_ms": {
                    "p50": milliseconds(feed.lag.value_at_percentile(50.0)),
                    "p99": milliseconds(feed.lag.value_at_percentile(99.0)),
                    "max": milliseconds(feed.lag.max()),
                },
                "failed_streams": feed.failed,
            })),
        })
    }
}

/// A tally's latency figures in milliseconds: [`PERCENTILES`], mean and max.
fn latency_json(tally: &Tally) -> Value {
    let mut latency = serde_json::Map::new();
    for (name, percentile) in PERCENTILES {
        latency.insert(name.to_owned(), json!(tally.percentile_ms(percentile)));
    }
    latency.insert("mean".to_owned(), json!(tally.latency.mean() / 1000.0));
    latency.insert("max".to_owned(), json!(milliseconds(tally.latency.max())));
    Value::Object(latency)
}

/// One call's figures within a phase, for the JSON of the orders workload.
fn call_json(tally: &Tally) -> Value {
    json!({
        "calls": tally.calls(),
        "ok": tally.ok(),
        "elapsed_seconds": tally.elapsed.as_secs_f64(),
        "ok_per_second": tally.ok_per_second(),
        "outcomes": tally.outcomes,
        "latency_ms": latency_json(tally),
    })
}

/// The orders workload's run on one coordinator: PlaceBuy's phase, then the cycles' phase.
#[derive(Debug, Clone)]
pub struct OrdersReport {
    /// The coordinator's URL (or URLs, comma-separated).
    pub address: String,
    /// Every call of the first phase: a PlaceBuy of 0.035 SOL.
    pub place_buy: Tally,
    /// The second phase, by call of the cycle.
    pub cycles: StepTallies,
}

/// Issue 16's bound, from one run: a fill's p99 against PlaceBuy's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FillBound {
    pub fill_p99_ms: f64,
    pub place_buy_p99_ms: f64,
}

impl FillBound {
    /// Fill p99 over PlaceBuy p99: at most 1 meets the bound.
    pub fn ratio(&self) -> f64 {
        self.fill_p99_ms / self.place_buy_p99_ms
    }

    pub fn met(&self) -> bool {
        self.fill_p99_ms <= self.place_buy_p99_ms
    }
}

impl OrdersReport {
    /// The table's rows: phase, the call as the API names it, its JSON key, its tally.
    fn rows(&self) -> [(&'static str, &'static str, &'static str, &Tally); 4] {
        [
            ("place-buy", "PlaceBuy", "place_buy", &self.place_buy),
            ("orders", "ReserveOrder", "reserve", &self.cycles.reserve),
            ("orders", "FillOrder", "fill", &self.cycles.fill),
            ("orders", "CancelOrder", "cancel", &self.cycles.cancel),
        ]
    }

    /// The bound's figures, when both phases had replies.
    pub fn fill_bound(&self) -> Option<FillBound> {
        (self.cycles.fill.calls() > 0 && self.place_buy.calls() > 0).then(|| FillBound {
            fill_p99_ms: self.cycles.fill.percentile_ms(99.0),
            place_buy_p99_ms: self.place_buy.percentile_ms(99.0),
        })
    }

    pub fn text(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(text, "lockstep ({})", self.address);
        let _ = writeln!(
            text,
            "  {:<10} {:<13} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  outcomes",
            "phase", "call", "calls", "ok", "ok/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        for (phase, call, _, tally) in self.rows() {
            // A cancel follows only a failed fill: its row would be empty in a clean run.
            if call == "CancelOrder" && tally.calls() == 0 {
                continue;
            }
            let outcomes: Vec<String> = tally
                .outcomes
                .iter()
                .map(|(code, count)| format!("{code} {count}"))
                .collect();
            let _ = writeln!(
                text,
                "  {phase:<10} {call:<13} {:>8} {:>8} {:>8.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {}",
                tally.calls(),
                tally.ok(),
                tally.ok_per_second(),
                tally.percentile_ms(50.0),
                tally.percentile_ms(90.0),
                tally.percentile_ms(99.0),
                tally.percentile_ms(99.9),
                milliseconds(tally.latency.max()),
                outcomes.join(", ")
            );
        }
        let _ = writeln!(
            text,
            "  cycles completed (reserve and both fills OK): {} in {:.2} s, {:.1}/s; PlaceBuy phase {:.2} s",
            self.cycles.completed,
            self.cycles.reserve.elapsed.as_secs_f64(),
            self.cycles.completed_per_second(),
            self.place_buy.elapsed.as_secs_f64()
        );
        match self.fill_bound() {
            Some(bound) => {
                let _ = writeln!(
                    text,
                    "  FillOrder p99 {:.2} ms vs PlaceBuy p99 {:.2} ms: {:.2} x; issue 16's bound (no worse than PlaceBuy's): {}",
                    bound.fill_p99_ms,
                    bound.place_buy_p99_ms,
                    bound.ratio(),
                    if bound.met() { "met" } else { "not met" }
                );
            }
            None => {
                let _ = writeln!(text, "  FillOrder p99 vs PlaceBuy p99: n/a (a phase had no replies)");
            }
        }
        text
    }

    pub fn json(&self) -> Value {
        let mut by_call = serde_json::Map::new();
        for (_, _, key, tally) in self.rows() {
            by_call.insert(key.to_owned(), call_json(tally));
        }
        json!({
            "system": "lockstep",
            "address": self.address,
            "by_call": by_call,
            "cycles_completed": self.cycles.completed,
            "cycles_completed_per_second": self.cycles.completed_per_second(),
            "fill_p99_vs_place_buy_p99": self.fill_bound().map(|bound| json!({
                "fill_p99_ms": bound.fill_p99_ms,
                "place_buy_p99_ms": bound.place_buy_p99_ms,
                "ratio": bound.ratio(),
                "bound_met": bound.met(),
            })),
        })
    }
}

/// Percentile plot, HdrHistogram style: x is "nines" (0 = p0, 1 = p90, 2 = p99, 3 = p99.9,
/// 4 = p99.99), y is latency in milliseconds; one line per system.
pub fn svg(reports: &[SystemReport], title: &str) -> String {
    const WIDTH: f64 = 720.0;
    const HEIGHT: f64 = 420.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 50.0;
    const NINES_MAX: f64 = 4.0;
    const STEPS_PER_NINE: u32 = 20;
    const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let series: Vec<Vec<(f64, f64)>> = reports
        .iter()
        .map(|report| {
            (0..=(NINES_MAX as u32 * STEPS_PER_NINE))
                .map(|step| {
                    let nines = f64::from(step) / f64::from(STEPS_PER_NINE);
                    let percentile = 100.0 * (1.0 - 10f64.powf(-nines));
                    (nines, report.percentile_ms(percentile))
                })
                .collect()
        })
        .collect();
    let y_max = series
        .iter()
        .flatten()
        .map(|&(_, latency)| latency)
        .fold(0.0_f64, f64::max)
        .max(0.001)
        * 1.05;
    let x = |nines: f64| LEFT + plot_width * nines / NINES_MAX;
    let y = |latency: f64| TOP + plot_height * (1.0 - latency / y_max);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    for (nines, label) in [(0.0, "0%"), (1.0, "90%"), (2.0, "99%"), (3.0, "99.9%"), (4.0, "99.99%")] {
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{1:.1}" stroke="#ddd"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{label}</text>"##,
            x(nines),
            TOP + plot_height,
            TOP + plot_height + 18.0
        );
    }
    for tick in 0..=5 {
        let latency = y_max * f64::from(tick) / 5.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{latency:.1}</text>"##,
            y(latency),
            LEFT + plot_width,
            LEFT - 6.0,
            y(latency) + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + plot_width / 2.0,
        HEIGHT - 8.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{0:.1}" text-anchor="middle" transform="rotate(-90 16 {0:.1})">latency (ms)</text>"#,
        TOP + plot_height / 2.0
    );
    for (index, (report, points)) in reports.iter().zip(&series).enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let points: Vec<String> = points
            .iter()
            .map(|&(nines, latency)| format!("{:.1},{:.1}", x(nines), y(latency)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let legend_y = TOP + 16.0 * index as f64 + 10.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="{colour}" stroke-width="2"/><text x="{3:.1}" y="{4:.1}">{5} ({6:.1} ok/s)</text>"#,
            LEFT + 10.0,
            legend_y,
            LEFT + 30.0,
            LEFT + 36.0,
            legend_y + 4.0,
            escape(report.system),
            report.ok_per_second()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
