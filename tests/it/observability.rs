//! Guarantee: an operator can see at a glance whether the worker is healthy and what it did:
//! `/healthz`, `/readyz` (saying which part is not ready) and Prometheus figures at `/metrics`.

use crate::helpers::*;
use wiremock::matchers::{header, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

async fn get(url: String) -> (u16, String) {
    let response = reqwest::get(url).await.expect("endpoint answers");
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The value of the Prometheus sample `name` whose labels include `label` (may be empty).
pub fn sample(metrics: &str, name: &str, label: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics_tell_what_happened() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("idempotency-key", "obs-rejected"))
        .respond_with(ResponseTemplate::new(400))
        .mount(&provider)
        .await;
    answer_with_link(&provider, 201, 1, "2.00", 1).await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let worker = env.start_worker().await;
    let base = format!("http://{}", worker.http_addr().expect("endpoint enabled"));

    // Every counter is there from the start, at zero, so rate() has no gap.
    let (_, fresh) = get(format!("{base}/metrics")).await;
    for (name, label) in [
        ("payment_link_commands_received_total", ""),
        ("payment_link_commands_succeeded_total", ""),
        ("payment_link_commands_panics_total", ""),
        (
            "payment_link_commands_dead_lettered_total",
            "error_type=\"validation\"",
        ),
        (
            "payment_link_commands_failed_total",
            "error_type=\"internal-error\"",
        ),
    ] {
        assert_eq!(
            sample(&fresh, name, label),
            Some(0.0),
            "{name} {label}: {fresh}"
        );
    }

    assert_eq!(get(format!("{base}/healthz")).await.0, 200);
    let (status, body) = get(format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["database"], "ok");

    for i in 0..3 {
        env.send(&format!("obs-{i}"), &command_body("2.00", 1))
            .await;
    }
    env.send("obs-0", &command_body("2.00", 1)).await; // a duplicate
    env.send("obs-rejected", &command_body("2.00", 1)).await;
    env.publish_raw(command_properties("obs-bad"), b"not json")
        .await;
    env.messages(&events, 5, WAIT).await;
    env.messages(&env.dead_letter_queue(), 2, WAIT).await;

    let metrics = eventually("the figures to add up", WAIT, || async {
        let (_, metrics) = get(format!("{base}/metrics")).await;
        (sample(&metrics, "payment_link_commands_received_total", "") == Some(6.0))
            .then_some(metrics)
    })
    .await;
    assert_eq!(
        sample(&metrics, "payment_link_commands_succeeded_total", ""),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "payment_link_commands_duplicates_total", ""),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "payment_link_commands_failed_total",
            "error_type=\"provider-rejected\""
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "payment_link_commands_dead_lettered_total",
            "error_type=\"validation\""
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "payment_link_commands_in_flight", ""),
        Some(0.0),
        "{metrics}"
    );
    assert!(
        metrics.contains("http_client_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("http_status_class=\"2xx\""), "{metrics}");
    assert!(metrics.contains("http_status_class=\"4xx\""), "{metrics}");
    assert!(
        metrics.contains("payment_link_command_time_to_outcome_seconds_bucket"),
        "{metrics}"
    );
    let metrics = eventually("the dead-letter depth gauge", WAIT, || async {
        let (_, metrics) = get(format!("{base}/metrics")).await;
        (sample(&metrics, "payment_link_dead_letter_depth", "") == Some(0.0)).then_some(metrics)
    })
    .await;
    assert_eq!(
        sample(&metrics, "payment_link_outbox_backlog", ""),
        Some(0.0),
        "{metrics}"
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_reports_an_open_provider_circuit() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&provider)
        .await;
    let env = TestEnv::with(
        &provider.uri(),
        &[
            ("BREAKER__MIN_CALLS", "3"),
            ("BREAKER__PROBE_INTERVAL_MS", "60000"),
        ],
    )
    .await;
    let worker = env.start_worker().await;
    let base = format!("http://{}", worker.http_addr().unwrap());
    env.send("down-1", &command_body("1.00", 1)).await;
    let body = eventually("readiness to report the open circuit", WAIT, || async {
        let (status, body) = get(format!("{base}/readyz")).await;
        (status == 503).then_some(body)
    })
    .await;
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], false);
    assert!(
        ready["provider"].as_str().unwrap().contains("circuit open"),
        "{body}"
    );
    assert_eq!(ready["broker"], "ok");
    assert_eq!(get(format!("{base}/healthz")).await.0, 200, "still alive");
    // The figure the circuit alert reads says the same, beside the calls it is read against.
    let (_, metrics) = get(format!("{base}/metrics")).await;
    let provider = "payment_provider_id=\"7\"";
    assert_eq!(
        sample(&metrics, "payment_link_provider_circuit_open", provider),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "payment_link_provider_calls_total", provider) >= Some(3.0),
        "{metrics}"
    );
}

/// The figures the alerts read (deploy/observability/rules.yml) follow what the store holds: the
/// oldest unsent event, a replay run that stopped moving, replay runs that failed lately, and the
/// last retention sweep.
#[tokio::test(flavor = "multi_thread")]
async fn the_figures_the_alerts_read_follow_the_store() {
    use diesel_async::RunQueryDsl;
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 1, "2.00", 1).await;
    let env = TestEnv::with(
        &provider.uri(),
        &[
            ("TELEMETRY__LEVELS_INTERVAL_MS", "100"),
            ("RETENTION__SWEEP_INTERVAL_MS", "300"),
        ],
    )
    .await;
    let started = chrono::Utc::now().timestamp();
    let worker = env.start_worker().await;
    let base = format!("http://{}", worker.http_addr().unwrap());
    let figure = |name: &'static str| {
        let base = base.clone();
        async move {
            let (_, metrics) = get(format!("{base}/metrics")).await;
            sample(&metrics, name, "").unwrap_or_else(|| panic!("{name} missing: {metrics}"))
        }
    };
    // A replica that has not swept yet counts from its start.
    let first_sweep = figure("payment_link_retention_last_sweep_seconds").await;
    assert!(first_sweep >= started as f64, "{first_sweep} < {started}");
    assert_eq!(
        figure("payment_link_outbox_oldest_unsent_age_milliseconds").await,
        0.0
    );
    assert_eq!(
        figure("payment_link_replay_running_idle_milliseconds").await,
        0.0
    );
    assert_eq!(figure("payment_link_replay_runs_failed_recent").await, 0.0);

    // A run marked running that has not moved for 20 minutes; runs that failed 10 minutes and 2
    // hours ago; one that ended well.
    let mut conn = env.pool.get().await.unwrap();
    diesel::sql_query(
        "INSERT INTO replay_runs (requested_by, dry_run, state, updated_at, finished_at) VALUES \
         ('t', false, 'running', now() - interval '20 minutes', NULL), \
         ('t', false, 'failed', now() - interval '10 minutes', now() - interval '10 minutes'), \
         ('t', false, 'failed', now() - interval '2 hours', now() - interval '2 hours'), \
         ('t', false, 'done', now(), now())",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    drop(conn);
    // No queue is bound to the event exchange: the event waits in the outbox.
    env.send("alert-figures", &command_body("2.00", 1)).await;

    eventually(
        "the stalled run and the failed one to show",
        WAIT,
        || async {
            let idle = figure("payment_link_replay_running_idle_milliseconds").await;
            let failed = figure("payment_link_replay_runs_failed_recent").await;
            (idle >= 1_200_000.0 && failed == 1.0).then_some(())
        },
    )
    .await;
    eventually("the unsent event to age", WAIT, || async {
        (figure("payment_link_outbox_oldest_unsent_age_milliseconds").await >= 1000.0).then_some(())
    })
    .await;
    eventually("a sweep to be recorded", WAIT, || async {
        (figure("payment_link_retention_last_sweep_seconds").await > first_sweep).then_some(())
    })
    .await;

    // Once a queue is bound the relay sends the event, and the figure goes back to 0.
    let _events = env.capture_events().await;
    eventually("the outbox to be empty again", WAIT, || async {
        (figure("payment_link_outbox_oldest_unsent_age_milliseconds").await == 0.0).then_some(())
    })
    .await;
    worker.stop().await.unwrap();
}
