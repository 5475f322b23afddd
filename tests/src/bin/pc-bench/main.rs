//! Benchmark. First the peer comparison (see [`peers`]): Portcullis beside rathole with
//! its TLS transport and without, through `portcullis tcp` → relay → connector, in one
//! table. Then requests/s and latency for small responses, and MiB/s for one large
//! transfer, direct to the origin and through relay + connector, over HTTP/1.1, HTTP/2 and
//! HTTP/3, side by side in one run, and the time to the first server-sent event; then new
//! tunnelled TCP connections per second and the relay's memory per idle connection; then
//! the abuse run (see [`abuse`]): unauthenticated connections held and a handshake flood,
//! with the relay's memory and CPU and a legitimate device's success rate and latency
//! meanwhile. Run it with `bash scripts/bench` (release build); `pc-bench peers`,
//! `pc-bench throughput` or `pc-bench abuse` runs one part only (`pc-bench bulk`, not part
//! of the whole run, repeats the 1 GiB downloads for profiling and before/after runs).
//!
//! Every loop is bounded in time (`PORTCULLIS_BENCH_SECS`, default 5 s per figure; the
//! abuse run's own limits below) and all traffic stays on loopback. The process raises its
//! own soft limit on open files (the relay it starts inherits it) to what the abuse run
//! needs, up to the hard limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_e2e::{
    APP, DB, H3Client, Impairment, QuicDialer, RELAY_NAME, Stack, client_tls, loopback, metric,
    metrics_text, stranger_tls, tls_connect, tls_from,
};
use portcullis_shared::proto::ENROLL_ALPN;

mod peers;

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
    let mib_s = download(s, proto, path).await?;
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
    let part = std::env::args().nth(1).unwrap_or_default();
    let abuse_conns = env_or("PORTCULLIS_ABUSE_CONNS", 10_000);
    let (nofile_was, nofile) = raise_nofile(abuse_conns as u64 + 4096);
    let secs = env_or("PORTCULLIS_BENCH_SECS", 5) as u64;
    let all = part.is_empty();
    let mut out = String::new();
    if all || part == "peers" {
        out.push_str(&peers::peers(secs).await);
        if !all {
            eprint!("{out}");
            return Ok(());
        }
    }
    // `pc-bench bulk` takes extra relay.toml lines from PORTCULLIS_BULK_RELAY_TOML, to
    // try a setting.
    let extra = std::env::var("PORTCULLIS_BULK_RELAY_TOML").unwrap_or_default();
    let s = if part == "bulk" && !extra.is_empty() {
        Stack::up_with(&extra).await
    } else {
        Stack::up().await
    };
    if all || part == "throughput" {
        out.push_str(&throughput(&s).await);
    }
    if part == "bulk" {
        out.push_str(&bulk(&s).await);
    }
    if all || part == "abuse" {
        out.push_str(&format!(
            "open-file soft limit: {nofile} (was {nofile_was}; wanted {})\n",
            abuse_conns + 4096
        ));
        match abuse(&s, abuse_conns).await {
            Ok(text) => out.push_str(&text),
            Err(e) => out.push_str(&format!("abuse run: n/a ({e:#})\n")),
        }
    }
    eprint!("{out}");
    Ok(())
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn throughput(s: &Stack) -> String {
    let secs = env_or("PORTCULLIS_BENCH_SECS", 5) as u64;
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
            match measure(s, proto, path, secs).await {
                Ok(f) => out.push_str(&format!(
                    "{name:<9} {label:<22} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.1}\n",
                    f.rps, f.p50_us, f.p99_us, f.mib_s, f.sse_ms
                )),
                Err(e) => out.push_str(&format!("{name:<9} {label:<22} n/a ({e})\n")),
            }
        }
    }
    match tunnels_per_sec(s, secs).await {
        Ok(n) => out.push_str(&format!(
            "new tunnelled TCP connections/s (CONNECT over HTTP/3, 64 at a time): {n:.0}\n"
        )),
        Err(e) => out.push_str(&format!("new tunnelled TCP connections/s: n/a ({e})\n")),
    }
    // The same through a connector whose UDP is blocked (its tunnel runs over TLS on
    // TCP), and with quinn's CUBIC in place of the loss-tolerant controller.
    let tcp = Stack::up_tunnel_over_tcp().await;
    relay_rows(&mut out, &tcp, "relay + tunnel over TCP", secs).await;
    let cubic = Stack::up_with_congestion("cubic").await;
    relay_rows(&mut out, &cubic, "relay + connector, CUBIC", secs).await;
    drop(cubic);
    match tunnels_per_sec(&tcp, secs).await {
        Ok(n) => out.push_str(&format!(
            "new tunnelled TCP connections/s through a tunnel over TCP (64 at a time): {n:.0}\n"
        )),
        Err(e) => out.push_str(&format!(
            "new tunnelled TCP connections/s through a tunnel over TCP: n/a ({e})\n"
        )),
    }
    drop(tcp);
    match lossy_mib_s(secs).await {
        Ok(text) => out.push_str(&text),
        Err(e) => out.push_str(&format!("lossy tunnel path: n/a ({e:#})\n")),
    }
    for (proto, name) in [(Proto::H2, "HTTP/2"), (Proto::H3, "HTTP/3")] {
        match idle_kib_per_connection(s, proto, 200).await {
            Ok(k) => out.push_str(&format!(
                "relay memory per idle {name} connection (200 open): {k:.1} KiB\n"
            )),
            Err(e) => out.push_str(&format!(
                "relay memory per idle {name} connection: n/a ({e})\n"
            )),
        }
    }
    out
}

/// `pc-bench bulk` only (for profiling the body path and for before/after runs): one
/// 1 GiB download direct over HTTP/1.1, then `PORTCULLIS_BULK_ROUNDS` (default 3) through
/// relay + connector over each protocol, alternating, each on a fresh connection;
/// `PORTCULLIS_BULK_ONLY=h1`, `h2` or `h3` keeps one protocol (to profile it alone).
async fn bulk(s: &Stack) -> String {
    let rounds = env_or("PORTCULLIS_BULK_ROUNDS", 3);
    let only = std::env::var("PORTCULLIS_BULK_ONLY").unwrap_or_default();
    let mut out = String::from("1 GiB download, MiB/s\n");
    let mut row = |name: &str, path: Path, figures: Vec<String>| {
        let label = match path {
            Path::Direct => "direct to origin",
            Path::Relay => "relay + connector",
        };
        out.push_str(&format!("{name:<9} {label:<22} {}\n", figures.join(" ")));
    };
    row(
        "HTTP/1.1",
        Path::Direct,
        vec![fmt_mib(download(s, Proto::H1, Path::Direct).await)],
    );
    let mut figures = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, (proto, name)) in [(Proto::H1, "h1"), (Proto::H2, "h2"), (Proto::H3, "h3")]
            .into_iter()
            .enumerate()
        {
            if !only.is_empty() && only != name {
                continue;
            }
            figures[i].push(fmt_mib(download(s, proto, Path::Relay).await));
        }
    }
    let [h1, h2, h3] = figures;
    row("HTTP/1.1", Path::Relay, h1);
    row("HTTP/2", Path::Relay, h2);
    row("HTTP/3", Path::Relay, h3);
    out
}

fn fmt_mib(r: anyhow::Result<f64>) -> String {
    match r {
        Ok(m) => format!("{m:>7.0}"),
        Err(e) => format!("n/a ({e:#})"),
    }
}

/// MiB/s for one 1 GiB download on a fresh connection.
async fn download(s: &Stack, proto: Proto, path: Path) -> anyhow::Result<f64> {
    let size: u64 = 1024 * 1024 * 1024;
    let mut client = connect(s, proto, path).await?;
    let t = Instant::now();
    let got = get(
        &mut client,
        &format!("/bytes?n={size}"),
        path == Path::Relay,
    )
    .await?;
    anyhow::ensure!(got == size, "large transfer got {got} of {size} bytes");
    Ok((size as f64 / 1048576.0) / t.elapsed().as_secs_f64())
}

/// The table's rows through the relay for HTTP/1.1, HTTP/2 and HTTP/3 on stack `s`.
async fn relay_rows(out: &mut String, s: &Stack, label: &str, secs: u64) {
    for (proto, name) in [
        (Proto::H1, "HTTP/1.1"),
        (Proto::H2, "HTTP/2"),
        (Proto::H3, "HTTP/3"),
    ] {
        match measure(s, proto, Path::Relay, secs).await {
            Ok(f) => out.push_str(&format!(
                "{name:<9} {label:<22} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.1}\n",
                f.rps, f.p50_us, f.p99_us, f.mib_s, f.sse_ms
            )),
            Err(e) => out.push_str(&format!("{name:<9} {label:<22} n/a ({e})\n")),
        }
    }
}

/// A 100 MiB download (HTTP/1.1 through the relay) with the connector's QUIC path
/// dropping 5 % of the datagrams each way and delaying each by 50 ms each way, beside the
/// same download with the path clean but as slow, and a 2 MiB one with quinn's CUBIC on
/// the lossy path (at its rate 100 MiB would take many minutes).
async fn lossy_mib_s(secs: u64) -> anyhow::Result<String> {
    let full: u64 = env_or("PORTCULLIS_LOSSY_BYTES", 100 << 20) as u64;
    let mut out = String::new();
    for (label, loss, congestion, size) in [
        ("50 ms each way", 0.0, None, full),
        ("50 ms each way, 5 % loss", 0.05, None, full),
        (
            "50 ms each way, 5 % loss, CUBIC",
            0.05,
            Some("cubic"),
            full / 50,
        ),
    ] {
        let s = Stack::up_impaired(
            Impairment {
                loss,
                delay: Duration::from_millis(50),
                ..Impairment::default()
            },
            congestion,
        )
        .await;
        let mut client = connect(&s, Proto::H1, Path::Relay).await?;
        let started = Instant::now();
        let got = tokio::time::timeout(
            Duration::from_secs(secs.max(5) * 60),
            get(&mut client, &format!("/bytes?n={size}"), true),
        )
        .await
        .map_err(|_| anyhow::anyhow!("not done in {} s", secs.max(5) * 60))??;
        anyhow::ensure!(got == size, "got {got} of {size} bytes");
        let took = started.elapsed().as_secs_f64();
        out.push_str(&format!(
            "tunnel path {label}: {:.0} MiB in {took:.1} s, {:.1} Mbit/s\n",
            size as f64 / f64::from(1 << 20),
            size as f64 * 8.0 / took / 1e6
        ));
    }
    Ok(out)
}

/// Raises this process's soft limit on open files to `wanted`, or to the hard limit if
/// that is lower; returns the soft limit before and after.
fn raise_nofile(wanted: u64) -> (u64, u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    let target = limit.maximum.map_or(wanted, |hard| wanted.min(hard));
    if soft < target {
        limit.current = Some(target);
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            eprintln!("cannot raise the open-file limit to {target}: {e}");
        }
    }
    (
        soft,
        getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX),
    )
}

/// Connections a stranger holds per source address: under the relay's default
/// `max_connections_per_address` (500).
const PER_ADDRESS: usize = 400;
/// Source addresses: `127.0.1.x` for held strangers, `127.0.2.x` for the flood.
const HELD_BASE: u16 = 0x0100;
const FLOOD_BASE: u16 = 0x0200;
/// How long opening the held connections may take at most.
const OPEN_DEADLINE: Duration = Duration::from_secs(90);
/// How long one legitimate request or one handshake may take before it counts as failed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The abuse run, against the stack's relay with its default limits:
///
/// - `conns` unauthenticated connections (`PORTCULLIS_ABUSE_CONNS`, default 10,000;
///   `PORTCULLIS_ABUSE_QUIC_PERCENT` of them QUIC on the enrolment ALPN, default 50, the
///   rest TLS with the handshake done and no request), none with a certificate, from
///   `127.0.1.x`, at most 400 per address, dialled 256 at a time. Each is dialled again
///   when the relay closes it (the enrolment deadline and the idle timeouts are 30 s), as
///   a determined stranger would. Once the relay counts nearly all of them open (at most
///   90 s), they are held for `PORTCULLIS_ABUSE_SECS` (default 20);
/// - during the hold, a handshake flood from this process (`PORTCULLIS_ABUSE_FLOOD`
///   handshakes at once, default 128, from `127.0.2.1`), alternately QUIC and TLS, each
///   connection closed as soon as it is up;
/// - from before the strangers arrive until the hold ends, device alice: a GET every
///   50 ms on an HTTP/3 connection opened before, and a GET every 100 ms on a new HTTPS
///   connection each.
///
/// Reports the relay's resident memory (before, the highest sampled every 500 ms during
/// the hold, and the process's peak), its CPU during the hold, the connections its gauges
/// counted open, and alice's success rate and p99.
async fn abuse(s: &Stack, conns: usize) -> anyhow::Result<String> {
    let hold = Duration::from_secs(env_or("PORTCULLIS_ABUSE_SECS", 20) as u64);
    let flood_width = env_or("PORTCULLIS_ABUSE_FLOOD", 128);
    let quic_n = conns * env_or("PORTCULLIS_ABUSE_QUIC_PERCENT", 50).min(100) / 100;
    let pid = s.relay.child.id().context("relay exited")?;
    let rss_before = portcullis_e2e::rss(pid);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let legit = Legit::start(s, stop.clone()).await?;

    let opening = Instant::now();
    let strangers = Strangers::keep(s, quic_n, conns - quic_n, stop.clone());
    let open_now = || async { open_connections(s.addrs.admin).await };
    let mut opened = 0;
    while opening.elapsed() < OPEN_DEADLINE {
        opened = open_now().await;
        if opened >= conns * 98 / 100 {
            break;
        }
        // The poll interval of this bounded wait on the relay's gauge.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let opened_in = opening.elapsed();

    let f = Flood {
        dialer: Arc::new(QuicDialer::stranger(
            &s.w,
            loopback(FLOOD_BASE + 1),
            ENROLL_ALPN,
        )),
        tls: Arc::new(stranger_tls(&s.w, &[b"http/1.1"])),
        addrs: s.addrs,
        width: flood_width,
    };
    let flood = tokio::spawn(flood(f, stop.clone()));
    let cpu_before = portcullis_e2e::cpu_ticks(pid);
    let held_from = Instant::now();
    let (mut rss_max, mut open_min) = (0, usize::MAX);
    // Holding them is the point: the relay is sampled meanwhile.
    while held_from.elapsed() < hold {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_max = rss_max.max(portcullis_e2e::rss(pid));
        open_min = open_min.min(open_now().await);
    }
    let cpu = (portcullis_e2e::cpu_ticks(pid).saturating_sub(cpu_before)) as f64
        / rustix::param::clock_ticks_per_second() as f64
        / held_from.elapsed().as_secs_f64();
    let rss_peak = portcullis_e2e::peak_rss(pid);
    let text = metrics_text(s.addrs.admin).await.unwrap_or_default();
    let _ = stop_tx.send(true);
    let flood = flood.await?;
    let (h3, fresh) = legit.finish().await?;
    let (dials, dial_failures) = strangers.finish().await;

    let mib = |b: u64| b as f64 / 1048576.0;
    let sample = |series: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or("?")
            .to_owned()
    };
    let mut out = format!(
        "abuse: {conns} unauthenticated connections ({quic_n} QUIC enrolment, {} TLS), redialled when closed: \
         {opened} open after {:.1} s, at least {open_min} open throughout the {} s hold ({dials} dials, {dial_failures} failed)\n",
        conns - quic_n,
        opened_in.as_secs_f64(),
        hold.as_secs(),
    );
    out.push_str(&format!(
        "  flood from one process during the hold ({flood_width} at once): {:.0} handshakes/s completed (QUIC {}, TLS {}), {} refused or failed\n",
        (flood.quic + flood.tls) as f64 / flood.secs,
        flood.quic,
        flood.tls,
        flood.failed,
    ));
    out.push_str(&format!(
        "  relay: RSS {:.0} MiB before, at most {:.0} MiB during the hold (process peak {:.0} MiB); CPU {:.0} % of one core during the hold\n",
        mib(rss_before),
        mib(rss_max),
        mib(rss_peak),
        cpu * 100.0,
    ));
    out.push_str(&format!(
        "  relay counters: QUIC retries {}, handshake failures {}; refused by caps: quic {} https {}; overload level {}, shed quic {} https {}\n",
        sample("portcullis_relay_quic_retries_total"),
        text.lines()
            .filter(|l| l.starts_with("portcullis_relay_handshakes_total{listener=\"quic\",outcome=\"failed\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum::<u64>(),
        sample("portcullis_relay_connections_refused_total{listener=\"quic\",reason=\"max_connections\"}"),
        sample("portcullis_relay_connections_refused_total{listener=\"https\",reason=\"max_connections\"}"),
        sample("portcullis_relay_overload_level"),
        sample("portcullis_relay_overload_shed_total{work=\"quic_handshake\"}"),
        sample("portcullis_relay_overload_shed_total{work=\"https_handshake\"}"),
    ));
    for (name, r) in [
        ("HTTP/3 on an open connection, every 50 ms", h3),
        ("a new HTTPS connection each, every 100 ms", fresh),
    ] {
        out.push_str(&format!("  legitimate device, {name}: {}\n", r.summary()));
    }
    Ok(out)
}

/// The relay's open client connections on both listeners, from its gauges.
async fn open_connections(admin: std::net::SocketAddr) -> usize {
    let mut n = 0;
    for l in ["quic", "https"] {
        let series = format!("portcullis_relay_open_connections{{listener=\"{l}\"}}");
        n += metric(admin, &series).await.unwrap_or(0).max(0) as usize;
    }
    n
}

/// Strangers' connections kept open: every slot dials, holds its connection until the
/// relay closes it, and dials again, until stopped.
struct Strangers {
    slots: Vec<tokio::task::JoinHandle<()>>,
    dials: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
}

impl Strangers {
    fn keep(s: &Stack, quic_n: usize, tls_n: usize, stop: Stop) -> Self {
        let dials = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(256));
        let tls = Arc::new(stranger_tls(&s.w, &[b"http/1.1"]));
        let (quic_addr, https_addr) = (s.addrs.quic, s.addrs.https);
        let mut slots = Vec::with_capacity(quic_n + tls_n);
        let mut dialer = None;
        for i in 0..quic_n + tls_n {
            let source = loopback(HELD_BASE + 1 + (i / PER_ADDRESS) as u16);
            let quic = i < quic_n;
            if quic && i % PER_ADDRESS == 0 {
                dialer = Some(Arc::new(QuicDialer::stranger(&s.w, source, ENROLL_ALPN)));
            }
            let dialer = dialer.clone().filter(|_| quic);
            let (gate, tls, mut stop) = (gate.clone(), tls.clone(), stop.clone());
            let (dials, failures) = (dials.clone(), failures.clone());
            slots.push(tokio::spawn(async move {
                while !*stop.borrow() {
                    let permit = gate.clone().acquire_owned().await;
                    let held = match &dialer {
                        Some(d) => {
                            let dial = d.dial(quic_addr, RELAY_NAME);
                            match tokio::time::timeout(ATTEMPT_TIMEOUT, dial).await {
                                Ok(Ok(conn)) => Some(Held::Quic(conn)),
                                _ => None,
                            }
                        }
                        None => {
                            let shake = tls_from(source, https_addr, RELAY_NAME, tls.clone());
                            match tokio::time::timeout(ATTEMPT_TIMEOUT, shake).await {
                                Ok(Ok(stream)) => Some(Held::Tls(Box::new(stream))),
                                _ => None,
                            }
                        }
                    };
                    drop(permit);
                    let Some(held) = held else {
                        failures.fetch_add(1, Ordering::Relaxed);
                        // A failed stranger's pause before it tries again.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    dials.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        () = held.closed() => {}
                        _ = stop.changed() => {}
                    }
                }
            }));
        }
        Self {
            slots,
            dials,
            failures,
        }
    }

    /// Waits for every slot to let go; dials and failed dials.
    async fn finish(self) -> (u64, u64) {
        for slot in self.slots {
            let _ = slot.await;
        }
        (
            self.dials.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

/// One stranger's open connection.
enum Held {
    Quic(quinn::Connection),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

impl Held {
    /// Resolves when the relay has closed it (the stranger sends nothing).
    async fn closed(self) {
        match self {
            Self::Quic(conn) => {
                conn.closed().await;
            }
            Self::Tls(mut stream) => {
                use tokio::io::AsyncReadExt;
                let mut byte = [0u8; 1];
                let _ = stream.read(&mut byte).await;
            }
        }
    }
}

/// Tells the abuse run's tasks to stop.
type Stop = tokio::sync::watch::Receiver<bool>;

/// What the flood got done.
struct Flooded {
    quic: u64,
    tls: u64,
    failed: u64,
    secs: f64,
}

/// A handshake flood from one address.
struct Flood {
    /// QUIC strangers on the enrolment ALPN.
    dialer: Arc<QuicDialer>,
    /// TLS strangers.
    tls: Arc<rustls::ClientConfig>,
    addrs: portcullis_e2e::RelayAddrs,
    width: usize,
}

/// `width` workers from one address, alternately a QUIC and a TLS handshake without a
/// certificate, each connection closed once up, until `stop`.
async fn flood(f: Flood, stop: Stop) -> Flooded {
    let source = loopback(FLOOD_BASE + 1);
    let Flood {
        dialer,
        tls,
        addrs,
        width,
    } = f;
    let (quic, tls_n, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..width {
        let (dialer, tls, stop) = (dialer.clone(), tls.clone(), stop.clone());
        let (quic, tls_n, failed) = (quic.clone(), tls_n.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut turn = i;
            while !*stop.borrow() {
                turn += 1;
                let ok = if turn % 2 == 0 {
                    let dial =
                        tokio::time::timeout(ATTEMPT_TIMEOUT, dialer.dial(addrs.quic, RELAY_NAME));
                    match dial.await {
                        Ok(Ok(conn)) => {
                            conn.close(0u32.into(), b"");
                            quic.fetch_add(1, Ordering::Relaxed);
                            true
                        }
                        _ => false,
                    }
                } else {
                    let shake = tls_from(source, addrs.https, RELAY_NAME, tls.clone());
                    match tokio::time::timeout(ATTEMPT_TIMEOUT, shake).await {
                        Ok(Ok(_)) => {
                            tls_n.fetch_add(1, Ordering::Relaxed);
                            true
                        }
                        _ => false,
                    }
                };
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    dialer.endpoint.close(0u32.into(), b"");
    Flooded {
        quic: quic.load(Ordering::Relaxed),
        tls: tls_n.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        secs: started.elapsed().as_secs_f64(),
    }
}

/// Outcomes of a legitimate client's requests.
#[derive(Default)]
struct Outcomes {
    ok: Vec<Duration>,
    failed: usize,
}

impl Outcomes {
    fn summary(mut self) -> String {
        let total = self.ok.len() + self.failed;
        if self.ok.is_empty() {
            return format!("0/{total} answered");
        }
        self.ok.sort();
        let p99 = self.ok[((self.ok.len() as f64 * 0.99) as usize).min(self.ok.len() - 1)];
        format!(
            "{}/{total} answered 200 ({:.2} %), p99 {:.1} ms",
            self.ok.len(),
            self.ok.len() as f64 * 100.0 / total as f64,
            p99.as_secs_f64() * 1e3
        )
    }
}

/// Device alice's two clients during the abuse run.
struct Legit {
    h3: tokio::task::JoinHandle<Outcomes>,
    fresh: tokio::task::JoinHandle<Outcomes>,
}

impl Legit {
    async fn start(s: &Stack, stop: Stop) -> anyhow::Result<Self> {
        let c = H3Client::try_connect(&s.w, &s.addrs, "alice", APP).await?;
        let send = c.sender();
        let h3 = tokio::spawn({
            let stop = stop.clone();
            async move {
                let _c = c;
                let mut send = send;
                let mut out = Outcomes::default();
                while !*stop.borrow() {
                    let t = Instant::now();
                    let one = async {
                        let req = http::Request::get(format!("https://{APP}{SMALL}")).body(())?;
                        let mut stream = send.send_request(req).await?;
                        stream.finish().await?;
                        let status = stream.recv_response().await?.status();
                        while stream.recv_data().await?.is_some() {}
                        anyhow::ensure!(status == 200, "status {status}");
                        Ok(())
                    };
                    match tokio::time::timeout(ATTEMPT_TIMEOUT, one).await {
                        Ok(Ok(())) => out.ok.push(t.elapsed()),
                        _ => out.failed += 1,
                    }
                    // The device's pace, not a wait for anything.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                out
            }
        });
        let tls = Arc::new(client_tls(&s.w, "alice", &[b"http/1.1"]));
        let https = s.addrs.https;
        let fresh = tokio::spawn(async move {
            let mut out = Outcomes::default();
            while !*stop.borrow() {
                let t = Instant::now();
                let one = async {
                    let tls = tls_from(loopback(1), https, APP, tls.clone()).await?;
                    let (mut send, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
                    tokio::spawn(conn);
                    let req = http::Request::get(SMALL)
                        .header("host", APP)
                        .body(Empty::<Bytes>::new())?;
                    let resp = send.send_request(req).await?;
                    let status = resp.status();
                    resp.into_body().collect().await?;
                    anyhow::ensure!(status == 200, "status {status}");
                    Ok(())
                };
                match tokio::time::timeout(ATTEMPT_TIMEOUT, one).await {
                    Ok(Ok(())) => out.ok.push(t.elapsed()),
                    _ => out.failed += 1,
                }
                // The device's pace, not a wait for anything.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out
        });
        Ok(Self { h3, fresh })
    }

    async fn finish(self) -> anyhow::Result<(Outcomes, Outcomes)> {
        Ok((self.h3.await?, self.fresh.await?))
    }
}
