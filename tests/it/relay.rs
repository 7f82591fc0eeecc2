//! Guarantee: nothing is published without its record and nothing recorded stays unpublished:
//! an event the broker returned as unroutable stays in the outbox, and the relay publishes it
//! once a queue is bound.

use crate::helpers::*;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test(flavor = "multi_thread")]
async fn an_event_refused_at_first_is_published_by_the_relay() {
    let provider = MockServer::start().await;
    let answer = provider_answer(11, "9.99", 40);
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201).set_body_raw(answer.clone(), "application/json"))
        .mount(&provider)
        .await;
    let env = TestEnv::new(&provider.uri()).await;
    let _worker = env.start_worker().await;
    // No queue is bound to the event exchange yet: the broker returns the event.
    env.send("cmd-relay", &command_body("9.99", 40)).await;

    let row = eventually("the unroutable publish to be recorded", WAIT, || async {
        env.outbox("cmd-relay")
            .await
            .into_iter()
            .find(|r| r.publish_attempts >= 1)
    })
    .await;
    assert!(row.sent_at.is_none());
    assert!(
        row.last_error.as_deref().unwrap().contains("unroutable"),
        "{:?}",
        row.last_error
    );
    eventually(
        "the command to be acked although its event is not out yet",
        WAIT,
        || async { (env.queue_depth(&env.command_queue()).await == 0).then_some(()) },
    )
    .await;

    let events = env.capture_events().await;
    let event = env.next_message(&events, WAIT).await;
    assert_eq!(event.body, answer.as_bytes());
    eventually("the outbox row to be marked sent", WAIT, || async {
        env.outbox("cmd-relay").await[0].sent_at.map(|_| ())
    })
    .await;
    assert_eq!(provider.received_requests().await.unwrap().len(), 1);
}
