//! `[breaker]`: when to stop calling a provider that is down, and how it is probed.

use super::check::{Checked, refuse};
use serde::Deserialize;

/// When to stop calling a provider that is down.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    /// Share of transiently failed calls in the window that opens the circuit.
    pub failure_ratio: f64,
    /// Calls in the window before the ratio counts.
    pub min_calls: usize,
    /// How far back calls count.
    pub window_ms: u64,
    /// How often one probe call goes through while the circuit is open.
    pub probe_interval_ms: u64,
}

impl BreakerSettings {
    pub(super) fn check(&self) -> Checked {
        if !(self.failure_ratio > 0.0 && self.failure_ratio <= 1.0) {
            return refuse("breaker.failure_ratio", "must be above 0 and at most 1");
        }
        if self.min_calls == 0 || self.window_ms == 0 || self.probe_interval_ms == 0 {
            return refuse(
                "breaker.min_calls",
                "breaker.window_ms and breaker.probe_interval_ms must be above 0",
            );
        }
        Ok(())
    }
}
