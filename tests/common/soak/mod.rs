//! The soak: the whole system on this machine (a 3-node RabbitMQ cluster, a PostgreSQL primary
//! with a streaming standby, N worker processes, the provider simulator), a steady mix of
//! commands, faults on a schedule drawn from a seed, and an exact account at the end. Shared by
//! `cargo bench --bench soak` (the tool) and the CI soak test (`tests/it/soak.rs`).
//!
//! The workers reach the broker nodes and the database hosts through proxies the harness owns
//! (so it can cut and stall their connections); the load and the collector reach the broker
//! directly, as the invoicing system and the notifiers would. Given a broker and a database
//! server instead ([`Given`]), it starts neither and draws only the faults it can cause without
//! running them.

pub mod account;
pub mod collect;
pub mod faults;
pub mod fleet;
pub mod load;
pub mod postgres;
pub mod proxy;
pub mod rabbit;
pub mod report;
pub mod schedule;

use anyhow::Context as _;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use payment_link_worker::provider::sim::{self, SimOptions};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "soak-token";
/// The broker names' prefix (the cluster is the run's own).
const PREFIX: &str = "soak";
/// The PostgreSQL clusters' name prefix (`pg_lsclusters`), so a run removes an earlier run's.
const PG_TAG: &str = "plwsoak";
const DATABASE: &str = "soak";

/// How a run goes.
#[derive(Clone, Debug)]
pub struct Options {
    /// Minutes of load and faults (the drain comes after).
    pub minutes: f64,
    pub seed: u64,
    /// Commands offered per second.
    pub rate: f64,
    pub workers: usize,
    /// Seconds between one fault's end and the next one's start, drawn in this range.
    pub gap: (u64, u64),
    /// The factor the worker's leases, timeouts, delay tiers and intervals are shortened by.
    pub compress: f64,
    /// The kinds of fault to draw from.
    pub kinds: Vec<schedule::Kind>,
    /// Also run the negative control on the run's data.
    pub plant: bool,
    /// Where the workers' logs go.
    pub dir: PathBuf,
    /// The worker binary.
    pub binary: PathBuf,
    /// Longest wait, after the load stops, for every command's outcome.
    pub drain: Duration,
    /// A broker and a database server to run against instead of the harness's own (only the
    /// faults it can cause without running them are drawn).
    pub given: Option<Given>,
}

/// A broker and a database server of the user's, as the soak is given them.
#[derive(Clone, Debug)]
pub struct Given {
    /// The broker's nodes' AMQP URLs (with the user, password and virtual host to use).
    pub amqp_urls: Vec<String>,
    /// A `postgres://` URL of a server and user that may create and drop the database `soak`.
    pub database_url: String,
}

/// A setting shortened by the compression factor: its name, its shipped value, its floor.
const COMPRESSED: [(&str, u64, u64); 16] = [
    ("RETRY__MAX_ELAPSED_MS", 60_000, 2_000),
    ("RETRY__MAX_INTERVAL_MS", 10_000, 500),
    ("PROVIDER__TIMEOUT_MS", 10_000, 1_000),
    ("PROVIDER__CONNECT_TIMEOUT_MS", 2_000, 500),
    ("WORKER__LEASE_MARGIN_MS", 30_000, 1_000),
    ("WORKER__SHUTDOWN_GRACE_MS", 30_000, 1_000),
    ("BREAKER__WINDOW_MS", 30_000, 1_000),
    ("BREAKER__PROBE_INTERVAL_MS", 5_000, 200),
    ("OUTBOX__INLINE_GRACE_MS", 10_000, 500),
    ("OUTBOX__MAX_RETRY_INTERVAL_MS", 60_000, 1_000),
    ("RETENTION__SWEEP_INTERVAL_MS", 60_000, 1_000),
    ("DATABASE__STATEMENT_TIMEOUT_MS", 30_000, 2_000),
    ("DATABASE__CONNECT_TIMEOUT_MS", 5_000, 1_000),
    ("BROKER__CONNECT_TIMEOUT_MS", 5_000, 1_000),
    ("BROKER__PUBLISH_TIMEOUT_MS", 10_000, 1_000),
    ("LOG__SUMMARY_INTERVAL_MS", 30_000, 1_000),
];
/// The shipped delay tiers, shortened like the rest (floor 200 ms).
const DELAY_TIERS_MS: [u64; 4] = [10_000, 60_000, 300_000, 1_800_000];

/// The worker's settings for a run, as `PAYMENT_LINK_WORKER__` overrides: the shortened ones.
pub fn compressed(factor: f64) -> Vec<(String, String)> {
    let short = |value: u64, floor: u64| ((value as f64 / factor) as u64).max(floor);
    let mut settings: Vec<(String, String)> = COMPRESSED
        .iter()
        .map(|(key, value, floor)| (key.to_string(), short(*value, *floor).to_string()))
        .collect();
    let tiers: Vec<String> = DELAY_TIERS_MS
        .iter()
        .map(|t| short(*t, 200).to_string())
        .collect();
    settings.push(("RETRY__DELAY_TIERS_MS".into(), tiers.join(",")));
    settings
}

/// How long a command may rightly take at most under `factor`: every delay tier and every round
/// of retries before it, and a minute for the rest. The drain's default bound.
pub fn longest_wait(factor: f64) -> Duration {
    let short = |value: u64, floor: u64| ((value as f64 / factor) as u64).max(floor);
    let tiers: u64 = DELAY_TIERS_MS.iter().map(|t| short(*t, 200)).sum();
    let round = short(COMPRESSED[0].1, COMPRESSED[0].2);
    Duration::from_millis(tiers + (DELAY_TIERS_MS.len() as u64 + 1) * round + 60_000)
}

/// The commit the run is of, marked when the tree has changes: read once, when the run starts
/// (a commit made while it goes is not what it ran).
pub fn commit() -> String {
    static COMMIT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    COMMIT.get_or_init(read_commit).clone()
}

fn read_commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(head)
            if git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty()) =>
        {
            format!("{head} (with uncommitted changes)")
        }
        Some(head) => head,
        None => "unknown (not a git checkout)".into(),
    }
}

/// Held for a whole run. Two soaks on one machine share the cluster's ports and the database
/// clusters' names, and the second's removal of leftovers removed the first's databases midway
/// (seen when the suite's three-minute soak started beside an hour's run): the second refuses.
pub struct RunLock(std::path::PathBuf);

impl RunLock {
    /// Takes the machine's soak lock, or says which process holds it.
    pub fn take() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join("plw-soak.lock");
        for _ in 0..2 {
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    std::fs::write(path.join("pid"), std::process::id().to_string())?;
                    return Ok(Self(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(path.join("pid")).unwrap_or_default();
                    let owner = owner.trim();
                    if !owner.is_empty() && std::path::Path::new(&format!("/proc/{owner}")).exists()
                    {
                        anyhow::bail!(
                            "another soak (process {owner}) is running on this machine: it owns \
                             ports 5681-5683 and the {PG_TAG}* database clusters; wait for it \
                             to end, or stop it ({})",
                            path.display()
                        );
                    }
                    // Its owner is gone (killed): the lock is stale.
                    std::fs::remove_dir_all(&path)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::bail!("cannot take the soak's lock at {}", path.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the soak and returns its report; prints the header (seed, commit, schedule, settings)
/// first and a line per fault as it goes. The cluster and the database clusters are removed at
/// the end, whatever happened.
pub async fn run(options: &Options) -> anyhow::Result<report::Report> {
    let length = Duration::from_secs_f64(options.minutes * 60.0);
    // Against a given broker and database, only what the harness can cause without running them.
    let kinds: Vec<schedule::Kind> = options
        .kinds
        .iter()
        .copied()
        .filter(|k| options.given.is_none() || !k.needs_control())
        .collect();
    anyhow::ensure!(!kinds.is_empty(), "no kind of fault is left to draw");
    let faults = schedule::draw(options.seed, length, options.gap, &kinds, options.workers);
    let settings = compressed(options.compress);
    println!("soak: seed {}  commit {}", options.seed, commit());
    println!(
        "soak: {:.1} min at {}/s, {} workers, a fault every {}-{} s, time compressed {}x",
        options.minutes,
        options.rate,
        options.workers,
        options.gap.0,
        options.gap.1,
        options.compress
    );
    for (key, value) in &settings {
        println!("soak: setting {key} = {value}");
    }
    for fault in &faults {
        println!("soak: scheduled {fault}");
    }
    std::fs::create_dir_all(&options.dir)?;
    if let Some(given) = &options.given {
        println!(
            "soak: against the given broker ({} node(s)) and database server; their own faults are not drawn",
            given.amqp_urls.len()
        );
        let pg = postgres::Pair::given(&given.database_url, DATABASE)
            .await
            .context("cannot make the run's database on the given server")?;
        let cluster = rabbit::Cluster::given(given.amqp_urls.clone());
        return soak(options, pg, cluster, faults, settings).await;
    }
    let _alone = RunLock::take()?;
    postgres::destroy_leftovers(PG_TAG).await;
    let cluster_dir = std::env::temp_dir().join("plw-soak-rabbitmq-cluster");
    let pg = postgres::Pair::create(PG_TAG, DATABASE).await;
    let cluster = rabbit::Cluster::start(&cluster_dir.display().to_string()).await;
    let (pg, cluster) = match (pg, cluster) {
        (Ok(pg), Ok(cluster)) => (pg, cluster),
        (pg, cluster) => {
            if let Ok(pg) = &pg {
                pg.destroy().await;
            }
            if let Ok(cluster) = &cluster {
                cluster.destroy().await;
            }
            pg.context("cannot make the PostgreSQL primary and standby")?;
            cluster.context("cannot start the RabbitMQ cluster")?;
            unreachable!("one of the two failed");
        }
    };
    soak(options, pg, cluster, faults, settings).await
}

/// The run proper, once the cluster and the database pair are up; tears them down at the end.
async fn soak(
    options: &Options,
    pg: postgres::Pair,
    cluster: rabbit::Cluster,
    faults: Vec<schedule::Fault>,
    settings: Vec<(String, String)>,
) -> anyhow::Result<report::Report> {
    // Each node and each database host behind a proxy of the harness's; the workers are given
    // the proxies' addresses with the URLs' own user, password and virtual host.
    let mut proxies = Vec::new();
    let mut amqp = Vec::new();
    for url in &cluster.urls {
        let mut parsed = reqwest::Url::parse(url).with_context(|| format!("{url} is not a URL"))?;
        let target = resolve(&parsed, 5672).await?;
        let proxy = proxy::Proxy::start(target).await?;
        parsed
            .set_host(Some(&proxy.addr.ip().to_string()))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        parsed
            .set_port(Some(proxy.addr.port()))
            .map_err(|()| anyhow::anyhow!("cannot set the port of {url}"))?;
        amqp.push(parsed.to_string());
        proxies.push(proxy);
    }
    let mut db_proxies = Vec::new();
    for port in pg.ports {
        let target = tokio::net::lookup_host((pg.host.as_str(), port))
            .await?
            .next()
            .with_context(|| format!("{}:{port} does not resolve", pg.host))?;
        db_proxies.push(proxy::Proxy::start(target).await?);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim_url = format!("http://{}", listener.local_addr()?);
    let (router, sim) = sim::controlled(SimOptions {
        token: TOKEN.into(),
        flaky_provider_ids: vec![load::FLAKY_PROVIDER],
        ..SimOptions::default()
    });
    let sim_stop = CancellationToken::new();
    let sim_task = tokio::spawn(
        axum::serve(listener, router)
            .with_graceful_shutdown(sim_stop.clone().cancelled_owned())
            .into_future(),
    );
    let hosts: Vec<String> = db_proxies.iter().map(|p| p.addr.to_string()).collect();
    let login = match &pg.password {
        Some(password) => format!("{}:{password}", pg.user),
        None => pg.user.clone(),
    };
    let mut env: Vec<(String, String)> = vec![
        ("AMQP_URL".into(), amqp.join(",")),
        (
            "DATABASE_URL".into(),
            format!(
                "postgres://{login}@{}/{DATABASE}?target_session_attrs=read-write",
                hosts.join(",")
            ),
        ),
        ("PROVIDER_BASE_URL".into(), sim_url),
        ("PROVIDER_TOKEN".into(), TOKEN.into()),
        ("PAYMENT_LINK_WORKER__LOG__FORMAT".into(), "json".into()),
        (
            "PAYMENT_LINK_WORKER__TELEMETRY__HTTP_LISTEN".into(),
            "127.0.0.1:0".into(),
        ),
    ];
    let names = names();
    for (key, value) in names.iter().chain(settings.iter()) {
        env.push((format!("PAYMENT_LINK_WORKER__{key}"), value.clone()));
    }
    if !cluster.controlled() {
        let mut queues = run_queues(&env)?;
        queues.push(format!("{PREFIX}.capture"));
        clear(&cluster.urls, &queues).await?;
    }
    let fleet = fleet::Fleet::start(&options.binary, env.clone(), &options.dir, options.workers)?;
    let fleet = Arc::new(tokio::sync::Mutex::new(fleet));
    let stop_bound = Duration::from_secs(60);
    let mut world = faults::World {
        cluster,
        pg,
        fleet: fleet.clone(),
        broker_proxies: proxies,
        db_proxies,
        sim: sim.clone(),
        command_queue: format!("{PREFIX}.create"),
        rate: options.rate,
        stop_bound,
    };
    let result = drive(options, &mut world, faults, &env).await;
    // The report first, to the screen and to a file: a teardown that hangs must not take it
    // with it (a 60-minute run's did).
    if let Ok(report) = &result {
        println!("\n{}", report.text());
        let _ = std::fs::write(options.dir.join("report.txt"), report.text());
    }
    fleet.lock().await.stop(stop_bound).await;
    sim_stop.cancel();
    let bound = Duration::from_secs(60);
    let _ = tokio::time::timeout(bound, sim_task).await;
    let _ = tokio::time::timeout(bound, world.cluster.destroy()).await;
    let _ = tokio::time::timeout(bound, world.pg.destroy()).await;
    result
}

/// The address a URL names (its port, or `default`), resolved.
async fn resolve(url: &reqwest::Url, default: u16) -> anyhow::Result<std::net::SocketAddr> {
    let host = url
        .host_str()
        .with_context(|| format!("{url} names no host"))?;
    let port = url.port().unwrap_or(default);
    tokio::net::lookup_host((host, port))
        .await?
        .next()
        .with_context(|| format!("{host}:{port} does not resolve"))
}

/// The broker names of a run.
fn names() -> Vec<(String, String)> {
    [
        ("BROKER__COMMAND_EXCHANGE", "commands"),
        ("BROKER__COMMAND_QUEUE", "create"),
        ("BROKER__EVENT_EXCHANGE", "events"),
        ("BROKER__DEAD_LETTER_EXCHANGE", "dead-letter"),
        ("BROKER__DEAD_LETTER_QUEUE", "create.dead-letter"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), format!("{PREFIX}.{v}")))
    .collect()
}

/// Messages ready in `queue` and its consumers, through the first node of `urls` that answers.
async fn queue_counts(urls: &[String], queue: &str) -> Option<(u32, u32)> {
    for url in urls {
        let Ok(connection) = Connection::connect(url, ConnectionProperties::default()).await else {
            continue;
        };
        let Ok(channel) = connection.create_channel().await else {
            continue;
        };
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = connection.close(200, "counted".into()).await;
        if let Ok(declared) = declared {
            return Some((declared.message_count(), declared.consumer_count()));
        }
    }
    None
}

/// Load, collector and faults until the run's length; then the drain and the account.
async fn drive(
    options: &Options,
    world: &mut faults::World,
    schedule: Vec<schedule::Fault>,
    env: &[(String, String)],
) -> anyhow::Result<report::Report> {
    let urls = world.cluster.urls.clone();
    let queue = world.command_queue.clone();
    let ready = Instant::now();
    while queue_counts(&urls, &queue)
        .await
        .is_none_or(|(_, consumers)| consumers < options.workers as u32)
    {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(120),
            "the workers did not start consuming within 120 s; see their logs in {}",
            options.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let capture = format!("{PREFIX}.capture");
    let event_exchange = format!("{PREFIX}.events");
    collect::declare(
        &urls,
        &event_exchange,
        &["payment-link.created", "payment-link.failed"],
        &capture,
    )
    .await?;
    let start = Instant::now();
    let start_wall = std::time::SystemTime::now();
    let events = collect::Events::default();
    let collector_stop = CancellationToken::new();
    let collector = tokio::spawn(collect::run(
        urls.clone(),
        capture.clone(),
        start,
        events.clone(),
        collector_stop.clone(),
    ));
    let load_stop = CancellationToken::new();
    let load = tokio::spawn(load::run(
        urls.clone(),
        format!("{PREFIX}.commands"),
        "payment-link.create".into(),
        load::Pace {
            seed: options.seed,
            rate: options.rate,
            drain: options.drain,
            start,
        },
        load_stop.clone(),
    ));
    let sampler_stop = CancellationToken::new();
    let sampler = tokio::spawn(sample(world.fleet.clone(), sampler_stop.clone()));
    let length = Duration::from_secs_f64(options.minutes * 60.0);
    let mut done = Vec::new();
    for fault in &schedule {
        tokio::time::sleep_until((start + fault.at).into()).await;
        let applied = world.apply(fault, start).await;
        println!(
            "soak: {:>7.1}s  {} ({}), undone at {:.1}s",
            applied.started.as_secs_f64(),
            fault.kind,
            applied.note,
            applied.ended.as_secs_f64()
        );
        done.push(applied);
    }
    tokio::time::sleep_until((start + length).into()).await;
    load_stop.cancel();
    let load = load.await?;
    println!(
        "soak: load stopped at {:.1}s; draining",
        start.elapsed().as_secs_f64()
    );
    let drained = drain(options, world, &load, &events, (&urls, &capture, start)).await;
    let load_end = length;
    sampler_stop.cancel();
    let exits = sampler.await?;
    world.fleet.lock().await.stop(world.stop_bound).await;
    let leftovers = leftovers(world, env, &urls).await?;
    collector_stop.cancel();
    // The collector checks its stop between broker calls; one that hangs (a consume on a queue
    // without a leader) must not hold the account (a CI run waited on it for minutes).
    if tokio::time::timeout(Duration::from_secs(10), collector)
        .await
        .is_err()
    {
        println!("soak: the collector did not stop within 10 s; reading what it collected");
    }
    let swept = collect::sweep(&urls, &capture, start, &events).await;
    if swept > 0 {
        println!("soak: {swept} events were left in the collector's queue; read them");
    }
    let dead_letters = dead_letters(world).await?;
    let ledger = world.sim.ledger().await;
    let seen = events.snapshot();
    let account = account::settle(&load.planned, &seen, &dead_letters, &ledger, &leftovers);
    let planted = if options.plant {
        let mut planted = seen.clone();
        account::plant(&mut planted, &load.planned).map_err(anyhow::Error::msg)?;
        Some(account::settle(
            &load.planned,
            &planted,
            &dead_letters,
            &ledger,
            &leftovers,
        ))
    } else {
        None
    };
    let evidence = evidence(world, &account).await;
    let progress = progress(world, start_wall).await;
    let fleet = world.fleet.lock().await;
    Ok(report::Report::new(report::Parts {
        evidence,
        options: options.clone(),
        commit: commit(),
        done,
        load: &load,
        events: &seen,
        load_end,
        drained,
        account,
        planted,
        leftovers,
        lives: &fleet.lives,
        exits,
        progress,
    }))
}

/// When each command was claimed and when it was completed, in seconds from the start of the
/// load, from the store: the workers' own progress, beside the collector's.
async fn progress(world: &faults::World, start: std::time::SystemTime) -> report::Progress {
    let epoch = start
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let sql = format!(
        "SELECT round((extract(epoch FROM created_at) - {epoch})::numeric, 3) || '|' || \
         coalesce(round((extract(epoch FROM completed_at) - {epoch})::numeric, 3)::text, '') \
         FROM payment_link_commands"
    );
    let mut progress = report::Progress::default();
    let Ok(rows) = world.pg.sql(world.pg.primary, DATABASE, &sql).await else {
        return progress;
    };
    for (claimed, completed) in rows.lines().filter_map(|l| l.split_once('|')) {
        progress.claimed.extend(claimed.parse::<f64>().ok());
        progress.completed.extend(completed.parse::<f64>().ok());
    }
    progress
}

/// Samples the workers every second; restarts one that exited by itself (and says so).
async fn sample(
    fleet: Arc<tokio::sync::Mutex<fleet::Fleet>>,
    stop: CancellationToken,
) -> Vec<String> {
    let mut exits = Vec::new();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    while !stop.is_cancelled() {
        every.tick().await;
        let Ok(mut fleet) = fleet.try_lock() else {
            continue;
        };
        fleet.sample();
        for (i, status) in fleet.exited() {
            println!("soak: worker {i} exited by itself ({status}); starting it again");
            exits.push(format!("worker {i}: {status}"));
            let _ = fleet.restart(i);
        }
    }
    exits
}

/// Waits until every command sent has an outcome (an event or a dead letter), or the drain's
/// bound; how long it took, `None` past the bound.
async fn drain(
    options: &Options,
    world: &faults::World,
    load: &load::Load,
    events: &collect::Events,
    (urls, capture, start): (&[String], &str, Instant),
) -> Option<Duration> {
    let started = Instant::now();
    // A consumer that went silent leaves events in the capture queue: when nothing new comes
    // for this long, they are read directly (the collector's own consumer gets the rest).
    const STILL: Duration = Duration::from_secs(10);
    let (mut seen, mut since) = (0, Instant::now());
    let sent: Vec<(&str, &load::Planned)> = load
        .planned
        .iter()
        .filter(|(_, p)| p.confirmed > 0)
        .map(|(id, p)| (id.as_str(), p))
        .collect();
    while started.elapsed() < options.drain {
        let with_event: std::collections::HashSet<String> = events
            .snapshot()
            .into_iter()
            .map(|e| e.command_id)
            .collect();
        let letters = dead_letters(world).await.unwrap_or_default();
        let conflicts: std::collections::HashSet<&str> = letters
            .iter()
            .filter(|l| l.kind.contains("conflict"))
            .map(|l| l.command_id.as_str())
            .collect();
        let lettered: std::collections::HashSet<&str> =
            letters.iter().map(|l| l.command_id.as_str()).collect();
        // An outcome for each command, and for each conflicting copy its dead letter.
        let open = sent.iter().any(|(id, plan)| {
            (!with_event.contains(*id) && !lettered.contains(id))
                || (plan.conflict && !conflicts.contains(id))
        });
        if !open {
            return Some(started.elapsed());
        }
        if with_event.len() != seen {
            (seen, since) = (with_event.len(), Instant::now());
        } else if since.elapsed() >= STILL {
            let swept = collect::sweep(urls, capture, start, events).await;
            if swept > 0 {
                println!(
                    "soak: the collector's queue held {swept} events it had not delivered; read them"
                );
            }
            since = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    None
}

/// What the store says of the first commands of each error the account found, read before the
/// database is removed: a red run carries its own evidence.
async fn evidence(world: &faults::World, account: &account::Account) -> Vec<String> {
    let mut lines = Vec::new();
    for ids in account.examples.values() {
        for id in ids.iter().take(3) {
            let id = id.replace('\'', "");
            let sql = format!(
                "SELECT 'command ' || command_id || ' ' || status || ' attempts ' || attempts || \
                 ' lease ' || coalesce(lease_owner, '-') || ' until ' || coalesce(lease_expires_at::text, '-') \
                 FROM payment_link_commands WHERE command_id = '{id}' \
                 UNION ALL SELECT 'dead letter ' || command_id || ' ' || kind || ' ' || state || ': ' || \
                 left(error_message, 160) FROM dead_letters WHERE command_id = '{id}'"
            );
            match world.pg.sql(world.pg.primary, DATABASE, &sql).await {
                Ok(rows) if rows.trim().is_empty() => {
                    lines.push(format!("{id}: no row, no dead letter"))
                }
                Ok(rows) => lines.extend(rows.lines().map(str::to_owned)),
                Err(error) => lines.push(format!("{id}: {error:#}")),
            }
        }
    }
    lines
}

/// The dead letters in the worker's store.
async fn dead_letters(world: &faults::World) -> anyhow::Result<Vec<account::DeadLetter>> {
    let rows = world
        .pg
        .sql(
            world.pg.primary,
            DATABASE,
            "SELECT command_id || '|' || kind FROM dead_letters",
        )
        .await?;
    Ok(rows
        .lines()
        .filter_map(|l| l.rsplit_once('|'))
        .map(|(id, kind)| account::DeadLetter {
            command_id: id.to_owned(),
            kind: kind.to_owned(),
        })
        .collect())
}

/// The queues a run's workers use, under the settings `env` gives them: the command queue, the
/// dead-letter queue and each delay tier's.
fn run_queues(env: &[(String, String)]) -> anyhow::Result<Vec<String>> {
    let settings = payment_link_worker::config::Settings::load_from(None, env.to_vec())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let broker = &settings.broker;
    let mut queues = vec![
        broker.command_queue.clone(),
        broker.dead_letter_queue.clone(),
    ];
    for &tier in &settings.retry.delay_tiers_ms {
        queues.push(payment_link_worker::broker::topology::delay_queue(
            broker, tier,
        ));
    }
    Ok(queues)
}

/// Deletes `queues` on a broker the harness was given: an earlier run's commands and events must
/// not count in this one (the harness's own cluster starts empty).
async fn clear(urls: &[String], queues: &[String]) -> anyhow::Result<()> {
    let url = urls.first().context("no broker URL")?;
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to the given broker at {}", redacted(url)))?;
    for queue in queues {
        // A missing queue closes the channel: one channel per queue.
        let channel = connection.create_channel().await?;
        let _ = channel
            .queue_delete(
                queue.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = connection.close(200, "cleared".into()).await;
    Ok(())
}

/// A URL without its password, for an error message.
fn redacted(url: &str) -> String {
    payment_link_worker::config::redact_url(url)
}

/// What is left once the workers stopped: queue contents, unsent outbox rows, open claims.
async fn leftovers(
    world: &faults::World,
    env: &[(String, String)],
    urls: &[String],
) -> anyhow::Result<account::Leftovers> {
    let mut left = account::Leftovers::default();
    let queues = run_queues(env)?;
    for queue in queues {
        let (ready, _) = queue_counts(urls, &queue).await.unwrap_or((u32::MAX, 0));
        left.queues.insert(queue, ready);
    }
    let count = |sql: &'static str| async move {
        world
            .pg
            .sql(world.pg.primary, DATABASE, sql)
            .await
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .unwrap_or(i64::MAX / 4)
    };
    left.outbox_unsent = count("SELECT count(*) FROM outbox WHERE sent_at IS NULL").await;
    left.processing =
        count("SELECT count(*) FROM payment_link_commands WHERE status = 'processing'").await;
    left.processing_ids = world
        .pg
        .sql(
            world.pg.primary,
            DATABASE,
            "SELECT command_id FROM payment_link_commands WHERE status = 'processing' LIMIT 5",
        )
        .await
        .map(|rows| rows.lines().map(str::to_owned).collect())
        .unwrap_or_default();
    Ok(left)
}
