//! Typed, layered settings: `config/default.toml` (compiled in), an optional file, then environment
//! variables. Every key a user can set exists in the defaults, so an unknown key (a typo that would
//! otherwise be silently ignored) stops start-up with a message that names it.

mod breaker;
mod broker;
mod check;
mod console;
mod database;
mod dead_letters;
mod events;
mod layers;
mod log;
mod outbox;
mod provider;
pub mod reference;
mod retention;
mod retry;
mod secret;
mod telemetry;
mod worker;

pub use breaker::BreakerSettings;
pub use broker::BrokerSettings;
pub use console::{ConsoleSettings, OperatorSettings, Role};
pub use database::DatabaseSettings;
pub use dead_letters::{DeadLetterSettings, ReplayTarget};
pub use events::EventSettings;
pub use log::{LogFormat, LogSettings};
pub use outbox::OutboxSettings;
pub use provider::ProviderSettings;
pub use retention::RetentionSettings;
pub use retry::RetrySettings;
pub use secret::{Secret, SecretUrl, redact_url};
pub use telemetry::TelemetrySettings;
pub use worker::WorkerSettings;

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
