//! The command line: every flag and its default.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Load for a Lockstep coordinator over gRPC, and the design's flow on a DynamoDB endpoint as a
/// baseline. Start the coordinator first (`cargo run --release --bin coordinator`).
#[derive(Debug, Parser)]
#[command(name = "lockstep-bench", args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve dynoxide's HTTP server (DynamoDB's API) until Ctrl-C, for a coordinator started with
    /// --dynamodb-endpoint and the baseline to share.
    ServeDynoxide {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: String,
        /// SQLite file to serve; in memory without it.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Delay every chunk this many milliseconds each way (request and reply), as storage in a
        /// region is about 2.5 ms away; connections are not serialised. 0: no delay.
        #[arg(long, default_value_t = 0.0)]
        latency_ms: f64,
    },
    /// Why WatchFeed reads a journal and not DynamoDB Streams on the embedded engine: a commit's
    /// time on a dynoxide file as its stream grows, beside no stream and the journal's one more Put.
    StreamsCost {
        /// Commits written before each timed set, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0,5000,20000")]
        sizes: Vec<u64>,
        /// Commits timed at each size.
        #[arg(long, default_value_t = 200)]
        samples: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WatchKind {
    Ledger,
    Feed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// Uniform over --users users.
    Uniform,
    /// Every call on one user.
    Hot,
    /// The design's load test: one user, open loop ramping 30 → 50 calls per second.
    Design,
    /// Transfers of $1.00 between uniform random pairs of --users users (the weights are ignored).
    Transfer,
    /// Transfers of $1.00 from --users - 1 users, uniform, all to the remaining one: a hot receiver.
    HotReceiver,
    /// Issue 16's figure, two phases of --duration on one coordinator and the same --users and
    /// --callers: PlaceBuy of 0.035 SOL, then cycles of ReserveOrder (buy 2 SOL, limit 150.00),
    /// FillOrder 1 at 149.50 and FillOrder 1 at 150.00; each call reported on its own (the weights
    /// are ignored; closed loop only; Lockstep only).
    Orders,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SystemKind {
    /// The coordinator at --target.
    Lockstep,
    /// The design's lock-read-write-release flow on --dynamodb-endpoint.
    Baseline,
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// The coordinator's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub target: String,
    /// Several coordinators sharing one table, comma-separated: calls go to each in turn
    /// (round robin per call, as a balancer in front of them would spread them). Replaces
    /// --target.
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Which systems to run, one after the other, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "lockstep")]
    pub systems: Vec<SystemKind>,
    /// DynamoDB endpoint for the baseline (e.g. `lockstep-bench serve-dynoxide`'s).
    #[arg(long)]
    pub dynamodb_endpoint: Option<String>,
    /// The baseline's own table, created if missing.
    #[arg(long, default_value = "lockstep-bench-baseline")]
    pub baseline_table: String,
    #[arg(long, value_enum, default_value_t = WorkloadKind::Uniform)]
    pub workload: WorkloadKind,
    /// Users of the uniform workload.
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Closed loop: callers, each waiting for its reply before the next call.
    #[arg(long, default_value_t = 16)]
    pub callers: usize,
    /// Open loop: calls per second at fixed intended times (latency from the intended time).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: ramp linearly from --rate to this rate over the run.
    #[arg(long, requires = "rate")]
    pub rate_end: Option<f64>,
    /// Open loop: calls in flight at most; past it sending waits (and the wait is measured).
    #[arg(long, default_value_t = 10_000)]
    pub in_flight_max: usize,
    /// Seconds of load per system (the funding before it is not counted).
    #[arg(long, default_value_t = 15.0)]
    pub duration: f64,
    /// Stop after this many calls per system, if earlier than --duration.
    #[arg(long)]
    pub calls: Option<u64>,
    /// Weights of the mix: a deposit of $50.00, a withdrawal of $31.00, a buy and a sell of
    /// 0.035 SOL (about $5.08 in the default catalog).
    #[arg(long, default_value_t = 1)]
    pub deposit_weight: u32,
    #[arg(long, default_value_t = 1)]
    pub withdraw_weight: u32,
    #[arg(long, default_value_t = 1)]
    pub buy_weight: u32,
    #[arg(long, default_value_t = 0)]
    pub sell_weight: u32,
    /// Cash deposited into each user before the run: 5000.00, or 100000.00 for the orders
    /// workload, whose cycles cost $299.50 each (the coordinator's --daily-deposit-limit must
    /// allow the deposit).
    #[arg(long)]
    pub fund_usd: Option<String>,
    /// SOL bought for each user before the run when sells are in the mix.
    #[arg(long, default_value = "10")]
    pub fund_quantity: String,
    /// User ids start with this; a fresh random prefix per run by default.
    #[arg(long)]
    pub user_prefix: Option<String>,
    /// Deadline of each call, milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// The coordinator's Prometheus endpoint (e.g. http://127.0.0.1:9464/metrics), scraped before
    /// and after the run for storage requests per operation.
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Open this many WatchLedger streams on the run's users (in turn) at the first coordinator
    /// during the load, and report the feed lag of the entries they receive.
    #[arg(long, default_value_t = 0)]
    pub watchers: usize,
    /// What the --watchers streams are: WatchLedger on the run's users, or WatchFeed (every
    /// account, from the moment each opens).
    #[arg(long, value_enum, default_value_t = WatchKind::Ledger)]
    pub watch: WatchKind,
    /// Print one JSON object with every figure instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG plot of the latency percentiles here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// No progress bar (it is off anyway when stdout is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Seed of the user and operation choices; random by default.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Cash deposited into each user by default: thousands of the default mix's calls.
pub const FUND_USD_DEFAULT: &str = "5000.00";
/// The orders workload's: some 330 cycles per user, so that reserves do not run out of cash in a
/// run of tens of seconds at hundreds of cycles per second over 100 users.
pub const ORDERS_FUND_USD_DEFAULT: &str = "100000.00";

impl Settings {
    /// --fund-usd, or the workload's default.
    pub fn fund_usd(&self) -> String {
        let default = match self.workload {
            WorkloadKind::Orders => ORDERS_FUND_USD_DEFAULT,
            _ => FUND_USD_DEFAULT,
        };
        self.fund_usd.clone().unwrap_or_else(|| default.to_owned())
    }

    /// The coordinators to call: --targets, or else --target.
    pub fn addresses(&self) -> Vec<String> {
        if self.targets.is_empty() {
            vec![self.target.clone()]
        } else {
            self.targets.clone()
        }
    }
}
