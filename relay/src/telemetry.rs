//! Logs to stdout, as text or JSON lines.

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::try_new(with_quiet_dependencies(&settings.level))
            .unwrap_or_else(|_| EnvFilter::new("info"))
    });
    use std::io::IsTerminal;
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal());
    let _ = match settings.format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// lapin logs every returned message (payload included) at WARN, and sqlx logs PostgreSQL
/// notices at INFO; the relay reports both itself. Quiet them unless the filter names them.
fn with_quiet_dependencies(level: &str) -> String {
    let mut filter = level.to_owned();
    for (target, quiet) in [("lapin", "lapin=error"), ("sqlx", "sqlx=warn")] {
        if !level.contains(target) {
            filter.push(',');
            filter.push_str(quiet);
        }
    }
    filter
}
