//! The outbox relay: what the outbox holds unsent (a failure's event and dead letter just
//! recorded, or anything the broker refused, an outage, a crash) is published with a confirm and
//! marked sent. It needs both the store and the broker, so it lives beside them.

use crate::broker::messages::OutboundMessage;
use crate::broker::publisher::{PublishError, Publisher};
use crate::config::OutboxSettings;
use crate::store::batch::{Batcher, Write};
use crate::store::{PgConn, PgPool, StoreError, bounded, outbox};
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
                error.report(|| {
                    tracing::warn!(outbox_id = id, message_id = message.message_id(), %error,
                        "publish failed; the outbox relay will retry");
                });
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

/// Publishes one stored row; the error in words, and whether the broker is not taking publishes
/// now (no point trying the rest of the round). A failure is logged in full when it is the first
/// of its kind, then counted into a periodic summary (see [`crate::repeats`]).
async fn publish_row(
    publisher: &Publisher,
    row: &outbox::OutboxRecord,
) -> Result<(), (String, bool)> {
    let logged = |error: &dyn std::fmt::Display| {
        tracing::warn!(outbox_id = row.id, message_id = %row.message_id, command_id = %row.command_id,
            attempts = row.publish_attempts + 1, %error, "relay could not publish; will retry");
    };
    let message = row.message().map_err(|e| {
        let error = format!("stored properties are unreadable: {e}");
        logged(&error);
        (error, false)
    })?;
    publisher.publish(&message).await.map_err(|e| {
        e.report(|| logged(&e));
        let broker_away = matches!(e, PublishError::TimedOut(_) | PublishError::Reconnect(_));
        (e.to_string(), broker_away)
    })
}

/// One relay round: claims due rows (a short statement; other replicas skip them), publishes
/// them outside any transaction, then records the results. Stops at the first publish the
/// broker does not take in time, giving the rest back. Returns how many rows were published.
pub async fn relay_once(
    pool: &PgPool,
    publisher: &Publisher,
    settings: &OutboxSettings,
) -> Result<usize, StoreError> {
    let max_wait = Duration::from_millis(settings.max_retry_interval_ms);
    // Long enough for the round's publishes, each bounded by broker.publish_timeout_ms.
    let lease = max_wait.max(Duration::from_secs(60));
    let rows = {
        let mut conn = pool.get().await?;
        bounded(
            pool,
            outbox::claim_due(&mut conn, settings.relay_batch_size, lease),
        )
        .await?
    };
    let mut sent = Vec::with_capacity(rows.len());
    let mut failed = Vec::new();
    let mut untried = Vec::new();
    let mut broker_away = false;
    for row in &rows {
        if broker_away {
            untried.push(row.id);
            continue;
        }
        match publish_row(publisher, row).await {
            Ok(()) => sent.push(row.id),
            Err((error, away)) => {
                failed.push((row.id, row.publish_attempts, error));
                broker_away = away;
            }
        }
    }
    let mut conn = pool.get().await?;
    bounded(pool, async {
        outbox::mark_sent(&mut conn, &sent).await?;
        for (id, attempts, error) in &failed {
            outbox::mark_failed(&mut conn, *id, *attempts, error, max_wait).await?;
        }
        outbox::release(&mut conn, &untried).await
    })
    .await?;
    if !sent.is_empty() {
        tracing::info!(published = sent.len(), "relay published outbox messages");
    }
    Ok(sent.len())
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
            // Every round fails while the database is away: one line, then a summary per
            // interval (see `repeats`).
            Ok(Err(error)) => {
                let key = "outbox relay round";
                let problem = || crate::repeats::Problem {
                    key: key.into(),
                    what: "outbox relay rounds fail: the database or the broker is unreachable"
                        .into(),
                    fix: "check PostgreSQL and RabbitMQ; unsent events wait in the outbox and go \
                          out by themselves when both answer"
                        .into(),
                    ends_when_quiet: true,
                };
                crate::repeats::occurred(
                    problem,
                    key,
                    || tracing::warn!(%error, "outbox relay round failed; will try again"),
                );
            }
            Err(_) => tracing::error!("outbox relay round panicked; will try again"),
        }
    }
}
