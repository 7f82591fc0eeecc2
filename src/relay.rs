//! The outbox relay: what the outbox holds unsent (a failure's event and dead letter just
//! recorded, or anything the broker refused, an outage, a crash) is published with a confirm and
//! marked sent. It needs both the store and the broker, so it lives beside them.

use crate::broker::messages::OutboundMessage;
use crate::broker::publisher::Publisher;
use crate::config::OutboxSettings;
use crate::store::batch::{Batcher, Write};
use crate::store::{PgConn, PgPool, StoreError, outbox};
use diesel_async::AsyncConnection;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
            Ok(()) => note_sent(sent, *id),
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

/// Marks confirmed outbox rows sent in batches: one UPDATE for every id that arrived while the
/// previous one ran, instead of one statement (and one commit) per command. A row whose mark is
/// lost (the database was unreachable) stays unsent and is published again by the relay after
/// its grace period, with the same message id.
pub struct SentWriter;

/// The running sent marker.
pub type SentMarker = Batcher<SentWriter>;

impl SentWriter {
    /// Starts the marker.
    pub fn start(pool: PgPool) -> SentMarker {
        Batcher::start(pool, SentWriter)
    }
}

impl Write for SentWriter {
    /// A row the broker confirmed, or `None` to wait for the rows noted before it.
    type Request = Option<i64>;
    type Reply = ();
    const NAME: &'static str = "sent marker";
    const MAX_BATCH: usize = 1000;

    async fn write(
        &self,
        conn: &mut PgConn,
        requests: &[Option<i64>],
    ) -> Result<Vec<()>, StoreError> {
        let ids: Vec<i64> = requests.iter().flatten().copied().collect();
        if let Err(error) = outbox::mark_sent(conn, &ids).await {
            tracing::warn!(%error, rows = ids.len(),
                "could not mark published rows sent; the relay will publish them again");
        }
        Ok(vec![(); requests.len()])
    }
}

/// Notes a row the broker confirmed.
fn note_sent(sent: &SentMarker, id: i64) {
    sent.submit_and_forget(Some(id));
}

/// Waits until every row noted so far is marked (or its marking failed).
pub async fn flush_sent(sent: &SentMarker) {
    let _ = sent.submit(None).await;
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
        // A panic in one round is that round's failure; the relay goes on.
        let round = std::panic::AssertUnwindSafe(relay_once(&pool, &publisher, &settings));
        match futures_util::FutureExt::catch_unwind(round).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "outbox relay round failed; will try again"),
            Err(_) => tracing::error!("outbox relay round panicked; will try again"),
        }
    }
}
