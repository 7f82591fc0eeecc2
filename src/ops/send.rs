//! `send`: publishes one command, publisher-confirmed, the way the invoicing system would; for
//! trying the worker out and for scripts.

use crate::broker::messages::{OutboundMessage, PERSISTENT};
use crate::broker::publisher::{PublishError, confirm_channel, publish_confirmed};
use crate::broker::{self};
use crate::cli::SendArgs;
use crate::command::{WireCommand, raw};
use crate::config::Settings;
use anyhow::Context as _;
use lapin::BasicProperties;
use serde_json::value::RawValue;

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

/// Publishes one command to the command exchange and waits for the broker's confirm; returns
/// its command id.
pub async fn send(settings: &Settings, args: &SendArgs) -> anyhow::Result<String> {
    let body = body_from_flags(args)?;
    let id = args
        .command_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut properties = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64);
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
    let channel = confirm_channel(&connection).await?;
    let published = publish_confirmed(&channel, &message).await;
    let _ = connection.close(200, "sent".into()).await;
    match published {
        Ok(()) => Ok(id),
        Err(PublishError::Unroutable { .. }) => anyhow::bail!(
            "no queue is bound to {} for {}: start the worker once to declare the topology",
            settings.broker.command_exchange,
            settings.broker.command_routing_key
        ),
        Err(error) => Err(error).context("the broker did not accept the command"),
    }
}
