//! `[console]`: the operators' console: its listener, its limits, the proxies it trusts and who
//! may sign in.

use super::check::{Checked, refuse};
use serde::Deserialize;

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

impl ConsoleSettings {
    /// The listener, its limits, the proxies it trusts and its operators.
    pub(super) fn check(&self) -> Checked {
        if self.listen.trim().parse::<std::net::SocketAddr>().is_err() {
            return refuse("console.listen", "must be an address like 127.0.0.1:8088");
        }
        // A job records its progress at least once a second (see dead_letters::working).
        if self.job_stalled_after_ms < 2000 {
            return refuse("console.job_stalled_after_ms", "must be at least 2000");
        }
        for (key, value) in [
            (
                "console.header_read_timeout_ms",
                self.header_read_timeout_ms,
            ),
            ("console.request_timeout_ms", self.request_timeout_ms),
            ("console.keep_alive_idle_ms", self.keep_alive_idle_ms),
            ("console.max_connections", self.max_connections as u64),
            (
                "console.max_connections_per_address",
                self.max_connections_per_address as u64,
            ),
            (
                "console.auth_failures_allowed",
                u64::from(self.auth_failures_allowed),
            ),
            (
                "console.auth_failures_per_minute",
                u64::from(self.auth_failures_per_minute),
            ),
        ] {
            if value == 0 {
                return refuse(key, "must be above 0");
            }
        }
        if let Err(why) = crate::console::TrustedProxies::parse(&self.trust_forwarded_for) {
            return refuse("console.trust_forwarded_for", why);
        }
        for (i, operator) in self.operators.iter().enumerate() {
            let key = format!("console.operators[{i}]");
            if operator.name.trim().is_empty() {
                return refuse(key, "needs a name");
            }
            if let Err(why) = crate::console::parse_token_sha256(&operator.token_sha256) {
                return refuse(format!("{key}.token_sha256"), why);
            }
        }
        Ok(())
    }
}
