//! Typed, layered settings: `config/default.toml` (compiled in), an optional file, then environment
//! variables. Every key a user can set exists in the defaults, so an unknown key (a typo that would
//! otherwise be silently ignored) stops start-up with a message that names it.

mod check;
mod layers;
pub mod reference;
mod secret;

pub use secret::{Secret, SecretUrl, redact_url};

use layers::{defaults_table, merge_file, set_from_env};
use serde::Deserialize;
use std::{path::Path, time::Duration};

/// The defaults; also the list of every key that exists.
const DEFAULTS: &str = include_str!("../../config/default.toml");
/// Prefix of the environment variables that override any key.
pub const ENV_PREFIX: &str = "PAYMENT_LINK_WORKER__";
/// Short environment variables for the settings most often given by a platform, and their keys.
const ENV_ALIASES: [(&str, &str); 4] = [
    ("AMQP_URL", "broker.url"),
    ("DATABASE_URL", "database.url"),
    ("PROVIDER_BASE_URL", "provider.base_url"),
    ("PROVIDER_TOKEN", "provider.token"),
];

/// Why the settings could not be loaded; the message always names the key, variable or file.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub(crate) String);

/// All settings of the worker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The `[broker]` section.
    pub broker: BrokerSettings,
    /// The `[database]` section.
    pub database: DatabaseSettings,
    /// The `[provider]` section.
    pub provider: ProviderSettings,
    /// The `[retry]` section.
    pub retry: RetrySettings,
    /// The `[breaker]` section.
    pub breaker: BreakerSettings,
    /// The `[outbox]` section.
    pub outbox: OutboxSettings,
    /// The `[worker]` section.
    pub worker: WorkerSettings,
    /// The `[dead_letters]` section.
    pub dead_letters: DeadLetterSettings,
    /// The `[console]` section.
    pub console: ConsoleSettings,
    /// The `[retention]` section.
    pub retention: RetentionSettings,
    /// The `[events]` section.
    pub events: EventSettings,
    /// The `[telemetry]` section.
    pub telemetry: TelemetrySettings,
    /// The `[log]` section.
    pub log: LogSettings,
    /// Where each setting that is not a default came from, for messages that point there.
    #[serde(skip)]
    pub origins: Origins,
}

/// Which layer set each key (absent: the default), so an error can name the variable or file
/// to change, not only the key.
#[derive(Clone, Debug, Default)]
pub struct Origins(std::collections::BTreeMap<String, String>);

impl Origins {
    /// `key` and where its value came from, e.g. "`database.url` (from DATABASE_URL)".
    pub fn describe(&self, key: &str) -> String {
        match self.0.get(key) {
            Some(origin) => format!("`{key}` (from {origin})"),
            None => format!("`{key}` (default)"),
        }
    }
}

/// The operator's HTTP endpoint and the gauges behind it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Address of the HTTP endpoint with /healthz, /readyz and /metrics (Prometheus text). Empty turns it off.
    pub http_listen: String,
    /// How often the gauges read from PostgreSQL and RabbitMQ (outbox backlog, queue depths, oldest command) are refreshed.
    pub levels_interval_ms: u64,
}

/// RabbitMQ connection, flow control and topology names.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    /// AMQP URL of RabbitMQ, or a comma-separated list of the URLs of a cluster's nodes. A
    /// password in it is never logged.
    pub url: SecretUrl,
    /// The URLs of a cluster's nodes; when not empty, used instead of `url`.
    pub urls: Vec<SecretUrl>,
    /// Longest wait for one node to accept a connection before the next is tried.
    pub connect_timeout_ms: u64,
    /// Which setting gave the URL (e.g. "`broker.url` (from AMQP_URL)"), for connection errors.
    #[serde(skip)]
    pub url_origin: String,
    /// How many commands one worker processes at once (unacknowledged deliveries).
    pub prefetch: u16,
    /// Commands larger than this are dead-lettered as invalid without being parsed.
    pub max_message_bytes: usize,
    /// Most headers a command may carry (the intake budget, see [`crate::intake`]).
    pub max_headers: usize,
    /// Most bytes of headers a command may carry, names and values as AMQP encodes them.
    pub max_header_bytes: usize,
    /// The publisher's own headers the worker carries to a command's delayed copies, dead letter
    /// and replays, beside the trace context and its own counters; any other is left behind.
    pub carried_headers: Vec<String>,
    /// Deliveries of one message before the broker dead-letters it by itself (a message that keeps crashing workers).
    pub delivery_limit: u32,
    /// Longest wait for the broker to confirm a publish.
    pub publish_timeout_ms: u64,
    /// Topic exchange the invoicing system publishes commands to.
    pub command_exchange: String,
    /// Routing key of the commands (and of their dead letters).
    pub command_routing_key: String,
    /// Quorum queue the workers consume; also the prefix of the delay queues.
    pub command_queue: String,
    /// Topic exchange the events go to.
    pub event_exchange: String,
    /// Routing key of `payment-link.created`.
    pub created_routing_key: String,
    /// Routing key of `payment-link.failed`.
    pub failed_routing_key: String,
    /// Topic exchange dead letters go to.
    pub dead_letter_exchange: String,
    /// Quorum queue holding the dead letters, bound with `#`.
    pub dead_letter_queue: String,
}

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

/// The payment provider's API.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// Base URL of the payment provider API; the worker posts to {base_url}/payment-provider-payment-link.
    pub base_url: SecretUrl,
    /// Bearer token for the provider. Required by `run`; never logged. Prefer PROVIDER_TOKEN.
    pub token: Secret,
    /// Time allowed to open a connection to the provider.
    pub connect_timeout_ms: u64,
    /// Time allowed for one whole request, connect included.
    pub timeout_ms: u64,
    /// Largest answer body read from the provider; a larger one is an invalid answer (retried).
    pub max_response_bytes: usize,
    /// Allow sending the bearer token over plain http:// to a host other than loopback.
    pub allow_plain_http: bool,
    /// Adapt each provider's concurrency limit to its answers (lower on 429, 503 and timeouts).
    pub adaptive_concurrency: bool,
    /// Most calls per second to one provider id for the whole fleet (0: no limit).
    pub max_requests_per_second: f64,
    /// Per provider id, overriding the above: "ID=N,ID=N".
    pub max_requests_per_second_by_id: String,
    /// How long the provider keeps an idempotency key; older dead letters risk a second link.
    pub idempotency_window_hours: u64,
}

impl ProviderSettings {
    /// The fleet-wide rate limit of `provider_id` in calls per second, if it has one.
    pub fn rate_limit(&self, provider_id: i64) -> Option<f64> {
        let by_id = self.rate_limits_by_id().ok()?;
        let limit = by_id
            .get(&provider_id)
            .copied()
            .unwrap_or(self.max_requests_per_second);
        (limit > 0.0).then_some(limit)
    }

    /// `max_requests_per_second_by_id` read: provider id to calls per second.
    pub fn rate_limits_by_id(&self) -> Result<std::collections::HashMap<i64, f64>, String> {
        self.max_requests_per_second_by_id
            .split(',')
            .map(str::trim)
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (id, rate) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("{pair:?} is not ID=N"))?;
                let id: i64 = id
                    .trim()
                    .parse()
                    .map_err(|_| format!("{pair:?}: the id is not a whole number"))?;
                let rate: f64 = rate
                    .trim()
                    .parse()
                    .map_err(|_| format!("{pair:?}: the rate is not a number"))?;
                if !(rate.is_finite() && rate >= 0.0) {
                    return Err(format!("{pair:?}: the rate must be 0 or more"));
                }
                Ok((id, rate))
            })
            .collect()
    }
}

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

/// How long what the store keeps is kept.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Hours a completed command's row (and its sent outbox rows) is kept after it completed
    /// (fractions allowed); it must outlast every way the command can come back.
    pub commands_hours: f64,
    /// Days a finished replay run and its per-letter history are kept.
    pub replay_runs_days: f64,
    /// Days an audit-log entry is kept.
    pub audit_days: f64,
    /// How often one replica removes what is past its window, in bounded batches.
    pub sweep_interval_ms: u64,
}

impl RetentionSettings {
    /// The command rows' window.
    pub fn commands(&self) -> Duration {
        Duration::from_secs_f64(self.commands_hours * 3600.0)
    }
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

/// The operators' console.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Address the console listens on.
    pub listen: String,
    /// Who may sign in.
    pub operators: Vec<OperatorSettings>,
    /// When a replay run nobody advances counts as stopped, to be taken over.
    pub job_stalled_after_ms: u64,
    /// Longest wait for a request's head (the request line and headers), from the moment the
    /// console is ready to read it.
    pub header_read_timeout_ms: u64,
    /// Longest time one request may take, its body included (answered 408 past it).
    pub request_timeout_ms: u64,
    /// Connections served at once; more wait in the listen queue until one closes.
    pub max_connections: usize,
    /// Connections served at once from one client address (an IPv6 one by its /64); more are
    /// closed at once, so one client cannot take every place.
    pub max_connections_per_address: usize,
    /// A connection on which no byte moves for this long is closed.
    pub keep_alive_idle_ms: u64,
    /// Failed sign-ins and bearer checks from one address before it gets 429.
    pub auth_failures_allowed: u32,
    /// The proxies (networks, such as `10.0.0.0/8`) whose `X-Forwarded-For` and
    /// `X-Forwarded-Host` are believed; empty: none.
    pub trust_forwarded_for: Vec<String>,
    /// Wrong tokens a minute from all addresses together before the addresses not known good
    /// share one try a second.
    pub auth_failures_per_minute: u32,
    /// The host (and port, if not the scheme's) people reach the console by; when set, a request
    /// naming another `Host` is refused (421), so a page of another site cannot reach the console
    /// through a name it controls (DNS rebinding). Empty: not checked.
    pub public_host: String,
}

/// One console user.
/// What a console operator may do: read by the settings, the console's checks and its pages,
/// and `console hash-token`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees everything, changes nothing.
    Viewer,
    /// Also replays and archives.
    Operator,
}

impl Role {
    /// As the settings, the audit log and the pages write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorSettings {
    /// Shown in the audit log.
    pub name: String,
    /// What they may do.
    pub role: Role,
    /// SHA-256 of the token, in hex (the token itself is never configured).
    pub token_sha256: String,
}

impl std::fmt::Debug for OperatorSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorSettings")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Attributes of published events.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    /// CloudEvents `source` attribute of the events this worker publishes.
    pub source: String,
}

/// Log output.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// "auto" (short lines at a terminal, JSON elsewhere), "json" or "text".
    pub format: LogFormat,
    /// tracing filter directives, such as "info" or "payment_link_worker=debug,info"; RUST_LOG wins when set.
    pub level: String,
    /// How often a problem that keeps repeating is summarised in one line (see
    /// [`crate::repeats`]).
    pub summary_interval_ms: u64,
    /// Where logs are short lines, how often a busy worker says what it did (0: never); the
    /// per-command lines are at `debug`.
    pub progress_interval_ms: u64,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Short lines when stderr is a terminal, JSON lines otherwise.
    Auto,
    /// One JSON object per line, for log pipelines.
    Json,
    /// One short line per event, for people (coloured only at a terminal).
    Text,
}

impl BrokerSettings {
    /// The nodes to connect to: `urls`, else the comma-separated URLs in `url` (split only
    /// before a `scheme://`, so a comma in a password stays part of it).
    pub fn endpoints(&self) -> Vec<SecretUrl> {
        if !self.urls.is_empty() {
            return self.urls.clone();
        }
        let all = self.url.expose();
        let mut starts: Vec<usize> = all
            .match_indices(',')
            .map(|(at, _)| at)
            .filter(|at| {
                // A comma followed by `scheme://` starts the next URL.
                let next = all[at + 1..].trim_start();
                next.find("://").is_some_and(|end| {
                    let scheme = &next[..end];
                    scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                        && scheme
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                })
            })
            .collect();
        starts.push(all.len());
        let mut endpoints = Vec::with_capacity(starts.len());
        let mut from = 0;
        for end in starts {
            let one = all[from..end].trim();
            if !one.is_empty() {
                endpoints.push(SecretUrl::new(one));
            }
            from = end + 1;
        }
        endpoints
    }
}

impl Settings {
    /// Loads the layers from the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Loads the layers from the given environment, so tests need not touch the process's.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut merged = defaults_table();
        let mut origins = std::collections::BTreeMap::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?;
            let overlay: toml::Table = toml::from_str(&text).map_err(|e| {
                ConfigError(format!(
                    "config file {} is not valid TOML: {e}",
                    path.display()
                ))
            })?;
            let mut keys = Vec::new();
            layers::keys_of(&overlay, "", &mut keys);
            for key in keys {
                origins.insert(key, format!("file {}", path.display()));
            }
            merge_file(&mut merged, overlay, "", path)?;
        }
        let env: Vec<(String, String)> = env.into_iter().collect();
        for (name, value) in &env {
            if let Some(rest) = name.strip_prefix(ENV_PREFIX) {
                let key = rest
                    .split("__")
                    .collect::<Vec<_>>()
                    .join(".")
                    .to_lowercase();
                set_from_env(&mut merged, &key, value, name)?;
                origins.insert(key, name.clone());
            }
        }
        for (name, key) in ENV_ALIASES {
            if let Some((_, value)) = env.iter().find(|(n, _)| n == name) {
                set_from_env(&mut merged, key, value, name)?;
                origins.insert((*key).to_owned(), (*name).to_owned());
            }
        }
        let origins = Origins(origins);
        let mut settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(merged))
            .map_err(|e| {
            let key = e.path().to_string();
            ConfigError(format!(
                "{}: {}",
                origins.describe(&key),
                e.inner().message()
            ))
        })?;
        settings.broker.url_origin = if settings.broker.urls.is_empty() {
            origins.describe("broker.url")
        } else {
            origins.describe("broker.urls")
        };
        settings.origins = origins;
        settings.check()?;
        Ok(settings)
    }

    /// Checks the settings only the worker needs (not `migrate` or `provider-sim`).
    pub fn check_for_worker(&self) -> Result<(), ConfigError> {
        if self.provider.token.expose().trim().is_empty() {
            return Err(ConfigError(
                "`provider.token` is empty: set PROVIDER_TOKEN (or PAYMENT_LINK_WORKER__PROVIDER__TOKEN)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// How long a worker may hold a command before another may take it over: longer than the
    /// longest provider call sequence, so a live worker is never overtaken.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(
            self.retry.max_elapsed_ms
                + self.retry.max_interval_ms
                + 2 * self.provider.timeout_ms
                + self.worker.lease_margin_ms,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_match_the_documented_values() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.broker.command_queue, "payment-links.create");
        assert_eq!(s.broker.max_message_bytes, 256 * 1024);
        assert_eq!(s.retry.max_elapsed_ms, 60_000);
        assert_eq!(s.log.format, LogFormat::Auto);
    }

    #[test]
    fn prefixed_and_short_variables_override_defaults() {
        let s = Settings::load_from(
            None,
            env(&[
                ("PAYMENT_LINK_WORKER__RETRY__MAX_ELAPSED_MS", "1234"),
                ("PAYMENT_LINK_WORKER__RETRY__MULTIPLIER", "1.5"),
                ("PAYMENT_LINK_WORKER__RETRY__DELAY_TIERS_MS", "5, 70"),
                ("PAYMENT_LINK_WORKER__DATABASE__RUN_MIGRATIONS", "false"),
                ("PROVIDER_TOKEN", "tok"),
                ("AMQP_URL", "amqp://u:p@rabbit:5672/%2f"),
            ]),
        )
        .unwrap();
        assert_eq!(s.retry.max_elapsed_ms, 1234);
        assert_eq!(s.retry.delay_tiers_ms, [5, 70]);
        assert_eq!(s.retry.multiplier, 1.5);
        assert!(!s.database.run_migrations);
        assert_eq!(s.provider.token.expose(), "tok");
        assert_eq!(s.broker.url.expose(), "amqp://u:p@rabbit:5672/%2f");
    }

    #[test]
    fn an_unknown_operator_role_stops_start_up_naming_the_key() {
        let dir = std::env::temp_dir().join(format!("plw-role-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("console.toml");
        std::fs::write(
            &file,
            "[[console.operators]]\nname = \"ada\"\nrole = \"admin\"\ntoken_sha256 = \"x\"\n",
        )
        .unwrap();
        let err = Settings::load_from(Some(&file), env(&[]))
            .unwrap_err()
            .to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.contains("console.operators[0].role") && err.contains("`viewer` or `operator`"),
            "{err}"
        );
    }

    #[test]
    fn unknown_variable_is_named() {
        let err = Settings::load_from(
            None,
            env(&[("PAYMENT_LINK_WORKER__RETRY__MAX_ELAPSD_MS", "5")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("PAYMENT_LINK_WORKER__RETRY__MAX_ELAPSD_MS"),
            "{err}"
        );
        assert!(err.contains("retry.max_elapsd_ms"), "{err}");
    }

    #[test]
    fn empty_tier_list_means_no_delayed_redelivery() {
        let s = Settings::load_from(
            None,
            env(&[("PAYMENT_LINK_WORKER__RETRY__DELAY_TIERS_MS", "")]),
        )
        .unwrap();
        assert!(s.retry.delay_tiers_ms.is_empty());
        let err = Settings::load_from(
            None,
            env(&[("PAYMENT_LINK_WORKER__RETRY__DELAY_TIERS_MS", "1,x")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("comma-separated"), "{err}");
    }

    #[test]
    fn malformed_variable_is_named() {
        let err = Settings::load_from(
            None,
            env(&[("PAYMENT_LINK_WORKER__BROKER__PREFETCH", "lots")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("PAYMENT_LINK_WORKER__BROKER__PREFETCH"),
            "{err}"
        );
        assert!(err.contains("whole number"), "{err}");
    }

    #[test]
    fn fleet_rate_limits_read_per_provider_id_and_bad_ones_are_named() {
        let s = Settings::load_from(
            None,
            env(&[
                (
                    "PAYMENT_LINK_WORKER__PROVIDER__MAX_REQUESTS_PER_SECOND",
                    "50",
                ),
                (
                    "PAYMENT_LINK_WORKER__PROVIDER__MAX_REQUESTS_PER_SECOND_BY_ID",
                    "3=100, 7=0",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(s.provider.rate_limit(3), Some(100.0));
        assert_eq!(s.provider.rate_limit(7), None, "0: no limit for that id");
        assert_eq!(s.provider.rate_limit(1), Some(50.0));
        let err = Settings::load_from(
            None,
            env(&[(
                "PAYMENT_LINK_WORKER__PROVIDER__MAX_REQUESTS_PER_SECOND_BY_ID",
                "3:100",
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("provider.max_requests_per_second_by_id") && err.contains("3:100"),
            "{err}"
        );
    }

    #[test]
    fn out_of_range_value_is_named_with_the_variable_that_set_it() {
        let err = Settings::load_from(None, env(&[("PAYMENT_LINK_WORKER__BROKER__PREFETCH", "0")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`broker.prefetch` (from PAYMENT_LINK_WORKER__BROKER__PREFETCH)"),
            "{err}"
        );
        let err = Settings::load_from(None, env(&[("AMQP_URL", "http://rabbit")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`broker.url` (from AMQP_URL)"), "{err}");
        let err = Settings::load_from(None, env(&[("PAYMENT_LINK_WORKER__LOG__FORMAT", "xml")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("xml"), "{err}");
    }

    #[test]
    fn unknown_and_mistyped_file_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("plw-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[retry]\nmax_elapsed = 5\n").unwrap();
        let err = Settings::load_from(Some(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("retry.max_elapsed"), "{err}");
        assert!(err.contains("bad.toml"), "{err}");

        std::fs::write(&path, "[broker]\nprefetch = \"many\"\n").unwrap();
        let err = Settings::load_from(Some(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("prefetch"), "{err}");

        std::fs::write(&path, "[broker]\nprefetch = 7\n").unwrap();
        let s = Settings::load_from(Some(&path), env(&[])).unwrap();
        assert_eq!(s.broker.prefetch, 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn worker_needs_a_token() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        let err = s.check_for_worker().unwrap_err().to_string();
        assert!(err.contains("provider.token"), "{err}");
    }

    #[test]
    fn the_token_goes_over_plain_http_to_loopback_only_unless_allowed() {
        let with = |url: &str, allow: &str| {
            Settings::load_from(
                None,
                env(&[
                    ("PROVIDER_BASE_URL", url),
                    ("PAYMENT_LINK_WORKER__PROVIDER__ALLOW_PLAIN_HTTP", allow),
                ]),
            )
        };
        for url in [
            "http://127.0.0.1:8080",
            "http://localhost",
            "http://[::1]:1",
            "https://pay.example.com",
        ] {
            assert!(with(url, "false").is_ok(), "{url}");
        }
        let refused = with("http://pay.example.com", "false")
            .unwrap_err()
            .to_string();
        assert!(refused.contains("provider.allow_plain_http"), "{refused}");
        assert!(with("http://pay.example.com", "true").is_ok());
        let with_password = with("http://u:provider-pass@pay.example.com", "false").unwrap_err();
        assert!(!with_password.to_string().contains("provider-pass"));
    }

    #[test]
    fn secrets_never_print() {
        let s = Settings::load_from(
            None,
            env(&[
                ("PROVIDER_TOKEN", "sk_live_topsecret"),
                ("AMQP_URL", "amqp://worker:hunter2@rabbit:5672/%2f"),
                ("DATABASE_URL", "postgres://app:pg-pass@db:5432/links"),
                (
                    "PROVIDER_BASE_URL",
                    "https://acct:prov-pass@pay.example.com",
                ),
            ]),
        )
        .unwrap();
        let printed = format!("{s:?}");
        for secret in ["sk_live_topsecret", "hunter2", "pg-pass", "prov-pass"] {
            assert!(!printed.contains(secret), "{secret} leaked in {printed}");
        }
        assert!(
            printed.contains("amqp://worker:***@rabbit:5672/%2f"),
            "{printed}"
        );
    }

    #[test]
    fn redaction_leaves_urls_without_password_alone() {
        assert_eq!(redact_url("amqp://guest@h/%2f"), "amqp://guest@h/%2f");
        assert_eq!(redact_url("postgres://h:5432/db"), "postgres://h:5432/db");
        assert_eq!(
            redact_url("postgres://u:p@h/db?x=@"),
            "postgres://u:***@h/db?x=@"
        );
    }

    #[test]
    fn a_cluster_is_a_list_of_urls_in_amqp_url_or_broker_urls() {
        let s = Settings::load_from(
            None,
            env(&[(
                "AMQP_URL",
                "amqp://u:p,w@rabbit-1:5672/%2f, amqp://u:p@rabbit-2:5672/%2f,amqps://u:p@rabbit-3/%2f",
            )]),
        )
        .unwrap();
        let nodes: Vec<String> = s
            .broker
            .endpoints()
            .iter()
            .map(|u| u.expose().to_owned())
            .collect();
        assert_eq!(
            nodes,
            [
                "amqp://u:p,w@rabbit-1:5672/%2f",
                "amqp://u:p@rabbit-2:5672/%2f",
                "amqps://u:p@rabbit-3/%2f"
            ],
            "split before each scheme only: a comma in a password stays"
        );
        let s = Settings::load_from(
            None,
            env(&[(
                "PAYMENT_LINK_WORKER__BROKER__URLS",
                "amqp://a:1@n1/%2f,amqp://a:1@n2/%2f",
            )]),
        )
        .unwrap();
        assert_eq!(s.broker.endpoints().len(), 2);
        assert!(
            s.broker.url_origin.contains("broker.urls"),
            "{}",
            s.broker.url_origin
        );
        let bad = Settings::load_from(None, env(&[("AMQP_URL", "amqp://a@n1/%2f,http://n2")]))
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("`broker.url`") && bad.contains("http://n2"),
            "{bad}"
        );
    }
}
