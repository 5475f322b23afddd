//! What operators see: Prometheus metrics and the access log.

pub(crate) mod access_log;
pub(crate) mod metrics;
