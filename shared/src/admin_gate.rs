//! The gate in front of the relay's and the connector's admin listeners (`/healthz`,
//! `/readyz`, `/metrics`): a bearer token, compared in constant time, on every request when
//! one is configured (required beyond loopback), the probes optionally spared; and a cap on
//! the listener's open connections, so whoever reaches it cannot hold it open without end.

use std::path::Path;
use std::sync::Arc;

use http::HeaderMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections an admin listener holds at most; past it new ones are closed at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Shortest token accepted in a token file.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    /// The file could not be read.
    #[error("reading the admin token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds fewer than [`MIN_TOKEN_LEN`] characters.
    #[error(
        "the admin token file {0} must hold a token of at least 16 characters (for example: openssl rand -hex 32)"
    )]
    TooShort(String),
}

/// Reads a token file: its contents, trimmed, at least [`MIN_TOKEN_LEN`] characters.
///
/// # Errors
/// [`AdminTokenError`] when it cannot be read or is too short.
pub fn read_token(path: &Path) -> Result<String, AdminTokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| AdminTokenError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let token = text.trim();
    if token.len() < MIN_TOKEN_LEN {
        return Err(AdminTokenError::TooShort(path.display().to_string()));
    }
    Ok(token.to_owned())
}

/// One admin listener's token and connection places.
#[derive(Debug)]
pub struct AdminGate {
    token: Option<String>,
    probes_without_token: bool,
    places: Arc<Semaphore>,
}

impl AdminGate {
    /// A gate asking for `token` (if any) on every request, the probes `/healthz` and
    /// `/readyz` excepted when `probes_without_token`, holding at most `max_connections`.
    pub fn new(token: Option<String>, probes_without_token: bool, max_connections: usize) -> Self {
        Self {
            token,
            probes_without_token,
            places: Arc::new(Semaphore::new(max_connections)),
        }
    }

    /// A place for a new connection, held until the permit drops; `None` when the
    /// listener is full (close the connection).
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.places.clone().try_acquire_owned().ok()
    }

    /// Whether a request for `path` with `headers` may be answered.
    pub fn allows(&self, path: &str, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        if self.probes_without_token && matches!(path, "/healthz" | "/readyz") {
            return true;
        }
        let Some(given) = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, given)| given.trim())
        else {
            return false;
        };
        let (a, b) = (given.as_bytes(), token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// What an admin listener answers: its gate, and the response to each request (which
/// checks [`AdminGate::allows`] itself, to answer 401).
#[cfg(feature = "metrics")]
pub trait AdminService: Send + Sync + 'static {
    /// The response body.
    type Body: http_body::Body<Data = bytes::Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static;
    /// The listener's gate (connection cap).
    fn gate(&self) -> &AdminGate;
    /// The response to `req`.
    fn respond(&self, req: &http::Request<hyper::body::Incoming>) -> http::Response<Self::Body>;
}

/// Serves `service` on `listener` (plain HTTP/1.1, a 10 s header deadline, at most
/// [`MAX_ADMIN_CONNECTIONS`] connections) until `shutdown`; a scraper's keep-alive
/// connection never holds up the drain.
#[cfg(feature = "metrics")]
pub async fn serve<S: AdminService>(
    listener: tokio::net::TcpListener,
    service: Arc<S>,
    shutdown: crate::shutdown::Shutdown,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use std::time::Duration;
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => return,
        };
        let Some(place) = service.gate().admit() else {
            tracing::debug!("admin listener full: connection closed");
            continue;
        };
        let service = service.clone();
        let stop = shutdown.clone();
        shutdown.tracker().spawn(async move {
            let _place = place;
            let svc = hyper::service::service_fn(move |req| {
                let resp = service.respond(&req);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                () = stop.wait() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn the_token_is_asked_of_every_request_but_the_probes_when_spared() {
        let gate = AdminGate::new(Some("0123456789abcdef".into()), true, 4);
        assert!(gate.allows("/metrics", &bearer("Bearer 0123456789abcdef")));
        assert!(gate.allows("/metrics", &bearer("bearer  0123456789abcdef ")));
        assert!(!gate.allows("/metrics", &bearer("Bearer 0123456789abcdeX")));
        assert!(!gate.allows("/metrics", &bearer("Basic 0123456789abcdef")));
        assert!(!gate.allows("/metrics", &HeaderMap::new()));
        assert!(gate.allows("/healthz", &HeaderMap::new()));
        let strict = AdminGate::new(Some("0123456789abcdef".into()), false, 4);
        assert!(!strict.allows("/readyz", &HeaderMap::new()));
        assert!(AdminGate::new(None, false, 4).allows("/metrics", &HeaderMap::new()));
    }

    #[test]
    fn the_listener_holds_its_cap_and_a_closed_connection_gives_its_place_back() {
        let gate = AdminGate::new(None, false, 2);
        let a = gate.admit().unwrap();
        let _b = gate.admit().unwrap();
        assert!(gate.admit().is_none());
        drop(a);
        assert!(gate.admit().is_some());
    }

    #[test]
    fn a_short_or_missing_token_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        assert!(matches!(
            read_token(&path),
            Err(AdminTokenError::Read { .. })
        ));
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(
            read_token(&path),
            Err(AdminTokenError::TooShort(_))
        ));
        std::fs::write(&path, "0123456789abcdef\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "0123456789abcdef");
    }
}
