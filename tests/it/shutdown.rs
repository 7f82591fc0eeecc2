//! Guarantee: shutdown loses nothing. Commands in flight finish within the grace period (or go
//! back to the queue when it ends); commands not yet started stay in the queue for the next
//! worker; every command ends with exactly one link.

use crate::helpers::*;
use std::time::Duration;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

async fn slow_provider(delay: Duration) -> MockServer {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_raw(provider_answer(1, "1.00", 1), "application/json")
                .set_delay(delay),
        )
        .mount(&provider)
        .await;
    provider
}

#[tokio::test(flavor = "multi_thread")]
async fn in_flight_commands_finish_and_the_rest_wait_in_the_queue() {
    let provider = slow_provider(Duration::from_millis(800)).await;
    let env = TestEnv::with(&provider.uri(), &[("BROKER__PREFETCH", "2")]).await;
    let events = env.capture_events().await;
    for i in 0..6 {
        env.send(&format!("cmd-{i}"), &command_body("1.00", 1))
            .await;
    }
    let worker = env.start_worker().await;
    eventually("two commands in flight", WAIT, || async {
        (provider.received_requests().await.unwrap().len() >= 2).then_some(())
    })
    .await;
    worker.stop().await.expect("clean stop");

    let finished = env.messages(&events, 2, WAIT).await.len();
    assert_eq!(
        finished, 2,
        "in-flight commands finished before the worker stopped"
    );
    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        2,
        "nothing new was taken after the stop"
    );
    eventually("the rest to be back in the queue", WAIT, || async {
        (env.queue_depth(&env.command_queue()).await == 4).then_some(())
    })
    .await;

    let _next = env.start_worker().await;
    env.messages(&events, 4, WAIT).await;
    for i in 0..6 {
        let record = env.record(&format!("cmd-{i}")).await.unwrap();
        assert_eq!(
            (record.status.as_str(), record.attempts),
            ("succeeded", 1),
            "cmd-{i}"
        );
    }
    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        6,
        "exactly one call per command"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_still_running_after_the_grace_period_go_back_to_the_queue() {
    let provider = slow_provider(Duration::from_secs(4)).await;
    let env = TestEnv::with(
        &provider.uri(),
        &[
            ("BROKER__PREFETCH", "1"),
            ("WORKER__SHUTDOWN_GRACE_MS", "200"),
            ("PROVIDER__TIMEOUT_MS", "10000"),
        ],
    )
    .await;
    let events = env.capture_events().await;
    env.send("cmd-slow", &command_body("1.00", 1)).await;
    let worker = env.start_worker().await;
    eventually("the command in flight", WAIT, || async {
        (!provider.received_requests().await.unwrap().is_empty()).then_some(())
    })
    .await;
    worker.stop().await.expect("clean stop");

    let record = env.record("cmd-slow").await.unwrap();
    assert_eq!(record.status, "processing");
    assert!(
        record.lease_owner.is_none(),
        "the lease is released for the next worker"
    );
    eventually("the command back in the queue", WAIT, || async {
        (env.queue_depth(&env.command_queue()).await == 1).then_some(())
    })
    .await;
    assert!(env.try_get(&events).await.is_none());

    let _next = env.start_worker().await;
    let event = env.next_message(&events, Duration::from_secs(20)).await;
    assert_eq!(event.routing_key, "payment-link.created");
    assert_eq!(env.record("cmd-slow").await.unwrap().status, "succeeded");
}
