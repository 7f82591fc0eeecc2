//! Logs and traces. Logs are JSON lines for machines or short lines for people (at a terminal
//! by default, see [`short`]); each line of a
//! command's processing carries its command id, correlation id and trace id through the command's
//! span. Traces go to OpenTelemetry and are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; without it spans still carry trace context
//! from the command to the provider and the event, and nothing is exported.
//!
//! W3C trace context travels in AMQP headers (`traceparent`, `tracestate`) and HTTP headers; the
//! helpers here read and write it.

pub mod short;

use crate::config::{LogFormat, LogSettings};
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Whether a command's child spans (database steps, provider calls, publishes) are made: only
/// when spans go somewhere (an OTLP exporter, or a test's in-memory exporter). Building them for
/// nobody cost a noticeable share of the worker's CPU per command at the default `info` level.
static CHILD_SPANS: AtomicBool = AtomicBool::new(false);

/// See [`CHILD_SPANS`].
pub fn child_spans() -> bool {
    CHILD_SPANS.load(Ordering::Relaxed)
}

/// Name of the instrumentation scope of this crate's spans and metrics.
pub const SCOPE: &str = "payment-link-worker";

/// Keeps the tracer provider alive; flushes and shuts it down when dropped.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Whether OTLP export is configured through the standard variables.
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|v| !v.trim().is_empty()))
}

/// The resource every signal is tagged with (`OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
/// win over the default service name).
pub fn resource() -> opentelemetry_sdk::Resource {
    let builder = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        builder.build()
    } else {
        builder.with_service_name(SCOPE).build()
    }
}

fn filter(settings: &LogSettings) -> EnvFilter {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|env| EnvFilter::try_new(env).is_ok())
        .unwrap_or_else(|| settings.level.clone());
    // lapin logs every returned (unroutable) message in full, payload included, and logs each
    // connection failure at ERROR before the worker reports it in one line of its own: it is
    // heard only when the directives name it.
    let quiet = if directives.contains("lapin") {
        "lapin::returned_messages=error"
    } else {
        "lapin=off"
    };
    EnvFilter::try_new(format!("{directives},{quiet}")).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber: the log layer and the OpenTelemetry layer. Call once, from
/// the binary; keep the guard until the process ends.
pub fn init(settings: &LogSettings) -> anyhow::Result<TelemetryGuard> {
    crate::repeats::set_interval(std::time::Duration::from_millis(
        settings.summary_interval_ms,
    ));
    let mut builder = SdkTracerProvider::builder().with_resource(resource());
    if otlp_configured() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the OTLP trace exporter: {e}"))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    install(settings, provider.tracer(SCOPE));
    // The command span stays (its trace id is logged and propagated); its children are made only
    // when exported.
    CHILD_SPANS.store(otlp_configured(), Ordering::Relaxed);
    Ok(TelemetryGuard { provider })
}

/// How logs are written, once `auto` is resolved against where stderr goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Output {
    /// JSON lines (for machines) or short lines (for people).
    pub json: bool,
    /// Whether the short lines are coloured.
    pub ansi: bool,
}

impl Output {
    /// `auto` means short coloured lines at a terminal and JSON lines elsewhere; `text` is
    /// coloured only at a terminal; `NO_COLOR` turns colour off.
    pub fn resolve(format: LogFormat, terminal: bool, no_color: bool) -> Self {
        let json = match format {
            LogFormat::Json => true,
            LogFormat::Text => false,
            LogFormat::Auto => !terminal,
        };
        Self {
            json,
            ansi: !json && terminal && !no_color,
        }
    }

    /// Resolved for this process's stderr and environment.
    pub fn for_stderr(format: LogFormat) -> Self {
        use std::io::IsTerminal;
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self::resolve(format, std::io::stderr().is_terminal(), no_color)
    }
}

/// Whether the log writes JSON lines, so the fatal line matches them.
static JSON_LINES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes the error that ends the program on stderr, in the log's format: a JSON line where the
/// log writes JSON lines (one format per stream for a log collector), else one plain line.
pub fn fatal(error: &anyhow::Error) {
    let text = format!("payment-link-worker: {error:#}");
    if JSON_LINES.load(Ordering::Relaxed) {
        let line = serde_json::json!({
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "level": "ERROR",
            "message": text,
            "target": "payment_link_worker",
        });
        eprintln!("{line}");
    } else {
        eprintln!("{text}");
    }
}

/// Makes [`fatal`] write a plain line whatever the log format: for the tools (`send`, `status`,
/// `dead-letters`…), whose error a person or a script reads, not a log collector.
pub fn fatal_as_text() {
    JSON_LINES.store(false, Ordering::Relaxed);
}

/// Installs the global subscriber with a given tracer (tests pass one that records in memory).
pub fn install(settings: &LogSettings, tracer: opentelemetry_sdk::trace::SdkTracer) {
    CHILD_SPANS.store(true, Ordering::Relaxed);
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let registry = tracing_subscriber::registry()
        .with(filter(settings))
        .with(otel);
    let output = Output::for_stderr(settings.format);
    // The log layer records only the command span: every other span (database steps, provider
    // calls, publishes) is for the trace, and formatting its fields for the log, for every
    // command, cost more CPU than the rest of the command's processing (measured with the
    // benchmark's shipped-defaults phase).
    let logged_spans = || {
        tracing_subscriber::filter::filter_fn(|meta| {
            !meta.is_span() || meta.name() == short::COMMAND_SPAN
        })
    };
    JSON_LINES.store(output.json, Ordering::Relaxed);
    let _ = if output.json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr)
                    .with_filter(logged_spans()),
            )
            .try_init()
    } else {
        registry
            .with(short::MarkCommands)
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(short::ShortLines { ansi: output.ansi })
                    .with_ansi(output.ansi)
                    .with_writer(std::io::stderr)
                    .with_filter(logged_spans()),
            )
            .try_init()
    };
}

/// Reads trace context from AMQP headers.
struct HeaderReader<'a>(Option<&'a FieldTable>);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0?.inner().get(key)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .map(|h| h.inner().keys().map(|k| k.as_str()).collect())
            .unwrap_or_default()
    }
}

/// The trace context a message carries (an empty context when it carries none).
pub fn extract(headers: Option<&FieldTable>) -> Context {
    TraceContextPropagator::new().extract(&HeaderReader(headers))
}

/// The current span's trace context as HTTP header pairs.
pub fn current_http_headers() -> Vec<(String, String)> {
    let context = tracing::Span::current().context();
    let mut pairs = Vec::new();
    struct Pairs<'a>(&'a mut Vec<(String, String)>);
    impl Injector for Pairs<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.push((key.to_owned(), value));
        }
    }
    TraceContextPropagator::new().inject_context(&context, &mut Pairs(&mut pairs));
    // The propagator writes `tracestate` even when it is empty; an empty header says nothing.
    pairs.retain(|(_, value)| !value.is_empty());
    pairs
}

/// The W3C trace context headers a message carries, as (name, value) pairs.
pub fn carried(headers: Option<&FieldTable>) -> Vec<(String, String)> {
    let reader = HeaderReader(headers);
    ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| {
            reader
                .get(name)
                .filter(|value| !value.is_empty())
                .map(|value| (name.to_owned(), value.to_owned()))
        })
        .collect()
}

/// Trace context for an outgoing message or request: the current span's, or, when no
/// OpenTelemetry layer is installed (the library used on its own), the `carried` context as it
/// came, so the trace id still reaches the provider and the notifier.
pub fn outgoing(carried: &[(String, String)]) -> Vec<(String, String)> {
    let current = current_http_headers();
    if current.is_empty() {
        carried.to_vec()
    } else {
        current
    }
}

/// The trace id of a span, as logged (empty when tracing is not installed).
pub fn trace_id(span: &tracing::Span) -> String {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span_context.trace_id().to_string()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_short_and_coloured_at_a_terminal_and_json_elsewhere() {
        let at = |format, terminal, no_color| Output::resolve(format, terminal, no_color);
        let short_coloured = Output {
            json: false,
            ansi: true,
        };
        let short_plain = Output {
            json: false,
            ansi: false,
        };
        let json = Output {
            json: true,
            ansi: false,
        };
        assert_eq!(at(LogFormat::Auto, true, false), short_coloured);
        assert_eq!(at(LogFormat::Auto, false, false), json);
        assert_eq!(at(LogFormat::Auto, true, true), short_plain);
        assert_eq!(at(LogFormat::Text, false, false), short_plain);
        assert_eq!(at(LogFormat::Text, true, false), short_coloured);
        assert_eq!(at(LogFormat::Json, true, false), json);
    }
}
