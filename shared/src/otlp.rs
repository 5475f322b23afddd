//! OTLP export of spans (`[otlp]` in relay.toml and connector.toml), with the
//! OpenTelemetry SDK's batch processor and OTLP/HTTP exporter.
//!
//! The daemons already choose their trace and span ids themselves ([`TraceContext`]):
//! the relay's span id is the request id it returned and sent on before the span ends.
//! So a finished span is handed to the batch processor as [`SpanData`] with those ids,
//! rather than started through the SDK's tracer, which would choose ids of its own.
//!
//! The processor exports from a thread of its own; the HTTP requests it makes run on the
//! daemon's Tokio runtime (the exporter's HTTP client). A full queue drops spans; it never
//! blocks a request.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use opentelemetry::InstrumentationScope;
use opentelemetry::trace::{SpanContext, SpanId, Status, TraceFlags, TraceId, TraceState};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};

use crate::config::OtlpConfig;
use crate::pki;
use crate::trace::TraceContext;

pub use opentelemetry::KeyValue;
pub use opentelemetry::trace::SpanKind;

/// Why export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// `ca` could not be read.
    #[error("otlp.ca: {0}")]
    Ca(#[from] pki::PkiError),
    /// The exporter refused its settings.
    #[error("otlp: {0}")]
    Exporter(String),
}

/// One finished span: this hop's part of a request.
#[derive(Debug)]
pub struct FinishedSpan {
    /// The trace and this span's id.
    pub trace: TraceContext,
    /// The caller's span, when the trace came from a caller.
    pub parent: Option<[u8; 8]>,
    /// Server (the relay, answering a client) or client (the connector, asking an origin).
    pub kind: SpanKind,
    /// By the HTTP conventions, the method (`GET`), or `CONNECT` for a tunnel.
    pub name: Cow<'static, str>,
    /// When it started and ended.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// OpenTelemetry semantic-convention attributes (`http.request.method`, ...).
    pub attributes: Vec<KeyValue>,
    /// Set when the span failed (a 5xx the relay answered, an origin that did not).
    pub error: Option<Cow<'static, str>>,
}

/// The daemon's span exporter.
#[derive(Debug)]
pub struct Spans {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
    ratio: f64,
}

/// Spans waiting for export at most; beyond, new ones are dropped.
const QUEUE: usize = 8192;

impl Spans {
    /// Starts the exporter for `config`, naming the service `service` unless the config
    /// names it. Call from within the daemon's Tokio runtime (multi-threaded), which
    /// carries the export requests.
    pub fn start(config: &OtlpConfig, service: &'static str) -> Result<Self, OtlpError> {
        let client = Client::new(config)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(config.endpoint.as_str())
            .with_timeout(config.timeout)
            .with_headers(config.headers.clone().into_iter().collect())
            .build()
            .map_err(|e| OtlpError::Exporter(e.to_string()))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(QUEUE)
            .with_max_export_batch_size(512)
            .with_scheduled_delay(Duration::from_secs(1))
            .build();
        let mut processor = BatchSpanProcessor::new(exporter, batch);
        let name = config
            .service_name
            .clone()
            .unwrap_or_else(|| service.into());
        processor.set_resource(
            &Resource::builder_empty()
                .with_service_name(name)
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        tracing::info!(
            endpoint = config.endpoint.as_str(),
            sample_ratio = config.sample_ratio.get(),
            "exporting spans over OTLP"
        );
        Ok(Self {
            processor,
            scope: InstrumentationScope::builder(service)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            ratio: config.sample_ratio.get(),
        })
    }

    /// A new trace for a request that came without one, sampled at the configured ratio.
    pub fn new_trace(&self) -> TraceContext {
        TraceContext::root_sampled(self.ratio)
    }

    /// Queues `span` for export if its trace is sampled. Never blocks.
    pub fn export(&self, span: FinishedSpan) {
        if !span.trace.sampled() {
            return;
        }
        let context = SpanContext::new(
            TraceId::from_bytes(span.trace.trace_id),
            SpanId::from_bytes(span.trace.span_id),
            TraceFlags::new(span.trace.flags),
            false,
            TraceState::default(),
        );
        self.processor.on_end(SpanData {
            span_context: context,
            parent_span_id: span.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: span.parent.is_some(),
            span_kind: span.kind,
            name: span.name,
            start_time: span.start,
            end_time: span.end,
            attributes: span.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: span
                .error
                .map_or(Status::Unset, |description| Status::Error { description }),
            instrumentation_scope: self.scope.clone(),
        });
    }

    /// Exports what is queued and stops, within `timeout`. Blocks: call it from a
    /// blocking task (the export requests need the runtime's other threads).
    pub fn shutdown(&self, timeout: Duration) {
        if let Err(e) = self.processor.shutdown_with_timeout(timeout) {
            tracing::warn!(error = %e, "OTLP: spans still queued at shutdown were not exported");
        }
    }
}

/// The largest collector answer read.
const MAX_ANSWER: usize = 1024 * 1024;

/// The exporter's HTTP client: hyper with rustls, run on the daemon's runtime, since the
/// batch processor's own thread has none.
struct Client {
    inner: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// What `check` can find wrong before the exporter starts: a `ca` that does not load.
pub fn check(config: &OtlpConfig) -> Result<(), OtlpError> {
    tls(config).map(drop)
}

/// The TLS settings for an `https://` collector: `ca`, else the system's CAs.
fn tls(config: &OtlpConfig) -> Result<rustls::ClientConfig, OtlpError> {
    Ok(pki::server_verifying_client(config.ca.as_deref())?)
}

impl Client {
    fn new(config: &OtlpConfig) -> Result<Self, OtlpError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls(config)?)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let inner = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(2)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            inner,
            runtime: tokio::runtime::Handle::current(),
            timeout: config.timeout,
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.inner.clone();
        let timeout = self.timeout;
        let exchange = async move {
            let response = client.request(request.map(Full::new)).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        };
        self.runtime
            .spawn(async move {
                tokio::time::timeout(timeout, exchange)
                    .await
                    .map_err(|_| HttpError::from(format!("no answer within {timeout:?}")))?
            })
            .await
            .map_err(|e| HttpError::from(format!("export task ended: {e}")))?
    }
}
