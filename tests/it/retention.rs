//! Bounded storage: completed commands past `retention.commands_hours` are removed (with their
//! sent outbox rows), newer ones and those in processing stay, a duplicate of a removed command
//! is processed anew under the same `Idempotency-Key`; a window shorter than what it must cover
//! refuses start-up naming both settings; two sweeps at once remove each row once and the command
//! path never waits for them.

use crate::helpers::*;
use payment_link_worker::config::Settings;
use payment_link_worker::store::retention as sweep_store;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wiremock::MockServer;

/// Seconds as fractional hours, the way the setting takes them.
fn hours(seconds: f64) -> String {
    format!("{}", seconds / 3600.0)
}

async fn count(env: &TestEnv, sql_where: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    use diesel_async::RunQueryDsl;
    let mut conn = env.pool.get().await.unwrap();
    let row: N = diesel::sql_query(format!(
        "SELECT count(*) AS n FROM payment_link_commands WHERE {sql_where}"
    ))
    .get_result(&mut conn)
    .await
    .unwrap();
    row.n
}

/// Requests the provider received, by `Idempotency-Key`.
async fn per_key(provider: &MockServer) -> BTreeMap<String, usize> {
    let mut keys = BTreeMap::new();
    for request in provider.received_requests().await.unwrap() {
        let key = request.headers["idempotency-key"]
            .to_str()
            .unwrap()
            .to_owned();
        *keys.entry(key).or_default() += 1;
    }
    keys
}

#[tokio::test(flavor = "multi_thread")]
async fn completed_commands_past_the_window_go_and_a_duplicate_of_one_is_processed_anew() {
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 9, "9.00", 9).await;
    let window = hours(4.0);
    let env = TestEnv::with(
        &provider.uri(),
        &[
            ("RETENTION__COMMANDS_HOURS", window.as_str()),
            ("RETENTION__SWEEP_INTERVAL_MS", "200"),
            ("DEAD_LETTERS__RETENTION_DAYS", "0.00001"),
            ("RETRY__MAX_ELAPSED_MS", "500"),
        ],
    )
    .await;
    let events = env.capture_events().await;
    let worker = env.start_worker().await;
    for i in 0..3 {
        env.send(&format!("old-{i}"), &command_body("9.00", 9))
            .await;
    }
    env.messages(&events, 3, WAIT).await;
    // A command a worker is processing, claimed long ago: never removed.
    exec_admin(
        env.settings.database.url.expose(),
        "INSERT INTO payment_link_commands (command_id, canonical_request, payment_provider_id, \
         amount_in_major_currency, description, correlation_id, status, created_at) VALUES \
         ('in-flight', '{}', 1, 1, 'd', 'c', 'processing', now() - interval '1 day')",
    )
    .await;

    eventually(
        "the old commands removed",
        Duration::from_secs(20),
        || async { (count(&env, "command_id LIKE 'old-%'").await == 0).then_some(()) },
    )
    .await;
    env.send("new-0", &command_body("9.00", 9)).await;
    env.messages(&events, 1, WAIT).await;
    assert_eq!(
        count(&env, "command_id = 'new-0'").await,
        1,
        "a newer one stays"
    );
    assert_eq!(
        count(&env, "command_id = 'in-flight'").await,
        1,
        "in processing: stays"
    );
    assert!(
        env.outbox("old-0").await.is_empty(),
        "its outbox rows went with it"
    );
    let removed = worker.metrics();
    assert!(
        removed.contains("payment_link_retention_removed_total")
            && removed.contains("payment_link_store_commands_size"),
        "{removed}"
    );

    // A duplicate of a removed command: processed anew, the same Idempotency-Key to the provider,
    // and its event again (with the same event id, derived from the command id).
    env.send("old-0", &command_body("9.00", 9)).await;
    let again = env.next_message(&events, WAIT).await;
    assert_eq!(
        again.header("cloudEvents:subject").as_deref(),
        Some("old-0")
    );
    let keys = per_key(&provider).await;
    assert_eq!(keys.get("old-0"), Some(&2), "{keys:?}");
    assert_eq!(keys.get("new-0"), Some(&1), "{keys:?}");
    drop(worker);
}

#[test]
fn a_window_shorter_than_what_it_must_cover_refuses_start_up_naming_both() {
    let refused = |vars: &[(&str, &str)]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_payment-link-worker"));
        command
            .arg("run")
            .env("PROVIDER_TOKEN", "t")
            .env_remove("RUST_LOG");
        for (name, value) in vars {
            command.env(format!("PAYMENT_LINK_WORKER__{name}"), value);
        }
        let output = command.output().unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let store = refused(&[("RETENTION__COMMANDS_HOURS", "24")]);
    assert!(
        store.contains("retention.commands_hours") && store.contains("dead_letters.retention_days"),
        "{store}"
    );
    let tiers = refused(&[
        ("RETENTION__COMMANDS_HOURS", "0.1"),
        ("DEAD_LETTERS__RETENTION_DAYS", "0.001"),
        ("RETRY__DELAY_TIERS_MS", "600000"),
    ]);
    assert!(
        tiers.contains("retention.commands_hours") && tiers.contains("retry.delay_tiers_ms"),
        "{tiers}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sweeps_at_once_remove_each_row_once_and_the_command_path_never_waits() {
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 9, "9.00", 9).await;
    let env = TestEnv::new(&provider.uri()).await;
    let url = env.settings.database.url.expose().to_owned();
    let total = 30_000;
    exec_admin(
        &url,
        &format!(
            "INSERT INTO payment_link_commands (command_id, canonical_request, payment_provider_id, \
             amount_in_major_currency, description, correlation_id, status, completed_at, created_at) \
             SELECT 'expired-' || i, '{{}}', 1, 1, 'd', 'c', 'succeeded', now() - interval '40 days', \
                    now() - interval '40 days' FROM generate_series(1, {total}) AS i"
        ),
    )
    .await;
    let events = env.capture_events().await;
    let worker = env.start_worker().await;

    // Two statements at once, without the lock: each row goes exactly once.
    let before = chrono::Utc::now() - chrono::Duration::days(35);
    let pools = [
        payment_link_worker::store::pool(&env.settings.database).unwrap(),
        payment_link_worker::store::pool(&env.settings.database).unwrap(),
    ];
    let waits = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let watching = CancellationToken::new();
    let watcher = {
        let (pool, waits, watching) = (env.pool.clone(), waits.clone(), watching.clone());
        tokio::spawn(async move {
            use diesel_async::RunQueryDsl;
            #[derive(diesel::QueryableByName)]
            struct N {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                n: i64,
            }
            while !watching.is_cancelled() {
                let mut conn = pool.get().await.unwrap();
                let row: N = diesel::sql_query(
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                     AND datname = current_database()",
                )
                .get_result(&mut conn)
                .await
                .unwrap();
                waits.fetch_max(row.n, std::sync::atomic::Ordering::Relaxed);
                drop(conn);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let sweepers = pools.iter().map(|pool| async move {
        let mut conn = pool.get().await.unwrap();
        let mut removed = 0;
        loop {
            let n = sweep_store::commands(&mut conn, before, 1000)
                .await
                .unwrap();
            removed += n;
            if n == 0 {
                return removed;
            }
        }
    });
    // Commands flow meanwhile.
    let traffic = async {
        for i in 0..50 {
            env.send(&format!("live-{i}"), &command_body("9.00", 9))
                .await;
        }
        env.messages(&events, 50, WAIT).await
    };
    let (removed, delivered) = tokio::join!(futures_util::future::join_all(sweepers), traffic);
    watching.cancel();
    watcher.await.unwrap();
    assert_eq!(removed.iter().sum::<usize>(), total, "{removed:?}");
    assert_eq!(delivered.len(), 50);
    assert_eq!(count(&env, "command_id LIKE 'expired-%'").await, 0);
    assert_eq!(count(&env, "command_id LIKE 'live-%'").await, 50);
    assert_eq!(
        waits.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a statement waited for a lock while the sweeps ran"
    );

    // Two whole sweeps at once: one takes the lock, the other leaves it to it.
    let settings: Settings = env.settings.clone();
    let metrics = payment_link_worker::metrics::MetricsHandle::new().unwrap();
    let stop = CancellationToken::new();
    let held = pools[0].get().await.unwrap();
    let mut held = held;
    assert!(sweep_store::try_lock(&mut held).await.unwrap());
    let other =
        payment_link_worker::retention::sweep(&settings, &pools[1], &metrics.metrics, &stop)
            .await
            .unwrap();
    assert_eq!(
        other, None,
        "the lock is held: this replica leaves the sweep to the other"
    );
    sweep_store::unlock(&mut held).await.unwrap();
    let swept =
        payment_link_worker::retention::sweep(&settings, &pools[1], &metrics.metrics, &stop)
            .await
            .unwrap();
    assert!(swept.is_some());
    drop(worker);
}
