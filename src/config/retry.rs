//! `[retry]`: the backoff of transient provider failures and the broker-side delay tiers.

use super::check::{Checked, refuse};
use serde::Deserialize;

/// Exponential backoff of transient provider failures.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// First wait between retries of a transient provider failure.
    pub initial_interval_ms: u64,
    /// Longest wait between two retries.
    pub max_interval_ms: u64,
    /// Growth of the wait from one retry to the next.
    pub multiplier: f64,
    /// Jitter: each wait is drawn from [wait * (1 - factor), wait * (1 + factor)].
    pub randomization_factor: f64,
    /// In-process budget for one round of retries. Past it the command waits in the next delay tier.
    pub max_elapsed_ms: u64,
    /// Waits in broker-side delay queues between retry rounds; empty dead-letters after the first round.
    pub delay_tiers_ms: Vec<u64>,
}

impl RetrySettings {
    pub(super) fn check(&self) -> Checked {
        if self.initial_interval_ms == 0 || self.max_interval_ms < self.initial_interval_ms {
            return refuse(
                "retry.max_interval_ms",
                "must be at least retry.initial_interval_ms, which must be above 0",
            );
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return refuse("retry.multiplier", "must be a number of at least 1");
        }
        if !(0.0..=1.0).contains(&self.randomization_factor) {
            return refuse("retry.randomization_factor", "must be between 0 and 1");
        }
        if self.delay_tiers_ms.contains(&0) {
            return refuse("retry.delay_tiers_ms", "must hold delays above 0");
        }
        Ok(())
    }
}
