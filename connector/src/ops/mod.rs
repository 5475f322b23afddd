//! What the connector shows of itself: the admin listener (`/healthz`, `/readyz`,
//! `/metrics`) and the metrics its parts feed.

pub(crate) mod admin;
pub(crate) mod metrics;
