//! RabbitMQ: the topology the worker declares, the messages it builds, and the confirmed
//! publisher. The consume loop lives in [`crate::consumer`], the outbox relay in
//! [`crate::relay`].

pub mod messages;
pub mod publisher;
pub mod topology;

use crate::config::BrokerSettings;
use crate::config::SecretUrl;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

/// Opens a connection named `name`, so operators can tell the connections apart, to one of the
/// configured nodes: each is tried in a shuffled order (so replicas spread over a cluster, and a
/// node that is down costs one refused connect, not a wait), each attempt bounded by
/// `broker.connect_timeout_ms`. The node it reached is logged and recorded (see [`nodes`]). When
/// none accepts, the error is one line per node saying where it tried (without the password),
/// which setting gave that URL, and why it failed.
pub async fn connect(settings: &BrokerSettings, name: &str) -> anyhow::Result<Connection> {
    let mut endpoints = settings.endpoints();
    shuffle(&mut endpoints);
    let timeout = std::time::Duration::from_millis(settings.connect_timeout_ms);
    let mut failures = Vec::new();
    for url in &endpoints {
        let attempt = tokio::time::timeout(timeout, connect_one(url, name)).await;
        match attempt {
            Ok(Ok(connection)) => {
                let node = node_of(url);
                if endpoints.len() > 1 {
                    tracing::info!(connection = name, node, "connected to RabbitMQ");
                }
                record_node(name, &node);
                return Ok(connection);
            }
            Ok(Err(error)) => failures.push(crate::diagnose::broker(settings, url, &error)),
            Err(_) => failures.push(anyhow::anyhow!(
                "cannot connect to RabbitMQ at {url}: no answer within {} ms \
                 (broker.connect_timeout_ms)",
                timeout.as_millis()
            )),
        }
    }
    forget_node(name);
    match failures.len() {
        1 => Err(failures.remove(0)),
        _ => {
            let each: Vec<String> = failures.iter().map(|e| format!("{e:#}")).collect();
            Err(anyhow::anyhow!(
                "no RabbitMQ node accepted a connection: {}",
                each.join("; ")
            ))
        }
    }
}

async fn connect_one(url: &SecretUrl, name: &str) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let url = url.expose();
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(mut uri) => {
            uri.query.frame_max.get_or_insert(FRAME_MAX);
            Connection::connect_uri(uri, properties).await
        }
        // lapin parses it again and says what is wrong, in the same words as for any URL.
        Err(_) => Connection::connect(url, properties).await,
    }
}

/// Shuffles the nodes with the standard library's per-process random hash keys (no dependency
/// for a handful of items).
fn shuffle<T>(items: &mut [T]) {
    use std::hash::{BuildHasher, Hasher};
    for i in (1..items.len()).rev() {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_usize(i);
        let j = (hasher.finish() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// A node as logs show it: host and port, never the user or password.
pub fn node_of(url: &SecretUrl) -> String {
    match url.expose().parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => "(unparsable URL)".into(),
    }
}

/// Which node each named connection of this process is on now.
static NODES: std::sync::LazyLock<std::sync::Mutex<std::collections::BTreeMap<String, String>>> =
    std::sync::LazyLock::new(Default::default);

fn record_node(name: &str, node: &str) {
    NODES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.to_owned(), node.to_owned());
}

fn forget_node(name: &str) {
    NODES.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
}

/// The node each of this process's connections reached last, by connection name: for
/// `/readyz` and the `payment_link.broker.connection` metric.
pub fn nodes() -> std::collections::BTreeMap<String, String> {
    NODES.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The largest frame our connections ask for unless the URL sets `frame_max`: RabbitMQ's own
/// default, so any message a publisher could send with the server's defaults reaches us (a
/// message's properties and headers must fit in one frame). Asking for it up front rather than
/// taking the server's value matters for memory: lapin sizes its send and receive buffers (32
/// frames each) from it when it connects, untouched until used; learning the size from the
/// server instead, it grows them by writing 8 MiB of zeros per connection, which the worker's
/// two connections then hold for good (measured: peak RSS 64-66 MiB against 42-50 MiB).
pub const FRAME_MAX: u32 = 128 * 1024;

/// Messages ready in `queue` (not those delivered and unacknowledged), by a passive declare.
/// A missing queue closes the channel, so callers use a channel of its own for this.
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    Ok(channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count())
}
