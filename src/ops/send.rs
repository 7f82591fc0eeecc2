//! `send`: publishes one command, publisher-confirmed, the way the invoicing system would; for
//! trying the worker out and for scripts.

use crate::broker::messages::{OutboundMessage, PERSISTENT};
use crate::broker::publisher::{PublishError, confirm_channel, publish_confirmed};
use crate::broker::{self};
use crate::command::{WireCommand, raw};
use crate::config::Settings;
use crate::headers;
use anyhow::Context as _;
use clap::Args;
use futures_util::StreamExt as _;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, Consumer};
use serde_json::value::RawValue;
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `send`: a body from flags, or from a JSON file.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The command id (AMQP message_id); a fresh UUID when not given.
    #[arg(long)]
    pub command_id: Option<String>,
    /// A file holding the whole command body (instead of the flags below); `-` reads JSON lines
    /// from standard input and sends one command per line, on one connection.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["provider_id", "amount", "description"])]
    pub json: Option<PathBuf>,
    /// Send this many commands built from the flags, with distinct ids (`--command-id` then
    /// `-1`, `-2`…, or fresh UUIDs), on one connection; prints their ids and a summary.
    #[arg(long, value_name = "N", conflicts_with_all = ["json", "wait"],
        value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// paymentProviderId.
    #[arg(long, required_unless_present = "json")]
    pub provider_id: Option<i64>,
    /// amountInMajorCurrency, as decimal text (sent exactly as given).
    #[arg(long, required_unless_present = "json")]
    pub amount: Option<String>,
    /// description.
    #[arg(long, required_unless_present = "json")]
    pub description: Option<String>,
    /// emailAddress.
    #[arg(long)]
    pub email: Option<String>,
    /// invoiceId.
    #[arg(long)]
    pub invoice_id: Option<i64>,
    /// adhocInvoiceId.
    #[arg(long)]
    pub adhoc_invoice_id: Option<i64>,
    /// customerId.
    #[arg(long)]
    pub customer_id: Option<i64>,
    /// correlation_id property.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Wait for the command's event or dead letter and print it; exit non-zero unless a link
    /// was created.
    #[arg(long, conflicts_with = "count")]
    pub wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 30, requires = "wait", value_name = "SECONDS")]
    pub timeout: u64,
}

/// Builds the body from the flags; the amount is inserted as written so it stays exact.
pub fn body_from_flags(args: &SendArgs) -> anyhow::Result<Vec<u8>> {
    if let Some(path) = &args.json {
        return std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    }
    let amount = args.amount.as_deref().unwrap_or_default();
    let amount = RawValue::from_string(amount.to_owned())
        .ok()
        .filter(|raw| {
            raw.get()
                .starts_with(|c: char| c.is_ascii_digit() || c == '-')
        })
        .with_context(|| format!("--amount must be a decimal number, got {amount:?}"))?;
    let id = |id: Option<i64>| id.map(|id| raw(&id));
    let provider = id(args.provider_id);
    let description = args.description.as_deref().map(raw);
    let email = args.email.as_deref().map(raw);
    let (invoice, adhoc, customer) = (
        id(args.invoice_id),
        id(args.adhoc_invoice_id),
        id(args.customer_id),
    );
    Ok(serde_json::to_vec(&WireCommand {
        payment_provider_id: provider.as_deref(),
        amount_in_major_currency: Some(&amount),
        description: description.as_deref(),
        email_address: email.as_deref(),
        invoice_id: invoice.as_deref(),
        adhoc_invoice_id: adhoc.as_deref(),
        customer_id: customer.as_deref(),
    })?)
}

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

/// The command message for `body`, as the invoicing system would publish it.
fn command_message(
    settings: &Settings,
    id: &str,
    correlation_id: Option<&str>,
    body: Vec<u8>,
) -> OutboundMessage {
    let now = chrono::Utc::now();
    let mut table = FieldTable::default();
    table.insert(
        headers::PUBLISHED_AT_MS.into(),
        AMQPValue::LongLongInt(now.timestamp_millis()),
    );
    let mut properties = BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(now.timestamp().max(0) as u64)
        .with_headers(table);
    if let Some(correlation_id) = correlation_id {
        properties = properties.with_correlation_id(correlation_id.into());
    }
    OutboundMessage {
        exchange: settings.broker.command_exchange.clone(),
        routing_key: settings.broker.command_routing_key.clone(),
        properties,
        body,
    }
}

/// The error for a command no queue took.
fn unroutable(settings: &Settings) -> anyhow::Error {
    anyhow::anyhow!(
        "no queue is bound to {} for {}: start the worker once to declare the topology",
        settings.broker.command_exchange,
        settings.broker.command_routing_key
    )
}

/// Publishes one command to the command exchange and waits for the broker's confirm; returns
/// its command id, and, when `wait` is given, what became of it within that time (its event or
/// its dead letter), read from a queue of this process's own that is bound before the command
/// is sent, so nothing is missed.
pub async fn send(
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

/// How many publishes `send` keeps awaiting their confirms at once in bulk.
const IN_FLIGHT: usize = 512;

/// What a bulk send did.
#[derive(Debug, Default)]
pub struct Sent {
    /// Published.
    pub sent: u64,
    /// Confirmed by the broker (their ids went to stdout).
    pub confirmed: u64,
    /// Refused by the broker (a nack, or no queue bound).
    pub refused: u64,
    /// JSON lines on stdin that were not JSON, not sent.
    pub skipped: u64,
    /// From the first publish to the last confirm.
    pub elapsed: Duration,
}

/// The commands of a bulk send: `--count` copies of the flags' body, or one per JSON line on
/// stdin (read on a thread of its own, so a slow pipe does not hold the runtime); each with its
/// id (`--command-id` then `-1`, `-2`… or fresh UUIDs).
pub fn bulk_bodies(args: &SendArgs) -> anyhow::Result<tokio::sync::mpsc::Receiver<Bulk>> {
    let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
    let base = args.command_id.clone();
    let id = move |n: u64| match &base {
        Some(base) => format!("{base}-{n}"),
        None => uuid::Uuid::new_v4().to_string(),
    };
    if args.json.as_deref() == Some(std::path::Path::new("-")) {
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            let mut n = 0;
            for (at, line) in std::io::stdin().lock().lines().enumerate() {
                let item = match line {
                    Ok(line) if line.trim().is_empty() => continue,
                    Err(error) => Bulk::Bad(format!("line {}: {error}", at + 1)),
                    Ok(line) => match serde_json::from_str::<&RawValue>(&line) {
                        Err(error) => Bulk::Bad(format!("line {}: not JSON: {error}", at + 1)),
                        Ok(_) => {
                            n += 1;
                            Bulk::Command(id(n), line.into_bytes())
                        }
                    },
                };
                if tx.blocking_send(item).is_err() {
                    return;
                }
            }
        });
        return Ok(rx);
    }
    let body = body_from_flags(args)?;
    let count = args.count.unwrap_or(1);
    tokio::spawn(async move {
        for n in 1..=count {
            if tx.send(Bulk::Command(id(n), body.clone())).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// One item of a bulk send.
pub enum Bulk {
    /// A command id and its body.
    Command(String, Vec<u8>),
    /// A line that cannot be sent, and why.
    Bad(String),
}

/// Publishes many commands on one connection and one confirm channel, up to [`IN_FLIGHT`]
/// awaiting their confirms at once; prints each confirmed command's id on stdout, a progress
/// line on stderr at a terminal, and returns the figures for the summary.
pub async fn send_many(
    settings: &Settings,
    args: &SendArgs,
    mut commands: tokio::sync::mpsc::Receiver<Bulk>,
) -> anyhow::Result<Sent> {
    use futures_util::stream::FuturesUnordered;
    use std::io::{IsTerminal as _, Write as _};
    let connection = broker::connect(&settings.broker, "payment-link-worker send").await?;
    let channel = confirm_channel(&connection).await?;
    let progress = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let mut figures = Sent::default();
    let mut pending = FuturesUnordered::new();
    let mut stdout = std::io::stdout().lock();
    let mut settle = |figures: &mut Sent, (id, confirmed): (String, Result<(), PublishError>)| {
        match confirmed {
            Ok(()) => {
                figures.confirmed += 1;
                let _ = writeln!(stdout, "{id}");
            }
            Err(error) => {
                figures.refused += 1;
                eprintln!("command {id} was not accepted: {error}");
            }
        }
        if progress && figures.confirmed.is_multiple_of(100) {
            eprint!("\rsent {}, confirmed {}", figures.sent, figures.confirmed);
        }
    };
    let outcome: anyhow::Result<()> = async {
        while let Some(item) = commands.recv().await {
            let (id, body) = match item {
                Bulk::Command(id, body) => (id, body),
                Bulk::Bad(why) => {
                    figures.skipped += 1;
                    eprintln!("skipped {why}");
                    continue;
                }
            };
            let message = command_message(settings, &id, args.correlation_id.as_deref(), body);
            let confirm = channel
                .basic_publish(
                    message.exchange.as_str().into(),
                    message.routing_key.as_str().into(),
                    lapin::options::BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &message.body,
                    message.properties,
                )
                .await
                .context("the broker closed the channel")?;
            figures.sent += 1;
            let broker = &settings.broker;
            pending.push(async move { (id, confirmation(confirm.await, broker)) });
            if pending.len() >= IN_FLIGHT
                && let Some(done) = pending.next().await
            {
                settle(&mut figures, done);
            }
        }
        while let Some(done) = pending.next().await {
            settle(&mut figures, done);
        }
        Ok(())
    }
    .await;
    figures.elapsed = started.elapsed();
    if progress {
        eprint!("\r");
    }
    let _ = connection.close(200, "sent".into()).await;
    outcome.map(|()| figures)
}

/// A confirm in words: only an ack without a returned message means a queue took it.
fn confirmation(
    confirm: Result<Confirmation, lapin::Error>,
    broker: &crate::config::BrokerSettings,
) -> Result<(), PublishError> {
    match confirm? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable {
            exchange: broker.command_exchange.clone(),
            routing_key: broker.command_routing_key.clone(),
        }),
        Confirmation::Nack(_) | Confirmation::NotRequested => Err(PublishError::Nacked),
    }
}

/// A queue of this process's own, bound to both event routing keys and to every dead letter.
async fn listen(connection: &Connection, settings: &Settings) -> anyhow::Result<Consumer> {
    let broker = &settings.broker;
    let bindings = [
        (&broker.event_exchange, broker.created_routing_key.as_str()),
        (&broker.event_exchange, broker.failed_routing_key.as_str()),
        (&broker.dead_letter_exchange, "#"),
    ];
    super::own_queue(connection, &bindings, "payment-link-worker send").await
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
