//! The connection to the coordinator: one lazily connected gRPC channel shared by every request,
//! and [`CoordinatorConnection::call`], the only way handlers reach it.

use std::future::Future;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use lockstep::coordinator::v1::coordinator_client::CoordinatorClient;
use tonic::transport::{Channel, Endpoint};
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
    health: HealthClient<Channel>,
    request_timeout: Duration,
}

impl CoordinatorConnection {
    /// Does not wait for the coordinator: the channel connects on first use and reconnects after
    /// a failure, so a service starts (and answers 503) while the coordinator is down.
    pub fn connect_lazy(settings: &CoordinatorSettings) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(settings.coordinator_url.clone())?
            .connect_timeout(settings.connect_timeout())
            .timeout(settings.request_timeout())
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            client: CoordinatorClient::new(channel.clone()),
            health: HealthClient::new(channel),
            request_timeout: settings.request_timeout(),
        })
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
            let request = context.grpc_request(message.clone(), deadline)?;
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
        let request = context.grpc_request(
            HealthCheckRequest {
                service: COORDINATOR_SERVICE.to_owned(),
            },
            context.deadline(self.request_timeout),
        )?;
        let reply = self.health.clone().check(request).await?.into_inner();
        Ok(reply.status())
    }
}
