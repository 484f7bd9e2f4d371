//! dynoxide's HTTP server on a loopback port, in this process: the one way Lockstep's tests and
//! benchmarks stand up a DynamoDB endpoint without moto or AWS (the bank's endpoint runs, the
//! fault proxy's tests, the end-to-end tests' `DynoxideHttp` engine, the storage benchmark).

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running dynoxide HTTP server. It stops when dropped; [`DynoxideServer::stop`] also waits.
#[derive(Debug)]
pub struct DynoxideServer {
    endpoint: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), String>>,
}

impl DynoxideServer {
    /// Serves `database` (in memory, or a file such as an `EmbeddedEngine`'s) on a free loopback
    /// port.
    pub async fn start(database: dynoxide::Database) -> std::io::Result<DynoxideServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(dynoxide::server::serve_with_shutdown(listener, database, async {
            stopped.await.ok();
        }));
        Ok(DynoxideServer { endpoint, stop, task })
    }

    /// `http://127.0.0.1:<port>`, for an SDK client or the fault proxy.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Stops accepting and waits until in-flight requests are answered and the server is down.
    pub async fn stop(self) -> std::io::Result<()> {
        self.stop.send(()).ok();
        self.task
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)
    }
}
