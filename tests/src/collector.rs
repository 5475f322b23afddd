//! An OTLP/HTTP trace receiver for the tests: `POST /v1/traces` with a protobuf
//! `ExportTraceServiceRequest`, decoded with the OpenTelemetry project's own message
//! definitions (`opentelemetry-proto`), over plain HTTP or HTTPS. It keeps every span it
//! receives, with its resource's `service.name`, and answers as a collector does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use prost::Message;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// One span as the collector received it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    /// Hex, as in `traceparent`.
    pub trace_id: String,
    /// Hex.
    pub span_id: String,
    /// Hex; empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP `SpanKind`: 2 server, 3 client.
    pub kind: i32,
    /// Attribute values as text (integers in decimal).
    pub attributes: HashMap<String, String>,
    /// OTLP `StatusCode`: 0 unset, 1 ok, 2 error.
    pub status: i32,
    /// Duration, nanoseconds.
    pub duration_ns: u64,
}

/// OTLP `SpanKind` values.
pub const SPAN_KIND_SERVER: i32 = 2;
/// OTLP `SpanKind` values.
pub const SPAN_KIND_CLIENT: i32 = 3;

/// A running receiver; stops when dropped.
pub struct Collector {
    /// Where it listens.
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    arrived: watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

impl Collector {
    /// Listens on loopback; over TLS with `tls` (a PEM certificate chain and key).
    pub async fn start(tls: Option<(&str, &str)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tls.map(|(cert, key)| {
            let chain = rustls_pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
            TlsAcceptor::from(Arc::new(config))
        });
        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let (tx, arrived) = watch::channel(0);
        let tx = Arc::new(tx);
        let kept = spans.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (spans, tx, acceptor) = (kept.clone(), tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        receive(req, spans.clone(), tx.clone())
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            spans,
            arrived,
            task,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (up to `timeout`) until the spans received hold what `want` looks for, and
    /// returns it.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut want: impl FnMut(&[ReceivedSpan]) -> Option<T>,
    ) -> Option<T> {
        let mut arrived = self.arrived.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(found) = want(&self.spans.lock().unwrap()) {
                return Some(found);
            }
            match tokio::time::timeout_at(deadline, arrived.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }
}

async fn receive(
    req: Request<Incoming>,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    tx: Arc<watch::Sender<usize>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let answer = |status: u16, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header("content-type", "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/traces" {
        return Ok(answer(404, Vec::new()));
    }
    if req
        .headers()
        .get("content-type")
        .is_none_or(|v| v != "application/x-protobuf")
    {
        return Ok(answer(415, Vec::new()));
    }
    let body = req.into_body().collect().await?.to_bytes();
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        return Ok(answer(400, Vec::new()));
    };
    let mut received = Vec::new();
    for rs in export.resource_spans {
        let resource = rs
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    attributes: attributes(&span.attributes),
                    status: span.status.map_or(0, |s| s.code),
                    duration_ns: span
                        .end_time_unix_nano
                        .saturating_sub(span.start_time_unix_nano),
                });
            }
        }
    }
    let total = {
        let mut all = spans.lock().unwrap();
        all.extend(received);
        all.len()
    };
    tx.send_replace(total);
    Ok(answer(
        200,
        ExportTraceServiceResponse::default().encode_to_vec(),
    ))
}
