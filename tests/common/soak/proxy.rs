//! A TCP proxy the harness owns, between the workers and a broker node or a database host: it
//! can cut every connection through it at once, or stall them (no byte in either direction)
//! for a while, which is what a half-dead network or a paused peer looks like to the worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One proxy: listens on `addr`, forwards to its target.
pub struct Proxy {
    pub addr: SocketAddr,
    control: Arc<Control>,
}

struct Control {
    /// Bumped to cut every connection open now.
    cut: watch::Sender<u64>,
    /// While true, no byte moves.
    stalled: watch::Sender<bool>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let control = Arc::new(Control {
            cut: watch::channel(0).0,
            stalled: watch::channel(false).0,
        });
        let shared = control.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let control = shared.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        forward(client, server, &control).await;
                    }
                });
            }
        });
        Ok(Proxy { addr, control })
    }

    /// Cuts every connection open through it now (new ones go through).
    pub fn cut(&self) {
        self.control.cut.send_modify(|n| *n += 1);
    }

    /// Stops or restarts the flow of bytes on every connection, open or new.
    pub fn stall(&self, stalled: bool) {
        self.control.stalled.send_replace(stalled);
    }
}

/// Copies both ways until either side closes or the connection is cut.
async fn forward(client: TcpStream, server: TcpStream, control: &Control) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut cut = control.cut.subscribe();
    cut.mark_unchanged();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pipe(client_read, server_write, control.stalled.subscribe());
    let down = pipe(server_read, client_write, control.stalled.subscribe());
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut.changed() => {}
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while *stalled.borrow_and_update() {
            if tokio::time::timeout(Duration::from_secs(1), stalled.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return;
            }
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
