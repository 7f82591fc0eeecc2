//! Many commands on one connection and one confirm channel: `--count` copies, or one per JSON
//! line on stdin.

use super::{SendArgs, body_from_flags, command_message};
use crate::broker::publisher::{PublishError, confirm_channel};
use crate::broker::{self};
use crate::config::Settings;
use anyhow::Context as _;
use futures_util::StreamExt as _;
use lapin::Confirmation;
use serde_json::value::RawValue;
use std::time::Duration;

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

impl Sent {
    /// The summary line on stderr; an error when not every command was accepted.
    pub fn report(&self) -> anyhow::Result<()> {
        let seconds = self.elapsed.as_secs_f64();
        eprintln!(
            "sent {} command(s) on one connection in {seconds:.1} s ({:.0}/s): {} confirmed, {} \
             refused, {} skipped",
            self.sent,
            self.confirmed as f64 / seconds.max(0.001),
            self.confirmed,
            self.refused,
            self.skipped
        );
        if self.refused + self.skipped > 0 {
            anyhow::bail!("not every command was accepted (see above)");
        }
        Ok(())
    }
}

/// The commands of a bulk send: `--count` copies of the flags' body, or one per JSON line on
/// stdin (read on a thread of its own, so a slow pipe does not hold the runtime); each with its
/// id (`--command-id` then `-1`, `-2`… or fresh UUIDs).
pub fn bodies(args: &SendArgs) -> anyhow::Result<tokio::sync::mpsc::Receiver<Bulk>> {
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
