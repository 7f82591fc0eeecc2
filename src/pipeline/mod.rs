//! Steps 2 to 4 for one delivery: [`process`] parses it, claims the command, calls the provider
//! and records the outcome, each a short function below, and returns the message's [`Fate`];
//! [`settle`] (in [`fate`]) carries the fate out with the broker. Neither acks: the consumer
//! does, with the [`Disposition`] `settle` returns.

/// Runs a database step until it succeeds: while PostgreSQL is unreachable the command waits
/// here (holding its prefetch slot, so the worker takes no more) instead of failing. Gives up
/// when the shutdown grace period ends ([`Halt::Abandoned`]) or when the database refuses the
/// data itself ([`Halt::Refused`]): waiting cannot change that. A macro rather than a function taking an async
/// closure, whose borrowed captures the compiler cannot yet prove `Send` for a spawned task.
macro_rules! db {
    ($ctx:expr, $what:expr, |$conn:ident| $step:expr) => {
        db!($ctx, $what, async {
            match $ctx.pool.get().await {
                Ok(mut $conn) => $step.await,
                Err(e) => Err($crate::store::StoreError::from(e)),
            }
        })
    };
    ($ctx:expr, $what:expr, $step:expr) => {{
        use tracing::Instrument as _;
        let mut wait = $crate::pipeline::DB_RETRY_INITIAL;
        loop {
            let span = if $crate::telemetry::child_spans() {
                tracing::info_span!("db", otel.name = $what, otel.kind = "client",
                    db.system.name = "postgresql")
            } else {
                tracing::Span::none()
            };
            match $crate::store::bounded(&$ctx.pool, $step).instrument(span).await {
                Ok(value) => break Ok(value),
                Err(error) if error.is_refusal() => {
                    tracing::error!(%error, "cannot {}: the database refuses the data", $what);
                    break Err($crate::pipeline::Halt::Refused(error.to_string()));
                }
                Err(error) => {
                    // One line when the trouble starts, then a summary per interval (see
                    // `repeats`): an outage under load would otherwise log every command's
                    // every try.
                    let key = format!("database: {}", $what);
                    $crate::repeats::occurred(
                        || $crate::pipeline::database_problem(&key, $what),
                        &key,
                        || tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64,
                            "cannot {}; will try again", $what),
                    );
                    if let Err(abandoned) = $crate::pipeline::wait_or_abandon($ctx, wait).await {
                        break Err(abandoned);
                    }
                    wait = (wait * 2).min($crate::pipeline::DB_RETRY_MAX);
                }
            }
        }
    }};
}

pub mod fate;
mod record;

pub use fate::{Disposition, Fate, after_panic, settle};

use crate::broker::messages::Original;
use crate::command::Envelope;
use crate::context::Context;
use crate::errors::{ErrorKind, Failure};
use crate::provider::client::CallResult;
use crate::store::claims::{self, Claim};
use crate::store::commands::{self, CommandRecord};
use std::time::Duration;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// First wait before trying the database again after an error; doubled up to the cap.
pub const DB_RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Longest wait between two tries at the database.
pub const DB_RETRY_MAX: Duration = Duration::from_secs(5);

/// Why a command's processing stopped short of a fate of its own.
#[derive(Debug)]
pub enum Halt {
    /// The shutdown grace period ended, or the delivery's connection was lost and its bound
    /// passed: the command goes back to the queue.
    Abandoned,
    /// The database, while reachable, refused the command's data: trying again cannot help.
    Refused(String),
}

/// The repeated problem of a database step that keeps failing (see [`crate::repeats`]).
pub fn database_problem(key: &str, what: &str) -> crate::repeats::Problem {
    crate::repeats::Problem {
        key: key.to_owned(),
        what: format!("cannot {what}: the database is unreachable or failing"),
        fix: "check PostgreSQL (database.url); the commands wait, holding their places, and go \
              on by themselves when it answers again"
            .into(),
        ends_when_quiet: true,
    }
}

tokio::task_local! {
    /// The delivery's own abandon signal (set by the consumer for each delivery): the shutdown
    /// grace period's end, or its connection's loss plus a bound. Read through [`abandon`].
    pub static ABANDON: tokio_util::sync::CancellationToken;
}

/// When this delivery's work must stop: its own signal, or the worker's where none is set.
pub fn abandon(context: &Context) -> tokio_util::sync::CancellationToken {
    ABANDON
        .try_with(Clone::clone)
        .unwrap_or_else(|_| context.abandon.clone())
}

/// Waits, unless the delivery is abandoned first.
pub async fn wait_or_abandon(context: &Context, wait: Duration) -> Result<(), Halt> {
    let abandon = abandon(context);
    tokio::select! {
        _ = tokio::time::sleep(wait) => Ok(()),
        _ = abandon.cancelled() => Err(Halt::Abandoned),
    }
}

/// The consumer span of one delivery, continuing the trace its headers carry; [`process`]
/// records the fields it learns from the command.
pub fn span(context: &Context, original: &Original<'_>) -> tracing::Span {
    let queue = &context.settings.broker.command_queue;
    let message_id = original.properties.message_id().as_ref();
    let message_id = message_id.map(|m| m.as_str()).unwrap_or("");
    let correlation_id = original.properties.correlation_id().as_ref();
    let span = tracing::info_span!(
        crate::telemetry::short::COMMAND_SPAN,
        otel.name = format!("process {queue}"),
        otel.kind = "consumer",
        command_id = message_id,
        // Known before the body is read, so even a validation failure's lines carry it.
        correlation_id = correlation_id.map(|c| c.as_str()).unwrap_or(message_id),
        replay_count = tracing::field::Empty,
        delay_round = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let _ = span.set_parent(crate::telemetry::extract(
        original.properties.headers().as_ref(),
    ));
    // The messaging conventions go to the trace only: a log line carries the ids people search
    // by, not every attribute of the span.
    for (key, value) in [
        ("messaging.system", "rabbitmq".to_owned()),
        ("messaging.operation.type", "process".to_owned()),
        ("messaging.operation.name", "process".to_owned()),
        ("messaging.destination.name", queue.clone()),
        (
            "messaging.rabbitmq.destination.routing_key",
            original.routing_key.to_owned(),
        ),
        ("messaging.message.id", message_id.to_owned()),
    ] {
        span.set_attribute(key, value);
    }
    span.set_attribute("messaging.message.body.size", original.body.len() as i64);
    span
}

/// Decides a delivery's fate: dead-letter it, publish its recorded event again, or call the
/// provider and record the outcome. Whatever must be durable before the message is acked (the
/// claim, the outcome) is durable when this returns.
pub async fn process(context: &Context, original: &Original<'_>) -> Fate {
    // The span's fields are recorded in one call: the JSON log layer parses and re-serialises all
    // of a span's fields on every `record`, so four calls did that work four times per command.
    let span = tracing::Span::current();
    let trace_id = crate::telemetry::trace_id(&span);
    let envelope = match parse(context, original) {
        Ok(envelope) => envelope,
        Err(failure) => {
            span.record("trace_id", trace_id.as_str());
            return Fate::DeadLetter(failure);
        }
    };
    span.set_attribute(
        "messaging.message.conversation_id",
        envelope.correlation_id.clone(),
    );
    tracing::record_all!(
        span,
        correlation_id = envelope.correlation_id.as_str(),
        replay_count = envelope.replay_count,
        delay_round = envelope.delay_round,
        trace_id = trace_id.as_str()
    );
    decide(context, original, &envelope)
        .await
        .unwrap_or_else(Fate::from)
}

/// Step 2: the delivery as a valid command, or the validation failure that dead-letters it. The
/// intake budget on its headers comes first: past it nothing else reads them.
fn parse(context: &Context, original: &Original<'_>) -> Result<Envelope, Failure> {
    crate::intake::Budget::new(&context.settings.broker)
        .check(original.properties)
        .map_err(|why| Failure::before_any_call(ErrorKind::Validation, why))?;
    let max_bytes = context.settings.broker.max_message_bytes;
    Envelope::parse(original.properties, original.body, max_bytes).map_err(|invalid| {
        let message = crate::headers::excerpt(&invalid.0, crate::headers::TEXT_LIMIT);
        Failure::before_any_call(ErrorKind::Validation, message)
    })
}

/// Claim, call, record; again from the claim when the lease was lost on the way.
async fn decide(
    context: &Context,
    original: &Original<'_>,
    envelope: &Envelope,
) -> Result<Fate, Halt> {
    if let Some(fate) = park_unclaimed(context, original, envelope) {
        return Ok(fate);
    }
    loop {
        let (earlier_attempts, token) = match claim(context, envelope).await? {
            Claim::Acquired { attempts, token } => (attempts, token),
            Claim::Finished(record) => return recorded_fate(context, &record).await,
            Claim::Busy => {
                tracing::debug!("another worker holds this command; waiting for its outcome");
                let poll = Duration::from_millis(context.settings.worker.busy_poll_ms);
                wait_or_abandon(context, poll).await?;
                continue;
            }
            Claim::Conflict => return Ok(Fate::DeadLetter(conflict(envelope))),
        };
        let call = call(context, envelope, &token).await?;
        let held = record::Held {
            token,
            earlier_attempts,
        };
        match record::record(context, original, envelope, held, call).await? {
            Some(fate) => return Ok(fate),
            None => tracing::warn!(
                "this worker's lease ran out and another worker took the command over"
            ),
        }
    }
}

/// A command whose provider's circuit is open goes to its next delay queue before any database
/// work: claiming it and giving the claim back would cost about what a created link costs, and
/// during an outage those costs would be taken from the commands of the providers that are up.
/// Not on the last round (it waits for the provider instead, as a claimed command does). The
/// command has no row of its own until it is claimed; if it was already finished, its recorded
/// event is published again when it comes back.
fn park_unclaimed(context: &Context, original: &Original<'_>, envelope: &Envelope) -> Option<Fate> {
    let provider_id = envelope.command.payment_provider_id;
    if !context.provider.circuit_open(provider_id) {
        return None;
    }
    let attempts = envelope.attempts;
    let last_error = format!(
        "the circuit for paymentProviderId {provider_id} is open: that provider looks down"
    );
    Fate::delay(context, original, envelope, (attempts, None), 0, last_error)
}

/// Step 3: the idempotency decision.
async fn claim(context: &Context, envelope: &Envelope) -> Result<Claim, Halt> {
    let claim = db!(
        context,
        "claim the command",
        claims::claim(&context.pool, &context.claims, envelope)
    )?;
    if let Claim::Acquired { attempts, .. } = &claim {
        tracing::debug!(earlier_attempts = attempts, "command claimed");
    }
    Ok(claim)
}

fn conflict(envelope: &Envelope) -> Failure {
    Failure::before_any_call(
        ErrorKind::IdempotencyConflict,
        format!(
            "command id {} was already used for a different request; \
             the earlier request's link is not reused",
            envelope.command_id
        ),
    )
}

/// Step 4: the provider call with its retries, the claim's lease renewed all the while (a slow
/// provider or an open circuit never lets another worker take the command over); at the end of
/// the grace period the lease is given back and the command returned to the queue.
async fn call(context: &Context, envelope: &Envelope, token: &str) -> Result<CallResult, Halt> {
    let command_id = envelope.command_id.as_str();
    let provider = &context.provider;
    let abandon = abandon(context);
    tokio::select! {
        call = provider.create_link(
            envelope.command.payment_provider_id,
            command_id,
            &envelope.request_json,
            &envelope.trace,
            envelope.delay_round < context.settings.retry.delay_tiers_ms.len(),
            &context.metrics,
        ) => Ok(call),
        never = keep_lease(context, command_id, token) => match never {},
        _ = abandon.cancelled() => {
            let owner = &context.instance_id;
            let release = crate::store::with_conn(&context.pool, async |conn| commands::release(conn, command_id, owner, Some(token), 0, None).await);
            let _ = crate::store::bounded(&context.pool, release).await;
            Err(Halt::Abandoned)
        }
    }
}

/// Renews the claim's lease every third of its length, for as long as it is polled.
async fn keep_lease(context: &Context, command_id: &str, token: &str) -> std::convert::Infallible {
    let lease = context.settings.lease();
    let mut every = tokio::time::interval(lease / 3);
    every.tick().await;
    loop {
        every.tick().await;
        let renew = crate::store::with_conn(&context.pool, async |conn| {
            commands::renew(conn, command_id, token, lease).await
        });
        match crate::store::bounded(&context.pool, renew).await {
            Ok(true) => tracing::debug!("lease renewed"),
            Ok(false) => tracing::warn!("the lease was lost while the provider call ran"),
            Err(error) => tracing::warn!(%error, "cannot renew the lease; will try again"),
        }
    }
}

/// A command that already has an outcome came again: its recorded event is published again
/// (same event id) and the provider is not called.
async fn recorded_fate(context: &Context, record: &CommandRecord) -> Result<Fate, Halt> {
    context.metrics.duplicate();
    tracing::info!(status = %record.status, "duplicate command; publishing its recorded event again");
    let command_id = record.command_id.as_str();
    let event = db!(context, "read the recorded event", |conn| {
        commands::recorded_event(&mut conn, command_id)
    })?;
    Ok(match event {
        Some(Ok(event)) => Fate::Publish {
            command_id: command_id.to_owned(),
            event,
        },
        Some(Err(error)) => {
            tracing::error!(%error, "recorded event is unreadable");
            Fate::Done
        }
        None => {
            tracing::debug!("this outcome has no event to publish");
            Fate::Done
        }
    })
}
