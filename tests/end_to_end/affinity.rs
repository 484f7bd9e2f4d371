//! Account affinity (issue 19, docs/scale-out.md): several coordinators on one table, each
//! account served by one owner, calls forwarded there over the `Peer` service. Real coordinators
//! on loopback ports over dynoxide's HTTP server; a fake owner where a test must see exactly what
//! a forward carries.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::coordinator::v1 as pb;
use lockstep_coordinator::affinity::forward::ForwardCounts;
use lockstep_coordinator::affinity::{Peer, rendezvous_owner};
use lockstep_coordinator::auth::hash_token;
use lockstep_coordinator::core::{Clock, SystemClock, UserId};
use lockstep_coordinator::storage::model::{self, Member};
use pb::peer_client::PeerClient;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use crate::auth::{TRADER_TOKEN, with_token};
use crate::helpers::{AppOptions, EngineKind, TestApp, spawn_app_with, spawn_peer};

const PEER_TOKEN: &str = "peer-token-0123456789abcdef";

/// Waits until `app` sees `count` live coordinators, itself included.
async fn wait_for_members(app: &TestApp, count: usize) {
    let membership = &app.affinity.as_ref().expect("affinity on").membership;
    for _ in 0..200 {
        if membership.live().len() == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} live coordinators seen, {count} expected", membership.live().len());
}

fn name_of(app: &TestApp) -> String {
    app.affinity
        .as_ref()
        .expect("affinity on")
        .membership
        .me()
        .name
        .to_string()
}

fn counts(app: &TestApp) -> ForwardCounts {
    app.affinity.as_ref().expect("affinity on").forwarder.counts()
}

/// The owner's name of `user` among coordinators named `names`.
fn owner(names: &[String], user: &str) -> String {
    let peers: Vec<Peer> = names
        .iter()
        .map(|name| Peer {
            name: name.as_str().into(),
            address: "unused".into(),
        })
        .collect();
    rendezvous_owner(&peers, user).expect("a member").name.to_string()
}

/// A user whose owner among `names` is `wanted`.
fn user_owned_by(names: &[String], wanted: &str, prefix: &str) -> String {
    (0..10_000)
        .map(|index| format!("{prefix}-{index}"))
        .find(|user| owner(names, user) == wanted)
        .expect("some user hashes to every member")
}

/// Announces a coordinator that is not one of the test's apps, live for an hour.
async fn announce(app: &TestApp, name: &str, address: &str) {
    let member = Member {
        name: name.to_owned(),
        address: address.to_owned(),
        incarnation: "test".to_owned(),
        expires_at: SystemClock.now() + 3_600_000,
    };
    app.storage
        .put(model::put_member(&member))
        .await
        .expect("announce the member");
}

fn deposit(user: &str, amount: &str, request_id: &str) -> pb::DepositRequest {
    pb::DepositRequest {
        user_id: user.to_owned(),
        amount: amount.to_owned(),
        request_id: request_id.to_owned(),
    }
}

/// Three coordinators, every user's deposits sent to all three at once: each call that reached
/// a non-owner is forwarded (none served there), every balance is exact, and each coordinator
/// forwarded exactly the calls of the users it does not own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_calls_of_one_account_meet_at_its_owner() {
    let first = spawn_app_with(EngineKind::DynoxideHttp, AppOptions::default().affinity()).await;
    let second = spawn_peer(&first, AppOptions::default().affinity()).await;
    let third = spawn_peer(&first, AppOptions::default().affinity()).await;
    let apps = [&first, &second, &third];
    for app in apps {
        wait_for_members(app, 3).await;
    }
    let names: Vec<String> = apps.iter().map(|app| name_of(app)).collect();
    let users: Vec<String> = (0..12).map(|index| format!("affine-{index}")).collect();
    let mut clients = Vec::new();
    for app in apps {
        clients.push(app.client().await);
    }
    for round in 0..3 {
        let mut calls = tokio::task::JoinSet::new();
        for user in &users {
            for (index, client) in clients.iter().enumerate() {
                let request = deposit(user, "10.00", &format!("{user}-{round}-{index}"));
                let mut client = client.clone();
                calls.spawn(async move { client.deposit(request).await });
            }
        }
        while let Some(result) = calls.join_next().await {
            result.expect("task").expect("deposit");
        }
    }
    for (app, name) in apps.iter().zip(&names) {
        let foreign = users.iter().filter(|user| owner(&names, user) != *name).count() as u64;
        assert_eq!(
            counts(app),
            ForwardCounts {
                forwarded: 3 * foreign,
                served_here: 0,
                failed: 0
            },
            "{name}"
        );
    }
    for user in &users {
        assert_eq!(first.cash(user).await, "90.00", "{user}");
    }
    // A transfer is run by its sender's owner.
    // One of the funded users that another coordinator owns (each of the twelve misses a
    // given coordinator with probability 2/3, so `user_owned_by` could pick one unfunded).
    let sender = users
        .iter()
        .find(|user| owner(&names, user) != names[0])
        .expect("three members share twelve users")
        .clone();
    let receiver = users.iter().find(|user| **user != sender).expect("another user");
    let before = counts(&first).forwarded;
    let transfer = pb::TransferRequest {
        from_user_id: sender.clone(),
        to_user_id: receiver.clone(),
        amount: "5.00".to_owned(),
        memo: "rent".to_owned(),
        request_id: "affine-transfer".to_owned(),
    };
    let reply = first
        .client()
        .await
        .transfer(transfer)
        .await
        .expect("transfer")
        .into_inner();
    assert_eq!((reply.cash_balance.as_str(), reply.memo.as_str()), ("85.00", "rent"));
    assert_eq!(counts(&first).forwarded, before + 1);
    assert_eq!(first.cash(receiver).await, "95.00");
}

/// What a fake owner saw of each forward, and how it answers: amount "1.00" is refused, "2.00"
/// refuses the forwarding coordinator itself (a peer token it does not know), "3.00" takes 2 s.
#[derive(Clone, Default)]
struct FakeOwner {
    seen: Arc<Mutex<Vec<(MetadataMap, pb::ForwardRequest)>>>,
}

#[tonic::async_trait]
impl pb::peer_server::Peer for FakeOwner {
    type ForwardWatchStream = lockstep_coordinator::transport::WatchStream;

    async fn forward_watch(
        &self,
        _request: Request<pb::WatchLedgerRequest>,
    ) -> Result<Response<Self::ForwardWatchStream>, Status> {
        Err(Status::unimplemented("forwarded mutations only"))
    }

    async fn forward(&self, request: Request<pb::ForwardRequest>) -> Result<Response<pb::ForwardReply>, Status> {
        let metadata = request.metadata().clone();
        let message = request.into_inner();
        self.seen.lock().unwrap().push((metadata, message.clone()));
        let Some(pb::forward_request::Call::Deposit(deposit)) = message.call else {
            return Err(Status::unimplemented("deposits only"));
        };
        match deposit.amount.as_str() {
            "1.00" => {
                return Err(Status::failed_precondition(
                    "refused by the owner: a rule it alone knows",
                ));
            }
            "2.00" => return Err(Status::unauthenticated("invalid bearer token")),
            "3.00" => tokio::time::sleep(Duration::from_secs(2)).await,
            _ => {}
        }
        Ok(Response::new(pb::ForwardReply {
            reply: Some(pb::forward_reply::Reply::Cash(pb::CashReply {
                withdrawal_id: String::new(),
                transaction_id: "from-the-owner".to_owned(),
                user_id: deposit.user_id,
                amount: deposit.amount,
                cash_balance: "123.45".to_owned(),
            })),
        }))
    }
}

/// A forward carries the caller's principal (authenticated here, believed there because the
/// peer token has the peer role), its deadline and trace context, and this coordinator's peer
/// token; the owner's answer, reply or error, reaches the caller unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forward_carries_principal_deadline_and_trace_and_relays_the_answer_unchanged() {
    let fake = FakeOwner::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let fake_address = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::peer_server::PeerServer::new(fake.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let auth_file = dir.path().join("auth");
    std::fs::write(
        &auth_file,
        format!(
            "trader-svc trader {}\ncoordinators peer {}\n",
            hash_token(TRADER_TOKEN),
            hash_token(PEER_TOKEN)
        ),
    )
    .expect("auth file");
    let token_file = dir.path().join("peer-token");
    std::fs::write(&token_file, format!("{PEER_TOKEN}\n")).expect("token file");
    let options = AppOptions::default()
        .affinity()
        .flag("--auth-file", auth_file.display())
        .flag("--peer-token-file", token_file.display());
    let app = spawn_app_with(EngineKind::DynoxideHttp, options).await;
    announce(&app, "fake-owner", &fake_address).await;
    wait_for_members(&app, 2).await;
    let names = [name_of(&app), "fake-owner".to_owned()];
    let user = user_owned_by(&names, "fake-owner", "carried");
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    let mut request = with_token(deposit(&user, "25.00", "carried-1"), Some(TRADER_TOKEN));
    request.set_timeout(Duration::from_secs(5));
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    let reply = app
        .client()
        .await
        .deposit(request)
        .await
        .expect("forwarded")
        .into_inner();
    assert_eq!(
        reply,
        pb::CashReply {
            withdrawal_id: String::new(),
            transaction_id: "from-the-owner".to_owned(),
            user_id: user.clone(),
            amount: "25.00".to_owned(),
            cash_balance: "123.45".to_owned(),
        }
    );
    {
        let seen = fake.seen.lock().unwrap();
        let (metadata, message) = seen.last().expect("the owner saw the forward");
        assert_eq!(message.principal, "trader-svc");
        assert_eq!(
            message.call,
            Some(pb::forward_request::Call::Deposit(deposit(&user, "25.00", "carried-1")))
        );
        assert_eq!(
            metadata.get("authorization").unwrap().to_str().unwrap(),
            format!("Bearer {PEER_TOKEN}")
        );
        assert_eq!(metadata.get("traceparent").unwrap().to_str().unwrap(), traceparent);
        let timeout = metadata
            .get("grpc-timeout")
            .expect("the deadline travels")
            .to_str()
            .unwrap();
        let (digits, unit) = timeout.split_at(timeout.len() - 1);
        let left = match unit {
            "m" => Duration::from_millis(digits.parse().unwrap()),
            "u" => Duration::from_micros(digits.parse().unwrap()),
            "n" => Duration::from_nanos(digits.parse().unwrap()),
            "S" => Duration::from_secs(digits.parse().unwrap()),
            other => panic!("unexpected unit {other} in {timeout}"),
        };
        assert!(
            left <= Duration::from_secs(5) && left > Duration::from_secs(4),
            "{timeout}"
        );
    }

    let mut refused = with_token(deposit(&user, "1.00", "carried-2"), Some(TRADER_TOKEN));
    refused.set_timeout(Duration::from_secs(5));
    let status = app
        .client()
        .await
        .deposit(refused)
        .await
        .expect_err("the owner refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "refused by the owner: a rule it alone knows");
    assert_eq!(counts(&app).forwarded, 2);
    // Nothing was written here: the owner answered for the account.
    let user_id = UserId::parse("user_id", &user).expect("a valid user id");
    let account = app.storage.get(model::account_key(&user_id)).await.expect("read");
    assert!(account.is_none(), "the forwarding coordinator wrote {account:?}");

    // The caller's deadline passes while the owner works: the forward ends with it, and the
    // owner is not taken for lost (the next call goes to it again).
    let mut slow = with_token(deposit(&user, "3.00", "carried-3"), Some(TRADER_TOKEN));
    slow.set_timeout(Duration::from_millis(300));
    let status = app.client().await.deposit(slow).await.expect_err("too slow");
    // (The caller's own client gives up at the same instant: its code is the one it sees.)
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    let mut again = with_token(deposit(&user, "25.00", "carried-4"), Some(TRADER_TOKEN));
    again.set_timeout(Duration::from_secs(5));
    app.client().await.deposit(again).await.expect("forwarded again");
    // (The abandoned forward is counted when its own timeout ends it first, not when it ends
    // with its caller; either way the owner was not taken for lost.)
    assert!(counts(&app).forwarded >= 3, "{:?}", counts(&app));
    assert_eq!(counts(&app).served_here, 0);

    // The owner refuses this coordinator itself (a peer token it does not know): nothing was
    // served there, so the call is served here, and the account is written here.
    let mut refused_peer = with_token(deposit(&user, "2.00", "carried-5"), Some(TRADER_TOKEN));
    refused_peer.set_timeout(Duration::from_secs(5));
    let reply = app
        .client()
        .await
        .deposit(refused_peer)
        .await
        .expect("served here")
        .into_inner();
    assert_eq!(reply.cash_balance, "2.00");
    assert_eq!(counts(&app).served_here, 1);
}

/// A call that arrives through Peer/Forward is served where it arrives, even when that
/// coordinator believes another one owns the account: no forward loop can form.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_call_is_never_forwarded_again() {
    let first = spawn_app_with(EngineKind::DynoxideHttp, AppOptions::default().affinity()).await;
    let second = spawn_peer(&first, AppOptions::default().affinity()).await;
    wait_for_members(&first, 2).await;
    wait_for_members(&second, 2).await;
    let names = [name_of(&first), name_of(&second)];
    let user = user_owned_by(&names, &names[1], "hop");
    let mut peer = PeerClient::connect(format!("http://{}", first.address))
        .await
        .expect("connect");
    let reply = peer
        .forward(pb::ForwardRequest {
            principal: "someone".to_owned(),
            call: Some(pb::forward_request::Call::Deposit(deposit(&user, "7.00", "hop-1"))),
        })
        .await
        .expect("served by the first coordinator")
        .into_inner();
    assert!(matches!(
        reply.reply,
        Some(pb::forward_reply::Reply::Cash(ref cash)) if cash.cash_balance == "7.00"
    ));
    assert_eq!(counts(&first), ForwardCounts::default(), "served where it arrived");
    assert_eq!(counts(&second), ForwardCounts::default());
    let entries = first.full_ledger(&user).await;
    assert_eq!(entries[0].principal, "someone", "the forwarded principal is recorded");
    // The same account through the Coordinator service is forwarded: the owner is the second.
    first.deposit(&user, "1.00").await.expect("deposit");
    assert_eq!(counts(&first).forwarded, 1);
    // What the person on call sees: `inspect` names the owner, from any coordinator.
    for app in [&first, &second] {
        let mut admin = pb::admin_client::AdminClient::connect(format!("http://{}", app.address))
            .await
            .expect("connect");
        let inspected = admin
            .inspect(pb::InspectRequest {
                user_id: user.clone(),
                ..Default::default()
            })
            .await
            .expect("inspect")
            .into_inner();
        assert_eq!(inspected.owner, names[1]);
    }
}

/// An owner that cannot be reached (its announcement live, nothing listening) costs no
/// availability: the call is served here through the lease path, at once, and later calls
/// skip the dead owner instead of trying it again each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_owner_falls_back_to_serving_here() {
    let app = spawn_app_with(EngineKind::DynoxideHttp, AppOptions::default().affinity()).await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    };
    announce(&app, "ghost", &format!("http://{closed}")).await;
    wait_for_members(&app, 2).await;
    let names = [name_of(&app), "ghost".to_owned()];
    let user = user_owned_by(&names, "ghost", "ghosted");
    let started = std::time::Instant::now();
    let reply = app.deposit(&user, "3.00").await.expect("served here");
    assert_eq!(reply.cash_balance, "3.00");
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    app.deposit(&user, "4.00").await.expect("served here again");
    assert_eq!(
        counts(&app),
        ForwardCounts {
            forwarded: 0,
            served_here: 2,
            failed: 0
        }
    );
    assert_eq!(app.cash(&user).await, "7.00");
}

/// Only the peer role may forward (a trader cannot name another principal through it), the
/// peer role alone calls nothing else, and a coordinator without affinity does not serve
/// forwards at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_peer_may_forward_and_a_peer_may_do_nothing_else() {
    let dir = tempfile::tempdir().expect("temp dir");
    let auth_file = dir.path().join("auth");
    std::fs::write(
        &auth_file,
        format!(
            "trader-svc trader {}\ncoordinators peer {}\n",
            hash_token(TRADER_TOKEN),
            hash_token(PEER_TOKEN)
        ),
    )
    .expect("auth file");
    let token_file = dir.path().join("peer-token");
    std::fs::write(&token_file, PEER_TOKEN).expect("token file");
    let app = spawn_app_with(
        EngineKind::Embedded,
        AppOptions::default()
            .affinity()
            .flag("--auth-file", auth_file.display())
            .flag("--peer-token-file", token_file.display()),
    )
    .await;
    let forward = || pb::ForwardRequest {
        principal: "victim".to_owned(),
        call: Some(pb::forward_request::Call::Deposit(deposit("victim", "1.00", ""))),
    };
    let mut peer = PeerClient::connect(format!("http://{}", app.address))
        .await
        .expect("connect");
    let status = peer
        .forward(with_token(forward(), Some(TRADER_TOKEN)))
        .await
        .expect_err("a trader cannot forward");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("needs the peer role"), "{}", status.message());
    let status = peer.forward(with_token(forward(), None)).await.expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = app
        .client()
        .await
        .deposit(with_token(deposit("victim", "1.00", ""), Some(PEER_TOKEN)))
        .await
        .expect_err("a peer token does not trade");
    assert_eq!(status.code(), Code::PermissionDenied);
    peer.forward(with_token(forward(), Some(PEER_TOKEN)))
        .await
        .expect("a peer forwards");
    // Without affinity the Peer service is not served at all: nobody can name a principal.
    let plain = spawn_peer(&app, AppOptions::default().flag("--auth-file", auth_file.display())).await;
    let status = PeerClient::connect(format!("http://{}", plain.address))
        .await
        .expect("connect")
        .forward(with_token(forward(), Some(PEER_TOKEN)))
        .await
        .expect_err("not served");
    assert_eq!(status.code(), Code::Unimplemented);
}

/// Peers over TLS with tokens, as the Kubernetes manifests run them: each coordinator serves
/// https with the test PKI's certificate, advertises an https address, checks its peers against
/// `--peer-ca` and presents its peer token; a trader's call to one is forwarded to the owner and
/// recorded under the trader's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_forward_over_tls_with_a_peer_token() {
    let pki = crate::auth::Pki::new();
    let auth_file = pki.path("auth");
    std::fs::write(
        &auth_file,
        format!(
            "trader-svc trader {}\ncoordinators peer {}\n",
            hash_token(TRADER_TOKEN),
            hash_token(PEER_TOKEN)
        ),
    )
    .expect("auth file");
    let token_file = pki.path("peer-token");
    std::fs::write(&token_file, PEER_TOKEN).expect("token file");
    let options = || {
        pki.server_flags(AppOptions::default(), false)
            .affinity()
            .flag("--auth-file", auth_file.display())
            .flag("--peer-token-file", token_file.display())
            .flag("--peer-ca", pki.path("ca.pem").display())
    };
    let first = spawn_app_with(EngineKind::DynoxideHttp, options()).await;
    let second = spawn_peer(&first, options()).await;
    wait_for_members(&first, 2).await;
    wait_for_members(&second, 2).await;
    let names = [name_of(&first), name_of(&second)];
    let user = user_owned_by(&names, &names[1], "secure");
    let mut client = crate::auth::tls_client(&first, &pki, None).await.expect("TLS client");
    let reply = client
        .deposit(with_token(deposit(&user, "12.00", "secure-1"), Some(TRADER_TOKEN)))
        .await
        .expect("forwarded over TLS")
        .into_inner();
    assert_eq!(reply.cash_balance, "12.00");
    assert_eq!(
        counts(&first),
        ForwardCounts {
            forwarded: 1,
            served_here: 0,
            failed: 0
        }
    );
    let request = pb::ListLedgerRequest {
        user_id: user.clone(),
        ..Default::default()
    };
    let entries = client
        .list_ledger(with_token(request, Some(TRADER_TOKEN)))
        .await
        .expect("ledger")
        .into_inner()
        .entries;
    assert_eq!(entries[0].principal, "trader-svc");
}

/// The owner of a hot account shuts down while calls for it stream through all three
/// coordinators, and a new coordinator joins: every call ends with an answer or a retryable code
/// (the calls sent to the departed coordinator itself find nobody, as a balancer would until it
/// drops it), a retry with the same request id settles it, and each deposit applied exactly once
/// (the balance is their exact sum, the ledger has one entry per deposit).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_owner_leaving_mid_stream_re_homes_the_account_and_nothing_applies_twice() {
    let first = spawn_app_with(EngineKind::DynoxideHttp, AppOptions::default().affinity()).await;
    let second = spawn_peer(&first, AppOptions::default().affinity()).await;
    let mut third = spawn_peer(&first, AppOptions::default().affinity()).await;
    for app in [&first, &second, &third] {
        wait_for_members(app, 3).await;
    }
    let names = [name_of(&first), name_of(&second), name_of(&third)];
    let user = user_owned_by(&names, &names[2], "rehomed");
    let mut clients = vec![first.client().await, second.client().await];
    let third_client = third.client().await;
    clients.push(third_client);
    let callers = 12;
    let per_caller = 40;
    let mut streams = tokio::task::JoinSet::new();
    for caller in 0..callers {
        let clients = clients.clone();
        let user = user.clone();
        streams.spawn(async move {
            let mut unsettled = Vec::new();
            for call in 0..per_caller {
                let request_id = format!("{user}-{caller}-{call}");
                let mut client = clients[(caller + call) % clients.len()].clone();
                match client.deposit(deposit(&user, "1.00", &request_id)).await {
                    Ok(_) => {}
                    Err(status) => {
                        assert!(
                            matches!(
                                status.code(),
                                Code::Unavailable
                                    | Code::Aborted
                                    | Code::DeadlineExceeded
                                    | Code::Unknown
                                    | Code::Cancelled
                            ),
                            "{request_id}: {status:?}"
                        );
                        unsettled.push(request_id);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            unsettled
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!streams.is_empty(), "the calls still stream when the owner leaves");
    let forwarded_before = counts(&first).forwarded;
    assert!(forwarded_before > 0, "calls reached the owner through the others");
    third.shut_down().await;
    let fourth = spawn_peer(&first, AppOptions::default().affinity()).await;
    let mut unsettled = Vec::new();
    while let Some(result) = streams.join_next().await {
        unsettled.extend(result.expect("caller task"));
    }
    // Retries with the same request ids, through coordinators that are up, settle the rest.
    for request_id in &unsettled {
        let mut settled = false;
        for attempt in 0..20 {
            let through = if attempt % 2 == 0 { &first } else { &fourth };
            if through
                .client()
                .await
                .deposit(deposit(&user, "1.00", request_id))
                .await
                .is_ok()
            {
                settled = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(settled, "{request_id} never settled");
    }
    let total = callers * per_caller;
    println!("{} of {total} calls retried after the owner left", unsettled.len());
    assert_eq!(
        first.cash(&user).await,
        format!("{total}.00"),
        "{} retried",
        unsettled.len()
    );
    assert_eq!(first.full_ledger(&user).await.len(), total);
    let report = lockstep_coordinator::audit::audit(&first.storage, SystemClock.now(), Duration::from_secs(60))
        .await
        .expect("audit");
    assert!(report.is_clean(), "{report}");
}

/// A coordinator that drains (a call still in flight) leaves the membership at the start of the
/// drain and stays out of it: it stops renewing its announcement before it deletes it, so its
/// peers stop forwarding to it for the whole drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_coordinator_stays_out_of_the_membership() {
    let first = spawn_app_with(EngineKind::DynoxideHttp, AppOptions::default().affinity()).await;
    let (hook, parked, go) = lockstep_coordinator::service::CommitHook::parking();
    let mut second = spawn_peer(
        &first,
        AppOptions::default()
            .affinity()
            .flag("--drain-ms", "10000")
            .before_commit(hook),
    )
    .await;
    wait_for_members(&first, 2).await;
    wait_for_members(&second, 2).await;
    let names = [name_of(&first), name_of(&second)];
    let user = user_owned_by(&names, &names[1], "draining");
    let mut client = second.client().await;
    let in_flight = tokio::spawn(async move { client.deposit(deposit(&user, "5.00", "draining-1")).await });
    parked.notified().await;
    let draining = tokio::spawn(async move {
        second.shut_down().await;
    });
    wait_for_members(&first, 1).await;
    // Longer than two renewals: a renewal after the leave would have announced it again.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        first.affinity.as_ref().unwrap().membership.live().len(),
        1,
        "the draining coordinator announced itself again"
    );
    go.notify_one();
    in_flight
        .await
        .expect("call task")
        .expect("the call in flight completes during the drain");
    draining.await.expect("drain");
}

/// A coordinator that shuts down leaves the membership at once, so its peers stop forwarding
/// to it within one listing rather than when its announcement runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_that_shuts_down_leaves_at_once() {
    let first = spawn_app_with(EngineKind::DynoxideHttp, AppOptions::default().affinity()).await;
    let mut second = spawn_peer(&first, AppOptions::default().affinity()).await;
    wait_for_members(&first, 2).await;
    second.shut_down().await;
    let left = std::time::Instant::now();
    wait_for_members(&first, 1).await;
    assert!(
        left.elapsed() < lockstep_coordinator::affinity::MEMBER_TTL,
        "{:?}",
        left.elapsed()
    );
}

/// A WatchLedger stream opened on a coordinator that does not own the account is served by the
/// owner and relayed: the owner's commits reach it at once, although every coordinator here
/// polls storage only once a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_is_served_by_the_accounts_owner() {
    let slow_poll = || AppOptions::default().affinity().flag("--watch-poll-ms", 60_000);
    let first = spawn_app_with(EngineKind::DynoxideHttp, slow_poll()).await;
    let second = spawn_peer(&first, slow_poll()).await;
    let third = spawn_peer(&first, slow_poll()).await;
    let apps = [&first, &second, &third];
    for app in apps {
        wait_for_members(app, 3).await;
    }
    let names: Vec<String> = apps.iter().map(|app| name_of(app)).collect();
    let user = user_owned_by(&names, &names[1], "watched");
    first.deposit(&user, "1.00").await.expect("first deposit");
    let before = counts(&third).forwarded;
    let mut stream = third
        .client()
        .await
        .watch_ledger(pb::WatchLedgerRequest {
            user_id: user.clone(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(counts(&third).forwarded, before + 1, "the watch went to the owner");
    assert_eq!(next_entry_sequence(&mut stream).await, 1);
    first.deposit(&user, "2.00").await.expect("second deposit");
    assert_eq!(next_entry_sequence(&mut stream).await, 2);
    // A bad cursor is the owner's refusal, relayed.
    let refused = third
        .client()
        .await
        .watch_ledger(pb::WatchLedgerRequest {
            user_id: user.clone(),
            after_sequence: 9,
        })
        .await
        .expect_err("past the end");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    // The relaying coordinator's drain ends the relayed stream too, with its cursor.
    drop(third);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the relayed stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the drain ends the relayed stream");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("after_sequence=2"), "{}", ended.message());
}

/// The next entry's sequence on `stream`, well before a minute's poll.
async fn next_entry_sequence(stream: &mut tonic::Streaming<pb::LedgerEvent>) -> u64 {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event well before the minute's poll")
            .expect("healthy")
            .expect("open");
        if let Some(pb::ledger_event::Event::Entry(entry)) = event.event {
            return entry.sequence;
        }
    }
}
