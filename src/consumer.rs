//! Step 1, consume: the broker session (connect, declare, consume), reconnection, and the
//! orderly stop. Each delivery runs the [`pipeline`] in a task of its own; its [`Disposition`] is
//! carried out here, the only place that acks or requeues a command.

use crate::broker::messages::Original;
use crate::broker::{self, topology};
use crate::config::Settings;
use crate::context::Context;
use crate::headers;
use crate::pipeline::{self, Disposition};
use crate::relay;
use crate::store::commands;
use anyhow::Context as _;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// After the grace period, how long commands in flight get to give themselves back.
const ABANDON_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a command in flight may go on after the connection it came on is lost: the broker
/// has already returned it to the queue, and its redelivered copy waits for this one's lease, so
/// past this bound it gives its lease back and stops (a provider call in flight is dropped; the
/// copy repeats it with the same idempotency key). Within it, work that is about to end (an
/// outcome being recorded) ends, and the copy finds the outcome instead of calling again.
pub const ORPHAN_BOUND: Duration = Duration::from_secs(5);
/// How long closing the consuming channel and connection may take at the end of a stop.
const SESSION_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Wait before reconnecting again after every node refused; doubled up to the cap. The first
/// attempt after a loss is at once: with a cluster, another node is likely up.
const RECONNECT_INITIAL: Duration = Duration::from_millis(250);
/// Longest wait between two reconnection attempts: short, so that a quorum queue's new leader
/// (elected within seconds of losing a node) is found soon after it is there.
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// One connection to the broker with the worker's consumer on it.
pub struct Session {
    /// The consuming connection (publishing has its own).
    pub connection: Arc<Connection>,
    channel: Channel,
    consumer: lapin::Consumer,
    /// Fired when this session's commands in flight are orphans: their connection is lost (at
    /// once), or their consumer was cancelled (after the grace their acks still have).
    orphaned: CancellationToken,
}

impl Session {
    /// Connects, declares the topology (every replica does, idempotently), sets the prefetch and
    /// starts consuming.
    pub async fn open(settings: &Settings, instance_id: &str) -> anyhow::Result<Self> {
        let connection = Arc::new(broker::connect(&settings.broker, instance_id).await?);
        let channel = topology::declare(&connection, &settings.broker)
            .await
            .context("cannot declare the RabbitMQ topology")?;
        topology::declare_delay_queues(&channel, &settings.broker, &settings.retry.delay_tiers_ms)
            .await
            .context("cannot declare the delay queues")?;
        channel
            .basic_qos(settings.broker.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                settings.broker.command_queue.as_str().into(),
                instance_id.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("cannot consume from the command queue")?;
        Ok(Self {
            connection,
            channel,
            consumer,
            orphaned: CancellationToken::new(),
        })
    }

    async fn cancel(&self, instance_id: &str) {
        let _ = self
            .channel
            .basic_cancel(instance_id.into(), BasicCancelOptions::default())
            .await;
    }

    async fn close(self, instance_id: &str) {
        self.cancel(instance_id).await;
        let _ = self.channel.close(200, "worker stopped".into()).await;
        let _ = self.connection.close(200, "worker stopped".into()).await;
    }
}

/// How a consume loop ended.
enum Ended {
    Stopped,
    /// The connection or channel failed: nothing more can be acked on it.
    Lost(anyhow::Error),
    /// The broker cancelled the consumer; the channel may still take acks.
    Cancelled,
}

/// Consumes until stopped, reconnecting whenever the broker connection is lost, then stops in
/// order: no new commands, in-flight ones finished or returned, leases released, channels closed.
pub async fn run(
    context: Arc<Context>,
    mut session: Session,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let relay_stop = CancellationToken::new();
    let relay = tokio::spawn(relay::run_relay(
        context.pool.clone(),
        context.publisher.clone(),
        context.settings.outbox.clone(),
        relay_stop.clone(),
    ));
    let mut tasks = JoinSet::new();
    loop {
        context.consuming.store(true, Ordering::SeqCst);
        let ended = consume(&context, &mut session, &mut tasks, &stop).await;
        context.consuming.store(false, Ordering::SeqCst);
        let error = match ended {
            Ended::Stopped => break,
            Ended::Lost(error) => {
                session.orphaned.cancel();
                error
            }
            Ended::Cancelled => anyhow::anyhow!("the broker cancelled the consumer"),
        };
        tracing::warn!(
            error = format!("{error:#}"),
            in_flight = tasks.len(),
            "lost the broker connection; reconnecting (commands in flight finish, the broker redelivers what was not acked)"
        );
        match reconnect(&context, &stop).await {
            Some(new) => {
                let old = std::mem::replace(&mut session, new);
                // A consumer the broker cancelled leaves its connection open: close it once the
                // commands taken on it have had their time (their acks go on it meanwhile).
                let grace = Duration::from_millis(context.settings.worker.shutdown_grace_ms);
                let instance_id = context.instance_id.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    old.orphaned.cancel();
                    let _ =
                        tokio::time::timeout(SESSION_CLOSE_TIMEOUT, old.close(&instance_id)).await;
                });
            }
            None => break,
        }
    }
    tracing::info!(
        in_flight = tasks.len(),
        "worker stopping: no new commands are taken"
    );
    session.cancel(&context.instance_id).await;
    drain(&context, &mut tasks).await;
    relay_stop.cancel();
    let _ = relay.await;
    relay::flush_sent(&context.sent).await;
    let release = crate::store::with_conn(&context.pool, async |conn| {
        commands::release_all(conn, &context.instance_id).await
    });
    if let Err(error) = crate::store::bounded(&context.pool, release).await {
        tracing::warn!(%error, "could not release this worker's leases; they expire by themselves");
    }
    context.publisher.close().await;
    // Every step of the stop is bounded: a broker that does not answer the close is left to
    // notice the closed socket.
    let close = session.close(&context.instance_id);
    if tokio::time::timeout(SESSION_CLOSE_TIMEOUT, close)
        .await
        .is_err()
    {
        tracing::warn!("the consuming connection did not close in time");
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Opens a new session, waiting longer after each failure; `None` when stopped first. (The
/// publisher reopens its own connection when it next publishes.)
async fn reconnect(context: &Context, stop: &CancellationToken) -> Option<Session> {
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        match Session::open(&context.settings, &context.instance_id).await {
            Ok(new) => {
                tracing::info!("reconnected to the broker; consuming again");
                return Some(new);
            }
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                retry_in_ms = wait.max(RECONNECT_INITIAL).as_millis() as u64,
                "cannot reconnect to the broker yet"
            ),
        }
        wait = (wait * 2).clamp(RECONNECT_INITIAL, RECONNECT_MAX);
    }
}

/// Takes deliveries and hands each to its own task until stopped or the connection is lost.
async fn consume(
    context: &Arc<Context>,
    session: &mut Session,
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> Ended {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ended::Stopped,
            next = session.consumer.next() => match next {
                Some(Ok(delivery)) => {
                    tasks.spawn(handle(context.clone(), delivery, session.orphaned.clone()));
                }
                Some(Err(e)) => return Ended::Lost(anyhow::Error::new(e)),
                None => return Ended::Cancelled,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// The longest a worker takes to stop after SIGTERM, every step at its bound: the grace period
/// for commands in flight, their return to the queue, the relay's last publish, the release of
/// leases (one database step), then the publisher's and the consumer's closes. A supervisor's kill
/// timeout (Kubernetes' `terminationGracePeriodSeconds`) must exceed it, or commands in flight are
/// cut off instead of returned. (Flushing telemetry comes after, and may be cut off.)
pub fn longest_stop(settings: &Settings) -> Duration {
    let publish = Duration::from_millis(settings.broker.publish_timeout_ms);
    let database_step =
        Duration::from_millis(settings.database.statement_timeout_ms) + Duration::from_secs(1);
    Duration::from_millis(settings.worker.shutdown_grace_ms)
        + ABANDON_TIMEOUT
        + publish
        + database_step
        + publish
        + SESSION_CLOSE_TIMEOUT
}

/// Lets commands in flight finish within the grace period, then makes them give themselves back.
async fn drain(context: &Context, tasks: &mut JoinSet<()>) {
    let grace = tokio::time::sleep(Duration::from_millis(
        context.settings.worker.shutdown_grace_ms,
    ));
    tokio::pin!(grace);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { return },
            _ = &mut grace, if !context.abandon.is_cancelled() => {
                tracing::warn!(in_flight = tasks.len(), "shutdown grace period over; returning commands in flight to the queue");
                context.abandon.cancel();
                if tokio::time::timeout(ABANDON_TIMEOUT, async { while tasks.join_next().await.is_some() {} }).await.is_err() {
                    tasks.abort_all();
                }
                return;
            }
        }
    }
}

/// Runs the pipeline for one delivery and settles it with the broker. A panic rejects the
/// message back to the queue; the queue's delivery limit dead-letters one that keeps failing.
/// The delivery is abandoned at the end of the shutdown grace period, or [`ORPHAN_BOUND`] after
/// `orphaned` fires.
async fn handle(context: Arc<Context>, delivery: Delivery, orphaned: CancellationToken) {
    let waited = queue_wait(&delivery.properties, chrono::Utc::now());
    context.metrics.received(waited);
    let _in_flight = context.metrics.in_flight();
    // Counters a publisher set without the worker's mark are read as absent from here on.
    let properties = context.copies.marks.verified_counters(&delivery.properties);
    let original = Original {
        exchange: delivery.exchange.as_str(),
        routing_key: delivery.routing_key.as_str(),
        properties: &properties,
        body: &delivery.data,
    };
    let span = pipeline::span(&context, &original);
    let abandon = context.abandon.child_token();
    let work = async {
        let fate = pipeline::process(&context, &original).await;
        pipeline::settle(&context, &original, fate).await
    };
    let work = pipeline::ABANDON.scope(abandon.clone(), work.instrument(span));
    let orphan = async {
        orphaned.cancelled().await;
        tokio::time::sleep(ORPHAN_BOUND).await;
        tracing::debug!("this delivery's connection is gone; giving the command back");
        abandon.cancel();
        std::future::pending().await
    };
    let guarded = async {
        tokio::select! {
            disposition = work => disposition,
            never = orphan => never,
        }
    };
    let disposition = match AssertUnwindSafe(guarded).catch_unwind().await {
        Ok(disposition) => disposition,
        Err(_) => pipeline::after_panic(&context, &original, delivery.delivery_tag).await,
    };
    settle(&delivery, disposition).await;
}

/// How long the command waited between its publish and now: from the producer's millisecond
/// header when it set one, else from the AMQP `timestamp` (whole seconds); unknown without either,
/// or when the producer's clock is ahead.
fn queue_wait(
    properties: &BasicProperties,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<Duration> {
    if let Some(sent_ms) = headers::read_whole(properties, headers::PUBLISHED_AT_MS) {
        let waited = now.timestamp_millis().checked_sub(sent_ms)?;
        return u64::try_from(waited).ok().map(Duration::from_millis);
    }
    let sent = (*properties.timestamp())?;
    let now = u64::try_from(now.timestamp()).ok()?;
    now.checked_sub(sent).map(Duration::from_secs)
}

/// Acks, requeues or rejects the delivery as `disposition` says.
async fn settle(delivery: &Delivery, disposition: Disposition) {
    let settled = match disposition {
        Disposition::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
        Disposition::Requeue => {
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
        Disposition::Reject => {
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: true })
                .await
        }
    };
    if let Err(error) = settled {
        // After a lost connection, every command in flight fails here at once: one line, then a
        // count (see `repeats`).
        let key = "settle on a lost channel";
        let problem = || crate::repeats::Problem {
            key: key.into(),
            what: "deliveries could not be acked or returned: their channel is gone".into(),
            fix: "nothing to do: the broker delivers them again, and the worker's idempotency \
                  turns a repeat into the same event"
                .into(),
            ends_when_quiet: true,
        };
        crate::repeats::occurred(problem, key, || {
            tracing::warn!(%error, ?disposition, "could not settle the delivery; the broker will redeliver it");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_wait_prefers_the_millisecond_header() {
        let now = chrono::DateTime::from_timestamp_millis(1_700_000_000_250).unwrap();
        let mut table = FieldTable::default();
        table.insert(
            headers::PUBLISHED_AT_MS.into(),
            lapin::types::AMQPValue::LongLongInt(1_700_000_000_000),
        );
        let both = BasicProperties::default()
            .with_headers(table)
            .with_timestamp(1_699_999_990);
        assert_eq!(queue_wait(&both, now), Some(Duration::from_millis(250)));
        let seconds = BasicProperties::default().with_timestamp(1_699_999_990);
        assert_eq!(queue_wait(&seconds, now), Some(Duration::from_secs(10)));
        let ahead = BasicProperties::default().with_timestamp(1_800_000_000);
        assert_eq!(queue_wait(&ahead, now), None);
        assert_eq!(queue_wait(&BasicProperties::default(), now), None);
    }
}
