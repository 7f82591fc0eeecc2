//! The broker side of a replay: the copy of each stored dead letter (only to a target replay may
//! publish to), and each batch's copies published on one confirm channel, which is reopened when
//! the broker closes it over a copy it refuses, so that copy fails alone.

use super::replay_rows::ReplayOutcome;
use super::store::Stored;
use super::targets::ReplayTargets;
use crate::broker::messages::{self, OutboundMessage, properties_from_json};
use crate::broker::publisher::{PublishError, confirm_channel, publish_confirmed};
use crate::headers::{self, read_int};
use lapin::BasicProperties;
use lapin::types::AMQPValue;
use lapin::{Channel, Connection};
use std::time::Duration;

/// The command again, as it was first published, with the replay count increased; without
/// `reply_to` (see [`messages::routed_elsewhere_removed`]), and with only the headers a copy
/// carries ([`crate::intake::carried`]: never `CC`/`BCC`, never one nobody named).
pub fn replay_message(
    exchange: &str,
    routing_key: &str,
    properties: &BasicProperties,
    body: &[u8],
    copies: &crate::intake::Copies,
) -> OutboundMessage {
    let replay_count = read_int(properties, headers::REPLAY_COUNT).unwrap_or(0) + 1;
    // A replay starts the command's rounds afresh.
    let mut kept = lapin::types::FieldTable::default();
    let carried = crate::intake::carried(properties.headers().as_ref(), &copies.carried);
    for (name, value) in carried.inner() {
        if ![headers::ATTEMPTS, headers::DELAY_ROUND].contains(&name.as_str()) {
            kept.insert(name.clone(), value.clone());
        }
    }
    kept.insert(
        headers::REPLAY_COUNT.into(),
        AMQPValue::LongLongInt(replay_count),
    );
    let message_id = properties.message_id().as_ref();
    copies
        .marks
        .sign_counters(&mut kept, message_id.map_or("", |m| m.as_str()));
    OutboundMessage {
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        properties: messages::routed_elsewhere_removed(properties).with_headers(kept),
        body: body.to_vec(),
    }
}

/// The stored dead letter's replay: its original, to its original exchange and routing key, if
/// that is a target replay may publish to (else skipped, with the reason).
fn replay_of(
    letter: &Stored,
    targets: &ReplayTargets,
    copies: &crate::intake::Copies,
) -> Result<OutboundMessage, ReplayOutcome> {
    targets
        .check(&letter.original_exchange, &letter.original_routing_key)
        .map_err(|why| ReplayOutcome::Skipped(format!("not replayable: {why}")))?;
    let properties = properties_from_json(letter.properties.clone()).map_err(|e| {
        ReplayOutcome::Failed(format!("its stored properties do not read back: {e}"))
    })?;
    Ok(replay_message(
        &letter.original_exchange,
        &letter.original_routing_key,
        &properties,
        &letter.body,
        copies,
    ))
}

/// The replay's confirm channel, opened again when the broker has closed it, on a connection
/// opened again when that was closed: a publish the broker refuses (an exchange that does not
/// exist, a property it does not accept: the channel closes; a frame it cannot take: the whole
/// connection closes) must fail that one dead letter, not the rest of the job.
pub(super) struct ReplayChannel {
    broker: crate::config::BrokerSettings,
    name: String,
    connection: Connection,
    channel: Channel,
}

impl ReplayChannel {
    /// A connection named `name` and its confirm channel.
    pub(super) async fn open(
        broker: &crate::config::BrokerSettings,
        name: String,
    ) -> anyhow::Result<Self> {
        let connection = crate::broker::connect(broker, &name).await?;
        let channel = confirm_channel(&connection).await?;
        Ok(Self {
            broker: broker.clone(),
            name,
            connection,
            channel,
        })
    }

    /// The channel, reopened (with its connection, if that closed too) if the broker closed it.
    pub(super) async fn usable(&mut self) -> Result<Channel, String> {
        if !self.connection.status().connected() {
            self.connection = crate::broker::connect(&self.broker, &self.name)
                .await
                .map_err(|e| format!("cannot reopen the replay's connection: {e:#}"))?;
        }
        if !self.channel.status().connected() {
            self.channel = confirm_channel(&self.connection)
                .await
                .map_err(|e| format!("cannot reopen the replay's channel: {e}"))?;
        }
        Ok(self.channel.clone())
    }

    /// Closes the channel and the connection, within `timeout` (a blocked connection cannot even
    /// send its close; the broker drops it later).
    pub(super) async fn close(self, timeout: Duration) {
        let closing = async {
            let _ = self.channel.close(200, "replay done".into()).await;
            let _ = self.connection.close(200, "replay done".into()).await;
        };
        let _ = tokio::time::timeout(timeout, closing).await;
    }
}

/// Publishes one copy and waits for its confirm, within `timeout`.
pub(super) async fn publish_one(
    channel: &Channel,
    copy: &OutboundMessage,
    timeout: Duration,
) -> ReplayOutcome {
    // Bounded: a broker that blocks publishers (an alarm) fails the batch, whose dead letters
    // are open again, rather than holding the job forever.
    match tokio::time::timeout(timeout, publish_confirmed(channel, copy)).await {
        Ok(Ok(())) => ReplayOutcome::Replayed,
        Ok(Err(e)) => ReplayOutcome::Failed(e.to_string()),
        Err(_) => ReplayOutcome::Failed(PublishError::TimedOut(timeout).to_string()),
    }
}

/// Publishes a batch: without a rate limit every copy is sent before any confirm is awaited (one
/// round trip for the batch); with one, one copy per `pause`. When the broker closed the channel
/// during the batch (it refused one copy), the copies that failed with it are published again
/// one at a time on a reopened channel (and connection), so only the refused one fails, with the broker's reason
/// (a copy the broker took just before the close may so arrive twice; the worker's idempotency
/// makes the second a republished event, not a second link).
pub(super) async fn publish_batch(
    channel: &mut ReplayChannel,
    targets: &ReplayTargets,
    copies: &crate::intake::Copies,
    letters: &[Stored],
    pause: Option<Duration>,
    timeout: Duration,
) -> Vec<(i64, ReplayOutcome)> {
    let copies: Vec<Result<OutboundMessage, ReplayOutcome>> = letters
        .iter()
        .map(|letter| replay_of(letter, targets, copies))
        .collect();
    let mut outcomes: Vec<ReplayOutcome> = copies
        .iter()
        .map(|copy| match copy {
            Err(outcome) => outcome.clone(),
            Ok(_) => ReplayOutcome::Failed("not published".into()),
        })
        .collect();
    let publishable = (0..copies.len()).filter(|i| copies[*i].is_ok());
    let one_at_a_time: Vec<usize> = match pause {
        Some(_) => publishable.collect(),
        None => match channel.usable().await {
            Err(why) => {
                for i in publishable {
                    outcomes[i] = ReplayOutcome::Failed(why.clone());
                }
                Vec::new()
            }
            Ok(open) => {
                let indices: Vec<usize> = publishable.collect();
                let published = indices.iter().map(|&i| {
                    let open = open.clone();
                    let copy = copies[i].as_ref().expect("publishable");
                    async move { (i, publish_one(&open, copy, timeout).await) }
                });
                for (i, outcome) in futures_util::future::join_all(published).await {
                    outcomes[i] = outcome;
                }
                let closed = !open.status().connected();
                indices
                    .into_iter()
                    .filter(|&i| closed && matches!(outcomes[i], ReplayOutcome::Failed(_)))
                    .collect()
            }
        },
    };
    // At the rate limit, or again after the broker closed the channel mid-batch.
    for i in one_at_a_time {
        let copy = copies[i].as_ref().expect("publishable");
        outcomes[i] = match channel.usable().await {
            Ok(open) => publish_one(&open, copy, timeout).await,
            Err(why) => ReplayOutcome::Failed(why),
        };
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    letters.iter().map(|l| l.id).zip(outcomes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::{read_text, text};
    use lapin::types::FieldTable;

    #[test]
    fn replay_restores_the_command_and_counts_the_replay() {
        let mut headers = FieldTable::default();
        headers.insert("x-error-kind".into(), text("provider-rejected"));
        headers.insert("x-error-status".into(), AMQPValue::LongInt(400));
        headers.insert("x-dead-letter-id".into(), text("d-1"));
        headers.insert("x-original-exchange".into(), text("cmds"));
        headers.insert("x-original-routing-key".into(), text("payment-link.create"));
        headers.insert("x-replay-count".into(), AMQPValue::LongInt(2));
        headers.insert("x-delay-round".into(), AMQPValue::LongInt(4));
        headers.insert("traceparent".into(), text("00-abc"));
        let properties = BasicProperties::default()
            .with_message_id("c-1".into())
            .with_headers(headers);
        let copies = crate::intake::Copies {
            carried: Vec::new(),
            marks: crate::marks::Marks::with_key(b"test"),
        };
        let copy = replay_message("cmds", "payment-link.create", &properties, b"{}", &copies);
        assert_eq!(copy.exchange, "cmds");
        assert_eq!(copy.routing_key, "payment-link.create");
        assert_eq!(copy.message_id(), "c-1");
        assert_eq!(read_int(&copy.properties, headers::REPLAY_COUNT), Some(3));
        assert_eq!(
            read_text(&copy.properties, "traceparent").as_deref(),
            Some("00-abc")
        );
        for gone in [
            "x-error-kind",
            "x-error-status",
            "x-delay-round",
            "x-original-exchange",
            "x-dead-letter-id",
        ] {
            assert!(
                read_text(&copy.properties, gone).is_none()
                    && read_int(&copy.properties, gone).is_none(),
                "{gone}"
            );
        }
    }
}
