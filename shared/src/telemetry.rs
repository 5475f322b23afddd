//! Logging setup, the only place a tracing subscriber is installed.
//!
//! `RUST_LOG` (or `PORTCULLIS_LOG`) picks levels; the format is text for people or JSON
//! lines for log shippers.

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!("unknown log format {s:?}: use text or json")),
        }
    }
}

/// The logging flags every Portcullis command line shares (`#[command(flatten)]`).
#[cfg(feature = "cli")]
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Log format: text or json.
    #[arg(
        long,
        global = true,
        env = "PORTCULLIS_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// Installs the global subscriber, writing to standard error. Call once, first thing in
/// `main`; a second call is ignored. Colours only on a terminal (never into a file, a pipe
/// or the journal), and never with `NO_COLOR` set.
pub fn init(format: LogFormat) {
    let filter = std::env::var("PORTCULLIS_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
