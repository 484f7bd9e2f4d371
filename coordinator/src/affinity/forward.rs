//! Sending a mutation to its account's owner (the `Peer` service) and relaying the answer.
//!
//! Rules (docs/scale-out.md, "Forwarding"):
//! - **One hop at most.** A forwarded call is served by whoever receives it ([`Origin::forwarded`]).
//! - **Availability never depends on the owner.** An owner that cannot be reached (no connection)
//!   is skipped for [`UNREACHABLE_BACKOFF`] and the call is served here, through the lease path.
//! - **Never twice.** A call that may have reached the owner before the connection was lost is
//!   served here only when it carries a request id (the request record answers a second try);
//!   without one the caller gets UNAVAILABLE and decides.
//! - **Unchanged.** The owner's reply or error (code, message, details) goes back as it came.

use std::collections::HashMap;
use std::error::Error as _;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep::coordinator::v1 as pb;
use pb::peer_client::PeerClient;
use tokio::time::Instant;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use super::{Membership, Owner, Peer};
use crate::core::{Principal, UserId};

/// Longest wait for a connection to a peer: a peer that takes longer is unreachable for now.
/// Paid once per connection, not per call: connections are kept and shared.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// How long a peer that could not be reached is skipped (its calls served here) before the next
/// try: a dead owner costs one failed connection a second, not one per call, until its
/// announcement runs out.
pub const UNREACHABLE_BACKOFF: Duration = Duration::from_secs(1);
/// HTTP/2 keep-alive to peers: a connection whose peer stopped answering is found dead within
/// about two of these, and the calls on it end.
pub const PEER_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// The deadline sent with a forward whose caller set none (the transport's own default).
pub const FORWARD_DEADLINE_DEFAULT: Duration = Duration::from_secs(30);

/// Where a call came from, as the owner needs it: the caller's deadline, principal and trace
/// context, and whether it was forwarded already.
#[derive(Debug, Clone)]
pub struct Origin {
    pub deadline: Option<Instant>,
    pub principal: Principal,
    /// `traceparent` and `tracestate`, as the caller sent them.
    pub trace: Vec<(&'static str, AsciiMetadataValue)>,
    /// Came through `Peer/Forward`: served here, never forwarded again.
    pub forwarded: bool,
}

/// The W3C trace context headers a forward carries on.
pub const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// How this coordinator proves to its peers that it is one of them.
#[derive(Clone, Default)]
pub struct PeerCredentials {
    /// `Bearer <token>` of a principal with the `peer` role (`--peer-token-file`).
    pub authorization: Option<AsciiMetadataValue>,
    /// For `https://` peers: the CA their certificates chain to (`--peer-ca`), and this
    /// coordinator's own certificate when peers require client certificates.
    pub tls: Option<ClientTlsConfig>,
}

impl fmt::Debug for PeerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerCredentials")
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Where a call is served.
#[derive(Debug)]
pub enum Routed {
    /// Here: this coordinator owns the account, the call was forwarded already, or the owner
    /// could not be reached.
    Here,
    /// The owner's answer, to relay unchanged.
    There(Box<Result<pb::forward_reply::Reply, Status>>),
}

/// How forwards ended, for tests and the log (the metric is `lockstep_forwards_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardCounts {
    pub forwarded: u64,
    pub served_here: u64,
    pub failed: u64,
}

#[derive(Debug)]
pub struct Forwarder {
    membership: Arc<Membership>,
    credentials: PeerCredentials,
    channels: Mutex<HashMap<Arc<str>, Channel>>,
    unreachable_until: Mutex<HashMap<Arc<str>, Instant>>,
    forwarded: AtomicU64,
    served_here: AtomicU64,
    failed: AtomicU64,
}

impl Forwarder {
    pub fn new(membership: Arc<Membership>, credentials: PeerCredentials) -> Self {
        Self {
            membership,
            credentials,
            channels: Mutex::default(),
            unreachable_until: Mutex::default(),
            forwarded: AtomicU64::new(0),
            served_here: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }

    pub fn counts(&self) -> ForwardCounts {
        ForwardCounts {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            served_here: self.served_here.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// Sends the call to the owner of `account` when that is another coordinator and the call
    /// was not forwarded already; `retry_safe` when it carries a request id. `call` builds the
    /// forwarded message only when one is sent.
    pub async fn route(
        &self,
        origin: &Origin,
        account: &UserId,
        retry_safe: bool,
        call: impl FnOnce() -> pb::forward_request::Call,
    ) -> Routed {
        let Some((owner, channel)) = self.owner_channel(origin, account) else {
            return Routed::Here;
        };
        let remaining = origin.deadline.map_or(FORWARD_DEADLINE_DEFAULT, |deadline| {
            deadline.saturating_duration_since(Instant::now())
        });
        let message = pb::ForwardRequest {
            principal: origin.principal.to_string(),
            call: Some(call()),
        };
        let request = self.to_owner(origin, message, remaining);
        let until = Instant::now() + remaining;
        let Ok(result) = tokio::time::timeout_at(until, PeerClient::new(channel).forward(request)).await else {
            // The caller's deadline passed while the owner worked on the call; the owner may still
            // apply it, as any call whose caller gave up during its commit.
            self.count(&self.forwarded, "forwarded");
            return Routed::There(Box::new(Err(deadline_exceeded())));
        };
        match result {
            Ok(reply) => {
                self.count(&self.forwarded, "forwarded");
                Routed::There(Box::new(
                    reply
                        .into_inner()
                        .reply
                        .ok_or_else(|| Status::internal("the owner coordinator sent an empty reply")),
                ))
            }
            Err(status) if never_sent(&status) => {
                tracing::warn!(peer = %owner.name, address = %owner.address, error = %status.message(), "the owner coordinator cannot be reached; serving here");
                self.mark_unreachable(&owner);
                self.served_here()
            }
            // The caller's deadline ran out while the owner worked on the call (tonic enforces
            // the forward's timeout here): the caller's answer, not a lost owner.
            Err(status) if deadline_passed(&status) => {
                self.count(&self.forwarded, "forwarded");
                Routed::There(Box::new(Err(deadline_exceeded())))
            }
            // The owner refused this coordinator itself (a peer token it does not know, no peer
            // role, a version without Peer/Forward): nothing was served there. Serve it here,
            // and say loudly that affinity is misconfigured.
            Err(status)
                if status.source().is_none()
                    && matches!(
                        status.code(),
                        Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented
                    ) =>
            {
                tracing::error!(peer = %owner.name, code = ?status.code(), error = %status.message(), "the owner coordinator refused this coordinator's forward; check --peer-token-file and the peer role in its --auth-file; serving here");
                self.mark_unreachable(&owner);
                self.served_here()
            }
            // The owner's own answer: a status it sent, which carries no local error source.
            Err(status) if status.source().is_none() => {
                self.count(&self.forwarded, "forwarded");
                Routed::There(Box::new(Err(status)))
            }
            Err(status) => {
                tracing::warn!(peer = %owner.name, error = %status.message(), retry_safe, "the connection to the owner coordinator was lost during a call");
                self.mark_unreachable(&owner);
                if retry_safe {
                    // The request record makes a second try exactly-once, whatever the owner did.
                    self.served_here()
                } else {
                    self.count(&self.failed, "failed");
                    Routed::There(Box::new(Err(Status::unavailable(format!(
                        "the coordinator that owns this account ({}) was lost while serving the call, which may or may not have applied; send a request_id to make retries safe",
                        owner.name
                    )))))
                }
            }
        }
    }

    /// Opens `request`'s WatchLedger stream at the owner of `account` when that is another
    /// coordinator and it answers: Some(the owner's stream, or its refusal), or None to serve
    /// the stream here (owned here, already forwarded, or the owner out of reach).
    pub async fn watch(
        &self,
        origin: &Origin,
        account: &UserId,
        request: pb::WatchLedgerRequest,
    ) -> Option<Result<tonic::Streaming<pb::LedgerEvent>, Status>> {
        let (owner, channel) = self.owner_channel(origin, account)?;
        // Until the stream opens; then it lasts as long as its caller stays.
        let request = self.to_owner(origin, request, FORWARD_DEADLINE_DEFAULT);
        match PeerClient::new(channel).forward_watch(request).await {
            Ok(stream) => {
                self.count(&self.forwarded, "forwarded");
                Some(Ok(stream.into_inner()))
            }
            // The owner's own refusal (no account, a cursor past the end, too many watchers).
            Err(status)
                if status.source().is_none()
                    && !never_sent(&status)
                    && !matches!(
                        status.code(),
                        Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented | Code::Unavailable
                    ) =>
            {
                self.count(&self.forwarded, "forwarded");
                Some(Err(status))
            }
            Err(status) => {
                tracing::warn!(peer = %owner.name, code = ?status.code(), error = %status.message(), "cannot open the watch at the owner coordinator; serving it here");
                self.mark_unreachable(&owner);
                self.served_here();
                None
            }
        }
    }

    /// The owner of `account` and a channel to it, when the call should go there: not already
    /// forwarded, owned by another coordinator, and that one not known out of reach (then the
    /// call is counted as served here).
    fn owner_channel(&self, origin: &Origin, account: &UserId) -> Option<(Peer, Channel)> {
        if origin.forwarded {
            return None;
        }
        let Owner::Peer(owner) = self.membership.owner_of(account) else {
            return None;
        };
        if self.skipped(&owner) {
            self.served_here();
            return None;
        }
        match self.channel(&owner) {
            Ok(channel) => Some((owner, channel)),
            Err(error) => {
                tracing::warn!(peer = %owner.name, address = %owner.address, %error, "cannot dial the owner coordinator; serving here");
                self.mark_unreachable(&owner);
                self.served_here();
                None
            }
        }
    }

    /// `message` as sent to the owner: with `timeout`, the caller's trace context and this
    /// coordinator's peer credentials.
    fn to_owner<T>(&self, origin: &Origin, message: T, timeout: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        let metadata = request.metadata_mut();
        for (name, value) in &origin.trace {
            metadata.insert(*name, value.clone());
        }
        if let Some(authorization) = &self.credentials.authorization {
            metadata.insert("authorization", authorization.clone());
        }
        request
    }

    fn served_here(&self) -> Routed {
        self.count(&self.served_here, "served_here");
        Routed::Here
    }

    fn count(&self, counter: &AtomicU64, outcome: &'static str) {
        counter.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::metrics::forwarded(outcome);
    }

    fn skipped(&self, owner: &Peer) -> bool {
        let mut unreachable = self
            .unreachable_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match unreachable.get(&owner.address) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                unreachable.remove(&owner.address);
                false
            }
            None => false,
        }
    }

    fn mark_unreachable(&self, owner: &Peer) {
        let now = Instant::now();
        let mut unreachable = self
            .unreachable_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        unreachable.retain(|_, until| *until > now);
        unreachable.insert(Arc::clone(&owner.address), now + UNREACHABLE_BACKOFF);
    }

    /// The kept connection to `owner`, made (lazily: the first call connects) on first use.
    fn channel(&self, owner: &Peer) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(channel) = channels.get(&owner.address) {
            return Ok(channel.clone());
        }
        let mut endpoint = Endpoint::from_shared(owner.address.to_string())?
            .connect_timeout(PEER_CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(PEER_KEEP_ALIVE)
            .keep_alive_timeout(PEER_KEEP_ALIVE)
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.credentials.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        let channel = endpoint.connect_lazy();
        // Connections to coordinators no longer live (restarted elsewhere, scaled down) go when
        // a new one is made: the map holds at most the live members and this one.
        let live = self.membership.live();
        channels.retain(|address, _| live.iter().any(|peer| peer.address == *address));
        channels.insert(Arc::clone(&owner.address), channel.clone());
        Ok(channel)
    }
}

fn deadline_exceeded() -> Status {
    Status::deadline_exceeded(
        "Deadline exceeded while the account's owner coordinator served the call; it may still apply: retry with the same request_id to learn its outcome",
    )
}

/// Whether the forward's own timeout (the caller's deadline) ended it here.
fn deadline_passed(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// Whether the call failed before any of it left this process: the connection could not be
/// made. Then the owner certainly did not serve it.
fn never_sent(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        source = error.source();
    }
    false
}
