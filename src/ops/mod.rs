//! The operators' tools outside the command path and the dead-letter feature: `send`, which
//! publishes through the same confirmed publish as the worker, `events`, which shows what the
//! worker publishes, and `status`, which shows the whole fleet.

pub mod events;
pub mod send;
pub mod status;

use anyhow::Context as _;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, Consumer};

/// A queue of this process's own (exclusive, removed when it disconnects), bound as given
/// before anything is sent or awaited, so nothing published after this returns is missed.
async fn own_queue(
    connection: &Connection,
    bindings: &[(&String, &str)],
    consumer_tag: &str,
) -> anyhow::Result<Consumer> {
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
    for (exchange, routing_key) in bindings {
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.as_str().into(),
                (*routing_key).into(),
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
            consumer_tag.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?)
}

/// Resolves on ctrl-c or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled: a signal that comes while the caller is still starting (a pod deleted
/// while it waits for the schema) is kept for it, instead of taking the default action and ending
/// the process half-way.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
        let mut interrupt = signal(SignalKind::interrupt()).expect("can install a SIGINT handler");
        async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
