//! Guarantee: one command id, one provider call, however often the command is delivered and
//! however many workers see it at once; every delivery gets the same event (same event id).

use crate::helpers::*;
use std::time::Duration;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test(flavor = "multi_thread")]
async fn redelivered_command_publishes_the_same_event_without_a_second_call() {
    let provider = MockServer::start().await;
    let answer = provider_answer(8, "10.00", 21);
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201).set_body_raw(answer.clone(), "application/json"))
        .mount(&provider)
        .await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;

    env.send("cmd-dup", &command_body("10.00", 21)).await;
    let first = env.next_message(&events, WAIT).await;
    env.send("cmd-dup", &command_body("10.00", 21)).await;
    let second = env.next_message(&events, WAIT).await;

    assert_eq!(first.message_id(), second.message_id(), "same event id");
    assert_eq!(first.body, second.body);
    assert_eq!(second.body, answer.as_bytes());
    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        1,
        "one provider call"
    );
    assert_eq!(env.record("cmd-dup").await.unwrap().attempts, 1);
    assert_eq!(
        env.outbox("cmd-dup").await.len(),
        1,
        "the outcome is recorded once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_never_process_one_command_at_the_same_time() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_raw(provider_answer(9, "3.00", 4), "application/json")
                .set_delay(Duration::from_millis(700)),
        )
        .mount(&provider)
        .await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let a = env.start_worker().await;
    let b = env.start_worker().await;

    // Both copies are in the queue before either worker can finish the first.
    env.send("cmd-race", &command_body("3.00", 4)).await;
    env.send("cmd-race", &command_body("3.00", 4)).await;

    let got = env.messages(&events, 2, WAIT).await;
    assert_eq!(got[0].message_id(), got[1].message_id());
    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        1,
        "one provider call"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
