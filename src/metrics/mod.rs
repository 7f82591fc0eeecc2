//! The worker's figures, as OpenTelemetry instruments: exported over OTLP when configured, and
//! rendered as Prometheus text for `/metrics`. Each worker has its own meter provider, so several
//! workers in one process (tests) keep separate figures.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _, UpDownCounter};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

mod instruments;
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
    /// Replayed commands (a replay count above 0) that settled, by outcome.
    replays_settled: Counter<u64>,
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
        let (registry, provider) = instruments::meter_provider()?;
        let meter = provider.meter(crate::telemetry::SCOPE);
        let levels = instruments::level_gauges(&meter);
        let lanes = instruments::lane_gauges(&meter);
        let metrics = instruments::instruments(&meter, levels, lanes);
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
        self.replays_settled
            .add(0, &[KeyValue::new("outcome", "succeeded")]);
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
    /// A replayed command settled: its link (`failed_kind` none) or failed again, with the kind.
    /// What a replay run's automatic stop reads from the store, counted for dashboards.
    pub fn replay_settled(&self, failed_kind: Option<&str>) {
        let attributes = match failed_kind {
            None => vec![KeyValue::new("outcome", "succeeded")],
            Some(kind) => vec![
                KeyValue::new("outcome", "failed-again"),
                KeyValue::new("error.type", kind.to_owned()),
            ],
        };
        self.replays_settled.add(1, &attributes);
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
