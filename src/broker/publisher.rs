//! Step 5, publish: every message goes out mandatory and publisher-confirmed, so "sent" means the
//! broker routed it to a queue and took responsibility for it. The relay republishes whatever
//! the outbox still holds unsent.

use super::messages::OutboundMessage;
use crate::config::OutboxSettings;
use crate::store::{PgPool, StoreError, outbox};
use diesel_async::AsyncConnection;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;
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

async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
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
        let confirmation = self
            .channel()
            .await?
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

/// Publishes just-recorded outbox rows (their ids with the messages they hold, so nothing is
/// read back) and hands the confirmed ones to `sent`, which marks them in batches. Rows it could
/// not publish stay for the relay; the error is recorded on the row and logged, not returned.
pub async fn publish_recorded(
    pool: &PgPool,
    publisher: &Publisher,
    sent: &SentMarker,
    rows: &[(i64, OutboundMessage)],
    settings: &OutboxSettings,
) -> Result<(), StoreError> {
    let max_wait = Duration::from_millis(settings.max_retry_interval_ms);
    let mut failed = Vec::new();
    for (id, message) in rows {
        match publisher.publish(message).await {
            Ok(()) => sent.sent(*id),
            Err(error) => {
                tracing::warn!(outbox_id = id, message_id = message.message_id(), %error,
                    "publish failed; the outbox relay will retry");
                failed.push((*id, error.to_string()));
            }
        }
    }
    if !failed.is_empty() {
        let mut conn = pool.get().await?;
        for (id, error) in failed {
            outbox::mark_failed(&mut conn, id, 0, &error, max_wait).await?;
        }
    }
    Ok(())
}

enum Marking {
    Sent(i64),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Marks confirmed outbox rows sent in batches: one UPDATE for every id that arrived while the
/// previous one ran, instead of one statement (and one commit) per command. A row whose mark is
/// lost (the database was unreachable) stays unsent and is published again by the relay after
/// its grace period, with the same message id.
#[derive(Clone)]
pub struct SentMarker {
    tx: tokio::sync::mpsc::UnboundedSender<Marking>,
}

/// Most ids marked by one statement.
const MARK_BATCH: usize = 1000;

impl SentMarker {
    /// Starts the marking task.
    pub fn start(pool: PgPool) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(MARK_BATCH);
            let mut waiting = Vec::new();
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                while let Some(item) = next.take() {
                    match item {
                        Marking::Sent(id) => ids.push(id),
                        Marking::Flush(done) => waiting.push(done),
                    }
                    if ids.len() < MARK_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                if !ids.is_empty() {
                    let result = match pool.get().await {
                        Ok(mut conn) => outbox::mark_sent(&mut conn, &ids).await,
                        Err(e) => Err(StoreError::from(e)),
                    };
                    if let Err(error) = result {
                        tracing::warn!(%error, rows = ids.len(),
                            "could not mark published rows sent; the relay will publish them again");
                    }
                    ids.clear();
                }
                for done in waiting.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        Self { tx }
    }

    /// Notes a row the broker confirmed.
    pub fn sent(&self, id: i64) {
        let _ = self.tx.send(Marking::Sent(id));
    }

    /// Waits until every row noted so far is marked (or its marking failed).
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.tx.send(Marking::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

async fn publish_row(publisher: &Publisher, row: &outbox::OutboxRecord) -> Result<(), String> {
    let message = row
        .message()
        .map_err(|e| format!("stored properties are unreadable: {e}"))?;
    publisher.publish(&message).await.map_err(|e| e.to_string())
}

/// One relay round: locks due rows (other replicas skip them), publishes, records the results.
/// Returns how many rows were published.
pub async fn relay_once(
    pool: &PgPool,
    publisher: &Publisher,
    settings: &OutboxSettings,
) -> Result<usize, StoreError> {
    let mut conn = pool.get().await?;
    let max_wait = Duration::from_millis(settings.max_retry_interval_ms);
    let batch_size = settings.relay_batch_size;
    let publisher = publisher.clone();
    conn.transaction::<_, StoreError, _>(async move |conn| {
        let rows = outbox::lock_due(conn, batch_size).await?;
        let mut sent = Vec::with_capacity(rows.len());
        for row in &rows {
            match publish_row(&publisher, row).await {
                Ok(()) => sent.push(row.id),
                Err(error) => {
                    tracing::warn!(outbox_id = row.id, message_id = %row.message_id, command_id = %row.command_id,
                        attempts = row.publish_attempts + 1, %error, "relay could not publish; will retry");
                    outbox::mark_failed(conn, row.id, row.publish_attempts, &error, max_wait)
                        .await?;
                }
            }
        }
        outbox::mark_sent(conn, &sent).await?;
        if !sent.is_empty() {
            tracing::info!(published = sent.len(), "relay published outbox messages");
        }
        Ok(sent.len())
    })
    .await
}

/// Runs relay rounds every `relay_interval_ms` until `stop` fires.
pub async fn run_relay(
    pool: PgPool,
    publisher: Publisher,
    settings: OutboxSettings,
    stop: CancellationToken,
) {
    let interval = Duration::from_millis(settings.relay_interval_ms);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if let Err(error) = relay_once(&pool, &publisher, &settings).await {
            tracing::warn!(%error, "outbox relay round failed; will try again");
        }
    }
}
