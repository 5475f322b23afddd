//! `portcullis`, the employee agent. Enrolment, the local proxy and TCP forwards are
//! being built; this release only identifies itself.

use std::process::ExitCode;

use clap::Parser;

/// The Portcullis employee agent. For now, devices use certificates issued with
/// `portcullis-relay issue device` directly (curl --cert, or the .p12 in a browser).
#[derive(Debug, Parser)]
#[command(name = "portcullis", version)]
struct Cli {}

fn main() -> ExitCode {
    let _cli = Cli::parse();
    eprintln!(
        "portcullis: the agent's commands (enroll, up, tcp, ssh-proxy) are not in this release; \
         use a device certificate from `portcullis-relay issue device` with curl or a browser"
    );
    ExitCode::from(2)
}
