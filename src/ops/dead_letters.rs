//! Operators' view of the dead-letter queue: list what is there and why, and replay a selection
//! back to the command exchange. Listing takes nothing away (every message it reads goes back when
//! its channel closes). Replaying publishes each copy with a confirm before acking the dead
//! letter, so a crash midway loses nothing (at worst a duplicate, which idempotency absorbs), and
//! every run is recorded in PostgreSQL.

use crate::broker::messages::{self, OutboundMessage};
use crate::broker::publisher::{confirm_channel, publish_confirmed};
use crate::broker::{self};
use crate::config::Settings;
use crate::errors::ErrorKind;
use crate::headers::{self, read_int, read_text};
use crate::store::{self, replay_runs};
use anyhow::Context as _;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Which dead letters an operation applies to.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Only this error kind.
    pub kind: Option<String>,
    /// Only this command id.
    pub command_id: Option<String>,
    /// At most this many.
    pub limit: Option<usize>,
}

impl Selection {
    fn matches(&self, letter: &DeadLetter) -> bool {
        self.kind.as_ref().is_none_or(|k| *k == letter.kind)
            && self
                .command_id
                .as_ref()
                .is_none_or(|c| *c == letter.command_id)
    }
}

/// One dead-lettered command, as an operator sees it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// The command id (`message_id`).
    pub command_id: String,
    /// The error kind (`x-error-kind`).
    pub kind: String,
    /// What went wrong (`x-error-message`).
    pub message: String,
    /// The provider's HTTP status (`x-error-status`).
    pub http_status: Option<i64>,
    /// Provider calls made (`x-attempts`).
    pub attempts: Option<i64>,
    /// When it was dead-lettered (`x-failed-at`).
    pub failed_at: Option<String>,
    /// From the body, when it is JSON.
    pub invoice_id: Option<i64>,
    /// From the body, when it is JSON.
    pub adhoc_invoice_id: Option<i64>,
    /// From the body, when it is JSON.
    pub customer_id: Option<i64>,
    /// Replays so far (`x-replay-count`).
    pub replay_count: i64,
}

impl DeadLetter {
    /// Reads the dead-letter headers (or, for a message the broker dead-lettered after its
    /// delivery limit, its `x-death`) and the ids in the body where it is JSON.
    pub fn from_message(properties: &BasicProperties, body: &[u8]) -> Self {
        let has_death = headers::has_death(properties);
        let kind = read_text(properties, headers::ERROR_KIND)
            .unwrap_or_else(|| if has_death { DELIVERY_LIMIT } else { UNKNOWN }.to_owned());
        let message = read_text(properties, headers::ERROR_MESSAGE).unwrap_or_else(|| {
            if has_death {
                "dead-lettered by the broker after broker.delivery_limit deliveries".to_owned()
            } else {
                String::new()
            }
        });
        let ids: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let id = |field: &str| ids.get(field).and_then(serde_json::Value::as_i64);
        Self {
            command_id: properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_default(),
            kind,
            message,
            http_status: read_int(properties, headers::ERROR_STATUS),
            attempts: read_int(properties, headers::ATTEMPTS),
            failed_at: read_text(properties, headers::FAILED_AT),
            invoice_id: id("invoiceId"),
            adhoc_invoice_id: id("adhocInvoiceId"),
            customer_id: id("customerId"),
            replay_count: read_int(properties, headers::REPLAY_COUNT).unwrap_or(0),
        }
    }
}

/// What `list` found.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listing {
    /// The matching dead letters.
    pub letters: Vec<DeadLetter>,
    /// Matching dead letters per kind.
    pub by_kind: BTreeMap<String, usize>,
    /// Messages in the dead-letter queue when the listing started.
    pub in_queue: u32,
}

/// What `replay` did.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplaySummary {
    /// The run's row in `replay_runs`.
    pub run_id: i64,
    /// Published back to the command exchange (or, in a dry run, selected).
    pub replayed: Vec<String>,
    /// Looked at and left in place because they did not match or the limit was reached.
    pub skipped: usize,
    /// Selected but not replayed because the broker refused the copy; they stay dead-lettered.
    pub failed: usize,
    /// Of the messages in the dead-letter queue when the run started, those still there.
    pub left: u32,
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// Of `replayed`, those whose kind fails again as they are (validation, idempotency
    /// conflict): replaying sends the same body under the same id.
    pub fail_again: Vec<String>,
}

/// Every kind a dead letter can have: the worker's error kinds, `delivery-limit` for a message
/// the broker dead-lettered itself, and `unknown` for one without either mark.
pub fn known_kinds() -> Vec<&'static str> {
    let mut kinds: Vec<&'static str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
    kinds.extend([DELIVERY_LIMIT, UNKNOWN]);
    kinds
}

/// The kind of a message the broker dead-lettered itself after its delivery limit.
const DELIVERY_LIMIT: &str = "delivery-limit";
/// The kind of a message in the queue with neither the worker's headers nor the broker's.
const UNKNOWN: &str = "unknown";

/// Whether replaying a dead letter of this kind, unchanged, fails the same way again.
pub fn fails_again(kind: &str) -> bool {
    kind == ErrorKind::Validation.as_str() || kind == ErrorKind::IdempotencyConflict.as_str()
}

async fn depth(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    broker::queue_depth(channel, queue)
        .await
        .with_context(|| format!("dead-letter queue {queue} not found"))
}

/// Takes the next dead letter without acking it: it stays on this channel until acked, or goes
/// back to the queue when the channel closes.
async fn next_letter(
    channel: &Channel,
    queue: &str,
) -> anyhow::Result<Option<lapin::message::Delivery>> {
    Ok(channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?
        .map(|message| message.delivery))
}

/// Gives back every delivery taken on `channel` and not acked (all tags up to `last`) with one
/// requeueing `basic.nack`. On RabbitMQ 4 that return does not count toward a quorum queue's
/// delivery limit (closing the channel would, and 4.x gives quorum queues a default limit of 20,
/// past which a dead letter would be dropped); 3.x counts every return in `x-delivery-count`, and
/// the dead-letter queue has no limit there.
async fn give_back(channel: &Channel, last: Option<u64>) -> anyhow::Result<()> {
    if let Some(last) = last {
        channel
            .basic_nack(
                last,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await
            .context("cannot give the dead letters back to their queue")?;
    }
    Ok(())
}

/// Lists the dead letters that match, without removing or changing any.
pub async fn list(settings: &Settings, selection: &Selection) -> anyhow::Result<Listing> {
    let queue = &settings.broker.dead_letter_queue;
    let connection =
        broker::connect(&settings.broker, "payment-link-worker dead-letters list").await?;
    let channel = connection.create_channel().await?;
    let in_queue = depth(&channel, queue).await?;
    let mut letters = Vec::new();
    // Each message stays unacknowledged on this channel, so none is read twice; all go back to
    // the queue, in order, at the end.
    let mut last = None;
    for _ in 0..in_queue {
        let Some(delivery) = next_letter(&channel, queue).await? else {
            break;
        };
        last = Some(delivery.delivery_tag);
        let letter = DeadLetter::from_message(&delivery.properties, &delivery.data);
        if selection.matches(&letter) {
            letters.push(letter);
            if selection.limit.is_some_and(|limit| letters.len() >= limit) {
                break;
            }
        }
    }
    give_back(&channel, last).await?;
    let _ = channel.close(200, "listing done".into()).await;
    let _ = connection.close(200, "listing done".into()).await;
    let mut by_kind = BTreeMap::new();
    for letter in &letters {
        *by_kind.entry(letter.kind.clone()).or_default() += 1;
    }
    Ok(Listing {
        letters,
        by_kind,
        in_queue,
    })
}

/// The command again, as it was first published, with the replay count increased.
pub fn replay_message(
    settings: &Settings,
    routing_key: &str,
    properties: &BasicProperties,
    body: &[u8],
) -> OutboundMessage {
    let exchange = read_text(properties, headers::ORIGINAL_EXCHANGE)
        .unwrap_or_else(|| settings.broker.command_exchange.clone());
    let routing_key = read_text(properties, headers::ORIGINAL_ROUTING_KEY)
        .unwrap_or_else(|| routing_key.to_owned());
    let replay_count = read_int(properties, headers::REPLAY_COUNT).unwrap_or(0) + 1;
    let mut kept = headers::without_failure_headers(properties);
    kept.insert(
        headers::REPLAY_COUNT.into(),
        AMQPValue::LongLongInt(replay_count),
    );
    OutboundMessage {
        exchange,
        routing_key,
        properties: messages::republishable(properties).with_headers(kept),
        body: body.to_vec(),
    }
}

/// How a replay run is asked for.
#[derive(Clone, Debug)]
pub struct ReplayRequest {
    /// Which dead letters.
    pub selection: Selection,
    /// Only show what would be replayed.
    pub dry_run: bool,
    /// Replays per second at most.
    pub rate: Option<f64>,
    /// Who asked, for the audit trail.
    pub requested_by: String,
}

/// Replays the matching dead letters to the command exchange, each confirmed before its dead
/// letter is acked; records the run in PostgreSQL.
pub async fn replay(settings: &Settings, request: &ReplayRequest) -> anyhow::Result<ReplaySummary> {
    let selection = &request.selection;
    let pool = store::pool(&settings.database)?;
    let mut conn = match pool.get().await {
        Ok(conn) => conn,
        Err(error) => {
            let what = "record the replay run";
            return Err(crate::diagnose::database(settings, what, error).await);
        }
    };
    let run_id = replay_runs::start(
        &mut conn,
        &replay_runs::NewReplayRun {
            requested_by: request.requested_by.clone(),
            filter_kind: selection.kind.clone(),
            filter_command_id: selection.command_id.clone(),
            max_count: selection.limit.map(|l| l as i64),
            rate_per_second: request.rate,
            dry_run: request.dry_run,
        },
    )
    .await?;
    let queue = &settings.broker.dead_letter_queue;
    let connection =
        broker::connect(&settings.broker, "payment-link-worker dead-letters replay").await?;
    let channel = confirm_channel(&connection).await?;
    let in_queue = depth(&channel, queue).await?;
    let pause = request
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut summary = ReplaySummary {
        run_id,
        dry_run: request.dry_run,
        ..ReplaySummary::default()
    };
    // The last delivery taken and not acked: everything up to it goes back at the end.
    let mut last = None;
    for _ in 0..in_queue {
        let Some(delivery) = next_letter(&channel, queue).await? else {
            break;
        };
        let letter = DeadLetter::from_message(&delivery.properties, &delivery.data);
        let wanted = selection.matches(&letter)
            && selection
                .limit
                .is_none_or(|limit| summary.replayed.len() < limit);
        if !wanted {
            summary.skipped += 1;
            last = Some(delivery.delivery_tag);
            continue;
        }
        if request.dry_run {
            last = Some(delivery.delivery_tag);
        } else {
            let copy = replay_message(
                settings,
                delivery.routing_key.as_str(),
                &delivery.properties,
                &delivery.data,
            );
            if let Err(error) = publish_confirmed(&channel, &copy).await {
                tracing::error!(command_id = %letter.command_id, %error, "the broker did not take the replayed command; it stays dead-lettered");
                summary.failed += 1;
                last = Some(delivery.delivery_tag);
                continue;
            }
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        replay_runs::add_command(&mut conn, run_id, &letter.command_id).await?;
        if fails_again(&letter.kind) {
            summary.fail_again.push(letter.command_id.clone());
        }
        summary.replayed.push(letter.command_id);
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    // What was not acked goes back to the queue. (The broker puts it back asynchronously, so
    // `left` is counted, not read back.)
    give_back(&channel, last).await?;
    let _ = channel.close(200, "replay done".into()).await;
    let _ = connection.close(200, "replay done".into()).await;
    let removed = if request.dry_run {
        0
    } else {
        summary.replayed.len() as u32
    };
    summary.left = in_queue.saturating_sub(removed);
    let selected = summary.replayed.len() as i32;
    let counts = replay_runs::RunCounts {
        selected,
        replayed: if request.dry_run { 0 } else { selected },
        skipped: summary.skipped as i32,
        failed: summary.failed as i32,
        left: summary.left as i32,
    };
    replay_runs::finish(&mut conn, run_id, counts).await?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::text;
    use lapin::types::FieldTable;

    #[test]
    fn replay_restores_the_command_and_counts_the_replay() {
        let settings = Settings::load_from(None, Vec::new()).unwrap();
        let mut headers = FieldTable::default();
        headers.insert("x-error-kind".into(), text("provider-rejected"));
        headers.insert("x-error-status".into(), AMQPValue::LongInt(400));
        headers.insert("x-original-exchange".into(), text("cmds"));
        headers.insert("x-original-routing-key".into(), text("payment-link.create"));
        headers.insert("x-replay-count".into(), AMQPValue::LongInt(2));
        headers.insert("x-delay-round".into(), AMQPValue::LongInt(4));
        headers.insert("traceparent".into(), text("00-abc"));
        let properties = BasicProperties::default()
            .with_message_id("c-1".into())
            .with_headers(headers);
        let copy = replay_message(&settings, "payment-link.create", &properties, b"{}");
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
        ] {
            assert!(
                read_text(&copy.properties, gone).is_none()
                    && read_int(&copy.properties, gone).is_none(),
                "{gone}"
            );
        }
        let letter = DeadLetter::from_message(&properties, br#"{"invoiceId":5}"#);
        assert_eq!(
            (
                letter.kind.as_str(),
                letter.http_status,
                letter.invoice_id,
                letter.replay_count
            ),
            ("provider-rejected", Some(400), Some(5), 2)
        );
    }
}
