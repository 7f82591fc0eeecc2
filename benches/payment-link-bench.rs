//! The benchmark: measures the real worker binary against the local RabbitMQ, PostgreSQL and the
//! provider simulator, next to the broker's own ceiling measured in the same run, and prints a
//! table and JSON. Run with `cargo bench --bench payment-link-bench` (release profile; `-- --help`
//! lists the flags); see the README's Benchmark section.
//!
//! Phases: (1) the broker-only ceiling: N messages through consume → publish with confirm → ack,
//! no database and no HTTP, with lapin; (2) end-to-end throughput of the worker on N pre-loaded
//! commands, with its CPU time and peak memory; (3) publish-to-event latency under a steady
//! offered load below saturation; (4) throughput with 100 ms of provider latency.

// A test or a benchmark fails loudly, and should, on what it did not expect.
#![allow(clippy::unwrap_used)]

use anyhow::Context as _;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use payment_link_worker::headers::text;
use payment_link_worker::provider::sim::{self, SimOptions};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "bench-token";

/// Measures the worker against the local RabbitMQ and PostgreSQL; prints a table and JSON.
#[derive(clap::Parser)]
#[command(
    name = "payment-link-bench",
    bin_name = "cargo bench --bench payment-link-bench --"
)]
struct Options {
    /// Commands in the broker-only and end-to-end phases.
    #[arg(long, default_value_t = 20_000)]
    commands: usize,
    /// The worker's prefetch (commands in flight).
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// Commands offered in the latency phase.
    #[arg(long, default_value_t = 3_000)]
    latency_commands: usize,
    /// Commands in the phase with 100 ms of provider latency.
    #[arg(long, default_value_t = 5_000)]
    slow_commands: usize,
    /// The provider's rate limit in the configured rate-limited phase (calls per second; 10 s of
    /// commands).
    #[arg(long, default_value_t = 300)]
    rate_limit: u32,
    /// The provider's rate limit in the phases where the workers must find it themselves.
    #[arg(long, default_value_t = 200)]
    found_rate_limit: u32,
    /// Commands in each phase where the workers must find the limit.
    #[arg(long, default_value_t = 3_000)]
    found_commands: usize,
    /// Seconds each limit holds in the phase where the limit changes (200, 100, then 300 a
    /// second, scaled to --found-rate-limit).
    #[arg(long, default_value_t = 20)]
    change_stage_s: u64,
    /// Print only the JSON.
    #[arg(long = "json")]
    json_only: bool,
    /// Run only the phases where the workers find a provider's rate limit themselves, and print
    /// each second's links and 429s.
    #[arg(long)]
    only_found_rate: bool,
    /// Run only the one-provider-down phases: the healthy provider beside a down one, the down
    /// one's commands parked alone, and the healthy ones alone.
    #[arg(long)]
    only_one_down: bool,
    /// Run only the storage phases: the shipped defaults on a fresh table, with this many
    /// completed commands already stored (filled with SQL), and while a sweep removes
    /// --sweep-backlog expired ones.
    #[arg(long, value_name = "N")]
    stored: Option<usize>,
    /// Expired completed commands for the storage phases' sweep to remove.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    sweep_backlog: usize,
    /// Commands in the sweep phase and in the fresh-table phase it is compared with: enough to
    /// outlast the sweep of the backlog.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    sweep_commands: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[path = "../tests/common/sandbox.rs"]
mod sandbox;

use sandbox::{Sandbox, amqp_url};

/// How the worker is configured for a phase.
#[derive(Clone, Copy)]
enum Tuning {
    /// This prefetch and log level `warn`.
    Tuned(u16),
    /// The shipped `config/default.toml` as it is (prefetch and `info` logging, JSON lines
    /// written to a sink, as under a log collector).
    Shipped,
}

/// A run's private names, database and simulator (the same sandbox the tests use).
struct Run {
    sandbox: Sandbox,
    sim_stop: CancellationToken,
    tuning: Tuning,
}

impl Run {
    async fn new(tuning: Tuning, latency: Duration) -> anyhow::Result<Self> {
        let sim = SimOptions {
            latency,
            ..SimOptions::default()
        };
        Self::with(tuning, sim, &[]).await
    }

    /// A run whose simulator behaves as `sim` says (the token is set here), with extra
    /// `PAYMENT_LINK_WORKER__` overrides for the worker.
    async fn with(tuning: Tuning, sim: SimOptions, extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sim_url = format!("http://{}", listener.local_addr()?);
        let sim_stop = CancellationToken::new();
        let sim = SimOptions {
            token: TOKEN.into(),
            ..sim
        };
        tokio::spawn(sim::serve(listener, sim, sim_stop.clone()));
        let mut overrides = vec![
            ("RETRY__DELAY_TIERS_MS", ""),
            ("TELEMETRY__HTTP_LISTEN", ""),
        ];
        let prefetch;
        if let Tuning::Tuned(p) = tuning {
            prefetch = p.to_string();
            overrides.extend([
                ("BROKER__PREFETCH", prefetch.as_str()),
                ("DATABASE__POOL_SIZE", "16"),
                ("LOG__LEVEL", "warn"),
            ]);
        }
        overrides.extend(extra);
        let sandbox = Sandbox::create("bench", &sim_url, TOKEN, &overrides)
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(Self {
            sandbox,
            sim_stop,
            tuning,
        })
    }

    /// The simulator's address, as the worker is given it.
    fn sim_url(&self) -> anyhow::Result<String> {
        self.sandbox
            .env
            .iter()
            .find(|(k, _)| k == "PROVIDER_BASE_URL")
            .map(|(_, v)| v.clone())
            .context("no provider URL")
    }

    fn settings(&self) -> anyhow::Result<payment_link_worker::config::Settings> {
        self.sandbox.settings().map_err(anyhow::Error::msg)
    }

    fn start_worker(&self) -> anyhow::Result<Child> {
        // Cargo builds the worker binary for the benchmark, in the benchmark's profile.
        let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_payment-link-worker"));
        Command::new(&exe)
            .arg("run")
            .envs(self.sandbox.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(match self.tuning {
                Tuning::Tuned(_) => Stdio::inherit(),
                Tuning::Shipped => Stdio::null(),
            })
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))
    }

    /// Declares the worker's topology and a queue capturing its events; returns that queue.
    async fn declare(
        &self,
        connection: &Connection,
        channel: &Channel,
        settings: &payment_link_worker::config::Settings,
    ) -> anyhow::Result<String> {
        let declared =
            payment_link_worker::broker::topology::declare(connection, &settings.broker).await?;
        let _ = declared.close(200, "declared".into()).await;
        let events = self.events_queue();
        event_queue(channel, &settings.broker.event_exchange, &events).await?;
        Ok(events)
    }

    fn events_queue(&self) -> String {
        format!("bench.{}.events-capture", self.sandbox.id)
    }

    async fn cleanup(&self) {
        self.sim_stop.cancel();
        // The events queue is the benchmark connection's own (exclusive): it goes with it.
        if let Ok(settings) = self.settings() {
            sandbox::remove(&self.sandbox.database, &settings, Vec::new()).await;
        }
    }
}

/// Where the machine's CPU time goes, by the program that spent it (RabbitMQ, PostgreSQL, the
/// worker, this benchmark with its simulator); everything else is counted as `other`.
#[derive(Clone, Copy, Default)]
struct CpuSplit {
    broker: f64,
    database: f64,
    worker: f64,
    bench: f64,
    other: f64,
}

impl CpuSplit {
    /// CPU seconds spent so far by every live process, grouped.
    fn now() -> Self {
        let mut split = Self::default();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return split;
        };
        // This process is the benchmark whatever Cargo named its executable.
        let own_pid = std::process::id().to_string();
        for entry in dir.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let own = name.to_string_lossy() == own_pid;
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((head, tail)) = stat.rsplit_once(')') else {
                continue;
            };
            let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
            let fields: Vec<&str> = tail.split_whitespace().collect();
            let ticks = |i: usize| {
                fields
                    .get(i)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            let seconds = (ticks(11) + ticks(12)) / 100.0;
            let slot = match comm {
                _ if own => &mut split.bench,
                "beam.smp" | "erl_child_setup" | "inet_gethost" | "epmd" => &mut split.broker,
                "postgres" => &mut split.database,
                c if c.starts_with("payment-link-wo") => &mut split.worker,
                c if c.starts_with("payment-link-be") => &mut split.bench,
                _ => &mut split.other,
            };
            *slot += seconds;
        }
        split
    }

    /// What was spent since `earlier`, per 1,000 messages out of `n`.
    fn per_1000_since(self, earlier: Self, n: usize) -> Self {
        let k = 1000.0 / n as f64;
        Self {
            broker: (self.broker - earlier.broker) * k,
            database: (self.database - earlier.database) * k,
            worker: (self.worker - earlier.worker) * k,
            bench: (self.bench - earlier.bench) * k,
            other: (self.other - earlier.other).max(0.0) * k,
        }
    }

    fn total(&self) -> f64 {
        self.broker + self.database + self.worker + self.bench + self.other
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "rabbitmq": self.broker,
            "postgresql": self.database,
            "worker": self.worker,
            "benchmark_and_simulator": self.bench,
            "other": self.other,
            "total": self.total(),
        })
    }

    fn row(&self) -> String {
        format!(
            "{:.3} s: RabbitMQ {:.3}, PostgreSQL {:.3}, worker {:.3}, benchmark + simulator {:.3}, other {:.3}",
            self.total(),
            self.broker,
            self.database,
            self.worker,
            self.bench,
            self.other
        )
    }
}

/// CPU seconds (user + system) and peak resident memory of a process, from /proc.
fn cpu_and_peak_rss(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    (ticks / 100.0, hwm_kb * 1024)
}

async fn confirm_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes `n` commands, confirmed in windows so the broker is kept busy.
async fn preload(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    prefix: &str,
    n: usize,
) -> anyhow::Result<()> {
    preload_for(channel, (exchange, routing_key), prefix, n, |_| 1).await
}

/// As [`preload`], command `i` for provider `provider(i)`.
async fn preload_for(
    channel: &Channel,
    (exchange, routing_key): (&str, &str),
    prefix: &str,
    n: usize,
    provider: impl Fn(usize) -> i64,
) -> anyhow::Result<()> {
    let mut pending = Vec::with_capacity(512);
    for i in 0..n {
        let body = format!(
            r#"{{"paymentProviderId":{},"amountInMajorCurrency":{}.{:02},"description":"Invoice {i}","invoiceId":{}}}"#,
            provider(i),
            i % 10_000 + 1,
            i % 100,
            i + 1
        );
        let properties = BasicProperties::default()
            .with_message_id(format!("{prefix}-{i}").into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        pending.push(
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties,
                )
                .await?,
        );
        if pending.len() == 512 {
            for confirm in pending.drain(..) {
                confirm.await?;
            }
        }
    }
    for confirm in pending {
        confirm.await?;
    }
    Ok(())
}

/// A queue bound to the event exchange, to receive the events.
async fn event_queue(channel: &Channel, exchange: &str, name: &str) -> anyhow::Result<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            name.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Phase 1: the same number of messages through consume → publish with confirm → ack.
async fn broker_ceiling(
    connection: &Connection,
    n: usize,
    prefetch: u16,
) -> anyhow::Result<(f64, CpuSplit)> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (input, output) = (format!("bench.{id}.in"), format!("bench.{id}.out"));
    let channel = confirm_channel(connection).await?;
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), text("quorum"));
    for q in [&input, &output] {
        channel
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                quorum.clone(),
            )
            .await?;
    }
    preload(&channel, "", &input, "ceiling", n).await?;
    let consumer_channel = connection.create_channel().await?;
    consumer_channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            input.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let publisher = confirm_channel(connection).await?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = None;
    let cpu_before = CpuSplit::now();
    for _ in 0..n {
        let delivery = consumer.next().await.context("consumer ended")??;
        started.get_or_insert_with(Instant::now);
        let publisher = publisher.clone();
        let output = output.clone();
        tasks.spawn(async move {
            let confirm = publisher
                .basic_publish(
                    "".into(),
                    output.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &delivery.data,
                    delivery.properties.clone().with_delivery_mode(2),
                )
                .await?
                .await?;
            anyhow::ensure!(confirm.is_ack(), "not confirmed");
            delivery.acker.ack(BasicAckOptions::default()).await?;
            Ok::<_, anyhow::Error>(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let elapsed = started.unwrap().elapsed().as_secs_f64();
    let cpu = CpuSplit::now().per_1000_since(cpu_before, n);
    for q in [&input, &output] {
        channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    Ok((n as f64 / elapsed, cpu))
}

/// Result of an end-to-end phase.
struct EndToEnd {
    throughput: f64,
    /// The whole machine's CPU time per 1,000 commands, by program.
    cpu: CpuSplit,
    cpu_seconds_per_1000: f64,
    peak_rss_bytes: u64,
}

/// Phases 2 and 4: pre-load `n` commands, run the worker, wait for every event.
async fn end_to_end(
    connection: &Connection,
    n: usize,
    tuning: Tuning,
    latency: Duration,
) -> anyhow::Result<EndToEnd> {
    let sim = SimOptions {
        latency,
        ..SimOptions::default()
    };
    let run = Run::with(tuning, sim, &[]).await?;
    end_to_end_on(connection, run, n, Stored::default()).await
}

/// Completed commands stored with SQL before the worker starts.
#[derive(Clone, Copy, Default)]
struct Stored {
    /// How many.
    rows: usize,
    /// How long ago they completed ("1 day": kept; "40 days": past the window).
    completed_ago: &'static str,
}

/// Fills the run's database with `stored` completed commands shaped like the worker's own rows
/// (request, provider answer and event properties of the same sizes).
async fn fill(run: &Run, stored: Stored) -> anyhow::Result<()> {
    if stored.rows == 0 {
        return Ok(());
    }
    let settings = run.settings()?;
    let pool = payment_link_worker::store::pool(&settings.database)?;
    payment_link_worker::store::migrate(&pool).await?;
    drop(pool);
    let url = settings.database.url.expose().to_owned();
    let chunk = 500_000;
    for start in (0..stored.rows).step_by(chunk) {
        let end = (start + chunk).min(stored.rows);
        let sql = format!(
            "INSERT INTO payment_link_commands (command_id, canonical_request, payment_provider_id, \
                 amount_in_major_currency, description, invoice_id, correlation_id, status, attempts, \
                 link_id, payment_link, provider_response, event_exchange, event_routing_key, \
                 event_properties, created_at, updated_at, completed_at) \
             SELECT 'stored-' || i, \
                 '{{\"amountInMajorCurrency\":' || (i % 10000 + 1) || '.00,\"description\":\"Invoice ' || i || '\",\"invoiceId\":' || i || ',\"paymentProviderId\":1}}', \
                 1, i % 10000 + 1, 'Invoice ' || i, i, 'stored-' || i, 'succeeded', 1, i, \
                 'https://pay.example/' || md5(i::text), \
                 '{{\"id\":' || i || ',\"paymentLink\":\"https://pay.example/' || md5(i::text) || '\",\"amountInMajorCurrency\":' || (i % 10000 + 1) || '.00,\"description\":\"Invoice ' || i || '\",\"invoiceId\":' || i || ',\"status\":\"created\",\"createdAt\":\"2026-12-06T00:00:00Z\"}}', \
                 'payment-links.events', 'payment-link.created', \
                 ('{{\"content_type\":\"application/json\",\"delivery_mode\":2,\"message_id\":\"' || md5('e' || i) || '\",\"correlation_id\":\"stored-' || i || '\",\"timestamp\":1764979200,\"type\":\"payment-link.created\",\"app_id\":\"payment-link-worker\",\"headers\":{{\"cloudEvents:specversion\":\"1.0\",\"cloudEvents:id\":\"' || md5('e' || i) || '\",\"cloudEvents:source\":\"urn:payment-link-worker\",\"cloudEvents:type\":\"payment-link.created\",\"cloudEvents:subject\":\"stored-' || i || '\",\"cloudEvents:time\":\"2026-12-06T00:00:00.000Z\",\"traceparent\":\"00-' || md5('t' || i) || '-' || substr(md5('s' || i), 1, 16) || '-01\"}}}}')::jsonb, \
                 now() - interval '{ago}', now() - interval '{ago}', now() - interval '{ago}' \
             FROM generate_series({from}, {to}) AS i",
            ago = stored.completed_ago,
            from = start + 1,
            to = end,
        );
        sandbox::exec_admin(&url, &sql)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    // As a store that grew over time would be: its pages written out, its statistics current
    // (the measurement must not be of a checkpoint flushing the bulk load).
    for sql in ["VACUUM ANALYZE payment_link_commands", "CHECKPOINT"] {
        sandbox::exec_admin(&url, sql)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// Bytes per command of the command table (with TOAST and indexes), and how many rows it holds.
async fn bytes_per_command(run: &Run) -> anyhow::Result<(f64, i64)> {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Size {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        bytes: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        rows: i64,
    }
    let settings = run.settings()?;
    let pool = payment_link_worker::store::pool(&settings.database)?;
    let mut conn = pool.get().await?;
    let size: Size = diesel::sql_query(
        "SELECT pg_total_relation_size('payment_link_commands') AS bytes, \
                (SELECT count(*) FROM payment_link_commands) AS rows",
    )
    .get_result(&mut conn)
    .await?;
    Ok((size.bytes as f64 / size.rows.max(1) as f64, size.rows))
}

/// [`end_to_end`] on a run made by the caller, after `stored` is filled.
async fn end_to_end_on(
    connection: &Connection,
    run: Run,
    n: usize,
    stored: Stored,
) -> anyhow::Result<EndToEnd> {
    let settings = run.settings()?;
    let channel = confirm_channel(connection).await?;
    let result = async {
        fill(&run, stored).await?;
        let events = run.declare(connection, &channel, &settings).await?;
        preload(
            &channel,
            &settings.broker.command_exchange,
            &settings.broker.command_routing_key,
            "e2e",
            n,
        )
        .await?;
        let cpu_before = CpuSplit::now();
        let mut child = run.start_worker()?;
        let pid = child.id();
        let consumer_channel = connection.create_channel().await?;
        consumer_channel
            .basic_qos(1000, BasicQosOptions::default())
            .await?;
        let mut consumer = consumer_channel
            .basic_consume(
                events.as_str().into(),
                "bench-events".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut first: Option<Instant> = None;
        let mut got = 0;
        let mut peak = 0;
        let limit = Duration::from_secs(600);
        let start = Instant::now();
        while got < n {
            anyhow::ensure!(
                start.elapsed() < limit,
                "only {got} of {n} events within {limit:?}"
            );
            match tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
                Ok(Some(delivery)) => {
                    delivery?;
                    // The first event marks (within one command's processing time) the first
                    // command taken.
                    first.get_or_insert_with(Instant::now);
                    got += 1;
                }
                Ok(None) => anyhow::bail!("event consumer ended"),
                Err(_) => {}
            }
            if got % 500 == 0 {
                peak = peak.max(cpu_and_peak_rss(pid).1);
            }
        }
        let elapsed = first.unwrap().elapsed().as_secs_f64();
        let (cpu, rss) = cpu_and_peak_rss(pid);
        let split = CpuSplit::now().per_1000_since(cpu_before, n);
        child.kill()?;
        child.wait()?;
        Ok::<_, anyhow::Error>(EndToEnd {
            throughput: n as f64 / elapsed,
            cpu: split,
            cpu_seconds_per_1000: cpu / n as f64 * 1000.0,
            peak_rss_bytes: rss.max(peak),
        })
    }
    .await;
    run.cleanup().await;
    result
}

/// Waits for `n` created events on `queue`; returns the seconds from the first to the last.
async fn created_events(connection: &Connection, queue: &str, n: usize) -> anyhow::Result<f64> {
    let channel = connection.create_channel().await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench-phase".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let (mut first, mut got) = (None, 0);
    let limit = Instant::now() + Duration::from_secs(900);
    while got < n {
        anyhow::ensure!(Instant::now() < limit, "only {got} of {n} events");
        match tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
            Ok(Some(delivery)) => {
                let delivery = delivery?;
                if delivery.properties.kind().as_ref().map(|k| k.as_str())
                    == Some("payment-link.created")
                {
                    first.get_or_insert_with(Instant::now);
                    got += 1;
                }
            }
            Ok(None) => anyhow::bail!("event consumer ended"),
            Err(_) => {}
        }
    }
    let _ = channel.close(200, "phase done".into()).await;
    Ok(first.map_or(0.0, |f| f.elapsed().as_secs_f64()))
}

/// The simulator's counters, read over HTTP.
async fn sim_stats(run: &Run) -> anyhow::Result<serde_json::Value> {
    let url = run.sim_url()?;
    let text = reqwest::get(format!("{url}/_sim/stats"))
        .await?
        .text()
        .await?;
    Ok(serde_json::from_str(&text)?)
}

/// A rate-limited provider: the simulator answers 429 above `limits[0]` calls a second (with
/// `Retry-After: 1`, or without), then above each next limit `stage` later; two replicas at the
/// shipped defaults, told the limit (`configured`) or left to find it.
struct Limited {
    n: usize,
    limits: Vec<u32>,
    stage: Duration,
    configured: bool,
    retry_after: bool,
    latency: Duration,
}

/// What a rate-limited phase measured.
#[derive(Default)]
struct LimitedOutcome {
    /// Commands a second from the first event to the last (single-limit phases).
    throughput: f64,
    /// Share of the provider's answers that were 429.
    share_429: f64,
    /// Commands the workers parked in a delay queue, and dead-lettered.
    delayed: i64,
    dead_lettered: i64,
    /// After each change of the limit: the new limit, the links a second made in the 10th second
    /// after it, and the first whole second after it within 15 % of the new limit.
    changes: Vec<(u32, f64, Option<u32>)>,
    /// Each second of the load: links made, calls answered 429.
    timeline: Vec<(u32, f64, f64)>,
}

/// Where a found-rate phase's time and 429s went: the first contact (its first two seconds:
/// slow start's overshoot and the `Retry-After` pause it earns), the probes above the found rate
/// after it, and the pace between them.
struct Split {
    first_429: f64,
    first_lost_s: f64,
    later_429: f64,
    probes: usize,
    later_lost_s: f64,
    /// Links a second over the whole seconds with no 429 in them or in the second before.
    pace: f64,
}

impl Split {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "first_contact_429": self.first_429,
            "first_contact_lost_s": self.first_lost_s,
            "later_429": self.later_429,
            "probes": self.probes,
            "later_lost_s": self.later_lost_s,
            "pace_per_s": self.pace,
        })
    }
}

impl LimitedOutcome {
    /// A found-rate phase in the JSON report: against `limit`, `commands` of them, with its
    /// throughput target as a fraction of the limit.
    fn found_json(&self, limit: u32, commands: usize, target: f64) -> serde_json::Value {
        serde_json::json!({
            "rate_limit_per_s": limit,
            "commands": commands,
            "throughput_per_s": self.throughput,
            "target_per_s": f64::from(limit) * target,
            "answered_429_share": self.share_429,
            "delayed": self.delayed,
            "dead_lettered": self.dead_lettered,
            "split": self.split().json(),
        })
    }

    /// The split of a single-limit phase, from its second-by-second timeline: each whole second's
    /// shortfall from the pace is time lost (to a pause, mostly).
    fn split(&self) -> Split {
        // The seconds with links, the last (partial) one left out of the pace and the losses.
        let end = self
            .timeline
            .iter()
            .rposition(|(_, links, _)| *links > 0.0)
            .unwrap_or(0);
        let run = &self.timeline[..end];
        let calm: Vec<f64> = run
            .windows(2)
            .skip(1)
            .filter(|w| w[0].2 == 0.0 && w[1].2 == 0.0)
            .map(|w| w[1].1)
            .collect();
        let pace = calm.iter().sum::<f64>() / calm.len().max(1) as f64;
        let lost = |seconds: &[(u32, f64, f64)]| {
            seconds
                .iter()
                .map(|(_, links, _)| (pace - links).max(0.0) / pace.max(1.0))
                .sum::<f64>()
        };
        let (first, later) = run.split_at(run.len().min(2));
        let mut probes = 0;
        let mut previous = false;
        for (_, _, limited) in later {
            if *limited > 0.0 && !previous {
                probes += 1;
            }
            previous = *limited > 0.0;
        }
        Split {
            first_429: self.timeline.iter().take(2).map(|s| s.2).sum(),
            first_lost_s: lost(first),
            later_429: self.timeline.iter().skip(2).map(|s| s.2).sum(),
            probes,
            later_lost_s: lost(later),
            pace,
        }
    }
}

/// Links made by the simulator so far, and calls it answered 429.
async fn sim_links(url: &str) -> anyhow::Result<(f64, f64)> {
    let text = reqwest::get(format!("{url}/_sim/stats"))
        .await?
        .text()
        .await?;
    let stats: serde_json::Value = serde_json::from_str(&text)?;
    Ok((
        stats["links"].as_f64().unwrap_or(0.0),
        stats["rateLimited"].as_f64().unwrap_or(0.0),
    ))
}

async fn rate_limited(connection: &Connection, phase: &Limited) -> anyhow::Result<LimitedOutcome> {
    let sim = SimOptions {
        rate_limit: Some(phase.limits[0]),
        no_retry_after: !phase.retry_after,
        latency: phase.latency,
        ..SimOptions::default()
    };
    let rate_text = phase.limits[0].to_string();
    // The shipped defaults, heartbeat included (a beat a second).
    let mut extra = vec![];
    if phase.configured {
        extra.push(("PROVIDER__MAX_REQUESTS_PER_SECOND", rate_text.as_str()));
    }
    let run = Run::with(Tuning::Shipped, sim, &extra).await?;
    let settings = run.settings()?;
    let sim_url = run.sim_url()?;
    let channel = confirm_channel(connection).await?;
    let result = async {
        let events = run.declare(connection, &channel, &settings).await?;
        let mut workers = [run.start_worker()?, run.start_worker()?];
        // Both must count each other before the load.
        use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
        let mut conn = AsyncPgConnection::establish(settings.database.url.expose()).await?;
        both_counted(&mut conn).await?;
        let route = (
            settings.broker.command_exchange.as_str(),
            settings.broker.command_routing_key.as_str(),
        );
        // The links made, sampled every 100 ms from the start of the load; the limit changed
        // on schedule.
        let t0 = Instant::now();
        let stop = CancellationToken::new();
        let sampler = tokio::spawn({
            let (url, stop, limits, stage) = (
                sim_url.clone(),
                stop.clone(),
                phase.limits.clone(),
                phase.stage,
            );
            async move {
                let mut samples: Vec<(f64, f64, f64)> = Vec::new();
                let mut next_change = 1;
                while !stop.is_cancelled() {
                    if next_change < limits.len() && t0.elapsed() >= stage * next_change as u32 {
                        let _ = reqwest::Client::new()
                            .put(format!("{url}/_sim/rate-limit"))
                            .body(limits[next_change].to_string())
                            .send()
                            .await;
                        next_change += 1;
                    }
                    if let Ok((links, limited)) = sim_links(&url).await {
                        samples.push((t0.elapsed().as_secs_f64(), links, limited));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                samples
            }
        });
        preload_for(&channel, route, "limited", phase.n, |_| 1).await?;
        let mut outcome = LimitedOutcome::default();
        if phase.limits.len() == 1 {
            let elapsed = created_events(connection, &events, phase.n).await?;
            outcome.throughput = phase.n as f64 / elapsed;
        } else {
            tokio::time::sleep(phase.stage * phase.limits.len() as u32).await;
        }
        // What the workers reported with their last heartbeats (a beat a second).
        tokio::time::sleep(Duration::from_millis(2200)).await;
        #[derive(diesel::QueryableByName)]
        struct Tallies {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            delayed: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            dead_lettered: i64,
        }
        let tallies: Tallies = diesel::sql_query(
            "SELECT coalesce(sum((status->>'delayed')::int8), 0)::int8 AS delayed,
                    coalesce(sum((status->>'deadLettered')::int8), 0)::int8 AS dead_lettered
             FROM worker_heartbeats",
        )
        .get_result(&mut conn)
        .await?;
        outcome.delayed = tallies.delayed;
        outcome.dead_lettered = tallies.dead_lettered;
        stop.cancel();
        let samples = sampler.await?;
        for worker in &mut workers {
            worker.kill()?;
            worker.wait()?;
        }
        let stats = sim_stats(&run).await?;
        let requests = stats["requests"].as_f64().unwrap_or(0.0).max(1.0);
        let limited = stats["rateLimited"].as_f64().unwrap_or(0.0);
        outcome.share_429 = limited / requests;
        // Links made by `at` seconds into the load (the last sample at or before it).
        let at_time = |at: f64| {
            samples
                .iter()
                .take_while(|(t, ..)| *t <= at)
                .last()
                .map_or((0.0, 0.0), |(_, links, limited)| (*links, *limited))
        };
        let links_at = |at: f64| at_time(at).0;
        // Second by second, for whoever looks into how the lanes behaved.
        let last = samples.last().map_or(0.0, |s| s.0);
        outcome.timeline = (1..=last as u32)
            .map(|k| {
                let (k, (l1, r1), (l0, r0)) =
                    (k, at_time(f64::from(k)), at_time(f64::from(k) - 1.0));
                (k, l1 - l0, r1 - r0)
            })
            .collect();
        let stage = phase.stage.as_secs_f64();
        for (change, limit) in phase.limits.iter().enumerate().skip(1) {
            let at = stage * change as f64;
            let per_second = |k: f64| links_at(at + k) - links_at(at + k - 1.0);
            let tenth = per_second(10.0);
            let within = (1..=stage as u32)
                .find(|k| (per_second(f64::from(*k)) / f64::from(*limit) - 1.0).abs() <= 0.15);
            outcome.changes.push((*limit, tenth, within));
        }
        Ok::<_, anyhow::Error>(outcome)
    }
    .await;
    run.cleanup().await;
    result
}

/// Waits until two replicas count each other (a replica that joins under load is counted by the
/// others within one refresh): until two rows are fresh, then until both were refreshed since
/// (each worker has counted the other).
async fn both_counted(conn: &mut diesel_async::AsyncPgConnection) -> anyhow::Result<()> {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Live {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    #[derive(diesel::QueryableByName)]
    struct Now {
        #[diesel(sql_type = diesel::sql_types::Text)]
        t: String,
    }
    let mut since = String::from("-infinity");
    let started = Instant::now();
    for stage in ["started", "counted each other"] {
        loop {
            let live = diesel::sql_query(
                "SELECT count(*) AS n FROM worker_heartbeats WHERE seen_at > $1::timestamptz",
            )
            .bind::<diesel::sql_types::Text, _>(&since)
            .get_result::<Live>(conn)
            .await
            .map_or(0, |l| l.n); // the table exists once a worker has migrated
            if live == 2 {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "the two replicas have not {stage} within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        since = diesel::sql_query("SELECT now()::text AS t")
            .get_result::<Now>(conn)
            .await?
            .t;
    }
    Ok(())
}

/// What a restart with the fleet's memory costs: two replicas find a 50 ms provider's limit
/// (with `Retry-After`) over `n` commands, stop (SIGTERM: each writes what it found), and two
/// new ones take `n` more. Returns the second load's commands a second, the share of its calls
/// answered 429, and the first load's share (nothing remembered), for comparison.
async fn remembered_phase(
    connection: &Connection,
    limit: u32,
    n: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    use diesel_async::{AsyncConnection, AsyncPgConnection};
    let sim = SimOptions {
        rate_limit: Some(limit),
        latency: Duration::from_millis(50),
        ..SimOptions::default()
    };
    let run = Run::with(Tuning::Shipped, sim, &[]).await?;
    let settings = run.settings()?;
    let channel = confirm_channel(connection).await?;
    let result = async {
        let events = run.declare(connection, &channel, &settings).await?;
        let route = (
            settings.broker.command_exchange.as_str(),
            settings.broker.command_routing_key.as_str(),
        );
        let mut conn = AsyncPgConnection::establish(settings.database.url.expose()).await?;
        let counts = async || -> anyhow::Result<(f64, f64)> {
            let stats = sim_stats(&run).await?;
            Ok((
                stats["requests"].as_f64().unwrap_or(0.0),
                stats["rateLimited"].as_f64().unwrap_or(0.0),
            ))
        };
        let first = [run.start_worker()?, run.start_worker()?];
        both_counted(&mut conn).await?;
        preload_for(&channel, route, "first", n, |_| 1).await?;
        created_events(connection, &events, n).await?;
        // Each writes what it found on its way out; waited for off the runtime's threads.
        for mut worker in first {
            Command::new("kill")
                .args(["-TERM", &worker.id().to_string()])
                .status()?;
            tokio::task::spawn_blocking(move || worker.wait()).await??;
        }
        let (requests, refused) = counts().await?;
        let mut second = [run.start_worker()?, run.start_worker()?];
        both_counted(&mut conn).await?;
        preload_for(&channel, route, "second", n, |_| 1).await?;
        let elapsed = created_events(connection, &events, n).await?;
        let (all_requests, all_refused) = counts().await?;
        for worker in &mut second {
            worker.kill()?;
            worker.wait()?;
        }
        Ok::<_, anyhow::Error>((
            n as f64 / elapsed,
            (all_refused - refused) / (all_requests - requests).max(1.0),
            refused / requests.max(1.0),
        ))
    }
    .await;
    run.cleanup().await;
    result
}

/// The phases where two replicas must find a provider's rate limit themselves: with
/// `Retry-After`, without it, and with the limit changing mid-run.
async fn found_rate_phases(
    connection: &Connection,
    o: &Options,
) -> anyhow::Result<(LimitedOutcome, LimitedOutcome, LimitedOutcome, Remembered)> {
    let log = |what: &str| {
        if !o.json_only {
            eprintln!("… {what}");
        }
    };
    let found_rate = o.found_rate_limit;
    let found_phase = |retry_after: bool| Limited {
        n: o.found_commands,
        limits: vec![found_rate],
        stage: Duration::ZERO,
        configured: false,
        retry_after,
        latency: Duration::from_millis(50),
    };
    log(&format!(
        "a 50 ms provider limited to {found_rate} calls/s (429 with Retry-After: 1), the limit not \
         configured (the workers find it), two replicas, {} commands",
        o.found_commands
    ));
    let found = rate_limited(connection, &found_phase(true)).await?;
    log(&format!(
        "the same, its 429s without Retry-After, {} commands",
        o.found_commands
    ));
    let found_bare = rate_limited(connection, &found_phase(false)).await?;
    let stage = Duration::from_secs(o.change_stage_s);
    let limits: Vec<u32> = [1.0, 0.5, 1.5]
        .iter()
        .map(|f| (f64::from(found_rate) * f) as u32)
        .collect();
    log(&format!(
        "the limit changing mid-run ({}/s, then {}/s, then {}/s, {} s each), not configured",
        limits[0], limits[1], limits[2], o.change_stage_s
    ));
    let changing = rate_limited(
        connection,
        &Limited {
            n: limits.iter().map(|l| *l as usize).sum::<usize>() * o.change_stage_s as usize * 6
                / 5,
            limits,
            stage,
            configured: false,
            retry_after: true,
            latency: Duration::from_millis(50),
        },
    )
    .await?;
    log(&format!(
        "the first, then two new replicas starting from what the first two found, {} commands \
         each",
        o.found_commands
    ));
    let remembered = remembered_phase(connection, found_rate, o.found_commands).await?;
    Ok((found, found_bare, changing, remembered))
}

/// A restart with the fleet's memory: the second load's commands a second and share answered
/// 429, and the first load's share.
type Remembered = (f64, f64, f64);

/// The table rows of the found-rate phases.
fn print_found_rows(
    o: &Options,
    found: &LimitedOutcome,
    found_bare: &LimitedOutcome,
    changing: &LimitedOutcome,
    (rate, share, first_share): Remembered,
) {
    let found_rate = o.found_rate_limit;
    println!(
        "| the same, restarted: two new replicas after two found the limit (SIGTERM), {} commands each | {rate:.0} commands/s, {:.2} % of calls answered 429 (the first two: {:.2} %) | < 0.5 % |",
        o.found_commands,
        share * 100.0,
        first_share * 100.0
    );
    for (what, phase, target) in [
        ("with `Retry-After: 1`", found, "≥ 180/s, < 2 %"),
        ("without `Retry-After`", found_bare, "≥ 160/s, < 5 %"),
    ] {
        println!(
            "| 50 ms provider limited to {found_rate}/s {what}, not configured, two replicas, {} commands | {:.0} commands/s, {:.2} % of calls answered 429, {} parked in a delay queue, {} dead-lettered | {target}, none parked or dead-lettered |",
            o.found_commands,
            phase.throughput,
            phase.share_429 * 100.0,
            phase.delayed,
            phase.dead_lettered
        );
        let split = phase.split();
        println!(
            "| … where it went | first contact (seconds 1-2): {:.0} answered 429, {:.1} s lost; after it: {:.0} answered 429 in {} probe(s), {:.1} s lost; pace between them {:.0} links/s | |",
            split.first_429,
            split.first_lost_s,
            split.later_429,
            split.probes,
            split.later_lost_s,
            split.pace
        );
    }
    for (limit, tenth, within) in &changing.changes {
        println!(
            "| the limit changed to {limit}/s mid-run | {tenth:.0} links/s in the 10th second after; first second within 15 %: {} | within 15 % by the 10th second |",
            within.map_or("none".to_owned(), |k| format!("the {k}th"))
        );
    }
}

/// The delay tier a down provider's commands wait in: longer than any phase.
const DOWN_TIER_MS: u64 = 600_000;

/// A run whose simulator answers 503 to provider 2 (the down one), its commands parked in one
/// delay tier of [`DOWN_TIER_MS`].
async fn down_run(prefetch: u16) -> anyhow::Result<Run> {
    let sim = SimOptions {
        fail_provider_ids: vec![2],
        ..SimOptions::default()
    };
    let tier = DOWN_TIER_MS.to_string();
    Run::with(
        Tuning::Tuned(prefetch),
        sim,
        &[("RETRY__DELAY_TIERS_MS", tier.as_str())],
    )
    .await
}

/// Declares the run's delay queues (the worker declares them on first use; a phase that counts
/// what is parked in one needs it there from the start).
async fn declare_delay_queues(
    connection: &Connection,
    settings: &payment_link_worker::config::Settings,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    payment_link_worker::broker::topology::declare_delay_queues(
        &channel,
        &settings.broker,
        &settings.retry.delay_tiers_ms,
    )
    .await?;
    Ok(())
}

/// Two provider ids, the second down: the first one's throughput; or, `down_only`, only the
/// down provider's commands: how fast the worker parks them (from the first parked to the last),
/// the other share of the time the mixed run takes.
async fn one_provider_down(
    connection: &Connection,
    n: usize,
    prefetch: u16,
    down_only: bool,
) -> anyhow::Result<(f64, CpuSplit)> {
    let run = down_run(prefetch).await?;
    let settings = run.settings()?;
    let channel = confirm_channel(connection).await?;
    let result = async {
        let events = run.declare(connection, &channel, &settings).await?;
        declare_delay_queues(connection, &settings).await?;
        let route = (
            settings.broker.command_exchange.as_str(),
            settings.broker.command_routing_key.as_str(),
        );
        if down_only {
            preload_for(&channel, route, "down", n, |_| 2).await?;
        } else {
            preload_for(&channel, route, "two", 2 * n, |i| 1 + (i % 2) as i64).await?;
        }
        let cpu_before = CpuSplit::now();
        let mut worker = run.start_worker()?;
        let elapsed = if down_only {
            let queue =
                payment_link_worker::broker::topology::delay_queue(&settings.broker, DOWN_TIER_MS);
            parked(&queue, n).await?
        } else {
            created_events(connection, &events, n).await?
        };
        let cpu = CpuSplit::now().per_1000_since(cpu_before, n);
        worker.kill()?;
        worker.wait()?;
        Ok::<_, anyhow::Error>((n as f64 / elapsed, cpu))
    }
    .await;
    run.cleanup().await;
    result
}

/// Seconds from the first command parked in `queue` until `n` are there (counted on a
/// connection of its own, closed after, so the polling touches nothing else the run uses).
async fn parked(queue: &str, n: usize) -> anyhow::Result<f64> {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let counted = count_until(&channel, queue, n).await;
    let _ = connection.close(200, "counted".into()).await;
    counted
}

async fn count_until(channel: &Channel, queue: &str, n: usize) -> anyhow::Result<f64> {
    let limit = Instant::now() + Duration::from_secs(600);
    let mut first = None;
    loop {
        let count = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?
            .message_count() as usize;
        if count > 0 {
            first.get_or_insert_with(Instant::now);
        }
        if count >= n {
            return Ok(first.map_or(0.0, |f: Instant| f.elapsed().as_secs_f64()));
        }
        anyhow::ensure!(Instant::now() < limit, "only {count} of {n} parked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Phase 3: commands offered at `rate` per second; latency from publish to event received.
async fn latency(
    connection: &Connection,
    n: usize,
    rate: f64,
    prefetch: u16,
    down_too: bool,
) -> anyhow::Result<(f64, f64, f64)> {
    // With `down_too`, provider 2 is down and each command is followed by one for it, parked
    // in a delay tier longer than the phase: the latencies are the healthy commands' beside it.
    let run = if down_too {
        down_run(prefetch).await?
    } else {
        Run::new(Tuning::Tuned(prefetch), Duration::ZERO).await?
    };
    let settings = run.settings()?;
    let channel = confirm_channel(connection).await?;
    let result = async {
        let events = run.declare(connection, &channel, &settings).await?;
        if down_too {
            declare_delay_queues(connection, &settings).await?;
        }
        let mut child = run.start_worker()?;
        // Wait until the worker consumes (its consumer appears on the command queue).
        let started = Instant::now();
        loop {
            let queue = channel
                .queue_declare(settings.broker.command_queue.as_str().into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
                .await?;
            if queue.consumer_count() > 0 {
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "the worker did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let consumer_channel = connection.create_channel().await?;
        let mut consumer = consumer_channel
            .basic_consume(events.as_str().into(), "bench-latency".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
            .await?;
        let sent: std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
        let publisher = {
            let channel = channel.clone();
            let sent = sent.clone();
            let exchange = settings.broker.command_exchange.clone();
            let key = settings.broker.command_routing_key.clone();
            tokio::spawn(async move {
                let interval = Duration::from_secs_f64(1.0 / rate);
                let begin = Instant::now();
                for i in 0..n {
                    let due = begin + interval * i as u32;
                    tokio::time::sleep_until(due.into()).await;
                    for provider in if down_too { 1..=2 } else { 1..=1 } {
                        let id = if provider == 1 { format!("lat-{i}") } else { format!("lat-down-{i}") };
                        let body = format!(r#"{{"paymentProviderId":{provider},"amountInMajorCurrency":1.00,"description":"d","invoiceId":{}}}"#, i + 1);
                        if provider == 1 {
                            sent.lock().unwrap().insert(id.clone(), Instant::now());
                        }
                        let props = BasicProperties::default()
                            .with_message_id(id.into())
                            .with_content_type("application/json".into())
                            .with_delivery_mode(2);
                        channel
                            .basic_publish(exchange.as_str().into(), key.as_str().into(), BasicPublishOptions::default(), body.as_bytes(), props)
                            .await?
                            .await?;
                    }
                }
                Ok::<_, anyhow::Error>(())
            })
        };
        let mut latencies = Vec::with_capacity(n);
        let limit = Instant::now() + Duration::from_secs_f64(n as f64 / rate) + Duration::from_secs(120);
        while latencies.len() < n {
            anyhow::ensure!(Instant::now() < limit, "only {} of {n} events arrived", latencies.len());
            let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await else { continue };
            let delivery = delivery?;
            let subject = payment_link_worker::headers::read_text(&delivery.properties, "cloudEvents:subject").unwrap_or_default();
            if let Some(at) = sent.lock().unwrap().remove(&subject) {
                latencies.push(at.elapsed().as_secs_f64() * 1000.0);
            }
        }
        publisher.await??;
        child.kill()?;
        child.wait()?;
        latencies.sort_by(|a, b| a.total_cmp(b));
        Ok::<_, anyhow::Error>((percentile(&latencies, 50.0), percentile(&latencies, 95.0), percentile(&latencies, 99.0)))
    }
    .await;
    run.cleanup().await;
    result
}

/// The storage phases: the shipped defaults on a fresh table, with `stored` completed commands
/// kept, and while a sweep removes `o.sweep_backlog` expired ones; bytes per stored command.
async fn storage_phases(connection: &Connection, o: &Options, stored: usize) -> anyhow::Result<()> {
    let n = o.commands;
    // Each phase starts with the previous one's writes (a bulk load, a dropped database) on disk,
    // not being flushed under it.
    let settle = || async {
        sandbox::exec_admin(&sandbox::admin_database_url(), "CHECKPOINT")
            .await
            .map_err(anyhow::Error::msg)
    };
    eprintln!("… shipped defaults, fresh table, {n} commands");
    let run = Run::with(Tuning::Shipped, SimOptions::default(), &[]).await?;
    let fresh_per_s = {
        let fresh = end_to_end_on(connection, run, n, Stored::default()).await?;
        eprintln!("  {:.0} commands/s", fresh.throughput);
        fresh.throughput
    };
    let probe = Run::with(Tuning::Shipped, SimOptions::default(), &[]).await?;
    let worker_rows = async {
        let settings = probe.settings()?;
        let channel = confirm_channel(connection).await?;
        let _ = probe.declare(connection, &channel, &settings).await?;
        preload(
            &channel,
            &settings.broker.command_exchange,
            &settings.broker.command_routing_key,
            "size",
            n,
        )
        .await?;
        let mut child = probe.start_worker()?;
        let started = Instant::now();
        loop {
            let (_, rows) = bytes_per_command(&probe).await.unwrap_or((0.0, 0));
            if rows as usize >= n || started.elapsed() > Duration::from_secs(120) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        child.kill()?;
        child.wait()?;
        bytes_per_command(&probe).await
    }
    .await;
    probe.cleanup().await;
    let (worker_bytes, _) = worker_rows?;
    eprintln!("  the worker's own rows: {worker_bytes:.0} bytes per command");

    eprintln!("… shipped defaults, {stored} completed commands already stored, {n} commands");
    let run = Run::with(Tuning::Shipped, SimOptions::default(), &[]).await?;
    let filled = Stored {
        rows: stored,
        completed_ago: "1 day",
    };
    let started = Instant::now();
    fill(&run, filled).await?;
    let (stored_bytes, _) = bytes_per_command(&run).await?;
    eprintln!(
        "  filled in {:.0} s, {stored_bytes:.0} bytes per stored command",
        started.elapsed().as_secs_f64()
    );
    settle().await?;
    let with_history = end_to_end_on(connection, run, n, Stored::default()).await?;
    eprintln!("  {:.0} commands/s", with_history.throughput);

    let backlog = o.sweep_backlog;
    let m = o.sweep_commands;
    settle().await?;
    eprintln!("… shipped defaults, fresh table, {m} commands (the sweep phase's reference)");
    let run = Run::with(Tuning::Shipped, SimOptions::default(), &[]).await?;
    let reference = end_to_end_on(connection, run, m, Stored::default()).await?;
    eprintln!("  {:.0} commands/s", reference.throughput);
    settle().await?;
    eprintln!("… shipped defaults while a sweep removes {backlog} expired commands, {m} commands");
    let run = Run::with(
        Tuning::Shipped,
        SimOptions::default(),
        &[("RETENTION__SWEEP_INTERVAL_MS", "500")],
    )
    .await?;
    fill(
        &run,
        Stored {
            rows: backlog,
            completed_ago: "40 days",
        },
    )
    .await?;
    let settings = run.settings()?;
    let pool = payment_link_worker::store::pool(&settings.database)?;
    // Follows the sweep by PostgreSQL's own count of deleted rows (cheap: counting what is left
    // would scan the table under the measurement), until the backlog is gone or the phase's
    // database is.
    let watch = tokio::spawn(async move {
        let started = Instant::now();
        let mut last = (backlog as i64, 0.0);
        loop {
            use diesel_async::RunQueryDsl;
            #[derive(diesel::QueryableByName)]
            struct Deleted {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                deleted: i64,
            }
            let deleted = async {
                let mut conn = pool.get().await.ok()?;
                diesel::sql_query(
                    "SELECT n_tup_del AS deleted FROM pg_stat_user_tables \
                     WHERE relname = 'payment_link_commands'",
                )
                .get_result::<Deleted>(&mut conn)
                .await
                .ok()
            };
            match deleted.await {
                Some(d) if d.deleted >= backlog as i64 => {
                    return (Some(started.elapsed().as_secs_f64()), last);
                }
                Some(d) => last = (backlog as i64 - d.deleted, started.elapsed().as_secs_f64()),
                None => return (None, last),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let sweeping = end_to_end_on(connection, run, m, Stored::default()).await?;
    eprintln!("  {:.0} commands/s", sweeping.throughput);
    let (gone_after, (left, seen_at)) = watch.await?;
    let backlog_seconds = gone_after.unwrap_or(f64::NAN);
    eprintln!(
        "  backlog gone after {backlog_seconds:.1} s (last seen: {left} left at {seen_at:.1} s)"
    );
    let report = serde_json::json!({
        "commands": n,
        "fresh_per_s": fresh_per_s,
        "bytes_per_command_worker_rows": worker_bytes,
        "stored": stored,
        "bytes_per_stored_command": stored_bytes,
        "with_stored_per_s": with_history.throughput,
        "with_stored_to_fresh": with_history.throughput / fresh_per_s,
        "sweep_backlog": backlog,
        "sweep_commands": m,
        "sweep_reference_per_s": reference.throughput,
        "while_sweeping_per_s": sweeping.throughput,
        "while_sweeping_to_reference": sweeping.throughput / reference.throughput,
        "backlog_removed_within_s": backlog_seconds,
    });
    println!("| figure | value | target |");
    println!("| --- | --- | --- |");
    println!("| shipped defaults, fresh table | {fresh_per_s:.0} commands/s | |");
    println!(
        "| with {stored} completed commands stored | {:.0} commands/s ({:.0} % of fresh) | ≥ 90 % |",
        with_history.throughput,
        100.0 * with_history.throughput / fresh_per_s
    );
    let removal = if backlog_seconds.is_finite() {
        format!("the backlog gone {backlog_seconds:.1} s after the worker started")
    } else {
        format!(
            "{} removed in the first {seen_at:.1} s (the phase ended first)",
            backlog as i64 - left
        )
    };
    println!(
        "| while a sweep removes {backlog} expired commands ({m} commands) | {:.0} commands/s ({:.0} % of {:.0}/s on a fresh table); {removal} | ≥ 90 % |",
        sweeping.throughput,
        100.0 * sweeping.throughput / reference.throughput,
        reference.throughput
    );
    println!(
        "| bytes per command (the worker's own rows; rows filled with SQL) | {worker_bytes:.0}; {stored_bytes:.0} | |"
    );
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// The one-provider-down phases: the healthy provider's throughput beside a down one, the down
/// one's commands parked alone, and the healthy ones alone right after (the ratio's
/// denominator: neighbouring runs compare well on a machine whose speed drifts).
async fn isolation_phases(connection: &Connection, o: &Options) -> anyhow::Result<(f64, f64, f64)> {
    let log = |what: &str| {
        if !o.json_only {
            eprintln!("… {what}");
        }
    };
    log(&format!(
        "two provider ids, the second down, {} commands for the first, prefetch {}",
        o.commands / 2,
        o.prefetch
    ));
    let (healthy, _) = one_provider_down(connection, o.commands / 2, o.prefetch, false).await?;
    log(&format!(
        "the down provider's {} commands alone, parked, prefetch {}",
        o.commands / 2,
        o.prefetch
    ));
    let (parked_alone, parked_cpu) =
        one_provider_down(connection, o.commands / 2, o.prefetch, true).await?;
    // The same commands with no provider down, measured right after: on a shared (virtual)
    // machine whose speed drifts between phases, the ratio of two neighbouring runs is the
    // figure to trust; the ratio to the end-to-end phase is printed as well.
    log(&format!(
        "the same {} commands with both providers up, prefetch {}",
        o.commands / 2,
        o.prefetch
    ));
    let solo = end_to_end(
        connection,
        o.commands / 2,
        Tuning::Tuned(o.prefetch),
        Duration::ZERO,
    )
    .await?;
    log(&format!(
        "machine CPU per 1,000 parked: {}; per 1,000 created alone: {}",
        parked_cpu.row(),
        solo.cpu.row()
    ));
    // Half the machine's capacity with a provider down: the healthy commands offered at half the
    // rate they kept beside the down one's, as many of the down one's beside them; their
    // latency against the same offer with nothing down.
    let offered = (healthy * 0.5).max(1.0);
    let n = o.latency_commands;
    log(&format!(
        "latency, {n} healthy commands offered at {offered:.0}/s, alone"
    ));
    let alone = latency(connection, n, offered, o.prefetch, false).await?;
    log(&format!(
        "latency, {n} healthy commands offered at {offered:.0}/s beside as many for a down provider"
    ));
    let beside = latency(connection, n, offered, o.prefetch, true).await?;
    // Alone again: the order of the two must not make the difference.
    log(&format!(
        "latency, {n} healthy commands offered at {offered:.0}/s, alone again"
    ));
    let again = latency(connection, n, offered, o.prefetch, false).await?;
    let ms = |(p50, p95, p99): (f64, f64, f64)| format!("{p50:.1}/{p95:.1}/{p99:.1}");
    log(&format!(
        "healthy latency at {offered:.0}/s, p50/p95/p99 ms: alone {}, beside a down provider {}, alone again {}: p99 {:.2}× the worse alone (target ≤ 1.5×)",
        ms(alone),
        ms(beside),
        ms(again),
        beside.2 / alone.2.max(again.2)
    ));
    Ok((healthy, parked_alone, solo.throughput))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = <Options as clap::Parser>::parse();
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .context("RabbitMQ is not reachable")?;
    if let Some(stored) = o.stored {
        return storage_phases(&connection, &o, stored).await;
    }
    if o.only_one_down {
        let (healthy, parked_alone, solo) = isolation_phases(&connection, &o).await?;
        println!(
            "| | healthy beside a down one | parked alone | healthy alone | healthy, of solo | one of each, the healthy one's share |"
        );
        println!(
            "| {} commands | {healthy:.0}/s | {parked_alone:.0}/s | {solo:.0}/s | {:.0} % | {:.0} % |",
            o.commands / 2,
            healthy / solo * 100.0,
            100.0 / (1.0 + solo / parked_alone)
        );
        return Ok(());
    }
    if o.only_found_rate {
        let (found, found_bare, changing, remembered) = found_rate_phases(&connection, &o).await?;
        for (what, phase) in [
            ("Retry-After", &found),
            ("no Retry-After", &found_bare),
            ("changing", &changing),
        ] {
            eprintln!("{what}: second, links, 429s");
            for (k, links, limited) in &phase.timeline {
                eprintln!("  {k:>3} {links:>5.0} {limited:>5.0}");
            }
        }
        print_found_rows(&o, &found, &found_bare, &changing, remembered);
        return Ok(());
    }
    let log = |what: &str| {
        if !o.json_only {
            eprintln!("… {what}");
        }
    };
    log(&format!(
        "broker-only ceiling, {} messages, prefetch {}",
        o.commands, o.prefetch
    ));
    let (ceiling, ceiling_cpu) = broker_ceiling(&connection, o.commands, o.prefetch).await?;
    log(&format!(
        "end to end, {} commands, prefetch {}",
        o.commands, o.prefetch
    ));
    let e2e = end_to_end(
        &connection,
        o.commands,
        Tuning::Tuned(o.prefetch),
        Duration::ZERO,
    )
    .await?;
    log(&format!(
        "end to end with the shipped defaults (config/default.toml, info logging), {} commands",
        o.commands
    ));
    let shipped = end_to_end(&connection, o.commands, Tuning::Shipped, Duration::ZERO).await?;
    let offered = (e2e.throughput * 0.5).max(1.0);
    log(&format!(
        "latency, {} commands offered at {offered:.0}/s",
        o.latency_commands
    ));
    let (p50, p95, p99) =
        latency(&connection, o.latency_commands, offered, o.prefetch, false).await?;
    log(&format!(
        "end to end with 100 ms provider latency, {} commands, prefetch {}",
        o.slow_commands, o.prefetch
    ));
    let slow = end_to_end(
        &connection,
        o.slow_commands,
        Tuning::Tuned(o.prefetch),
        Duration::from_millis(100),
    )
    .await?;
    let shipped_prefetch = payment_link_worker::config::Settings::load_from(None, Vec::new())?
        .broker
        .prefetch;
    log(&format!(
        "end to end with 300 ms provider latency and the shipped defaults (prefetch {shipped_prefetch}), {} commands",
        o.slow_commands
    ));
    let slow_shipped = end_to_end(
        &connection,
        o.slow_commands,
        Tuning::Shipped,
        Duration::from_millis(300),
    )
    .await?;
    let rate = o.rate_limit;
    log(&format!(
        "a provider limited to {rate} calls/s, two replicas with the shipped defaults, {} commands",
        rate as usize * 10
    ));
    let limited = rate_limited(
        &connection,
        &Limited {
            n: rate as usize * 10,
            limits: vec![rate],
            stage: Duration::ZERO,
            configured: true,
            retry_after: true,
            latency: Duration::ZERO,
        },
    )
    .await?;
    let (found, found_bare, changing, remembered) = found_rate_phases(&connection, &o).await?;
    let found_rate = o.found_rate_limit;
    let (healthy, parked_alone, solo) = isolation_phases(&connection, &o).await?;
    let _ = connection.close(200, "bench done".into()).await;
    let slow_shipped_target = f64::from(shipped_prefetch) / 0.3 * 0.8;

    let latency_target = (f64::from(o.prefetch) / 0.1 * 0.8).min(e2e.throughput);
    let report = serde_json::json!({
        "machine": { "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0) },
        "commands": o.commands,
        "prefetch": o.prefetch,
        "broker_ceiling_per_s": ceiling,
        "end_to_end_per_s": e2e.throughput,
        "end_to_end_to_ceiling_ratio": e2e.throughput / ceiling,
        "cpu_seconds_per_1000_commands": e2e.cpu_seconds_per_1000,
        "machine_cpu_seconds_per_1000": {
            "broker_ceiling": ceiling_cpu.json(),
            "end_to_end": e2e.cpu.json(),
        },
        "peak_rss_mib": e2e.peak_rss_bytes as f64 / 1048576.0,
        "shipped_defaults": {
            "throughput_per_s": shipped.throughput,
            "to_tuned_ratio": shipped.throughput / e2e.throughput,
            "cpu_seconds_per_1000_commands": shipped.cpu_seconds_per_1000,
            "peak_rss_mib": shipped.peak_rss_bytes as f64 / 1048576.0,
        },
        "latency_offered_per_s": offered,
        "latency_ms": { "p50": p50, "p95": p95, "p99": p99 },
        "provider_300ms_shipped_defaults": {
            "commands": o.slow_commands,
            "prefetch": shipped_prefetch,
            "throughput_per_s": slow_shipped.throughput,
            "target_per_s": slow_shipped_target,
            "peak_rss_mib": slow_shipped.peak_rss_bytes as f64 / 1048576.0,
        },
        "rate_limited_two_replicas": {
            "rate_limit_per_s": rate,
            "throughput_per_s": limited.throughput,
            "target_per_s": f64::from(rate) * 0.9,
            "answered_429_share": limited.share_429,
        },
        "rate_limited_not_configured": found.found_json(found_rate, o.found_commands, 0.9),
        "rate_limited_not_configured_no_retry_after":
            found_bare.found_json(found_rate, o.found_commands, 0.8),
        "rate_limited_restarted_with_memory": {
            "throughput_per_s": remembered.0,
            "answered_429_share": remembered.1,
            "first_contact_429_share": remembered.2,
        },
        "rate_limit_changing": changing.changes.iter().map(|(limit, tenth, within)| serde_json::json!({
            "new_limit_per_s": limit,
            "links_per_s_in_10th_second": tenth,
            "first_second_within_15_percent": within,
        })).collect::<Vec<_>>(),
        "one_provider_down": {
            "healthy_throughput_per_s": healthy,
            "solo_right_after_per_s": solo,
            "to_solo_ratio": healthy / solo,
            "to_end_to_end_ratio": healthy / e2e.throughput,
            "down_provider_parked_alone_per_s": parked_alone,
            "solo_and_parked_time_share": 1.0 / (1.0 + solo / parked_alone),
        },
        "cpu_per_command_to_lapin_loop": e2e.cpu_seconds_per_1000 / ceiling_cpu.bench.max(1e-9),
        "provider_100ms": {
            "commands": o.slow_commands,
            "throughput_per_s": slow.throughput,
            "target_per_s": latency_target,
            "peak_rss_mib": slow.peak_rss_bytes as f64 / 1048576.0,
        },
    });
    if !o.json_only {
        println!("| figure | value | target |");
        println!("| --- | --- | --- |");
        println!(
            "| broker-only ceiling (consume → publish+confirm → ack) | {ceiling:.0} msg/s | |"
        );
        println!(
            "| end-to-end throughput | {:.0} commands/s | ≥ 50 % of ceiling = {:.0}/s |",
            e2e.throughput,
            ceiling * 0.5
        );
        println!(
            "| end-to-end / ceiling | {:.1} % | ≥ 50 % |",
            e2e.throughput / ceiling * 100.0
        );
        println!(
            "| worker CPU per 1,000 commands | {:.2} s | |",
            e2e.cpu_seconds_per_1000
        );
        println!(
            "| end-to-end throughput, shipped defaults (info logging, JSON) | {:.0} commands/s ({:.0} % of tuned; worker CPU {:.2} s per 1,000; peak RSS {:.1} MiB) | ≥ 80 % of tuned |",
            shipped.throughput,
            shipped.throughput / e2e.throughput * 100.0,
            shipped.cpu_seconds_per_1000,
            shipped.peak_rss_bytes as f64 / 1048576.0
        );
        println!(
            "| machine CPU per 1,000 messages, broker-only | {} | |",
            ceiling_cpu.row()
        );
        println!(
            "| machine CPU per 1,000 commands, end to end | {} | |",
            e2e.cpu.row()
        );
        println!(
            "| worker peak RSS (prefetch {}) | {:.1} MiB | < 64 MiB |",
            o.prefetch,
            e2e.peak_rss_bytes as f64 / 1048576.0
        );
        println!(
            "| publish → event latency at {offered:.0}/s offered | p50 {p50:.1} ms, p95 {p95:.1} ms, p99 {p99:.1} ms | |"
        );
        println!(
            "| throughput with 100 ms provider latency | {:.0} commands/s | ≥ {latency_target:.0}/s |",
            slow.throughput
        );
        println!(
            "| worker peak RSS with 100 ms latency ({} in flight) | {:.1} MiB | < 64 MiB |",
            o.prefetch,
            slow.peak_rss_bytes as f64 / 1048576.0
        );
        println!(
            "| provider limited to {rate}/s, two replicas (shipped defaults) | {:.0} commands/s, {:.2} % of calls answered 429 | ≥ {:.0}/s, < 2 % |",
            limited.throughput,
            limited.share_429 * 100.0,
            f64::from(rate) * 0.9
        );
        print_found_rows(&o, &found, &found_bare, &changing, remembered);
        println!(
            "| two provider ids, one down: the healthy one | {healthy:.0} commands/s ({:.0} % of its solo {solo:.0}/s measured right after; {:.0} % of the end-to-end phase) | ≥ 90 % of solo |",
            healthy / solo * 100.0,
            healthy / e2e.throughput * 100.0,
        );
        println!(
            "| … where it went | the down provider's commands alone are parked at {parked_alone:.0}/s: the worker's time for one healthy and one parked command, each measured alone, leaves the healthy one {:.0} % | |",
            100.0 / (1.0 + solo / parked_alone),
        );
        println!(
            "| worker CPU per command ÷ the lapin loop's client CPU per message | {:.1}× ({:.3} vs {:.3} s per 1,000) | ≤ 4× |",
            e2e.cpu_seconds_per_1000 / ceiling_cpu.bench.max(1e-9),
            e2e.cpu_seconds_per_1000,
            ceiling_cpu.bench
        );
        println!(
            "| throughput with 300 ms provider latency, shipped defaults (prefetch {shipped_prefetch}) | {:.0} commands/s (peak RSS {:.1} MiB) | ≥ 80 % × {shipped_prefetch} / 0.3 s = {slow_shipped_target:.0}/s |",
            slow_shipped.throughput,
            slow_shipped.peak_rss_bytes as f64 / 1048576.0
        );
        println!();
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
