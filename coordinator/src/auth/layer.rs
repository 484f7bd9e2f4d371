//! The tower layer in front of every gRPC service: authenticates the caller, checks the role
//! table, puts the principal into the request's extensions and records it on the call's span
//! (opened by `telemetry::rpc`, the outer layer). A refusal answers before any service runs, so it writes nothing.

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::codegen::http;
use tower::{Layer, Service};

use super::roles::{Access, access_of, describe};
use super::{Authenticator, Caller};

#[derive(Debug, Clone)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self { authenticator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: Arc::clone(&self.authenticator),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Arc<Authenticator>,
}

/// Whether `caller` may call `path`: the status of the refusal if not.
pub fn authorize(path: &str, access: Option<Access>, caller: &Caller) -> Result<(), Status> {
    match access {
        Some(Access::Open | Access::Authenticated) => Ok(()),
        Some(Access::AnyOf(needed)) => {
            if needed.iter().any(|role| caller.roles.contains(role)) {
                Ok(())
            } else {
                let held = if caller.roles.is_empty() {
                    "no role".to_owned()
                } else {
                    caller
                        .roles
                        .iter()
                        .map(|role| role.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                Err(Status::permission_denied(format!(
                    "{path} needs the {} role; {} has {held}",
                    describe(needed),
                    caller.principal
                )))
            }
        }
        None => Err(Status::permission_denied(format!("{path} is not open to any role"))),
    }
}

impl<S, B> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone is the service that was not polled ready; swap so `self` keeps a fresh one
        // and the ready one handles this call (tower's documented pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path().to_owned();
        let access = access_of(&path);
        let decision = if self.authenticator.is_local() {
            Ok(Caller::local())
        } else if access == Some(Access::Open) {
            // Probes carry no credentials; nothing behind an open path is a secret or a write.
            Ok(Caller::anonymous())
        } else {
            self.authenticator
                .authenticate(request.headers(), request.extensions())
                .and_then(|caller| authorize(&path, access, &caller).map(|()| caller))
        };
        match decision {
            Ok(caller) => {
                // The call's span (telemetry::rpc, the outer layer) names who made it, on every
                // log line of the call.
                tracing::Span::current().record("principal", tracing::field::display(&caller.principal));
                request.extensions_mut().insert(caller.principal);
                Box::pin(async move { inner.call(request).await })
            }
            Err(status) => {
                tracing::info!(method = %path, code = ?status.code(), reason = status.message(), "call refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
