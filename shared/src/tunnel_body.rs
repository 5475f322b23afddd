//! Bodies on the tunnel's HTTP/1.1 hop: trailers are folded into the one declared field
//! [`TRAILERS_FIELD`] on the way in and unfolded on the way out (see
//! [`crate::proto::encode_trailers`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};

use crate::proto::{TRAILERS_FIELD, decode_trailers, encode_trailers};

/// A body fed frame by frame through a small channel by a task that reads some stream
/// (an HTTP/3 request or response): the channel's bound carries backpressure to that
/// task, and so to the peer through flow control.
#[derive(Debug)]
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

/// The error type of a [`ChannelBody`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body of any kind, as every proxy hop of Portcullis passes them on.
pub type AnyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A response of `content`, typed `content_type`: the one way the relay, the connector
/// and the agent answer with a body of their own.
pub fn response(
    status: http::StatusCode,
    content: String,
    content_type: &'static str,
) -> http::Response<AnyBody> {
    use http_body_util::BodyExt;
    let mut resp = http::Response::new(
        http_body_util::Full::new(Bytes::from(content))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    resp
}

/// A one-line `text/plain` response: `msg` and a newline.
pub fn text_response(status: http::StatusCode, msg: &str) -> http::Response<AnyBody> {
    response(status, format!("{msg}\n"), "text/plain; charset=utf-8")
}

impl ChannelBody {
    /// A body and the sender that feeds it, holding at most `bound` frames in between.
    pub fn channel(
        bound: usize,
    ) -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
        Self,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(bound);
        (tx, Self { rx })
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }
}

/// Which way a [`TunnelBody`] converts trailers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// Entering the tunnel: all trailers become one [`TRAILERS_FIELD`].
    Fold,
    /// Leaving the tunnel: [`TRAILERS_FIELD`] becomes the original trailers.
    Unfold,
}

/// Wraps a body, converting its trailers; data passes untouched.
#[derive(Debug)]
pub struct TunnelBody<B> {
    inner: B,
    fold: Fold,
}

impl<B> TunnelBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, fold: Fold) -> Self {
        Self { inner, fold }
    }
}

/// Folds `trailers` into a map with the single tunnel field.
pub fn fold(trailers: &HeaderMap) -> HeaderMap {
    let encoded = encode_trailers(trailers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())));
    let mut out = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        out.insert(HeaderName::from_static(TRAILERS_FIELD), v);
    }
    out
}

/// Whether a trailer could pass for a claim about identity or the client's address (an
/// origin that merges trailers into headers would read it as one): never carried.
fn is_claim(name: &HeaderName) -> bool {
    let lower = name.as_str().replace('_', "-");
    crate::assertion::is_portcullis_header(name)
        || lower.starts_with("x-forwarded-")
        || lower == "forwarded"
        || lower == "x-real-ip"
}

/// Unfolds the tunnel field back into trailers; other fields pass through. A malformed
/// field is dropped (and logged): trailers are advisory to the hop, never a reason to fail
/// a body that has already been delivered. Trailers that could pass for a claim about
/// identity (`portcullis-*`, `x-forwarded-*`, `forwarded`, `x-real-ip`) are dropped.
pub fn unfold(mut trailers: HeaderMap) -> HeaderMap {
    let Some(folded) = trailers.remove(TRAILERS_FIELD) else {
        return trailers;
    };
    match decode_trailers(folded.as_bytes()) {
        Ok(fields) => {
            for (name, value) in fields {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_bytes(&value),
                ) && !is_claim(&n)
                {
                    trailers.append(n, v);
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "dropping malformed tunnel trailers"),
    }
    trailers
}

impl<B> Body for TunnelBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let fold_dir = self.fold;
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_trailers() {
                    Ok(t) => Frame::trailers(match fold_dir {
                        Fold::Fold => fold(&t),
                        Fold::Unfold => unfold(t),
                    }),
                    Err(frame) => frame,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_then_unfold_restores_trailers() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        t.append("x-multi", HeaderValue::from_static("a"));
        t.append("x-multi", HeaderValue::from_static("b"));
        let folded = fold(&t);
        assert_eq!(folded.len(), 1);
        assert_eq!(unfold(folded), t);
    }

    #[test]
    fn trailers_that_could_pass_for_identity_are_not_carried() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        for forged in [
            "portcullis-user",
            "portcullis_groups",
            "x-forwarded-for",
            "forwarded",
        ] {
            t.insert(
                HeaderName::from_bytes(forged.as_bytes()).unwrap(),
                HeaderValue::from_static("ceo"),
            );
        }
        let names: Vec<String> = unfold(fold(&t)).keys().map(|k| k.to_string()).collect();
        assert_eq!(names, ["grpc-status"]);
    }
}
