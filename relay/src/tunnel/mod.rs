//! Connector tunnels on the relay: the routing table ([`router`]) and the driver that runs
//! one connector's tunnel session over its transport ([`driver`]).

mod driver;
mod router;

pub(crate) use driver::serve_connector;
pub(crate) use router::{ConnectorHandle, Router, TunnelStream};
