//! A TCP path between a client and a server that can be cut the way a middlebox or a
//! restarted NAT cuts it: [`TcpPath::reset_all`] ends every open connection with a TCP
//! reset (RST) to both ends, as `SO_LINGER` 0 on close makes the kernel send.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A running path; stops when dropped.
pub struct TcpPath {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    /// Connections ended by [`TcpPath::reset_all`].
    pub reset: Arc<AtomicU64>,
    cut: watch::Sender<u64>,
    tasks: JoinSet<()>,
}

impl TcpPath {
    /// Forwards every connection to `server`.
    pub async fn start(server: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let reset = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        tasks.spawn(accept(
            listener,
            server,
            cut.clone(),
            accepted.clone(),
            reset.clone(),
        ));
        Self {
            addr,
            accepted,
            reset,
            cut,
            tasks,
        }
    }

    /// Resets every connection open now, at both ends.
    pub fn reset_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

impl Drop for TcpPath {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn accept(
    listener: TcpListener,
    server: SocketAddr,
    cut: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    reset: Arc<AtomicU64>,
) {
    while let Ok((mut client, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::Relaxed);
        let mut cut = cut.subscribe();
        cut.mark_unchanged();
        let reset = reset.clone();
        tokio::spawn(async move {
            let Ok(mut upstream) = TcpStream::connect(server).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                _ = cut.changed() => {
                    // Closing with SO_LINGER 0 sends RST instead of FIN.
                    let _ = client.set_zero_linger();
                    let _ = upstream.set_zero_linger();
                    reset.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}
