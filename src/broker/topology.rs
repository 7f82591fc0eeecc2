//! The exchanges and queues of the contract, declared idempotently at start by every replica.

use crate::config::BrokerSettings;
use crate::headers::text;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn quorum_queue_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args
}

/// The delay queue of one tier: messages wait there `delay_ms`, then go back to the command
/// exchange with the command routing key.
pub fn delay_queue(s: &BrokerSettings, delay_ms: u64) -> String {
    format!("{}.delay.{delay_ms}ms", s.command_queue)
}

/// The exchange delayed copies are published to: a direct exchange that routes each to its delay
/// queue by name and nowhere else (the default exchange would route to any queue of the vhost).
pub fn delay_exchange(s: &BrokerSettings) -> String {
    format!("{}.delay", s.command_queue)
}

/// Declares the delay queues of the tiers: quorum queues with a message TTL that dead-letter
/// (at-least-once) back to the command exchange, so a waiting command holds no consumer slot;
/// and their exchange ([`delay_exchange`]), each queue bound to it by its own name.
pub async fn declare_delay_queues(
    channel: &Channel,
    s: &BrokerSettings,
    tiers_ms: &[u64],
) -> Result<(), lapin::Error> {
    let exchange = delay_exchange(s);
    if !tiers_ms.is_empty() {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Direct,
                durable_exchange(),
                FieldTable::default(),
            )
            .await?;
    }
    for &delay_ms in tiers_ms {
        let mut args = quorum_queue_arguments();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay_ms as i64),
        );
        args.insert("x-dead-letter-exchange".into(), text(&s.command_exchange));
        args.insert(
            "x-dead-letter-routing-key".into(),
            text(&s.command_routing_key),
        );
        args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        args.insert("x-overflow".into(), text("reject-publish"));
        let queue = delay_queue(s, delay_ms);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// How an operator gives an existing command queue the arguments it could not be redeclared with.
const POLICY_HINT: &str = "rabbitmqctl set_policy payment-link-commands '^<command queue>$' \
     '{\"dead-letter-strategy\":\"at-least-once\",\"overflow\":\"reject-publish\"}' \
     --apply-to quorum_queues";

/// Declares the command, event and dead-letter exchanges and the command and dead-letter queues,
/// on a channel of `connection`; returns the channel, for the caller to go on with.
///
/// The command queue dead-letters to the dead-letter exchange by itself once a message has been
/// delivered `delivery_limit` times, so a message that crashes every worker cannot loop forever,
/// and it does so at-least-once (with `x-overflow: reject-publish`, as RabbitMQ requires), so a
/// message the broker dead-letters is not lost on the way. A command queue declared by an older
/// version without those two arguments cannot be redeclared with them (RabbitMQ refuses other
/// arguments for an existing queue): it is used as it is, with a warning that says how to give
/// it the same behaviour through a policy.
pub async fn declare(connection: &Connection, s: &BrokerSettings) -> Result<Channel, lapin::Error> {
    let mut channel = connection.create_channel().await?;
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
    let queue = s.command_queue.as_str();
    channel = declare_command_queue(connection, channel, s).await?;
    channel
        .queue_bind(
            queue.into(),
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
    Ok(channel)
}

/// Declares the command queue (quorum, dead-lettering at least once to the dead-letter
/// exchange, refusing publishes when full); one an older version declared with other arguments
/// is used as it is, with a warning. Returns the channel to go on with (a refusal closes it).
async fn declare_command_queue(
    connection: &Connection,
    mut channel: Channel,
    s: &BrokerSettings,
) -> Result<Channel, lapin::Error> {
    let queue_options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let queue = s.command_queue.as_str();
    let mut command_args = quorum_queue_arguments();
    command_args.insert(
        "x-dead-letter-exchange".into(),
        text(&s.dead_letter_exchange),
    );
    command_args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(s.delivery_limit)),
    );
    command_args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    command_args.insert("x-overflow".into(), text("reject-publish"));
    match channel
        .queue_declare(queue.into(), queue_options, command_args)
        .await
    {
        Ok(_) => {}
        Err(error)
            if matches!(
                crate::diagnose::refusal(&error),
                Some(AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
            ) =>
        {
            tracing::warn!(queue, %error, policy = POLICY_HINT,
                "the command queue exists with other arguments (declared by an older version); \
                 using it as it is; apply the policy shown to make the broker's own dead-lettering \
                 at-least-once");
            // The refusal closed the channel.
            channel = connection.create_channel().await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(queue.into(), passive, FieldTable::default())
                .await?;
        }
        Err(error) => return Err(error),
    }
    Ok(channel)
}
