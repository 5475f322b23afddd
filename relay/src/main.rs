//! `portcullis-relay`: see the crate library for everything but argument parsing.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = portcullis_relay::cli::Cli::parse();
    portcullis_shared::telemetry::init(cli.telemetry.log_format);
    match portcullis_relay::main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if portcullis_relay::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "portcullis-relay: {}",
                portcullis_shared::text::error_line(e.chain())
            );
            ExitCode::from(portcullis_relay::exit_code(&e))
        }
    }
}
