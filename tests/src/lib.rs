//! Harness for the end-to-end tests: runs the real `portcullis-relay`,
//! `portcullis-connector` and the test origin as child processes on loopback, each test in
//! its own temporary directory with its own CA, and drives them with real `curl` and
//! hand-written HTTP/2, HTTP/3 and WebSocket clients. Every module is re-exported here, so
//! tests `use portcullis_e2e::{...}`.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod h2;
mod h3;
mod http;
mod process;
mod stack;
mod wait;
mod websocket;
mod world;

pub use h2::*;
pub use h3::*;
pub use http::*;
pub use process::*;
pub use stack::*;
pub use wait::*;
pub use websocket::*;
pub use world::*;
