//! One command sent, and what became of it: its event or its dead letter, heard on a queue of
//! this process's own bound before the command is sent, so nothing is missed.

use super::{SendArgs, body_from_flags, command_message, unroutable};
use crate::broker::publisher::{PublishError, confirm_channel, publish_confirmed};
use crate::broker::{self};
use crate::config::Settings;
use crate::headers;
use crate::text::visible;
use anyhow::Context as _;
use futures_util::StreamExt as _;
use lapin::{Connection, Consumer};
use std::time::Duration;

/// What became of a sent command, as `send --wait` saw it.
#[derive(Debug)]
pub enum Heard {
    /// Its `payment-link.created` event: the body is the provider's answer.
    Created(Vec<u8>),
    /// Its `payment-link.failed` event.
    Failed(Vec<u8>),
    /// Its dead letter: the kind and message from its `x-error-*` headers.
    DeadLettered {
        /// `x-error-kind`.
        kind: String,
        /// `x-error-message`.
        message: String,
        /// Where it is now: in the dead-letter store (its id), or why that is not known.
        stored: Stored,
    },
    /// Neither within this long (no worker running, or one far behind).
    NothingWithin(Duration),
}

impl Heard {
    /// Prints the event as it came (re-formatting JSON through floats would change amounts);
    /// anything but a created link is an error that says what happened and where to look.
    pub(super) fn report(self, id: &str) -> anyhow::Result<()> {
        match self {
            Heard::Created(body) => {
                println!("{}", String::from_utf8_lossy(&body));
                Ok(())
            }
            Heard::Failed(body) => {
                println!("{}", String::from_utf8_lossy(&body));
                anyhow::bail!("command {id} failed (payment-link.failed event above)")
            }
            Heard::DeadLettered {
                kind,
                message,
                stored,
            } => {
                let (kind, message) = (visible(&kind), visible(&message));
                let whereabouts = match stored {
                    Stored::As(letter) => format!(
                        "dead letter {letter} in the store (`payment-link-worker dead-letters \
                         show {letter}`)"
                    ),
                    Stored::OnItsWay => "on its way to the dead-letter store \
                        (`payment-link-worker dead-letters list --command-id ID` shows it once \
                        stored)"
                        .into(),
                    Stored::NotIngested => {
                        "in the dead-letter queue (dead_letters.ingest is off)".into()
                    }
                };
                anyhow::bail!(
                    "command {id} was dead-lettered as {kind}: {message}\n  it is {whereabouts}"
                )
            }
            // The id is on stdout already, as on success: a script can follow it up.
            Heard::NothingWithin(limit) => anyhow::bail!(
                "command {id} was sent, but neither its event nor a dead letter came within {} \
                 s; is a worker running (payment-link-worker run)?",
                limit.as_secs()
            ),
        }
    }
}

/// Publishes one command to the command exchange and waits for the broker's confirm; returns
/// its command id, and, when `wait` is given, what became of it within that time (its event or
/// its dead letter), read from a queue of this process's own that is bound before the command
/// is sent, so nothing is missed.
pub(super) async fn send(
    settings: &Settings,
    args: &SendArgs,
    wait: Option<Duration>,
) -> anyhow::Result<(String, Option<Heard>)> {
    let body = body_from_flags(args)?;
    let id = args
        .command_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let message = command_message(settings, &id, args.correlation_id.as_deref(), body);
    let connection = broker::connect(&settings.broker, "payment-link-worker send").await?;
    let outcome = async {
        let listener = match wait {
            Some(_) => Some(listen(&connection, settings).await?),
            None => None,
        };
        let channel = confirm_channel(&connection).await?;
        match publish_confirmed(&channel, &message).await {
            Ok(()) => {}
            Err(PublishError::Unroutable { .. }) => return Err(unroutable(settings)),
            Err(error) => return Err(error).context("the broker did not accept the command"),
        }
        let (Some(limit), Some(listener)) = (wait, listener) else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        match tokio::time::timeout(limit, hear(listener, &id)).await {
            Ok(Ok(Heard::DeadLettered { kind, message, .. })) => {
                // At least a few seconds for the store, even when --timeout is nearly spent.
                let left = limit.saturating_sub(started.elapsed()).max(STORE_WAIT);
                let stored = stored_dead_letter(settings, &id, left).await;
                Ok(Some(Heard::DeadLettered {
                    kind,
                    message,
                    stored,
                }))
            }
            Ok(heard) => heard.map(Some),
            Err(_) => Ok(Some(Heard::NothingWithin(limit))),
        }
    }
    .await;
    let _ = connection.close(200, "sent".into()).await;
    Ok((id, outcome?))
}

/// How long `send --wait` waits at least for a dead letter it heard of to reach the store.
const STORE_WAIT: Duration = Duration::from_secs(5);

/// A queue of this process's own, bound to both event routing keys and to every dead letter.
async fn listen(connection: &Connection, settings: &Settings) -> anyhow::Result<Consumer> {
    let broker = &settings.broker;
    let bindings = [
        (&broker.event_exchange, broker.created_routing_key.as_str()),
        (&broker.event_exchange, broker.failed_routing_key.as_str()),
        (&broker.dead_letter_exchange, "#"),
    ];
    crate::ops::own_queue(connection, &bindings, "payment-link-worker send").await
}

/// Where a dead letter `send --wait` heard of is, so what it says agrees with `dead-letters
/// list` run straight after.
#[derive(Debug)]
pub enum Stored {
    /// In the dead-letter store, with this id.
    As(i64),
    /// Not there within the wait (the ingester stores it within a second or so while a worker
    /// runs), or the store could not be read.
    OnItsWay,
    /// `dead_letters.ingest` is off: it stays in the dead-letter queue.
    NotIngested,
}

/// Waits (bounded by `within`) for the dead letter of command `id` to reach the store.
pub async fn stored_dead_letter(settings: &Settings, id: &str, within: Duration) -> Stored {
    use crate::dead_letters::store::{Filter, page};
    if !settings.dead_letters.ingest {
        return Stored::NotIngested;
    }
    let since = chrono::Utc::now() - chrono::Duration::minutes(10);
    let filter = Filter {
        command_id: Some(id.to_owned()),
        since: Some(since),
        ..Filter::default()
    };
    let look = async {
        let pool = crate::store::pool(&settings.database).ok()?;
        let mut conn = pool.get().await.ok()?;
        loop {
            if let Ok((found, _)) = page(&mut conn, &filter, 1, None).await
                && let Some(letter) = found.first()
            {
                return Some(letter.id);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    match tokio::time::timeout(within, look).await {
        Ok(Some(stored)) => Stored::As(stored),
        _ => Stored::OnItsWay,
    }
}

/// The first event or dead letter about command `id`.
async fn hear(mut listener: Consumer, id: &str) -> anyhow::Result<Heard> {
    while let Some(delivery) = listener.next().await {
        let delivery = delivery?;
        let properties = &delivery.properties;
        if let Some(kind) = headers::read_text(properties, headers::ERROR_KIND) {
            let about = properties.message_id().as_ref().map(|m| m.as_str());
            if about == Some(id) {
                let message = headers::read_text(properties, headers::ERROR_MESSAGE);
                return Ok(Heard::DeadLettered {
                    kind,
                    message: message.unwrap_or_default(),
                    stored: Stored::OnItsWay,
                });
            }
            continue;
        }
        if headers::read_text(properties, headers::EVENT_SUBJECT).as_deref() != Some(id) {
            continue;
        }
        let kind = properties.kind().as_ref().map(|k| k.as_str().to_owned());
        return Ok(if kind.as_deref() == Some("payment-link.failed") {
            Heard::Failed(delivery.data)
        } else {
            Heard::Created(delivery.data)
        });
    }
    anyhow::bail!("the broker closed the connection while waiting for the outcome")
}
