//! The invoicing system's side: commands at a steady rate, published with confirms to whichever
//! broker node is up (straight to the nodes, not through the harness's proxies), republished
//! until confirmed. The mix is drawn from the seed: valid commands, commands for a provider that
//! fails transiently, invalid ones, exact duplicates and same-id-other-body conflicts.

use super::schedule::Rng;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The provider id the simulator fails 30 % of the time.
pub const FLAKY_PROVIDER: i64 = 7;

/// What a command id was sent as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A valid command: its link is expected.
    Valid,
    /// A valid command for the flaky provider: its link, or its failure after the retries.
    Flaky,
    /// An invalid command: dead-lettered.
    Invalid,
}

/// One command id and what was published under it.
#[derive(Clone, Debug)]
pub struct Planned {
    pub class: Class,
    /// Whether a copy with another body was published too (its dead letter is expected).
    pub conflict: bool,
    /// Publishes confirmed under this id (exact duplicates and republishes included).
    pub confirmed: u32,
}

/// What the load did.
#[derive(Default)]
pub struct Load {
    pub planned: HashMap<String, Planned>,
    /// Messages confirmed by the broker, by what they were.
    pub sent: HashMap<&'static str, u64>,
    /// Publishes the broker did not confirm (nacked, or their connection lost), republished.
    pub republished: u64,
    /// Messages still unconfirmed when the load gave up.
    pub unconfirmed: u64,
    /// Confirms per second of the run, from its start: where a stall was (the load's side or
    /// the workers').
    pub confirmed_per_s: Vec<u32>,
}

/// One message to publish.
#[derive(Clone)]
struct Message {
    id: String,
    body: String,
    what: &'static str,
}

fn body(provider: i64, amount: &str, n: u64) -> String {
    format!(
        r#"{{"paymentProviderId":{provider},"amountInMajorCurrency":{amount},"description":"Soak invoice {n}","emailAddress":"payer@example.com","invoiceId":{n},"customerId":{}}}"#,
        // Never 0, which the worker rightly refuses: a "valid" command must be valid.
        n % 997 + 1
    )
}

/// Draws the next message of the mix.
fn next(rng: &mut Rng, n: u64, prefix: &str, load: &mut Load, ids: &mut Vec<String>) -> Message {
    let roll = rng.between(0, 999);
    let earlier =
        (!ids.is_empty()).then(|| ids[rng.between(0, ids.len() as u64 - 1) as usize].clone());
    let cents = rng.between(1, 999_999);
    let amount = format!("{}.{:02}", cents / 100, cents % 100);
    let (id, body, what, class) = match (roll, earlier) {
        (0..=69, Some(id)) if load.planned[&id].class != Class::Invalid => {
            let planned = &load.planned[&id];
            let provider = if planned.class == Class::Flaky {
                FLAKY_PROVIDER
            } else {
                1
            };
            // The exact body again: recomputed from the id's number.
            let n: u64 = id
                .rsplit('-')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let first = first_amount(n);
            return Message {
                body: self::body(provider, &first, n),
                id,
                what: "duplicate",
            };
        }
        (70..=109, Some(id))
            if load.planned[&id].class == Class::Valid && !load.planned[&id].conflict =>
        {
            load.planned
                .get_mut(&id)
                .expect("drawn from planned")
                .conflict = true;
            let n: u64 = id
                .rsplit('-')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            return Message {
                body: self::body(1, "0.01", n),
                id,
                what: "conflict",
            };
        }
        (110..=149, _) => (
            format!("{prefix}-{n}"),
            body(FLAKY_PROVIDER, &first_amount(n), n),
            "flaky",
            Class::Flaky,
        ),
        (150..=189, _) => (
            format!("{prefix}-{n}"),
            format!(
                r#"{{"paymentProviderId":1,"amountInMajorCurrency":-{amount},"description":"Soak invoice {n}"}}"#
            ),
            "invalid",
            Class::Invalid,
        ),
        _ => (
            format!("{prefix}-{n}"),
            body(1, &first_amount(n), n),
            "valid",
            Class::Valid,
        ),
    };
    load.planned.insert(
        id.clone(),
        Planned {
            class,
            conflict: false,
            confirmed: 0,
        },
    );
    if class != Class::Invalid {
        ids.push(id.clone());
    }
    Message { id, body, what }
}

/// The amount of command number `n`'s first body, fixed by `n` so a duplicate repeats it
/// exactly (never 0.01, the conflicting copies' amount).
fn first_amount(n: u64) -> String {
    let cents = 100 + (n * 7919) % 999_900;
    format!("{}.{:02}", cents / 100, cents % 100)
}

fn properties(message: &Message) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "timestamp_in_ms".into(),
        AMQPValue::LongLongInt(chrono::Utc::now().timestamp_millis()),
    );
    BasicProperties::default()
        .with_message_id(message.id.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// A confirming channel on the first node of `urls` (from `start`, round the list) that takes one.
async fn channel(urls: &[String], start: &mut usize) -> Option<(Connection, Channel)> {
    for _ in 0..urls.len() {
        let url = &urls[*start % urls.len()];
        *start += 1;
        let Ok(Ok(connection)) = tokio::time::timeout(
            Duration::from_secs(3),
            Connection::connect(url, ConnectionProperties::default()),
        )
        .await
        else {
            continue;
        };
        let Ok(channel) = connection.create_channel().await else {
            continue;
        };
        if channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .is_ok()
        {
            return Some((connection, channel));
        }
    }
    None
}

/// How long a publish or its confirm may take before the load gives up on the channel, as a
/// careful publisher would: longer than a quorum queue's leader election, shorter than RabbitMQ
/// 3.10's 10-second resend timer.
const CONFIRM_BOUND: Duration = Duration::from_secs(3);

/// Closes a session given up on, without waiting for it (a stuck channel may not answer).
fn close_in_background(session: Option<(Connection, Channel)>) {
    if let Some((connection, _)) = session {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                connection.close(200, "soak: stuck".into()),
            )
            .await;
        });
    }
}

/// How the load goes: drawn from `seed`, at `rate` a second, for at most `drain` after it is
/// stopped, its figures timed from `start`.
pub struct Pace {
    pub seed: u64,
    pub rate: f64,
    pub drain: Duration,
    pub start: Instant,
}

/// Publishes at the pace's rate until `stop` fires, then until every message is confirmed or
/// the drain has passed.
pub async fn run(
    urls: Vec<String>,
    exchange: String,
    routing_key: String,
    pace: Pace,
    stop: CancellationToken,
) -> Load {
    let Pace {
        seed,
        rate,
        drain,
        start,
    } = pace;
    let mut rng = Rng::new(seed, 2);
    let mut load = Load::default();
    let mut ids = Vec::new();
    let mut retry: VecDeque<Message> = VecDeque::new();
    let mut confirms = FuturesUnordered::new();
    let mut node = 0;
    let mut session: Option<(Connection, Channel)> = None;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    let mut stopped_at: Option<Instant> = None;
    let mut stuck_reported = false;
    // Which session a publish went out on: a confirm given up on closes its own session only.
    let mut generation = 0u64;
    loop {
        if stopped_at.is_none() && stop.is_cancelled() {
            stopped_at = Some(Instant::now());
        }
        if let Some(at) = stopped_at
            && ((retry.is_empty() && confirms.is_empty()) || at.elapsed() > drain)
        {
            break;
        }
        tokio::select! {
            _ = ticker.tick() => {}
            Some((message, confirmed, on)) = confirms.next(), if !confirms.is_empty() => {
                match confirmed {
                    Ok(Ok(Confirmation::Ack(_))) | Ok(Ok(Confirmation::NotRequested)) => {
                        stuck_reported = false;
                        let message: Message = message;
                        *load.sent.entry(message.what).or_default() += 1;
                        let second = start.elapsed().as_secs() as usize;
                        if load.confirmed_per_s.len() <= second {
                            load.confirmed_per_s.resize(second + 1, 0);
                        }
                        load.confirmed_per_s[second] += 1;
                        if let Some(p) = load.planned.get_mut(&message.id) { p.confirmed += 1 }
                    }
                    other => {
                        // Nacked, or no confirm within the bound. After a quorum queue lost
                        // its leader, RabbitMQ 3.10 goes on nacking a channel's publishes, or
                        // resends them only after a 10-second timer, while a new channel finds
                        // the new leader at once: publish on a new one, as a careful publisher
                        // would. The message goes again (a duplicate at worst).
                        if !stuck_reported {
                            println!(
                                "soak: {:>7.1}s  load: {}; publishing on a new channel",
                                start.elapsed().as_secs_f64(),
                                if other.is_err() { "no confirm within the bound" } else { "nacked" }
                            );
                            stuck_reported = true;
                        }
                        if on == generation {
                            close_in_background(session.take());
                        }
                        load.republished += 1;
                        retry.push_back(message);
                    }
                }
                continue;
            }
        }
        let message = match retry.pop_front() {
            Some(message) => message,
            None if stopped_at.is_none() => {
                n += 1;
                next(&mut rng, n, "soak", &mut load, &mut ids)
            }
            None => continue,
        };
        if session
            .as_ref()
            .is_none_or(|(c, _)| !c.status().connected())
        {
            session = channel(&urls, &mut node).await;
            generation += 1;
        }
        let Some((_, ch)) = &session else {
            retry.push_front(message);
            continue;
        };
        let published = tokio::time::timeout(
            CONFIRM_BOUND,
            ch.basic_publish(
                exchange.as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                message.body.as_bytes(),
                properties(&message),
            ),
        )
        .await;
        match published {
            Ok(Ok(confirm)) => {
                let on = generation;
                confirms.push(async move {
                    (
                        message,
                        tokio::time::timeout(CONFIRM_BOUND, confirm).await,
                        on,
                    )
                })
            }
            Ok(Err(_)) => {
                retry.push_front(message);
                session = None;
            }
            Err(_) => {
                println!(
                    "soak: {:>7.1}s  load: a publish blocked for {} s; publishing on a new channel",
                    start.elapsed().as_secs_f64(),
                    CONFIRM_BOUND.as_secs()
                );
                retry.push_front(message);
                close_in_background(session.take());
            }
        }
    }
    load.unconfirmed = (retry.len() + confirms.len()) as u64;
    load
}
