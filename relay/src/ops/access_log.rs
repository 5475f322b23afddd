//! The relay's access log line: one JSON object per request, appended (see
//! [`portcullis_shared::access_log`]) before the response finishes, so a restart loses no
//! line.

use serde::Serialize;

/// One request, as logged.
#[derive(Debug, Serialize)]
pub(crate) struct Entry<'a> {
    pub(crate) time: String,
    /// This request's id: the relay's span id, sent to the origin as `x-request-id` and
    /// to the client in the response.
    pub(crate) request_id: &'a str,
    /// The W3C trace id, the client's (`traceparent`) or a new one; the connector's
    /// access log and the origin see the same.
    pub(crate) trace_id: &'a str,
    pub(crate) client: String,
    pub(crate) device: Option<&'a str>,
    pub(crate) user: Option<&'a str>,
    pub(crate) hostname: &'a str,
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) protocol: &'a str,
    pub(crate) status: u16,
    pub(crate) bytes: u64,
    pub(crate) duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<&'a str>,
}
