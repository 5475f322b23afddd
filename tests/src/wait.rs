//! Waiting on events, never on the clock: a bounded poll of a condition (a file, a log
//! line, a response), and the relay's admin `/metrics` read in process over loopback
//! (connectors registered, tunnel streams open, identities the relay knows).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// How long a wait on the relay's metrics may take before the test fails.
const METRIC_TIMEOUT: Duration = Duration::from_secs(15);

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
        // The poll interval of this wait, not a wait of its own.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET `path` from the relay's admin listener: status and body, or `None` if it does not
/// answer.
pub async fn admin_get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    admin_get_with(admin, path, None).await
}

/// Like [`admin_get`], presenting `Authorization: Bearer <token>` if given.
pub async fn admin_get_with(
    admin: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Option<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(admin).await.ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header(http::header::HOST, admin.to_string());
    if let Some(token) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(Empty::<Bytes>::new()).ok()?;
    let resp = send.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The relay's `/metrics` text.
pub async fn metrics_text(admin: SocketAddr) -> Option<String> {
    admin_get(admin, "/metrics").await.map(|(_, body)| body)
}

/// The value of the sample `series` (a metric name with its labels, exactly as rendered,
/// e.g. `portcullis_relay_tunnel_streams`) in the relay's `/metrics`, if present; for a
/// family name whose samples all carry labels (`portcullis_relay_connector_tunnels`), the
/// sum of its samples.
pub async fn metric(admin: SocketAddr, series: &str) -> Option<i64> {
    let text = metrics_text(admin).await?;
    sample(&text, series)
}

/// [`metric`] on an exposition already read.
pub fn sample(text: &str, series: &str) -> Option<i64> {
    let samples = text.lines().filter_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        Some((name, value.parse::<f64>().ok()? as i64))
    });
    let mut family = None;
    for (name, value) in samples {
        if name == series {
            return Some(value);
        }
        if !series.contains('{')
            && name
                .strip_prefix(series)
                .is_some_and(|rest| rest.starts_with('{'))
        {
            *family.get_or_insert(0) += value;
        }
    }
    family
}

/// Waits until the sample `series` satisfies `ok`; panics after 15 s naming `what` and the
/// last value seen.
pub async fn wait_for_metric(
    admin: SocketAddr,
    series: &str,
    what: &str,
    ok: impl Fn(Option<i64>) -> bool,
) {
    let last = std::cell::Cell::new(None);
    let found = eventually(METRIC_TIMEOUT, || async {
        last.set(metric(admin, series).await);
        ok(last.get()).then_some(())
    })
    .await;
    assert!(
        found.is_some(),
        "{what}: {series} never did (last seen {:?})",
        last.get()
    );
}

/// Waits until the relay's `portcullis_relay_tunnel_streams` gauge reads `n`: that many
/// requests are in flight to connectors.
pub async fn wait_for_tunnel_streams(admin: SocketAddr, n: u32) {
    wait_for_metric(
        admin,
        "portcullis_relay_tunnel_streams",
        "requests in flight through the tunnel",
        |v| v == Some(i64::from(n)),
    )
    .await;
}

/// Waits until the relay's connector tunnels (`portcullis_relay_connector_tunnels`, over
/// every transport) number `n`: that many connectors have registered (their names are
/// routed from then on).
pub async fn wait_for_connectors(admin: SocketAddr, n: u32) {
    wait_for_metric(
        admin,
        "portcullis_relay_connector_tunnels",
        "connectors registered",
        |v| v == Some(i64::from(n)),
    )
    .await;
}

/// The `/metrics` series of an identity's certificate expiry: present while the relay's
/// registry holds the identity as active (issued and not revoked).
pub fn identity_series(role: &str, id: &str) -> String {
    format!(
        "portcullis_relay_identity_certificate_expiry_timestamp_seconds{{role=\"{role}\",id=\"{id}\"}}"
    )
}

/// Waits until the running relay's registry holds `role`/`id` as active (`true`) or no
/// longer does (`false`): it re-reads the store a few times a second.
pub async fn wait_for_identity(admin: SocketAddr, role: &str, id: &str, active: bool) {
    let what = if active {
        format!("the relay must learn of {role} {id}")
    } else {
        format!("the relay must learn that {role} {id} is revoked")
    };
    wait_for_metric(admin, &identity_series(role, id), &what, |v| {
        v.is_some() == active
    })
    .await;
}
