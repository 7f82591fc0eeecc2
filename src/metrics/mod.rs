//! The worker's figures, as OpenTelemetry instruments: exported over OTLP when configured, and
//! rendered as Prometheus text for `/metrics`. Each worker has its own meter provider, so several
//! workers in one process (tests) keep separate figures.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _, UpDownCounter};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

pub mod openmetrics;

/// The bucket bounds of every duration histogram, in seconds.
const SECONDS_BOUNDARIES: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// The figures exported for one provider (read by the metrics' gauges).
#[derive(Debug, Default)]
pub struct ProviderFigures {
    /// Calls started so far (for the lane's rate in `status`).
    pub started: AtomicU64,
    /// The rate the fleet paces its calls at (configured, or found), in thousandths of a call a
    /// second (0: unpaced).
    pub rate_milli: AtomicI64,
    /// Answers that asked to slow down (429, or 503 with `Retry-After`).
    pub slowed_down: AtomicU64,
    /// The current limit (whole calls).
    pub limit: AtomicI64,
    /// Calls under way.
    pub in_flight: AtomicI64,
    /// Calls waiting for a slot or for a pause to end.
    pub queued: AtomicI64,
    /// 1 while the provider's circuit is open or probing, 0 while closed: an alert fires when it
    /// stays open.
    pub circuit_open: AtomicI64,
}

/// The per-provider figures the metrics export, by provider id.
pub type LaneFigures = std::sync::Mutex<std::collections::BTreeMap<i64, Arc<ProviderFigures>>>;

/// Running totals of this worker's outcomes, readable in-process (the OpenTelemetry counters
/// cannot be read back): for the progress line at a terminal and the heartbeat's status.
#[derive(Debug, Default)]
pub struct Tally {
    /// Commands taken from the queue.
    pub received: AtomicU64,
    /// Links created.
    pub created: AtomicU64,
    /// Commands dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Commands parked in a delay queue.
    pub delayed: AtomicU64,
}

impl Tally {
    /// The totals now: received, created, dead-lettered, delayed.
    pub fn read(&self) -> [u64; 4] {
        [
            self.received.load(Ordering::Relaxed),
            self.created.load(Ordering::Relaxed),
            self.dead_lettered.load(Ordering::Relaxed),
            self.delayed.load(Ordering::Relaxed),
        ]
    }
}

/// Figures read from PostgreSQL and RabbitMQ by a background task, for the gauges.
#[derive(Default)]
pub struct Levels {
    /// Outbox rows not yet confirmed by the broker.
    pub outbox_backlog: AtomicI64,
    /// Messages in the dead-letter queue.
    pub dead_letter_depth: AtomicI64,
    /// Messages waiting in the command queue.
    pub command_queue_depth: AtomicI64,
    /// Age in milliseconds of the oldest command being processed (0 when none).
    pub oldest_processing_age_ms: AtomicI64,
    /// Workers alive now, this one included (from the heartbeat rows).
    pub live_workers: AtomicI64,
    /// Age in milliseconds of the oldest completed command still kept (0 when none).
    pub oldest_kept_age_ms: AtomicI64,
    /// Bytes of the command table (with TOAST and indexes).
    pub commands_bytes: AtomicI64,
    /// Bytes of the outbox.
    pub outbox_bytes: AtomicI64,
    /// Bytes of the dead-letter store.
    pub dead_letters_bytes: AtomicI64,
    /// Tries in a row the dead-letter ingester has failed (0 while it works): readiness and the
    /// figure say when ingestion is stuck.
    pub dead_letter_ingest_failures: AtomicI64,
    /// Age in milliseconds of the oldest event the outbox has still to publish (0 when none):
    /// downstream notifiers have not heard of it yet.
    pub outbox_oldest_unsent_age_ms: AtomicI64,
    /// Milliseconds since the longest-idle replay run marked running last moved (0 when none):
    /// its process died or is stuck.
    pub replay_running_idle_ms: AtomicI64,
    /// Replay runs that ended failed in the last hour.
    pub replay_runs_failed_recent: AtomicI64,
    /// When this replica last finished a retention sweep (or started), in seconds since the Unix
    /// epoch: the fleet's latest says whether the store is kept to its windows.
    pub retention_last_sweep_s: AtomicI64,
}

/// The instruments the worker records to.
pub struct Metrics {
    removed: Counter<u64>,
    received: Counter<u64>,
    succeeded: Counter<u64>,
    failed: Counter<u64>,
    duplicates: Counter<u64>,
    dead_lettered: Counter<u64>,
    retries: Counter<u64>,
    delayed: Counter<u64>,
    panics: Counter<u64>,
    in_flight: UpDownCounter<i64>,
    provider_duration: Histogram<f64>,
    queue_wait: Histogram<f64>,
    time_to_outcome: Histogram<f64>,
    /// Updated by the worker's level task.
    pub levels: Arc<Levels>,
    /// Each provider's concurrency limit and load, updated by its lane.
    pub lanes: Arc<LaneFigures>,
    /// This worker's outcomes so far.
    pub tally: Tally,
    /// A traced sample per bucket of the latency histograms, for OpenMetrics scrapers.
    pub exemplars: openmetrics::Exemplars,
}

/// The metrics of one worker and what renders or exports them.
pub struct MetricsHandle {
    /// The instruments.
    pub metrics: Arc<Metrics>,
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
}

impl MetricsHandle {
    /// Builds the meter provider (Prometheus reader, plus OTLP when configured) and instruments.
    pub fn new() -> anyhow::Result<Self> {
        let (registry, provider) = meter_provider()?;
        let meter = provider.meter(crate::telemetry::SCOPE);
        let levels = level_gauges(&meter);
        let lanes = lane_gauges(&meter);
        let metrics = instruments(&meter, levels, lanes);
        metrics.start_at_zero();
        Ok(Self {
            metrics: Arc::new(metrics),
            registry,
            provider,
        })
    }

    /// The figures in Prometheus text format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// The figures as OpenMetrics, the latency histograms' buckets with exemplars.
    pub fn render_openmetrics(&self) -> String {
        openmetrics::render(&self.render(), &self.metrics.exemplars, &SECONDS_BOUNDARIES)
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(200..=299) => "2xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
        None => "error",
    }
}

impl Metrics {
    /// Puts every counter, and each error kind's, in the output at zero from the start, so a
    /// `rate()` over a fresh worker has no gap before the first command of each kind.
    fn start_at_zero(&self) {
        for counter in [
            &self.received,
            &self.succeeded,
            &self.duplicates,
            &self.retries,
            &self.delayed,
            &self.panics,
        ] {
            counter.add(0, &[]);
        }
        for kind in crate::errors::ErrorKind::ALL {
            let attributes = [KeyValue::new("error.type", kind.as_str())];
            self.dead_lettered.add(0, &attributes);
            self.failed.add(0, &attributes);
        }
        self.in_flight.add(0, &[]);
        for table in ["payment_link_commands", "replay_runs", "audit_log"] {
            self.removed(table, 0);
        }
    }

    /// The retention sweep removed `n` rows of `table`.
    pub fn removed(&self, table: &'static str, n: usize) {
        self.removed
            .add(n as u64, &[KeyValue::new("db.collection.name", table)]);
    }

    /// A command was taken; `waited` is its time in the queue when known.
    pub fn received(&self, waited: Option<Duration>) {
        self.received.add(1, &[]);
        self.tally.received.fetch_add(1, Ordering::Relaxed);
        if let Some(waited) = waited {
            self.queue_wait.record(waited.as_secs_f64(), &[]);
        }
    }
    /// A command got its link, `elapsed` after its first attempt.
    pub fn succeeded(&self, elapsed: Duration) {
        self.succeeded.add(1, &[]);
        self.tally.created.fetch_add(1, Ordering::Relaxed);
        self.time_to_outcome.record(
            elapsed.as_secs_f64(),
            &[KeyValue::new("outcome", "succeeded")],
        );
        let exemplars = &self.exemplars;
        exemplars.offer(1, "succeeded", elapsed.as_secs_f64(), &SECONDS_BOUNDARIES);
    }
    /// A command was dead-lettered with `kind`; `elapsed` after its first attempt when it had one.
    pub fn dead_lettered(&self, kind: &str, elapsed: Option<Duration>) {
        let attributes = [KeyValue::new("error.type", kind.to_owned())];
        self.dead_lettered.add(1, &attributes);
        self.tally.dead_lettered.fetch_add(1, Ordering::Relaxed);
        self.failed.add(1, &attributes);
        if let Some(elapsed) = elapsed {
            self.time_to_outcome.record(
                elapsed.as_secs_f64(),
                &[KeyValue::new("outcome", "dead-lettered")],
            );
            let exemplars = &self.exemplars;
            exemplars.offer(
                1,
                "dead-lettered",
                elapsed.as_secs_f64(),
                &SECONDS_BOUNDARIES,
            );
        }
    }
    /// A repeated command was answered from its record.
    pub fn duplicate(&self) {
        self.duplicates.add(1, &[]);
    }
    /// Processing a delivery panicked.
    pub fn panicked(&self) {
        self.panics.add(1, &[]);
    }
    /// A command went to wait in a delay queue.
    pub fn delayed(&self) {
        self.delayed.add(1, &[]);
        self.tally.delayed.fetch_add(1, Ordering::Relaxed);
    }
    /// A provider call is being retried.
    pub fn retry(&self) {
        self.retries.add(1, &[]);
    }
    /// A provider call ended with `status` (None: no answer) after `elapsed`.
    pub fn provider_call(&self, status: Option<u16>, elapsed: Duration) {
        let mut attributes = vec![
            KeyValue::new("http.request.method", "POST"),
            KeyValue::new("http.status_class", status_class(status)),
        ];
        if let Some(status) = status {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        self.provider_duration
            .record(elapsed.as_secs_f64(), &attributes);
        let series = status.map(|s| s.to_string()).unwrap_or_default();
        let exemplars = &self.exemplars;
        exemplars.offer(0, &series, elapsed.as_secs_f64(), &SECONDS_BOUNDARIES);
    }
    /// Counts a command in flight until the guard is dropped.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.add(1, &[]);
        InFlight(self.clone())
    }
}

/// Held while a command is processed.
pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.add(-1, &[]);
    }
}

/// The meter provider: a Prometheus reader for `/metrics`, and OTLP when it is configured.
fn meter_provider() -> anyhow::Result<(prometheus::Registry, SdkMeterProvider)> {
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

/// The gauges of the levels refreshed on a timer (queue depths, backlog, live workers).
fn level_gauges(meter: &opentelemetry::metrics::Meter) -> Arc<Levels> {
    let levels = Arc::new(Levels::default());
    // A replica that has not swept yet counts from its start, so a fresh fleet is not alerted on.
    levels
        .retention_last_sweep_s
        .store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
    let gauges: [LevelGauge; 14] = [
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
    // Observable instruments live as long as the provider; the handles need not be kept.
    for (name, unit, description, level) in gauges {
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
fn lane_gauges(meter: &opentelemetry::metrics::Meter) -> Arc<LaneFigures> {
    let lanes = Arc::new(LaneFigures::default());
    let per_provider = |name: &'static str,
                        unit: &'static str,
                        description: &'static str,
                        read: fn(&ProviderFigures) -> i64| {
        let lanes = lanes.clone();
        meter
            .i64_observable_gauge(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |observer| {
                for (id, figures) in lanes.lock().expect("lane figures").iter() {
                    observer.observe(read(figures), &[KeyValue::new("payment_provider.id", *id)]);
                }
            })
            .build()
    };
    per_provider(
        "payment_link.provider.concurrency_limit",
        "{call}",
        "Calls a provider may have under way at once (adapted to its answers)",
        |f| f.limit.load(Ordering::Relaxed),
    );
    per_provider(
        "payment_link.provider.in_flight",
        "{call}",
        "Calls under way to a provider",
        |f| f.in_flight.load(Ordering::Relaxed),
    );
    per_provider(
        "payment_link.provider.circuit_open",
        "{state}",
        "1 while a provider's circuit is open or probing (its calls paused), 0 while closed",
        |f| f.circuit_open.load(Ordering::Relaxed),
    );
    let per_provider_count = |name: &'static str,
                              unit: &'static str,
                              description: &'static str,
                              read: fn(&ProviderFigures) -> u64| {
        let lanes = lanes.clone();
        meter
            .u64_observable_counter(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |observer| {
                for (id, figures) in lanes.lock().expect("lane figures").iter() {
                    observer.observe(read(figures), &[KeyValue::new("payment_provider.id", *id)]);
                }
            })
            .build();
    };
    per_provider_count(
        "payment_link.provider.calls",
        "{call}",
        "Calls started to a provider (the share slowed down is read against it)",
        |f| f.started.load(Ordering::Relaxed),
    );
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
                for (id, figures) in lanes.lock().expect("lane figures").iter() {
                    let rate = figures.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0;
                    observer.observe(rate, &[KeyValue::new("payment_provider.id", *id)]);
                }
            }
        })
        .build();
    per_provider_count(
        "payment_link.provider.slowed_down",
        "{answer}",
        "Answers asking to slow down (429, or 503 with Retry-After), by provider",
        |f| f.slowed_down.load(Ordering::Relaxed),
    );
    per_provider(
        "payment_link.provider.queued",
        "{call}",
        "Calls waiting for a provider's concurrency limit or Retry-After pause",
        |f| f.queued.load(Ordering::Relaxed),
    );
    lanes
}

/// The counters and histograms the command path records.
fn instruments(
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
    let seconds = |name: &'static str, description: &'static str| {
        meter
            .f64_histogram(name)
            .with_unit("s")
            .with_description(description)
            .with_boundaries(SECONDS_BOUNDARIES.to_vec())
            .build()
    };
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
        provider_duration: seconds(
            "http.client.request.duration",
            "Provider call duration, by status class",
        ),
        queue_wait: seconds(
            "payment_link.command.queue_wait",
            "Time from publish (timestamp_in_ms header, else the AMQP timestamp) to being taken",
        ),
        time_to_outcome: seconds(
            "payment_link.command.time_to_outcome",
            "Time from the first attempt to success or dead-letter",
        ),
        levels,
        lanes,
        tally: Tally::default(),
        exemplars: openmetrics::Exemplars::default(),
    }
}
