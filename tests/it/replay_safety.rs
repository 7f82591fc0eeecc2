//! Replays go only where they belong. A command's publisher can set any header, so a dead letter
//! may name any exchange and routing key: a replay publishes only to the worker's own command
//! target (or `dead_letters.replay_targets`), keeps the others as not replayable with the reason,
//! and never publishes them; good dead letters in the same job are replayed. A target the broker
//! refuses fails only its own dead letter.

use crate::console::{OPERATOR, RunningConsole};
use crate::helpers::*;
use crate::operations::{INGEST, stored};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use payment_link_worker::broker::messages::OutboundMessage;
use payment_link_worker::broker::publisher::publish_confirmed;
use payment_link_worker::config::ReplayTarget;
use payment_link_worker::dead_letters::store::{self as store, Filter};
use payment_link_worker::dead_letters::{self as ops, ReplayRequest};
use payment_link_worker::dead_letters::{listing, targets::ReplayTargets};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use wiremock::MockServer;

/// A command that expires in the command queue at once (the broker dead-letters it itself),
/// claiming through the worker's own header names that it belongs to `target`.
fn expiring(command_id: &str, target: Option<(&str, &str)>) -> BasicProperties {
    let mut properties = command_properties(command_id)
        .with_expiration("1".into())
        .with_reply_to(format!("reply.{command_id}").as_str().into());
    if let Some((exchange, routing_key)) = target {
        properties = with_header(properties, "x-original-exchange", exchange);
        properties = with_header(properties, "x-original-routing-key", routing_key);
        // What a forger would add to look like the worker's own dead letter.
        properties = with_header(properties, "x-error-kind", "provider-rejected");
        properties = with_header(properties, "x-dead-letter-id", "forged-id");
    }
    properties
}

async fn api_get(url: &str) -> Value {
    let answer = reqwest::Client::new()
        .get(url)
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{url}");
    serde_json::from_str(&answer.text().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_target_is_kept_not_replayable_and_never_published_while_good_ones_replay() {
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 7, "3.00", 1).await;
    let env = TestEnv::with(&provider.uri(), &[INGEST]).await;
    let events = env.capture_events().await;

    // Where the forged dead letters want to go: another service's exchange, a queue through the
    // default exchange, and an amq.* exchange. A queue listens at each.
    let other = format!("t.{}.other-service.commands", env.id);
    let by_name = format!("t.{}.victim-queue", env.id);
    let amq_key = format!("t.{}.amq", env.id);
    let forged = [
        ("forged-other", other.as_str(), "payment-link.create"),
        ("forged-default", "", by_name.as_str()),
        ("forged-amq", "amq.topic", amq_key.as_str()),
    ];
    let mut spies = Vec::new();
    for (_, exchange, key) in &forged {
        spies.push(env.spy(exchange, key).await);
    }
    // A queue beside the worker's that sees every copy published to the command target.
    let commands = env
        .spy(
            &env.settings.broker.command_exchange,
            &env.settings.broker.command_routing_key,
        )
        .await;

    // Published before any worker runs: all six expire in the queue and the broker dead-letters
    // them; the good ones differ only in claiming nothing.
    let body = command_body("3.00", 1);
    for (id, exchange, key) in &forged {
        env.publish_raw(expiring(id, Some((exchange, key))), body.as_bytes())
            .await;
    }
    for id in ["expired-1", "expired-2", "expired-3"] {
        env.publish_raw(expiring(id, None), body.as_bytes()).await;
    }
    let worker = env.start_worker().await;
    stored(&env, &Filter::default(), 6).await;
    // Good commands flow beside the hostile ones.
    env.send("fresh-1", &body).await;
    env.send("fresh-2", &body).await;

    // Stored with the broker's reason, whatever the forger claimed; shown not replayable.
    let mut conn = env.pool.get().await.unwrap();
    let targets = ReplayTargets::new(&env.settings);
    let listing = ops::list(&mut conn, &Filter::default(), 10, &targets)
        .await
        .unwrap();
    for letter in &listing.letters {
        assert_eq!(letter.kind, "expired", "{letter:?}");
        let is_forged = letter.command_id.starts_with("forged-");
        assert_eq!(letter.replayable, !is_forged, "{letter:?}");
        if is_forged {
            let why = letter.not_replayable_because.as_deref().unwrap();
            assert!(why.contains("not a target replay may publish to"), "{why}");
        }
    }
    let table = listing::format_listing(&listing);
    assert_eq!(table.matches(" is not replayable: ").count(), 3, "{table}");
    let default_one = listing
        .letters
        .iter()
        .find(|l| l.command_id == "forged-default")
        .unwrap();
    assert!(
        default_one
            .not_replayable_because
            .as_deref()
            .unwrap()
            .contains("the default exchange"),
        "a blank exchange is said in words"
    );

    // The console says so too, on the API and on the page.
    let console = RunningConsole::start(&env.settings).await;
    let api = format!("{}/api", console.base);
    let page = api_get(&format!("{api}/dead-letters?limit=10")).await;
    let flags: BTreeSet<(String, bool)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["commandId"].as_str().unwrap().to_owned(),
                i["replayable"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(flags.iter().filter(|(_, r)| !r).count(), 3, "{flags:?}");
    let forged_id = default_one.id;
    let detail = api_get(&format!("{api}/dead-letters/{forged_id}")).await;
    assert_eq!(detail["replayable"], json!(false));
    assert!(
        detail["notReplayableBecause"]
            .as_str()
            .unwrap()
            .contains("default exchange")
    );
    let html = reqwest::Client::new()
        .get(format!("{}/dead-letters/{forged_id}", console.base))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("id=\"not-replayable\""), "{html}");
    assert!(
        !html.contains("id=\"replay-one\""),
        "no replay button for it"
    );

    // "Replay all": the good ones are replayed, the forged ones skipped, with the reason.
    let (status, accepted) = {
        let answer = reqwest::Client::new()
            .post(format!("{api}/replays"))
            .bearer_auth(OPERATOR)
            .header("content-type", "application/json")
            .body(json!({"filter": {}}).to_string())
            .send()
            .await
            .unwrap();
        let status = answer.status().as_u16();
        (
            status,
            serde_json::from_str::<Value>(&answer.text().await.unwrap()).unwrap(),
        )
    };
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(
        (accepted["total"].as_i64(), accepted["skipped"].as_i64()),
        (Some(3), Some(3))
    );
    let job = accepted["jobId"].as_i64().unwrap();
    let done = eventually("the replay job to end", WAIT, || async {
        let job = api_get(&format!("{api}/replays/{job}")).await;
        (job["state"] == "done").then_some(job)
    })
    .await;
    assert_eq!(
        (
            done["replayed"].as_i64(),
            done["failed"].as_i64(),
            done["skipped"].as_i64()
        ),
        (Some(3), Some(0), Some(3)),
        "{done}"
    );
    let history = store::get(&mut conn, forged_id).await.unwrap().unwrap();
    assert_eq!(history.0.state, "open");
    assert!(
        history
            .1
            .iter()
            .any(|r| r.outcome.starts_with("skipped, not replayable")),
        "{:?}",
        history.1
    );

    // Every good command gets its event; nothing reached the forged targets.
    let created: BTreeSet<String> = env
        .messages(&events, 5, WAIT)
        .await
        .iter()
        .filter_map(|e| e.header("cloudEvents:subject"))
        .collect();
    let expected: BTreeSet<String> = ["expired-1", "expired-2", "expired-3", "fresh-1", "fresh-2"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(created, expected);
    for spy in &spies {
        assert_eq!(env.queue_depth(spy).await, 0, "{spy} stays empty");
    }
    // The replayed copies carry no reply_to (the publisher's, which pointed elsewhere).
    let mut replayed = Vec::new();
    while let Some(copy) = env.try_get(&commands).await {
        if copy.header_int("x-replay-count") == Some(1) {
            replayed.push(copy);
        }
    }
    assert_eq!(replayed.len(), 3);
    assert!(replayed.iter().all(|c| c.properties.reply_to().is_none()));
    console.stop().await;
    drop(worker);
}

/// A dead letter as the worker writes it, naming `exchange` as its original target.
fn worker_dead_letter(env: &TestEnv, i: usize, exchange: &str) -> OutboundMessage {
    let text = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
    let mut headers = FieldTable::default();
    headers.insert("x-dead-letter-id".into(), text(&format!("refused-{i}")));
    headers.insert("x-error-kind".into(), text("provider-rejected"));
    headers.insert("x-error-message".into(), text("the provider said no"));
    headers.insert("x-original-exchange".into(), text(exchange));
    headers.insert(
        "x-original-routing-key".into(),
        text(&env.settings.broker.command_routing_key),
    );
    OutboundMessage {
        exchange: env.settings.broker.dead_letter_exchange.clone(),
        routing_key: env.settings.broker.command_routing_key.clone(),
        properties: env.signed_dead_letter(
            BasicProperties::default()
                .with_message_id(format!("refused-{i}").as_str().into())
                .with_headers(headers),
        ),
        body: command_body("3.00", 1).into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_the_broker_refuses_fails_only_its_own_dead_letter() {
    let provider = MockServer::start().await;
    answer_with_link(&provider, 201, 7, "3.00", 1).await;
    let env = TestEnv::with(&provider.uri(), &[INGEST]).await;
    // Allowed, but there is no such exchange: the broker closes the channel on its publish.
    let missing = format!("t.{}.gone", env.id);
    let mut settings = env.settings.clone();
    settings.dead_letters.replay_targets = vec![
        ReplayTarget {
            exchange: env.settings.broker.command_exchange.clone(),
            routing_key: env.settings.broker.command_routing_key.clone(),
        },
        ReplayTarget {
            exchange: missing.clone(),
            routing_key: env.settings.broker.command_routing_key.clone(),
        },
    ];
    for i in 0..20 {
        let exchange = if i % 10 == 3 {
            missing.as_str()
        } else {
            env.settings.broker.command_exchange.as_str()
        };
        publish_confirmed(&env.channel, &worker_dead_letter(&env, i, exchange))
            .await
            .unwrap();
    }
    let _worker = env.start_worker().await;
    stored(&env, &Filter::default(), 20).await;
    let mut conn = env.pool.get().await.unwrap();
    let open = store::open_ids(&mut conn, &Filter::default())
        .await
        .unwrap();

    // Once all at once (one round of confirms), once at a rate (one at a time).
    for (half, rate) in [(&open[..10], None), (&open[10..], Some(50.0))] {
        let request = ReplayRequest {
            include_failing: true,
            ask_if_failing: false,
            filter: Filter {
                ids: Some(half.to_vec()),
                ..Filter::default()
            },
            limit: None,
            dry_run: false,
            rate,
            accept_duplicate_risk: false,
            requested_by: "replay-safety-test".into(),
            source: "cli".into(),
            client_address: None,
            guard: payment_link_worker::dead_letters::guard::GuardRequest::off(),
        };
        let started = ops::start(&settings, &mut conn, &request).await.unwrap();
        assert_eq!(started.ids.len(), 10);
        let worked = ops::work(&settings, &mut conn, started.run_id, rate)
            .await
            .unwrap();
        assert_eq!(
            (worked.replayed.len(), worked.failed.len()),
            (9, 1),
            "rate {rate:?}: {worked:?}"
        );
        let (refused, history) = store::get(&mut conn, worked.failed[0])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(refused.original_exchange, missing);
        let outcome = &history.last().unwrap().outcome;
        assert!(
            outcome.contains("NOT_FOUND") || outcome.contains("no exchange"),
            "the broker's reason: {outcome}"
        );
    }
    // The replayed ones reach the worker and get their events.
    eventually("18 replayed commands recorded", WAIT, || async {
        let mut done = 0;
        for i in (0..20).filter(|i| i % 10 != 3) {
            if env.record(&format!("refused-{i}")).await.is_some() {
                done += 1;
            }
        }
        (done == 18).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_unreplayable_dead_letters_is_skipped_whole_beside_a_good_one() {
    let provider = MockServer::start().await;
    let env = TestEnv::new(&provider.uri()).await;
    // More than one statement's worth of bound values (65,535 / 3 per history row).
    let flood = 25_000;
    exec_admin(
        env.settings.database.url.expose(),
        &format!(
            "INSERT INTO dead_letters (dedup_key, command_id, kind, error_message, failed_at, \
             original_exchange, original_routing_key, properties, body) \
             SELECT 'flood-' || i, 'flood-' || i, 'expired', 'forged', now(), '', 'victim', \
                    '{{}}', ''::bytea FROM generate_series(1, {flood}) AS i"
        ),
    )
    .await;
    publish_confirmed(
        &env.channel,
        &worker_dead_letter(&env, 0, &env.settings.broker.command_exchange),
    )
    .await
    .unwrap();
    let _worker = env
        .start_worker_with({
            let mut settings = env.settings.clone();
            settings.dead_letters.ingest = true;
            settings
        })
        .await;
    stored(&env, &Filter::default(), flood + 1).await;
    let mut conn = env.pool.get().await.unwrap();
    let request = ReplayRequest {
        include_failing: true,
        ask_if_failing: false,
        filter: Filter::default(),
        limit: None,
        dry_run: false,
        rate: None,
        accept_duplicate_risk: false,
        requested_by: "replay-safety-test".into(),
        source: "cli".into(),
        client_address: None,
        guard: payment_link_worker::dead_letters::guard::GuardRequest::off(),
    };
    let started = ops::start(&env.settings, &mut conn, &request)
        .await
        .unwrap();
    assert_eq!(
        (started.ids.len(), started.skipped.len()),
        (1, flood as usize)
    );
    let worked = ops::work(&env.settings, &mut conn, started.run_id, None)
        .await
        .unwrap();
    assert_eq!(worked.replayed.len(), 1);
    let run = payment_link_worker::store::replay_runs::find(&mut conn, started.run_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.skipped, flood as i32);
}

/// A dead letter that fails again as it is (a validation failure) is skipped by a replay unless
/// it is included, and counted as skipped with the reason; the console's operator is asked
/// (`askIfFailing` answers 409), while the good dead letter beside it is replayed either way.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_skips_what_fails_again_unless_included_and_the_console_asks() {
    let (env, _provider, _worker) = crate::console::with_dead_letters(1, &[]).await;
    env.send("fails-again", &command_body("0", 1)).await;
    stored(&env, &Filter::default(), 2).await;
    let console = RunningConsole::start(&env.settings).await;
    let replay = |body: Value| {
        reqwest::Client::new()
            .post(format!("{}/api/replays", console.base))
            .bearer_auth(OPERATOR)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let all = json!({"filter": {"state": "open"}});

    let asked = replay(json!({"filter": {"state": "open"}, "askIfFailing": true}))
        .await
        .unwrap();
    assert_eq!(asked.status(), 409);
    let asked: Value = serde_json::from_str(&asked.text().await.unwrap()).unwrap();
    assert_eq!(asked["failAgain"], 1, "{asked}");
    assert!(
        asked["error"].as_str().unwrap().contains("fail again"),
        "{asked}"
    );

    let skipped = replay(all.clone()).await.unwrap();
    assert_eq!(skipped.status(), 202);
    let skipped: Value = serde_json::from_str(&skipped.text().await.unwrap()).unwrap();
    assert_eq!(
        (skipped["total"].as_i64(), skipped["skipped"].as_i64()),
        (Some(1), Some(1))
    );
    let job = skipped["jobId"].as_i64().unwrap();
    let run = eventually("the run to end", WAIT, || async {
        let mut conn = env.pool.get().await.ok()?;
        let run = payment_link_worker::store::replay_runs::find(&mut conn, job)
            .await
            .ok()??;
        run.finished_at.is_some().then_some(run)
    })
    .await;
    assert_eq!((run.replayed, run.skipped), (1, 1));
    let mut conn = env.pool.get().await.unwrap();
    let failing = store::page(
        &mut conn,
        &Filter {
            command_id: Some("fails-again".into()),
            ..Filter::default()
        },
        1,
        None,
    )
    .await
    .unwrap()
    .0
    .remove(0);
    assert_eq!(failing.state, ops::State::Open, "left open");
    let (_, history) = store::get(&mut conn, failing.id).await.unwrap().unwrap();
    assert!(
        history
            .iter()
            .any(|r| r.outcome.contains("fails again as it is (validation)")),
        "{history:?}"
    );

    // Included, it is replayed (and, being still invalid, dead-lettered again).
    let included = replay(json!({"ids": [failing.id], "includeFailing": true}))
        .await
        .unwrap();
    assert_eq!(included.status(), 202);
    let included: Value = serde_json::from_str(&included.text().await.unwrap()).unwrap();
    assert_eq!(
        (included["total"].as_i64(), included["skipped"].as_i64()),
        (Some(1), Some(0))
    );
}
