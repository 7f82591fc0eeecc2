//! Guarantee: on a RabbitMQ cluster the worker keeps working through the loss of any node. Given
//! every node's URL, it reaches the cluster through whichever is up; when the node it is on
//! stops, when the node leading the command queue is killed, and through a rolling restart of
//! all three, progress stops for at most 5 s, every command ends with one provider request per
//! idempotency key, every event arrives, and nothing is dead-lettered.
//!
//! Uses `tests/scripts/rabbitmq-cluster` (a throwaway 3-node cluster on ports 5681-5683,
//! beside the normal broker); runs alone (`.config/nextest.toml`) and removes the cluster even
//! when it fails.

use crate::helpers::*;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use payment_link_worker::provider::sim::SimOptions;
use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

/// Longest stop in progress a node loss may cause.
const BOUND: Duration = Duration::from_secs(5);

/// The script, from `RABBITMQ_CLUSTER_SCRIPT` or the repository's own.
fn script() -> std::path::PathBuf {
    std::env::var_os("RABBITMQ_CLUSTER_SCRIPT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/rabbitmq-cluster")
        })
}

fn rmq(args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .env("RMQ_CLUSTER_DIR", cluster_dir())
        .output()
        .expect("the cluster script runs (tests/scripts/rabbitmq-cluster)");
    assert!(
        out.status.success(),
        "rabbitmq-cluster {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cluster_dir() -> String {
    std::env::temp_dir()
        .join("plw-test-rabbitmq-cluster")
        .display()
        .to_string()
}

/// The cluster for one test: started fresh, destroyed when dropped (a failed test included).
struct Cluster {
    urls: Vec<String>,
}

impl Cluster {
    fn start() -> Self {
        rmq(&["destroy"]);
        let urls = rmq(&["start", "3"])
            .lines()
            .filter(|l| l.starts_with("amqp://"))
            .map(str::to_owned)
            .collect::<Vec<_>>();
        assert_eq!(urls.len(), 3, "three nodes");
        Cluster { urls }
    }

    /// The node (1-3) a connection reached, from its `host:port`.
    fn index_of(&self, node: &str) -> usize {
        self.urls
            .iter()
            .position(|u| u.contains(node))
            .unwrap_or_else(|| panic!("{node} is not a node of {:?}", self.urls))
            + 1
    }

    /// The node leading a quorum queue.
    fn leader(&self, queue: &str) -> usize {
        let leader = rmq(&["leader", queue]);
        let name = leader.trim();
        name.strip_prefix('c')
            .and_then(|n| n.split('@').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("the leader of {queue}: {name:?}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("destroy")
            .env("RMQ_CLUSTER_DIR", cluster_dir())
            .output();
    }
}

/// A connection to the first node of `urls` that takes one.
async fn any_node(urls: &[String], except: Option<usize>) -> Connection {
    for (i, url) in urls.iter().enumerate() {
        if except == Some(i + 1) {
            continue;
        }
        if let Ok(connection) = Connection::connect(url, ConnectionProperties::default()).await {
            return connection;
        }
    }
    panic!("no node of {urls:?} takes a connection")
}

/// How many commands have their link, now.
async fn done(env: &TestEnv) -> i64 {
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    use payment_link_worker::store::schema::payment_link_commands::dsl as c;
    let Ok(mut conn) = env.pool.get().await else {
        return -1;
    };
    c::payment_link_commands
        .filter(c::status.eq("succeeded"))
        .count()
        .get_result(&mut conn)
        .await
        .unwrap_or(-1)
}

/// Publishes `n` commands (confirmed) through a node other than `except`.
async fn publish(env: &TestEnv, urls: &[String], prefix: &str, n: usize) {
    let connection = any_node(urls, None).await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let broker = &env.settings.broker;
    let mut confirms = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let confirm = channel
            .basic_publish(
                broker.command_exchange.as_str().into(),
                broker.command_routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                command_body("4.00", i as i64 + 1).as_bytes(),
                command_properties(&id),
            )
            .await
            .unwrap();
        confirms.push(confirm);
    }
    for confirm in confirms {
        assert!(
            confirm.await.unwrap().is_ack(),
            "the cluster took every command"
        );
    }
    let _ = connection.close(200, "published".into()).await;
}

/// Declares the durable quorum queue `queue` on the cluster, through a node that is up, bound to
/// `bind` (an exchange and its routing key) when given.
async fn quorum_queue(urls: &[String], queue: &str, bind: Option<(&str, &str)>) {
    let connection = any_node(urls, None).await;
    let channel = connection.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    if let Some((exchange, key)) = bind {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    let _ = connection.close(200, "declared".into()).await;
}

/// A quorum queue of the test's on the cluster, bound to every event.
async fn capture(env: &TestEnv, urls: &[String]) -> String {
    let queue = format!("t.{}.cluster-events", env.id);
    let events = env.settings.broker.event_exchange.as_str();
    quorum_queue(urls, &queue, Some((events, "#"))).await;
    queue
}

/// The command ids of the events in `queue` (read through a node that is up), until `n`
/// distinct ones have come or the wait is over.
async fn events(urls: &[String], queue: &str, n: usize) -> (HashSet<String>, usize) {
    let connection = any_node(urls, None).await;
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "cluster-test".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (mut seen, mut total) = (HashSet::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    // Past the n-th, a second more for the duplicates still coming.
    loop {
        let wait = if seen.len() < n {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(1)
        };
        if Instant::now() > deadline {
            break;
        }
        let Ok(Some(Ok(delivery))) = tokio::time::timeout(wait, consumer.next()).await else {
            break;
        };
        total += 1;
        let subject = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("cloudEvents:subject").cloned());
        if let Some(AMQPValue::LongString(subject)) = subject {
            seen.insert(String::from_utf8_lossy(subject.as_bytes()).into_owned());
        }
    }
    let _ = connection.close(200, "read".into()).await;
    (seen, total)
}

/// Dead letters in the cluster's dead-letter queue.
async fn dead_letters(env: &TestEnv, urls: &[String]) -> u32 {
    let connection = any_node(urls, None).await;
    let channel = connection.create_channel().await.unwrap();
    let depth =
        payment_link_worker::broker::queue_depth(&channel, &env.settings.broker.dead_letter_queue)
            .await
            .unwrap();
    let _ = connection.close(200, "read".into()).await;
    depth
}

/// Watches progress (commands done, counted from `before`) until `before + n` are done;
/// `fault` runs on a thread of its own once a third of the `n` are. Returns the longest time
/// without progress from the fault to the end.
async fn under_load(
    env: &TestEnv,
    before: i64,
    n: i64,
    fault: impl FnOnce() + Send + 'static,
) -> Duration {
    let started = Instant::now();
    while done(env).await < before + n / 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a third of the load done within a minute"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fault = tokio::task::spawn_blocking(fault);
    let faulted = Instant::now();
    let (mut last, mut last_change, mut longest) =
        (done(env).await, Instant::now(), Duration::ZERO);
    while last < before + n {
        assert!(
            faulted.elapsed() < Duration::from_secs(120),
            "all commands done within two minutes of the fault ({} of {n} are)",
            last - before
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = done(env).await;
        if now > last {
            longest = longest.max(last_change.elapsed());
            last = now;
            last_change = Instant::now();
        }
    }
    fault.await.expect("the fault ran");
    longest
}

/// Checks a scenario's end state: every event, one provider request per key, no dead letter.
async fn every_command_once(
    env: &TestEnv,
    cluster: &Cluster,
    sim: &str,
    queue: &str,
    prefix: &str,
    n: usize,
) {
    // Events refused while a node was going are in the outbox: the relay gets them out.
    eventually("the outbox to empty", Duration::from_secs(60), || async {
        let unsent = env.unsent().await?;
        (unsent == 0).then_some(())
    })
    .await;
    let (seen, total) = events(&cluster.urls, queue, n).await;
    let ours = seen.iter().filter(|id| id.starts_with(prefix)).count();
    assert_eq!(ours, n, "every command's event arrived");
    eprintln!(
        "{prefix}: {n} events, {} published twice (same event id)",
        total - seen.len()
    );
    let (_, repeated) = simulator_repeats(sim).await;
    assert_eq!(repeated, 0, "one provider request per idempotency key");
    assert_eq!(
        dead_letters(env, &cluster.urls).await,
        0,
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_node_loss_stops_progress_for_at_most_five_seconds() {
    let cluster = Cluster::start();
    let (sim, _stop) = start_simulator(SimOptions {
        token: TOKEN.into(),
        latency: Duration::from_millis(100),
        ..SimOptions::default()
    })
    .await;
    let env = TestEnv::with(
        &sim,
        &[
            ("BROKER__URLS", &cluster.urls.join(",")),
            ("BROKER__PUBLISH_TIMEOUT_MS", "3000"),
            ("RETRY__MAX_ELAPSED_MS", "60000"),
        ],
    )
    .await;
    let worker = env.start_worker().await;
    // A second replica given one other node only declares the same topology there, without an
    // argument mismatch, and starts.
    let mut one_node = env.settings.clone();
    one_node.broker.urls = vec![payment_link_worker::config::SecretUrl::new(
        cluster.urls[2].clone(),
    )];
    let second = env.start_worker_with(one_node).await;
    second.stop().await.unwrap();
    // `/readyz` says which node each of the worker's connections is on.
    let readyz = format!("http://{}/readyz", worker.http_addr().unwrap());
    let consumer_node = || async {
        let body: serde_json::Value =
            serde_json::from_str(&reqwest::get(&readyz).await.unwrap().text().await.unwrap())
                .unwrap();
        let nodes = body["brokerNodes"].as_object().cloned().unwrap_or_default();
        // The consuming connection is named after the worker; the others add what they are.
        nodes
            .iter()
            .find(|(name, _)| !name.contains(' '))
            .and_then(|(_, node)| node.as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("/readyz names the consumer's node: {body}"))
    };
    let queue = capture(&env, &cluster.urls).await;
    let n = 1500;

    // 1. The node the worker consumes through stops.
    publish(&env, &cluster.urls, "stop", n).await;
    let consuming = cluster.index_of(&consumer_node().await);
    let node = consuming.to_string();
    let gap = under_load(&env, 0, n as i64, move || {
        rmq(&["stop-node", &node]);
    })
    .await;
    assert!(
        gap <= BOUND,
        "stopping node {consuming} stopped progress for {gap:?}"
    );
    every_command_once(&env, &cluster, &sim, &queue, "stop-", n).await;
    let moved = cluster.index_of(&consumer_node().await);
    assert_ne!(moved, consuming, "the worker moved to another node");
    rmq(&["start-node", &consuming.to_string()]);
    eprintln!("stop node {consuming}: longest stop in progress {gap:?}");

    // 2. The node leading the command queue is killed.
    publish(&env, &cluster.urls, "kill", n).await;
    let leader = cluster.leader(&env.settings.broker.command_queue);
    let node = leader.to_string();
    let gap = under_load(&env, n as i64, n as i64, move || {
        rmq(&["kill-node", &node]);
    })
    .await;
    assert!(
        gap <= BOUND,
        "killing leader node {leader} stopped progress for {gap:?}"
    );
    every_command_once(&env, &cluster, &sim, &queue, "kill-", n).await;
    rmq(&["revive-node", &leader.to_string()]);
    eprintln!("kill leader node {leader}: longest stop in progress {gap:?}");

    // 3. A rolling restart: each node stopped and started again, one after the other.
    publish(&env, &cluster.urls, "roll", 2 * n).await;
    let gap = under_load(&env, 2 * n as i64, 2 * n as i64, || {
        for node in ["1", "2", "3"] {
            rmq(&["stop-node", node]);
            std::thread::sleep(Duration::from_secs(2));
            rmq(&["start-node", node]);
            // The restarted member catches up before the next one goes.
            std::thread::sleep(Duration::from_secs(3));
        }
    })
    .await;
    assert!(
        gap <= BOUND,
        "a rolling restart stopped progress for {gap:?}"
    );
    every_command_once(&env, &cluster, &sim, &queue, "roll-", 2 * n).await;
    eprintln!("rolling restart: longest stop in progress {gap:?}");
    worker.stop().await.unwrap();
}

/// The sandbox's database URL with `extra` hosts before its own, asking for the primary.
fn with_hosts_before(url: &str, extra: &str) -> String {
    let at = url
        .find('@')
        .map_or(url.find("://").unwrap() + 3, |at| at + 1);
    let mut url = format!("{}{extra},{}", &url[..at], &url[at..]);
    url.push(if url.contains('?') { '&' } else { '?' });
    url.push_str("target_session_attrs=read-write");
    url
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_database_url_whose_first_host_refuses_reaches_the_next() {
    let (sim, _stop) = start_simulator(SimOptions {
        token: TOKEN.into(),
        ..SimOptions::default()
    })
    .await;
    let env = TestEnv::new(&sim).await;
    let events = env.capture_events().await;
    let mut settings = env.settings.clone();
    let url = with_hosts_before(settings.database.url.expose(), "127.0.0.1:1");
    settings.database.url = payment_link_worker::config::SecretUrl::new(url);
    let worker = env.start_worker_with(settings).await;
    env.send("multi-host-1", &command_body("1.00", 1)).await;
    let event = env.next_message(&events, WAIT).await;
    assert_eq!(
        event.header("cloudEvents:subject").as_deref(),
        Some("multi-host-1")
    );
    assert!(
        env.record("multi-host-1").await.is_some(),
        "recorded in the database"
    );
    worker.stop().await.unwrap();
}

/// A second PostgreSQL cluster of this machine's version, for a test: trust auth on a port of
/// its own; dropped with the test (a failed one included).
struct SecondPostgres {
    version: String,
    name: String,
    port: u16,
}

impl SecondPostgres {
    fn create() -> Self {
        let version = std::fs::read_dir("/etc/postgresql")
            .expect("PostgreSQL's clusters (pg_createcluster) are configured in /etc/postgresql")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .max()
            .expect("a PostgreSQL version");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let name = format!("plw{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let created = Command::new("pg_createcluster")
            .args([
                &version,
                &name,
                "-p",
                &port.to_string(),
                "--start",
                "--",
                "--auth=trust",
            ])
            .output()
            .expect("pg_createcluster runs");
        let cluster = SecondPostgres {
            version,
            name,
            port,
        };
        assert!(
            created.status.success(),
            "pg_createcluster: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        cluster
    }

    fn sql(&self, database: &str, sql: &str) {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", database, "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for SecondPostgres {
    fn drop(&mut self) {
        let _ = Command::new("pg_dropcluster")
            .args(["--stop", &self.version, &self.name])
            .output();
    }
}

/// A failover: the worker writes to the first host while it is the primary; when that host turns
/// read-only (as a demoted primary does), the worker drops its connections and goes on with the
/// host that is now writable, within 5 s (reusing its old connections until they broke took
/// about 17 s); a read-only host is skipped from then on. Nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_database_failover_moves_to_the_writable_host_and_loses_nothing() {
    let (sim, _stop) = start_simulator(SimOptions {
        token: TOKEN.into(),
        ..SimOptions::default()
    })
    .await;
    let env = TestEnv::new(&sim).await;
    let events = env.capture_events().await;
    let old_primary = SecondPostgres::create();
    let database = env
        .settings
        .database
        .url
        .expose()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let database = database.split('?').next().unwrap().to_owned();
    old_primary.sql("postgres", &format!("CREATE DATABASE {database}"));
    let mut settings = env.settings.clone();
    let url = with_hosts_before(
        settings.database.url.expose(),
        &format!("127.0.0.1:{}", old_primary.port),
    );
    settings.database.url = payment_link_worker::config::SecretUrl::new(url);
    // The worker migrates the first writable host: the old primary.
    let worker = env.start_worker_with(settings).await;
    env.send("before-failover", &command_body("1.00", 1)).await;
    let first = env.next_message(&events, WAIT).await;
    assert_eq!(
        first.header("cloudEvents:subject").as_deref(),
        Some("before-failover")
    );
    assert!(
        env.record("before-failover").await.is_none(),
        "written to the first host, not the second"
    );

    // The failover: the old primary turns read-only; the second host is the primary now.
    old_primary.sql(
        "postgres",
        "ALTER SYSTEM SET default_transaction_read_only = on",
    );
    old_primary.sql("postgres", "SELECT pg_reload_conf()");
    let n = 20;
    for i in 0..n {
        env.send(&format!("after-failover-{i}"), &command_body("2.00", i + 2))
            .await;
    }
    let after = env
        .messages(&events, n as usize, Duration::from_secs(60))
        .await;
    let ids: HashSet<String> = after
        .iter()
        .filter_map(|m| m.header("cloudEvents:subject"))
        .collect();
    assert_eq!(
        ids.len(),
        n as usize,
        "every command after the failover got its event"
    );
    for i in 0..n {
        assert!(
            env.record(&format!("after-failover-{i}")).await.is_some(),
            "after-failover-{i} recorded on the new primary"
        );
    }
    assert_eq!(
        env.queue_depth(&env.dead_letter_queue()).await,
        0,
        "nothing dead-lettered"
    );
    worker.stop().await.unwrap();
}

/// A publish the cluster leaves unconfirmed (its queue lost its quorum) times out, and the
/// publisher gives its channel up for a new one on the same connection: after a leader's loss,
/// RabbitMQ 3.10 kept a channel's publishes unconfirmed (or nacked) long after the queue had a
/// new leader, while a new channel found it at once. Once the quorum is back, the new channel's
/// publishes are confirmed.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_publish_left_unconfirmed_gives_the_channel_up_for_a_new_one() {
    let cluster = Cluster::start();
    let env = TestEnv::with(
        "http://127.0.0.1:9",
        &[
            ("BROKER__URLS", &cluster.urls[0]),
            ("BROKER__PUBLISH_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let queue = format!("plw-give-up-{}", env.id);
    quorum_queue(&cluster.urls, &queue, None).await;
    let publisher =
        payment_link_worker::broker::publisher::Publisher::open(&env.settings.broker, "give-up")
            .await
            .unwrap();
    let message = |i: usize| payment_link_worker::broker::messages::OutboundMessage {
        exchange: String::new(),
        routing_key: queue.clone(),
        properties: command_properties(&format!("give-up-{i}")),
        body: b"{}".to_vec(),
    };
    publisher.publish(&message(0)).await.unwrap();
    let first = publisher.channel_number().await;

    // Two of three nodes stopped: the queue has no quorum, nothing is confirmed.
    rmq(&["stop-node", "2"]);
    rmq(&["stop-node", "3"]);
    let refused = publisher.publish(&message(1)).await;
    assert!(
        matches!(
            refused,
            Err(payment_link_worker::broker::publisher::PublishError::TimedOut(_))
        ),
        "{refused:?}"
    );
    let second = publisher.channel_number().await;
    assert_ne!(first, second, "the unconfirmed channel was given up");

    rmq(&["start-node", "2"]);
    rmq(&["start-node", "3"]);
    eventually(
        "a publish confirmed again",
        Duration::from_secs(60),
        || async { publisher.publish(&message(2)).await.ok() },
    )
    .await;
    assert!(
        publisher.channel_number().await != first,
        "the old channel is not used again"
    );
    publisher.close().await;
}
