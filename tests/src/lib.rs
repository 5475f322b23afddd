//! Harness for the end-to-end tests, in two tiers:
//!
//! - in process ([`TestRelay`], [`TestConnector`], [`TestOrigin`], [`TestClient`]): the
//!   relay and connector libraries inside the test's tokio runtime on `127.0.0.1:0`, each
//!   in its own tracing span, started by builders that return once bound or registered;
//! - real binaries ([`World`], [`Stack`]): `portcullis-relay`, `portcullis-connector` and
//!   the test origin as child processes on loopback, driven by real `curl` and by
//!   hand-written HTTP/2, HTTP/3 and WebSocket clients.
//!
//! Each test has its own temporary directory with its own CA. Every module is re-exported
//! here, so tests `use portcullis_e2e::{...}`.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod balancer;
mod collector;
mod h2;
mod h3;
mod http;
mod inprocess;
mod netns;
mod origin;
mod postgres;
mod probe;
mod process;
mod stack;
mod stranger;
mod tally;
mod tcp_path;
mod udp_path;
mod wait;
mod websocket;
mod world;

pub use balancer::*;
pub use collector::*;
pub use h2::*;
pub use h3::*;
pub use http::*;
pub use inprocess::*;
pub use netns::*;
pub use origin::*;
pub use postgres::*;
pub use probe::*;
pub use process::*;
pub use stack::*;
pub use stranger::*;
pub use tally::*;
pub use tcp_path::*;
pub use udp_path::*;
pub use wait::*;
pub use websocket::*;
pub use world::*;
