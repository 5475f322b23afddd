//! The access log line of one request: facts gathered as the request proceeds, written
//! when its response body has been sent or abandoned, with the bytes sent.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::OwnedSemaphorePermit;

use super::authorize::request_host;
use crate::conn::{BoxError, ConnInfo, ExtendedConnect, ReqBody, RespBody};
use crate::ops::access_log::Entry;
use crate::ops::sli::Finished;
use crate::state::State;
use portcullis_shared::otlp::{FinishedSpan, KeyValue, SpanKind};
use portcullis_shared::trace::{TRACEPARENT, TraceContext};

/// The request id's header: in the response to the client and in the request to the
/// origin. The id is the relay's span id of the request's trace.
pub(crate) const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Per-request facts for the access log, filled in as the request proceeds.
pub(super) struct Access {
    start: Instant,
    client: SocketAddr,
    device: Option<String>,
    pub(super) user: Option<String>,
    /// From [`request_host`]; empty when the request named none.
    pub(super) hostname: String,
    method: String,
    path: String,
    protocol: &'static str,
    pub(super) reason: Option<&'static str>,
    /// Set once the request was routed to a connector: its hostname is then a label of
    /// the SLI series.
    pub(super) routed: bool,
    /// Request body bytes received, counted by [`Access::count_request_body`].
    bytes_in: Arc<AtomicU64>,
    /// The response head was ready this long after the request.
    head: Option<std::time::Duration>,
    /// The trace: the client's continued with the relay's span (whose id is the request
    /// id), or a new one.
    pub(super) trace: TraceContext,
    /// The client's span, when it sent a `traceparent`.
    parent: Option<[u8; 8]>,
    /// Whether the caller's `traceparent` asked for sampling (honoured once authorised).
    caller_sampled: bool,
    /// The connection stays busy for as long as this request, its response body or its
    /// tunnel holds these permits (and the device's and connector's stream slots).
    pub(super) permits: Vec<OwnedSemaphorePermit>,
}

impl Access {
    /// Starts the line for `req` on the connection `info`.
    pub(super) fn begin<B>(state: &State, info: &ConnInfo, req: &Request<B>) -> Self {
        let path = if req.method() == Method::CONNECT
            && req.extensions().get::<ExtendedConnect>().is_none()
        {
            req.uri()
                .authority()
                .map_or_else(String::new, ToString::to_string)
        } else {
            req.uri().path().to_owned()
        };
        let caller = req
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse);
        // A caller's sampled flag makes the relay export spans for it: taken only once the
        // request is authorised ([`Access::authorised`]), so a stranger cannot.
        let trace = match (caller, &state.spans) {
            (Some(caller), _) => caller.child().with_sampled(false),
            (None, Some(spans)) => spans.new_trace(),
            (None, None) => TraceContext::root(),
        };
        Self {
            start: Instant::now(),
            client: info.peer,
            device: info.device.as_ref().map(|d| d.id().to_owned()),
            user: None,
            hostname: request_host(req).unwrap_or_default(),
            method: req.method().to_string(),
            path,
            protocol: info.protocol,
            reason: None,
            routed: false,
            trace,
            parent: caller.map(|c| c.span_id),
            caller_sampled: caller.is_some_and(|c| c.sampled()),
            bytes_in: Arc::default(),
            head: None,
            permits: info.activity.begin().into_iter().collect(),
        }
    }

    /// The request was authorised: a caller's sampled flag now counts.
    pub(super) fn authorised(&mut self) {
        if self.caller_sampled {
            self.trace = self.trace.with_sampled(true);
        }
    }

    /// Counts `req`'s body bytes as they arrive, for the SLI series.
    pub(super) fn count_request_body(&self, req: Request<ReqBody>) -> Request<ReqBody> {
        let counter = self.bytes_in.clone();
        req.map(|body| {
            body.map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                frame
            })
            .boxed()
        })
    }

    /// Wraps `resp`'s body so that the line is written, with the bytes sent, when the body
    /// has been sent or abandoned.
    pub(super) fn log_when_sent(
        mut self,
        resp: Response<RespBody>,
        state: Arc<State>,
    ) -> Response<RespBody> {
        self.head = Some(self.start.elapsed());
        let status = resp.status().as_u16();
        let (mut parts, body) = resp.into_parts();
        if let Ok(id) = http::HeaderValue::from_str(&self.trace.span_id()) {
            parts.headers.insert(REQUEST_ID, id);
        }
        Response::from_parts(
            parts,
            LoggedBody {
                inner: body,
                bytes: 0,
                done: Some((self, state, status)),
            }
            .boxed(),
        )
    }

    fn write(&self, state: &State, status: u16, bytes: u64) {
        let total = self.start.elapsed();
        state.metrics.sli.request(&Finished {
            hostname: self.routed.then_some(self.hostname.as_str()),
            protocol: self.protocol,
            method: &self.method,
            status,
            head: self.head.unwrap_or(total),
            total,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: bytes,
        });
        // The span is built only for a trace that is exported.
        if let Some(spans) = &state.spans
            && self.trace.sampled()
        {
            spans.export(self.span(status, total, bytes));
        }
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        state.access_log.write(&Entry {
            time,
            request_id: &self.trace.span_id(),
            trace_id: &self.trace.trace_id(),
            client: self.client.ip().to_string(),
            device: self.device.as_deref(),
            user: self.user.as_deref(),
            hostname: &self.hostname,
            method: &self.method,
            path: &self.path,
            protocol: self.protocol,
            status,
            bytes,
            duration_ms: self.start.elapsed().as_secs_f64() * 1000.0,
            reason: self.reason,
        });
    }
}

impl Access {
    /// The relay's span of this request, by the OpenTelemetry HTTP server conventions.
    fn span(&self, status: u16, total: std::time::Duration, bytes_out: u64) -> FinishedSpan {
        let end = SystemTime::now();
        let version = self.protocol.strip_prefix("HTTP/").unwrap_or(self.protocol);
        let mut attributes = vec![
            KeyValue::new("http.request.method", self.method.clone()),
            KeyValue::new("url.scheme", "https"),
            KeyValue::new("url.path", self.path.clone()),
            KeyValue::new("server.address", self.hostname.clone()),
            KeyValue::new("network.protocol.name", "http"),
            KeyValue::new("network.protocol.version", version),
            KeyValue::new("client.address", self.client.ip().to_string()),
            KeyValue::new("http.response.status_code", i64::from(status)),
            KeyValue::new(
                "http.request.body.size",
                self.bytes_in.load(Ordering::Relaxed) as i64,
            ),
            KeyValue::new("http.response.body.size", bytes_out as i64),
        ];
        if let Some(device) = &self.device {
            attributes.push(KeyValue::new("portcullis.device", device.clone()));
        }
        if let Some(user) = &self.user {
            attributes.push(KeyValue::new("enduser.id", user.clone()));
        }
        if let Some(reason) = self.reason {
            attributes.push(KeyValue::new("portcullis.reason", reason));
        }
        FinishedSpan {
            trace: self.trace,
            parent: self.parent,
            kind: SpanKind::Server,
            name: self.method.clone().into(),
            start: end.checked_sub(total).unwrap_or(end),
            end,
            attributes,
            // A server span fails on a 5xx only (a 4xx is the client's error).
            error: (status >= 500).then(|| format!("answered {status}").into()),
        }
    }
}

/// Counts response bytes and writes the access-log line when the body ends or is dropped.
struct LoggedBody {
    inner: RespBody,
    bytes: u64,
    done: Option<(Access, Arc<State>, u16)>,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll
            && let Some(data) = frame.data_ref()
        {
            self.bytes += data.len() as u64;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some((access, state, status)) = self.done.take() {
            access.write(&state, status, self.bytes);
        }
    }
}
