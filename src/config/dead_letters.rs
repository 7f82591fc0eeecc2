//! `[dead_letters]`: the dead-letter store, where replays may publish, and the marks' key.

use super::Secret;
use super::check::{Checked, refuse};
use serde::Deserialize;

/// The dead-letter store.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSettings {
    /// Move the dead-letter queue into the store.
    pub ingest: bool,
    /// Days archived and replayed dead letters stay in the store (fractions allowed).
    pub retention_days: f64,
    /// Where a replay may publish; empty: only `broker.command_exchange` with
    /// `broker.command_routing_key`. A stored dead letter naming any other target is never
    /// replayed (its headers may have been set by whoever published the command).
    pub replay_targets: Vec<ReplayTarget>,
    /// The key the worker signs its marks with (see [`crate::marks`]); empty: one kept in
    /// PostgreSQL.
    pub signing_key: Secret,
}

/// An exchange and routing key a replay may publish to.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplayTarget {
    /// The exchange (never the default exchange nor an `amq.*` one).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
}

impl DeadLetterSettings {
    pub(super) fn check(&self) -> Checked {
        if !(self.retention_days.is_finite() && self.retention_days > 0.0) {
            return refuse("dead_letters.retention_days", "must be above 0");
        }
        let key = self.signing_key.expose();
        if !key.is_empty() && key.len() < 32 {
            return refuse(
                "dead_letters.signing_key",
                "must be at least 32 characters (or empty: a key kept in PostgreSQL)",
            );
        }
        for (i, target) in self.replay_targets.iter().enumerate() {
            let exchange = &target.exchange;
            if exchange.is_empty() || exchange.starts_with("amq.") {
                return refuse(
                    format!("dead_letters.replay_targets[{i}].exchange"),
                    "must name an exchange of the worker's (not the default exchange nor an \
                     amq.* one, which reach any queue)",
                );
            }
        }
        Ok(())
    }
}
