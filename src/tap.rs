//! A TCP forwarder on loopback that counts the bytes its upstream sends: put in front of
//! any registry (docker-registry, the embedded origin, a `--registry URL`), it measures
//! registry egress live, the same way for all of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A running tap. Dropping it stops accepting (open connections finish on their own).
pub struct Tap {
    pub addr: SocketAddr,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tap {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Tap> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        let _ = forward(client, server, &counter).await;
                    }
                });
            }
        });
        Ok(Tap { addr, sent, task })
    }

    /// Bytes the upstream sent through the tap so far.
    pub fn upstream_bytes(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

async fn forward(client: TcpStream, server: TcpStream, counter: &AtomicU64) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let up = async {
        tokio::io::copy(&mut client_rx, &mut server_tx).await?;
        server_tx.shutdown().await
    };
    let down = async {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = server_rx.read(&mut buf).await?;
            if n == 0 {
                break client_tx.shutdown().await;
            }
            client_tx.write_all(&buf[..n]).await?;
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_what_the_upstream_sends() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut req = [0u8; 5];
            s.read_exact(&mut req).await.unwrap();
            s.write_all(&[1u8; 1000]).await.unwrap();
        });
        let tap = Tap::start(upstream_addr).await.unwrap();
        let mut c = TcpStream::connect(tap.addr).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 1000);
        assert_eq!(tap.upstream_bytes(), 1000);
    }
}
