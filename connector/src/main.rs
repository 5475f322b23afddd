//! `portcullis-connector`: see the crate library for everything but argument parsing.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = portcullis_connector::Cli::parse();
    portcullis_shared::telemetry::init(cli.telemetry.log_format);
    match portcullis_connector::main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "portcullis-connector: {}",
                portcullis_shared::text::error_line(e.chain())
            );
            ExitCode::from(portcullis_connector::exit_code(&e))
        }
    }
}
