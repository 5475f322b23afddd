//! Connector tunnels as the request path sees them: the routing table from hostnames to
//! connectors, and the handle that opens one stream per exchange. The driver that runs
//! each tunnel's session is a listener (`crate::listen::tunnel`).

mod router;

pub(crate) use router::{ConnectorHandle, Router, TunnelStream, watch_liveness};
