//! The exchanges and queues of the contract, declared idempotently at start by every replica.

use crate::config::BrokerSettings;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn quorum_queue_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args
}

/// Declares the command, event and dead-letter exchanges and the command and dead-letter queues.
///
/// The command queue dead-letters to the dead-letter exchange by itself once a message has been
/// delivered `delivery_limit` times, so a message that crashes every worker cannot loop forever.
pub async fn declare(channel: &Channel, s: &BrokerSettings) -> Result<(), lapin::Error> {
    for exchange in [
        &s.command_exchange,
        &s.event_exchange,
        &s.dead_letter_exchange,
    ] {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                durable_exchange(),
                FieldTable::default(),
            )
            .await?;
    }
    let queue_options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut command_args = quorum_queue_arguments();
    command_args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(s.dead_letter_exchange.as_bytes().to_vec())),
    );
    command_args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(s.delivery_limit)),
    );
    channel
        .queue_declare(s.command_queue.as_str().into(), queue_options, command_args)
        .await?;
    channel
        .queue_bind(
            s.command_queue.as_str().into(),
            s.command_exchange.as_str().into(),
            s.command_routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            s.dead_letter_queue.as_str().into(),
            queue_options,
            quorum_queue_arguments(),
        )
        .await?;
    channel
        .queue_bind(
            s.dead_letter_queue.as_str().into(),
            s.dead_letter_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}
