//! A TCP proxy that delays every chunk by a fixed time in each direction: storage as far away as
//! DynamoDB is in a region (about 2.5 ms each way), on loopback. Each connection gets its own pair
//! of pumps, and a pump keeps reading while earlier chunks wait out their delay, so the delay adds
//! latency without serialising connections or limiting throughput.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Chunks read ahead of the writer per direction, at most; past it the reader waits (backpressure).
const CHUNKS_IN_FLIGHT_MAX: usize = 1024;
const CHUNK_BYTES: usize = 64 * 1024;

/// Accepts on `listener` and forwards every connection to `upstream`, each chunk `delay` late in
/// each direction. Runs until the task is dropped.
pub async fn serve(listener: TcpListener, upstream: String, delay: Duration) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            client.set_nodelay(true).ok();
            server.set_nodelay(true).ok();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(
                pump(client_read, server_write, delay),
                pump(server_read, client_write, delay)
            );
        });
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read, in order.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (chunks, mut due) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT_MAX);
    let reader = async move {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        while let Ok(read) = from.read(&mut buffer).await {
            if read == 0
                || chunks
                    .send((Instant::now() + delay, buffer[..read].to_vec()))
                    .await
                    .is_err()
            {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        to.shutdown().await.ok();
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind the proxy answers a round trip no sooner than twice the delay, and
    /// two connections at once take no longer than one.
    #[tokio::test]
    async fn each_way_is_delayed_and_connections_run_side_by_side() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_address = echo.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buffer = [0u8; 64];
                    while let Ok(read) = stream.read(&mut buffer).await {
                        if read == 0 || stream.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_address = proxy.local_addr().unwrap();
        let delay = Duration::from_millis(100);
        tokio::spawn(serve(proxy, echo_address, delay));
        let round_trip = || async move {
            let mut stream = TcpStream::connect(proxy_address).await.unwrap();
            let started = Instant::now();
            stream.write_all(b"ping").await.unwrap();
            let mut reply = [0u8; 4];
            stream.read_exact(&mut reply).await.unwrap();
            assert_eq!(&reply, b"ping");
            started.elapsed()
        };
        let started = Instant::now();
        let (first, second) = tokio::join!(round_trip(), round_trip());
        assert!(first >= 2 * delay && second >= 2 * delay, "{first:?} {second:?}");
        // Side by side: far less than the 4 × delay that one connection after the other takes.
        assert!(started.elapsed() < 4 * delay, "{:?}", started.elapsed());
    }
}
