//! Settings every service shares: where the coordinator is and how long to wait for it. Each
//! service flattens [`CoordinatorSettings`] into its own clap settings, next to `--listen`.

use std::path::PathBuf;
use std::time::Duration;

/// How long to wait to open a connection to the coordinator; loopback or a LAN answers in far less.
pub const CONNECT_TIMEOUT_DEFAULT_MS: u64 = 1_000;
/// The longest an HTTP request may spend on the coordinator, retries included: above the
/// coordinator's default lease wait (5 s), so a busy account answers 409, not 504.
pub const REQUEST_TIMEOUT_DEFAULT_MS: u64 = 10_000;

#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorSettings {
    /// gRPC URL of the coordinator.
    #[arg(long, env = "LOCKSTEP_COORDINATOR_URL", default_value = "http://127.0.0.1:50051")]
    pub coordinator_url: String,
    /// Longest wait to open a connection to the coordinator, in milliseconds.
    #[arg(long, env = "LOCKSTEP_CONNECT_TIMEOUT_MS", default_value_t = CONNECT_TIMEOUT_DEFAULT_MS)]
    pub connect_timeout_ms: u64,
    /// Longest time one HTTP request may spend on the coordinator, retries included, in
    /// milliseconds. An `X-Request-Timeout` header can shorten it, never lengthen it.
    #[arg(long, env = "LOCKSTEP_REQUEST_TIMEOUT_MS", default_value_t = REQUEST_TIMEOUT_DEFAULT_MS)]
    pub request_timeout_ms: u64,
    /// Verify the coordinator's TLS certificate against this CA (PEM); turns TLS on.
    #[arg(long, env = "LOCKSTEP_COORDINATOR_CA")]
    pub coordinator_ca: Option<PathBuf>,
    /// Present this client certificate (PEM) to the coordinator (mTLS); with --coordinator-key.
    #[arg(long, env = "LOCKSTEP_COORDINATOR_CERT")]
    pub coordinator_cert: Option<PathBuf>,
    /// The private key (PEM) of --coordinator-cert.
    #[arg(long, env = "LOCKSTEP_COORDINATOR_KEY")]
    pub coordinator_key: Option<PathBuf>,
    /// Send the bearer token in this file (without its trailing newline) on every call.
    #[arg(long, env = "LOCKSTEP_COORDINATOR_TOKEN_FILE")]
    pub coordinator_token_file: Option<PathBuf>,
}

impl CoordinatorSettings {
    /// The defaults, pointed at `coordinator_url`.
    pub fn new(coordinator_url: impl Into<String>) -> Self {
        Self {
            coordinator_url: coordinator_url.into(),
            connect_timeout_ms: CONNECT_TIMEOUT_DEFAULT_MS,
            request_timeout_ms: REQUEST_TIMEOUT_DEFAULT_MS,
            coordinator_ca: None,
            coordinator_cert: None,
            coordinator_key: None,
            coordinator_token_file: None,
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}
