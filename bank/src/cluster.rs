//! Coordinator processes for the bank test: started from the real `coordinator` binary on fixed
//! loopback ports, killed with SIGKILL and restarted under the same instance name.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use backon::{BackoffBuilder, ConstantBackoff, ConstantBuilder};

/// How long a (re)started coordinator may take to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a coordinator sent SIGTERM may take to drain and exit before it is killed.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between two checks on a starting or stopping process: short next to either timeout.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Checks every `POLL_INTERVAL` for up to `timeout`.
fn polls(timeout: Duration) -> ConstantBackoff {
    ConstantBuilder::new()
        .with_delay(POLL_INTERVAL)
        .with_max_times((timeout.as_millis() / POLL_INTERVAL.as_millis()) as usize)
        .build()
}

/// The `coordinator` binary cargo built beside the running executable (target/<profile>/).
pub fn coordinator_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LOCKSTEP_COORDINATOR_BIN") {
        return PathBuf::from(path);
    }
    let executable = std::env::current_exe().expect("own executable path");
    let mut directory = executable.parent().expect("executable directory").to_path_buf();
    if directory.ends_with("deps") {
        directory.pop();
    }
    let binary = directory.join("coordinator");
    assert!(
        binary.exists(),
        "{} not built: run scripts/test.sh, or `cargo build --workspace --bins` first (or set LOCKSTEP_COORDINATOR_BIN)",
        binary.display()
    );
    binary
}

/// Ports `free_port` handed out in this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A free loopback port, for a coordinator that must come back on the same address, and never
/// one handed out before in this process: the port is free only until the coordinator binds it
/// (and again whenever it is killed), so two nodes, of one bank run or of two running side by
/// side in one test binary, could otherwise be given the same port and one run's clients would
/// talk to the other's coordinator.
pub fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free loopback port")
            .port();
        if HANDED_OUT.lock().expect("ports handed out").insert(port) {
            return port;
        }
    }
}

/// One coordinator process slot: same port, instance name and flags across restarts.
#[derive(Debug)]
pub struct Node {
    pub instance: String,
    pub port: u16,
    arguments: Vec<String>,
    environment: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    pub starts: usize,
}

impl Node {
    pub fn new(index: usize, arguments: Vec<String>, environment: Vec<(String, String)>, log_dir: &Path) -> Node {
        Node {
            instance: format!("bank-coordinator-{index}"),
            port: free_port(),
            arguments,
            environment,
            log: log_dir.join(format!("coordinator-{index}.log")),
            child: None,
            starts: 0,
        }
    }

    /// Account affinity on: peers reach this node at its endpoint and authenticate with the
    /// token in `peer_token_file` (the `peer` role in the auth file).
    pub fn advertise(&mut self, peer_token_file: &Path) {
        self.arguments.extend([
            "--advertise-address".to_owned(),
            self.endpoint(),
            "--peer-token-file".to_owned(),
            peer_token_file.display().to_string(),
        ]);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Starts the process (appending to its log) and waits until it accepts connections.
    pub async fn start(&mut self, extra: &[String]) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(coordinator_binary())
            .args([
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--instance",
                &self.instance,
            ])
            .args(&self.arguments)
            .args(extra)
            .envs(
                self.environment
                    .iter()
                    .map(|(key, value)| (key.as_str(), value.as_str())),
            )
            // Warnings, and the server's own lines: "serving gRPC" says which process serves.
            .env("RUST_LOG", "warn,lockstep_coordinator::server=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?;
        self.child = Some(child);
        self.starts += 1;
        for pause in polls(START_TIMEOUT) {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(std::io::Error::other(format!(
                    "{} exited at start: {status}; its log ends: {:?}",
                    self.instance, tail
                )));
            }
            // Started when this start's process says it serves on the port and the port accepts
            // connections: a port that merely accepts may be some other process's (this one then
            // fails to bind it and exits, which the check above reports).
            if self.serving_lines() >= self.starts
                && tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(pause).await;
        }
        Err(std::io::Error::other(format!(
            "{} did not start within {START_TIMEOUT:?}",
            self.instance
        )))
    }

    /// How many times the log says a process of this node served gRPC on its port: one line per
    /// start that got that far.
    fn serving_lines(&self) -> usize {
        let address = format!("127.0.0.1:{}", self.port);
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("serving gRPC") && line.contains(&address))
            .count()
    }

    /// SIGKILL: no drain, no lease release, nothing flushed that was not already durable.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// SIGTERM and wait: the graceful path (drain, release leases).
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            // std's Child::kill sends SIGKILL; SIGTERM goes through kill(1).
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .ok();
            for pause in polls(TERMINATE_TIMEOUT) {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(pause);
            }
            child.kill().ok();
            child.wait().ok();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_9();
    }
}
