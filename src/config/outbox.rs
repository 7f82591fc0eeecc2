//! `[outbox]`: the relay that publishes what the worker could not publish at once.

use super::check::{Checked, refuse};
use serde::Deserialize;

/// The relay that publishes what the worker could not publish at once.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    /// How often the relay looks for events and dead letters that are not yet confirmed by the broker.
    pub relay_interval_ms: u64,
    /// Rows the relay publishes per round.
    pub relay_batch_size: i64,
    /// How long the relay leaves a fresh row to the worker that wrote it before publishing it itself.
    pub inline_grace_ms: u64,
    /// Longest wait between two relay attempts at the same row.
    pub max_retry_interval_ms: u64,
}

impl OutboxSettings {
    pub(super) fn check(&self) -> Checked {
        if self.relay_interval_ms == 0 || self.relay_batch_size < 1 {
            return refuse(
                "outbox.relay_interval_ms",
                "and outbox.relay_batch_size must be above 0",
            );
        }
        Ok(())
    }
}
