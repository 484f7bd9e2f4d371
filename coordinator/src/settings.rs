//! Settings: command-line flags, each with an environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::core::limits::{DAILY_DEPOSIT_USD_DEFAULT, DAILY_TRANSFER_USD_DEFAULT, DAILY_WITHDRAWAL_USD_DEFAULT};
use crate::core::money::{ORDER_VALUE_USD_MAX, ORDER_VALUE_USD_MIN};
use crate::core::records::LEASE_DURATION_MAX;
use crate::core::{FieldError, Limits, Usd};
use crate::service::{
    CoordinatorConfig, LEASE_DEPOSIT, LEASE_TRADE, LEASE_WAIT_MAX, LEASE_WITHDRAW, REQUEST_RETENTION,
};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Lockstep: a gRPC transaction coordinator with fenced per-user leases on DynamoDB"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Create the table on the configured storage, then exit.
    CreateTables,
    /// Check the books: cash and holdings against the ledger, orders against ledger entries,
    /// stale leases. Prints a report; exits non-zero on any discrepancy. With --server, the
    /// running coordinator audits (the embedded engine's file belongs to it); without, storage
    /// is opened here (on the embedded engine, only while the coordinator is stopped).
    Audit {
        /// How long after its expiry an unreleased lease counts as stale, in seconds.
        #[arg(long, default_value_t = crate::audit::LEASE_MARGIN_DEFAULT.as_secs())]
        lease_margin_secs: u64,
        /// A running coordinator's URL, e.g. http://127.0.0.1:50051.
        #[arg(long)]
        server: Option<String>,
    },
    /// Read a bearer token on stdin and print its SHA-256 in hex, the form --auth-file holds.
    HashToken,
    /// Show a user's account, holdings, today's limits, lease and last ledger entries.
    Inspect {
        user: String,
        /// Ledger entries to show, newest first.
        #[arg(long, default_value_t = INSPECT_ENTRIES_DEFAULT)]
        entries: u32,
        /// A running coordinator's URL, e.g. http://127.0.0.1:50051.
        #[arg(long)]
        server: Option<String>,
    },
    /// Release a user's lease whose holder is gone (fenced: bumps the version, so nothing
    /// decided under it can commit). Logged and counted.
    ReleaseLease {
        user: String,
        /// Release only this lease (as `inspect` shows it).
        #[arg(long)]
        lock_id: Option<String>,
        /// Confirm: a live holder's commit will be refused.
        #[arg(long)]
        yes: bool,
        /// A running coordinator's URL, e.g. http://127.0.0.1:50051.
        #[arg(long)]
        server: Option<String>,
    },
    /// Write a consistent copy of the embedded store to PATH (a new file). With --server, the
    /// running coordinator writes it on its host, online.
    Backup {
        path: PathBuf,
        /// A running coordinator's URL, e.g. http://127.0.0.1:50051.
        #[arg(long)]
        server: Option<String>,
    },
    /// Replace the embedded store under --data-dir with the backup at PATH. Stop the
    /// coordinator first.
    Restore { path: PathBuf },
    /// Follow the ledger on a running coordinator: one account's with --user (WatchLedger),
    /// every account's without (WatchFeed). One JSON object per line, for jq: each entry, then
    /// each new one as it commits, and `{"progress": …}` on an idle stream. Ends (exit 1) when
    /// the stream does, printing the cursor to resume from.
    Watch {
        /// The account to follow (WatchLedger); without it, every account (WatchFeed).
        #[arg(long)]
        user: Option<String>,
        /// Resume after this: a sequence with --user (0: from the first entry), else a feed
        /// cursor as printed (empty: from the oldest entry the feed keeps).
        #[arg(long, default_value = "")]
        from: String,
        /// Feed only: start with the commits from now on.
        #[arg(long, conflicts_with_all = ["from", "user"])]
        from_now: bool,
        /// Feed only: entries of this kind (DEPOSIT, WITHDRAWAL, BUY, SELL, TRANSFER_OUT,
        /// TRANSFER_IN); repeat for several. Default: every kind.
        #[arg(long = "kind", conflicts_with = "user")]
        kinds: Vec<String>,
        /// Feed only: accounts whose id starts with this.
        #[arg(long, default_value = "", conflicts_with = "user")]
        user_prefix: String,
        /// A running coordinator's URL, e.g. http://127.0.0.1:50051.
        #[arg(long)]
        server: String,
        /// A file holding a bearer token (reader or trader role) when authentication is on.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// The users whose lease was most often found busy, from the running coordinator.
    ContendedUsers {
        #[arg(long, default_value_t = CONTENDED_USERS_DEFAULT)]
        limit: u32,
        /// A running coordinator's URL, e.g. http://127.0.0.1:50051.
        #[arg(long)]
        server: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatFlag {
    Text,
    Json,
}

impl From<LogFormatFlag> for lockstep::process::LogFormat {
    fn from(flag: LogFormatFlag) -> Self {
        match flag {
            LogFormatFlag::Text => lockstep::process::LogFormat::Text,
            LogFormatFlag::Json => lockstep::process::LogFormat::Json,
        }
    }
}

/// The longest `--lock-wait-ms`: a caller waiting longer for one account is better told to retry.
pub const LEASE_WAIT_LIMIT: Duration = Duration::from_secs(60);
/// The longest `--request-retention-hours`: 30 days.
pub const REQUEST_RETENTION_HOURS_MAX: u64 = 30 * 24;
const _: () = assert!(REQUEST_RETENTION_HOURS_MAX * 3600 == crate::storage::model::REQUEST_RETENTION_MAX.as_secs());
/// The longest `--sweep-interval-secs`: one day.
pub const SWEEP_INTERVAL_SECS_MAX: u64 = 24 * 3600;
/// The longest `--drain-ms`: ten minutes.
pub const DRAIN_MS_MAX: u64 = 600_000;
/// The largest `--max-inflight` and `--max-queued-per-user`.
pub const INFLIGHT_LIMIT: usize = 1_000_000;

/// Whether batch commits of several users may share one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupCommitFlag {
    /// On for the embedded engine (where each transaction pays an fsync behind one lock), off
    /// for an endpoint (where a larger transaction only conflicts more; see docs/engines.md).
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StorageKind {
    /// dynoxide in-process on a SQLite file under --data-dir: no setup, durable.
    Embedded,
    /// aws-sdk-dynamodb: AWS DynamoDB, or any compatible server with --dynamodb-endpoint.
    Dynamodb,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Address to serve gRPC on.
    #[arg(long, env = "LOCKSTEP_LISTEN", default_value = "127.0.0.1:50051", global = true)]
    pub listen: SocketAddr,
    /// Storage engine. Giving --dynamodb-endpoint implies dynamodb.
    #[arg(long, env = "LOCKSTEP_STORAGE", value_enum, default_value_t = StorageKind::Embedded, global = true)]
    pub storage: StorageKind,
    /// Directory of the embedded engine's database file.
    #[arg(long, env = "LOCKSTEP_DATA_DIR", default_value = "lockstep-data", global = true)]
    pub data_dir: PathBuf,
    /// DynamoDB-compatible endpoint URL, e.g. http://127.0.0.1:8000.
    #[arg(long, env = "LOCKSTEP_DYNAMODB_ENDPOINT", global = true)]
    pub dynamodb_endpoint: Option<String>,
    /// AWS region (otherwise the SDK's AWS_REGION / profile chain).
    #[arg(long, env = "LOCKSTEP_REGION", global = true)]
    pub region: Option<String>,
    /// Name of the DynamoDB table.
    #[arg(long, env = "LOCKSTEP_TABLE", default_value = "lockstep", global = true)]
    pub table: String,
    /// Asset catalog to seed on first start (JSON list of {symbol, price, active}); the
    /// built-in coordinator/catalog.json when absent.
    #[arg(long, env = "LOCKSTEP_CATALOG", global = true)]
    pub catalog: Option<PathBuf>,
    /// Lease of a deposit, in milliseconds.
    #[arg(long, env = "LOCKSTEP_LEASE_DEPOSIT_MS", default_value_t = LEASE_DEPOSIT.as_millis() as u64, global = true)]
    pub lease_deposit_ms: u64,
    /// Lease of a withdrawal, in milliseconds.
    #[arg(long, env = "LOCKSTEP_LEASE_WITHDRAW_MS", default_value_t = LEASE_WITHDRAW.as_millis() as u64, global = true)]
    pub lease_withdraw_ms: u64,
    /// Lease of a buy or sell, in milliseconds.
    #[arg(long, env = "LOCKSTEP_LEASE_TRADE_MS", default_value_t = LEASE_TRADE.as_millis() as u64, global = true)]
    pub lease_trade_ms: u64,
    /// Longest wait for a busy lease before ABORTED, in milliseconds.
    #[arg(long, env = "LOCKSTEP_LOCK_WAIT_MS", default_value_t = LEASE_WAIT_MAX.as_millis() as u64, global = true)]
    pub lock_wait_ms: u64,
    /// Deposits per user per UTC day, USD.
    #[arg(
        long,
        env = "LOCKSTEP_DAILY_DEPOSIT_LIMIT",
        default_value_t = Usd::from_decimal(DAILY_DEPOSIT_USD_DEFAULT).to_string(),
        global = true
    )]
    pub daily_deposit_limit: String,
    /// Withdrawals per user per UTC day, USD.
    #[arg(
        long,
        env = "LOCKSTEP_DAILY_WITHDRAWAL_LIMIT",
        default_value_t = Usd::from_decimal(DAILY_WITHDRAWAL_USD_DEFAULT).to_string(),
        global = true
    )]
    pub daily_withdrawal_limit: String,
    /// Transfers a user sends per UTC day, USD (counted on the sender).
    #[arg(
        long,
        env = "LOCKSTEP_DAILY_TRANSFER_LIMIT",
        default_value_t = Usd::from_decimal(DAILY_TRANSFER_USD_DEFAULT).to_string(),
        global = true
    )]
    pub daily_transfer_limit: String,
    /// Smallest total of one buy or sell, USD, after rounding (costs round up to the cent,
    /// proceeds down); smaller orders are refused. At least 0.01.
    #[arg(
        long,
        env = "LOCKSTEP_MIN_ORDER_VALUE",
        default_value_t = Usd::from_decimal(ORDER_VALUE_USD_MIN).to_string(),
        global = true
    )]
    pub min_order_value: String,
    /// Name of this coordinator instance, recorded on its leases (a random one by default).
    #[arg(long, env = "LOCKSTEP_INSTANCE", global = true)]
    pub instance: Option<String>,
    /// How long a request id's outcome is kept for retries, in hours.
    #[arg(long, env = "LOCKSTEP_REQUEST_RETENTION_HOURS", default_value_t = REQUEST_RETENTION.as_secs() / 3600, global = true)]
    pub request_retention_hours: u64,
    /// How often to release leases left by dead holders and delete expired request records, in
    /// seconds; 0 turns the sweeper off (on DynamoDB, TTL then deletes the records).
    #[arg(long, env = "LOCKSTEP_SWEEP_INTERVAL_SECS", default_value_t = 300, global = true)]
    pub sweep_interval_secs: u64,
    #[cfg(feature = "fault-injection")]
    /// Testing only: inject storage faults (lost requests, lost replies, slow replies) at this
    /// rate, 0.0-1.0, to prove the coordinator's recovery (the bank test uses it).
    #[arg(long, env = "LOCKSTEP_INJECT_FAULTS", default_value_t = 0.0, global = true)]
    pub inject_faults: f64,
    #[cfg(feature = "fault-injection")]
    /// Seed of the injected faults.
    #[arg(long, env = "LOCKSTEP_INJECT_FAULTS_SEED", default_value_t = 0, global = true)]
    pub inject_faults_seed: u64,
    /// Mutations in flight (queued or being decided) in this coordinator past which new ones get
    /// RESOURCE_EXHAUSTED at once, nothing written.
    #[arg(long, env = "LOCKSTEP_MAX_INFLIGHT", default_value_t = crate::service::INFLIGHT_MAX_DEFAULT, global = true)]
    pub max_inflight: usize,
    /// Calls queued for one user in this coordinator past which its next ones get
    /// RESOURCE_EXHAUSTED at once, nothing written.
    #[arg(long, env = "LOCKSTEP_MAX_QUEUED_PER_USER", default_value_t = crate::service::QUEUED_PER_USER_MAX_DEFAULT, global = true)]
    pub max_queued_per_user: usize,
    /// Commit straight away, without taking the lease, on an account as this coordinator last
    /// left it, conditioned on its version (one storage request instead of two); another
    /// writer makes that condition fail and the batch then takes the lease. `false`: every
    /// batch takes the lease first.
    #[arg(long, env = "LOCKSTEP_KNOWN_ACCOUNTS", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub known_accounts: bool,
    /// Open WatchLedger streams past which new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "LOCKSTEP_MAX_WATCHERS", default_value_t = crate::service::WATCHERS_MAX_DEFAULT, global = true)]
    pub max_watchers: usize,
    /// How often a WatchLedger stream reads storage for entries committed by other
    /// coordinators, in milliseconds (this coordinator's own commits reach it at once).
    #[arg(long, env = "LOCKSTEP_WATCH_POLL_MS", default_value_t = crate::service::WATCH_POLL_DEFAULT.as_millis() as u64, global = true)]
    pub watch_poll_ms: u64,
    /// Longest silence on a WatchLedger stream before a progress message, in milliseconds
    /// (at most 10000).
    #[arg(long, env = "LOCKSTEP_WATCH_PROGRESS_MS", default_value_t = crate::service::WATCH_PROGRESS_DEFAULT.as_millis() as u64, global = true)]
    pub watch_progress_ms: u64,
    /// WatchFeed sends a commit once it is this old, in milliseconds, and a commit acknowledged
    /// later than half of it after its time is written to the feed again: the coordinators'
    /// clocks must agree within half of it (docs/feed.md).
    #[arg(long, env = "LOCKSTEP_FEED_HORIZON_MS", default_value_t = crate::service::feed::FEED_HORIZON_DEFAULT.as_millis() as u64, global = true)]
    pub feed_horizon_ms: u64,
    /// How often a caught-up WatchFeed stream reads the feed's journal again, in milliseconds.
    #[arg(long, env = "LOCKSTEP_FEED_POLL_MS", default_value_t = crate::service::feed::FEED_POLL_DEFAULT.as_millis() as u64, global = true)]
    pub feed_poll_ms: u64,
    /// Group commit: batch commits of several users sent as one transaction.
    #[arg(long, env = "LOCKSTEP_GROUP_COMMIT", value_enum, default_value_t = GroupCommitFlag::Auto, global = true)]
    pub group_commit: GroupCommitFlag,
    /// Address to serve grpc.health.v1 alone on, in plain text and without authentication, for
    /// probes that cannot speak TLS or send a token (Kubernetes' gRPC probe), e.g. 0.0.0.0:50052;
    /// off unless given. Health is always open; nothing else is served there.
    #[arg(long, env = "LOCKSTEP_HEALTH_LISTEN", global = true)]
    pub health_listen: Option<SocketAddr>,
    /// Address to serve Prometheus metrics on (`GET /metrics`), e.g. 127.0.0.1:9464; off
    /// unless given.
    #[arg(long, env = "LOCKSTEP_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,
    /// Export spans over OTLP/HTTP to this collector URL (e.g. http://127.0.0.1:4318; posts to
    /// /v1/traces). Only in builds with the `otlp` feature.
    #[cfg(feature = "otlp")]
    #[arg(long, env = "LOCKSTEP_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// Log lines as text (for people) or json (one object per line, for log pipelines).
    #[arg(long, env = "LOCKSTEP_LOG_FORMAT", value_enum, default_value_t = LogFormatFlag::Text, global = true)]
    pub log_format: LogFormatFlag,
    /// Longest wait for in-flight RPCs at shutdown, in milliseconds.
    #[arg(long, env = "LOCKSTEP_DRAIN_MS", default_value_t = 10_000, global = true)]
    pub drain_ms: u64,
    /// Serve TLS with this certificate chain (PEM); with --tls-key.
    #[arg(long, env = "LOCKSTEP_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "LOCKSTEP_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM); the principal is the certificate's
    /// CN (or first SAN), and its roles come from --auth-file.
    #[arg(long, env = "LOCKSTEP_TLS_CLIENT_CA", global = true)]
    pub tls_client_ca: Option<PathBuf>,
    /// Principals, their roles and the SHA-256 of their bearer token (`coordinator hash-token`),
    /// one a line: `name roles sha256`. Reloaded on SIGHUP.
    #[arg(long, env = "LOCKSTEP_AUTH_FILE", global = true)]
    pub auth_file: Option<PathBuf>,
    /// Account affinity (docs/scale-out.md): the address the other coordinators of the table
    /// dial to reach this one (`http://host:port` or `https://host:port`; in Kubernetes the pod's
    /// name through the headless Service). With it, each account's mutations are served by one
    /// owner among the live coordinators, and forwarded there by the others.
    #[arg(long, env = "LOCKSTEP_ADVERTISE_ADDRESS", global = true)]
    pub advertise_address: Option<String>,
    /// A file holding the bearer token this coordinator sends to its peers when forwarding; its
    /// line in the peers' --auth-file has the `peer` role.
    #[arg(long, env = "LOCKSTEP_PEER_TOKEN_FILE", global = true)]
    pub peer_token_file: Option<PathBuf>,
    /// The CA (PEM) that the peers' server certificates chain to, for an https:// address. With
    /// --tls-client-ca, this coordinator presents its own --tls-cert to its peers.
    #[arg(long, env = "LOCKSTEP_PEER_CA", global = true)]
    pub peer_ca: Option<PathBuf>,
    /// Serve on a non-loopback address without TLS and authentication. Never in production.
    #[arg(long, env = "LOCKSTEP_INSECURE", global = true)]
    pub insecure: bool,
    /// Largest change of an asset's price in one UpsertAsset, in percent of the old price;
    /// beyond it the call needs `force`.
    #[arg(long, env = "LOCKSTEP_PRICE_CHANGE_MAX_PERCENT", default_value_t = PRICE_CHANGE_MAX_PERCENT_DEFAULT, global = true)]
    pub price_change_max_percent: u32,
}

pub use crate::core::asset_change::PRICE_CHANGE_MAX_PERCENT_DEFAULT;

/// Ledger entries `inspect` shows by default.
pub const INSPECT_ENTRIES_DEFAULT: u32 = 5;
/// Contended users listed by default.
pub const CONTENDED_USERS_DEFAULT: u32 = 10;

impl Settings {
    pub fn storage_kind(&self) -> StorageKind {
        if self.dynamodb_endpoint.is_some() {
            StorageKind::Dynamodb
        } else {
            self.storage
        }
    }

    pub fn coordinator_config(&self) -> Result<CoordinatorConfig, FieldError> {
        self.check_bounds()?;
        Ok(CoordinatorConfig {
            owner: self
                .instance
                .clone()
                .unwrap_or_else(|| CoordinatorConfig::default().owner),
            named_instance: self.instance.is_some(),
            lease_deposit: Duration::from_millis(self.lease_deposit_ms),
            lease_withdraw: Duration::from_millis(self.lease_withdraw_ms),
            lease_trade: Duration::from_millis(self.lease_trade_ms),
            lease_wait_max: Duration::from_millis(self.lock_wait_ms),
            limits: Limits {
                daily_deposit: Usd::parse_amount("--daily-deposit-limit", &self.daily_deposit_limit)?,
                daily_withdrawal: Usd::parse_amount("--daily-withdrawal-limit", &self.daily_withdrawal_limit)?,
                daily_transfer: Usd::parse_amount("--daily-transfer-limit", &self.daily_transfer_limit)?,
                order_value_min: self.order_value_min()?,
            },
            request_retention: Duration::from_secs(self.request_retention_hours.saturating_mul(3600)),
            before_commit: None,
            sweep_interval: (self.sweep_interval_secs > 0).then(|| Duration::from_secs(self.sweep_interval_secs)),
            max_inflight: self.max_inflight,
            max_queued_per_user: self.max_queued_per_user,
            price_change_max_percent: self.price_change_max_percent,
            known_accounts: self.known_accounts,
            max_watchers: self.max_watchers,
            watch_poll: Duration::from_millis(self.watch_poll_ms),
            watch_progress: Duration::from_millis(self.watch_progress_ms),
            watch_send_stall: crate::service::WATCH_SEND_STALL_MAX,
            feed_horizon: Duration::from_millis(self.feed_horizon_ms),
            feed_poll: Duration::from_millis(self.feed_poll_ms),
        })
    }

    /// Every duration and count within a bound, so none can overflow a deadline, an `Instant`
    /// or a stored expiry, or make a bound that never holds: refused at start, naming the flag.
    fn check_bounds(&self) -> Result<(), FieldError> {
        // Each stream holds a task, a buffer of `WATCH_BUFFER` events and at most a page.
        const WATCHERS_LIMIT: u64 = 100_000;
        let lease_max = LEASE_DURATION_MAX.as_millis() as u64;
        let bounds: [(&'static str, u64, u64, u64); 14] = [
            ("--lease-deposit-ms", self.lease_deposit_ms, 1000, lease_max),
            ("--lease-withdraw-ms", self.lease_withdraw_ms, 1000, lease_max),
            ("--lease-trade-ms", self.lease_trade_ms, 1000, lease_max),
            (
                "--lock-wait-ms",
                self.lock_wait_ms,
                0,
                LEASE_WAIT_LIMIT.as_millis() as u64,
            ),
            (
                "--request-retention-hours",
                self.request_retention_hours,
                1,
                REQUEST_RETENTION_HOURS_MAX,
            ),
            (
                "--sweep-interval-secs",
                self.sweep_interval_secs,
                0,
                SWEEP_INTERVAL_SECS_MAX,
            ),
            ("--drain-ms", self.drain_ms, 0, DRAIN_MS_MAX),
            ("--max-inflight", self.max_inflight as u64, 1, INFLIGHT_LIMIT as u64),
            (
                "--max-queued-per-user",
                self.max_queued_per_user as u64,
                1,
                INFLIGHT_LIMIT as u64,
            ),
            ("--max-watchers", self.max_watchers as u64, 0, WATCHERS_LIMIT),
            ("--watch-poll-ms", self.watch_poll_ms, 10, 60_000),
            ("--watch-progress-ms", self.watch_progress_ms, 100, 10_000),
            ("--feed-horizon-ms", self.feed_horizon_ms, 20, 60_000),
            ("--feed-poll-ms", self.feed_poll_ms, 10, 60_000),
        ];
        for (flag, value, minimum, maximum) in bounds {
            if value < minimum || value > maximum {
                return Err(FieldError::new(
                    flag,
                    format!("must be between {minimum} and {maximum}"),
                ));
            }
        }
        Ok(())
    }

    /// `--min-order-value`: a USD amount (so at least 0.01), at most the largest order.
    fn order_value_min(&self) -> Result<Usd, FieldError> {
        let flag = "--min-order-value";
        let minimum = Usd::parse_amount(flag, &self.min_order_value)?;
        let maximum = Usd::from_decimal(ORDER_VALUE_USD_MAX);
        if minimum > maximum {
            return Err(FieldError::new(
                flag,
                format!("must be at most {maximum}, the largest order value"),
            ));
        }
        Ok(minimum)
    }

    pub fn auth_flags(&self) -> crate::auth::AuthFlags {
        crate::auth::AuthFlags {
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
            auth_file: self.auth_file.clone(),
            insecure: self.insecure,
        }
    }

    pub fn affinity_flags(&self) -> crate::affinity::AffinityFlags {
        crate::affinity::AffinityFlags {
            advertise_address: self.advertise_address.clone(),
            peer_token_file: self.peer_token_file.clone(),
            peer_ca: self.peer_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
            tls: self.tls_cert.is_some(),
            authenticated: self.auth_file.is_some() || self.tls_client_ca.is_some(),
            embedded: self.storage_kind() == StorageKind::Embedded,
        }
    }

    /// Whether batch commits go through group commit (`--group-commit`).
    pub fn group_commit_enabled(&self) -> bool {
        match self.group_commit {
            GroupCommitFlag::On => true,
            GroupCommitFlag::Off => false,
            GroupCommitFlag::Auto => self.storage_kind() == StorageKind::Embedded,
        }
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(arguments: &[&str]) -> Result<CoordinatorConfig, FieldError> {
        let arguments = std::iter::once("coordinator").chain(arguments.iter().copied());
        Cli::parse_from(arguments).settings.coordinator_config()
    }

    #[test]
    fn limit_defaults_are_the_core_constants() {
        assert_eq!(config(&[]).unwrap().limits, Limits::default());
        let settings = Cli::parse_from(["coordinator"]).settings;
        assert_eq!(settings.daily_deposit_limit, "10000.00");
        assert_eq!(settings.daily_withdrawal_limit, "5000.00");
        assert_eq!(settings.min_order_value, "1.00");
    }

    /// Durations and counts that would overflow a deadline or an expiry, or make a bound that
    /// never holds, are refused at start, naming the flag.
    #[test]
    fn every_duration_and_count_is_bounded() {
        for (flag, reason) in [
            (
                "--lease-deposit-ms=999",
                "--lease-deposit-ms: must be between 1000 and 300000",
            ),
            (
                "--lease-trade-ms=18446744073709551615",
                "--lease-trade-ms: must be between 1000 and 300000",
            ),
            (
                "--lock-wait-ms=18446744073709551615",
                "--lock-wait-ms: must be between 0 and 60000",
            ),
            (
                "--drain-ms=18446744073709551615",
                "--drain-ms: must be between 0 and 600000",
            ),
            (
                "--request-retention-hours=0",
                "--request-retention-hours: must be between 1 and 720",
            ),
            (
                "--sweep-interval-secs=999999999",
                "--sweep-interval-secs: must be between 0 and 86400",
            ),
            ("--max-inflight=0", "--max-inflight: must be between 1 and 1000000"),
        ] {
            assert_eq!(config(&[flag]).unwrap_err().to_string(), reason, "{flag}");
        }
    }

    #[test]
    fn the_minimum_order_value_is_validated_at_start() {
        let minimum = |raw: &str| {
            let flag = format!("--min-order-value={raw}");
            config(&[flag.as_str()]).map(|config| config.limits.order_value_min)
        };
        assert_eq!(minimum("0.01").unwrap().to_string(), "0.01");
        assert_eq!(minimum("10000").unwrap().to_string(), "10000.00");
        for (raw, reason) in [
            ("0", "--min-order-value: must be greater than 0"),
            ("0.00", "--min-order-value: must be greater than 0"),
            ("-1", "--min-order-value: must be greater than 0"),
            ("0.001", "--min-order-value: must have at most 2 decimal places"),
            (
                "abc",
                "--min-order-value: must be a plain decimal number such as 100.00",
            ),
            (
                "10000.01",
                "--min-order-value: must be at most 10000.00, the largest order value",
            ),
        ] {
            assert_eq!(minimum(raw).unwrap_err().to_string(), reason, "{raw}");
        }
    }
}
