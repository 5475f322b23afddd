//! What operators see: Prometheus metrics and the access log; the sampler that feeds
//! the overload manager and the resource gauges; and the audit log's retention.

pub(crate) mod access_log;
pub(crate) mod metrics;
pub(crate) mod retention;
pub(crate) mod sampler;
pub(crate) mod sli;
