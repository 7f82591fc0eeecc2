//! `[events]`: the attributes of the events the worker publishes.

use super::check::{Checked, refuse};
use serde::Deserialize;

/// Attributes of published events.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    /// CloudEvents `source` attribute of the events this worker publishes.
    pub source: String,
}

impl EventSettings {
    pub(super) fn check(&self) -> Checked {
        if self.source.trim().is_empty() {
            return refuse("events.source", "must not be empty");
        }
        Ok(())
    }
}
