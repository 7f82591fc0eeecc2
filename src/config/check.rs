//! The checks types alone cannot make (ranges, URL shapes, names): each failure names the key
//! and where its value came from.

use super::{ConfigError, Settings};

impl Settings {
    /// Checks what types alone cannot: ranges, URL shapes, names.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        self.check_broker()?;
        self.check_database()?;
        self.check_provider()?;
        self.check_retries()?;
        self.check_runtime()?;
        self.check_operations()?;
        Ok(())
    }

    /// The retention windows: positive, and the command rows' long enough to cover every way a
    /// command can come back (its delay tiers with their rounds, a replay from the dead-letter
    /// store while the store keeps it), so a command that comes back still finds its record.
    fn check_retention(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| self.fail(key, why);
        let retention = &self.retention;
        for (key, value) in [
            ("retention.commands_hours", retention.commands_hours),
            ("retention.replay_runs_days", retention.replay_runs_days),
            ("retention.audit_days", retention.audit_days),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return fail(key, "must be above 0");
            }
        }
        if retention.sweep_interval_ms == 0 {
            return fail("retention.sweep_interval_ms", "must be above 0");
        }
        let window = retention.commands_hours * 3600.0;
        let tiers = &self.retry.delay_tiers_ms;
        let rounds = (tiers.len() + 1) as f64;
        let comes_back =
            (tiers.iter().sum::<u64>() as f64 + rounds * self.retry.max_elapsed_ms as f64) / 1000.0;
        if window < comes_back {
            return fail(
                "retention.commands_hours",
                &format!(
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
            return fail(
                "retention.commands_hours",
                &format!(
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

    /// The refusal of `key`'s value, naming where it came from.
    fn fail(&self, key: &str, why: &str) -> Result<(), ConfigError> {
        Err(ConfigError(format!("{} {why}", self.origins.describe(key))))
    }

    /// The broker's URL, flow control and topology names.
    fn check_broker(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| self.fail(key, why);
        let key = if self.broker.urls.is_empty() {
            "broker.url"
        } else {
            "broker.urls"
        };
        let endpoints = self.broker.endpoints();
        if endpoints.is_empty() {
            return fail(key, "must name at least one node");
        }
        for url in &endpoints {
            if !url.expose().starts_with("amqp://") && !url.expose().starts_with("amqps://") {
                return fail(
                    key,
                    &format!("must start with amqp:// or amqps:// (each URL), got {url}"),
                );
            }
        }
        if self.broker.connect_timeout_ms == 0 {
            return fail("broker.connect_timeout_ms", "must be above 0");
        }
        if self.broker.prefetch == 0 {
            return fail("broker.prefetch", "must be at least 1");
        }
        if self.broker.max_headers == 0 {
            return fail("broker.max_headers", "must be at least 1");
        }
        if !(1..=65536).contains(&self.broker.max_header_bytes) {
            return fail(
                "broker.max_header_bytes",
                "must be from 1 to 65536 (a dead letter's own headers must fit in a frame beside them)",
            );
        }
        for (i, name) in self.broker.carried_headers.iter().enumerate() {
            if let Err(why) = crate::intake::may_carry(name) {
                return fail(&format!("broker.carried_headers[{i}]"), why);
            }
        }
        if self.broker.max_message_bytes == 0 {
            return fail("broker.max_message_bytes", "must be at least 1");
        }
        if self.broker.publish_timeout_ms == 0 {
            return fail("broker.publish_timeout_ms", "must be above 0");
        }
        if self.broker.delivery_limit == 0 {
            return fail("broker.delivery_limit", "must be at least 1");
        }
        for (key, name) in [
            ("broker.command_exchange", &self.broker.command_exchange),
            ("broker.command_queue", &self.broker.command_queue),
            ("broker.event_exchange", &self.broker.event_exchange),
            (
                "broker.dead_letter_exchange",
                &self.broker.dead_letter_exchange,
            ),
            ("broker.dead_letter_queue", &self.broker.dead_letter_queue),
            (
                "broker.command_routing_key",
                &self.broker.command_routing_key,
            ),
            (
                "broker.created_routing_key",
                &self.broker.created_routing_key,
            ),
            ("broker.failed_routing_key", &self.broker.failed_routing_key),
        ] {
            if name.trim().is_empty() || name.len() > 255 {
                return fail(key, "must be a name of 1 to 255 bytes");
            }
        }
        Ok(())
    }

    /// The database's URL, pool and timeouts.
    fn check_database(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| self.fail(key, why);
        let db = self.database.url.expose();
        if !db.starts_with("postgres://") && !db.starts_with("postgresql://") {
            return fail(
                "database.url",
                "must start with postgres:// or postgresql://",
            );
        }
        if self.database.pool_size == 0 {
            return fail("database.pool_size", "must be at least 1");
        }
        for (key, value) in [
            (
                "database.connect_timeout_ms",
                self.database.connect_timeout_ms,
            ),
            (
                "database.statement_timeout_ms",
                self.database.statement_timeout_ms,
            ),
            (
                "database.idle_in_transaction_timeout_ms",
                self.database.idle_in_transaction_timeout_ms,
            ),
        ] {
            if value == 0 {
                return fail(key, "must be above 0");
            }
        }
        Ok(())
    }

    /// The provider's URL (plain http only to this machine unless allowed), timeouts and rate limits.
    fn check_provider(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| self.fail(key, why);
        let base = self.provider.base_url.expose();
        let Some(url) = reqwest::Url::parse(base)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
        else {
            return fail("provider.base_url", "must be an http:// or https:// URL");
        };
        if url.scheme() == "http" && !self.provider.allow_plain_http && !is_loopback(&url) {
            return fail(
                "provider.base_url",
                "is plain http:// to a host other than this machine: the bearer token would travel \
                 unencrypted; use https://, or set provider.allow_plain_http = true",
            );
        }
        if self.provider.timeout_ms == 0 || self.provider.connect_timeout_ms == 0 {
            return fail(
                "provider.timeout_ms",
                "and provider.connect_timeout_ms must be above 0",
            );
        }
        let rate = self.provider.max_requests_per_second;
        if !(rate.is_finite() && rate >= 0.0) {
            return fail(
                "provider.max_requests_per_second",
                "must be 0 (no limit) or more",
            );
        }
        if let Err(why) = self.provider.rate_limits_by_id() {
            return fail(
                "provider.max_requests_per_second_by_id",
                &format!("holds {why}"),
            );
        }
        if self.provider.max_response_bytes == 0 {
            return fail("provider.max_response_bytes", "must be above 0");
        }
        Ok(())
    }

    /// The retry schedule, the delay tiers and the circuit breaker.
    fn check_retries(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| self.fail(key, why);
        let retry = &self.retry;
        if retry.initial_interval_ms == 0 || retry.max_interval_ms < retry.initial_interval_ms {
            return fail(
                "retry.max_interval_ms",
                "must be at least retry.initial_interval_ms, which must be above 0",
            );
        }
        if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
            return fail("retry.multiplier", "must be a number of at least 1");
        }
        if !(0.0..=1.0).contains(&retry.randomization_factor) {
            return fail("retry.randomization_factor", "must be between 0 and 1");
        }
        if retry.delay_tiers_ms.contains(&0) {
            return fail("retry.delay_tiers_ms", "must hold delays above 0");
        }
        let breaker = &self.breaker;
        if !(breaker.failure_ratio > 0.0 && breaker.failure_ratio <= 1.0) {
            return fail("breaker.failure_ratio", "must be above 0 and at most 1");
        }
        if breaker.min_calls == 0 || breaker.window_ms == 0 || breaker.probe_interval_ms == 0 {
            return fail(
                "breaker.min_calls",
                "breaker.window_ms and breaker.probe_interval_ms must be above 0",
            );
        }
        Ok(())
    }

    /// The outbox relay, the worker's polling, logs and the health endpoint.
    fn check_runtime(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| self.fail(key, why);
        if self.outbox.relay_interval_ms == 0 || self.outbox.relay_batch_size < 1 {
            return fail(
                "outbox.relay_interval_ms",
                "and outbox.relay_batch_size must be above 0",
            );
        }
        if self.worker.busy_poll_ms == 0 {
            return fail("worker.busy_poll_ms", "must be above 0");
        }
        if self.log.summary_interval_ms == 0 {
            return fail("log.summary_interval_ms", "must be above 0");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError(format!(
                "`log.level` is not a valid filter: {e}"
            )));
        }
        let listen = self.telemetry.http_listen.trim();
        if !listen.is_empty() && listen.parse::<std::net::SocketAddr>().is_err() {
            return fail(
                "telemetry.http_listen",
                "must be empty or an address like 0.0.0.0:9464",
            );
        }
        if self.telemetry.levels_interval_ms == 0 {
            return fail("telemetry.levels_interval_ms", "must be above 0");
        }
        Ok(())
    }

    /// The dead-letter store, replay targets and the console.
    fn check_operations(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| self.fail(key, why);
        let dead_letter_days = self.dead_letters.retention_days;
        if !(dead_letter_days.is_finite() && dead_letter_days > 0.0) {
            return fail("dead_letters.retention_days", "must be above 0");
        }
        self.check_retention()?;
        if self.provider.idempotency_window_hours == 0 {
            return fail("provider.idempotency_window_hours", "must be at least 1");
        }
        self.check_console()?;
        let key = self.dead_letters.signing_key.expose();
        if !key.is_empty() && key.len() < 32 {
            return fail(
                "dead_letters.signing_key",
                "must be at least 32 characters (or empty: a key kept in PostgreSQL)",
            );
        }
        for (i, target) in self.dead_letters.replay_targets.iter().enumerate() {
            let exchange = &target.exchange;
            if exchange.is_empty() || exchange.starts_with("amq.") {
                return fail(
                    &format!("dead_letters.replay_targets[{i}].exchange"),
                    "must name an exchange of the worker's (not the default exchange nor an \
                     amq.* one, which reach any queue)",
                );
            }
        }
        if self.events.source.trim().is_empty() {
            return fail("events.source", "must not be empty");
        }
        Ok(())
    }

    /// The console's listener, its limits, the proxies it trusts and its operators.
    fn check_console(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| self.fail(key, why);
        if self
            .console
            .listen
            .trim()
            .parse::<std::net::SocketAddr>()
            .is_err()
        {
            return fail("console.listen", "must be an address like 127.0.0.1:8088");
        }
        // A job records its progress at least once a second (see ops::dead_letters::work).
        if self.console.job_stalled_after_ms < 2000 {
            return fail("console.job_stalled_after_ms", "must be at least 2000");
        }
        for (key, value) in [
            (
                "console.header_read_timeout_ms",
                self.console.header_read_timeout_ms,
            ),
            (
                "console.request_timeout_ms",
                self.console.request_timeout_ms,
            ),
            (
                "console.keep_alive_idle_ms",
                self.console.keep_alive_idle_ms,
            ),
            (
                "console.max_connections",
                self.console.max_connections as u64,
            ),
            (
                "console.max_connections_per_address",
                self.console.max_connections_per_address as u64,
            ),
            (
                "console.auth_failures_allowed",
                u64::from(self.console.auth_failures_allowed),
            ),
            (
                "console.auth_failures_per_minute",
                u64::from(self.console.auth_failures_per_minute),
            ),
        ] {
            if value == 0 {
                return fail(key, "must be above 0");
            }
        }
        if let Err(why) = crate::console::TrustedProxies::parse(&self.console.trust_forwarded_for) {
            return fail("console.trust_forwarded_for", &why);
        }
        for (i, operator) in self.console.operators.iter().enumerate() {
            let key = format!("console.operators[{i}]");
            if operator.name.trim().is_empty() {
                return fail(&key, "needs a name");
            }
            if let Err(why) = crate::console::parse_token_sha256(&operator.token_sha256) {
                return fail(&format!("{key}.token_sha256"), &why);
            }
        }
        Ok(())
    }
}

/// Whether the URL's host is this machine (the only place plain http may carry the token by
/// default).
fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
