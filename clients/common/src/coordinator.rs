//! The connection to the coordinator: one lazily connected gRPC channel shared by every request,
//! and [`CoordinatorConnection::call`], the only way handlers reach it.

use std::future::Future;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use lockstep::coordinator::v1::coordinator_client::CoordinatorClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::error::{ApiError, retry_advice};
use crate::http::RequestContext;
use crate::settings::CoordinatorSettings;

/// Retries after the first attempt when the coordinator is UNAVAILABLE: enough to ride out a
/// restart or a dropped connection, few enough that a down coordinator answers 503 quickly.
pub const RETRY_ATTEMPTS_MAX: usize = 3;
/// First retry delay; later ones double, with jitter so that many clients do not retry in step.
pub const RETRY_DELAY_MIN: Duration = Duration::from_millis(50);
/// Longest single retry delay.
pub const RETRY_DELAY_MAX: Duration = Duration::from_secs(1);
/// The gRPC metadata key that carries the request id to the coordinator's logs.
pub const REQUEST_ID_METADATA: &str = "x-request-id";
/// The coordinator's gRPC service name, which its readiness is reported under.
pub const COORDINATOR_SERVICE: &str = "lockstep.coordinator.v1.Coordinator";

/// A service's connection to the coordinator (a client, not the coordinator's own service type):
/// cheap to clone, shared by every request as the router's state.
#[derive(Debug, Clone)]
pub struct CoordinatorConnection {
    client: CoordinatorClient<Channel>,
    /// Long-lived streams (WatchLedger) on a connection of their own, without the request
    /// timeout: many open streams never take the HTTP/2 stream slots the calls need.
    streams: CoordinatorClient<Channel>,
    health: HealthClient<Channel>,
    request_timeout: Duration,
    /// `Bearer <token>` for the `authorization` metadata of every call, when configured.
    token: Option<BearerToken>,
}

/// A bearer token's metadata value; never printed.
#[derive(Clone)]
struct BearerToken(MetadataValue<Ascii>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Why the coordinator connection cannot be set up (a bad URL, an unreadable file).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Settings(String),
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|error| ConnectError::Settings(format!("{}: {error}", path.display())))
}

/// The TLS configuration the flags ask for: None without `--coordinator-ca` and a plain
/// `http://` URL.
fn tls_of(settings: &CoordinatorSettings) -> Result<Option<ClientTlsConfig>, ConnectError> {
    let https = settings.coordinator_url.starts_with("https://");
    let mut config = match (&settings.coordinator_ca, https) {
        (Some(ca), _) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_file(ca)?)),
        (None, true) => {
            return Err(ConnectError::Settings(
                "an https:// coordinator URL needs --coordinator-ca".to_owned(),
            ));
        }
        (None, false) => {
            if settings.coordinator_cert.is_some() {
                return Err(ConnectError::Settings(
                    "--coordinator-cert needs --coordinator-ca (TLS)".to_owned(),
                ));
            }
            return Ok(None);
        }
    };
    match (&settings.coordinator_cert, &settings.coordinator_key) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(read_file(cert)?, read_file(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(ConnectError::Settings(
                "--coordinator-cert and --coordinator-key go together".to_owned(),
            ));
        }
    }
    Ok(Some(config))
}

fn token_of(settings: &CoordinatorSettings) -> Result<Option<BearerToken>, ConnectError> {
    let Some(path) = &settings.coordinator_token_file else {
        return Ok(None);
    };
    let text = String::from_utf8(read_file(path)?)
        .map_err(|_| ConnectError::Settings(format!("{}: the token is not text", path.display())))?;
    let token = text.trim_end_matches(['\r', '\n']);
    if token.is_empty() {
        return Err(ConnectError::Settings(format!("{}: the file is empty", path.display())));
    }
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| ConnectError::Settings(format!("{}: the token is not printable ASCII", path.display())))?;
    Ok(Some(BearerToken(value)))
}

impl CoordinatorConnection {
    /// Does not wait for the coordinator: the channel connects on first use and reconnects after
    /// a failure, so a service starts (and answers 503) while the coordinator is down.
    pub fn connect_lazy(settings: &CoordinatorSettings) -> Result<Self, ConnectError> {
        let mut endpoint = Endpoint::from_shared(settings.coordinator_url.clone())?
            .connect_timeout(settings.connect_timeout())
            .tcp_nodelay(true);
        if let Some(tls) = tls_of(settings)? {
            endpoint = endpoint.tls_config(tls)?;
        }
        let streams = endpoint.connect_lazy();
        let channel = endpoint.timeout(settings.request_timeout()).connect_lazy();
        Ok(Self {
            client: CoordinatorClient::new(channel.clone()),
            streams: CoordinatorClient::new(streams),
            health: HealthClient::new(channel),
            request_timeout: settings.request_timeout(),
            token: token_of(settings)?,
        })
    }

    /// `context.grpc_request` with this connection's credentials.
    fn request<M>(&self, context: &RequestContext, message: M, deadline: Instant) -> Result<Request<M>, ApiError> {
        let mut request = context.grpc_request(message, deadline)?;
        if let Some(BearerToken(value)) = &self.token {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }

    /// Opens WatchLedger for `context`'s HTTP request: without a deadline (the stream lasts as
    /// long as the HTTP client stays), with this connection's credentials. Not retried: the
    /// client reconnects with its last event id.
    pub async fn watch_ledger(
        &self,
        context: &RequestContext,
        user_id: String,
        after_sequence: u64,
    ) -> Result<tonic::Streaming<lockstep::coordinator::v1::LedgerEvent>, ApiError> {
        let mut request = context.stream_request(lockstep::coordinator::v1::WatchLedgerRequest {
            user_id,
            after_sequence,
        });
        if let Some(BearerToken(value)) = &self.token {
            request.metadata_mut().insert("authorization", value.clone());
        }
        let response = self.streams.clone().watch_ledger(request).await?;
        Ok(response.into_inner())
    }

    /// Calls one RPC for `context`'s HTTP request: `rpc` gets a client and the request to send,
    /// e.g. `|mut client, request| async move { client.deposit(request).await }`.
    ///
    /// Each attempt carries the time left until the request's deadline as its gRPC deadline and
    /// the request id as `x-request-id`. UNAVAILABLE is retried with a clone of `message`: for a
    /// mutation that is the same `request_id`, so the coordinator applies it at most once.
    pub async fn call<M, R, F, Fut>(&self, context: &RequestContext, message: M, rpc: F) -> Result<R, ApiError>
    where
        M: Clone,
        F: Fn(CoordinatorClient<Channel>, Request<M>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let deadline = context.deadline(self.request_timeout);
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(RETRY_DELAY_MIN)
            .with_max_delay(RETRY_DELAY_MAX)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(RETRY_ATTEMPTS_MAX)
            .build();
        loop {
            let request = self.request(context, message.clone(), deadline)?;
            let status = match rpc(self.client.clone(), request).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            // The coordinator's RetryInfo, when it sends one, is the shortest sensible wait.
            if status.code() == Code::Unavailable
                && let Some(delay) = delays
                    .next()
                    .map(|delay| delay.max(retry_advice(&status).unwrap_or_default()))
                && Instant::now() + delay < deadline
            {
                tracing::warn!(
                    message = status.message(),
                    delay_ms = delay.as_millis() as u64,
                    "coordinator unavailable; retrying with the same request id"
                );
                tokio::time::sleep(delay).await;
                continue;
            }
            // tonic's client enforces the deadline we set and reports it as CANCELLED.
            if status.code() == Code::Cancelled && Instant::now() >= deadline {
                return Err(ApiError::deadline_exceeded());
            }
            return Err(ApiError::from(status));
        }
    }

    /// The coordinator's readiness (grpc.health.v1 under its service name): SERVING only while
    /// it runs and its storage answers. ("" is only the coordinator's liveness.)
    pub async fn health(&self, context: &RequestContext) -> Result<ServingStatus, ApiError> {
        let request = self.request(
            context,
            HealthCheckRequest {
                service: COORDINATOR_SERVICE.to_owned(),
            },
            context.deadline(self.request_timeout),
        )?;
        let reply = self.health.clone().check(request).await?.into_inner();
        Ok(reply.status())
    }
}
