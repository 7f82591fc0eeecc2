//! Guarantee: each paymentProviderId has its own circuit breaker and its own concurrency limit.
//! One provider down does not slow the commands of another; a provider that rate-limits the
//! worker (429 with `Retry-After`) gets fewer calls at once, and every command still gets its
//! link.

use crate::helpers::*;
use payment_link_worker::provider::sim::SimOptions;
use std::time::Duration;

/// How long a load may take on a busy machine.
const LOAD_WAIT: Duration = Duration::from_secs(90);

fn body(provider_id: i64, invoice_id: i64) -> String {
    format!(
        r#"{{"paymentProviderId":{provider_id},"amountInMajorCurrency":3.10,"description":"Invoice {invoice_id}","invoiceId":{}}}"#,
        invoice_id + 1
    )
}

async fn readiness(addr: std::net::SocketAddr) -> (u16, String) {
    let answer = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    (answer.status().as_u16(), answer.text().await.unwrap())
}

/// Reads `/readyz` every 20 ms until the token is cancelled; the task's result is the first body
/// that said a circuit was open, if any.
fn watch_for_an_open_circuit(
    addr: std::net::SocketAddr,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Option<String>>,
) {
    let watching = tokio_util::sync::CancellationToken::new();
    let watch = tokio::spawn({
        let watching = watching.clone();
        async move {
            while !watching.is_cancelled() {
                let (_, body) = readiness(addr).await;
                if body.contains("circuit open") {
                    return Some(body);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        }
    });
    (watching, watch)
}

/// The Prometheus sample of `name` for provider `id`.
fn per_provider(metrics: &str, name: &str, id: i64) -> Option<f64> {
    let label = format!("payment_provider_id=\"{id}\"");
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Every event in `got` is for a command whose id starts with `prefix` (provider 1's).
fn assert_only_events_of(got: &[Received], prefix: &str) {
    let subjects: Vec<String> = got
        .iter()
        .map(|e| e.header("cloudEvents:subject").unwrap_or_default())
        .collect();
    assert!(
        subjects.iter().all(|s| s.starts_with(prefix)),
        "only provider 1's commands have events: {subjects:?}"
    );
}

/// A simulator that answers 503 to every call for provider 2, and a test world pointed at it
/// whose breakers open after `min_calls` failures and then wait a minute before probing.
async fn provider_2_down(
    min_calls: &str,
    overrides: &[(&str, &str)],
) -> (TestEnv, tokio_util::sync::CancellationToken) {
    let (sim_url, sim) = start_simulator(SimOptions {
        token: TOKEN.into(),
        fail_provider_ids: vec![2],
        ..SimOptions::default()
    })
    .await;
    let mut all = vec![
        ("BREAKER__MIN_CALLS", min_calls),
        ("BREAKER__PROBE_INTERVAL_MS", "60000"),
        ("RETRY__MAX_ELAPSED_MS", "30000"),
    ];
    all.extend(overrides);
    (TestEnv::with(&sim_url, &all).await, sim)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_provider_down_does_not_slow_the_commands_of_another() {
    // Provider 2's circuit opens after 5 failures and would not be probed for a minute: a
    // breaker shared by all providers would hold provider 1's commands that long.
    let (env, _sim) = provider_2_down("5", &[]).await;
    let events = env.capture_events().await;
    let worker = env.start_worker().await;
    let addr = worker.http_addr().unwrap();
    for i in 0..8 {
        env.send(&format!("down-{i}"), &body(2, i)).await;
    }
    let (status, ready) = eventually("provider 2's circuit to open", WAIT, || async {
        let (status, body) = readiness(addr).await;
        body.contains("circuit open for paymentProviderId 2")
            .then_some((status, body))
    })
    .await;
    assert_eq!(status, 503, "every provider called so far is down: {ready}");

    let ids: Vec<String> = (0..40).map(|i| format!("up-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        env.send(id, &body(1, i as i64)).await;
    }
    let got = env.messages(&events, ids.len(), WAIT).await;
    let mut subjects: Vec<String> = got
        .iter()
        .filter_map(|e| e.header("cloudEvents:subject"))
        .collect();
    subjects.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(
        subjects, expected,
        "provider 1's commands all got their links"
    );
    let (status, ready) = readiness(addr).await;
    assert_eq!(
        status, 200,
        "provider 1 is up, so the worker is useful: {ready}"
    );
    assert!(ready.contains("paymentProviderId 2"), "{ready}");
    assert_eq!(
        env.queue_depth(&env.dead_letter_queue()).await,
        0,
        "provider 2's commands are still retrying, not dead-lettered"
    );
    drop(worker);
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_for_a_provider_that_is_down_wait_in_a_delay_queue_not_in_a_prefetch_slot() {
    // Four slots only. Commands for provider 2 that waited in-process for its circuit would
    // hold all four for a minute; parked in the delay queue they hold none.
    let overrides = [
        ("BROKER__PREFETCH", "4"),
        ("RETRY__DELAY_TIERS_MS", "60000"),
    ];
    let (env, _sim) = provider_2_down("4", &overrides).await;
    let events = env.capture_events().await;
    let worker = env.start_worker().await;
    for i in 0..12 {
        env.send(&format!("parked-{i}"), &body(2, i)).await;
    }
    let ids: Vec<String> = (0..30).map(|i| format!("flowing-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        env.send(id, &body(1, i as i64)).await;
    }
    let got = env.messages(&events, ids.len(), WAIT).await;
    assert_only_events_of(&got, "flowing-");
    let delay_queue =
        payment_link_worker::broker::topology::delay_queue(&env.settings.broker, 60_000);
    eventually("provider 2's commands parked", WAIT, || async {
        (env.queue_depth(&delay_queue).await == 12).then_some(())
    })
    .await;
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
    drop(worker);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_provider_is_paced_under_its_limit_and_every_command_gets_one_link_and_its_breaker_stays_closed()
 {
    let (sim_url, _sim) = start_simulator(SimOptions {
        token: TOKEN.into(),
        latency: Duration::from_millis(5),
        rate_limit: Some(150),
        ..SimOptions::default()
    })
    .await;
    // A delay tier to park in, were a 429 to send a command there (it must not).
    let env = TestEnv::with(
        &sim_url,
        &[
            ("RETRY__MAX_ELAPSED_MS", "60000"),
            ("RETRY__DELAY_TIERS_MS", "60000"),
        ],
    )
    .await;
    let events = env.capture_events().await;
    // Ten seconds of work at the limit: the first cut reads the trailing second, which can span
    // two of the provider's windows and overstate its rate, and only a later 429 corrects it
    // (with 600 commands the work could end before one came, leaving the rate high: it did
    // once on a loaded machine).
    const COMMANDS: usize = 1500;
    let ids: Vec<String> = (0..COMMANDS).map(|i| format!("limited-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        env.send(id, &body(4, i as i64)).await;
    }
    let worker = env.start_worker().await;
    // The lane finds a rate of its own, at most the provider's (plus the growth of one probe).
    // (Waited for by hand, so that a failure says where the rate was: once, on a busy machine,
    // it was not in this window within the bound.)
    let started = std::time::Instant::now();
    let paced = loop {
        let rate = per_provider(&worker.metrics(), "payment_link_provider_rate", 4);
        if let Some(rate) = rate.filter(|r| *r > 0.0 && *r <= 150.0 * 1.2) {
            break rate;
        }
        assert!(
            started.elapsed() < LOAD_WAIT,
            "the lane was not paced near the limit within {LOAD_WAIT:?}: its rate is {rate:?}, \
             the simulator counted {}",
            simulator_counters(&sim_url).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(paced >= 5.0, "{paced}");
    // "Slow down" is not "down": the breaker stays closed while 429s come (read from /readyz
    // every 50 ms through the run).
    let (watching, watch) = watch_for_an_open_circuit(worker.http_addr().unwrap());
    let got = env.messages(&events, ids.len(), LOAD_WAIT).await;
    watching.cancel();
    assert_eq!(watch.await.unwrap(), None, "the breaker opened on 429s");
    assert_eq!(got.len(), ids.len());
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
    let stats = simulator_counters(&sim_url).await;
    assert!(
        stats["rateLimited"].as_u64().unwrap() > 0,
        "the provider did push back: {stats}"
    );
    // Exactly one link per command: one successful call per Idempotency-Key.
    assert_eq!(stats["links"], COMMANDS, "{stats}");
    assert_eq!(stats["idempotencyKeys"], COMMANDS, "{stats}");
    let metrics = worker.metrics();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("payment_link_commands_delayed") && !l.ends_with(" 0")),
        "a 429 parked a command: {metrics}"
    );
    assert!(
        per_provider(&metrics, "payment_link_provider_slowed_down_total", 4)
            .is_some_and(|n| n > 0.0),
        "the lane counts its 429s: {metrics}"
    );
    assert_eq!(
        per_provider(&metrics, "payment_link_provider_in_flight", 4),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        per_provider(&metrics, "payment_link_provider_queued", 4),
        Some(0.0)
    );
    drop(worker);
}

/// A 10 ms provider that answers 429 above `limit` calls a second, and a sandbox whose workers
/// beat every 200 ms (their found rates reach the others, and the test, quickly) and keep
/// retrying a refused call for a minute.
async fn limited_to(limit: u32) -> (String, tokio_util::sync::CancellationToken, TestEnv) {
    let (sim_url, sim) = start_simulator(SimOptions {
        token: TOKEN.into(),
        latency: Duration::from_millis(10),
        rate_limit: Some(limit),
        ..SimOptions::default()
    })
    .await;
    let env = TestEnv::with(
        &sim_url,
        &[
            ("RETRY__MAX_ELAPSED_MS", "60000"),
            ("TELEMETRY__LEVELS_INTERVAL_MS", "200"),
        ],
    )
    .await;
    (sim_url, sim, env)
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_converge_on_the_rate_they_find_and_a_new_one_takes_its_share_before_calling() {
    let (_sim_url, _sim, env) = limited_to(60).await;
    let events = env.capture_events().await;
    let first = env.start_worker().await;
    let second = env.start_worker().await;
    let ids: Vec<String> = (0..600).map(|i| format!("shared-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        env.send(id, &body(6, i as i64)).await;
    }
    // Both report a found rate for provider 6, and they agree (each took the fleet's mean).
    #[derive(diesel::QueryableByName, Debug)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
        found: Option<f64>,
    }
    let read = || async {
        let mut conn = env.pool.get().await.unwrap();
        diesel_async::RunQueryDsl::load::<Found>(
            diesel::sql_query(
                "SELECT (lane->>'foundRate')::float8 AS found FROM worker_heartbeats,
                 jsonb_array_elements(status->'lanes') AS lane
                 WHERE (lane->>'providerId')::int8 = 6",
            ),
            &mut conn,
        )
        .await
        .unwrap()
    };
    // The first cut can read a burst across the simulator's one-second windows (up to twice its
    // limit) and land above it; the second brings it under. Converged means: both agree, under
    // the limit's bound.
    eventually(
        "both replicas to agree on a found rate under the limit",
        LOAD_WAIT,
        || async {
            let rows = read().await;
            let rates: Vec<f64> = rows.iter().filter_map(|r| r.found).collect();
            (rates.len() == 2
                && (rates[0] - rates[1]).abs() <= 0.1 * rates[0].max(rates[1])
                && rates.iter().all(|r| (10.0..=90.0).contains(r)))
            .then_some(())
        },
    )
    .await;
    let got = env.messages(&events, ids.len(), LOAD_WAIT).await;
    assert_eq!(got.len(), ids.len());
    // A third replica, joining, takes the fleet's rate from the heartbeats before any 429 of
    // its own: its lane is paced though it has made no call.
    let third = env.start_worker().await;
    let adopted = eventually(
        "the new replica to adopt the fleet's rate",
        WAIT,
        || async {
            per_provider(&third.metrics(), "payment_link_provider_rate", 6).filter(|r| *r > 0.0)
        },
    )
    .await;
    assert!((30.0..=90.0).contains(&adopted), "{adopted}");
    assert_eq!(
        per_provider(
            &third.metrics(),
            "payment_link_provider_slowed_down_total",
            6
        ),
        Some(0.0),
        "it was told, not pushed back"
    );
    drop((first, second, third));
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_a_fleet_rate_limit_and_stay_under_the_providers() {
    // The provider allows 20 calls a second; the fleet is told 12 for provider 5 (room for
    // calls that a busy machine delays into the next second). Two workers that each took the
    // whole 12 would go over the provider's limit and get 429s.
    let (sim_url, _sim) = start_simulator(SimOptions {
        token: TOKEN.into(),
        rate_limit: Some(20),
        ..SimOptions::default()
    })
    .await;
    let env = TestEnv::with(
        &sim_url,
        &[("PROVIDER__MAX_REQUESTS_PER_SECOND_BY_ID", "9=1000, 5=12")],
    )
    .await;
    let events = env.capture_events().await;
    let first = env.start_worker().await;
    let second = env.start_worker().await;
    for worker in [&first, &second] {
        eventually("each worker to count two live workers", WAIT, || async {
            let metrics = worker.metrics();
            metrics
                .lines()
                .any(|l| l.starts_with("payment_link_workers_live") && l.ends_with(" 2"))
                .then_some(())
        })
        .await;
    }
    let ids: Vec<String> = (0..48).map(|i| format!("paced-{i}")).collect();
    // 48 calls at 12 a second: 4 s, long enough for either worker alone to go over 20.
    for (i, id) in ids.iter().enumerate() {
        env.send(id, &body(5, i as i64)).await;
    }
    let got = env.messages(&events, ids.len(), LOAD_WAIT).await;
    assert_eq!(got.len(), ids.len());
    let stats = simulator_counters(&sim_url).await;
    assert_eq!(stats["links"], 48, "{stats}");
    assert_eq!(
        stats["rateLimited"], 0,
        "the fleet stayed under the provider's limit: {stats}"
    );
    drop(first);
    drop(second);
}

#[tokio::test(flavor = "multi_thread")]
async fn while_a_providers_circuit_is_open_its_commands_are_parked_before_any_database_work() {
    let overrides = [("RETRY__DELAY_TIERS_MS", "60000")];
    let (env, _sim) = provider_2_down("4", &overrides).await;
    let events = env.capture_events().await;
    let worker = env.start_worker().await;
    let addr = worker.http_addr().unwrap();
    for i in 0..6 {
        env.send(&format!("trip-{i}"), &body(2, i)).await;
    }
    eventually("provider 2's circuit to open", WAIT, || async {
        let (_, ready) = readiness(addr).await;
        ready
            .contains("circuit open for paymentProviderId 2")
            .then_some(())
    })
    .await;
    let delay_queue =
        payment_link_worker::broker::topology::delay_queue(&env.settings.broker, 60_000);
    // Every command that tripped it has ended its round: no call of theirs is still under way.
    eventually(
        "the commands that tripped the circuit to be parked",
        WAIT,
        || async { (env.queue_depth(&delay_queue).await == 6).then_some(()) },
    )
    .await;
    let provider_url = env.settings.provider.base_url.expose().to_owned();
    let (calls_before, _) = simulator_stats(&provider_url).await;
    let late: Vec<String> = (0..10).map(|i| format!("late-{i}")).collect();
    let up: Vec<String> = (0..20).map(|i| format!("up-{i}")).collect();
    for (i, up) in up.iter().enumerate() {
        if let Some(late) = late.get(i) {
            env.send(late, &body(2, 100 + i as i64)).await;
        }
        env.send(up, &body(1, i as i64)).await;
    }
    let got = env.messages(&events, up.len(), WAIT).await;
    assert_only_events_of(&got, "up-");
    eventually("every command for provider 2 parked", WAIT, || async {
        (env.queue_depth(&delay_queue).await == 16).then_some(())
    })
    .await;
    for id in &late {
        assert!(
            env.record(id).await.is_none(),
            "{id} came while the circuit was open: parked without a claim"
        );
    }
    let (calls_after, _) = simulator_stats(&provider_url).await;
    assert_eq!(
        calls_after - calls_before,
        20,
        "provider 1's twenty calls only, none for provider 2's late commands"
    );
    let mut parked = Vec::new();
    while let Some(message) = env.try_get(&delay_queue).await {
        parked.push(message);
    }
    let late_copies: Vec<_> = parked
        .iter()
        .filter(|m| m.message_id().starts_with("late-"))
        .collect();
    assert_eq!(late_copies.len(), late.len());
    for copy in late_copies {
        let why = copy.header("x-last-error").unwrap_or_default();
        assert!(
            why.contains("circuit for paymentProviderId 2 is open"),
            "the parked copy says why: {why}"
        );
        assert_eq!(copy.header_int("x-delay-round"), Some(1));
        assert_eq!(copy.header_int("x-attempts"), Some(0));
    }
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
    drop(worker);
}

/// "Slow down" is not "down": a provider that answers 429 to every first call (the kind of
/// answer that opened the breaker twice in the issue's measurement) keeps its circuit closed, and
/// every command gets its link on a later call, with nothing dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn answers_of_429_never_open_the_circuit_breaker() {
    use wiremock::{Mock, MockServer, ResponseTemplate, matchers::method};
    let provider = MockServer::start().await;
    let n = 30;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429))
        .up_to_n_times(n)
        .with_priority(1)
        .mount(&provider)
        .await;
    answer_with_link(&provider, 201, 9, "9.00", 9).await;
    let env = TestEnv::with(
        &provider.uri(),
        &[
            ("BREAKER__MIN_CALLS", "5"),
            ("RETRY__MAX_ELAPSED_MS", "30000"),
        ],
    )
    .await;
    let events = env.capture_events().await;
    for i in 0..n {
        env.send(&format!("slow-down-{i}"), &body(9, i as i64))
            .await;
    }
    let worker = env.start_worker().await;
    let (watching, watch) = watch_for_an_open_circuit(worker.http_addr().unwrap());
    let got = env.messages(&events, n as usize, LOAD_WAIT).await;
    watching.cancel();
    assert_eq!(watch.await.unwrap(), None, "the breaker opened on 429s");
    assert_eq!(got.len(), n as usize);
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);
}

/// `Retry-After` pauses the whole lane: after provider 1 answers 429 with `Retry-After: 1`, no
/// request reaches provider 1 until that second is over, while provider 2's requests go on; the
/// commands waiting out the pause are not given up (the wait is not taken from the retry
/// budget), and every command gets its link.
#[tokio::test(flavor = "multi_thread")]
async fn retry_after_pauses_the_providers_lane_and_only_its_lane() {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    use wiremock::{Mock, MockServer, Request, ResponseTemplate, matchers::method};
    let provider = MockServer::start().await;
    let seen: Arc<Mutex<Vec<(Instant, i64, u16)>>> = Arc::default();
    let answered_429 = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let responder = {
        let (seen, answered_429) = (seen.clone(), answered_429.clone());
        move |request: &Request| {
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            let id = body["paymentProviderId"].as_i64().unwrap();
            let first = id == 1 && !answered_429.swap(true, std::sync::atomic::Ordering::SeqCst);
            let status = if first { 429 } else { 201 };
            seen.lock().unwrap().push((Instant::now(), id, status));
            if first {
                ResponseTemplate::new(429).insert_header("Retry-After", "1")
            } else {
                ResponseTemplate::new(201)
                    .set_body_raw(provider_answer(1, "3.10", 1), "application/json")
                    .set_delay(Duration::from_millis(20))
            }
        }
    };
    Mock::given(method("POST"))
        .respond_with(responder)
        .mount(&provider)
        .await;
    // A budget shorter than the pause plus the queue behind it.
    let env = TestEnv::with(&provider.uri(), &[("RETRY__MAX_ELAPSED_MS", "1500")]).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    // The first command gets the 429; the rest are sent once it has, so none was under way.
    env.send("paused-0", &body(1, 0)).await;
    eventually("provider 1's 429", WAIT, || async {
        seen.lock()
            .unwrap()
            .iter()
            .any(|(_, _, s)| *s == 429)
            .then_some(())
    })
    .await;
    for i in 1..10 {
        env.send(&format!("paused-{i}"), &body(1, i)).await;
    }
    for i in 0..40 {
        env.send(&format!("other-{i}"), &body(2, 100 + i)).await;
    }
    let got = env.messages(&events, 50, LOAD_WAIT).await;
    assert_eq!(got.len(), 50, "every command got its link");
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);

    let seen = seen.lock().unwrap().clone();
    let paused_at = seen
        .iter()
        .find(|(_, id, status)| *id == 1 && *status == 429)
        .map(|(at, _, _)| *at)
        .expect("provider 1 answered 429 once");
    // Retry-After is whole seconds; allow for the clocks' resolution.
    let until = paused_at + Duration::from_millis(950);
    let early: Vec<_> = seen
        .iter()
        .filter(|(at, id, _)| *id == 1 && *at > paused_at && *at < until)
        .collect();
    assert!(
        early.is_empty(),
        "provider 1 was called during its pause: {early:?}"
    );
    let others = seen
        .iter()
        .filter(|(at, id, _)| *id == 2 && *at > paused_at && *at < until)
        .count();
    assert!(
        others > 0,
        "provider 2's calls went on during provider 1's pause"
    );
}

/// What the fleet found of a provider's rate outlives the worker: the real binary writes it to
/// PostgreSQL when it stops, and the next one starts paced at it instead of finding it again
/// from slow start (whose first burst the provider refuses in part). Fails without the
/// memory: the second worker's first calls go out unpaced.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_worker_calls_at_the_rate_the_last_one_found_without_a_burst_of_429s() {
    // Heartbeats every 200 ms, to see the restarted worker's lane as it makes its first calls.
    let (sim_url, _sim, env) = limited_to(100).await;
    let events = env.capture_events().await;
    let worker = |log: &str| {
        let child = binary(&env)
            .arg("run")
            .env("PAYMENT_LINK_WORKER__LOG__LEVEL", log)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Reaped::new(child)
    };
    let refused = || async {
        simulator_counters(&sim_url).await["rateLimited"]
            .as_u64()
            .unwrap()
    };
    // First contact: 1,500 commands waiting (15 s at the limit), the rate found from the 429s.
    // Waiting before the worker starts, as after the restart below, so both meet the provider
    // with the same backlog, whatever the machine's speed.
    let ids: Vec<String> = (0..1500).map(|i| format!("recall-a-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        env.send(id, &body(8, i as i64)).await;
    }
    let first = worker("warn");
    assert_eq!(
        env.messages(&events, ids.len(), LOAD_WAIT).await.len(),
        ids.len()
    );
    terminate(first.take());
    let on_first_contact = refused().await;

    // It left as it stopped: its heartbeat row is gone, so the next worker does not count it
    // (and split the provider's rate with it) for three beats.
    #[derive(diesel::QueryableByName, Debug)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = env.pool.get().await.unwrap();
    let beating: Count = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query("SELECT count(*) AS n FROM worker_heartbeats"),
        &mut conn,
    )
    .await
    .unwrap();
    assert_eq!(
        beating.n, 0,
        "the stopped worker's heartbeat row is still there"
    );
    drop(conn);

    #[derive(diesel::QueryableByName, Debug)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
        found_rate: Option<f64>,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        slow_start: bool,
    }
    let mut conn = env.pool.get().await.unwrap();
    let rows: Vec<Row> = diesel_async::RunQueryDsl::load(
        diesel::sql_query(
            "SELECT found_rate, slow_start FROM provider_paces WHERE provider_id = 8",
        ),
        &mut conn,
    )
    .await
    .unwrap();
    drop(conn);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let found = rows[0].found_rate.expect("a found rate was remembered");
    assert!((20.0..=110.0).contains(&found), "{found}");
    assert!(!rows[0].slow_start, "the 429s ended slow start");

    // The next worker: 2,000 commands (about 20 s, before it would probe past the rate it
    // recalled).
    let ids: Vec<String> = (0..2000).map(|i| format!("recall-b-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        env.send(id, &body(8, 10_000 + i as i64)).await;
    }
    let _second = worker("warn");
    // Its lane is paced from its first calls, before any 429 of its own: the first heartbeat
    // that shows the lane calling shows a found rate and no "slow down" yet. A lane with nothing
    // remembered is unpaced until its first 429.
    #[derive(diesel::QueryableByName, Debug)]
    struct Lane {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
        found: Option<f64>,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        slowed: i64,
    }
    let first_seen = eventually("the restarted worker's lane to call", LOAD_WAIT, || async {
        let mut conn = env.pool.get().await.unwrap();
        let lanes: Vec<Lane> = diesel_async::RunQueryDsl::load(
            diesel::sql_query(
                "SELECT (lane->>'foundRate')::float8 AS found,
                        coalesce((lane->>'slowedDown')::int8, 0) AS slowed
                 FROM worker_heartbeats, jsonb_array_elements(status->'lanes') AS lane
                 WHERE (lane->>'providerId')::int8 = 8 AND (lane->>'calls')::int8 > 0",
            ),
            &mut conn,
        )
        .await
        .unwrap();
        lanes.into_iter().next()
    })
    .await;
    assert!(
        first_seen.slowed == 0 && first_seen.found.is_some_and(|r| r <= found),
        "the restarted lane was not paced at the remembered {found:.1}/s from its first calls: \
         {first_seen:?}"
    );
    assert_eq!(
        env.messages(&events, ids.len(), LOAD_WAIT).await.len(),
        ids.len()
    );
    let after_restart = refused().await - on_first_contact;
    println!(
        "429s: {on_first_contact} on first contact (1,500 commands), {after_restart} after the \
         restart (2,000 commands), remembered rate {found:.1}/s"
    );
    // The benchmark measures the target (under 0.5 %, 0.33 % in release with nothing else
    // running); here, beside the rest of the suite, a late call now and then spills into the
    // provider's next window.
    assert!(
        after_restart <= 20,
        "{after_restart} of about 2,000 calls refused after the restart ({on_first_contact} on \
         first contact)"
    );
}

/// Made-up provider ids cannot grow the remembered paces without bound: a write keeps the newest
/// `KEEP_AT_MOST` rows, the ones it writes among them.
#[tokio::test(flavor = "multi_thread")]
async fn the_remembered_paces_keep_only_the_newest_providers() {
    use payment_link_worker::store::paces::{self, KEEP_AT_MOST, PaceRow};
    let env = TestEnv::new("http://127.0.0.1:9").await;
    let mut conn = env.pool.get().await.unwrap();
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query(format!(
            "INSERT INTO provider_paces (provider_id, found_rate, concurrency, slow_start, found_at)
             SELECT i, 50, 16, false, now() - i * interval '1 millisecond'
             FROM generate_series(1, {}) AS i",
            KEEP_AT_MOST + 500
        )),
        &mut conn,
    )
    .await
    .unwrap();
    let written: Vec<PaceRow> = (0..10)
        .map(|i| PaceRow {
            provider_id: 1_000_000 + i,
            found_rate: Some(80.0),
            refused_rate: None,
            concurrency: 20.0,
            slow_start: false,
        })
        .collect();
    paces::remember(&mut conn, &written).await.unwrap();
    let kept = paces::recall(&mut conn, 2 * KEEP_AT_MOST).await.unwrap();
    assert_eq!(
        kept.len() as i64,
        KEEP_AT_MOST,
        "the table holds the newest only"
    );
    assert!(
        written.iter().all(|w| kept.iter().any(|k| k.pace == *w)),
        "the rows just written are kept"
    );
    assert!(
        kept.iter()
            .all(|k| k.pace.provider_id <= KEEP_AT_MOST - 10 || k.pace.provider_id >= 1_000_000),
        "the oldest went first"
    );
}
