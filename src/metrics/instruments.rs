//! Every instrument the worker exports, defined in one place: its name, unit and description,
//! and the gauges that read the shared figures ([`Levels`], [`LaneFigures`]) when scraped.

use super::{
    LaneFigures, Levels, Metrics, ProviderFigures, SECONDS_BOUNDARIES, Tally, openmetrics,
};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Histogram;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// The meter provider: a Prometheus reader for `/metrics`, and OTLP when it is configured.
pub(super) fn meter_provider() -> anyhow::Result<(prometheus::Registry, SdkMeterProvider)> {
    let registry = prometheus::Registry::new();
    let prometheus = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .without_target_info()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot set up the Prometheus exporter: {e}"))?;
    let mut builder = SdkMeterProvider::builder()
        .with_resource(crate::telemetry::resource())
        .with_reader(prometheus);
    if crate::telemetry::otlp_configured()
        || std::env::var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").is_ok_and(|v| !v.is_empty())
    {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the OTLP metric exporter: {e}"))?;
        builder = builder
            .with_reader(opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build());
    }
    Ok((registry, builder.build()))
}

/// A level's gauge: its name, unit and description, and the level it reads.
type LevelGauge = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Levels) -> &AtomicI64,
);

/// Every level's gauge, read from [`Levels`] when the metrics are collected.
const LEVEL_GAUGES: [LevelGauge; 14] = [
    (
        "payment_link.outbox.backlog",
        "{message}",
        "Events and dead letters in the outbox that the relay has still to publish",
        |l| &l.outbox_backlog,
    ),
    (
        "payment_link.dead_letter.depth",
        "{message}",
        "Messages in the dead-letter queue",
        |l| &l.dead_letter_depth,
    ),
    (
        "payment_link.commands.waiting",
        "{message}",
        "Commands waiting in the command queue",
        |l| &l.command_queue_depth,
    ),
    (
        "payment_link.workers.live",
        "{worker}",
        "Workers alive now, this one included (they share the fleet's rate limits)",
        |l| &l.live_workers,
    ),
    (
        "payment_link.retention.oldest_kept.age",
        "ms",
        "Age of the oldest completed command the store still keeps",
        |l| &l.oldest_kept_age_ms,
    ),
    (
        "payment_link.store.commands.size",
        "By",
        "Bytes of the command table, its TOAST and its indexes",
        |l| &l.commands_bytes,
    ),
    (
        "payment_link.store.outbox.size",
        "By",
        "Bytes of the outbox, its TOAST and its indexes",
        |l| &l.outbox_bytes,
    ),
    (
        "payment_link.store.dead_letters.size",
        "By",
        "Bytes of the dead-letter store, its TOAST and its indexes",
        |l| &l.dead_letters_bytes,
    ),
    (
        "payment_link.dead_letter.ingest.failures",
        "{try}",
        "Tries in a row the dead-letter ingester has failed (0 while it works)",
        |l| &l.dead_letter_ingest_failures,
    ),
    (
        "payment_link.commands.oldest_processing.age",
        "ms",
        "Age of the oldest command being processed",
        |l| &l.oldest_processing_age_ms,
    ),
    (
        "payment_link.outbox.oldest_unsent.age",
        "ms",
        "Age of the oldest event or dead letter the outbox has still to publish (0 when none)",
        |l| &l.outbox_oldest_unsent_age_ms,
    ),
    (
        "payment_link.replay.running.idle",
        "ms",
        "Time since the longest-idle replay run marked running last moved (0 when none)",
        |l| &l.replay_running_idle_ms,
    ),
    (
        "payment_link.replay.runs.failed_recent",
        "{run}",
        "Replay runs that ended failed in the last hour",
        |l| &l.replay_runs_failed_recent,
    ),
    (
        "payment_link.retention.last_sweep",
        "s",
        "When this replica last finished a retention sweep (or started), in Unix seconds",
        |l| &l.retention_last_sweep_s,
    ),
];

/// The gauges of the levels refreshed on a timer (queue depths, backlog, live workers).
pub(super) fn level_gauges(meter: &opentelemetry::metrics::Meter) -> Arc<Levels> {
    let levels = Arc::new(Levels::default());
    // A replica that has not swept yet counts from its start, so a fresh fleet is not alerted on.
    levels
        .retention_last_sweep_s
        .store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
    // Observable instruments live as long as the provider; the handles need not be kept.
    for (name, unit, description, level) in LEVEL_GAUGES {
        let levels = levels.clone();
        meter
            .i64_observable_gauge(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |observer| {
                observer.observe(level(&levels).load(Ordering::Relaxed), &[])
            })
            .build();
    }
    meter
        .i64_observable_gauge("payment_link.broker.connection")
        .with_unit("{connection}")
        .with_description("The RabbitMQ node each broker connection is on (1 per connection)")
        .with_callback(|observer| {
            for (connection, node) in crate::broker::nodes() {
                let attributes = [
                    KeyValue::new("connection", connection),
                    KeyValue::new("server.address", node),
                ];
                observer.observe(1, &attributes);
            }
        })
        .build();
    levels
}

/// The gauges of each provider's lane (its limit, calls under way and waiting).
pub(super) fn lane_gauges(meter: &opentelemetry::metrics::Meter) -> Arc<LaneFigures> {
    let lanes = Arc::new(LaneFigures::default());
    let each = |lanes: &LaneFigures, observe: &mut dyn FnMut(&ProviderFigures, &[KeyValue])| {
        for (id, figures) in lanes.lock().expect("lane figures").iter() {
            observe(figures, &[KeyValue::new("payment_provider.id", *id)]);
        }
    };
    for (name, unit, description, read) in PROVIDER_GAUGES {
        let lanes = lanes.clone();
        meter
            .i64_observable_gauge(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |observer| {
                each(&lanes, &mut |f, at| observer.observe(read(f), at));
            })
            .build();
    }
    for (name, unit, description, read) in PROVIDER_COUNTERS {
        let lanes = lanes.clone();
        meter
            .u64_observable_counter(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |observer| {
                each(&lanes, &mut |f, at| observer.observe(read(f), at));
            })
            .build();
    }
    meter
        .f64_observable_gauge("payment_link.provider.rate")
        .with_unit("{call}/s")
        .with_description(
            "Calls a second the fleet paces a provider at (each worker takes its share): the \
             configured rate, or the one found from the provider's 429s (0: not paced)",
        )
        .with_callback({
            let lanes = lanes.clone();
            move |observer| {
                each(&lanes, &mut |f, at| {
                    observer.observe(f.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0, at)
                });
            }
        })
        .build();
    lanes
}

/// A per-provider instrument: its name, unit and description, and the figure it reads.
type ProviderInstrument<T> = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ProviderFigures) -> T,
);

/// The gauges of each provider's lane.
const PROVIDER_GAUGES: [ProviderInstrument<i64>; 4] = [
    (
        "payment_link.provider.concurrency_limit",
        "{call}",
        "Calls a provider may have under way at once (adapted to its answers)",
        |f| f.limit.load(Ordering::Relaxed),
    ),
    (
        "payment_link.provider.in_flight",
        "{call}",
        "Calls under way to a provider",
        |f| f.in_flight.load(Ordering::Relaxed),
    ),
    (
        "payment_link.provider.circuit_open",
        "{state}",
        "1 while a provider's circuit is open or probing (its calls paused), 0 while closed",
        |f| f.circuit_open.load(Ordering::Relaxed),
    ),
    (
        "payment_link.provider.queued",
        "{call}",
        "Calls waiting for a provider's concurrency limit or Retry-After pause",
        |f| f.queued.load(Ordering::Relaxed),
    ),
];

/// The counters of each provider's lane.
const PROVIDER_COUNTERS: [ProviderInstrument<u64>; 2] = [
    (
        "payment_link.provider.calls",
        "{call}",
        "Calls started to a provider (the share slowed down is read against it)",
        |f| f.started.load(Ordering::Relaxed),
    ),
    (
        "payment_link.provider.slowed_down",
        "{answer}",
        "Answers asking to slow down (429, or 503 with Retry-After), by provider",
        |f| f.slowed_down.load(Ordering::Relaxed),
    ),
];

/// The counters and histograms the command path records.
pub(super) fn instruments(
    meter: &opentelemetry::metrics::Meter,
    levels: Arc<Levels>,
    lanes: Arc<LaneFigures>,
) -> Metrics {
    let counter = |name: &'static str, description: &'static str| {
        meter
            .u64_counter(name)
            .with_unit("{command}")
            .with_description(description)
            .build()
    };
    let (provider_duration, queue_wait, time_to_outcome) = durations(meter);
    Metrics {
        removed: meter
            .u64_counter("payment_link.retention.removed")
            .with_unit("{row}")
            .with_description("Rows removed by the retention sweep, by table")
            .build(),
        received: counter(
            "payment_link.commands.received",
            "Commands taken from the queue",
        ),
        succeeded: counter(
            "payment_link.commands.succeeded",
            "Commands that got their link",
        ),
        failed: counter(
            "payment_link.commands.failed",
            "Commands that ended without a link, by error kind",
        ),
        replays_settled: counter(
            "payment_link.replays.settled",
            "Replayed commands that got their link or failed again, by outcome (and error kind)",
        ),
        duplicates: counter(
            "payment_link.commands.duplicates",
            "Repeated commands answered from the record, without a provider call",
        ),
        dead_lettered: counter(
            "payment_link.commands.dead_lettered",
            "Commands dead-lettered, by error kind",
        ),
        retries: counter(
            "payment_link.provider.retries",
            "Provider calls retried after a transient failure",
        ),
        delayed: counter(
            "payment_link.commands.delayed",
            "Commands parked in a delay queue for another round",
        ),
        panics: counter(
            "payment_link.commands.panics",
            "Deliveries whose processing panicked (rejected; the delivery limit applies)",
        ),
        in_flight: meter
            .i64_up_down_counter("payment_link.commands.in_flight")
            .with_unit("{command}")
            .with_description("Commands being processed")
            .build(),
        provider_duration,
        queue_wait,
        time_to_outcome,
        levels,
        lanes,
        tally: Tally::default(),
        exemplars: openmetrics::Exemplars::default(),
    }
}

/// The command path's durations: the provider call, the wait in the queue, and the time to an
/// outcome, in seconds.
fn durations(
    meter: &opentelemetry::metrics::Meter,
) -> (Histogram<f64>, Histogram<f64>, Histogram<f64>) {
    let seconds = |name: &'static str, description: &'static str| {
        meter
            .f64_histogram(name)
            .with_unit("s")
            .with_description(description)
            .with_boundaries(SECONDS_BOUNDARIES.to_vec())
            .build()
    };
    (
        seconds(
            "http.client.request.duration",
            "Provider call duration, by status class",
        ),
        seconds(
            "payment_link.command.queue_wait",
            "Time from publish (timestamp_in_ms header, else the AMQP timestamp) to being taken",
        ),
        seconds(
            "payment_link.command.time_to_outcome",
            "Time from the first attempt to success or dead-letter",
        ),
    )
}
