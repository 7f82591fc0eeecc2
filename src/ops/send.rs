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
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, Consumer};
use serde_json::value::RawValue;
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `send`: a body from flags, or from a JSON file.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The command id (AMQP message_id); a fresh UUID when not given.
    #[arg(long)]
    pub command_id: Option<String>,
    /// A file holding the whole command body (instead of the flags below).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["provider_id", "amount", "description"])]
    pub json: Option<PathBuf>,
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
    #[arg(long)]
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
    },
    /// Neither within this long (no worker running, or one far behind).
    NothingWithin(Duration),
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
    let now = chrono::Utc::now();
    let mut table = FieldTable::default();
    table.insert(
        headers::PUBLISHED_AT_MS.into(),
        AMQPValue::LongLongInt(now.timestamp_millis()),
    );
    let mut properties = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(now.timestamp().max(0) as u64)
        .with_headers(table);
    if let Some(correlation_id) = &args.correlation_id {
        properties = properties.with_correlation_id(correlation_id.as_str().into());
    }
    let message = OutboundMessage {
        exchange: settings.broker.command_exchange.clone(),
        routing_key: settings.broker.command_routing_key.clone(),
        properties,
        body,
    };
    let connection = broker::connect(&settings.broker, "payment-link-worker send").await?;
    let outcome = async {
        let listener = match wait {
            Some(_) => Some(listen(&connection, settings).await?),
            None => None,
        };
        let channel = confirm_channel(&connection).await?;
        match publish_confirmed(&channel, &message).await {
            Ok(()) => {}
            Err(PublishError::Unroutable { .. }) => anyhow::bail!(
                "no queue is bound to {} for {}: start the worker once to declare the topology",
                settings.broker.command_exchange,
                settings.broker.command_routing_key
            ),
            Err(error) => return Err(error).context("the broker did not accept the command"),
        }
        let (Some(limit), Some(listener)) = (wait, listener) else {
            return Ok(None);
        };
        match tokio::time::timeout(limit, hear(listener, &id)).await {
            Ok(heard) => heard.map(Some),
            Err(_) => Ok(Some(Heard::NothingWithin(limit))),
        }
    }
    .await;
    let _ = connection.close(200, "sent".into()).await;
    Ok((id, outcome?))
}

/// A queue of this process's own (exclusive, removed when it disconnects), bound to both event
/// routing keys and to every dead letter.
async fn listen(connection: &Connection, settings: &Settings) -> anyhow::Result<Consumer> {
    let broker = &settings.broker;
    let channel = connection.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let bindings = [
        (&broker.event_exchange, broker.created_routing_key.as_str()),
        (&broker.event_exchange, broker.failed_routing_key.as_str()),
        (&broker.dead_letter_exchange, "#"),
    ];
    for (exchange, routing_key) in bindings {
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.as_str().into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| {
                format!(
                    "exchange {exchange} not found: start the worker once to declare the topology"
                )
            })?;
    }
    Ok(channel
        .basic_consume(
            queue.name().clone(),
            "payment-link-worker send".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?)
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
