//! Node-to-node links the drill can cut: one TCP proxy on loopback per ordered pair of nodes.
//!
//! Node A reaches node B through the proxy of link (A, B): A's config maps B's address to the
//! proxy's (`raft.dial-via`), so Raft messages, forwarded writes and read-index requests from A
//! to B all cross it, while clients still reach every node directly. Cutting a link closes the
//! connections it carries and refuses new ones until it is healed: a real broken connection, as
//! the kernel would report it after a partition, only without waiting for TCP timeouts.

use std::collections::HashMap;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One direction of one link.
struct Link {
    port: u16,
    up: watch::Sender<bool>,
}

/// Every ordered link between `n` nodes.
pub struct Links {
    links: HashMap<(usize, usize), Link>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Links {
    /// Starts a proxy for every ordered pair of the nodes listening on `ports`. Must be called
    /// within the Tokio runtime.
    ///
    /// # Errors
    /// A loopback port cannot be bound.
    pub fn start(ports: &[u16]) -> anyhow::Result<Links> {
        let mut links = HashMap::new();
        let mut tasks = Vec::new();
        for (from, _) in ports.iter().enumerate() {
            for (to, &target) in ports.iter().enumerate().filter(|(to, _)| *to != from) {
                let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                listener.set_nonblocking(true)?;
                let port = listener.local_addr()?.port();
                let listener = TcpListener::from_std(listener)?;
                let (up, _) = watch::channel(true);
                tasks.push(tokio::spawn(serve(listener, target, up.clone())));
                links.insert((from, to), Link { port, up });
            }
        }
        Ok(Links { links, tasks })
    }

    /// The proxy port of link `from` → `to` (node indices).
    pub fn port(&self, from: usize, to: usize) -> Option<u16> {
        self.links.get(&(from, to)).map(|l| l.port)
    }

    /// Cuts (`up == false`) or heals both directions between nodes `a` and `b`.
    pub fn set(&self, a: usize, b: usize, up: bool) {
        for key in [(a, b), (b, a)] {
            if let Some(link) = self.links.get(&key) {
                link.up.send_replace(up);
            }
        }
    }

    /// Cuts or heals every link between the two groups of nodes.
    pub fn set_between(&self, left: &[usize], right: &[usize], up: bool) {
        for &a in left {
            for &b in right {
                self.set(a, b, up);
            }
        }
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Accepts on `listener` and forwards to `127.0.0.1:target` while the link is up.
async fn serve(listener: TcpListener, target: u16, up: watch::Sender<bool>) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut state = up.subscribe();
        if !*state.borrow_and_update() {
            drop(inbound); // cut: the connection is closed at once
            continue;
        }
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else { return };
            let _ = outbound.set_nodelay(true);
            let _ = inbound.set_nodelay(true);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = state.wait_for(|up| !*up) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An echo server behind a link: bytes cross while it is up; a cut closes the open
    /// connection and refuses new ones; healing lets new connections through again.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_cut_link_closes_and_refuses_connections_until_healed() -> anyhow::Result<()> {
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        let echo_port = echo.local_addr()?.port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        // Node 0 is the test, node 1 the echo server.
        let links = Links::start(&[1, echo_port])?;
        let port = links.port(0, 1).expect("link 0 -> 1");
        let mut conn = TcpStream::connect(("127.0.0.1", port)).await?;
        conn.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");

        links.set(0, 1, false);
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await?;
        assert!(read.is_err() || rest.is_empty(), "the open connection is closed by the cut");
        let mut refused = TcpStream::connect(("127.0.0.1", port)).await?;
        let _ = refused.write_all(b"ping").await;
        let got = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buf)).await?;
        assert!(matches!(got, Ok(0) | Err(_)), "a new connection is closed unanswered: {got:?}");

        links.set(0, 1, true);
        let mut healed = TcpStream::connect(("127.0.0.1", port)).await?;
        healed.write_all(b"pong").await?;
        healed.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"pong");
        Ok(())
    }
}
