//! Step 4's end: the provider's answer becomes the command's recorded outcome (a link with its
//! created event, a failure with its failed event and dead letter) or a wait in a delay queue.

use super::fate::Fate;
use super::{Context, Halt};
use crate::broker::messages::{self, Original};
use crate::command::Envelope;
use crate::errors::{ErrorKind, Failure};
use crate::provider::answer::{LinkCreated, ProviderError};
use crate::provider::client::CallResult;
use crate::store::outbox::{self, NewOutboxMessage};
use crate::store::outcomes::{KeptEvent, Outcome, OutcomeRequest, Success};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// The claim a call was made under.
pub(super) struct Held {
    /// The claim's token.
    pub token: String,
    /// Provider calls made for the command before this claim.
    pub earlier_attempts: i32,
}

/// The fate the call's result leads to, once what must be durable is; `None` when this claim
/// no longer holds the command (another worker took it over).
pub(super) async fn record(
    context: &Context,
    original: &Original<'_>,
    envelope: &Envelope,
    held: Held,
    call: CallResult,
) -> Result<Option<Fate>, Halt> {
    let attempts = held.earlier_attempts + call.attempts;
    let token = held.token;
    match call.outcome {
        Ok(link) => record_link(context, envelope, (attempts, token), link).await,
        Err((ErrorKind::RetriesExhausted, error))
            if envelope.delay_round < context.settings.retry.delay_tiers_ms.len() =>
        {
            let last_error = error.message;
            let next = (attempts, Some(token));
            Ok(Fate::delay(
                context,
                original,
                envelope,
                next,
                call.attempts,
                last_error,
            ))
        }
        Err((kind, error)) => {
            record_failure(context, original, envelope, (attempts, token), kind, error).await
        }
    }
}

/// The trace context an event carries: the current span's, or the command's own.
fn outgoing_trace(envelope: &Envelope) -> Vec<(String, String)> {
    crate::telemetry::outgoing(&envelope.trace)
}

fn since(first_seen: DateTime<Utc>) -> Duration {
    (Utc::now() - first_seen).to_std().unwrap_or_default()
}

/// The link and its created event, kept on the command's row (not in the outbox): the delivery
/// is acked only once the broker confirmed the event, so after a crash the broker's redelivery
/// finds the outcome and publishes the kept event again.
async fn record_link(
    context: &Context,
    envelope: &Envelope,
    (attempts, lease_token): (i32, String),
    link: LinkCreated,
) -> Result<Option<Fate>, Halt> {
    let trace = outgoing_trace(envelope);
    let event = messages::created_event(&context.events, envelope, &link.body, Utc::now(), &trace);
    let request = OutcomeRequest {
        command_id: envelope.command_id.as_str().to_owned(),
        lease_token,
        outcome: Outcome::Succeeded(Success {
            attempts,
            link_id: link.link_id,
            payment_link: link.payment_link,
            response_body: link.body,
            event: KeptEvent::new(&event),
        }),
        messages: Vec::new(),
    };
    let recorded = db!(
        context,
        "record the link",
        context.outcomes.submit(request.clone())
    )?;
    let Some((_, first_seen)) = recorded else {
        return Ok(None);
    };
    context.metrics.succeeded(since(first_seen));
    if envelope.replay_count > 0 {
        context.metrics.replay_settled(None);
    }
    // One line per command is noise at hundreds a second: the progress line sums them up.
    tracing::debug!(
        attempts,
        http_status = link.http_status,
        link_id = link.link_id,
        "payment link created"
    );
    Ok(Some(Fate::Publish {
        command_id: request.command_id,
        event,
    }))
}

/// The failure with its failed event (when the invoicing system hears of this kind) and its
/// dead letter, written to the outbox in the outcome's transaction.
async fn record_failure(
    context: &Context,
    original: &Original<'_>,
    envelope: &Envelope,
    (attempts, lease_token): (i32, String),
    kind: ErrorKind,
    error: ProviderError,
) -> Result<Option<Fate>, Halt> {
    let command_id = envelope.command_id.as_str();
    let now = Utc::now();
    let failure = Failure {
        kind,
        message: error.message,
        http_status: error.http_status,
        error_body: error.body,
        attempts,
    };
    let trace = outgoing_trace(envelope);
    let mut outgoing = Vec::with_capacity(2);
    if kind.publishes_failed_event() {
        let event = messages::failed_event(&context.events, envelope, &failure, now, &trace);
        outgoing.push((outbox::EVENT, event));
    }
    let dead_letter = messages::dead_letter(
        &context.settings.broker.dead_letter_exchange,
        original,
        &failure,
        now,
        &context.copies,
    );
    outgoing.push((outbox::DEAD_LETTER, dead_letter));
    let grace = Duration::from_millis(context.settings.outbox.inline_grace_ms);
    let messages = outgoing
        .iter()
        .map(|(row_kind, message)| NewOutboxMessage::new(command_id, row_kind, message, grace))
        .collect::<Result<_, _>>()
        .map_err(|refused| Halt::Refused(refused.to_string()))?;
    let request = OutcomeRequest {
        command_id: command_id.to_owned(),
        lease_token,
        messages,
        outcome: Outcome::Failed(failure),
    };
    let recorded = db!(
        context,
        "record the failure",
        context.outcomes.submit(request.clone())
    )?;
    let Some((ids, first_seen)) = recorded else {
        return Ok(None);
    };
    context
        .metrics
        .dead_lettered(kind.as_str(), Some(since(first_seen)));
    if envelope.replay_count > 0 {
        context.metrics.replay_settled(Some(kind.as_str()));
    }
    if let Outcome::Failed(failure) = &request.outcome {
        tracing::warn!(error_kind = %kind, attempts, http_status = failure.http_status,
            error = %failure.message, "command dead-lettered");
    }
    let rows = ids.into_iter().zip(outgoing.into_iter().map(|(_, m)| m));
    Ok(Some(Fate::PublishRecorded(rows.collect())))
}
