//! Guarantees: an operator can see every dead letter and why without disturbing the queue, and
//! replay exactly the ones selected: each succeeds once, the rest stay, a replay that fails again
//! comes back with its replay count, and every run is on record.

use crate::helpers::*;
use payment_link_worker::ops::dead_letters::{self, ReplayRequest, Selection};
use payment_link_worker::store::replay_runs;
use wiremock::matchers::{header, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn select(kind: Option<&str>, command_id: Option<&str>, limit: Option<usize>) -> Selection {
    Selection {
        kind: kind.map(str::to_owned),
        command_id: command_id.map(str::to_owned),
        limit,
    }
}

fn request(selection: Selection, dry_run: bool) -> ReplayRequest {
    ReplayRequest {
        selection,
        dry_run,
        rate: Some(50.0),
        requested_by: "ops-test".into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn list_then_replay_a_selection_after_the_provider_is_fixed() {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_string("rejected"))
        .mount(&provider)
        .await;
    let env = TestEnv::new(&provider.uri()).await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    for i in 0..6 {
        env.send(&format!("cmd-{i}"), &command_body("1.00", 100 + i))
            .await;
    }
    env.messages(&events, 6, WAIT).await; // six failed events
    eventually("six dead letters", WAIT, || async {
        (env.queue_depth(&env.dead_letter_queue()).await == 6).then_some(())
    })
    .await;

    // Listing shows every one, with its reason and ids, and removes nothing.
    let listing = dead_letters::list(&env.settings, &Selection::default())
        .await
        .unwrap();
    assert_eq!(listing.letters.len(), 6);
    assert_eq!(listing.by_kind.get("provider-rejected"), Some(&6));
    let first = listing
        .letters
        .iter()
        .find(|l| l.command_id == "cmd-0")
        .unwrap();
    assert_eq!(
        (
            first.http_status,
            first.attempts,
            first.invoice_id,
            first.replay_count
        ),
        (Some(400), Some(1), Some(100), 0)
    );
    assert!(first.failed_at.is_some());
    let only = dead_letters::list(&env.settings, &select(None, Some("cmd-3"), None))
        .await
        .unwrap();
    assert_eq!(only.letters.len(), 1);
    eventually("listed messages back in the queue", WAIT, || async {
        (env.queue_depth(&env.dead_letter_queue()).await == 6).then_some(())
    })
    .await;

    // A dry run selects and changes nothing.
    let dry = dead_letters::replay(
        &env.settings,
        &request(select(Some("provider-rejected"), None, Some(2)), true),
    )
    .await
    .unwrap();
    assert_eq!((dry.replayed.len(), dry.left), (2, 6));

    assert_eq!(provider.received_requests().await.unwrap().len(), 6);
    // Fix the provider, except for cmd-5, which still fails (a reset also clears the call log).
    provider.reset().await;
    Mock::given(method("POST"))
        .and(header("idempotency-key", "cmd-5"))
        .respond_with(ResponseTemplate::new(400).set_body_string("still rejected"))
        .mount(&provider)
        .await;
    answer_with_link(&provider, 201, 1, "1.00", 1).await;

    let by_id = dead_letters::replay(
        &env.settings,
        &request(select(None, Some("cmd-2"), None), false),
    )
    .await
    .unwrap();
    assert_eq!(by_id.replayed, ["cmd-2"]);
    assert_eq!((by_id.skipped, by_id.failed, by_id.left), (5, 0, 5));
    let created = env.next_message(&events, WAIT).await;
    assert_eq!(
        (
            created.routing_key.as_str(),
            created.json()["paymentLink"].as_str()
        ),
        (
            "payment-link.created",
            Some("https://instantpaymentlink/ref-1")
        )
    );

    let flapping = dead_letters::replay(
        &env.settings,
        &request(select(None, Some("cmd-5"), None), false),
    )
    .await
    .unwrap();
    assert_eq!(flapping.replayed, ["cmd-5"]);
    let again = eventually("cmd-5 dead-lettered again", WAIT, || async {
        let listing = dead_letters::list(&env.settings, &select(None, Some("cmd-5"), None))
            .await
            .unwrap();
        listing.letters.into_iter().next()
    })
    .await;
    assert_eq!(
        (again.kind.as_str(), again.replay_count),
        ("provider-rejected", 1),
        "a flapping command shows its replays"
    );
    env.next_message(&events, WAIT).await; // its failed event

    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        2,
        "cmd-2 and cmd-5, once each"
    );
    // Now the provider accepts everything.
    provider.reset().await;
    answer_with_link(&provider, 201, 1, "1.00", 1).await;
    let limited = dead_letters::replay(
        &env.settings,
        &request(select(Some("provider-rejected"), None, Some(2)), false),
    )
    .await
    .unwrap();
    assert_eq!(limited.replayed.len(), 2);
    assert!(!limited.replayed.contains(&"cmd-2".to_string()));
    let created = env.messages(&events, 2, WAIT).await;
    assert!(
        created
            .iter()
            .all(|e| e.routing_key == "payment-link.created"),
        "the limited selection succeeded"
    );

    // Exactly the selected ones succeeded, once each; the rest are still dead-lettered.
    let mut succeeded = Vec::new();
    for i in 0..6 {
        let record = env.record(&format!("cmd-{i}")).await.unwrap();
        if record.status == "succeeded" {
            assert!(record.replay_count >= 1);
            succeeded.push(format!("cmd-{i}"));
        }
    }
    let mut expected: Vec<String> = limited.replayed.clone();
    expected.push("cmd-2".into());
    expected.sort();
    assert_eq!(succeeded, expected);
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 3);
    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        2,
        "one call per selected command"
    );

    // Replaying a command that already succeeded publishes its event again, without a call.
    env.publish_raw(
        with_int_header(command_properties("cmd-2"), "x-replay-count", 7),
        command_body("1.00", 102).as_bytes(),
    )
    .await;
    let repeat = env.next_message(&events, WAIT).await;
    assert_eq!(
        repeat.header("cloudEvents:subject").as_deref(),
        Some("cmd-2")
    );
    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        2,
        "no new call"
    );

    // Every run is on record: who, what, with which filter.
    let mut conn = env.pool.get().await.unwrap();
    let runs = replay_runs::all(&mut conn).await.unwrap();
    assert_eq!(runs.len(), 4);
    let by_id_run = runs.iter().find(|r| r.id == by_id.run_id).unwrap();
    assert_eq!(by_id_run.command_ids, ["cmd-2"]);
    assert_eq!(by_id_run.requested_by, "ops-test");
    assert_eq!(by_id_run.filter_command_id.as_deref(), Some("cmd-2"));
    assert!(by_id_run.finished_at.is_some() && !by_id_run.dry_run);
    assert!(
        runs.iter()
            .any(|r| r.dry_run && r.selected == 2 && r.replayed == 0 && r.command_ids.len() == 2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_keeps_failing_is_dead_lettered_by_the_broker_and_listed() {
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    let provider = MockServer::start().await;
    let env = TestEnv::with(&provider.uri(), &[("BROKER__DELIVERY_LIMIT", "2")]).await;
    env.send("poison", &command_body("1.00", 1)).await;
    // A consumer that crashes on it: every delivery comes back (nack with requeue).
    eventually(
        "the broker to dead-letter the message after its delivery limit",
        WAIT,
        || async {
            if let Some(message) = env
                .channel
                .basic_get(
                    env.command_queue().as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .unwrap()
            {
                message
                    .delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
            (env.queue_depth(&env.dead_letter_queue()).await == 1).then_some(())
        },
    )
    .await;
    let listing = dead_letters::list(&env.settings, &Selection::default())
        .await
        .unwrap();
    assert_eq!(listing.letters.len(), 1);
    assert_eq!(listing.letters[0].command_id, "poison");
    assert_eq!(listing.letters[0].kind, "delivery-limit");
    assert_eq!(env.queue_depth(&env.command_queue()).await, 0);
}

/// The arguments RabbitMQ reports for a queue (`rabbitmqctl list_queues name arguments`).
fn queue_arguments(queue: &str) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "name",
            "arguments",
            "-q",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|line| line.starts_with(&format!("{queue}\t")))
        .unwrap_or_else(|| panic!("{queue} is listed"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_command_queue_dead_letters_at_least_once_and_an_older_queue_still_works() {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 3, "3.00", 3).await;
    let env = TestEnv::new(&provider.uri()).await;
    let queue = env.command_queue();
    let arguments = queue_arguments(&queue);
    assert!(arguments.contains("at-least-once"), "{arguments}");
    assert!(arguments.contains("reject-publish"), "{arguments}");

    // The queue as an older version declared it: no dead-letter strategy, no overflow.
    env.channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let text = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
    let mut older = FieldTable::default();
    older.insert("x-queue-type".into(), text("quorum"));
    older.insert(
        "x-dead-letter-exchange".into(),
        text(&env.settings.broker.dead_letter_exchange),
    );
    older.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(10));
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    env.channel
        .queue_declare(queue.as_str().into(), durable, older)
        .await
        .unwrap();
    env.channel
        .queue_bind(
            queue.as_str().into(),
            env.settings.broker.command_exchange.as_str().into(),
            env.settings.broker.command_routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    env.send("older-queue", &command_body("3.00", 3)).await;
    let event = env.next_message(&events, WAIT).await;
    assert_eq!(
        event.message_id(),
        payment_link_worker::broker::messages::event_id(
            payment_link_worker::broker::messages::CREATED,
            "older-queue"
        )
    );
    assert!(
        !queue_arguments(&queue).contains("at-least-once"),
        "used as it was"
    );
}
