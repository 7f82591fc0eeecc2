//! The order the sections are checked in, and the checks that span sections. Each section checks
//! its own values beside its struct (`broker.rs`, `provider.rs`, ...); a check that compares two
//! sections lives here, so neither section has to know the other. Every refusal names the key and
//! where its value came from.

use super::{ConfigError, Settings};

/// A section's refusal of one of its values: the key (from the top, as a user writes it) and why.
pub(super) struct Refusal {
    key: String,
    why: String,
}

/// What a section's check answers.
pub(super) type Checked = Result<(), Refusal>;

/// Refuses `key`'s value, because `why`.
pub(super) fn refuse(key: impl Into<String>, why: impl Into<String>) -> Checked {
    Err(Refusal {
        key: key.into(),
        why: why.into(),
    })
}

impl Settings {
    /// Checks what types alone cannot: ranges, URL shapes, names; the first refusal stops it.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        self.check_sections().map_err(|refused| {
            ConfigError(format!(
                "{} {}",
                self.origins.describe(&refused.key),
                refused.why
            ))
        })
    }

    fn check_sections(&self) -> Checked {
        self.broker.check()?;
        self.database.check()?;
        self.provider.check()?;
        self.retry.check()?;
        self.breaker.check()?;
        self.outbox.check()?;
        self.worker.check()?;
        self.log.check()?;
        self.telemetry.check()?;
        self.dead_letters.check()?;
        self.retention.check()?;
        self.check_commands_outlast_their_returns()?;
        self.console.check()?;
        self.events.check()?;
        Ok(())
    }

    /// The command rows' retention covers every way a command can come back (its delay tiers
    /// with their rounds, a replay from the dead-letter store while the store keeps it), so a
    /// command that comes back still finds its record.
    fn check_commands_outlast_their_returns(&self) -> Checked {
        let retention = &self.retention;
        let window = retention.commands_hours * 3600.0;
        let tiers = &self.retry.delay_tiers_ms;
        let rounds = (tiers.len() + 1) as f64;
        let comes_back =
            (tiers.iter().sum::<u64>() as f64 + rounds * self.retry.max_elapsed_ms as f64) / 1000.0;
        if window < comes_back {
            return refuse(
                "retention.commands_hours",
                format!(
                    "({} h) is shorter than a command can take to come back through \
                     retry.delay_tiers_ms and retry.max_elapsed_ms ({:.3} h): its record would be \
                     gone before its last round",
                    retention.commands_hours,
                    comes_back / 3600.0
                ),
            );
        }
        let store = self.dead_letters.retention_days * 86_400.0;
        if window < store {
            return refuse(
                "retention.commands_hours",
                format!(
                    "({} h) is shorter than dead_letters.retention_days ({} days = {} h): a dead \
                     letter replayed while the store keeps it would find no record",
                    retention.commands_hours,
                    self.dead_letters.retention_days,
                    self.dead_letters.retention_days * 24.0
                ),
            );
        }
        Ok(())
    }
}
