//! `[telemetry]`: the operator's HTTP endpoint (health, readiness, metrics) and its gauges.

use super::check::{Checked, refuse};
use serde::Deserialize;

/// The operator's HTTP endpoint and the gauges behind it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Address of the HTTP endpoint with /healthz, /readyz and /metrics (Prometheus text). Empty turns it off.
    pub http_listen: String,
    /// How often the gauges read from PostgreSQL and RabbitMQ (outbox backlog, queue depths, oldest command) are refreshed.
    pub levels_interval_ms: u64,
}

impl TelemetrySettings {
    pub(super) fn check(&self) -> Checked {
        let listen = self.http_listen.trim();
        if !listen.is_empty() && listen.parse::<std::net::SocketAddr>().is_err() {
            return refuse(
                "telemetry.http_listen",
                "must be empty or an address like 0.0.0.0:9464",
            );
        }
        if self.levels_interval_ms == 0 {
            return refuse("telemetry.levels_interval_ms", "must be above 0");
        }
        Ok(())
    }
}
