//! The downstream notifier's side: every event, read from a quorum queue of the harness's on the
//! cluster, through whichever node is up, with the time it came (the run's progress).

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One event as the collector saw it.
#[derive(Clone, Debug)]
pub struct Event {
    pub command_id: String,
    pub event_id: String,
    /// `payment-link.created` or `payment-link.failed`.
    pub kind: String,
    /// The created event's `paymentLink`.
    pub link: Option<String>,
    /// When it came, from the start of the run.
    pub at: Duration,
}

/// Events as they come; shared with the run, which reads progress from them.
#[derive(Clone, Default)]
pub struct Events(pub Arc<Mutex<Vec<Event>>>);

impl Events {
    pub fn snapshot(&self) -> Vec<Event> {
        self.0.lock().expect("events lock").clone()
    }
}

fn text(table: &FieldTable, key: &str) -> Option<String> {
    match table.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// Declares `queue` (quorum) bound to both event routing keys on `exchange`, through the
/// first node of `urls` that answers.
pub async fn declare(
    urls: &[String],
    exchange: &str,
    keys: &[&str],
    queue: &str,
) -> anyhow::Result<()> {
    let mut last = None;
    for url in urls {
        match declare_on(url, exchange, keys, queue).await {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no node")))
}

async fn declare_on(url: &str, exchange: &str, keys: &[&str], queue: &str) -> anyhow::Result<()> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    for key in keys {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let _ = connection.close(200, "declared".into()).await;
    Ok(())
}

/// Adds the event `delivery` carries to `events`, unless it is the collector's own repeat: a
/// message delivered again after a lost connection (`redelivered`) whose event id was seen.
fn keep(events: &Events, delivery: &lapin::message::Delivery, started: Instant) {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let event_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_default();
    let event = Event {
        command_id: text(&headers, "cloudEvents:subject").unwrap_or_default(),
        kind: text(&headers, "cloudEvents:type").unwrap_or_default(),
        link: serde_json::from_slice::<serde_json::Value>(&delivery.data)
            .ok()
            .and_then(|v| v.get("paymentLink")?.as_str().map(str::to_owned)),
        event_id,
        at: started.elapsed(),
    };
    let mut seen = events.0.lock().expect("events lock");
    let again = delivery.redelivered && seen.iter().rev().any(|e| e.event_id == event.event_id);
    if !again {
        seen.push(event);
    }
}

/// Reads what is left in `queue` once the collector has stopped, through the first node that
/// answers, and returns how many it read: a consumer that went silent without the collector
/// noticing leaves events there, which are the workers' outcomes, not losses (a CI run's account
/// once said 6,505 lost with nothing stuck anywhere the workers use).
pub async fn sweep(urls: &[String], queue: &str, started: Instant, events: &Events) -> usize {
    let bound = Duration::from_secs(5);
    let mut read = 0;
    for url in urls {
        let Ok(Ok(connection)) = tokio::time::timeout(
            bound,
            Connection::connect(url, ConnectionProperties::default()),
        )
        .await
        else {
            continue;
        };
        let Ok(Ok(channel)) = tokio::time::timeout(bound, connection.create_channel()).await else {
            continue;
        };
        let mut emptied = false;
        while let Ok(Ok(got)) = tokio::time::timeout(
            bound,
            channel.basic_get(queue.into(), lapin::options::BasicGetOptions::default()),
        )
        .await
        {
            let Some(message) = got else {
                emptied = true;
                break;
            };
            keep(events, &message.delivery, started);
            let _ = message.delivery.acker.ack(BasicAckOptions::default()).await;
            read += 1;
        }
        let _ = tokio::time::timeout(bound, connection.close(200, "swept".into())).await;
        if emptied {
            break;
        }
    }
    read
}

/// The longest quiet spell after which the collector takes its consumer for lost.
const QUIET: Duration = Duration::from_secs(5);

/// Reads `queue` until `stop` fires, reconnecting round the nodes. A message the broker delivers
/// again after a lost connection (`redelivered`) whose event id was seen is the collector's own
/// repeat, not the worker's, and is not counted again.
pub async fn run(
    urls: Vec<String>,
    queue: String,
    started: Instant,
    events: Events,
    stop: CancellationToken,
) {
    let mut node = 0usize;
    while !stop.is_cancelled() {
        let url = &urls[node % urls.len()];
        node += 1;
        let Ok(Ok(connection)) = tokio::time::timeout(
            Duration::from_secs(3),
            Connection::connect(url, ConnectionProperties::default()),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // Every broker call bounded: a node that takes the connection but never answers must
        // not keep the collector from its stop.
        let bound = Duration::from_secs(5);
        let Ok(Ok(channel)) = tokio::time::timeout(bound, connection.create_channel()).await else {
            continue;
        };
        let _ = tokio::time::timeout(bound, channel.basic_qos(500, Default::default())).await;
        let Ok(Ok(mut consumer)) = tokio::time::timeout(
            bound,
            channel.basic_consume(
                queue.as_str().into(),
                "soak-collector".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            // A consumer can go silent without being cancelled (seed 10's third hour: no event
            // for the last 1,150 s after a rolling restart, while the workers went on and the
            // events piled up in this queue): with commands flowing at the load's rate, a quiet
            // spell longer than QUIET means the consumer is lost, and the collector consumes
            // again through the next node.
            let delivery = tokio::select! {
                _ = stop.cancelled() => break,
                next = tokio::time::timeout(QUIET, consumer.next()) => match next {
                    Ok(Some(Ok(delivery))) => delivery,
                    _ => break,
                },
            };
            keep(&events, &delivery, started);
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            connection.close(200, "collector".into()),
        )
        .await;
    }
}
