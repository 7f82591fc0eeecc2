//! `send`: publishes commands, publisher-confirmed, the way the invoicing system would; for
//! trying the worker out and for scripts. One command, optionally waiting for what becomes of it
//! (`wait`), or many on one connection (`bulk`).

mod bulk;
mod wait;

use crate::broker::messages::{OutboundMessage, PERSISTENT};
use crate::command::{WireCommand, raw};
use crate::config::Settings;
use crate::headers;
use anyhow::Context as _;
use clap::Args;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
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

/// Runs `send`: many commands (`--count`, or JSON lines on stdin) with a summary on stderr, or
/// one, its id on stdout, then (with `--wait`) its event, or why it failed.
pub async fn run(settings: &Settings, args: &SendArgs) -> anyhow::Result<()> {
    if args.count.is_some() || args.json.as_deref() == Some(std::path::Path::new("-")) {
        let commands = bulk::bodies(args)?;
        let sent = bulk::send_many(settings, args, commands).await?;
        return sent.report();
    }
    let wait = args.wait.then(|| Duration::from_secs(args.timeout));
    let (id, heard) = wait::send(settings, args, wait).await?;
    println!("{id}");
    match heard {
        None => Ok(()),
        Some(heard) => heard.report(&id),
    }
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
