//! The log format for a person at a terminal: one short line per event, such as
//! `14:02:07.412  INFO 3f2a…9c payment link created attempts=1 http_status=201 (38 ms)`.
//! The command's OpenTelemetry attributes (`otel.*`, `messaging.*`) stay in the trace; a line
//! inside a command's processing shows only its command id and how long the command has taken so
//! far. Colour is written only when asked for (a terminal without `NO_COLOR`).

use std::fmt;
use std::time::Instant;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The name of the span each command's processing runs in (see `pipeline::span`).
pub const COMMAND_SPAN: &str = "command";

/// What a short line needs from the command span: its id and when it began.
struct CommandMark {
    command_id: String,
    started: Instant,
}

/// Notes the command id and the start time of every command span, for [`ShortLines`].
pub struct MarkCommands;

impl<S> Layer<S> for MarkCommands
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != COMMAND_SPAN {
            return;
        }
        struct CommandId(String);
        impl Visit for CommandId {
            fn record_str(&mut self, field: &Field, value: &str) {
                if field.name() == "command_id" {
                    value.clone_into(&mut self.0);
                }
            }
            fn record_debug(&mut self, _: &Field, _: &dyn fmt::Debug) {}
        }
        let mut command_id = CommandId(String::new());
        attrs.record(&mut command_id);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(CommandMark {
                command_id: command_id.0,
                started: Instant::now(),
            });
        }
    }
}

/// Formats one event as a short line: local time, level, the command id when inside a command,
/// the message and the event's own fields, and the command's elapsed time.
pub struct ShortLines {
    /// Whether to colour the level.
    pub ansi: bool,
}

impl<S, N> FormatEvent<S, N> for ShortLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = *event.metadata().level();
        write!(writer, "{} ", chrono::Local::now().format("%H:%M:%S%.3f"))?;
        if self.ansi {
            write!(writer, "{}{level:>5}\x1b[0m ", colour(level))?;
        } else {
            write!(writer, "{level:>5} ")?;
        }
        // Everything after the level is the command's or the event's (ids, messages, errors that
        // quote what a publisher or a provider sent): written through `text::visible`, so an
        // escape sequence or a line break in it cannot reach the terminal or forge a line.
        let mut rest = String::new();
        self.rest(ctx, Writer::new(&mut rest), event)?;
        writeln!(writer, "{}", crate::text::visible(&rest))
    }
}

impl ShortLines {
    /// The part of a line after the level.
    fn rest<S, N>(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        let mark = ctx.event_scope().and_then(|scope| {
            scope.from_root().find_map(|span| {
                span.extensions()
                    .get::<CommandMark>()
                    .map(|m| (m.command_id.clone(), m.started.elapsed()))
            })
        });
        if let Some((command_id, _)) = &mark {
            let shown = if command_id.is_empty() {
                "(no id)"
            } else {
                command_id
            };
            write!(writer, "{shown} ")?;
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        let target = event.metadata().target();
        if !target.starts_with(env!("CARGO_CRATE_NAME")) {
            write!(writer, " [{target}]")?;
        }
        if let Some((_, took)) = mark {
            write!(writer, " ({} ms)", took.as_millis())?;
        }
        Ok(())
    }
}

fn colour(level: Level) -> &'static str {
    match level {
        Level::ERROR => "\x1b[31m",
        Level::WARN => "\x1b[33m",
        Level::INFO => "\x1b[32m",
        Level::DEBUG => "\x1b[34m",
        Level::TRACE => "\x1b[35m",
    }
}
