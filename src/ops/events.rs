//! `events`: shows the events the worker publishes as they come, from a temporary queue of its
//! own bound to the event exchange; for trying the worker out, and for a newcomer whose events
//! otherwise have nowhere to go.

use crate::broker;
use crate::config::Settings;
use crate::headers;
use crate::text::visible;
use clap::Args;
use futures_util::StreamExt as _;
use lapin::message::Delivery;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::io::{IsTerminal as _, Write as _};

/// Flags of `events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only `payment-link.failed` events.
    #[arg(long)]
    pub failed: bool,
    /// Only the events of this command.
    #[arg(long, value_name = "ID")]
    pub command_id: Option<String>,
    /// Exit after this many events (default: run until ctrl-c).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// JSON lines even at a terminal (they are the default when stdout is not one).
    #[arg(long)]
    pub json: bool,
}

/// One event as `events` shows it.
struct Seen<'a> {
    kind: String,
    event_id: String,
    command_id: String,
    body: &'a [u8],
}

impl<'a> Seen<'a> {
    fn of(delivery: &'a Delivery) -> Self {
        let properties = &delivery.properties;
        let text = |value: Option<&lapin::types::ShortString>| {
            value.map(|v| v.as_str().to_owned()).unwrap_or_default()
        };
        Seen {
            kind: text(properties.kind().as_ref()),
            event_id: text(properties.message_id().as_ref()),
            command_id: headers::read_text(properties, headers::EVENT_SUBJECT).unwrap_or_default(),
            body: &delivery.data,
        }
    }

    fn wanted(&self, args: &EventsArgs, failed_kind: &str) -> bool {
        (!args.failed || self.kind == failed_kind)
            && args
                .command_id
                .as_ref()
                .is_none_or(|id| *id == self.command_id)
    }

    /// One JSON object: the body as it came (re-encoding it through floats would change
    /// amounts), or as a string when it is not JSON.
    fn json_line(&self) -> String {
        let body = std::str::from_utf8(self.body)
            .ok()
            .and_then(|b| RawValue::from_string(b.trim().to_owned()).ok());
        let line = serde_json::json!({
            "type": self.kind,
            "eventId": self.event_id,
            "commandId": self.command_id,
        });
        let mut line = line.to_string();
        line.pop();
        let body = match body {
            Some(raw) => raw.get().to_owned(),
            None => {
                serde_json::Value::String(String::from_utf8_lossy(self.body).into()).to_string()
            }
        };
        format!("{line},\"body\":{body}}}")
    }

    /// One short line for a person: the time, what happened, the command, the link or the
    /// reason. Everything that came off the wire is shown with control characters made visible.
    fn human_line(&self, failed_kind: &str) -> String {
        let fields: HashMap<String, Box<RawValue>> =
            serde_json::from_slice(self.body).unwrap_or_default();
        let field = |name: &str| {
            fields.get(name).map(|raw| {
                let text = raw.get();
                serde_json::from_str::<String>(text).unwrap_or_else(|_| text.to_owned())
            })
        };
        let time = chrono::Local::now().format("%H:%M:%S%.3f");
        let command = visible(&self.command_id).into_owned();
        if self.kind == failed_kind {
            let kind = field("errorKind").unwrap_or_default();
            let message = field("message").unwrap_or_default();
            format!(
                "{time}  failed   {command}  {}: {}",
                visible(&kind),
                visible(&message)
            )
        } else {
            let link = field("paymentLink").unwrap_or_else(|| "(no paymentLink)".into());
            let amount = field("amountInMajorCurrency").unwrap_or_default();
            format!(
                "{time}  created  {command}  {}  {}",
                visible(&link),
                visible(&amount)
            )
        }
    }
}

/// Prints events until ctrl-c (or `--count` of them).
pub async fn run(settings: &Settings, args: &EventsArgs) -> anyhow::Result<()> {
    let broker_settings = &settings.broker;
    let connection = broker::connect(broker_settings, "payment-link-worker events").await?;
    let bindings = [
        (
            &broker_settings.event_exchange,
            broker_settings.created_routing_key.as_str(),
        ),
        (
            &broker_settings.event_exchange,
            broker_settings.failed_routing_key.as_str(),
        ),
    ];
    let mut consumer =
        super::own_queue(&connection, &bindings, "payment-link-worker events").await?;
    let json = args.json || !std::io::stdout().is_terminal();
    if !json {
        eprintln!(
            "listening for events on {} (ctrl-c to stop)",
            broker_settings.event_exchange
        );
    }
    let failed_kind = "payment-link.failed";
    let mut shown = 0u64;
    let mut stdout = std::io::stdout().lock();
    let outcome = loop {
        if args.count.is_some_and(|limit| shown >= limit) {
            break Ok(());
        }
        let delivery = tokio::select! {
            next = consumer.next() => next,
            _ = super::shutdown_signal() => break Ok(()),
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => break Err(anyhow::Error::from(error)),
            None => break Err(anyhow::anyhow!("the broker closed the connection")),
        };
        let seen = Seen::of(&delivery);
        if !seen.wanted(args, failed_kind) {
            continue;
        }
        let line = if json {
            seen.json_line()
        } else {
            seen.human_line(failed_kind)
        };
        // A closed pipe (`events | head`) ends the command quietly.
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            break Ok(());
        }
        shown += 1;
    };
    let _ = connection.close(200, "done".into()).await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(kind: &str, body: &'static [u8]) -> Seen<'static> {
        Seen {
            kind: kind.into(),
            event_id: "e-1".into(),
            command_id: "c-1\u{1b}[2J".into(),
            body,
        }
    }

    #[test]
    fn json_lines_keep_the_amount_as_written_and_survive_a_body_that_is_not_json() {
        let line = seen(
            "payment-link.created",
            br#"{"amountInMajorCurrency":12.50}"#,
        )
        .json_line();
        assert!(
            line.contains(r#""body":{"amountInMajorCurrency":12.50}"#),
            "{line}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["eventId"], "e-1");
        let odd = seen("payment-link.created", b"not json \xff").json_line();
        let parsed: serde_json::Value = serde_json::from_str(&odd).unwrap();
        assert!(parsed["body"].as_str().unwrap().starts_with("not json"));
    }

    #[test]
    fn human_lines_show_the_link_or_the_reason_with_control_characters_made_visible() {
        let created = seen(
            "payment-link.created",
            br#"{"paymentLink":"https://l/1","amountInMajorCurrency":9.99}"#,
        )
        .human_line("payment-link.failed");
        assert!(created.contains("created  c-1") && created.contains("https://l/1  9.99"));
        assert!(!created.contains('\u{1b}'), "{created}");
        let failed = seen(
            "payment-link.failed",
            br#"{"errorKind":"provider-rejected","message":"400 Bad Request"}"#,
        )
        .human_line("payment-link.failed");
        assert!(
            failed.contains("failed   c-1")
                && failed.ends_with("provider-rejected: 400 Bad Request")
        );
    }
}
