//! A loopback TCP proxy in front of PostgreSQL that can go silent: while stalled it keeps every
//! socket open and accepts new ones, but forwards nothing in either direction. The client's
//! kernel still gets its TCP acknowledgements (from the proxy), so neither keepalives nor
//! `TCP_USER_TIMEOUT` notice: only the application's own time bounds do. This is what a client
//! sees of a database that froze, or of a NAT or load balancer that lost the connection's state
//! without resetting it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy; stops accepting when dropped.
pub struct StallingProxy {
    /// The port clients connect to.
    pub port: u16,
    stalled: Arc<AtomicBool>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    /// Forwards 127.0.0.1:`port` (new) to 127.0.0.1:`upstream`.
    pub async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let stalled = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let stalled = stalled.clone();
            let accepted = accepted.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let stalled = stalled.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                            return;
                        };
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::join!(pump(cr, sw, stalled.clone()), pump(sr, cw, stalled.clone()));
                    });
                }
            }
        });
        Self {
            port,
            stalled,
            accepted,
            task,
        }
    }

    /// Stops forwarding (sockets stay open).
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Forwards again (what was held back is delivered).
    pub fn resume(&self) {
        self.stalled.store(false, Ordering::SeqCst);
    }
}

/// Copies one direction; while stalled, holds what it read until forwarding resumes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
