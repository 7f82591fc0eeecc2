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
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let url = settings.url.expose();
    let connected = match url.parse::<lapin::uri::AMQPUri>() {
        Ok(mut uri) => {
            uri.query.frame_max.get_or_insert(FRAME_MAX);
            Connection::connect_uri(uri, properties).await
        }
        // lapin parses it again and says what is wrong, in the same words as for any URL.
        Err(_) => Connection::connect(url, properties).await,
    };
    connected.map_err(|error| crate::diagnose::broker(settings, &error))
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
