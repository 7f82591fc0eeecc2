//! Step 5, publish: every message goes out mandatory and publisher-confirmed, so "sent" means the
//! broker routed it to a queue and took responsibility for it. [`publish_confirmed`] is the one
//! confirmed publish: the worker's shared [`Publisher`], the operators' tools and the tests all
//! go through it.

use super::messages::OutboundMessage;
use crate::config::BrokerSettings;
use crate::repeats::{self, Problem};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, RwLock};
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
    #[error(
        "no confirm within {0:?} (broker.publish_timeout_ms); is the broker blocking publishers?"
    )]
    /// The broker did not confirm in time (an alarm blocks publishers, or it is unreachable).
    TimedOut(Duration),
    #[error("cannot reopen the publishing connection: {0}")]
    /// The publishing connection was lost and could not be opened again yet.
    Reconnect(String),
}

impl PublishError {
    /// The repeated problem this failure is an occurrence of, so a flood of them is summarised
    /// (see [`crate::repeats`]); it ends when a publish gets through.
    pub fn problem_key(&self) -> String {
        match self {
            PublishError::Unroutable {
                exchange,
                routing_key,
            } => format!("publish unroutable {exchange:?} {routing_key:?}"),
            PublishError::Nacked => "publish nacked".into(),
            PublishError::TimedOut(_) => "publish timed out".into(),
            PublishError::Broker(_) | PublishError::Reconnect(_) => "publish broker lost".into(),
        }
    }

    /// The problem in words, with its fix.
    pub fn problem(&self) -> Problem {
        let (what, fix) = match self {
            PublishError::Unroutable {
                exchange,
                routing_key,
            } => (
                format!(
                    "messages wait in the outbox: no queue is bound to exchange {exchange} for \
                     routing key {routing_key}"
                ),
                "bind a queue to it (to watch the events, run `payment-link-worker events`)"
                    .to_owned(),
            ),
            PublishError::Nacked => (
                "the broker refuses publishes (basic.nack); they wait in the outbox".to_owned(),
                "see the broker's log (a queue length limit with reject-publish, or an alarm)"
                    .to_owned(),
            ),
            PublishError::TimedOut(_) => (
                "the broker does not confirm publishes in time; they wait in the outbox".to_owned(),
                "check the broker's alarms (rabbitmq-diagnostics alarms) and its disk and memory"
                    .to_owned(),
            ),
            PublishError::Broker(_) | PublishError::Reconnect(_) => (
                "the publishing connection is lost; publishes wait in the outbox".to_owned(),
                "the worker reconnects by itself; check that the broker is reachable".to_owned(),
            ),
        };
        Problem {
            key: self.problem_key(),
            what,
            fix,
            ends_when_quiet: false,
        }
    }

    /// Counts this failure as an occurrence of its problem; `first` logs it in full when it is
    /// the first of a run.
    pub fn report(&self, first: impl FnOnce()) {
        repeats::occurred(|| self.problem(), &self.problem_key(), first);
    }
}

/// Ends the publish problems a successful publish of `message` disproves.
fn report_published(message: &OutboundMessage) {
    if !repeats::any_open() {
        return;
    }
    let unroutable = PublishError::Unroutable {
        exchange: message.exchange.clone(),
        routing_key: message.routing_key.clone(),
    };
    repeats::resolved(&unroutable.problem_key());
    for key in ["publish nacked", "publish timed out", "publish broker lost"] {
        repeats::resolved(key);
    }
}

/// A confirm-mode channel shared by every task of a worker, on a connection of its own: when the
/// broker blocks publishers (a memory or disk alarm), only this connection waits, and the
/// consumer's acks still flow. Every publish and confirm is bounded by
/// `broker.publish_timeout_ms`; the channel and the connection are reopened when the broker
/// closed them.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    settings: BrokerSettings,
    name: String,
    timeout: Duration,
    slot: RwLock<(Arc<Connection>, Channel)>,
    /// Serializes reopening, so a lost channel is reopened once, not by every waiting task.
    reopening: Mutex<()>,
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
    /// Opens the publishing connection (named `name`) and its channel in confirm mode.
    pub async fn open(settings: &BrokerSettings, name: &str) -> anyhow::Result<Self> {
        let connection = Arc::new(super::connect(settings, name).await?);
        let channel = confirm_channel(&connection).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                name: name.to_owned(),
                timeout: Duration::from_millis(settings.publish_timeout_ms),
                slot: RwLock::new((connection, channel)),
                reopening: Mutex::new(()),
            }),
        })
    }

    /// The channel, reopened (on a new connection if the old one is gone) when it was closed.
    async fn channel(&self) -> Result<Channel, PublishError> {
        let current = self.inner.slot.read().await.1.clone();
        if current.status().connected() {
            return Ok(current);
        }
        let _reopening = self.inner.reopening.lock().await;
        let (connection, channel) = self.inner.slot.read().await.clone();
        if channel.status().connected() {
            return Ok(channel);
        }
        let connection = if connection.status().connected() {
            connection
        } else {
            let settings = &self.inner.settings;
            let fresh = super::connect(settings, &self.inner.name)
                .await
                .map_err(|e| PublishError::Reconnect(format!("{e:#}")))?;
            Arc::new(fresh)
        };
        let channel = confirm_channel(&connection).await?;
        *self.inner.slot.write().await = (connection, channel.clone());
        Ok(channel)
    }

    /// The publishing channel's number: it changes when the channel is replaced (for
    /// diagnostics, and for the test that a publish left unconfirmed replaces it).
    pub async fn channel_number(&self) -> u16 {
        self.inner.slot.read().await.1.id()
    }

    /// Whether the broker has told the publishing connection it is blocked (an alarm).
    pub async fn blocked(&self) -> bool {
        self.inner.slot.read().await.0.status().blocked()
    }

    /// Publishes and waits for the broker's confirm, within `broker.publish_timeout_ms`; an
    /// unroutable, nacked or unconfirmed message is an error.
    pub async fn publish(&self, message: &OutboundMessage) -> Result<(), PublishError> {
        let span = if crate::telemetry::child_spans() {
            tracing::info_span!(
                "publish",
                otel.name = format!("publish {}", message.exchange),
                otel.kind = "producer",
                messaging.system = "rabbitmq",
                messaging.operation.type = "send",
                messaging.destination.name = %message.exchange,
                messaging.rabbitmq.destination.routing_key = %message.routing_key,
                messaging.message.id = message.message_id(),
                otel.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let mut used = None;
        let confirmed = async {
            let channel = self.channel().await?;
            used = Some(channel.clone());
            publish_confirmed(&channel, message).await
        };
        let result = tokio::time::timeout(self.inner.timeout, confirmed)
            .instrument(span.clone())
            .await
            .unwrap_or(Err(PublishError::TimedOut(self.inner.timeout)));
        match &result {
            Ok(()) => report_published(message),
            Err(error) => {
                span.record("otel.status_code", "ERROR");
                tracing::debug!(parent: &span, %error, "publish not confirmed");
                if let Some(used) = used
                    && matches!(error, PublishError::Nacked | PublishError::TimedOut(_))
                {
                    self.give_up(&used).await;
                }
            }
        }
        result
    }

    /// Replaces a channel whose publishes are nacked or go unconfirmed by a new one on the same
    /// connection, unless the broker is blocking the connection (an alarm: no channel helps).
    /// After a quorum queue lost its leader, RabbitMQ 3.10 went on nacking every publish on the
    /// same channel for over a minute while new channels were taken (seen in the cluster test),
    /// and a channel whose publishes went to the dead leader has them resent only by a 10-second
    /// timer (seen in the soak); a new channel finds the new leader at once.
    async fn give_up(&self, used: &Channel) {
        let _reopening = self.inner.reopening.lock().await;
        let (connection, current) = self.inner.slot.read().await.clone();
        if current.id() != used.id()
            || !connection.status().connected()
            || connection.status().blocked()
        {
            return;
        }
        if let Ok(Ok(fresh)) =
            tokio::time::timeout(self.inner.timeout, confirm_channel(&connection)).await
        {
            *self.inner.slot.write().await = (connection, fresh);
        }
        // A stuck channel may not answer its close: never wait for it.
        let timeout = self.inner.timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, current.close(200, "reopening".into())).await;
        });
    }

    /// Messages ready in a queue (a passive declare on a short-lived channel, so a missing queue
    /// cannot close the publishing channel).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, lapin::Error> {
        let connection = self.inner.slot.read().await.0.clone();
        let channel = connection.create_channel().await?;
        let depth = super::queue_depth(&channel, queue).await;
        let _ = channel.close(200, "depth read".into()).await;
        depth
    }

    /// Closes the channel and the connection once every publish in flight has been confirmed,
    /// or `broker.publish_timeout_ms` has passed (a blocked broker may never confirm).
    pub async fn close(&self) {
        let (connection, channel) = self.inner.slot.read().await.clone();
        let closing = async {
            if channel.status().connected() {
                let _ = channel.wait_for_confirms().await;
                let _ = channel.close(200, "worker stopping".into()).await;
            }
            let _ = connection.close(200, "worker stopping".into()).await;
        };
        if tokio::time::timeout(self.inner.timeout, closing)
            .await
            .is_err()
        {
            tracing::warn!("publishing connection not closed in time; leaving it to the broker");
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
