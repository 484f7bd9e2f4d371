//! A storage fault injector: an HTTP/1.1 reverse proxy on a loopback port that forwards DynamoDB
//! JSON requests (`POST /` with an `X-Amz-Target` header) to an upstream endpoint (dynoxide's HTTP
//! server, moto) and, at a configurable rate, misbehaves the way a real storage service does.
//!
//! A test points the coordinator's `--dynamodb-endpoint` at [`FaultProxy::endpoint`]. Each
//! eligible request draws a fault with probability `rate`, the kind chosen at random among the
//! enabled [`FaultKind`]s:
//!
//! | kind | upstream sees the request | the caller sees |
//! |---|---|---|
//! | [`FaultKind::ServerError`] | no | 500 `InternalServerError` |
//! | [`FaultKind::Throttle`] | no | 400 `ProvisionedThroughputExceededException`, then `ThrottlingException`, alternately |
//! | [`FaultKind::Delay`] | yes, after the delay, even if the caller gave up | the reply, late |
//! | [`FaultKind::ResetBefore`] | no | a connection reset, no reply |
//! | [`FaultKind::LostReply`] | yes, and it is applied | a connection reset, no reply |
//!
//! Only requests with an `X-Amz-Target` header are eligible, and [`FaultConfig::exempt_targets`]
//! (`DescribeTable` by default, so a health probe alone does not flap) always pass through.
//! Decisions come from one random generator seeded by [`FaultConfig::seed`], drawn in the order
//! requests arrive: the same seed and the same order of requests give the same faults.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};

/// How long a [`FaultKind::Delay`] holds a request by default: past the coordinator's 2 s
/// attempt timeout (`storage::dynamodb::ATTEMPT_TIMEOUT`), so the caller gives up and the request
/// may still apply afterwards.
pub const DELAY_DEFAULT: Duration = Duration::from_millis(2_500);

/// The target a health probe sends; exempt by default so that a probe alone never fails.
pub const DESCRIBE_TABLE_TARGET: &str = "DynamoDB_20120810.DescribeTable";

/// DynamoDB caps a request at 16 MB (`BatchWriteItem`, `TransactWriteItems`); anything larger is
/// refused rather than buffered.
const REQUEST_BODY_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Replies are buffered whole before they are sent on (a lost reply must be complete upstream
/// first); a `Query` or `Scan` page is at most 1 MB, so this leaves ample room.
const RESPONSE_BODY_BYTES_MAX: usize = 16 * 1024 * 1024;
/// One forwarded request, connect to last byte of the reply: local storage answers in
/// milliseconds, and this bounds how long `stop` can wait for a forward already under way.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A failing `accept` (out of file descriptors) is retried after this pause instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

const AMZ_TARGET: &str = "x-amz-target";
const AMZ_REQUEST_ID: &str = "x-amzn-requestid";
const AMZ_JSON: &str = "application/x-amz-json-1.0";
const ERROR_TYPE_PREFIX: &str = "com.amazonaws.dynamodb.v20120810#";

/// Headers that describe one hop, not the message: never copied from one connection to the next.
/// `content-length` is recomputed from the buffered body.
const HOP_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// One way the proxy misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// Reply 500 `InternalServerError` without forwarding.
    ServerError,
    /// Reply 400 `ProvisionedThroughputExceededException` or `ThrottlingException` (alternately)
    /// without forwarding.
    Throttle,
    /// Wait [`FaultConfig::delay`], then forward; the request applies even if the caller gave up.
    Delay,
    /// Drop the connection without forwarding and without replying.
    ResetBefore,
    /// Forward, let upstream apply the request, then drop the connection instead of replying.
    LostReply,
}

impl FaultKind {
    pub const ALL: [FaultKind; 5] = [
        FaultKind::ServerError,
        FaultKind::Throttle,
        FaultKind::Delay,
        FaultKind::ResetBefore,
        FaultKind::LostReply,
    ];
}

/// What the proxy injects, how often, and from which seed.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// The probability, in `0.0..=1.0`, that an eligible request gets a fault.
    pub rate: f64,
    /// The kinds to choose from, uniformly; a kind listed twice is chosen twice as often. Empty
    /// means no faults at all.
    pub kinds: Vec<FaultKind>,
    /// How long [`FaultKind::Delay`] holds a request before forwarding it.
    pub delay: Duration,
    /// Seeds the generator that decides which request gets which fault.
    pub seed: u64,
    /// `X-Amz-Target` values that always pass through untouched.
    pub exempt_targets: Vec<String>,
}

impl Default for FaultConfig {
    /// No faults yet (rate 0), every kind enabled, the default delay, and `DescribeTable` exempt.
    fn default() -> Self {
        Self {
            rate: 0.0,
            kinds: FaultKind::ALL.to_vec(),
            delay: DELAY_DEFAULT,
            seed: 0,
            exempt_targets: vec![DESCRIBE_TABLE_TARGET.to_owned()],
        }
    }
}

impl FaultConfig {
    /// Only `kind`, at `rate`; the other settings are the defaults.
    pub fn only(kind: FaultKind, rate: f64) -> Self {
        Self {
            rate,
            kinds: vec![kind],
            ..Self::default()
        }
    }
}

/// What the proxy has seen and done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Client connections accepted; pooled keep-alive connections count once.
    pub connections: u64,
    /// Requests received, eligible for faults or not.
    pub requests: u64,
    /// Requests sent upstream, delayed and lost-reply ones included.
    pub forwarded: u64,
    /// Forwards that got no reply from upstream (answered 502).
    pub upstream_failures: u64,
    pub server_errors: u64,
    pub throttles: u64,
    pub delays: u64,
    pub resets_before: u64,
    pub lost_replies: u64,
}

impl FaultCounts {
    /// How many faults of `kind` were injected.
    pub fn of(&self, kind: FaultKind) -> u64 {
        match kind {
            FaultKind::ServerError => self.server_errors,
            FaultKind::Throttle => self.throttles,
            FaultKind::Delay => self.delays,
            FaultKind::ResetBefore => self.resets_before,
            FaultKind::LostReply => self.lost_replies,
        }
    }

    /// How many faults were injected, of every kind.
    pub fn injected(&self) -> u64 {
        FaultKind::ALL.iter().map(|&kind| self.of(kind)).sum()
    }
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    forwarded: AtomicU64,
    upstream_failures: AtomicU64,
    server_errors: AtomicU64,
    throttles: AtomicU64,
    delays: AtomicU64,
    resets_before: AtomicU64,
    lost_replies: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> FaultCounts {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        FaultCounts {
            connections: read(&self.connections),
            requests: read(&self.requests),
            forwarded: read(&self.forwarded),
            upstream_failures: read(&self.upstream_failures),
            server_errors: read(&self.server_errors),
            throttles: read(&self.throttles),
            delays: read(&self.delays),
            resets_before: read(&self.resets_before),
            lost_replies: read(&self.lost_replies),
        }
    }
}

/// Decides, request by request, whether to inject and what.
#[derive(Debug)]
struct Decider {
    random: fastrand::Rng,
    kinds: Vec<FaultKind>,
}

impl Decider {
    fn new(seed: u64, kinds: Vec<FaultKind>) -> Self {
        Self {
            random: fastrand::Rng::with_seed(seed),
            kinds,
        }
    }

    /// Draws the same amount of randomness whatever `rate` is, so the n-th eligible request gets
    /// the same roll for a given seed even when a test lowered the rate for its setup.
    fn decide(&mut self, rate: f64) -> Option<FaultKind> {
        let roll = self.random.f64();
        let choice = self.random.usize(..self.kinds.len().max(1));
        (roll < rate).then(|| self.kinds.get(choice).copied()).flatten()
    }
}

fn check_rate(rate: f64) -> bool {
    (0.0..=1.0).contains(&rate)
}

/// Everything the connection tasks share.
struct Shared {
    upstream: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
    rate_bits: AtomicU64,
    decider: Mutex<Decider>,
    delay: Duration,
    exempt_targets: Vec<String>,
    counters: Counters,
}

impl Shared {
    fn rate(&self) -> f64 {
        f64::from_bits(self.rate_bits.load(Ordering::Relaxed))
    }

    /// The fault for a request with these headers, if it gets one.
    fn fault_for(&self, headers: &HeaderMap) -> Option<FaultKind> {
        let target = headers.get(AMZ_TARGET)?.to_str().ok()?;
        if self.exempt_targets.iter().any(|exempt| exempt == target) {
            return None;
        }
        let rate = self.rate();
        self.decider.lock().unwrap_or_else(PoisonError::into_inner).decide(rate)
    }

    fn count(&self, counter: impl FnOnce(&Counters) -> &AtomicU64) -> u64 {
        counter(&self.counters).fetch_add(1, Ordering::Relaxed)
    }
}

/// A running fault proxy; stops when dropped or through [`FaultProxy::stop`].
pub struct FaultProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    /// Yields `None` once every task of the proxy has ended: each holds a sender.
    finished: Option<mpsc::Receiver<()>>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("FaultProxy")
            .field("address", &self.address)
            .field("upstream", &self.shared.upstream)
            .field("rate", &self.shared.rate())
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`http://127.0.0.1:port`).
    pub async fn start(upstream: String, config: FaultConfig) -> std::io::Result<FaultProxy> {
        let invalid = |message: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, message);
        let upstream: Uri = upstream
            .parse()
            .map_err(|error| invalid(format!("upstream {upstream:?}: {error}")))?;
        if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
            return Err(invalid(format!("upstream {upstream} is not http://host:port")));
        }
        if !check_rate(config.rate) {
            return Err(invalid(format!("fault rate {} is outside 0.0..=1.0", config.rate)));
        }

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(UPSTREAM_CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new()).build(connector);

        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            client,
            rate_bits: AtomicU64::new(config.rate.to_bits()),
            decider: Mutex::new(Decider::new(config.seed, config.kinds)),
            delay: config.delay,
            exempt_targets: config.exempt_targets,
            counters: Counters::default(),
        });
        let (shutdown, shutdown_signal) = watch::channel(false);
        let (running, finished) = mpsc::channel(1);
        tokio::spawn(accept_loop(listener, shared.clone(), running, shutdown_signal));
        tracing::debug!(%address, upstream = %shared.upstream, "fault proxy started");
        Ok(FaultProxy {
            address,
            shared,
            shutdown,
            finished: Some(finished),
        })
    }

    /// The URL to give the SDK as its endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn counts(&self) -> FaultCounts {
        self.shared.counters.snapshot()
    }

    /// Changes the fault rate from the next request on: 0 for a test's setup and final audit.
    ///
    /// # Panics
    /// When `rate` is outside `0.0..=1.0`.
    pub fn set_rate(&self, rate: f64) {
        assert!(check_rate(rate), "fault rate {rate} is outside 0.0..=1.0");
        self.shared.rate_bits.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Stops accepting, closes every client connection, and waits for forwards already sent
    /// upstream to finish (delayed requests not yet sent are dropped): once this returns, the
    /// proxy sends nothing more upstream.
    pub async fn stop(mut self) {
        self.shutdown.send_replace(true);
        if let Some(mut finished) = self.finished.take() {
            finished.recv().await;
        }
    }
}

impl Drop for FaultProxy {
    /// Signals every task to stop, without waiting for them.
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    running: mpsc::Sender<()>,
    shutdown: watch::Receiver<bool>,
) {
    let stop = stopped(shutdown.clone());
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    shared.count(|counters| &counters.connections);
                    tokio::spawn(serve_connection(stream, shared.clone(), running.clone(), shutdown.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "fault proxy accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            () = &mut stop => break,
        }
    }
}

/// Resolves once the proxy is told to stop (or its handle is gone).
async fn stopped(mut shutdown: watch::Receiver<bool>) {
    // An error means the sender, and so the proxy handle, is gone: that is a stop too.
    let _ = shutdown.wait_for(|stopped| *stopped).await;
}

/// What the proxy does with one request.
enum Outcome {
    Reply(Response<Full<Bytes>>),
    /// Close the connection abruptly, with no reply.
    Reset,
}

async fn serve_connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    running: mpsc::Sender<()>,
    shutdown: watch::Receiver<bool>,
) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "fault proxy could not set TCP_NODELAY");
    }
    // hyper cannot drop a connection from inside a service, so the service asks the task to.
    let reset = Arc::new(Notify::new());
    let service = {
        let reset = reset.clone();
        let running = running.clone();
        let shutdown = shutdown.clone();
        service_fn(move |request| {
            let shared = shared.clone();
            let reset = reset.clone();
            let running = running.clone();
            let shutdown = shutdown.clone();
            async move {
                match handle(shared, request, running, shutdown).await {
                    Outcome::Reply(response) => Ok::<_, Infallible>(response),
                    Outcome::Reset => {
                        reset.notify_one();
                        std::future::pending().await
                    }
                }
            }
        })
    };
    let mut connection = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = &mut connection => {
            if let Err(error) = result {
                tracing::debug!(%error, "fault proxy connection ended with an error");
            }
        }
        () = reset.notified() => {
            // A zero linger makes the close send RST instead of FIN: a reset, as the kind says.
            let stream = connection.into_parts().io.into_inner();
            if let Err(error) = stream.set_zero_linger() {
                tracing::debug!(%error, "fault proxy could not set SO_LINGER");
            }
            drop(stream);
        }
        () = stopped(shutdown) => {}
    }
    drop(running);
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    running: mpsc::Sender<()>,
    shutdown: watch::Receiver<bool>,
) -> Outcome {
    let request_number = shared.count(|counters| &counters.requests);
    let fault = shared.fault_for(request.headers());
    let (parts, body) = request.into_parts();
    // The whole body is read before anything else: a forward must carry it even when the caller
    // has gone away by then.
    let body = match Limited::new(body, REQUEST_BODY_BYTES_MAX).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            return Outcome::Reply(plain_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"));
        }
        Err(error) => {
            tracing::debug!(%error, "fault proxy could not read a request body");
            return Outcome::Reset;
        }
    };
    if let Some(kind) = fault {
        let target = parts.headers.get(AMZ_TARGET).and_then(|value| value.to_str().ok());
        tracing::debug!(?kind, target, request_number, "fault proxy injects a fault");
    }
    let request_id = format!("lockstep-fault-proxy-{request_number}");
    match fault {
        None => forward(shared, parts, body, None, running, shutdown).await,
        Some(FaultKind::ServerError) => {
            shared.count(|counters| &counters.server_errors);
            Outcome::Reply(error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                &request_id,
            ))
        }
        Some(FaultKind::Throttle) => {
            let error_type = if shared.count(|counters| &counters.throttles).is_multiple_of(2) {
                "ProvisionedThroughputExceededException"
            } else {
                "ThrottlingException"
            };
            Outcome::Reply(error_response(StatusCode::BAD_REQUEST, error_type, &request_id))
        }
        Some(FaultKind::Delay) => {
            shared.count(|counters| &counters.delays);
            let delay = shared.delay;
            forward(shared, parts, body, Some(delay), running, shutdown).await
        }
        Some(FaultKind::ResetBefore) => {
            shared.count(|counters| &counters.resets_before);
            Outcome::Reset
        }
        Some(FaultKind::LostReply) => {
            shared.count(|counters| &counters.lost_replies);
            // The reply is awaited, so upstream has applied the request before the reset.
            forward(shared, parts, body, None, running, shutdown).await;
            Outcome::Reset
        }
    }
}

/// Sends the request upstream after an optional delay, in a task of its own: once a request has
/// reached "storage" it completes, as on a real server, even if the caller hangs up meanwhile.
async fn forward(
    shared: Arc<Shared>,
    parts: hyper::http::request::Parts,
    body: Bytes,
    delay: Option<Duration>,
    running: mpsc::Sender<()>,
    shutdown: watch::Receiver<bool>,
) -> Outcome {
    let task = tokio::spawn(async move {
        let _running = running;
        if let Some(delay) = delay {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(shutdown) => return Err("the proxy stopped".to_owned()),
            }
        }
        shared.count(|counters| &counters.forwarded);
        let result = send_upstream(&shared, parts, body).await;
        if result.is_err() {
            shared.count(|counters| &counters.upstream_failures);
        }
        result
    });
    match task.await {
        Ok(Ok(response)) => Outcome::Reply(response),
        Ok(Err(error)) => {
            tracing::warn!(%error, "fault proxy forward failed");
            Outcome::Reply(plain_response(StatusCode::BAD_GATEWAY, &error))
        }
        Err(error) => Outcome::Reply(plain_response(StatusCode::BAD_GATEWAY, &error.to_string())),
    }
}

async fn send_upstream(
    shared: &Shared,
    parts: hyper::http::request::Parts,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, String> {
    let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    let uri = Uri::builder()
        .scheme("http")
        .authority(shared.upstream.authority().cloned().expect("checked at start"))
        .path_and_query(path)
        .build()
        .map_err(|error| format!("upstream uri: {error}"))?;
    let mut request = Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(Full::new(body))
        .map_err(|error| format!("upstream request: {error}"))?;
    // The Host header is kept as the caller sent it: it is part of the SigV4 signature.
    *request.headers_mut() = end_to_end_headers(parts.headers);

    let exchange = async {
        let response = shared
            .client
            .request(request)
            .await
            .map_err(|error| format!("upstream request failed: {error}"))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, RESPONSE_BODY_BYTES_MAX)
            .collect()
            .await
            .map_err(|error| format!("upstream reply body: {error}"))?
            .to_bytes();
        Ok::<_, String>((parts, body))
    };
    let (upstream_parts, body) = tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("upstream did not answer within {UPSTREAM_TIMEOUT:?}"))??;
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = upstream_parts.status;
    *response.headers_mut() = end_to_end_headers(upstream_parts.headers);
    Ok(response)
}

fn end_to_end_headers(mut headers: HeaderMap) -> HeaderMap {
    for name in HOP_HEADERS {
        headers.remove(*name);
    }
    headers
}

/// A DynamoDB JSON error, as the service sends it.
fn error_response(status: StatusCode, error_type: &str, request_id: &str) -> Response<Full<Bytes>> {
    let body = format!(r#"{{"__type":"{ERROR_TYPE_PREFIX}{error_type}","message":"injected"}}"#);
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(AMZ_JSON));
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(HeaderName::from_static(AMZ_REQUEST_ID), value);
    }
    response
}

fn plain_response(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(message.to_owned())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decisions(seed: u64, rate: f64, count: usize) -> Vec<Option<FaultKind>> {
        let mut decider = Decider::new(seed, FaultKind::ALL.to_vec());
        (0..count).map(|_| decider.decide(rate)).collect()
    }

    /// The same seed gives the same faults in the same order; another seed gives others.
    #[test]
    fn decisions_are_deterministic_per_seed() {
        assert_eq!(decisions(7, 0.5, 200), decisions(7, 0.5, 200));
        assert_ne!(decisions(7, 0.5, 200), decisions(8, 0.5, 200));
    }

    /// Rate 0 never injects, rate 1 always does, and every enabled kind comes up.
    #[test]
    fn rate_bounds_and_kind_choice() {
        assert!(decisions(1, 0.0, 500).iter().all(Option::is_none));
        let all = decisions(1, 1.0, 500);
        assert!(all.iter().all(Option::is_some));
        for kind in FaultKind::ALL {
            assert!(all.contains(&Some(kind)), "{kind:?} never chosen");
        }
        let mut none_enabled = Decider::new(1, Vec::new());
        assert_eq!(none_enabled.decide(1.0), None);
    }

    /// A rate of 10 % injects about 10 % of the time.
    #[test]
    fn rate_is_a_probability() {
        let injected = decisions(3, 0.1, 10_000).iter().filter(|fault| fault.is_some()).count();
        assert!((800..=1_200).contains(&injected), "{injected} faults in 10000 at 10 %");
    }

    /// Lowering the rate for a while does not shift the faults the later requests get.
    #[test]
    fn rate_changes_do_not_shift_the_sequence() {
        let mut decider = Decider::new(5, FaultKind::ALL.to_vec());
        for _ in 0..10 {
            assert_eq!(decider.decide(0.0), None);
        }
        let later: Vec<_> = (0..50).map(|_| decider.decide(0.5)).collect();
        assert_eq!(later, decisions(5, 0.5, 60)[10..]);
    }

    /// Injected errors carry the DynamoDB JSON error shape the SDK parses.
    #[test]
    fn error_response_shape() {
        let response = error_response(StatusCode::BAD_REQUEST, "ThrottlingException", "id-1");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()[header::CONTENT_TYPE], AMZ_JSON);
        assert_eq!(response.headers()[AMZ_REQUEST_ID], "id-1");
    }

    /// Hop-by-hop headers are dropped; Host (signed by SigV4) and the target are kept.
    #[test]
    fn only_end_to_end_headers_are_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:1"));
        headers.insert(AMZ_TARGET, HeaderValue::from_static("DynamoDB_20120810.PutItem"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        let kept = end_to_end_headers(headers);
        assert_eq!(kept.len(), 2);
        assert!(kept.contains_key(header::HOST) && kept.contains_key(AMZ_TARGET));
    }
}
