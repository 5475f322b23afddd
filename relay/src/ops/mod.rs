//! What operators see: Prometheus metrics and the access log; and the sampler that feeds
//! the overload manager and the resource gauges.

pub(crate) mod access_log;
pub(crate) mod metrics;
pub(crate) mod sampler;
pub(crate) mod sli;
