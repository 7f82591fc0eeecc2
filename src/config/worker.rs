//! `[worker]`: shutdown, and the coordination of replicas over one command.

use super::check::{Checked, refuse};
use serde::Deserialize;

/// Shutdown and coordination between replicas.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// On SIGTERM or ctrl-c, how long commands in flight may take to finish before they are returned to the queue.
    pub shutdown_grace_ms: u64,
    /// How often a worker looks again at a command that another worker is processing right now.
    pub busy_poll_ms: u64,
    /// Added to the longest provider call sequence to give a worker's hold on a command (its lease);
    pub lease_margin_ms: u64,
}

impl WorkerSettings {
    pub(super) fn check(&self) -> Checked {
        if self.busy_poll_ms == 0 {
            return refuse("worker.busy_poll_ms", "must be above 0");
        }
        Ok(())
    }
}
