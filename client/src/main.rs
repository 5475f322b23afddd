//! `portcullis`, the employee agent: see the library for everything but argument parsing.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = portcullis::Cli::parse();
    portcullis_shared::telemetry::init(cli.telemetry.log_format);
    match portcullis::main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "portcullis: {}",
                portcullis_shared::text::error_line(e.chain())
            );
            ExitCode::from(1)
        }
    }
}
