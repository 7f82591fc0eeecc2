//! Step 5, publish: every message goes out mandatory and publisher-confirmed, so "sent" means the
//! broker routed it to a queue and took responsibility for it. [`publish_confirmed`] is the one
//! confirmed publish: the worker's shared [`Publisher`], the operators' tools and the tests all
//! go through it.

use super::messages::OutboundMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection};
use std::sync::Arc;
use tokio::sync::RwLock;
use tracing::Instrument;

/// Why the broker did not take a message.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker refused the message (basic.nack)")]
    /// The broker refused the message.
    Nacked,
    #[error(
        "unroutable: no queue is bound to exchange {exchange:?} for routing key {routing_key:?}"
    )]
    /// No queue is bound for the message.
    Unroutable {
        /// Where it was published.
        exchange: String,
        /// With which routing key.
        routing_key: String,
    },
    #[error("broker error: {0}")]
    /// The connection or channel failed.
    Broker(#[from] lapin::Error),
}

/// A confirm-mode channel shared by every task of a worker; reopened if the broker closed it,
/// and moved to the new connection when the worker reconnects.
#[derive(Clone)]
pub struct Publisher {
    slot: Arc<RwLock<(Arc<Connection>, Channel)>>,
}

/// Opens a channel in confirm mode.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

impl Publisher {
    /// Opens the publishing channel in confirm mode.
    pub async fn open(connection: Arc<Connection>) -> Result<Self, lapin::Error> {
        let channel = confirm_channel(&connection).await?;
        Ok(Self {
            slot: Arc::new(RwLock::new((connection, channel))),
        })
    }

    /// Moves publishing to a new connection (after a reconnect).
    pub async fn replace(&self, connection: Arc<Connection>) -> Result<(), lapin::Error> {
        let channel = confirm_channel(&connection).await?;
        *self.slot.write().await = (connection, channel);
        Ok(())
    }

    async fn channel(&self) -> Result<Channel, lapin::Error> {
        let current = self.slot.read().await.1.clone();
        if current.status().connected() {
            return Ok(current);
        }
        let mut slot = self.slot.write().await;
        if !slot.1.status().connected() {
            slot.1 = confirm_channel(&slot.0).await?;
        }
        Ok(slot.1.clone())
    }

    /// Publishes and waits for the broker's confirm; an unroutable or nacked message is an error.
    pub async fn publish(&self, message: &OutboundMessage) -> Result<(), PublishError> {
        let span = tracing::info_span!(
            "publish",
            otel.name = format!("publish {}", message.exchange),
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "send",
            messaging.destination.name = %message.exchange,
            messaging.rabbitmq.destination.routing_key = %message.routing_key,
            messaging.message.id = message.message_id(),
            otel.status_code = tracing::field::Empty,
        );
        let result = self
            .publish_confirmed(message)
            .instrument(span.clone())
            .await;
        if let Err(error) = &result {
            span.record("otel.status_code", "ERROR");
            tracing::debug!(parent: &span, %error, "publish not confirmed");
        }
        result
    }

    async fn publish_confirmed(&self, message: &OutboundMessage) -> Result<(), PublishError> {
        publish_confirmed(&self.channel().await?, message).await
    }

    /// Messages ready in a queue (a passive declare on a short-lived channel, so a missing queue
    /// cannot close the publishing channel).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, lapin::Error> {
        let connection = self.slot.read().await.0.clone();
        let channel = connection.create_channel().await?;
        let depth = super::queue_depth(&channel, queue).await;
        let _ = channel.close(200, "depth read".into()).await;
        depth
    }

    /// Closes the channel once every publish in flight has been confirmed.
    pub async fn close(&self) {
        let channel = self.slot.read().await.1.clone();
        if channel.status().connected() {
            let _ = channel.wait_for_confirms().await;
            let _ = channel.close(200, "worker stopping".into()).await;
        }
    }
}

/// Publishes `message` mandatory on `channel` (in confirm mode) and waits for the broker's
/// confirm; an unroutable or nacked message is an error.
pub async fn publish_confirmed(
    channel: &Channel,
    message: &OutboundMessage,
) -> Result<(), PublishError> {
    let confirmation = channel
        .basic_publish(
            message.exchange.as_str().into(),
            message.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &message.body,
            message.properties.clone(),
        )
        .await?
        .await?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable {
            exchange: message.exchange.clone(),
            routing_key: message.routing_key.clone(),
        }),
        Confirmation::Nack(_) | Confirmation::NotRequested => Err(PublishError::Nacked),
    }
}
