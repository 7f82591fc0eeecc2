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
    let kept = env
        .recorded_event("cmd-dup")
        .await
        .expect("the event is kept");
    assert_eq!(
        kept.message_id(),
        second.message_id(),
        "published from the record"
    );
    assert!(
        env.outbox("cmd-dup").await.is_empty(),
        "both publishes were confirmed: nothing left for the relay"
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

#[tokio::test(flavor = "multi_thread")]
async fn a_link_recorded_by_a_worker_that_died_before_publishing_is_published_on_redelivery() {
    use payment_link_worker::broker::messages::{self, EventTarget};
    use payment_link_worker::command::Envelope;
    use payment_link_worker::store::claims::{self, Claim, ClaimWriter};
    use payment_link_worker::store::outcomes::{
        KeptEvent, Outcome, OutcomeRequest, OutcomeWriter, Success,
    };

    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&provider)
        .await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let body = command_body("12.34", 31);
    let answer = provider_answer(31, "12.34", 31);

    // What a worker does before it dies between the commit and the broker's confirm: it claims
    // the command and records the link with its event, and never publishes or acks.
    let envelope = Envelope::parse(&command_properties("cmd-crashed"), body.as_bytes(), 65_536)
        .expect("valid command");
    let dead = "plw-died-before-publishing".to_owned();
    let claims = ClaimWriter::start(env.pool.clone(), dead.clone(), env.settings.lease());
    let claim = claims::claim(&env.pool, &claims, &envelope)
        .await
        .expect("claim");
    let Claim::Acquired { attempts: 0, token } = claim else {
        panic!("the first claim acquires the command: {claim:?}")
    };
    let target = EventTarget::new(&env.settings);
    let event = messages::created_event(&target, &envelope, &answer, chrono::Utc::now(), &[]);
    let success = Success {
        attempts: 1,
        link_id: Some(31),
        payment_link: "https://instantpaymentlink/ref-31".into(),
        response_body: answer.clone(),
        event: KeptEvent::new(&event),
    };
    let recorded = OutcomeWriter::start(env.pool.clone(), dead)
        .submit(OutcomeRequest {
            command_id: "cmd-crashed".into(),
            lease_token: token,
            outcome: Outcome::Succeeded(success),
            messages: Vec::new(),
        })
        .await
        .expect("recorded");
    assert!(recorded.is_some(), "the dead worker held the command");

    // The broker redelivers the unacked command (here: it arrives again) to a live worker.
    let _worker = env.start_worker().await;
    env.send("cmd-crashed", &body).await;
    let published = env.next_message(&events, WAIT).await;
    assert_eq!(published.message_id(), event.message_id());
    assert_eq!(published.body, answer.as_bytes());
    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        0,
        "the recorded link is not asked for again"
    );
    eventually("the command to be acked", WAIT, || async {
        (env.queue_depth(&env.command_queue()).await == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_waiting_past_its_lease_keeps_the_command_and_the_provider_is_asked_once() {
    use payment_link_worker::broker::messages::{CREATED, event_id};
    use wiremock::matchers::body_string_contains;
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("\"invoiceId\":900,"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&provider)
        .await;
    answer_with_link(&provider, 201, 42, "42.00", 42).await;
    // Lease 0.3 + 0.1 + 2 × 1 + 1 = 3.4 s; the open circuit makes the call wait up to 6 s for its
    // probe, well past the lease.
    let env = TestEnv::with(
        &provider.uri(),
        &[
            ("RETRY__MAX_ELAPSED_MS", "300"),
            ("PROVIDER__TIMEOUT_MS", "1000"),
            ("BREAKER__MIN_CALLS", "2"),
            ("BREAKER__PROBE_INTERVAL_MS", "6000"),
        ],
    )
    .await;
    let events = env.capture_events().await;
    // Replica A takes one command at a time, so the second copy below goes to replica B.
    let mut one_at_a_time = env.settings.clone();
    one_at_a_time.broker.prefetch = 1;
    let a = env.start_worker_with(one_at_a_time).await;
    env.send("blocker", &command_body("9.00", 900)).await;
    env.next_message(&env.dead_letter_queue(), WAIT).await;

    // A's circuit is open: A claims the command and waits for its probe, past the lease.
    let body = command_body("42.00", 42);
    env.send("slow-call", &body).await;
    eventually("A to claim the command", WAIT, || async {
        env.record("slow-call")
            .await
            .filter(|r| r.status == "processing")
    })
    .await;
    let b = env.start_worker().await;
    env.send("slow-call", &body).await;

    // (The blocker's failed event comes first; it is passed over.)
    let created = event_id(CREATED, "slow-call");
    eventually("the command's created event", WAIT, || async {
        env.try_get(&events)
            .await
            .filter(|event| event.message_id() == created)
    })
    .await;
    // Both replicas finish what they hold (A's probe comes within the grace period) and stop.
    a.stop().await.expect("A stops cleanly");
    b.stop().await.expect("B stops cleanly");
    assert_eq!(env.queue_depth(&env.command_queue()).await, 0);
    let calls = provider
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| {
            r.headers
                .get("idempotency-key")
                .is_some_and(|v| v == "slow-call")
        })
        .count();
    assert_eq!(
        calls, 1,
        "one request for the command: the waiting claim kept its lease, so B never took it over"
    );
}
