//! Logging: JSON lines for machines or text for people, filtered by `log.level` or `RUST_LOG`.
//! Each command's lines carry its command id and correlation id through the `command` span.

use crate::config::{LogFormat, LogSettings};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls (tests) keep the first one.
pub fn init(settings: &LogSettings) {
    // lapin logs every returned (unroutable) message in full, payload included; the worker
    // reports those itself, without the payload.
    let quiet = "lapin::returned_messages=error";
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|env| EnvFilter::try_new(format!("{env},{quiet}")).ok())
        .or_else(|| EnvFilter::try_new(format!("{},{quiet}", settings.level)).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
