//! `status`: one screen on the whole fleet, read from what the workers already publish (their
//! heartbeat rows, the command table, the dead-letter store) and from the broker's queues, so it
//! works against any number of replicas and needs none of their HTTP ports.

use crate::broker::topology::delay_queue;
use crate::config::Settings;
use crate::fleet::Report;
use crate::provider::breaker::State as BreakerState;
use crate::store::{PgConn, StoreError, heartbeats};
use clap::Args;
use diesel::sql_types::{BigInt, Float8, Nullable};
use diesel_async::RunQueryDsl;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::time::Duration;

/// Flags of `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Refresh the screen in place until ctrl-c.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(long, default_value_t = 2, value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..))]
    pub interval: u64,
    /// One JSON document (one per refresh with --watch) instead of the screen.
    #[arg(long)]
    pub json: bool,
}

/// How far back "the last minute" looks.
const WINDOW_SECONDS: i64 = 60;

/// The fleet at one moment.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Messages ready in each queue (None: the queue is not there), with its consumers.
    pub queues: Vec<QueueDepth>,
    /// Outcomes over the last minute, fleet-wide.
    pub last_minute: Outcomes,
    /// Each provider: completions per second over the last minute, and its lanes summed over
    /// the live workers.
    pub providers: Vec<ProviderStatus>,
    /// The workers alive (seen within three heartbeats).
    pub replicas: Vec<Replica>,
    /// Open dead letters per kind.
    pub open_dead_letters: BTreeMap<String, i64>,
}

/// One queue's depth.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueDepth {
    /// Its name.
    pub name: String,
    /// Messages ready (None: the queue is not declared).
    pub ready: Option<u32>,
    /// Consumers on it.
    pub consumers: Option<u32>,
}

/// What the fleet did over the last minute.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcomes {
    /// Links created.
    pub created: i64,
    /// Commands that ended failed (provider rejected, retries exhausted).
    pub failed: i64,
    /// Dead letters stored (every kind).
    pub dead_lettered: i64,
    /// Created per second.
    pub per_second: f64,
    /// Time from first sight to outcome, in milliseconds: median, 95th and 99th percentile.
    pub p50_ms: Option<f64>,
    /// 95th percentile.
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
}

/// One provider across the fleet.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderStatus {
    /// paymentProviderId.
    pub provider_id: i64,
    /// Commands completed per second over the last minute.
    pub per_second: f64,
    /// Calls under way now, summed over the workers.
    pub in_flight: i64,
    /// Calls waiting for a slot, summed.
    pub queued: i64,
    /// Concurrency limits, summed.
    pub limit: i64,
    /// The worst breaker state among the workers; none when no worker reports this provider.
    pub breaker: Option<BreakerState>,
    /// The configured fleet-wide rate limit.
    pub max_requests_per_second: Option<f64>,
}

/// One live worker.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replica {
    /// Its instance id.
    pub instance_id: String,
    /// Milliseconds since its last heartbeat.
    pub seen_ms_ago: i64,
    /// What it reported (its totals and lanes).
    pub report: Report,
}

#[derive(diesel::QueryableByName)]
struct Completed {
    #[diesel(sql_type = diesel::sql_types::Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    provider: i64,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(diesel::QueryableByName)]
struct Latency {
    #[diesel(sql_type = Nullable<Float8>)]
    p50: Option<f64>,
    #[diesel(sql_type = Nullable<Float8>)]
    p95: Option<f64>,
    #[diesel(sql_type = Nullable<Float8>)]
    p99: Option<f64>,
    #[diesel(sql_type = BigInt)]
    dead: i64,
}

/// Reads the store's side of the status: outcomes, latency, replicas, dead letters.
async fn from_store(settings: &Settings, conn: &mut PgConn) -> Result<Status, StoreError> {
    let (last_minute, completed) = last_minute(conn).await?;
    let fresh = 3 * crate::fleet::beat_interval(settings);
    let alive = heartbeats::alive(conn, fresh).await?;
    let open = crate::dead_letters::store::Filter {
        state: Some(crate::dead_letters::State::Open),
        ..Default::default()
    };
    let open_dead_letters = crate::dead_letters::store::count_by_kind(conn, &open).await?;
    let reports: Vec<Report> = alive
        .iter()
        .map(|a| Report::of(a.status.as_ref()))
        .collect();
    Ok(Status {
        queues: Vec::new(),
        last_minute,
        providers: providers(&completed, &reports),
        replicas: alive
            .into_iter()
            .zip(reports)
            .map(|(a, report)| Replica {
                instance_id: a.instance_id,
                seen_ms_ago: a.age_ms,
                report,
            })
            .collect(),
        open_dead_letters,
    })
}

/// What the fleet completed in the last [`WINDOW_SECONDS`], in all and by provider.
async fn last_minute(conn: &mut PgConn) -> Result<(Outcomes, Vec<Completed>), StoreError> {
    let completed: Vec<Completed> = diesel::sql_query(
        "SELECT status, payment_provider_id AS provider, count(*)::int8 AS n
         FROM payment_link_commands
         WHERE status IN ('succeeded', 'failed') AND completed_at > now() - $1 * interval '1 second'
         GROUP BY 1, 2",
    )
    .bind::<BigInt, _>(WINDOW_SECONDS)
    .load(conn)
    .await?;
    let latency: Latency = diesel::sql_query(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY ms) AS p95,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
                (SELECT count(*) FROM dead_letters
                  WHERE failed_at > now() - $1 * interval '1 second')::int8 AS dead
         FROM (SELECT extract(epoch FROM completed_at - created_at)::float8 * 1000 AS ms
               FROM payment_link_commands
               WHERE status IN ('succeeded', 'failed')
                 AND completed_at > now() - $1 * interval '1 second') AS recent",
    )
    .bind::<BigInt, _>(WINDOW_SECONDS)
    .get_result(conn)
    .await?;
    let mut outcomes = Outcomes {
        dead_lettered: latency.dead,
        p50_ms: latency.p50,
        p95_ms: latency.p95,
        p99_ms: latency.p99,
        ..Outcomes::default()
    };
    for row in &completed {
        match row.status.as_str() {
            "succeeded" => outcomes.created += row.n,
            _ => outcomes.failed += row.n,
        }
    }
    outcomes.per_second = outcomes.created as f64 / WINDOW_SECONDS as f64;
    Ok((outcomes, completed))
}

/// Each provider: its completions a second, and its lanes summed over the live replicas.
fn providers(completed: &[Completed], reports: &[Report]) -> Vec<ProviderStatus> {
    let mut providers: BTreeMap<i64, ProviderStatus> = BTreeMap::new();
    for row in completed {
        let provider = providers.entry(row.provider).or_default();
        provider.per_second += row.n as f64 / WINDOW_SECONDS as f64;
    }
    for lane in reports.iter().flat_map(|report| &report.lanes) {
        let provider = providers.entry(lane.provider_id).or_default();
        provider.in_flight += lane.in_flight;
        provider.queued += lane.queued;
        provider.limit += lane.limit;
        provider.breaker = provider.breaker.max(Some(lane.breaker));
        provider.max_requests_per_second = lane.max_requests_per_second;
    }
    providers
        .into_iter()
        .map(|(id, mut p)| {
            p.provider_id = id;
            p
        })
        .collect()
}

/// The depth of each of the worker's queues (a passive declare each, on a channel of its own so
/// a missing queue closes only that one).
async fn queue_depths(settings: &Settings, connection: &lapin::Connection) -> Vec<QueueDepth> {
    let broker = &settings.broker;
    let mut names = vec![broker.command_queue.clone()];
    names.extend(
        settings
            .retry
            .delay_tiers_ms
            .iter()
            .map(|&ms| delay_queue(broker, ms)),
    );
    names.push(broker.dead_letter_queue.clone());
    let mut depths = Vec::with_capacity(names.len());
    for name in names {
        let declared = async {
            let channel = connection.create_channel().await?;
            let queue = channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let _ = channel.close(200, "read".into()).await;
            Ok::<_, lapin::Error>((queue.message_count(), queue.consumer_count()))
        };
        let found = declared.await.ok();
        depths.push(QueueDepth {
            name,
            ready: found.map(|f| f.0),
            consumers: found.map(|f| f.1),
        });
    }
    depths
}

/// The status now.
pub async fn read(
    settings: &Settings,
    conn: &mut PgConn,
    connection: &lapin::Connection,
) -> anyhow::Result<Status> {
    let mut status = from_store(settings, conn).await?;
    status.queues = queue_depths(settings, connection).await;
    Ok(status)
}

/// The status as one screen of text.
pub fn screen(status: &Status) -> String {
    let mut out = String::new();
    let dash = |v: Option<u32>| v.map_or("-".to_owned(), |v| v.to_string());
    let _ = writeln!(out, "{:<44} {:>8} {:>10}", "QUEUE", "READY", "CONSUMERS");
    for queue in &status.queues {
        let ready = match queue.ready {
            Some(n) => n.to_string(),
            None => "(absent)".into(),
        };
        let _ = writeln!(
            out,
            "{:<44} {:>8} {:>10}",
            queue.name,
            ready,
            dash(queue.consumers)
        );
    }
    let m = &status.last_minute;
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} ms"));
    let _ = writeln!(
        out,
        "\nLAST MINUTE  {} created ({:.1}/s), {} failed, {} dead-lettered; time to outcome p50 {}, \
         p95 {}, p99 {}",
        m.created,
        m.per_second,
        m.failed,
        m.dead_lettered,
        ms(m.p50_ms),
        ms(m.p95_ms),
        ms(m.p99_ms)
    );
    providers_screen(&mut out, &status.providers);
    fleet_screen(&mut out, status);
    out
}

/// The providers' table.
fn providers_screen(out: &mut String, providers: &[ProviderStatus]) {
    let _ = writeln!(
        out,
        "\n{:<10} {:>8} {:>10} {:>8} {:>8} {:>10} {:>10}",
        "PROVIDER", "PER SEC", "IN FLIGHT", "QUEUED", "LIMIT", "BREAKER", "MAX RATE"
    );
    for p in providers {
        let _ = writeln!(
            out,
            "{:<10} {:>8.1} {:>10} {:>8} {:>8} {:>10} {:>10}",
            p.provider_id,
            p.per_second,
            p.in_flight,
            p.queued,
            p.limit,
            p.breaker.map_or("-", BreakerState::as_str),
            p.max_requests_per_second
                .map_or("-".to_owned(), |r| format!("{r}/s"))
        );
    }
}

/// The replicas alive and the open dead letters.
fn fleet_screen(out: &mut String, status: &Status) {
    let _ = writeln!(out, "\nREPLICAS ALIVE  {}", status.replicas.len());
    for r in &status.replicas {
        let _ = writeln!(
            out,
            "  {}  seen {:.1} s ago  received {}  created {}  dead-lettered {}  delayed {}",
            // Read from the database: shown with control characters made visible.
            crate::text::visible(&r.instance_id),
            r.seen_ms_ago as f64 / 1000.0,
            r.report.received,
            r.report.created,
            r.report.dead_lettered,
            r.report.delayed
        );
    }
    let total: i64 = status.open_dead_letters.values().sum();
    let kinds: Vec<String> = status
        .open_dead_letters
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect();
    let _ = writeln!(
        out,
        "\nOPEN DEAD LETTERS  {total}{}",
        if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", kinds.join(", "))
        }
    );
}

/// Prints the status once, or refreshes it until ctrl-c.
pub async fn run(settings: &Settings, args: &StatusArgs) -> anyhow::Result<()> {
    let (_pool, mut conn) = crate::dead_letters::connect(settings, "read the status").await?;
    let connection = crate::broker::connect(&settings.broker, "payment-link-worker status").await?;
    let at_terminal = std::io::stdout().is_terminal();
    let outcome = async {
        loop {
            let status = read(settings, &mut conn, &connection).await?;
            if args.json {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                let mut text = screen(&status);
                if args.watch {
                    let now = chrono::Local::now().format("%H:%M:%S");
                    text = format!(
                        "payment-link-worker status at {now} (every {} s; ctrl-c to stop)\n\n{text}",
                        args.interval
                    );
                    if at_terminal {
                        // Home and clear: the screen is redrawn in place.
                        text.insert_str(0, "\x1b[H\x1b[2J");
                    }
                }
                print!("{text}");
            }
            if !args.watch {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(args.interval)) => {}
                _ = super::shutdown_signal() => return Ok(()),
            }
        }
    }
    .await;
    let _ = connection.close(200, "done".into()).await;
    outcome
}
