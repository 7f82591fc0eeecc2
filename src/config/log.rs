//! `[log]`: the log's format, level, and how repeated problems and progress are summarised.

use super::check::{Checked, refuse};
use serde::Deserialize;

/// Log output.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// "auto" (short lines at a terminal, JSON elsewhere), "json" or "text".
    pub format: LogFormat,
    /// tracing filter directives, such as "info" or "payment_link_worker=debug,info"; RUST_LOG wins when set.
    pub level: String,
    /// How often a problem that keeps repeating is summarised in one line (see
    /// [`crate::repeats`]).
    pub summary_interval_ms: u64,
    /// Where logs are short lines, how often a busy worker says what it did (0: never); the
    /// per-command lines are at `debug`.
    pub progress_interval_ms: u64,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Short lines when stderr is a terminal, JSON lines otherwise.
    Auto,
    /// One JSON object per line, for log pipelines.
    Json,
    /// One short line per event, for people (coloured only at a terminal).
    Text,
}

impl LogSettings {
    pub(super) fn check(&self) -> Checked {
        if self.summary_interval_ms == 0 {
            return refuse("log.summary_interval_ms", "must be above 0");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            return refuse("log.level", format!("is not a valid filter: {e}"));
        }
        Ok(())
    }
}
