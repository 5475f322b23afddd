//! Shared building blocks of Portcullis.
//!
//! This crate owns everything the relay, the connector and the agent must agree on:
//! identities and hostname patterns ([`identity`]), the organisation PKI ([`pki`]), the
//! tunnel wire format ([`proto`]), configuration files ([`config`]), policy evaluation
//! ([`policy`]) and the relay's embedded store ([`store`]). It leaves sockets, QUIC and
//! HTTP to the binaries: [`proto`] and [`policy`] never do IO.

#![warn(missing_docs)]

pub mod access_log;
pub mod admin_gate;
pub mod assertion;
pub mod config;
pub mod congestion;
pub mod enroll_client;
pub mod h3wire;
pub mod hop_by_hop;
pub mod identity;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod pki;
pub mod policy;
pub mod proto;
pub mod pump;
pub mod shutdown;
#[cfg(feature = "store")]
pub mod store;
pub mod tcp_transport;
pub mod telemetry;
pub mod text;
pub mod token;
pub mod trace;
pub mod transport;
pub mod tunnel_body;
pub mod tunnel_io;
pub mod udp;

pub use identity::{HostPattern, Hostname, Identity, IdentityError, Role};
