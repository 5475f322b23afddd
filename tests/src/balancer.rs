//! A TCP load balancer in front of several relays' HTTPS listeners, as an operator runs
//! one: each new connection goes to a relay whose `/readyz` answered 200 at the last
//! check (every 100 ms), in turn; connections already open stay where they are. A relay
//! that starts draining turns `/readyz` to 503 and so stops getting new connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// One backend: its HTTPS address and its admin address (for `/readyz`).
#[derive(Debug)]
struct Backend {
    https: SocketAddr,
    admin: SocketAddr,
    ready: AtomicBool,
}

/// A running balancer; stops when dropped.
pub struct Balancer {
    /// Where clients connect.
    pub addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl Balancer {
    /// Balances over `backends`, each `(https, admin)`.
    pub async fn start(backends: &[(SocketAddr, SocketAddr)]) -> Self {
        let backends: Arc<Vec<Backend>> = Arc::new(
            backends
                .iter()
                .map(|(https, admin)| Backend {
                    https: *https,
                    admin: *admin,
                    ready: AtomicBool::new(true),
                })
                .collect(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tasks = JoinSet::new();
        tasks.spawn(check(backends.clone()));
        tasks.spawn(accept(listener, backends));
        Self { addr, tasks }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Marks each backend ready or not from its `/readyz`, every 100 ms.
async fn check(backends: Arc<Vec<Backend>>) {
    loop {
        for b in backends.iter() {
            let ok = crate::admin_get(b.admin, "/readyz")
                .await
                .is_some_and(|(status, _)| status == 200);
            b.ready.store(ok, Ordering::Relaxed);
        }
        // The health-check interval of this balancer.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn accept(listener: TcpListener, backends: Arc<Vec<Backend>>) {
    let next = AtomicUsize::new(0);
    let mut conns = JoinSet::new();
    while let Ok((mut client, _)) = listener.accept().await {
        let n = backends.len();
        let start = next.fetch_add(1, Ordering::Relaxed);
        let Some(backend) = (0..n)
            .map(|i| &backends[(start + i) % n])
            .find(|b| b.ready.load(Ordering::Relaxed))
        else {
            continue;
        };
        let to = backend.https;
        conns.spawn(async move {
            if let Ok(mut upstream) = TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
    }
}
