//! Benchmark: requests/s and latency for small responses, and MiB/s for one large
//! transfer, direct to the origin and through relay + connector, over HTTP/1.1, HTTP/2 and
//! HTTP/3, side by side in one run, and the time to the first server-sent event; then new
//! tunnelled TCP connections per second and the relay's memory per idle connection. Run
//! it with `bash scripts/bench` (release build).
//!
//! Every loop is bounded in time (`PORTCULLIS_BENCH_SECS`, default 5 s per figure) and
//! all traffic stays on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_e2e::{APP, DB, H3Client, Stack, tls_connect};

const SMALL: &str = "/bytes?n=64";
const WORKERS: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    H1,
    H2,
    H3,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Relay,
}

type H1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;
type H2 = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

enum Client {
    H1(H1),
    H2(H2),
    H3(h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>),
}

async fn connect(s: &Stack, proto: Proto, path: Path) -> anyhow::Result<Client> {
    Ok(match (proto, path) {
        (Proto::H1, Path::Direct) => {
            let tcp = tokio::net::TcpStream::connect(&s.origin_addr).await?;
            tcp.set_nodelay(true)?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            Client::H1(send)
        }
        (Proto::H1, Path::Relay) => {
            let tls = tls_connect(&s.w, &s.addrs, APP, "alice", &[b"http/1.1"]).await;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            Client::H1(send)
        }
        (Proto::H2, Path::Direct) => {
            let tcp = tokio::net::TcpStream::connect(&s.origin_addr).await?;
            tcp.set_nodelay(true)?;
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await?;
            tokio::spawn(conn);
            Client::H2(send)
        }
        (Proto::H2, Path::Relay) => {
            let tls = tls_connect(&s.w, &s.addrs, APP, "alice", &[b"h2"]).await;
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await?;
            tokio::spawn(conn);
            Client::H2(send)
        }
        (Proto::H3, Path::Relay) => {
            let c = H3Client::connect(&s.w, &s.addrs, "alice", APP).await;
            let send = c.sender();
            // Keep the endpoint and driver alive for the process's life.
            std::mem::forget(c);
            Client::H3(send)
        }
        (Proto::H3, Path::Direct) => anyhow::bail!("the test origin does not speak HTTP/3"),
    })
}

/// One GET; returns the number of body bytes.
async fn get(client: &mut Client, path: &str, via_relay: bool) -> anyhow::Result<u64> {
    fetch(client, path, via_relay, false).await
}

/// One GET; with `first_only`, stops at the first body bytes (the connection is then
/// left mid-response) and returns how many arrived.
async fn fetch(
    client: &mut Client,
    path: &str,
    via_relay: bool,
    first_only: bool,
) -> anyhow::Result<u64> {
    let uri = if via_relay {
        format!("https://{APP}{path}")
    } else {
        path.to_owned()
    };
    match client {
        Client::H1(send) => {
            send.ready().await?;
            let req = http::Request::get(path)
                .header("host", APP)
                .body(Empty::new())?;
            let resp = send.send_request(req).await?;
            count_body(resp.into_body(), first_only).await
        }
        Client::H2(send) => {
            let req = http::Request::get(format!(
                "http{}://{APP}{path}",
                if via_relay { "s" } else { "" }
            ))
            .body(Empty::new())?;
            let resp = send.send_request(req).await?;
            count_body(resp.into_body(), first_only).await
        }
        Client::H3(send) => {
            let req = http::Request::get(uri).body(())?;
            let mut stream = send.send_request(req).await?;
            stream.finish().await?;
            let _ = stream.recv_response().await?;
            let mut n = 0u64;
            while let Some(chunk) = stream.recv_data().await? {
                n += chunk.remaining() as u64;
                if first_only && n > 0 {
                    break;
                }
            }
            Ok(n)
        }
    }
}

async fn count_body(mut body: hyper::body::Incoming, first_only: bool) -> anyhow::Result<u64> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += data.len() as u64;
            if first_only && n > 0 {
                break;
            }
        }
    }
    Ok(n)
}

struct Figures {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    mib_s: f64,
    sse_ms: f64,
}

/// Median time to the first server-sent event (the origin writes event 0 at once and the
/// next one 3 s later, so anything that buffers shows as seconds), fresh connection each.
async fn first_event_ms(s: &Stack, proto: Proto, path: Path) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..10 {
        let mut client = connect(s, proto, path).await?;
        let t = Instant::now();
        let got = fetch(&mut client, "/sse?n=2&ms=3000", path == Path::Relay, true).await?;
        anyhow::ensure!(got > 0, "no event");
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

async fn measure(s: &Stack, proto: Proto, path: Path, secs: u64) -> anyhow::Result<Figures> {
    let via_relay = path == Path::Relay;
    // Latency: one connection, one request at a time.
    let mut client = connect(s, proto, path).await?;
    let mut lat = Vec::new();
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        let t = Instant::now();
        get(&mut client, SMALL, via_relay).await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;

    // Throughput: 64 concurrent workers; HTTP/1.1 one connection each, HTTP/2 and HTTP/3
    // 8 connections with 8 streams each.
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    let mut shared = None;
    for i in 0..WORKERS {
        let mut client = match proto {
            Proto::H1 => connect(s, proto, path).await?,
            _ => {
                if i % 8 == 0 {
                    shared = Some(connect(s, proto, path).await?);
                }
                match shared.as_ref() {
                    Some(Client::H2(c)) => Client::H2(c.clone()),
                    Some(Client::H3(c)) => Client::H3(c.clone()),
                    _ => anyhow::bail!("no shared connection"),
                }
            }
        };
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                if get(&mut client, SMALL, via_relay).await.is_err() {
                    break;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let rps = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();

    // One large transfer.
    let size: u64 = 1024 * 1024 * 1024;
    let mut client = connect(s, proto, path).await?;
    let t = Instant::now();
    let got = get(&mut client, &format!("/bytes?n={size}"), via_relay).await?;
    anyhow::ensure!(got == size, "large transfer got {got} of {size} bytes");
    let mib_s = (size as f64 / 1048576.0) / t.elapsed().as_secs_f64();
    Ok(Figures {
        rps,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        mib_s,
        sse_ms: first_event_ms(s, proto, path).await?,
    })
}

/// New tunnelled TCP connections per second: `CONNECT` to the raw TCP service over
/// HTTP/3 (what `portcullis tcp` does for each local connection), 64 at a time over 8
/// connections; each sends a byte, reads the echo and closes.
async fn tunnels_per_sec(s: &Stack, secs: u64) -> anyhow::Result<f64> {
    let port =
        s.w.echo_addr()
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .to_owned();
    let target = format!("{DB}:{port}");
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    let mut shared = None;
    for i in 0..WORKERS {
        if i % 8 == 0 {
            // CONNECT goes to the relay's own name (SNI), as the agent's does.
            let c = H3Client::connect(&s.w, &s.addrs, "alice", "relay.acme.test").await;
            shared = Some(c.sender());
            // Keep the endpoint and driver alive for the process's life.
            std::mem::forget(c);
        }
        let Some(send) = shared.as_ref() else {
            anyhow::bail!("no HTTP/3 connection");
        };
        let mut send = send.clone();
        let (done, target) = (done.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let one = async {
                    let req = http::Request::builder()
                        .method(http::Method::CONNECT)
                        .uri(target.as_str())
                        .body(())?;
                    let mut stream = send.send_request(req).await?;
                    anyhow::ensure!(stream.recv_response().await?.status() == 200, "refused");
                    stream.send_data(Bytes::from_static(b"x")).await?;
                    stream.finish().await?;
                    while stream.recv_data().await?.is_some() {}
                    Ok(())
                };
                if let Err(e) = one.await {
                    eprintln!("tunnel failed: {e:#}");
                    break;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// The relay's resident memory per idle client connection: opens `n` and compares.
async fn idle_kib_per_connection(s: &Stack, proto: Proto, n: usize) -> anyhow::Result<f64> {
    let pid = s
        .relay
        .child
        .id()
        .ok_or_else(|| anyhow::anyhow!("relay exited"))?;
    let before = portcullis_e2e::rss(pid);
    let mut held = Vec::new();
    for _ in 0..n {
        let mut c = connect(s, proto, Path::Relay).await?;
        // One request each, so the connection is fully set up on both sides.
        get(&mut c, SMALL, true).await?;
        held.push(c);
    }
    // Lets the relay's allocator settle before measuring (every connection is already up):
    // a measurement pause, not a wait for readiness.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = portcullis_e2e::rss(pid);
    drop(held);
    Ok(after.saturating_sub(before) as f64 / 1024.0 / n as f64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("PORTCULLIS_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let s = Stack::up().await;
    let mut out = String::new();
    out.push_str(&format!(
        "{:<9} {:<22} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "protocol", "path", "req/s@64", "p50 µs@1", "p99 µs@1", "MiB/s@1GiB", "SSE 1st ms"
    ));
    for proto in [Proto::H1, Proto::H2, Proto::H3] {
        for path in [Path::Direct, Path::Relay] {
            let label = match path {
                Path::Direct => "direct to origin",
                Path::Relay => "relay + connector",
            };
            let name = match proto {
                Proto::H1 => "HTTP/1.1",
                Proto::H2 => "HTTP/2",
                Proto::H3 => "HTTP/3",
            };
            match measure(&s, proto, path, secs).await {
                Ok(f) => out.push_str(&format!(
                    "{name:<9} {label:<22} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.1}\n",
                    f.rps, f.p50_us, f.p99_us, f.mib_s, f.sse_ms
                )),
                Err(e) => out.push_str(&format!("{name:<9} {label:<22} n/a ({e})\n")),
            }
        }
    }
    match tunnels_per_sec(&s, secs).await {
        Ok(n) => out.push_str(&format!(
            "new tunnelled TCP connections/s (CONNECT over HTTP/3, 64 at a time): {n:.0}\n"
        )),
        Err(e) => out.push_str(&format!("new tunnelled TCP connections/s: n/a ({e})\n")),
    }
    for (proto, name) in [(Proto::H2, "HTTP/2"), (Proto::H3, "HTTP/3")] {
        match idle_kib_per_connection(&s, proto, 200).await {
            Ok(k) => out.push_str(&format!(
                "relay memory per idle {name} connection (200 open): {k:.1} KiB\n"
            )),
            Err(e) => out.push_str(&format!(
                "relay memory per idle {name} connection: n/a ({e})\n"
            )),
        }
    }
    eprint!("{out}");
    Ok(())
}
