//! `pc-bench peers`: Portcullis beside rathole, in one run, on the same origin and load.
//!
//! Four ways from a client to the same servers: direct; rathole with its TLS transport
//! (one encrypted leg: rathole client → server); plain rathole (no encryption); and
//! Portcullis as an employee uses it for a TCP service: `portcullis tcp` (the agent) →
//! relay → connector, two encrypted QUIC legs. Through each: one and eight TCP streams of
//! bulk upload to a sink that counts what arrives, one stream of bulk download from it,
//! small HTTP/1.1 requests at 1 and 64
//! keep-alive connections, new connections (one request each, 64 at a time), the tunnel
//! processes' CPU for each (from /proc), their memory with 1,000 idle tunnelled
//! connections open and after they close, and the kernel's UDP receive-buffer drops
//! (`RcvbufErrors`) during each tunnel's run.
//!
//! rathole comes from the package registry (`scripts/bench` installs it into the target
//! folder, or `PORTCULLIS_RATHOLE` names a binary); without it its columns say so.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use portcullis_e2e::{Daemon, Stack, bin, cpu_seconds, relay_ok, rss};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const WEB: &str = "web.eng.internal";
const BULK: &str = "bulk.eng.internal";
const SMALL: &str = "/bytes?n=64";
const IDLE: usize = 1000;
const CHUNK: usize = 256 << 10;

/// One way from the client to the servers.
struct Way {
    label: &'static str,
    /// Where the client connects for the HTTP origin and for the bulk sink.
    web: SocketAddr,
    bulk: SocketAddr,
    /// The tunnel's processes (none when direct).
    pids: Vec<u32>,
    /// Processes to stop once the bulk figures are taken (the agent forwarding to the
    /// sink), so they weigh on no other figure.
    bulk_only: Vec<Daemon>,
}

/// What was measured through one [`Way`]; `None` where a measurement failed.
#[derive(Default)]
struct Row {
    one_stream_gbit: Option<f64>,
    gbit_per_core: Option<f64>,
    eight_streams_gbit: Option<f64>,
    download_gbit: Option<f64>,
    rps_64: Option<f64>,
    p50_64_us: Option<f64>,
    p99_64_us: Option<f64>,
    rps_1: Option<f64>,
    p50_1_us: Option<f64>,
    p99_1_us: Option<f64>,
    cpu_per_request_us: Option<f64>,
    new_per_sec: Option<f64>,
    cpu_per_new_us: Option<f64>,
    idle_mib: Option<f64>,
    idle_cost_mib: Option<f64>,
    closed_mib: Option<f64>,
    udp_drops: Option<u64>,
}

pub(crate) async fn peers(secs: u64) -> String {
    match run(secs).await {
        Ok(text) => text,
        Err(e) => format!("peers: n/a ({e:#})\n"),
    }
}

async fn run(secs: u64) -> anyhow::Result<String> {
    let mut out = String::from("\n");
    let started_load = loadavg();
    let sink = sink().await?;
    // One device holding 1,000 tunnelled connections needs more streams than a device
    // may have by default (100 per connection, 256 in all): raised for the bench, as an
    // operator would for such a device; every other limit stays at its default. QUIC
    // stream credit comes back in batches (quinn returns it once an eighth of the limit
    // has closed), so the limit is set well above the connections held.
    let limits = format!(
        "[limits]\nmax_concurrent_streams = {n}\nmax_streams_per_device = {n}\n",
        n = 2 * IDLE + 500
    );
    let sink_url = format!("tcp://{sink}");
    let s = Stack::up_with_services(&limits, &[(WEB, "tcp://ORIGIN"), (BULK, &sink_url)]).await;
    let origin: SocketAddr = s.origin_addr.parse()?;
    let dir = s.w.path("peers");
    std::fs::create_dir_all(&dir)?;

    // PORTCULLIS_PEERS=portcullis,rathole,direct picks columns (all by default), e.g. to
    // profile one tunnel alone.
    let only = std::env::var("PORTCULLIS_PEERS").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|w| w.trim() == name);
    let mut columns: Vec<(&str, Result<Row, String>)> = Vec::new();
    let direct = Way {
        label: "direct",
        web: origin,
        bulk: sink,
        pids: Vec::new(),
        bulk_only: Vec::new(),
    };
    if wanted("direct") {
        columns.push(("direct", Ok(measure(direct, secs).await)));
    }

    match rathole_binary() {
        _ if !wanted("rathole") => {}
        Ok(rathole) => {
            for tls in [true, false] {
                let label = if tls { "rathole TLS" } else { "rathole TCP" };
                let way = async {
                    let (server, client, web, bulk) =
                        start_rathole(&rathole, &dir, tls, origin, sink).await?;
                    anyhow::Ok((server, client, web, bulk))
                };
                match way.await {
                    Ok((server, client, web, bulk)) => {
                        let pids = [&server, &client]
                            .iter()
                            .filter_map(|d| d.child.id())
                            .collect();
                        let way = Way {
                            label,
                            web,
                            bulk,
                            pids,
                            bulk_only: Vec::new(),
                        };
                        columns.push((label, Ok(measure(way, secs).await)));
                    }
                    Err(e) => columns.push((label, Err(format!("{e:#}")))),
                }
            }
        }
        Err(e) => {
            eprintln!("\n*** rathole is not available, its columns are skipped: {e:#} ***\n");
            columns.push(("rathole TLS", Err(format!("{e:#}"))));
        }
    }

    let portcullis = async {
        anyhow::ensure!(wanted("portcullis"), "not asked for");
        let home = dir.join("agent");
        enroll_agent(&s, &home)?;
        let (web_agent, web) = forward(&home, WEB, origin.port(), &dir).await?;
        let (bulk_agent, bulk) = forward(&home, BULK, sink.port(), &dir).await?;
        // The bulk agent counts while it works; `measure` stops it after the bulk figures.
        let pids = [&s.relay, &s.connector, &web_agent, &bulk_agent]
            .iter()
            .filter_map(|d| d.child.id())
            .collect();
        let way = Way {
            label: "Portcullis",
            web,
            bulk,
            pids,
            bulk_only: vec![bulk_agent],
        };
        anyhow::Ok((way, web_agent))
    };
    match portcullis.await {
        Ok((way, _web_agent)) => columns.push(("Portcullis", Ok(measure(way, secs).await))),
        Err(_) if !wanted("portcullis") => {}
        Err(e) => columns.push(("Portcullis", Err(format!("{e:#}")))),
    }
    drop(s);

    out.push_str(&format!(
        "peers: the same origin and load through each tunnel, one run ({} cores; load average before {}, after {})\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started_load,
        loadavg()
    ));
    out.push_str(&table(&columns));
    Ok(out)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every figure of one way, in an order that keeps the bulk-only processes out of the rest.
async fn measure(mut way: Way, secs: u64) -> Row {
    let mut row = Row::default();
    let drops_before = udp_rcvbuf_errors();
    eprintln!("peers: {} …", way.label);
    let t = Instant::now();

    let (cpu0, t0) = (cpu(&way.pids), Instant::now());
    row.one_stream_gbit = note(way.label, "one stream", bulk(way.bulk, 1, secs).await);
    let cores = (cpu(&way.pids) - cpu0) / t0.elapsed().as_secs_f64();
    if !way.pids.is_empty() && cores > 0.0 {
        row.gbit_per_core = row.one_stream_gbit.map(|g| g / cores);
    }
    row.eight_streams_gbit = note(way.label, "eight streams", bulk(way.bulk, 8, secs).await);
    row.download_gbit = note(way.label, "download", download(way.bulk, secs).await);
    for d in &way.bulk_only {
        if let Some(pid) = d.child.id() {
            way.pids.retain(|p| *p != pid);
        }
    }
    way.bulk_only.clear();

    if let Some(r) = note(way.label, "requests at 1", requests(way.web, 1, secs).await) {
        (row.rps_1, row.p50_1_us, row.p99_1_us) = (Some(r.per_sec), Some(r.p50_us), Some(r.p99_us));
    }
    let cpu0 = cpu(&way.pids);
    if let Some(r) = note(
        way.label,
        "requests at 64",
        requests(way.web, 64, secs).await,
    ) {
        (row.rps_64, row.p50_64_us, row.p99_64_us) =
            (Some(r.per_sec), Some(r.p50_us), Some(r.p99_us));
        row.cpu_per_request_us = per(&way, cpu0, r.count);
    }
    let cpu0 = cpu(&way.pids);
    if let Some((per_sec, count)) = note(
        way.label,
        "new connections",
        new_connections(way.web, 64, secs).await,
    ) {
        row.new_per_sec = Some(per_sec);
        row.cpu_per_new_us = per(&way, cpu0, count);
    }
    if !way.pids.is_empty()
        && let Some(m) = note(
            way.label,
            "idle connections",
            idle(way.web, &way.pids).await,
        )
    {
        (row.idle_mib, row.idle_cost_mib, row.closed_mib) =
            (Some(m.held_mib), Some(m.cost_mib), Some(m.closed_mib));
    }
    row.udp_drops = Some(udp_rcvbuf_errors().saturating_sub(drops_before));
    eprintln!("peers: {} done in {:.0?}", way.label, t.elapsed());
    row
}

/// Tunnel CPU microseconds per unit of work since `cpu0`.
fn per(way: &Way, cpu0: f64, count: u64) -> Option<f64> {
    (!way.pids.is_empty() && count > 0).then(|| (cpu(&way.pids) - cpu0) * 1e6 / count as f64)
}

fn note<T>(label: &str, what: &str, r: anyhow::Result<T>) -> Option<T> {
    r.map_err(|e| eprintln!("peers: {label}, {what}: {e:#}"))
        .ok()
}

fn cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// The kernel's count of UDP datagrams dropped for a full receive buffer, IPv4 and IPv6.
fn udp_rcvbuf_errors() -> u64 {
    let mut total = 0;
    if let Ok(snmp) = std::fs::read_to_string("/proc/net/snmp") {
        let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
        if let [names, values] = udp[..] {
            let value = names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == "RcvbufErrors")
                .and_then(|(_, v)| v.parse::<u64>().ok());
            total += value.unwrap_or(0);
        }
    }
    if let Ok(snmp6) = std::fs::read_to_string("/proc/net/snmp6") {
        total += snmp6
            .lines()
            .find_map(|l| l.strip_prefix("Udp6RcvbufErrors"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// A TCP sink: reads each connection to its end, then answers the byte count (u64, big
/// endian) and closes. A connection whose first byte is [`DOWNLOAD`] is a download
/// instead: the sink writes to it until it goes away.
async fn sink() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                let mut n = 0u64;
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(_) if n == 0 && buf[0] == DOWNLOAD => {
                            let chunk = vec![0xa5u8; CHUNK];
                            while conn.write_all(&chunk).await.is_ok() {}
                            return;
                        }
                        Ok(k) => n += k as u64,
                        Err(_) => return,
                    }
                }
                let _ = conn.write_all(&n.to_be_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// The first byte that asks the sink for a download (uploads send other bytes).
const DOWNLOAD: u8 = b'D';

/// Downloads from the sink through one connection for `secs`; Gbit/s of what arrived.
async fn download(addr: SocketAddr, secs: u64) -> anyhow::Result<f64> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(&[DOWNLOAD]).await?;
    let mut buf = vec![0u8; CHUNK];
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let mut n = 0u64;
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await {
            Ok(Ok(0)) => anyhow::bail!("the download ended early, after {n} bytes"),
            Ok(Ok(k)) => n += k as u64,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => anyhow::bail!("the download stalled after {n} bytes"),
        }
    }
    Ok(n as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e9)
}

/// Uploads through `streams` connections to the sink for `secs`; Gbit/s of what the sink
/// counted, over the time until its last count came back.
async fn bulk(addr: SocketAddr, streams: usize, secs: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        tasks.push(tokio::spawn(async move {
            let mut conn = tokio::net::TcpStream::connect(addr).await?;
            let chunk = vec![0x5au8; CHUNK];
            while Instant::now() < until {
                conn.write_all(&chunk).await?;
            }
            conn.shutdown().await?;
            let mut count = [0u8; 8];
            tokio::time::timeout(Duration::from_secs(30), conn.read_exact(&mut count))
                .await
                .context("the sink's count never came back")??;
            anyhow::Ok(u64::from_be_bytes(count))
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await??;
    }
    Ok(bytes as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e9)
}

/// An empty upload to the sink: its count comes back.
async fn bulk_once(addr: SocketAddr) -> anyhow::Result<()> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.shutdown().await?;
    let mut count = [0u8; 8];
    conn.read_exact(&mut count).await?;
    Ok(())
}

struct Requests {
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    count: u64,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn http1(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn get(send: &mut Sender, close: bool) -> anyhow::Result<()> {
    send.ready().await?;
    let mut req = http::Request::get(SMALL).header(http::header::HOST, WEB);
    if close {
        req = req.header(http::header::CONNECTION, "close");
    }
    let resp = send.send_request(req.body(Empty::new())?).await?;
    anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(body.len() == 64, "{} bytes", body.len());
    Ok(())
}

/// Small requests on `conns` keep-alive connections for `secs`.
async fn requests(addr: SocketAddr, conns: usize, secs: u64) -> anyhow::Result<Requests> {
    let mut senders = Vec::new();
    for _ in 0..conns {
        let mut s = http1(addr).await?;
        get(&mut s, false).await?;
        senders.push(s);
    }
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut send| {
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    get(&mut send, false).await?;
                    lat.push(t.elapsed().as_micros() as u32);
                }
                anyhow::Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    anyhow::ensure!(!all.is_empty(), "no request completed");
    let pct = |p: f64| f64::from(all[((all.len() as f64 * p) as usize).min(all.len() - 1)]);
    Ok(Requests {
        per_sec: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        count: all.len() as u64,
    })
}

/// New connections with one request each, `conns` at a time, for `secs`: per second and
/// how many.
async fn new_connections(addr: SocketAddr, conns: usize, secs: u64) -> anyhow::Result<(f64, u64)> {
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    let mut send = http1(addr).await?;
                    get(&mut send, true).await?;
                    n += 1;
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += t.await??;
    }
    Ok((n as f64 / started.elapsed().as_secs_f64(), n))
}

struct Idle {
    held_mib: f64,
    cost_mib: f64,
    closed_mib: f64,
}

/// The tunnel processes' memory with [`IDLE`] idle connections open (each has carried
/// one request, so it is set up end to end), what those connections cost over the
/// memory before, and the memory once they have closed.
async fn idle(addr: SocketAddr, pids: &[u32]) -> anyhow::Result<Idle> {
    let mib = |pids: &[u32]| pids.iter().map(|p| rss(*p)).sum::<u64>() as f64 / (1 << 20) as f64;
    let before = mib(pids);
    let mut held = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let mut s = http1(addr).await?;
        get(&mut s, false).await?;
        held.push(s);
    }
    // Measurement pauses, not waits for readiness: every connection is already up; the
    // allocators settle, then (after the close) the tunnels notice and free.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held_mib = mib(pids);
    drop(held);
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(Idle {
        held_mib,
        cost_mib: held_mib - before,
        closed_mib: mib(pids),
    })
}

/// Creates a device token, enrols an agent with it into `home` (key in a file).
fn enroll_agent(s: &Stack, home: &Path) -> anyhow::Result<()> {
    let relay = s.addrs.quic.to_string();
    let out = relay_ok(&[
        "token",
        "create",
        "device",
        "--user",
        "bench",
        "--group",
        "eng",
        "--relay",
        &relay,
        "--state",
        s.w.state(),
    ]);
    let token = out.lines().last().context("no token printed")?;
    let file = home.with_extension("token");
    std::fs::write(&file, token)?;
    let enrolled = std::process::Command::new(bin("portcullis"))
        .arg("--home")
        .arg(home)
        .args(["enroll", "--key-store", "file", "--token-file"])
        .arg(&file)
        .stdin(std::process::Stdio::null())
        .output()?;
    anyhow::ensure!(
        enrolled.status.success(),
        "portcullis enroll: {}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    Ok(())
}

/// `portcullis tcp HOST:PORT --listen 127.0.0.1:0`, running; returns it and where it listens.
async fn forward(
    home: &Path,
    host: &str,
    port: u16,
    dir: &Path,
) -> anyhow::Result<(Daemon, SocketAddr)> {
    let ready = dir.join(format!("{host}.ready"));
    let mut cmd = Command::new(bin("portcullis"));
    cmd.arg("--home")
        .arg(home)
        .args(["tcp", &format!("{host}:{port}"), "--listen", "127.0.0.1:0"])
        .arg("--ready-file")
        .arg(&ready);
    let mut agent = Daemon::spawn_logged(cmd, dir.join(format!("{host}.log")));
    let v: serde_json::Value = serde_json::from_str(&agent.wait_ready_file(&ready).await)?;
    let listen = v["listen"]
        .as_str()
        .context("no listen address in the ready file")?
        .parse()?;
    Ok((agent, listen))
}

/// The rathole binary: `PORTCULLIS_RATHOLE`, else the one `scripts/bench` installs.
fn rathole_binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("PORTCULLIS_RATHOLE") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
                || std::env::current_dir().unwrap_or_default().join("target"),
                PathBuf::from,
            );
            target.join("bench-peers/bin/rathole")
        }
    };
    anyhow::ensure!(
        path.is_file(),
        "{} not found (scripts/bench installs it with cargo; or set PORTCULLIS_RATHOLE)",
        path.display()
    );
    Ok(path)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts a rathole server and client (TLS transport or plain TCP) forwarding two ports to
/// `origin` and `sink`; returns them and the two ports' addresses once a request through
/// the first succeeds.
async fn start_rathole(
    rathole: &Path,
    dir: &Path,
    tls: bool,
    origin: SocketAddr,
    sink: SocketAddr,
) -> anyhow::Result<(Daemon, Daemon, SocketAddr, SocketAddr)> {
    let name = if tls { "rathole-tls" } else { "rathole-tcp" };
    let (control, web, bulk) = (free_port()?, free_port()?, free_port()?);
    let (mut server_transport, mut client_transport) = (String::new(), String::new());
    if tls {
        let (pfx, cert) = rathole_identity(dir)?;
        server_transport = format!(
            "[server.transport]\ntype = \"tls\"\n[server.transport.tls]\npkcs12 = {pfx:?}\npkcs12_password = \"bench\"\n"
        );
        client_transport = format!(
            "[client.transport]\ntype = \"tls\"\n[client.transport.tls]\ntrusted_root = {cert:?}\nhostname = \"localhost\"\n"
        );
    }
    let server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"bench\"\n{server_transport}\
         [server.services.web]\nbind_addr = \"127.0.0.1:{web}\"\n\
         [server.services.bulk]\nbind_addr = \"127.0.0.1:{bulk}\"\n"
    );
    let client = format!(
        "[client]\nremote_addr = \"127.0.0.1:{control}\"\ndefault_token = \"bench\"\n{client_transport}\
         [client.services.web]\nlocal_addr = \"{origin}\"\n\
         [client.services.bulk]\nlocal_addr = \"{sink}\"\n"
    );
    let mut started = Vec::new();
    for (role, text) in [("server", server), ("client", client)] {
        let config = dir.join(format!("{name}-{role}.toml"));
        std::fs::write(&config, text)?;
        let mut cmd = Command::new(rathole);
        cmd.arg(format!("--{role}"))
            .arg(&config)
            .env("RUST_LOG", "warn");
        started.push(Daemon::spawn_logged(
            cmd,
            dir.join(format!("{name}-{role}.log")),
        ));
    }
    let web: SocketAddr = format!("127.0.0.1:{web}").parse()?;
    let bulk: SocketAddr = format!("127.0.0.1:{bulk}").parse()?;
    // Up once a request goes through (the server opens its ports when the client is in).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = async {
            let mut s = http1(web).await?;
            tokio::time::timeout(Duration::from_secs(2), get(&mut s, true)).await??;
            // The sink answers an empty upload with a zero count.
            tokio::time::timeout(Duration::from_secs(2), bulk_once(bulk)).await?
        };
        if ok.await.is_ok() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name} never forwarded a request; see {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = started.pop().context("no client")?;
    let server = started.pop().context("no server")?;
    Ok((server, client, web, bulk))
}

/// A self-signed certificate for `localhost` and its PKCS#12 bundle (what rathole's TLS
/// transport takes), made with the openssl command.
fn rathole_identity(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (key, cert, pfx) = (
        dir.join("rathole.key"),
        dir.join("rathole.pem"),
        dir.join("rathole.pfx"),
    );
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .context("running openssl (needed for rathole's TLS identity)")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let (key_s, cert_s, pfx_s) = (
        key.to_string_lossy(),
        cert.to_string_lossy(),
        pfx.to_string_lossy(),
    );
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &key_s,
        "-out",
        &cert_s,
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
    ])?;
    run(&[
        "pkcs12",
        "-export",
        "-inkey",
        &key_s,
        "-in",
        &cert_s,
        "-out",
        &pfx_s,
        "-passout",
        "pass:bench",
    ])?;
    Ok((pfx, cert))
}

/// The comparison table: one column per way, one row per figure.
fn table(columns: &[(&str, Result<Row, String>)]) -> String {
    type Get = fn(&Row) -> Option<String>;
    fn f0(v: Option<f64>) -> Option<String> {
        v.map(|v| format!("{v:.0}"))
    }
    fn f2(v: Option<f64>) -> Option<String> {
        v.map(|v| format!("{v:.2}"))
    }
    let rows: [(&str, Get); 15] = [
        ("one TCP stream, Gbit/s", |r| f2(r.one_stream_gbit)),
        ("eight TCP streams, Gbit/s", |r| f2(r.eight_streams_gbit)),
        ("one TCP stream download, Gbit/s", |r| f2(r.download_gbit)),
        ("Gbit/s per tunnel CPU core (one stream)", |r| {
            f2(r.gbit_per_core)
        }),
        ("requests/s, 64 keep-alive connections", |r| f0(r.rps_64)),
        ("p50 / p99 µs at 64", |r| {
            Some(format!("{} / {}", f0(r.p50_64_us)?, f0(r.p99_64_us)?))
        }),
        ("requests/s, 1 connection", |r| f0(r.rps_1)),
        ("p50 / p99 µs at 1", |r| {
            Some(format!("{} / {}", f0(r.p50_1_us)?, f0(r.p99_1_us)?))
        }),
        ("tunnel CPU per request at 64, µs", |r| {
            f0(r.cpu_per_request_us)
        }),
        ("new connections/s (one request each, 64 at a time)", |r| {
            f0(r.new_per_sec)
        }),
        ("tunnel CPU per new connection, µs", |r| {
            f0(r.cpu_per_new_us)
        }),
        (
            "tunnel processes' memory, 1,000 idle connections, MiB",
            |r| f0(r.idle_mib),
        ),
        ("  of which the 1,000 connections, MiB", |r| {
            f0(r.idle_cost_mib)
        }),
        ("  after they closed, MiB", |r| f0(r.closed_mib)),
        ("UDP receive-buffer drops during the run", |r| {
            r.udp_drops.map(|d| d.to_string())
        }),
    ];
    let mut out = format!("{:<55}", "");
    for (name, _) in columns {
        out.push_str(&format!(" {name:>14}"));
    }
    out.push('\n');
    for (label, get) in rows {
        out.push_str(&format!("{label:<55}"));
        for (_, row) in columns {
            let cell = match row {
                Ok(r) => get(r).unwrap_or_else(|| "–".into()),
                Err(_) => "n/a".into(),
            };
            out.push_str(&format!(" {cell:>14}"));
        }
        out.push('\n');
    }
    for (name, row) in columns {
        if let Err(e) = row {
            out.push_str(&format!("{name}: n/a ({e})\n"));
        }
    }
    out
}
