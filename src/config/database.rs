//! `[database]`: PostgreSQL's URL, the pool and the timeouts.

use super::SecretUrl;
use super::check::{Checked, refuse};
use serde::Deserialize;

/// PostgreSQL connection.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// PostgreSQL URL. A password in it is never logged.
    pub url: SecretUrl,
    /// Connections in this worker's pool.
    pub pool_size: usize,
    /// Run the embedded migrations when `run` starts (`migrate` runs them on its own).
    pub run_migrations: bool,
    /// Time allowed to open a connection.
    pub connect_timeout_ms: u64,
    /// Longest a statement, or any one database step, may take.
    pub statement_timeout_ms: u64,
    /// PostgreSQL's idle_in_transaction_session_timeout.
    pub idle_in_transaction_timeout_ms: u64,
}

impl DatabaseSettings {
    pub(super) fn check(&self) -> Checked {
        let url = self.url.expose();
        if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return refuse(
                "database.url",
                "must start with postgres:// or postgresql://",
            );
        }
        if self.pool_size == 0 {
            return refuse("database.pool_size", "must be at least 1");
        }
        for (key, value) in [
            ("database.connect_timeout_ms", self.connect_timeout_ms),
            ("database.statement_timeout_ms", self.statement_timeout_ms),
            (
                "database.idle_in_transaction_timeout_ms",
                self.idle_in_transaction_timeout_ms,
            ),
        ] {
            if value == 0 {
                return refuse(key, "must be above 0");
            }
        }
        Ok(())
    }
}
