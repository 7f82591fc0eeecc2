//! The worker: wiring (connect, declare, consume, relay, shut down) and [`process`], the one
//! testable step that turns a delivery into its fate. Acking, requeueing and dead-lettering are
//! decided here and nowhere else.

use crate::broker::messages::{self, EventTarget, Failure, Original};
use crate::broker::publisher::{self, Publisher};
use crate::broker::{self, topology};
use crate::command::Envelope;
use crate::config::Settings;
use crate::errors::ErrorKind;
use crate::health;
use crate::metrics::{Metrics, MetricsHandle};
use crate::provider::breaker::Breaker;
use crate::provider::client::ProviderClient;
use crate::store::commands::{self, Claim, CommandRecord};
use crate::store::outbox::{self, NewOutboxMessage};
use crate::store::{self, PgPool, StoreError};
use anyhow::Context as _;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// First wait before trying the database again after an error; doubled up to the cap.
const DB_RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Longest wait between two tries at the database.
const DB_RETRY_MAX: Duration = Duration::from_secs(5);
/// Wait before returning a message whose dead letter could not be published.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);
/// After the grace period, how long commands in flight get to give themselves back.
const ABANDON_TIMEOUT: Duration = Duration::from_secs(5);
/// First wait before reconnecting to the broker; doubled up to the cap, reset after success.
const RECONNECT_INITIAL: Duration = Duration::from_millis(500);
/// Longest wait between two reconnection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Runs a database step until it succeeds: while PostgreSQL is unreachable the command waits
/// here (holding its prefetch slot, so the worker takes no more) instead of failing. Gives up
/// only when the shutdown grace period ends. A macro rather than a function taking an async
/// closure, whose borrowed captures the compiler cannot yet prove `Send` for a spawned task.
macro_rules! db {
    ($shared:expr, $what:expr, |$conn:ident| $step:expr) => {
        db!($shared, $what, async {
            match $shared.pool.get().await {
                Ok(mut $conn) => $step.await,
                Err(e) => Err(StoreError::from(e)),
            }
        })
    };
    ($shared:expr, $what:expr, $step:expr) => {{
        let mut wait = DB_RETRY_INITIAL;
        loop {
            let span = tracing::info_span!("db", otel.name = $what, otel.kind = "client",
                db.system.name = "postgresql");
            let result = $step.instrument(span).await;
            match result {
                Ok(value) => break Ok(value),
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64,
                        "cannot {}; will try again", $what);
                    if let Err(abandoned) = wait_or_abandon($shared, wait).await {
                        break Err(abandoned);
                    }
                    wait = (wait * 2).min(DB_RETRY_MAX);
                }
            }
        }
    }};
}

fn since(first_seen: chrono::DateTime<chrono::Utc>) -> Duration {
    (chrono::Utc::now() - first_seen)
        .to_std()
        .unwrap_or_default()
}

/// The gauges read from PostgreSQL and RabbitMQ.
mod levels {
    use super::Shared;
    use crate::store::{commands, outbox};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    /// Refreshes the levels every `telemetry.levels_interval_ms` until `stop` fires.
    pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
        let interval = Duration::from_millis(shared.settings.telemetry.levels_interval_ms);
        loop {
            refresh(&shared).await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    async fn refresh(shared: &Shared) {
        let levels = &shared.metrics.levels;
        if let Ok(mut conn) = shared.pool.get().await {
            if let Ok(backlog) = outbox::unsent_count(&mut conn).await {
                levels.outbox_backlog.store(backlog, Ordering::Relaxed);
            }
            if let Ok(age) = commands::oldest_processing_age(&mut conn).await {
                levels
                    .oldest_processing_age_ms
                    .store(age.as_millis() as i64, Ordering::Relaxed);
            }
        }
        let broker = &shared.settings.broker;
        for (queue, level) in [
            (&broker.dead_letter_queue, &levels.dead_letter_depth),
            (&broker.command_queue, &levels.command_queue_depth),
        ] {
            if let Ok(depth) = shared.publisher.queue_depth(queue).await {
                level.store(i64::from(depth), Ordering::Relaxed);
            }
        }
    }
}

/// What becomes of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Its outcome is durable (or it was dead-lettered with a confirm): remove it from the queue.
    Ack,
    /// It could not be finished now (shutdown, broker trouble): give it back to the queue.
    Requeue,
}

/// Everything a command's processing needs, shared by the tasks of one worker.
pub struct Shared {
    /// The settings it runs with.
    pub settings: Settings,
    /// Database connections.
    pub pool: PgPool,
    /// The confirm-mode publisher.
    pub publisher: Publisher,
    /// The provider API client.
    pub provider: ProviderClient,
    /// The provider's circuit breaker (also read by readiness).
    pub breaker: Arc<Breaker>,
    /// The figures it records.
    pub metrics: Arc<Metrics>,
    /// Claims commands in batches.
    pub claims: commands::ClaimBatcher,
    /// Records outcomes in batches.
    pub outcomes: commands::OutcomeWriter,
    /// Marks published outbox rows sent, in batches.
    pub sent: publisher::SentMarker,
    /// True while a consumer on the command queue is live (read by readiness).
    pub consuming: Arc<AtomicBool>,
    /// Where events go.
    pub events: EventTarget,
    /// This worker's name in command leases, unique per process.
    pub instance_id: String,
    /// Fires when the shutdown grace period is over: work in flight gives itself back.
    pub abandon: CancellationToken,
}

/// A started worker; [`RunningWorker::wait`] returns once it has stopped.
pub struct RunningWorker {
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The lease owner name, for tests and logs.
    pub instance_id: String,
    /// Where `/healthz`, `/readyz` and `/metrics` are served, when enabled.
    pub http_addr: Option<std::net::SocketAddr>,
    /// The worker's figures.
    pub metrics: Arc<MetricsHandle>,
}

impl RunningWorker {
    /// Waits until the worker has stopped, and says how.
    pub async fn wait(self) -> anyhow::Result<()> {
        let ended = self.task.await.context("the worker task panicked");
        // Flushes the last figures to OTLP, when configured.
        self.metrics.shutdown();
        ended?
    }
}

/// One connection to the broker with the worker's consumer on it.
struct Session {
    connection: Arc<Connection>,
    channel: Channel,
    consumer: lapin::Consumer,
}

impl Session {
    /// Connects, declares the topology (every replica does, idempotently), sets the prefetch and
    /// starts consuming.
    async fn open(settings: &Settings, instance_id: &str) -> anyhow::Result<Self> {
        let connection = Arc::new(broker::connect(&settings.broker, instance_id).await?);
        let channel = connection.create_channel().await?;
        topology::declare(&channel, &settings.broker)
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
        })
    }

    async fn close(self, instance_id: &str) {
        let _ = self
            .channel
            .basic_cancel(instance_id.into(), BasicCancelOptions::default())
            .await;
        let _ = self.channel.close(200, "worker stopped".into()).await;
        let _ = self.connection.close(200, "worker stopped".into()).await;
    }
}

/// Connects, migrates, declares the topology and starts consuming; returns once commands are
/// being taken, or with an error naming what could not be reached. After that, the worker rides
/// out broker outages by reconnecting. It stops taking commands when `stop` fires, then drains.
pub async fn start(settings: Settings, stop: CancellationToken) -> anyhow::Result<RunningWorker> {
    settings.check_for_worker()?;
    let instance_id = format!("plw-{}", uuid::Uuid::new_v4().simple());
    let pool = store::pool(&settings.database)?;
    if settings.database.run_migrations {
        let applied = store::migrate(&pool)
            .await
            .with_context(|| format!("cannot migrate the database at {}", settings.database.url))?;
        tracing::info!(applied, "database migrations are up to date");
    }
    let session = Session::open(&settings, &instance_id).await?;
    let publisher = Publisher::open(session.connection.clone()).await?;
    let breaker = Breaker::new(settings.breaker.clone());
    let metrics = Arc::new(MetricsHandle::new()?);
    let consuming = Arc::new(AtomicBool::new(true));
    let background = CancellationToken::new();
    let listen = settings.telemetry.http_listen.trim();
    let http_addr = if listen.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (telemetry.http_listen)"))?;
        let addr = listener.local_addr()?;
        let probe = health::Probe {
            metrics: metrics.clone(),
            pool: pool.clone(),
            breaker: breaker.clone(),
            consuming: consuming.clone(),
        };
        tokio::spawn(health::serve(listener, probe, background.clone()));
        tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
        Some(addr)
    };
    let provider = ProviderClient::new(&settings.provider, &settings.retry, breaker.clone())?;
    let sent = publisher::SentMarker::start(pool.clone());
    let claims = commands::ClaimBatcher::start(pool.clone(), instance_id.clone(), settings.lease());
    let outcomes = commands::OutcomeWriter::start(pool.clone(), instance_id.clone());
    let shared = Arc::new(Shared {
        events: EventTarget::new(&settings),
        pool,
        publisher,
        provider,
        breaker,
        metrics: metrics.metrics.clone(),
        sent,
        claims,
        outcomes,
        consuming,
        instance_id: instance_id.clone(),
        abandon: CancellationToken::new(),
        settings,
    });
    tracing::info!(instance_id, queue = %shared.settings.broker.command_queue,
        prefetch = shared.settings.broker.prefetch, "worker started");
    tokio::spawn(levels::run(shared.clone(), background.clone()));
    let task = tokio::spawn(async move {
        let ended = run(shared, session, stop).await;
        background.cancel();
        ended
    });
    Ok(RunningWorker {
        task,
        instance_id,
        http_addr,
        metrics,
    })
}

/// How a consume loop ended.
enum Ended {
    Stopped,
    Lost(anyhow::Error),
}

/// Consumes until stopped, reconnecting whenever the broker connection is lost, then stops in
/// order: no new commands, in-flight ones finished or returned, leases released, channels closed.
async fn run(
    shared: Arc<Shared>,
    mut session: Session,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let relay_stop = CancellationToken::new();
    let relay = tokio::spawn(publisher::run_relay(
        shared.pool.clone(),
        shared.publisher.clone(),
        shared.settings.outbox.clone(),
        relay_stop.clone(),
    ));
    let mut tasks = JoinSet::new();
    'sessions: loop {
        shared.consuming.store(true, Ordering::SeqCst);
        let ended = consume(&shared, &mut session, &mut tasks, &stop).await;
        shared.consuming.store(false, Ordering::SeqCst);
        let error = match ended {
            Ended::Stopped => break 'sessions,
            Ended::Lost(error) => error,
        };
        tracing::warn!(
            error = format!("{error:#}"),
            in_flight = tasks.len(),
            "lost the broker connection; reconnecting (commands in flight finish, the broker redelivers what was not acked)"
        );
        let mut wait = RECONNECT_INITIAL;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break 'sessions,
                _ = tokio::time::sleep(wait) => {}
            }
            match Session::open(&shared.settings, &shared.instance_id).await {
                Ok(new) => match shared.publisher.replace(new.connection.clone()).await {
                    Ok(()) => {
                        session = new;
                        tracing::info!("reconnected to the broker; consuming again");
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "reconnected but cannot open the publishing channel")
                    }
                },
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    retry_in_ms = wait.as_millis() as u64,
                    "cannot reconnect to the broker yet"
                ),
            }
            wait = (wait * 2).min(RECONNECT_MAX);
        }
    }
    tracing::info!(
        in_flight = tasks.len(),
        "worker stopping: no new commands are taken"
    );
    let _ = session
        .channel
        .basic_cancel(
            shared.instance_id.as_str().into(),
            BasicCancelOptions::default(),
        )
        .await;
    drain(&shared, &mut tasks).await;
    relay_stop.cancel();
    let _ = relay.await;
    shared.sent.flush().await;
    if let Ok(mut conn) = shared.pool.get().await
        && let Err(error) = commands::release_all(&mut conn, &shared.instance_id).await
    {
        tracing::warn!(%error, "could not release this worker's leases; they expire by themselves");
    }
    shared.publisher.close().await;
    session.close(&shared.instance_id).await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Takes deliveries and hands each to its own task until stopped or the connection is lost.
async fn consume(
    shared: &Arc<Shared>,
    session: &mut Session,
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> Ended {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ended::Stopped,
            next = session.consumer.next() => match next {
                Some(Ok(delivery)) => {
                    tasks.spawn(handle(shared.clone(), delivery));
                }
                Some(Err(e)) => return Ended::Lost(anyhow::Error::new(e)),
                None => return Ended::Lost(anyhow::anyhow!("the broker cancelled the consumer")),
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Lets commands in flight finish within the grace period, then makes them give themselves back.
async fn drain(shared: &Shared, tasks: &mut JoinSet<()>) {
    let grace = tokio::time::sleep(Duration::from_millis(
        shared.settings.worker.shutdown_grace_ms,
    ));
    tokio::pin!(grace);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { return },
            _ = &mut grace, if !shared.abandon.is_cancelled() => {
                tracing::warn!(in_flight = tasks.len(), "shutdown grace period over; returning commands in flight to the queue");
                shared.abandon.cancel();
                if tokio::time::timeout(ABANDON_TIMEOUT, async { while tasks.join_next().await.is_some() {} }).await.is_err() {
                    tasks.abort_all();
                }
                return;
            }
        }
    }
}

/// Runs [`process`] for one delivery and settles it with the broker. A panic requeues the
/// message; the queue's delivery limit dead-letters one that keeps failing.
async fn handle(shared: Arc<Shared>, delivery: Delivery) {
    let waited = delivery.properties.timestamp().and_then(|sent| {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        now.checked_sub(sent).map(Duration::from_secs)
    });
    shared.metrics.received(waited);
    let _in_flight = shared.metrics.in_flight();
    let disposition = AssertUnwindSafe(process(&shared, &delivery))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            tracing::error!(
                delivery_tag = delivery.delivery_tag,
                "processing panicked; message returned to the queue"
            );
            Disposition::Requeue
        });
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
    };
    if let Err(error) = settled {
        tracing::warn!(%error, ?disposition, "could not settle the delivery; the broker will redeliver it");
    }
}

/// Work was given up because the shutdown grace period ended.
struct Abandoned;

impl From<Abandoned> for Disposition {
    fn from(_: Abandoned) -> Self {
        Disposition::Requeue
    }
}

/// Decides a delivery's fate: dead-letter it, publish its recorded event again, or call the
/// provider and record the outcome. Returns only once that fate is durable.
pub async fn process(shared: &Shared, delivery: &Delivery) -> Disposition {
    let original = Original {
        exchange: delivery.exchange.as_str(),
        routing_key: delivery.routing_key.as_str(),
        properties: &delivery.properties,
        body: &delivery.data,
    };
    let envelope = match Envelope::parse(
        &delivery.properties,
        &delivery.data,
        shared.settings.broker.max_message_bytes,
    ) {
        Ok(envelope) => envelope,
        Err(invalid) => {
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string());
            let span =
                tracing::info_span!("command", command_id = message_id.as_deref().unwrap_or(""));
            let failure = Failure {
                kind: ErrorKind::Validation,
                message: &invalid.0,
                http_status: None,
                error_body: None,
                attempts: 0,
            };
            return dead_letter_now(shared, &original, &failure)
                .instrument(span)
                .await;
        }
    };
    let span = tracing::info_span!("command",
        otel.name = format!("process {}", shared.settings.broker.command_queue),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %shared.settings.broker.command_queue,
        messaging.rabbitmq.destination.routing_key = %delivery.routing_key,
        messaging.message.id = %envelope.command_id,
        messaging.message.conversation_id = %envelope.correlation_id,
        messaging.message.body.size = delivery.data.len(),
        command_id = %envelope.command_id,
        correlation_id = %envelope.correlation_id,
        replay_count = envelope.replay_count,
        delay_round = envelope.delay_round,
        trace_id = tracing::field::Empty,
    );
    let _ = span.set_parent(crate::telemetry::extract(
        delivery.properties.headers().as_ref(),
    ));
    span.record("trace_id", crate::telemetry::trace_id(&span));
    process_command(shared, &original, &envelope)
        .instrument(span)
        .await
        .unwrap_or_else(Disposition::from)
}

async fn process_command(
    shared: &Shared,
    original: &Original<'_>,
    envelope: &Envelope,
) -> Result<Disposition, Abandoned> {
    let command_id = envelope.command_id.as_str();
    let owner = shared.instance_id.as_str();
    loop {
        let earlier_attempts = match db!(
            shared,
            "claim the command",
            commands::claim(&shared.pool, &shared.claims, envelope)
        )? {
            Claim::Acquired { attempts } => {
                tracing::debug!(earlier_attempts = attempts, "command claimed");
                attempts
            }
            Claim::Finished(record) => return republish(shared, &record).await,
            Claim::Busy => {
                tracing::debug!("another worker holds this command; waiting for its outcome");
                wait_or_abandon(
                    shared,
                    Duration::from_millis(shared.settings.worker.busy_poll_ms),
                )
                .await?;
                continue;
            }
            Claim::Conflict => {
                let message = format!(
                    "command id {command_id} was already used for a different request; \
                     the earlier request's link is not reused"
                );
                let failure = Failure {
                    kind: ErrorKind::IdempotencyConflict,
                    message: &message,
                    http_status: None,
                    error_body: None,
                    attempts: 0,
                };
                return Ok(dead_letter_now(shared, original, &failure).await);
            }
        };

        let call = tokio::select! {
            call = shared.provider.create_link(command_id, &envelope.request_json, original.properties.headers().as_ref(), &shared.metrics) => call,
            _ = shared.abandon.cancelled() => {
                if let Ok(mut conn) = shared.pool.get().await {
                    let _ = commands::release(&mut conn, command_id, owner, 0, None).await;
                }
                return Err(Abandoned);
            }
        };

        let now = chrono::Utc::now();
        let grace = Duration::from_millis(shared.settings.outbox.inline_grace_ms);
        let trace = crate::telemetry::outgoing(original.properties.headers().as_ref());
        // What the outbox rows hold, kept to publish without reading them back.
        let mut outgoing = Vec::with_capacity(2);
        let recorded = match &call.outcome {
            Ok(link) => {
                let event =
                    messages::created_event(&shared.events, envelope, &link.body, now, &trace);
                let success = commands::Success {
                    attempts: call.attempts,
                    link_id: link.link_id,
                    payment_link: link.payment_link.clone(),
                    response_body: link.body.clone(),
                    event: commands::KeptEvent::new(&event),
                };
                // The event is kept on the command's row, not in the outbox: this delivery is
                // acked only once the broker confirmed the event, so after a crash the broker's
                // redelivery finds the outcome and publishes the kept event again.
                let recorded = db!(
                    shared,
                    "record the link",
                    shared.outcomes.record(
                        command_id,
                        commands::Outcome::Succeeded(success.clone()),
                        Vec::new()
                    )
                )?;
                let Some((_, first_seen)) = recorded else {
                    tracing::warn!(
                        "this worker's lease ran out and another worker took the command over"
                    );
                    continue;
                };
                shared.metrics.succeeded(since(first_seen));
                tracing::info!(
                    attempts = call.attempts,
                    http_status = link.http_status,
                    link_id = link.link_id,
                    "payment link created"
                );
                return publish_or_hand_over(shared, command_id, &event).await;
            }
            Err((ErrorKind::RetriesExhausted, error))
                if envelope.delay_round < shared.settings.retry.delay_tiers_ms.len() =>
            {
                let attempts = earlier_attempts + call.attempts;
                return delay(
                    shared,
                    original,
                    envelope,
                    attempts,
                    call.attempts,
                    &error.message,
                )
                .await;
            }
            Err((kind, error)) => {
                let failure = Failure {
                    kind: *kind,
                    message: &error.message,
                    http_status: error.http_status,
                    error_body: error.body.as_deref(),
                    attempts: earlier_attempts + call.attempts,
                };
                let mut rows = Vec::with_capacity(2);
                if kind.publishes_failed_event() {
                    let event =
                        messages::failed_event(&shared.events, envelope, &failure, now, &trace);
                    rows.push(NewOutboxMessage::new(
                        command_id,
                        outbox::EVENT,
                        &event,
                        grace,
                    ));
                    outgoing.push(event);
                }
                let dead_letter = messages::dead_letter(
                    &shared.settings.broker.dead_letter_exchange,
                    original,
                    &failure,
                    now,
                );
                rows.push(NewOutboxMessage::new(
                    command_id,
                    outbox::DEAD_LETTER,
                    &dead_letter,
                    grace,
                ));
                outgoing.push(dead_letter);
                let record = commands::Failure {
                    kind: *kind,
                    message: error.message.clone(),
                    attempts: call.attempts,
                    http_status: error.http_status,
                    error_body: error.body.clone(),
                };
                let ids = db!(
                    shared,
                    "record the failure",
                    shared.outcomes.record(
                        command_id,
                        commands::Outcome::Failed(record.clone()),
                        rows.clone()
                    )
                )?;
                if let Some((_, first_seen)) = &ids {
                    shared
                        .metrics
                        .dead_lettered(kind.as_str(), Some(since(*first_seen)));
                    tracing::warn!(error_kind = %kind, attempts = call.attempts, http_status = error.http_status,
                        error = %error.message, "command dead-lettered");
                }
                ids
            }
        };
        let Some((ids, _)) = recorded else {
            tracing::warn!("this worker's lease ran out and another worker took the command over");
            continue;
        };
        let rows: Vec<_> = ids.into_iter().zip(outgoing).collect();
        if let Err(error) = publisher::publish_recorded(
            &shared.pool,
            &shared.publisher,
            &shared.sent,
            &rows,
            &shared.settings.outbox,
        )
        .await
        {
            tracing::warn!(%error, "could not publish at once; the outbox relay will");
        }
        return Ok(Disposition::Ack);
    }
}

/// A command that already has an outcome came again: publish its recorded event again (same
/// event id) and make no provider call.
async fn republish(shared: &Shared, record: &CommandRecord) -> Result<Disposition, Abandoned> {
    shared.metrics.duplicate();
    tracing::info!(status = %record.status, "duplicate command; publishing its recorded event again");
    let command_id = record.command_id.as_str();
    let event = db!(shared, "read the recorded event", |conn| {
        commands::recorded_event(&mut conn, command_id)
    })?;
    match event {
        Some(Ok(message)) => publish_or_hand_over(shared, command_id, &message).await,
        Some(Err(error)) => {
            tracing::error!(%error, "recorded event is unreadable");
            Ok(Disposition::Ack)
        }
        None => {
            tracing::debug!("this outcome has no event to publish");
            Ok(Disposition::Ack)
        }
    }
}

/// Publishes a recorded event and, if the broker does not take it now (a nack, no queue bound,
/// a lost channel), hands it to the outbox relay, so the delivery can be acked either way.
async fn publish_or_hand_over(
    shared: &Shared,
    command_id: &str,
    event: &messages::OutboundMessage,
) -> Result<Disposition, Abandoned> {
    let error = match shared.publisher.publish(event).await {
        Ok(()) => return Ok(Disposition::Ack),
        Err(error) => error.to_string(),
    };
    tracing::warn!(message_id = event.message_id(), %error,
        "publish failed; the outbox relay will retry");
    let max_wait = Duration::from_millis(shared.settings.outbox.max_retry_interval_ms);
    db!(shared, "hand the event to the relay", |conn| {
        outbox::hand_to_relay(
            &mut conn,
            command_id,
            outbox::EVENT,
            event,
            &error,
            max_wait,
        )
    })?;
    Ok(Disposition::Ack)
}

/// The round's retry budget is spent but delay tiers remain: park the command in the next delay
/// queue (confirmed), record the attempts, give up the lease, and ack this delivery.
async fn delay(
    shared: &Shared,
    original: &Original<'_>,
    envelope: &Envelope,
    total_attempts: i32,
    round_attempts: i32,
    last_error: &str,
) -> Result<Disposition, Abandoned> {
    let round = envelope.delay_round;
    let delay_ms = shared.settings.retry.delay_tiers_ms[round];
    let queue = topology::delay_queue(&shared.settings.broker, delay_ms);
    let message = messages::delayed(&queue, original, round + 1, total_attempts, last_error);
    let command_id = envelope.command_id.as_str();
    let owner = shared.instance_id.as_str();
    let published = shared.publisher.publish(&message).await;
    db!(shared, "record the attempts", |conn| commands::release(
        &mut conn,
        command_id,
        owner,
        round_attempts,
        Some(last_error)
    ))?;
    match published {
        Ok(()) => {
            shared.metrics.delayed();
            tracing::warn!(
                round = round + 1,
                delay_ms,
                attempts = total_attempts,
                error = last_error,
                "provider still failing; command waits in a delay queue"
            );
            Ok(Disposition::Ack)
        }
        Err(error) => {
            tracing::error!(%error, "could not park the command in its delay queue; returning it to the queue");
            let _ = wait_or_abandon(shared, REQUEUE_DELAY).await;
            Ok(Disposition::Requeue)
        }
    }
}

/// Publishes a dead letter for a command that has no record to hang it on (invalid, or in
/// conflict with another command's record), and acks only once the broker confirmed it.
async fn dead_letter_now(
    shared: &Shared,
    original: &Original<'_>,
    failure: &Failure<'_>,
) -> Disposition {
    let message = messages::dead_letter(
        &shared.settings.broker.dead_letter_exchange,
        original,
        failure,
        chrono::Utc::now(),
    );
    match shared.publisher.publish(&message).await {
        Ok(()) => {
            shared.metrics.dead_lettered(failure.kind.as_str(), None);
            tracing::warn!(error_kind = %failure.kind, error = failure.message, "command dead-lettered");
            Disposition::Ack
        }
        Err(error) => {
            tracing::error!(%error, error_kind = %failure.kind, "could not dead-letter the command; returning it to the queue");
            let _ = wait_or_abandon(shared, REQUEUE_DELAY).await;
            Disposition::Requeue
        }
    }
}

/// Waits, unless the grace period ends first.
async fn wait_or_abandon(shared: &Shared, wait: Duration) -> Result<(), Abandoned> {
    tokio::select! {
        _ = tokio::time::sleep(wait) => Ok(()),
        _ = shared.abandon.cancelled() => Err(Abandoned),
    }
}
