//! Settings: command-line flags, each with an environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

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
    /// Show a user's account, holdings, today's limits, lease and last ledger entries.
    Inspect {
        user: String,
        /// Ledger entries to show, newest first.
        #[arg(long, default_value_t = crate::admin::INSPECT_ENTRIES_DEFAULT)]
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
    /// The users whose lease was most often found busy, from the running coordinator.
    ContendedUsers {
        #[arg(long, default_value_t = crate::admin::CONTENDED_USERS_DEFAULT)]
        limit: u32,
        /// A running coordinator's URL, e.g. http://127.0.0.1:50051.
        #[arg(long)]
        server: Option<String>,
    },
}

impl Command {
    /// The operator command and its `--server`, for the commands `admin::cli` runs.
    pub fn admin(self) -> Option<(crate::admin::cli::AdminCommand, Option<String>)> {
        use crate::admin::cli::AdminCommand;
        Some(match self {
            Command::Audit {
                lease_margin_secs,
                server,
            } => (AdminCommand::Audit { lease_margin_secs }, server),
            Command::Inspect { user, entries, server } => (AdminCommand::Inspect { user, entries }, server),
            Command::ReleaseLease {
                user,
                lock_id,
                yes,
                server,
            } => (AdminCommand::ReleaseLease { user, lock_id, yes }, server),
            Command::Backup { path, server } => (AdminCommand::Backup { path }, server),
            Command::ContendedUsers { limit, server } => (AdminCommand::ContendedUsers { limit }, server),
            Command::Serve | Command::CreateTables | Command::Restore { .. } => return None,
        })
    }
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
        default_value = "10000.00",
        global = true
    )]
    pub daily_deposit_limit: String,
    /// Withdrawals per user per UTC day, USD.
    #[arg(
        long,
        env = "LOCKSTEP_DAILY_WITHDRAWAL_LIMIT",
        default_value = "5000.00",
        global = true
    )]
    pub daily_withdrawal_limit: String,
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
}

impl Settings {
    pub fn storage_kind(&self) -> StorageKind {
        if self.dynamodb_endpoint.is_some() {
            StorageKind::Dynamodb
        } else {
            self.storage
        }
    }

    pub fn coordinator_config(&self) -> Result<CoordinatorConfig, FieldError> {
        let leases = [self.lease_deposit_ms, self.lease_withdraw_ms, self.lease_trade_ms];
        if leases.iter().any(|lease| *lease < 1000) {
            return Err(FieldError::new("--lease-*-ms", "leases must be at least 1000 ms"));
        }
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
            },
            request_retention: Duration::from_secs(self.request_retention_hours.saturating_mul(3600)),
            before_commit: None,
            sweep_interval: (self.sweep_interval_secs > 0).then(|| Duration::from_secs(self.sweep_interval_secs)),
        })
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }
}
