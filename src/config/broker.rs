//! `[broker]`: RabbitMQ's nodes, flow control, the intake's bounds and the topology's names.

use super::SecretUrl;
use super::check::{Checked, refuse};
use serde::Deserialize;

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

impl BrokerSettings {
    /// The URL, flow control, the intake's bounds and the topology's names.
    pub(super) fn check(&self) -> Checked {
        let key = if self.urls.is_empty() {
            "broker.url"
        } else {
            "broker.urls"
        };
        let endpoints = self.endpoints();
        if endpoints.is_empty() {
            return refuse(key, "must name at least one node");
        }
        for url in &endpoints {
            if !url.expose().starts_with("amqp://") && !url.expose().starts_with("amqps://") {
                return refuse(
                    key,
                    format!("must start with amqp:// or amqps:// (each URL), got {url}"),
                );
            }
        }
        for (key, value) in [
            ("broker.connect_timeout_ms", self.connect_timeout_ms),
            ("broker.publish_timeout_ms", self.publish_timeout_ms),
        ] {
            if value == 0 {
                return refuse(key, "must be above 0");
            }
        }
        for (key, value) in [
            ("broker.prefetch", usize::from(self.prefetch)),
            ("broker.max_headers", self.max_headers),
            ("broker.max_message_bytes", self.max_message_bytes),
            ("broker.delivery_limit", self.delivery_limit as usize),
        ] {
            if value == 0 {
                return refuse(key, "must be at least 1");
            }
        }
        if !(1..=65536).contains(&self.max_header_bytes) {
            return refuse(
                "broker.max_header_bytes",
                "must be from 1 to 65536 (a dead letter's own headers must fit in a frame beside them)",
            );
        }
        for (i, name) in self.carried_headers.iter().enumerate() {
            if let Err(why) = crate::intake::may_carry(name) {
                return refuse(format!("broker.carried_headers[{i}]"), why);
            }
        }
        self.check_names()
    }

    /// Every exchange, queue and routing key the worker declares or uses: 1 to 255 bytes.
    fn check_names(&self) -> Checked {
        for (key, name) in [
            ("broker.command_exchange", &self.command_exchange),
            ("broker.command_queue", &self.command_queue),
            ("broker.event_exchange", &self.event_exchange),
            ("broker.dead_letter_exchange", &self.dead_letter_exchange),
            ("broker.dead_letter_queue", &self.dead_letter_queue),
            ("broker.command_routing_key", &self.command_routing_key),
            ("broker.created_routing_key", &self.created_routing_key),
            ("broker.failed_routing_key", &self.failed_routing_key),
        ] {
            if name.trim().is_empty() || name.len() > 255 {
                return refuse(key, "must be a name of 1 to 255 bytes");
            }
        }
        Ok(())
    }
}
