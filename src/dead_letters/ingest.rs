//! The dead-letter ingester: moves every message of the dead-letter queue into the dead-letter
//! store, a batch at a time, acking a batch only once its rows are committed. The queue stays the
//! durable buffer between a failure and its ingestion: a worker killed mid-batch leaves its
//! unacked messages to the next ingester, and the store keeps each one once (by the worker's
//! `x-dead-letter-id`, or a hash of the message for one the broker dead-lettered itself). Any
//! replica may ingest; the same task removes archived and replayed entries past their retention.

use super::row::{Letter, reduced, to_row};
use super::store;
use crate::config::Settings;
use crate::store::PgPool;
use chrono::Utc;
use futures_util::StreamExt as _;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Most messages stored in one transaction.
const BATCH: usize = 200;
/// Most message bytes stored in one transaction: a flood of large dead letters is stored a few
/// at a time, not a whole prefetch at once.
const BATCH_BYTES: usize = 16 << 20;
/// How long a batch waits to fill once its first message has arrived.
const FILL: Duration = Duration::from_millis(50);
/// Pause before trying again after the broker or the database failed.
const PAUSE: Duration = Duration::from_secs(1);
/// Runs until `stop` fires: ingests the dead-letter queue, reconnecting after broker outages, and
/// purges past retention once an hour. Each failed try in a row is counted in
/// `levels.dead_letter_ingest_failures` (`/readyz` and the metrics show it), reset by a stored
/// batch.
pub async fn run(
    settings: Settings,
    pool: PgPool,
    name: String,
    levels: std::sync::Arc<crate::metrics::Levels>,
    stop: CancellationToken,
) {
    let retention = Duration::from_secs_f64(settings.dead_letters.retention_days * 86_400.0);
    let purger = tokio::spawn(purge_every_hour(pool.clone(), retention, stop.clone()));
    let failures = &levels.dead_letter_ingest_failures;
    while !stop.is_cancelled() {
        if let Err(error) = ingest(&settings, &pool, &name, failures, &stop).await {
            failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %format!("{error:#}"), "dead-letter ingestion paused; trying again");
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(PAUSE) => {}
            }
        }
    }
    let _ = purger.await;
}

async fn purge_every_hour(pool: PgPool, retention: Duration, stop: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let before = Utc::now() - chrono::Duration::from_std(retention).unwrap_or_default();
        let purged = crate::store::with_conn(&pool, async |conn| store::purge(conn, before).await);
        match purged.await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                removed = n,
                "dead letters past dead_letters.retention_days removed"
            ),
            Err(error) => {
                tracing::warn!(%error, "cannot remove old dead letters; trying next hour")
            }
        }
    }
}

/// One connection's life: consume, store, ack, until the connection fails or `stop` fires.
async fn ingest(
    settings: &Settings,
    pool: &PgPool,
    name: &str,
    failures: &std::sync::atomic::AtomicI64,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    // Read with the first batch, so that the queue is consumed (and held) while the database is
    // away.
    let mut marks = None;
    let connection = crate::broker::connect(&settings.broker, name).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(BATCH as u16, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            settings.broker.dead_letter_queue.as_str().into(),
            format!("{name} ingester").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Whatever ends the loop (a stop, a broker or database error), the connection is closed, so
    // the broker hands what this ingester had not acked to the next one at once.
    let ended = async {
        loop {
            let first = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                next = consumer.next() => next,
            };
            let Some(first) = first else {
                anyhow::bail!("the dead-letter consumer was cancelled");
            };
            let first = first?;
            let mut bytes = first.data.len();
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + FILL;
            while batch.len() < BATCH && bytes < BATCH_BYTES {
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(Some(delivery)) => {
                        let delivery = delivery?;
                        bytes += delivery.data.len();
                        batch.push(delivery);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            store_then_ack(settings, pool, &mut marks, &channel, &batch, failures, stop).await?;
        }
    }
    .await;
    let _ = connection.close(200, "ingester stopping".into()).await;
    ended
}

/// Stores the batch (trying again while the database is away), then acks it with one
/// `basic.ack(multiple)`. Stopping first leaves the batch unacked, for the next ingester. A batch
/// the database refuses (the data, not the connection) is stored one letter at a time, and a
/// letter it refuses alone is stored in a reduced form that says why ([`reduced`]): one letter
/// never holds the queue up.
async fn store_then_ack(
    settings: &Settings,
    pool: &PgPool,
    marks: &mut Option<crate::marks::Marks>,
    channel: &Channel,
    batch: &[Delivery],
    failures: &std::sync::atomic::AtomicI64,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let stored = async {
            let marks = match marks {
                Some(marks) => marks,
                None => marks.insert(
                    crate::store::with_conn(pool, async |conn| {
                        crate::marks::Marks::load(settings, conn).await
                    })
                    .await?,
                ),
            };
            // Off the runtime's threads: a letter of many headers or a large body (hashed for
            // its key) takes a while, and must not hold up the commands in flight.
            let letters: Vec<Letter> = batch.iter().map(Letter::of).collect();
            let (settings, marks) = (settings.clone(), marks.clone());
            let rows = tokio::task::spawn_blocking(move || {
                letters
                    .iter()
                    .map(|delivery| to_row(&settings, &marks, delivery))
                    .collect::<Vec<store::NewDeadLetter>>()
            })
            .await
            .map_err(|e| {
                crate::store::StoreError::Refused(format!("reading the letters failed: {e}"))
            })?;
            store_rows(pool, rows).await
        };
        match stored.await {
            Ok(new) => {
                tracing::debug!(new, of = batch.len(), "dead letters stored");
                failures.store(0, std::sync::atomic::Ordering::Relaxed);
                break;
            }
            Err(error) => {
                failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(%error, "cannot store dead letters; they stay in the queue meanwhile");
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(PAUSE) => {}
                }
            }
        }
    }
    let last = batch.last().map_or(0, |d| d.delivery_tag);
    channel
        .basic_ack(last, BasicAckOptions { multiple: true })
        .await?;
    Ok(())
}

/// Stores `rows` in one transaction; if the database refuses the data, one at a time, each
/// refused one in its reduced form. An error left is the database's, not a letter's.
async fn store_rows(
    pool: &PgPool,
    rows: Vec<store::NewDeadLetter>,
) -> Result<usize, crate::store::StoreError> {
    let all = crate::store::with_conn(pool, async |conn| store::insert_batch(conn, &rows).await);
    match all.await {
        Err(error) if error.is_refusal() || error.may_be_the_data() => {
            tracing::warn!(%error, "the database refused a batch of dead letters; storing them one at a time");
        }
        other => return other,
    }
    let mut new = 0;
    for row in rows {
        let one = std::slice::from_ref(&row);
        let alone =
            crate::store::with_conn(pool, async |conn| store::insert_batch(conn, one).await);
        new += match alone.await {
            Err(error) if error.is_refusal() || error.may_be_the_data() => {
                tracing::error!(%error, command_id = %crate::text::visible(&row.command_id),
                    "the database refused a dead letter; storing it reduced");
                let reduced = [reduced(row, &error.to_string())];
                let stored = crate::store::with_conn(pool, async |conn| {
                    store::insert_batch(conn, &reduced).await
                });
                stored.await?
            }
            other => other?,
        };
    }
    Ok(new)
}
