//! The settings' sections, one struct each, as `config/default.toml` lays them out (every field
//! documented there, and in `docs/configuration.md`, which `config reference` prints).

use super::{Secret, SecretUrl};
use serde::Deserialize;
use std::time::Duration;

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
    /// Adapt each provider's concurrency limit to its answers (lower on a 503 without
    /// `Retry-After` and on timeouts; a 429 paces its rate instead).
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

/// One person allowed into the console: their name, role and the hash of their token.
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
