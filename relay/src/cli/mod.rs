//! The relay's command line: argument parsing (`args`) and the offline admin commands
//! ([`admin`]) that work on a state directory without a running relay.

pub mod admin;
mod args;

pub use args::*;
