//! RabbitMQ: the topology the worker declares, the messages it builds, and the confirmed
//! publisher. The consume loop lives in [`crate::consumer`], the outbox relay in
//! [`crate::relay`].

pub mod messages;
pub mod publisher;
pub mod topology;

use crate::config::BrokerSettings;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

/// Opens a connection named `name`, so operators can tell the connections apart; an error is
/// one line saying where it tried to connect (without the password), which setting gave that
/// URL, and why it failed.
pub async fn connect(settings: &BrokerSettings, name: &str) -> anyhow::Result<Connection> {
    Connection::connect(
        settings.url.expose(),
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .map_err(|error| crate::diagnose::broker(settings, &error))
}

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
