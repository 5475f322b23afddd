//! Waiting on events, never on the clock: a bounded poll of a condition, and the relay's
//! admin `/metrics` read over loopback.

use std::time::{Duration, Instant};

use tokio::process::Command;

/// Polls `f` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the relay's `portcullis_relay_tunnel_streams` gauge reads `n`.
pub async fn wait_for_tunnel_streams(admin: std::net::SocketAddr, n: u32) {
    let found = eventually(Duration::from_secs(10), || async move {
        let out = Command::new("curl")
            .args(["-s", &format!("http://{admin}/metrics")])
            .output()
            .await
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("portcullis_relay_tunnel_streams {n}"))
            .then_some(())
    })
    .await;
    assert!(found.is_some(), "no request reached the tunnel");
}
