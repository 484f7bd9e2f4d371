//! Who may call what (issue 8): every role against every RPC, missing and wrong credentials,
//! mTLS (no certificate, another CA's, a valid one), the auth file reloaded on SIGHUP with a
//! call in flight, the principal on ledger entries and orders, the listen-address rule of the
//! real binary, UpsertAsset's price-move bound and history, JWTs on the HTTP services, and the
//! real grpcurl over mTLS with a token. Certificates and keys are generated here with rcgen.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use lockstep::coordinator::v1 as pb;
use lockstep::coordinator::v1::coordinator_client::CoordinatorClient;
use lockstep_client_common::CoordinatorSettings;
use lockstep_client_common::auth::{EndUserAuth, EndUserSettings, JwtAlgorithm};
use lockstep_coordinator::auth::hash_token;
use lockstep_coordinator::core::UserId;
use lockstep_coordinator::service::CommitHook;
use lockstep_coordinator::storage::{Item, Storage};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::sync::Notify;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request};

use crate::helpers::{AppOptions, EngineKind, TestApp, grpcurl, spawn_app, spawn_app_with};
use crate::services::{Http, spawn_services_with};

pub const TRADER_TOKEN: &str = "trader-token-0123456789abcdef";
pub const READER_TOKEN: &str = "reader-token-0123456789abcdef";
pub const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

/// A test PKI in a temporary directory: a CA, a server certificate for localhost and 127.0.0.1,
/// and client certificates on demand.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

fn authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA certificate")
}

/// A certificate (PEM) and its key (PEM) issued by `ca`.
fn issue(
    ca: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    alt_names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params = CertificateParams::new(alt_names).expect("params");
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("key");
    let certificate = params.signed_by(&key, ca).expect("certificate");
    (certificate.pem(), key.serialize_pem())
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = authority("Lockstep test CA");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
        let (certificate, key) = issue(
            &ca,
            "localhost",
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        std::fs::write(dir.path().join("server.pem"), certificate).expect("write server certificate");
        std::fs::write(dir.path().join("server.key"), key).expect("write server key");
        Pki { dir, ca }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A client certificate with this CN from our CA: (certificate, key) files.
    pub fn client(&self, common_name: &str) -> (PathBuf, PathBuf) {
        let (certificate, key) = issue(&self.ca, common_name, vec![], ExtendedKeyUsagePurpose::ClientAuth);
        self.write_pair(&format!("client-{common_name}"), certificate, key)
    }

    /// A client certificate with this CN from another CA.
    pub fn foreign_client(&self, common_name: &str) -> (PathBuf, PathBuf) {
        let other = authority("Another CA");
        let (certificate, key) = issue(&other, common_name, vec![], ExtendedKeyUsagePurpose::ClientAuth);
        self.write_pair(&format!("foreign-{common_name}"), certificate, key)
    }

    fn write_pair(&self, name: &str, certificate: String, key: String) -> (PathBuf, PathBuf) {
        let (certificate_path, key_path) = (self.path(&format!("{name}.pem")), self.path(&format!("{name}.key")));
        std::fs::write(&certificate_path, certificate).expect("write certificate");
        std::fs::write(&key_path, key).expect("write key");
        (certificate_path, key_path)
    }

    /// The coordinator's TLS flags; with `client_ca`, client certificates are required.
    pub fn server_flags(&self, options: AppOptions, client_ca: bool) -> AppOptions {
        let options = options
            .flag("--tls-cert", self.path("server.pem").display())
            .flag("--tls-key", self.path("server.key").display());
        if client_ca {
            options.flag("--tls-client-ca", self.path("ca.pem").display())
        } else {
            options
        }
    }
}

/// The auth file of these tests: three token principals and one certificate-only principal.
pub fn write_auth_file(path: &Path) {
    std::fs::write(
        path,
        format!(
            "# name roles sha256\ntrader-svc trader {}\nreader-svc reader {}\nadmin-svc admin,reader {}\norder-gateway trader -\n",
            hash_token(TRADER_TOKEN),
            hash_token(READER_TOKEN),
            hash_token(ADMIN_TOKEN)
        ),
    )
    .expect("write auth file");
}

pub fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().expect("header"));
    }
    request
}

/// Every item of the table, to prove a refusal wrote nothing.
async fn table(storage: &Storage) -> Vec<Item> {
    let mut scan = storage.scan_table();
    let mut items = Vec::new();
    while let Some(page) = scan.next_page().await.expect("scan") {
        items.extend(page);
    }
    items
}

const RPCS: [&str; 12] = [
    "Deposit",
    "Withdraw",
    "PlaceBuy",
    "PlaceSell",
    "Transfer",
    "GetAccount",
    "GetOrder",
    "ListOrders",
    "ListLedger",
    "ListAssets",
    "ListAssetChanges",
    "UpsertAsset",
];

/// Calls `rpc` with a plausible request; only the status matters to the role table.
async fn call(client: &mut CoordinatorClient<Channel>, rpc: &str, token: Option<&str>) -> Result<(), tonic::Status> {
    let user = "table".to_owned();
    let order = || pb::PlaceOrderRequest {
        user_id: "table".to_owned(),
        asset: "SOL".to_owned(),
        quantity: "0.01".to_owned(),
        ..Default::default()
    };
    match rpc {
        "Deposit" => client
            .deposit(with_token(
                pb::DepositRequest {
                    user_id: user,
                    amount: "100.00".to_owned(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "Withdraw" => client
            .withdraw(with_token(
                pb::WithdrawRequest {
                    settlement: 0,
                    user_id: user,
                    amount: "1.00".to_owned(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "PlaceBuy" => client.place_buy(with_token(order(), token)).await.map(drop),
        "PlaceSell" => client.place_sell(with_token(order(), token)).await.map(drop),
        "Transfer" => client
            .transfer(with_token(
                pb::TransferRequest {
                    from_user_id: user,
                    to_user_id: "table-payee".to_owned(),
                    amount: "1.00".to_owned(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "GetAccount" => client
            .get_account(with_token(pb::GetAccountRequest { user_id: user }, token))
            .await
            .map(drop),
        "GetOrder" => client
            .get_order(with_token(
                pb::GetOrderRequest {
                    order_id: uuid::Uuid::now_v7().to_string(),
                },
                token,
            ))
            .await
            .map(drop),
        "ListOrders" => client
            .list_orders(with_token(
                pb::ListOrdersRequest {
                    user_id: user,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "ListLedger" => client
            .list_ledger(with_token(
                pb::ListLedgerRequest {
                    user_id: user,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "ListAssets" => client
            .list_assets(with_token(pb::ListAssetsRequest {}, token))
            .await
            .map(drop),
        "ListAssetChanges" => client
            .list_asset_changes(with_token(
                pb::ListAssetChangesRequest {
                    symbol: "TBL".to_owned(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "UpsertAsset" => client
            .upsert_asset(with_token(
                pb::UpsertAssetRequest {
                    asset: Some(pb::Asset {
                        symbol: "TBL".to_owned(),
                        price: "1".to_owned(),
                        active: true,
                    }),
                    force: false,
                },
                token,
            ))
            .await
            .map(drop),
        other => panic!("no such RPC {other}"),
    }
}

/// Which RPCs each role may call.
fn allowed(role: &str, rpc: &str) -> bool {
    let read = matches!(
        rpc,
        "GetAccount" | "GetOrder" | "ListOrders" | "ListLedger" | "ListAssets" | "ListAssetChanges"
    );
    match role {
        "trader" => rpc != "UpsertAsset",
        "reader" => read,
        // admin-svc holds admin and reader.
        "admin" => read || rpc == "UpsertAsset",
        other => panic!("no such role {other}"),
    }
}

async fn spawn_with_tokens() -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let auth_file = dir.path().join("auth");
    write_auth_file(&auth_file);
    let app = spawn_app_with(
        EngineKind::Embedded,
        AppOptions::default().flag("--auth-file", auth_file.display()),
    )
    .await;
    (app, dir)
}

/// Every role against every RPC: allowed, or PERMISSION_DENIED naming the role needed and
/// writing nothing; no token and a wrong token are UNAUTHENTICATED everywhere; health is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_every_rpc() {
    let (app, _dir) = spawn_with_tokens().await;
    let mut client = app.client().await;
    for (role, token) in [
        ("admin", ADMIN_TOKEN),
        ("trader", TRADER_TOKEN),
        ("reader", READER_TOKEN),
    ] {
        let before = table(&app.storage).await;
        for rpc in RPCS.iter().filter(|rpc| !allowed(role, rpc)) {
            let status = call(&mut client, rpc, Some(token)).await.expect_err(rpc);
            assert_eq!(status.code(), Code::PermissionDenied, "{role} {rpc}: {status:?}");
            assert!(status.message().contains("needs the"), "{}", status.message());
        }
        assert_eq!(table(&app.storage).await, before, "{role}: a refusal wrote something");
        for rpc in RPCS.iter().filter(|rpc| allowed(role, rpc)) {
            if let Err(status) = call(&mut client, rpc, Some(token)).await {
                assert!(
                    !matches!(status.code(), Code::PermissionDenied | Code::Unauthenticated),
                    "{role} {rpc}: {status:?}"
                );
            }
        }
    }
    let status = call(&mut client, "Deposit", Some(READER_TOKEN)).await.unwrap_err();
    assert_eq!(
        status.message(),
        "/lockstep.coordinator.v1.Coordinator/Deposit needs the trader role; reader-svc has reader"
    );

    let before = table(&app.storage).await;
    for rpc in RPCS {
        for token in [None, Some("wrong-token-0123456789abcdef")] {
            let status = call(&mut client, rpc, token).await.expect_err(rpc);
            assert_eq!(status.code(), Code::Unauthenticated, "{rpc} {token:?}: {status:?}");
            assert!(!status.message().contains("wrong-token"), "no token is ever echoed");
        }
    }
    assert_eq!(
        table(&app.storage).await,
        before,
        "an unauthenticated call wrote something"
    );

    let channel = Channel::from_shared(format!("http://{}", app.address))
        .expect("URL")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health is open to probes");
    assert_eq!(reply.into_inner().status, 1, "SERVING");

    // Who moved the money is on the ledger entry, the order and the asset change.
    let entries = client
        .list_ledger(with_token(
            pb::ListLedgerRequest {
                user_id: "table".to_owned(),
                ..Default::default()
            },
            Some(READER_TOKEN),
        ))
        .await
        .expect("ledger")
        .into_inner()
        .entries;
    assert!(!entries.is_empty());
    assert!(
        entries.iter().all(|entry| entry.principal == "trader-svc"),
        "{entries:?}"
    );
    let orders = client
        .list_orders(with_token(
            pb::ListOrdersRequest {
                user_id: "table".to_owned(),
                ..Default::default()
            },
            Some(READER_TOKEN),
        ))
        .await
        .expect("orders")
        .into_inner()
        .orders;
    assert!(!orders.is_empty());
    assert!(orders.iter().all(|order| order.principal == "trader-svc"), "{orders:?}");
    let changes = client
        .list_asset_changes(with_token(
            pb::ListAssetChangesRequest {
                symbol: "TBL".to_owned(),
                ..Default::default()
            },
            Some(READER_TOKEN),
        ))
        .await
        .expect("changes")
        .into_inner()
        .changes;
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].principal, "admin-svc");
}

/// Transfer is a trader's: a reader's or an admin's token is PERMISSION_DENIED naming the role
/// needed and writes nothing, no token is UNAUTHENTICATED; a trader's moves the money, and both
/// ledger entries name the trader as the principal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_trader_may_transfer() {
    let (app, _dir) = spawn_with_tokens().await;
    let mut client = app.client().await;
    for user in ["payer", "payee"] {
        let deposit = pb::DepositRequest {
            user_id: user.to_owned(),
            amount: "50.00".to_owned(),
            ..Default::default()
        };
        client
            .deposit(with_token(deposit, Some(TRADER_TOKEN)))
            .await
            .expect("deposit");
    }
    let request = || pb::TransferRequest {
        from_user_id: "payer".to_owned(),
        to_user_id: "payee".to_owned(),
        amount: "20.00".to_owned(),
        memo: "roles".to_owned(),
        request_id: String::new(),
    };
    let before = table(&app.storage).await;
    let denied = client
        .transfer(with_token(request(), Some(READER_TOKEN)))
        .await
        .expect_err("a reader may not transfer");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert_eq!(
        denied.message(),
        "/lockstep.coordinator.v1.Coordinator/Transfer needs the trader role; reader-svc has reader"
    );
    let denied = client
        .transfer(with_token(request(), Some(ADMIN_TOKEN)))
        .await
        .expect_err("nor may an admin");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("needs the trader role"),
        "{}",
        denied.message()
    );
    let anonymous = client
        .transfer(with_token(request(), None))
        .await
        .expect_err("no token");
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    assert_eq!(table(&app.storage).await, before, "a refused caller wrote something");

    let reply = client
        .transfer(with_token(request(), Some(TRADER_TOKEN)))
        .await
        .expect("a trader may transfer")
        .into_inner();
    assert_eq!(reply.cash_balance, "30.00");
    for user in ["payer", "payee"] {
        let entries = app.full_ledger_as(user, READER_TOKEN).await;
        assert_eq!(entries.len(), 2, "{user}: {entries:?}");
        assert_eq!(entries[0].transfer_id, reply.transfer_id, "{user}");
        assert_eq!(entries[0].principal, "trader-svc", "{user}");
    }
}

pub async fn tls_client(
    app: &TestApp,
    pki: &Pki,
    identity: Option<&(PathBuf, PathBuf)>,
) -> Result<CoordinatorClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.path("ca.pem")).expect("CA")))
        .domain_name("localhost");
    if let Some((certificate, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(certificate).expect("certificate"),
            std::fs::read(key).expect("key"),
        ));
    }
    let channel = Channel::from_shared(format!("https://127.0.0.1:{}", app.address.port()))
        .expect("URL")
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(CoordinatorClient::new(channel))
}

async fn deposit_over(
    client: Result<CoordinatorClient<Channel>, tonic::transport::Error>,
    user: &str,
    token: Option<&str>,
) -> Result<pb::CashReply, String> {
    let mut client = client.map_err(|error| format!("connect: {error:?}"))?;
    let request = pb::DepositRequest {
        user_id: user.to_owned(),
        amount: "10.00".to_owned(),
        ..Default::default()
    };
    client
        .deposit(with_token(request, token))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
}

/// mTLS: no client certificate and another CA's certificate fail the handshake and write
/// nothing; a valid certificate's CN is the principal, with the roles of the auth file's `-`
/// line of that name; a certificate the auth file does not name, or names only on a token
/// line, has no role; a token decides over a certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_authenticates_by_the_certificate_subject() {
    let pki = Pki::new();
    write_auth_file(&pki.path("auth"));
    let options = pki
        .server_flags(AppOptions::default(), true)
        .flag("--auth-file", pki.path("auth").display());
    let app = spawn_app_with(EngineKind::Embedded, options).await;
    let before = table(&app.storage).await;

    let refused = deposit_over(tls_client(&app, &pki, None).await, "mtls", Some(TRADER_TOKEN)).await;
    assert!(refused.is_err(), "no client certificate: {refused:?}");
    let foreign = pki.foreign_client("order-gateway");
    let refused = deposit_over(tls_client(&app, &pki, Some(&foreign)).await, "mtls", None).await;
    assert!(refused.is_err(), "another CA: {refused:?}");
    let plaintext = CoordinatorClient::connect(format!("http://{}", app.address)).await;
    if let Ok(mut plaintext) = plaintext {
        let request = with_token(pb::ListAssetsRequest {}, Some(TRADER_TOKEN));
        assert!(plaintext.list_assets(request).await.is_err(), "plaintext to a TLS port");
    }
    assert_eq!(
        table(&app.storage).await,
        before,
        "a refused connection wrote something"
    );

    let gateway = pki.client("order-gateway");
    let reply = deposit_over(tls_client(&app, &pki, Some(&gateway)).await, "mtls", None)
        .await
        .expect("a valid certificate");
    assert_eq!(reply.cash_balance, "10.00");
    let stranger = pki.client("stranger");
    let refused = deposit_over(tls_client(&app, &pki, Some(&stranger)).await, "mtls", None).await;
    assert_eq!(
        refused.unwrap_err(),
        "PermissionDenied: /lockstep.coordinator.v1.Coordinator/Deposit needs the trader role; stranger has no role"
    );
    let refused = deposit_over(tls_client(&app, &pki, Some(&gateway)).await, "mtls", Some(READER_TOKEN)).await;
    assert!(
        refused.unwrap_err().starts_with("PermissionDenied"),
        "the token decides"
    );
    let named_like_a_token = pki.client("trader-svc");
    let refused = deposit_over(tls_client(&app, &pki, Some(&named_like_a_token)).await, "mtls", None).await;
    assert_eq!(
        refused.unwrap_err(),
        "PermissionDenied: /lockstep.coordinator.v1.Coordinator/Deposit needs the trader role; trader-svc has no role",
        "a certificate named like a token line does not get that token's roles"
    );
    let refused = deposit_over(
        tls_client(&app, &pki, Some(&gateway)).await,
        "mtls",
        Some("not-a-listed-token-0123456789"),
    )
    .await;
    assert!(
        refused.unwrap_err().starts_with("Unauthenticated"),
        "an unknown token is refused, not completed by the certificate's `-` line"
    );

    let mut client = tls_client(&app, &pki, Some(&gateway)).await.expect("connect");
    let entries = client
        .list_ledger(with_token(
            pb::ListLedgerRequest {
                user_id: "mtls".to_owned(),
                ..Default::default()
            },
            None,
        ))
        .await
        .expect("ledger")
        .into_inner()
        .entries;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].principal, "order-gateway");
}

/// The real grpcurl lists and calls over mTLS with a bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_calls_over_mutual_tls_with_a_token() {
    let pki = Pki::new();
    write_auth_file(&pki.path("auth"));
    let options = pki
        .server_flags(AppOptions::default(), true)
        .flag("--auth-file", pki.path("auth").display());
    let app = spawn_app_with(EngineKind::Embedded, options).await;
    let (certificate, key) = pki.client("grpcurl-user");
    let address = format!("127.0.0.1:{}", app.address.port());
    let authorization = format!("authorization: Bearer {TRADER_TOKEN}");
    let ca = pki.path("ca.pem").display().to_string();
    let (certificate, key) = (certificate.display().to_string(), key.display().to_string());
    let binary = grpcurl();
    let grpcurl = |arguments: Vec<&str>| {
        let mut command = std::process::Command::new(&binary);
        command.args([
            "-cacert",
            &ca,
            "-cert",
            &certificate,
            "-key",
            &key,
            "-H",
            &authorization,
        ]);
        command.args(arguments);
        command.output().expect("run grpcurl")
    };
    let listed = grpcurl(vec![&address, "list"]);
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(
        stdout.lines().any(|line| line == "lockstep.coordinator.v1.Coordinator"),
        "{stdout}"
    );
    let called = grpcurl(vec![
        "-d",
        r#"{"user_id": "grpcurl-tls", "amount": "5.00"}"#,
        &address,
        "lockstep.coordinator.v1.Coordinator/Deposit",
    ]);
    let stdout = String::from_utf8_lossy(&called.stdout);
    assert!(
        called.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&called.stderr)
    );
    let reply: serde_json::Value = serde_json::from_str(&stdout).expect("JSON reply");
    assert_eq!(reply["cashBalance"], "5.00");

    // Without the token the certificate alone names grpcurl-user, whom the file gives no role.
    let output = std::process::Command::new(&binary)
        .args(["-cacert", &ca, "-cert", &certificate, "-key", &key])
        .args(["-d", r#"{"user_id": "grpcurl-tls", "amount": "5.00"}"#, &address])
        .arg("lockstep.coordinator.v1.Coordinator/Deposit")
        .output()
        .expect("run grpcurl");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("PermissionDenied"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// SIGHUP reloads the auth file: a call in flight under the old token completes, the old token
/// is refused afterwards and the new one accepted; an invalid file is refused and the table in
/// force stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_auth_file_with_a_call_in_flight() {
    let dir = tempfile::tempdir().expect("temp dir");
    let auth_file = dir.path().join("auth");
    const OLD: &str = "old-token-0123456789abcdef";
    const NEW: &str = "new-token-0123456789abcdef";
    std::fs::write(&auth_file, format!("svc-old trader {}\n", hash_token(OLD))).expect("write");
    let parked = Arc::new(Notify::new());
    let go = Arc::new(Notify::new());
    let hook = {
        let (parked, go) = (Arc::clone(&parked), Arc::clone(&go));
        CommitHook(Arc::new(move |user: &UserId| {
            let (parked, go) = (Arc::clone(&parked), Arc::clone(&go));
            let park = user.as_str() == "inflight";
            Box::pin(async move {
                if park {
                    parked.notify_one();
                    go.notified().await;
                }
            })
        }))
    };
    let app = spawn_app_with(
        EngineKind::Embedded,
        AppOptions::default()
            .flag("--auth-file", auth_file.display())
            .before_commit(hook),
    )
    .await;
    // Our own listener keeps tokio's SIGHUP handler installed and tells when the signal came.
    let mut hangups =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).expect("listen for SIGHUP");
    let hang_up = || {
        std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .expect("kill -HUP");
    };

    let mut client = app.client().await;
    let in_flight = tokio::spawn(async move {
        let request = pb::DepositRequest {
            user_id: "inflight".to_owned(),
            amount: "7.00".to_owned(),
            ..Default::default()
        };
        client.deposit(with_token(request, Some(OLD))).await
    });
    parked.notified().await;

    std::fs::write(&auth_file, format!("svc-new trader {}\n", hash_token(NEW))).expect("rewrite");
    hang_up();
    hangups.recv().await;
    let mut client = app.client().await;
    let mut accepted = false;
    for _ in 0..50 {
        if call(&mut client, "ListAssets", Some(NEW)).await.is_ok() {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted, "the new token was not accepted after SIGHUP");
    go.notify_one();
    let reply = in_flight.await.expect("task").expect("the call in flight completes");
    assert_eq!(reply.into_inner().cash_balance, "7.00");
    let status = call(&mut client, "ListAssets", Some(OLD)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let entries = app.full_ledger_as("inflight", NEW).await;
    assert_eq!(
        entries[0].principal, "svc-old",
        "recorded under the token it started with"
    );

    std::fs::write(&auth_file, "svc-broken superuser 1234\n").expect("break the file");
    hang_up();
    hangups.recv().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    call(&mut client, "ListAssets", Some(NEW))
        .await
        .expect("the invalid file is refused and the previous one kept");
}

impl TestApp {
    /// Every ledger entry of `user` through ListLedger with `token`.
    pub async fn full_ledger_as(&self, user: &str, token: &str) -> Vec<pb::LedgerEntry> {
        let request = pb::ListLedgerRequest {
            user_id: user.to_owned(),
            page_size: 100,
            ..Default::default()
        };
        self.client()
            .await
            .list_ledger(with_token(request, Some(token)))
            .await
            .expect("ledger")
            .into_inner()
            .entries
    }
}

/// A non-loopback --listen without TLS and authentication refuses to start and names the
/// flags; with --insecure the real binary starts and warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_a_network_address_without_auth_unless_insecure() {
    let data = tempfile::tempdir().expect("temp dir");
    let binary = crate::durability::coordinator_binary();
    let refused = tokio::process::Command::new(&binary)
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(data.path())
        .output()
        .await
        .expect("run coordinator");
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(
            "--listen 0.0.0.0:0 is not a loopback address: add --tls-cert and --tls-key, and --tls-client-ca or --auth-file, or --insecure"
        ),
        "{stderr}"
    );

    let mut insecure = tokio::process::Command::new(&binary)
        .args(["--listen", "0.0.0.0:0", "--insecure", "--data-dir"])
        .arg(data.path())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start coordinator");
    let stderr = insecure.stderr.take().expect("stderr");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let mut log = String::new();
    let serving = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            log.push_str(&line);
            log.push('\n');
            if line.contains("serving gRPC") {
                return true;
            }
        }
        false
    })
    .await;
    insecure.kill().await.ok();
    assert_eq!(serving, Ok(true), "{log}");
    assert!(log.contains("WARN") && log.contains("--insecure"), "{log}");
}

/// A price move beyond the bound is FAILED_PRECONDITION naming it, and changes nothing; with
/// force it applies; every change is listed newest first with who, old and new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_moves_beyond_the_bound_need_force_and_every_change_is_kept() {
    let app = spawn_app(EngineKind::Embedded).await;
    let mut client = app.client().await;
    let upsert = |price: &str, force: bool| pb::UpsertAssetRequest {
        asset: Some(pb::Asset {
            symbol: "SOL".to_owned(),
            price: price.to_owned(),
            active: true,
        }),
        force,
    };
    let status = client.upsert_asset(upsert("300", false)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        "Price change of SOL from $145.25 to $300 is 106.54%, above the maximum of 50% in one call (--price-change-max-percent); set force to apply it"
    );
    let changes = |client: &mut CoordinatorClient<Channel>| {
        let mut client = client.clone();
        async move {
            client
                .list_asset_changes(pb::ListAssetChangesRequest {
                    symbol: "SOL".to_owned(),
                    page_size: 1,
                    page_token: String::new(),
                })
                .await
                .expect("changes")
                .into_inner()
        }
    };
    assert!(changes(&mut client).await.changes.is_empty(), "a refusal keeps nothing");
    client.upsert_asset(upsert("300", true)).await.expect("forced");
    client
        .upsert_asset(upsert("310", false))
        .await
        .expect("within the bound");
    let first = changes(&mut client).await;
    assert_eq!(first.changes.len(), 1);
    let newest = &first.changes[0];
    assert_eq!(newest.old.as_ref().map(|asset| asset.price.as_str()), Some("300"));
    assert_eq!(newest.new.as_ref().map(|asset| asset.price.as_str()), Some("310"));
    assert!(!newest.forced);
    assert_eq!(newest.principal, "local");
    assert!(!first.next_page_token.is_empty());
    let second = client
        .list_asset_changes(pb::ListAssetChangesRequest {
            symbol: "SOL".to_owned(),
            page_size: 1,
            page_token: first.next_page_token,
        })
        .await
        .expect("second page")
        .into_inner();
    assert_eq!(second.changes.len(), 1);
    assert!(second.changes[0].forced);
    assert_eq!(
        second.changes[0].old.as_ref().map(|asset| asset.price.as_str()),
        Some("145.25")
    );
    assert!(second.next_page_token.is_empty());
}

pub(crate) const JWT_SECRET: &str = "a-shared-hs256-secret-of-at-least-32-bytes";

pub(crate) fn jwt(
    subject: &str,
    expires_in_seconds: i64,
    key: &jsonwebtoken::EncodingKey,
    algorithm: jsonwebtoken::Algorithm,
) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    // The services install it too; this test process signs before any service starts.
    lockstep_client_common::jwt_ring::install();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(algorithm),
        &serde_json::json!({ "sub": subject, "exp": now + expires_in_seconds }),
        key,
    )
    .expect("encode JWT")
}

/// The services behind JWT authentication, calling a coordinator that requires a trader token:
/// a valid token of the path's user passes; expired, wrongly signed and missing tokens are 401;
/// another user's token is 403, in the path (a transfer's sender too) and in the body of
/// POST /orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_authenticate_end_users_with_jwts() {
    let (app, dir) = spawn_with_tokens().await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TRADER_TOKEN}\n")).expect("write token");
    let secret_file = dir.path().join("jwt-secret");
    std::fs::write(&secret_file, JWT_SECRET).expect("write secret");
    let mut settings = CoordinatorSettings::new(format!("http://{}", app.address));
    settings.coordinator_token_file = Some(token_file);
    let end_users = EndUserAuth::from_settings(&EndUserSettings {
        jwt_hs256_secret_file: Some(secret_file),
        ..EndUserSettings::default()
    })
    .expect("JWT settings");
    let services = spawn_services_with(settings.clone(), end_users).await;
    let http = Http::default();
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes());
    let hs256 = jsonwebtoken::Algorithm::HS256;
    let send = |address, method, path: &str, token: Option<String>, body: Option<&'static str>| {
        let http = http.clone();
        let path = path.to_owned();
        async move {
            let header = token.map(|token| format!("Bearer {token}"));
            let headers: Vec<(&str, &str)> = header.iter().map(|value| ("authorization", value.as_str())).collect();
            http.send(method, address, &path, &headers, body).await
        }
    };

    let alice = Some(jwt("alice", 600, &key, hs256));
    let deposit = send(
        services.user,
        Method::POST,
        "/users/alice/deposit",
        alice.clone(),
        Some(r#"{"amount": "100.00"}"#),
    )
    .await;
    assert_eq!(deposit.data()["cash_balance"], "100.00");
    let balance = send(services.user, Method::GET, "/users/alice/balance", alice.clone(), None).await;
    assert_eq!(balance.data()["cash_balance"], "100.00");
    let order = send(
        services.order,
        Method::POST,
        "/orders",
        alice.clone(),
        Some(r#"{"user_id": "alice", "side": "buy", "asset": "SOL", "quantity": "0.1"}"#),
    )
    .await;
    let order_id = order.data()["order"]["order_id"].as_str().expect("order id").to_owned();

    let expired = send(
        services.user,
        Method::GET,
        "/users/alice/balance",
        Some(jwt("alice", -3600, &key, hs256)),
        None,
    )
    .await;
    assert_eq!(
        expired.error(StatusCode::UNAUTHORIZED)["message"],
        "the token has expired"
    );
    let forged_key = jsonwebtoken::EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!");
    let forged = send(
        services.user,
        Method::GET,
        "/users/alice/balance",
        Some(jwt("alice", 600, &forged_key, hs256)),
        None,
    )
    .await;
    assert_eq!(
        forged.error(StatusCode::UNAUTHORIZED)["message"],
        "the token's signature is not valid"
    );
    let missing = send(services.user, Method::GET, "/users/alice/balance", None, None).await;
    missing.error(StatusCode::UNAUTHORIZED);
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    let bob = Some(jwt("bob", 600, &key, hs256));
    let other_user = send(
        services.user,
        Method::POST,
        "/users/alice/withdraw",
        bob.clone(),
        Some(r#"{"amount": "1.00"}"#),
    )
    .await;
    other_user.error(StatusCode::FORBIDDEN);
    let other_body = send(
        services.order,
        Method::POST,
        "/orders",
        bob.clone(),
        Some(r#"{"user_id": "alice", "side": "sell", "asset": "SOL", "quantity": "0.1"}"#),
    )
    .await;
    other_body.error(StatusCode::FORBIDDEN);
    let other_order = send(
        services.order,
        Method::GET,
        &format!("/orders/{order_id}"),
        bob.clone(),
        None,
    )
    .await;
    other_order.error(StatusCode::FORBIDDEN);
    let own_order = send(
        services.order,
        Method::GET,
        &format!("/orders/{order_id}"),
        alice.clone(),
        None,
    )
    .await;
    assert_eq!(own_order.data()["user_id"], "alice");
    // A transfer is the path's user's: another user's token may not send alice's money.
    send(
        services.user,
        Method::POST,
        "/users/bob/deposit",
        bob.clone(),
        Some(r#"{"amount": "1.00"}"#),
    )
    .await
    .data();
    let transfer_body = Some(r#"{"to_user_id": "bob", "amount": "10.00"}"#);
    let stolen = send(
        services.user,
        Method::POST,
        "/users/alice/transfers",
        bob.clone(),
        transfer_body,
    )
    .await;
    stolen.error(StatusCode::FORBIDDEN);
    let sent = send(
        services.user,
        Method::POST,
        "/users/alice/transfers",
        alice.clone(),
        transfer_body,
    )
    .await;
    assert_eq!(sent.data()["to_user_id"], "bob");
    let health = send(services.user, Method::GET, "/health", None, None).await;
    assert_eq!(health.status, StatusCode::OK);
    let cash = app.full_ledger_as("alice", READER_TOKEN).await;
    assert_eq!(
        cash.len(),
        3,
        "deposit, buy, transfer: the refusals wrote nothing: {cash:?}"
    );

    // ES256 with a public key file: the issuer's key passes, another key does not.
    let issuer = KeyPair::generate().expect("ES256 key");
    let public_key = dir.path().join("jwt-public.pem");
    std::fs::write(&public_key, issuer.public_key_pem()).expect("write public key");
    let end_users = EndUserAuth::from_settings(&EndUserSettings {
        jwt_public_key_file: Some(public_key),
        jwt_algorithm: Some(JwtAlgorithm::Es256),
        ..EndUserSettings::default()
    })
    .expect("ES256 settings");
    let es256_services = spawn_services_with(settings, end_users).await;
    let es256 = jsonwebtoken::Algorithm::ES256;
    let signing = jsonwebtoken::EncodingKey::from_ec_pem(issuer.serialize_pem().as_bytes()).expect("EC key");
    let valid = send(
        es256_services.user,
        Method::GET,
        "/users/alice/balance",
        Some(jwt("alice", 600, &signing, es256)),
        None,
    )
    .await;
    assert!(valid.data()["cash_balance"].is_string(), "{valid:?}");
    let stranger = KeyPair::generate().expect("another key");
    let stranger = jsonwebtoken::EncodingKey::from_ec_pem(stranger.serialize_pem().as_bytes()).expect("EC key");
    let refused = send(
        es256_services.user,
        Method::GET,
        "/users/alice/balance",
        Some(jwt("alice", 600, &stranger, es256)),
        None,
    )
    .await;
    refused.error(StatusCode::UNAUTHORIZED);
    let hs256_token = send(es256_services.user, Method::GET, "/users/alice/balance", alice, None).await;
    hs256_token.error(StatusCode::UNAUTHORIZED);
}
