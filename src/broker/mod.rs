//! RabbitMQ: the topology the worker declares, the messages it builds, and the confirmed
//! publisher with its outbox relay. The consume loop lives in [`crate::worker`].

pub mod messages;
pub mod publisher;
pub mod topology;

use crate::config::BrokerSettings;
use lapin::{Connection, ConnectionProperties};

/// Opens a connection named after the worker, so operators can tell its connections apart.
pub async fn connect(settings: &BrokerSettings, name: &str) -> Result<Connection, lapin::Error> {
    Connection::connect(
        settings.url.expose(),
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
}
