//! `[retention]`: how long the store keeps commands, replay runs and the audit log. That the
//! command rows outlast every way a command comes back is checked across sections, in
//! [`super::check`].

use super::check::{Checked, refuse};
use serde::Deserialize;
use std::time::Duration;

/// How long what the store keeps is kept.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Hours a completed command's row (and its sent outbox rows) is kept after it completed
    /// (fractions allowed); it must outlast every way the command can come back.
    pub commands_hours: f64,
    /// Days a finished replay run and its per-letter history are kept.
    pub replay_runs_days: f64,
    /// Days an audit-log entry is kept.
    pub audit_days: f64,
    /// How often one replica removes what is past its window, in bounded batches.
    pub sweep_interval_ms: u64,
}

impl RetentionSettings {
    /// The command rows' window.
    pub fn commands(&self) -> Duration {
        Duration::from_secs_f64(self.commands_hours * 3600.0)
    }
}

impl RetentionSettings {
    pub(super) fn check(&self) -> Checked {
        for (key, value) in [
            ("retention.commands_hours", self.commands_hours),
            ("retention.replay_runs_days", self.replay_runs_days),
            ("retention.audit_days", self.audit_days),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return refuse(key, "must be above 0");
            }
        }
        if self.sweep_interval_ms == 0 {
            return refuse("retention.sweep_interval_ms", "must be above 0");
        }
        Ok(())
    }
}
