//! Fault injection: the real worker binary killed mid-load, its broker connection closed by the
//! broker, the database cut off, the provider down for longer than the retry budget, slow and
//! flaky, and bad commands mixed into a load. Each test checks the end state: every command has
//! exactly one link and at least one event with its stable event id, the command queue is empty,
//! and the dead-letter queue holds exactly the commands that belong there.

use crate::helpers::*;
use payment_link_worker::broker::messages::{CREATED, event_id};
use payment_link_worker::provider::sim::SimOptions;
use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Long enough for a few hundred commands on two shared cores, with kills and outages.
const LOAD_WAIT: Duration = Duration::from_secs(90);

fn sim(latency_ms: u64, fail_rate: f64, stall_rate: f64) -> SimOptions {
    SimOptions {
        token: TOKEN.into(),
        latency: Duration::from_millis(latency_ms),
        fail_rate,
        stall_rate,
        ..SimOptions::default()
    }
}

/// Publishes `n` commands `{prefix}-{i}` and returns their ids.
async fn send_load(env: &TestEnv, prefix: &str, n: usize, amount: &str) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        env.send(id, &command_body(amount, i as i64 + 1)).await;
    }
    ids
}

/// How many commands have their link.
async fn succeeded(env: &TestEnv) -> i64 {
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    use payment_link_worker::store::schema::payment_link_commands::dsl as c;
    let mut conn = env.pool.get().await.unwrap();
    c::payment_link_commands
        .filter(c::status.eq("succeeded"))
        .count()
        .get_result(&mut conn)
        .await
        .unwrap()
}

/// Reads the capture queue until every id in `ids` has its created event; returns how many
/// events each got. Panics after `limit`.
async fn created_events_for(
    env: &TestEnv,
    queue: &str,
    ids: &[String],
    limit: Duration,
) -> HashMap<String, usize> {
    let expected: HashMap<String, String> = ids
        .iter()
        .map(|id| (event_id(CREATED, id), id.clone()))
        .collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let started = std::time::Instant::now();
    while seen.len() < expected.len() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} with created events for {} of {} commands",
            seen.len(),
            expected.len()
        );
        match env.try_get(queue).await {
            Some(event) => {
                assert_eq!(event.routing_key, "payment-link.created");
                let id = expected
                    .get(&event.message_id())
                    .unwrap_or_else(|| panic!("unexpected event id {}", event.message_id()));
                *seen.entry(id.clone()).or_default() += 1;
            }
            None => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
    seen
}

/// Which repeated provider requests (for one `Idempotency-Key`) a test allows, and why.
enum Repeats {
    /// None: nothing in the test may make a second call for a command.
    None,
    /// A call cut short by SIGKILL is made again once its lease runs out: at most one more per
    /// kill for a command, and at most `in_flight` commands per kill.
    AfterKills { kills: u64, in_flight: u64 },
    /// Transient failures (503, timeouts) are retried by design; only links are bounded.
    Retries,
}

/// Checks that every command ended with exactly one link, that the provider was called no more
/// often per command than `repeats` allows, and that nothing is left behind.
async fn assert_clean_end(env: &TestEnv, ids: &[String], sim_url: &str, repeats: Repeats) {
    let mut links = HashSet::new();
    for id in ids {
        let record = env
            .record(id)
            .await
            .unwrap_or_else(|| panic!("{id} has a record"));
        assert_eq!(record.status, "succeeded", "{id}");
        assert!(
            links.insert(record.payment_link.clone().unwrap()),
            "{id} shares a link"
        );
    }
    let (_, links_made) = simulator_stats(sim_url).await;
    assert_eq!(
        links_made as usize,
        ids.len(),
        "the provider made exactly one link per command"
    );
    let (most, repeated) = simulator_repeats(sim_url).await;
    match repeats {
        Repeats::None => assert_eq!(
            most, 1,
            "one provider request per command ({repeated} commands were called again)"
        ),
        Repeats::AfterKills { kills, in_flight } => {
            assert!(
                most <= 1 + kills,
                "a command was called {most} times; only a call cut short by each of {kills} kills may repeat"
            );
            assert!(
                repeated <= kills * in_flight,
                "{repeated} commands called again; at most {in_flight} were in flight at each of {kills} kills"
            );
        }
        Repeats::Retries => {}
    }
    eventually("the command queue to be empty", WAIT, || async {
        (env.queue_depth(&env.command_queue()).await == 0).then_some(())
    })
    .await;
}

/// The worker binary as a child process; killed when dropped.
pub struct ChildWorker(Child);

impl ChildWorker {
    pub fn start(env: &TestEnv) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_payment-link-worker"));
        command
            .arg("run")
            .envs(env.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG");
        if std::env::var_os("TEST_LOG").is_none() {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        Self(command.spawn().expect("worker binary starts"))
    }

    /// SIGTERM, then waits for the process to exit by itself within `limit`; says how it ended.
    async fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        eventually("the worker to exit after SIGTERM", limit, || {
            let exited = self.0.try_wait().unwrap();
            async move { exited }
        })
        .await
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL: no shutdown, no cleanup.
    pub fn kill(mut self) {
        self.0.kill().expect("kill");
        self.0.wait().expect("reaped");
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_in_the_middle_of_a_load_loses_nothing_and_links_nothing_twice() {
    let (sim_url, _sim) = start_simulator(sim(10, 0.0, 0.0)).await;
    // A short lease so commands held by a killed worker are taken over within seconds.
    let env = TestEnv::with(
        &sim_url,
        &[
            ("RETRY__MAX_ELAPSED_MS", "1000"),
            ("PROVIDER__TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let events = env.capture_events().await;
    let ids = send_load(&env, "kill", 300, "19.99").await;
    for milestone in [40, 120, 200] {
        let worker = ChildWorker::start(&env);
        eventually(&format!("{milestone} commands done"), LOAD_WAIT, || async {
            (succeeded(&env).await >= milestone).then_some(())
        })
        .await;
        worker.kill();
    }
    let _last = ChildWorker::start(&env);
    created_events_for(&env, &events, &ids, LOAD_WAIT).await;
    let in_flight = u64::from(env.settings.broker.prefetch);
    assert_clean_end(
        &env,
        &ids,
        &sim_url,
        Repeats::AfterKills {
            kills: 3,
            in_flight,
        },
    )
    .await;
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
}

pub fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .arg("-q")
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A broker user of the test's own, so the broker can close exactly the worker's connections;
/// deleted when dropped.
pub struct BrokerUser(pub String);

impl BrokerUser {
    pub fn create(name: String) -> Self {
        rabbitmqctl(&["add_user", &name, "recovery-pass"]);
        rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        Self(name)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.0, "-q"])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_closed_by_the_broker_are_reopened_without_a_restart() {
    let (sim_url, _sim) = start_simulator(sim(10, 0.0, 0.0)).await;
    let env = TestEnv::new(&sim_url).await;
    let user = BrokerUser::create(format!("plw-{}", env.id));
    let mut settings = env.settings.clone();
    let url = format!("amqp://{}:recovery-pass@127.0.0.1:5672/%2f", user.0);
    settings.broker.url = payment_link_worker::config::SecretUrl::new(url);
    let events = env.capture_events().await;
    let worker = env.start_worker_with(settings).await;
    let ids = send_load(&env, "conn", 200, "5.00").await;
    for milestone in [30, 100] {
        eventually(&format!("{milestone} commands done"), LOAD_WAIT, || async {
            (succeeded(&env).await >= milestone).then_some(())
        })
        .await;
        rabbitmqctl(&[
            "close_all_user_connections",
            &user.0,
            "closed by the recovery test",
        ]);
    }
    created_events_for(&env, &events, &ids, LOAD_WAIT).await;
    assert_clean_end(&env, &ids, &sim_url, Repeats::None).await;
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
    worker
        .stop()
        .await
        .expect("the same worker, never restarted, stops cleanly");
}

/// A TCP proxy the test can cut (dropping every connection and refusing new ones) and restore,
/// or stall: a black hole that keeps every connection open and forwards nothing, as a server
/// that hangs does. Connections caught in a stall stay black holes until the proxy is dropped.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    stalled: Arc<tokio::sync::watch::Sender<bool>>,
    refused: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Proxy {
    async fn start(target: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(generation);
        let refused = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let stalled = Arc::new(tokio::sync::watch::channel(false).0);
        let (up2, generation2, refused2, stop2, stalled2) = (
            up.clone(),
            generation.clone(),
            refused.clone(),
            stop.clone(),
            stalled.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                if !up2.load(Ordering::SeqCst) {
                    refused2.fetch_add(1, Ordering::SeqCst);
                    continue; // dropped at once
                }
                let held = stop2.clone();
                if *stalled2.borrow() {
                    refused2.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let _open = inbound;
                        held.cancelled().await;
                    });
                    continue;
                }
                let mut cut = generation2.subscribe();
                let mut stall = stalled2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                        _ = async { stall.wait_for(|stalled| *stalled).await.is_ok() } => {
                            held.cancelled().await
                        }
                    }
                });
            }
        });
        Self {
            port,
            up,
            generation,
            stalled,
            refused,
            stop,
        }
    }

    /// Stops forwarding without closing anything; new connections are held open, unanswered.
    fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// New connections are forwarded again; those caught in the stall stay black holes.
    fn unstall(&self) {
        self.stalled.send_replace(false);
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_network_cut_to_the_broker_is_ridden_out() {
    let (sim_url, _sim) = start_simulator(sim(10, 0.0, 0.0)).await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let env = TestEnv::new(&sim_url).await;
    let mut settings = env.settings.clone();
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    settings.broker.url = payment_link_worker::config::SecretUrl::new(url);
    let events = env.capture_events().await;
    let worker = env.start_worker_with(settings).await;
    let ids = send_load(&env, "blip", 150, "6.00").await;
    eventually("some commands done", LOAD_WAIT, || async {
        (succeeded(&env).await >= 30).then_some(())
    })
    .await;
    proxy.cut();
    eventually(
        "the worker to try to reconnect while the network is cut",
        WAIT,
        || async { (proxy.refused.load(Ordering::SeqCst) >= 1).then_some(()) },
    )
    .await;
    proxy.restore();
    created_events_for(&env, &events, &ids, LOAD_WAIT).await;
    assert_clean_end(&env, &ids, &sim_url, Repeats::None).await;
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
    worker
        .stop()
        .await
        .expect("the worker, never restarted, stops cleanly");
}

/// The test's settings with the database reached through `proxy`.
fn database_through(env: &TestEnv, proxy: &Proxy) -> payment_link_worker::config::Settings {
    let mut settings = env.settings.clone();
    let direct = settings.database.url.expose().to_owned();
    let through_proxy = direct.replacen(":5432/", &format!(":{}/", proxy.port), 1);
    assert_ne!(direct, through_proxy);
    settings.database.url = payment_link_worker::config::SecretUrl::new(through_proxy);
    settings
}

/// The first 20 of 60 commands, sent and done before a fault; returns the 60 ids.
async fn first_wave(env: &TestEnv, prefix: &str) -> Vec<String> {
    let ids: Vec<String> = (0..60).map(|i| format!("{prefix}-{i}")).collect();
    for (i, id) in ids[..20].iter().enumerate() {
        env.send(id, &command_body("3.00", i as i64 + 1)).await;
    }
    eventually("the first commands done", LOAD_WAIT, || async {
        (succeeded(env).await >= 20).then_some(())
    })
    .await;
    ids
}

/// The other 40, sent during the fault.
async fn second_wave(env: &TestEnv, ids: &[String]) {
    for (i, id) in ids[20..].iter().enumerate() {
        env.send(id, &command_body("3.00", i as i64 + 21)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_outage_delays_commands_but_fails_none() {
    let (sim_url, _sim) = start_simulator(sim(5, 0.0, 0.0)).await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let env = TestEnv::new(&sim_url).await;
    let settings = database_through(&env, &proxy);
    let events = env.capture_events().await;
    let worker = env.start_worker_with(settings).await;

    let ids = first_wave(&env, "db").await;
    proxy.cut();
    second_wave(&env, &ids).await;
    eventually(
        "the worker to try the database during the outage",
        WAIT,
        || async { (proxy.refused.load(Ordering::SeqCst) >= 3).then_some(()) },
    )
    .await;
    assert_eq!(
        env.queue_depth(&env.dead_letter_queue()).await,
        0,
        "nothing dead-lettered during the outage"
    );
    proxy.restore();

    created_events_for(&env, &events, &ids, LOAD_WAIT).await;
    assert_clean_end(&env, &ids, &sim_url, Repeats::None).await;
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
    worker.stop().await.expect("the worker rode out the outage");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_outage_under_load_writes_a_handful_of_warnings_not_one_per_command() {
    let (sim_url, _sim) = start_simulator(sim(5, 0.0, 0.0)).await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let env = TestEnv::new(&sim_url).await;
    let through = database_through(&env, &proxy);
    let mut child = binary(&env)
        .arg("run")
        .env("DATABASE_URL", through.database.url.expose())
        .env("PAYMENT_LINK_WORKER__LOG__FORMAT", "json")
        .env("PAYMENT_LINK_WORKER__LOG__SUMMARY_INTERVAL_MS", "2000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = crate::first_hour::collect(child.stderr.take().unwrap());
    let _worker = Reaped::new(child);
    let events = env.capture_events().await;

    // 200 commands, 40 of them done before the database goes away for 5 seconds.
    let ids: Vec<String> = (0..200).map(|i| format!("quiet-{i}")).collect();
    for (i, id) in ids[..40].iter().enumerate() {
        env.send(id, &command_body("3.00", i as i64 + 1)).await;
    }
    eventually("the first commands done", LOAD_WAIT, || async {
        (succeeded(&env).await >= 40).then_some(())
    })
    .await;
    proxy.cut();
    for (i, id) in ids[40..].iter().enumerate() {
        env.send(id, &command_body("3.00", i as i64 + 41)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.restore();
    created_events_for(&env, &events, &ids, LOAD_WAIT).await;

    let text = log.lock().unwrap().clone();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") && l.contains("will try again"))
        .collect();
    assert!(
        !warnings.is_empty() && warnings.len() <= 10,
        "{} warning lines for a 5-second outage under load:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_wait_in_their_queue_while_the_database_is_down_and_are_stored_once_after() {
    use payment_link_worker::dead_letters::store::{self as store, Filter};
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let env = TestEnv::with("http://127.0.0.1:9", &[crate::operations::INGEST]).await;
    let worker = env.start_worker_with(database_through(&env, &proxy)).await;
    proxy.cut();
    let letters: Vec<_> = (0..50)
        .map(|i| crate::dead_letter_store::dead_letter(&env, i, Some(&format!("db-down-{i}"))))
        .collect();
    for letter in &letters {
        payment_link_worker::broker::publisher::publish_confirmed(&env.channel, letter)
            .await
            .unwrap();
    }
    // The ingester takes them (none left ready in the queue) and holds them unacked while it
    // cannot store them: none is stored, none is lost.
    eventually("the ingester to hold the dead letters", WAIT, || async {
        (env.queue_depth(&env.dead_letter_queue()).await == 0).then_some(())
    })
    .await;
    eventually(
        "the worker to try the database during the outage",
        WAIT,
        || async { (proxy.refused.load(Ordering::SeqCst) >= 3).then_some(()) },
    )
    .await;
    let mut conn = env.pool.get().await.unwrap();
    assert_eq!(
        store::count(&mut conn, &Filter::default()).await.unwrap(),
        0
    );
    proxy.restore();

    crate::operations::stored(&env, &Filter::default(), 50).await;
    eventually("the dead-letter queue emptied", WAIT, || async {
        (env.queue_depth(&env.dead_letter_queue()).await == 0).then_some(())
    })
    .await;
    assert_eq!(
        store::count(&mut conn, &Filter::default()).await.unwrap(),
        50
    );
    worker.stop().await.expect("the worker rode out the outage");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_hangs_holds_commands_no_longer_than_its_timeouts() {
    let (sim_url, _sim) = start_simulator(sim(5, 0.0, 0.0)).await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let env = TestEnv::new(&sim_url).await;
    let mut settings = database_through(&env, &proxy);
    settings.database.connect_timeout_ms = 1_000;
    settings.database.statement_timeout_ms = 1_000;
    let events = env.capture_events().await;
    let worker = env.start_worker_with(settings).await;
    let readyz = format!("http://{}/readyz", worker.http_addr().unwrap());

    let ids = first_wave(&env, "hang").await;
    // PostgreSQL stops answering, its connections left open: the worker must not wait forever.
    proxy.stall();
    second_wave(&env, &ids).await;
    let not_ready = eventually("readiness to name the database", WAIT, || async {
        let answer = reqwest::get(&readyz).await.ok()?;
        let status = answer.status();
        let body = answer.text().await.ok()?;
        (status == 503 && body.contains("\"database\":\"unreachable")).then_some(body)
    })
    .await;
    assert!(not_ready.contains("\"ready\":false"), "{not_ready}");
    assert_eq!(
        env.queue_depth(&env.dead_letter_queue()).await,
        0,
        "nothing dead-lettered while the database hangs"
    );
    proxy.unstall();

    created_events_for(&env, &events, &ids, LOAD_WAIT).await;
    assert_clean_end(&env, &ids, &sim_url, Repeats::None).await;
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
    worker.stop().await.expect("the worker rode out the hang");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_outage_longer_than_the_budget_waits_in_delay_queues() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&provider)
        .await;
    let env = TestEnv::with(
        &provider.uri(),
        &[
            ("RETRY__MAX_ELAPSED_MS", "300"),
            ("RETRY__DELAY_TIERS_MS", "400,800,1600,3200,6400"),
            ("BREAKER__MIN_CALLS", "5"),
            ("BREAKER__PROBE_INTERVAL_MS", "200"),
        ],
    )
    .await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    let ids = send_load(&env, "outage", 10, "8.00").await;
    // Wait until commands have spent a whole round and gone to wait in a delay queue.
    eventually("a command parked in a delay queue", WAIT, || async {
        let record = env.record("outage-0").await?;
        (record.error_message.is_some() && record.attempts > 0).then_some(())
    })
    .await;
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);

    provider.reset().await;
    answer_with_link(&provider, 201, 1, "8.00", 1).await;
    let got = env
        .messages(&events, ids.len(), Duration::from_secs(30))
        .await;
    assert!(
        got.iter().all(|e| e.routing_key == "payment-link.created"),
        "nothing failed"
    );
    for id in &ids {
        let record = env.record(id).await.unwrap();
        assert_eq!(record.status, "succeeded", "{id}");
    }
    assert!(
        env.record("outage-0").await.unwrap().attempts >= 2,
        "the attempt history is kept"
    );
    assert_eq!(
        env.queue_depth(&env.dead_letter_queue()).await,
        0,
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_flaky_provider_still_gives_every_command_exactly_one_link() {
    let (sim_url, _sim) = start_simulator(sim(20, 0.3, 0.02)).await;
    let env = TestEnv::with(
        &sim_url,
        &[
            ("PROVIDER__TIMEOUT_MS", "500"),
            ("RETRY__MAX_ELAPSED_MS", "20000"),
            ("BREAKER__FAILURE_RATIO", "0.9"),
        ],
    )
    .await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    let ids = send_load(&env, "flaky", 200, "42.4242").await;
    created_events_for(&env, &events, &ids, LOAD_WAIT).await;
    assert_clean_end(&env, &ids, &sim_url, Repeats::Retries).await;
    let (requests, _) = simulator_stats(&sim_url).await;
    assert!(
        requests as usize > ids.len(),
        "failures were retried ({requests} calls)"
    );
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_commands_in_a_load_are_dead_lettered_and_hold_nothing_up() {
    let (sim_url, _sim) = start_simulator(sim(2, 0.0, 0.0)).await;
    let env = TestEnv::new(&sim_url).await;
    let events = env.capture_events().await;
    let worker = env.start_worker().await;
    let corpus = bad_commands();
    let ids: Vec<String> = (0..200).map(|i| format!("load-{i}")).collect();
    let mut bad = corpus.iter();
    for (i, id) in ids.iter().enumerate() {
        env.send(id, &command_body("1.50", i as i64 + 1)).await;
        if i % 10 == 0
            && let Some(case) = bad.next()
        {
            env.publish_raw(
                with_header(case.properties.clone(), "x-test-case", case.name),
                &case.body,
            )
            .await;
        }
    }
    created_events_for(&env, &events, &ids, LOAD_WAIT).await;
    let dead = env
        .messages(&env.dead_letter_queue(), corpus.len(), WAIT)
        .await;
    let mut names: Vec<String> = dead
        .iter()
        .map(|d| d.header("x-test-case").unwrap())
        .collect();
    names.sort();
    let mut expected: Vec<String> = corpus.iter().map(|c| c.name.to_owned()).collect();
    expected.sort();
    assert_eq!(
        names, expected,
        "exactly the bad commands are dead-lettered"
    );
    for (letter, case) in dead.iter().map(|d| {
        (
            d,
            corpus
                .iter()
                .find(|c| Some(c.name.to_owned()) == d.header("x-test-case"))
                .unwrap(),
        )
    }) {
        assert_eq!(letter.header("x-error-kind").as_deref(), Some("validation"));
        let message = letter.header("x-error-message").unwrap();
        assert!(message.contains(case.reason), "{}: {message}", case.name);
    }
    assert_clean_end(&env, &ids, &sim_url, Repeats::None).await;
    worker.stop().await.expect("the worker never stopped");
}

/// Which resource alarm a test raises.
#[derive(Clone, Copy, Debug)]
enum Resource {
    /// The memory high watermark, set to 1 byte.
    Memory,
    /// The disk free limit, set far above the disk's size.
    Disk,
}

/// A broker resource alarm for everyone (RabbitMQ blocks every publishing connection), cleared
/// when dropped, so a failing test never leaves the broker blocked. The tests that use it run
/// alone (see `.config/nextest.toml`).
struct BrokerAlarm {
    resource: Resource,
    /// The disk free limit to restore (the memory watermark goes back to RabbitMQ's default).
    disk_limit: String,
}

impl BrokerAlarm {
    /// Reads what `drop` restores, without raising anything yet: reading it costs a
    /// `rabbitmqctl` run, which is done before a load starts so that `raise` is quick.
    fn prepare(resource: Resource) -> Self {
        let disk_limit = Command::new("rabbitmqctl")
            .args(["-q", "eval", "rabbit_disk_monitor:get_disk_free_limit()."])
            .output()
            .ok()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|limit| !limit.is_empty() && limit.chars().all(|c| c.is_ascii_digit()))
            .unwrap_or_else(|| "50000000".into());
        BrokerAlarm {
            resource,
            disk_limit,
        }
    }

    /// Raises the alarm (one `rabbitmqctl` run).
    fn raise(&self) {
        match self.resource {
            Resource::Memory => rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "1"]),
            Resource::Disk => rabbitmqctl(&["set_disk_free_limit", "1000000000000000"]),
        }
    }
}

impl Drop for BrokerAlarm {
    /// Restores the setting, then waits (bounded) until the broker has cleared the alarm, so the
    /// tests that run next find publishing open.
    fn drop(&mut self) {
        let restore: Vec<&str> = match self.resource {
            Resource::Memory => vec!["set_vm_memory_high_watermark", "0.4", "-q"],
            Resource::Disk => vec!["set_disk_free_limit", &self.disk_limit, "-q"],
        };
        let _ = Command::new("rabbitmqctl").args(&restore).status();
        for _ in 0..100 {
            let alarms = Command::new("rabbitmqctl")
                .args(["-q", "eval", "rabbit_alarm:get_alarms()."])
                .output();
            if alarms.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "[]") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "the broker still reports an alarm 10 s after the {:?} limit was restored",
            self.resource
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_alarm_blocks_publishing_but_loses_nothing_and_wedges_nothing() {
    alarm_mid_load(Resource::Memory, "alarm").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_alarm_on_disk_blocks_publishing_but_loses_nothing_and_wedges_nothing() {
    alarm_mid_load(Resource::Disk, "disk-alarm").await;
}

/// A resource alarm while commands are in flight: readiness says so, commands go on being
/// recorded, and once it clears every command has its one event and nothing is dead-lettered.
async fn alarm_mid_load(resource: Resource, prefix: &str) {
    // A slow provider keeps commands in flight (32 at a time, 150 ms each) while the alarm is on.
    let (sim_url, _sim) = start_simulator(sim(150, 0.0, 0.0)).await;
    let env = TestEnv::with(&sim_url, &[("BROKER__PUBLISH_TIMEOUT_MS", "1000")]).await;
    let events = env.capture_events().await;
    let worker = env.start_worker().await;
    let readyz = format!("http://{}/readyz", worker.http_addr().unwrap());
    let alarm = BrokerAlarm::prepare(resource);
    // Every command is published before the alarm: while it lasts, nobody can publish. The
    // broker tells a connection it is blocked only when it next publishes, so the load must
    // still be running once the alarm is up: at ~200 commands a second, 3000 last ~15 s.
    let ids = send_load(&env, prefix, 3000, "4.00").await;
    eventually("some commands done", LOAD_WAIT, || async {
        (succeeded(&env).await >= 20).then_some(())
    })
    .await;

    alarm.raise();
    let at_alarm = succeeded(&env).await;
    assert!(
        at_alarm < ids.len() as i64 - 100,
        "{at_alarm} of {} commands were done before the alarm was up: the test checks nothing",
        ids.len()
    );
    let blocked = eventually("readiness to report the blocked broker", WAIT, || async {
        let answer = reqwest::get(&readyz).await.ok()?;
        let body = answer.text().await.ok()?;
        body.contains("blocked").then_some(body)
    })
    .await;
    assert!(blocked.contains("\"ready\":false"), "{blocked}");
    // The consumer's connection is not the publisher's: acks still flow, so commands keep
    // being taken (their events wait in the outbox).
    let during = succeeded(&env).await;
    eventually(
        "commands to go on being recorded during the alarm",
        WAIT,
        || async { (succeeded(&env).await > during).then_some(()) },
    )
    .await;
    drop(alarm);

    created_events_for(&env, &events, &ids, LOAD_WAIT).await;
    assert_clean_end(&env, &ids, &sim_url, Repeats::None).await;
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
    worker
        .stop()
        .await
        .expect("the worker, never restarted, stops cleanly");
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_alarm_then_sigterm_exits_in_bounded_time_and_a_restart_loses_nothing() {
    let (sim_url, _sim) = start_simulator(sim(150, 0.0, 0.0)).await;
    let env = TestEnv::with(
        &sim_url,
        &[
            ("BROKER__PUBLISH_TIMEOUT_MS", "1000"),
            ("WORKER__SHUTDOWN_GRACE_MS", "2000"),
        ],
    )
    .await;
    let events = env.capture_events().await;
    let alarm = BrokerAlarm::prepare(Resource::Memory);
    let ids = send_load(&env, "alarm-term", 300, "4.50").await;
    let child = ChildWorker::start(&env);
    eventually("some commands done", LOAD_WAIT, || async {
        (succeeded(&env).await >= 20).then_some(())
    })
    .await;
    alarm.raise();
    // The stop must end while the broker still blocks publishers: the grace period (2 s), then
    // each bounded step; 30 s is far beyond their sum, and far below "forever".
    let status = child.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "clean exit during the alarm: {status}");
    drop(alarm);

    let _worker = env.start_worker().await;
    created_events_for(&env, &events, &ids, LOAD_WAIT).await;
    assert_clean_end(&env, &ids, &sim_url, Repeats::None).await;
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_alarm_during_a_replay_ends_the_run_with_its_dead_letters_open_again() {
    use payment_link_worker::dead_letters::store::{self as store, Filter};
    use payment_link_worker::dead_letters::{self as ops, ReplayRequest};
    let env = TestEnv::with(
        "http://127.0.0.1:9",
        &[("BROKER__PUBLISH_TIMEOUT_MS", "1000")],
    )
    .await;
    let mut conn = env.pool.get().await.unwrap();
    let rows: Vec<store::NewDeadLetter> = (0..3)
        .map(|i| store::NewDeadLetter {
            dedup_key: format!("id:alarm-{i}"),
            command_id: format!("alarm-replay-{i}"),
            kind: payment_link_worker::dead_letters::Kind::Worker(
                payment_link_worker::errors::ErrorKind::RetriesExhausted,
            ),
            error_message: "provider down".into(),
            http_status: Some(503),
            attempts: Some(3),
            error_body: None,
            failed_at: chrono::Utc::now(),
            replay_count: 0,
            payment_provider_id: Some(1),
            invoice_id: None,
            adhoc_invoice_id: None,
            customer_id: None,
            description: None,
            email: None,
            trace_id: None,
            original_exchange: env.settings.broker.command_exchange.clone(),
            original_routing_key: env.settings.broker.command_routing_key.clone(),
            properties: payment_link_worker::broker::messages::properties_to_json(
                &command_properties(&format!("alarm-replay-{i}")),
            ),
            body: command_body("1.00", i).into_bytes(),
            stored_with_changes: None,
        })
        .collect();
    store::insert_batch(&mut conn, &rows).await.unwrap();
    let request = ReplayRequest {
        include_failing: true,
        ask_if_failing: false,
        filter: Filter::default(),
        limit: None,
        dry_run: false,
        rate: None,
        accept_duplicate_risk: false,
        requested_by: "alarm-test".into(),
        source: "cli".into(),
        client_address: None,
        guard: payment_link_worker::dead_letters::guard::GuardRequest::off(),
    };
    let started = ops::start(&env.settings, &mut conn, &request)
        .await
        .unwrap();
    let alarm = BrokerAlarm::prepare(Resource::Memory);
    alarm.raise();
    // The replay's connection opens (the broker blocks only publishers), its publishes get no
    // confirm, and the run ends within its timeouts instead of waiting for the alarm to clear.
    let worked = tokio::time::timeout(
        Duration::from_secs(30),
        ops::work(&env.settings, &mut conn, started.run_id, None),
    )
    .await
    .expect("the run ends during the alarm")
    .unwrap();
    drop(alarm);
    assert_eq!(
        (worked.replayed.len(), worked.failed.len()),
        (0, 3),
        "{worked:?}"
    );
    for id in &started.ids {
        let (row, replays) = store::get(&mut conn, *id).await.unwrap().unwrap();
        assert_eq!(row.state, "open", "back for a later replay");
        assert!(replays[0].outcome.contains("no confirm"), "{replays:?}");
    }
    // (An unconfirmed copy may still reach the command queue once the alarm clears: it stays
    // open, so a later replay is confirmed, and the worker's idempotency turns the second copy
    // into the same outcome, not a second link.)
}

/// A broker-side `basic.cancel` (here: the command queue deleted under the worker) is a reason to
/// declare the topology again and consume again, never a silent stop.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_the_broker_cancels_declares_again_and_consumes_again() {
    use lapin::options::QueueDeleteOptions;
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 5, "5.00", 5).await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    env.send("before-cancel", &command_body("5.00", 5)).await;
    env.next_message(&events, WAIT).await;
    env.channel
        .queue_delete(
            env.command_queue().as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    // The queue is back (declared again by the worker), with a consumer on it.
    eventually("the worker to consume again", WAIT, || async {
        let (_, consumers) = env.queue_counts(&env.command_queue()).await?;
        (consumers == 1).then_some(())
    })
    .await;
    env.send("after-cancel", &command_body("5.00", 5)).await;
    let event = env.next_message(&events, WAIT).await;
    assert_eq!(
        event.header("cloudEvents:subject").as_deref(),
        Some("after-cancel")
    );
}

/// A command in flight when its worker's broker connection goes is settled or given back within
/// a bound, not when its provider call ends: the broker has already returned it, and its
/// redelivered copy waits for the orphan's lease. Here the orphan's provider call hangs for a
/// minute (the provider's timeout is longer); the copy gets its link within 20 s of the cut.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_orphaned_by_a_lost_connection_is_given_back_within_its_bound() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_url = format!("http://{}", listener.local_addr().unwrap());
    let (router, sim) = payment_link_worker::provider::sim::controlled(sim(0, 0.0, 0.0));
    tokio::spawn(async move { axum::serve(listener, router).await });
    let env = TestEnv::new(&sim_url).await;
    let user = BrokerUser::create(format!("plw-{}", env.id));
    let mut settings = env.settings.clone();
    let url = format!("amqp://{}:recovery-pass@127.0.0.1:5672/%2f", user.0);
    settings.broker.url = payment_link_worker::config::SecretUrl::new(url);
    settings.provider.timeout_ms = 90_000;
    let events = env.capture_events().await;
    let worker = env.start_worker_with(settings).await;
    sim.faults().hang_per_mille.store(1000, Ordering::SeqCst);
    env.send("orphan-1", &command_body("3.00", 1)).await;
    eventually("the provider call hangs", WAIT, || async {
        (sim.ledger().await.get("orphan-1").map(|k| k.hung) == Some(1)).then_some(())
    })
    .await;
    sim.faults().hang_per_mille.store(0, Ordering::SeqCst);
    rabbitmqctl(&[
        "close_all_user_connections",
        &user.0,
        "cut by the orphan test",
    ]);
    let cut = std::time::Instant::now();
    let event = env.next_message(&events, Duration::from_secs(20)).await;
    assert_eq!(
        event.header("cloudEvents:subject").as_deref(),
        Some("orphan-1")
    );
    println!(
        "the link came {:.1} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    worker.stop().await.unwrap();
}

/// A SIGKILLed worker's claims are taken over once it has been silent (no heartbeat) for
/// `OWNER_SILENT`, not when their leases run out (two minutes at the shipped settings): its
/// command, whose provider call hung, gets its link from the next worker within 40 s.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_workers_claim_is_taken_over_when_its_heartbeat_stops_not_its_lease() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_url = format!("http://{}", listener.local_addr().unwrap());
    let (router, sim) = payment_link_worker::provider::sim::controlled(sim(0, 0.0, 0.0));
    tokio::spawn(async move { axum::serve(listener, router).await });
    let shipped = [
        ("RETRY__MAX_ELAPSED_MS", "60000"),
        ("PROVIDER__TIMEOUT_MS", "10000"),
        ("WORKER__LEASE_MARGIN_MS", "30000"),
    ];
    let env = TestEnv::with(&sim_url, &shipped).await;
    assert!(
        env.settings.lease() >= Duration::from_secs(60),
        "a lease as long as shipped"
    );
    let events = env.capture_events().await;
    sim.faults().hang_per_mille.store(1000, Ordering::SeqCst);
    let first = ChildWorker::start(&env);
    env.send("silent-1", &command_body("4.00", 1)).await;
    eventually("the provider call hangs", WAIT, || async {
        (sim.ledger().await.get("silent-1").map(|k| k.hung) == Some(1)).then_some(())
    })
    .await;
    first.kill();
    sim.faults().hang_per_mille.store(0, Ordering::SeqCst);
    let killed = std::time::Instant::now();
    let _second = ChildWorker::start(&env);
    let event = env.next_message(&events, Duration::from_secs(40)).await;
    assert_eq!(
        event.header("cloudEvents:subject").as_deref(),
        Some("silent-1")
    );
    println!(
        "the link came {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
}
