//! Guarantees: every dead letter reaches the dead-letter store with its reason and its original
//! message; an operator can find it with server-side filters and replay exactly the ones
//! selected: each succeeds once, the rest stay, a replay that fails again comes back as a new dead
//! letter linked to the earlier one, a replay that may create a second link needs an explicit
//! confirmation, and every action is on record.

use crate::helpers::*;
use payment_link_worker::dead_letters::store::{self as store, Filter};
use payment_link_worker::dead_letters::targets::ReplayTargets;
use payment_link_worker::dead_letters::{self, ReplayError, ReplayRequest};
use payment_link_worker::dead_letters::{Kind, State};
use payment_link_worker::store::{audit, replay_runs};
use wiremock::matchers::{header, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Ingestion on: the shipped default, which `TestEnv` turns off for the tests that read the queue.
pub const INGEST: (&str, &str) = ("DEAD_LETTERS__INGEST", "true");

fn by_command(command_id: &str) -> Filter {
    Filter {
        command_id: Some(command_id.into()),
        ..Filter::default()
    }
}

pub fn request(filter: Filter, limit: Option<usize>, dry_run: bool) -> ReplayRequest {
    ReplayRequest {
        include_failing: true,
        ask_if_failing: false,
        filter,
        limit,
        dry_run,
        rate: Some(50.0),
        accept_duplicate_risk: false,
        requested_by: "ops-test".into(),
        source: "cli".into(),
        client_address: None,
        guard: payment_link_worker::dead_letters::guard::GuardRequest::off(),
    }
}

/// Starts and works a replay run to its end; returns the run id and the ids replayed.
pub async fn replay(env: &TestEnv, request: &ReplayRequest) -> (i64, Vec<i64>) {
    let (started, worked) = start_and_work(env, request).await;
    assert!(worked.failed.is_empty(), "{worked:?}");
    assert_eq!(worked.replayed, started.ids);
    (started.run_id, worked.replayed)
}

/// Starts a replay run and works it to its end or its stop, as `dead-letters replay` does.
pub async fn start_and_work(
    env: &TestEnv,
    request: &ReplayRequest,
) -> (dead_letters::Started, dead_letters::Worked) {
    let mut conn = env.pool.get().await.unwrap();
    let started = dead_letters::start(&env.settings, &mut conn, request)
        .await
        .unwrap();
    let worked = dead_letters::work(&env.settings, &mut conn, started.run_id, request.rate)
        .await
        .unwrap();
    (started, worked)
}

/// Waits until the store holds `n` dead letters matching `filter`.
pub async fn stored(env: &TestEnv, filter: &Filter, n: i64) {
    eventually(
        &format!("{n} dead letters stored for {filter:?}"),
        WAIT,
        || async {
            let mut conn = env.pool.get().await.ok()?;
            (store::count(&mut conn, filter).await.ok()? == n).then_some(())
        },
    )
    .await;
}

async fn state_of(env: &TestEnv, id: i64) -> String {
    let mut conn = env.pool.get().await.unwrap();
    store::get(&mut conn, id)
        .await
        .unwrap()
        .unwrap()
        .0
        .state
        .to_string()
}

/// A provider that rejects every command (400), and a test environment with ingestion on.
async fn rejecting_provider() -> (MockServer, TestEnv) {
    let provider = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_string("rejected"))
        .mount(&provider)
        .await;
    let env = TestEnv::with(&provider.uri(), &[INGEST]).await;
    (provider, env)
}

#[tokio::test(flavor = "multi_thread")]
async fn list_then_replay_a_selection_after_the_provider_is_fixed() {
    let (provider, env) = rejecting_provider().await;
    let events = env.capture_events().await;
    let _worker = env.start_worker().await;
    for i in 0..6 {
        env.send(&format!("cmd-{i}"), &command_body("1.00", 100 + i))
            .await;
    }
    env.messages(&events, 6, WAIT).await; // six failed events
    stored(&env, &Filter::default(), 6).await;
    eventually("the dead-letter queue emptied", WAIT, || async {
        (env.queue_depth(&env.dead_letter_queue()).await == 0).then_some(())
    })
    .await;
    let mut conn = env.pool.get().await.unwrap();

    // Listing shows every one, with its reason, its ids and its original message.
    let listing = dead_letters::list(
        &mut conn,
        &Filter::default(),
        100,
        &ReplayTargets::new(&env.settings),
    )
    .await
    .unwrap();
    assert_eq!((listing.letters.len(), listing.matching), (6, 6));
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
            first.replay_count,
            first.state.as_str()
        ),
        (Some(400), Some(1), Some(100), 0, "open")
    );
    let (full, history) = store::get(&mut conn, first.id).await.unwrap().unwrap();
    assert_eq!(full.body, command_body("1.00", 100).into_bytes());
    assert_eq!(full.original_exchange, env.settings.broker.command_exchange);
    assert_eq!(
        full.original_routing_key,
        env.settings.broker.command_routing_key
    );
    assert_eq!(full.error_body.as_deref(), Some("rejected"));
    assert!(history.is_empty());
    // Server-side filters: by command id, by text, by invoice, by state.
    for (filter, n) in [
        (by_command("cmd-3"), 1),
        (
            Filter {
                search: Some("CMD-4".into()),
                ..Filter::default()
            },
            1,
        ),
        (
            Filter {
                invoice_id: Some(105),
                ..Filter::default()
            },
            1,
        ),
        (
            Filter {
                state: Some(State::Archived),
                ..Filter::default()
            },
            0,
        ),
    ] {
        assert_eq!(
            store::count(&mut conn, &filter).await.unwrap(),
            n,
            "{filter:?}"
        );
    }

    // A dry run selects and changes nothing.
    let kind = Filter {
        kind: Some(Kind::Worker(
            payment_link_worker::errors::ErrorKind::ProviderRejected,
        )),
        ..Filter::default()
    };
    let dry = dead_letters::start(
        &env.settings,
        &mut conn,
        &request(kind.clone(), Some(2), true),
    )
    .await
    .unwrap();
    assert_eq!(dry.ids.len(), 2);
    assert_eq!(
        store::count(
            &mut conn,
            &Filter {
                state: Some(State::Open),
                ..Filter::default()
            }
        )
        .await
        .unwrap(),
        6
    );

    assert_eq!(provider.received_requests().await.unwrap().len(), 6);
    // Fix the provider, except for cmd-5, which still fails (a reset also clears the call log).
    provider.reset().await;
    Mock::given(method("POST"))
        .and(header("idempotency-key", "cmd-5"))
        .respond_with(ResponseTemplate::new(400).set_body_string("still rejected"))
        .mount(&provider)
        .await;
    answer_with_link(&provider, 201, 1, "1.00", 1).await;

    let (by_id_run, replayed) = replay(&env, &request(by_command("cmd-2"), None, false)).await;
    assert_eq!(replayed.len(), 1);
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
    assert_eq!(state_of(&env, replayed[0]).await, "replayed");
    // The list counts the letter's own replays (what `REPLAYS` shows), beside the replays its
    // command had before it failed.
    let listed = dead_letters::list(
        &mut conn,
        &by_command("cmd-2"),
        10,
        &ReplayTargets::new(&env.settings),
    )
    .await
    .unwrap();
    assert_eq!(
        (
            listed.letters[0].times_replayed,
            listed.letters[0].replay_count
        ),
        (1, 0)
    );
    let (_, history) = store::get(&mut conn, replayed[0]).await.unwrap().unwrap();
    assert_eq!(
        (
            history.len(),
            history[0].run_id,
            history[0].outcome.as_str()
        ),
        (1, by_id_run, "replayed")
    );

    // A replay that fails again comes back as a new dead letter, linked to the earlier one.
    let (_, flapping) = replay(&env, &request(by_command("cmd-5"), None, false)).await;
    stored(&env, &by_command("cmd-5"), 2).await;
    let (again, _) = dead_letters::list(
        &mut conn,
        &by_command("cmd-5"),
        1,
        &ReplayTargets::new(&env.settings),
    )
    .await
    .map(|l| (l.letters[0].clone(), ()))
    .unwrap();
    let (again_full, _) = store::get(&mut conn, again.id).await.unwrap().unwrap();
    assert_eq!(
        (
            again.kind.as_str(),
            again.replay_count,
            again.state.as_str(),
            again_full.previous_id
        ),
        ("provider-rejected", 1, "open", Some(flapping[0])),
        "a flapping command shows its replays"
    );
    env.next_message(&events, WAIT).await; // its failed event
    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        2,
        "cmd-2 and cmd-5, once each"
    );

    // Archiving puts one aside; a replay no longer takes it.
    let archived = dead_letters::archive(
        &mut conn,
        &by_command("cmd-4"),
        None,
        "ops-test",
        "cli",
        None,
    )
    .await
    .unwrap();
    assert_eq!(archived.len(), 1);
    assert_eq!(state_of(&env, archived[0]).await, "archived");

    // cmd-0's first provider call is older than the provider's idempotency window: replaying it
    // needs the operator's explicit word.
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query(
            "UPDATE payment_link_commands SET created_at = now() - interval '2 days' \
             WHERE command_id = 'cmd-0'",
        ),
        &mut conn,
    )
    .await
    .unwrap();
    let mut ids = Vec::new();
    for command in ["cmd-0", "cmd-1"] {
        ids.push(
            dead_letters::list(
                &mut conn,
                &by_command(command),
                1,
                &ReplayTargets::new(&env.settings),
            )
            .await
            .unwrap()
            .letters[0]
                .id,
        );
    }
    let pair = Filter {
        ids: Some(ids),
        ..kind
    };
    let refused = dead_letters::start(
        &env.settings,
        &mut conn,
        &request(pair.clone(), None, false),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            refused,
            ReplayError::DuplicateRisk {
                count: 1,
                window_hours: 24,
                ..
            }
        ),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("--accept-duplicate-risk"),
        "{refused}"
    );

    // Now the provider accepts everything; both go (cmd-0 at the operator's risk).
    provider.reset().await;
    answer_with_link(&provider, 201, 1, "1.00", 1).await;
    let mut accepted = request(pair, None, false);
    accepted.accept_duplicate_risk = true;
    let (_, limited) = replay(&env, &accepted).await;
    assert_eq!(limited.len(), 2);
    let created = env.messages(&events, 2, WAIT).await;
    assert!(
        created
            .iter()
            .all(|e| e.routing_key == "payment-link.created"),
        "the limited selection succeeded"
    );

    // Exactly the selected ones succeeded, once each; the rest are still in the store, open.
    let mut succeeded = Vec::new();
    for i in 0..6 {
        let record = env.record(&format!("cmd-{i}")).await.unwrap();
        if record.status == "succeeded" {
            assert!(record.replay_count >= 1);
            succeeded.push(format!("cmd-{i}"));
        }
    }
    assert_eq!(succeeded, ["cmd-0", "cmd-1", "cmd-2"]);
    assert_eq!(
        provider.received_requests().await.unwrap().len(),
        2,
        "one call per selected command"
    );
    assert_eq!(env.queue_depth(&env.dead_letter_queue()).await, 0);

    // Every run and action is on record: who, what, with which filter.
    let runs = replay_runs::all(&mut conn).await.unwrap();
    assert_eq!(
        runs.len(),
        4,
        "a dry run and three replays; the refused one never started"
    );
    let by_id = runs.iter().find(|r| r.id == by_id_run).unwrap();
    assert_eq!(by_id.command_ids, ["cmd-2"]);
    assert_eq!(by_id.requested_by, "ops-test");
    assert_eq!(by_id.filter_command_id.as_deref(), Some("cmd-2"));
    assert_eq!(
        (by_id.state.as_str(), by_id.total, by_id.replayed),
        ("done", 1, 1)
    );
    assert!(by_id.finished_at.is_some() && !by_id.dry_run);
    assert!(
        runs.iter()
            .any(|r| r.dry_run && r.selected == 2 && r.replayed == 0 && r.command_ids.len() == 2)
    );
    let log = audit::page(&mut conn, 100, None).await.unwrap();
    let actions: Vec<&str> = log.iter().rev().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["dry-run", "replay", "replay", "archive", "replay"]
    );
    assert!(
        log.iter()
            .all(|e| e.actor == "ops-test" && e.source == "cli")
    );
    assert_eq!(log[1].ids, archived);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_letters_the_broker_refuses_ends_failed_and_leaves_them_open() {
    let (_provider, env) = rejecting_provider().await;
    let worker = env.start_worker().await;
    for i in 0..2 {
        env.send(&format!("refused-{i}"), &command_body("1.00", 300 + i))
            .await;
    }
    stored(&env, &Filter::default(), 2).await;
    worker.stop().await.unwrap();
    // Nothing is bound to the command exchange any more: the broker returns every copy.
    let broker = &env.settings.broker;
    env.channel
        .queue_unbind(
            broker.command_queue.as_str().into(),
            broker.command_exchange.as_str().into(),
            broker.command_routing_key.as_str().into(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();

    let mut conn = env.pool.get().await.unwrap();
    let asked = request(Filter::default(), None, false);
    let started = dead_letters::start(&env.settings, &mut conn, &asked)
        .await
        .unwrap();
    let worked = dead_letters::work(&env.settings, &mut conn, started.run_id, asked.rate)
        .await
        .unwrap();
    assert_eq!(worked.failed.len(), 2, "{worked:?}");
    let run = replay_runs::find(&mut conn, started.run_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((run.state.as_str(), run.failed), ("failed", 2), "{run:?}");
    for id in &worked.failed {
        assert_eq!(state_of(&env, *id).await, "open");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_keeps_failing_is_dead_lettered_by_the_broker_and_stored() {
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    let provider = MockServer::start().await;
    let env = TestEnv::with(&provider.uri(), &[("BROKER__DELIVERY_LIMIT", "2"), INGEST]).await;
    env.send("poison", &command_body("1.00", 1)).await;
    let _worker_ingesting_only = {
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
        env.start_worker().await
    };
    stored(&env, &Filter::default(), 1).await;
    let mut conn = env.pool.get().await.unwrap();
    let listing = dead_letters::list(
        &mut conn,
        &Filter::default(),
        10,
        &ReplayTargets::new(&env.settings),
    )
    .await
    .unwrap();
    assert_eq!(listing.letters[0].command_id, "poison");
    assert_eq!(listing.letters[0].kind, "delivery-limit");
    let (full, _) = store::get(&mut conn, listing.letters[0].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(full.body, command_body("1.00", 1).into_bytes());
    assert_eq!(full.original_exchange, env.settings.broker.command_exchange);
    assert!(full.dedup_key.starts_with("hash:"), "{}", full.dedup_key);
    assert_eq!(env.queue_depth(&env.command_queue()).await, 0);
    eventually("the dead-letter queue emptied", WAIT, || async {
        (env.queue_depth(&env.dead_letter_queue()).await == 0).then_some(())
    })
    .await;
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
