//! What becomes of a delivery, decided in one place: [`process`](super::process) returns a
//! [`Fate`], [`settle`] carries it out with the broker (each broker refusal handled here) and
//! tells the consumer whether to ack the delivery or give it back.

use super::{Context, Halt, wait_or_abandon};
use crate::broker::messages::{self, Original, OutboundMessage};
use crate::broker::topology;
use crate::command::Envelope;
use crate::errors::{ErrorKind, Failure};
use crate::headers;
use crate::relay;
use crate::store::{commands, outbox};
use std::time::Duration;

/// Wait before returning a message that could not be dead-lettered or delayed.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);

/// What becomes of a delivery.
#[derive(Debug)]
pub enum Fate {
    /// Nothing is left to publish (an outcome with no event): ack.
    Done,
    /// Publish this event (just recorded, or recorded earlier for a duplicate); if the broker does
    /// not take it now, hand it to the outbox relay. Then ack.
    Publish {
        /// The command it reports.
        command_id: String,
        /// The event.
        event: OutboundMessage,
    },
    /// Publish these just-recorded outbox rows (id, message); the relay takes whatever the
    /// broker does not confirm now. Then ack.
    PublishRecorded(Vec<(i64, OutboundMessage)>),
    /// Dead-letter the command now; it has no record to hang the dead letter on (invalid, or in
    /// conflict with another request's record). Ack once the broker confirmed the dead letter.
    DeadLetter(Failure),
    /// Park the command in a delay queue, then ack.
    Delay(Delay),
    /// Give the message back to the queue (the shutdown grace period ended).
    Requeue,
}

/// A command that waits in a delay queue before its next round of provider calls.
#[derive(Debug)]
pub struct Delay {
    /// The command.
    pub command_id: String,
    /// Its provider: parking is summarised per provider.
    pub provider_id: i64,
    /// The token of the claim that gives the command back; `None` when the command was parked
    /// before it was claimed (its provider's circuit was open), so there is nothing to give back.
    pub lease_token: Option<String>,
    /// The command again, addressed to its delay queue.
    pub message: OutboundMessage,
    /// The round it enters.
    pub round: usize,
    /// How long it waits.
    pub delay_ms: u64,
    /// Every provider call made so far.
    pub attempts: i32,
    /// The provider calls of the round that just ended (added to the row).
    pub round_attempts: i32,
    /// The last provider error.
    pub last_error: String,
}

/// What the consumer does with the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Its outcome is durable (or it was dead-lettered with a confirm): remove it from the queue.
    Ack,
    /// It could not be finished now (shutdown, broker trouble): give it back to the queue.
    Requeue,
    /// Processing it panicked, or the database refused what settling it needed: give it back
    /// with `basic.reject`, which the queue's delivery limit counts on every RabbitMQ version
    /// (4.x does not count a requeueing `basic.nack`), so a message that fails every time ends
    /// dead-lettered instead of looping.
    Reject,
}

impl Fate {
    /// The command, to wait in the delay queue of the round it is in, then come back for the next
    /// round: the one way a [`Fate::Delay`] is made, whether its round's retry budget is spent
    /// (`lease_token`: the claim it gives back) or its provider's circuit was open before it was
    /// claimed (no claim). `None` when no delay tier is left for the round.
    pub(super) fn delay(
        context: &Context,
        original: &Original<'_>,
        envelope: &Envelope,
        (attempts, lease_token): (i32, Option<String>),
        round_attempts: i32,
        last_error: String,
    ) -> Option<Fate> {
        let round = envelope.delay_round;
        let delay_ms = *context.settings.retry.delay_tiers_ms.get(round)?;
        let queue = topology::delay_queue(&context.settings.broker, delay_ms);
        Some(Fate::Delay(Delay {
            command_id: envelope.command_id.as_str().to_owned(),
            provider_id: envelope.command.payment_provider_id,
            lease_token,
            message: messages::delayed(
                &topology::delay_exchange(&context.settings.broker),
                &queue,
                original,
                round + 1,
                attempts,
                &last_error,
                &context.copies,
            ),
            round: round + 1,
            delay_ms,
            attempts,
            round_attempts,
            last_error,
        }))
    }
}

impl From<Halt> for Fate {
    /// Work abandoned at the end of the shutdown grace period goes back to the queue; data the
    /// database refuses to hold is dead-lettered as unstorable (waiting cannot change that).
    fn from(halt: Halt) -> Self {
        match halt {
            Halt::Abandoned => Fate::Requeue,
            Halt::Refused(message) => Fate::DeadLetter(Failure::before_any_call(
                ErrorKind::Unstorable,
                crate::headers::excerpt(&message, crate::headers::TEXT_LIMIT),
            )),
        }
    }
}

/// A delivery whose processing panicked: counted, logged with its command id, its lease released
/// (the panic may have left the command claimed), and rejected so the queue's delivery limit
/// applies; on its last delivery before that limit it is dead-lettered as `internal-error`
/// instead, so the dead letter says why.
pub async fn after_panic(
    context: &Context,
    original: &Original<'_>,
    delivery_tag: u64,
) -> Disposition {
    let command_id = original.properties.message_id().as_ref();
    let command_id = command_id.map(|id| id.as_str()).unwrap_or("");
    context.metrics.panicked();
    tracing::error!(
        command_id,
        delivery_tag,
        "processing panicked; the message goes back to the queue (its delivery limit applies)"
    );
    let release = crate::store::with_conn(&context.pool, async |conn| {
        commands::release(conn, command_id, &context.instance_id, None, 0, None).await
    });
    let _ = crate::store::bounded(&context.pool, release).await;
    let returns = headers::read_int(original.properties, headers::DELIVERY_COUNT).unwrap_or(0);
    if !last_delivery(returns, context.settings.broker.delivery_limit) {
        return Disposition::Reject;
    }
    let failure = Failure::before_any_call(
        ErrorKind::InternalError,
        format!("processing panicked on each of {} deliveries", returns + 1),
    );
    match settle(context, original, Fate::DeadLetter(failure)).await {
        Disposition::Ack => Disposition::Ack,
        // Not dead-lettered now: rejected, so the limit still ends it.
        Disposition::Requeue | Disposition::Reject => Disposition::Reject,
    }
}

/// Whether a delivery that has been returned `returns` times is the last the queue's delivery
/// limit allows (counted one early, so the worker's dead letter comes before the broker's).
fn last_delivery(returns: i64, delivery_limit: u32) -> bool {
    returns + 1 >= i64::from(delivery_limit)
}

impl From<Halt> for Disposition {
    /// Abandoned work goes back to the queue; work the database refused to record is rejected,
    /// so the queue's delivery limit ends it rather than a loop.
    fn from(halt: Halt) -> Self {
        match halt {
            Halt::Abandoned => Disposition::Requeue,
            Halt::Refused(_) => Disposition::Reject,
        }
    }
}

/// Carries out a fate with the broker; returns once the delivery may be acked, or must be
/// given back.
pub async fn settle(context: &Context, original: &Original<'_>, fate: Fate) -> Disposition {
    match fate {
        Fate::Done => Disposition::Ack,
        Fate::Requeue => Disposition::Requeue,
        Fate::Publish { command_id, event } => publish_or_hand_over(context, &command_id, &event)
            .await
            .map_or_else(Disposition::from, |()| Disposition::Ack),
        Fate::PublishRecorded(rows) => {
            let (pool, publisher, sent) = (&context.pool, &context.publisher, &context.sent);
            let settings = &context.settings.outbox;
            if let Err(error) =
                relay::publish_recorded(pool, publisher, sent, &rows, settings).await
            {
                tracing::warn!(%error, "could not publish at once; the outbox relay will");
            }
            Disposition::Ack
        }
        Fate::DeadLetter(failure) => dead_letter(context, original, &failure).await,
        Fate::Delay(delay) => park(context, &delay)
            .await
            .unwrap_or_else(Disposition::from),
    }
}

/// Publishes a recorded event and, if the broker does not take it now (a nack, no queue bound,
/// a lost channel), hands it to the outbox relay, so the delivery can be acked either way.
async fn publish_or_hand_over(
    context: &Context,
    command_id: &str,
    event: &OutboundMessage,
) -> Result<(), Halt> {
    let error = match context.publisher.publish(event).await {
        Ok(()) => return Ok(()),
        Err(error) => {
            error.report(|| {
                tracing::warn!(message_id = event.message_id(), %error,
                    "publish failed; the outbox relay will retry");
            });
            error.to_string()
        }
    };
    let max_wait = Duration::from_millis(context.settings.outbox.max_retry_interval_ms);
    db!(context, "hand the event to the relay", |conn| {
        outbox::hand_to_relay(
            &mut conn,
            command_id,
            outbox::EVENT,
            event,
            &error,
            max_wait,
        )
    })
}

/// Publishes the dead letter of a command that has no record, and acks only once the broker
/// confirmed it; otherwise the command goes back to the queue after a pause. A command over
/// `broker.max_message_bytes` is kept as its first [`OVERSIZED_PREFIX`] bytes, its length in
/// `x-original-body-bytes`: the store and the console never hold what the worker refused whole.
async fn dead_letter(context: &Context, original: &Original<'_>, failure: &Failure) -> Disposition {
    let oversized = original.body.len() > context.settings.broker.max_message_bytes;
    let kept = Original {
        body: &original.body[..original.body.len().min(if oversized {
            OVERSIZED_PREFIX
        } else {
            usize::MAX
        })],
        ..*original
    };
    let mut message = messages::dead_letter(
        &context.settings.broker.dead_letter_exchange,
        &kept,
        failure,
        chrono::Utc::now(),
        &context.copies,
    );
    if oversized {
        let mut headers = message.properties.headers().clone().unwrap_or_default();
        headers.insert(
            crate::headers::ORIGINAL_BODY_BYTES.into(),
            lapin::types::AMQPValue::LongLongInt(original.body.len() as i64),
        );
        message.properties = message.properties.with_headers(headers);
    }
    match context.publisher.publish(&message).await {
        Ok(()) => {
            context.metrics.dead_lettered(failure.kind.as_str(), None);
            if crate::headers::read_int(original.properties, crate::headers::REPLAY_COUNT)
                .is_some_and(|n| n > 0)
            {
                context.metrics.replay_settled(Some(failure.kind.as_str()));
            }
            tracing::warn!(error_kind = %failure.kind, error = failure.message, "command dead-lettered");
            Disposition::Ack
        }
        Err(error) => {
            tracing::error!(%error, error_kind = %failure.kind, "could not dead-letter the command; returning it to the queue");
            let _ = wait_or_abandon(context, REQUEUE_DELAY).await;
            Disposition::Requeue
        }
    }
}

/// Commands of one provider parked after their retries failed, as a repeated problem.
fn parking_problem(key: &str, provider_id: i64) -> crate::repeats::Problem {
    crate::repeats::Problem {
        key: key.to_owned(),
        what: format!(
            "commands for provider {provider_id} exhausted their retries and wait in delay queues"
        ),
        fix: "they come back by themselves through the delay tiers (retry.delay_tiers_ms); \
              check the provider if it lasts"
            .into(),
        ends_when_quiet: true,
    }
}

/// How much of an oversized command's body its dead letter keeps.
pub const OVERSIZED_PREFIX: usize = 16 * 1024;

/// Publishes the command to its delay queue (confirmed), records the round's attempts and gives
/// up the lease (if it was claimed); acks if the broker took the copy, otherwise returns the
/// command to the queue.
async fn park(context: &Context, delay: &Delay) -> Result<Disposition, Halt> {
    let published = context.publisher.publish(&delay.message).await;
    if let Some(token) = &delay.lease_token {
        db!(context, "record the attempts", |conn| commands::release(
            &mut conn,
            &delay.command_id,
            &context.instance_id,
            Some(token),
            delay.round_attempts,
            Some(&delay.last_error)
        ))?;
    }
    match published {
        Ok(()) => {
            context.metrics.delayed();
            let (round, delay_ms, attempts) = (delay.round, delay.delay_ms, delay.attempts);
            let error = &delay.last_error;
            let message = "provider still failing; command waits in a delay queue";
            // A round that made no call was parked by an open circuit, which the breaker has
            // already reported once. A round that made calls is a warning once per provider
            // while its trouble lasts, then a summary per interval: a warning per command
            // would flood the log during an outage. Each command still gets its info line.
            let mut first = false;
            if delay.round_attempts > 0 {
                let key = format!("parked {}", delay.provider_id);
                crate::repeats::occurred(
                    || parking_problem(&key, delay.provider_id),
                    &key,
                    || {
                        first = true;
                    },
                );
            }
            if first {
                tracing::warn!(round, delay_ms, attempts, error, "{message}");
            } else {
                tracing::info!(round, delay_ms, attempts, error, "{message}");
            }
            Ok(Disposition::Ack)
        }
        Err(error) => {
            tracing::error!(%error, "could not park the command in its delay queue; returning it to the queue");
            let _ = wait_or_abandon(context, REQUEUE_DELAY).await;
            Ok(Disposition::Requeue)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_message_is_dead_lettered_on_its_last_delivery_only() {
        assert!(!last_delivery(0, 10));
        assert!(!last_delivery(8, 10));
        assert!(last_delivery(9, 10));
        assert!(last_delivery(40, 10));
        assert!(last_delivery(0, 1));
    }
}
