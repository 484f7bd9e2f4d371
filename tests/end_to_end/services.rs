//! The thin HTTP services for a test: `spawn_services(coordinator)` serves user-service's and
//! order-service's routes on port 0 through the shared `server::run`, exactly as their binaries
//! do, and [`Http`] is a small curl-like client over hyper.

use std::net::SocketAddr;

use axum::Router;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::HeaderMap;
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lockstep_client_common::auth::EndUserAuth;
use lockstep_client_common::server;
use lockstep_client_common::{CoordinatorConnection, CoordinatorSettings};
use serde_json::Value;
use tokio::sync::oneshot;

/// user-service and order-service on loopback ports, stopped (gracefully) when dropped.
pub struct Services {
    pub user: SocketAddr,
    pub order: SocketAddr,
    _stops: Vec<oneshot::Sender<()>>,
}

/// Starts both services against the coordinator at `coordinator` (which may be dead).
pub async fn spawn_services(coordinator: SocketAddr) -> Services {
    spawn_services_with(
        CoordinatorSettings::new(format!("http://{coordinator}")),
        EndUserAuth::Off,
    )
    .await
}

/// Starts both services with these coordinator credentials and end-user authentication.
pub async fn spawn_services_with(settings: CoordinatorSettings, end_users: EndUserAuth) -> Services {
    let (user, user_stop) = spawn_service(&settings, end_users.clone(), lockstep_user_service::routes()).await;
    let (order, order_stop) = spawn_service(&settings, end_users, lockstep_order_service::routes()).await;
    Services {
        user,
        order,
        _stops: vec![user_stop, order_stop],
    }
}

/// Serves `routes` on a loopback port through the services' shared `run`, as their binaries do.
async fn spawn_service(
    settings: &CoordinatorSettings,
    end_users: EndUserAuth,
    routes: Router<CoordinatorConnection>,
) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind service");
    let address = listener.local_addr().expect("service address");
    let (stop, stopped) = oneshot::channel::<()>();
    let settings = settings.clone();
    tokio::spawn(async move {
        server::run_with_auth(listener, &settings, end_users, routes, async {
            stopped.await.ok();
        })
        .await
    });
    (address, stop)
}

/// A loopback address nothing listens on.
pub async fn dead_address() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address")
}

/// One HTTP answer: status, headers, and the body parsed as JSON (Null if it is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    /// The envelope's `data`, after checking the reply is a 200 with `success: true`.
    pub fn data(&self) -> &Value {
        assert_eq!(self.status, StatusCode::OK, "{self:?}");
        assert_eq!(self.body["success"], true, "{self:?}");
        assert_eq!(self.body["error"], Value::Null, "{self:?}");
        &self.body["data"]
    }

    /// The envelope's `error`, after checking the status and `success: false`.
    pub fn error(&self, status: StatusCode) -> &Value {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.body["success"], false, "{self:?}");
        assert_eq!(self.body["data"], Value::Null, "{self:?}");
        &self.body["error"]
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// A curl-like HTTP/1 client.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl Http {
    pub async fn get(&self, address: SocketAddr, path: &str) -> Reply {
        self.send(Method::GET, address, path, &[], None).await
    }

    pub async fn post(&self, address: SocketAddr, path: &str, body: &str) -> Reply {
        self.send(Method::POST, address, path, &[], Some(body)).await
    }

    pub async fn send(
        &self,
        method: Method,
        address: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Reply {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{address}{path}"));
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
            .expect("request");
        let response = self.client.request(request).await.expect("HTTP request");
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("HTTP body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }
}
